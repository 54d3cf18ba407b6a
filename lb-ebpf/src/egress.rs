//! TC egress: replies from a backend, for a flow the balancer created, get their source rewritten
//! back to (VIP, port). Checksums through the kernel's helpers, which also handle
//! CHECKSUM_PARTIAL skbs (locally generated or forwarded with offload). Never drops anything.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{
    FlowKey, ReverseNatValue, FAMILY_IPV4, FAMILY_IPV6, FLOW_BACKEND_FIN, PROTO_TCP, PROTO_UDP,
};

use crate::{
    balancer::record_fin,
    checksum::Delta,
    headers::{
        Ipv4Hdr, Ipv6Hdr, ETH_HLEN, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, ICMP_HLEN, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPV4_CSUM_OFFSET, IPV4_HLEN, IPV6_HLEN, TCP_FIN, TCP_FLAGS_OFFSET, TCP_RST,
        VLAN_HLEN,
    },
    icmp::{is_error_v4, is_error_v6, l4_csum_offset},
    maps::{CONNTRACK, REVERSE_NAT},
    stats,
};

/// A backend's TCP RST ends the flow: its entries leave both tables now. `key` is the reply's
/// (backend → client), `rv` what it was rewritten to.
#[inline(never)]
fn forget_flow(key: &FlowKey, rv: &ReverseNatValue) {
    let _ = CONNTRACK.remove(&conntrack_key(key, rv));
    let _ = REVERSE_NAT.remove(key);
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

/// After the rewrite: an RST ends the flow, a FIN closes the backend's side.
#[inline(always)]
fn after_reply(ctx: &TcContext, l4: usize, proto: u8, key: &FlowKey, rv: &ReverseNatValue) {
    if proto != PROTO_TCP {
        return;
    }
    let Ok(flags) = ctx.load::<u8>(l4 + TCP_FLAGS_OFFSET) else {
        return;
    };
    if flags & TCP_RST != 0 {
        forget_flow(key, rv);
    } else if flags & TCP_FIN != 0 {
        backend_fin(key, rv);
    }
}

#[inline(always)]
pub fn reverse_nat(ctx: &TcContext) {
    let Ok(proto) = ctx.load::<[u8; 2]>(12) else {
        return;
    };
    let (l3, proto) = match u16::from_be_bytes(proto) {
        ETH_P_8021Q => match ctx.load::<[u8; 2]>(ETH_HLEN + 2) {
            Ok(inner) => (ETH_HLEN + VLAN_HLEN, u16::from_be_bytes(inner)),
            Err(_) => return,
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
    if proto == PROTO_TCP {
        l4 + 16
    } else {
        l4 + 6
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, l3: usize) {
    let Ok(ip) = ctx.load::<Ipv4Hdr>(l3) else {
        return;
    };
    if ip.version_ihl != 0x45 || u16::from_be_bytes(ip.frag) & 0x3fff != 0 {
        return;
    }
    if ip.proto == IPPROTO_ICMP {
        icmp_v4(ctx, l3, &ip);
        return;
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return;
    }
    let l4 = l3 + 20;
    let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
        return;
    };
    let mut key = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto: ip.proto,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    };
    key.src[..4].copy_from_slice(&ip.src);
    key.dst[..4].copy_from_slice(&ip.dst);
    let Some(rv) = (unsafe { REVERSE_NAT.get(&key) }).copied() else {
        return;
    };
    if rv.family != FAMILY_IPV4 {
        return;
    }
    let new_src = [rv.addr[0], rv.addr[1], rv.addr[2], rv.addr[3]];
    let (old_addr, new_addr) = (u32::from_ne_bytes(ip.src), u32::from_ne_bytes(new_src));
    let (old_port, new_port) = (u16::from_ne_bytes(key.sport), u16::from_ne_bytes(rv.port));
    let mangled0 = if ip.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let l4_csum = csum_offset(l4, ip.proto);
    let ok = ctx
        .l4_csum_replace(
            l4_csum,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
        )
        .and_then(|_| ctx.l4_csum_replace(l4_csum, old_port as u64, new_port as u64, mangled0 | 2))
        .and_then(|_| ctx.l3_csum_replace(l3 + 10, old_addr as u64, new_addr as u64, 4))
        .and_then(|_| ctx.store(l3 + 12, &new_src, 0))
        .and_then(|_| ctx.store(l4, &rv.port, 0));
    if ok.is_ok() {
        stats::count_reverse_nat();
        after_reply(ctx, l4, ip.proto, &key, &rv);
    }
}

#[inline(always)]
fn ipv6(ctx: &TcContext, l3: usize) {
    let Ok(ip6) = ctx.load::<Ipv6Hdr>(l3) else {
        return;
    };
    if ip6.next_header == IPPROTO_ICMPV6 {
        icmp_v6(ctx, l3, &ip6);
        return;
    }
    if ip6.next_header != PROTO_TCP && ip6.next_header != PROTO_UDP {
        return;
    }
    let l4 = l3 + IPV6_HLEN;
    let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
        return;
    };
    let key = FlowKey {
        src: ip6.src,
        dst: ip6.dst,
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto: ip6.next_header,
        family: FAMILY_IPV6,
        _pad: [0; 2],
    };
    let Some(rv) = (unsafe { REVERSE_NAT.get(&key) }).copied() else {
        return;
    };
    if rv.family != FAMILY_IPV6 {
        return;
    }
    let rv: ReverseNatValue = rv;
    let mut old_words: [u32; 4] = words(&ip6.src);
    let mut new_words: [u32; 4] = words(&rv.addr);
    let diff = unsafe { bpf_csum_diff(old_words.as_mut_ptr(), 16, new_words.as_mut_ptr(), 16, 0) };
    if diff < 0 {
        return;
    }
    let (old_port, new_port) = (u16::from_ne_bytes(key.sport), u16::from_ne_bytes(rv.port));
    let l4_csum = csum_offset(l4, ip6.next_header);
    let ok = ctx
        .l4_csum_replace(l4_csum, 0, diff as u64, BPF_F_PSEUDO_HDR as u64)
        .and_then(|_| ctx.l4_csum_replace(l4_csum, old_port as u64, new_port as u64, 2))
        .and_then(|_| ctx.store(l3 + 8, &rv.addr, 0))
        .and_then(|_| ctx.store(l4, &rv.port, 0));
    if ok.is_ok() {
        stats::count_reverse_nat();
        after_reply(ctx, l4, ip6.next_header, &key, &rv);
    }
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// The reverse-NAT key of the flow a backend's ICMP error is about: the embedded packet is the
/// client's, as the backend received it (client → backend), so the key is its reverse.
#[inline(always)]
fn reply_key(src: &[u8; 16], dst: &[u8; 16], ports: &[u8; 4], proto: u8, family: u8) -> FlowKey {
    FlowKey {
        src: *dst,
        dst: *src,
        sport: [ports[2], ports[3]],
        dport: [ports[0], ports[1]],
        proto,
        family,
        _pad: [0; 2],
    }
}

/// The embedded TCP/UDP checksum after `delta`, when the error carries it (`None`: not there,
/// or an IPv4 UDP checksum of 0, which stays 0).
#[inline(always)]
fn embedded_l4_checksum(
    ctx: &TcContext,
    offset: usize,
    proto: u8,
    ipv4: bool,
    delta: &Delta,
) -> Option<([u8; 2], [u8; 2])> {
    let old = ctx.load::<[u8; 2]>(offset).ok()?;
    if ipv4 && proto == PROTO_UDP && old == [0, 0] {
        return None;
    }
    let new = delta.apply(old);
    let new = if proto == PROTO_UDP && new == [0, 0] {
        [0xff, 0xff]
    } else {
        new
    };
    Some((old, new))
}

/// An ICMP error a backend (or a router between it and here) sent about a client's packet:
/// the embedded packet (client → backend) is rewritten to what the client sent (client → VIP),
/// and the outer source, when it is the backend, becomes the VIP. Checksums are computed here
/// (ICMP is never checksum-offloaded).
#[inline(never)]
fn icmp_v4(ctx: &TcContext, l3: usize, ip: &Ipv4Hdr) {
    let icmp_off = l3 + IPV4_HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4 = inner_off + IPV4_HLEN;
    let (Ok(icmp), Ok(inner), Ok(ports)) = (
        ctx.load::<[u8; ICMP_HLEN]>(icmp_off),
        ctx.load::<Ipv4Hdr>(inner_off),
        ctx.load::<[u8; 4]>(inner_l4),
    ) else {
        return;
    };
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
    let key = reply_key(&src, &dst, &ports, inner.proto, FAMILY_IPV4);
    let Some(rv) = (unsafe { REVERSE_NAT.get(&key) }).copied() else {
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
    let l4_csum = embedded_l4_checksum(ctx, csum_off, inner.proto, true, &l4);
    if let Some((old, new)) = l4_csum {
        icmp_delta.replace(&old, &new);
    }
    let icmp_check = icmp_delta.apply([icmp[2], icmp[3]]);
    let mut ok = ctx
        .store(inner_off + 16, &vip, 0)
        .and_then(|_| ctx.store(inner_off + IPV4_CSUM_OFFSET, &inner_check, 0))
        .and_then(|_| ctx.store(inner_l4 + 2, &rv.port, 0))
        .and_then(|_| ctx.store(icmp_off + 2, &icmp_check, 0));
    if let Some((_, new)) = l4_csum {
        ok = ok.and_then(|_| ctx.store(csum_off, &new, 0));
    }
    // From the backend itself: the client must see it come from the VIP.
    if ip.src == inner.dst {
        let mut outer = Delta::new();
        outer.replace(&ip.src, &vip);
        let check = outer.apply(ip.check);
        ok = ok
            .and_then(|_| ctx.store(l3 + 12, &vip, 0))
            .and_then(|_| ctx.store(l3 + IPV4_CSUM_OFFSET, &check, 0));
    }
    if ok.is_ok() {
        stats::count_icmp_to_client();
    }
}

/// The ICMPv6 form of `icmp_v4`; the ICMPv6 checksum also covers the outer source.
#[inline(never)]
fn icmp_v6(ctx: &TcContext, l3: usize, ip6: &Ipv6Hdr) {
    let icmp_off = l3 + IPV6_HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4 = inner_off + IPV6_HLEN;
    let (Ok(icmp), Ok(inner), Ok(ports)) = (
        ctx.load::<[u8; ICMP_HLEN]>(icmp_off),
        ctx.load::<Ipv6Hdr>(inner_off),
        ctx.load::<[u8; 4]>(inner_l4),
    ) else {
        return;
    };
    if !is_error_v6(icmp[0]) || (inner.next_header != PROTO_TCP && inner.next_header != PROTO_UDP) {
        return;
    }
    let key = reply_key(
        &inner.src,
        &inner.dst,
        &ports,
        inner.next_header,
        FAMILY_IPV6,
    );
    let Some(rv) = (unsafe { REVERSE_NAT.get(&key) }).copied() else {
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
    let l4_csum = embedded_l4_checksum(ctx, csum_off, inner.next_header, false, &l4);
    if let Some((old, new)) = l4_csum {
        icmp_delta.replace(&old, &new);
    }
    let from_backend = ip6.src == inner.dst;
    if from_backend {
        icmp_delta.merge(addr);
    }
    let icmp_check = icmp_delta.apply([icmp[2], icmp[3]]);
    let mut ok = ctx
        .store(inner_off + 24, &rv.addr, 0)
        .and_then(|_| ctx.store(inner_l4 + 2, &rv.port, 0))
        .and_then(|_| ctx.store(icmp_off + 2, &icmp_check, 0));
    if let Some((_, new)) = l4_csum {
        ok = ok.and_then(|_| ctx.store(csum_off, &new, 0));
    }
    if from_backend {
        ok = ok.and_then(|_| ctx.store(l3 + 8, &rv.addr, 0));
    }
    if ok.is_ok() {
        stats::count_icmp_to_client();
    }
}
