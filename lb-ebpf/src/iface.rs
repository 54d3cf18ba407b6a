//! Stage 1½: the interface a frame arrived on. Where its service IPs are keyed (a bond's port
//! answers for the bond), whether it is a bond's standby port (the bond drops what arrives
//! there: so does the program, by passing it untouched), and whether the frame is this host's
//! at all: a promiscuous port (a bridge's, a bond's) and a switch flooding unknown unicast
//! hand the program frames for other hosts' MACs, which must pass untouched.

use aya_ebpf::programs::XdpContext;
use lb_common::{iface_slot, IfaceEntry, IFACE_SLOT_SHARED, IFACE_STANDBY};

use crate::{
    headers::EthHdr,
    maps::{IFACES, IFACES_SHARED, IFACE_STATS},
    parse::ptr_at,
};

/// The ifindex the service IPs of the frame's interface are keyed under: a bond's port answers
/// for its bond. Read again by the ARP/NDP responders (off the balancer's path): they take the
/// context, not a number, so LLVM keeps passing them the context pointer (given only the packet
/// pointers, it turned them into shifted integers, which the verifier refuses).
#[inline(always)]
pub fn l2_ifindex(ctx: &XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    entry(ifindex).map_or(ifindex, |e| e.l2_ifindex)
}

/// Who a frame is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// This interface's MAC (or an interface user space never described: a test run).
    Us,
    /// Broadcast or multicast: only ARP and NDP are read.
    Group,
    /// Another host's unicast MAC.
    Other,
}

/// What the program knows of the interface a frame arrived on.
pub struct Arrival {
    pub dest: Dest,
    /// Its slot in `IFACE_STATS`.
    pub slot: u32,
}

/// The interface's entry: its slot's (an inlined array read), else the shared hash.
#[inline(always)]
fn entry(ifindex: u32) -> Option<&'static IfaceEntry> {
    let slot = IFACES.get(iface_slot(ifindex))?;
    if slot.ifindex == ifindex {
        return Some(slot);
    }
    if slot.flags & IFACE_SLOT_SHARED != 0 {
        // SAFETY: map values stay valid for the program's run; they are only read.
        return unsafe { IFACES_SHARED.get(&ifindex) };
    }
    None
}

/// The frame's interface and destination; `None` for a bond's standby port (counted).
#[inline(always)]
pub fn arrival(ctx: &XdpContext) -> Option<Arrival> {
    let ifindex = ctx.ingress_ifindex() as u32;
    let slot = iface_slot(ifindex);
    let Some(entry) = entry(ifindex) else {
        return Some(Arrival {
            dest: Dest::Us,
            slot,
        });
    };
    if entry.flags & IFACE_STANDBY != 0 {
        if let Some(stats) = IFACE_STATS.get_ptr_mut(slot) {
            // SAFETY: a per-CPU slot: no other program instance writes it concurrently.
            unsafe { (*stats).standby += 1 };
        }
        return None;
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // The destination MAC in one 8-byte load (the source MAC's first two bytes masked off),
    // and the entry's two MACs likewise (each followed by 2 bytes of flags or padding).
    let dst = mac_word(eth as *const u8);
    let dest = if dst == mac_word(entry.mac.as_ptr()) || dst == mac_word(entry.upper_mac.as_ptr()) {
        Dest::Us
    } else if dst & 1 == 1 {
        Dest::Group
    } else {
        Dest::Other
    };
    Some(Arrival { dest, slot })
}

/// The 6 bytes of a MAC at `p` (with 2 readable bytes behind it) as the low 48 bits of a word,
/// in memory order: the group bit (the first byte's lowest) is the word's bit 0.
#[inline(always)]
fn mac_word(p: *const u8) -> u64 {
    // SAFETY: callers pass a MAC with two more bytes behind it (the Ethernet header's source
    // MAC, an entry's flags or padding).
    unsafe { (p as *const u64).read() & 0x0000_ffff_ffff_ffff }
}

/// Counts a frame for another host, passed untouched.
#[inline(always)]
pub fn count_other_host(slot: u32) {
    if let Some(stats) = IFACE_STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot.
        unsafe { (*stats).other_host += 1 };
    }
}
