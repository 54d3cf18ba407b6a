//! Internet checksums (RFC 1071): one's-complement sums of 16-bit words, folded.

/// Adds the 16-bit big-endian words of `bytes` (even length) to `sum`.
#[inline(always)]
pub fn add_words<const N: usize>(mut sum: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Folds a 32-bit accumulator into the final 16-bit one's-complement sum (not yet inverted).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The ICMPv6 pseudo-header's contribution (RFC 8200 §8.1): source, destination,
/// upper-layer length and next header 58.
#[inline(always)]
pub fn icmpv6_pseudo_header(src: &[u8; 16], dst: &[u8; 16], len: u32) -> u32 {
    let mut sum = add_words(0, src);
    sum = add_words(sum, dst);
    sum += len >> 16;
    sum += len & 0xffff;
    sum + crate::headers::IPPROTO_ICMPV6 as u32
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

    /// Adds a 32-bit partial sum from the `bpf_csum_diff` helper. The helper sums words in the
    /// CPU's byte order (little-endian here), this accumulator in network order: a one's
    /// complement sum of byte-swapped words is the byte-swapped sum (RFC 1071 §2(B)).
    #[inline(always)]
    pub fn add_partial(&mut self, partial: u32) {
        self.0 += u16::from_be(fold(partial)) as u32;
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
/// at least 2-byte aligned (fine where the balancer runs; see `balancer::set_v4`).
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
