//! TC egress: replies from a backend, for a flow the balancer created, get their source rewritten
//! back to (VIP, port). Headers are read and written in place (direct packet access); the
//! TCP/UDP checksum goes through the kernel's helper, which also handles CHECKSUM_PARTIAL skbs
//! (locally generated or forwarded with offload). Never drops anything.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{
    flow_cache_slot, FlowKey, ReverseNatValue, FAMILY_IPV4, FAMILY_IPV6, FLOW_BACKEND_FIN,
    FLOW_CACHE_REFRESH, PROTO_TCP, PROTO_UDP, REVERSE_VIA_TUNNEL, TUNNEL_OVERHEAD_V4,
    TUNNEL_OVERHEAD_V6,
};

use crate::{
    balancer::{record_fin, same_flow},
    checksum::{copy32, diff16, load32, Delta},
    headers::{
        Ipv4Hdr, Ipv6Hdr, ETH_HLEN, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, ICMP_HLEN, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPV4_HLEN, IPV6_HLEN, TCP_FIN, TCP_FLAGS_OFFSET, TCP_RST, TCP_SYN,
        VLAN_HLEN,
    },
    icmp::{is_error_v4, is_error_v6, l4_csum_offset, reversed, rewrite_embedded_checksum},
    maps::{CONNTRACK, REVERSE_CACHE, REVERSE_NAT, TUNNEL_SETTINGS},
    stats,
};

/// A backend's TCP RST ends the flow: its entries leave both tables now. `key` is the reply's
/// (backend → client), `rv` what it was rewritten to.
#[inline(never)]
fn forget_flow(key: &FlowKey, rv: &ReverseNatValue) {
    let _ = CONNTRACK.remove(&conntrack_key(key, rv));
    let _ = REVERSE_NAT.remove(key);
    if let Some(cached) = REVERSE_CACHE.get_ptr_mut(flow_cache_slot(key)) {
        unsafe { (*cached).key.family = 0 };
    }
}

/// The reply's reverse-NAT entry: this CPU's cached copy when it holds one and may still use
/// it (no helper call: an inlined array access and a 5-word compare), else the table's, then
/// cached. FINs and RSTs always go to the table, and are not cached. A cached copy serves at most
/// `FLOW_CACHE_REFRESH` packets before the table is asked again (which keeps its LRU entry
/// fresh and notices a flow removed meanwhile).
#[inline(always)]
fn reverse_of(key: &FlowKey, flags: u8) -> Option<&'static ReverseNatValue> {
    let cached = REVERSE_CACHE.get_ptr_mut(flow_cache_slot(key));
    if flags & (TCP_FIN | TCP_RST) == 0 {
        if let Some(cached) = cached {
            let cached = unsafe { &mut *cached };
            if same_flow(&cached.key, key) && cached.served < FLOW_CACHE_REFRESH as u32 {
                cached.served += 1;
                return Some(&cached.value);
            }
        }
    }
    // SAFETY: map values stay valid for the program's run; they are only read.
    let rv = unsafe { REVERSE_NAT.get(key) }?;
    // A closing flow is not cached: its last replies read the table.
    if flags & (TCP_FIN | TCP_RST) != 0 {
        return Some(rv);
    }
    if let Some(cached) = cached {
        let cached = unsafe { &mut *cached };
        cached.key = *key;
        // Word copies: ReverseNatValue is byte-aligned, a plain copy calls memmove.
        copy32::<5>(
            &mut cached.value as *mut ReverseNatValue as *mut u8,
            rv as *const ReverseNatValue as *const u8,
        );
        cached.served = 0;
    }
    Some(rv)
}

/// The connection-table key (client → VIP) of a reply's flow.
#[inline(always)]
fn conntrack_key(key: &FlowKey, rv: &ReverseNatValue) -> FlowKey {
    FlowKey {
        src: key.dst,
        dst: rv.addr,
        sport: key.dport,
        dport: rv.port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// A backend's TCP FIN: recorded in the flow's connection-table entry (see `record_fin`).
#[inline(never)]
fn backend_fin(key: &FlowKey, rv: &ReverseNatValue) {
    if let Some(entry) = CONNTRACK.get_ptr_mut(&conntrack_key(key, rv)) {
        record_fin(unsafe { &mut *entry }, FLOW_BACKEND_FIN);
    }
}

/// After the rewrite: an RST ends the flow, a FIN closes the backend's side. `flags` were read
/// before the checksum helpers (which invalidate packet pointers).
#[inline(always)]
fn after_reply(flags: u8, key: &FlowKey, rv: &ReverseNatValue) {
    if flags & TCP_RST != 0 {
        forget_flow(key, rv);
    } else if flags & TCP_FIN != 0 {
        backend_fin(key, rv);
    }
}

/// A bounds-checked pointer into the skb's linear data (direct packet access: no helper call).
#[inline(always)]
fn at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The TCP flags at `l4`, or 0 (UDP, or not in the linear data).
#[inline(always)]
fn tcp_flags(ctx: &TcContext, l4: usize, proto: u8) -> u8 {
    if proto != PROTO_TCP {
        return 0;
    }
    at::<u8>(ctx, l4 + TCP_FLAGS_OFFSET).map_or(0, |flags| unsafe { *flags })
}

/// The most a rewrite reads: Ethernet, a VLAN tag, IPv6, ICMPv6, an embedded IPv6 header and
/// the embedded TCP checksum.
const HEADERS_MAX: u32 = 14 + 4 + 40 + 8 + 40 + 18;

#[inline(always)]
pub fn reverse_nat(ctx: &TcContext) {
    // Headers outside the linear data (rare: a driver's paged frame) are pulled in once.
    let want = HEADERS_MAX.min(ctx.len());
    if ctx.data() + want as usize > ctx.data_end() && ctx.pull_data(want).is_err() {
        return;
    }
    let Some(ethertype) = at::<[u8; 2]>(ctx, 12) else {
        return;
    };
    let (l3, proto) = match u16::from_be_bytes(unsafe { *ethertype }) {
        ETH_P_8021Q => match at::<[u8; 2]>(ctx, ETH_HLEN + 2) {
            Some(inner) => (ETH_HLEN + VLAN_HLEN, u16::from_be_bytes(unsafe { *inner })),
            None => return,
        },
        other => (ETH_HLEN, other),
    };
    match proto {
        ETH_P_IPV4 => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        _ => {}
    }
}

#[inline(always)]
fn csum_offset(l4: usize, proto: u8) -> usize {
    l4 + l4_csum_offset(proto)
}

/// A reply's key (backend → client) in the reverse-NAT table.
#[inline(always)]
fn reply_flow(src: &[u8; 16], dst: &[u8; 16], ports: &[u8; 4], proto: u8, family: u8) -> FlowKey {
    FlowKey {
        src: *src,
        dst: *dst,
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto,
        family,
        _pad: [0; 2],
    }
}

/// An IPv4 reply's key, built in words (byte copies would call memset and memmove). As
/// little-endian words: the source's four bytes then zeros, zeros, the destination's, zeros,
/// then ports, protocol and family.
#[inline(always)]
fn reply_flow_v4(src: &[u8; 4], dst: &[u8; 4], ports: &[u8; 4], proto: u8) -> FlowKey {
    let tail = load32(ports.as_ptr()) as u64 | (proto as u64) << 32 | (FAMILY_IPV4 as u64) << 40;
    let words: [u64; 5] = [
        load32(src.as_ptr()) as u64,
        0,
        load32(dst.as_ptr()) as u64,
        0,
        tail,
    ];
    // SAFETY: FlowKey is 40 bytes, 8-byte aligned, every bit pattern valid.
    unsafe { core::mem::transmute::<[u64; 5], FlowKey>(words) }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, l3: usize) {
    let Some(ip) = at::<Ipv4Hdr>(ctx, l3) else {
        return;
    };
    let ip = unsafe { &mut *ip };
    if ip.version_ihl != 0x45 || u16::from_be_bytes(ip.frag) & 0x3fff != 0 {
        return;
    }
    if ip.proto == IPPROTO_ICMP {
        icmp_v4(ctx, l3);
        return;
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return;
    }
    let proto = ip.proto;
    let l4 = l3 + IPV4_HLEN;
    let Some(ports) = at::<[u8; 4]>(ctx, l4) else {
        return;
    };
    let ports = unsafe { &mut *ports };
    let key = reply_flow_v4(&ip.src, &ip.dst, ports, proto);
    let flags = tcp_flags(ctx, l4, proto);
    let Some(rv) = reverse_of(&key, flags) else {
        return;
    };
    if rv.family != FAMILY_IPV4 {
        return;
    }
    let new_src = [rv.addr[0], rv.addr[1], rv.addr[2], rv.addr[3]];
    let (old_addr, new_addr) = (u32::from_ne_bytes(ip.src), u32::from_ne_bytes(new_src));
    let (old_port, new_port) = (
        u16::from_ne_bytes([ports[0], ports[1]]),
        u16::from_ne_bytes(rv.port),
    );
    // The IPv4 header checksum is never offloaded: written here. Then the addresses and port,
    // directly; the TCP/UDP checksum last, through the kernel's helper, which knows whether the
    // skb's checksum is still to be completed (CHECKSUM_PARTIAL) and invalidates our pointers.
    let mut header = Delta::new();
    header.replace(&ip.src, &new_src);
    ip.check = header.apply(ip.check);
    ip.src = new_src;
    ports[0] = rv.port[0];
    ports[1] = rv.port[1];
    let mangled0 = if proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let l4_csum = csum_offset(l4, proto);
    let ok = ctx
        .l4_csum_replace(
            l4_csum,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
        )
        .and_then(|_| ctx.l4_csum_replace(l4_csum, old_port as u64, new_port as u64, mangled0 | 2));
    if ok.is_ok() {
        stats::count_reverse_nat();
        after_reply(flags, &key, rv);
        clamp_syn_mss(ctx, l4, proto, flags, rv, TUNNELLED_MSS_V4);
    }
}

#[inline(always)]
fn ipv6(ctx: &TcContext, l3: usize) {
    let Some(ip6) = at::<Ipv6Hdr>(ctx, l3) else {
        return;
    };
    let ip6 = unsafe { &mut *ip6 };
    if ip6.next_header == IPPROTO_ICMPV6 {
        icmp_v6(ctx, l3);
        return;
    }
    if ip6.next_header != PROTO_TCP && ip6.next_header != PROTO_UDP {
        return;
    }
    let proto = ip6.next_header;
    let l4 = l3 + IPV6_HLEN;
    let Some(ports) = at::<[u8; 4]>(ctx, l4) else {
        return;
    };
    let ports = unsafe { &mut *ports };
    let key = reply_flow(&ip6.src, &ip6.dst, ports, proto, FAMILY_IPV6);
    let flags = tcp_flags(ctx, l4, proto);
    let Some(rv) = reverse_of(&key, flags) else {
        return;
    };
    if rv.family != FAMILY_IPV6 {
        return;
    }
    let diff = diff16(&ip6.src, &rv.addr);
    let (old_port, new_port) = (
        u16::from_ne_bytes([ports[0], ports[1]]),
        u16::from_ne_bytes(rv.port),
    );
    copy32::<4>(ip6.src.as_mut_ptr(), rv.addr.as_ptr());
    ports[0] = rv.port[0];
    ports[1] = rv.port[1];
    let l4_csum = csum_offset(l4, proto);
    let ok = ctx
        .l4_csum_replace(l4_csum, 0, diff as u64, BPF_F_PSEUDO_HDR as u64)
        .and_then(|_| ctx.l4_csum_replace(l4_csum, old_port as u64, new_port as u64, 2));
    if ok.is_ok() {
        stats::count_reverse_nat();
        after_reply(flags, &key, rv);
        clamp_syn_mss(ctx, l4, proto, flags, rv, TUNNELLED_MSS_V6);
    }
}

/// What an MSS must leave room for, below the node network's MTU, for the client's segments
/// to fit the tunnel: the outer header, the inner IP header and the TCP header.
const TUNNELLED_MSS_V4: u32 = TUNNEL_OVERHEAD_V4 + 20 + 20;
const TUNNELLED_MSS_V6: u32 = TUNNEL_OVERHEAD_V6 + 40 + 20;

/// A SYN-ACK of a flow that came through a tunnel: its MSS option is lowered so that the
/// client's segments, once the ingress node encapsulates them, still fit the node network's
/// MTU (`TunnelSettings::mtu`). The option is found within the first few options (where
/// every TCP stack puts it).
#[inline(always)]
fn clamp_syn_mss(
    ctx: &TcContext,
    l4: usize,
    proto: u8,
    flags: u8,
    rv: &ReverseNatValue,
    room: u32,
) {
    if proto != PROTO_TCP || flags & TCP_SYN == 0 || rv.flags & REVERSE_VIA_TUNNEL == 0 {
        return;
    }
    let mtu = TUNNEL_SETTINGS.get(0).map_or(0, |s| s.mtu);
    if mtu > room {
        clamp_mss(ctx, l4, (mtu - room) as u16);
    }
}

#[inline(never)]
fn clamp_mss(ctx: &TcContext, l4: usize, max: u16) {
    let l4 = l4 & 0x7f;
    let Some(offset) = at::<u8>(ctx, l4 + 12) else {
        return;
    };
    let header = ((unsafe { *offset } >> 4) as usize * 4) & 0x3c;
    let mut at_option = 20usize;
    let mut i = 0;
    while i < 8 {
        at_option &= 0x3f;
        if at_option + 4 > header {
            return;
        }
        let Some(option) = at::<[u8; 4]>(ctx, l4 + at_option) else {
            return;
        };
        let option = unsafe { &mut *option };
        match option[0] {
            0 => return,
            1 => at_option += 1,
            2 => {
                if option[1] != 4 {
                    return;
                }
                let old = u16::from_be_bytes([option[2], option[3]]);
                if old <= max {
                    return;
                }
                let new = max.to_be_bytes();
                option[2] = new[0];
                option[3] = new[1];
                let _ = ctx.l4_csum_replace(
                    l4 + 16,
                    old.to_be() as u64,
                    u16::from_ne_bytes(new) as u64,
                    2,
                );
                return;
            }
            _ => {
                if option[1] < 2 {
                    return;
                }
                at_option += option[1] as usize;
            }
        }
        i += 1;
    }
}

/// Rewrites the embedded TCP/UDP checksum at `offset` when the error carries it (see
/// `icmp::rewrite_embedded_checksum`).
#[inline(always)]
fn embedded_l4_checksum(
    ctx: &TcContext,
    offset: usize,
    proto: u8,
    ipv4: bool,
    delta: &Delta,
    icmp: &mut Delta,
) {
    if let Some(csum) = at::<[u8; 2]>(ctx, offset) {
        rewrite_embedded_checksum(unsafe { &mut *csum }, proto, ipv4, delta, icmp);
    }
}

/// An ICMP error a backend (or a router between it and here) sent about a client's packet:
/// the embedded packet (client → backend) is rewritten to what the client sent (client → VIP),
/// and the outer source, when it is the backend, becomes the VIP. Checksums are computed here
/// and written in place (ICMP is never checksum-offloaded).
#[inline(never)]
fn icmp_v4(ctx: &TcContext, l3: usize) {
    let icmp_off = l3 + IPV4_HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4 = inner_off + IPV4_HLEN;
    let (Some(ip), Some(icmp), Some(inner), Some(ports)) = (
        at::<Ipv4Hdr>(ctx, l3),
        at::<[u8; ICMP_HLEN]>(ctx, icmp_off),
        at::<Ipv4Hdr>(ctx, inner_off),
        at::<[u8; 4]>(ctx, inner_l4),
    ) else {
        return;
    };
    let (ip, icmp, inner, ports) = unsafe { (&mut *ip, &mut *icmp, &mut *inner, &mut *ports) };
    if !is_error_v4(icmp[0])
        || inner.version_ihl != 0x45
        || u16::from_be_bytes(inner.frag) & 0x1fff != 0
        || (inner.proto != PROTO_TCP && inner.proto != PROTO_UDP)
    {
        return;
    }
    let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
    src[..4].copy_from_slice(&inner.src);
    dst[..4].copy_from_slice(&inner.dst);
    let key = reversed(&src, &dst, ports, inner.proto, FAMILY_IPV4);
    // SAFETY: as above.
    let Some(rv) = (unsafe { REVERSE_NAT.get(&key) }) else {
        return;
    };
    if rv.family != FAMILY_IPV4 {
        return;
    }
    let vip = [rv.addr[0], rv.addr[1], rv.addr[2], rv.addr[3]];
    let mut addr = Delta::new();
    addr.replace(&inner.dst, &vip);
    let mut icmp_delta = addr;
    let inner_check = addr.apply(inner.check);
    icmp_delta.replace(&inner.check, &inner_check);
    let old_port = [ports[2], ports[3]];
    let mut l4 = addr;
    l4.replace(&old_port, &rv.port);
    icmp_delta.replace(&old_port, &rv.port);
    let csum_off = inner_l4 + l4_csum_offset(inner.proto);
    embedded_l4_checksum(ctx, csum_off, inner.proto, true, &l4, &mut icmp_delta);
    // From the backend itself: the client must see it come from the VIP.
    if ip.src == inner.dst {
        let mut outer = Delta::new();
        outer.replace(&ip.src, &vip);
        ip.check = outer.apply(ip.check);
        ip.src = vip;
    }
    inner.dst = vip;
    inner.check = inner_check;
    ports[2] = rv.port[0];
    ports[3] = rv.port[1];
    let check = icmp_delta.apply([icmp[2], icmp[3]]);
    icmp[2] = check[0];
    icmp[3] = check[1];
    stats::count_icmp_to_client();
}

/// The ICMPv6 form of `icmp_v4`; the ICMPv6 checksum also covers the outer source.
#[inline(never)]
fn icmp_v6(ctx: &TcContext, l3: usize) {
    let icmp_off = l3 + IPV6_HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4 = inner_off + IPV6_HLEN;
    let (Some(ip6), Some(icmp), Some(inner), Some(ports)) = (
        at::<Ipv6Hdr>(ctx, l3),
        at::<[u8; ICMP_HLEN]>(ctx, icmp_off),
        at::<Ipv6Hdr>(ctx, inner_off),
        at::<[u8; 4]>(ctx, inner_l4),
    ) else {
        return;
    };
    let (ip6, icmp, inner, ports) = unsafe { (&mut *ip6, &mut *icmp, &mut *inner, &mut *ports) };
    if !is_error_v6(icmp[0]) || (inner.next_header != PROTO_TCP && inner.next_header != PROTO_UDP) {
        return;
    }
    let key = reversed(
        &inner.src,
        &inner.dst,
        ports,
        inner.next_header,
        FAMILY_IPV6,
    );
    // SAFETY: as above.
    let Some(rv) = (unsafe { REVERSE_NAT.get(&key) }) else {
        return;
    };
    if rv.family != FAMILY_IPV6 {
        return;
    }
    let mut addr = Delta::new();
    addr.replace(&inner.dst, &rv.addr);
    let mut icmp_delta = addr;
    let old_port = [ports[2], ports[3]];
    let mut l4 = addr;
    l4.replace(&old_port, &rv.port);
    icmp_delta.replace(&old_port, &rv.port);
    let csum_off = inner_l4 + l4_csum_offset(inner.next_header);
    embedded_l4_checksum(
        ctx,
        csum_off,
        inner.next_header,
        false,
        &l4,
        &mut icmp_delta,
    );
    if ip6.src == inner.dst {
        icmp_delta.merge(addr);
        ip6.src = rv.addr;
    }
    inner.dst = rv.addr;
    ports[2] = rv.port[0];
    ports[3] = rv.port[1];
    let check = icmp_delta.apply([icmp[2], icmp[3]]);
    icmp[2] = check[0];
    icmp[3] = check[1];
    stats::count_icmp_to_client();
}
