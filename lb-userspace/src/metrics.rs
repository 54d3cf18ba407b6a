//! The daemon's status and its HTTP endpoint: /metrics (OpenMetrics text, encoded by the
//! Prometheus project's `prometheus-client`), /healthz and /readyz. Traffic counters are read from the pinned maps at scrape time; everything else comes
//! from the shared [`Status`] the daemon keeps up to date. Rendering is pure.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{PinnedView, ServiceStats},
    ipam::PoolUsage,
};

/// One backend's health, as the daemon last decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    pub service: String,
    /// "ip:port" (the probe target).
    pub backend: String,
    pub healthy: bool,
}

/// What the daemon knows that the maps do not.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// The data plane is loaded and serving the configuration.
    pub ready: bool,
    /// The error of the last reload, when it failed.
    pub last_reload_error: Option<String>,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    /// service name → "ip" and the service's VIP:port/proto keys.
    pub services: Vec<(String, String, Vec<String>)>,
    pub pools: Vec<(String, u64, f64)>,
    pub health: Vec<BackendHealth>,
    #[serde(default)]
    pub bgp: Vec<BgpSessionStatus>,
    /// Why the process is not ready although it runs (e.g. the speaker cannot write its Lease).
    #[serde(default)]
    pub not_ready_reason: Option<String>,
    /// The speaker's mesh is running.
    #[serde(default)]
    pub mesh_enabled: bool,
    #[serde(default)]
    pub mesh: MeshStatus,
    #[serde(default)]
    pub bfd: BfdStatus,
}

/// BFD with the BGP peers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BfdStatus {
    pub sessions: Vec<BfdSessionStatus>,
    /// Packets dropped, by reason (`bfd::packet::Drop`).
    pub dropped: std::collections::BTreeMap<String, u64>,
}

/// One BFD session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BfdSessionStatus {
    pub peer: String,
    pub profile: String,
    pub multihop: bool,
    /// AdminDown, Down, Init or Up.
    pub state: String,
    pub remote_state: String,
    /// Why the session last left Up ("none" when it never did).
    pub last_down_reason: String,
    pub since_seconds: f64,
    pub detection_time_ms: u64,
    pub transmit_interval_ms: u64,
    pub local_discriminator: u32,
    pub remote_discriminator: u32,
    /// Transitions so far: (to state, reason, count).
    pub transitions: Vec<(String, String, u64)>,
    pub error: Option<String>,
}

impl BfdSessionStatus {
    pub fn from_view(peer: std::net::IpAddr, v: &crate::bfd::agent::View) -> Self {
        Self {
            peer: peer.to_string(),
            profile: v.profile.clone(),
            multihop: v.multihop,
            state: v.state.name().to_string(),
            remote_state: v.remote_state.name().to_string(),
            last_down_reason: v.diag.reason().to_string(),
            since_seconds: v.since.elapsed().unwrap_or_default().as_secs_f64(),
            detection_time_ms: v.detection_time.as_millis() as u64,
            transmit_interval_ms: v.transmit_interval.as_millis() as u64,
            local_discriminator: v.local_discriminator,
            remote_discriminator: v.remote_discriminator,
            transitions: v
                .transitions
                .iter()
                .map(|((to, reason), n)| (to.to_string(), reason.to_string(), *n))
                .collect(),
            error: v.error.clone(),
        }
    }
}

/// The speaker mesh as this node sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    pub members: Vec<MeshMemberStatus>,
    /// Datagrams dropped, by reason.
    pub dropped: std::collections::BTreeMap<String, u64>,
    pub received: u64,
    pub sent: u64,
}

/// One other speaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshMemberStatus {
    pub node: String,
    pub address: String,
    /// alive, suspect or down.
    pub state: String,
    /// Counted alive by the election (active, or restarting within its grace).
    pub counted_alive: bool,
    pub since_seconds: f64,
    pub last_heard_seconds_ago: Option<f64>,
    /// For a member declared down: how long after its last message.
    pub noticed_after_seconds: Option<f64>,
}

impl MeshStatus {
    pub fn from_view(view: &crate::mesh::MeshView) -> Self {
        let now = std::time::Instant::now();
        Self {
            members: view
                .members
                .iter()
                .map(|(node, m)| MeshMemberStatus {
                    node: node.clone(),
                    address: m.addr.to_string(),
                    state: m.state.as_str().to_string(),
                    counted_alive: m.counts_alive(now),
                    since_seconds: now.saturating_duration_since(m.since).as_secs_f64(),
                    last_heard_seconds_ago: m
                        .last_heard
                        .map(|t| now.saturating_duration_since(t).as_secs_f64()),
                    noticed_after_seconds: m.noticed_after.map(|d| d.as_secs_f64()),
                })
                .collect(),
            dropped: view
                .dropped
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            received: view.received,
            sent: view.sent,
        }
    }
}

impl Status {
    /// The name of the service that owns this `VIP:port/proto` key.
    pub fn service_name(&self, key: &str) -> Option<String> {
        self.services
            .iter()
            .find(|(_, _, keys)| keys.iter().any(|k| k == key))
            .map(|(n, _, _)| n.clone())
    }
}

/// One BGP session, as the daemon last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpSessionStatus {
    pub peer: String,
    pub state: String,
    /// Seconds since the session came up, when it is up.
    pub uptime_seconds: Option<u64>,
    pub prefixes_sent: usize,
    pub updates_sent: u64,
    pub updates_received: u64,
    pub notifications: u64,
    pub last_error: Option<String>,
}

impl Status {
    pub fn set_pools(&mut self, usage: &[PoolUsage]) {
        self.pools = usage
            .iter()
            .map(|u| (u.pool.clone(), u.in_use, u.total))
            .collect();
    }
}

pub type SharedStatus = Arc<Mutex<Status>>;

/// Escapes a label value for the text format (backslash, double quote, newline), which
/// prometheus-client leaves to the caller.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample's value: counters are whole, gauges whole or not.
#[derive(Debug, Clone, Copy)]
enum Value {
    Whole(u64),
    Real(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Whole(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        u64::try_from(v).map_or(Value::Real(v as f64), Value::Whole)
    }
}

impl Value {
    /// A count kept as a float because it may exceed 2^64 (an IPv6 pool's addresses): whole
    /// while it is exactly one.
    fn count(v: f64) -> Self {
        if v >= 0.0 && v.fract() == 0.0 && v < 9.0e15 {
            Value::Whole(v as u64)
        } else {
            Value::Real(v)
        }
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Whole(v as u64)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Whole(u64::from(v))
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric family of a scrape, its samples in the order they were added.
#[derive(Debug)]
struct MetricFamily {
    /// The name as users query it (counters end in `_total`).
    name: &'static str,
    help: &'static str,
    counter: bool,
    samples: Vec<(Labels, Value)>,
}

impl MetricFamily {
    /// Adds a sample; label values are escaped here.
    fn sample(&mut self, labels: &[(&'static str, &str)], value: impl Into<Value>) -> &mut Self {
        let labels = labels.iter().map(|(k, v)| (*k, escape(v))).collect();
        self.samples.push((labels, value.into()));
        self
    }
}

/// What one scrape shows: families built from a snapshot, encoded by prometheus-client
/// (OpenMetrics text: HELP and TYPE per family, counters' `_total`, `# EOF`).
#[derive(Debug, Default)]
struct Exposition {
    families: Vec<MetricFamily>,
}

impl Exposition {
    fn counter(&mut self, name: &'static str, help: &'static str) -> &mut MetricFamily {
        self.family(name, help, true)
    }

    fn gauge(&mut self, name: &'static str, help: &'static str) -> &mut MetricFamily {
        self.family(name, help, false)
    }

    fn family(
        &mut self,
        name: &'static str,
        help: &'static str,
        counter: bool,
    ) -> &mut MetricFamily {
        self.families.push(MetricFamily {
            name,
            help,
            counter,
            samples: Vec::new(),
        });
        self.families.last_mut().expect("just pushed")
    }

    /// The OpenMetrics text of every family.
    fn render(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

impl prometheus_client::collector::Collector for Exposition {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
        };
        for f in &self.families {
            let (name, kind) = if f.counter {
                (
                    f.name.strip_suffix("_total").unwrap_or(f.name),
                    MetricType::Counter,
                )
            } else {
                (f.name, MetricType::Gauge)
            };
            let mut metric = encoder.encode_descriptor(name, f.help, None, kind)?;
            let encode =
                |m: prometheus_client::encoding::MetricEncoder, v: Value| match (f.counter, v) {
                    (true, Value::Whole(n)) => ConstCounter::new(n).encode(m),
                    (true, Value::Real(x)) => ConstCounter::new(x).encode(m),
                    (false, Value::Whole(n)) => ConstGauge::new(n as i64).encode(m),
                    (false, Value::Real(x)) => ConstGauge::new(x).encode(m),
                };
            match f.samples.as_slice() {
                [(labels, v)] if labels.is_empty() => encode(metric, *v)?,
                samples => {
                    for (labels, v) in samples {
                        encode(metric.encode_family(labels)?, *v)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The content type of the exposition /metrics serves.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders every metric: traffic from the maps (when readable), state from `status`.
pub fn render(
    status: &Status,
    services: &[ServiceStats],
    global: Option<&lb_common::GlobalStats>,
    flows: Option<crate::dataplane::flows::FlowCensus>,
    flood: Option<&crate::dataplane::FloodStats>,
    tunnels: &[crate::dataplane::TunnelTraffic],
) -> String {
    let mut m = Exposition::default();
    let name_of = |key: &str| status.service_name(key).unwrap_or_default();
    for (metric, help, pick) in [
        (
            "sluice_service_packets_total",
            "Packets balanced, per service.",
            0,
        ),
        (
            "sluice_service_bytes_total",
            "Bytes balanced, per service.",
            1,
        ),
        ("sluice_service_flows_total", "New flows, per service.", 2),
    ] {
        let f = m.counter(metric, help);
        for s in services {
            let key = s.service.to_string();
            let v = [s.traffic.packets, s.traffic.bytes, s.traffic.new_flows][pick];
            f.sample(&[("name", &name_of(&key)), ("service", &key)], v);
        }
    }
    for (metric, help, pick) in [
        (
            "sluice_backend_packets_total",
            "Packets sent to a backend.",
            0,
        ),
        ("sluice_backend_bytes_total", "Bytes sent to a backend.", 1),
        (
            "sluice_backend_flows_total",
            "New flows given to a backend.",
            2,
        ),
    ] {
        let f = m.counter(metric, help);
        for s in services {
            let key = s.service.to_string();
            for (b, t) in &s.backends {
                let v = [t.packets, t.bytes, t.new_flows][pick];
                f.sample(
                    &[
                        ("name", &name_of(&key)),
                        ("service", &key),
                        ("backend", &b.maglev_key()),
                    ],
                    v,
                );
            }
        }
    }
    let f = m.gauge(
        "sluice_backend_healthy",
        "1 when the backend passes its health check (it is in the Maglev table).",
    );
    for h in &status.health {
        f.sample(&[("name", &h.service), ("backend", &h.backend)], h.healthy);
    }
    let f = m.gauge(
        "sluice_allocator_addresses_in_use_total",
        "Addresses of a pool allocated to services.",
    );
    for (pool, in_use, _) in &status.pools {
        f.sample(&[("pool", pool)], *in_use);
    }
    let f = m.gauge(
        "sluice_allocator_addresses_total",
        "Usable addresses of a pool.",
    );
    for (pool, _, total) in &status.pools {
        f.sample(&[("pool", pool)], Value::count(*total));
    }
    m.counter(
        "sluice_config_reloads_total",
        "Configuration reloads, by result.",
    )
    .sample(&[("result", "success")], status.reloads_succeeded)
    .sample(&[("result", "failure")], status.reloads_failed);
    m.gauge(
        "sluice_config_last_reload_successful",
        "1 when the last reload was applied, 0 when it was rejected.",
    )
    .sample(&[], status.last_reload_error.is_none());
    let f = m.gauge(
        "sluice_bgp_session_up",
        "1 when the BGP session with the peer is Established.",
    );
    for b in &status.bgp {
        f.sample(&[("peer", &b.peer)], b.state == "Established");
    }
    for (metric, help, pick) in [
        (
            "sluice_bgp_updates_sent_total",
            "UPDATE messages sent to the peer.",
            0,
        ),
        (
            "sluice_bgp_updates_received_total",
            "UPDATE messages received (read, never installed).",
            1,
        ),
        (
            "sluice_bgp_notifications_received_total",
            "NOTIFICATION messages received.",
            2,
        ),
    ] {
        let f = m.counter(metric, help);
        for b in &status.bgp {
            let v = [b.updates_sent, b.updates_received, b.notifications][pick];
            f.sample(&[("peer", &b.peer)], v);
        }
    }
    let f = m.gauge(
        "sluice_bgp_prefixes_sent",
        "Prefixes announced to the peer now.",
    );
    for b in &status.bgp {
        f.sample(&[("peer", &b.peer)], b.prefixes_sent);
    }
    if let Some(g) = global {
        let f = m.counter(
            "sluice_packets_total",
            "Packets seen by the XDP program, by outcome.",
        );
        for (outcome, v) in [
            ("arp_reply", g.arp_replies),
            ("na_reply", g.na_replies),
            ("passed", g.passed),
            ("malformed", g.malformed),
            ("forwarded", g.lb_forwarded),
            ("forwarded_via_kernel", g.lb_to_kernel),
            ("dropped_no_backend", g.lb_no_backend),
            ("reverse_nat", g.reverse_nat),
            ("icmp_error_to_backend", g.icmp_to_backend),
            ("icmp_error_to_client", g.icmp_to_client),
            ("icmp_error_unmatched", g.icmp_unmatched),
            ("tunnelled", g.tunnel_out),
            ("dropped_tunnel_forged", g.tunnel_forged),
            ("dropped_tunnel_mismatch", g.tunnel_mismatch),
            ("tunnel_too_big", g.tunnel_too_big),
        ] {
            f.sample(&[("outcome", outcome)], v);
        }
    }
    render_mesh(&mut m, status);
    render_bfd(&mut m, &status.bfd);
    if let Some(census) = flows {
        m.gauge("sluice_tracked_flows", "Flows in the connection table.")
            .sample(&[], census.total());
        m.gauge(
            "sluice_tracked_flows_by_state",
            "Flows in the connection table by state: open, half_closed (one side sent a FIN), closed (both did; removed after a grace period).",
        )
        .sample(&[("state", "open")], census.open)
        .sample(&[("state", "half_closed")], census.half_closed)
        .sample(&[("state", "closed")], census.closed);
        m.counter(
            "sluice_closed_flows_removed_total",
            "Flows closed from both sides that this process removed from the connection table.",
        )
        .sample(&[], crate::dataplane::flows::removed_total());
    }
    if !tunnels.is_empty() {
        for (metric, help, pick) in [
            (
                "sluice_tunnel_packets_total",
                "Packets tunnelled between this node and another (cluster-wide balancing), by direction: in (from that node, to this node's endpoints), out (to that node's endpoints).",
                (|t: &crate::dataplane::TunnelTraffic| (t.in_packets, t.out_packets))
                    as fn(&crate::dataplane::TunnelTraffic) -> (u64, u64),
            ),
            (
                "sluice_tunnel_bytes_total",
                "Bytes tunnelled between this node and another, by direction (in: outer headers included; out: the packets as the clients sent them).",
                |t| (t.in_bytes, t.out_bytes),
            ),
        ] {
            let f = m.counter(metric, help);
            for t in tunnels {
                let node = t.node.map(|n| n.to_string()).unwrap_or_default();
                let (i, o) = pick(t);
                f.sample(&[("node", &node), ("direction", "in")], i)
                    .sample(&[("node", &node), ("direction", "out")], o);
            }
        }
    }
    if let Some(fl) = flood {
        m.counter(
            "sluice_flood_guard_untracked_flows_total",
            "New flows balanced but not tracked: over the flood guard's limit per CPU and second.",
        )
        .sample(&[], fl.untracked);
        m.counter(
            "sluice_flood_guard_activations_total",
            "Seconds (per CPU) in which new flows reached the flood guard's limit.",
        )
        .sample(&[], fl.activations);
    }
    m.render()
}

fn render_bfd(m: &mut Exposition, bfd: &BfdStatus) {
    if bfd.sessions.is_empty() && bfd.dropped.is_empty() {
        return;
    }
    let f = m.gauge(
        "sluice_bfd_session_up",
        "1 while the BFD session with the peer is Up.",
    );
    for s in &bfd.sessions {
        f.sample(
            &[("peer", &s.peer), ("profile", &s.profile)],
            s.state == "Up",
        );
    }
    let f = m.gauge(
        "sluice_bfd_session_state",
        "The BFD session's state: 0 AdminDown, 1 Down, 2 Init, 3 Up (RFC 5880).",
    );
    for s in &bfd.sessions {
        let code: u64 = match s.state.as_str() {
            "AdminDown" => 0,
            "Down" => 1,
            "Init" => 2,
            _ => 3,
        };
        f.sample(&[("peer", &s.peer)], code);
    }
    let f = m.gauge(
        "sluice_bfd_detection_time_seconds",
        "How long the peer may stay silent before the session goes down.",
    );
    for s in &bfd.sessions {
        f.sample(&[("peer", &s.peer)], s.detection_time_ms as f64 / 1000.0);
    }
    let f = m.counter(
        "sluice_bfd_transitions_total",
        "BFD session state changes, by new state and reason.",
    );
    for s in &bfd.sessions {
        for (to, reason, n) in &s.transitions {
            f.sample(&[("peer", &s.peer), ("to", to), ("reason", reason)], *n);
        }
    }
    let f = m.counter(
        "sluice_bfd_packets_dropped_total",
        "BFD packets dropped (bad length, version, discriminator, TTL, authentication, unknown session).",
    );
    for reason in crate::bfd::packet::Drop::ALL {
        let label = reason.label();
        f.sample(
            &[("reason", label)],
            bfd.dropped.get(label).copied().unwrap_or(0),
        );
    }
}

fn render_mesh(m: &mut Exposition, status: &Status) {
    if !status.mesh_enabled {
        return;
    }
    let mesh = &status.mesh;
    let f = m.gauge(
        "sluice_mesh_member_alive",
        "1 while the other speaker counts alive (mesh state alive or suspect, or restarting within its grace).",
    );
    for s in &mesh.members {
        f.sample(&[("node", &s.node), ("state", &s.state)], s.counted_alive);
    }
    let f = m.gauge(
        "sluice_mesh_failure_detection_seconds",
        "For a speaker declared down: seconds from its last message to the verdict.",
    );
    for s in &mesh.members {
        if let Some(secs) = s.noticed_after_seconds {
            f.sample(&[("node", &s.node)], secs);
        }
    }
    m.counter(
        "sluice_mesh_datagrams_received_total",
        "Mesh datagrams accepted.",
    )
    .sample(&[], mesh.received);
    m.counter("sluice_mesh_datagrams_sent_total", "Mesh datagrams sent.")
        .sample(&[], mesh.sent);
    let f = m.counter(
        "sluice_mesh_datagrams_dropped_total",
        "Mesh datagrams dropped (wrong key, truncated, garbled, replayed, stale, unknown node).",
    );
    for reason in [
        "truncated",
        "bad_magic",
        "bad_tag",
        "unknown_node",
        "stale",
        "replayed",
        "unknown_kind",
    ] {
        f.sample(
            &[("reason", reason)],
            mesh.dropped.get(reason).copied().unwrap_or(0),
        );
    }
}

/// What /readyz answers for the daemon's (or the speaker's) status.
pub fn readiness(s: &Status) -> (u16, String) {
    match (&s.not_ready_reason, s.ready, &s.last_reload_error) {
        (Some(reason), _, _) => (503, format!("not ready: {reason}\n")),
        (None, false, _) => (503, "not ready: the data plane is not serving yet\n".into()),
        (None, true, None) => (200, "ready\n".to_string()),
        (None, true, Some(e)) => (
            503,
            format!("the last reload failed (the previous configuration keeps serving):\n{e}\n"),
        ),
    }
}

/// Serves /healthz, /readyz and /metrics on `address` from a thread of its own; `readyz` and
/// `metrics` answer at request time.
fn serve_endpoints(
    address: SocketAddr,
    readyz: impl Fn() -> (u16, String) + Send + 'static,
    metrics: impl Fn() -> String + Send + 'static,
) -> std::io::Result<()> {
    let server = tiny_http::Server::http(address).map_err(std::io::Error::other)?;
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let (code, body) = match request.url() {
                "/healthz" => (200, "ok\n".to_string()),
                "/readyz" => readyz(),
                "/metrics" => (200, metrics()),
                _ => (404, "not found: try /metrics, /healthz or /readyz\n".into()),
            };
            let kind = if request.url() == "/metrics" {
                CONTENT_TYPE
            } else {
                "text/plain; charset=utf-8"
            };
            let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], kind.as_bytes())
                .expect("a valid header");
            let response = tiny_http::Response::from_string(body)
                .with_status_code(code)
                .with_header(header);
            let _ = request.respond(response);
        }
    });
    Ok(())
}

/// Serves the daemon's (or the speaker's) /metrics, /healthz and /readyz. Traffic counters
/// come from the maps pinned in `pin_dir` at scrape time.
pub fn serve(address: SocketAddr, status: SharedStatus, pin_dir: PathBuf) -> std::io::Result<()> {
    let ready = status.clone();
    serve_endpoints(
        address,
        move || readiness(&ready.lock().unwrap()),
        move || {
            let s = status.lock().unwrap().clone();
            let view = PinnedView::open(&pin_dir).ok();
            let services = view
                .as_ref()
                .and_then(|v| v.services().ok())
                .unwrap_or_default();
            let global = view.as_ref().and_then(|v| v.stats().ok());
            let flows = view.as_ref().map(|v| v.flow_census());
            let flood = view.as_ref().and_then(|v| v.flood_stats());
            let peers = view
                .as_ref()
                .and_then(|v| v.tunnel_peers().ok())
                .unwrap_or_default();
            let tunnels = crate::dataplane::traffic_by_node(&services, &peers);
            render(
                &s,
                &services,
                global.as_ref(),
                flows,
                flood.as_ref(),
                &tunnels,
            )
        },
    )
}

/// What the controller's /metrics and /readyz report (the controller fills it in).
#[derive(Debug, Clone, Default)]
pub struct ControllerStatus {
    /// Every watch has listed once.
    pub synced: bool,
    pub leader: bool,
    /// Per pool: (addresses total, addresses in use).
    pub pools: std::collections::BTreeMap<String, (i64, i64)>,
    pub allocations_total: u64,
    pub allocation_failures_total: u64,
    pub releases_total: u64,
    /// Services whose request cannot be met right now.
    pub services_failing: u64,
    /// Addresses kept by Services although no pool holds them any more.
    pub addresses_out_of_pool: u64,
    /// Sluice objects with `Valid=False`.
    pub invalid_objects: u64,
    pub api_write_errors_total: u64,
}

pub type SharedControllerStatus = std::sync::Arc<std::sync::Mutex<ControllerStatus>>;

/// Renders the controller's metrics (OpenMetrics text).
pub fn render_controller(status: &ControllerStatus) -> String {
    let mut m = Exposition::default();
    m.gauge(
        "sluice_controller_leader",
        "1 while this replica holds the Lease.",
    )
    .sample(&[], status.leader);
    m.gauge("sluice_controller_synced", "1 once every watch has listed.")
        .sample(&[], status.synced);
    let f = m.gauge("sluice_pool_addresses_total", "Addresses in the pool.");
    for (pool, (total, _)) in &status.pools {
        f.sample(&[("pool", pool)], *total);
    }
    let f = m.gauge(
        "sluice_pool_addresses_in_use",
        "Addresses of the pool given to Services.",
    );
    for (pool, (_, in_use)) in &status.pools {
        f.sample(&[("pool", pool)], *in_use);
    }
    for (name, help, value) in [
        (
            "sluice_allocations_total",
            "Services given IPs (IPAllocated Events).",
            status.allocations_total,
        ),
        (
            "sluice_allocation_failures_total",
            "Allocation failures recorded (AllocationFailed Events).",
            status.allocation_failures_total,
        ),
        (
            "sluice_releases_total",
            "Services whose IPs were released (IPReleased Events).",
            status.releases_total,
        ),
        (
            "sluice_api_write_errors_total",
            "Writes to the Kubernetes API that failed (retried on the next pass).",
            status.api_write_errors_total,
        ),
    ] {
        m.counter(name, help).sample(&[], value);
    }
    for (name, help, value) in [
        (
            "sluice_services_failing",
            "Services whose request cannot be met right now.",
            status.services_failing,
        ),
        (
            "sluice_addresses_out_of_pool",
            "Addresses Services keep although no pool holds them any more.",
            status.addresses_out_of_pool,
        ),
        (
            "sluice_invalid_objects",
            "Sluice objects with Valid=False.",
            status.invalid_objects,
        ),
    ] {
        m.gauge(name, help).sample(&[], value);
    }
    m.render()
}

/// Serves the controller's /metrics, /healthz and /readyz (ready once every watch has listed).
pub fn serve_controller(
    address: SocketAddr,
    status: SharedControllerStatus,
) -> std::io::Result<()> {
    let ready = status.clone();
    serve_endpoints(
        address,
        move || {
            if ready.lock().unwrap().synced {
                (200, "ready\n".to_string())
            } else {
                (
                    503,
                    "not ready: the watches have not listed yet\n".to_string(),
                )
            }
        },
        move || render_controller(&status.lock().unwrap()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{Backend, Protocol, Service};
    use lb_common::TrafficStats;

    #[test]
    fn readiness_names_why_it_is_not_ready_first_then_serving_then_the_last_reload() {
        let mut s = Status::default();
        assert!(readiness(&s).0 == 503 && readiness(&s).1.contains("not serving yet"));
        s.ready = true;
        assert_eq!(readiness(&s), (200, "ready\n".to_string()));
        s.last_reload_error = Some("pools[0]: bad".into());
        assert!(readiness(&s).0 == 503 && readiness(&s).1.contains("pools[0]: bad"));
        s.not_ready_reason = Some("cannot write the Lease".into());
        assert_eq!(
            readiness(&s),
            (503, "not ready: cannot write the Lease\n".to_string())
        );
    }

    #[test]
    fn renders_traffic_health_pools_and_reloads_in_prometheus_text() {
        let status = Status {
            ready: true,
            last_reload_error: Some("bad".into()),
            reloads_succeeded: 2,
            reloads_failed: 1,
            services: vec![(
                "web".into(),
                "198.51.100.1".into(),
                vec!["198.51.100.1:80/tcp".into()],
            )],
            pools: vec![("default".into(), 1, 254.0)],
            not_ready_reason: None,
            bgp: vec![BgpSessionStatus {
                peer: "192.0.2.1".into(),
                state: "Established".into(),
                uptime_seconds: Some(5),
                prefixes_sent: 2,
                updates_sent: 3,
                updates_received: 1,
                notifications: 0,
                last_error: None,
            }],
            health: vec![BackendHealth {
                service: "web".into(),
                backend: "10.0.0.1:8080".into(),
                healthy: false,
            }],
            mesh_enabled: true,
            mesh: MeshStatus {
                members: vec![MeshMemberStatus {
                    node: "node-b".into(),
                    address: "192.0.2.2:7947".into(),
                    state: "down".into(),
                    counted_alive: false,
                    since_seconds: 1.0,
                    last_heard_seconds_ago: Some(1.8),
                    noticed_after_seconds: Some(0.8),
                }],
                dropped: [("bad_tag".to_string(), 4)].into(),
                received: 10,
                sent: 12,
            },
            bfd: BfdStatus {
                sessions: vec![BfdSessionStatus {
                    peer: "192.0.2.1".into(),
                    profile: "fast".into(),
                    multihop: false,
                    state: "Down".into(),
                    remote_state: "Down".into(),
                    last_down_reason: "detection time expired".into(),
                    since_seconds: 2.0,
                    detection_time_ms: 300,
                    transmit_interval_ms: 100,
                    local_discriminator: 7,
                    remote_discriminator: 0,
                    transitions: vec![
                        ("Up".into(), "none".into(), 1),
                        ("Down".into(), "detection time expired".into(), 1),
                    ],
                    error: None,
                }],
                dropped: [("ttl".to_string(), 2)].into(),
            },
        };
        let services = vec![ServiceStats {
            service: Service {
                vip: "198.51.100.1".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            traffic: TrafficStats {
                packets: 10,
                bytes: 1000,
                new_flows: 2,
            },
            backends: vec![(
                Backend {
                    ip: "10.0.0.2".parse().unwrap(),
                    port: 8080,
                    weight: 1,
                    node: None,
                },
                TrafficStats {
                    packets: 10,
                    bytes: 1000,
                    new_flows: 2,
                },
            )],
        }];
        let census = crate::dataplane::flows::FlowCensus {
            open: 1,
            half_closed: 0,
            closed: 2,
        };
        let tunnels = [crate::dataplane::TunnelTraffic {
            node: Some("192.0.2.7".parse().unwrap()),
            in_packets: 3,
            in_bytes: 300,
            out_packets: 5,
            out_bytes: 500,
        }];
        let text = render(&status, &services, None, Some(census), None, &tunnels);
        assert!(
            text.contains("sluice_tunnel_packets_total{node=\"192.0.2.7\",direction=\"in\"} 3")
                && text.contains(
                    "sluice_tunnel_bytes_total{node=\"192.0.2.7\",direction=\"out\"} 500"
                ),
            "{text}"
        );
        for line in [
            "sluice_service_packets_total{name=\"web\",service=\"198.51.100.1:80/tcp\"} 10",
            "sluice_backend_flows_total{name=\"web\",service=\"198.51.100.1:80/tcp\",backend=\"10.0.0.2:8080\"} 2",
            "sluice_backend_healthy{name=\"web\",backend=\"10.0.0.1:8080\"} 0",
            "sluice_allocator_addresses_in_use_total{pool=\"default\"} 1",
            "sluice_allocator_addresses_total{pool=\"default\"} 254",
            "sluice_config_reloads_total{result=\"failure\"} 1",
            "sluice_config_last_reload_successful 0",
            "sluice_tracked_flows 3",
            "sluice_tracked_flows_by_state{state=\"closed\"} 2",
            "sluice_tracked_flows_by_state{state=\"half_closed\"} 0",
            "sluice_bgp_session_up{peer=\"192.0.2.1\"} 1",
            "sluice_bgp_prefixes_sent{peer=\"192.0.2.1\"} 2",
            "sluice_mesh_member_alive{node=\"node-b\",state=\"down\"} 0",
            "sluice_mesh_failure_detection_seconds{node=\"node-b\"} 0.8",
            "sluice_mesh_datagrams_dropped_total{reason=\"bad_tag\"} 4",
            "sluice_mesh_datagrams_dropped_total{reason=\"replayed\"} 0",
            "sluice_mesh_datagrams_received_total 10",
            "sluice_bfd_session_up{peer=\"192.0.2.1\",profile=\"fast\"} 0",
            "sluice_bfd_session_state{peer=\"192.0.2.1\"} 1",
            "sluice_bfd_detection_time_seconds{peer=\"192.0.2.1\"} 0.3",
            "sluice_bfd_transitions_total{peer=\"192.0.2.1\",to=\"Down\",reason=\"detection time expired\"} 1",
            "sluice_bfd_packets_dropped_total{reason=\"ttl\"} 2",
            "sluice_bfd_packets_dropped_total{reason=\"version\"} 0",
            "# TYPE sluice_backend_healthy gauge",
            "# TYPE sluice_service_packets counter",
            "# HELP sluice_service_packets Packets balanced, per service.",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert_eq!(text.lines().last(), Some("# EOF"));
    }

    #[test]
    fn label_values_are_escaped_and_counters_get_their_total_suffix_once() {
        let mut m = Exposition::default();
        m.counter("sluice_x_total", "An x.")
            .sample(&[("name", "a\"b\\c\nd")], 3u64);
        m.gauge("sluice_y", "A y.").sample(&[], 1.5);
        let text = m.render();
        assert_eq!(
            text,
            "# HELP sluice_x An x.\n# TYPE sluice_x counter\nsluice_x_total{name=\"a\\\"b\\\\c\\nd\"} 3\n\
             # HELP sluice_y A y.\n# TYPE sluice_y gauge\nsluice_y 1.5\n# EOF\n"
        );
    }
}
