//! Stage 2: answer ARP requests and IPv6 Neighbor Solicitations for service IPs, in place.
//!
//! Only for an IP that has an entry in `L2_VIPS` for the interface the frame arrived on (a bond's
//! port: for its bond): that is how "answer only on the interfaces the operator chose" holds. Anything else is left untouched.
//! Never answers a truncated or malformed frame.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{L2VipKey, L2VipValue, FAMILY_IPV4, FAMILY_IPV6};

use crate::{
    checksum::{self, load32, store32},
    headers::*,
    iface,
    maps::{L2_DEADLINE, L2_VIPS},
    parse::{holds, ptr_at, L2},
    stats::Outcome,
};

/// How many 8-byte option units an NS may carry for us to validate (and answer) it.
const NS_MAX_OPTION_UNITS: usize = 8;

/// The MAC to answer with for `key`, while the answers' deadline has not passed. The clock is
/// read only here, for a request we would answer: never on the balancer's path.
#[inline(always)]
fn our_mac(key: &L2VipKey) -> Option<[u8; 6]> {
    // SAFETY: the value is copied out at once; nothing holds the reference.
    let value: &L2VipValue = unsafe { L2_VIPS.get(key) }?;
    let mac = value.mac;
    let deadline = L2_DEADLINE.get(0).copied().unwrap_or(0);
    // SAFETY: a helper without arguments.
    if deadline != 0 && unsafe { bpf_ktime_get_ns() } > deadline {
        return None;
    }
    Some(mac)
}

/// The `L2_VIPS` key of an IPv4 address on an interface, built in words (a byte-array build
/// would call memset).
#[inline(always)]
fn key_v4(ifindex: u32, addr: &[u8; 4]) -> L2VipKey {
    let words: [u32; 6] = [ifindex, FAMILY_IPV4 as u32, load32(addr.as_ptr()), 0, 0, 0];
    // SAFETY: L2VipKey is six 4-byte words (ifindex; family and padding; the address), every
    // bit pattern valid.
    unsafe { core::mem::transmute::<[u32; 6], L2VipKey>(words) }
}

/// The `L2_VIPS` key of an IPv6 address on an interface, built in words.
#[inline(always)]
fn key_v6(ifindex: u32, addr: &[u8; 16]) -> L2VipKey {
    let w = words(addr);
    let words: [u32; 6] = [ifindex, FAMILY_IPV6 as u32, w[0], w[1], w[2], w[3]];
    // SAFETY: as in `key_v4`.
    unsafe { core::mem::transmute::<[u32; 6], L2VipKey>(words) }
}

#[inline(always)]
fn is_multicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1
}

/// ARP request for a VIP on this interface → ARP reply in place (`Outcome::ArpReply`).
#[inline(never)]
pub fn arp(ctx: &XdpContext, l2: &L2) -> Outcome {
    let Some(arp) = ptr_at::<ArpEthIpv4>(ctx, l2.l3_offset) else {
        return Outcome::Malformed;
    };
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Outcome::Malformed;
    };
    let (arp, eth) = unsafe { (&mut *arp, &mut *eth) };

    if u16::from_be_bytes(arp.htype) != ARP_HTYPE_ETHERNET
        || u16::from_be_bytes(arp.ptype) != ETH_P_IPV4
        || arp.hlen != 6
        || arp.plen != 4
    {
        return Outcome::Malformed;
    }
    if u16::from_be_bytes(arp.oper) != ARP_OP_REQUEST {
        return Outcome::Passed;
    }
    // A gratuitous ARP (sender IP = target IP) announces an address, it asks nothing: leave it to
    // the kernel (and to whoever watches for address conflicts).
    if u32::from_ne_bytes(arp.spa) == u32::from_ne_bytes(arp.tpa) {
        return Outcome::Passed;
    }
    // Never answer to a multicast or broadcast sender: such a request is forged or broken.
    if is_multicast(&eth.src) || is_multicast(&arp.sha) {
        return Outcome::Malformed;
    }

    let key = key_v4(iface::l2_ifindex(ctx), &arp.tpa);
    let Some(mac) = our_mac(&key) else {
        return Outcome::Passed;
    };

    // Reply: to the asker, from us; "VIP is at mac".
    let vip = arp.tpa;
    eth.dst = eth.src;
    eth.src = mac;
    arp.oper = ARP_OP_REPLY.to_be_bytes();
    arp.tha = arp.sha;
    arp.tpa = arp.spa;
    arp.sha = mac;
    arp.spa = vip;
    Outcome::ArpReply
}

/// What the NS told us, copied out of the packet before it is resized: addresses as four
/// words each, as the CPU reads them (few registers, few spills).
struct Solicitation {
    asker_mac: [u8; 6],
    asker_ip: [u32; 4],
    target: [u32; 4],
}

/// An address in the packet as four words.
#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    let p = addr.as_ptr();
    unsafe {
        [
            load32(p),
            load32(p.add(4)),
            load32(p.add(8)),
            load32(p.add(12)),
        ]
    }
}

/// Writes four words as an address in the packet.
#[inline(always)]
fn put_words(addr: &mut [u8; 16], w: &[u32; 4]) {
    let p = addr.as_mut_ptr();
    unsafe {
        store32(p, w[0]);
        store32(p.add(4), w[1]);
        store32(p.add(8), w[2]);
        store32(p.add(12), w[3]);
    }
}

/// ICMPv6 Neighbor Solicitation for a VIP on this interface → solicited Neighbor Advertisement
/// in place (`Outcome::NaReply`). Other IPv6 traffic → `Outcome::Passed`.
#[inline(never)]
pub fn ndp(ctx: &XdpContext, l2: &L2) -> Outcome {
    let Some(ip6) = ptr_at::<Ipv6Hdr>(ctx, l2.l3_offset) else {
        return Outcome::Malformed;
    };
    let ip6 = unsafe { &*ip6 };
    if ip6.vtcfl[0] >> 4 != 6 {
        return Outcome::Malformed;
    }
    // No extension headers: an NS behind one is not for us to answer.
    if ip6.next_header != IPPROTO_ICMPV6 {
        return Outcome::Passed;
    }
    let icmp_offset = l2.l3_offset + IPV6_HLEN;
    let payload_len = u16::from_be_bytes(ip6.payload_len) as usize;
    if !holds(ctx, icmp_offset + payload_len) {
        return Outcome::Malformed;
    }
    let Some(icmp_type) = ptr_at::<u8>(ctx, icmp_offset) else {
        return Outcome::Malformed;
    };
    if unsafe { *icmp_type } != ICMPV6_NS {
        return Outcome::Passed;
    }
    let Some(nd) = ptr_at::<NdMsg>(ctx, icmp_offset) else {
        return Outcome::Malformed;
    };
    let nd = unsafe { &*nd };

    // RFC 4861 §7.1.1 validity checks.
    if ip6.hop_limit != 255
        || nd.code != 0
        || payload_len < ND_FIXED_LEN
        || !(payload_len - ND_FIXED_LEN).is_multiple_of(8)
    {
        return Outcome::Malformed;
    }
    let option_units = (payload_len - ND_FIXED_LEN) / 8;
    if option_units > NS_MAX_OPTION_UNITS {
        return Outcome::Passed;
    }

    let key = key_v6(iface::l2_ifindex(ctx), &nd.target);
    let Some(mac) = our_mac(&key) else {
        return Outcome::Passed;
    };

    // The checksum is verified only for NSs we would answer: the kernel verifies the rest.
    if !ns_checksum_ok(ctx, ip6, icmp_offset, payload_len, option_units) {
        return Outcome::Malformed;
    }

    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Outcome::Malformed;
    };
    let asker_mac = unsafe { (*eth).src };
    if is_multicast(&asker_mac) {
        return Outcome::Malformed;
    }
    let ns = Solicitation {
        asker_mac,
        asker_ip: words(&ip6.src),
        target: words(&nd.target),
    };
    write_advertisement(ctx, l2.l3_offset, &ns, mac)
}

/// True when the one's-complement sum over the pseudo-header and the whole NS (fixed part and
/// options, checksum field included) is all ones. Summed in 32-bit words as the CPU reads them
/// (the pseudo-header, the fixed part and every option are whole words; the byte order does not
/// change a one's-complement sum's validity, RFC 1071 §2(B)): few instructions, few spills.
/// False if an option unit runs past the packet.
#[inline(always)]
fn ns_checksum_ok(
    ctx: &XdpContext,
    ip6: &Ipv6Hdr,
    icmp_offset: usize,
    payload_len: usize,
    option_units: usize,
) -> bool {
    let mut sum: u64 = 0;
    let (src, dst) = (ip6.src.as_ptr(), ip6.dst.as_ptr());
    let mut i = 0;
    while i < 4 {
        sum += load32(unsafe { src.add(4 * i) }) as u64 + load32(unsafe { dst.add(4 * i) }) as u64;
        i += 1;
    }
    sum += u32::from_ne_bytes((payload_len as u32).to_be_bytes()) as u64;
    sum += u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]) as u64;
    let Some(fixed) = ptr_at::<[u8; ND_FIXED_LEN]>(ctx, icmp_offset) else {
        return false;
    };
    let fixed = fixed as *const u8;
    let mut i = 0;
    while i < ND_FIXED_LEN / 4 {
        sum += load32(unsafe { fixed.add(4 * i) }) as u64;
        i += 1;
    }
    let mut unit = 0;
    while unit < NS_MAX_OPTION_UNITS {
        if unit >= option_units {
            break;
        }
        let Some(opt) = ptr_at::<[u8; 8]>(ctx, icmp_offset + ND_FIXED_LEN + unit * 8) else {
            return false;
        };
        let opt = opt as *const u8;
        sum += load32(opt) as u64 + load32(unsafe { opt.add(4) }) as u64;
        unit += 1;
    }
    checksum::fold64(sum) == 0xffff
}

/// ff02::1, as four words in memory order.
const ALL_NODES: [u32; 4] = [
    u32::from_ne_bytes([0xff, 0x02, 0, 0]),
    0,
    0,
    u32::from_ne_bytes([0, 0, 0, 1]),
];
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// Resizes the frame to Ethernet (+VLAN) + IPv6 + NA-with-TLLA and writes the advertisement,
/// its checksum summed in 32-bit words as the CPU reads them (RFC 1071 §2(B)).
#[inline(always)]
fn write_advertisement(
    ctx: &XdpContext,
    l3_offset: usize,
    ns: &Solicitation,
    mac: [u8; 6],
) -> Outcome {
    let wanted = (l3_offset + IPV6_HLEN + NA_LEN) as i32;
    let current = (ctx.data_end() - ctx.data()) as i32;
    if wanted != current {
        // SAFETY: the helper only moves data_end; every pointer is re-derived below.
        let rc = unsafe { bpf_xdp_adjust_tail(ctx.ctx, wanted - current) };
        if rc != 0 {
            // No tailroom to grow into: leave the NS to the kernel, unanswered by us.
            return Outcome::Passed;
        }
    }
    let (Some(eth), Some(ip6), Some(na)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv6Hdr>(ctx, l3_offset),
        ptr_at::<NaWithTlla>(ctx, l3_offset + IPV6_HLEN),
    ) else {
        return Outcome::Malformed;
    };
    let (eth, ip6, na) = unsafe { (&mut *eth, &mut *ip6, &mut *na) };

    // A DAD probe (from ::) is answered to all nodes, unsolicited (RFC 4861 §7.2.4).
    let from_unspecified = ns.asker_ip == [0; 4];
    let (dst_ip, dst_mac, flags) = if from_unspecified {
        (ALL_NODES, ALL_NODES_MAC, NA_FLAG_OVERRIDE)
    } else {
        (
            ns.asker_ip,
            ns.asker_mac,
            NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE,
        )
    };

    eth.dst = dst_mac;
    eth.src = mac;
    ip6.vtcfl = [0x60, 0, 0, 0];
    ip6.payload_len = (NA_LEN as u16).to_be_bytes();
    ip6.next_header = IPPROTO_ICMPV6;
    ip6.hop_limit = 255;
    put_words(&mut ip6.src, &ns.target);
    put_words(&mut ip6.dst, &dst_ip);
    na.nd.icmp_type = ICMPV6_NA;
    na.nd.code = 0;
    na.nd.checksum = [0, 0];
    na.nd.flags = [flags, 0, 0, 0];
    put_words(&mut na.nd.target, &ns.target);
    na.opt_type = ND_OPT_TARGET_LL_ADDR;
    na.opt_len = 1;
    na.mac = mac;

    // Pseudo-header (source, destination, length, next header), then the NA's eight words.
    let mut sum: u64 = u32::from_ne_bytes((NA_LEN as u32).to_be_bytes()) as u64
        + u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]) as u64;
    let mut i = 0;
    while i < 4 {
        sum += 2 * ns.target[i] as u64 + dst_ip[i] as u64;
        i += 1;
    }
    sum += u32::from_ne_bytes([ICMPV6_NA, 0, 0, 0]) as u64
        + u32::from_ne_bytes([flags, 0, 0, 0]) as u64
        + u32::from_ne_bytes([ND_OPT_TARGET_LL_ADDR, 1, mac[0], mac[1]]) as u64
        + u32::from_ne_bytes([mac[2], mac[3], mac[4], mac[5]]) as u64;
    na.nd.checksum = (!checksum::fold64(sum)).to_ne_bytes();
    Outcome::NaReply
}
