//! `sluice migrate`: MetalLB's configuration as `sluice.dev` manifests, for users who move over
//! for good. Reads a legacy ConfigMap (or its `config` string) or metallb.io manifests, with
//! MetalLB's semantics (the same reading `sluice run` and the controller do); writes
//! multi-document YAML that `sluice check-manifests` and `kubectl apply` take. What Sluice does
//! not do is returned as notes, never dropped without a word. Pure.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use kube::Resource;
use serde::Serialize;

use super::{
    crd::{
        BFDProfile, BFDProfileSpec, BGPAdvertisement, BGPAdvertisementSpec, BGPPeer, BGPPeerSpec,
        IPAddressPool, IPAddressPoolSpec, L2Advertisement, L2AdvertisementSpec,
    },
    manifests,
    validity::Objects,
};
use crate::config::file;

/// The manifests, and what the reader should know.
#[derive(Debug, Default)]
pub struct Migrated {
    pub yaml: String,
    pub notes: Vec<String>,
}

/// Migrates files (`(name, text)`) into `sluice.dev` objects in `namespace`.
pub fn migrate(files: &[(String, String)], namespace: &str) -> Result<Migrated, String> {
    let mut all = Objects::default();
    let mut notes = Vec::new();
    for (name, text) in files {
        match file::legacy(text).map_err(|e| format!("{name}: {e}"))? {
            Some((legacy, prefix)) => {
                let (objects, more) = from_legacy(name, &legacy, &prefix)?;
                all.extend(objects);
                notes.extend(more);
            }
            None => {
                let parsed = manifests::parse(name, text)?;
                let found = parsed.objects.pools.len()
                    + parsed.objects.l2_advertisements.len()
                    + parsed.objects.peers.len()
                    + parsed.objects.bgp_advertisements.len()
                    + parsed.objects.bfd_profiles.len();
                if found == 0 && parsed.notes.is_empty() {
                    return Err(format!(
                        "{name}: neither a MetalLB ConfigMap (or its config) nor metallb.io manifests"
                    ));
                }
                notes.extend(parsed.notes);
                all.extend(parsed.objects);
            }
        }
    }
    let mut yaml = String::new();
    emit(&mut yaml, &all.pools, namespace)?;
    emit(&mut yaml, &all.l2_advertisements, namespace)?;
    emit(&mut yaml, &all.bfd_profiles, namespace)?;
    emit(&mut yaml, &all.peers, namespace)?;
    emit(&mut yaml, &all.bgp_advertisements, namespace)?;
    Ok(Migrated { yaml, notes })
}

/// Writes objects as YAML documents: name, namespace and labels only in metadata, no status.
fn emit<K>(out: &mut String, objects: &[K], namespace: &str) -> Result<(), String>
where
    K: Resource + Serialize,
{
    for o in objects {
        let mut value = serde_json::to_value(o).map_err(|e| e.to_string())?;
        let meta = o.meta();
        let mut metadata = serde_json::json!({
            "name": meta.name.clone().unwrap_or_default(),
            "namespace": namespace,
        });
        if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
            metadata["labels"] = serde_json::to_value(labels).map_err(|e| e.to_string())?;
        }
        value["metadata"] = metadata;
        if let Some(map) = value.as_object_mut() {
            map.remove("status");
        }
        out.push_str("---\n");
        out.push_str(&yaml_serde::to_string(&value).map_err(|e| e.to_string())?);
    }
    Ok(())
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        ..Default::default()
    }
}

/// A name Kubernetes takes (DNS-1123 label) for a peer: `peer-192-0-2-1`.
fn peer_name(address: &str) -> String {
    let mut name: String = format!("peer-{address}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

fn duration(d: &Option<file::Duration>) -> Option<String> {
    d.as_ref().map(|d| match d {
        file::Duration::Seconds(s) => format!("{s}s"),
        file::Duration::Text(t) => t.clone(),
    })
}

/// A legacy `node-selectors` entry (`match-labels`, `match-expressions`) as a LabelSelector.
fn selector(value: &yaml_serde::Value, at: &str) -> Result<LabelSelector, String> {
    let match_labels = match value.get("match-labels") {
        None => None,
        Some(v) => Some(
            yaml_serde::from_value::<BTreeMap<String, String>>(v.clone())
                .map_err(|e| format!("{at}.match-labels: {e}"))?,
        ),
    };
    let match_expressions = match value.get("match-expressions") {
        None => None,
        Some(v) => Some(
            yaml_serde::from_value::<Vec<LabelSelectorRequirement>>(v.clone())
                .map_err(|e| format!("{at}.match-expressions: {e}"))?,
        ),
    };
    Ok(LabelSelector {
        match_labels,
        match_expressions,
    })
}

fn from_legacy(
    name: &str,
    legacy: &file::LegacyConfig,
    prefix: &str,
) -> Result<(Objects, Vec<String>), String> {
    let f = file::from_legacy(legacy.clone(), prefix).map_err(|e| format!("{name}: {e}"))?;
    let mut o = Objects::default();
    let mut notes = Vec::new();
    for (i, p) in f.pools.iter().enumerate() {
        let at = f
            .legacy
            .as_ref()
            .and_then(|l| l.get("pools", i))
            .unwrap_or_default()
            .to_string();
        for (j, a) in p.addresses.iter().enumerate() {
            if let Ok(net) = a.trim().parse::<ipnet::IpNet>() {
                if net.trunc() != net {
                    notes.push(format!(
                        "{name}: {at}.addresses[{j}]: {a:?} has host bits set; written as {}, as MetalLB reads it",
                        net.trunc()
                    ));
                }
            }
        }
        o.pools.push(IPAddressPool {
            metadata: meta(&p.name),
            spec: IPAddressPoolSpec {
                // As MetalLB reads them: a CIDR's host bits cleared (sluice.dev is strict).
                addresses: p
                    .addresses
                    .iter()
                    .map(|a| match a.trim().parse::<ipnet::IpNet>() {
                        Ok(net) => net.trunc().to_string(),
                        Err(_) => a.clone(),
                    })
                    .collect(),
                auto_assign: (!p.auto_assign).then_some(false),
                avoid_buggy_ips: p.avoid_buggy_ips.then_some(true),
                service_allocation: None,
            },
            status: None,
        });
    }
    for a in &f.l2_advertisements {
        o.l2_advertisements.push(L2Advertisement {
            metadata: meta(&a.ip_address_pools.join("-")),
            spec: L2AdvertisementSpec {
                ip_address_pools: a.ip_address_pools.clone(),
                ..Default::default()
            },
            status: None,
        });
    }
    let mut per_pool: BTreeMap<String, usize> = BTreeMap::new();
    for a in &f.bgp_advertisements {
        *per_pool.entry(a.ip_address_pools.join("-")).or_default() += 1;
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for a in &f.bgp_advertisements {
        let pool = a.ip_address_pools.join("-");
        let n = seen.entry(pool.clone()).or_default();
        let object_name = if per_pool[&pool] > 1 {
            format!("{pool}-{n}")
        } else {
            pool.clone()
        };
        *n += 1;
        o.bgp_advertisements.push(BGPAdvertisement {
            metadata: meta(&object_name),
            spec: BGPAdvertisementSpec {
                ip_address_pools: a.ip_address_pools.clone(),
                communities: a.communities.clone(),
                local_pref: a.local_pref,
                aggregation_length: a.aggregation_length,
                aggregation_length_v6: a.aggregation_length_v6,
                ..Default::default()
            },
            status: None,
        });
    }
    for (i, (p, lp)) in f.peers.iter().zip(&legacy.peers).enumerate() {
        let at = format!("{name}: {prefix}peers[{i}].node-selectors");
        let node_selectors = match lp.node_selectors.as_ref().and_then(|v| v.as_sequence()) {
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(j, v)| selector(v, &format!("{at}[{j}]")))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        o.peers.push(BGPPeer {
            metadata: meta(&peer_name(&p.peer_address)),
            spec: BGPPeerSpec {
                peer_address: p.peer_address.clone(),
                peer_asn: p.peer_asn,
                my_asn: p.my_asn,
                peer_port: p.peer_port,
                source_address: p.source_address.clone(),
                hold_time: duration(&p.hold_time),
                keepalive_time: duration(&p.keepalive_time),
                connect_time: None,
                router_id: p.router_id.clone(),
                password: p.password.clone(),
                ebgp_multi_hop: p.ebgp_multi_hop,
                node_selectors,
                bfd_profile: p.bfd_profile.clone(),
            },
            status: None,
        });
    }
    for b in &f.bfd_profiles {
        o.bfd_profiles.push(BFDProfile {
            metadata: meta(&b.name),
            spec: BFDProfileSpec {
                receive_interval: b.receive_interval,
                transmit_interval: b.transmit_interval,
                detect_multiplier: b.detect_multiplier,
                echo_interval: b.echo_interval,
                echo_mode: b.echo_mode,
                passive_mode: b.passive_mode,
                minimum_ttl: b.minimum_ttl,
            },
            status: None,
        });
    }
    notes.extend(
        f.warnings
            .iter()
            .filter(|w| !w.path.ends_with("node-selectors"))
            .map(|w| format!("{name}: {w}")),
    );
    if !o.l2_advertisements.is_empty() {
        notes.push(format!(
            "{name}: layer2 pools become L2Advertisements that name no interface: each node answers on-link, on its interfaces whose subnets hold the address"
        ));
    }
    Ok((o, notes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::validity;

    fn round_trip(yaml: &str) -> validity::Verdict {
        let parsed = manifests::parse("out.yaml", yaml).unwrap();
        assert_eq!(parsed.skipped, 0);
        validity::validate(&parsed.objects)
    }

    #[test]
    fn a_legacy_configmap_becomes_sluice_manifests_that_validate() {
        let cm = "apiVersion: v1\nkind: ConfigMap\ndata:\n  config: |\n    peers:\n    - peer-address: 10.0.0.1\n      peer-asn: 64501\n      my-asn: 64500\n      hold-time: 90s\n      node-selectors:\n      - match-labels: {rack: frontend}\n        match-expressions: [{key: speed, operator: NotIn, values: [slow]}]\n    bgp-communities: {no-advertise: \"65535:65282\"}\n    address-pools:\n    - name: lan\n      protocol: layer2\n      addresses: [192.168.1.1/24]\n    - name: routed\n      protocol: bgp\n      addresses: [203.0.113.0/28]\n      auto-assign: false\n      bgp-advertisements:\n      - {aggregation-length: 32, localpref: 100, communities: [no-advertise]}\n      - {aggregation-length: 24}\n";
        let m = migrate(&[("cm.yaml".into(), cm.into())], "sluice-system").unwrap();
        let verdict = round_trip(&m.yaml);
        assert!(
            verdict.config.is_some(),
            "{:?}\n{}",
            verdict.problems,
            m.yaml
        );
        let config = verdict.config.unwrap();
        assert_eq!(config.pools.len(), 2);
        assert_eq!(config.bgp_advertisements.len(), 2);
        assert_eq!(config.bgp_advertisements[0].communities, [(65535, 65282)]);
        for expected in [
            "kind: IPAddressPool",
            "namespace: sluice-system",
            "- 192.168.1.0/24",
            "autoAssign: false",
            "name: routed-1",
            "name: peer-10-0-0-1",
            "holdTime: 90s",
            "rack: frontend",
            "operator: NotIn",
        ] {
            assert!(m.yaml.contains(expected), "{expected} in\n{}", m.yaml);
        }
        assert!(!m.yaml.contains("status"), "{}", m.yaml);
        assert!(
            m.notes.iter().any(|n| n.contains("host bits set")),
            "{:?}",
            m.notes
        );
    }

    #[test]
    fn metallb_manifests_become_sluice_manifests_and_what_sluice_does_not_do_is_noted() {
        let text = "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: prod, namespace: metallb-system, uid: x, labels: {tier: web}}\nspec: {addresses: [192.0.2.0/28]}\n---\napiVersion: metallb.io/v1beta2\nkind: BGPPeer\nmetadata: {name: tor, namespace: metallb-system}\nspec: {peerAddress: 192.0.2.1, peerASN: 64501, myASN: 64500, vrf: red}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: metallb-system}\n";
        let m = migrate(&[("m.yaml".into(), text.into())], "lb").unwrap();
        let verdict = round_trip(&m.yaml);
        assert!(verdict.config.is_some(), "{:?}", verdict.problems);
        assert!(m.yaml.contains("apiVersion: sluice.dev/v1alpha1"));
        assert!(m.yaml.contains("tier: web") && m.yaml.contains("namespace: lb"));
        assert!(!m.yaml.contains("uid") && !m.yaml.contains("sluice.dev/from"));
        assert!(!m.yaml.contains("BGPPeer"), "the VRF peer is left out");
        assert!(
            m.notes[0].starts_with("m.yaml: BGPPeer tor: spec.vrf:"),
            "{:?}",
            m.notes
        );
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        let e = migrate(&[("x.yaml".into(), "pools: []\n".into())], "s").unwrap_err();
        assert!(e.starts_with("x.yaml: neither a MetalLB ConfigMap"), "{e}");
    }
}
