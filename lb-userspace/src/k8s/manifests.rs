//! Reads Sluice's custom resources from YAML manifests (multi-document), and MetalLB's too
//! (`metallb.io/v1beta1` and `v1beta2`: same kinds, same fields), so `sluice check-manifests`
//! can tell a user before `kubectl apply` what the controller will say. Pure.

use serde::Deserialize;

use super::{
    crd::{BFDProfile, BGPAdvertisement, BGPPeer, IPAddressPool, L2Advertisement},
    metallb,
    validity::Objects,
};

/// What a manifest file held.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Objects,
    /// Documents of other kinds, skipped.
    pub skipped: usize,
    /// What Sluice does not do with MetalLB's objects, per object (`BGPPeer tor: spec.vrf: ...`).
    pub notes: Vec<String>,
}

/// Parses every document; documents of other kinds are skipped. Errors name the document
/// (1-based), the kind and the field. metallb.io documents are read as the controller reads
/// them (`metallb::read`).
pub fn parse(name: &str, text: &str) -> Result<Parsed, String> {
    let mut out = Parsed::default();
    let mut metallb_docs = Vec::new();
    // Every document; a `kind: List` (what `kubectl get -o yaml` prints) gives its items.
    let mut documents = Vec::new();
    for (i, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let at = format!("{name}: document {}", i + 1);
        let value = yaml_serde::Value::deserialize(doc).map_err(|e| format!("{at}: {e}"))?;
        match value.get("items").and_then(|items| items.as_sequence()) {
            Some(items) if value.get("kind").and_then(|k| k.as_str()) == Some("List") => {
                for (j, item) in items.iter().enumerate() {
                    documents.push((format!("{at}, item {}", j + 1), item.clone()));
                }
            }
            _ => documents.push((at, value)),
        }
    }
    for (at, value) in documents {
        if value.is_null() {
            continue;
        }
        let text_of = |key: &str| {
            value
                .get(key)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let (api_version, kind) = (text_of("apiVersion"), text_of("kind"));
        let kind = kind.as_str();
        if api_version.starts_with("metallb.io/") {
            let json: serde_json::Value =
                serde_json::to_value(&value).map_err(|e| format!("{at}: {e}"))?;
            metallb_docs.push(json);
            continue;
        }
        if !api_version.starts_with("sluice.dev/") {
            out.skipped += 1;
            continue;
        }
        fn typed<T: serde::de::DeserializeOwned>(
            at: &str,
            kind: &str,
            v: yaml_serde::Value,
        ) -> Result<T, String> {
            serde_path_to_error::deserialize(v)
                .map_err(|e| format!("{at} ({kind}): {}: {}", e.path(), e.inner()))
        }
        let objects = &mut out.objects;
        match kind {
            "IPAddressPool" => objects
                .pools
                .push(typed::<IPAddressPool>(&at, kind, value)?),
            "L2Advertisement" => objects
                .l2_advertisements
                .push(typed::<L2Advertisement>(&at, kind, value)?),
            "BGPPeer" => objects.peers.push(typed::<BGPPeer>(&at, kind, value)?),
            "BGPAdvertisement" => objects
                .bgp_advertisements
                .push(typed::<BGPAdvertisement>(&at, kind, value)?),
            "BFDProfile" => objects
                .bfd_profiles
                .push(typed::<BFDProfile>(&at, kind, value)?),
            _ => out.skipped += 1,
        }
    }
    let read = metallb::read(&metallb_docs);
    for ((kind, object), problems) in &read.problems {
        for p in problems {
            out.notes.push(format!("{name}: {kind} {object}: {p}"));
        }
    }
    out.objects.extend(read.objects);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::validity;

    #[test]
    fn metallb_and_sluice_manifests_are_read_and_other_documents_skipped() {
        let text = r#"
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: prod, namespace: metallb-system}
spec: {addresses: [192.0.2.0/28]}
---
apiVersion: sluice.dev/v1alpha1
kind: L2Advertisement
metadata: {name: l2}
spec: {ipAddressPools: [prod], interfaces: [eth1]}
---
apiVersion: v1
kind: Namespace
metadata: {name: metallb-system}
---
"#;
        let Parsed {
            objects, skipped, ..
        } = parse("m.yaml", text).unwrap();
        assert_eq!(
            (
                objects.pools.len(),
                objects.l2_advertisements.len(),
                skipped
            ),
            (1, 1, 1)
        );
        let verdict = validity::validate(&objects);
        assert!(verdict.config.is_some(), "{:?}", verdict.problems);
    }

    #[test]
    fn a_field_of_the_wrong_type_names_the_document_and_the_field() {
        let text = "apiVersion: sluice.dev/v1alpha1\nkind: BGPPeer\nmetadata: {name: r}\nspec: {peerAddress: 192.0.2.1, peerASN: many, myASN: 1}\n";
        let e = parse("m.yaml", text).unwrap_err();
        assert!(
            e.starts_with("m.yaml: document 1 (BGPPeer): spec.peerASN"),
            "{e}"
        );
    }

    #[test]
    fn a_list_as_kubectl_get_prints_it_gives_its_items() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: metallb.io/v1beta1\n  kind: IPAddressPool\n  metadata: {name: a, namespace: metallb-system}\n  spec: {addresses: [192.0.2.0/28]}\n- apiVersion: metallb.io/v1beta1\n  kind: L2Advertisement\n  metadata: {name: l2, namespace: metallb-system}\n  spec: {}\n";
        let parsed = parse("m.yaml", text).unwrap();
        assert_eq!(
            (
                parsed.objects.pools.len(),
                parsed.objects.l2_advertisements.len()
            ),
            (1, 1)
        );
    }

    #[test]
    fn broken_yaml_is_an_error_not_a_panic() {
        assert!(parse("m.yaml", "apiVersion: [").is_err());
    }
}
