//! `sluice controller`: the edge between the Kubernetes API and the pure decisions in
//! [`reconcile`](super::reconcile) and [`lease`](super::lease).
//!
//! It watches Services, Namespaces and Sluice's objects (reflector stores kept by `kube`'s
//! watcher), leads through a `coordination.k8s.io` Lease, and while it leads makes the plan
//! true: Service statuses (`status.loadBalancer.ingress`), Events on Services, `Valid`
//! conditions and pool usage on the objects. Every write states the whole of what the
//! controller decided (a merge patch of the field it owns), never a read-modify-write.
//!
//! Nothing is allocated before every store has listed once: allocation starts from the IPs
//! already in Service statuses, so a restart renumbers nothing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Namespace, ObjectReference, Service},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    api::{Api, Patch, PatchParams, PostParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::Store,
    },
    Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{
    crd::{BFDProfile, BGPAdvertisement, BGPPeer, IPAddressPool, L2Advertisement},
    events,
    lease::{self, Decision},
    limit::{WriteLimit, CONCURRENT_WRITES},
    metallb,
    reconcile::{self, Plan},
    shared::{service_key, status_ips},
    validity::{self, ObjectRef, Objects},
    watch,
};

/// The field manager and event reporter name.
pub const MANAGER: &str = "sluice-controller";

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The namespace of Sluice's objects and of the Lease.
    pub namespace: String,
    /// This replica's name in the Lease (the pod name in a Deployment).
    pub identity: String,
    pub lease_name: String,
    /// Seconds a Lease stays valid without renewal.
    pub lease_duration: i32,
    /// Whether Services of type LoadBalancer without `spec.loadBalancerClass` are ours.
    pub classless_is_ours: bool,
    /// Where MetalLB's objects are read from (`None`: not read).
    pub metallb_namespace: Option<String>,
    /// Where /metrics, /healthz and /readyz are served.
    pub metrics_address: SocketAddr,
    /// A full pass this often even when nothing changed.
    pub resync: Duration,
    /// Writes to the API server per second, at most (0: no limit).
    pub api_writes_per_second: u32,
}

/// What went wrong at the edge.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot build a Kubernetes client (in a pod: the service account; outside: KUBECONFIG or ~/.kube/config): {0}")]
    Client(#[source] kube::Error),
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

pub use crate::metrics::{ControllerStatus, SharedControllerStatus};

/// Runs the controller until SIGTERM or SIGINT; releases the Lease on the way out.
pub fn run(options: Options) -> Result<(), ControllerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ControllerError::Runtime)?;
    runtime.block_on(run_async(options))
}

/// The Secret holding the speaker mesh's shared key (key [`MESH_SECRET_KEY`]), in Sluice's
/// namespace; the speakers mount it.
pub const MESH_SECRET: &str = "sluice-mesh";
pub const MESH_SECRET_KEY: &str = "secret";

/// Creates the mesh Secret when it is missing (32 random bytes, hex), so that installing Sluice
/// stays one `kubectl apply -k`. Never changes an existing one: an operator may set their own
/// key. Tries until the Secret exists (every request with a timeout).
async fn keep_mesh_secret(secrets: Api<k8s_openapi::api::core::v1::Secret>) {
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(5), ensure_mesh_secret(&secrets));
        match attempt.await {
            Ok(Ok(created)) => {
                if created {
                    info!(secret = MESH_SECRET, "meshSecretCreated");
                }
                return;
            }
            Ok(Err(e)) => warn!(secret = MESH_SECRET, error = %e, "meshSecretNotEnsured"),
            Err(_) => warn!(
                secret = MESH_SECRET,
                "meshSecretNotEnsured: the API server did not answer"
            ),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// `Ok(true)`: created now; `Ok(false)`: it was there (or another replica made it first).
async fn ensure_mesh_secret(
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
) -> Result<bool, kube::Error> {
    if secrets.get_opt(MESH_SECRET).await?.is_some() {
        return Ok(false);
    }
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| kube::Error::Service("no randomness for the mesh secret".into()))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(MESH_SECRET.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_string(),
                    "sluice".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        string_data: Some([(MESH_SECRET_KEY.to_string(), hex)].into()),
        ..Default::default()
    };
    match secrets
        .create(&kube::api::PostParams::default(), &secret)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn run_async(options: Options) -> Result<(), ControllerError> {
    let status = SharedControllerStatus::default();
    crate::metrics::serve_controller(options.metrics_address, status.clone()).map_err(
        |source| ControllerError::Metrics {
            address: options.metrics_address,
            source,
        },
    )?;
    let client = Client::try_default()
        .await
        .map_err(ControllerError::Client)?;
    let notify = Arc::new(Notify::new());
    let ns = options.namespace.as_str();
    let stores = Stores {
        services: watch::store(Api::all(client.clone()), &notify),
        namespaces: watch::store(Api::all(client.clone()), &notify),
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
    let ctx = Context {
        client: client.clone(),
        leases: Api::namespaced(client.clone(), ns),
        status: status.clone(),
        limit: WriteLimit::new(options.api_writes_per_second),
        // Under their own limit: a first pass's 10,000 Events never hold back the next pass's
        // status writes.
        events: events::publisher(
            Recorder::new(
                client.clone(),
                Reporter {
                    controller: MANAGER.into(),
                    instance: Some(options.identity.clone()),
                },
            ),
            WriteLimit::new(options.api_writes_per_second),
            Duration::from_secs(10),
        ),
        options: options.clone(),
    };
    info!(
        namespace = ns,
        identity = %options.identity,
        classless_is_ours = options.classless_is_ours,
        "controllerStarting"
    );
    tokio::spawn(keep_mesh_secret(Api::namespaced(client.clone(), ns)));

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ControllerError::Runtime)?;
    let sync = stores.wait_until_ready();
    tokio::pin!(sync);
    let mut synced = false;
    let mut leader = Leadership::default();
    let mut memory = Memory::default();
    let renew_every = Duration::from_secs((options.lease_duration / 3).max(1) as u64);
    let mut next_lease_step = Instant::now();
    let mut last_pass = Instant::now();
    loop {
        if Instant::now() >= next_lease_step {
            leader.step(&ctx).await;
            next_lease_step = Instant::now() + renew_every;
            status.lock().unwrap().leader = leader.leading;
        }
        if synced && leader.leading {
            // The Lease is renewed while a long pass writes (10,000 first statuses take 20 s
            // at the default write limit); a lost Lease cancels the pass's remaining writes.
            let writing = pass(&ctx, &stores, &mut memory);
            tokio::pin!(writing);
            loop {
                tokio::select! {
                    _ = &mut writing => break,
                    _ = tokio::time::sleep_until(next_lease_step.into()) => {
                        leader.step(&ctx).await;
                        next_lease_step = Instant::now() + renew_every;
                        status.lock().unwrap().leader = leader.leading;
                        if !leader.leading {
                            break;
                        }
                    }
                }
            }
            last_pass = Instant::now();
        }
        let wake = next_lease_step.min(last_pass + options.resync);
        tokio::select! {
            _ = &mut sync, if !synced => {
                synced = true;
                status.lock().unwrap().synced = true;
                info!("watchesSynced");
            }
            _ = notify.notified() => {
                // Let a burst of watch events settle into one pass (and events that come
                // during a pass are handled together by the next).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    if leader.leading {
        leader.release(&ctx).await;
    }
    info!("controllerStopped");
    Ok(())
}

struct Context {
    client: Client,
    leases: Api<Lease>,
    status: SharedControllerStatus,
    limit: WriteLimit,
    /// Events to publish, in the background.
    events: events::EventSender,
    options: Options,
}

struct Stores {
    services: Store<Service>,
    namespaces: Store<Namespace>,
    pools: Store<IPAddressPool>,
    l2: Store<L2Advertisement>,
    peers: Store<BGPPeer>,
    bgp_ads: Store<BGPAdvertisement>,
    bfd: Store<BFDProfile>,
    /// MetalLB's objects, when its CRDs are installed.
    metallb: Option<watch::MetallbStores>,
}

impl Stores {
    async fn wait_until_ready(&self) {
        if let Some(m) = &self.metallb {
            m.wait_until_ready().await;
        }
        let _ = tokio::join!(
            self.services.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.pools.wait_until_ready(),
            self.l2.wait_until_ready(),
            self.peers.wait_until_ready(),
            self.bgp_ads.wait_until_ready(),
            self.bfd.wait_until_ready(),
        );
    }
}

/// Whether we lead, and since when we last renewed.
#[derive(Default)]
struct Leadership {
    leading: bool,
    renewed: Option<Instant>,
}

impl Leadership {
    async fn step(&mut self, ctx: &Context) {
        let o = &ctx.options;
        let result = async {
            let current = ctx.leases.get_opt(&o.lease_name).await?;
            let spec = current.as_ref().and_then(|l| l.spec.as_ref());
            match lease::decide(spec, &o.identity, Timestamp::now(), o.lease_duration) {
                Decision::Follow { holder, expires } => Ok(Err((holder, expires))),
                Decision::Renew(spec) | Decision::Acquire(spec) => {
                    let mut lease = current.clone().unwrap_or_else(|| Lease {
                        metadata: ObjectMeta {
                            name: Some(o.lease_name.clone()),
                            namespace: Some(o.namespace.clone()),
                            ..Default::default()
                        },
                        spec: None,
                    });
                    lease.spec = Some(spec);
                    // replace carries the resourceVersion we read: two candidates cannot
                    // both take an expired Lease.
                    if current.is_some() {
                        ctx.leases
                            .replace(&o.lease_name, &PostParams::default(), &lease)
                            .await?;
                    } else {
                        ctx.leases.create(&PostParams::default(), &lease).await?;
                    }
                    Ok(Ok(()))
                }
            }
        }
        .await;
        let was = self.leading;
        match result {
            Ok(Ok(())) => {
                self.leading = true;
                self.renewed = Some(Instant::now());
            }
            Ok(Err((holder, expires))) => {
                self.leading = false;
                debug!(%holder, %expires, "leaseHeldByOther");
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => {
                self.leading = false;
            }
            Err(e) => {
                warn!(error = %e, "leaseUpdateFailed");
                let valid = Duration::from_secs(o.lease_duration.max(1) as u64);
                if self.renewed.is_none_or(|t| t.elapsed() >= valid) {
                    self.leading = false;
                }
            }
        }
        if self.leading != was {
            if self.leading {
                info!(identity = %o.identity, lease = %o.lease_name, "leadershipAcquired");
            } else {
                warn!(identity = %o.identity, lease = %o.lease_name, "leadershipLost");
            }
        }
    }

    /// Hands the Lease back so another replica takes over at once.
    async fn release(&mut self, ctx: &Context) {
        let o = &ctx.options;
        let result = async {
            let Some(mut lease) = ctx.leases.get_opt(&o.lease_name).await? else {
                return Ok(());
            };
            if let Some(spec) = lease.spec.as_mut() {
                if spec.holder_identity.as_deref() == Some(o.identity.as_str()) {
                    spec.holder_identity = None;
                    spec.lease_duration_seconds = Some(1);
                    ctx.leases
                        .replace(&o.lease_name, &PostParams::default(), &lease)
                        .await?;
                }
            }
            Ok::<_, kube::Error>(())
        }
        .await;
        match result {
            Ok(()) => info!(lease = %o.lease_name, "leaseReleased"),
            Err(e) => warn!(error = %e, "leaseReleaseFailed"),
        }
        self.leading = false;
    }
}

/// What the controller remembers between passes.
#[derive(Default)]
struct Memory {
    /// Statuses written whose watch event has not arrived yet: key → (resourceVersion the
    /// store still shows, IPs written). Keeps the next pass from deciding twice.
    written: HashMap<String, (Option<String>, Vec<IpAddr>)>,
    /// Events recorded whose condition still holds: not recorded again while it does.
    recorded: BTreeSet<(String, &'static str, String)>,
    /// Our Services' ingress IPs at the last pass: a Service gone since released them.
    assigned: BTreeMap<String, Vec<IpAddr>>,
    /// What was last reported on each metallb.io object (kind, name): reported again only
    /// when it changes.
    metallb_reported: BTreeMap<metallb::MetallbRef, Vec<String>>,
}

/// One pass: read the stores, plan, write what differs.
async fn pass(ctx: &Context, stores: &Stores, memory: &mut Memory) {
    // Shared with the watch cache, not copied; only a Service whose status we wrote and whose
    // watch event has not come yet is copied, with that status.
    let mut services: Vec<(String, Arc<Service>)> = Vec::new();
    for s in stores.services.state() {
        let k = service_key(&s);
        let s = match memory.written.get(&k) {
            Some((rv, ips)) if *rv == s.resource_version() => {
                let mut written = (*s).clone();
                set_ingress(&mut written, ips);
                Arc::new(written)
            }
            Some(_) => {
                memory.written.remove(&k);
                s
            }
            None => s,
        };
        services.push((k, s));
    }
    services.sort_by(|a, b| a.0.cmp(&b.0));
    let (keys, services): (Vec<String>, Vec<Arc<Service>>) = services.into_iter().unzip();
    let index: HashMap<&str, &Service> = keys
        .iter()
        .map(String::as_str)
        .zip(services.iter().map(|s| &**s))
        .collect();
    memory.written.retain(|k, _| index.contains_key(k.as_str()));
    release_deleted(ctx, &index, memory);
    let namespace_labels: BTreeMap<String, BTreeMap<String, String>> = stores
        .namespaces
        .state()
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect();
    let mut objects = Objects {
        pools: watch::sorted(&stores.pools),
        l2_advertisements: watch::sorted(&stores.l2),
        peers: watch::sorted(&stores.peers),
        bgp_advertisements: watch::sorted(&stores.bgp_ads),
        bfd_profiles: watch::sorted(&stores.bfd),
    };
    let from_metallb = stores
        .metallb
        .as_ref()
        .map(|m| metallb::read(&m.objects()))
        .unwrap_or_default();
    objects.extend(from_metallb.objects.clone());
    let planning = Instant::now();
    let plan = reconcile::plan(
        &objects,
        &services,
        &namespace_labels,
        ctx.options.classless_is_ours,
    );
    let planned = planning.elapsed();

    {
        let mut status = ctx.status.lock().unwrap();
        status.pools = plan.pool_usage.clone();
        let count = |reason: &str| plan.events.iter().filter(|e| e.reason == reason).count() as u64;
        status.services_failing = count("AllocationFailed");
        status.addresses_out_of_pool = count("IPOutOfPool");
        status.invalid_objects = plan.validity.values().filter(|p| !p.is_empty()).count() as u64;
    }
    let writing = Instant::now();
    let failed_writes = write_statuses(ctx, &index, &plan, memory).await;
    record_events(ctx, &index, &plan, &failed_writes, memory).await;
    write_out_of_pool_conditions(ctx, &services, &plan).await;
    write_object_statuses(ctx, &objects, &plan).await;
    report_metallb(ctx, &from_metallb, &plan, memory).await;
    ctx.status.lock().unwrap().api_write_errors_total += failed_writes.len() as u64;
    if !plan.statuses.is_empty() {
        info!(
            services = services.len(),
            statuses = plan.statuses.len(),
            failed = failed_writes.len(),
            planned_ms = planned.as_secs_f64() * 1e3,
            written_ms = writing.elapsed().as_secs_f64() * 1e3,
            "passWritten"
        );
    }
}

/// MetalLB's objects get no status from Sluice (they are MetalLB's): what Sluice does not do
/// with one, or finds wrong in it, is logged and recorded as an Event on it, when that changes.
async fn report_metallb(ctx: &Context, read: &metallb::Read, plan: &Plan, memory: &mut Memory) {
    let Some(namespace) = ctx.options.metallb_namespace.as_deref() else {
        return;
    };
    let mut now: BTreeMap<metallb::MetallbRef, Vec<String>> = BTreeMap::new();
    for ((kind, name), problems) in &read.problems {
        let mut all = problems.clone();
        let kinds = [
            "IPAddressPool",
            "L2Advertisement",
            "BGPPeer",
            "BGPAdvertisement",
            "BFDProfile",
        ];
        if let Some(k) = kinds.into_iter().find(|k| k == kind) {
            all.extend(problems_of(plan, k, name.clone()).iter().cloned());
        }
        now.insert((kind.clone(), name.clone()), all);
    }
    for (at, problems) in &now {
        if memory.metallb_reported.get(at) == Some(problems) {
            continue;
        }
        let (kind, name) = at;
        let (api_version, uid) = read.origins.get(at).cloned().unwrap_or_default();
        let note = if problems.is_empty() {
            info!(kind = %kind, name = %name, "metallbObjectRead");
            format!("read by Sluice as it is ({api_version})")
        } else {
            warn!(kind = %kind, name = %name, problems = %problems.join("; "), "metallbObjectProblem");
            problems.join("; ")
        };
        let reference = ObjectReference {
            api_version: Some(api_version),
            kind: Some(kind.clone()),
            name: Some(name.clone()),
            namespace: Some(namespace.to_string()),
            uid,
            ..Default::default()
        };
        let event = Event {
            type_: if problems.is_empty() {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: if problems.is_empty() {
                "ReadBySluice"
            } else {
                "SluiceProblem"
            }
            .into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Read".into(),
            secondary: None,
        };
        let _ = ctx.events.send((event, reference));
    }
    ctx.status.lock().unwrap().invalid_objects +=
        now.values().filter(|p| !p.is_empty()).count() as u64;
    memory.metallb_reported = now;
}

/// A deleted Service's IPs are free once it leaves the store; there is no object left to
/// record an Event on, so this is logged and counted.
fn release_deleted(ctx: &Context, services: &HashMap<&str, &Service>, memory: &mut Memory) {
    let now: BTreeMap<String, Vec<IpAddr>> = services
        .iter()
        .map(|(k, s)| (k.to_string(), status_ips(s)))
        .filter(|(_, ips)| !ips.is_empty())
        .collect();
    for (service, ips) in &memory.assigned {
        if !services.contains_key(service.as_str()) {
            info!(%service, ips = ?ips, "ipReleased");
            ctx.status.lock().unwrap().releases_total += 1;
        }
    }
    memory.assigned = now;
}

fn set_ingress(service: &mut Service, ips: &[IpAddr]) {
    let status = service.status.get_or_insert_with(Default::default);
    let lb = status.load_balancer.get_or_insert_with(Default::default);
    lb.ingress = Some(
        ips.iter()
            .map(|ip| k8s_openapi::api::core::v1::LoadBalancerIngress {
                ip: Some(ip.to_string()),
                ip_mode: Some("VIP".into()),
                ..Default::default()
            })
            .collect(),
    );
}

/// The merge patch that sets a Service's ingress to exactly `ips`.
pub fn ingress_patch(ips: &[IpAddr]) -> Value {
    let ingress: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
        .collect();
    json!({"status": {"loadBalancer": {"ingress": ingress}}})
}

/// Writes the changed statuses, [`CONCURRENT_WRITES`] at a time under the write limit;
/// returns the keys whose write failed.
async fn write_statuses(
    ctx: &Context,
    services: &HashMap<&str, &Service>,
    plan: &Plan,
    memory: &mut Memory,
) -> BTreeSet<String> {
    let writes = plan
        .statuses
        .iter()
        .filter_map(|(k, ips)| services.get(k.as_str()).map(|s| (k, ips, *s)));
    let results: Vec<_> = futures::stream::iter(writes)
        .map(|(k, ips, service)| async move {
            ctx.limit.wait().await;
            let api: Api<Service> =
                Api::namespaced(ctx.client.clone(), &service.namespace().unwrap_or_default());
            let patch = Patch::Merge(ingress_patch(ips));
            let result = api
                .patch_status(&service.name_any(), &PatchParams::default(), &patch)
                .await;
            (k, ips, service.resource_version(), result.map(|_| ()))
        })
        .buffer_unordered(CONCURRENT_WRITES)
        .collect()
        .await;
    let mut failed = BTreeSet::new();
    for (k, ips, resource_version, result) in results {
        match result {
            Ok(()) => {
                info!(service = %k, ips = ?ips, "serviceStatusWritten");
                memory
                    .written
                    .insert(k.clone(), (resource_version, ips.clone()));
            }
            Err(e) => {
                warn!(service = %k, error = %e, "serviceStatusWriteFailed");
                failed.insert(k.clone());
            }
        }
    }
    failed
}

/// Records the plan's Events that are new: a condition that persists is recorded once.
/// Published in the background ([`events::publisher`]).
async fn record_events(
    ctx: &Context,
    services: &HashMap<&str, &Service>,
    plan: &Plan,
    failed_writes: &BTreeSet<String>,
    memory: &mut Memory,
) {
    let mut now_holding = BTreeSet::new();
    let mut new_events = Vec::new();
    for event in &plan.events {
        // An allocation or release that was not written did not happen.
        if failed_writes.contains(&event.service)
            && matches!(event.reason, "IPAllocated" | "IPReleased")
        {
            continue;
        }
        let id = (event.service.clone(), event.reason, event.message.clone());
        now_holding.insert(id.clone());
        if memory.recorded.contains(&id) {
            continue;
        }
        let Some(service) = services.get(event.service.as_str()) else {
            continue;
        };
        match event.reason {
            "IPAllocated" => {
                info!(service = %event.service, detail = %event.message, "ipAllocated")
            }
            "IPReleased" => {
                info!(service = %event.service, detail = %event.message, "ipReleased")
            }
            _ => {
                warn!(service = %event.service, reason = event.reason, detail = %event.message, "serviceWarning")
            }
        }
        {
            let mut status = ctx.status.lock().unwrap();
            match event.reason {
                "IPAllocated" => status.allocations_total += 1,
                "IPReleased" => status.releases_total += 1,
                "AllocationFailed" => status.allocation_failures_total += 1,
                _ => {}
            }
        }
        new_events.push((event, service.object_ref(&())));
    }
    for (event, reference) in new_events {
        let event = Event {
            type_: if event.type_ == "Warning" {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: event.reason.to_string(),
            note: Some(event.message.clone()),
            action: match event.reason {
                "IPReleased" => "Release",
                _ => "Allocate",
            }
            .into(),
            secondary: None,
        };
        let _ = ctx.events.send((event, reference));
    }
    memory.recorded = now_holding;
}

/// The Service condition that says an IP it keeps is in no pool any more.
pub const OUT_OF_POOL: &str = "sluice.dev/IPOutOfPool";

/// A Service's conditions with [`OUT_OF_POOL`] made to say `warning` (`None`: all its IPs are in
/// pools); `None` when nothing changes. Other conditions are kept as they are. A Service that
/// never had the condition and needs none is left alone.
pub fn out_of_pool_conditions(
    current: &[Condition],
    warning: Option<&str>,
    now: Time,
) -> Option<Vec<Condition>> {
    let existing = current.iter().find(|c| c.type_ == OUT_OF_POOL);
    let wanted = match (warning, existing) {
        (None, None) => return None,
        (Some(message), _) => Condition {
            type_: OUT_OF_POOL.into(),
            status: "True".into(),
            reason: "PoolChanged".into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: now,
        },
        (None, Some(_)) => Condition {
            type_: OUT_OF_POOL.into(),
            status: "False".into(),
            reason: "InPool".into(),
            message: "every IP is in a pool".into(),
            observed_generation: None,
            last_transition_time: now,
        },
    };
    match existing {
        Some(c) if c.status == wanted.status && c.message == wanted.message => None,
        _ => {
            let mut out: Vec<Condition> = current
                .iter()
                .filter(|c| c.type_ != OUT_OF_POOL)
                .cloned()
                .collect();
            let mut wanted = wanted;
            if let Some(c) = existing.filter(|c| c.status == wanted.status) {
                wanted.last_transition_time = c.last_transition_time.clone();
            }
            out.push(wanted);
            Some(out)
        }
    }
}

/// Marks Services that keep an IP no pool holds (and clears the mark when that is over).
async fn write_out_of_pool_conditions(ctx: &Context, services: &[Arc<Service>], plan: &Plan) {
    let mut warnings: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in plan.events.iter().filter(|e| e.reason == "IPOutOfPool") {
        warnings.entry(&e.service).or_default().push(&e.message);
    }
    for service in services {
        let k = service_key(service);
        let warning = warnings.get(k.as_str()).map(|m| m.join("; "));
        let current = service
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let Some(conditions) =
            out_of_pool_conditions(&current, warning.as_deref(), Time(Timestamp::now()))
        else {
            continue;
        };
        let api: Api<Service> =
            Api::namespaced(ctx.client.clone(), &service.namespace().unwrap_or_default());
        // The resourceVersion makes this a compare-and-swap: the list replaces the whole of
        // status.conditions, so it must be built from the latest one.
        let body = json!({
            "metadata": {"resourceVersion": service.resource_version()},
            "status": {"conditions": conditions},
        });
        ctx.limit.wait().await;
        match api
            .patch_status(
                &service.name_any(),
                &PatchParams::default(),
                &Patch::Merge(body),
            )
            .await
        {
            Ok(_) => debug!(service = %k, "serviceConditionWritten"),
            Err(e) => {
                debug!(service = %k, error = %e, "serviceConditionWriteFailed");
                ctx.status.lock().unwrap().api_write_errors_total += 1;
            }
        }
    }
}

/// The `Valid` condition to write, keeping the transition time when the verdict is unchanged;
/// `None` when the current one already says the same.
fn next_condition(
    current: &[Condition],
    problems: &[String],
    generation: Option<i64>,
) -> Option<Condition> {
    let mut wanted = validity::valid_condition(problems, generation, Time(Timestamp::now()));
    match current.iter().find(|c| c.type_ == "Valid") {
        Some(c)
            if c.status == wanted.status
                && c.reason == wanted.reason
                && c.message == wanted.message
                && c.observed_generation == wanted.observed_generation =>
        {
            None
        }
        Some(c) if c.status == wanted.status => {
            wanted.last_transition_time = c.last_transition_time.clone();
            Some(wanted)
        }
        _ => Some(wanted),
    }
}

fn problems_of<'a>(plan: &'a Plan, kind: &'static str, name: String) -> &'a [String] {
    plan.validity
        .get(&ObjectRef { kind, name })
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Writes each object's `Valid` condition (and a pool's usage) where it changed.
async fn write_object_statuses(ctx: &Context, objects: &Objects, plan: &Plan) {
    let ns = ctx.options.namespace.as_str();
    let pools: Api<IPAddressPool> = Api::namespaced(ctx.client.clone(), ns);
    for pool in objects
        .pools
        .iter()
        .filter(|p| !metallb::is_from_metallb(&p.metadata))
    {
        let problems = problems_of(plan, "IPAddressPool", pool.name_any());
        let current = pool.status.clone().unwrap_or_default();
        let usage = plan.pool_usage.get(&pool.name_any());
        let condition = next_condition(&current.conditions, problems, pool.metadata.generation);
        let usage_changed = usage.map(|u| u.0) != current.addresses_total
            || usage.map(|u| u.1) != current.addresses_in_use;
        if condition.is_none() && !usage_changed {
            continue;
        }
        let conditions = condition.map(|c| vec![c]).unwrap_or(current.conditions);
        let body = json!({"status": {
            "conditions": conditions,
            "addressesTotal": usage.map(|u| u.0),
            "addressesInUse": usage.map(|u| u.1),
        }});
        patch_object_status(ctx, &pools, &pool.name_any(), body).await;
    }
    write_conditions(
        ctx,
        "L2Advertisement",
        &objects.l2_advertisements,
        plan,
        |o| o.status.as_ref().map(|s| s.conditions.clone()),
    )
    .await;
    write_conditions(ctx, "BGPPeer", &objects.peers, plan, |o| {
        o.status.as_ref().map(|s| s.conditions.clone())
    })
    .await;
    write_conditions(
        ctx,
        "BGPAdvertisement",
        &objects.bgp_advertisements,
        plan,
        |o| o.status.as_ref().map(|s| s.conditions.clone()),
    )
    .await;
    write_conditions(ctx, "BFDProfile", &objects.bfd_profiles, plan, |o| {
        o.status.as_ref().map(|s| s.conditions.clone())
    })
    .await;
}

async fn write_conditions<K>(
    ctx: &Context,
    kind: &'static str,
    objects: &[K],
    plan: &Plan,
    conditions: impl Fn(&K) -> Option<Vec<Condition>>,
) where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ctx.options.namespace);
    for object in objects
        .iter()
        .filter(|o| !metallb::is_from_metallb(o.meta()))
    {
        let problems = problems_of(plan, kind, object.name_any());
        let current = conditions(object).unwrap_or_default();
        if let Some(c) = next_condition(&current, problems, object.meta().generation) {
            let body = json!({"status": {"conditions": [c]}});
            patch_object_status(ctx, &api, &object.name_any(), body).await;
        }
    }
}

async fn patch_object_status<K>(ctx: &Context, api: &Api<K>, name: &str, body: Value)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let kind = K::kind(&());
    ctx.limit.wait().await;
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(body))
        .await
    {
        Ok(_) => debug!(kind = %kind, name, "objectStatusWritten"),
        Err(e) => {
            warn!(kind = %kind, name, error = %e, "objectStatusWriteFailed");
            ctx.status.lock().unwrap().api_write_errors_total += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ingress_patch_states_every_ip_and_an_empty_list_on_release() {
        let ips: Vec<IpAddr> = vec![
            "198.51.100.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        assert_eq!(
            ingress_patch(&ips),
            json!({"status": {"loadBalancer": {"ingress": [
                {"ip": "198.51.100.1", "ipMode": "VIP"},
                {"ip": "2001:db8::1", "ipMode": "VIP"},
            ]}}})
        );
        assert_eq!(
            ingress_patch(&[]),
            json!({"status": {"loadBalancer": {"ingress": []}}})
        );
    }

    #[test]
    fn the_out_of_pool_condition_appears_clears_and_leaves_other_conditions_alone() {
        let t0 = Time(Timestamp::UNIX_EPOCH);
        let t1 = Time(Timestamp::from_second(60).unwrap());
        assert_eq!(out_of_pool_conditions(&[], None, t0.clone()), None);
        let other = Condition {
            type_: "example.com/Other".into(),
            status: "True".into(),
            reason: "X".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: t0.clone(),
        };
        let set = out_of_pool_conditions(
            std::slice::from_ref(&other),
            Some("198.51.100.5 is in no pool"),
            t0.clone(),
        )
        .unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set[0], other);
        assert_eq!(
            (set[1].type_.as_str(), set[1].status.as_str()),
            (OUT_OF_POOL, "True")
        );
        assert_eq!(
            out_of_pool_conditions(&set, Some("198.51.100.5 is in no pool"), t1.clone()),
            None
        );
        let cleared = out_of_pool_conditions(&set, None, t1.clone()).unwrap();
        assert_eq!(
            (cleared[1].status.as_str(), cleared[1].reason.as_str()),
            ("False", "InPool")
        );
        assert_eq!(cleared[1].last_transition_time, t1);
        assert_eq!(out_of_pool_conditions(&cleared, None, t1), None);
    }

    #[test]
    fn an_unchanged_verdict_is_not_rewritten_and_a_changed_message_keeps_the_transition_time() {
        let written =
            validity::valid_condition(&["spec.x: y".into()], Some(2), Time(Timestamp::UNIX_EPOCH));
        assert_eq!(
            next_condition(
                std::slice::from_ref(&written),
                &["spec.x: y".into()],
                Some(2)
            ),
            None
        );
        let changed = next_condition(
            std::slice::from_ref(&written),
            &["spec.z: w".into()],
            Some(3),
        )
        .unwrap();
        assert_eq!(changed.message, "spec.z: w");
        assert_eq!(changed.last_transition_time, written.last_transition_time);
        let healed = next_condition(std::slice::from_ref(&written), &[], Some(3)).unwrap();
        assert_eq!(healed.status, "True");
        assert_ne!(healed.last_transition_time, written.last_transition_time);
        assert_eq!(next_condition(&[], &[], Some(1)).unwrap().status, "True");
    }
}
