//! Reading counters back from the maps (writing the policy: `generation.rs`).
//!
//! `ApplyReport` says what one stage of a policy changed: an entry already holding the wanted
//! value is not written again.

use std::collections::BTreeMap;

use agent_common::{
    Bucket, BucketKey, Counter,
    maps::{MAP_GLOBAL_STATS, MAP_RL_BUCKETS, MAP_SHAPE_DELAY, MAP_SVC_STATS},
    shape::ShapeDelay,
    stats::{
        GSTAT_NAMES, SVC_DROP_REASONS, SVC_NEW_KEYS, SVC_PASS_NO_BUCKET, SVC_PASSED,
        SVC_SHAPE_CONTENDED, SVC_SHAPE_HORIZON, SVC_SHAPE_NO_KEY, SVC_SHAPE_PACED, svc_slot,
    },
};
use aya::maps::{HashMap, MapData, PerCpuArray};
use serde::Serialize;

use super::{Datapath, DatapathError, map_err, typed};

/// What one stage of a policy changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    pub services_written: usize,
    pub services_cleared: usize,
    pub prefixes_written: usize,
    pub prefixes_removed: usize,
    /// `BACKENDS` keys written with their initial (closed) state.
    pub backends_written: usize,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        *self != ApplyReport::default()
    }
}

/// Counters of one service, summed over CPUs.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceCounters {
    pub passed: Counter,
    /// By reason, in `SVC_DROP_REASONS` order.
    pub dropped: Vec<(&'static str, Counter)>,
    /// Packets passed because the key table refused a new key.
    pub passed_no_bucket: Counter,
    pub new_keys: u64,
    pub shaping: ShapeCounters,
}

/// What pacing did for one service (all zero for a service without shaping).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ShapeCounters {
    /// Packets given a departure time.
    pub paced: Counter,
    /// Dropped: their departure would have been past the horizon.
    pub horizon_drops: Counter,
    /// Passed unpaced: the departure table refused a new key (fail open).
    pub unpaced: Counter,
    /// Paced after losing every compare-and-swap to other CPUs (within `paced`).
    pub contended: Counter,
    /// How long the latest paced packet (of any CPU) still waits for its departure at the
    /// time of the read, in ns; 0 once it has left.
    pub waiting_ns: u64,
    /// How long that packet was set to wait when it was paced, in ns.
    pub last_delay_ns: u64,
}

/// Counters of the whole datapath at one instant.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Snapshot {
    /// In the order of the ids asked for.
    pub services: Vec<ServiceCounters>,
    pub global: Vec<(&'static str, Counter)>,
}

/// The token-bucket table per service id, from one walk of its keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyCounts {
    /// Entries present during the walk.
    pub present: BTreeMap<u32, u64>,
    /// Keys ever inserted, read just before the walk: inserted minus present are the keys the
    /// LRU evicted (the agent deletes none while running). Read at the same time as `present`,
    /// not at scrape time, so the difference is never skewed by inserts since the walk.
    pub inserted: BTreeMap<u32, u64>,
}

impl KeyCounts {
    pub fn present(&self, id: u32) -> u64 {
        self.present.get(&id).copied().unwrap_or(0)
    }

    pub fn evicted(&self, id: u32) -> u64 {
        self.inserted
            .get(&id)
            .copied()
            .unwrap_or(0)
            .saturating_sub(self.present(id))
    }
}

impl Datapath {
    /// Reads every counter, summed over CPUs, of the services `ids` (in that order).
    pub fn snapshot(&self, ids: &[u32]) -> Result<Snapshot, DatapathError> {
        let ebpf = &self.ebpf;
        let svc: PerCpuArray<&MapData, Counter> = typed(ebpf, MAP_SVC_STATS)?;
        let read = |arr: &PerCpuArray<&MapData, Counter>, idx: u32, name: &'static str| {
            let values = arr.get(&idx, 0).map_err(map_err(name))?;
            let mut sum = Counter::default();
            for v in values.iter() {
                sum.add(v);
            }
            Ok::<_, DatapathError>(sum)
        };
        let mut out = Snapshot::default();
        for &id in ids {
            let mut dropped = Vec::with_capacity(SVC_DROP_REASONS.len());
            for (slot, reason) in SVC_DROP_REASONS {
                dropped.push((reason, read(&svc, svc_slot(id, slot), MAP_SVC_STATS)?));
            }
            out.services.push(ServiceCounters {
                passed: read(&svc, svc_slot(id, SVC_PASSED), MAP_SVC_STATS)?,
                dropped,
                passed_no_bucket: read(&svc, svc_slot(id, SVC_PASS_NO_BUCKET), MAP_SVC_STATS)?,
                new_keys: read(&svc, svc_slot(id, SVC_NEW_KEYS), MAP_SVC_STATS)?.packets,
                shaping: ShapeCounters {
                    paced: read(&svc, svc_slot(id, SVC_SHAPE_PACED), MAP_SVC_STATS)?,
                    horizon_drops: read(&svc, svc_slot(id, SVC_SHAPE_HORIZON), MAP_SVC_STATS)?,
                    unpaced: read(&svc, svc_slot(id, SVC_SHAPE_NO_KEY), MAP_SVC_STATS)?,
                    contended: read(&svc, svc_slot(id, SVC_SHAPE_CONTENDED), MAP_SVC_STATS)?,
                    ..ShapeCounters::default()
                },
            });
        }
        self.read_shape_delays(ids, &mut out.services)?;
        let global: PerCpuArray<&MapData, Counter> = typed(ebpf, MAP_GLOBAL_STATS)?;
        for (slot, name) in GSTAT_NAMES {
            out.global
                .push((name, read(&global, slot, MAP_GLOBAL_STATS)?));
        }
        Ok(out)
    }

    /// The latest departure each CPU set for each service: the latest of them, and how long
    /// it still waits now (a gauge that falls to 0 when the service's traffic stops).
    fn read_shape_delays(
        &self,
        ids: &[u32],
        services: &mut [ServiceCounters],
    ) -> Result<(), DatapathError> {
        if services.iter().all(|s| s.shaping.paced.packets == 0) {
            return Ok(());
        }
        let delays: PerCpuArray<&MapData, ShapeDelay> = typed(&self.ebpf, MAP_SHAPE_DELAY)?;
        let now = super::ktime_now_ns().unwrap_or(0);
        for (&id, svc) in ids.iter().zip(services.iter_mut()) {
            if svc.shaping.paced.packets == 0 {
                continue;
            }
            let values = delays
                .get(&id, 0)
                .map_err(super::map_err(MAP_SHAPE_DELAY))?;
            if let Some(latest) = values.iter().max_by_key(|d| d.departure) {
                svc.shaping.waiting_ns = latest.departure.saturating_sub(now);
                svc.shaping.last_delay_ns = latest.delay;
            }
        }
        Ok(())
    }

    /// Walks the token-bucket table once and counts its entries per service. A walk of a
    /// million keys takes about a second of syscalls, so the agent does it on a timer, not per
    /// scrape.
    pub fn count_keys(&self, ids: &[u32]) -> Result<KeyCounts, DatapathError> {
        let mut counts = KeyCounts::default();
        for (&id, svc) in ids.iter().zip(&self.snapshot(ids)?.services) {
            counts.inserted.insert(id, svc.new_keys);
        }
        let table: HashMap<&MapData, BucketKey, Bucket> = typed(&self.ebpf, MAP_RL_BUCKETS)?;
        // Keys may be evicted while we walk; an error on one key ends the walk early rather
        // than failing the whole count.
        for key in table.keys() {
            match key {
                Ok(k) => *counts.present.entry(k.service_id).or_default() += 1,
                Err(_) => break,
            }
        }
        Ok(counts)
    }
}
