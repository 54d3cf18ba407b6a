//! Every map of the data plane object, in one place. BTF maps, so `bpftool map dump` prints the
//! field names of lb-common's key and value types. User space pins them under /sys/fs/bpf/sluice/
//! and sets their capacities at load time (the sizes here are the defaults).

use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    macros::btf_map,
};
use lb_common::{
    BackendValue, FloodSettings, FloodState, FlowCacheEntry, FlowKey, FlowValue, GlobalStats,
    IfaceEntry, IfaceStats, L2VipKey, L2VipValue, NodeKey, ReverseCacheEntry, ReverseNatValue,
    ServiceKey, ServiceValue, TraceEvent, TraceFilter, TrafficStats, TunnelSettings, TunnelSlot,
    TunnelStats, BACKENDS_DEFAULT_CAPACITY, BPF_F_INNER_MAP, BPF_F_MMAPABLE,
    FLOWS_DEFAULT_CAPACITY, FLOW_CACHE_SLOTS, IFACES_SHARED_CAPACITY, IFACE_SLOTS,
    L2_VIPS_DEFAULT_CAPACITY, MAGLEV_TEMPLATE_SIZE, REDIRECT_TARGETS_CAPACITY,
    SERVICES_DEFAULT_CAPACITY, TRACE_EVENTS_BYTES, TUNNEL_PEERS_CAPACITY,
    TUNNEL_SLOTS as TUNNEL_SLOTS_LEN, VIP_FILTER_SLOTS,
};

/// (ifindex, IP) → MAC to answer ARP/NDP with. No entry for an ifindex: no answer there.
#[btf_map]
pub static L2_VIPS: HashMap<L2VipKey, L2VipValue, { L2_VIPS_DEFAULT_CAPACITY as usize }> =
    HashMap::new();

/// Deadline of the ARP/NDP answers (`bpf_ktime_get_ns` nanoseconds; 0: none). The speaker
/// pushes it forward while it is alive; see lb-common.
#[btf_map]
pub static L2_DEADLINE: Array<u64, 1> = Array::new();

/// Outcome counters, one slot, one copy per CPU.
#[btf_map]
pub static GLOBAL_STATS: PerCpuArray<GlobalStats, 1> = PerCpuArray::new();

/// (VIP, port, protocol) → service id and Maglev table size.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { SERVICES_DEFAULT_CAPACITY as usize }> =
    HashMap::new();

/// Backend id → address, port, owner and generation.
#[btf_map]
pub static BACKENDS: Array<BackendValue, { BACKENDS_DEFAULT_CAPACITY as usize }> = Array::new();

/// Service id → its Maglev table (M backend ids). Inner maps are created by user space with
/// `BPF_F_INNER_MAP`, so M may differ from the template's size, and `BPF_F_MMAPABLE`, so a
/// whole table is written through one mapping.
#[btf_map]
pub static MAGLEV: ArrayOfMaps<
    Array<u32, { MAGLEV_TEMPLATE_SIZE as usize }, { (BPF_F_INNER_MAP | BPF_F_MMAPABLE) as usize }>,
    { SERVICES_DEFAULT_CAPACITY as usize },
> = ArrayOfMaps::new();

/// Client → VIP 5-tuple → backend and next hop.
#[btf_map]
pub static CONNTRACK: LruHashMap<FlowKey, FlowValue, { FLOWS_DEFAULT_CAPACITY as usize }> =
    LruHashMap::new();

/// Backend → client 5-tuple → the VIP and port replies must come from.
#[btf_map]
pub static REVERSE_NAT: LruHashMap<FlowKey, ReverseNatValue, { FLOWS_DEFAULT_CAPACITY as usize }> =
    LruHashMap::new();

/// Per-service traffic counters of backends that left, indexed by service id: written by user
/// space only (see lb-common's `MAP_SERVICE_STATS`).
#[btf_map]
pub static SERVICE_STATS: PerCpuArray<TrafficStats, { SERVICES_DEFAULT_CAPACITY as usize }> =
    PerCpuArray::new();

/// Per-backend traffic counters, indexed by backend id.
#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats, { BACKENDS_DEFAULT_CAPACITY as usize }> =
    PerCpuArray::new();

/// Services per VIP slot: the inlined first test of every TCP/UDP packet (see lb-common).
#[btf_map]
pub static VIP_FILTER: Array<u32, { VIP_FILTER_SLOTS as usize }> = Array::new();

/// Interfaces the program may redirect to (see lb-common).
#[btf_map]
pub static REDIRECT_TARGETS: HashMap<u32, u32, { REDIRECT_TARGETS_CAPACITY as usize }> =
    HashMap::new();

/// Per-CPU scratch space for the packet being balanced (keeps it off the BPF stack).
#[btf_map]
pub static SCRATCH: PerCpuArray<crate::balancer::Packet, 1> = PerCpuArray::new();

/// The flood guard's limit (see lb-common).
#[btf_map]
pub static FLOOD_SETTINGS: Array<FloodSettings, 1> = Array::new();

/// The flood guard's window and counters, per CPU.
#[btf_map]
pub static FLOOD_STATE: PerCpuArray<FloodState, 1> = PerCpuArray::new();

/// Each CPU's cache of connection-table entries (see lb-common's `MAP_FLOW_CACHE`). Sized for
/// one CPU here; user space sizes it for every possible CPU at load.
#[btf_map]
pub static FLOW_CACHE: Array<
    FlowCacheEntry,
    { FLOW_CACHE_SLOTS as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// Each CPU's cache of reverse-NAT entries (see lb-common's `MAP_REVERSE_CACHE`).
#[btf_map]
pub static REVERSE_CACHE: PerCpuArray<ReverseCacheEntry, { FLOW_CACHE_SLOTS as usize }> =
    PerCpuArray::new();

/// What `sluice trace` asks for (see lb-common's `MAP_TRACE_FILTER`).
#[btf_map]
pub static TRACE_FILTER: Array<TraceFilter, 1> = Array::new();

/// Traced decisions, for `sluice trace` (see lb-common's `MAP_TRACE_EVENTS`).
#[btf_map]
pub static TRACE_EVENTS: RingBuf<TraceEvent, { TRACE_EVENTS_BYTES as usize }> = RingBuf::new();

/// Per-CPU: the traced packet's headers as they arrived, until its event is written.
#[btf_map]
pub static TRACE_SCRATCH: PerCpuArray<TraceEvent, 1> = PerCpuArray::new();

/// This node's end of the tunnels (see lb-common's `TunnelSettings`).
#[btf_map]
pub static TUNNEL_SETTINGS: Array<TunnelSettings, 1> = Array::new();

/// The fast check of a tunnel's sender: nodes in slots near their address's hash, each slot
/// counting what its node tunnelled here (see lb-common's `MAP_TUNNEL_SLOTS`).
#[btf_map]
pub static TUNNEL_SLOTS: PerCpuArray<TunnelSlot, { TUNNEL_SLOTS_LEN as usize }> =
    PerCpuArray::new();

/// The cluster's other nodes: tunnelled packets are accepted from these only, and counted per
/// node (see lb-common's `MAP_TUNNEL_PEERS`).
#[btf_map]
pub static TUNNEL_PEERS: PerCpuHashMap<NodeKey, TunnelStats, { TUNNEL_PEERS_CAPACITY as usize }> =
    PerCpuHashMap::new();

/// The interfaces the program runs on, by slot of their ifindex (see lb-common's `MAP_IFACES`).
#[btf_map]
pub static IFACES: Array<IfaceEntry, { IFACE_SLOTS as usize }> = Array::new();

/// Interfaces whose slot in `IFACES` another one holds (see lb-common's `MAP_IFACES_SHARED`).
#[btf_map]
pub static IFACES_SHARED: HashMap<u32, IfaceEntry, { IFACES_SHARED_CAPACITY as usize }> =
    HashMap::new();

/// What the program left alone per interface, by reason (see lb-common's `MAP_IFACE_STATS`).
#[btf_map]
pub static IFACE_STATS: PerCpuArray<IfaceStats, { IFACE_SLOTS as usize }> = PerCpuArray::new();
