//! Stage 3: TCP/UDP to a service → connection table hit, or Maglev for a new flow → DNAT → the
//! backend's next hop (resolved once per flow with `bpf_fib_lookup`, kept in the flow's entry).
//!
//! Everything that is not a service's TCP/UDP traffic, or that the balancer cannot handle safely
//! (IPv4 options, fragments, IPv6 extension headers, TTL about to expire), is passed untouched.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    apply_checksum_delta, flow_cache_slot, flow_cache_slot_of_words, flow_hash, vip_slot,
    vip_slot_of_words, BackendValue, FlowCacheEntry, FlowKey, FlowValue, NextHop, ReverseNatValue,
    ServiceKey, BACKEND_ACTIVE, BACKEND_REMOTE, FAMILY_IPV4, FAMILY_IPV6, FLOW_BACKEND_FIN,
    FLOW_CACHE_KEY_TAIL, FLOW_CACHE_REFRESH, FLOW_CACHE_SLOTS, FLOW_CLIENT_FIN,
    NEXT_HOP_VIA_KERNEL, PROTO_TCP, PROTO_UDP, REVERSE_VIA_TUNNEL,
};

use crate::{
    checksum::{copy32, load16, load32, store16, store32},
    headers::{
        EthHdr, Ipv4Hdr, Ipv6Hdr, IPPROTO_ICMP, IPV4_HLEN, IPV6_HLEN, TCP_CSUM_OFFSET, TCP_FIN,
        TCP_FLAGS_OFFSET, TCP_RST, UDP_CSUM_OFFSET,
    },
    maps::{
        BACKENDS, CONNTRACK, FLOOD_SETTINGS, FLOOD_STATE, FLOW_CACHE, MAGLEV, REDIRECT_TARGETS,
        REVERSE_NAT, SCRATCH, SERVICES, VIP_FILTER,
    },
    parse::{holds, ptr_at, L2},
    stats::{self, Outcome},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// A TCP or UDP packet, parsed. Lives in the per-CPU `SCRATCH` slot, not on the 512-byte stack.
/// The keys come first, at aligned offsets, so they are read and compared in whole words.
#[repr(C)]
pub struct Packet {
    flow: FlowKey,
    /// The (VIP, port, protocol) key, built here rather than on the stack.
    service_key: ServiceKey,
    family: u8,
    proto: u8,
    /// IPv4: total length; IPv6: payload length + 40 (for the FIB lookup's MTU check).
    ip_len: u16,
    /// For `sluice trace`: 1 when this packet started a tracked flow, 2 an untracked one (the
    /// flood guard), with its Maglev slot; cleared by the trace before each traced packet.
    pub(crate) trace_new_flow: u32,
    pub(crate) trace_slot: u32,
    /// 1 when the packet came through a tunnel from another node (it may only go to a backend
    /// of this node).
    tunnelled: u32,
    l3_offset: usize,
    l4_offset: usize,
}

impl Packet {
    /// Offsets read back from map memory are unbounded to the verifier: mask them (the largest
    /// real one is 18 + 40 = 58).
    #[inline(always)]
    fn l3(&self) -> usize {
        self.l3_offset & 0x7f
    }

    #[inline(always)]
    fn l4(&self) -> usize {
        self.l4_offset & 0x7f
    }
}

/// Copies an IPv6 address from the packet into a key's address in four word loads and stores.
#[inline(always)]
fn set_v6(dst: &mut [u8; 16], src: &[u8; 16]) {
    copy32::<4>(dst.as_mut_ptr(), src.as_ptr());
}

/// Fills `slot` with a value of `T` (N words, every bit pattern valid) in place, one volatile
/// store per word, and returns it: LLVM turns plain zero stores, and copies of the result, into
/// memset calls (a bpf-to-bpf call each).
#[inline(always)]
fn fill_words<'a, T, const N: usize>(
    slot: &'a mut core::mem::MaybeUninit<T>,
    words: &[u64; N],
) -> &'a mut T {
    const { assert!(core::mem::size_of::<T>() == N * 8) };
    let p = slot.as_mut_ptr() as *mut u64;
    let mut i = 0;
    while i < N {
        unsafe { p.add(i).write_volatile(words[i]) };
        i += 1;
    }
    // SAFETY: every word written; the callers' types are plain data.
    unsafe { slot.assume_init_mut() }
}

/// Copies a MAC address in three 2-byte words (a byte-array copy calls memmove). MACs sit at
/// even offsets; the source may be on the stack, where the verifier wants every access
/// aligned to its size.
#[inline(always)]
fn set_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
    let (to, from) = (dst.as_mut_ptr(), src.as_ptr());
    unsafe {
        store16(to, load16(from));
        store16(to.add(2), load16(from.add(2)));
        store16(to.add(4), load16(from.add(4)));
    }
}

/// False when no service has this destination address: the inlined first test (an array
/// lookup, no helper call), so other traffic costs next to nothing. True may be a collision.
#[inline(always)]
pub(crate) fn may_be_vip(words: &[u32; 4]) -> bool {
    VIP_FILTER
        .get(vip_slot_of_words(*words))
        .is_some_and(|services| *services != 0)
}

/// `may_be_vip` for an address anywhere (byte reads; off the hot path).
#[inline(always)]
pub(crate) fn may_be_vip_anywhere(addr: &[u8; 16]) -> bool {
    VIP_FILTER
        .get(vip_slot(addr))
        .is_some_and(|services| *services != 0)
}

/// Fills the per-CPU scratch packet (looked up once, by the caller) with everything but the
/// addresses. The key's last word (ports, protocol, family, padding) is one store.
#[inline(always)]
fn start_packet(
    packet: &mut Packet,
    family: u8,
    proto: u8,
    l3_offset: usize,
    l4_offset: usize,
    ip_len: usize,
    ports: *const u8,
) {
    packet.family = family;
    packet.proto = proto;
    packet.l3_offset = l3_offset;
    packet.l4_offset = l4_offset;
    packet.ip_len = ip_len as u16;
    // Little-endian: bytes 32..36 the ports as in the packet, 36 the protocol, 37 the family.
    let tail = load32(ports) as u64 | (proto as u64) << 32 | (family as u64) << 40;
    unsafe { *(packet.flow.sport.as_mut_ptr() as *mut u64) = tail };
}

/// The (VIP, port, protocol) key, from the flow's: built only for a new flow.
#[inline(always)]
fn fill_service_key(packet: &mut Packet) {
    set_v6(&mut packet.service_key.addr, &packet.flow.dst);
    packet.service_key.port = packet.flow.dport;
    packet.service_key.proto = packet.flow.proto;
    packet.service_key.family = packet.flow.family;
}

/// A remote backend for a packet that came through a tunnel: the nodes' tables disagree (for
/// a moment); tunnelling it again could loop.
#[inline(always)]
fn bounced(backend: &BackendValue, tunnelled: bool) -> bool {
    tunnelled && backend.flags & BACKEND_REMOTE != 0
}

/// IPv4: only plain TCP/UDP (no options, no fragments) can be balanced. `tunnelled`: it came
/// through a tunnel from another node (and was decapsulated).
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, l2: &L2, tunnelled: bool) -> Outcome {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l2.l3_offset) else {
        return Outcome::Malformed;
    };
    let ip = unsafe { &*ip };
    let ihl = (ip.version_ihl & 0x0f) as usize;
    let total = u16::from_be_bytes(ip.total_len) as usize;
    if ip.version_ihl >> 4 != 4 || ihl < 5 || total < ihl * 4 || !holds(ctx, l2.l3_offset + total) {
        return Outcome::Malformed;
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP && ip.proto != IPPROTO_ICMP {
        return Outcome::Passed;
    }
    // Options, or a fragment (MF set or an offset): not ours to rewrite. TTL about to expire:
    // the kernel sends the ICMP error, for the packet as it came.
    if ihl != 5 || u16::from_be_bytes(ip.frag) & 0x3fff != 0 || ip.ttl <= 1 {
        return Outcome::Passed;
    }
    if ip.proto == IPPROTO_ICMP {
        return crate::icmp::ipv4(ctx, l2.l3_offset, total);
    }
    let l4_offset = l2.l3_offset + IPV4_HLEN;
    let l4_len = if ip.proto == PROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    if total < IPV4_HLEN + l4_len {
        return Outcome::Malformed;
    }
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, l4_offset) else {
        return Outcome::Malformed;
    };
    // The flow's key as five words in registers (see `FlowKey`: an IPv4 address fills the first
    // four bytes of its 16): compared with this CPU's cached entry before anything is written.
    let dst = load32(ip.dst.as_ptr());
    if !may_be_vip(&[dst, 0, 0, 0]) {
        return Outcome::Passed;
    }
    let tail =
        load32(ports as *const u8) as u64 | (ip.proto as u64) << 32 | (FAMILY_IPV4 as u64) << 40;
    let key = [load32(ip.src.as_ptr()) as u64, 0, dst as u64, 0, tail];
    let flags = tcp_flags(ctx, l4_offset, ip.proto);
    let index = cache_index(flow_cache_slot_of_words(&key));
    if flags & (TCP_FIN | TCP_RST) == 0 {
        if let Some(cached) = cached_flow(&key, index) {
            if let Some(backend) = live_backend(cached.backend_id, cached.generation) {
                if bounced(backend, tunnelled) {
                    return Outcome::TunnelMismatch;
                }
                return forward_cached(ctx, cached, backend, l2.l3_offset, l4_offset, ip.proto);
            }
        }
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Outcome::Passed;
    };
    let packet = unsafe { &mut *scratch };
    put_key(&mut packet.flow, &key);
    packet.family = FAMILY_IPV4;
    packet.proto = ip.proto;
    packet.l3_offset = l2.l3_offset;
    packet.l4_offset = l4_offset;
    packet.ip_len = total as u16;
    packet.tunnelled = tunnelled as u32;
    balance(ctx, packet, flags, index)
}

/// IPv6 with TCP or UDP directly after the fixed header (no extension headers).
#[inline(always)]
pub fn ipv6(ctx: &XdpContext, l2: &L2, tunnelled: bool) -> Outcome {
    let Some(ip6) = ptr_at::<Ipv6Hdr>(ctx, l2.l3_offset) else {
        return Outcome::Malformed;
    };
    let ip6 = unsafe { &*ip6 };
    let payload = u16::from_be_bytes(ip6.payload_len) as usize;
    let l4_len = if ip6.next_header == PROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    if payload < l4_len || !holds(ctx, l2.l3_offset + IPV6_HLEN + payload) {
        return Outcome::Malformed;
    }
    if ip6.hop_limit <= 1 {
        return Outcome::Passed;
    }
    let l4_offset = l2.l3_offset + IPV6_HLEN;
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, l4_offset) else {
        return Outcome::Malformed;
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Outcome::Passed;
    };
    let packet = unsafe { &mut *scratch };
    set_v6(&mut packet.flow.dst, &ip6.dst);
    // The key's address is 4-byte aligned: read as words.
    if !may_be_vip(&unsafe { (packet.flow.dst.as_ptr() as *const [u32; 4]).read() }) {
        return Outcome::Passed;
    }
    set_v6(&mut packet.flow.src, &ip6.src);
    let ip_len = payload + IPV6_HLEN;
    start_packet(
        packet,
        FAMILY_IPV6,
        ip6.next_header,
        l2.l3_offset,
        l4_offset,
        ip_len,
        ports as *const u8,
    );
    packet.tunnelled = tunnelled as u32;
    balance_cached(ctx, packet)
}

/// The key of the flow's replies (backend → client) in the reverse-NAT table.
#[inline(always)]
fn reverse_key(packet: &Packet, backend: &BackendValue) -> FlowKey {
    FlowKey {
        src: backend.addr,
        dst: packet.flow.src,
        sport: backend.port,
        dport: packet.flow.sport,
        proto: packet.proto,
        family: packet.family,
        _pad: [0; 2],
    }
}

/// Are two flow keys the same? Five word compares (the keys are 8-byte aligned).
#[inline(always)]
pub(crate) fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    let (a, b): (&[u64; 5], &[u64; 5]) = (as_words(a), as_words(b));
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]
}

/// Writes a key from its five words (word stores: a struct copy may become a memmove call).
#[inline(always)]
fn put_key(key: &mut FlowKey, words: &[u64; 5]) {
    let p = key as *mut FlowKey as *mut u64;
    let mut i = 0;
    while i < 5 {
        unsafe { p.add(i).write(words[i]) };
        i += 1;
    }
}

#[inline(always)]
fn as_words(key: &FlowKey) -> &[u64; 5] {
    // SAFETY: FlowKey is 40 bytes, 8-byte aligned, every bit pattern valid.
    unsafe { &*(key as *const FlowKey as *const [u64; 5]) }
}

/// Copies a connection-table entry into this CPU's cache (once its next hop is resolved), with
/// a use count of 0.
#[inline(always)]
fn cache_flow(packet: &Packet, index: u32, value: &FlowValue) {
    if value.next_hop.ifindex == 0 {
        return;
    }
    if let Some(entry) = FLOW_CACHE.get_ptr_mut(index) {
        let entry = unsafe { &mut *entry };
        put_key(&mut entry.key, as_words(&packet.flow));
        entry.backend_id = value.backend_id;
        entry.generation = value.generation;
        copy32::<4>(
            &mut entry.next_hop as *mut NextHop as *mut u8,
            &value.next_hop as *const NextHop as *const u8,
        );
    }
}

/// Forgets this CPU's cached entry at `index`.
#[inline(always)]
fn uncache_flow(index: u32) {
    if let Some(entry) = FLOW_CACHE.get_ptr_mut(index) {
        unsafe { (*entry).key.family = 0 };
    }
}

/// A TCP RST ends the flow: its entries leave both tables now (not by LRU eviction later), so a
/// closed connection holds no slot and the same 5-tuple starts afresh.
#[inline(never)]
fn forget_flow(packet: &Packet, backend: &BackendValue) {
    let _ = CONNTRACK.remove(&packet.flow);
    let _ = REVERSE_NAT.remove(&reverse_key(packet, backend));
}

/// A TCP packet's flags (read before anything is rewritten); 0 for UDP.
#[inline(always)]
fn tcp_flags(ctx: &XdpContext, l4: usize, proto: u8) -> u8 {
    if proto != PROTO_TCP {
        return 0;
    }
    ptr_at::<u8>(ctx, l4 + TCP_FLAGS_OFFSET).map_or(0, |flags| unsafe { *flags })
}

/// Records a side's FIN in the flow's entry; once both sides have sent one, when. User space
/// removes closed flows a grace period later (the last ACK and retransmissions still pass).
#[inline(never)]
pub(crate) fn record_fin(entry: &mut FlowValue, side: u32) {
    entry.flags |= side;
    if entry.flags & (FLOW_CLIENT_FIN | FLOW_BACKEND_FIN) == FLOW_CLIENT_FIN | FLOW_BACKEND_FIN
        && entry.closed_at == 0
    {
        entry.closed_at = unsafe { bpf_ktime_get_ns() };
    }
}

/// The flood guard (see lb-common's `FloodSettings`): counts a new flow in this CPU's
/// one-second window; false once the window is over the limit. Only on the new-flow path.
#[inline(never)]
fn may_track_new_flow() -> bool {
    let limit = FLOOD_SETTINGS
        .get(0)
        .map_or(0, |settings| settings.new_flows_per_second);
    if limit == 0 {
        return true;
    }
    let Some(state) = FLOOD_STATE.get_ptr_mut(0) else {
        return true;
    };
    let state = unsafe { &mut *state };
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(state.window_start) >= 1_000_000_000 {
        state.window_start = now;
        state.new_flows = 0;
    }
    state.new_flows += 1;
    if state.new_flows <= limit {
        return true;
    }
    if state.new_flows == limit + 1 {
        state.activations += 1;
    }
    state.untracked += 1;
    false
}

/// Writes the flow's connection-table entry and the reverse mapping its replies need (none for
/// a backend on another node: its replies leave from there).
#[inline(never)]
fn record_flow(packet: &Packet, backend: &BackendValue, entry: &FlowValue) {
    let _ = CONNTRACK.insert(&packet.flow, entry, 0);
    if backend.flags & BACKEND_REMOTE != 0 {
        return;
    }
    let reverse_key = reverse_key(packet, backend);
    let reverse = ReverseNatValue {
        addr: packet.flow.dst,
        port: packet.flow.dport,
        family: packet.family,
        flags: if packet.tunnelled != 0 {
            REVERSE_VIA_TUNNEL
        } else {
            0
        },
    };
    let _ = REVERSE_NAT.insert(&reverse_key, &reverse, 0);
}

/// This CPU's entries in `FLOW_CACHE` start at its number times `FLOW_CACHE_SLOTS`
/// (`bpf_get_smp_processor_id` is inlined by the kernel: no helper call).
#[inline(always)]
fn cache_index(slot: u32) -> u32 {
    let cpu = unsafe { bpf_get_smp_processor_id() };
    cpu * FLOW_CACHE_SLOTS + slot
}

/// This CPU's cached entry for the flow whose key is `key`, if it holds one it may still use:
/// an inlined array access and five word compares (the last one without the use count), no
/// helper call.
#[inline(always)]
fn cached_flow(key: &[u64; 5], index: u32) -> Option<&'static mut FlowCacheEntry> {
    let cached = unsafe { &mut *FLOW_CACHE.get_ptr_mut(index)? };
    let have = as_words(&cached.key);
    (have[0] == key[0]
        && have[1] == key[1]
        && have[2] == key[2]
        && have[3] == key[3]
        && have[4] & FLOW_CACHE_KEY_TAIL == key[4]
        && cached.uses() < FLOW_CACHE_REFRESH)
        .then_some(cached)
}

/// The fast path, inlined (no bpf-to-bpf call): this CPU forwarded the flow recently, and its
/// backend is still the flow's. FINs and RSTs never take it: `balance` records them.
#[inline(always)]
fn forward_cached(
    ctx: &XdpContext,
    cached: &mut FlowCacheEntry,
    backend: &BackendValue,
    l3: usize,
    l4: usize,
    proto: u8,
) -> Outcome {
    cached.count_use();
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::count_traffic(cached.backend_id, bytes, false);
    forward(ctx, l3, l4, proto, backend, &cached.next_hop)
}

/// IPv6's way to the fast path: the key is already in the scratch packet.
#[inline(always)]
fn balance_cached(ctx: &XdpContext, packet: &mut Packet) -> Outcome {
    let flags = tcp_flags(ctx, packet.l4(), packet.proto);
    let index = cache_index(flow_cache_slot(&packet.flow));
    if flags & (TCP_FIN | TCP_RST) == 0 {
        if let Some(cached) = cached_flow(as_words(&packet.flow), index) {
            if let Some(backend) = live_backend(cached.backend_id, cached.generation) {
                if bounced(backend, packet.tunnelled != 0) {
                    return Outcome::TunnelMismatch;
                }
                let (l3, l4, proto) = (packet.l3(), packet.l4(), packet.proto);
                return forward_cached(ctx, cached, backend, l3, l4, proto);
            }
        }
    }
    balance(ctx, packet, flags, index)
}

#[inline(never)]
fn balance(ctx: &XdpContext, packet: &mut Packet, flags: u8, cache_index: u32) -> Outcome {
    let bytes = (ctx.data_end() - ctx.data()) as u64;

    // 1. An established flow keeps its backend while that backend exists (a removed service's
    // backends are deactivated, so its flows end here too). One hash lookup on this path.
    if let Some(entry) = CONNTRACK.get_ptr_mut(&packet.flow) {
        let entry = unsafe { &mut *entry };
        if let Some(backend) = live_backend(entry.backend_id, entry.generation) {
            if bounced(backend, packet.tunnelled != 0) {
                return Outcome::TunnelMismatch;
            }
            if entry.next_hop.ifindex == 0 {
                resolve_next_hop(ctx, packet, backend, entry);
            }
            stats::count_traffic(entry.backend_id, bytes, false);
            let outcome = forward_packet(ctx, packet, backend, entry);
            if flags & TCP_RST != 0 {
                uncache_flow(cache_index);
                forget_flow(packet, backend);
            } else if flags & TCP_FIN != 0 {
                record_fin(entry, FLOW_CLIENT_FIN);
            } else {
                cache_flow(packet, cache_index, entry);
            }
            return outcome;
        }
    }

    fill_service_key(packet);
    // SAFETY: map values stay valid for the program's run; they are only read.
    let Some(service) = (unsafe { SERVICES.get(&packet.service_key) }) else {
        return Outcome::Passed;
    };

    // 2. A new flow (or one whose backend is gone): Maglev picks.
    if service.table_size == 0 {
        return Outcome::NoBackend;
    }
    let maglev_slot = flow_hash(&packet.flow) % service.table_size;
    let Some(backend_id) = MAGLEV.get_value(service.id, &maglev_slot).copied() else {
        return Outcome::NoBackend;
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return Outcome::NoBackend;
    };
    if backend.flags & BACKEND_ACTIVE == 0 || backend.service_id != service.id {
        return Outcome::NoBackend;
    }
    if bounced(backend, packet.tunnelled != 0) {
        return Outcome::TunnelMismatch;
    }
    let fin = if flags & TCP_FIN != 0 {
        FLOW_CLIENT_FIN
    } else {
        0
    };
    // Built in words (little-endian: id and generation; ifindex 0 and the MACs zero; flags; the
    // close time 0): a struct literal with byte arrays is zeroed by a memset call.
    let mut slot = core::mem::MaybeUninit::<FlowValue>::uninit();
    let entry = fill_words(
        &mut slot,
        &[
            backend_id as u64 | (backend.generation as u64) << 32,
            0,
            0,
            fin as u64,
            0,
        ],
    );
    resolve_next_hop(ctx, packet, backend, entry);
    // An RST for no known flow is forwarded statelessly: it opens nothing. Neither does a new
    // flow past the flood guard's limit: it cannot evict established flows.
    packet.trace_slot = maglev_slot;
    packet.trace_new_flow = 2;
    if flags & TCP_RST == 0 && may_track_new_flow() {
        record_flow(packet, backend, entry);
        packet.trace_new_flow = 1;
    }
    stats::count_traffic(backend_id, bytes, true);
    forward_packet(ctx, packet, backend, entry)
}

/// [`forward`] for the scratch packet and a connection-table entry (the slow path).
#[inline(always)]
fn forward_packet(
    ctx: &XdpContext,
    packet: &Packet,
    backend: &BackendValue,
    entry: &FlowValue,
) -> Outcome {
    forward(
        ctx,
        packet.l3(),
        packet.l4(),
        packet.proto,
        backend,
        &entry.next_hop,
    )
}

#[inline(always)]
pub(crate) fn live_backend(id: u32, generation: u32) -> Option<&'static BackendValue> {
    let backend = BACKENDS.get(id)?;
    (backend.flags & BACKEND_ACTIVE != 0 && backend.generation == generation).then_some(backend)
}

/// Asks the kernel's FIB for the next hop toward the backend; on success stores the egress
/// interface and MACs in `entry`. Leaves `entry.next_hop.ifindex` at 0 when the neighbour is not known
/// yet (or there is no route): the packet then goes through the kernel, which resolves it.
#[inline(never)]
fn resolve_next_hop(
    ctx: &XdpContext,
    packet: &Packet,
    backend: &BackendValue,
    entry: &mut FlowValue,
) {
    let mut slot = core::mem::MaybeUninit::<FibParams>::uninit();
    let params = fill_words(&mut slot, &[0; 8]);
    params.l4_protocol = packet.proto;
    params.sport = u16::from_ne_bytes(packet.flow.sport);
    params.dport = u16::from_ne_bytes(backend.port);
    params.__bindgen_anon_1.tot_len = packet.ip_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    // A backend on another node: the way to that node.
    let to = if backend.flags & BACKEND_REMOTE != 0 {
        &backend.node
    } else {
        &backend.addr
    };
    if packet.family == FAMILY_IPV4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([
            packet.flow.src[0],
            packet.flow.src[1],
            packet.flow.src[2],
            packet.flow.src[3],
        ]);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([to[0], to[1], to[2], to[3]]);
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = bytemuck_words(&packet.flow.src);
        params.__bindgen_anon_4.ipv6_dst = bytemuck_words(to);
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let ingress = ctx.ingress_ifindex() as u32;
        if params.ifindex != ingress && unsafe { REDIRECT_TARGETS.get(&params.ifindex) }.is_none() {
            // Not a redirect target (e.g. a veth whose peer runs no XDP): the kernel forwards.
            entry.next_hop.ifindex = NEXT_HOP_VIA_KERNEL;
            return;
        }
        entry.next_hop.ifindex = params.ifindex;
        entry.next_hop.src_mac = params.smac;
        entry.next_hop.dst_mac = params.dmac;
    }
}

#[inline(always)]
fn bytemuck_words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// DNAT to the backend, TTL/hop limit down by one, MACs for the next hop, and out. `l3` and
/// `l4` are the headers' offsets, `proto` the transport.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    l3: usize,
    l4: usize,
    proto: u8,
    backend: &BackendValue,
    next_hop: &NextHop,
) -> Outcome {
    if backend.flags & BACKEND_REMOTE != 0 {
        return tunnel_out(ctx, l3, backend, next_hop);
    }
    let rewritten = if backend.family == FAMILY_IPV4 {
        dnat_v4(ctx, l3, l4, proto, backend)
    } else {
        dnat_v6(ctx, l3, l4, proto, backend)
    };
    if !rewritten {
        // TTL would expire here: the kernel sends the ICMP error.
        return Outcome::Passed;
    }
    send(ctx, next_hop)
}

/// A packet for a backend on another node: encapsulated to that node, then sent to the next
/// hop toward it (the packet itself is not rewritten: the endpoint's node does that).
#[inline(always)]
fn tunnel_out(ctx: &XdpContext, l3: usize, backend: &BackendValue, next_hop: &NextHop) -> Outcome {
    match crate::tunnel::encap(ctx, l3, backend) {
        crate::tunnel::ENCAP_OK => match send(ctx, next_hop) {
            Outcome::Forwarded(action) => Outcome::Tunnelled(action),
            Outcome::ToKernel => Outcome::Tunnelled(xdp_action::XDP_PASS),
            other => other,
        },
        crate::tunnel::ENCAP_TOO_BIG => {
            Outcome::TunnelTooBig(crate::tunnel::too_big(ctx, l3, backend.family))
        }
        _ => Outcome::Malformed,
    }
}

/// Sends a rewritten packet to the flow's next hop: MACs from the entry, then `XDP_TX` or a
/// redirect; to the kernel while the next hop is not resolved.
#[inline(always)]
pub(crate) fn send(ctx: &XdpContext, next_hop: &NextHop) -> Outcome {
    if next_hop.ifindex == 0 || next_hop.ifindex == NEXT_HOP_VIA_KERNEL {
        return Outcome::ToKernel;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Outcome::Malformed;
    };
    let eth = unsafe { &mut *eth };
    set_mac(&mut eth.src, &next_hop.src_mac);
    set_mac(&mut eth.dst, &next_hop.dst_mac);
    if next_hop.ifindex == ctx.ingress_ifindex() as u32 {
        return Outcome::Forwarded(xdp_action::XDP_TX);
    }
    let action = unsafe { bpf_redirect(next_hop.ifindex, 0) } as u32;
    Outcome::Forwarded(action)
}

/// Rewrites the destination address and port and decrements the TTL, in whole words; the
/// checksums change by the backend's precomputed deltas (`BackendValue::csum_ip`, `csum_l4`:
/// the rewrite is the same for every packet of the backend). False (nothing written) when the
/// TTL is ≤ 1.
#[inline(always)]
fn dnat_v4(ctx: &XdpContext, l3: usize, l4: usize, proto: u8, backend: &BackendValue) -> bool {
    let (Some(ip), Some(ports)) = (ptr_at::<Ipv4Hdr>(ctx, l3), ptr_at::<[u8; 4]>(ctx, l4)) else {
        return false;
    };
    let (ip, ports) = (ip as *mut u8, ports as *mut u8);
    let ttl = unsafe { *ip.add(8) };
    if ttl <= 1 {
        return false;
    }
    let check = unsafe { ip.add(10) };
    store16(check, apply_checksum_delta(load16(check), backend.csum_ip));
    store32(unsafe { ip.add(16) }, load32(backend.addr.as_ptr()));
    unsafe { *ip.add(8) = ttl - 1 };
    store16(unsafe { ports.add(2) }, load16(backend.port.as_ptr()));
    update_l4_checksum(ctx, l4, proto, backend.csum_l4, true);
    true
}

#[inline(always)]
fn dnat_v6(ctx: &XdpContext, l3: usize, l4: usize, proto: u8, backend: &BackendValue) -> bool {
    let (Some(ip6), Some(ports)) = (ptr_at::<Ipv6Hdr>(ctx, l3), ptr_at::<[u8; 4]>(ctx, l4)) else {
        return false;
    };
    let (ip6, ports) = unsafe { (&mut *ip6, ports as *mut u8) };
    if ip6.hop_limit <= 1 {
        return false;
    }
    set_v6(&mut ip6.dst, &backend.addr);
    ip6.hop_limit -= 1;
    store16(unsafe { ports.add(2) }, load16(backend.port.as_ptr()));
    update_l4_checksum(ctx, l4, proto, backend.csum_l4, false);
    true
}

/// Applies `delta` to the TCP or UDP checksum. An IPv4 UDP checksum of 0 means "none" and stays
/// 0; a computed UDP checksum of 0 is sent as 0xffff (RFC 768). (0 and 0xffff read the same in
/// either byte order.)
#[inline(always)]
fn update_l4_checksum(ctx: &XdpContext, l4: usize, proto: u8, delta: u16, ipv4: bool) {
    let offset = l4
        + if proto == PROTO_TCP {
            TCP_CSUM_OFFSET
        } else {
            UDP_CSUM_OFFSET
        };
    let Some(csum) = ptr_at::<[u8; 2]>(ctx, offset) else {
        return;
    };
    let csum = csum as *mut u8;
    let old = load16(csum);
    if proto == PROTO_UDP {
        if ipv4 && old == 0 {
            return;
        }
        let new = apply_checksum_delta(old, delta);
        store16(csum, if new == 0 { 0xffff } else { new });
    } else {
        store16(csum, apply_checksum_delta(old, delta));
    }
}
