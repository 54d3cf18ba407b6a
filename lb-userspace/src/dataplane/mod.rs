//! The data plane: loads lb-ebpf, attaches it, pins its maps and writes them.
//!
//! This module is the only code in Sluice that uses aya or talks to the BPF subsystem. Everything
//! else hands it decisions (which IP on which interface) through a small typed API. It never
//! decides anything itself, and it never leaves a program half-attached: `attach_all` attaches to
//! every interface or to none.

pub mod bench;
mod error;
pub mod flows;
pub mod ifaces;
mod services;
mod system;
mod tables;
mod trace;
mod tunnels;
pub use trace::TraceSession;
pub use tunnels::{traffic_by_node, TunnelTraffic, Tunnels};

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{
            self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions,
            TcAttachType, TcHandle,
        },
        xdp::{XdpLink, XdpLinkId},
        ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    util::KernelVersion,
    Ebpf, EbpfError, EbpfLoader,
};
use lb_common::{
    FlowKey, FlowValue, GlobalStats, L2VipKey, L2VipValue, BACKENDS_DEFAULT_CAPACITY, FAMILY_IPV4,
    FLOWS_DEFAULT_CAPACITY, L2_VIPS_DEFAULT_CAPACITY, MAP_BACKENDS, MAP_BACKEND_STATS,
    MAP_CONNTRACK, MAP_FLOW_CACHE, MAP_GLOBAL_STATS, MAP_L2_VIPS, MAP_MAGLEV, MAP_REDIRECT_TARGETS,
    MAP_REVERSE_NAT, MAP_SERVICES, MAP_SERVICE_STATS, PROG_TC_EGRESS, PROG_XDP_INGRESS,
    SERVICES_DEFAULT_CAPACITY,
};

pub use error::{DataplaneError, Result};
pub use services::{validate as validate_service, Backend, Protocol, Service, ServiceStats};
pub use system::{
    default_pin_dir, driver, format_mac, interface, interface_name, interfaces, ipv4_addresses,
    link_up, mtu, require_root, subnets, Interface, BPFFS_ROOT,
};

/// The data plane object, built by `cargo xtask build-ebpf` and embedded at compile time.
static DATAPLANE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-dataplane.o"));
const DATAPLANE_OBJECT_NAME: &str = "sluice-dataplane";

/// How to load the data plane.
#[derive(Debug, Clone)]
pub struct DataplaneOptions {
    /// Directory under a bpffs mount where the maps are pinned (and reused on the next start),
    /// `None` to keep them private to this process (tests, benchmarks).
    pub pin_dir: Option<PathBuf>,
    /// Capacity of the L2 VIP map: (interface, IP) pairs.
    pub l2_vips_capacity: u32,
    /// How many services, backends and tracked flows the maps hold.
    pub capacities: Capacities,
    /// M, the size of every service's Maglev table: a prime, at least 100 × the largest backend
    /// count for shares within 1 %.
    pub maglev_table_size: u32,
    /// Pin the XDP and TC links under `<pin_dir>/links/` (needs `pin_dir`): the programs keep
    /// forwarding after this process exits, and the next data plane loaded with the same pin
    /// directory adopts the links, swapping its programs in without a gap. [`detach_pinned`]
    /// ends it.
    pub pin_links: bool,
}

/// Map capacities, fixed at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacities {
    pub services: u32,
    pub backends: u32,
    /// Tracked flows (the connection table; the reverse-NAT table has the same size).
    pub flows: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            services: SERVICES_DEFAULT_CAPACITY,
            backends: BACKENDS_DEFAULT_CAPACITY,
            flows: FLOWS_DEFAULT_CAPACITY,
        }
    }
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            pin_dir: Some(default_pin_dir()),
            l2_vips_capacity: L2_VIPS_DEFAULT_CAPACITY,
            capacities: Capacities::default(),
            maglev_table_size: crate::maglev::DEFAULT_TABLE_SIZE,
            pin_links: false,
        }
    }
}

/// A map's shape: what this build's programs expect, or what a pinned map has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl MapShape {
    fn of<K, V>(max_entries: u32) -> Self {
        Self {
            key_size: std::mem::size_of::<K>() as u32,
            value_size: std::mem::size_of::<V>() as u32,
            max_entries,
        }
    }
}

/// Every map the data plane pins, with its shape as this build's programs and `options` want it.
fn expected_shapes(options: &DataplaneOptions) -> [(&'static str, MapShape); 22] {
    use lb_common::{
        BackendValue, FloodSettings, FloodState, ReverseNatValue, ServiceKey, ServiceValue,
        TrafficStats, REDIRECT_TARGETS_CAPACITY, VIP_FILTER_SLOTS,
    };
    let caps = options.capacities;
    [
        (
            lb_common::MAP_VIP_FILTER,
            MapShape::of::<u32, u32>(VIP_FILTER_SLOTS),
        ),
        (
            lb_common::MAP_FLOOD_SETTINGS,
            MapShape::of::<u32, FloodSettings>(1),
        ),
        (
            lb_common::MAP_FLOOD_STATE,
            MapShape::of::<u32, FloodState>(1),
        ),
        (lb_common::MAP_L2_DEADLINE, MapShape::of::<u32, u64>(1)),
        (
            MAP_REDIRECT_TARGETS,
            MapShape::of::<u32, u32>(REDIRECT_TARGETS_CAPACITY),
        ),
        (
            MAP_L2_VIPS,
            MapShape::of::<L2VipKey, L2VipValue>(options.l2_vips_capacity),
        ),
        (MAP_GLOBAL_STATS, MapShape::of::<u32, GlobalStats>(1)),
        (
            MAP_SERVICES,
            MapShape::of::<ServiceKey, ServiceValue>(caps.services),
        ),
        (
            MAP_BACKENDS,
            MapShape::of::<u32, BackendValue>(caps.backends),
        ),
        (MAP_MAGLEV, MapShape::of::<u32, u32>(caps.services)),
        (
            MAP_CONNTRACK,
            MapShape::of::<FlowKey, FlowValue>(caps.flows),
        ),
        (
            MAP_REVERSE_NAT,
            MapShape::of::<FlowKey, ReverseNatValue>(caps.flows),
        ),
        (
            MAP_SERVICE_STATS,
            MapShape::of::<u32, TrafficStats>(caps.services),
        ),
        (
            MAP_BACKEND_STATS,
            MapShape::of::<u32, TrafficStats>(caps.backends),
        ),
        (
            lb_common::MAP_TRACE_FILTER,
            MapShape::of::<u32, lb_common::TraceFilter>(1),
        ),
        (
            lb_common::MAP_TUNNEL_SETTINGS,
            MapShape::of::<u32, lb_common::TunnelSettings>(1),
        ),
        (
            lb_common::MAP_TUNNEL_PEERS,
            MapShape::of::<lb_common::NodeKey, lb_common::TunnelStats>(
                lb_common::TUNNEL_PEERS_CAPACITY,
            ),
        ),
        (
            lb_common::MAP_TUNNEL_SLOTS,
            MapShape::of::<u32, lb_common::TunnelSlot>(lb_common::TUNNEL_SLOTS),
        ),
        (
            lb_common::MAP_IFACES,
            MapShape::of::<u32, lb_common::IfaceEntry>(lb_common::IFACE_SLOTS),
        ),
        (
            lb_common::MAP_IFACES_SHARED,
            MapShape::of::<u32, lb_common::IfaceEntry>(lb_common::IFACES_SHARED_CAPACITY),
        ),
        (
            lb_common::MAP_IFACE_STATS,
            MapShape::of::<u32, lb_common::IfaceStats>(lb_common::IFACE_SLOTS),
        ),
        (
            lb_common::MAP_TRACE_EVENTS,
            // A ring buffer: no key or value, its size in bytes.
            MapShape {
                key_size: 0,
                value_size: 0,
                max_entries: lb_common::TRACE_EVENTS_BYTES,
            },
        ),
    ]
}

/// Why each pinned map in `found` cannot serve this build (another key or value layout, left by
/// an older Sluice, or another capacity than configured), one line per map. Maps not pinned yet
/// are not in `found` and are fine.
pub fn stale_pins(expected: &[(&str, MapShape)], found: &[(&str, MapShape)]) -> Vec<String> {
    found
        .iter()
        .filter_map(|(name, have)| {
            let (_, want) = expected.iter().find(|(n, _)| n == name)?;
            (have != want).then(|| {
                format!(
                    "{name}: pinned with key {} B, value {} B, {} entries; this build needs key {} B, value {} B, {} entries",
                    have.key_size,
                    have.value_size,
                    have.max_entries,
                    want.key_size,
                    want.value_size,
                    want.max_entries
                )
            })
        })
        .collect()
}

/// Removes every pinned map when any of them cannot serve this build, so the load starts from
/// fresh maps as on a first install (the control plane refills services at once; tracked flows
/// start over). Keeping some would mix old backend ids with new ones.
fn replace_stale_pins(dir: &Path, options: &DataplaneOptions) -> Result<()> {
    let expected = expected_shapes(options);
    let found: Vec<(&str, MapShape)> = expected
        .iter()
        .filter_map(|(name, _)| {
            let info = aya::maps::MapInfo::from_pin(dir.join(name)).ok()?;
            Some((
                *name,
                MapShape {
                    key_size: info.key_size(),
                    value_size: info.value_size(),
                    max_entries: info.max_entries(),
                },
            ))
        })
        .collect();
    let stale = stale_pins(&expected, &found);
    if stale.is_empty() {
        return Ok(());
    }
    for reason in &stale {
        tracing::warn!(event = "pinnedMapStale", pin_dir = %dir.display(), reason = %reason);
    }
    for (name, _) in &found {
        let path = dir.join(name);
        std::fs::remove_file(&path).map_err(|source| DataplaneError::RemovePin { path, source })?;
    }
    tracing::warn!(
        event = "pinnedMapsReplaced",
        pin_dir = %dir.display(),
        maps = found.len(),
        "pinned maps had another layout or capacity: every map starts afresh, tracked flows included"
    );
    Ok(())
}

/// An IP the XDP program answers ARP/NDP for on one interface, with the MAC it answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct L2Vip {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

impl L2Vip {
    /// (IP, interface name) pairs as L2 VIPs on those of `interfaces` that are named; pairs
    /// naming another interface are left out.
    pub fn on(interfaces: &[Interface], pairs: &[(IpAddr, String)]) -> Vec<L2Vip> {
        pairs
            .iter()
            .filter_map(|(ip, name)| {
                let i = interfaces.iter().find(|i| i.name == *name)?;
                Some(L2Vip {
                    ifindex: i.ifindex,
                    ip: *ip,
                    mac: i.mac,
                })
            })
            .collect()
    }

    fn key(&self) -> L2VipKey {
        match self.ip {
            IpAddr::V4(v4) => L2VipKey::v4(self.ifindex, v4.octets()),
            IpAddr::V6(v6) => L2VipKey::v6(self.ifindex, v6.octets()),
        }
    }

    fn from_entry(key: &L2VipKey, value: &L2VipValue) -> Self {
        let ip = if key.family == FAMILY_IPV4 {
            IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
        } else {
            IpAddr::from(key.addr)
        };
        Self {
            ifindex: key.ifindex,
            ip,
            mac: value.mac,
        }
    }
}

/// The XDP action a program returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAction {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    Other(u32),
}

impl From<u32> for XdpAction {
    fn from(value: u32) -> Self {
        match value {
            0 => Self::Aborted,
            1 => Self::Drop,
            2 => Self::Pass,
            3 => Self::Tx,
            4 => Self::Redirect,
            other => Self::Other(other),
        }
    }
}

/// What one run of the ingress program did to one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub action: XdpAction,
    pub frame: Vec<u8>,
}

/// The loaded data plane. Dropping it detaches the program from every interface.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    attached: BTreeMap<u32, Attachment>,
    capacities: Capacities,
    table_size: u32,
    registry: services::Registry,
    /// Where links are pinned, when they are.
    link_dir: Option<PathBuf>,
    /// The interface table as last written (`None`: write it whole).
    ifaces_written: Option<ifaces::Table>,
    /// Some link was adopted from an earlier process: forwarding went on through its restart.
    adopted: bool,
    /// What `L2_VIPS` holds, as last written here (`None`: not read yet; read once from the
    /// map, which may have been pinned by an earlier process). Only this process writes it.
    l2_written: Option<BTreeSet<L2Vip>>,
    /// This node's end of the tunnels, as last set (`None`: never set by this process).
    tunnels: Option<Tunnels>,
}

/// The XDP ingress and TC egress programs on one interface.
struct Attachment {
    name: String,
    xdp: XdpLinkId,
    /// `None`: a netlink TC filter left in the interface's clsact qdisc to outlive this process
    /// (pinned links before Linux 6.6, which has no TCX links to pin).
    tc: Option<SchedClassifierLinkId>,
    /// The XDP program runs in the driver (native mode); generic (skb) mode otherwise.
    native: bool,
    /// Why native mode was not used, when it was not.
    generic_reason: Option<String>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pin_dir", &self.pin_dir)
            .field("attached", &self.attached.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Dataplane {
    /// Loads the programs and creates (or reuses pinned) maps. Attaches nothing yet.
    pub fn load(options: &DataplaneOptions) -> Result<Self> {
        crate::maglev::validate_table_size(options.maglev_table_size, 1)
            .map_err(|e| DataplaneError::InvalidTableSize(e.to_string()))?;
        require_root()?;
        let caps = options.capacities;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_L2_VIPS, options.l2_vips_capacity)
            .map_max_entries(MAP_SERVICES, caps.services)
            .map_max_entries(MAP_MAGLEV, caps.services)
            .map_max_entries(MAP_SERVICE_STATS, caps.services)
            .map_max_entries(MAP_BACKENDS, caps.backends)
            .map_max_entries(MAP_BACKEND_STATS, caps.backends)
            .map_max_entries(MAP_CONNTRACK, caps.flows)
            .map_max_entries(MAP_REVERSE_NAT, caps.flows)
            .map_max_entries(MAP_FLOW_CACHE, system::flow_cache_entries()?);
        let pin_paths: Vec<(&'static str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                system::prepare_pin_dir(dir)?;
                replace_stale_pins(dir, options)?;
                expected_shapes(options)
                    .into_iter()
                    .map(|(name, _)| (name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(DATAPLANE_OBJECT)
            .map_err(|e| load_error(DATAPLANE_OBJECT_NAME, e))?;
        let program: &mut Xdp = program_mut(&mut ebpf, PROG_XDP_INGRESS)?;
        retry_eagain(|| program.load()).map_err(|e| program_load_error(PROG_XDP_INGRESS, e))?;
        let egress: &mut SchedClassifier = program_mut(&mut ebpf, PROG_TC_EGRESS)?;
        retry_eagain(|| egress.load()).map_err(|e| program_load_error(PROG_TC_EGRESS, e))?;
        if !tcx_available() {
            tracing::info!(
                event = "kernelFeatureMissing",
                feature = "TCX links (Linux 6.6)",
                kernel = %KernelVersion::current().map_or("unknown".to_string(), |v| v.to_string()),
                fallback = "the TC egress program is a cls_bpf filter in a clsact qdisc, left in place over restarts",
            );
        }
        tracing::info!(
            event = "dataplaneLoaded",
            pin_dir = ?options.pin_dir,
            l2_vips_capacity = options.l2_vips_capacity,
            services = caps.services,
            backends = caps.backends,
            flows = caps.flows,
            maglev_table_size = options.maglev_table_size
        );
        let mut dataplane = Self {
            ebpf,
            pin_dir: options.pin_dir.clone(),
            attached: BTreeMap::new(),
            capacities: caps,
            table_size: options.maglev_table_size,
            registry: services::Registry::default(),
            link_dir: match (&options.pin_dir, options.pin_links) {
                (Some(dir), true) => Some(dir.join("links")),
                _ => None,
            },
            adopted: false,
            ifaces_written: None,
            l2_written: None,
            tunnels: None,
        };
        if options.pin_dir.is_some() {
            dataplane.recover_registry()?;
        }
        Ok(dataplane)
    }

    fn egress_mut(&mut self) -> Result<&mut SchedClassifier> {
        program_mut(&mut self.ebpf, PROG_TC_EGRESS)
    }

    fn egress(&self) -> Result<&SchedClassifier> {
        program(&self.ebpf, PROG_TC_EGRESS)
    }

    /// Removes the flows closed from both sides longer than `grace` ago (see [`flows`]);
    /// returns the census of what stays and how many went. `sluice run` and the speaker sweep
    /// their pinned maps with [`flows::spawn_sweeper`].
    pub fn sweep_closed_flows(
        &mut self,
        grace: std::time::Duration,
    ) -> Result<(flows::FlowCensus, usize)> {
        let (mut conntrack, mut reverse_nat, mut backends) = (None, None, None);
        for (name, map) in self.ebpf.maps_mut() {
            match name {
                MAP_CONNTRACK => conntrack = Some(map),
                MAP_REVERSE_NAT => reverse_nat = Some(map),
                MAP_BACKENDS => backends = Some(map),
                _ => {}
            }
        }
        let mut conntrack: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(conntrack.ok_or(DataplaneError::MissingMap(MAP_CONNTRACK))?)
                .map_err(map_error(MAP_CONNTRACK))?;
        let mut reverse_nat: HashMap<&mut MapData, FlowKey, lb_common::ReverseNatValue> =
            HashMap::try_from(reverse_nat.ok_or(DataplaneError::MissingMap(MAP_REVERSE_NAT))?)
                .map_err(map_error(MAP_REVERSE_NAT))?;
        let backends: aya::maps::Array<&mut MapData, lb_common::BackendValue> =
            aya::maps::Array::try_from(backends.ok_or(DataplaneError::MissingMap(MAP_BACKENDS))?)
                .map_err(map_error(MAP_BACKENDS))?;
        Ok(flows::sweep(
            &mut conntrack,
            &mut reverse_nat,
            &backends,
            monotonic_ns(),
            grace,
        ))
    }

    fn conntrack(&self) -> Result<HashMap<&MapData, FlowKey, FlowValue>> {
        let map = self
            .ebpf
            .map(MAP_CONNTRACK)
            .ok_or(DataplaneError::MissingMap(MAP_CONNTRACK))?;
        HashMap::try_from(map).map_err(map_error(MAP_CONNTRACK))
    }

    /// Tracked flows by state (walks the map: for inspection, not hot paths).
    pub fn flow_census(&self) -> Result<flows::FlowCensus> {
        Ok(flows::census(&self.conntrack()?))
    }

    /// Number of flows in the connection table (walks the map: for inspection, not hot paths).
    pub fn flow_count(&self) -> Result<usize> {
        Ok(self.conntrack()?.keys().filter(|k| k.is_ok()).count())
    }

    /// Runs the TC egress program once on `frame` (BPF_PROG_TEST_RUN); returns the frame after.
    pub fn run_egress(&self, frame: &[u8]) -> Result<Vec<u8>> {
        Ok(test_run_tc(self.egress()?, PROG_TC_EGRESS, frame, 1)?.0)
    }

    fn ingress(&self) -> Result<&Xdp> {
        program(&self.ebpf, PROG_XDP_INGRESS)
    }

    fn ingress_mut(&mut self) -> Result<&mut Xdp> {
        program_mut(&mut self.ebpf, PROG_XDP_INGRESS)
    }

    /// Lets the balancer redirect flows out of `ifindex` in XDP. Done automatically for every
    /// interface that is not a veth; a veth only qualifies when its peer runs an XDP program
    /// (otherwise the kernel silently drops redirected frames), which only the operator knows.
    pub fn allow_redirect(&mut self, ifindex: u32) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(MAP_REDIRECT_TARGETS)
            .ok_or(DataplaneError::MissingMap(MAP_REDIRECT_TARGETS))?;
        let mut targets: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(map).map_err(map_error(MAP_REDIRECT_TARGETS))?;
        targets
            .insert(ifindex, 1, 0)
            .map_err(map_error(MAP_REDIRECT_TARGETS))?;
        tracing::debug!(event = "redirectTargetAllowed", ifindex);
        Ok(())
    }

    /// Allows redirects to every interface of this network namespace that is not a veth or
    /// loopback. Returns the interfaces allowed.
    pub fn allow_redirect_to_physical(&mut self) -> Result<Vec<String>> {
        let mut allowed = Vec::new();
        for (name, ifindex) in interfaces() {
            if name == "lo" || driver(&name).as_deref() == Some("veth") {
                continue;
            }
            self.allow_redirect(ifindex)?;
            allowed.push(name);
        }
        Ok(allowed)
    }

    /// Attaches the ingress program to every interface, or to none: if one attach fails, the
    /// ones done by this call are detached again and the error names the interface.
    pub fn attach_all(&mut self, interfaces: &[Interface]) -> Result<()> {
        let allowed = self.allow_redirect_to_physical()?;
        tracing::info!(event = "redirectTargets", interfaces = ?allowed);
        let mut done = Vec::new();
        for iface in interfaces {
            if self.attached.contains_key(&iface.ifindex) {
                continue;
            }
            match self.attach_one(iface) {
                Ok(()) => done.push(iface.ifindex),
                Err(error) => {
                    for ifindex in done {
                        self.detach(ifindex);
                    }
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    fn attach_one(&mut self, iface: &Interface) -> Result<()> {
        let attach_error = |source| DataplaneError::Attach {
            interface: iface.name.clone(),
            source,
        };
        let link_paths = self
            .link_dir
            .as_ref()
            .map(|dir| link_pin_paths(dir, &iface.name));
        if let Some((xdp_path, tc_path)) = &link_paths {
            if let Some(attachment) = self.adopt(iface, xdp_path, tc_path) {
                self.attached.insert(iface.ifindex, attachment);
                self.adopted = true;
                tracing::info!(event = "xdpAdopted", interface = %iface.name, ifindex = iface.ifindex);
                return self.write_ifaces();
            }
        }
        let program = self.ingress_mut()?;
        // Native (driver) mode where the driver (or every port of a bond) supports XDP; generic
        // (skb) mode elsewhere, with the reason kept for `inspect`.
        let (xdp, native, generic_reason) =
            match program.attach_to_if_index(iface.ifindex, XdpMode::Driver) {
                Ok(link) => (link, true, None),
                Err(native_error) => {
                    let reason = error_chain(&native_error);
                    let link = program
                        .attach_to_if_index(iface.ifindex, XdpMode::Skb)
                        .map_err(attach_error)?;
                    (link, false, Some(reason))
                }
            };
        let tc = match self.attach_tc(iface) {
            Ok(link) => link,
            Err(error) => {
                let _ = self.ingress_mut().map(|p| p.detach(xdp));
                return Err(error);
            }
        };
        let mut attachment = Attachment {
            name: iface.name.clone(),
            xdp,
            tc: Some(tc),
            native,
            generic_reason,
        };
        if let Some((xdp_path, tc_path)) = &link_paths {
            attachment = self.pin_links(attachment, xdp_path, tc_path)?;
        }
        tracing::info!(
            event = "xdpAttached",
            interface = %iface.name,
            ifindex = iface.ifindex,
            mode = if attachment.native { "native" } else { "generic" },
            generic_reason = attachment.generic_reason.as_deref().unwrap_or(""),
        );
        self.attached.insert(iface.ifindex, attachment);
        self.write_ifaces()
    }

    /// The TC egress program on an interface: a TCX link from Linux 6.6; before that a
    /// netlink filter in a clsact qdisc, at Sluice's own priority and handle, so that the next
    /// data plane finds it and swaps its program in (a filter left by an earlier one is reused).
    fn attach_tc(&mut self, iface: &Interface) -> Result<SchedClassifierLinkId> {
        let attach_error = |source| DataplaneError::Attach {
            interface: iface.name.clone(),
            source,
        };
        if tcx_available() {
            return self
                .egress_mut()?
                .attach(&iface.name, TcAttachType::Egress)
                .map_err(attach_error);
        }
        if let Err(error) = tc::qdisc_add_clsact(&iface.name) {
            tracing::debug!(event = "clsactPresent", interface = %iface.name, %error);
        }
        if let Ok(link) = netlink_tc_link(&iface.name) {
            if let Ok(id) = self.egress_mut()?.attach_to_link(link) {
                return Ok(id);
            }
        }
        self.egress_mut()?
            .attach_with_options(
                &iface.name,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: TC_PRIORITY,
                    handle: TC_HANDLE,
                    ..NlOptions::default()
                }),
            )
            .map_err(attach_error)
    }

    /// Takes over links pinned by an earlier data plane on this interface, putting this one's
    /// programs in them (atomic `bpf_link_update`: no moment without a program; before Linux
    /// 6.6 the TC program replaces the earlier one in its netlink filter). `None` when there
    /// is nothing usable to adopt (stale pins are removed).
    fn adopt(&mut self, iface: &Interface, xdp_path: &Path, tc_path: &Path) -> Option<Attachment> {
        let tcx = tcx_available();
        if !xdp_path.exists() || (tcx && !tc_path.exists()) {
            let _ = std::fs::remove_file(xdp_path);
            let _ = std::fs::remove_file(tc_path);
            return None;
        }
        let result = (|| -> std::result::Result<Attachment, String> {
            let xdp_fd: FdLink = PinnedLink::from_pin(xdp_path)
                .map_err(|e| error_chain(&e))?
                .into();
            let tc_link = if tcx {
                let tc_fd: FdLink = PinnedLink::from_pin(tc_path)
                    .map_err(|e| error_chain(&e))?
                    .into();
                SchedClassifierLink::try_from(tc_fd).map_err(|e| error_chain(&e))?
            } else {
                netlink_tc_link(&iface.name).map_err(|e| e.to_string())?
            };
            let xdp_link = XdpLink::try_from(xdp_fd).map_err(|e| error_chain(&e))?;
            let xdp = self
                .ingress_mut()
                .map_err(|e| e.to_string())?
                .attach_to_link(xdp_link)
                .map_err(|e| error_chain(&e))?;
            let tc = self
                .egress_mut()
                .map_err(|e| e.to_string())?
                .attach_to_link(tc_link)
                .map_err(|e| error_chain(&e))?;
            let tc = if tcx {
                Some(tc)
            } else {
                self.leave_tc_filter(tc).map_err(|e| e.to_string())?;
                None
            };
            // The mode the earlier data plane attached in (it wrote it down).
            let native = self
                .iface_entry(iface.ifindex)
                .is_some_and(|e| e.flags & lb_common::IFACE_NATIVE != 0);
            Ok(Attachment {
                name: iface.name.clone(),
                xdp,
                tc,
                native,
                generic_reason: None,
            })
        })();
        match result {
            Ok(attachment) => Some(attachment),
            Err(error) => {
                tracing::warn!(event = "staleLinksRemoved", interface = %iface.name, %error);
                let _ = std::fs::remove_file(xdp_path);
                let _ = std::fs::remove_file(tc_path);
                None
            }
        }
    }

    /// Takes a netlink TC filter's link from the program and leaves it be: it stays in the
    /// interface's clsact qdisc when this process exits (dropping the link would delete it).
    fn leave_tc_filter(&mut self, tc: SchedClassifierLinkId) -> Result<()> {
        let link = self
            .egress_mut()?
            .take_link(tc)
            .map_err(|source| DataplaneError::Program {
                program: PROG_TC_EGRESS,
                source,
            })?;
        std::mem::forget(link);
        Ok(())
    }

    /// Pins both links of an attachment and gives them back to the programs. On failure the
    /// links taken so far are dropped, which detaches them (nothing pins them). Before Linux
    /// 6.6 the TC program is a netlink filter, which has no link to pin: it is left in place.
    fn pin_links(
        &mut self,
        attachment: Attachment,
        xdp_path: &Path,
        tc_path: &Path,
    ) -> Result<Attachment> {
        let Attachment {
            name,
            xdp,
            tc,
            native,
            generic_reason,
        } = attachment;
        let tcx = tcx_available();
        let result =
            (|| -> std::result::Result<(XdpLinkId, Option<SchedClassifierLinkId>), String> {
                if let Some(dir) = xdp_path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                }
                let xdp_link = self
                    .ingress_mut()
                    .map_err(|e| e.to_string())?
                    .take_link(xdp)
                    .map_err(|e| error_chain(&e))?;
                let xdp_fd = FdLink::try_from(xdp_link).map_err(|e| error_chain(&e))?;
                let xdp_fd: FdLink = xdp_fd
                    .pin(xdp_path)
                    .map_err(|e| pin_failure(xdp_path, &e))?
                    .into();
                let xdp = self
                    .ingress_mut()
                    .map_err(|e| e.to_string())?
                    .attach_to_link(XdpLink::try_from(xdp_fd).map_err(|e| error_chain(&e))?)
                    .map_err(|e| error_chain(&e))?;
                let Some(tc) = tc else {
                    return Ok((xdp, None));
                };
                if !tcx {
                    self.leave_tc_filter(tc).map_err(|e| e.to_string())?;
                    return Ok((xdp, None));
                }
                let tc_link = self
                    .egress_mut()
                    .map_err(|e| e.to_string())?
                    .take_link(tc)
                    .map_err(|e| error_chain(&e))?;
                let tc_fd = FdLink::try_from(tc_link).map_err(|e| error_chain(&e))?;
                let tc_fd: FdLink = tc_fd
                    .pin(tc_path)
                    .map_err(|e| pin_failure(tc_path, &e))?
                    .into();
                let tc = self
                    .egress_mut()
                    .map_err(|e| e.to_string())?
                    .attach_to_link(
                        SchedClassifierLink::try_from(tc_fd).map_err(|e| error_chain(&e))?,
                    )
                    .map_err(|e| error_chain(&e))?;
                Ok((xdp, Some(tc)))
            })();
        match result {
            Ok((xdp, tc)) => Ok(Attachment {
                name,
                xdp,
                tc,
                native,
                generic_reason,
            }),
            Err(reason) => {
                let _ = std::fs::remove_file(xdp_path);
                let _ = std::fs::remove_file(tc_path);
                Err(DataplaneError::PinLink {
                    interface: name,
                    reason,
                })
            }
        }
    }

    /// Detaches the ingress program from one interface (no-op if it is not attached).
    pub fn detach(&mut self, ifindex: u32) {
        if let Some(Attachment { name, xdp, tc, .. }) = self.attached.remove(&ifindex) {
            if let Some(dir) = &self.link_dir {
                let (xdp_path, tc_path) = link_pin_paths(dir, &name);
                let _ = std::fs::remove_file(xdp_path);
                let _ = std::fs::remove_file(tc_path);
            }
            match tc {
                Some(tc) => {
                    if let Ok(program) = self.egress_mut() {
                        if let Err(error) = program.detach(tc) {
                            tracing::warn!(event = "tcDetachFailed", interface = %name, %error);
                        }
                    }
                }
                None => remove_tc_filter(&name),
            }
            if let Ok(program) = self.ingress_mut() {
                if let Err(error) = program.detach(xdp) {
                    tracing::warn!(event = "xdpDetachFailed", interface = %name, %error);
                    return;
                }
            }
            if let Err(error) = self.write_ifaces() {
                tracing::warn!(event = "interfaceTableNotWritten", %error);
            }
            tracing::info!(event = "xdpDetached", interface = %name, ifindex);
        }
    }

    /// Every interface the program runs on, as it must see them (see [`ifaces`]): the attached
    /// ones and their bonds' ports, with the bonds' current active ports.
    fn desired_ifaces(&self) -> ifaces::Table {
        let entries: Vec<lb_common::IfaceEntry> = self
            .attached
            .iter()
            .flat_map(|(ifindex, a)| {
                let mac = system::interface(&a.name)
                    .map(|i| i.mac)
                    .unwrap_or_default();
                ifaces::entries(&ifaces::Attached {
                    ifindex: *ifindex,
                    mac,
                    bridge_mac: ifaces::read_bridge_mac(&a.name),
                    native: a.native,
                    bond: ifaces::read_bond(&a.name),
                })
            })
            .collect();
        ifaces::plan(&entries)
    }

    /// Writes the interface table where it changed.
    fn write_ifaces(&mut self) -> Result<()> {
        self.refresh_interfaces().map(|_| ())
    }

    /// Reads the attached interfaces' facts again (a bond's ports and its active port, an
    /// interface's MAC) and writes what changed: a bond's failover moves its ARP/NDP answers
    /// to the new active port. Cheap when nothing changed (sysfs reads only); the daemons call
    /// it every [`INTERFACE_REFRESH`]. Returns true when the table changed.
    pub fn refresh_interfaces(&mut self) -> Result<bool> {
        let want = self.desired_ifaces();
        if self.ifaces_written.as_ref() == Some(&want) {
            return Ok(false);
        }
        let had = self.ifaces_written.take();
        let (mut slots_map, mut shared_map) = (None, None);
        for (name, map) in self.ebpf.maps_mut() {
            match name {
                lb_common::MAP_IFACES => slots_map = Some(map),
                lb_common::MAP_IFACES_SHARED => shared_map = Some(map),
                _ => {}
            }
        }
        let slots_map = slots_map.ok_or(DataplaneError::MissingMap(lb_common::MAP_IFACES))?;
        let shared_map =
            shared_map.ok_or(DataplaneError::MissingMap(lb_common::MAP_IFACES_SHARED))?;
        let mut slots =
            aya::maps::Array::try_from(slots_map).map_err(map_error(lb_common::MAP_IFACES))?;
        let mut shared =
            HashMap::try_from(shared_map).map_err(map_error(lb_common::MAP_IFACES_SHARED))?;
        let result = ifaces::write(&mut slots, &mut shared, had.as_ref(), &want);
        result?;
        if had.is_some() {
            tracing::info!(
                event = "interfacesChanged",
                standby_ports = ?want
                    .slots
                    .values()
                    .chain(want.shared.values())
                    .filter(|e| e.flags & lb_common::IFACE_STANDBY != 0)
                    .filter_map(|e| interface_name(e.ifindex))
                    .collect::<Vec<_>>(),
            );
        }
        self.ifaces_written = Some(want);
        Ok(true)
    }

    /// What the program left alone on an interface (summed over CPUs; interfaces sharing a
    /// slot count together).
    pub fn interface_stats(&self, ifindex: u32) -> Result<lb_common::IfaceStats> {
        let map = self
            .ebpf
            .map(lb_common::MAP_IFACE_STATS)
            .ok_or(DataplaneError::MissingMap(lb_common::MAP_IFACE_STATS))?;
        let stats: PerCpuArray<&MapData, lb_common::IfaceStats> =
            PerCpuArray::try_from(map).map_err(map_error(lb_common::MAP_IFACE_STATS))?;
        Ok(ifaces::read_stats(&stats, ifindex))
    }

    /// This data plane's entry for an interface, as written (by this process or the last).
    fn iface_entry(&self, ifindex: u32) -> Option<lb_common::IfaceEntry> {
        let map = self.ebpf.map(lb_common::MAP_IFACES)?;
        let slots: aya::maps::Array<&MapData, lb_common::IfaceEntry> =
            aya::maps::Array::try_from(map).ok()?;
        let entry = slots.get(&lb_common::iface_slot(ifindex), 0).ok()?;
        (entry.ifindex == ifindex).then_some(entry)
    }

    /// This process took over pinned links from an earlier one, which kept forwarding while it
    /// restarted (BGP graceful restart says so to the routers).
    pub fn adopted_links(&self) -> bool {
        self.adopted
    }

    /// The interfaces the ingress program is attached to, by ifindex.
    pub fn attached(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attached
            .iter()
            .map(|(ifindex, a)| (*ifindex, a.name.as_str()))
    }

    fn l2_vips_map(&mut self) -> Result<HashMap<&mut MapData, L2VipKey, L2VipValue>> {
        let map = self
            .ebpf
            .map_mut(MAP_L2_VIPS)
            .ok_or(DataplaneError::MissingMap(MAP_L2_VIPS))?;
        HashMap::try_from(map).map_err(map_error(MAP_L2_VIPS))
    }

    /// Makes `L2_VIPS` hold exactly `desired`: adds and updates first, then removes what is no
    /// longer wanted, so an IP that stays never has a moment without an answer.
    pub fn set_l2_vips(&mut self, desired: &[L2Vip]) -> Result<()> {
        for vip in desired {
            if let Err(error) = crate::config::validate_service_ip("L2 VIP", vip.ip) {
                return Err(DataplaneError::InvalidVip {
                    ip: vip.ip,
                    reason: error.to_string(),
                });
            }
        }
        // Compared with what was last written, not read back entry by entry (5,000 VIPs are
        // 10,000 syscalls, on every pass).
        let current: BTreeSet<L2Vip> = match self.l2_written.take() {
            Some(written) => written,
            None => self.l2_vips()?.into_iter().collect(),
        };
        let wanted: BTreeSet<L2Vip> = desired.iter().copied().collect();
        let wanted_keys: BTreeSet<[u8; 24]> =
            wanted.iter().map(|v| bytemuck::cast(v.key())).collect();
        let mut map = self.l2_vips_map()?;
        for vip in wanted.difference(&current) {
            let value = L2VipValue {
                mac: vip.mac,
                _pad: [0; 2],
            };
            map.insert(vip.key(), value, 0)
                .map_err(map_error(MAP_L2_VIPS))?;
            tracing::info!(event = "l2VipAdded", ip = %vip.ip, ifindex = vip.ifindex, mac = %format_mac(&vip.mac));
        }
        for vip in current.iter() {
            let key_bytes: [u8; 24] = bytemuck::cast(vip.key());
            if !wanted_keys.contains(&key_bytes) {
                map.remove(&vip.key()).map_err(map_error(MAP_L2_VIPS))?;
                tracing::info!(event = "l2VipRemoved", ip = %vip.ip, ifindex = vip.ifindex);
            }
        }
        self.l2_written = Some(wanted);
        Ok(())
    }

    /// Bounds how long the program keeps answering ARP/NDP: `Some(d)` answers for `d` from now
    /// (and no longer, unless renewed), `None` answers with no deadline. A speaker renews it
    /// while it is alive ([`L2DeadlineKeeper`]), so a dead speaker's node falls silent by itself.
    pub fn set_l2_deadline(&mut self, within: Option<std::time::Duration>) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(lb_common::MAP_L2_DEADLINE)
            .ok_or(DataplaneError::MissingMap(lb_common::MAP_L2_DEADLINE))?;
        let mut array: aya::maps::Array<&mut MapData, u64> =
            aya::maps::Array::try_from(map).map_err(map_error(lb_common::MAP_L2_DEADLINE))?;
        write_deadline(&mut array, within)
    }

    /// How long the ARP/NDP answers have left: `None` without a deadline, zero once past it.
    pub fn l2_time_left(&self) -> Result<Option<std::time::Duration>> {
        let map = self
            .ebpf
            .map(lb_common::MAP_L2_DEADLINE)
            .ok_or(DataplaneError::MissingMap(lb_common::MAP_L2_DEADLINE))?;
        let array: aya::maps::Array<&MapData, u64> =
            aya::maps::Array::try_from(map).map_err(map_error(lb_common::MAP_L2_DEADLINE))?;
        let deadline = array
            .get(&0, 0)
            .map_err(map_error(lb_common::MAP_L2_DEADLINE))?;
        Ok(time_left(deadline))
    }

    /// The IPs the program answers for, per interface, as the map holds them now.
    pub fn l2_vips(&mut self) -> Result<Vec<L2Vip>> {
        let map = self.l2_vips_map()?;
        read_l2_vips(&map)
    }

    /// Sets the flood guard: on each CPU, new flows past `new_flows_per_second` in a second
    /// are balanced but not tracked (0: no limit). See lb-common's `FloodSettings`.
    pub fn set_flood_guard(&mut self, new_flows_per_second: u64) -> Result<()> {
        let name = lb_common::MAP_FLOOD_SETTINGS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let mut array: aya::maps::Array<&mut MapData, lb_common::FloodSettings> =
            aya::maps::Array::try_from(map).map_err(map_error(name))?;
        array
            .set(
                0,
                lb_common::FloodSettings {
                    new_flows_per_second,
                },
                0,
            )
            .map_err(map_error(name))
    }

    /// The flood guard's counters, summed over CPUs.
    pub fn flood_stats(&self) -> Result<FloodStats> {
        let name = lb_common::MAP_FLOOD_STATE;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        read_flood(&PerCpuArray::try_from(map).map_err(map_error(name))?)
    }

    /// The outcome counters, summed over CPUs.
    pub fn stats(&self) -> Result<GlobalStats> {
        let map = self
            .ebpf
            .map(MAP_GLOBAL_STATS)
            .ok_or(DataplaneError::MissingMap(MAP_GLOBAL_STATS))?;
        let array = PerCpuArray::try_from(map).map_err(map_error(MAP_GLOBAL_STATS))?;
        read_stats(&array)
    }

    /// Runs the ingress program once on `frame` as if it had arrived on `ifindex`
    /// (BPF_PROG_TEST_RUN). The ifindex must name a device of the caller's network namespace.
    pub fn run_ingress(&self, ifindex: u32, frame: &[u8]) -> Result<RunOutcome> {
        let program = self.ingress()?;
        run_xdp(program, PROG_XDP_INGRESS, ifindex, frame)
    }
}

/// Borrows a program of the object as its concrete type; errors name the program.
fn program<'a, P>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a P>
where
    &'a P: TryFrom<&'a aya::programs::Program, Error = ProgramError>,
{
    ebpf.program(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            program: name,
            source,
        })
}

/// Mutable version of [`program`].
fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            program: name,
            source,
        })
}

/// Runs a program load again when the kernel says EAGAIN (a transient refusal, seen here under
/// load after the verifier had accepted the program), up to five times.
fn retry_eagain(
    mut load: impl FnMut() -> std::result::Result<(), ProgramError>,
) -> std::result::Result<(), ProgramError> {
    let mut attempt = 0;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::WouldBlock && attempt < 5 =>
            {
                attempt += 1;
                tracing::debug!(event = "programLoadRetried", attempt);
                std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
            }
            other => return other,
        }
    }
}

/// Turns a map error into one that names the map.
fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// The context BPF_PROG_TEST_RUN takes for XDP (`struct xdp_md`): data offsets and ifindexes.
fn xdp_md(ifindex: u32, len: usize) -> [u8; 24] {
    let fields: [u32; 6] = [0, len as u32, 0, ifindex, 0, 0];
    bytemuck::cast(fields)
}

/// One BPF_PROG_TEST_RUN of an XDP program, `repeat` times on the same buffer: what one run
/// did, and the kernel's mean nanoseconds per run.
fn test_run_xdp(
    program: &Xdp,
    name: &'static str,
    ifindex: u32,
    frame: &[u8],
    repeat: u32,
) -> Result<(RunOutcome, f64)> {
    let ctx = xdp_md(ifindex, frame.len());
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::default()
        })
        .map_err(|source| DataplaneError::Program {
            program: name,
            source,
        })?;
    out.truncate(result.data_size_out as usize);
    let outcome = RunOutcome {
        action: result.return_value.into(),
        frame: out,
    };
    Ok((outcome, result.duration.as_nanos() as f64))
}

fn run_xdp(program: &Xdp, name: &'static str, ifindex: u32, frame: &[u8]) -> Result<RunOutcome> {
    Ok(test_run_xdp(program, name, ifindex, frame, 1)?.0)
}

/// One BPF_PROG_TEST_RUN of a TC program, `repeat` times: the frame after one run, and the
/// kernel's mean nanoseconds per run.
fn test_run_tc(
    program: &SchedClassifier,
    name: &'static str,
    frame: &[u8],
    repeat: u32,
) -> Result<(Vec<u8>, f64)> {
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .map_err(|source| DataplaneError::Program {
            program: name,
            source,
        })?;
    out.truncate(result.data_size_out as usize);
    Ok((out, result.duration.as_nanos() as f64))
}

fn read_l2_vips<T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, L2VipKey, L2VipValue>,
) -> Result<Vec<L2Vip>> {
    let mut vips = Vec::new();
    for entry in map.iter() {
        let (key, value) = entry.map_err(map_error(MAP_L2_VIPS))?;
        vips.push(L2Vip::from_entry(&key, &value));
    }
    vips.sort();
    Ok(vips)
}

/// The flood guard's counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodStats {
    /// New flows balanced but not tracked (over the limit).
    pub untracked: u64,
    /// Windows (seconds, per CPU) in which the limit was reached.
    pub activations: u64,
}

fn read_flood<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, lb_common::FloodState>,
) -> Result<FloodStats> {
    let per_cpu = array
        .get(&0, 0)
        .map_err(map_error(lb_common::MAP_FLOOD_STATE))?;
    Ok(per_cpu
        .iter()
        .fold(FloodStats::default(), |sum, cpu| FloodStats {
            untracked: sum.untracked + cpu.untracked,
            activations: sum.activations + cpu.activations,
        }))
}

fn read_stats<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, GlobalStats>,
) -> Result<GlobalStats> {
    let per_cpu = array.get(&0, 0).map_err(map_error(MAP_GLOBAL_STATS))?;
    Ok(per_cpu
        .iter()
        .fold(GlobalStats::default(), |sum, cpu| sum.add(*cpu)))
}

fn write_deadline<T: std::borrow::BorrowMut<MapData>>(
    array: &mut aya::maps::Array<T, u64>,
    within: Option<std::time::Duration>,
) -> Result<()> {
    let deadline = match within {
        None => 0,
        Some(d) => monotonic_ns().saturating_add(d.as_nanos() as u64).max(1),
    };
    array
        .set(0, deadline, 0)
        .map_err(map_error(lb_common::MAP_L2_DEADLINE))
}

fn time_left(deadline: u64) -> Option<std::time::Duration> {
    (deadline != 0)
        .then(|| std::time::Duration::from_nanos(deadline.saturating_sub(monotonic_ns())))
}

/// Keeps the ARP/NDP answers' deadline `within` ahead of now, from a thread of its own (so a
/// busy or blocked speaker loop does not silence the node), until stopped or until the process
/// dies: then the pinned program stops answering `within` later by itself.
pub struct L2DeadlineKeeper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl L2DeadlineKeeper {
    /// Opens the pinned deadline under `pin_dir` and starts renewing it every quarter of
    /// `within`.
    pub fn start(pin_dir: &Path, within: std::time::Duration) -> Result<Self> {
        let path = pin_dir.join(lb_common::MAP_L2_DEADLINE);
        let data =
            MapData::from_pin(&path).map_err(|source| DataplaneError::Pinned { path, source })?;
        let mut array: aya::maps::Array<MapData, u64> =
            aya::maps::Array::try_from(Map::Array(data))
                .map_err(map_error(lb_common::MAP_L2_DEADLINE))?;
        write_deadline(&mut array, Some(within))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("l2-deadline".into())
            .spawn(move || {
                while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Err(error) = write_deadline(&mut array, Some(within)) {
                        tracing::warn!(event = "l2DeadlineNotRenewed", %error);
                    }
                    std::thread::sleep(within / 4);
                }
            })
            .map_err(|source| DataplaneError::PinDir {
                path: pin_dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops renewing (the deadline last written stands).
    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How often the daemons re-read the attached interfaces' facts ([`Dataplane::refresh_interfaces`]):
/// a bond's failover moves the ARP/NDP answers to its new active port within this.
pub const INTERFACE_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// The priority and handle of Sluice's TC egress filter in a clsact qdisc (before Linux 6.6):
/// fixed, so that the next data plane finds the filter and replaces its program.
const TC_PRIORITY: u16 = 0x5c1;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0x5c1);

/// TCX links (Linux 6.6): the TC program attaches as a link that can be pinned.
fn tcx_available() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Sluice's netlink TC filter on an interface (it may not exist).
fn netlink_tc_link(name: &str) -> std::io::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(name, TcAttachType::Egress, TC_PRIORITY, TC_HANDLE, None)
}

/// Deletes Sluice's netlink TC filter from an interface, if it is there.
fn remove_tc_filter(name: &str) {
    use aya::programs::links::Link;
    if let Ok(link) = netlink_tc_link(name) {
        if let Err(error) = link.detach() {
            tracing::debug!(event = "tcFilterAbsent", interface = %name, %error);
        }
    }
}

/// An error and every cause under it, on one line (aya's pin errors say "`BPF_OBJ_PIN`
/// failed" and keep the errno in their source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why pinning a link at `path` failed, with the cause spelled out.
fn pin_failure(path: &Path, error: &dyn std::error::Error) -> String {
    let mut text = format!("pinning {}: {}", path.display(), error_chain(error));
    if !path.parent().is_some_and(system::on_bpffs) {
        text.push_str(" (the directory is not on a bpffs mount)");
    }
    text
}

/// The bpffs file names of an interface's pinned links. Interface names may hold characters
/// bpffs refuses in a name (a dot: `eth0.100`, `vmbr0.50`): every byte outside
/// `[A-Za-z0-9_-]` is written `%XX`, so each name has one file and `eth0` keeps `xdp-eth0`.
pub fn link_pin_names(interface: &str) -> (String, String) {
    let mut encoded = String::new();
    for b in interface.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02x}"));
        }
    }
    (format!("xdp-{encoded}"), format!("tc-{encoded}"))
}

/// The interface a pinned link's file name is for (`xdp-eth0%2e100` → `eth0.100`).
pub fn link_pin_interface(file_name: &str) -> Option<String> {
    let encoded = file_name
        .strip_prefix("xdp-")
        .or_else(|| file_name.strip_prefix("tc-"))?;
    let bytes = encoded.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn link_pin_paths(dir: &Path, interface: &str) -> (PathBuf, PathBuf) {
    let (xdp, tc) = link_pin_names(interface);
    (dir.join(xdp), dir.join(tc))
}

/// Stops a data plane left running with pinned links: removes the pins under `<pin_dir>/links/`,
/// which detaches the programs once no process holds the links (before Linux 6.6, the TC
/// filters are deleted from their interfaces). Returns the links removed.
pub fn detach_pinned(pin_dir: &Path) -> Result<Vec<String>> {
    require_root()?;
    let dir = pin_dir.join("links");
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(_) => return Ok(removed),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|source| DataplaneError::PinDir {
            path: path.clone(),
            source,
        })?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if !tcx_available() && file_name.starts_with("xdp-") {
            if let Some(interface) = link_pin_interface(&file_name) {
                remove_tc_filter(&interface);
            }
        }
        removed.push(file_name);
    }
    removed.sort();
    Ok(removed)
}

/// Read-only view of a data plane's pinned maps, whether or not a daemon is running.
pub struct PinnedView {
    l2_vips: HashMap<MapData, L2VipKey, L2VipValue>,
    stats: PerCpuArray<MapData, GlobalStats>,
    services: HashMap<MapData, lb_common::ServiceKey, lb_common::ServiceValue>,
    backends: aya::maps::Array<MapData, lb_common::BackendValue>,
    service_stats: PerCpuArray<MapData, lb_common::TrafficStats>,
    backend_stats: PerCpuArray<MapData, lb_common::TrafficStats>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    l2_deadline: Option<aya::maps::Array<MapData, u64>>,
    flood: Option<PerCpuArray<MapData, lb_common::FloodState>>,
    tunnel_peers:
        Option<aya::maps::PerCpuHashMap<MapData, lb_common::NodeKey, lb_common::TunnelStats>>,
    tunnel_slots: Option<PerCpuArray<MapData, lb_common::TunnelSlot>>,
    ifaces: Option<aya::maps::Array<MapData, lb_common::IfaceEntry>>,
    ifaces_shared: Option<HashMap<MapData, u32, lb_common::IfaceEntry>>,
    iface_stats: Option<PerCpuArray<MapData, lb_common::IfaceStats>>,
}

/// An interface the XDP program runs on, for `inspect`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceView {
    pub ifindex: u32,
    pub name: Option<String>,
    /// "native" or "generic".
    pub mode: &'static str,
    /// "bond", "bridge", "vlan", or the driver ("veth", "ixgbe", ...).
    pub kind: String,
    /// A bond's port: the bond it answers for.
    pub port_of: Option<String>,
    /// A bond's standby port (active-backup): everything passes, the bond drops it.
    pub standby: bool,
    /// Generic mode: why, and what it costs.
    pub note: Option<&'static str>,
    /// Frames to another host's MAC, passed untouched.
    pub other_host_frames: u64,
    /// Frames that arrived on it while a standby port.
    pub standby_frames: u64,
}

impl PinnedView {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        require_root()?;
        let open = |name: &'static str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path).map_err(|source| DataplaneError::Pinned { path, source })
        };
        let l2_vips =
            HashMap::try_from(Map::HashMap(open(MAP_L2_VIPS)?)).map_err(map_error(MAP_L2_VIPS))?;
        let stats = PerCpuArray::try_from(Map::PerCpuArray(open(MAP_GLOBAL_STATS)?))
            .map_err(map_error(MAP_GLOBAL_STATS))?;
        Ok(Self {
            l2_vips,
            stats,
            services: HashMap::try_from(Map::HashMap(open(MAP_SERVICES)?))
                .map_err(map_error(MAP_SERVICES))?,
            backends: aya::maps::Array::try_from(Map::Array(open(MAP_BACKENDS)?))
                .map_err(map_error(MAP_BACKENDS))?,
            service_stats: PerCpuArray::try_from(Map::PerCpuArray(open(MAP_SERVICE_STATS)?))
                .map_err(map_error(MAP_SERVICE_STATS))?,
            backend_stats: PerCpuArray::try_from(Map::PerCpuArray(open(MAP_BACKEND_STATS)?))
                .map_err(map_error(MAP_BACKEND_STATS))?,
            conntrack: HashMap::try_from(Map::LruHashMap(open(MAP_CONNTRACK)?))
                .map_err(map_error(MAP_CONNTRACK))?,
            // Absent in pin directories of versions before the deadline existed.
            l2_deadline: open(lb_common::MAP_L2_DEADLINE)
                .ok()
                .and_then(|m| aya::maps::Array::try_from(Map::Array(m)).ok()),
            // Absent in pin directories of versions before the flood guard.
            flood: open(lb_common::MAP_FLOOD_STATE)
                .ok()
                .and_then(|m| PerCpuArray::try_from(Map::PerCpuArray(m)).ok()),
            // Absent in pin directories of versions before cluster-wide balancing.
            tunnel_peers: open(lb_common::MAP_TUNNEL_PEERS)
                .ok()
                .and_then(|m| aya::maps::PerCpuHashMap::try_from(Map::PerCpuHashMap(m)).ok()),
            // Absent in pin directories of versions before the tunnel slots.
            tunnel_slots: open(lb_common::MAP_TUNNEL_SLOTS)
                .ok()
                .and_then(|m| PerCpuArray::try_from(Map::PerCpuArray(m)).ok()),
            // Absent in pin directories of versions before the interface table.
            ifaces: open(lb_common::MAP_IFACES)
                .ok()
                .and_then(|m| aya::maps::Array::try_from(Map::Array(m)).ok()),
            ifaces_shared: open(lb_common::MAP_IFACES_SHARED)
                .ok()
                .and_then(|m| HashMap::try_from(Map::HashMap(m)).ok()),
            iface_stats: open(lb_common::MAP_IFACE_STATS)
                .ok()
                .and_then(|m| PerCpuArray::try_from(Map::PerCpuArray(m)).ok()),
        })
    }

    /// The interfaces the program runs on: mode, kind, bond ports, what was left alone.
    pub fn interfaces(&self) -> Vec<InterfaceView> {
        let Some(slots) = &self.ifaces else {
            return Vec::new();
        };
        ifaces::read(slots, self.ifaces_shared.as_ref())
            .into_iter()
            .map(|e| {
                let name = interface_name(e.ifindex);
                let kind = name
                    .as_deref()
                    .map(ifaces::kind)
                    .unwrap_or_else(|| "device".into());
                let native = e.flags & lb_common::IFACE_NATIVE != 0;
                let stats = self
                    .iface_stats
                    .as_ref()
                    .map(|s| ifaces::read_stats(s, e.ifindex))
                    .unwrap_or_default();
                InterfaceView {
                    ifindex: e.ifindex,
                    name,
                    mode: if native { "native" } else { "generic" },
                    port_of: (e.flags & lb_common::IFACE_BOND_PORT != 0)
                        .then(|| interface_name(e.l2_ifindex))
                        .flatten(),
                    standby: e.flags & lb_common::IFACE_STANDBY != 0,
                    note: (!native).then(|| ifaces::generic_note(&kind)),
                    kind,
                    other_host_frames: stats.other_host,
                    standby_frames: stats.standby,
                }
            })
            .collect()
    }

    /// The packets each other node tunnelled here (none before cluster-wide balancing).
    pub fn tunnel_peers(&self) -> Result<Vec<(IpAddr, lb_common::TunnelStats)>> {
        match &self.tunnel_peers {
            Some(map) => tunnels::read_peers(map, self.tunnel_slots.as_ref()),
            None => Ok(Vec::new()),
        }
    }

    /// The flood guard's counters (`None` before the flood guard existed).
    pub fn flood_stats(&self) -> Option<FloodStats> {
        read_flood(self.flood.as_ref()?).ok()
    }

    /// How long the ARP/NDP answers have left: `None` without a deadline, zero once past it.
    pub fn l2_time_left(&self) -> Option<std::time::Duration> {
        time_left(self.l2_deadline.as_ref()?.get(&0, 0).ok()?)
    }

    /// Services with their active backends and counters.
    pub fn services(&self) -> Result<Vec<ServiceStats>> {
        services::read_services(
            &self.services,
            &self.backends,
            &self.service_stats,
            &self.backend_stats,
        )
    }

    /// Tracked flows by state.
    pub fn flow_census(&self) -> flows::FlowCensus {
        flows::census(&self.conntrack)
    }

    /// Up to `limit` tracked flows, with their backends and nodes.
    pub fn flows(&self, limit: usize) -> Vec<flows::TrackedFlow> {
        flows::list(&self.conntrack, &self.backends, limit)
    }

    pub fn l2_vips(&self) -> Result<Vec<L2Vip>> {
        read_l2_vips(&self.l2_vips)
    }

    pub fn stats(&self) -> Result<GlobalStats> {
        read_stats(&self.stats)
    }
}

/// A program the kernel would not load: for want of a capability (EPERM, no verifier log), or
/// rejected by the verifier.
fn rejected(program: &str, io_error: std::io::Error, log: String) -> DataplaneError {
    if io_error.raw_os_error() == Some(libc::EPERM) && log.trim().is_empty() {
        DataplaneError::LoadNotPermitted {
            program: program.to_string(),
        }
    } else {
        DataplaneError::VerifierRejected {
            program: program.to_string(),
            io_error,
            log,
        }
    }
}

fn load_error(object: &'static str, error: EbpfError) -> DataplaneError {
    match error {
        EbpfError::ProgramError(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => rejected(object, io_error, verifier_log.to_string()),
        other => DataplaneError::Load {
            object,
            source: Box::new(other),
        },
    }
}

fn program_load_error(program: &'static str, error: ProgramError) -> DataplaneError {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => rejected(program, io_error, verifier_log.to_string()),
        source => DataplaneError::Program { program, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_run_context_names_the_ingress_ifindex_and_frame_length() {
        let ctx = xdp_md(7, 60);
        let fields: [u32; 6] = bytemuck::cast(ctx);
        assert_eq!(fields, [0, 60, 0, 7, 0, 0]);
    }

    #[test]
    fn pinned_maps_of_another_layout_or_capacity_are_stale_and_missing_ones_are_not() {
        let options = DataplaneOptions::default();
        let expected = expected_shapes(&options);
        let same: Vec<(&str, MapShape)> = expected.to_vec();
        assert!(stale_pins(&expected, &same).is_empty());
        assert!(stale_pins(&expected, &[]).is_empty());

        let (_, stats) = expected
            .iter()
            .find(|(n, _)| *n == MAP_GLOBAL_STATS)
            .unwrap();
        let older = MapShape {
            value_size: stats.value_size - 24,
            ..*stats
        };
        let stale = stale_pins(&expected, &[(MAP_GLOBAL_STATS, older)]);
        assert_eq!(stale.len(), 1);
        assert!(
            stale[0].starts_with("GLOBAL_STATS: pinned with key 4 B, value 96 B"),
            "{stale:?}"
        );

        let (_, flows) = expected.iter().find(|(n, _)| *n == MAP_CONNTRACK).unwrap();
        let smaller = MapShape {
            max_entries: flows.max_entries / 2,
            ..*flows
        };
        let stale = stale_pins(&expected, &[(MAP_CONNTRACK, smaller)]);
        assert!(stale[0].contains("entries"), "{stale:?}");
        // A name this build does not pin is not judged.
        assert!(stale_pins(&expected, &[("OTHER", smaller)]).is_empty());
    }

    #[test]
    fn l2_vip_round_trips_through_its_map_key() {
        for ip in ["198.51.100.7", "2001:db8::7"] {
            let vip = L2Vip {
                ifindex: 3,
                ip: ip.parse().unwrap(),
                mac: [2, 0, 0, 0, 0, 1],
            };
            let value = L2VipValue {
                mac: vip.mac,
                _pad: [0; 2],
            };
            assert_eq!(L2Vip::from_entry(&vip.key(), &value), vip);
        }
    }

    #[test]
    fn xdp_action_codes_map_to_names() {
        assert_eq!(XdpAction::from(2), XdpAction::Pass);
        assert_eq!(XdpAction::from(3), XdpAction::Tx);
        assert_eq!(XdpAction::from(9), XdpAction::Other(9));
    }
}
