//! Types shared by Sluice's kernel programs (lb-ebpf) and user space (lb-userspace).
//!
//! This crate is the single place where every map key, map value, map name and wire constant is
//! defined, once. It owns layout, never behaviour: no I/O, no allocation, `#![no_std]`.
//! Every type is `#[repr(C)]` with explicit padding so that it is `bytemuck::Pod` and has the same
//! layout in the BPF object, in user space and in the BTF that `bpftool map dump` prints.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Name of the hash map `(ifindex, ip) → L2VipValue`: the IPs the XDP program answers ARP/NDP for,
/// per interface. No entry for an interface means no answer on that interface.
pub const MAP_L2_VIPS: &str = "L2_VIPS";
/// Name of the per-CPU array (one slot) of [`GlobalStats`].
pub const MAP_GLOBAL_STATS: &str = "GLOBAL_STATS";
/// Name of the XDP ingress program in the lb-ebpf object.
pub const PROG_XDP_INGRESS: &str = "sluice_ingress";

/// Names of the benchmark-only programs and maps (object `sluice-bench`, never attached).
pub mod bench {
    /// A program that returns `XDP_PASS` and does nothing else: the floor of the hook.
    pub const PROG_FLOOR: &str = "bench_floor";
    /// A program that copies [`super::BenchFrame`] over the packet, then tail-calls slot 0 of
    /// [`MAP_TARGET`]: lets a rewriting program be timed on the same input each iteration.
    pub const PROG_RESTORE_THEN_CALL: &str = "bench_restore_then_call";
    /// Array (one slot) holding the frame that `bench_restore_then_call` restores.
    pub const MAP_FRAME: &str = "BENCH_FRAME";
    /// Program array whose slot 0 is the program under test.
    pub const MAP_TARGET: &str = "BENCH_TARGET";
}

/// Default capacity of [`MAP_L2_VIPS`]: (interface, IP) pairs.
pub const L2_VIPS_DEFAULT_CAPACITY: u32 = 65_536;

/// Address family tag in keys: IPv4.
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag in keys: IPv6.
pub const FAMILY_IPV6: u8 = 6;

/// Key of [`MAP_L2_VIPS`]: an IP address on one interface (by ifindex).
///
/// IPv4 addresses occupy the first four bytes of `addr` (network order), the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct L2VipKey {
    /// Interface index the request arrived on.
    pub ifindex: u32,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    pub _pad: [u8; 3],
    /// The address, network byte order.
    pub addr: [u8; 16],
}

impl L2VipKey {
    /// Key for an IPv4 address (octets in network order) on `ifindex`.
    pub const fn v4(ifindex: u32, octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[0] = octets[0];
        addr[1] = octets[1];
        addr[2] = octets[2];
        addr[3] = octets[3];
        Self {
            ifindex,
            family: FAMILY_IPV4,
            _pad: [0; 3],
            addr,
        }
    }

    /// Key for an IPv6 address (octets in network order) on `ifindex`.
    pub const fn v6(ifindex: u32, addr: [u8; 16]) -> Self {
        Self {
            ifindex,
            family: FAMILY_IPV6,
            _pad: [0; 3],
            addr,
        }
    }
}

/// Value of [`MAP_L2_VIPS`]: the MAC address to answer with (the interface's own, filled in by
/// user space unless the operator chose another).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct L2VipValue {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Outcome counters of the XDP ingress program; one per CPU in [`MAP_GLOBAL_STATS`].
/// Every packet the program sees is counted in exactly one field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GlobalStats {
    /// ARP requests for a VIP answered with an ARP reply (`XDP_TX`).
    pub arp_replies: u64,
    /// Neighbor Solicitations for a VIP answered with a Neighbor Advertisement (`XDP_TX`).
    pub na_replies: u64,
    /// Well-formed packets left to the kernel untouched (`XDP_PASS`).
    pub passed: u64,
    /// Truncated or malformed frames (bad lengths, bad checksum, bad hop limit): never answered,
    /// left to the kernel untouched (`XDP_PASS`).
    pub malformed: u64,
}

impl GlobalStats {
    /// Field-wise sum, used to fold the per-CPU values into one.
    pub const fn add(self, other: Self) -> Self {
        Self {
            arp_replies: self.arp_replies + other.arp_replies,
            na_replies: self.na_replies + other.na_replies,
            passed: self.passed + other.passed,
            malformed: self.malformed + other.malformed,
        }
    }
}

/// Largest frame the benchmark's restore program can copy.
pub const BENCH_FRAME_MAX: usize = 128;

/// The frame that the benchmark's restore program writes over the packet before each run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BenchFrame {
    /// Number of meaningful bytes in `data`; the packet must be exactly this long.
    pub len: u32,
    pub _pad: u32,
    pub data: [u8; BENCH_FRAME_MAX],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)], Copy, and have no padding bytes (bytemuck::Pod proves it).
    unsafe impl aya::Pod for super::L2VipKey {}
    unsafe impl aya::Pod for super::L2VipValue {}
    unsafe impl aya::Pod for super::GlobalStats {}
    unsafe impl aya::Pod for super::BenchFrame {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_key_puts_the_address_in_the_first_four_bytes_and_zeroes_the_rest() {
        let key = L2VipKey::v4(7, [198, 18, 1, 100]);
        assert_eq!(key.ifindex, 7);
        assert_eq!(key.family, FAMILY_IPV4);
        assert_eq!(&key.addr[..4], &[198, 18, 1, 100]);
        assert!(key.addr[4..].iter().all(|b| *b == 0));
    }

    #[test]
    fn key_and_value_layouts_match_what_the_bpf_program_expects() {
        assert_eq!(core::mem::size_of::<L2VipKey>(), 24);
        assert_eq!(core::mem::size_of::<L2VipValue>(), 8);
        assert_eq!(core::mem::size_of::<GlobalStats>(), 32);
        assert_eq!(core::mem::size_of::<BenchFrame>(), 8 + BENCH_FRAME_MAX);
    }

    #[test]
    fn stats_add_sums_every_field() {
        let a = GlobalStats {
            arp_replies: 1,
            na_replies: 2,
            passed: 3,
            malformed: 4,
        };
        assert_eq!(
            a.add(a),
            GlobalStats {
                arp_replies: 2,
                na_replies: 4,
                passed: 6,
                malformed: 8
            }
        );
    }
}
