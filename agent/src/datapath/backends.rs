//! Circuit-breaker enforcement maps: the agent writes each backend's breaker state to
//! `BACKENDS`, reads the per-backend counters of `BACKEND_STATS`, and sweeps unanswered SYNs
//! out of `PENDING_SYNS` (passive detection).
//!
//! The same operations exist on [`Datapath`] (for `apply`, scrapes and tests) and on
//! [`BackendMaps`], a second handle on the same kernel maps: the backend supervisor writes
//! through it without taking the datapath lock, which a key-table walk may hold for a second,
//! so an opening breaker reaches the kernel at once.

use std::borrow::{Borrow, BorrowMut};
use std::os::fd::AsFd as _;

use agent_common::{
    Counter,
    breaker::{
        BSTAT_ACTIONS, BSTAT_ADMITTED, BSTAT_SLOTS, BSTAT_TRIAL, BackendKey, BackendState, FlowKey,
        MAX_TRACKED_FLOWS, PendingSyn, backend_slot, port_bit,
    },
    maps::{MAP_BACKEND_PORTS, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_PENDING_SYNS},
};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    sys::SyscallError,
};

use super::{Datapath, DatapathError, map_err, typed, typed_mut};
use crate::config::CompiledBackend;

/// Counters of one backend, summed over CPUs, indexed by `BSTAT_*` slot.
pub type BackendCounters = [Counter; BSTAT_SLOTS as usize];

/// The per-backend slots exported as `action` in metrics and status: admissions first, then
/// rejects and drops by reason (`BSTAT_ACTIONS`).
pub const BACKEND_ACTIONS: [(u32, &str); 2 + BSTAT_ACTIONS.len()] = {
    let mut out = [(BSTAT_ADMITTED, "admitted"); 2 + BSTAT_ACTIONS.len()];
    out[1] = (BSTAT_TRIAL, "trial");
    let mut i = 0;
    while i < BSTAT_ACTIONS.len() {
        out[2 + i] = BSTAT_ACTIONS[i];
        i += 1;
    }
    out
};

/// A sweep of `PENDING_SYNS` visits at most this many entries: an LRU churning under a SYN
/// flood could otherwise keep the key walk going (the kernel restarts it at a vanished key).
const MAX_SWEEP_VISITS: usize = 2 * MAX_TRACKED_FLOWS as usize;

/// An independent handle on the enforcement maps (its own file descriptors).
pub struct BackendMaps {
    backends: HashMap<MapData, BackendKey, BackendState>,
    stats: PerCpuArray<MapData, Counter>,
    pending: HashMap<MapData, FlowKey, PendingSyn>,
}

impl std::fmt::Debug for BackendMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendMaps")
    }
}

impl BackendMaps {
    /// Writes one backend's state; the datapath sees it on its next packet.
    pub fn write_backend(
        &mut self,
        key: &BackendKey,
        state: &BackendState,
    ) -> Result<(), DatapathError> {
        write(&mut self.backends, key, state)
    }

    /// One backend key's entry, `None` when the map has none: what an earlier agent's breaker
    /// left there when the maps were adopted.
    pub fn read_backend(&self, key: &BackendKey) -> Result<Option<BackendState>, DatapathError> {
        match self.backends.get(key, 0) {
            Ok(state) => Ok(Some(state)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_BACKENDS)(e)),
        }
    }

    /// One counter slot (`BSTAT_*`) of one backend, summed over CPUs: what a poller reading
    /// two slots ten times a second needs, without the other six syscalls.
    pub fn backend_counter(&self, id: u32, slot: u32) -> Result<Counter, DatapathError> {
        counter(&self.stats, id, slot)
    }

    /// Deletes the `PENDING_SYNS` entries older than their backend's timeout and returns how
    /// many were deleted per backend id: the SYNs no answer came to (failures). See
    /// [`sweep`].
    pub fn sweep_pending(
        &mut self,
        now_ns: u64,
        timeout_ns: impl Fn(u32) -> Option<u64>,
    ) -> Result<Vec<(u32, u64)>, DatapathError> {
        sweep(&mut self.pending, now_ns, timeout_ns)
    }
}

impl Datapath {
    /// Opens a second handle on `BACKENDS`, `BACKEND_STATS` and `PENDING_SYNS` (duplicated
    /// file descriptors), for a task that must not wait on the datapath lock.
    pub fn backend_maps(&self) -> Result<BackendMaps, DatapathError> {
        Ok(BackendMaps {
            backends: self.reopen(MAP_BACKENDS)?,
            stats: self.reopen(MAP_BACKEND_STATS)?,
            pending: self.reopen(MAP_PENDING_SYNS)?,
        })
    }

    /// One backend's counters in `BACKEND_STATS`, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<BackendCounters, DatapathError> {
        let stats: PerCpuArray<&MapData, Counter> = typed(&self.ebpf, MAP_BACKEND_STATS)?;
        counters(&stats, id)
    }

    /// Writes the initial (closed) state of every backend key the map does not hold yet, and
    /// returns the keys it wrote and the backends' ports (to mark once the entries exist).
    /// Keys already there keep their state: they hold what the breakers decided. No map is
    /// touched when there are no backends, so policies without breakers need none of these
    /// maps. On an error, the keys written so far are removed again.
    pub(super) fn add_missing_backends(
        &mut self,
        backends: &[CompiledBackend],
    ) -> Result<(Vec<BackendKey>, Vec<u16>), DatapathError> {
        if backends.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut map: HashMap<&mut MapData, BackendKey, BackendState> =
            typed_mut(&mut self.ebpf, MAP_BACKENDS)?;
        let mut added = Vec::new();
        let mut result = Ok(());
        'all: for b in backends {
            for key in &b.keys {
                match map.get(key, 0) {
                    Ok(_) => continue,
                    Err(MapError::KeyNotFound) => {}
                    Err(e) => {
                        result = Err(map_err(MAP_BACKENDS)(e));
                        break 'all;
                    }
                }
                if let Err(e) = write(&mut map, key, &b.initial()) {
                    result = Err(e);
                    break 'all;
                }
                added.push(*key);
            }
        }
        if let Err(e) = result {
            for key in &added {
                let _ = map.remove(key);
            }
            return Err(e);
        }
        // Bits are never cleared: a stale one only costs a packet to or from that port a
        // lookup.
        let ports = backends.iter().flat_map(|b| &b.keys).map(|k| k.port);
        Ok((added, ports.collect()))
    }

    /// Sets the `BACKEND_PORTS` bits of `ports` (backends' ports): the datapath looks up
    /// breakers, and replies to balanced flows, only for packets from or to a marked port.
    pub fn mark_ports(
        &mut self,
        ports: impl IntoIterator<Item = u16>,
    ) -> Result<(), DatapathError> {
        let mut map: Array<&mut MapData, u32> = typed_mut(&mut self.ebpf, MAP_BACKEND_PORTS)?;
        let mut words = std::collections::BTreeMap::<u32, u32>::new();
        for port in ports {
            let (word, mask) = port_bit(port);
            *words.entry(word).or_default() |= mask;
        }
        for (word, mask) in words {
            let old = map.get(&word, 0).map_err(map_err(MAP_BACKEND_PORTS))?;
            if old & mask != mask {
                map.set(word, old | mask, 0)
                    .map_err(map_err(MAP_BACKEND_PORTS))?;
            }
        }
        Ok(())
    }

    /// A new typed handle on one of the object's maps, from a duplicate of its descriptor.
    pub(super) fn reopen<M>(&self, name: &'static str) -> Result<M, DatapathError>
    where
        M: TryFrom<Map, Error = MapError>,
    {
        let data = match self.ebpf.map(name) {
            None => return Err(DatapathError::MissingMap(name)),
            Some(
                Map::HashMap(d)
                | Map::LruHashMap(d)
                | Map::PerCpuArray(d)
                | Map::Array(d)
                | Map::ArrayOfMaps(d),
            ) => d,
            Some(_) => return Err(DatapathError::MapType(name)),
        };
        let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| {
            map_err(name)(MapError::SyscallError(SyscallError {
                call: "dup",
                io_error: e,
            }))
        })?;
        let data = MapData::from_fd(fd).map_err(map_err(name))?;
        let map = Map::from_map_data(data).map_err(map_err(name))?;
        M::try_from(map).map_err(map_err(name))
    }
}

fn write<T: BorrowMut<MapData>>(
    map: &mut HashMap<T, BackendKey, BackendState>,
    key: &BackendKey,
    state: &BackendState,
) -> Result<(), DatapathError> {
    map.insert(key, state, 0).map_err(map_err(MAP_BACKENDS))
}

fn counter<T: Borrow<MapData>>(
    stats: &PerCpuArray<T, Counter>,
    id: u32,
    slot: u32,
) -> Result<Counter, DatapathError> {
    let values = stats
        .get(&backend_slot(id, slot), 0)
        .map_err(map_err(MAP_BACKEND_STATS))?;
    let mut sum = Counter::default();
    for v in values.iter() {
        sum.add(v);
    }
    Ok(sum)
}

fn counters<T: Borrow<MapData>>(
    stats: &PerCpuArray<T, Counter>,
    id: u32,
) -> Result<BackendCounters, DatapathError> {
    let mut out = BackendCounters::default();
    for (slot, sum) in (0..BSTAT_SLOTS).zip(out.iter_mut()) {
        *sum = counter(stats, id, slot)?;
    }
    Ok(out)
}

/// Now on the clock of `bpf_ktime_get_ns` (CLOCK_MONOTONIC), which stamps `PENDING_SYNS`.
/// `None` only if the clock cannot be read, which Linux never does for this clock.
pub fn ktime_now_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Whether a pending SYN seen at `at_ns` has waited longer than `timeout_ns` by `now_ns`.
/// An entry stamped after `now_ns` (written while the sweep ran) has not waited at all.
pub fn expired(at_ns: u64, now_ns: u64, timeout_ns: u64) -> bool {
    now_ns.saturating_sub(at_ns) > timeout_ns
}

/// Collects the expired entries first and deletes them after the walk (deleting under the
/// walk would restart it). Only entries this sweep deleted are counted: one the datapath
/// removed in between got its SYN-ACK or RST counted there instead, so every SYN is counted
/// once. Entries of ids without a timeout (no passive detection) are left to the LRU.
fn sweep<T: BorrowMut<MapData>>(
    pending: &mut HashMap<T, FlowKey, PendingSyn>,
    now_ns: u64,
    timeout_ns: impl Fn(u32) -> Option<u64>,
) -> Result<Vec<(u32, u64)>, DatapathError> {
    let mut stale = Vec::new();
    for entry in pending.iter().take(MAX_SWEEP_VISITS) {
        let (key, syn) = entry.map_err(map_err(MAP_PENDING_SYNS))?;
        if timeout_ns(syn.id).is_some_and(|t| expired(syn.at_ns, now_ns, t)) {
            stale.push((key, syn.id));
        }
    }
    let mut counts: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    for (key, id) in stale {
        match pending.remove(&key) {
            Ok(()) => *counts.entry(id).or_default() += 1,
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(MAP_PENDING_SYNS)(e)),
        }
    }
    Ok(counts.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::breaker::{
        BSTAT_CUT, BSTAT_DROP, BSTAT_REFUSED, BSTAT_REJECT_ICMP, BSTAT_REJECT_RST, BSTAT_SYNACK,
    };

    #[test]
    fn actions_are_every_enforcement_slot_once() {
        let names: Vec<&str> = BACKEND_ACTIONS.iter().map(|(_, n)| *n).collect();
        assert_eq!(
            names,
            [
                "admitted",
                "trial",
                "reject_rst",
                "reject_icmp",
                "drop",
                "close_existing"
            ]
        );
        let slots: Vec<u32> = BACKEND_ACTIONS.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            slots,
            [
                BSTAT_ADMITTED,
                BSTAT_TRIAL,
                BSTAT_REJECT_RST,
                BSTAT_REJECT_ICMP,
                BSTAT_DROP,
                BSTAT_CUT
            ]
        );
        assert!(
            !slots.contains(&BSTAT_SYNACK) && !slots.contains(&BSTAT_REFUSED),
            "passive slots are exported as agent_backend_passive_total"
        );
    }

    #[test]
    fn a_syn_expires_only_strictly_after_its_timeout() {
        let ms = 1_000_000;
        assert!(!expired(1_000 * ms, 1_500 * ms, 500 * ms));
        assert!(expired(1_000 * ms, 1_500 * ms + 1, 500 * ms));
        assert!(
            !expired(2_000 * ms, 1_500 * ms, 0),
            "stamped after the sweep's clock read"
        );
    }
}
