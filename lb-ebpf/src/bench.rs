//! Benchmark-only programs (object `sluice-bench`), never attached to an interface.
//!
//! BPF_PROG_TEST_RUN with `repeat` > 1 runs a program again and again on the *same* buffer, so a
//! program that rewrites the packet sees its own output from the second run on. To time a
//! rewriting path honestly, `bench_restore_then_call` writes the original frame back before each
//! run and then tail-calls the program under test; `xtask bench` subtracts the cost of the
//! restore by timing the same wrapper in front of `bench_floor`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, ProgramArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{BenchFrame, BENCH_FRAME_MAX};

#[btf_map]
static BENCH_FRAME: Array<BenchFrame, 1> = Array::new();

#[btf_map]
static BENCH_TARGET: ProgramArray<1> = ProgramArray::new();

/// The floor: the cost of the XDP hook itself.
#[xdp]
pub fn bench_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bench_restore_then_call(ctx: XdpContext) -> u32 {
    let Some(frame) = BENCH_FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let start = ctx.data();
    let end = ctx.data_end();
    if end - start != frame.len as usize {
        return xdp_action::XDP_ABORTED;
    }
    // Two bytes at a time: every frame we time has an even length.
    let mut i = 0;
    while i < BENCH_FRAME_MAX {
        if start + i + 2 > end {
            break;
        }
        let dst = (start + i) as *mut [u8; 2];
        unsafe { *dst = [frame.data[i], frame.data[i + 1]] };
        i += 2;
    }
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
