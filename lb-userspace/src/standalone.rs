//! `sluice run`: the standalone load balancer. Reads the config, allocates service IPs, checks
//! backends' health, and keeps the data plane equal to what all of that asks for; reloads on
//! SIGHUP and when a config file changes.
//!
//! [`desired`] is the decision (pure): config + allocations + health → interfaces, L2 VIPs,
//! services with their healthy backends. [`Daemon`] is the edge: it applies the differences to
//! the data plane, and on a rejected reload keeps serving the configuration it had.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    config::{self, Config, HealthCheck},
    dataplane::{self, Backend, Dataplane, DataplaneOptions, L2Vip, Service},
    health::{self, Checker, Health, ProbeResult},
    ipam::{self, Allocation},
    metrics::{self, BackendHealth, SharedStatus, Status},
    onlink::{self, Subnet},
    signals::SignalSet,
};

/// A health-checked backend of a named service: (service name, backend IP, probed port).
pub type HealthKey = (String, IpAddr, u16);

/// What the data plane should hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// `dataplane.interfaces`, the L2 advertisements' and the on-link interfaces of the L2 IPs.
    pub interfaces: Vec<String>,
    /// (VIP, interface to answer ARP/NDP on).
    pub l2: Vec<(IpAddr, String)>,
    /// IPs of on-link advertisements that no interface's subnet holds: answered nowhere.
    pub off_link: Vec<IpAddr>,
    pub services: BTreeMap<Service, Vec<Backend>>,
    /// Backends to probe, with their check.
    pub checks: Vec<(HealthKey, HealthCheck)>,
}

/// The decision: pure. `subnets`: this host's interfaces' own subnets, where advertisements
/// that name no interface answer (see `onlink`).
pub fn desired(
    config: &Config,
    allocations: &BTreeMap<String, Allocation>,
    health: &BTreeMap<HealthKey, Health>,
    subnets: &[Subnet],
) -> Desired {
    let mut services = BTreeMap::new();
    let mut checks = Vec::new();
    for s in &config.services {
        let Some(allocation) = allocations.get(&s.name) else {
            continue;
        };
        let probe_port = |b: &config::BackendDef| {
            b.port
                .unwrap_or(s.ports.first().map_or(0, |p| p.target_port))
        };
        let healthy = |b: &config::BackendDef| {
            let key = (s.name.clone(), b.ip, probe_port(b));
            health.get(&key).is_none_or(|h| h.healthy)
        };
        if let Some(check) = &s.health_check {
            for b in &s.backends {
                let port = check.port.unwrap_or(probe_port(b));
                checks.push((
                    (s.name.clone(), b.ip, probe_port(b)),
                    HealthCheck {
                        port: Some(port),
                        ..check.clone()
                    },
                ));
            }
        }
        for port in &s.ports {
            let backends = s
                .backends
                .iter()
                .filter(|b| healthy(b))
                .map(|b| Backend {
                    ip: b.ip,
                    port: b.port.unwrap_or(port.target_port),
                    weight: b.weight,
                    node: b.node,
                })
                .collect();
            services.insert(
                Service {
                    vip: allocation.ip,
                    port: port.port,
                    protocol: port.protocol,
                },
                backends,
            );
        }
    }
    let mut l2 = Vec::new();
    let mut off_link = BTreeSet::new();
    for adv in &config.l2_advertisements {
        for allocation in allocations.values() {
            if !adv.pools.contains(&allocation.pool) {
                continue;
            }
            if adv.interfaces.is_empty() {
                let on = onlink::interfaces_for(allocation.ip, subnets);
                if on.is_empty() {
                    off_link.insert(allocation.ip);
                }
                l2.extend(on.into_iter().map(|i| (allocation.ip, i)));
            } else {
                for interface in &adv.interfaces {
                    l2.push((allocation.ip, interface.clone()));
                }
            }
        }
    }
    l2.sort();
    l2.dedup();
    // An IP answered on-link somewhere is not off-link because another advertisement is.
    off_link.retain(|ip| !l2.iter().any(|(x, _)| x == ip));
    let mut interfaces = config.dataplane.interfaces.clone();
    for (_, name) in &l2 {
        if !interfaces.contains(name) {
            interfaces.push(name.clone());
        }
    }
    Desired {
        interfaces,
        l2,
        off_link: off_link.into_iter().collect(),
        services,
        checks,
    }
}

/// Allocations remembered across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    allocations: BTreeMap<String, IpAddr>,
}

fn read_state(path: &Path) -> BTreeMap<String, IpAddr> {
    match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str::<StateFile>(&text) {
            Ok(state) => state.allocations,
            Err(error) => {
                tracing::warn!(event = "stateUnreadable", path = %path.display(), %error, "allocating afresh");
                BTreeMap::new()
            }
        },
        Err(_) => BTreeMap::new(),
    }
}

pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}

/// Where the daemon writes its status (health, names) for `sluice inspect`.
pub fn status_path(state_file: &Path) -> PathBuf {
    state_file.with_file_name("status.json")
}

/// Where `sluice run` leaves the path of its status file, so that `sluice inspect` without
/// `--config` finds it from the pin directory alone: one small file per pin directory.
pub fn status_pointer(pin_dir: &Path) -> PathBuf {
    let key = pin_dir
        .display()
        .to_string()
        .trim_matches('/')
        .replace('/', "_");
    PathBuf::from("/run/sluice").join(format!("{key}.status-path"))
}

/// The status of the daemon serving `pin_dir`, found through [`status_pointer`].
pub fn read_status_of(pin_dir: &Path) -> Option<Status> {
    let path = std::fs::read_to_string(status_pointer(pin_dir)).ok()?;
    let text = std::fs::read_to_string(path.trim()).ok()?;
    serde_json::from_str(&text).ok()
}

/// Reads the status a daemon wrote, if any.
pub fn read_status(state_file: &Path) -> Option<Status> {
    let text = std::fs::read_to_string(status_path(state_file)).ok()?;
    serde_json::from_str(&text).ok()
}

/// IPAM for a configuration; every allocation problem in one error.
fn allocate(
    config: &Config,
    previous: &BTreeMap<String, IpAddr>,
) -> Result<BTreeMap<String, Allocation>> {
    ipam::allocate(&config.pools, &config.services, previous).map_err(|errors| {
        anyhow!(errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n"))
    })
}

enum Event {
    Reload(&'static str),
    Probe(ProbeResult),
    /// Once a second: publish what changed asynchronously (BGP sessions).
    Tick,
    /// Every `dataplane::INTERFACE_REFRESH`: re-read the attached interfaces (a bond's
    /// failover moves the ARP/NDP answers to its new active port).
    Interfaces,
    Stop(OnStop),
}

/// What `sluice run` does when it stops. The data plane keeps forwarding either way (pinned
/// links; `sluice detach` ends it); what differs is what the BGP routers are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnStop {
    /// BFD AdminDown, then Cease: the routers withdraw this host's routes now.
    Stop,
    /// A planned restart: BFD asks the routers to wait (30 s) and the next `sluice run` carries
    /// the BFD sessions on; the BGP sessions close without Cease, so routers with graceful
    /// restart keep the routes until the next process sends them again. SIGUSR2 always means
    /// this.
    Restart,
}

/// Checks a configuration end to end without touching the kernel: parse, validate, allocate
/// (from the previous allocations when the state file is readable), and validate every service's
/// backends against the Maglev table size. Returns a summary.
pub fn validate(paths: &[PathBuf]) -> Result<String> {
    let config = config::load(paths)?;
    let previous = read_state(&config.dataplane.state_file);
    let allocations = allocate(&config, &previous)?;
    let subnets = dataplane::subnets();
    let plan = desired(&config, &allocations, &BTreeMap::new(), &subnets);
    for (service, backends) in &plan.services {
        dataplane::validate_service(service, backends, config.dataplane.maglev_table_size)?;
    }
    let mut summary = format!(
        "{}: valid: {} pool(s), {} service(s), {} peer(s)",
        config::describe(paths),
        config.pools.len(),
        config.services.len(),
        config.peers.len()
    );
    for w in &config.warnings {
        summary.push_str(&format!("\n  warning: {w}"));
    }
    for w in off_link_ranges(&config, &subnets) {
        summary.push_str(&format!("\n  warning: {w}"));
    }
    for s in &config.services {
        if let Some(a) = allocations.get(&s.name) {
            summary.push_str(&format!("\n  {} → {} (pool {})", s.name, a.ip, a.pool));
        }
    }
    Ok(summary)
}

/// The ranges of pools advertised on-link (L2 advertisements naming no interface) that no
/// interface's subnet holds whole, on this host: addresses there would be answered nowhere.
pub fn off_link_ranges(config: &Config, subnets: &[Subnet]) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for adv in config
        .l2_advertisements
        .iter()
        .filter(|a| a.interfaces.is_empty())
    {
        for pool in config.pools.iter().filter(|p| adv.pools.contains(&p.name)) {
            for range in &pool.ranges {
                let (first, last) = (range.start, range.end);
                let held = onlink::interfaces_for(first, subnets)
                    .intersection(&onlink::interfaces_for(last, subnets))
                    .next()
                    .is_some();
                if !held && seen.insert((pool.name.clone(), range.to_string())) {
                    out.push(format!(
                        "pool {:?}: {range} is announced in L2 on the interfaces whose subnets hold its addresses, and no interface here holds it whole (subnets: {}); name interfaces in the L2 advertisement to answer elsewhere",
                        pool.name,
                        onlink::describe(subnets)
                    ));
                }
            }
        }
    }
    out
}

struct Daemon {
    paths: Vec<PathBuf>,
    config: Config,
    allocations: BTreeMap<String, Allocation>,
    health: BTreeMap<HealthKey, Health>,
    checkers: BTreeMap<HealthKey, (HealthCheck, Checker)>,
    dp: Dataplane,
    status: SharedStatus,
    events: mpsc::Sender<Event>,
    /// (IP, ifindex) pairs already announced on their link.
    announced: BTreeSet<(IpAddr, u32)>,
    /// BGP sessions, when the config has peers.
    bgp: Option<crate::bgp::speaker::Speaker>,
    /// This host's subnets when the data plane was last made to match (on-link answering).
    subnets: Vec<Subnet>,
    /// On-link IPs no subnet held then (logged when that changes).
    off_link: Vec<IpAddr>,
}

impl Daemon {
    /// Makes the data plane match `config` + `allocations` + health. Everything that can be
    /// checked is checked before the first change.
    fn apply(&mut self, config: &Config, allocations: &BTreeMap<String, Allocation>) -> Result<()> {
        self.subnets = dataplane::subnets();
        let plan = desired(config, allocations, &self.health, &self.subnets);
        if plan.off_link != self.off_link {
            for ip in plan
                .off_link
                .iter()
                .filter(|ip| !self.off_link.contains(ip))
            {
                tracing::warn!(
                    event = "l2OffLink",
                    %ip,
                    subnets = %onlink::describe(&self.subnets),
                    "no interface's subnet holds this IP: not answered in L2 (name interfaces in its L2 advertisement to answer elsewhere)"
                );
            }
            self.off_link = plan.off_link.clone();
        }
        let interfaces = plan
            .interfaces
            .iter()
            .map(|name| {
                dataplane::interface(name)
                    .with_context(|| "dataplane.interfaces / l2Advertisements[].interfaces")
            })
            .collect::<Result<Vec<_>>>()?;
        let redirect = config
            .dataplane
            .redirect_veths
            .iter()
            .map(|name| dataplane::interface(name).context("dataplane.redirectVeths"))
            .collect::<Result<Vec<_>>>()?;
        let vips = L2Vip::on(&interfaces, &plan.l2);
        if let Some(tunnels) = &config.dataplane.tunnels {
            self.dp.set_tunnels(tunnels)?;
        }
        self.dp.sync(&interfaces, &plan.services, &vips)?;
        self.dp
            .set_flood_guard(config.dataplane.flood_guard_new_flows_per_second)?;
        for iface in &redirect {
            self.dp.allow_redirect(iface.ifindex)?;
        }
        let now: BTreeSet<(IpAddr, u32)> = vips.iter().map(|v| (v.ip, v.ifindex)).collect();
        let new: Vec<&L2Vip> = vips
            .iter()
            .filter(|v| !self.announced.contains(&(v.ip, v.ifindex)))
            .collect();
        let sent = crate::l2::announce_all(
            &new.iter()
                .map(|vip| (vip.ifindex, vip.mac, vip.ip))
                .collect::<Vec<_>>(),
        );
        for (vip, result) in new.iter().zip(sent) {
            match result {
                Ok(()) => {
                    tracing::info!(event = "l2Announced", ip = %vip.ip, ifindex = vip.ifindex)
                }
                Err(error) => {
                    tracing::warn!(event = "l2AnnounceFailed", ip = %vip.ip, ifindex = vip.ifindex, %error)
                }
            }
        }
        self.announced = now;
        self.sync_checkers(&plan);
        self.sync_bgp(config, allocations, &plan);
        Ok(())
    }

    /// Tells the BGP peers about every service IP with at least one healthy backend.
    fn sync_bgp(
        &mut self,
        config: &Config,
        allocations: &BTreeMap<String, Allocation>,
        plan: &Desired,
    ) {
        if config.peers.is_empty() {
            if let Some(speaker) = self.bgp.take() {
                speaker.shutdown();
            }
            return;
        }
        if self.bgp.is_none() {
            let bfd_state = bfd_state_file(&config.dataplane.state_file);
            match crate::bgp::speaker::Speaker::new(self.dp.adopted_links(), Some(bfd_state)) {
                Ok(speaker) => self.bgp = Some(speaker),
                Err(error) => {
                    tracing::error!(event = "bgpNotStarted", %error);
                    return;
                }
            }
        }
        let live: BTreeSet<IpAddr> = plan
            .services
            .iter()
            .filter(|(_, backends)| !backends.is_empty())
            .map(|(service, _)| service.vip)
            .collect();
        let advertisements = crate::bgp::advertise::advertisements(config, allocations, &live);
        if let Some(speaker) = self.bgp.as_mut() {
            speaker.configure(&config.peers, config.dataplane.node_ipv6);
            speaker.advertise(&advertisements);
        }
    }

    fn sync_checkers(&mut self, plan: &Desired) {
        let wanted: BTreeMap<&HealthKey, &HealthCheck> =
            plan.checks.iter().map(|(k, c)| (k, c)).collect();
        self.checkers
            .retain(|key, (check, _)| wanted.get(key).is_some_and(|c| *c == check));
        self.health.retain(|key, _| wanted.contains_key(key));
        for (key, check) in &plan.checks {
            if self.checkers.contains_key(key) {
                continue;
            }
            let events = self.events.clone();
            let (tx, rx) = mpsc::channel::<ProbeResult>();
            std::thread::spawn(move || {
                while let Ok(result) = rx.recv() {
                    if events.send(Event::Probe(result)).is_err() {
                        return;
                    }
                }
            });
            // Probes `check.port` (set by `desired`), reports under the key's port.
            let checker = health::spawn(key.0.clone(), key.1, key.2, check.clone(), tx);
            self.checkers.insert(key.clone(), (check.clone(), checker));
        }
    }

    /// The BGP sessions' state, for status, metrics and inspect.
    fn bgp_status(&self) -> Vec<metrics::BgpSessionStatus> {
        let Some(speaker) = &self.bgp else {
            return Vec::new();
        };
        speaker.session_statuses()
    }

    fn bfd_status(&self) -> metrics::BfdStatus {
        self.bgp
            .as_ref()
            .map(|s| s.bfd_statuses())
            .unwrap_or_default()
    }

    /// Publishes BGP state when it changed (state, counters, errors; not the uptime alone).
    fn tick(&mut self) {
        // An address added to or removed from an interface moves on-link answering with it.
        let subnets = dataplane::subnets();
        if subnets != self.subnets {
            let (config, allocations) = (self.config.clone(), self.allocations.clone());
            tracing::info!(event = "subnetsChanged", subnets = %onlink::describe(&subnets));
            if let Err(error) = self.apply(&config, &allocations) {
                tracing::error!(event = "applyFailed", error = %format!("{error:#}"));
            }
            self.publish();
        }
        let bgp = self.bgp_status();
        let strip = |v: &[metrics::BgpSessionStatus]| {
            v.iter()
                .map(|b| metrics::BgpSessionStatus {
                    uptime_seconds: None,
                    ..b.clone()
                })
                .collect::<Vec<_>>()
        };
        let bfd = self.bfd_status();
        let states = |b: &metrics::BfdStatus| {
            b.sessions
                .iter()
                .map(|s| (s.peer.clone(), s.state.clone(), s.transitions.clone()))
                .collect::<Vec<_>>()
        };
        let changed = {
            let status = self.status.lock().unwrap();
            strip(&status.bgp) != strip(&bgp) || states(&status.bfd) != states(&bfd)
        };
        {
            let mut status = self.status.lock().unwrap();
            status.bgp = bgp;
            status.bfd = bfd;
        }
        if changed {
            self.publish();
        }
    }

    fn publish(&self) {
        let bgp = self.bgp_status();
        let bfd = self.bfd_status();
        let mut status = self.status.lock().unwrap();
        status.bgp = bgp;
        status.bfd = bfd;
        status.services = self
            .config
            .services
            .iter()
            .filter_map(|s| {
                let a = self.allocations.get(&s.name)?;
                let keys = s
                    .ports
                    .iter()
                    .map(|p| {
                        Service {
                            vip: a.ip,
                            port: p.port,
                            protocol: p.protocol,
                        }
                        .to_string()
                    })
                    .collect();
                Some((s.name.clone(), a.ip.to_string(), keys))
            })
            .collect();
        status.set_pools(&ipam::usage(&self.config.pools, &self.allocations));
        status.health = self
            .checkers
            .keys()
            .map(|key| BackendHealth {
                service: key.0.clone(),
                backend: Backend {
                    ip: key.1,
                    port: key.2,
                    weight: 1,
                    node: None,
                }
                .maglev_key(),
                healthy: self.health.get(key).is_none_or(|h| h.healthy),
            })
            .collect();
        let snapshot = status.clone();
        drop(status);
        let state = StateFile {
            allocations: self
                .allocations
                .iter()
                .map(|(k, v)| (k.clone(), v.ip))
                .collect(),
        };
        let state_file = &self.config.dataplane.state_file;
        if let Err(error) =
            write_atomically(state_file, &serde_json::to_string_pretty(&state).unwrap()).and_then(
                |_| {
                    write_atomically(
                        &status_path(state_file),
                        &serde_json::to_string_pretty(&snapshot).unwrap(),
                    )
                },
            )
        {
            tracing::warn!(event = "stateNotWritten", error = %format!("{error:#}"));
        }
    }

    fn reload(&mut self, trigger: &str) {
        match self.try_reload() {
            Ok(changed) => {
                let mut status = self.status.lock().unwrap();
                status.reloads_succeeded += 1;
                status.last_reload_error = None;
                drop(status);
                tracing::info!(
                    event = "configReloaded",
                    trigger,
                    services = self.config.services.len(),
                    changed
                );
                log_warnings(&self.config);
                self.publish();
            }
            Err(error) => {
                let message = format!("{error:#}");
                tracing::error!(event = "configRejected", trigger, error = %message, "the previous configuration keeps serving");
                let mut status = self.status.lock().unwrap();
                status.reloads_failed += 1;
                status.last_reload_error = Some(message);
            }
        }
    }

    fn try_reload(&mut self) -> Result<bool> {
        let new = config::load(&self.paths)?;
        let old = &self.config.dataplane;
        for (field, same) in [
            (
                "dataplane.maglevTableSize",
                new.dataplane.maglev_table_size == old.maglev_table_size,
            ),
            ("dataplane.pinDir", new.dataplane.pin_dir == old.pin_dir),
            (
                "dataplane.metricsAddress",
                new.dataplane.metrics_address == old.metrics_address,
            ),
            (
                "dataplane.stateFile",
                new.dataplane.state_file == old.state_file,
            ),
        ] {
            if !same {
                bail!("{field}: changing it needs a restart of sluice run");
            }
        }
        let previous: BTreeMap<String, IpAddr> = self
            .allocations
            .iter()
            .map(|(k, v)| (k.clone(), v.ip))
            .collect();
        let allocations = allocate(&new, &previous)?;
        if new == self.config && allocations == self.allocations {
            return Ok(false);
        }
        if let Err(error) = self.apply(&new, &allocations) {
            // Put back what was serving; the error is the reload's.
            let (config, allocations) = (self.config.clone(), self.allocations.clone());
            if let Err(restore) = self.apply(&config, &allocations) {
                tracing::error!(event = "restoreFailed", error = %format!("{restore:#}"));
            }
            return Err(error);
        }
        self.config = new;
        self.allocations = allocations;
        Ok(true)
    }

    fn on_probe(&mut self, result: ProbeResult) {
        let key: HealthKey = (result.service.clone(), result.backend, result.port);
        let Some((check, _)) = self.checkers.get(&key) else {
            return;
        };
        let (rise, fall) = (check.rise, check.fall);
        let health = self.health.entry(key.clone()).or_default();
        if !health.observe(result.result.is_ok(), rise, fall) {
            return;
        }
        let healthy = health.healthy;
        tracing::info!(
            event = if healthy { "backendHealthy" } else { "backendUnhealthy" },
            service = %key.0,
            backend = %key.1,
            reason = %result.result.err().unwrap_or_default()
        );
        let (config, allocations) = (self.config.clone(), self.allocations.clone());
        if let Err(error) = self.apply(&config, &allocations) {
            tracing::error!(event = "applyFailed", error = %format!("{error:#}"));
        }
        self.publish();
    }
}

fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        std::fs::read(p).ok().hash(&mut hasher);
    }
    hasher.finish()
}

/// How long routers wait for `sluice run` to come back after a planned restart before BFD
/// declares this host down (and BGP withdraws its routes).
pub const RESTART_WINDOW: Duration = Duration::from_secs(30);

/// Where BFD sessions held for a planned restart wait for the next process: beside the state
/// file.
pub fn bfd_state_file(state_file: &Path) -> PathBuf {
    PathBuf::from(format!("{}.bfd-sessions.json", state_file.display()))
}

/// What the configuration reads differently from how it is written, once per load.
fn log_warnings(config: &Config) {
    for w in &config.warnings {
        tracing::warn!(event = "configWarning", path = %w.path, message = %w.message);
    }
}

fn stop_bgp(speaker: Option<crate::bgp::speaker::Speaker>, how: OnStop) {
    let Some(speaker) = speaker else {
        return;
    };
    match how {
        OnStop::Stop => speaker.shutdown(),
        OnStop::Restart => {
            speaker.prepare_restart(RESTART_WINDOW);
            // The sessions stay open until the process ends: no Cease.
            std::mem::forget(speaker);
            tracing::info!(
                event = "stoppedForRestart",
                "BGP sessions closed without Cease; routers keep the routes for the restart time"
            );
        }
    }
}

/// Runs until SIGINT/SIGTERM (or SIGUSR2, a planned restart). Errors at startup (bad config, missing interface, no root) end it
/// with every problem listed; after startup, a bad reload only logs and keeps serving.
pub fn run(paths: Vec<PathBuf>, on_stop: OnStop) -> Result<()> {
    let signals = SignalSet::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR2])?;
    let config = config::load(&paths)?;
    log_warnings(&config);
    let status_file = std::path::absolute(status_path(&config.dataplane.state_file))
        .unwrap_or_else(|_| status_path(&config.dataplane.state_file));
    let pointer = status_pointer(&config.dataplane.pin_dir);
    if let Err(error) = write_atomically(&pointer, &status_file.display().to_string()) {
        tracing::debug!(event = "statusPointerNotWritten", path = %pointer.display(), error = %format!("{error:#}"));
    }
    let previous = read_state(&config.dataplane.state_file);
    let allocations = allocate(&config, &previous)?;
    // Links are pinned: forwarding goes on while this process restarts or is upgraded, and the
    // next `sluice run` adopts them. `sluice detach` ends it.
    let dp = Dataplane::load(&DataplaneOptions {
        pin_dir: Some(config.dataplane.pin_dir.clone()),
        maglev_table_size: config.dataplane.maglev_table_size,
        pin_links: true,
        ..DataplaneOptions::default()
    })?;
    dataplane::flows::spawn_sweeper(config.dataplane.pin_dir.clone())
        .context("starting the closed-flow sweeper")?;
    let status: SharedStatus = Arc::new(Mutex::new(Status::default()));
    metrics::serve(
        config.dataplane.metrics_address,
        status.clone(),
        config.dataplane.pin_dir.clone(),
    )
    .with_context(|| {
        format!(
            "dataplane.metricsAddress: cannot listen on {}",
            config.dataplane.metrics_address
        )
    })?;

    let (tx, rx) = mpsc::channel();
    let mut daemon = Daemon {
        paths: paths.clone(),
        config: config.clone(),
        allocations: allocations.clone(),
        health: BTreeMap::new(),
        checkers: BTreeMap::new(),
        dp,
        status: status.clone(),
        events: tx.clone(),
        announced: BTreeSet::new(),
        bgp: None,
        subnets: Vec::new(),
        off_link: Vec::new(),
    };
    daemon.apply(&config, &allocations)?;
    for w in off_link_ranges(&config, &daemon.subnets) {
        tracing::warn!(event = "configWarning", message = %w);
    }
    status.lock().unwrap().ready = true;
    daemon.publish();
    for (name, a) in &daemon.allocations {
        tracing::info!(event = "ipAllocated", service = %name, ip = %a.ip, pool = %a.pool);
    }

    let signal_tx = tx.clone();
    std::thread::spawn(move || loop {
        match signals.wait() {
            Ok(libc::SIGHUP) => {
                if signal_tx.send(Event::Reload("SIGHUP")).is_err() {
                    return;
                }
            }
            Ok(libc::SIGUSR2) => {
                let _ = signal_tx.send(Event::Stop(OnStop::Restart));
                return;
            }
            _ => {
                let _ = signal_tx.send(Event::Stop(on_stop));
                return;
            }
        }
    });
    let tick_tx = tx.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        if tick_tx.send(Event::Tick).is_err() {
            return;
        }
    });
    let interfaces_tx = tx.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(dataplane::INTERFACE_REFRESH);
        if interfaces_tx.send(Event::Interfaces).is_err() {
            return;
        }
    });
    let watch_tx = tx;
    let watched = paths.clone();
    std::thread::spawn(move || {
        let mut last = fingerprint(&watched);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = fingerprint(&watched);
            if now != last {
                last = now;
                if watch_tx.send(Event::Reload("file changed")).is_err() {
                    return;
                }
            }
        }
    });
    eprintln!(
        "sluice: serving {} service(s) from {}; metrics on http://{}/metrics; ready",
        daemon.config.services.len(),
        config::describe(&paths),
        daemon.config.dataplane.metrics_address
    );
    while let Ok(event) = rx.recv() {
        match event {
            Event::Reload(trigger) => daemon.reload(trigger),
            Event::Probe(result) => daemon.on_probe(result),
            Event::Tick => daemon.tick(),
            Event::Interfaces => {
                if let Err(error) = daemon.dp.refresh_interfaces() {
                    tracing::warn!(event = "interfacesNotRefreshed", %error);
                }
            }
            Event::Stop(how) => {
                stop_bgp(daemon.bgp.take(), how);
                break;
            }
        }
    }
    tracing::info!(
        event = "stopped",
        "the data plane keeps forwarding with the last configuration; `sluice detach` stops it"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{build_from, parse_text};

    fn config(text: &str) -> Config {
        build_from(vec![("t.yaml".into(), parse_text("t.yaml", text).unwrap())]).unwrap()
    }

    const TEXT: &str = r#"
dataplane: {interfaces: [eth0]}
pools:
- {name: a, addresses: [198.51.100.0/30]}
- {name: b, addresses: [203.0.113.0/30], autoAssign: false}
l2Advertisements: [{ipAddressPools: [a], interfaces: [eth1]}]
services:
- name: web
  ports: [{port: 80, targetPort: 8080}, {port: 443, targetPort: 8443}]
  backends: [{ip: 10.0.0.1}, {ip: 10.0.0.2, weight: 3}]
  healthCheck: {type: tcp, intervalSeconds: 1, timeoutSeconds: 0.5}
- name: dns
  pool: b
  ports: [{port: 53, protocol: UDP}]
  backends: [{ip: 10.0.0.53, port: 5353}]
"#;

    fn plan(c: &Config, health: &BTreeMap<HealthKey, Health>) -> Desired {
        let allocations = ipam::allocate(&c.pools, &c.services, &BTreeMap::new()).unwrap();
        desired(c, &allocations, health, &[])
    }

    #[test]
    fn every_port_of_every_service_is_balanced_over_its_backends() {
        let c = config(TEXT);
        let d = plan(&c, &BTreeMap::new());
        assert_eq!(d.interfaces, ["eth0", "eth1"]);
        let keys: Vec<String> = d.services.keys().map(|s| s.to_string()).collect();
        assert_eq!(
            keys,
            [
                "198.51.100.0:80/tcp",
                "198.51.100.0:443/tcp",
                "203.0.113.0:53/udp"
            ]
        );
        let https = &d.services.values().nth(1).unwrap();
        assert_eq!(
            https.iter().map(|b| (b.port, b.weight)).collect::<Vec<_>>(),
            [(8443, 1), (8443, 3)]
        );
        assert_eq!(d.services.values().nth(2).unwrap()[0].port, 5353);
        // Only pool a is advertised in L2, on eth1.
        assert_eq!(
            d.l2,
            [("198.51.100.0".parse().unwrap(), "eth1".to_string())]
        );
        assert_eq!(d.checks.len(), 2, "web's two backends are checked");
    }

    #[test]
    fn an_unhealthy_backend_leaves_every_port_of_its_service() {
        let c = config(TEXT);
        let mut health = BTreeMap::new();
        let mut down = Health::default();
        for _ in 0..3 {
            down.observe(false, 2, 3);
        }
        health.insert(("web".to_string(), "10.0.0.1".parse().unwrap(), 8080), down);
        let d = plan(&c, &health);
        for (s, backends) in &d.services {
            if s.port != 53 {
                assert_eq!(backends.len(), 1, "{s}");
                assert_eq!(backends[0].ip.to_string(), "10.0.0.2");
            }
        }
    }

    #[test]
    fn an_unchanged_service_gets_an_identical_plan_after_an_unrelated_change() {
        let before = plan(&config(TEXT), &BTreeMap::new());
        let changed = format!(
            "{TEXT}- name: extra\n  pool: b\n  ports: [{{port: 8000}}]\n  backends: [{{ip: 10.0.0.99}}]\n"
        );
        let c = config(&changed);
        let previous = BTreeMap::new();
        let after = desired(
            &c,
            &ipam::allocate(&c.pools, &c.services, &previous).unwrap(),
            &BTreeMap::new(),
            &[],
        );
        for (s, b) in &before.services {
            assert_eq!(after.services.get(s), Some(b), "{s} must not be touched");
        }
        assert_eq!(after.services.len(), before.services.len() + 1);
    }

    #[test]
    fn an_advertisement_naming_no_interface_answers_only_where_a_subnet_holds_the_ip() {
        let c = config(
            "pools:\n- {name: lan, addresses: [192.0.2.100-192.0.2.101]}\n- {name: far, addresses: [203.0.113.5/32]}\nl2Advertisements: [{}]\nservices:\n- {name: a, pool: lan, ports: [{port: 80}], backends: [{ip: 10.0.0.1}]}\n- {name: b, pool: far, ports: [{port: 80}], backends: [{ip: 10.0.0.1}]}\n",
        );
        let subnets = onlink::parse("lo=127.0.0.0/8,eth0=192.0.2.0/24,eth1=198.51.100.0/24");
        let allocations = ipam::allocate(&c.pools, &c.services, &BTreeMap::new()).unwrap();
        let d = desired(&c, &allocations, &BTreeMap::new(), &subnets);
        assert_eq!(
            d.l2,
            [("192.0.2.100".parse().unwrap(), "eth0".to_string())],
            "not on eth1, not on lo"
        );
        assert_eq!(
            d.interfaces,
            ["eth0"],
            "the data plane goes where it answers"
        );
        assert_eq!(d.off_link, ["203.0.113.5".parse::<IpAddr>().unwrap()]);
        let warnings = off_link_ranges(&c, &subnets);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("pool \"far\": 203.0.113.5")
                && warnings[0].contains("eth0 192.0.2.0/24, eth1 198.51.100.0/24"),
            "{}",
            warnings[0]
        );
    }
}
