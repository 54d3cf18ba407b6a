//! Benchmark-only programs (object `sluice-bench`), never attached to an interface.
//!
//! BPF_PROG_TEST_RUN with `repeat` > 1 runs a program again and again on the *same* buffer, so a
//! program that rewrites the packet sees its own output from the second run on. To time a
//! rewriting path honestly, `bench_restore_then_call` writes the original frame back before each
//! run (moving the frame's start back first when the program moved it) and then tail-calls the
//! program under test; `xtask bench` subtracts the cost of the restore by timing the same
//! wrapper in front of `bench_floor`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{Array, PerCpuArray, ProgramArray},
    helpers::{bpf_skb_store_bytes, bpf_xdp_adjust_head},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::{BenchFrame, BENCH_FRAME_MAX};

mod runtime;

#[btf_map]
static BENCH_FRAME: Array<BenchFrame, 1> = Array::new();

#[btf_map]
static BENCH_TARGET: ProgramArray<1> = ProgramArray::new();

#[btf_map]
static BENCH_TC_TARGET: ProgramArray<1> = ProgramArray::new();

/// Per-run counter for `vary_offset`.
#[btf_map]
static BENCH_COUNTER: PerCpuArray<u32, 1> = PerCpuArray::new();

#[inline(always)]
fn next_count() -> [u8; 2] {
    match BENCH_COUNTER.get_ptr_mut(0) {
        Some(c) => unsafe {
            *c = (*c).wrapping_add(1);
            ((*c & 0xffff) as u16).to_be_bytes()
        },
        None => [0, 0],
    }
}

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
    // A program that moved the frame's start (a tunnel's outer header, 20 or 40 bytes, put on
    // or taken off) left it moved for the next run: moved back first. (Compared as pointers:
    // the verifier allows no arithmetic on their difference.)
    let (start, end, len) = (ctx.data(), ctx.data_end(), frame.len as usize);
    // Each length a scalar the compiler does not fold into the comparison (the verifier
    // refuses arithmetic on the end pointer).
    let is_len = |n: usize| start + core::hint::black_box(n) == end;
    let moved: i32 = if is_len(len + 20) {
        20
    } else if is_len(len + 40) {
        40
    } else if len >= 40 && is_len(len - 20) {
        -20
    } else if len >= 40 && is_len(len - 40) {
        -40
    } else {
        0
    };
    if moved != 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, moved) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
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
    // Masked so the verifier knows the offset's bounds.
    let at = (frame.vary_offset as usize) & (BENCH_FRAME_MAX - 1);
    if at != 0 {
        let ptr = start + at;
        if ptr + 2 <= end {
            let count = next_count();
            unsafe {
                *(ptr as *mut u8) = count[0];
                *((ptr + 1) as *mut u8) = count[1];
            }
        }
    }
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// A floor for programs that move the frame's start: moves it by 20 bytes (`push`: room for
/// an outer header; `pop`: one taken off) and returns XDP_PASS. Behind the restore wrapper
/// (which moves it back), its cost less the floor's is two head moves: the wrapper's, which
/// `xtask bench` subtracts from a program that moves the head, and the program's own.
#[xdp]
pub fn bench_push_floor(ctx: XdpContext) -> u32 {
    let _ = unsafe { bpf_xdp_adjust_head(ctx.ctx, -20) };
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bench_pop_floor(ctx: XdpContext) -> u32 {
    let _ = unsafe { bpf_xdp_adjust_head(ctx.ctx, 20) };
    xdp_action::XDP_PASS
}

/// The floor of the TC hook.
#[classifier]
pub fn bench_tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[classifier]
pub fn bench_tc_restore_then_call(ctx: TcContext) -> i32 {
    let Some(frame) = BENCH_FRAME.get(0) else {
        return TC_ACT_SHOT;
    };
    let len = frame.len & (BENCH_FRAME_MAX as u32 - 1);
    if len == 0 || ctx.len() != frame.len {
        return TC_ACT_SHOT;
    }
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.as_ptr() as *mut _,
            0,
            frame.data.as_ptr() as *const _,
            len,
            0,
        )
    };
    if rc != 0 {
        return TC_ACT_SHOT;
    }
    unsafe { BENCH_TC_TARGET.tail_call(&ctx, 0) };
    TC_ACT_SHOT
}
