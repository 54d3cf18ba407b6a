//! Sluice's kernel programs. The XDP ingress program reads top to bottom like Katran's
//! `process_packet`: parse → (ARP | NDP responder | balancer) → count → action. Everything it
//! does not own leaves with `XDP_PASS`, byte for byte untouched. The TC egress program rewrites
//! replies from backends back to the service's VIP and port.
#![no_std]
#![no_main]
// Map keys and values go by reference: copies would cost BPF stack (512 bytes in all).
#![allow(clippy::needless_borrows_for_generic_args)]

mod balancer;
mod checksum;
mod egress;
mod headers;
mod icmp;
mod iface;
mod l2_responder;
mod maps;
mod parse;
mod runtime;
mod stats;
mod trace;
mod tunnel;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use headers::{Ipv4Hdr, Ipv6Hdr, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_ICMPV6, IPV6_HLEN};
use iface::Dest;
use lb_common::{
    PROTO_IPIP, PROTO_IPV6_IN_IP, PROTO_TCP, PROTO_UDP, TRACE_HOOK_TC, TRACE_HOOK_XDP,
};
use stats::Outcome;

#[xdp]
pub fn sluice_ingress(ctx: XdpContext) -> u32 {
    let traced = trace::on() && trace::capture(&ctx, TRACE_HOOK_XDP);
    let outcome = process_packet(&ctx);
    stats::count(outcome);
    if traced {
        trace::emit_xdp(&ctx, trace::decision_of(outcome), outcome.action());
    }
    outcome.action()
}

#[classifier]
pub fn sluice_egress(ctx: TcContext) -> i32 {
    let traced = trace::on() && trace::capture(&ctx, TRACE_HOOK_TC);
    egress::reverse_nat(&ctx);
    if traced {
        trace::emit_tc(&ctx, TC_ACT_OK);
    }
    TC_ACT_OK
}

#[inline(always)]
fn process_packet(ctx: &XdpContext) -> Outcome {
    let Some(l2) = parse::ethernet(ctx) else {
        return Outcome::Malformed;
    };
    let Some(arrival) = iface::arrival(ctx) else {
        return Outcome::StandbyPort;
    };
    match arrival.dest {
        Dest::Us => {}
        // Broadcast and multicast frames: ARP requests and Neighbor Solicitations only.
        Dest::Group => {
            return match l2.proto {
                ETH_P_ARP => l2_responder::arp(ctx, &l2),
                ETH_P_IPV6 => l2_responder::ndp(ctx, &l2),
                _ => Outcome::Passed,
            }
        }
        Dest::Other => {
            iface::count_other_host(arrival.slot);
            return Outcome::OtherHost;
        }
    }
    match l2.proto {
        ETH_P_ARP => l2_responder::arp(ctx, &l2),
        ETH_P_IPV4 => {
            // A packet another node tunnelled here: its outer header goes, then it is
            // balanced like any other (only to this node's backends).
            let tunnelled = parse::ptr_at::<Ipv4Hdr>(ctx, l2.l3_offset)
                .is_some_and(|ip| unsafe { (*ip).proto } == PROTO_IPIP);
            if tunnelled {
                let outcome = tunnel::decap_v4(ctx, l2.l3_offset);
                if !matches!(outcome, Outcome::Decapsulated) {
                    return outcome;
                }
            }
            balancer::ipv4(ctx, &l2, tunnelled)
        }
        ETH_P_IPV6 => {
            let Some(ip6) = parse::ptr_at::<Ipv6Hdr>(ctx, l2.l3_offset) else {
                return Outcome::Malformed;
            };
            let tunnelled = unsafe { (*ip6).next_header } == PROTO_IPV6_IN_IP;
            if tunnelled {
                let outcome = tunnel::decap_v6(ctx, l2.l3_offset);
                if !matches!(outcome, Outcome::Decapsulated) {
                    return outcome;
                }
            }
            match parse::ptr_at::<Ipv6Hdr>(ctx, l2.l3_offset) {
                None => Outcome::Malformed,
                Some(ip6) => match unsafe { (*ip6).next_header } {
                    IPPROTO_ICMPV6 if !tunnelled => {
                        match parse::ptr_at::<u8>(ctx, l2.l3_offset + IPV6_HLEN) {
                            Some(t) if icmp::is_error_v6(unsafe { *t }) => {
                                icmp::ipv6(ctx, l2.l3_offset)
                            }
                            _ => l2_responder::ndp(ctx, &l2),
                        }
                    }
                    PROTO_TCP | PROTO_UDP => balancer::ipv6(ctx, &l2, tunnelled),
                    _ => Outcome::Passed,
                },
            }
        }
        _ => Outcome::Passed,
    }
}
