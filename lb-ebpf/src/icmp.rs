//! ICMP errors about balanced flows, the ingress half (the egress half is in `egress`).
//!
//! A router that cannot pass one of a flow's replies (too big for its next link, TTL expired)
//! sends its error to the reply's source: the VIP. The error embeds the start of the reply
//! (VIP:port → client:port). Here the embedded header names the flow in the connection table;
//! the error goes to that flow's backend, with the outer destination and the embedded source
//! rewritten to the backend's address and port (as the backend sent it) and every checksum
//! updated: so Path MTU discovery through a VIP works. An error whose embedded packet names no
//! tracked flow, or is not a plain TCP/UDP header, is left to the kernel untouched; nothing goes
//! to a backend the embedded flow does not name.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP};

use crate::{
    balancer::{live_backend, may_be_vip_anywhere, send},
    checksum::Delta,
    headers::{
        Ipv4Hdr, Ipv6Hdr, ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG, ICMPV6_PARAMETER_PROBLEM,
        ICMPV6_TIME_EXCEEDED, ICMP_DEST_UNREACH, ICMP_HLEN, ICMP_PARAMETER_PROBLEM,
        ICMP_TIME_EXCEEDED, IPV4_HLEN, IPV6_HLEN, TCP_CSUM_OFFSET, UDP_CSUM_OFFSET,
    },
    maps::CONNTRACK,
    parse::{holds, ptr_at},
    stats::Outcome,
};

/// ICMP types that carry the packet they are about.
#[inline(always)]
pub fn is_error_v4(icmp_type: u8) -> bool {
    icmp_type == ICMP_DEST_UNREACH
        || icmp_type == ICMP_TIME_EXCEEDED
        || icmp_type == ICMP_PARAMETER_PROBLEM
}

/// ICMPv6 types that carry the packet they are about.
#[inline(always)]
pub fn is_error_v6(icmp_type: u8) -> bool {
    icmp_type == ICMPV6_DEST_UNREACH
        || icmp_type == ICMPV6_PACKET_TOO_BIG
        || icmp_type == ICMPV6_TIME_EXCEEDED
        || icmp_type == ICMPV6_PARAMETER_PROBLEM
}

/// The key of the flow going the other way from the embedded packet (src:sport → dst:dport,
/// `ports` its first four L4 bytes): for an embedded reply (VIP → client) the connection-table
/// key (client → VIP); for an embedded client packet (client → backend) the reverse-NAT key
/// (backend → client).
#[inline(always)]
pub fn reversed(src: &[u8; 16], dst: &[u8; 16], ports: &[u8; 4], proto: u8, family: u8) -> FlowKey {
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

/// Where the embedded TCP or UDP checksum sits, from the embedded L4 header's start.
#[inline(always)]
pub fn l4_csum_offset(proto: u8) -> usize {
    if proto == PROTO_TCP {
        TCP_CSUM_OFFSET
    } else {
        UDP_CSUM_OFFSET
    }
}

/// Rewrites an embedded TCP/UDP checksum by `l4` (an IPv4 UDP checksum of 0 stays 0; a computed
/// UDP 0 is sent as 0xffff) and records the change in `icmp`, the ICMP checksum's delta. Both
/// directions (XDP here, TC in `egress`) use it.
#[inline(always)]
pub fn rewrite_embedded_checksum(
    csum: &mut [u8; 2],
    proto: u8,
    ipv4: bool,
    l4: &Delta,
    icmp: &mut Delta,
) {
    let old = *csum;
    if ipv4 && proto == PROTO_UDP && old == [0, 0] {
        return;
    }
    let new = l4.apply(old);
    *csum = if proto == PROTO_UDP && new == [0, 0] {
        [0xff, 0xff]
    } else {
        new
    };
    icmp.replace(&old, csum);
}

/// An IPv4 ICMP error to a possible VIP. `l3` is the outer header's offset (checked by the
/// caller: no options, not a fragment, TTL > 1, `total` bytes present).
#[inline(never)]
pub fn ipv4(ctx: &XdpContext, l3: usize, total: usize) -> Outcome {
    let icmp_off = l3 + IPV4_HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4 = inner_off + IPV4_HLEN;
    let Some(icmp) = ptr_at::<[u8; ICMP_HLEN]>(ctx, icmp_off) else {
        return Outcome::Malformed;
    };
    if !is_error_v4(unsafe { (*icmp)[0] }) {
        return Outcome::Passed;
    }
    let (Some(ip), Some(inner), Some(ports)) = (
        ptr_at::<Ipv4Hdr>(ctx, l3),
        ptr_at::<Ipv4Hdr>(ctx, inner_off),
        ptr_at::<[u8; 8]>(ctx, inner_l4),
    ) else {
        return Outcome::Malformed;
    };
    let (ip, inner, ports, icmp) = unsafe { (&mut *ip, &mut *inner, &mut *ports, &mut *icmp) };
    if IPV4_HLEN + ICMP_HLEN + IPV4_HLEN + 8 > total {
        return Outcome::Malformed;
    }
    let mut vip = [0u8; 16];
    vip[..4].copy_from_slice(&ip.dst);
    if !may_be_vip_anywhere(&vip) {
        return Outcome::Passed;
    }
    // Embedded options, a fragment, or not TCP/UDP (ICMP about ICMP): not a flow of ours.
    if inner.version_ihl != 0x45
        || u16::from_be_bytes(inner.frag) & 0x1fff != 0
        || (inner.proto != PROTO_TCP && inner.proto != PROTO_UDP)
    {
        return Outcome::Passed;
    }
    // The embedded packet is a reply the VIP sent; an error about anything else is not ours.
    if inner.src != ip.dst {
        return Outcome::IcmpUnmatched;
    }
    let mut client = [0u8; 16];
    client[..4].copy_from_slice(&inner.dst);
    let key = reversed(
        &vip,
        &client,
        &[ports[0], ports[1], ports[2], ports[3]],
        inner.proto,
        FAMILY_IPV4,
    );
    // SAFETY: map values stay valid for the program's run; they are only read.
    let Some(entry) = (unsafe { CONNTRACK.get(&key) }) else {
        return Outcome::IcmpUnmatched;
    };
    let Some(backend) = live_backend(entry.backend_id, entry.generation) else {
        return Outcome::IcmpUnmatched;
    };
    let new_addr = [
        backend.addr[0],
        backend.addr[1],
        backend.addr[2],
        backend.addr[3],
    ];

    // The embedded reply, as the backend sent it: source address and port, its IP checksum,
    // and its TCP/UDP checksum when the error carries that far.
    let mut addr = Delta::new();
    addr.replace(&ip.dst, &new_addr);
    let mut icmp_delta = addr;
    let old_inner_check = inner.check;
    inner.check = addr.apply(inner.check);
    icmp_delta.replace(&old_inner_check, &inner.check);
    let mut l4 = addr;
    l4.replace(&[ports[0], ports[1]], &backend.port);
    icmp_delta.replace(&[ports[0], ports[1]], &backend.port);
    let csum_off = inner_l4 + l4_csum_offset(inner.proto);
    if csum_off + 2 <= l3 + total {
        if let Some(csum) = ptr_at::<[u8; 2]>(ctx, csum_off) {
            let csum = unsafe { &mut *csum };
            rewrite_embedded_checksum(csum, inner.proto, true, &l4, &mut icmp_delta);
        }
    }
    inner.src = new_addr;
    ports[0] = backend.port[0];
    ports[1] = backend.port[1];
    let old_check = [icmp[2], icmp[3]];
    let new_check = icmp_delta.apply(old_check);
    icmp[2] = new_check[0];
    icmp[3] = new_check[1];

    // The outer header: to the backend, one hop further.
    let mut outer = addr;
    outer.replace(&[ip.ttl, ip.proto], &[ip.ttl - 1, ip.proto]);
    ip.check = outer.apply(ip.check);
    ip.dst = new_addr;
    ip.ttl -= 1;
    Outcome::IcmpTranslated(send(ctx, &entry.next_hop).action())
}

/// An ICMPv6 error to a possible VIP, directly after the fixed header.
#[inline(never)]
pub fn ipv6(ctx: &XdpContext, l3: usize) -> Outcome {
    let icmp_off = l3 + IPV6_HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4 = inner_off + IPV6_HLEN;
    let (Some(ip6), Some(icmp)) = (
        ptr_at::<Ipv6Hdr>(ctx, l3),
        ptr_at::<[u8; ICMP_HLEN]>(ctx, icmp_off),
    ) else {
        return Outcome::Malformed;
    };
    let (ip6, icmp) = unsafe { (&mut *ip6, &mut *icmp) };
    let payload = u16::from_be_bytes(ip6.payload_len) as usize;
    if ip6.vtcfl[0] >> 4 != 6 || !holds(ctx, l3 + IPV6_HLEN + payload) {
        return Outcome::Malformed;
    }
    if !is_error_v6(icmp[0]) || ip6.hop_limit <= 1 || !may_be_vip_anywhere(&ip6.dst) {
        return Outcome::Passed;
    }
    let (Some(inner), Some(ports)) = (
        ptr_at::<Ipv6Hdr>(ctx, inner_off),
        ptr_at::<[u8; 8]>(ctx, inner_l4),
    ) else {
        return Outcome::Malformed;
    };
    let (inner, ports) = unsafe { (&mut *inner, &mut *ports) };
    if ICMP_HLEN + IPV6_HLEN + 8 > payload {
        return Outcome::Malformed;
    }
    // Embedded extension headers, or not TCP/UDP (ICMP about ICMP): not a flow of ours.
    if inner.next_header != PROTO_TCP && inner.next_header != PROTO_UDP {
        return Outcome::Passed;
    }
    if inner.src != ip6.dst {
        return Outcome::IcmpUnmatched;
    }
    let key = reversed(
        &inner.src,
        &inner.dst,
        &[ports[0], ports[1], ports[2], ports[3]],
        inner.next_header,
        FAMILY_IPV6,
    );
    // SAFETY: map values stay valid for the program's run; they are only read.
    let Some(entry) = (unsafe { CONNTRACK.get(&key) }) else {
        return Outcome::IcmpUnmatched;
    };
    let Some(backend) = live_backend(entry.backend_id, entry.generation) else {
        return Outcome::IcmpUnmatched;
    };

    // VIP → backend appears twice under the ICMPv6 checksum: the pseudo-header's destination
    // and the embedded source. The embedded TCP/UDP checksum covers it once, with the port.
    let mut addr = Delta::new();
    addr.replace(&ip6.dst, &backend.addr);
    let mut icmp_delta = addr;
    icmp_delta.merge(addr);
    let mut l4 = addr;
    l4.replace(&[ports[0], ports[1]], &backend.port);
    icmp_delta.replace(&[ports[0], ports[1]], &backend.port);
    let csum_off = inner_l4 + l4_csum_offset(inner.next_header);
    if csum_off + 2 <= l3 + IPV6_HLEN + payload {
        if let Some(csum) = ptr_at::<[u8; 2]>(ctx, csum_off) {
            let csum = unsafe { &mut *csum };
            rewrite_embedded_checksum(csum, inner.next_header, false, &l4, &mut icmp_delta);
        }
    }
    inner.src = backend.addr;
    ports[0] = backend.port[0];
    ports[1] = backend.port[1];
    let new_check = icmp_delta.apply([icmp[2], icmp[3]]);
    icmp[2] = new_check[0];
    icmp[3] = new_check[1];
    ip6.dst = backend.addr;
    ip6.hop_limit -= 1;
    Outcome::IcmpTranslated(send(ctx, &entry.next_hop).action())
}
