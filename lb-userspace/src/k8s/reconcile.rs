//! The controller's decisions, pure: from the Sluice objects, the Services and the namespaces'
//! labels to each Service's IPs, the Events to record and each object's status.
//!
//! Bad input never loses running state: an invalid object is left out (and marked
//! `Valid=False`), a Service whose request cannot be read or met keeps the IPs it has and gets
//! an `AllocationFailed` Event.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

pub use super::shared::{service_key, status_ips, valid_subset};
use super::{
    allocate::{self, Outcome, PoolRules, ServiceInput},
    request,
    validity::{ObjectRef, Objects},
};

/// An Event to record on a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEvent {
    /// `namespace/name`.
    pub service: String,
    /// `Normal` or `Warning`.
    pub type_: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// What the controller should make true.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The ingress IPs each of our Services should show (only those that change).
    pub statuses: BTreeMap<String, Vec<IpAddr>>,
    pub events: Vec<ServiceEvent>,
    /// Each Sluice object's problems (empty: valid).
    pub validity: BTreeMap<ObjectRef, Vec<String>>,
    /// Per pool: (addresses total, addresses in use).
    pub pool_usage: BTreeMap<String, (i64, i64)>,
}

/// Decides everything for one pass of the controller.
pub fn plan<S: std::borrow::Borrow<Service>>(
    objects: &Objects,
    services: &[S],
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
    classless_is_ours: bool,
) -> Plan {
    let mut plan = Plan::default();
    let (validity, config, valid) = valid_subset(objects);
    plan.validity = validity;

    let pools: Vec<PoolRules> = config
        .iter()
        .flat_map(|c| c.pools.iter())
        .map(|pool| {
            let crd = valid.pools.iter().find(|p| p.name_any() == pool.name);
            let alloc = crd
                .and_then(|p| p.spec.service_allocation.clone())
                .unwrap_or_default();
            PoolRules {
                pool: Some(pool.clone()),
                priority: alloc.priority,
                namespaces: alloc.namespaces,
                namespace_selectors: alloc.namespace_selectors,
                service_selectors: alloc.service_selectors,
            }
        })
        .collect();

    let mut inputs = Vec::new();
    for s in services {
        let s: &Service = s.borrow();
        let k = service_key(s);
        let current = status_ips(s);
        if !request::is_ours(s, classless_is_ours) {
            if !current.is_empty()
                && s.spec.as_ref().and_then(|x| x.type_.as_deref()) != Some("LoadBalancer")
            {
                plan.statuses.insert(k.clone(), Vec::new());
                plan.events.push(ServiceEvent {
                    service: k,
                    type_: "Normal",
                    reason: "IPReleased",
                    message: format!(
                        "released {} (no longer of type LoadBalancer)",
                        join(&current)
                    ),
                });
            }
            continue;
        }
        match request::read(s) {
            Ok(request) => inputs.push(ServiceInput {
                key: k,
                namespace_labels: namespace_labels
                    .get(&request.namespace)
                    .cloned()
                    .unwrap_or_default(),
                request,
                labels: s.labels().clone(),
                current,
            }),
            Err(e) => plan.events.push(ServiceEvent {
                service: k,
                type_: "Warning",
                reason: "AllocationFailed",
                message: format!("{e}; keeping the current state"),
            }),
        }
    }

    let outcomes = allocate::allocate(&pools, &inputs);
    for input in &inputs {
        match &outcomes[&input.key] {
            Outcome::Assigned(got) => {
                let ips: Vec<IpAddr> = got.iter().map(|(ip, _)| *ip).collect();
                if ips != input.current {
                    plan.statuses.insert(input.key.clone(), ips.clone());
                    plan.events.push(ServiceEvent {
                        service: input.key.clone(),
                        type_: "Normal",
                        reason: "IPAllocated",
                        message: got
                            .iter()
                            .map(|(ip, pool)| {
                                format!("{ip} from pool {}", pool.as_deref().unwrap_or("?"))
                            })
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
                for (ip, pool) in got {
                    if pool.is_none() {
                        plan.events.push(ServiceEvent {
                            service: input.key.clone(),
                            type_: "Warning",
                            reason: "IPOutOfPool",
                            message: format!("{ip} is in no pool any more; kept, not renumbered"),
                        });
                    }
                }
            }
            Outcome::Failed(reason) => plan.events.push(ServiceEvent {
                service: input.key.clone(),
                type_: "Warning",
                reason: "AllocationFailed",
                message: if input.current.is_empty() {
                    reason.clone()
                } else {
                    format!("{reason}; keeping {}", join(&input.current))
                },
            }),
        }
    }

    for rules in &pools {
        let Some(pool) = &rules.pool else { continue };
        let total: u128 = pool.ranges.iter().map(|r| r.size()).sum();
        let in_use: BTreeSet<IpAddr> = outcomes
            .values()
            .filter_map(|o| match o {
                Outcome::Assigned(got) => Some(got),
                Outcome::Failed(_) => None,
            })
            .flatten()
            .filter(|(_, p)| p.as_deref() == Some(pool.name.as_str()))
            .map(|(ip, _)| *ip)
            .collect();
        plan.pool_usage.insert(
            pool.name.clone(),
            (
                i64::try_from(total).unwrap_or(i64::MAX),
                in_use.len() as i64,
            ),
        );
    }
    plan
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{IPAddressPool, IPAddressPoolSpec, L2Advertisement, L2AdvertisementSpec};
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServiceSpec, ServiceStatus,
    };

    fn pool(name: &str, addresses: &[&str]) -> IPAddressPool {
        IPAddressPool::new(
            name,
            IPAddressPoolSpec {
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    fn service(name: &str, status: &[&str]) -> Service {
        let mut s = Service::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("ns".into());
        s.spec = Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ..Default::default()
        });
        if !status.is_empty() {
            s.status = Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(
                        status
                            .iter()
                            .map(|ip| LoadBalancerIngress {
                                ip: Some(ip.to_string()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                }),
                ..Default::default()
            });
        }
        s
    }

    fn reasons(plan: &Plan, service: &str) -> Vec<&'static str> {
        plan.events
            .iter()
            .filter(|e| e.service == service)
            .map(|e| e.reason)
            .collect()
    }

    #[test]
    fn new_services_get_status_and_an_event_and_settled_ones_nothing() {
        let objects = Objects {
            pools: vec![pool("p", &["192.0.2.0/30"])],
            ..Default::default()
        };
        let plan = plan(
            &objects,
            &[service("new", &[]), service("old", &["192.0.2.3"])],
            &BTreeMap::new(),
            true,
        );
        assert_eq!(
            plan.statuses["ns/new"],
            ["192.0.2.0".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(reasons(&plan, "ns/new"), ["IPAllocated"]);
        assert!(!plan.statuses.contains_key("ns/old"));
        assert!(reasons(&plan, "ns/old").is_empty());
        assert_eq!(plan.pool_usage["p"], (4, 2));
    }

    #[test]
    fn a_bad_annotation_keeps_the_old_ip_and_says_why() {
        let objects = Objects {
            pools: vec![pool("p", &["192.0.2.0/30"])],
            ..Default::default()
        };
        let mut s = service("web", &["192.0.2.1"]);
        s.metadata.annotations = Some(
            [(
                "metallb.io/loadBalancerIPs".to_string(),
                "nonsense".to_string(),
            )]
            .into(),
        );
        let plan = plan(&objects, &[s], &BTreeMap::new(), true);
        assert!(!plan.statuses.contains_key("ns/web"), "status untouched");
        let e = &plan.events[0];
        assert_eq!((e.reason, e.type_), ("AllocationFailed", "Warning"));
        assert!(
            e.message.contains("metallb.io/loadBalancerIPs") && e.message.contains("nonsense"),
            "{}",
            e.message
        );
    }

    #[test]
    fn an_invalid_pool_is_marked_and_the_valid_ones_keep_serving() {
        let objects = Objects {
            pools: vec![pool("good", &["192.0.2.0/30"]), pool("bad", &["not-an-ip"])],
            l2_advertisements: vec![L2Advertisement::new(
                "uses-bad",
                L2AdvertisementSpec {
                    ip_address_pools: vec!["bad".into()],
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        let plan = plan(&objects, &[service("a", &[])], &BTreeMap::new(), true);
        let problems = |kind, name: &str| {
            plan.validity[&ObjectRef {
                kind,
                name: name.into(),
            }]
                .clone()
        };
        assert!(problems("IPAddressPool", "bad")[0].starts_with("spec.addresses[0]"));
        assert!(problems("IPAddressPool", "good").is_empty());
        assert!(
            problems("L2Advertisement", "uses-bad")[0].contains("no pool is named \"bad\""),
            "an object referring to an invalid one is invalid in turn"
        );
        assert_eq!(
            plan.statuses["ns/a"],
            ["192.0.2.0".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn a_pool_shrunk_under_a_service_warns_and_keeps_the_ip() {
        let objects = Objects {
            pools: vec![pool("p", &["192.0.2.0/31"])],
            ..Default::default()
        };
        let plan = plan(
            &objects,
            &[service("web", &["192.0.2.3"])],
            &BTreeMap::new(),
            true,
        );
        assert!(!plan.statuses.contains_key("ns/web"));
        assert_eq!(reasons(&plan, "ns/web"), ["IPOutOfPool"]);
    }

    #[test]
    fn a_service_no_longer_load_balancer_is_released_and_other_classes_left_alone() {
        let objects = Objects {
            pools: vec![pool("p", &["192.0.2.0/30"])],
            ..Default::default()
        };
        let mut gone = service("gone", &["192.0.2.1"]);
        gone.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let mut other = service("other", &[]);
        other.spec.as_mut().unwrap().load_balancer_class = Some("example.com/lb".into());
        let plan = plan(&objects, &[gone, other], &BTreeMap::new(), true);
        assert_eq!(plan.statuses["ns/gone"], Vec::<IpAddr>::new());
        assert_eq!(reasons(&plan, "ns/gone"), ["IPReleased"]);
        assert!(!plan.statuses.contains_key("ns/other") && reasons(&plan, "ns/other").is_empty());
    }

    #[test]
    fn exhaustion_gives_an_event_not_a_status() {
        let objects = Objects {
            pools: vec![pool("p", &["192.0.2.0/32"])],
            ..Default::default()
        };
        let plan = plan(
            &objects,
            &[service("a", &[]), service("b", &[])],
            &BTreeMap::new(),
            true,
        );
        assert!(plan.statuses.contains_key("ns/a") && !plan.statuses.contains_key("ns/b"));
        let failed = plan.events.iter().find(|e| e.service == "ns/b").unwrap();
        assert_eq!(failed.reason, "AllocationFailed");
        assert!(failed.message.contains("no free"), "{}", failed.message);
    }
}
