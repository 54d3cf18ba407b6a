//! `sluice speaker`: one per node. The edge between the Kubernetes API and
//! [`announce::plan`](super::announce::plan): it watches Services, EndpointSlices, Nodes, the
//! speakers' Leases and Sluice's objects, and makes this node's data plane, ARP/NDP answers and
//! BGP routes what the plan says.
//!
//! Liveness: the speakers form a mesh ([`crate::mesh`]) that declares a dead speaker down in
//! about a second; each also renews a Lease of its own (`sluice-speaker-<node>`), whose
//! annotations say which interfaces the node has, where its mesh listens and which IPs it
//! announces. [`liveness`] decides who is alive from both; every speaker runs the same
//! election over what it sees, so the others take a dead node's IPs over.
//!
//! Nothing here waits on the API server: the Lease is written by a task of its own, Events are
//! sent by tasks of their own, every request has a timeout, and the watches keep their last
//! objects while the API server is away. Elections, the mesh and the data plane go on.
//!
//! The data plane outlives the process (pinned links): a restarted speaker adopts it without a
//! gap. Its ARP/NDP answers carry a deadline that a thread of this process renews
//! ([`dataplane::L2DeadlineKeeper`]), so a dead speaker's node falls silent by itself.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
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

pub use super::liveness::{
    ANNOUNCING_ANNOTATION, BGP_ANNOTATION, INTERFACES_ANNOTATION, LEASE_PREFIX, MESH_ANNOTATION,
    SUBNETS_ANNOTATION,
};
use super::{
    announce::{self, NodePlan},
    crd::{BFDProfile, BGPAdvertisement, BGPPeer, IPAddressPool, L2Advertisement},
    events,
    limit::WriteLimit,
    liveness::{self, MeshVerdict},
    validity::Objects,
    watch,
};
use crate::{
    dataplane::{self, Dataplane, DataplaneOptions, L2DeadlineKeeper, L2Vip},
    mesh::{Mesh, MeshOptions, MeshView},
    onlink::{self, Subnet},
};

/// The event reporter name.
pub const MANAGER: &str = "sluice-speaker";
/// How long a node that was cut off waits, once the API server answers again, before it
/// answers ARP/NDP again (its watches re-list meanwhile).
const SETTLE: Duration = Duration::from_secs(3);
/// Every request to the API server gives up after this.
pub const API_TIMEOUT: Duration = Duration::from_secs(2);
/// Events a speaker publishes per second, at most (a node that takes 5,000 IPs over at once
/// reports them over a minute rather than in one burst from every node).
const EVENTS_PER_SECOND: u32 = 100;
/// How often the next hops toward the other nodes are resolved again (the kernel's neighbour
/// entries go stale, and are collected, when nothing uses them; the XDP program does not
/// count as use).
const WARM_INTERVAL: Duration = Duration::from_secs(10);

/// What a stopping speaker (SIGTERM, SIGINT) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnStop {
    /// Keep everything for the restart grace: the data plane stays attached, the ARP/NDP
    /// answers go on, the other speakers keep this node's IPs here, the BGP sessions close
    /// without a NOTIFICATION (peers with graceful restart keep the routes). A speaker that comes
    /// back within the grace carries on without a gap; one that does not is failed over.
    Restart,
    /// Hand over now: stop answering, close BGP with Cease, leave the mesh, release the Lease,
    /// detach the programs. The others take the IPs at once.
    Handover,
}

/// The mesh's settings.
#[derive(Debug, Clone)]
pub struct MeshSettings {
    /// The UDP port every speaker listens on.
    pub port: u16,
    /// Where the others reach this node; `None`: the first IPv4 address of the first interface.
    pub address: Option<IpAddr>,
    /// A file holding the shared secret (the Secret `sluice-mesh`, mounted). While it is missing
    /// the mesh waits for it and liveness comes from the Leases alone.
    pub secret_file: PathBuf,
}

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
    /// Where MetalLB's objects are read from (`None`: not read).
    pub metallb_namespace: Option<String>,
    /// The flood guard: new flows per CPU and second past which new flows are not tracked.
    pub flood_guard_new_flows_per_second: u64,
    pub metrics_address: SocketAddr,
    pub resync: Duration,
    /// `None`: no mesh, liveness from the Leases alone.
    pub mesh: Option<MeshSettings>,
    /// The mesh declares a silent speaker down within this; the ARP/NDP answers of a dead
    /// speaker's node end within it too.
    pub failure_timeout: Duration,
    /// How long the others keep a restarting speaker's IPs on its node.
    pub restart_grace: Duration,
    /// Re-send gratuitous ARP / unsolicited NA for the IPs this node answers for this often.
    pub garp_interval: Option<Duration>,
    pub on_stop: OnStop,
    /// Where the speaker writes its status for `sluice inspect`.
    pub status_file: Option<PathBuf>,
    /// Balance policy-Cluster Services here, over every ready endpoint in the cluster.
    pub cluster_balancing: bool,
    /// The node network's MTU for the tunnels (`None`: the interfaces' smallest).
    pub tunnel_mtu: Option<u32>,
}

/// What went wrong at the edge.
#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error("cannot build a Kubernetes client (in a pod: the service account; outside: KUBECONFIG or ~/.kube/config): {0}")]
    Client(#[source] kube::Error),
    #[error("cannot read the Kubernetes client configuration: {0}")]
    ClientConfig(#[source] kube::config::InferConfigError),
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
    #[error("cannot start the closed-flow sweeper: {0}")]
    Sweeper(#[source] std::io::Error),
    #[error("--mesh-address: none given and interface {0} has no IPv4 address")]
    NoMeshAddress(String),
    #[error("cannot start the mesh on {address}: {source}")]
    Mesh {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Runs the speaker until SIGTERM or SIGINT, then does what `on_stop` says.
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
    bfd: Store<BFDProfile>,
    /// MetalLB's objects, when its CRDs are installed (the controller reports on them).
    metallb: Option<watch::MetallbStores>,
}

/// What our Lease should say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct LeaseWish {
    /// The interfaces that are up: a node is eligible for IPs on these only.
    interfaces: Vec<String>,
    /// Their own subnets: where L2 advertisements naming no interface answer.
    subnets: Vec<Subnet>,
    l2: BTreeSet<IpAddr>,
    bgp: BTreeSet<IpAddr>,
    mesh: Option<SocketAddr>,
}

/// What the Lease writer learnt of the API server.
#[derive(Debug, Default)]
struct ApiHealth {
    /// The last time the API server answered a request (any answer, errors included), by the
    /// monotonic clock and the wall clock.
    last_answer: Option<(Instant, Timestamp)>,
    /// The last request got no answer (refused, timed out): since when.
    unreachable_since: Option<Instant>,
    /// A request under way: since when (a hanging API server is noticed before it times out).
    in_flight_since: Option<Instant>,
    /// When the API server answered again after being out of reach.
    back_at: Option<Instant>,
    /// The last time our Lease was written.
    written: Option<Instant>,
    /// The renew time that write put in it (our wall clock).
    written_renew: Option<Timestamp>,
    /// Why the last write failed.
    error: Option<String>,
    /// What the last successful write said.
    published: Option<LeaseWish>,
    /// Our Lease was found deleted (an operator moving our IPs away): the loop stops answering.
    deleted: bool,
}

impl ApiHealth {
    /// Has the API server been out of reach (or silent on a request) for at least `d`?
    fn unreachable_for(&self, d: Duration) -> bool {
        self.unreachable_since
            .or(self.in_flight_since)
            .is_some_and(|t| t.elapsed() >= d)
    }

    /// The clock Lease expiry is read on: now while the API server answers, the last moment it
    /// answered while it does not (see [`liveness`]).
    fn lease_clock(&self) -> Timestamp {
        match (self.unreachable_since, self.last_answer) {
            (Some(_), Some((_, wall))) => wall,
            _ => Timestamp::now(),
        }
    }
}

type SharedHealth = Arc<Mutex<ApiHealth>>;

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
    let mut config = kube::Config::infer()
        .await
        .map_err(SpeakerError::ClientConfig)?;
    config.connect_timeout = Some(API_TIMEOUT);
    let client = Client::try_from(config).map_err(SpeakerError::Client)?;
    let mut dp = Dataplane::load(&DataplaneOptions {
        pin_dir: Some(options.pin_dir.clone()),
        pin_links: true,
        ..DataplaneOptions::default()
    })?;
    dp.set_flood_guard(options.flood_guard_new_flows_per_second)?;
    dataplane::flows::spawn_sweeper(options.pin_dir.clone()).map_err(SpeakerError::Sweeper)?;
    // A speaker restarting within its grace finds its answers still valid and keeps them until
    // the first pass decides; answers whose deadline has passed belong to a speaker that died,
    // and whose IPs the others have taken: they go.
    let left = dp.l2_time_left()?;
    if left.is_none_or(|d| d.is_zero()) {
        dp.set_l2_vips(&[])?;
    } else {
        info!(
            left_ms = left.map(|d| d.as_millis() as u64),
            "l2AnswersKept"
        );
    }
    let answer_window = if options.mesh.is_some() {
        options.failure_timeout
    } else {
        Duration::from_secs(options.lease_duration.max(1) as u64)
    };
    let keeper = L2DeadlineKeeper::start(&options.pin_dir, answer_window)?;
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
        bfd: watch::store(Api::namespaced(client.clone(), ns), &notify),
        metallb: match &options.metallb_namespace {
            Some(metallb_ns) => watch::MetallbStores::start(&client, metallb_ns, &notify).await,
            None => None,
        },
    };
    // Attach at once (or adopt the pinned links of the previous run): an interface that cannot
    // take the program fails the start, not a later pass.
    dp.attach_all(&interfaces)?;
    for name in &options.redirect_veths {
        let iface = dataplane::interface(name).map_err(SpeakerError::Interface)?;
        dp.allow_redirect(iface.ifindex)?;
    }
    let mesh_address = match &options.mesh {
        Some(m) => Some(SocketAddr::new(
            match m.address {
                Some(ip) => ip,
                None => first_ipv4(&options.interfaces[0])
                    .ok_or_else(|| SpeakerError::NoMeshAddress(options.interfaces[0].clone()))?,
            },
            m.port,
        )),
        None => None,
    };
    let health = SharedHealth::default();
    // Nothing is written before the first pass has decided: the Lease still says what the
    // previous run announced, and a restarted speaker must not take that back by mistake.
    let (wish_tx, wish_rx) = tokio::sync::watch::channel(None);
    let poke = Arc::new(Notify::new());
    let record = LeaseRecord {
        leases: Api::namespaced(client.clone(), ns),
        name: format!("{LEASE_PREFIX}{}", options.node_name),
        namespace: options.namespace.clone(),
        node: options.node_name.clone(),
    };
    tokio::spawn(lease_writer(LeaseWriter {
        record: record.clone(),
        lease_duration: options.lease_duration,
        wish: wish_rx,
        poke: poke.clone(),
        health: health.clone(),
        woke: notify.clone(),
    }));
    info!(node = %options.node_name, interfaces = ?options.interfaces, mesh = ?mesh_address, "speakerStarting");

    let mut speaker = Speaker {
        lease: record,
        read_cache: announce::ReadCache::default(),
        warmed: None,
        tunnel_mtu: options.tunnel_mtu.unwrap_or_else(|| {
            interfaces
                .iter()
                .filter_map(|i| dataplane::mtu(&i.name))
                .min()
                .unwrap_or(1500)
        }),
        events: events::publisher(
            Recorder::new(
                client.clone(),
                Reporter {
                    controller: MANAGER.into(),
                    instance: Some(options.node_name.clone()),
                },
            ),
            WriteLimit::new(EVENTS_PER_SECOND),
            API_TIMEOUT,
        ),
        interfaces,
        dp,
        bgp: None,
        last: NodePlan::default(),
        reported: BTreeSet::new(),
        status: status.clone(),
        mesh: None,
        mesh_address,
        last_down: BTreeMap::new(),
        wish: wish_tx,
        poke,
        health,
        isolated: false,
        rejoined: None,
        catch_up: None,
        saved_peers: BTreeMap::new(),
        started: Instant::now(),
        options: options.clone(),
    };
    // What a previous run left answering (kept above) is what this run starts from: no
    // takeover to announce, no Event, unless the first pass changes it.
    let kept = speaker.dp.l2_vips()?;
    speaker.last.l2 = kept
        .iter()
        .map(|v| (v.ip, speaker.interface_name(v.ifindex)))
        .filter(|(_, name)| !name.is_empty())
        .collect();

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(SpeakerError::Runtime)?;
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
            stores.bfd.wait_until_ready(),
        );
        if let Some(m) = &stores.metallb {
            m.wait_until_ready().await;
        }
    };
    tokio::pin!(sync);
    let mut synced = false;
    // Liveness is re-read this often: the mesh's verdicts, the API server's reachability and
    // Lease expiry change with time, not only with watch events.
    let tick = (options.failure_timeout / 4).max(Duration::from_millis(50));
    let due_every = options.resync.min(Duration::from_secs(
        (options.lease_duration / 3).max(1) as u64
    ));
    let mut last_pass = Instant::now();
    let mut last_garp = Instant::now();
    let mut last_interfaces = Instant::now();
    let mut last_secret_check: Option<Instant> = None;
    let mut seen: Option<Fingerprint> = None;
    loop {
        if speaker.mesh.is_none()
            && last_secret_check.is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            last_secret_check = Some(Instant::now());
            speaker.start_mesh(&notify).await?;
        }
        if synced {
            let nodes = stores.nodes.state().len();
            speaker.probe_api_when_alone(nodes);
            let now = speaker.fingerprint(nodes);
            let deleted = speaker.take_deleted();
            if deleted {
                // An operator moved our IPs away: claim none of them (the others have them).
                speaker.drop_l2();
            }
            if seen.as_ref() != Some(&now) || deleted || last_pass.elapsed() >= due_every {
                speaker.pass(&stores).await;
                last_pass = Instant::now();
            }
            seen = Some(now);
        }
        // A bond's failover moves the ARP/NDP answers to its new active port: re-read every
        // INTERFACE_REFRESH, not on every wake-up of the loop.
        if last_interfaces.elapsed() >= dataplane::INTERFACE_REFRESH {
            last_interfaces = Instant::now();
            if let Err(error) = speaker.dp.refresh_interfaces() {
                warn!(error = %error, "interfacesNotRefreshed");
            }
        }
        if let Some(every) = options.garp_interval {
            if last_garp.elapsed() >= every {
                speaker.refresh_announcements();
                last_garp = Instant::now();
            }
        }
        speaker.publish_status();
        tokio::select! {
            _ = &mut sync, if !synced => {
                synced = true;
                status.lock().unwrap().ready = true;
                info!("watchesSynced");
            }
            _ = notify.notified() => {
                // Let a burst of events settle into one pass (those that come during a pass
                // are handled together by the next).
                tokio::time::sleep(Duration::from_millis(20)).await;
                // Something changed (a watch event, a mesh member, the API server's health).
                seen = None;
            }
            _ = tokio::time::sleep(tick) => {}
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    speaker.stop(keeper).await;
    Ok(())
}

/// What liveness depends on besides watch events, which change with time: each mesh member
/// counted alive or not, the API server out of reach or not, this node cut off or not. A pass
/// runs when it changes.
type Fingerprint = (Vec<(String, bool)>, bool, bool, Vec<String>, Vec<Subnet>);

/// The own subnets of `up`, the interfaces that are up (see `onlink`).
fn subnets_up(up: &[String]) -> Vec<Subnet> {
    dataplane::subnets()
        .into_iter()
        .filter(|(name, _)| up.contains(name))
        .collect()
}

/// The names of the interfaces that are up with a carrier.
fn links_up(interfaces: &[dataplane::Interface]) -> Vec<String> {
    interfaces
        .iter()
        .filter(|i| dataplane::link_up(&i.name))
        .map(|i| i.name.clone())
        .collect()
}

/// The first IPv4 address of an interface.
fn first_ipv4(interface: &str) -> Option<IpAddr> {
    dataplane::ipv4_addresses()
        .into_iter()
        .find(|(name, _)| name == interface)
        .map(|(_, ip)| IpAddr::V4(ip))
}

/// Reads the peers a previous run saved (node → mesh address); `None` when there are none.
fn read_peers(path: &std::path::Path) -> Option<BTreeMap<String, SocketAddr>> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Reads the mesh secret: the file's bytes, surrounding whitespace trimmed. `None` while the
/// file is missing or empty.
pub fn read_secret(path: &std::path::Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    let text = bytes.trim_ascii();
    (!text.is_empty()).then(|| text.to_vec())
}

/// This node's Lease: where it is and whose it is.
#[derive(Clone)]
struct LeaseRecord {
    leases: Api<Lease>,
    name: String,
    namespace: String,
    node: String,
}

struct LeaseWriter {
    record: LeaseRecord,
    lease_duration: i32,
    wish: tokio::sync::watch::Receiver<Option<LeaseWish>>,
    poke: Arc<Notify>,
    health: SharedHealth,
    woke: Arc<Notify>,
}

/// Renews our Lease every third of its duration, and at once when what it should say changes
/// or the loop asks; never blocks the loop (a task of its own, each request with a timeout).
async fn lease_writer(mut w: LeaseWriter) {
    let every = Duration::from_secs((w.lease_duration / 3).max(1) as u64);
    loop {
        let Some(wish) = w.wish.borrow_and_update().clone() else {
            if w.wish.changed().await.is_err() {
                return;
            }
            continue;
        };
        w.health.lock().unwrap().in_flight_since = Some(Instant::now());
        let result = tokio::time::timeout(API_TIMEOUT * 2, w.write(&wish)).await;
        let now = Instant::now();
        {
            let mut h = w.health.lock().unwrap();
            h.in_flight_since = None;
            let before = (h.unreachable_since.is_some(), h.error.clone());
            match result {
                Ok(Ok((deleted, renewed))) => {
                    h.last_answer = Some((now, Timestamp::now()));
                    if h.unreachable_since.take().is_some() {
                        h.back_at = Some(now);
                    }
                    h.written = Some(now);
                    h.written_renew = Some(renewed);
                    h.error = None;
                    h.published = Some(if deleted {
                        LeaseWish {
                            l2: BTreeSet::new(),
                            ..wish
                        }
                    } else {
                        wish
                    });
                    h.deleted |= deleted;
                }
                Ok(Err(e)) => {
                    let answered = matches!(e, kube::Error::Api(_));
                    if answered {
                        h.last_answer = Some((now, Timestamp::now()));
                        if h.unreachable_since.take().is_some() {
                            h.back_at = Some(now);
                        }
                    } else {
                        h.unreachable_since.get_or_insert(now);
                    }
                    let hint = match &e {
                        kube::Error::Api(s) if s.is_forbidden() => {
                            " (RBAC: the speaker needs get, create and update on coordination.k8s.io leases in its namespace)"
                        }
                        _ => "",
                    };
                    h.error = Some(format!("{e}{hint}"));
                }
                Err(_) => {
                    h.unreachable_since.get_or_insert(now);
                    h.error = Some(format!(
                        "the API server did not answer within {} s",
                        (API_TIMEOUT * 2).as_secs()
                    ));
                }
            }
            if let Some(e) = &h.error {
                warn!(lease = %w.record.name, error = %e, "leaseUpdateFailed");
            }
            if before != (h.unreachable_since.is_some(), h.error.clone()) || h.deleted {
                w.woke.notify_one();
            }
        }
        let retry = if w.health.lock().unwrap().error.is_some() {
            // Keep asking while the API server is away: its return is noticed within a second.
            Duration::from_secs(1).min(every)
        } else {
            every
        };
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            changed = w.wish.changed() => if changed.is_err() { return },
            _ = w.poke.notified() => {}
        }
    }
}

impl LeaseWriter {
    /// Writes our Lease; says whether it had been deleted (recreated claiming no L2 IP), and
    /// the renew time written.
    async fn write(&self, wish: &LeaseWish) -> Result<(bool, Timestamp), kube::Error> {
        let current = self.record.get().await?;
        let written_before = self.health.lock().unwrap().written.is_some();
        let deleted = current.is_none() && written_before;
        if deleted {
            warn!(lease = %self.record.name, "leaseDeleted");
        }
        let wish = if deleted {
            LeaseWish {
                l2: BTreeSet::new(),
                ..wish.clone()
            }
        } else {
            wish.clone()
        };
        let renewed = self.record.put(current, &wish, self.lease_duration).await?;
        Ok((deleted, renewed))
    }
}

impl LeaseRecord {
    async fn get(&self) -> Result<Option<Lease>, kube::Error> {
        self.leases.get_opt(&self.name).await
    }

    /// Writes our Lease over `current` (as just read; `None`: create it); returns the renew
    /// time written.
    async fn put(
        &self,
        current: Option<Lease>,
        wish: &LeaseWish,
        duration: i32,
    ) -> Result<Timestamp, kube::Error> {
        let renewed = Timestamp::now();
        let now = MicroTime(renewed);
        let list = |ips: &BTreeSet<IpAddr>| {
            ips.iter()
                .map(|ip| ip.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut annotations = BTreeMap::new();
        annotations.insert(INTERFACES_ANNOTATION.to_string(), wish.interfaces.join(","));
        annotations.insert(
            SUBNETS_ANNOTATION.to_string(),
            onlink::format(&wish.subnets),
        );
        annotations.insert(ANNOUNCING_ANNOTATION.to_string(), list(&wish.l2));
        annotations.insert(BGP_ANNOTATION.to_string(), list(&wish.bgp));
        if let Some(addr) = wish.mesh {
            annotations.insert(MESH_ANNOTATION.to_string(), addr.to_string());
        }
        let exists = current.is_some();
        let mut lease = current.unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
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
        spec.holder_identity = Some(self.node.clone());
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now.clone());
        if spec.acquire_time.is_none() {
            spec.acquire_time = Some(now);
        }
        if exists {
            self.leases
                .replace(&self.name, &PostParams::default(), &lease)
                .await?;
        } else {
            self.leases.create(&PostParams::default(), &lease).await?;
        }
        Ok(renewed)
    }
}

struct Speaker {
    options: Options,
    lease: LeaseRecord,
    events: events::EventSender,
    /// What the last passes read from Services and EndpointSlices (see `announce::ReadCache`).
    read_cache: announce::ReadCache,
    interfaces: Vec<dataplane::Interface>,
    /// The node network's MTU for the tunnels.
    tunnel_mtu: u32,
    /// When the next hops toward the other nodes were last resolved again.
    warmed: Option<Instant>,
    dp: Dataplane,
    bgp: Option<crate::bgp::speaker::Speaker>,
    /// What the last pass made true.
    last: NodePlan,
    /// Problems reported while they last: not reported again.
    reported: BTreeSet<(String, String)>,
    status: crate::metrics::SharedStatus,
    mesh: Option<Mesh>,
    mesh_address: Option<SocketAddr>,
    /// Nodes the mesh declared down, with their Lease's renew time at that moment; kept after
    /// they come back, until their Lease is renewed.
    last_down: BTreeMap<String, Option<String>>,
    wish: tokio::sync::watch::Sender<Option<LeaseWish>>,
    poke: Arc<Notify>,
    health: SharedHealth,
    /// Cut off from the API server and from every other speaker: answering nothing.
    isolated: bool,
    /// When this node stopped being cut off (see [`Speaker::settling`]).
    rejoined: Option<Instant>,
    /// The renew time of our first Lease write after the rejoin, awaited in the Lease watch.
    catch_up: Option<Timestamp>,
    /// The mesh peers last written to the peers file.
    saved_peers: BTreeMap<String, SocketAddr>,
    started: Instant,
}

impl Speaker {
    /// Starts the mesh once its secret is there.
    async fn start_mesh(&mut self, notify: &Arc<Notify>) -> Result<(), SpeakerError> {
        let (Some(settings), Some(advertise)) = (&self.options.mesh, self.mesh_address) else {
            return Ok(());
        };
        let Some(secret) = read_secret(&settings.secret_file) else {
            warn!(file = %settings.secret_file.display(),
                  "meshWaitingForSecret: liveness from the Leases alone until the secret is there");
            self.status.lock().unwrap().mesh_enabled = false;
            return Ok(());
        };
        let bind = SocketAddr::new(
            if advertise.is_ipv4() {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u16; 8])
            },
            settings.port,
        );
        let mesh = Mesh::start(
            MeshOptions {
                node: self.options.node_name.clone(),
                bind,
                advertise,
                secret,
                failure_timeout: self.options.failure_timeout,
            },
            notify.clone(),
        )
        .await
        .map_err(|source| SpeakerError::Mesh {
            address: bind,
            source,
        })?;
        self.status.lock().unwrap().mesh_enabled = true;
        // The peers the previous run knew: a speaker restarting while the API server is away
        // rejoins the mesh with them (the Leases would tell it only once the API is back).
        if let Some(saved) = self.peers_file().and_then(|p| read_peers(&p)) {
            info!(peers = saved.len(), "meshPeersRestored");
            mesh.set_peers(saved);
        }
        self.mesh = Some(mesh);
        Ok(())
    }

    fn drop_l2(&mut self) {
        self.last.l2.clear();
        if let Err(e) = self.dp.set_l2_vips(&[]) {
            warn!(error = %e, "l2ClearFailed");
        }
    }

    fn take_deleted(&mut self) -> bool {
        std::mem::take(&mut self.health.lock().unwrap().deleted)
    }

    /// The mesh's verdict on every node it knows, remembering each down node's Lease renew
    /// time when it was first seen down.
    fn verdicts(&mut self, view: &MeshView, leases: &[Lease]) -> BTreeMap<String, MeshVerdict> {
        let now = Instant::now();
        let mut out = BTreeMap::new();
        for (node, member) in &view.members {
            if member.counts_alive(now) {
                // Back after being declared down: its Lease's claims are stale until renewed.
                let renew = liveness::renew_time_of(leases, node);
                match self.last_down.get(node) {
                    Some(at_down) if *at_down == renew => {
                        out.insert(
                            node.clone(),
                            MeshVerdict::Returned {
                                renew_at_down: at_down.clone(),
                            },
                        );
                    }
                    _ => {
                        self.last_down.remove(node);
                        out.insert(node.clone(), MeshVerdict::Alive);
                    }
                }
            } else {
                let renew = self
                    .last_down
                    .entry(node.clone())
                    .or_insert_with(|| liveness::renew_time_of(leases, node))
                    .clone();
                out.insert(
                    node.clone(),
                    MeshVerdict::Down {
                        renew_at_down: renew,
                    },
                );
            }
        }
        // This node is alive to itself once its Lease exists.
        if self.health.lock().unwrap().written.is_some() {
            out.insert(self.options.node_name.clone(), MeshVerdict::Alive);
        }
        out
    }

    /// After being cut off, a node's objects are stale (its own Lease still claims the IPs the
    /// others took over meanwhile): it answers nothing until the API server has answered again,
    /// its watches have had [`SETTLE`] to catch up, and its Lease watch has delivered a write of
    /// its own made after the rejoin. A watch delivers in order, so by then every Lease the
    /// others wrote meanwhile (the new owner's claim) is in the store: exactly one node answers
    /// per IP, even when the old watch connection only wakes up seconds later (TCP's
    /// retransmission back-off after a link was down). A watch that shows nothing for a whole
    /// Lease duration is given up on.
    fn settling(&mut self, leases: &[Lease]) -> bool {
        let Some(t) = self.rejoined else {
            return false;
        };
        {
            let h = self.health.lock().unwrap();
            if self.catch_up.is_none() && h.written.is_some_and(|w| w >= t) {
                self.catch_up = h.written_renew;
            }
        }
        if self.settle_waiting() {
            return true;
        }
        let seen = self.catch_up.is_some_and(|written| {
            leases
                .iter()
                .filter(|l| l.name_any() == self.lease.name)
                .filter_map(|l| l.spec.as_ref()?.renew_time.as_ref())
                .any(|r| r.0.as_microsecond() >= written.as_microsecond())
        });
        let given_up =
            t.elapsed() >= Duration::from_secs(self.options.lease_duration.max(1) as u64);
        if !seen && given_up {
            warn!("rejoinedWithoutLeaseWatch: our own Lease write never came back through the watch; answering anyway");
        }
        !seen && !given_up
    }

    /// The part of [`Speaker::settling`] that time ends: the API server out of reach, or back
    /// for less than [`SETTLE`].
    fn settle_waiting(&self) -> bool {
        self.rejoined.is_some_and(|t| {
            let h = self.health.lock().unwrap();
            if h.unreachable_since.is_some() {
                return true;
            }
            let since = h.back_at.filter(|b| *b >= t).unwrap_or(t);
            since.elapsed() < SETTLE
        })
    }

    /// Where the mesh's peers are kept between runs: beside the status file.
    fn peers_file(&self) -> Option<PathBuf> {
        self.options
            .status_file
            .as_ref()
            .map(|p| p.with_extension("mesh-peers.json"))
    }

    /// Without the mesh (off, or never formed), a node whose Lease nobody has seen renewed for a
    /// whole duration is dead to the others: it stops answering rather than answer twice.
    fn lease_lapsed(&self) -> bool {
        let valid = Duration::from_secs(self.options.lease_duration.max(1) as u64);
        self.health
            .lock()
            .unwrap()
            .written
            .unwrap_or(self.started)
            .elapsed()
            >= valid
    }

    /// Is this node cut off from everything: the API server out of reach and no other speaker
    /// answering the mesh, for longer than the failure timeout, while other nodes exist? It
    /// cannot know whether it still owns an IP, so it answers for none.
    fn cut_off(&self, view: Option<&MeshView>, nodes: usize) -> bool {
        let Some(view) = view.filter(|v| !v.members.is_empty()) else {
            return self.lease_lapsed();
        };
        let alone = view.alive_peers(Instant::now()) == 0
            && view.members.values().all(|m| {
                m.since.elapsed() >= self.options.failure_timeout
                    || m.state != crate::mesh::MemberState::Down
            });
        nodes > 1
            && alone
            && self
                .health
                .lock()
                .unwrap()
                .unreachable_for(self.options.failure_timeout)
    }

    /// Alone in the mesh: is the API server still there? Asks now, not at the next renewal
    /// (at most once per failure timeout), so a node cut off from everything falls silent
    /// within seconds.
    fn probe_api_when_alone(&self, nodes: usize) {
        let Some(view) = self.mesh.as_ref().map(|m| m.view()) else {
            return;
        };
        let answered_lately = self
            .health
            .lock()
            .unwrap()
            .last_answer
            .is_some_and(|(t, _)| t.elapsed() < self.options.failure_timeout);
        if nodes > 1 && !answered_lately && view.alive_peers(Instant::now()) == 0 {
            self.poke.notify_one();
        }
    }

    /// What liveness depends on now (see [`Fingerprint`]).
    fn fingerprint(&self, nodes: usize) -> Fingerprint {
        let view = self.mesh.as_ref().map(|m| m.view());
        let now = Instant::now();
        let members = view
            .as_ref()
            .map(|v| {
                v.members
                    .iter()
                    .map(|(n, m)| (n.clone(), m.counts_alive(now)))
                    .collect()
            })
            .unwrap_or_default();
        let unreachable = self.health.lock().unwrap().unreachable_since.is_some();
        let up = links_up(&self.interfaces);
        let subnets = subnets_up(&up);
        (
            members,
            unreachable,
            self.cut_off(view.as_ref(), nodes) || self.settle_waiting(),
            up,
            subnets,
        )
    }

    async fn pass(&mut self, stores: &Stores) {
        let reading = Instant::now();
        let mut objects = Objects {
            pools: watch::sorted(&stores.pools),
            l2_advertisements: watch::sorted(&stores.l2),
            peers: watch::sorted(&stores.peers),
            bgp_advertisements: watch::sorted(&stores.bgp_ads),
            bfd_profiles: watch::sorted(&stores.bfd),
        };
        if let Some(m) = &stores.metallb {
            objects.extend(super::metallb::read(&m.objects()).objects);
        }
        let services = watch::shared_sorted(&stores.services);
        let slices = watch::shared_sorted(&stores.slices);
        let leases: Vec<Lease> = watch::sorted(&stores.leases)
            .into_iter()
            .filter(|l| l.name_any().starts_with(LEASE_PREFIX))
            .collect();
        let node_objects = watch::sorted(&stores.nodes);
        let peers = liveness::mesh_addresses(&leases);
        if self.mesh.is_some() && peers != self.saved_peers {
            if let Some(path) = self.peers_file() {
                let text = serde_json::to_string(&peers).unwrap_or_default();
                if let Err(e) = std::fs::write(&path, text) {
                    tracing::debug!(error = %e, "meshPeersNotSaved");
                }
            }
            self.saved_peers = peers.clone();
        }
        let view = self.mesh.as_ref().map(|m| {
            m.set_peers(peers);
            m.view()
        });
        let verdicts = view.as_ref().map(|v| self.verdicts(v, &leases));
        let lease_clock = self.health.lock().unwrap().lease_clock();
        let (mut nodes, mut announcers) =
            liveness::node_views(&node_objects, &leases, lease_clock, verdicts.as_ref());
        // An IP no Lease claims (its owner could not write its Lease: the API server is away)
        // stays where the last pass put it, if that node is still alive: every speaker made the
        // same decision then, so every speaker keeps it now.
        for (ip, owner) in &self.last.l2_owners {
            let Some(owner) = owner else { continue };
            if !announcers.contains_key(ip) && nodes.iter().any(|n| &n.name == owner && n.alive) {
                announcers.insert(*ip, owner.clone());
            }
        }
        // This node's interfaces as they are now (others read them from its Lease): a data
        // link that went down makes it ineligible there at once.
        let up = links_up(&self.interfaces);
        if self
            .wish
            .borrow()
            .as_ref()
            .is_some_and(|w| w.interfaces != up)
        {
            info!(interfaces = ?up, "linksChanged");
        }
        let subnets = subnets_up(&up);
        if let Some(me) = nodes.iter_mut().find(|n| n.name == self.options.node_name) {
            me.interfaces = up.iter().cloned().collect();
            me.subnets = subnets.clone();
        }
        let planning = Instant::now();
        let mut plan = announce::plan_with(
            announce::Input {
                me: &self.options.node_name,
                objects: &objects,
                services: &services,
                slices: &slices,
                nodes: &nodes,
                announcers: &announcers,
                sticky: self.options.sticky,
                classless_is_ours: self.options.classless_is_ours,
                cluster_wide: self.options.cluster_balancing,
            },
            &mut self.read_cache,
        );
        let isolated = self.cut_off(view.as_ref(), node_objects.len());
        if isolated != self.isolated {
            if isolated {
                warn!(
                    "isolated: neither the API server nor any other speaker answers; answering ARP/NDP for nothing"
                );
            } else {
                info!("rejoined: answering again once the watches have caught up");
                self.rejoined = Some(Instant::now());
                self.catch_up = None;
            }
            self.isolated = isolated;
        }
        let settling = self.settling(&leases);
        if !settling {
            self.rejoined = None;
        }
        if isolated || settling {
            // Its view of who owns what is wrong too (everyone else looks dead).
            plan.l2.clear();
            plan.l2_owners.clear();
        }
        self.update_readiness();
        let planned = planning.elapsed();
        if plan != self.last {
            let claims = liveness::claims(&leases);
            let applying = Instant::now();
            self.apply(&plan);
            info!(
                services = plan.services.len(),
                l2 = plan.l2.len(),
                bgp = plan.bgp_ips.len(),
                read_ms = (planning - reading).as_secs_f64() * 1e3,
                planned_ms = planned.as_secs_f64() * 1e3,
                applied_ms = applying.elapsed().as_secs_f64() * 1e3,
                "planApplied"
            );
            self.record(&plan, &services, &claims, view.as_ref()).await;
            self.last = plan;
        }
        // Keep the next hops toward the other nodes resolved (set_tunnels resolves new ones).
        if self.warmed.is_none_or(|at| at.elapsed() > WARM_INTERVAL) {
            self.dp.warm_tunnel_peers();
            self.warmed = Some(Instant::now());
        }
        // Others learn which interfaces are up and who announces what from our Lease.
        let wish = LeaseWish {
            interfaces: up,
            subnets,
            l2: self.last.l2.iter().map(|(ip, _)| *ip).collect(),
            bgp: if self.last.peers.is_empty() {
                BTreeSet::new()
            } else {
                self.last.bgp_ips.clone()
            },
            mesh: self.mesh_address,
        };
        self.wish.send_if_modified(|w| {
            let changed = w.as_ref() != Some(&wish);
            *w = Some(wish);
            changed
        });
    }

    /// /readyz: not ready while our Lease cannot be written, saying why.
    fn update_readiness(&self) {
        let h = self.health.lock().unwrap();
        self.status.lock().unwrap().not_ready_reason = h.error.as_ref().map(|e| {
            format!(
                "cannot write the Lease {}/{LEASE_PREFIX}{}: {e}; other nodes do not see this one, so it announces nothing",
                self.options.namespace, self.options.node_name
            )
        });
    }

    /// Makes the data plane, the ARP/NDP answers and the BGP routes what `plan` says.
    fn apply(&mut self, plan: &NodePlan) {
        let vips = L2Vip::on(&self.interfaces, &plan.l2);
        if let Some((mine, others)) = &plan.tunnels {
            let tunnels = dataplane::Tunnels {
                local_v4: mine.iter().find_map(|a| match a {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                }),
                local_v6: mine.iter().find_map(|a| match a {
                    IpAddr::V6(v6) => Some(*v6),
                    IpAddr::V4(_) => None,
                }),
                mtu: self.tunnel_mtu,
                peers: others.clone(),
            };
            if let Err(e) = self.dp.set_tunnels(&tunnels) {
                warn!(error = %e, "tunnelsFailed");
            }
        }
        if let Err(e) = self.dp.sync(&self.interfaces, &plan.services, &vips) {
            warn!(error = %e, "dataplaneSyncFailed");
            return;
        }
        let before: BTreeSet<&(IpAddr, String)> = self.last.l2.iter().collect();
        let taken: Vec<(&L2Vip, String)> = vips
            .iter()
            .map(|vip| (vip, self.interface_name(vip.ifindex)))
            .filter(|(vip, name)| !before.contains(&(vip.ip, name.clone())))
            .collect();
        // Takeover: tell the segment at once (gratuitous ARP / unsolicited NA).
        let sent = crate::l2::announce_all(
            &taken
                .iter()
                .map(|(vip, _)| (vip.ifindex, vip.mac, vip.ip))
                .collect::<Vec<_>>(),
        );
        for ((vip, name), result) in taken.iter().zip(sent) {
            match result {
                Ok(()) => info!(ip = %vip.ip, interface = %name, "l2Announced"),
                Err(e) => warn!(ip = %vip.ip, interface = %name, error = %e, "l2AnnounceFailed"),
            }
        }
        let now: BTreeSet<&IpAddr> = plan.l2.iter().map(|(ip, _)| ip).collect();
        for (ip, interface) in &self.last.l2 {
            if !now.contains(ip) {
                info!(%ip, %interface, "l2Withdrawn");
            }
        }
        self.sync_bgp(plan);
    }

    fn interface_name(&self, ifindex: u32) -> String {
        self.interfaces
            .iter()
            .find(|i| i.ifindex == ifindex)
            .map(|i| i.name.clone())
            .unwrap_or_default()
    }

    /// Gratuitous ARP / unsolicited NA again for every IP answered here, so switches' FDB entries
    /// and hosts' neighbour caches stay fresh.
    fn refresh_announcements(&self) {
        let vips = L2Vip::on(&self.interfaces, &self.last.l2);
        let sent = crate::l2::announce_all(
            &vips
                .iter()
                .map(|vip| (vip.ifindex, vip.mac, vip.ip))
                .collect::<Vec<_>>(),
        );
        for (vip, result) in vips.iter().zip(sent) {
            if let Err(e) = result {
                warn!(ip = %vip.ip, error = %e, "l2AnnounceFailed");
            }
        }
    }

    fn sync_bgp(&mut self, plan: &NodePlan) {
        if plan.peers.is_empty() {
            if let Some(speaker) = self.bgp.take() {
                tokio::task::block_in_place(|| speaker.shutdown());
            }
            return;
        }
        if self.bgp.is_none() {
            let restarted = self.dp.adopted_links();
            let bfd_state = self
                .options
                .status_file
                .as_ref()
                .map(|f| crate::standalone::bfd_state_file(f));
            match tokio::task::block_in_place(|| {
                crate::bgp::speaker::Speaker::new(restarted, bfd_state)
            }) {
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

    /// BGP sessions and mesh members on /metrics and for `sluice inspect`.
    fn publish_status(&self) {
        let mut s = self.status.lock().unwrap();
        s.bgp = self
            .bgp
            .as_ref()
            .map(|b| b.session_statuses())
            .unwrap_or_default();
        s.bfd = self
            .bgp
            .as_ref()
            .map(|b| b.bfd_statuses())
            .unwrap_or_default();
        if let Some(mesh) = &self.mesh {
            let view = mesh.view();
            s.mesh = crate::metrics::MeshStatus::from_view(&view);
        }
        if let Some(path) = &self.options.status_file {
            let text = serde_json::to_string_pretty(&*s).unwrap_or_default();
            if let Err(e) = crate::standalone::write_atomically(path, &text) {
                tracing::debug!(error = %format!("{e:#}"), "statusNotWritten");
            }
        }
    }

    /// Events on Services: this node took an IP over in L2 (and from whom, when a node died),
    /// started or stopped announcing one by BGP, or something in its objects is wrong. Sent by
    /// tasks of their own: the loop never waits on the API server.
    async fn record(
        &mut self,
        plan: &NodePlan,
        services: &[Arc<Service>],
        claims: &BTreeMap<IpAddr, String>,
        view: Option<&MeshView>,
    ) {
        let me = self.options.node_name.clone();
        let mut events: Vec<(String, EventType, &'static str, String)> = Vec::new();
        let (services_now, services_before) = (plan.services_by_ip(), self.last.services_by_ip());
        fn services_with<'a>(
            index: &BTreeMap<IpAddr, Vec<&'a String>>,
            ip: &IpAddr,
        ) -> Vec<&'a String> {
            index.get(ip).cloned().unwrap_or_default()
        }
        let mine_before: BTreeSet<IpAddr> = self.last.l2.iter().map(|(ip, _)| *ip).collect();
        let mine_now: BTreeMap<IpAddr, Vec<&str>> =
            plan.l2.iter().fold(BTreeMap::new(), |mut m, (ip, i)| {
                m.entry(*ip).or_insert_with(Vec::new).push(i.as_str());
                m
            });
        for (ip, interfaces) in &mine_now {
            if mine_before.contains(ip) {
                continue;
            }
            // Taken from a node the mesh declared down: say which, and how long that took.
            let failed = claims
                .get(ip)
                .filter(|owner| **owner != me)
                .and_then(|owner| Some((owner, view?.members.get(owner)?)))
                .filter(|(_, m)| m.state == crate::mesh::MemberState::Down);
            for s in services_with(&services_now, ip) {
                let (reason, note) = match failed {
                    Some((owner, m)) => {
                        let noticed = m
                            .noticed_after
                            .map(|d| format!("{:.2} s", d.as_secs_f64()))
                            .unwrap_or_else(|| "an unknown time".into());
                        warn!(%ip, from = %owner, noticed_after = %noticed, "ipMovedNodeDown");
                        (
                            "nodeFailedOver",
                            format!(
                                "node {me} took {ip} over from node {owner}, which stopped answering the speaker mesh (noticed {noticed} after its last message); answering on {}",
                                interfaces.join(", ")
                            ),
                        )
                    }
                    None => (
                        "nodeAssigned",
                        format!(
                            "node {me} announces {ip} by L2 (ARP/NDP) on {}",
                            interfaces.join(", ")
                        ),
                    ),
                };
                events.push((s.clone(), EventType::Normal, reason, note));
            }
        }
        if !plan.peers.is_empty() || !self.last.peers.is_empty() {
            let peers: Vec<String> = plan
                .peers
                .iter()
                .map(|p| p.peer_address.to_string())
                .collect();
            for ip in plan.bgp_ips.difference(&self.last.bgp_ips) {
                for s in services_with(&services_now, ip) {
                    events.push((
                        s.clone(),
                        EventType::Normal,
                        "announced",
                        format!("node {me} announces {ip} by BGP to {}", peers.join(", ")),
                    ));
                }
            }
            for ip in self.last.bgp_ips.difference(&plan.bgp_ips) {
                for s in services_with(&services_before, ip) {
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
        let by_key: HashMap<String, &Service> = if events.is_empty() {
            HashMap::new()
        } else {
            services
                .iter()
                .map(|s| (super::shared::service_key(s), &**s))
                .collect()
        };
        for (service, type_, reason, note) in events {
            info!(%service, reason, detail = %note, "serviceEvent");
            let Some(s) = by_key.get(&service) else {
                continue;
            };
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Announce".into(),
                secondary: None,
            };
            let _ = self.events.send((event, s.object_ref(&())));
        }
    }

    /// Stops as `on_stop` says.
    async fn stop(mut self, keeper: L2DeadlineKeeper) {
        match self.options.on_stop {
            OnStop::Restart => {
                // Answers, balancing and (with graceful restart) routes go on for the grace;
                // the others keep our IPs here meanwhile.
                if let Some(mesh) = &self.mesh {
                    mesh.restarting(self.options.restart_grace);
                    // Let the datagrams leave before the runtime ends.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                keeper.stop();
                if let Err(e) = self.dp.set_l2_deadline(Some(self.options.restart_grace)) {
                    warn!(error = %e, "l2DeadlineNotSet");
                }
                // BFD AdminDown (not a failure to the routers), then closing the sessions without
                // Cease: peers that negotiated graceful restart keep the routes while the
                // speaker is away.
                if let Some(bgp) = self.bgp.take() {
                    let window = self.options.restart_grace;
                    tokio::task::block_in_place(|| bgp.prepare_restart(window));
                    std::mem::forget(bgp);
                }
                info!(
                    grace_s = self.options.restart_grace.as_secs_f64(),
                    "speakerStoppedForRestart"
                );
            }
            OnStop::Handover => {
                keeper.stop();
                if let Err(e) = self.dp.set_l2_vips(&[]) {
                    warn!(error = %e, "l2ClearFailed");
                }
                if let Some(mesh) = &self.mesh {
                    mesh.leave();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if let Some(speaker) = self.bgp.take() {
                    tokio::task::block_in_place(|| speaker.shutdown());
                }
                // An expired Lease (duration 1 s, nothing announced) makes the others re-elect
                // now.
                let released = tokio::time::timeout(API_TIMEOUT, async {
                    let current = self.lease.get().await?;
                    self.lease
                        .put(
                            current,
                            &LeaseWish {
                                mesh: self.mesh_address,
                                ..LeaseWish::default()
                            },
                            1,
                        )
                        .await
                })
                .await;
                if !matches!(released, Ok(Ok(_))) {
                    warn!("leaseReleaseFailed");
                }
                if let Err(e) = dataplane::detach_pinned(&self.options.pin_dir) {
                    warn!(error = %e, "detachFailed");
                }
                info!("speakerStopped");
            }
        }
    }
}
