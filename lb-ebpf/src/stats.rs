//! Stage last: count the outcome of every packet, once, in the per-CPU counters.

use aya_ebpf::bindings::xdp_action;

use crate::maps::{BACKEND_STATS, GLOBAL_STATS};

/// What happened to a packet; each maps to one counter and one XDP action.
#[derive(Clone, Copy)]
pub enum Outcome {
    ArpReply,
    NaReply,
    Passed,
    Malformed,
    /// Rewritten and sent on with this action (`XDP_TX` or `XDP_REDIRECT`).
    Forwarded(u32),
    /// Rewritten and passed to the kernel to resolve the next hop.
    ToKernel,
    /// A new flow to a service with no backend: dropped.
    NoBackend,
    /// An ICMP error about a flow's reply, rewritten and sent to the flow's backend with this
    /// action (`XDP_TX`, `XDP_REDIRECT`, or `XDP_PASS` while the next hop is not resolved).
    IcmpTranslated(u32),
    /// An ICMP error to a VIP whose embedded packet names no tracked flow: left to the kernel.
    IcmpUnmatched,
    /// Encapsulated to the backend's node and sent with this action (`XDP_PASS` while that
    /// node's next hop is not resolved).
    Tunnelled(u32),
    /// A tunnelled packet for a service from an address that is not a node's: dropped.
    TunnelForged,
    /// A tunnelled packet this node would tunnel again: dropped.
    TunnelMismatch,
    /// Too large for the node network once encapsulated: turned into an ICMP error to its
    /// sender (`XDP_TX`), or dropped.
    TunnelTooBig(u32),
    /// A unicast frame to another host's MAC: passed untouched (counted per interface too).
    OtherHost,
    /// A frame on a bond's standby port: passed untouched for the bond to drop (counted per
    /// interface too).
    StandbyPort,
    /// Not an outcome: the outer header is gone, balance the inner packet (never counted).
    Decapsulated,
}

impl Outcome {
    /// The XDP action for this outcome.
    #[inline(always)]
    pub fn action(self) -> u32 {
        match self {
            Outcome::ArpReply | Outcome::NaReply => xdp_action::XDP_TX,
            Outcome::Passed
            | Outcome::Malformed
            | Outcome::ToKernel
            | Outcome::IcmpUnmatched
            | Outcome::OtherHost
            | Outcome::StandbyPort => xdp_action::XDP_PASS,
            Outcome::Forwarded(action)
            | Outcome::IcmpTranslated(action)
            | Outcome::Tunnelled(action)
            | Outcome::TunnelTooBig(action) => action,
            Outcome::NoBackend | Outcome::TunnelForged | Outcome::TunnelMismatch => {
                xdp_action::XDP_DROP
            }
            Outcome::Decapsulated => xdp_action::XDP_PASS,
        }
    }
}

#[inline(always)]
pub fn count(outcome: Outcome) {
    if let Some(stats) = GLOBAL_STATS.get_ptr_mut(0) {
        // Per-CPU slot: no other program instance writes it concurrently.
        let stats = unsafe { &mut *stats };
        match outcome {
            Outcome::ArpReply => stats.arp_replies += 1,
            Outcome::NaReply => stats.na_replies += 1,
            Outcome::Passed => stats.passed += 1,
            Outcome::Malformed => stats.malformed += 1,
            Outcome::Forwarded(_) => stats.lb_forwarded += 1,
            Outcome::ToKernel => stats.lb_to_kernel += 1,
            Outcome::NoBackend => stats.lb_no_backend += 1,
            Outcome::IcmpTranslated(_) => stats.icmp_to_backend += 1,
            Outcome::IcmpUnmatched => stats.icmp_unmatched += 1,
            Outcome::Tunnelled(_) => stats.tunnel_out += 1,
            Outcome::TunnelForged => stats.tunnel_forged += 1,
            Outcome::TunnelMismatch => stats.tunnel_mismatch += 1,
            Outcome::TunnelTooBig(_) => stats.tunnel_too_big += 1,
            Outcome::Decapsulated | Outcome::OtherHost | Outcome::StandbyPort => stats.passed += 1,
        }
    }
}

/// Counts one reply rewritten by the TC egress program.
#[inline(always)]
pub fn count_reverse_nat() {
    if let Some(stats) = GLOBAL_STATS.get_ptr_mut(0) {
        unsafe { (*stats).reverse_nat += 1 };
    }
}

/// Counts one ICMP error from a backend rewritten back to the VIP by the TC egress program.
#[inline(always)]
pub fn count_icmp_to_client() {
    if let Some(stats) = GLOBAL_STATS.get_ptr_mut(0) {
        unsafe { (*stats).icmp_to_client += 1 };
    }
}

/// Adds one packet of `bytes` (and a new flow, if it is one) to a backend's per-CPU traffic
/// counters. The service's are the sum of its backends' (user space adds those of backends that
/// leave to `SERVICE_STATS`): one counter update per packet, not two (6 ns on the hit path).
#[inline(always)]
pub fn count_traffic(backend_id: u32, bytes: u64, new_flow: bool) {
    if let Some(counter) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot: no other program instance writes it concurrently.
        let counter = unsafe { &mut *counter };
        counter.packets += 1;
        counter.bytes += bytes;
        if new_flow {
            counter.new_flows += 1;
        }
    }
}
