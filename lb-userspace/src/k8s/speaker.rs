//! `sluice speaker`: one per node. The edge between the Kubernetes API and
//! [`announce::plan`](super::announce::plan): it watches Services, EndpointSlices, Nodes, the
//! speakers' Leases and Sluice's objects, and makes this node's data plane, ARP/NDP answers and
//! BGP routes what the plan says.
//!
//! Liveness: each speaker renews a Lease of its own (`sluice-speaker-<node>`), whose annotations
//! say which interfaces the node has and which IPs it answers for in L2. A node whose Lease has
//! expired (or is gone) is not eligible; every speaker runs the same election over what it sees,
//! so the others take its IPs over, and the node itself stops answering at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{Api, PostParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::Store,
    },
    Client, Resource, ResourceExt,
};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{
    announce::{self, NodePlan, NodeView},
    crd::{BGPAdvertisement, BGPPeer, IPAddressPool, L2Advertisement},
    lease,
    validity::Objects,
    watch,
};
use crate::dataplane::{self, Dataplane, DataplaneOptions, L2Vip};

/// The event reporter name.
pub const MANAGER: &str = "sluice-speaker";
/// Lease annotation: the node's interfaces, comma-separated.
pub const INTERFACES_ANNOTATION: &str = "sluice.dev/interfaces";
/// Lease annotation: the IPs the node answers ARP/NDP for, comma-separated.
pub const ANNOUNCING_ANNOTATION: &str = "sluice.dev/announcing";
/// Lease annotation: the IPs the node announces to its BGP peers, comma-separated.
pub const BGP_ANNOTATION: &str = "sluice.dev/bgp-announcing";
/// Speakers' Leases are named this, then the node name.
pub const LEASE_PREFIX: &str = "sluice-speaker-";

/// How the speaker runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub node_name: String,
    /// The namespace of Sluice's objects and of the Leases.
    pub namespace: String,
    /// Interfaces to balance on and announce from (the program is attached to each).
    pub interfaces: Vec<String>,
    /// Veths whose peer runs an XDP program (allowed as redirect targets).
    pub redirect_veths: Vec<String>,
    pub pin_dir: PathBuf,
    pub lease_duration: i32,
    /// Keep current L2 announcers while eligible (a returning node takes nothing back).
    pub sticky: bool,
    pub classless_is_ours: bool,
    pub metrics_address: SocketAddr,
    pub resync: Duration,
}

/// What went wrong at the edge.
#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error("cannot build a Kubernetes client (in a pod: the service account; outside: KUBECONFIG or ~/.kube/config): {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    Dataplane(#[from] dataplane::DataplaneError),
    #[error("--interface: {0}")]
    Interface(#[source] dataplane::DataplaneError),
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Runs the speaker until SIGTERM or SIGINT. Stopping detaches the program: the node stops
/// answering and balancing, and its Lease is released so the others take over at once.
pub fn run(options: Options) -> Result<(), SpeakerError> {
    dataplane::require_root()?;
    let interfaces = options
        .interfaces
        .iter()
        .map(|name| dataplane::interface(name))
        .collect::<Result<Vec<_>, _>>()
        .map_err(SpeakerError::Interface)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(SpeakerError::Runtime)?;
    runtime.block_on(run_async(options, interfaces))
}

struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    leases: Store<Lease>,
    pools: Store<IPAddressPool>,
    l2: Store<L2Advertisement>,
    peers: Store<BGPPeer>,
    bgp_ads: Store<BGPAdvertisement>,
}

fn split(list: Option<&String>) -> impl Iterator<Item = &str> {
    list.into_iter()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// The nodes as the speakers see them, and who announces which IP now.
pub fn node_views(
    nodes: &[Node],
    leases: &[Lease],
    now: Timestamp,
) -> (Vec<NodeView>, BTreeMap<IpAddr, String>) {
    let mut announcers = BTreeMap::new();
    let mut views = Vec::new();
    for node in nodes {
        let name = node.name_any();
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let lease = leases
            .iter()
            .find(|l| l.name_any() == format!("{LEASE_PREFIX}{name}"));
        let live = lease
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| lease::expiry(s, 15))
            .is_some_and(|end| now < end);
        let annotations = lease.map(|l| l.annotations().clone()).unwrap_or_default();
        if live {
            for ip in split(annotations.get(ANNOUNCING_ANNOTATION)) {
                if let Ok(ip) = ip.parse() {
                    announcers.insert(ip, name.clone());
                }
            }
        }
        views.push(NodeView {
            name,
            labels: node.labels().clone(),
            ready,
            alive: live,
            interfaces: split(annotations.get(INTERFACES_ANNOTATION))
                .map(String::from)
                .collect(),
        });
    }
    (views, announcers)
}

struct Speaker {
    options: Options,
    recorder: Recorder,
    leases: Api<Lease>,
    interfaces: Vec<dataplane::Interface>,
    dp: Dataplane,
    bgp: Option<crate::bgp::speaker::Speaker>,
    /// What the last pass made true.
    last: NodePlan,
    /// The L2 and BGP IPs written into our Lease.
    published: Option<(BTreeSet<IpAddr>, BTreeSet<IpAddr>)>,
    lease_renewed: Option<Instant>,
    /// Problems reported while they last: not reported again.
    reported: BTreeSet<(String, String)>,
    status: crate::metrics::SharedStatus,
}

async fn run_async(
    options: Options,
    interfaces: Vec<dataplane::Interface>,
) -> Result<(), SpeakerError> {
    let status = crate::metrics::SharedStatus::default();
    crate::metrics::serve(
        options.metrics_address,
        status.clone(),
        options.pin_dir.clone(),
    )
    .map_err(|source| SpeakerError::Metrics {
        address: options.metrics_address,
        source,
    })?;
    let client = Client::try_default().await.map_err(SpeakerError::Client)?;
    let dp = Dataplane::load(&DataplaneOptions {
        pin_dir: Some(options.pin_dir.clone()),
        pin_links: false,
        ..DataplaneOptions::default()
    })?;
    let notify = Arc::new(Notify::new());
    let ns = options.namespace.as_str();
    let stores = Stores {
        services: watch::store(Api::all(client.clone()), &notify),
        slices: watch::store(Api::all(client.clone()), &notify),
        nodes: watch::store(Api::all(client.clone()), &notify),
        leases: watch::store(Api::namespaced(client.clone(), ns), &notify),
        pools: watch::store(Api::namespaced(client.clone(), ns), &notify),
        l2: watch::store(Api::namespaced(client.clone(), ns), &notify),
        peers: watch::store(Api::namespaced(client.clone(), ns), &notify),
        bgp_ads: watch::store(Api::namespaced(client.clone(), ns), &notify),
    };
    let mut speaker = Speaker {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(options.node_name.clone()),
            },
        ),
        leases: Api::namespaced(client.clone(), ns),
        interfaces,
        dp,
        bgp: None,
        last: NodePlan::default(),
        published: None,
        lease_renewed: None,
        reported: BTreeSet::new(),
        status: status.clone(),
        options: options.clone(),
    };
    // Attach at once: an interface that cannot take the program fails the start, not a later
    // pass. Services left in the pinned maps by a previous run keep forwarding their flows until
    // the first pass decides; ARP/NDP answers wait for the election.
    speaker.dp.set_l2_vips(&[])?;
    speaker.dp.attach_all(&speaker.interfaces)?;
    for name in &options.redirect_veths {
        let iface = dataplane::interface(name).map_err(SpeakerError::Interface)?;
        speaker.dp.allow_redirect(iface.ifindex)?;
    }
    info!(node = %options.node_name, interfaces = ?options.interfaces, "speakerStarting");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(SpeakerError::Runtime)?;
    let renew_every = Duration::from_secs((options.lease_duration / 3).max(1) as u64);
    let sync = async {
        let _ = tokio::join!(
            stores.services.wait_until_ready(),
            stores.slices.wait_until_ready(),
            stores.nodes.wait_until_ready(),
            stores.leases.wait_until_ready(),
            stores.pools.wait_until_ready(),
            stores.l2.wait_until_ready(),
            stores.peers.wait_until_ready(),
            stores.bgp_ads.wait_until_ready(),
        );
    };
    tokio::pin!(sync);
    let mut synced = false;
    let mut next_renew = Instant::now();
    let mut last_pass = Instant::now();
    loop {
        if Instant::now() >= next_renew {
            speaker.renew_lease().await;
            next_renew = Instant::now() + renew_every;
        }
        if synced {
            speaker.pass(&stores).await;
            last_pass = Instant::now();
        }
        status.lock().unwrap().bgp = speaker
            .bgp
            .as_ref()
            .map(|b| b.session_statuses())
            .unwrap_or_default();
        // Wake when a Lease may expire, so the IPs of a dead node move without waiting for
        // any watch event.
        let wake = next_renew.min(last_pass + options.resync);
        tokio::select! {
            _ = &mut sync, if !synced => {
                synced = true;
                status.lock().unwrap().ready = true;
                info!("watchesSynced");
            }
            _ = notify.notified() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    speaker.stop().await;
    Ok(())
}

impl Speaker {
    fn lease_name(&self) -> String {
        format!("{LEASE_PREFIX}{}", self.options.node_name)
    }

    /// Renews (or creates) our Lease, with our interfaces and what we announce in its annotations.
    async fn renew_lease(&mut self) {
        let result = match self.leases.get_opt(&self.lease_name()).await {
            Ok(current) => {
                // Our Lease gone although we wrote it: someone deleted it (an operator moving
                // IPs away, or a cleanup). The others already count this node out; stop
                // answering before coming back, so the new Lease claims nothing and the IPs
                // stay where they went.
                if current.is_none() && self.lease_renewed.is_some() {
                    warn!(lease = %self.lease_name(), "leaseDeleted");
                    self.last.l2.clear();
                    if let Err(e) = self.dp.set_l2_vips(&[]) {
                        warn!(error = %e, "l2ClearFailed");
                    }
                }
                self.write_lease(current, &self.announcing(), self.options.lease_duration)
                    .await
            }
            Err(e) => Err(e),
        };
        let announcing = self.announcing();
        match result {
            Ok(()) => {
                self.lease_renewed = Some(Instant::now());
                self.published = Some(announcing);
                self.status.lock().unwrap().not_ready_reason = None;
            }
            Err(e) => {
                warn!(lease = %self.lease_name(), error = %e, "leaseUpdateFailed");
                let hint = match &e {
                    kube::Error::Api(s) if s.is_forbidden() => {
                        " (RBAC: the speaker needs get, create and update on coordination.k8s.io leases in its namespace)"
                    }
                    _ => "",
                };
                self.status.lock().unwrap().not_ready_reason = Some(format!(
                    "cannot write the Lease {}/{}: {e}{hint}; other nodes do not see this one, so it announces nothing",
                    self.options.namespace,
                    self.lease_name()
                ));
                let valid = Duration::from_secs(self.options.lease_duration.max(1) as u64);
                if self.lease_renewed.is_none_or(|t| t.elapsed() >= valid) {
                    // Nobody sees us alive: stop answering rather than answer twice.
                    self.last = NodePlan::default();
                    if let Err(e) = self.dp.set_l2_vips(&[]) {
                        warn!(error = %e, "l2ClearFailed");
                    }
                }
            }
        }
    }

    /// What this node announces now: (L2 IPs, BGP IPs).
    fn announcing(&self) -> (BTreeSet<IpAddr>, BTreeSet<IpAddr>) {
        let bgp = if self.last.peers.is_empty() {
            BTreeSet::new()
        } else {
            self.last.bgp_ips.clone()
        };
        (self.last.l2.iter().map(|(ip, _)| *ip).collect(), bgp)
    }

    /// Writes our Lease over `current` (as just read; `None`: create it).
    async fn write_lease(
        &self,
        current: Option<Lease>,
        (l2, bgp): &(BTreeSet<IpAddr>, BTreeSet<IpAddr>),
        duration: i32,
    ) -> Result<(), kube::Error> {
        let name = self.lease_name();
        let now = MicroTime(Timestamp::now());
        let mut annotations = BTreeMap::new();
        let interfaces: Vec<&str> = self.interfaces.iter().map(|i| i.name.as_str()).collect();
        annotations.insert(INTERFACES_ANNOTATION.to_string(), interfaces.join(","));
        let list = |ips: &BTreeSet<IpAddr>| {
            ips.iter()
                .map(|ip| ip.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        annotations.insert(ANNOUNCING_ANNOTATION.to_string(), list(l2));
        annotations.insert(BGP_ANNOTATION.to_string(), list(bgp));
        let exists = current.is_some();
        let mut lease = current.unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.options.namespace.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/name".to_string(),
                        "sluice-speaker".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            spec: None,
        });
        lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .extend(annotations);
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = Some(self.options.node_name.clone());
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now.clone());
        if spec.acquire_time.is_none() {
            spec.acquire_time = Some(now);
        }
        if exists {
            self.leases
                .replace(&name, &PostParams::default(), &lease)
                .await?;
        } else {
            self.leases.create(&PostParams::default(), &lease).await?;
        }
        Ok(())
    }

    async fn pass(&mut self, stores: &Stores) {
        let objects = Objects {
            pools: watch::sorted(&stores.pools),
            l2_advertisements: watch::sorted(&stores.l2),
            peers: watch::sorted(&stores.peers),
            bgp_advertisements: watch::sorted(&stores.bgp_ads),
        };
        let services = watch::sorted(&stores.services);
        let slices = watch::sorted(&stores.slices);
        let leases: Vec<Lease> = watch::sorted(&stores.leases)
            .into_iter()
            .filter(|l| l.name_any().starts_with(LEASE_PREFIX))
            .collect();
        let (nodes, announcers) =
            node_views(&watch::sorted(&stores.nodes), &leases, Timestamp::now());
        let plan = announce::plan(announce::Input {
            me: &self.options.node_name,
            objects: &objects,
            services: &services,
            slices: &slices,
            nodes: &nodes,
            announcers: &announcers,
            sticky: self.options.sticky,
            classless_is_ours: self.options.classless_is_ours,
        });
        if plan == self.last {
            return;
        }
        self.apply(&plan);
        self.record(&plan, &services).await;
        self.last = plan;
        // Others learn who announces what from our Lease: write it when that changed.
        if self.published.as_ref() != Some(&self.announcing()) {
            self.renew_lease().await;
        }
    }

    /// Makes the data plane, the ARP/NDP answers and the BGP routes what `plan` says.
    fn apply(&mut self, plan: &NodePlan) {
        let vips = L2Vip::on(&self.interfaces, &plan.l2);
        if let Err(e) = self.dp.sync(&self.interfaces, &plan.services, &vips) {
            warn!(error = %e, "dataplaneSyncFailed");
            return;
        }
        let before: BTreeSet<&(IpAddr, String)> = self.last.l2.iter().collect();
        for vip in &vips {
            let name = self
                .interfaces
                .iter()
                .find(|i| i.ifindex == vip.ifindex)
                .map(|i| i.name.clone())
                .unwrap_or_default();
            if before.contains(&(vip.ip, name.clone())) {
                continue;
            }
            // Takeover: tell the segment at once (gratuitous ARP / unsolicited NA).
            match crate::l2::announce(vip.ifindex, vip.mac, vip.ip) {
                Ok(()) => info!(ip = %vip.ip, interface = %name, "l2Announced"),
                Err(e) => warn!(ip = %vip.ip, interface = %name, error = %e, "l2AnnounceFailed"),
            }
        }
        for (ip, interface) in &self.last.l2 {
            if !plan.l2.iter().any(|(i, _)| i == ip) {
                info!(%ip, %interface, "l2Withdrawn");
            }
        }
        self.sync_bgp(plan);
    }

    fn sync_bgp(&mut self, plan: &NodePlan) {
        if plan.peers.is_empty() {
            if let Some(speaker) = self.bgp.take() {
                tokio::task::block_in_place(|| speaker.shutdown());
            }
            return;
        }
        if self.bgp.is_none() {
            match tokio::task::block_in_place(crate::bgp::speaker::Speaker::new) {
                Ok(s) => self.bgp = Some(s),
                Err(e) => {
                    warn!(error = %e, "bgpNotStarted");
                    return;
                }
            }
        }
        if let Some(speaker) = self.bgp.as_mut() {
            speaker.configure(&plan.peers, None);
            speaker.advertise(&plan.advertisements);
        }
    }

    /// Events on Services: this node took an IP over in L2, started or stopped announcing one
    /// by BGP, or something in its objects is wrong.
    async fn record(&mut self, plan: &NodePlan, services: &[Service]) {
        let me = self.options.node_name.clone();
        let mut events: Vec<(String, EventType, &'static str, String)> = Vec::new();
        let mine_before: BTreeSet<IpAddr> = self.last.l2.iter().map(|(ip, _)| *ip).collect();
        let mine_now: BTreeMap<IpAddr, Vec<&str>> =
            plan.l2.iter().fold(BTreeMap::new(), |mut m, (ip, i)| {
                m.entry(*ip).or_insert_with(Vec::new).push(i.as_str());
                m
            });
        for (ip, interfaces) in &mine_now {
            if !mine_before.contains(ip) {
                for s in plan.services_with(*ip) {
                    events.push((
                        s.clone(),
                        EventType::Normal,
                        "nodeAssigned",
                        format!(
                            "node {me} announces {ip} by L2 (ARP/NDP) on {}",
                            interfaces.join(", ")
                        ),
                    ));
                }
            }
        }
        if !plan.peers.is_empty() || !self.last.peers.is_empty() {
            let peers: Vec<String> = plan
                .peers
                .iter()
                .map(|p| p.peer_address.to_string())
                .collect();
            for ip in plan.bgp_ips.difference(&self.last.bgp_ips) {
                for s in plan.services_with(*ip) {
                    events.push((
                        s.clone(),
                        EventType::Normal,
                        "announced",
                        format!("node {me} announces {ip} by BGP to {}", peers.join(", ")),
                    ));
                }
            }
            for ip in self.last.bgp_ips.difference(&plan.bgp_ips) {
                for s in self.last.services_with(*ip) {
                    events.push((
                        s.clone(),
                        EventType::Normal,
                        "withdrawn",
                        format!(
                            "node {me} withdrew {ip} from BGP (no ready local endpoint, or not eligible)"
                        ),
                    ));
                }
            }
        }
        let now_problems: BTreeSet<(String, String)> = plan
            .problems
            .iter()
            .map(|p| (p.service.clone(), p.message.clone()))
            .collect();
        for (service, message) in now_problems.difference(&self.reported) {
            warn!(%service, detail = %message, "speakerProblem");
            events.push((
                service.clone(),
                EventType::Warning,
                "AnnouncementProblem",
                message.clone(),
            ));
        }
        self.reported = now_problems;
        for (service, type_, reason, note) in events {
            info!(%service, reason, detail = %note, "serviceEvent");
            let Some(s) = services
                .iter()
                .find(|s| super::reconcile::service_key(s) == service)
            else {
                continue;
            };
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Announce".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &s.object_ref(&())).await {
                warn!(%service, error = %e, "eventRecordFailed");
            }
        }
    }

    /// Stops answering and routing, detaches, and hands the IPs over at once.
    async fn stop(&mut self) {
        if let Err(e) = self.dp.set_l2_vips(&[]) {
            warn!(error = %e, "l2ClearFailed");
        }
        if let Some(speaker) = self.bgp.take() {
            tokio::task::block_in_place(|| speaker.shutdown());
        }
        // An expired Lease (duration 1 s, nothing announced) makes the others re-elect now.
        let released = match self.leases.get_opt(&self.lease_name()).await {
            Ok(current) => self.write_lease(current, &Default::default(), 1).await,
            Err(e) => Err(e),
        };
        if let Err(e) = released {
            warn!(error = %e, "leaseReleaseFailed");
        }
        info!("speakerStopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;
    use serde_json::json;

    #[test]
    fn node_views_read_readiness_lease_liveness_interfaces_and_announcers() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let node = |name: &str, ready: &str| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"zone": "a"}},
                "status": {"conditions": [{"type": "Ready", "status": ready}]},
            }))
            .unwrap()
        };
        let lease = |node: &str, renewed_ago: i64, announcing: &str| -> Lease {
            let renew = now
                .checked_sub(SignedDuration::from_secs(renewed_ago))
                .unwrap();
            serde_json::from_value(json!({
                "metadata": {"name": format!("{LEASE_PREFIX}{node}"), "annotations": {
                    INTERFACES_ANNOTATION: "eth0, eth1", ANNOUNCING_ANNOTATION: announcing}},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 10,
                         "renewTime": renew.to_string()},
            }))
            .unwrap()
        };
        let (views, announcers) = node_views(
            &[
                node("a", "True"),
                node("b", "True"),
                node("c", "False"),
                node("d", "True"),
            ],
            &[
                lease("a", 2, "198.51.100.1"),
                lease("b", 11, "198.51.100.2"),
                lease("c", 1, ""),
            ],
            now,
        );
        let by: BTreeMap<&str, &NodeView> = views.iter().map(|v| (v.name.as_str(), v)).collect();
        assert!(by["a"].ready && by["a"].alive);
        assert!(!by["b"].alive, "expired");
        assert!(!by["c"].ready && by["c"].alive);
        assert!(!by["d"].alive, "no Lease");
        assert_eq!(
            by["a"].interfaces,
            ["eth0".to_string(), "eth1".to_string()].into()
        );
        assert_eq!(by["a"].labels["zone"], "a");
        assert_eq!(
            announcers,
            [("198.51.100.1".parse().unwrap(), "a".to_string())].into(),
            "a dead node's announcements do not count"
        );
    }
}
