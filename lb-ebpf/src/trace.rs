//! `sluice trace`: one event per decision for the packets a running trace asks about, into the
//! `TRACE_EVENTS` ring buffer. A ring buffer of fixed records rather than aya-log: the events are
//! data (addresses, ports, backend, Maglev slot) that user space filters, formats as text or
//! JSON and names (interfaces, services) in one place; aya-log would format per call site,
//! needs the loading process to read its buffer (a trace is another process, on pinned maps)
//! and cannot be switched off per packet by a filter.
//!
//! Free when off: each program reads `TraceFilter::active` once per packet (an inlined array
//! access, no helper call) and branches; everything else is in the two non-inlined functions
//! below, which run only while a trace is on.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    decision::*, TraceEvent, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP, TRACE_HOOK_TC,
    TRACE_HOOK_XDP, TRACE_VIA_KERNEL,
};

use crate::{
    checksum::{copy32, load16, load32, store32},
    headers::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_ICMP,
        IPPROTO_ICMPV6, VLAN_HLEN,
    },
    maps::{SCRATCH, TRACE_EVENTS, TRACE_FILTER, TRACE_SCRATCH},
    stats::Outcome,
};

/// The packet memory of either hook.
pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    fn ifindex(&self) -> u32;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.skb.skb).ifindex }
    }
}

/// Is a trace running? The one check every packet pays while none is.
#[inline(always)]
pub fn on() -> bool {
    TRACE_FILTER.get(0).is_some_and(|filter| filter.active != 0)
}

#[inline(always)]
fn at<F: Frame>(frame: &F, offset: usize, len: usize) -> Option<*const u8> {
    let p = frame.start() + offset;
    (p + len <= frame.end()).then_some(p as *const u8)
}

/// The addresses, ports and protocol of a frame as it is now, into `ev` (`src`/`dst` and ports
/// zeroed first). Returns (l3 offset, ethertype, TTL or hop limit, fragment or IPv4 options).
#[inline(always)]
fn read_tuple<F: Frame>(frame: &F, ev: &mut TraceEvent) -> Option<(u16, u8, bool)> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be(load16(at(frame, 12, 2)?));
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(load16(at(frame, ETH_HLEN + 2, 2)?));
        l3 += VLAN_HLEN;
    }
    let words = ev as *mut TraceEvent as *mut u8;
    let mut i = 0;
    while i < 9 {
        // src, dst, ports: bytes 24..60.
        unsafe { store32(words.add(24 + 4 * i), 0) };
        i += 1;
    }
    ev.proto = 0;
    if ethertype == ETH_P_ARP {
        let arp = at(frame, l3, 28)?;
        ev.family = FAMILY_IPV4;
        copy32::<1>(ev.src.as_mut_ptr(), unsafe { arp.add(14) });
        copy32::<1>(ev.dst.as_mut_ptr(), unsafe { arp.add(24) });
        return Some((ethertype, 255, false));
    }
    let (l4, ttl, odd) = if ethertype == ETH_P_IPV4 {
        let ip = at(frame, l3, 20)?;
        ev.family = FAMILY_IPV4;
        ev.proto = unsafe { *ip.add(9) };
        copy32::<1>(ev.src.as_mut_ptr(), unsafe { ip.add(12) });
        copy32::<1>(ev.dst.as_mut_ptr(), unsafe { ip.add(16) });
        let ihl = unsafe { *ip } & 0x0f;
        let frag = u16::from_be(load16(unsafe { ip.add(6) })) & 0x3fff;
        (l3 + 20, unsafe { *ip.add(8) }, ihl != 5 || frag != 0)
    } else if ethertype == ETH_P_IPV6 {
        let ip = at(frame, l3, 40)?;
        ev.family = FAMILY_IPV6;
        ev.proto = unsafe { *ip.add(6) };
        copy32::<4>(ev.src.as_mut_ptr(), unsafe { ip.add(8) });
        copy32::<4>(ev.dst.as_mut_ptr(), unsafe { ip.add(24) });
        (l3 + 40, unsafe { *ip.add(7) }, false)
    } else {
        return None;
    };
    if (ev.proto == PROTO_TCP || ev.proto == PROTO_UDP) && !odd {
        let ports = at(frame, l4, 4)?;
        copy32::<1>(ev.sport.as_mut_ptr(), ports);
    }
    Some((ethertype, ttl, odd))
}

/// Before the program decides: checks the lease (past it, turns the trace off for everyone),
/// the interface, and keeps the packet's headers as they arrived, with the reason it would be
/// passed if it is. False: nothing to trace for this packet.
#[inline(never)]
pub fn capture<F: Frame>(frame: &F, hook: u8) -> bool {
    let (Some(filter), Some(ev)) = (TRACE_FILTER.get_ptr_mut(0), TRACE_SCRATCH.get_ptr_mut(0))
    else {
        return false;
    };
    let (filter, ev) = unsafe { (&mut *filter, &mut *ev) };
    if unsafe { bpf_ktime_get_ns() } > filter.until {
        filter.active = 0;
        return false;
    }
    let ifindex = frame.ifindex();
    if filter.ifindex != 0 && filter.ifindex != ifindex {
        return false;
    }
    let Some((ethertype, ttl, odd)) = read_tuple(frame, ev) else {
        return false;
    };
    ev.hook = hook;
    ev.ifindex = ifindex;
    ev.slot = u32::MAX;
    ev.decision = if ethertype == ETH_P_ARP || ev.proto == IPPROTO_ICMPV6 {
        PASSED_ARP_NDP_NOT_OURS
    } else if ev.proto != PROTO_TCP && ev.proto != PROTO_UDP && ev.proto != IPPROTO_ICMP {
        PASSED_OTHER_PROTOCOL
    } else if odd {
        PASSED_FRAGMENT_OR_OPTIONS
    } else if ttl <= 1 {
        PASSED_TTL
    } else {
        PASSED_NOT_A_SERVICE
    };
    ev.captured = 1;
    if let Some(packet) = SCRATCH.get_ptr_mut(0) {
        unsafe { (*packet).trace_new_flow = 0 };
    }
    true
}

/// The decision an XDP outcome stands for (0: passed, the reason captured before).
#[inline(always)]
pub fn decision_of(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::ArpReply => ARP_REPLY,
        Outcome::NaReply => NA_REPLY,
        Outcome::Passed => 0,
        Outcome::Malformed => MALFORMED,
        Outcome::Forwarded(_) => CONNTRACK_HIT,
        Outcome::ToKernel => TO_KERNEL,
        Outcome::NoBackend => NO_BACKEND,
        Outcome::IcmpTranslated(_) => ICMP_TO_BACKEND,
        Outcome::IcmpUnmatched => ICMP_UNMATCHED,
        Outcome::Tunnelled(_) => TUNNELLED,
        Outcome::TunnelForged => TUNNEL_FORGED,
        Outcome::TunnelMismatch => TUNNEL_MISMATCH,
        Outcome::TunnelTooBig(_) => TUNNEL_TOO_BIG,
        Outcome::OtherHost => PASSED_OTHER_HOST,
        Outcome::StandbyPort => PASSED_STANDBY_PORT,
        Outcome::Decapsulated => 0,
    }
}

/// After the XDP program decided: where the packet goes now, and the event if it matches.
#[inline(never)]
pub fn emit_xdp(ctx: &XdpContext, decision: u8, action: u32) {
    let Some(ev) = TRACE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let ev = unsafe { &mut *ev };
    if ev.captured == 0 || ev.hook != TRACE_HOOK_XDP {
        return;
    }
    ev.captured = 0;
    ev.flags = 0;
    if decision != 0 {
        ev.decision = decision;
    }
    if decision == CONNTRACK_HIT || decision == TO_KERNEL {
        // A hit, or the new flow this packet started; through the kernel or not.
        if decision == TO_KERNEL {
            ev.flags = TRACE_VIA_KERNEL;
            ev.decision = CONNTRACK_HIT;
        }
        if let Some(packet) = SCRATCH.get_ptr(0) {
            let packet = unsafe { &*packet };
            if packet.trace_new_flow != 0 {
                ev.slot = packet.trace_slot;
                ev.decision = if packet.trace_new_flow == 1 {
                    NEW_FLOW
                } else {
                    NEW_FLOW_FLOOD_GUARD
                };
            }
        }
    }
    let rewritten = matches!(
        ev.decision,
        CONNTRACK_HIT | NEW_FLOW | NEW_FLOW_FLOOD_GUARD | ICMP_TO_BACKEND | TUNNELLED
    );
    // Now the frame holds the backend as its destination (for an ICMP error, the outer one;
    // tunnelled, the backend's node, port 0).
    let mut now = *ev;
    if rewritten && read_tuple(ctx, &mut now).is_some() {
        copy32::<4>(ev.to_addr.as_mut_ptr(), now.dst.as_ptr());
        ev.to_port = now.dport;
    } else {
        let to = ev.to_addr.as_mut_ptr();
        let mut i = 0;
        while i < 4 {
            unsafe { store32(to.add(4 * i), 0) };
            i += 1;
        }
        ev.to_port = [0; 2];
    }
    ev.action = action;
    // The client sent it, to the VIP.
    let (client, vip, vip_port) = (ev.src, ev.dst, ev.dport);
    send_if_wanted(ev, &client, &vip, vip_port);
}

/// After the TC program: an event for a reply it rewrote (reverse NAT, or an ICMP error back
/// to the client), none for the rest.
#[inline(never)]
pub fn emit_tc(ctx: &TcContext, verdict: i32) {
    let Some(ev) = TRACE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let ev = unsafe { &mut *ev };
    if ev.captured == 0 || ev.hook != TRACE_HOOK_TC {
        return;
    }
    ev.captured = 0;
    let mut now = *ev;
    if read_tuple(ctx, &mut now).is_none() || (same16(&now.src, &ev.src) && now.sport == ev.sport) {
        return;
    }
    ev.decision = if ev.proto == IPPROTO_ICMP || ev.proto == IPPROTO_ICMPV6 {
        ICMP_TO_CLIENT
    } else {
        REVERSE_NAT
    };
    copy32::<4>(ev.to_addr.as_mut_ptr(), now.src.as_ptr());
    ev.to_port = now.sport;
    ev.action = verdict as u32;
    // A reply goes to the client, from the VIP it now carries.
    let (client, vip, vip_port) = (ev.dst, ev.to_addr, ev.to_port);
    send_if_wanted(ev, &client, &vip, vip_port);
}

/// Applies the filter's client and VIP parts and writes the event.
#[inline(always)]
fn send_if_wanted(ev: &mut TraceEvent, client: &[u8; 16], vip: &[u8; 16], vip_port: [u8; 2]) {
    let Some(filter) = TRACE_FILTER.get_ptr_mut(0) else {
        return;
    };
    let filter = unsafe { &mut *filter };
    if filter.client_family != 0
        && (filter.client_family != ev.family
            || !prefix_matches(client, &filter.client, filter.client_prefix))
    {
        return;
    }
    if filter.vip_family != 0 {
        if filter.vip_family != ev.family || !same16(vip, &filter.vip) {
            return;
        }
        // ARP has no port: an ARP for the VIP is shown whatever port was asked for.
        if filter.vip_port != [0, 0] && ev.proto != 0 && vip_port != filter.vip_port {
            return;
        }
    }
    ev.time = unsafe { bpf_ktime_get_ns() };
    if TRACE_EVENTS.output_untyped::<TraceEvent>(&*ev, 0).is_err() {
        filter.lost += 1;
    }
}

/// Are two addresses equal? Word compares (an array `==` may become a `memcmp` call).
#[inline(always)]
fn same16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a, b) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    while i < 4 {
        if unsafe { load32(a.add(4 * i)) != load32(b.add(4 * i)) } {
            return false;
        }
        i += 1;
    }
    true
}

/// Do the first `bits` bits of `addr` equal `prefix`'s?
#[inline(always)]
fn prefix_matches(addr: &[u8; 16], prefix: &[u8; 16], bits: u8) -> bool {
    let mut i = 0;
    while i < 16 {
        let bit = (i * 8) as u8;
        if bit >= bits {
            return true;
        }
        let mask: u8 = if bits - bit >= 8 {
            0xff
        } else {
            0xffu8 << (8 - (bits - bit))
        };
        if (addr[i] ^ prefix[i]) & mask != 0 {
            return false;
        }
        i += 1;
    }
    true
}
