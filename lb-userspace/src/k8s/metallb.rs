//! MetalLB's objects as they are: `metallb.io` IPAddressPool, L2Advertisement, BGPAdvertisement
//! (v1beta1), BGPPeer (v1beta1 and v1beta2), BFDProfile and Community, read into Sluice's
//! objects with MetalLB's semantics. Community aliases are resolved in BGPAdvertisements.
//! What Sluice does not do is reported per object, never silently ignored: a field that would
//! change what the object means (a BGPPeer's `vrf`, `dynamicASN`, `interface`,
//! `passwordSecret`) leaves the object out; one that changes nothing here is noted; an unknown
//! field is named. Pure: the controller, the speaker, `sluice check-manifests` and
//! `sluice migrate` use it.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    crd::{BFDProfile, BGPAdvertisement, BGPPeer, IPAddressPool, L2Advertisement},
    validity::Objects,
};

/// Annotation on objects read from `metallb.io`: the apiVersion they came from. The controller
/// writes no status to them (they are MetalLB's); it reports on them with Events.
pub const FROM_ANNOTATION: &str = "sluice.dev/from";

/// The group.
pub const GROUP: &str = "metallb.io";

/// The kinds read, with their plural (for the API paths) and the version watched.
pub const KINDS: [(&str, &str, &str); 6] = [
    ("IPAddressPool", "ipaddresspools", "v1beta1"),
    ("L2Advertisement", "l2advertisements", "v1beta1"),
    ("BGPAdvertisement", "bgpadvertisements", "v1beta1"),
    ("BGPPeer", "bgppeers", "v1beta2"),
    ("BFDProfile", "bfdprofiles", "v1beta1"),
    ("Community", "communities", "v1beta1"),
];

/// One metallb.io object: kind and name (its namespace is the one watched).
pub type MetallbRef = (String, String);

/// What was read: the objects Sluice uses, and each object's problems (empty: read whole).
#[derive(Debug, Default, Clone)]
pub struct Read {
    pub objects: Objects,
    pub problems: BTreeMap<MetallbRef, Vec<String>>,
    /// Each object as read (kind, name) → its apiVersion and uid, for Events.
    pub origins: BTreeMap<MetallbRef, (String, Option<String>)>,
}

/// How Sluice treats a field it does not use.
enum Unsupported {
    /// The object means something Sluice cannot do: it is left out.
    LeavesOut(&'static str),
    /// Nothing changes here: noted.
    Noted(&'static str),
}

fn known_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "IPAddressPool" => &[
            "addresses",
            "autoAssign",
            "avoidBuggyIPs",
            "serviceAllocation",
        ],
        "L2Advertisement" => &[
            "ipAddressPools",
            "ipAddressPoolSelectors",
            "nodeSelectors",
            "interfaces",
        ],
        "BGPAdvertisement" => &[
            "aggregationLength",
            "aggregationLengthV6",
            "localPref",
            "communities",
            "ipAddressPools",
            "ipAddressPoolSelectors",
            "nodeSelectors",
            "peers",
        ],
        "BGPPeer" => &[
            "myASN",
            "peerASN",
            "peerAddress",
            "sourceAddress",
            "peerPort",
            "holdTime",
            "keepaliveTime",
            "connectTime",
            "routerID",
            "nodeSelectors",
            "password",
            "bfdProfile",
            "ebgpMultiHop",
        ],
        "BFDProfile" => &[
            "receiveInterval",
            "transmitInterval",
            "detectMultiplier",
            "echoInterval",
            "echoMode",
            "passiveMode",
            "minimumTtl",
        ],
        _ => &[],
    }
}

/// A field Sluice does not use, set to `value`: what that means here (`None`: the value is the
/// default, nothing to say).
fn unsupported(kind: &str, field: &str, value: &Value) -> Option<Unsupported> {
    let set = match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    };
    if !set {
        return None;
    }
    Some(match (kind, field) {
        ("BGPPeer", "vrf") => Unsupported::LeavesOut(
            "Sluice peers from the default routing table only (no VRFs); this peer is left out",
        ),
        ("BGPPeer", "dynamicASN") => Unsupported::LeavesOut(
            "Sluice needs the peer's ASN in peerASN (no dynamicASN); this peer is left out",
        ),
        ("BGPPeer", "interface") => Unsupported::LeavesOut(
            "Sluice does not peer over an interface without an address (unnumbered BGP); this peer is left out",
        ),
        ("BGPPeer", "passwordSecret") => Unsupported::LeavesOut(
            "Sluice does not read Secrets for BGP passwords; write it in spec.password (or a sluice.dev BGPPeer); this peer is left out",
        ),
        ("BGPPeer", "enableGracefulRestart") => Unsupported::Noted(
            "Sluice always offers graceful restart (RFC 4724); nothing to enable",
        ),
        ("BGPPeer", "disableMP") => Unsupported::Noted(
            "Sluice negotiates each address family on its own (RFC 4760); disableMP changes nothing",
        ),
        ("BFDProfile", "echoReceiveInterval" | "echoTransmitInterval") => {
            Unsupported::Noted("Sluice runs BFD in asynchronous mode only; echo intervals are not used")
        }
        _ => Unsupported::Noted("not a field Sluice knows; ignored"),
    })
}

/// Reads metallb.io objects (whole objects as JSON: apiVersion, kind, metadata, spec).
/// Objects of other groups or kinds are skipped.
pub fn read(objects: &[Value]) -> Read {
    let mut out = Read::default();
    // Community aliases first: BGPAdvertisements name them.
    let mut aliases: BTreeMap<String, String> = BTreeMap::new();
    for o in objects
        .iter()
        .filter(|o| is_metallb(o) && kind_of(o) == "Community")
    {
        let at = reference(o);
        out.origins.insert(at.clone(), origin(o));
        let mut problems = Vec::new();
        let list = o
            .pointer("/spec/communities")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (i, c) in list.iter().enumerate() {
            match (
                c.get("name").and_then(Value::as_str),
                c.get("value").and_then(Value::as_str),
            ) {
                (Some(name), Some(value)) => {
                    aliases.insert(name.to_string(), value.to_string());
                }
                _ => problems.push(format!(
                    "spec.communities[{i}]: needs a name and a value (like {{name: vpn-only, value: \"1234:1\"}})"
                )),
            }
        }
        out.problems.insert(at, problems);
    }
    for o in objects.iter().filter(|o| is_metallb(o)) {
        let kind = kind_of(o);
        // Community is read above; other kinds are not MetalLB's configuration.
        if known_fields(kind).is_empty() {
            continue;
        }
        let at = reference(o);
        out.origins.insert(at.clone(), origin(o));
        let mut problems = Vec::new();
        let mut left_out = false;
        let mut spec = o
            .get("spec")
            .cloned()
            .unwrap_or(Value::Object(Default::default()));
        if let Some(fields) = spec.as_object_mut() {
            let names: Vec<String> = fields.keys().cloned().collect();
            for field in names {
                if known_fields(kind).contains(&field.as_str()) {
                    continue;
                }
                let value = fields.remove(&field).unwrap_or(Value::Null);
                match unsupported(kind, &field, &value) {
                    Some(Unsupported::LeavesOut(why)) => {
                        left_out = true;
                        problems.push(format!("spec.{field}: {why}"));
                    }
                    Some(Unsupported::Noted(why)) => problems.push(format!("spec.{field}: {why}")),
                    None => {}
                }
            }
            if kind == "BGPAdvertisement" {
                if let Some(Value::Array(communities)) = fields.get_mut("communities") {
                    for c in communities.iter_mut() {
                        if let Some(value) = c.as_str().and_then(|name| aliases.get(name)) {
                            *c = Value::String(value.clone());
                        }
                    }
                }
            }
        }
        if left_out {
            out.problems.insert(at, problems);
            continue;
        }
        let mut metadata = o.get("metadata").cloned().unwrap_or(Value::Null);
        if let Some(meta) = metadata.as_object_mut() {
            let api_version = o.get("apiVersion").cloned().unwrap_or(Value::Null);
            let annotations = meta
                .entry("annotations")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(a) = annotations.as_object_mut() {
                a.insert(FROM_ANNOTATION.into(), api_version);
            }
            meta.remove("managedFields");
        }
        let ours = serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": kind,
            "metadata": metadata,
            "spec": spec,
        });
        let typed = match kind {
            "IPAddressPool" => {
                serde_json::from_value::<IPAddressPool>(ours).map(|x| out.objects.pools.push(x))
            }
            "L2Advertisement" => serde_json::from_value::<L2Advertisement>(ours)
                .map(|x| out.objects.l2_advertisements.push(x)),
            "BGPAdvertisement" => serde_json::from_value::<BGPAdvertisement>(ours)
                .map(|x| out.objects.bgp_advertisements.push(x)),
            "BGPPeer" => serde_json::from_value::<BGPPeer>(ours).map(|x| out.objects.peers.push(x)),
            "BFDProfile" => {
                serde_json::from_value::<BFDProfile>(ours).map(|x| out.objects.bfd_profiles.push(x))
            }
            _ => Ok(()),
        };
        if let Err(e) = typed {
            problems.push(format!("spec: {e}; this object is left out"));
        }
        out.problems.insert(at, problems);
    }
    out
}

fn is_metallb(o: &Value) -> bool {
    o.get("apiVersion")
        .and_then(Value::as_str)
        .is_some_and(|v| v.starts_with("metallb.io/"))
}

fn kind_of(o: &Value) -> &str {
    o.get("kind").and_then(Value::as_str).unwrap_or_default()
}

fn reference(o: &Value) -> MetallbRef {
    (
        kind_of(o).to_string(),
        o.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    )
}

fn origin(o: &Value) -> (String, Option<String>) {
    (
        o.get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        o.pointer("/metadata/uid")
            .and_then(Value::as_str)
            .map(String::from),
    )
}

/// Was this object read from metallb.io?
pub fn is_from_metallb(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(FROM_ANNOTATION))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::validity;
    use serde_json::json;

    fn objects() -> Vec<Value> {
        vec![
            json!({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
                   "metadata": {"name": "prod", "namespace": "metallb-system", "uid": "u1"},
                   "spec": {"addresses": ["192.0.2.0/28"], "autoAssign": true}}),
            json!({"apiVersion": "metallb.io/v1beta1", "kind": "L2Advertisement",
                   "metadata": {"name": "l2"}, "spec": {"ipAddressPools": ["prod"]}}),
            json!({"apiVersion": "metallb.io/v1beta1", "kind": "Community",
                   "metadata": {"name": "aliases"},
                   "spec": {"communities": [{"name": "vpn-only", "value": "1234:1"}]}}),
            json!({"apiVersion": "metallb.io/v1beta1", "kind": "BGPAdvertisement",
                   "metadata": {"name": "adv"},
                   "spec": {"ipAddressPools": ["prod"], "communities": ["vpn-only", "no-export"],
                            "localPref": 50}}),
            json!({"apiVersion": "metallb.io/v1beta2", "kind": "BGPPeer",
                   "metadata": {"name": "tor"},
                   "spec": {"peerAddress": "192.0.2.1", "peerASN": 64501, "myASN": 64500,
                            "holdTime": "9s", "enableGracefulRestart": true, "vrf": ""}}),
            json!({"apiVersion": "metallb.io/v1beta2", "kind": "BGPPeer",
                   "metadata": {"name": "in-vrf"},
                   "spec": {"peerAddress": "192.0.2.2", "peerASN": 64501, "myASN": 64500,
                            "vrf": "red"}}),
            json!({"apiVersion": "metallb.io/v1beta1", "kind": "BFDProfile",
                   "metadata": {"name": "fast"}, "spec": {"receiveInterval": 100, "fancy": 1}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}),
        ]
    }

    #[test]
    fn metallb_objects_read_as_sluice_objects_with_community_aliases_resolved() {
        let read = read(&objects());
        let o = &read.objects;
        assert_eq!(
            (
                o.pools.len(),
                o.l2_advertisements.len(),
                o.bgp_advertisements.len(),
                o.peers.len(),
                o.bfd_profiles.len()
            ),
            (1, 1, 1, 1, 1)
        );
        assert_eq!(
            o.bgp_advertisements[0].spec.communities,
            ["1234:1", "no-export"]
        );
        assert_eq!(o.peers[0].spec.hold_time.as_deref(), Some("9s"));
        assert!(is_from_metallb(&o.pools[0].metadata));
        assert_eq!(
            read.origins[&("IPAddressPool".to_string(), "prod".to_string())],
            ("metallb.io/v1beta1".to_string(), Some("u1".to_string()))
        );
        let verdict = validity::validate(o);
        assert!(verdict.config.is_some(), "{:?}", verdict.problems);
    }

    #[test]
    fn what_sluice_does_not_do_is_reported_per_object_and_a_vrf_peer_is_left_out() {
        let read = read(&objects());
        let of =
            |kind: &str, name: &str| read.problems[&(kind.to_string(), name.to_string())].clone();
        assert!(of("IPAddressPool", "prod").is_empty());
        assert_eq!(
            of("BGPPeer", "tor"),
            ["spec.enableGracefulRestart: Sluice always offers graceful restart (RFC 4724); nothing to enable"],
            "an empty vrf is the default table: nothing to say"
        );
        assert!(of("BGPPeer", "in-vrf")[0]
            .starts_with("spec.vrf: Sluice peers from the default routing table only"));
        assert!(read
            .objects
            .peers
            .iter()
            .all(|p| p.metadata.name.as_deref() != Some("in-vrf")));
        assert_eq!(
            of("BFDProfile", "fast"),
            ["spec.fancy: not a field Sluice knows; ignored"]
        );
    }

    #[test]
    fn a_malformed_object_is_left_out_with_its_problem_not_a_panic() {
        let read = read(&[
            json!({"apiVersion": "metallb.io/v1beta2", "kind": "BGPPeer", "metadata": {"name": "x"},
                   "spec": {"peerAddress": "192.0.2.1", "peerASN": "many", "myASN": 1}}),
            json!({"apiVersion": "metallb.io/v1beta1", "kind": "Community", "metadata": {"name": "c"},
                   "spec": {"communities": [{"name": "half"}]}}),
            json!({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool"}),
        ]);
        assert!(read.objects.peers.is_empty());
        assert!(
            read.problems[&("BGPPeer".into(), "x".into())][0].contains("this object is left out")
        );
        assert!(read.problems[&("Community".into(), "c".into())][0]
            .starts_with("spec.communities[0]: needs a name and a value"));
    }
}
