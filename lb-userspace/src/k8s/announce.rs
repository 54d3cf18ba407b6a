//! What one node's speaker should do, pure: from the Services (with their ingress IPs), the
//! EndpointSlices, the nodes as the speakers see them and Sluice's objects, to
//! - the services this node balances in XDP (`externalTrafficPolicy: Local`: each port over
//!   the node's own ready endpoints, one backend per pod, equal weights);
//! - the IPs it answers ARP/NDP for, and on which interfaces (one node per IP, by
//!   [`election`](crate::election));
//! - the BGP peers it speaks to and what it tells them;
//! - problems to report on Services (odd EndpointSlices, missing interfaces).
//!
//! A node is eligible to announce an IP when it is Ready, its speaker's Lease is alive, it
//! matches the advertisement's `nodeSelectors`, (L2) it has one of the advertisement's
//! `interfaces`, and (policy Local) it has a ready endpoint of the Service.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::ResourceExt;

use super::{
    crd::L2Advertisement,
    request,
    shared::{self, selector_matches, service_key, status_ips},
    validity::Objects,
};
use crate::{
    bgp::advertise::{self, Advertisements},
    config::{self, Backend, Protocol},
    election::{self, Ballot},
    ipam::Allocation,
};

/// A node as the speakers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The Node's `Ready` condition is True.
    pub ready: bool,
    /// Its speaker's Lease has not expired.
    pub alive: bool,
    /// The interfaces its speaker reported.
    pub interfaces: BTreeSet<String>,
    /// Their own subnets, as its speaker reported them: where advertisements naming no
    /// interface answer (`onlink`).
    pub subnets: Vec<crate::onlink::Subnet>,
    /// Its addresses (the Node's InternalIPs, else ExternalIPs): where the other nodes tunnel
    /// flows for its endpoints.
    pub addresses: Vec<IpAddr>,
}

impl NodeView {
    /// Its first address of the family of `like`.
    pub fn address_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.addresses
            .iter()
            .find(|a| a.is_ipv4() == like.is_ipv4())
            .copied()
    }
}

/// Everything the decision needs.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub me: &'a str,
    pub objects: &'a Objects,
    /// Shared with the watch caches, not copied: a pass over 10,000 Services and their
    /// EndpointSlices would otherwise hold them twice.
    pub services: &'a [Arc<Service>],
    pub slices: &'a [Arc<EndpointSlice>],
    pub nodes: &'a [NodeView],
    /// Who announces each IP in L2 now (from the speakers' Leases).
    pub announcers: &'a BTreeMap<IpAddr, String>,
    /// Keep current announcers while they stay eligible.
    pub sticky: bool,
    pub classless_is_ours: bool,
    /// Balance `externalTrafficPolicy: Cluster` Services here too, over every ready endpoint
    /// in the cluster (tunnelling to the endpoint's node); false: leave them to the service
    /// proxy (kube-proxy), as MetalLB does.
    pub cluster_wide: bool,
}

/// A problem to report on a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// `namespace/name`.
    pub service: String,
    pub message: String,
}

/// What this node should do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePlan {
    /// Services balanced here: policy Local over this node's ready endpoints; policy Cluster
    /// (when balanced cluster-wide) over every ready endpoint of a live node, those of other
    /// nodes with their node's address. The same on every node for a Cluster service.
    pub services: BTreeMap<config::Service, Vec<Backend>>,
    /// This node's end of the tunnels (its addresses) and the other nodes' addresses, when
    /// Cluster services are balanced here.
    pub tunnels: Option<(Vec<IpAddr>, BTreeSet<IpAddr>)>,
    /// (IP, interface): answer ARP/NDP for the IP on that interface.
    pub l2: Vec<(IpAddr, String)>,
    /// Every L2 IP's elected node (`None`: no node is eligible), for every node.
    pub l2_owners: BTreeMap<IpAddr, Option<String>>,
    /// The service IPs this node announces by BGP.
    pub bgp_ips: BTreeSet<IpAddr>,
    /// This node's BGP peers and the routes each is told.
    pub peers: Vec<config::Peer>,
    pub advertisements: Advertisements,
    /// Service key → its IPs (ours, with an IP), for Events.
    pub service_ips: BTreeMap<String, Vec<IpAddr>>,
    pub problems: Vec<Problem>,
}

impl NodePlan {
    /// The Services (`namespace/name`) that have each IP.
    pub fn services_by_ip(&self) -> BTreeMap<IpAddr, Vec<&String>> {
        let mut index: BTreeMap<IpAddr, Vec<&String>> = BTreeMap::new();
        for (service, ips) in &self.service_ips {
            for ip in ips {
                index.entry(*ip).or_default().push(service);
            }
        }
        index
    }
}

/// Per family (true: IPv4), per port name: the ready endpoints (IP, port, node), in one
/// order on every node (the Maglev tables built from them must be the same everywhere).
type Endpoints = BTreeMap<bool, BTreeMap<Option<String>, BTreeSet<(IpAddr, u16, String)>>>;

/// One Service as the speaker needs it.
#[derive(Debug)]
struct Svc {
    key: String,
    ips: Vec<IpAddr>,
    local: bool,
    /// (port, protocol, port name).
    ports: Vec<(u16, Protocol, Option<String>)>,
    endpoints: Endpoints,
    /// Nodes with a ready endpoint.
    endpoint_nodes: BTreeSet<String>,
}

fn read_service(s: &Service, slices: &[&EndpointSlice], problems: &mut Vec<Problem>) -> Svc {
    let k = service_key(s);
    let no_spec = k8s_openapi::api::core::v1::ServiceSpec::default();
    let spec = s.spec.as_ref().unwrap_or(&no_spec);
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                problems.push(Problem {
                    service: k.clone(),
                    message: format!(
                        "spec.ports[{}]: protocol {other} is not balanced (TCP and UDP are)",
                        p.name.clone().unwrap_or_default()
                    ),
                });
                continue;
            }
        };
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        ports.push((port, protocol, p.name.clone().filter(|n| !n.is_empty())));
    }
    let ips = status_ips(s);
    let has_v4 = ips.iter().any(IpAddr::is_ipv4);
    let has_v6 = ips.iter().any(IpAddr::is_ipv6);
    let mut endpoints = Endpoints::new();
    let mut endpoint_nodes = BTreeSet::new();
    for slice in slices {
        let slice_name = slice.name_any();
        let v4 = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            other => {
                problems.push(Problem {
                    service: k.clone(),
                    message: format!("EndpointSlice {slice_name}: addressType {other} is not balanced (IPv4 and IPv6 are)"),
                });
                continue;
            }
        };
        if (v4 && !has_v4 || !v4 && !has_v6) && !ips.is_empty() {
            problems.push(Problem {
                service: k.clone(),
                message: format!(
                    "EndpointSlice {slice_name}: {} endpoints, but the Service has no {} IP; ignored",
                    slice.address_type, slice.address_type
                ),
            });
            continue;
        }
        for e in slice.endpoints.iter().flatten() {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let mut addresses = Vec::new();
            for a in &e.addresses {
                match a.parse::<IpAddr>() {
                    Ok(ip) if ip.is_ipv4() == v4 => addresses.push(ip),
                    _ => problems.push(Problem {
                        service: k.clone(),
                        message: format!("EndpointSlice {slice_name}: endpoint address {a:?} is not an {} address; ignored", slice.address_type),
                    }),
                }
            }
            if addresses.is_empty() {
                continue;
            }
            let Some(node) = e.node_name.as_deref() else {
                continue;
            };
            endpoint_nodes.insert(node.to_string());
            for p in slice.ports.iter().flatten() {
                let Some(port) = p.port.and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                let name = p.name.clone().filter(|n| !n.is_empty());
                let set = endpoints.entry(v4).or_default().entry(name).or_default();
                for ip in &addresses {
                    set.insert((*ip, port, node.to_string()));
                }
            }
        }
    }
    Svc {
        key: k,
        ips,
        local,
        ports,
        endpoints,
        endpoint_nodes,
    }
}

/// The pools an advertisement covers: named ones, ones whose labels match a selector, or all
/// when it names and selects none.
fn covered_pools(
    objects: &Objects,
    names: &[String],
    selectors: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector],
) -> BTreeSet<String> {
    objects
        .pools
        .iter()
        .filter(|p| {
            (names.is_empty() && selectors.is_empty())
                || names.contains(&p.name_any())
                || selectors.iter().any(|s| selector_matches(s, p.labels()))
        })
        .map(|p| p.name_any())
        .collect()
}

/// The advertisement's interfaces this node has; when it names none, the node's interfaces
/// whose own subnets hold `ip` (on-link).
fn usable_interfaces(adv: &L2Advertisement, node: &NodeView, ip: IpAddr) -> BTreeSet<String> {
    if adv.spec.interfaces.is_empty() {
        return crate::onlink::interfaces_for(ip, &node.subnets)
            .intersection(&node.interfaces)
            .cloned()
            .collect();
    }
    adv.spec
        .interfaces
        .iter()
        .filter(|i| node.interfaces.contains(*i))
        .cloned()
        .collect()
}

fn node_matches(
    node: &NodeView,
    selectors: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector],
) -> bool {
    selectors.is_empty() || selectors.iter().any(|s| selector_matches(s, &node.labels))
}

/// What [`plan_with`] read from each Service and EndpointSlice, by object: the watch caches
/// hand the same `Arc` for an object until it changes, so an object whose `Arc` is the one
/// read before is not read again (its fields are not even touched: 10,000 Services and their
/// slices are tens of megabytes, and reading them all was most of a pass).
#[derive(Debug, Default)]
pub struct ReadCache {
    /// (node, classless_is_ours) the entries were read for.
    reader: Option<(String, bool)>,
    /// By the slice's address: the slice (kept alive, so the address is not reused) and its
    /// (namespace, service name).
    slices: HashMap<usize, CachedSlice>,
    /// By the Service's address.
    services: HashMap<usize, CachedService>,
}

type CachedSlice = (Arc<EndpointSlice>, Option<(String, String)>);

#[derive(Debug)]
struct CachedService {
    /// Kept alive, so that its address is not reused by another object.
    _service: Arc<Service>,
    /// (namespace, name).
    key: (String, String),
    /// The slices it was read with, by address.
    slices: Vec<usize>,
    /// `None`: not Sluice's, or without IPs.
    svc: Option<Svc>,
    problems: Vec<Problem>,
}

/// Every Service of ours with IPs, read (or taken from `cache` when neither it nor its
/// slices changed); their problems and IPs go into `out`.
fn read_services<'c>(
    input: Input<'_>,
    cache: &'c mut ReadCache,
    out: &mut NodePlan,
) -> Vec<&'c Svc> {
    let reader = Some((input.me.to_string(), input.classless_is_ours));
    if cache.reader != reader {
        *cache = ReadCache {
            reader,
            ..ReadCache::default()
        };
    }
    // Each Service's EndpointSlices, found by (namespace, service name) once for all.
    let mut slices = HashMap::with_capacity(input.slices.len());
    let mut slices_of: HashMap<(String, String), Vec<(usize, &EndpointSlice)>> = HashMap::new();
    for slice in input.slices {
        let at = Arc::as_ptr(slice) as usize;
        let key = match cache.slices.remove(&at) {
            Some((_, key)) => key,
            None => slice
                .labels()
                .get("kubernetes.io/service-name")
                .map(|service| (slice.namespace().unwrap_or_default(), service.clone())),
        };
        if let Some(key) = &key {
            slices_of.entry(key.clone()).or_default().push((at, slice));
        }
        slices.insert(at, (slice.clone(), key));
    }
    cache.slices = slices;
    let mut order = Vec::with_capacity(input.services.len());
    let mut cached = HashMap::with_capacity(input.services.len());
    for s in input.services {
        let at = Arc::as_ptr(s) as usize;
        let before = cache.services.remove(&at);
        let key = match &before {
            Some(c) => c.key.clone(),
            None => (s.namespace().unwrap_or_default(), s.name_any()),
        };
        let own: &[(usize, &EndpointSlice)] =
            slices_of.get(&key).map(Vec::as_slice).unwrap_or_default();
        let addresses: Vec<usize> = own.iter().map(|(at, _)| *at).collect();
        let entry = match before {
            Some(c) if c.slices == addresses => c,
            _ => {
                let mut problems = Vec::new();
                let svc = (request::is_ours(s, input.classless_is_ours)
                    && !status_ips(s).is_empty())
                .then(|| {
                    let own: Vec<&EndpointSlice> = own.iter().map(|(_, slice)| *slice).collect();
                    read_service(s, &own, &mut problems)
                });
                CachedService {
                    _service: s.clone(),
                    key,
                    slices: addresses,
                    svc,
                    problems,
                }
            }
        };
        if let Some(svc) = &entry.svc {
            out.problems.extend(entry.problems.iter().cloned());
            out.service_ips.insert(svc.key.clone(), svc.ips.clone());
            order.push(at);
        }
        cached.insert(at, entry);
    }
    cache.services = cached;
    let cache: &'c ReadCache = cache;
    order
        .iter()
        .filter_map(|at| cache.services.get(at)?.svc.as_ref())
        .collect()
}

/// Decides for node `input.me`. Invalid objects are left out (the controller marks them).
pub fn plan(input: Input<'_>) -> NodePlan {
    plan_with(input, &mut ReadCache::default())
}

/// [`plan`], reading only the Services and EndpointSlices that changed since `cache` was
/// filled (the result is the same: a test checks it on random changes).
pub fn plan_with(input: Input<'_>, cache: &mut ReadCache) -> NodePlan {
    let mut out = NodePlan::default();
    let (_, config, valid) = shared::valid_subset(input.objects);
    let Some(config) = config else {
        return out;
    };
    let input = Input {
        objects: &valid,
        ..input
    };
    let pool_of = |ip: IpAddr| {
        config
            .pools
            .iter()
            .find(|p| p.contains(ip))
            .map(|p| p.name.clone())
    };
    let me = input.nodes.iter().find(|n| n.name == input.me);
    let up = |n: &NodeView| n.ready && n.alive;

    let services = read_services(input, cache, &mut out);
    let by_name: HashMap<&str, &NodeView> =
        input.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    // Balanced here: Local services, each port over this node's ready endpoints; Cluster ones
    // (cluster-wide) over every ready endpoint of a live node.
    let cluster_wide = input.cluster_wide && me.is_some();
    if cluster_wide {
        let mine = me.map(|n| n.addresses.clone()).unwrap_or_default();
        let others: BTreeSet<IpAddr> = input
            .nodes
            .iter()
            .filter(|n| n.name != input.me)
            .flat_map(|n| n.addresses.iter().copied())
            .collect();
        out.tunnels = Some((mine, others));
    }
    for svc in services.iter().filter(|s| s.local || cluster_wide) {
        for ip in &svc.ips {
            for (port, protocol, name) in &svc.ports {
                let mut backends = Vec::new();
                let endpoints = svc
                    .endpoints
                    .get(&ip.is_ipv4())
                    .and_then(|by_name| by_name.get(name))
                    .into_iter()
                    .flatten();
                for (address, target, node) in endpoints {
                    let node = if node == input.me {
                        None
                    } else if svc.local {
                        continue;
                    } else {
                        // Another node's endpoint: while that node is up, at its address.
                        let Some(view) = by_name.get(node.as_str()).filter(|n| up(n)) else {
                            continue;
                        };
                        let Some(at) = view.address_like(*ip) else {
                            out.problems.push(Problem {
                                service: svc.key.clone(),
                                message: format!(
                                    "node {node} has no {} address (status.addresses): its endpoint {address} is not balanced to from other nodes",
                                    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
                                ),
                            });
                            continue;
                        };
                        Some(at)
                    };
                    backends.push(Backend {
                        ip: *address,
                        port: *target,
                        weight: 1,
                        node,
                    });
                }
                if !backends.is_empty() {
                    out.services.insert(
                        config::Service {
                            vip: *ip,
                            port: *port,
                            protocol: *protocol,
                        },
                        backends,
                    );
                }
            }
        }
    }
    let serves = |svc: &Svc, node: &str| !svc.local || svc.endpoint_nodes.contains(node);

    // L2: one elected node per IP.
    // Each advertisement with the pools it covers, computed once.
    let mut l2s: Vec<(&L2Advertisement, BTreeSet<String>)> = input
        .objects
        .l2_advertisements
        .iter()
        .map(|a| {
            let pools = covered_pools(
                input.objects,
                &a.spec.ip_address_pools,
                &a.spec.ip_address_pool_selectors,
            );
            (a, pools)
        })
        .collect();
    l2s.sort_by_key(|(a, _)| a.name_any());
    // Per advertisement, the nodes that may answer for it (up, and matching its node
    // selectors), by name: computed once, not once per IP.
    let candidates: Vec<BTreeMap<&str, &NodeView>> = l2s
        .iter()
        .map(|(adv, _)| {
            input
                .nodes
                .iter()
                .filter(|n| up(n) && node_matches(n, &adv.spec.node_selectors))
                .map(|n| (n.name.as_str(), n))
                .collect()
        })
        .collect();
    let mut ballots = Vec::new();
    let mut my_interfaces: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for svc in &services {
        for ip in &svc.ips {
            let Some(pool) = pool_of(*ip) else { continue };
            let advs: Vec<(&L2Advertisement, &BTreeMap<&str, &NodeView>)> = l2s
                .iter()
                .zip(&candidates)
                .filter(|((_, pools), _)| pools.contains(&pool))
                .map(|((a, _), c)| (*a, c))
                .collect();
            if advs.is_empty() {
                continue;
            }
            let mut eligible = BTreeSet::new();
            for (adv, candidates) in advs {
                // A Local service only on the nodes of its ready endpoints.
                let serving: Vec<&NodeView> = if svc.local {
                    svc.endpoint_nodes
                        .iter()
                        .filter_map(|n| candidates.get(n.as_str()).copied())
                        .collect()
                } else {
                    candidates.values().copied().collect()
                };
                for node in serving {
                    let usable = usable_interfaces(adv, node, *ip);
                    if usable.is_empty() {
                        if node.name == input.me {
                            let message = if adv.spec.interfaces.is_empty() {
                                format!(
                                    "node {} has no interface whose subnet holds {ip} (subnets: {}); it does not announce it for L2Advertisement {} (name interfaces there to answer elsewhere)",
                                    node.name,
                                    crate::onlink::describe(&node.subnets),
                                    adv.name_any()
                                )
                            } else {
                                format!(
                                    "node {} has none of L2Advertisement {}'s interfaces ({}); it does not announce {ip}",
                                    node.name, adv.name_any(), adv.spec.interfaces.join(", ")
                                )
                            };
                            out.problems.push(Problem {
                                service: svc.key.clone(),
                                message,
                            });
                        }
                        continue;
                    }
                    eligible.insert(node.name.clone());
                    if node.name == input.me {
                        my_interfaces.entry(*ip).or_default().extend(usable);
                    }
                }
            }
            ballots.push(Ballot {
                ip: *ip,
                eligible,
                current: input.announcers.get(ip).cloned(),
            });
        }
    }
    out.l2_owners = election::elect(&ballots, input.sticky);
    for (ip, owner) in &out.l2_owners {
        if owner.as_deref() == Some(input.me) {
            for interface in my_interfaces.get(ip).into_iter().flatten() {
                out.l2.push((*ip, interface.clone()));
            }
        }
    }

    // BGP: this node's peers, and every IP this node may serve, per advertisement.
    let Some(me) = me.filter(|n| up(n)) else {
        return out;
    };
    let mut peers = input.objects.peers.clone();
    peers.sort_by_key(|p| p.name_any());
    let mut advs = input.objects.bgp_advertisements.clone();
    advs.sort_by_key(|a| a.name_any());
    if peers.len() != config.peers.len() || advs.len() != config.bgp_advertisements.len() {
        return out;
    }
    let mut node_config = config.clone();
    node_config.peers = peers
        .iter()
        .zip(&config.peers)
        .filter(|(crd, _)| node_matches(me, &crd.spec.node_selectors))
        .map(|(_, p)| p.clone())
        .collect();
    node_config.bgp_advertisements = advs
        .iter()
        .zip(&config.bgp_advertisements)
        .filter(|(crd, _)| node_matches(me, &crd.spec.node_selectors))
        .map(|(crd, a)| config::model::BgpAdvertisement {
            pools: covered_pools(
                input.objects,
                &crd.spec.ip_address_pools,
                &crd.spec.ip_address_pool_selectors,
            )
            .into_iter()
            .collect(),
            ..a.clone()
        })
        .collect();
    let mut allocations = BTreeMap::new();
    for svc in &services {
        for ip in &svc.ips {
            let Some(pool) = pool_of(*ip) else { continue };
            if serves(svc, &me.name) {
                out.bgp_ips.insert(*ip);
            }
            allocations.insert(format!("{}#{ip}", svc.key), Allocation { ip: *ip, pool });
        }
    }
    if !node_config.peers.is_empty() {
        out.advertisements = advertise::advertisements(&node_config, &allocations, &out.bgp_ips);
    }
    out.peers = node_config.peers;
    out.problems.sort();
    out.problems.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{
        BGPAdvertisement, BGPAdvertisementSpec, BGPPeer, BGPPeerSpec, IPAddressPool,
        IPAddressPoolSpec, L2Advertisement, L2AdvertisementSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use serde_json::json;

    fn objects(interfaces: &[&str], node_selector: Option<(&str, &str)>) -> Objects {
        let selectors: Vec<LabelSelector> = node_selector
            .map(|(k, v)| LabelSelector {
                match_labels: Some([(k.to_string(), v.to_string())].into()),
                ..Default::default()
            })
            .into_iter()
            .collect();
        Objects {
            pools: vec![IPAddressPool::new(
                "main",
                IPAddressPoolSpec {
                    addresses: vec!["198.51.100.0/28".into(), "2001:db8::/124".into()],
                    ..Default::default()
                },
            )],
            l2_advertisements: vec![L2Advertisement::new(
                "l2",
                L2AdvertisementSpec {
                    interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
                    node_selectors: selectors,
                    ..Default::default()
                },
            )],
            ..Default::default()
        }
    }

    fn node(name: &str, interfaces: &[&str]) -> NodeView {
        NodeView {
            name: name.into(),
            labels: [("kubernetes.io/hostname".to_string(), name.to_string())].into(),
            ready: true,
            alive: true,
            interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
            // eth1 is on the pool's subnets; any other interface on a subnet of its own.
            subnets: interfaces
                .iter()
                .flat_map(|i| match *i {
                    "eth1" => crate::onlink::parse("eth1=198.51.100.0/24,eth1=2001:db8::/64"),
                    other => crate::onlink::parse(&format!("{other}=10.99.0.0/16")),
                })
                .collect(),
            addresses: node_addresses(name),
        }
    }

    /// Node `a` is at 192.0.2.1 and fd00::1, `b` at .2 and ::2, ...
    fn node_addresses(name: &str) -> Vec<IpAddr> {
        let n = name.bytes().next().unwrap() - b'a' + 1;
        vec![
            IpAddr::from([192, 0, 2, n]),
            IpAddr::from(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n as u16)),
        ]
    }

    fn service(name: &str, ips: &[&str], policy: &str) -> Service {
        let ingress: Vec<_> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy,
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                               {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]},
            "status": {"loadBalancer": {"ingress": ingress}},
        }))
        .unwrap()
    }

    /// (address, node, ready)
    fn slice(
        service: &str,
        name: &str,
        family: &str,
        endpoints: &[(&str, &str, bool)],
    ) -> EndpointSlice {
        let eps: Vec<_> = endpoints
            .iter()
            .map(|(a, n, r)| json!({"addresses": [a], "nodeName": n, "conditions": {"ready": r}}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": family,
            "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
        }))
        .unwrap()
    }

    fn run(
        me: &str,
        objects: &Objects,
        services: &[Service],
        slices: &[EndpointSlice],
        nodes: &[NodeView],
    ) -> NodePlan {
        run_with(me, objects, services, slices, nodes, false)
    }

    fn run_with(
        me: &str,
        objects: &Objects,
        services: &[Service],
        slices: &[EndpointSlice],
        nodes: &[NodeView],
        cluster_wide: bool,
    ) -> NodePlan {
        let services: Vec<Arc<Service>> = services.iter().cloned().map(Arc::new).collect();
        let slices: Vec<Arc<EndpointSlice>> = slices.iter().cloned().map(Arc::new).collect();
        plan(Input {
            me,
            objects,
            services: &services,
            slices: &slices,
            nodes,
            announcers: &BTreeMap::new(),
            sticky: true,
            classless_is_ours: true,
            cluster_wide,
        })
    }

    fn vip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn planning_with_the_read_cache_equals_planning_afresh_through_random_changes() {
        let o = objects(&["eth1"], None);
        let nodes = [
            node("a", &["eth1"]),
            node("b", &["eth1"]),
            node("c", &["eth1"]),
        ];
        let mut sequence = crate::test_sequence(0x2545);
        let mut next = move || sequence() as usize;
        let random_service = |name: &str, n: &mut dyn FnMut() -> usize| {
            let ip = format!("198.51.100.{}", n() % 14 + 1);
            let ips: Vec<&str> = if n().is_multiple_of(5) {
                vec![]
            } else {
                vec![ip.as_str()]
            };
            let mut s = service(name, &ips, ["Local", "Cluster"][n() % 2]);
            if n().is_multiple_of(7) {
                s.spec.as_mut().unwrap().load_balancer_class = Some("other.io/lb".into());
            }
            Arc::new(s)
        };
        let random_slice = |service: &str, name: &str, n: &mut dyn FnMut() -> usize| {
            let endpoints: Vec<(String, &str, bool)> = (0..n() % 4)
                .map(|i| {
                    (
                        format!("10.0.{}.{i}", n() % 9),
                        ["a", "b", "c"][n() % 3],
                        !n().is_multiple_of(4),
                    )
                })
                .collect();
            let endpoints: Vec<(&str, &str, bool)> = endpoints
                .iter()
                .map(|(a, b, c)| (a.as_str(), *b, *c))
                .collect();
            Arc::new(slice(service, name, "IPv4", &endpoints))
        };
        let names = ["s0", "s1", "s2", "s3", "s4", "s5"];
        let mut services: Vec<Arc<Service>> =
            names.iter().map(|n| random_service(n, &mut next)).collect();
        let mut slices: Vec<Arc<EndpointSlice>> = names
            .iter()
            .map(|n| random_slice(n, &format!("{n}-x"), &mut next))
            .collect();
        let mut cache = ReadCache::default();
        for step in 0..300 {
            // Change a few objects: a new Arc, as the watch caches hand a changed object.
            for _ in 0..1 + next() % 3 {
                let i = next() % names.len();
                match next() % 4 {
                    0 => services[i] = random_service(names[i], &mut next),
                    1 => slices[i] = random_slice(names[i], &format!("{}-x", names[i]), &mut next),
                    2 => {
                        // A second slice for a Service, or one less.
                        let extra = format!("{}-y", names[i]);
                        match slices
                            .iter()
                            .position(|s| s.metadata.name.as_deref() == Some(&extra))
                        {
                            Some(at) => {
                                slices.remove(at);
                            }
                            None => slices.push(random_slice(names[i], &extra, &mut next)),
                        }
                    }
                    _ => {}
                }
            }
            // This node changes now and then (the cache starts over).
            let me = if step / 100 == 1 { "b" } else { "a" };
            let input = Input {
                me,
                objects: &o,
                services: &services,
                slices: &slices,
                nodes: &nodes,
                announcers: &BTreeMap::new(),
                sticky: true,
                classless_is_ours: true,
                cluster_wide: step % 3 != 0,
            };
            assert_eq!(plan_with(input, &mut cache), plan(input), "step {step}");
        }
    }

    #[test]
    fn a_local_service_is_balanced_over_this_nodes_ready_endpoints_per_port() {
        let o = objects(&["eth1"], None);
        let svcs = [service("web", &["198.51.100.1"], "Local")];
        let slices = [slice(
            "web",
            "web-1",
            "IPv4",
            &[
                ("10.0.0.1", "a", true),
                ("10.0.0.2", "a", true),
                ("10.0.0.3", "a", false),
                ("10.0.1.1", "b", true),
            ],
        )];
        let nodes = [node("a", &["eth1"]), node("b", &["eth1"])];
        let p = run("a", &o, &svcs, &slices, &nodes);
        let http = &p.services[&config::Service {
            vip: vip("198.51.100.1"),
            port: 80,
            protocol: Protocol::Tcp,
        }];
        assert_eq!(
            http,
            &vec![
                Backend {
                    ip: vip("10.0.0.1"),
                    port: 8080,
                    weight: 1,
                    node: None,
                },
                Backend {
                    ip: vip("10.0.0.2"),
                    port: 8080,
                    weight: 1,
                    node: None,
                },
            ]
        );
        let dns = &p.services[&config::Service {
            vip: vip("198.51.100.1"),
            port: 53,
            protocol: Protocol::Udp,
        }];
        assert_eq!(dns.iter().map(|b| b.port).collect::<Vec<_>>(), [5353, 5353]);
        let on_b = run("b", &o, &svcs, &slices, &nodes);
        assert_eq!(on_b.services.values().next().unwrap().len(), 1);
    }

    fn web_http() -> config::Service {
        config::Service {
            vip: vip("198.51.100.1"),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn a_cluster_service_is_balanced_on_every_node_over_every_ready_endpoint_in_one_order() {
        let o = objects(&["eth1"], None);
        let svcs = [service("web", &["198.51.100.1"], "Cluster")];
        let endpoints = [
            ("10.0.1.1", "b", true),
            ("10.0.0.2", "a", true),
            ("10.0.2.1", "c", true),
            ("10.0.0.1", "a", true),
            ("10.0.2.9", "c", false),
        ];
        let nodes = [
            node("a", &["eth1"]),
            node("b", &["eth1"]),
            node("c", &["eth1"]),
        ];
        let slices = [slice("web", "web-1", "IPv4", &endpoints)];
        let on_a = run_with("a", &o, &svcs, &slices, &nodes, true);
        let b_at = Some(vip("192.0.2.2"));
        let c_at = Some(vip("192.0.2.3"));
        let backend = |ip: &str, node: Option<IpAddr>| Backend {
            ip: vip(ip),
            port: 8080,
            weight: 1,
            node,
        };
        assert_eq!(
            on_a.services[&web_http()],
            vec![
                backend("10.0.0.1", None),
                backend("10.0.0.2", None),
                backend("10.0.1.1", b_at),
                backend("10.0.2.1", c_at),
            ],
            "this node's endpoints by DNAT, the others' through their node"
        );
        assert_eq!(
            on_a.tunnels,
            Some((
                node_addresses("a"),
                ["b", "c"].iter().flat_map(|n| node_addresses(n)).collect()
            ))
        );
        // Every node builds its table from the same backends in the same order, however the
        // EndpointSlices list them: the same Maglev table everywhere.
        let maglev_inputs = |plan: &NodePlan| -> Vec<String> {
            plan.services[&web_http()]
                .iter()
                .map(Backend::maglev_key)
                .collect()
        };
        let table = |plan: &NodePlan| {
            let backends: Vec<crate::maglev::Backend> = plan.services[&web_http()]
                .iter()
                .map(|b| crate::maglev::Backend {
                    key: b.maglev_key(),
                    weight: b.weight,
                })
                .collect();
            crate::maglev::build(&backends, 1009).unwrap().slots
        };
        let mut shuffled = endpoints;
        shuffled.reverse();
        let split = [
            slice("web", "web-2", "IPv4", &shuffled[..2]),
            slice("web", "web-3", "IPv4", &shuffled[2..]),
        ];
        for (me, slices) in [("b", &slices[..]), ("c", &split[..]), ("a", &split[..])] {
            let plan = run_with(me, &o, &svcs, slices, &nodes, true);
            assert_eq!(maglev_inputs(&plan), maglev_inputs(&on_a), "on {me}");
            assert_eq!(table(&plan), table(&on_a), "on {me}: the same Maglev table");
            let mine: Vec<_> = plan.services[&web_http()]
                .iter()
                .filter(|b| b.node.is_none())
                .map(|b| b.ip)
                .collect();
            let expected: Vec<_> = endpoints
                .iter()
                .filter(|(_, n, ready)| *n == me && *ready)
                .map(|(ip, _, _)| vip(ip))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            assert_eq!(mine, expected, "on {me}: its own endpoints are local");
        }
        // A Local service stays on its own endpoints.
        let local = [service("web", &["198.51.100.1"], "Local")];
        let p = run_with("a", &o, &local, &slices, &nodes, true);
        assert!(p.services[&web_http()].iter().all(|b| b.node.is_none()));
        assert_eq!(p.services[&web_http()].len(), 2);
    }

    #[test]
    fn endpoints_of_a_node_declared_dead_or_not_ready_leave_every_table_at_once() {
        let o = objects(&["eth1"], None);
        let svcs = [service("web", &["198.51.100.1"], "Cluster")];
        let slices = [slice(
            "web",
            "web-1",
            "IPv4",
            &[
                ("10.0.0.1", "a", true),
                ("10.0.1.1", "b", true),
                ("10.0.2.1", "c", true),
            ],
        )];
        let mut nodes = [
            node("a", &["eth1"]),
            node("b", &["eth1"]),
            node("c", &["eth1"]),
        ];
        // The mesh says b is dead (its endpoints are still ready in Kubernetes); c is NotReady.
        nodes[1].alive = false;
        nodes[2].ready = false;
        let p = run_with("a", &o, &svcs, &slices, &nodes, true);
        let ips: Vec<IpAddr> = p.services[&web_http()].iter().map(|b| b.ip).collect();
        assert_eq!(ips, [vip("10.0.0.1")]);
    }

    #[test]
    fn an_endpoint_on_a_node_without_an_address_of_its_family_is_left_out_and_reported() {
        let o = objects(&["eth1"], None);
        let svcs = [service("web", &["198.51.100.1"], "Cluster")];
        let slices = [slice(
            "web",
            "web-1",
            "IPv4",
            &[("10.0.0.1", "a", true), ("10.0.1.1", "b", true)],
        )];
        let mut nodes = [node("a", &["eth1"]), node("b", &["eth1"])];
        nodes[1].addresses.retain(IpAddr::is_ipv6);
        let p = run_with("a", &o, &svcs, &slices, &nodes, true);
        assert_eq!(p.services[&web_http()].len(), 1);
        assert!(
            p.problems
                .iter()
                .any(|pr| pr.message.contains("node b has no IPv4 address")),
            "{:?}",
            p.problems
        );
    }

    #[test]
    fn with_cluster_balancing_off_a_cluster_service_is_announced_but_left_to_the_service_proxy() {
        let o = objects(&["eth1"], None);
        let svcs = [service("web", &["198.51.100.1"], "Cluster")];
        let nodes = [node("a", &["eth1"]), node("b", &["eth1"])];
        let p = run("a", &o, &svcs, &[], &nodes);
        assert!(p.services.is_empty());
        assert!(p.l2_owners[&vip("198.51.100.1")].is_some());
    }

    #[test]
    fn exactly_one_node_answers_for_an_ip_and_only_on_the_chosen_interfaces() {
        let o = objects(&["eth1"], None);
        let svcs = [service("web", &["198.51.100.1", "2001:db8::1"], "Cluster")];
        let nodes = [node("a", &["eth0", "eth1"]), node("b", &["eth0", "eth1"])];
        let pa = run("a", &o, &svcs, &[], &nodes);
        let pb = run("b", &o, &svcs, &[], &nodes);
        assert_eq!(pa.l2_owners, pb.l2_owners, "the nodes disagree");
        for ip in ["198.51.100.1", "2001:db8::1"] {
            let on_a = pa.l2.iter().filter(|(i, _)| *i == vip(ip)).count();
            let on_b = pb.l2.iter().filter(|(i, _)| *i == vip(ip)).count();
            assert_eq!(on_a + on_b, 1, "{ip}: {:?} {:?}", pa.l2, pb.l2);
        }
        assert!(pa.l2.iter().chain(&pb.l2).all(|(_, i)| i == "eth1"));
    }

    #[test]
    fn nodes_not_ready_dead_unselected_or_without_the_interface_are_not_elected() {
        let svcs = [service("web", &["198.51.100.1"], "Cluster")];
        let mut not_ready = node("a", &["eth1"]);
        not_ready.ready = false;
        let mut dead = node("b", &["eth1"]);
        dead.alive = false;
        let no_iface = node("c", &["eth0"]);
        let mut unselected = node("d", &["eth1"]);
        unselected.labels.insert("zone".into(), "b".into());
        let mut ok = node("e", &["eth1"]);
        ok.labels.insert("zone".into(), "a".into());
        let nodes = [not_ready, dead, no_iface, unselected, ok];
        let o = objects(&["eth1"], Some(("zone", "a")));
        let p = run("c", &o, &svcs, &[], &nodes);
        assert_eq!(p.l2_owners[&vip("198.51.100.1")].as_deref(), Some("e"));
        // c's own view says why it does not announce (the selector rules out others first).
        let o2 = objects(&["eth1"], None);
        let p2 = run("c", &o2, &svcs, &[], &nodes);
        assert!(
            p2.problems.iter().any(|pr| pr
                .message
                .contains("node c has none of L2Advertisement l2's interfaces (eth1)")),
            "{:?}",
            p2.problems
        );
    }

    #[test]
    fn with_policy_local_only_nodes_with_a_ready_endpoint_are_eligible() {
        let o = objects(&[], None);
        let svcs = [service("web", &["198.51.100.1"], "Local")];
        let slices = [slice(
            "web",
            "web-1",
            "IPv4",
            &[("10.0.0.1", "b", true), ("10.0.0.9", "a", false)],
        )];
        let nodes = [node("a", &["eth1"]), node("b", &["eth1"])];
        let pa = run("a", &o, &svcs, &slices, &nodes);
        assert_eq!(pa.l2_owners[&vip("198.51.100.1")].as_deref(), Some("b"));
        assert!(pa.l2.is_empty() && pa.bgp_ips.is_empty());
        let pb = run("b", &o, &svcs, &slices, &nodes);
        assert_eq!(
            pb.l2,
            vec![(vip("198.51.100.1"), "eth1".to_string())],
            "no interfaces named: the node's on-link one"
        );
        assert!(pb.bgp_ips.contains(&vip("198.51.100.1")));
    }

    #[test]
    fn naming_no_interface_answers_on_link_only_and_a_node_without_the_subnet_is_not_eligible() {
        let o = objects(&[], None);
        let svcs = [service("web", &["198.51.100.1", "2001:db8::1"], "Cluster")];
        // a has the pool's subnets on eth1 and another on eth0 and bond0; b only others.
        let nodes = [node("a", &["eth0", "eth1", "bond0"]), node("b", &["eth0"])];
        for me in ["a", "b"] {
            let p = run(me, &o, &svcs, &[], &nodes);
            assert_eq!(p.l2_owners[&vip("198.51.100.1")].as_deref(), Some("a"));
            assert_eq!(p.l2_owners[&vip("2001:db8::1")].as_deref(), Some("a"));
        }
        let pa = run("a", &o, &svcs, &[], &nodes);
        assert_eq!(
            pa.l2,
            vec![
                (vip("198.51.100.1"), "eth1".to_string()),
                (vip("2001:db8::1"), "eth1".to_string())
            ],
            "not on eth0, not on bond0"
        );
        let pb = run("b", &o, &svcs, &[], &nodes);
        assert!(pb.l2.is_empty());
        assert!(
            pb.problems.iter().any(|pr| pr.message.contains(
                "node b has no interface whose subnet holds 198.51.100.1 (subnets: eth0 10.99.0.0/16)"
            )),
            "{:?}",
            pb.problems
        );
    }

    #[test]
    fn a_current_announcer_keeps_its_ip_while_eligible() {
        let o = objects(&["eth1"], None);
        let svcs = [service("web", &["198.51.100.1"], "Cluster")];
        let nodes = [node("a", &["eth1"]), node("b", &["eth1"])];
        for current in ["a", "b"] {
            let announcers = [(vip("198.51.100.1"), current.to_string())].into();
            let p = plan(Input {
                me: "a",
                objects: &o,
                services: &svcs.clone().map(Arc::new),
                slices: &[],
                nodes: &nodes,
                announcers: &announcers,
                sticky: true,
                classless_is_ours: true,
                cluster_wide: false,
            });
            assert_eq!(p.l2_owners[&vip("198.51.100.1")].as_deref(), Some(current));
        }
    }

    #[test]
    fn odd_endpoint_slices_are_reported_and_the_rest_keeps_working() {
        let o = objects(&["eth1"], None);
        let svcs = [service("web", &["198.51.100.1"], "Local")];
        let slices = [
            slice("web", "web-fqdn", "FQDN", &[("db.example.com", "a", true)]),
            slice("web", "web-v6", "IPv6", &[("2001:db8::99", "a", true)]),
            slice(
                "web",
                "web-bad",
                "IPv4",
                &[("10.0.0.x", "a", true), ("2001:db8::5", "a", true)],
            ),
            slice("web", "web-ok", "IPv4", &[("10.0.0.1", "a", true)]),
        ];
        let nodes = [node("a", &["eth1"])];
        let p = run("a", &o, &svcs, &slices, &nodes);
        let messages: Vec<&str> = p.problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("web-fqdn: addressType FQDN")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("web-v6: IPv6 endpoints, but the Service has no IPv6 IP")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("\"10.0.0.x\" is not an IPv4 address")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("\"2001:db8::5\" is not an IPv4 address")),
            "{messages:?}"
        );
        let http = &p.services[&config::Service {
            vip: vip("198.51.100.1"),
            port: 80,
            protocol: Protocol::Tcp,
        }];
        assert_eq!(
            http,
            &vec![Backend {
                ip: vip("10.0.0.1"),
                port: 8080,
                weight: 1,
                node: None,
            }]
        );
    }

    #[test]
    fn services_that_are_not_ours_or_have_no_ip_are_ignored() {
        let o = objects(&["eth1"], None);
        let mut foreign = service("foreign", &["198.51.100.2"], "Local");
        foreign.spec.as_mut().unwrap().load_balancer_class = Some("example.com/other".into());
        let svcs = [foreign, service("pending", &[], "Local")];
        let slices = [
            slice("foreign", "f", "IPv4", &[("10.0.0.1", "a", true)]),
            slice("pending", "p", "IPv4", &[("10.0.0.2", "a", true)]),
        ];
        let p = run("a", &o, &svcs, &slices, &[node("a", &["eth1"])]);
        assert_eq!(p, NodePlan::default());
    }

    #[test]
    fn bgp_peers_and_advertisements_follow_node_selectors_and_local_endpoints() {
        let mut o = objects(&["eth1"], None);
        let zone = |z: &str| {
            vec![LabelSelector {
                match_labels: Some([("zone".to_string(), z.to_string())].into()),
                ..Default::default()
            }]
        };
        o.peers = vec![
            BGPPeer::new(
                "tor-a",
                BGPPeerSpec {
                    peer_address: "10.9.0.1".into(),
                    peer_asn: 65000,
                    my_asn: 65001,
                    node_selectors: zone("a"),
                    ..Default::default()
                },
            ),
            BGPPeer::new(
                "tor-b",
                BGPPeerSpec {
                    peer_address: "10.9.0.2".into(),
                    peer_asn: 65000,
                    my_asn: 65001,
                    node_selectors: zone("b"),
                    ..Default::default()
                },
            ),
        ];
        o.bgp_advertisements = vec![BGPAdvertisement::new(
            "all",
            BGPAdvertisementSpec::default(),
        )];
        let svcs = [
            service("web", &["198.51.100.1"], "Local"),
            service("api", &["198.51.100.2"], "Cluster"),
        ];
        let slices = [slice("web", "w", "IPv4", &[("10.0.0.1", "b", true)])];
        let mut a = node("a", &["eth1"]);
        a.labels.insert("zone".into(), "a".into());
        let p = run("a", &o, &svcs, &slices, &[a]);
        assert_eq!(
            p.peers.iter().map(|p| p.peer_address).collect::<Vec<_>>(),
            [vip("10.9.0.1")]
        );
        assert_eq!(
            p.bgp_ips,
            [vip("198.51.100.2")].into(),
            "web has no endpoint on a"
        );
        let routes = &p.advertisements[&vip("10.9.0.1")];
        assert_eq!(
            routes.keys().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["198.51.100.2/32"]
        );
    }

    #[test]
    fn an_invalid_bgp_peer_is_left_out_and_the_valid_one_still_gets_the_routes() {
        let mut o = objects(&["eth1"], None);
        o.peers = vec![
            BGPPeer::new(
                "broken",
                BGPPeerSpec {
                    peer_address: "10.9.0.x".into(),
                    peer_asn: 65000,
                    my_asn: 65001,
                    ..Default::default()
                },
            ),
            BGPPeer::new(
                "tor",
                BGPPeerSpec {
                    peer_address: "10.9.0.1".into(),
                    peer_asn: 65000,
                    my_asn: 65001,
                    ..Default::default()
                },
            ),
        ];
        o.bgp_advertisements = vec![BGPAdvertisement::new(
            "all",
            BGPAdvertisementSpec::default(),
        )];
        let svcs = [service("api", &["198.51.100.2"], "Cluster")];
        let p = run("a", &o, &svcs, &[], &[node("a", &["eth1"])]);
        assert_eq!(
            p.peers.iter().map(|p| p.peer_address).collect::<Vec<_>>(),
            [vip("10.9.0.1")]
        );
        assert!(p.advertisements[&vip("10.9.0.1")]
            .keys()
            .any(|n| n.to_string() == "198.51.100.2/32"));
        assert!(!p.l2.is_empty(), "L2 keeps working");
    }
}
