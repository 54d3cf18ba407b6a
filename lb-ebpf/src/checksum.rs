//! Internet checksums (RFC 1071): one's-complement sums of 16-bit words, folded.

/// Folds a 64-bit accumulator of 32-bit words into the 16-bit one's-complement sum (not yet
/// inverted).
#[inline(always)]
pub fn fold64(sum: u64) -> u16 {
    let mut sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    fold(sum as u32)
}

/// Folds a 32-bit accumulator into the final 16-bit one's-complement sum (not yet inverted).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// An incremental checksum update (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')), accumulated over
/// every 16-bit word that changes, then applied to one or more checksum fields.
#[derive(Clone, Copy)]
pub struct Delta(u32);

impl Delta {
    #[inline(always)]
    pub const fn new() -> Self {
        Self(0)
    }

    /// Records that the words of `old` become the words of `new` (even length).
    #[inline(always)]
    pub fn replace<const N: usize>(&mut self, old: &[u8; N], new: &[u8; N]) {
        let mut i = 0;
        while i + 1 < N {
            self.0 += (!u16::from_be_bytes([old[i], old[i + 1]])) as u32;
            self.0 += u16::from_be_bytes([new[i], new[i + 1]]) as u32;
            i += 2;
        }
    }

    /// Adds the changes recorded in `other`.
    #[inline(always)]
    pub fn merge(&mut self, other: Delta) {
        self.0 += fold(other.0) as u32;
    }

    /// The checksum field after the recorded changes.
    #[inline(always)]
    pub fn apply(&self, checksum: [u8; 2]) -> [u8; 2] {
        let sum = (!u16::from_be_bytes(checksum)) as u32 + fold(self.0) as u32;
        (!fold(sum)).to_be_bytes()
    }
}

/// The one's-complement sum of `!old` and `new` as 32-bit words in the CPU's byte order: what
/// `bpf_csum_diff(old, 16, new, 16, 0)` returns, without the helper call. For
/// [`Delta::add_partial`]. Both sides are read as words: map memory is aligned, packet memory
/// at least 2-byte aligned (fine where the balancer runs; see `load16`).
#[inline(always)]
pub fn diff16(old: &[u8; 16], new: &[u8; 16]) -> u32 {
    let old = unsafe { (old.as_ptr() as *const [u32; 4]).read() };
    let new = unsafe { (new.as_ptr() as *const [u32; 4]).read() };
    let mut sum: u64 = 0;
    let mut i = 0;
    while i < 4 {
        sum += (!old[i]) as u64 + new[i] as u64;
        i += 1;
    }
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum as u32
}

/// Loads and stores of whole words in packet or map memory. Packet headers sit at even offsets;
/// 2- and 4-byte words at 2-byte-aligned addresses are fine on the architectures the balancer
/// runs on (the verifier refuses misaligned packet access at load elsewhere: never silently).
#[inline(always)]
pub fn load16(p: *const u8) -> u16 {
    unsafe { (p as *const u16).read() }
}

#[inline(always)]
pub fn load32(p: *const u8) -> u32 {
    unsafe { (p as *const u32).read() }
}

#[inline(always)]
pub fn store16(p: *mut u8, v: u16) {
    unsafe { (p as *mut u16).write(v) }
}

#[inline(always)]
pub fn store32(p: *mut u8, v: u32) {
    unsafe { (p as *mut u32).write(v) }
}

/// Copies `N` 4-byte words from `from` to `to` (packet or map memory, or 4-aligned stack): a
/// byte-array copy would be lowered to a memmove call, a bpf-to-bpf call per packet.
#[inline(always)]
pub fn copy32<const N: usize>(to: *mut u8, from: *const u8) {
    let mut i = 0;
    while i < N {
        unsafe { store32(to.add(4 * i), load32(from.add(4 * i))) };
        i += 1;
    }
}
