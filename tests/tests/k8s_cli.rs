//! The Kubernetes-facing commands of the `sluice` binary that need no cluster: `sluice crds`
//! and `sluice check-manifests` (on the shipped examples and on a broken MetalLB manifest).

use std::process::Command;

use sluice_tests::sluice_bin;

fn examples() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_shipped_example_manifests_are_all_valid() {
    let out = Command::new(sluice_bin())
        .arg("check-manifests")
        .args(examples())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "IPAddressPool prod: Valid",
        "IPAddressPool lab: Valid",
        "L2Advertisement lab-on-eth1: Valid",
        "BGPPeer tor: Valid",
        "BFDProfile fast: Valid",
        "BGPAdvertisement prod-to-tor: Valid",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

#[test]
fn a_broken_metallb_manifest_is_reported_by_object_and_field_with_a_failing_exit() {
    let dir = std::env::temp_dir().join(format!("sluice-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("metallb.yaml");
    std::fs::write(
        &file,
        "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: a, namespace: metallb-system}\nspec: {addresses: [192.0.2.0/28]}\n---\n\
         apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: b, namespace: metallb-system}\nspec: {addresses: [192.0.2.8/29, 10.1.1.999/32]}\n",
    )
    .unwrap();
    let out = Command::new(sluice_bin())
        .arg("check-manifests")
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("IPAddressPool a: Valid"), "{stdout}");
    assert!(stdout.contains("IPAddressPool b: Invalid"), "{stdout}");
    assert!(
        stdout.contains("spec.addresses[1]: \"10.1.1.999/32\""),
        "{stdout}"
    );
    assert!(stdout.contains("overlaps"), "{stdout}");
}

#[test]
fn sluice_crds_prints_the_five_definitions_as_yaml_documents() {
    let out = Command::new(sluice_bin()).arg("crds").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut names = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(&text) {
        let v: yaml_serde::Value = serde::Deserialize::deserialize(doc).unwrap();
        assert_eq!(v["kind"].as_str(), Some("CustomResourceDefinition"));
        names.push(v["metadata"]["name"].as_str().unwrap().to_string());
    }
    names.sort();
    assert_eq!(
        names,
        [
            "bfdprofiles.sluice.dev",
            "bgpadvertisements.sluice.dev",
            "bgppeers.sluice.dev",
            "ipaddresspools.sluice.dev",
            "l2advertisements.sluice.dev"
        ]
    );
}
