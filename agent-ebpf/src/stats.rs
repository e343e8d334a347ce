//! Per-CPU counters: no atomics needed, the agent sums the CPUs.

use agent_common::{breaker::backend_slot, lb::lb_slot, stats::svc_slot};

use crate::maps::{BACKEND_STATS, GLOBAL_STATS, LB_STATS, SVC_STATS};

#[inline(always)]
pub fn global(slot: u32, len: u64) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

#[inline(always)]
pub fn service(service_id: u32, slot: u32, len: u64) {
    if let Some(c) = SVC_STATS.get_ptr_mut(svc_slot(service_id, slot)) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

#[inline(always)]
pub fn backend(id: u32, slot: u32, len: u64) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_slot(id, slot)) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

/// A balanced service's backend, by its LB index.
#[inline(always)]
pub fn lb_backend(index: u32, slot: u32, len: u64) {
    if let Some(c) = LB_STATS.get_ptr_mut(lb_slot(index, slot)) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}
