//! Sluice: a load balancer for bare-metal Kubernetes clusters and plain Linux hosts.
//!
//! One module per concern (see DESIGN.md): `config` is the model and its validation (pure),
//! `dataplane` is the only code that touches the kernel's BPF subsystem.

pub mod bfd;
pub mod bgp;
pub mod config;
pub mod dataplane;
pub mod election;
pub mod health;
pub mod ipam;
pub mod k8s;
pub mod l2;
pub mod maglev;
pub mod mesh;
pub mod metrics;
pub mod onlink;
pub mod signals;
pub mod sockopt;
pub mod standalone;
pub mod trace;

/// A deterministic pseudo-random sequence for randomized tests (a 64-bit LCG, upper bits).
#[cfg(test)]
pub(crate) fn test_sequence(mut seed: u64) -> impl FnMut() -> u32 {
    move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    }
}
