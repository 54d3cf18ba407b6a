//! Types shared by Sluice's kernel programs (lb-ebpf) and user space (lb-userspace).
//!
//! This crate is the single place where every map key, map value, map name and wire constant is
//! defined, once. It owns layout, never behaviour: no I/O, no allocation, `#![no_std]`.
//! Every type is `#[repr(C)]` with explicit padding so that it is `bytemuck::Pod` and has the same
//! layout in the BPF object, in user space and in the BTF that `bpftool map dump` prints.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Name of the hash map `(ifindex, ip) → L2VipValue`: the IPs the XDP program answers ARP/NDP for,
/// per interface. No entry for an interface means no answer on that interface.
pub const MAP_L2_VIPS: &str = "L2_VIPS";
/// Name of the array (one slot, `u64`) holding the deadline of the ARP/NDP answers, in
/// `CLOCK_MONOTONIC` nanoseconds (the clock of `bpf_ktime_get_ns`): past it the responder stops
/// answering, so a dead speaker's node falls silent by itself. 0: no deadline (`sluice run`).
pub const MAP_L2_DEADLINE: &str = "L2_DEADLINE";
/// Name of the per-CPU array (one slot) of [`GlobalStats`].
pub const MAP_GLOBAL_STATS: &str = "GLOBAL_STATS";
/// Name of the XDP ingress program in the lb-ebpf object.
pub const PROG_XDP_INGRESS: &str = "sluice_ingress";

/// Names of the benchmark-only programs and maps (object `sluice-bench`, never attached).
pub mod bench {
    /// A program that returns `XDP_PASS` and does nothing else: the floor of the hook.
    pub const PROG_FLOOR: &str = "bench_floor";
    /// A program that copies [`super::BenchFrame`] over the packet, then tail-calls slot 0 of
    /// [`MAP_TARGET`]: lets a rewriting program be timed on the same input each iteration.
    pub const PROG_RESTORE_THEN_CALL: &str = "bench_restore_then_call";
    /// Floors that move the frame's start by 20 bytes first (back: `push`; forward: `pop`).
    pub const PROG_PUSH_FLOOR: &str = "bench_push_floor";
    pub const PROG_POP_FLOOR: &str = "bench_pop_floor";
    /// The same two for TC programs (skb).
    pub const PROG_TC_FLOOR: &str = "bench_tc_floor";
    pub const PROG_TC_RESTORE_THEN_CALL: &str = "bench_tc_restore_then_call";
    /// Program array whose slot 0 is the TC program under test.
    pub const MAP_TC_TARGET: &str = "BENCH_TC_TARGET";
    /// Array (one slot) holding the frame that `bench_restore_then_call` restores.
    pub const MAP_FRAME: &str = "BENCH_FRAME";
    /// Program array whose slot 0 is the program under test.
    pub const MAP_TARGET: &str = "BENCH_TARGET";
}

/// Default capacity of [`MAP_L2_VIPS`]: (interface, IP) pairs.
pub const L2_VIPS_DEFAULT_CAPACITY: u32 = 65_536;

/// Hash map [`ServiceKey`] → [`ServiceValue`]: the (VIP, port, protocol) the balancer owns.
pub const MAP_SERVICES: &str = "SERVICES";
/// Array indexed by backend id → [`BackendValue`].
pub const MAP_BACKENDS: &str = "BACKENDS";
/// Array of maps indexed by service id; each inner map is an array of M backend ids (the
/// service's Maglev lookup table, built in user space).
pub const MAP_MAGLEV: &str = "MAGLEV";
/// LRU hash [`FlowKey`] (client → VIP) → [`FlowValue`]: the connection table.
pub const MAP_CONNTRACK: &str = "CONNTRACK";
/// LRU hash [`FlowKey`] (backend → client) → [`ReverseNatValue`]: what the TC egress program
/// rewrites replies back to.
pub const MAP_REVERSE_NAT: &str = "REVERSE_NAT";
/// Per-CPU array indexed by service id → [`TrafficStats`] of the service's backends that have
/// left it (user space adds a backend's counters here when it removes the backend; the XDP
/// program never writes it). A service's traffic is this plus its backends' counters: one
/// per-CPU counter update per packet instead of two.
pub const MAP_SERVICE_STATS: &str = "SERVICE_STATS";
/// Per-CPU array indexed by backend id → [`TrafficStats`]: every packet balanced to the backend
/// (and every new flow) is counted here.
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
/// Hash map ifindex → 1: interfaces the XDP program may redirect to. Frames redirected into a
/// veth whose peer runs no XDP program are lost, so veths are only listed when the operator says
/// so; for any other egress, the rewritten packet goes through the kernel.
pub const MAP_REDIRECT_TARGETS: &str = "REDIRECT_TARGETS";
pub const REDIRECT_TARGETS_CAPACITY: u32 = 4096;
/// `NextHop::ifindex` value meaning "resolved: send through the kernel".
pub const NEXT_HOP_VIA_KERNEL: u32 = u32::MAX;

/// Array, one slot: [`FloodSettings`]. Written by user space.
pub const MAP_FLOOD_SETTINGS: &str = "FLOOD_SETTINGS";
/// Per-CPU array, one slot: [`FloodState`], the flood guard's window and counters.
pub const MAP_FLOOD_STATE: &str = "FLOOD_STATE";

/// The flood guard: on each CPU, the new flows past `new_flows_per_second` in a one-second
/// window are balanced (Maglev) but not tracked, so a flood of new flows (SYNs from random
/// sources) cannot evict established flows from the connection table. 0: no limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FloodSettings {
    pub new_flows_per_second: u64,
}

/// One CPU's flood guard window and counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FloodState {
    /// `bpf_ktime_get_ns` at the start of the current one-second window.
    pub window_start: u64,
    /// New flows seen in the window.
    pub new_flows: u64,
    /// New flows balanced but not tracked because the window was over the limit.
    pub untracked: u64,
    /// Windows in which the limit was reached (the guard went on).
    pub activations: u64,
}

/// Array indexed by [`vip_slot`] of a destination address → number of services whose VIP falls
/// in that slot. A cheap (inlined, no helper call) first test: traffic to an address with 0
/// here is not a service's and leaves at once.
pub const MAP_VIP_FILTER: &str = "VIP_FILTER";
pub const VIP_FILTER_SLOTS: u32 = 65_536;

/// The [`MAP_VIP_FILTER`] slot of an address (IPv4 in the first four bytes).
#[inline(always)]
pub fn vip_slot(addr: &[u8; 16]) -> u32 {
    vip_slot_of_words(bytemuck::cast(*addr))
}

/// [`vip_slot`] of an address read as four words in the CPU's byte order (the XDP program
/// reads them so from an aligned key).
#[inline(always)]
pub fn vip_slot_of_words(words: [u32; 4]) -> u32 {
    // One multiply, for every packet. The words hold network-order bytes, so on a
    // little-endian CPU the bytes that differ between neighbouring addresses are the high
    // ones: swapped first, they reach every bit of the product, whose halves are folded.
    let h = (words[0] ^ words[1] ^ words[2] ^ words[3])
        .swap_bytes()
        .wrapping_mul(0x9e37_79b1);
    (h ^ (h >> 16)) & (VIP_FILTER_SLOTS - 1)
}

/// Array with one [`TraceFilter`]: which packets `sluice trace` wants to see. Pinned.
pub const MAP_TRACE_FILTER: &str = "TRACE_FILTER";
/// Ring buffer of [`TraceEvent`]s, one per traced decision. Pinned.
pub const MAP_TRACE_EVENTS: &str = "TRACE_EVENTS";
/// Size of [`MAP_TRACE_EVENTS`] in bytes (a power of two, a multiple of the page size).
pub const TRACE_EVENTS_BYTES: u32 = 256 * 1024;

/// What `sluice trace` asks the programs to report. While `active` is 0 (no trace running) the
/// programs do nothing more than read that word. A trace holds a lease: past `until`
/// (`CLOCK_MONOTONIC` ns) the programs turn it off themselves, so a trace that was killed leaves
/// nothing enabled. Zero fields match anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceFilter {
    pub active: u32,
    /// Only packets received on (XDP) or leaving through (TC) this interface.
    pub ifindex: u32,
    pub until: u64,
    pub vip: [u8; 16],
    pub client: [u8; 16],
    /// Network order.
    pub vip_port: [u8; 2],
    /// [`FAMILY_IPV4`] / [`FAMILY_IPV6`]; 0: no VIP filter.
    pub vip_family: u8,
    /// 0: no client filter.
    pub client_family: u8,
    /// Leading bits of `client` that must match.
    pub client_prefix: u8,
    pub _pad: [u8; 3],
    /// Events the ring buffer had no room for (the reader was too slow).
    pub lost: u64,
}

/// Which program saw the packet.
pub const TRACE_HOOK_XDP: u8 = 1;
pub const TRACE_HOOK_TC: u8 = 2;

/// [`TraceEvent::flags`]: rewritten, then handed to the kernel to forward (the backend's
/// neighbour is not resolved yet, or its interface is not a redirect target).
pub const TRACE_VIA_KERNEL: u8 = 1;

/// What the program decided ([`TraceEvent::decision`]).
pub mod decision {
    pub const PASSED_NOT_A_SERVICE: u8 = 1;
    pub const PASSED_TTL: u8 = 2;
    pub const PASSED_FRAGMENT_OR_OPTIONS: u8 = 3;
    pub const PASSED_OTHER_PROTOCOL: u8 = 4;
    pub const PASSED_ARP_NDP_NOT_OURS: u8 = 5;
    pub const MALFORMED: u8 = 6;
    pub const ARP_REPLY: u8 = 7;
    pub const NA_REPLY: u8 = 8;
    /// A tracked flow (flow cache or connection table) → its backend.
    pub const CONNTRACK_HIT: u8 = 9;
    /// A new flow: Maglev slot → backend, tracked.
    pub const NEW_FLOW: u8 = 10;
    /// A new flow past the flood guard's limit: forwarded, not tracked.
    pub const NEW_FLOW_FLOOD_GUARD: u8 = 11;
    pub const NO_BACKEND: u8 = 12;
    /// Rewritten, to the kernel (internal to the programs: events carry the hit or new flow it
    /// was, with [`super::TRACE_VIA_KERNEL`]).
    pub const TO_KERNEL: u8 = 13;
    pub const ICMP_TO_BACKEND: u8 = 14;
    pub const ICMP_UNMATCHED: u8 = 15;
    pub const REVERSE_NAT: u8 = 16;
    pub const ICMP_TO_CLIENT: u8 = 17;
    /// Encapsulated to the backend's node (the event's `to_addr` is the backend).
    pub const TUNNELLED: u8 = 18;
    pub const TUNNEL_FORGED: u8 = 19;
    pub const TUNNEL_MISMATCH: u8 = 20;
    pub const TUNNEL_TOO_BIG: u8 = 21;
    /// A unicast frame to another host's MAC (a promiscuous port, a flooding switch).
    pub const PASSED_OTHER_HOST: u8 = 22;
    /// A frame on a bond's standby port, which the bond drops.
    pub const PASSED_STANDBY_PORT: u8 = 23;
}

/// One traced decision. Addresses: IPv4 in the first four bytes (ARP: sender and target).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceEvent {
    /// `CLOCK_MONOTONIC` ns.
    pub time: u64,
    pub ifindex: u32,
    /// The XDP action or TC verdict returned.
    pub action: u32,
    pub hook: u8,
    pub decision: u8,
    pub family: u8,
    /// IP protocol; 0 for ARP.
    pub proto: u8,
    /// The Maglev slot of a new flow.
    pub slot: u32,
    /// The packet as it arrived.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// Where it went: the backend (XDP) or the VIP a reply now comes from (TC).
    pub to_port: [u8; 2],
    /// Set while the original headers were captured (internal to the programs).
    pub captured: u8,
    /// [`TRACE_VIA_KERNEL`].
    pub flags: u8,
    pub to_addr: [u8; 16],
}

/// Name of the TC egress program (reverse NAT).
pub const PROG_TC_EGRESS: &str = "sluice_egress";

/// Default capacities: services, backends, tracked flows (each direction).
pub const SERVICES_DEFAULT_CAPACITY: u32 = 10_000;
pub const BACKENDS_DEFAULT_CAPACITY: u32 = 100_000;
pub const FLOWS_DEFAULT_CAPACITY: u32 = 1_000_000;
/// Compile-time size of the Maglev inner-map template. Inner maps carry `BPF_F_INNER_MAP`, so
/// the table size M is chosen at run time (stored per service in [`ServiceValue::table_size`]).
pub const MAGLEV_TEMPLATE_SIZE: u32 = 16_381;
/// `BPF_F_INNER_MAP`: inner array maps of different sizes may sit in one outer map.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Key of [`MAP_SERVICES`]. IPv4 addresses occupy the first four bytes of `addr`. Aligned to
/// 4 bytes (size 20, unchanged).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    /// Port, network byte order.
    pub port: [u8; 2],
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
}

/// Value of [`MAP_SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    /// Index into [`MAP_MAGLEV`] and [`MAP_SERVICE_STATS`].
    pub id: u32,
    /// M, the size of this service's Maglev table; 0 when it has no backend (new flows are
    /// dropped and counted as `no_backend`).
    pub table_size: u32,
}

/// Backend flag: the backend is in use (flows may go to it).
pub const BACKEND_ACTIVE: u8 = 1;
/// Backend flag: the backend is on another node. Its packets are not rewritten here: they are
/// encapsulated (IPIP, or IPv6 in IPv6) to [`BackendValue::node`], whose program decapsulates
/// them and balances them as its own.
pub const BACKEND_REMOTE: u8 = 2;

/// Value of [`MAP_BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendValue {
    pub addr: [u8; 16],
    /// Port, network byte order.
    pub port: [u8; 2],
    pub family: u8,
    /// [`BACKEND_ACTIVE`] or 0.
    pub flags: u8,
    /// The service this backend belongs to.
    pub service_id: u32,
    /// Changes whenever the id is given to another backend, so stale flows notice.
    pub generation: u32,
    /// The Maglev weight (kept so that user space can rebuild its state from pinned maps).
    pub weight: u32,
    /// What the DNAT to this backend adds to the IPv4 header checksum (address and TTL − 1),
    /// from [`dnat_checksum_deltas`]: the rewrite is constant per backend, so its checksum
    /// change is computed once, by user space, not per packet.
    pub csum_ip: u16,
    /// What the DNAT adds to the TCP/UDP checksum (pseudo-header address and port).
    pub csum_l4: u16,
    /// [`BACKEND_REMOTE`]: the address of the backend's node, the tunnel's far end (the
    /// backend's family). Zero for a local backend.
    pub node: [u8; 16],
}

/// Array, one slot: [`TunnelSettings`]. Written by user space.
pub const MAP_TUNNEL_SETTINGS: &str = "TUNNEL_SETTINGS";
/// Per-CPU hash [`NodeKey`] → [`TunnelStats`]: the cluster's other nodes. Tunnelled packets
/// are accepted only from these addresses (the others are dropped and counted as forged); each
/// node's entry counts the packets it tunnelled here.
pub const MAP_TUNNEL_PEERS: &str = "TUNNEL_PEERS";
pub const TUNNEL_PEERS_CAPACITY: u32 = 4096;
/// Per-CPU array of [`TunnelSlot`]s: the XDP program's fast check of a tunnel's sender. A node
/// sits in one of the [`TUNNEL_SLOT_PROBES`] slots from [`tunnel_slot`] of its address (user
/// space places it in the first free one, and writes its key on every CPU); the slot counts
/// the packets that node tunnelled here. A node that finds no free slot (hundreds of nodes) is
/// checked and counted in [`MAP_TUNNEL_PEERS`] alone, which holds every node: the slots are a
/// faster way to the same answer (an inlined array read instead of a hash lookup).
pub const MAP_TUNNEL_SLOTS: &str = "TUNNEL_SLOTS";
/// Slots of [`MAP_TUNNEL_SLOTS`] (a power of two).
pub const TUNNEL_SLOTS: u32 = 1024;
/// Consecutive slots a node may sit in, from its first.
pub const TUNNEL_SLOT_PROBES: u32 = 8;
/// Outer header bytes of an IPv4 tunnel (IPIP) and an IPv6 one (IPv6 in IPv6).
pub const TUNNEL_OVERHEAD_V4: u32 = 20;
pub const TUNNEL_OVERHEAD_V6: u32 = 40;
/// IP protocol numbers of the tunnels' inner packets.
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6_IN_IP: u8 = 41;

/// This node's end of the tunnels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TunnelSettings {
    /// This node's IPv4 address: the source of IPIP packets, and the only destination of the
    /// ones accepted. Zero: no IPv4 tunnel.
    pub src_v4: [u8; 4],
    /// The largest packet the node network carries (its MTU): a packet that would be larger
    /// once encapsulated is answered with an ICMP error carrying the MTU that fits (and
    /// counted); TCP SYN-ACKs of tunnelled flows get their MSS clamped below it. 0: no limit.
    pub mtu: u32,
    /// This node's IPv6 address (IPv6 in IPv6). Zero: no IPv6 tunnel.
    pub src_v6: [u8; 16],
}

/// Key of [`MAP_TUNNEL_PEERS`]: a node's address (IPv4 in the first four bytes). Aligned to 4
/// bytes: the XDP program writes it in words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct NodeKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The first of the slots of [`MAP_TUNNEL_SLOTS`] a node's address may sit in: its words as
/// the XDP program loads them (native order), and its family.
pub fn tunnel_slot(words: &[u32; 4], family: u8) -> u32 {
    let h = words[0]
        ^ words[1].rotate_left(7)
        ^ words[2].rotate_left(13)
        ^ words[3].rotate_left(19)
        ^ family as u32;
    h.wrapping_mul(0x9e37_79b1) >> (32 - TUNNEL_SLOTS.trailing_zeros())
}

/// The slots a node may sit in, in probe order (user space: placing it, reading its counters).
pub fn tunnel_probes(key: &NodeKey) -> impl Iterator<Item = u32> {
    let first = tunnel_slot(&node_words(key), key.family);
    (0..TUNNEL_SLOT_PROBES).map(move |i| (first + i) & (TUNNEL_SLOTS - 1))
}

/// The words of a node's address, as [`tunnel_slot`] takes them.
pub fn node_words(key: &NodeKey) -> [u32; 4] {
    let a = key.addr;
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// A slot of [`MAP_TUNNEL_SLOTS`], per CPU: the node it holds (all zero: none) and what that
/// node tunnelled here on this CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TunnelSlot {
    pub key: NodeKey,
    pub _pad: u32,
    pub stats: TunnelStats,
}

/// Packets (and bytes, outer headers included) one node tunnelled to this one, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TunnelStats {
    pub packets: u64,
    pub bytes: u64,
}

/// The one's-complement sum, folded to 16 bits, of `!old + new` over the 16-bit words of two
/// equal-length byte strings, read in the CPU's byte order (the XDP program loads packet words
/// so; RFC 1071 §2(B): the sum is the same bytes in either order).
pub fn checksum_delta(old: &[u8], new: &[u8]) -> u16 {
    let sum: u64 = old
        .chunks_exact(2)
        .zip(new.chunks_exact(2))
        .map(|(o, n)| {
            (!u16::from_ne_bytes([o[0], o[1]])) as u64 + u16::from_ne_bytes([n[0], n[1]]) as u64
        })
        .sum();
    fold_checksum(sum)
}

/// Adds two folded one's-complement sums.
pub fn add_checksum_deltas(a: u16, b: u16) -> u16 {
    fold_checksum(a as u64 + b as u64)
}

/// A checksum field (as loaded, the CPU's byte order) after adding a folded delta: RFC 1624
/// eqn. 3. One fold suffices: the sum of two 16-bit values carries at most once.
#[inline(always)]
pub fn apply_checksum_delta(field: u16, delta: u16) -> u16 {
    let sum = (!field) as u32 + delta as u32;
    !(((sum & 0xffff) + (sum >> 16)) as u16)
}

fn fold_checksum(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum deltas of the balancer's DNAT from a service's VIP and port to a backend's:
/// `(IPv4 header, TCP/UDP)`. The header's includes the TTL decrement (its word, TTL and
/// protocol, goes down by one TTL step whatever the TTL is, as long as it is above 1); IPv6
/// has no header checksum (0). RFC 1624 eqn. 3: HC' = ~(~HC + delta).
pub fn dnat_checksum_deltas(
    family: u8,
    vip: &[u8; 16],
    vip_port: [u8; 2],
    backend: &[u8; 16],
    backend_port: [u8; 2],
) -> (u16, u16) {
    let len = if family == FAMILY_IPV4 { 4 } else { 16 };
    let addr = checksum_delta(&vip[..len], &backend[..len]);
    let l4 = add_checksum_deltas(addr, checksum_delta(&vip_port, &backend_port));
    if family != FAMILY_IPV4 {
        return (0, l4);
    }
    // TTL is the word's first byte: the word drops by [1, 0] read in the CPU's order.
    let ttl = !u16::from_ne_bytes([1, 0]);
    (add_checksum_deltas(addr, ttl), l4)
}

/// A flow's 5-tuple as seen on the wire (client → VIP for [`MAP_CONNTRACK`],
/// backend → client for [`MAP_REVERSE_NAT`]). IPv4 addresses occupy the first four bytes.
///
/// Aligned to 8 bytes (its size, 40, is unchanged): the XDP program reads it in whole words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Where a flow's packets leave for its backend: resolved once per flow (`bpf_fib_lookup`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHop {
    /// Egress interface toward the backend; 0 while the next hop is not resolved (the packet is
    /// then passed to the kernel, which resolves it); [`NEXT_HOP_VIA_KERNEL`] when the egress
    /// interface is not a redirect target.
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Value of [`MAP_CONNTRACK`]: the backend a flow was given and the next hop toward it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowValue {
    pub backend_id: u32,
    /// The backend's generation when the flow was given to it.
    pub generation: u32,
    pub next_hop: NextHop,
    /// [`FLOW_CLIENT_FIN`] and [`FLOW_BACKEND_FIN`]: which sides of a TCP flow have closed.
    pub flags: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the second side's FIN passed; 0 while open.
    /// User space removes the flow a grace period later (see `dataplane::flows`).
    pub closed_at: u64,
}

/// Each CPU's cache of connection-table entries: an array of [`FlowCacheEntry`],
/// [`FLOW_CACHE_SLOTS`] per possible CPU (user space sizes it at load), CPU `c`'s entry for a
/// flow at `c * FLOW_CACHE_SLOTS + flow_cache_slot(key)`: looked up without a helper call (an
/// inlined array access and a key compare). A plain array rather than a per-CPU one because
/// its values can be placed: with [`BPF_F_MMAPABLE`] they start on a page, so every 64-byte
/// entry is one cache line (per-CPU values are allocated 8-byte aligned, most entries then
/// straddle two lines). Not pinned: a cache, rebuilt from the connection table. An entry serves
/// at most [`FLOW_CACHE_REFRESH`] packets before the flow's connection-table entry is looked up
/// again, which keeps that entry fresh in the LRU and notices flows removed meanwhile (an RST
/// or a FIN sweep seen on another CPU).
pub const MAP_FLOW_CACHE: &str = "FLOW_CACHE";
pub const FLOW_CACHE_SLOTS: u32 = 16_384;
pub const FLOW_CACHE_REFRESH: u8 = 64;
/// `BPF_F_MMAPABLE`: an array's values start on a page boundary.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// The bits of a cached key's last word that are the key's (ports, protocol, family): the
/// padding bytes above them hold the entry's use count ([`FlowCacheEntry::uses`]).
pub const FLOW_CACHE_KEY_TAIL: u64 = 0x0000_ffff_ffff_ffff;

/// One CPU's cached connection-table entry (one cache line): the flow's key, its backend and
/// next hop. The key's first padding byte counts the packets served since the entry was filled
/// ([`FlowCacheEntry::uses`]).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowCacheEntry {
    pub key: FlowKey,
    pub backend_id: u32,
    pub generation: u32,
    pub next_hop: NextHop,
}

impl FlowCacheEntry {
    /// Packets served from this entry since it was filled.
    #[inline(always)]
    pub fn uses(&self) -> u8 {
        self.key._pad[0]
    }

    /// Counts one more packet served from this entry.
    #[inline(always)]
    pub fn count_use(&mut self) {
        self.key._pad[0] += 1;
    }
}

/// Per-CPU array of [`ReverseCacheEntry`], indexed by [`flow_cache_slot`] of the reply's key:
/// the TC program's cache of reverse-NAT entries, as [`MAP_FLOW_CACHE`] is the XDP program's.
pub const MAP_REVERSE_CACHE: &str = "REVERSE_CACHE";

/// One CPU's cached reverse-NAT entry and the packets it served since the last refresh.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ReverseCacheEntry {
    pub key: FlowKey,
    pub value: ReverseNatValue,
    pub served: u32,
}

/// The flow cache slot of a flow: its five 8-byte words multiplied and summed (each with its
/// own odd constant, so swapped addresses or ports land elsewhere), the high bits taken
/// (multiplicative hashing). A dozen instructions.
#[inline(always)]
pub fn flow_cache_slot(key: &FlowKey) -> u32 {
    flow_cache_slot_of_words(bytemuck::cast_ref(key))
}

/// [`flow_cache_slot`] of a key's five 64-bit words (the XDP program builds an IPv4 key in
/// registers: its zero words cost nothing here).
#[inline(always)]
pub fn flow_cache_slot_of_words(w: &[u64; 5]) -> u32 {
    let h = w[0].wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ w[1].wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ w[2].wrapping_mul(0x1656_67b1_9e37_79f9)
        ^ w[3].wrapping_mul(0x85eb_ca77_c2b2_ae63)
        ^ w[4].wrapping_mul(0x27d4_eb2f_1656_67c5);
    ((h ^ (h >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        >> (64 - FLOW_CACHE_SLOTS.trailing_zeros())) as u32
}

/// The client sent a FIN (seen by the XDP program).
pub const FLOW_CLIENT_FIN: u32 = 1;
/// The backend sent a FIN (seen by the TC egress program).
pub const FLOW_BACKEND_FIN: u32 = 2;

/// Value of [`MAP_REVERSE_NAT`]: the VIP and port a reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ReverseNatValue {
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub family: u8,
    /// [`REVERSE_VIA_TUNNEL`].
    pub flags: u8,
}

/// [`ReverseNatValue::flags`]: the flow came through a tunnel from another node; its replies
/// leave from here straight to the client, and a SYN-ACK gets its MSS clamped so that the
/// client's segments still fit the tunnel.
pub const REVERSE_VIA_TUNNEL: u8 = 1;

/// Traffic counters of one service or backend, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl TrafficStats {
    pub const fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            new_flows: self.new_flows + other.new_flows,
        }
    }
}

/// The hash of a flow that picks its Maglev slot (`flow_hash(key) % M`). One implementation,
/// used by the XDP program and by user space (tests predict backends with it): murmur3's
/// 32-bit mixing over the key's ten words.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let words: [u32; 10] = bytemuck::cast(*key);
    let mut h: u32 = 0x736c_7563; // "sluc"
    let mut i = 0;
    while i < 10 {
        let mut k = words[i];
        k = k.wrapping_mul(0xcc9e_2d51);
        k = k.rotate_left(15);
        k = k.wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13);
        h = h.wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= 40;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Address family tag in keys: IPv4.
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag in keys: IPv6.
pub const FAMILY_IPV6: u8 = 6;

/// Key of [`MAP_L2_VIPS`]: an IP address on one interface (by ifindex).
///
/// IPv4 addresses occupy the first four bytes of `addr` (network order), the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct L2VipKey {
    /// Interface index the request arrived on.
    pub ifindex: u32,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    pub _pad: [u8; 3],
    /// The address, network byte order.
    pub addr: [u8; 16],
}

impl L2VipKey {
    /// Key for an IPv4 address (octets in network order) on `ifindex`.
    pub const fn v4(ifindex: u32, octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[0] = octets[0];
        addr[1] = octets[1];
        addr[2] = octets[2];
        addr[3] = octets[3];
        Self {
            ifindex,
            family: FAMILY_IPV4,
            _pad: [0; 3],
            addr,
        }
    }

    /// Key for an IPv6 address (octets in network order) on `ifindex`.
    pub const fn v6(ifindex: u32, addr: [u8; 16]) -> Self {
        Self {
            ifindex,
            family: FAMILY_IPV6,
            _pad: [0; 3],
            addr,
        }
    }
}

/// Value of [`MAP_L2_VIPS`]: the MAC address to answer with (the interface's own, filled in by
/// user space unless the operator chose another).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct L2VipValue {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Outcome counters of the XDP ingress program; one per CPU in [`MAP_GLOBAL_STATS`].
/// Every packet the program sees is counted in exactly one field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GlobalStats {
    /// ARP requests for a VIP answered with an ARP reply (`XDP_TX`).
    pub arp_replies: u64,
    /// Neighbor Solicitations for a VIP answered with a Neighbor Advertisement (`XDP_TX`).
    pub na_replies: u64,
    /// Well-formed packets left to the kernel untouched (`XDP_PASS`).
    pub passed: u64,
    /// Truncated or malformed frames (bad lengths, bad checksum, bad hop limit): never answered,
    /// left to the kernel untouched (`XDP_PASS`).
    pub malformed: u64,
    /// Service packets rewritten (DNAT) and sent to the backend's next hop (`XDP_TX`/`XDP_REDIRECT`).
    pub lb_forwarded: u64,
    /// Service packets rewritten (DNAT) and passed to the kernel, which resolves the next hop.
    pub lb_to_kernel: u64,
    /// New flows to a service with no backend: dropped (`XDP_DROP`).
    pub lb_no_backend: u64,
    /// Replies rewritten back to VIP:port by the TC egress program.
    pub reverse_nat: u64,
    /// ICMP errors about a flow's reply (sent to the VIP) rewritten and sent to its backend.
    pub icmp_to_backend: u64,
    /// ICMP errors a backend sent about a client's packet, rewritten back to the VIP on the
    /// way out by the TC egress program.
    pub icmp_to_client: u64,
    /// ICMP errors to a VIP whose embedded packet names no tracked flow: left to the kernel.
    pub icmp_unmatched: u64,
    /// Service packets encapsulated to their backend's node (`XDP_TX`/`XDP_REDIRECT`, or
    /// passed to the kernel while that node's next hop is not resolved).
    pub tunnel_out: u64,
    /// Tunnelled packets for a service from an address that is not a node's: dropped.
    pub tunnel_forged: u64,
    /// Tunnelled packets whose flow this node would send to yet another node (the nodes'
    /// tables disagree, for a moment): dropped rather than tunnelled again.
    pub tunnel_mismatch: u64,
    /// Packets too large for the node network once encapsulated: answered with an ICMP
    /// "fragmentation needed" / "packet too big" carrying the MTU that fits (`XDP_TX`).
    pub tunnel_too_big: u64,
}

impl GlobalStats {
    /// Field-wise sum, used to fold the per-CPU values into one.
    pub const fn add(self, other: Self) -> Self {
        Self {
            arp_replies: self.arp_replies + other.arp_replies,
            na_replies: self.na_replies + other.na_replies,
            passed: self.passed + other.passed,
            malformed: self.malformed + other.malformed,
            lb_forwarded: self.lb_forwarded + other.lb_forwarded,
            lb_to_kernel: self.lb_to_kernel + other.lb_to_kernel,
            lb_no_backend: self.lb_no_backend + other.lb_no_backend,
            reverse_nat: self.reverse_nat + other.reverse_nat,
            icmp_to_backend: self.icmp_to_backend + other.icmp_to_backend,
            icmp_to_client: self.icmp_to_client + other.icmp_to_client,
            icmp_unmatched: self.icmp_unmatched + other.icmp_unmatched,
            tunnel_out: self.tunnel_out + other.tunnel_out,
            tunnel_forged: self.tunnel_forged + other.tunnel_forged,
            tunnel_mismatch: self.tunnel_mismatch + other.tunnel_mismatch,
            tunnel_too_big: self.tunnel_too_big + other.tunnel_too_big,
        }
    }
}

/// Largest frame the benchmark's restore program can copy.
pub const BENCH_FRAME_MAX: usize = 128;

/// The frame that the benchmark's restore program writes over the packet before each run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BenchFrame {
    /// Number of meaningful bytes in `data`; the packet must be exactly this long.
    pub len: u32,
    /// When not 0: after restoring, write a per-run counter (2 bytes) at this offset, so every
    /// run is a new flow (e.g. the TCP source port).
    pub vary_offset: u32,
    pub data: [u8; BENCH_FRAME_MAX],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)], Copy, and have no padding bytes (bytemuck::Pod proves it).
    unsafe impl aya::Pod for super::TraceFilter {}
    unsafe impl aya::Pod for super::L2VipKey {}
    unsafe impl aya::Pod for super::L2VipValue {}
    unsafe impl aya::Pod for super::GlobalStats {}
    unsafe impl aya::Pod for super::BenchFrame {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::ReverseNatValue {}
    unsafe impl aya::Pod for super::FloodSettings {}
    unsafe impl aya::Pod for super::FloodState {}
    unsafe impl aya::Pod for super::TrafficStats {}
    unsafe impl aya::Pod for super::TunnelSettings {}
    unsafe impl aya::Pod for super::NodeKey {}
    unsafe impl aya::Pod for super::TunnelStats {}
    unsafe impl aya::Pod for super::TunnelSlot {}
    unsafe impl aya::Pod for super::IfaceEntry {}
    unsafe impl aya::Pod for super::IfaceStats {}
}

#[cfg(test)]
mod tests {
    /// RFC 1071 checksum from scratch, over words read in the CPU's order (as stored).
    fn checksum_from_scratch(bytes: &[u8]) -> u16 {
        let sum: u64 = bytes
            .chunks(2)
            .map(|w| u16::from_ne_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u64)
            .sum();
        !fold_checksum(sum)
    }

    #[test]
    fn dnat_checksum_deltas_give_the_checksums_recomputed_from_scratch() {
        let mut seed: u64 = 0x5eed;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let (vip, backend) = (next().to_ne_bytes(), next().to_ne_bytes());
            let (vport, bport) = ((next() as u16).to_be_bytes(), (next() as u16).to_be_bytes());
            let ttl = (next() % 254) as u8 + 2;
            let mut v16 = [0u8; 16];
            let mut b16 = [0u8; 16];
            v16[..8].copy_from_slice(&vip);
            b16[..8].copy_from_slice(&backend);
            b16[8..].copy_from_slice(&next().to_ne_bytes());
            v16[8..].copy_from_slice(&next().to_ne_bytes());
            for family in [FAMILY_IPV4, FAMILY_IPV6] {
                let len = if family == FAMILY_IPV4 { 4 } else { 16 };
                let (ip_delta, l4_delta) = dnat_checksum_deltas(family, &v16, vport, &b16, bport);
                // IPv4 header: a plain 20 bytes with the VIP as destination.
                let mut header = [
                    0x45, 0, 0, 60, 0x12, 0x34, 0x40, 0, ttl, PROTO_TCP, 0, 0, 10, 0, 0, 1, 0, 0,
                    0, 0,
                ];
                header[16..20].copy_from_slice(&v16[..4]);
                let check = checksum_from_scratch(&header);
                header[10..12].copy_from_slice(&check.to_ne_bytes());
                header[8] = ttl - 1;
                header[16..20].copy_from_slice(&b16[..4]);
                header[10..12].copy_from_slice(&[0, 0]);
                if family == FAMILY_IPV4 {
                    assert_eq!(
                        apply_checksum_delta(check, ip_delta),
                        checksum_from_scratch(&header),
                        "IPv4 header, ttl {ttl}"
                    );
                }
                // Pseudo-header addresses and ports (the rest of the segment is unchanged).
                let mut buf = [7u8; 40];
                let seg = &mut buf[..2 * len + 8];
                seg[len..2 * len].copy_from_slice(&v16[..len]);
                seg[2 * len + 2..2 * len + 4].copy_from_slice(&vport);
                let before = checksum_from_scratch(seg);
                seg[len..2 * len].copy_from_slice(&b16[..len]);
                seg[2 * len + 2..2 * len + 4].copy_from_slice(&bport);
                let after = checksum_from_scratch(seg);
                let got = apply_checksum_delta(before, l4_delta);
                // 0x0000 and 0xffff are the same one's-complement number.
                assert!(
                    got == after || (got ^ after) == 0xffff && (got == 0 || after == 0),
                    "family {family}: {got:#x} != {after:#x}"
                );
            }
        }
    }

    use super::*;

    #[test]
    fn flow_cache_slots_spread_flows_and_stay_in_range() {
        let mut seen = [false; FLOW_CACHE_SLOTS as usize];
        for port in 0..4096u16 {
            let key = FlowKey {
                src: [198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                dst: [203, 0, 113, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                sport: port.to_be_bytes(),
                dport: [0, 80],
                proto: PROTO_TCP,
                family: FAMILY_IPV4,
                _pad: [0; 2],
            };
            let slot = flow_cache_slot(&key);
            assert!(slot < FLOW_CACHE_SLOTS);
            seen[slot as usize] = true;
        }
        // 4096 flows into 16384 slots: about 3,600 distinct slots if spread uniformly.
        let distinct = seen.iter().filter(|s| **s).count();
        assert!(distinct > 3400, "{distinct} distinct slots");
    }

    #[test]
    fn vip_slots_spread_addresses_and_stay_in_range() {
        let mut seen = [false; 64];
        for i in 0..=255u8 {
            let slot = vip_slot(&[198, 51, 100, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            assert!(slot < VIP_FILTER_SLOTS);
            seen[(slot % 64) as usize] = true;
        }
        assert!(
            seen.iter().filter(|s| **s).count() > 50,
            "a /24 spreads over the slots"
        );
    }

    #[test]
    fn flow_hash_depends_on_every_field_and_is_stable() {
        let key = FlowKey {
            src: [198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [198, 18, 1, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: 40000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: PROTO_TCP,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        };
        let h = flow_hash(&key);
        assert_eq!(h, flow_hash(&key));
        let mut other = key;
        other.sport = 40001u16.to_be_bytes();
        assert_ne!(h, flow_hash(&other));
        let mut other = key;
        other.proto = PROTO_UDP;
        assert_ne!(h, flow_hash(&other));
    }

    #[test]
    fn v4_key_puts_the_address_in_the_first_four_bytes_and_zeroes_the_rest() {
        let key = L2VipKey::v4(7, [198, 18, 1, 100]);
        assert_eq!(key.ifindex, 7);
        assert_eq!(key.family, FAMILY_IPV4);
        assert_eq!(&key.addr[..4], &[198, 18, 1, 100]);
        assert!(key.addr[4..].iter().all(|b| *b == 0));
    }

    #[test]
    fn key_and_value_layouts_match_what_the_bpf_program_expects() {
        assert_eq!(core::mem::size_of::<L2VipKey>(), 24);
        assert_eq!(core::mem::size_of::<L2VipValue>(), 8);
        assert_eq!(core::mem::size_of::<GlobalStats>(), 120);
        assert_eq!(core::mem::size_of::<TunnelSettings>(), 24);
        assert_eq!(core::mem::size_of::<NodeKey>(), 20);
        assert_eq!(core::mem::size_of::<TunnelSlot>(), 40);
        assert_eq!(core::mem::size_of::<ServiceKey>(), 20);
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<FlowValue>(), 40);
        assert_eq!(core::mem::size_of::<FlowCacheEntry>(), 64);
        assert_eq!(core::mem::align_of::<FlowCacheEntry>(), 64);
        assert_eq!(core::mem::size_of::<NextHop>(), 16);
        assert_eq!(core::mem::size_of::<TraceFilter>(), 64);
        assert_eq!(core::mem::size_of::<TraceEvent>(), 80);
        assert_eq!(core::mem::size_of::<ReverseCacheEntry>(), 64);
        assert_eq!(core::mem::align_of::<FlowKey>(), 8);
        assert_eq!(core::mem::size_of::<BackendValue>(), 52);
        assert_eq!(core::mem::size_of::<BenchFrame>(), 8 + BENCH_FRAME_MAX);
    }

    #[test]
    fn stats_add_sums_every_field() {
        let a = GlobalStats {
            arp_replies: 1,
            na_replies: 2,
            passed: 3,
            malformed: 4,
            lb_forwarded: 5,
            lb_to_kernel: 6,
            lb_no_backend: 7,
            reverse_nat: 8,
            icmp_to_backend: 9,
            icmp_to_client: 10,
            icmp_unmatched: 11,
            tunnel_out: 12,
            tunnel_forged: 13,
            tunnel_mismatch: 14,
            tunnel_too_big: 15,
        };
        let b = a.add(a);
        assert_eq!(b.arp_replies, 2);
        assert_eq!(b.malformed, 8);
        assert_eq!(b.reverse_nat, 16);
        assert_eq!(b.lb_no_backend, 14);
        assert_eq!(b.icmp_to_backend, 18);
        assert_eq!(b.icmp_to_client, 20);
        assert_eq!(b.icmp_unmatched, 22);
        assert_eq!(b.tunnel_out, 24);
        assert_eq!(b.tunnel_forged, 26);
        assert_eq!(b.tunnel_mismatch, 28);
        assert_eq!(b.tunnel_too_big, 30);
    }
}

/// Name of the array of [`IfaceEntry`], indexed by [`iface_slot`] of the ifindex a frame
/// arrived on: what the XDP program needs to know of the interface (its MAC, where its service
/// IPs are keyed, whether it is a bond's standby port). Written by user space for every
/// interface the program runs on: each interface it is attached to and, for a bond in native
/// mode, each of the bond's ports (the program runs in their drivers and sees their ifindex).
/// An interface whose slot another one holds is looked up in [`MAP_IFACES_SHARED`]; an
/// interface in neither (a test run) is treated as before this map existed: any destination
/// MAC, its own ifindex.
pub const MAP_IFACES: &str = "IFACES";
/// Slots of [`MAP_IFACES`] (a power of two).
pub const IFACE_SLOTS: u32 = 256;
/// Name of the hash ifindex → [`IfaceEntry`] of the interfaces whose slot in [`MAP_IFACES`]
/// another interface holds (that slot's entry has [`IFACE_SLOT_SHARED`]).
pub const MAP_IFACES_SHARED: &str = "IFACES_SHARED";
pub const IFACES_SHARED_CAPACITY: u32 = 1024;
/// Name of the per-CPU array of [`IfaceStats`], indexed like [`MAP_IFACES`].
pub const MAP_IFACE_STATS: &str = "IFACE_STATS";

/// The slot of an interface in [`MAP_IFACES`].
pub const fn iface_slot(ifindex: u32) -> u32 {
    ifindex & (IFACE_SLOTS - 1)
}

/// The program ran in native (driver) mode on this interface.
pub const IFACE_NATIVE: u16 = 1;
/// A bond's port that is not the active one (active-backup): the bond drops what arrives
/// there, so the program passes it untouched, answers nothing and balances nothing.
pub const IFACE_STANDBY: u16 = 2;
/// A port of a bond the program is attached to (its entry names the bond in `l2_ifindex`).
pub const IFACE_BOND_PORT: u16 = 4;
/// Another interface's entry is in [`MAP_IFACES_SHARED`] (its ifindex has this slot too).
pub const IFACE_SLOT_SHARED: u16 = 8;

/// An interface as the XDP program sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct IfaceEntry {
    /// The interface this entry is for (0: an empty slot).
    pub ifindex: u32,
    /// The ifindex its service IPs are keyed under in [`MAP_L2_VIPS`]: its own, or its bond's.
    pub l2_ifindex: u32,
    /// The MAC frames to this host carry: the interface's (a bond's port: the bond's). Other
    /// unicast destinations are another host's frames (a promiscuous port, a flooding switch):
    /// passed untouched and counted.
    pub mac: [u8; 6],
    /// [`IFACE_NATIVE`], [`IFACE_STANDBY`], [`IFACE_BOND_PORT`], [`IFACE_SLOT_SHARED`].
    pub flags: u16,
    /// A second MAC of this host's: the bridge's, when the interface (or the bond) is a bridge
    /// port (the host's address, and so the routers' frames, are on the bridge); else `mac`.
    pub upper_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Frames the XDP program left alone on one interface, by reason, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IfaceStats {
    /// Unicast frames to another host's MAC.
    pub other_host: u64,
    /// Frames that arrived on a bond's standby port.
    pub standby: u64,
}
