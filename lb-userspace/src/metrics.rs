//! The daemon's status and its HTTP endpoint: /metrics (Prometheus text format), /healthz and
//! /readyz. Traffic counters are read from the pinned maps at scrape time; everything else comes
//! from the shared [`Status`] the daemon keeps up to date. Rendering is pure.

use std::{
    fmt::Write as _,
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

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric: traffic from the maps (when readable), state from `status`.
pub fn render(
    status: &Status,
    services: &[ServiceStats],
    global: Option<&lb_common::GlobalStats>,
    flows: Option<crate::dataplane::flows::FlowCensus>,
    flood: Option<&crate::dataplane::FloodStats>,
    tunnels: &[crate::dataplane::TunnelTraffic],
) -> String {
    let mut out = String::new();
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
        family(&mut out, metric, "counter", help);
        for s in services {
            let key = s.service.to_string();
            let v = [s.traffic.packets, s.traffic.bytes, s.traffic.new_flows][pick];
            let _ = writeln!(
                out,
                "{metric}{{name=\"{}\",service=\"{}\"}} {v}",
                escape(&name_of(&key)),
                escape(&key)
            );
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
        family(&mut out, metric, "counter", help);
        for s in services {
            let key = s.service.to_string();
            for (b, t) in &s.backends {
                let v = [t.packets, t.bytes, t.new_flows][pick];
                let _ = writeln!(
                    out,
                    "{metric}{{name=\"{}\",service=\"{}\",backend=\"{}\"}} {v}",
                    escape(&name_of(&key)),
                    escape(&key),
                    escape(&b.maglev_key())
                );
            }
        }
    }
    family(
        &mut out,
        "sluice_backend_healthy",
        "gauge",
        "1 when the backend passes its health check (it is in the Maglev table).",
    );
    for h in &status.health {
        let _ = writeln!(
            out,
            "sluice_backend_healthy{{name=\"{}\",backend=\"{}\"}} {}",
            escape(&h.service),
            escape(&h.backend),
            u8::from(h.healthy)
        );
    }
    family(
        &mut out,
        "sluice_allocator_addresses_in_use_total",
        "gauge",
        "Addresses of a pool allocated to services.",
    );
    for (pool, in_use, _) in &status.pools {
        let _ = writeln!(
            out,
            "sluice_allocator_addresses_in_use_total{{pool=\"{}\"}} {in_use}",
            escape(pool)
        );
    }
    family(
        &mut out,
        "sluice_allocator_addresses_total",
        "gauge",
        "Usable addresses of a pool.",
    );
    for (pool, _, total) in &status.pools {
        let _ = writeln!(
            out,
            "sluice_allocator_addresses_total{{pool=\"{}\"}} {total}",
            escape(pool)
        );
    }
    family(
        &mut out,
        "sluice_config_reloads_total",
        "counter",
        "Configuration reloads, by result.",
    );
    let _ = writeln!(
        out,
        "sluice_config_reloads_total{{result=\"success\"}} {}",
        status.reloads_succeeded
    );
    let _ = writeln!(
        out,
        "sluice_config_reloads_total{{result=\"failure\"}} {}",
        status.reloads_failed
    );
    family(
        &mut out,
        "sluice_config_last_reload_successful",
        "gauge",
        "1 when the last reload was applied, 0 when it was rejected.",
    );
    let _ = writeln!(
        out,
        "sluice_config_last_reload_successful {}",
        u8::from(status.last_reload_error.is_none())
    );
    family(
        &mut out,
        "sluice_bgp_session_up",
        "gauge",
        "1 when the BGP session with the peer is Established.",
    );
    for b in &status.bgp {
        let _ = writeln!(
            out,
            "sluice_bgp_session_up{{peer=\"{}\"}} {}",
            escape(&b.peer),
            u8::from(b.state == "Established")
        );
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
        family(&mut out, metric, "counter", help);
        for b in &status.bgp {
            let v = [b.updates_sent, b.updates_received, b.notifications][pick];
            let _ = writeln!(out, "{metric}{{peer=\"{}\"}} {v}", escape(&b.peer));
        }
    }
    family(
        &mut out,
        "sluice_bgp_prefixes_sent",
        "gauge",
        "Prefixes announced to the peer now.",
    );
    for b in &status.bgp {
        let _ = writeln!(
            out,
            "sluice_bgp_prefixes_sent{{peer=\"{}\"}} {}",
            escape(&b.peer),
            b.prefixes_sent
        );
    }
    if let Some(g) = global {
        family(
            &mut out,
            "sluice_packets_total",
            "counter",
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
            let _ = writeln!(out, "sluice_packets_total{{outcome=\"{outcome}\"}} {v}");
        }
    }
    render_mesh(&mut out, status);
    render_bfd(&mut out, &status.bfd);
    if let Some(census) = flows {
        family(
            &mut out,
            "sluice_tracked_flows",
            "gauge",
            "Flows in the connection table.",
        );
        let _ = writeln!(out, "sluice_tracked_flows {}", census.total());
        family(
            &mut out,
            "sluice_tracked_flows_by_state",
            "gauge",
            "Flows in the connection table by state: open, half_closed (one side sent a FIN), closed (both did; removed after a grace period).",
        );
        for (state, n) in [
            ("open", census.open),
            ("half_closed", census.half_closed),
            ("closed", census.closed),
        ] {
            let _ = writeln!(
                out,
                "sluice_tracked_flows_by_state{{state=\"{state}\"}} {n}"
            );
        }
        family(
            &mut out,
            "sluice_closed_flows_removed_total",
            "counter",
            "Flows closed from both sides that this process removed from the connection table.",
        );
        let _ = writeln!(
            out,
            "sluice_closed_flows_removed_total {}",
            crate::dataplane::flows::removed_total()
        );
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
            family(&mut out, metric, "counter", help);
            for t in tunnels {
                let node = t.node.map(|n| n.to_string()).unwrap_or_default();
                let (i, o) = pick(t);
                let _ = writeln!(out, "{metric}{{node=\"{node}\",direction=\"in\"}} {i}");
                let _ = writeln!(out, "{metric}{{node=\"{node}\",direction=\"out\"}} {o}");
            }
        }
    }
    if let Some(f) = flood {
        family(
            &mut out,
            "sluice_flood_guard_untracked_flows_total",
            "counter",
            "New flows balanced but not tracked: over the flood guard's limit per CPU and second.",
        );
        let _ = writeln!(
            out,
            "sluice_flood_guard_untracked_flows_total {}",
            f.untracked
        );
        family(
            &mut out,
            "sluice_flood_guard_activations_total",
            "counter",
            "Seconds (per CPU) in which new flows reached the flood guard's limit.",
        );
        let _ = writeln!(
            out,
            "sluice_flood_guard_activations_total {}",
            f.activations
        );
    }
    out
}

fn render_bfd(out: &mut String, bfd: &BfdStatus) {
    if bfd.sessions.is_empty() && bfd.dropped.is_empty() {
        return;
    }
    family(
        out,
        "sluice_bfd_session_up",
        "gauge",
        "1 while the BFD session with the peer is Up.",
    );
    for s in &bfd.sessions {
        let _ = writeln!(
            out,
            "sluice_bfd_session_up{{peer=\"{}\",profile=\"{}\"}} {}",
            escape(&s.peer),
            escape(&s.profile),
            u8::from(s.state == "Up")
        );
    }
    family(
        out,
        "sluice_bfd_session_state",
        "gauge",
        "The BFD session's state: 0 AdminDown, 1 Down, 2 Init, 3 Up (RFC 5880).",
    );
    for s in &bfd.sessions {
        let code = match s.state.as_str() {
            "AdminDown" => 0,
            "Down" => 1,
            "Init" => 2,
            _ => 3,
        };
        let _ = writeln!(
            out,
            "sluice_bfd_session_state{{peer=\"{}\"}} {code}",
            escape(&s.peer)
        );
    }
    family(
        out,
        "sluice_bfd_detection_time_seconds",
        "gauge",
        "How long the peer may stay silent before the session goes down.",
    );
    for s in &bfd.sessions {
        let _ = writeln!(
            out,
            "sluice_bfd_detection_time_seconds{{peer=\"{}\"}} {:.3}",
            escape(&s.peer),
            s.detection_time_ms as f64 / 1000.0
        );
    }
    family(
        out,
        "sluice_bfd_transitions_total",
        "counter",
        "BFD session state changes, by new state and reason.",
    );
    for s in &bfd.sessions {
        for (to, reason, n) in &s.transitions {
            let _ = writeln!(
                out,
                "sluice_bfd_transitions_total{{peer=\"{}\",to=\"{to}\",reason=\"{reason}\"}} {n}",
                escape(&s.peer)
            );
        }
    }
    family(
        out,
        "sluice_bfd_packets_dropped_total",
        "counter",
        "BFD packets dropped (bad length, version, discriminator, TTL, authentication, unknown session).",
    );
    for reason in crate::bfd::packet::Drop::ALL {
        let label = reason.label();
        let _ = writeln!(
            out,
            "sluice_bfd_packets_dropped_total{{reason=\"{label}\"}} {}",
            bfd.dropped.get(label).copied().unwrap_or(0)
        );
    }
}

fn render_mesh(out: &mut String, status: &Status) {
    if !status.mesh_enabled {
        return;
    }
    let mesh = &status.mesh;
    family(
        out,
        "sluice_mesh_member_alive",
        "gauge",
        "1 while the other speaker counts alive (mesh state alive or suspect, or restarting within its grace).",
    );
    for m in &mesh.members {
        let _ = writeln!(
            out,
            "sluice_mesh_member_alive{{node=\"{}\",state=\"{}\"}} {}",
            escape(&m.node),
            escape(&m.state),
            u8::from(m.counted_alive)
        );
    }
    family(
        out,
        "sluice_mesh_failure_detection_seconds",
        "gauge",
        "For a speaker declared down: seconds from its last message to the verdict.",
    );
    for m in &mesh.members {
        if let Some(s) = m.noticed_after_seconds {
            let _ = writeln!(
                out,
                "sluice_mesh_failure_detection_seconds{{node=\"{}\"}} {s:.3}",
                escape(&m.node)
            );
        }
    }
    family(
        out,
        "sluice_mesh_datagrams_received_total",
        "counter",
        "Mesh datagrams accepted.",
    );
    let _ = writeln!(
        out,
        "sluice_mesh_datagrams_received_total {}",
        mesh.received
    );
    family(
        out,
        "sluice_mesh_datagrams_sent_total",
        "counter",
        "Mesh datagrams sent.",
    );
    let _ = writeln!(out, "sluice_mesh_datagrams_sent_total {}", mesh.sent);
    family(
        out,
        "sluice_mesh_datagrams_dropped_total",
        "counter",
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
        let _ = writeln!(
            out,
            "sluice_mesh_datagrams_dropped_total{{reason=\"{reason}\"}} {}",
            mesh.dropped.get(reason).copied().unwrap_or(0)
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
            let response = tiny_http::Response::from_string(body).with_status_code(code);
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

/// Renders the controller's metrics (Prometheus text format).
pub fn render_controller(status: &ControllerStatus) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "sluice_controller_leader",
        "gauge",
        "1 while this replica holds the Lease.",
    );
    let _ = writeln!(out, "sluice_controller_leader {}", u8::from(status.leader));
    family(
        &mut out,
        "sluice_controller_synced",
        "gauge",
        "1 once every watch has listed.",
    );
    let _ = writeln!(out, "sluice_controller_synced {}", u8::from(status.synced));
    family(
        &mut out,
        "sluice_pool_addresses_total",
        "gauge",
        "Addresses in the pool.",
    );
    for (pool, (total, _)) in &status.pools {
        let _ = writeln!(
            out,
            "sluice_pool_addresses_total{{pool=\"{}\"}} {total}",
            escape(pool)
        );
    }
    family(
        &mut out,
        "sluice_pool_addresses_in_use",
        "gauge",
        "Addresses of the pool given to Services.",
    );
    for (pool, (_, in_use)) in &status.pools {
        let _ = writeln!(
            out,
            "sluice_pool_addresses_in_use{{pool=\"{}\"}} {in_use}",
            escape(pool)
        );
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
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
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
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    out
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
            "sluice_mesh_failure_detection_seconds{node=\"node-b\"} 0.800",
            "sluice_mesh_datagrams_dropped_total{reason=\"bad_tag\"} 4",
            "sluice_mesh_datagrams_dropped_total{reason=\"replayed\"} 0",
            "sluice_mesh_datagrams_received_total 10",
            "sluice_bfd_session_up{peer=\"192.0.2.1\",profile=\"fast\"} 0",
            "sluice_bfd_session_state{peer=\"192.0.2.1\"} 1",
            "sluice_bfd_detection_time_seconds{peer=\"192.0.2.1\"} 0.300",
            "sluice_bfd_transitions_total{peer=\"192.0.2.1\",to=\"Down\",reason=\"detection time expired\"} 1",
            "sluice_bfd_packets_dropped_total{reason=\"ttl\"} 2",
            "sluice_bfd_packets_dropped_total{reason=\"version\"} 0",
            "# TYPE sluice_backend_healthy gauge",
            "# TYPE sluice_service_packets_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}
