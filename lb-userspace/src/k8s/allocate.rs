//! Which IPs each LoadBalancer Service gets. Pure and deterministic.
//!
//! Order of decisions:
//! 1. IPs already in Service statuses are kept first (a controller restart changes no IP), as long
//!    as the Service still asks for them and no one else holds them incompatibly. An IP that fell
//!    out of every pool is kept too, with a warning: it is never silently renumbered.
//! 2. Then the others, in name order: requested IPs, then an IP shared under the same
//!    `allow-shared-ip` key without a port clash, then the lowest free address of the first pool
//!    that may serve the Service (pools with a `serviceAllocation.priority` first, lowest first,
//!    then by name).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::request::{Family, PortKey, Request};
pub use super::shared::selector_matches;
use crate::{
    config::Pool,
    ipam::{self, usable},
};

/// A pool with its Kubernetes-only rules (`serviceAllocation`).
#[derive(Debug, Clone, Default)]
pub struct PoolRules {
    pub pool: Option<Pool>,
    pub priority: Option<i32>,
    pub namespaces: Vec<String>,
    pub namespace_selectors: Vec<LabelSelector>,
    pub service_selectors: Vec<LabelSelector>,
}

impl PoolRules {
    fn name(&self) -> &str {
        self.pool.as_ref().map(|p| p.name.as_str()).unwrap_or("")
    }
}

/// One Service as the allocator sees it.
#[derive(Debug, Clone)]
pub struct ServiceInput {
    /// `namespace/name`.
    pub key: String,
    pub request: Request,
    pub labels: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
    /// The IPs in its `status.loadBalancer.ingress`.
    pub current: Vec<IpAddr>,
}

/// What a Service gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its IPs, with the pool each came from (`None`: in no pool any more, kept).
    Assigned(Vec<(IpAddr, Option<String>)>),
    /// Nothing could be given; the reason names what is wrong.
    Failed(String),
}

fn allows(rules: &PoolRules, service: &ServiceInput) -> bool {
    let ns = &service.request.namespace;
    let namespace_ok = (rules.namespaces.is_empty() && rules.namespace_selectors.is_empty())
        || rules.namespaces.contains(ns)
        || rules
            .namespace_selectors
            .iter()
            .any(|s| selector_matches(s, &service.namespace_labels));
    let service_ok = rules.service_selectors.is_empty()
        || rules
            .service_selectors
            .iter()
            .any(|s| selector_matches(s, &service.labels));
    namespace_ok && service_ok
}

/// One holder of an IP: its sharing key and ports.
type Holder = (Option<String>, BTreeSet<PortKey>);

/// Who holds each IP.
#[derive(Default)]
struct Holders(BTreeMap<IpAddr, Vec<Holder>>);

impl Holders {
    fn can_take(&self, ip: IpAddr, request: &Request) -> bool {
        match self.0.get(&ip) {
            None => true,
            Some(holders) => holders.iter().all(|(key, ports)| {
                key.is_some() && *key == request.sharing_key && ports.is_disjoint(&request.ports)
            }),
        }
    }
    fn take(&mut self, ip: IpAddr, request: &Request) {
        self.0
            .entry(ip)
            .or_default()
            .push((request.sharing_key.clone(), request.ports.clone()));
    }
    fn shared_with(&self, request: &Request) -> Vec<IpAddr> {
        if request.sharing_key.is_none() {
            return Vec::new();
        }
        self.0
            .iter()
            .filter(|(_, h)| h.iter().any(|(k, _)| *k == request.sharing_key))
            .map(|(ip, _)| *ip)
            .collect()
    }
}

/// The pools that may serve this Service, in the order they are tried.
fn candidates<'a>(
    pools: &'a [PoolRules],
    service: &ServiceInput,
) -> Result<Vec<&'a PoolRules>, String> {
    if let Some(name) = &service.request.pool {
        let rules = pools
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| format!("address-pool {name:?}: no such pool"))?;
        if !allows(rules, service) {
            return Err(format!(
                "address-pool {name:?}: its serviceAllocation does not admit this Service"
            ));
        }
        return Ok(vec![rules]);
    }
    let mut list: Vec<&PoolRules> = pools
        .iter()
        .filter(|p| p.pool.as_ref().is_some_and(|p| p.auto_assign) && allows(p, service))
        .collect();
    list.sort_by_key(|p| (p.priority.is_none(), p.priority, p.name().to_string()));
    Ok(list)
}

fn pool_of(pools: &[&PoolRules], ip: IpAddr) -> Option<String> {
    pools
        .iter()
        .filter_map(|p| p.pool.as_ref())
        .find(|p| usable(p, ip))
        .map(|p| p.name.clone())
}

/// Gives every Service its IPs (or the reason it gets none).
pub fn allocate(pools: &[PoolRules], services: &[ServiceInput]) -> BTreeMap<String, Outcome> {
    let mut sorted: Vec<&ServiceInput> = services.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let mut holders = Holders::default();
    let mut out = BTreeMap::new();
    let all: Vec<&PoolRules> = pools.iter().collect();

    // 1. Keep what the statuses already say, when it still fits the request.
    for s in &sorted {
        let r = &s.request;
        let fits = !s.current.is_empty()
            && s.current
                .iter()
                .all(|ip| r.families.contains(&Family::of(*ip)))
            && r.ips.iter().all(|ip| s.current.contains(ip))
            && s.current.iter().all(|ip| holders.can_take(*ip, r))
            && r.pool.as_ref().is_none_or(|name| {
                s.current
                    .iter()
                    .all(|ip| pool_of(&all, *ip).as_ref().is_none_or(|p| p == name))
            });
        if fits {
            let mut got = Vec::new();
            for ip in &s.current {
                holders.take(*ip, r);
                got.push((*ip, pool_of(&all, *ip)));
            }
            out.insert(s.key.clone(), Outcome::Assigned(got));
        }
    }

    // 2. Allocate for the rest.
    let rest: Vec<&ServiceInput> = sorted
        .iter()
        .copied()
        .filter(|s| !out.contains_key(&s.key))
        .collect();
    let mut cursor = ipam::FreeCursor::default();
    for s in rest {
        let r = &s.request;
        let outcome = match candidates(pools, s) {
            Err(reason) => Outcome::Failed(reason),
            Ok(cands) => {
                let mut got: Vec<(IpAddr, Option<String>)> = Vec::new();
                let mut reasons = Vec::new();
                for family in &r.families {
                    let pick = if let Some(ip) = r.ips.iter().find(|ip| Family::of(**ip) == *family)
                    {
                        let pool = if r.pool.is_some() {
                            pool_of(&cands, *ip)
                        } else {
                            pool_of(&all, *ip)
                        };
                        match pool {
                            None => Err(format!("{ip} is in no pool this Service may use")),
                            Some(_) if !holders.can_take(*ip, r) => Err(format!(
                                "{ip} is in use by another Service (and not shareable with this one)"
                            )),
                            Some(p) => Ok((*ip, Some(p))),
                        }
                    } else {
                        let shared = holders
                            .shared_with(r)
                            .into_iter()
                            .filter(|ip| Family::of(*ip) == *family && holders.can_take(*ip, r))
                            .find_map(|ip| pool_of(&cands, ip).map(|p| (ip, Some(p))));
                        shared
                            .or_else(|| {
                                cands.iter().find_map(|c| {
                                    let pool = c.pool.as_ref()?;
                                    cursor
                                        .lowest_free(pool, *family == Family::V4, |ip| {
                                            holders.0.contains_key(ip)
                                        })
                                        .map(|ip| (ip, Some(pool.name.clone())))
                                })
                            })
                            .ok_or_else(|| {
                                if cands.is_empty() {
                                    "no pool may serve this Service".to_string()
                                } else {
                                    format!("no free {family:?} address in the pools it may use")
                                }
                            })
                    };
                    match pick {
                        Ok((ip, pool)) => got.push((ip, pool)),
                        Err(reason) => reasons.push(reason),
                    }
                }
                if got.is_empty() || (r.require_all_families && !reasons.is_empty()) {
                    Outcome::Failed(reasons.join("; "))
                } else {
                    for (ip, _) in &got {
                        holders.take(*ip, r);
                    }
                    Outcome::Assigned(got)
                }
            }
        };
        out.insert(s.key.clone(), outcome);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::address::AddrRange;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn pool(name: &str, ranges: &[&str]) -> PoolRules {
        PoolRules {
            pool: Some(Pool {
                name: name.into(),
                ranges: ranges
                    .iter()
                    .map(|r| AddrRange::parse(r).unwrap())
                    .collect(),
                avoid_buggy_ips: false,
                auto_assign: true,
            }),
            ..Default::default()
        }
    }

    fn svc(key: &str) -> ServiceInput {
        ServiceInput {
            key: key.into(),
            request: Request {
                families: vec![Family::V4],
                require_all_families: false,
                ips: vec![],
                pool: None,
                sharing_key: None,
                ports: [PortKey {
                    port: 80,
                    protocol: "TCP".into(),
                }]
                .into(),
                namespace: key.split('/').next().unwrap().into(),
            },
            labels: BTreeMap::new(),
            namespace_labels: BTreeMap::new(),
            current: vec![],
        }
    }

    fn ips(o: &Outcome) -> Vec<String> {
        match o {
            Outcome::Assigned(v) => v.iter().map(|(ip, _)| ip.to_string()).collect(),
            Outcome::Failed(r) => panic!("failed: {r}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn services_get_the_lowest_free_addresses_in_name_order() {
        let pools = [pool("a", &["192.0.2.0/30"])];
        let out = allocate(&pools, &[svc("ns/b"), svc("ns/a")]);
        assert_eq!(ips(&out["ns/a"]), ["192.0.2.0"]);
        assert_eq!(ips(&out["ns/b"]), ["192.0.2.1"]);
    }

    #[test]
    fn a_restart_keeps_every_ip_in_the_statuses_even_out_of_order() {
        let pools = [pool("a", &["192.0.2.0/29"])];
        let mut a = svc("ns/a");
        a.current = vec![ip("192.0.2.5")];
        let mut b = svc("ns/b");
        b.current = vec![ip("192.0.2.1")];
        let out = allocate(&pools, &[b, a, svc("ns/c")]);
        assert_eq!(ips(&out["ns/a"]), ["192.0.2.5"]);
        assert_eq!(ips(&out["ns/b"]), ["192.0.2.1"]);
        assert_eq!(
            ips(&out["ns/c"]),
            ["192.0.2.0"],
            "new ones take what is free"
        );
    }

    #[test]
    fn an_ip_that_fell_out_of_its_pool_is_kept_not_renumbered() {
        let pools = [pool("a", &["192.0.2.0/29"])];
        let mut s = svc("ns/a");
        s.current = vec![ip("198.51.100.7")];
        assert_eq!(
            allocate(&pools, &[s])["ns/a"],
            Outcome::Assigned(vec![(ip("198.51.100.7"), None)])
        );
    }

    #[test]
    fn requested_ips_are_honoured_and_clashes_and_strangers_refused() {
        let pools = [pool("a", &["192.0.2.0/29"])];
        let mut x = svc("ns/x");
        x.request.ips = vec![ip("192.0.2.6")];
        let mut y = svc("ns/y");
        y.request.ips = vec![ip("192.0.2.6")];
        let mut z = svc("ns/z");
        z.request.ips = vec![ip("203.0.113.1")];
        let out = allocate(&pools, &[x, y, z]);
        assert_eq!(ips(&out["ns/x"]), ["192.0.2.6"]);
        assert!(matches!(&out["ns/y"], Outcome::Failed(r) if r.contains("in use")));
        assert!(matches!(&out["ns/z"], Outcome::Failed(r) if r.contains("in no pool")));
    }

    #[test]
    fn shared_keys_share_an_ip_unless_ports_clash() {
        let pools = [pool("a", &["192.0.2.0/29"])];
        let mut dns_udp = svc("ns/dns-udp");
        dns_udp.request.sharing_key = Some("dns".into());
        dns_udp.request.ports = [PortKey {
            port: 53,
            protocol: "UDP".into(),
        }]
        .into();
        let mut dns_tcp = svc("ns/dns-tcp");
        dns_tcp.request.sharing_key = Some("dns".into());
        dns_tcp.request.ports = [PortKey {
            port: 53,
            protocol: "TCP".into(),
        }]
        .into();
        let mut clash = svc("ns/dns-zz");
        clash.request.sharing_key = Some("dns".into());
        clash.request.ports = [PortKey {
            port: 53,
            protocol: "UDP".into(),
        }]
        .into();
        let out = allocate(&pools, &[dns_udp, dns_tcp, clash, svc("ns/other")]);
        assert_eq!(ips(&out["ns/dns-tcp"]), ["192.0.2.0"]);
        assert_eq!(
            ips(&out["ns/dns-udp"]),
            ["192.0.2.0"],
            "same key, no clash: shared"
        );
        assert_eq!(
            ips(&out["ns/dns-zz"]),
            ["192.0.2.1"],
            "port clash: its own IP"
        );
        assert_eq!(ips(&out["ns/other"]), ["192.0.2.2"], "no key: never shared");
    }

    #[test]
    fn dual_stack_gets_one_of_each_and_require_fails_without_both() {
        let pools = [
            pool("v4", &["192.0.2.0/30"]),
            pool("v6", &["2001:db8::/126"]),
        ];
        let mut d = svc("ns/d");
        d.request.families = vec![Family::V6, Family::V4];
        assert_eq!(
            ips(&allocate(&pools, &[d.clone()])["ns/d"]),
            ["2001:db8::", "192.0.2.0"]
        );
        let only_v4 = [pool("v4", &["192.0.2.0/30"])];
        assert_eq!(
            ips(&allocate(&only_v4, &[d.clone()])["ns/d"]),
            ["192.0.2.0"],
            "prefer: one is enough"
        );
        d.request.require_all_families = true;
        assert!(
            matches!(&allocate(&only_v4, &[d])["ns/d"], Outcome::Failed(r) if r.contains("V6"))
        );
    }

    #[test]
    fn priority_namespaces_and_selectors_pick_the_pool() {
        let mut low = pool("low", &["192.0.2.0/30"]);
        low.priority = Some(10);
        let mut high = pool("high", &["198.51.100.0/30"]);
        high.priority = Some(1);
        high.namespaces = vec!["prod".into()];
        let mut labelled = pool("labelled", &["203.0.113.0/30"]);
        labelled.priority = Some(0);
        labelled.service_selectors = vec![LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: Some(vec!["front".into()]),
            }]),
            match_labels: None,
        }];
        let pools = [low, high, labelled];
        let mut front = svc("dev/front");
        front.labels.insert("tier".into(), "front".into());
        let out = allocate(&pools, &[svc("prod/api"), svc("dev/api"), front]);
        assert_eq!(ips(&out["prod/api"]), ["198.51.100.0"]);
        assert_eq!(ips(&out["dev/api"]), ["192.0.2.0"]);
        assert_eq!(ips(&out["dev/front"]), ["203.0.113.0"]);
    }

    #[test]
    fn a_named_pool_must_exist_admit_the_service_and_have_room() {
        let mut p = pool("tiny", &["192.0.2.0/32"]);
        p.namespaces = vec!["prod".into()];
        let pools = [p];
        let mut unknown = svc("prod/a");
        unknown.request.pool = Some("nope".into());
        let mut refused = svc("dev/b");
        refused.request.pool = Some("tiny".into());
        let mut first = svc("prod/c");
        first.request.pool = Some("tiny".into());
        let mut full = svc("prod/d");
        full.request.pool = Some("tiny".into());
        let out = allocate(&pools, &[unknown, refused, first, full]);
        assert!(matches!(&out["prod/a"], Outcome::Failed(r) if r.contains("no such pool")));
        assert!(matches!(&out["dev/b"], Outcome::Failed(r) if r.contains("does not admit")));
        assert_eq!(ips(&out["prod/c"]), ["192.0.2.0"]);
        assert!(matches!(&out["prod/d"], Outcome::Failed(r) if r.contains("no free")));
    }
}
