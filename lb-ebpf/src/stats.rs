//! Stage last: count the outcome of every packet, once, in the per-CPU counters.

use crate::maps::GLOBAL_STATS;

/// What happened to a packet; each maps to one counter and one XDP action.
#[derive(Clone, Copy)]
pub enum Outcome {
    ArpReply,
    NaReply,
    Passed,
    Malformed,
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
        }
    }
}
