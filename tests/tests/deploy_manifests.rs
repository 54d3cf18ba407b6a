//! deploy/: every manifest is the Kubernetes type it claims to be, with no field that type does
//! not know, and the kustomization installs every one of them.

use std::path::{Path, PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The manifests kustomize installs: every YAML file but the kustomization, the examples and
/// the host install's files (host/: a systemd unit and Sluice's own config).
fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !["examples", "host"].contains(&path.file_name().unwrap().to_str().unwrap()) {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "yaml")
                && path.file_name().unwrap() != "kustomization.yaml"
            {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy(), &mut out);
    out.sort();
    out
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    yaml_serde::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

/// Parses as `T` and back: a field `T` does not know would be lost on the way.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value, what: &str) {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: does not parse: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, doc,
        "{what}: has fields its type does not know (or wrong shapes)"
    );
}

#[test]
fn every_deploy_manifest_parses_as_the_kubernetes_type_it_claims_with_no_unknown_field() {
    let files = manifests();
    assert!(files.len() >= 8, "{files:?}");
    let mut kinds = Vec::new();
    for path in &files {
        for doc in documents(path) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let what = format!("{} ({kind} {})", path.display(), doc["metadata"]["name"]);
            match (
                doc["apiVersion"].as_str().unwrap_or_default(),
                kind.as_str(),
            ) {
                ("v1", "Namespace") => strict::<Namespace>(&doc, &what),
                ("v1", "ServiceAccount") => strict::<ServiceAccount>(&doc, &what),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    strict::<ClusterRole>(&doc, &what)
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    strict::<ClusterRoleBinding>(&doc, &what)
                }
                ("rbac.authorization.k8s.io/v1", "Role") => strict::<Role>(&doc, &what),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    strict::<RoleBinding>(&doc, &what)
                }
                ("apps/v1", "Deployment") => strict::<Deployment>(&doc, &what),
                ("apps/v1", "DaemonSet") => strict::<DaemonSet>(&doc, &what),
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                    strict::<CustomResourceDefinition>(&doc, &what)
                }
                (api_version, _) => panic!("{what}: no known type for {api_version}/{kind}"),
            }
            kinds.push(kind);
        }
    }
    for needed in [
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ] {
        assert!(kinds.iter().any(|k| k == needed), "no {needed} in deploy/");
    }
}

#[test]
fn the_kustomization_installs_every_manifest_and_names_no_missing_file() {
    let root = deploy();
    let k: Value =
        yaml_serde::from_str(&std::fs::read_to_string(root.join("kustomization.yaml")).unwrap())
            .unwrap();
    let listed: Vec<PathBuf> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| root.join(r.as_str().unwrap()))
        .collect();
    for path in &listed {
        assert!(
            path.exists(),
            "the kustomization names {}, which does not exist",
            path.display()
        );
    }
    for path in manifests() {
        assert!(
            listed.contains(&path),
            "{} is not in the kustomization",
            path.display()
        );
    }
}

#[test]
fn the_controller_runs_as_its_service_account_with_pod_name_and_namespace() {
    let docs = documents(&deploy().join("controller/deployment.yaml"));
    let d: Deployment = serde_json::from_value(docs[0].clone()).unwrap();
    let pod = d.spec.template.spec.unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("sluice-controller")
    );
    let c = &pod.containers[0];
    assert_eq!(c.args.as_ref().unwrap()[0], "controller");
    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"));
}

#[test]
fn the_speaker_daemonset_opens_the_mesh_port_and_mounts_the_secret_the_controller_creates() {
    let docs = documents(&deploy().join("speaker/daemonset.yaml"));
    let d: k8s_openapi::api::apps::v1::DaemonSet = serde_json::from_value(docs[0].clone()).unwrap();
    let pod = d.spec.template.spec.unwrap();
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap_or_default();
    let port = lb_userspace::mesh::DEFAULT_PORT;
    assert!(args.contains(&format!("--mesh-port={port}")), "{args:?}");
    let ports = c.ports.clone().unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.container_port == i32::from(port) && p.protocol.as_deref() == Some("UDP")),
        "{ports:?}"
    );
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.secret.is_some())
        .expect("a Secret volume");
    let secret = volume.secret.as_ref().unwrap();
    assert_eq!(
        secret.secret_name.as_deref(),
        Some(lb_userspace::k8s::controller::MESH_SECRET)
    );
    assert_eq!(
        secret.optional,
        Some(true),
        "the speakers start before the controller made it"
    );
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .expect("mounted");
    assert!(args.contains(&format!(
        "--mesh-secret-file={}/{}",
        mount.mount_path,
        lb_userspace::k8s::controller::MESH_SECRET_KEY
    )));
    let node_ip = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_IP")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_ip.as_deref(), Some("status.hostIP"));
}
