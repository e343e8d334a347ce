//! Token-bucket limiting (GCRA, see `agent_common::limit`), one bucket per key in an LRU table,
//! updated with compare-and-exchange so that CPUs hitting one key never over-admit. The
//! bucket's clock is the coarse one for a burst of four ticks or more (`agent_common::limit`
//! says why and what it costs in accuracy).

use agent_common::{
    Bucket, BucketKey, ServiceConfig,
    limit::{CAS_ATTEMPTS, Decision, RL_KEY_FLOW, RL_KEY_SOURCE_IP, decide, fresh_tat},
    stats::SVC_NEW_KEYS,
};
use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::read_volatile,
};

use crate::{maps::RL_BUCKETS, parse::Parsed, stats};

/// `agent_common::limit::GLOBAL_COARSE_MIN_BURST_NS`, set by the loader from the coarse
/// clock's tick; until then every bucket reads the precise clock.
#[unsafe(no_mangle)]
static COARSE_MIN_BURST_NS: Global<u64> = Global::new(u64::MAX);

pub enum Verdict {
    Pass,
    /// No bucket could be had (table refused the insert): passed, fail open.
    PassNoBucket,
    DropRateLimit,
    DropContended,
}

/// The key of a packet for a table kept per `kind` (`RL_KEY_*`): the token buckets, and the
/// departure times of shaping.
#[inline(always)]
pub fn key_of(service_id: u32, kind: u32, p: &Parsed) -> BucketKey {
    let mut key = BucketKey {
        service_id,
        ..BucketKey::default()
    };
    if kind == RL_KEY_FLOW {
        key.proto = p.proto;
        key.src = p.src;
        key.dst = p.dst;
        if p.has_ports {
            key.sport = p.sport;
            key.dport = p.dport;
        }
    } else if kind == RL_KEY_SOURCE_IP {
        key.src = p.src;
    }
    key
}

// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
pub fn limit(service_id: u32, cfg: &ServiceConfig, p: &Parsed, len: u64) -> Verdict {
    let key = key_of(service_id, cfg.rl_key, p);
    // SAFETY: helpers with no arguments.
    let now = if cfg.coarse_clock(COARSE_MIN_BURST_NS.load()) {
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        unsafe { bpf_ktime_get_ns() }
    };

    let bucket = match RL_BUCKETS.get_ptr_mut(key) {
        Some(b) => b,
        None => {
            let fresh = Bucket {
                tat: fresh_tat(now),
            };
            // NOEXIST: when two CPUs create the same key at once, one insert fails and both
            // go on with the entry that won.
            if RL_BUCKETS.insert(key, fresh, BPF_NOEXIST.into()).is_ok() {
                stats::service(service_id, SVC_NEW_KEYS, 0);
            }
            match RL_BUCKETS.get_ptr_mut(key) {
                Some(b) => b,
                None => return Verdict::PassNoBucket,
            }
        }
    };

    let inc = cfg.cost_ns(len);
    let tat_ptr = unsafe { &raw mut (*bucket).tat };
    let mut attempt = 0;
    while attempt < CAS_ATTEMPTS {
        // SAFETY: `tat_ptr` points into a live map value; the kernel keeps it valid for the
        // program's run (RCU). An aligned 64-bit load is single-copy atomic; BPF has no
        // atomic-load instruction before ISA v4, and a stale read only makes the CAS fail.
        let tat = unsafe { read_volatile(tat_ptr) };
        match decide(tat, now, inc, cfg.rl_burst_ns) {
            Decision::Deny => return Verdict::DropRateLimit,
            Decision::Admit(new_tat) => {
                let (_, swapped) = unsafe {
                    atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                        tat_ptr, tat, new_tat,
                    )
                };
                if swapped {
                    return Verdict::Pass;
                }
            }
        }
        attempt += 1;
    }
    Verdict::DropContended
}
