//! Stage 1: where the layer-3 header starts and what it is. One 802.1Q (or 802.1ad) tag allowed.

use aya_ebpf::programs::XdpContext;

use crate::headers::{EthHdr, VlanHdr, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, VLAN_HLEN};

/// A bounds-checked pointer to a `T` at `offset` bytes into the packet, or `None` when the packet
/// is too short. The only way the program touches packet memory.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// True when the first `end` bytes of the packet are all there. `end` may come from a length
/// field of the packet: it is compared as a number, never added to a packet pointer, because
/// verifiers before Linux 6.8 lose a byte-swapped value's bounds and refuse pointer arithmetic
/// with it ("math between pkt pointer and register with unbounded min value").
#[inline(always)]
pub fn holds(ctx: &XdpContext, end: usize) -> bool {
    end <= ctx.data_end() - ctx.data()
}

/// The Ethernet layer of a frame.
pub struct L2 {
    /// Offset of the layer-3 header (14, or 18 with a VLAN tag).
    pub l3_offset: usize,
    /// EtherType of the layer-3 header (host order).
    pub proto: u16,
}

/// Parses Ethernet and at most one VLAN tag; `None` when the frame is truncated.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Option<L2> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let proto = u16::from_be_bytes(unsafe { (*eth).proto });
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let vlan: *const VlanHdr = ptr_at(ctx, ETH_HLEN)?;
        return Some(L2 {
            l3_offset: ETH_HLEN + VLAN_HLEN,
            proto: u16::from_be_bytes(unsafe { (*vlan).proto }),
        });
    }
    Some(L2 {
        l3_offset: ETH_HLEN,
        proto,
    })
}
