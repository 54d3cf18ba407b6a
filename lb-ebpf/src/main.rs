//! Sluice's XDP ingress program. Reads top to bottom like Katran's `process_packet`:
//! parse → (ARP | NDP responder) → count → action. Everything it does not own leaves with
//! `XDP_PASS`, byte for byte untouched.
#![no_std]
#![no_main]

mod checksum;
mod headers;
mod l2_responder;
mod maps;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use headers::{Ipv4Hdr, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6};
use stats::Outcome;

#[xdp]
pub fn sluice_ingress(ctx: XdpContext) -> u32 {
    let outcome = process_packet(&ctx);
    stats::count(outcome);
    match outcome {
        Outcome::ArpReply | Outcome::NaReply => xdp_action::XDP_TX,
        Outcome::Passed | Outcome::Malformed => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn process_packet(ctx: &XdpContext) -> Outcome {
    let Some(l2) = parse::ethernet(ctx) else {
        return Outcome::Malformed;
    };
    match l2.proto {
        ETH_P_ARP => l2_responder::arp(ctx, &l2),
        ETH_P_IPV6 => l2_responder::ndp(ctx, &l2),
        ETH_P_IPV4 => match parse::ptr_at::<Ipv4Hdr>(ctx, l2.l3_offset) {
            // The balancer (a later stage) starts here; for now IPv4 is the kernel's.
            Some(_) => Outcome::Passed,
            None => Outcome::Malformed,
        },
        _ => Outcome::Passed,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
