//! Baselines of `cargo xtask bench`: the least an XDP program that counts can do (bump one
//! per-CPU counter, pass), and the same plus one clock read. Built into their own object; never
//! attached by the agent.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

mod rt;

#[map]
static BENCH_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn bench_trivial(_ctx: XdpContext) -> u32 {
    if let Some(c) = BENCH_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_PASS
}

/// The trivial program plus one clock read: the floor of any time-based limiter.
#[xdp]
pub fn bench_ktime(_ctx: XdpContext) -> u32 {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(c) = BENCH_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += now & 1 };
    }
    xdp_action::XDP_PASS
}

/// The trivial program plus one coarse (tick-resolution) clock read: what a limiter would pay
/// if it traded sub-tick precision for speed.
#[xdp]
pub fn bench_coarse(_ctx: XdpContext) -> u32 {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(c) = BENCH_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += now & 1 };
    }
    xdp_action::XDP_PASS
}
