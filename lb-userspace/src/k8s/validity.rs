//! Are the custom resources valid? Pure: the objects go through the same validation as the
//! standalone config file (`config::build`), and every problem is handed back to the object it
//! belongs to, with a field path in the object (`spec.addresses[1]`). The result becomes each
//! object's `Valid` condition.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::ResourceExt;

use super::crd::{BFDProfile, BGPAdvertisement, BGPPeer, IPAddressPool, L2Advertisement};
use crate::config::{
    self,
    file::{self, SluiceFile},
};

/// The Sluice objects of one namespace, as listed.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub pools: Vec<IPAddressPool>,
    pub l2_advertisements: Vec<L2Advertisement>,
    pub peers: Vec<BGPPeer>,
    pub bgp_advertisements: Vec<BGPAdvertisement>,
    pub bfd_profiles: Vec<BFDProfile>,
}

impl Objects {
    /// Adds `other`'s objects (MetalLB's, read by `metallb::read`); each list stays sorted by
    /// name.
    pub fn extend(&mut self, other: Objects) {
        fn merge<K: kube::Resource>(list: &mut Vec<K>, more: Vec<K>) {
            list.extend(more);
            list.sort_by_key(|o| o.name_any());
        }
        merge(&mut self.pools, other.pools);
        merge(&mut self.l2_advertisements, other.l2_advertisements);
        merge(&mut self.peers, other.peers);
        merge(&mut self.bgp_advertisements, other.bgp_advertisements);
        merge(&mut self.bfd_profiles, other.bfd_profiles);
    }
}

/// Which object: kind and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub name: String,
}

/// Each object's problems (empty: valid), and the configuration built from the valid ones.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub problems: BTreeMap<ObjectRef, Vec<String>>,
    pub config: Option<config::Config>,
}

fn by_name<K: ResourceExt + Clone>(objects: &[K]) -> Vec<K> {
    let mut sorted = objects.to_vec();
    sorted.sort_by_key(|o| o.name_any());
    sorted
}

fn duration(text: &Option<String>) -> Option<file::Duration> {
    text.clone().map(file::Duration::Text)
}

fn selector_problems(path: &str, selectors: &[LabelSelector], out: &mut Vec<String>) {
    for (i, s) in selectors.iter().enumerate() {
        for (j, e) in s.match_expressions.iter().flatten().enumerate() {
            let at = format!("{path}[{i}].matchExpressions[{j}]");
            match e.operator.as_str() {
                "In" | "NotIn" if e.values.as_ref().is_none_or(|v| v.is_empty()) => out.push(
                    format!("{at}.values: {} needs at least one value", e.operator),
                ),
                "Exists" | "DoesNotExist" if e.values.as_ref().is_some_and(|v| !v.is_empty()) => {
                    out.push(format!("{at}.values: {} takes no values", e.operator))
                }
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => out.push(format!(
                    "{at}.operator: {other:?} is not In, NotIn, Exists or DoesNotExist"
                )),
            }
        }
    }
}

/// Every object's problems, and which object sits at which index of the merged file's lists.
#[derive(Default)]
struct Ledger {
    problems: BTreeMap<ObjectRef, Vec<String>>,
    /// List name in the file (`pools`, ...) → (kind, object name) by index.
    names: BTreeMap<&'static str, Vec<(&'static str, String)>>,
}

impl Ledger {
    fn add(&mut self, list: &'static str, kind: &'static str, name: &str, own: Vec<String>) {
        let name = name.to_string();
        self.problems.insert(
            ObjectRef {
                kind,
                name: name.clone(),
            },
            own,
        );
        self.names.entry(list).or_default().push((kind, name));
    }

    /// Hands a problem of the merged file (`pools[2].addresses[0]`) to its object, with the
    /// object's own path (`spec.addresses[0]`).
    fn report(&mut self, path: &str, message: &str) {
        let Some((list, rest)) = path.split_once('[') else {
            return;
        };
        let Some((index, rest)) = rest.split_once(']') else {
            return;
        };
        let Some((kind, name)) = index
            .parse::<usize>()
            .ok()
            .and_then(|i| self.names.get(list)?.get(i).cloned())
        else {
            return;
        };
        let field = match rest.strip_prefix('.') {
            Some("name") if list == "pools" || list == "bfdProfiles" => "metadata.name".to_string(),
            Some(field) => format!("spec.{field}"),
            None => "spec".to_string(),
        };
        self.problems
            .entry(ObjectRef { kind, name })
            .or_default()
            .push(format!("{field}: {message}"));
    }
}

/// Validates every object. Problems that concern one object name only that object; the
/// configuration is built when no object has a problem.
pub fn validate(objects: &Objects) -> Verdict {
    let pools = by_name(&objects.pools);
    let l2s = by_name(&objects.l2_advertisements);
    let peers = by_name(&objects.peers);
    let advs = by_name(&objects.bgp_advertisements);
    let bfds = by_name(&objects.bfd_profiles);
    let mut ledger = Ledger::default();
    let mut f = SluiceFile::default();

    for p in &pools {
        let name = p.name_any();
        let mut own = Vec::new();
        if let Some(a) = &p.spec.service_allocation {
            selector_problems(
                "spec.serviceAllocation.namespaceSelectors",
                &a.namespace_selectors,
                &mut own,
            );
            selector_problems(
                "spec.serviceAllocation.serviceSelectors",
                &a.service_selectors,
                &mut own,
            );
            for (i, ns) in a.namespaces.iter().enumerate() {
                if ns.trim().is_empty() {
                    own.push(format!(
                        "spec.serviceAllocation.namespaces[{i}]: empty namespace name"
                    ));
                }
            }
        }
        ledger.add("pools", "IPAddressPool", &name, own);
        f.pools.push(file::PoolSpec {
            name,
            addresses: p.spec.addresses.clone(),
            avoid_buggy_ips: p.spec.avoid_buggy_ips.unwrap_or(false),
            auto_assign: p.spec.auto_assign.unwrap_or(true),
        });
    }
    for a in &l2s {
        let name = a.name_any();
        let mut own = Vec::new();
        selector_problems(
            "spec.ipAddressPoolSelectors",
            &a.spec.ip_address_pool_selectors,
            &mut own,
        );
        selector_problems("spec.nodeSelectors", &a.spec.node_selectors, &mut own);
        ledger.add("l2Advertisements", "L2Advertisement", &name, own);
        f.l2_advertisements.push(file::L2AdvertisementSpec {
            ip_address_pools: a.spec.ip_address_pools.clone(),
            // No interfaces means on-link: the speaker resolves it per node.
            interfaces: a.spec.interfaces.clone(),
        });
    }
    for p in &peers {
        let name = p.name_any();
        let mut own = Vec::new();
        selector_problems("spec.nodeSelectors", &p.spec.node_selectors, &mut own);
        ledger.add("peers", "BGPPeer", &name, own);
        let s = &p.spec;
        f.peers.push(file::PeerSpec {
            peer_address: s.peer_address.clone(),
            peer_asn: s.peer_asn,
            my_asn: s.my_asn,
            peer_port: s.peer_port,
            source_address: s.source_address.clone(),
            hold_time: duration(&s.hold_time),
            keepalive_time: duration(&s.keepalive_time),
            connect_time: duration(&s.connect_time),
            router_id: s.router_id.clone(),
            password: s.password.clone(),
            ebgp_multi_hop: s.ebgp_multi_hop,
            bfd_profile: s.bfd_profile.clone(),
        });
    }
    for b in &bfds {
        let name = b.name_any();
        ledger.add("bfdProfiles", "BFDProfile", &name, Vec::new());
        let s = &b.spec;
        f.bfd_profiles.push(file::BfdProfileSpec {
            name,
            receive_interval: s.receive_interval,
            transmit_interval: s.transmit_interval,
            detect_multiplier: s.detect_multiplier,
            echo_interval: s.echo_interval,
            echo_mode: s.echo_mode,
            passive_mode: s.passive_mode,
            minimum_ttl: s.minimum_ttl,
        });
    }
    for a in &advs {
        let name = a.name_any();
        let mut own = Vec::new();
        selector_problems(
            "spec.ipAddressPoolSelectors",
            &a.spec.ip_address_pool_selectors,
            &mut own,
        );
        selector_problems("spec.nodeSelectors", &a.spec.node_selectors, &mut own);
        ledger.add("bgpAdvertisements", "BGPAdvertisement", &name, own);
        let s = &a.spec;
        f.bgp_advertisements.push(file::BgpAdvertisementSpec {
            ip_address_pools: s.ip_address_pools.clone(),
            communities: s.communities.clone(),
            large_communities: s.large_communities.clone(),
            local_pref: s.local_pref,
            aggregation_length: s.aggregation_length,
            aggregation_length_v6: s.aggregation_length_v6,
            peers: s.peers.clone(),
        });
    }

    let config = match config::model::build_in_merged_terms(vec![("kubernetes".to_string(), f)]) {
        Ok(config) => Some(config),
        Err(errors) => {
            for e in errors {
                ledger.report(&e.path, &e.message);
            }
            None
        }
    };
    let problems = ledger.problems;
    let config = config.filter(|_| problems.values().all(|p| p.is_empty()));
    Verdict { problems, config }
}

/// The `Valid` condition for an object with these problems.
pub fn valid_condition(problems: &[String], generation: Option<i64>, now: Time) -> Condition {
    let (status, reason, message) = if problems.is_empty() {
        ("True", "Valid", String::new())
    } else {
        ("False", "InvalidSpec", problems.join("; "))
    };
    Condition {
        type_: "Valid".to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{BGPPeerSpec, IPAddressPoolSpec, L2AdvertisementSpec, ServiceAllocation};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn pool(name: &str, addresses: &[&str]) -> IPAddressPool {
        IPAddressPool::new(
            name,
            IPAddressPoolSpec {
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    fn problems_of<'a>(v: &'a Verdict, kind: &str, name: &str) -> &'a [String] {
        v.problems
            .iter()
            .find(|(o, _)| o.kind == kind && o.name == name)
            .map(|(_, p)| p.as_slice())
            .unwrap_or_else(|| panic!("no verdict for {kind} {name}"))
    }

    #[test]
    fn an_l2_advertisement_without_interfaces_is_valid_and_means_every_interface_of_the_node() {
        let v = validate(&Objects {
            pools: vec![pool("lab", &["198.51.100.0/29"])],
            l2_advertisements: vec![L2Advertisement::new("all", L2AdvertisementSpec::default())],
            ..Default::default()
        });
        assert!(
            problems_of(&v, "L2Advertisement", "all").is_empty(),
            "{:?}",
            v.problems
        );
        let config = v.config.expect("valid");
        assert!(config.l2_advertisements[0].interfaces.is_empty());
        assert!(
            config.dataplane.interfaces.is_empty(),
            "no stand-in interface"
        );
    }

    #[test]
    fn valid_objects_build_the_shared_config() {
        let objects = Objects {
            pools: vec![
                pool("b", &["192.0.2.16/28"]),
                pool("a", &["192.0.2.0/28", "2001:db8::/120"]),
            ],
            l2_advertisements: vec![L2Advertisement::new(
                "l2",
                L2AdvertisementSpec {
                    ip_address_pools: vec!["a".into()],
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        let v = validate(&objects);
        assert!(
            v.problems.values().all(|p| p.is_empty()),
            "{:?}",
            v.problems
        );
        let config = v.config.expect("valid objects give a config");
        let names: Vec<&str> = config.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["a", "b"],
            "pools in name order, whatever the list order"
        );
    }

    #[test]
    fn a_bad_address_is_reported_on_its_pool_by_field_and_the_others_stay_valid() {
        let objects = Objects {
            pools: vec![
                pool("good", &["192.0.2.0/28"]),
                pool("bad", &["192.0.2.16/28", "10.0.0.300/32"]),
            ],
            ..Default::default()
        };
        let v = validate(&objects);
        let bad = problems_of(&v, "IPAddressPool", "bad");
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].starts_with("spec.addresses[1]: \"10.0.0.300/32\""),
            "{bad:?}"
        );
        assert!(problems_of(&v, "IPAddressPool", "good").is_empty());
        assert!(
            v.config.is_none(),
            "no config is built while an object is invalid"
        );
    }

    #[test]
    fn a_bfd_profile_is_validated_on_its_own_object_and_reaches_the_peer_naming_it() {
        use crate::k8s::crd::{BFDProfile, BFDProfileSpec};
        let peer = |profile: &str| {
            BGPPeer::new(
                "router",
                BGPPeerSpec {
                    peer_address: "192.0.2.1".into(),
                    peer_asn: 64512,
                    my_asn: 64513,
                    bfd_profile: Some(profile.into()),
                    ..Default::default()
                },
            )
        };
        let profile = |name: &str, rx: i64| {
            BFDProfile::new(
                name,
                BFDProfileSpec {
                    receive_interval: Some(rx),
                    transmit_interval: Some(100),
                    ..Default::default()
                },
            )
        };
        let v = validate(&Objects {
            peers: vec![peer("fast")],
            bfd_profiles: vec![profile("fast", 100)],
            ..Default::default()
        });
        assert!(
            v.problems.values().all(|p| p.is_empty()),
            "{:?}",
            v.problems
        );
        let config = v.config.unwrap();
        let bfd = config.peers[0].bfd.as_ref().unwrap();
        assert_eq!(bfd.receive_interval, std::time::Duration::from_millis(100));

        let v = validate(&Objects {
            peers: vec![peer("fast")],
            bfd_profiles: vec![profile("fast", 5)],
            ..Default::default()
        });
        let own = problems_of(&v, "BFDProfile", "fast");
        assert!(
            own[0].starts_with("spec.receiveInterval: 5 is out of range"),
            "{own:?}"
        );

        let v = validate(&Objects {
            peers: vec![peer("slow")],
            bfd_profiles: vec![profile("fast", 100)],
            ..Default::default()
        });
        let own = problems_of(&v, "BGPPeer", "router");
        assert!(
            own[0].starts_with("spec.bfdProfile: \"slow\" names no BFD profile (defined: fast)"),
            "{own:?}"
        );
    }

    #[test]
    fn overlapping_pools_mark_the_later_one_and_name_the_other() {
        let objects = Objects {
            pools: vec![pool("z", &["192.0.2.8/29"]), pool("a", &["192.0.2.0/28"])],
            ..Default::default()
        };
        let v = validate(&objects);
        assert!(problems_of(&v, "IPAddressPool", "a").is_empty());
        let z = problems_of(&v, "IPAddressPool", "z");
        assert!(
            z[0].starts_with("spec.addresses: ") && z[0].contains("pool \"a\""),
            "{z:?}"
        );
    }

    #[test]
    fn unknown_pool_names_bad_peers_and_bad_selectors_name_their_fields() {
        let mut peer = BGPPeer::new(
            "router",
            BGPPeerSpec {
                peer_address: "192.0.2.1".into(),
                peer_asn: 64512,
                my_asn: 5_000_000_000,
                hold_time: Some("ninety".into()),
                ..Default::default()
            },
        );
        peer.spec.node_selectors = vec![LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "zone".into(),
                operator: "Maybe".into(),
                values: None,
            }]),
            match_labels: None,
        }];
        let mut p = pool("p", &["192.0.2.0/28"]);
        p.spec.service_allocation = Some(ServiceAllocation {
            service_selectors: vec![LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec![]),
                }]),
                match_labels: None,
            }],
            ..Default::default()
        });
        let objects = Objects {
            pools: vec![p],
            l2_advertisements: vec![L2Advertisement::new(
                "l2",
                L2AdvertisementSpec {
                    ip_address_pools: vec!["nope".into()],
                    ..Default::default()
                },
            )],
            peers: vec![peer],
            ..Default::default()
        };
        let v = validate(&objects);
        let l2 = problems_of(&v, "L2Advertisement", "l2");
        assert_eq!(l2, ["spec.ipAddressPools[0]: no pool is named \"nope\""]);
        let peer = problems_of(&v, "BGPPeer", "router").join("\n");
        assert!(
            peer.contains("spec.nodeSelectors[0].matchExpressions[0].operator: \"Maybe\""),
            "{peer}"
        );
        assert!(peer.contains("spec.myASN"), "{peer}");
        assert!(peer.contains("spec.holdTime"), "{peer}");
        let pool = problems_of(&v, "IPAddressPool", "p");
        assert_eq!(
            pool,
            ["spec.serviceAllocation.serviceSelectors[0].matchExpressions[0].values: In needs at least one value"]
        );
    }

    #[test]
    fn the_valid_condition_carries_the_problems_and_the_generation() {
        let now = Time(Default::default());
        let ok = valid_condition(&[], Some(3), now.clone());
        assert_eq!(
            (
                ok.status.as_str(),
                ok.reason.as_str(),
                ok.observed_generation
            ),
            ("True", "Valid", Some(3))
        );
        let bad = valid_condition(
            &["spec.addresses[0]: x".into(), "spec.y: z".into()],
            Some(4),
            now,
        );
        assert_eq!(bad.status, "False");
        assert_eq!(bad.reason, "InvalidSpec");
        assert_eq!(bad.message, "spec.addresses[0]: x; spec.y: z");
    }
}
