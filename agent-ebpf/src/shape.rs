//! Pacing on TC egress by Earliest Departure Time (see `agent_common::shape`): a departure
//! time per key in an LRU table, written into `skb->tstamp` for the `fq` qdisc to honour.
//!
//! Concurrency: the key's `next` is moved by compare-and-swap, as the token buckets are
//! (`limit.rs`), so two CPUs sending on one key never book the same slot: each departure is
//! at least one packet's wire time after the one before, and the key's bytes leave at the
//! rate. A CPU whose swap loses re-reads and schedules again. After `SHAPE_CAS_ATTEMPTS`
//! lost swaps the packet leaves at the time its last attempt computed without booking it
//! (counted as `contended`): a shaper delays, and a drop would cost a TCP sender a
//! retransmission and half its window, where one packet sharing a slot costs one packet of
//! burst. Under two CPUs on one key the first retry almost always wins (see the datapath
//! tests).

use agent_common::{
    ServiceConfig,
    shape::{Departure, SHAPE_CAS_ATTEMPTS, Schedule, ShapeDelay, schedule},
    stats::{SVC_SHAPE_CONTENDED, SVC_SHAPE_HORIZON, SVC_SHAPE_NO_KEY, SVC_SHAPE_PACED},
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    programs::{TcContext, XdpContext},
};
use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::read_volatile,
};

use crate::{
    limit::key_of,
    maps::{SHAPE_DELAY, SHAPE_NEXT},
    parse::Parsed,
    stats,
};

/// What shaping did with a packet.
pub enum Verdict {
    /// It carries its departure time, or passes unpaced (fail open): either way it goes on.
    Pass,
    /// Its departure would lie beyond the horizon: dropped (counted).
    DropHorizon,
}

/// A hook's way to pace: TC egress paces, XDP (ingress) never does (POLICY.md: shaping is an
/// egress matter, the qdisc that honours departure times sits on egress).
pub trait Pace {
    fn pace(&self, service_id: u32, cfg: &ServiceConfig, p: &Parsed) -> Verdict;
}

impl Pace for XdpContext {
    #[inline(always)]
    fn pace(&self, _service_id: u32, _cfg: &ServiceConfig, _p: &Parsed) -> Verdict {
        Verdict::Pass
    }
}

impl Pace for TcContext {
    #[inline(always)]
    fn pace(&self, service_id: u32, cfg: &ServiceConfig, p: &Parsed) -> Verdict {
        shape(self, service_id, cfg, p)
    }
}

// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
fn shape(ctx: &TcContext, service_id: u32, cfg: &ServiceConfig, p: &Parsed) -> Verdict {
    let shape = &cfg.shape;
    let key = key_of(service_id, shape.key, p);
    // SAFETY: the context's own skb, valid for this run. `wire_len` counts every segment of
    // a GSO packet, headers included: what the wire will carry (Cilium paces on it too).
    let (wire_len, sender) = unsafe { ((*ctx.skb.skb).wire_len, (*ctx.skb.skb).tstamp) };
    // SAFETY: helper with no arguments. CLOCK_MONOTONIC, the clock `fq` reads departures on.
    let now = unsafe { bpf_ktime_get_ns() };

    let entry = match SHAPE_NEXT.get_ptr_mut(key) {
        Some(e) => e,
        None => {
            // NOEXIST: when two CPUs create the same key at once, one insert fails and both
            // go on with the entry that won. `next: 0` is an idle key.
            let _ = SHAPE_NEXT.insert(key, Departure { next: 0 }, BPF_NOEXIST.into());
            match SHAPE_NEXT.get_ptr_mut(key) {
                Some(e) => e,
                None => {
                    stats::service(service_id, SVC_SHAPE_NO_KEY, u64::from(wire_len));
                    return Verdict::Pass;
                }
            }
        }
    };

    let delay = shape.delay_ns(u64::from(wire_len));
    let next_ptr = unsafe { &raw mut (*entry).next };
    let mut departure = now;
    let mut attempt = 0;
    let mut booked = false;
    while attempt < SHAPE_CAS_ATTEMPTS {
        // SAFETY: `next_ptr` points into a live map value, valid for the program's run
        // (RCU); an aligned 64-bit load is single-copy atomic, and a stale read only makes
        // the swap fail.
        let next = unsafe { read_volatile(next_ptr) };
        match schedule(next, now, sender, delay, shape.horizon_ns) {
            Schedule::BeyondHorizon => {
                stats::service(service_id, SVC_SHAPE_HORIZON, u64::from(wire_len));
                return Verdict::DropHorizon;
            }
            Schedule::Depart { at, next: new_next } => {
                departure = at;
                // SAFETY: as above; BPF ISA v3 compare-and-exchange on the map value.
                let (_, swapped) = unsafe {
                    atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                        next_ptr, next, new_next,
                    )
                };
                if swapped {
                    booked = true;
                    break;
                }
            }
        }
        attempt += 1;
    }
    if !booked {
        stats::service(service_id, SVC_SHAPE_CONTENDED, u64::from(wire_len));
    }
    // SAFETY: the context's own skb; TC may write `tstamp` (on egress the kernel keeps it a
    // CLOCK_MONOTONIC delivery time).
    unsafe { (*ctx.skb.skb).tstamp = departure };
    stats::service(service_id, SVC_SHAPE_PACED, u64::from(wire_len));
    if let Some(d) = SHAPE_DELAY.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe {
            (*d) = ShapeDelay {
                departure,
                delay: departure - now,
            };
        }
    }
    Verdict::Pass
}
