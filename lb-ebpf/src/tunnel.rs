//! Cluster-wide balancing: a flow whose backend is on another node is encapsulated to that node
//! (IPIP for IPv4, IPv6 in IPv6 for IPv6: the smallest headers, and what the kernel's own
//! `ipip`/`ip6tnl` understand, so a node without Sluice's program still decapsulates them); the
//! endpoint's node decapsulates it, only from the cluster's nodes, and balances it as its own.
//! Its replies leave from there straight to the client (direct server return).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    tunnel_slot, BackendValue, NodeKey, FAMILY_IPV4, FAMILY_IPV6, PROTO_IPIP, PROTO_IPV6_IN_IP,
    TUNNEL_OVERHEAD_V4, TUNNEL_OVERHEAD_V6, TUNNEL_SLOTS as TUNNEL_SLOTS_LEN, TUNNEL_SLOT_PROBES,
};

use crate::{
    balancer::may_be_vip,
    checksum::{copy32, fold64, load16, load32, store16, store32},
    headers::{Ipv4Hdr, Ipv6Hdr, ETH_HLEN, IPV4_HLEN, IPV6_HLEN},
    maps::{TUNNEL_PEERS, TUNNEL_SETTINGS, TUNNEL_SLOTS},
    parse::ptr_at,
    stats::Outcome,
};

/// The Ethernet header (and VLAN tag) of a frame, held in registers while the frame's head
/// moves.
struct Link {
    macs: [u32; 3],
    ethertype: u16,
    /// The VLAN tag's TCI and inner EtherType, when `tagged`.
    vlan: u32,
    tagged: bool,
}

/// Bytes of the frame checked before the link header is read or written: a tagged header's
/// (an IP header follows either, so every frame handled here is longer).
const LINK_MAX: usize = ETH_HLEN + 4;

#[inline(always)]
fn save_link(ctx: &XdpContext, l3: usize) -> Option<Link> {
    let head = ptr_at::<[u8; LINK_MAX]>(ctx, 0)? as *const u8;
    let tagged = l3 != ETH_HLEN;
    let vlan = if tagged {
        load32(unsafe { head.add(ETH_HLEN) })
    } else {
        0
    };
    Some(Link {
        macs: [
            load32(head),
            load32(unsafe { head.add(4) }),
            load32(unsafe { head.add(8) }),
        ],
        ethertype: load16(unsafe { head.add(12) }),
        vlan,
        tagged,
    })
}

#[inline(always)]
fn restore_link(ctx: &XdpContext, link: &Link) -> bool {
    let Some(head) = ptr_at::<[u8; LINK_MAX]>(ctx, 0) else {
        return false;
    };
    let head = head as *mut u8;
    store32(head, link.macs[0]);
    store32(unsafe { head.add(4) }, link.macs[1]);
    store32(unsafe { head.add(8) }, link.macs[2]);
    store16(unsafe { head.add(12) }, link.ethertype);
    if link.tagged {
        store32(unsafe { head.add(ETH_HLEN) }, link.vlan);
    }
    true
}

/// The link header's length as one of its two constants (14, or 18 tagged): with a masked
/// variable offset the verifier would not know that a check further into the frame covers the
/// header's bytes.
#[inline(always)]
fn link_len(l3: usize) -> usize {
    if l3 == ETH_HLEN {
        ETH_HLEN
    } else {
        LINK_MAX
    }
}

/// Moves the frame's start by `delta` bytes (negative: room for an outer header), keeping its
/// Ethernet header (and VLAN tag) in front.
#[inline(always)]
fn move_head(ctx: &XdpContext, l3: usize, delta: i32) -> bool {
    let Some(link) = save_link(ctx, l3) else {
        return false;
    };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return false;
    }
    restore_link(ctx, &link)
}

/// [`move_head`] for a packet that leaves through [`crate::balancer::send`], which writes both
/// MACs: only the EtherType (and VLAN tag) are carried over.
#[inline(always)]
fn move_head_for_send(ctx: &XdpContext, l3: usize, delta: i32) -> bool {
    let Some(head) = ptr_at::<[u8; LINK_MAX]>(ctx, 0) else {
        return false;
    };
    let h = head as *const u8;
    let ethertype = load16(unsafe { h.add(12) });
    let vlan = load32(unsafe { h.add(ETH_HLEN) });
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return false;
    }
    let Some(head) = ptr_at::<[u8; LINK_MAX]>(ctx, 0) else {
        return false;
    };
    let h = head as *mut u8;
    store16(unsafe { h.add(12) }, ethertype);
    if l3 != ETH_HLEN {
        store32(unsafe { h.add(ETH_HLEN) }, vlan);
    }
    true
}

/// An IPv4 packet of IP protocol IPIP: when it comes from a node to this one and carries a
/// packet for a service, its outer header is removed (`Outcome::Decapsulated`: the caller
/// balances the inner packet). From an address that is not a node's: dropped and counted.
/// Anything else (another tunnel's traffic: Calico's IPIP between nodes, say) passes untouched.
#[inline(never)]
pub fn decap_v4(ctx: &XdpContext, l3: usize) -> Outcome {
    let l3 = link_len(l3);
    let (Some(ip), Some(inner)) = (
        ptr_at::<Ipv4Hdr>(ctx, l3),
        ptr_at::<Ipv4Hdr>(ctx, l3 + IPV4_HLEN),
    ) else {
        return Outcome::Passed;
    };
    let (ip, inner) = unsafe { (&*ip, &*inner) };
    if ip.version_ihl != 0x45 || u16::from_be_bytes(ip.frag) & 0x3fff != 0 {
        return Outcome::Passed;
    }
    if !may_be_vip(&[load32(inner.dst.as_ptr()), 0, 0, 0]) {
        return Outcome::Passed;
    }
    let Some(settings) = TUNNEL_SETTINGS.get(0) else {
        return Outcome::Passed;
    };
    let ours = load32(settings.src_v4.as_ptr());
    if ours == 0 || ours != load32(ip.dst.as_ptr()) {
        return Outcome::Passed;
    }
    let src = load32(ip.src.as_ptr());
    if count_in(&[src, 0, 0, 0], FAMILY_IPV4, ctx) {
        decapsulate(ctx, l3, TUNNEL_OVERHEAD_V4 as i32)
    } else {
        Outcome::TunnelForged
    }
}

/// [`decap_v4`] for IPv6 in IPv6.
#[inline(never)]
pub fn decap_v6(ctx: &XdpContext, l3: usize) -> Outcome {
    let l3 = link_len(l3);
    let (Some(ip6), Some(inner)) = (
        ptr_at::<Ipv6Hdr>(ctx, l3),
        ptr_at::<Ipv6Hdr>(ctx, l3 + IPV6_HLEN),
    ) else {
        return Outcome::Passed;
    };
    let (ip6, inner) = unsafe { (&*ip6, &*inner) };
    let d = inner.dst.as_ptr();
    let words = unsafe {
        [
            load32(d),
            load32(d.add(4)),
            load32(d.add(8)),
            load32(d.add(12)),
        ]
    };
    if !may_be_vip(&words) {
        return Outcome::Passed;
    }
    let Some(settings) = TUNNEL_SETTINGS.get(0) else {
        return Outcome::Passed;
    };
    if !same16(&settings.src_v6, &ip6.dst) || settings.src_v6[0] == 0 {
        return Outcome::Passed;
    }
    let s = ip6.src.as_ptr();
    let src = unsafe {
        [
            load32(s),
            load32(s.add(4)),
            load32(s.add(8)),
            load32(s.add(12)),
        ]
    };
    if count_in(&src, FAMILY_IPV6, ctx) {
        decapsulate(ctx, l3, TUNNEL_OVERHEAD_V6 as i32)
    } else {
        Outcome::TunnelForged
    }
}

/// A node's key, written in words (a struct literal with arrays is zeroed by a memset call).
#[inline(always)]
fn node_key(addr: &[u32; 4], family: u8) -> NodeKey {
    let mut slot = core::mem::MaybeUninit::<NodeKey>::uninit();
    let p = slot.as_mut_ptr() as *mut u32;
    let mut i = 0;
    while i < 4 {
        unsafe { p.add(i).write_volatile(addr[i]) };
        i += 1;
    }
    unsafe { p.add(4).write_volatile(family as u32) };
    // SAFETY: every byte written.
    unsafe { slot.assume_init() }
}

/// True when the address `words` (of `family`) is a node's; counts the packet on its entry.
/// First the node's slots (inlined array reads, no hash), then the hash of every node (a node
/// without a slot, or a forged sender): only then is its key built.
#[inline(always)]
fn count_in(words: &[u32; 4], family: u8, ctx: &XdpContext) -> bool {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let first = tunnel_slot(words, family);
    let mut i = 0;
    while i < TUNNEL_SLOT_PROBES {
        let index = (first + i) & (TUNNEL_SLOTS_LEN - 1);
        if let Some(slot) = TUNNEL_SLOTS.get_ptr_mut(index) {
            // SAFETY: this CPU's copy of the slot.
            let slot = unsafe { &mut *slot };
            // The key's last word is the family, its padding zero (see `node_key`).
            let have = as_key_words(&slot.key);
            if have[0] == words[0]
                && have[1] == words[1]
                && have[2] == words[2]
                && have[3] == words[3]
                && have[4] == family as u32
            {
                slot.stats.packets += 1;
                slot.stats.bytes += bytes;
                return true;
            }
        }
        i += 1;
    }
    let Some(stats) = TUNNEL_PEERS.get_ptr_mut(&node_key(words, family)) else {
        return false;
    };
    // SAFETY: this CPU's copy of the value.
    let stats = unsafe { &mut *stats };
    stats.packets += 1;
    stats.bytes += bytes;
    true
}

/// A node key as its five words.
#[inline(always)]
fn as_key_words(key: &NodeKey) -> &[u32; 5] {
    // SAFETY: NodeKey is 20 bytes, aligned to 4.
    unsafe { &*(key as *const NodeKey as *const [u32; 5]) }
}

#[inline(always)]
fn decapsulate(ctx: &XdpContext, l3: usize, overhead: i32) -> Outcome {
    if move_head(ctx, l3, overhead) {
        Outcome::Decapsulated
    } else {
        Outcome::Malformed
    }
}

#[inline(always)]
fn same16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a, b) = (a.as_ptr(), b.as_ptr());
    unsafe {
        load32(a) == load32(b)
            && load32(a.add(4)) == load32(b.add(4))
            && load32(a.add(8)) == load32(b.add(8))
            && load32(a.add(12)) == load32(b.add(12))
    }
}

/// [`encap`]'s results.
pub const ENCAP_OK: u32 = 0;
pub const ENCAP_TOO_BIG: u32 = 1;
pub const ENCAP_FAILED: u32 = 2;

/// Puts an outer header in front of the packet at `l3` (a service's packet, not rewritten),
/// from this node to the backend's node. The caller then sends the frame to that node's next
/// hop (which writes its MACs).
#[inline(always)]
pub fn encap(ctx: &XdpContext, l3: usize, backend: &BackendValue) -> u32 {
    if backend.family == FAMILY_IPV4 {
        encap_v4(ctx, l3, backend)
    } else {
        encap_v6(ctx, l3, backend)
    }
}

/// [`encap`] for IPv4 (IPIP), inlined into the hit path.
#[inline(always)]
fn encap_v4(ctx: &XdpContext, l3: usize, backend: &BackendValue) -> u32 {
    let l3 = link_len(l3);
    let Some(settings) = TUNNEL_SETTINGS.get(0) else {
        return ENCAP_FAILED;
    };
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return ENCAP_FAILED;
    };
    // The inner header's first word (version and IHL, TOS, total length) is the outer's
    // but for the length: words as stored, in the CPU's order (RFC 1071 §2(B): the
    // checksum of words summed so is the checksum as stored).
    let first = load32(inner as *const u8);
    let len = u16::from_be((first >> 16) as u16) as u32;
    let total = len + TUNNEL_OVERHEAD_V4;
    if settings.mtu != 0 && total > settings.mtu {
        return ENCAP_TOO_BIG;
    }
    let src = load32(settings.src_v4.as_ptr());
    let dst = load32(backend.node.as_ptr());
    if src == 0 || !move_head_for_send(ctx, l3, -(TUNNEL_OVERHEAD_V4 as i32)) {
        return ENCAP_FAILED;
    }
    let Some(outer) = ptr_at::<[u8; IPV4_HLEN]>(ctx, l3) else {
        return ENCAP_FAILED;
    };
    let o = outer as *mut u8;
    let w0 = (first & 0xffff) | ((total as u16).to_be() as u32) << 16;
    // No fragmentation (DF); TTL 64, protocol IPIP.
    let w1 = u32::from_ne_bytes([0, 0, 0x40, 0]);
    let w2 = u32::from_ne_bytes([64, PROTO_IPIP, 0, 0]);
    let half = |w: u32| (w & 0xffff) + (w >> 16);
    let sum =
        half(w0) as u64 + half(w1) as u64 + half(w2) as u64 + half(src) as u64 + half(dst) as u64;
    let check = !fold64(sum);
    store32(o, w0);
    store32(unsafe { o.add(4) }, w1);
    store32(unsafe { o.add(8) }, w2 | (check as u32) << 16);
    store32(unsafe { o.add(12) }, src);
    store32(unsafe { o.add(16) }, dst);
    ENCAP_OK
}

/// [`encap`] for IPv6 (IPv6 in IPv6).
#[inline(never)]
fn encap_v6(ctx: &XdpContext, l3: usize, backend: &BackendValue) -> u32 {
    let l3 = link_len(l3);
    let Some(settings) = TUNNEL_SETTINGS.get(0) else {
        return ENCAP_FAILED;
    };
    let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return ENCAP_FAILED;
    };
    let payload = u16::from_be_bytes(unsafe { (*inner).payload_len }) as u32 + IPV6_HLEN as u32;
    // Version, traffic class and flow label, as the client set them: the flow label gives
    // routers between the nodes the flow's entropy (RFC 6438).
    let first = load32(inner as *const u8);
    if settings.mtu != 0 && payload + IPV6_HLEN as u32 > settings.mtu {
        return ENCAP_TOO_BIG;
    }
    if settings.src_v6[0] == 0 || !move_head_for_send(ctx, l3, -(TUNNEL_OVERHEAD_V6 as i32)) {
        return ENCAP_FAILED;
    }
    let Some(outer) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return ENCAP_FAILED;
    };
    let o = outer as *mut u8;
    // The inner header's version, traffic class and flow label; next header IPv6, hop
    // limit 64.
    store32(o, first);
    store16(unsafe { o.add(4) }, (payload as u16).to_be());
    store16(
        unsafe { o.add(6) },
        u16::from_be_bytes([PROTO_IPV6_IN_IP, 64]).to_be(),
    );
    copy32::<4>(unsafe { o.add(8) }, settings.src_v6.as_ptr());
    copy32::<4>(unsafe { o.add(24) }, backend.node.as_ptr());
    ENCAP_OK
}

/// ICMP error lengths: what goes in front of the original packet (IP header and ICMP header),
/// and how much of the original is quoted.
const ICMP4_FRONT: usize = IPV4_HLEN + 8;
const ICMP4_QUOTE: usize = IPV4_HLEN + 8;
const ICMP6_FRONT: usize = IPV6_HLEN + 8;
const ICMP6_QUOTE: usize = IPV6_HLEN + 8;

/// The one's-complement sum of `N` 16-bit words at `p` (as stored: the sum of words in the
/// CPU's order is the checksum in the same order, RFC 1071 §2(B)).
#[inline(always)]
fn sum16<const N: usize>(p: *const u8) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < N {
        sum += load16(unsafe { p.add(2 * i) }) as u32;
        i += 1;
    }
    sum
}

/// Turns the frame around as the start of an ICMP error to its sender: MACs swapped, `front`
/// bytes made in front of the packet at `l3`, the packet cut to `quote` bytes after them.
/// False (the frame may be half changed: drop it) when the frame cannot be moved.
#[inline(always)]
fn turn_around(ctx: &XdpContext, l3: usize, front: usize, quote: usize) -> bool {
    let Some(head) = ptr_at::<[u8; LINK_MAX]>(ctx, 0) else {
        return false;
    };
    let h = head as *const u8;
    let mut macs = [0u16; 6];
    let mut i = 0;
    while i < 6 {
        macs[i] = load16(unsafe { h.add(2 * i) });
        i += 1;
    }
    let ethertype = load16(unsafe { h.add(12) });
    let vlan = load32(unsafe { h.add(ETH_HLEN) });
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(front as i32)) } != 0 {
        return false;
    }
    let len = ctx.data_end() - ctx.data();
    let want = l3 + front + quote;
    if len < want || unsafe { bpf_xdp_adjust_tail(ctx.ctx, want as i32 - len as i32) } != 0 {
        return false;
    }
    let Some(head) = ptr_at::<[u8; LINK_MAX]>(ctx, 0) else {
        return false;
    };
    let h = head as *mut u8;
    let mut i = 0;
    while i < 3 {
        // The sender's MAC becomes the destination, ours the source.
        store16(unsafe { h.add(2 * i) }, macs[3 + i]);
        store16(unsafe { h.add(6 + 2 * i) }, macs[i]);
        i += 1;
    }
    store16(unsafe { h.add(12) }, ethertype);
    if l3 != ETH_HLEN {
        store32(unsafe { h.add(ETH_HLEN) }, vlan);
    }
    true
}

/// A packet too large for the node network once encapsulated: an ICMP "fragmentation needed"
/// (IPv4) or "packet too big" (IPv6) goes back to its sender, from the service's address, with
/// the MTU that fits (`XDP_TX`), so that the sender's path MTU discovery sends smaller packets.
/// Returns the XDP action.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, l3: usize, family: u8) -> u32 {
    let l3 = link_len(l3);
    let mtu = TUNNEL_SETTINGS.get(0).map_or(0, |s| s.mtu);
    if family == FAMILY_IPV4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
            return xdp_action::XDP_DROP;
        };
        let (src, dst) = unsafe { (load32((*ip).src.as_ptr()), load32((*ip).dst.as_ptr())) };
        if !turn_around(ctx, l3, ICMP4_FRONT, ICMP4_QUOTE) {
            return xdp_action::XDP_DROP;
        }
        let Some(out) = ptr_at::<[u8; ICMP4_FRONT + ICMP4_QUOTE]>(ctx, l3) else {
            return xdp_action::XDP_DROP;
        };
        let o = out as *mut u8;
        let words: [u16; 5] = [
            0x4500,
            (ICMP4_FRONT + ICMP4_QUOTE) as u16,
            0,
            0,
            u16::from_be_bytes([64, crate::headers::IPPROTO_ICMP]),
        ];
        let mut i = 0;
        while i < 5 {
            store16(unsafe { o.add(2 * i) }, words[i].to_be());
            i += 1;
        }
        store16(unsafe { o.add(10) }, 0);
        store32(unsafe { o.add(12) }, dst);
        store32(unsafe { o.add(16) }, src);
        let check = !crate::checksum::fold(sum16::<10>(o));
        store16(unsafe { o.add(10) }, check);
        // Destination unreachable, fragmentation needed, with the next hop's MTU.
        let icmp = unsafe { o.add(IPV4_HLEN) };
        store16(icmp, u16::from_be_bytes([3, 4]).to_be());
        store16(unsafe { icmp.add(2) }, 0);
        store16(unsafe { icmp.add(4) }, 0);
        store16(
            unsafe { icmp.add(6) },
            (mtu.saturating_sub(TUNNEL_OVERHEAD_V4) as u16).to_be(),
        );
        let check = !crate::checksum::fold(sum16::<{ (8 + ICMP4_QUOTE) / 2 }>(icmp));
        store16(unsafe { icmp.add(2) }, check);
    } else {
        let Some(ip6) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
            return xdp_action::XDP_DROP;
        };
        let mut addrs = [0u32; 8];
        let a = unsafe { (*ip6).src.as_ptr() };
        let mut i = 0;
        while i < 8 {
            addrs[i] = load32(unsafe { a.add(4 * i) });
            i += 1;
        }
        if !turn_around(ctx, l3, ICMP6_FRONT, ICMP6_QUOTE) {
            return xdp_action::XDP_DROP;
        }
        let Some(out) = ptr_at::<[u8; ICMP6_FRONT + ICMP6_QUOTE]>(ctx, l3) else {
            return xdp_action::XDP_DROP;
        };
        let o = out as *mut u8;
        let payload = (8 + ICMP6_QUOTE) as u16;
        store32(o, u32::from_be_bytes([0x60, 0, 0, 0]).to_be());
        store16(unsafe { o.add(4) }, payload.to_be());
        store16(
            unsafe { o.add(6) },
            u16::from_be_bytes([crate::headers::IPPROTO_ICMPV6, 64]).to_be(),
        );
        let mut i = 0;
        while i < 4 {
            // From the service's address (the packet's destination) to its source.
            store32(unsafe { o.add(8 + 4 * i) }, addrs[4 + i]);
            store32(unsafe { o.add(24 + 4 * i) }, addrs[i]);
            i += 1;
        }
        let icmp = unsafe { o.add(IPV6_HLEN) };
        store16(icmp, u16::from_be_bytes([2, 0]).to_be());
        store16(unsafe { icmp.add(2) }, 0);
        store32(
            unsafe { icmp.add(4) },
            mtu.saturating_sub(TUNNEL_OVERHEAD_V6).to_be(),
        );
        // The pseudo-header: both addresses, the length and next header as 32-bit words.
        let sum = sum16::<16>(unsafe { o.add(8) })
            + payload.to_be() as u32
            + (crate::headers::IPPROTO_ICMPV6 as u16).to_be() as u32
            + sum16::<{ (8 + ICMP6_QUOTE) / 2 }>(icmp);
        store16(unsafe { icmp.add(2) }, !crate::checksum::fold(sum));
    }
    xdp_action::XDP_TX
}
