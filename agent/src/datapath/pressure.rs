//! How full the datapath's tables are, and how much kernel memory its maps take.
//!
//! Pressure is entries in use over capacity (Cilium's `bpf_map_pressure`), for every table
//! that can fill. Hash-like tables (hash, LRU hash, LPM trie) are counted by walking their
//! keys: a million keys cost about a second of syscalls, so the agent walks on a timer
//! ([`read`]), never per scrape. Arrays indexed by service or backend are never full by the
//! kernel's measure (every slot exists); their pressure is the agent's own use of them, the
//! services or backends of the policy ([`ArrayUse`]), which the caller passes in.
//! `BACKENDS` is a hash but is counted the same way: only the agent inserts into it (one
//! entry per backend key, at start; the datapath updates entries in place and never inserts
//! or deletes), so the policy gives its count exactly, and walking its thousands of keys
//! every second (a syscall a key) would cost about as much as the breakers' own work.
//!
//! An LRU table that is full and churning reads below 1: the kernel evicts in batches (at
//! most `LOCAL_FREE_TARGET`, 128) and keeps free entries on per-CPU lists. On 2 CPUs a
//! 64-entry table read 49 to 58 entries while evicting; at thousands of entries the gap is
//! a few percent. A walk counts what is in the table, not whether it evicts; the eviction
//! counters of the tables that have them say that.
//!
//! Memory is what the kernel charges for every BPF map the process holds a descriptor for,
//! read from `/proc/self/fdinfo` (`memlock`), each map once by id: the object's maps, aya's
//! log ring, and maps created at run time that the object does not declare.
//!
//! [`Alarm`] turns readings into one warning when a table passes [`WARN_AT`], and one
//! notice when it is back below [`CLEAR_BELOW`] for [`CLEAR_AFTER`] readings in a row.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agent_common::{
    Bucket, BucketKey, MatchList,
    breaker::{AdmittedFlow, BSTAT_SLOTS, FlowKey, PendingSyn},
    classify::{CLASSIFY_KEY_LEN, GENERATIONS},
    fdinfo::{FdMap, parse_fdinfo},
    lb::{LbConn, LbReverse},
    maps::{
        MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CLASSIFY, MAP_HALF_OPEN_FLOWS, MAP_LB_BACKENDS,
        MAP_LB_CONNS, MAP_LB_REVERSE, MAP_LB_SVC, MAP_PENDING_SYNS, MAP_RL_BUCKETS, MAP_SHAPE_NEXT,
        MAP_SVC_CFG,
    },
    shape::Departure,
};
use aya::maps::{HashMap, Map, MapData, MapError, lpm_trie::LpmTrie};

use super::{Datapath, DatapathError, map_err, typed};
use crate::config::Compiled;

/// A table at or above this share of its capacity is logged as a warning.
pub const WARN_AT: f64 = 0.9;
/// A warned table is logged as relieved once below this share...
pub const CLEAR_BELOW: f64 = 0.8;
/// ...on this many readings in a row. An LRU table that is full evicts in batches, so its
/// count saws up and down by a batch: one low reading is not relief.
pub const CLEAR_AFTER: u32 = 3;

/// How the entries of a table were counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Every key walked: the count of that instant.
    Walk,
    /// The walk visited more keys than the table holds and was cut there: keys were deleted
    /// or evicted under it (the kernel restarts a walk whose current key is gone). Entries
    /// are then reported as the capacity, not as a count.
    WalkCut,
    /// An array, or `BACKENDS`: the entries the policy uses.
    Policy,
}

impl Counted {
    pub fn as_str(self) -> &'static str {
        match self {
            Counted::Walk => "walk",
            Counted::WalkCut => "walk_cut",
            Counted::Policy => "policy",
        }
    }
}

/// One table that can fill, as of one reading.
#[derive(Debug, Clone, PartialEq)]
pub struct TablePressure {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
    pub counted: Counted,
}

impl TablePressure {
    /// Entries over capacity, 0 to 1 (0 for a table of no capacity).
    pub fn pressure(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            (self.entries as f64 / self.capacity as f64).min(1.0)
        }
    }
}

/// What the policy uses of an array indexed by service or backend, or of `BACKENDS`: `used`
/// items, each taking `slots` consecutive entries (counter arrays hold several slots per
/// backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArrayUse {
    pub map: &'static str,
    pub used: u64,
    pub slots: u32,
}

impl ArrayUse {
    /// The arrays a compiled policy fills, and how much of each.
    pub fn of(compiled: &Compiled) -> Vec<ArrayUse> {
        // Indexed by service id, two entries (generations) each: the highest id is what must
        // fit (ids are stable across reloads, not dense).
        let services = (compiled.services.iter())
            .map(|s| u64::from(s.id) + 1)
            .max()
            .unwrap_or(0);
        let lb_ids = (compiled.lb.iter())
            .map(|s| u64::from(s.id) + 1)
            .max()
            .unwrap_or(0);
        let lb_backends = compiled.lb.iter().map(|s| s.backends.len() as u64).sum();
        vec![
            ArrayUse {
                map: MAP_SVC_CFG,
                used: services,
                slots: GENERATIONS,
            },
            ArrayUse {
                map: MAP_LB_SVC,
                used: lb_ids,
                slots: GENERATIONS,
            },
            ArrayUse {
                map: MAP_LB_BACKENDS,
                used: lb_backends,
                slots: 1,
            },
            ArrayUse {
                map: MAP_BACKEND_STATS,
                used: compiled.backends.len() as u64,
                slots: BSTAT_SLOTS,
            },
            ArrayUse {
                map: MAP_BACKENDS,
                used: compiled.backends.iter().map(|b| b.keys.len() as u64).sum(),
                slots: 1,
            },
        ]
    }
}

/// Kernel memory of the maps of one name (several maps may share a name, e.g. inner maps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapMemory {
    pub name: String,
    /// Maps of this name.
    pub maps: u32,
    /// Their `memlock`, summed.
    pub bytes: u64,
}

/// One reading: the tables' pressure, the maps' memory, and how long it took.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub tables: Vec<TablePressure>,
    /// By name; `None` when `/proc/self/fdinfo` could not be read.
    pub memory: Option<Vec<MapMemory>>,
    pub took: Duration,
}

impl Reading {
    /// Every map's memory, summed.
    pub fn kernel_memory(&self) -> Option<u64> {
        self.memory
            .as_ref()
            .map(|m| m.iter().map(|m| m.bytes).sum())
    }
}

/// Walks the hash-like tables, takes the arrays' use from `arrays`, and reads the memory of
/// every map the process holds. Slow for big tables: call it off the async threads.
pub fn read(datapath: &Datapath, arrays: &[ArrayUse]) -> Reading {
    let start = Instant::now();
    let mut tables = datapath.walk_tables();
    for a in arrays {
        match datapath.capacity(a.map) {
            Ok(Some(max)) => tables.push(TablePressure {
                map: a.map,
                entries: a.used,
                capacity: u64::from(max / a.slots.max(1)),
                counted: Counted::Policy,
            }),
            Ok(None) => {}
            Err(e) => tracing::debug!("map pressure: {e}"),
        }
    }
    let memory = match map_memory() {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::debug!("map memory: reading /proc/self/fdinfo: {e}");
            None
        }
    };
    Reading {
        tables,
        memory,
        took: start.elapsed(),
    }
}

/// A walk of at most `capacity + 1` keys: more keys than the table can hold means the walk
/// restarted under deletions, and it stops there instead of going round again.
fn walk<K>(
    keys: impl Iterator<Item = Result<K, MapError>>,
    capacity: u64,
) -> Result<(u64, Counted), MapError> {
    let bound = usize::try_from(capacity.saturating_add(1)).unwrap_or(usize::MAX);
    let mut n = 0u64;
    for key in keys.take(bound) {
        key?;
        n += 1;
    }
    Ok(if n > capacity {
        (capacity, Counted::WalkCut)
    } else {
        (n, Counted::Walk)
    })
}

impl Datapath {
    /// `max_entries` of the object's map `name`; `None` when the object has no such map.
    pub fn capacity(&self, name: &'static str) -> Result<Option<u32>, DatapathError> {
        let Some(map) = self.ebpf.map(name) else {
            return Ok(None);
        };
        let data: &MapData = match map {
            Map::Array(d)
            | Map::PerCpuArray(d)
            | Map::HashMap(d)
            | Map::LruHashMap(d)
            | Map::LpmTrie(d) => d,
            _ => return Err(DatapathError::MapType(name)),
        };
        Ok(Some(data.info().map_err(map_err(name))?.max_entries()))
    }

    /// Every hash-like table of the object, walked once. A table the object lacks is left
    /// out; one that cannot be walked is left out of this reading and logged.
    fn walk_tables(&self) -> Vec<TablePressure> {
        let mut out = Vec::new();
        for name in [
            MAP_CLASSIFY,
            MAP_RL_BUCKETS,
            MAP_SHAPE_NEXT,
            MAP_HALF_OPEN_FLOWS,
            MAP_PENDING_SYNS,
            MAP_LB_CONNS,
            MAP_LB_REVERSE,
        ] {
            match self.walk_table(name) {
                Ok(Some(t)) => out.push(t),
                Ok(None) => {}
                Err(e) => tracing::warn!("map pressure: {e}"),
            }
        }
        out
    }

    fn walk_table(&self, name: &'static str) -> Result<Option<TablePressure>, DatapathError> {
        let Some(max) = self.capacity(name)? else {
            return Ok(None);
        };
        let capacity = u64::from(max);
        let ebpf = &self.ebpf;
        let e = map_err(name);
        let (entries, counted) = match name {
            MAP_CLASSIFY => {
                let t: LpmTrie<&MapData, [u8; CLASSIFY_KEY_LEN], MatchList> = typed(ebpf, name)?;
                walk(t.keys(), capacity).map_err(e)?
            }
            MAP_RL_BUCKETS => {
                let t: HashMap<&MapData, BucketKey, Bucket> = typed(ebpf, name)?;
                walk(t.keys(), capacity).map_err(e)?
            }
            MAP_SHAPE_NEXT => {
                let t: HashMap<&MapData, BucketKey, Departure> = typed(ebpf, name)?;
                walk(t.keys(), capacity).map_err(e)?
            }
            MAP_HALF_OPEN_FLOWS => {
                let t: HashMap<&MapData, FlowKey, AdmittedFlow> = typed(ebpf, name)?;
                walk(t.keys(), capacity).map_err(e)?
            }
            MAP_PENDING_SYNS => {
                let t: HashMap<&MapData, FlowKey, PendingSyn> = typed(ebpf, name)?;
                walk(t.keys(), capacity).map_err(e)?
            }
            MAP_LB_CONNS => {
                let t: HashMap<&MapData, FlowKey, LbConn> = typed(ebpf, name)?;
                walk(t.keys(), capacity).map_err(e)?
            }
            MAP_LB_REVERSE => {
                let t: HashMap<&MapData, FlowKey, LbReverse> = typed(ebpf, name)?;
                walk(t.keys(), capacity).map_err(e)?
            }
            _ => return Ok(None),
        };
        Ok(Some(TablePressure {
            map: name,
            entries,
            capacity,
            counted,
        }))
    }
}

/// Every BPF map this process holds a descriptor for, once each (several descriptors of one
/// map are one map), with one of its descriptors. A descriptor closed during the scan is
/// skipped.
pub fn held_maps() -> std::io::Result<Vec<(i32, FdMap)>> {
    let mut by_id = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(m) = parse_fdinfo(&text) {
            by_id.insert(m.map_id, (fd, m));
        }
    }
    Ok(by_id.into_values().collect())
}

/// Memory of the held maps by name, named by the kernel's map info read through the
/// process's own descriptor (`BPF_OBJ_GET_INFO_BY_FD`: no capability needed, unlike opening a
/// map by id). A map without a name, or whose info cannot be read (its descriptor closed
/// meanwhile), is named `id:<map_id>`.
pub fn map_memory() -> std::io::Result<Vec<MapMemory>> {
    let named = held_maps()?.into_iter().map(|(fd, m)| {
        let name = name_of(fd).unwrap_or_else(|| format!("id:{}", m.map_id));
        (name, m)
    });
    Ok(by_name(named))
}

/// The name of the map behind descriptor `fd` of this process, through a duplicate of it.
fn name_of(fd: i32) -> Option<String> {
    // SAFETY: borrowed only to duplicate it; a descriptor closed since the scan makes the
    // duplicate fail (EBADF), and one reused by another file fails as not a map.
    let dup = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .ok()?;
    let info = MapData::from_fd(dup).ok()?.info().ok()?;
    info.name_as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

/// Groups maps by name, summing their memory.
fn by_name(maps: impl Iterator<Item = (String, FdMap)>) -> Vec<MapMemory> {
    let mut out: BTreeMap<String, MapMemory> = BTreeMap::new();
    for (name, m) in maps {
        let e = out.entry(name.clone()).or_insert(MapMemory {
            name,
            maps: 0,
            bytes: 0,
        });
        e.maps += 1;
        e.bytes += m.memlock;
    }
    out.into_values().collect()
}

/// A change worth a log line.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The table reached [`WARN_AT`].
    Raised(TablePressure),
    /// The table stayed below [`CLEAR_BELOW`] for [`CLEAR_AFTER`] readings.
    Cleared(TablePressure),
}

/// Which tables are above the warning line: warns once on the way up, clears once on the
/// way down (with hysteresis, so a table hovering at the line does not flap).
#[derive(Debug, Default)]
pub struct Alarm {
    /// Raised tables, and how many readings in a row each has been below `CLEAR_BELOW`.
    raised: BTreeMap<&'static str, u32>,
}

impl Alarm {
    pub fn observe(&mut self, tables: &[TablePressure]) -> Vec<Change> {
        let mut changes = Vec::new();
        for t in tables {
            let p = t.pressure();
            match self.raised.get_mut(t.map) {
                None if p >= WARN_AT => {
                    self.raised.insert(t.map, 0);
                    changes.push(Change::Raised(t.clone()));
                }
                None => {}
                Some(low) if p < CLEAR_BELOW => {
                    *low += 1;
                    if *low >= CLEAR_AFTER {
                        self.raised.remove(t.map);
                        changes.push(Change::Cleared(t.clone()));
                    }
                }
                Some(low) => *low = 0,
            }
        }
        changes
    }

    pub fn is_raised(&self, map: &str) -> bool {
        self.raised.contains_key(map)
    }
}

/// Logs each change: a warning for a table filling up, a notice when it has room again.
pub fn log(changes: &[Change]) {
    for c in changes {
        match c {
            Change::Raised(t) => tracing::warn!(
                "map {} is {:.0}% full ({} of {} entries, counted by {}): new entries will be \
                 refused or evict others",
                t.map,
                t.pressure() * 100.0,
                t.entries,
                t.capacity,
                t.counted.as_str()
            ),
            Change::Cleared(t) => tracing::info!(
                "map {} is below {:.0}% again ({} of {} entries)",
                t.map,
                CLEAR_BELOW * 100.0,
                t.entries,
                t.capacity
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_summed_per_name() {
        let m = |id, memlock| FdMap {
            map_id: id,
            map_type: 2,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            memlock,
        };
        let got = by_name(
            [
                ("MAGLEV".to_string(), m(1, 100)),
                ("RL_BUCKETS".to_string(), m(2, 1000)),
                ("MAGLEV".to_string(), m(3, 50)),
            ]
            .into_iter(),
        );
        assert_eq!(
            got,
            [
                MapMemory {
                    name: "MAGLEV".into(),
                    maps: 2,
                    bytes: 150
                },
                MapMemory {
                    name: "RL_BUCKETS".into(),
                    maps: 1,
                    bytes: 1000
                },
            ]
        );
    }

    #[test]
    fn a_walk_counts_keys_and_is_cut_past_the_capacity() {
        let keys = |n: u32| (0..n).map(Ok::<u32, MapError>);
        assert_eq!(walk(keys(0), 64).unwrap(), (0, Counted::Walk));
        assert_eq!(walk(keys(64), 64).unwrap(), (64, Counted::Walk));
        // A walk that restarted under deletions sees more keys than fit: capacity, flagged.
        assert_eq!(walk(keys(65), 64).unwrap(), (64, Counted::WalkCut));
        let mut visited = 0;
        let endless = std::iter::repeat_with(|| {
            visited += 1;
            Ok::<u32, MapError>(1)
        });
        assert_eq!(walk(endless, 10).unwrap(), (10, Counted::WalkCut));
        assert_eq!(visited, 11, "the walk stops one key past the capacity");
    }

    fn at(entries: u64) -> Vec<TablePressure> {
        vec![TablePressure {
            map: "RL_BUCKETS",
            entries,
            capacity: 100,
            counted: Counted::Walk,
        }]
    }

    fn kinds(changes: &[Change]) -> Vec<&'static str> {
        changes
            .iter()
            .map(|c| match c {
                Change::Raised(_) => "raised",
                Change::Cleared(_) => "cleared",
            })
            .collect()
    }

    #[test]
    fn the_alarm_warns_once_on_the_way_up() {
        let mut a = Alarm::default();
        assert!(a.observe(&at(50)).is_empty());
        assert!(a.observe(&at(89)).is_empty());
        let up = a.observe(&at(90));
        assert_eq!(kinds(&up), ["raised"]);
        assert_eq!(up[0], Change::Raised(at(90)[0].clone()));
        for e in [100, 95, 85, 99] {
            assert!(a.observe(&at(e)).is_empty(), "warned again at {e}%");
        }
        assert!(a.is_raised("RL_BUCKETS"));
    }

    #[test]
    fn the_alarm_clears_after_readings_below_the_lower_line_in_a_row() {
        let mut a = Alarm::default();
        a.observe(&at(100));
        // The LRU's saw: dips below 80% that do not last are not relief.
        for e in [75, 79, 92, 70, 70, 85, 60] {
            assert!(a.observe(&at(e)).is_empty(), "cleared at {e}%");
        }
        assert!(a.observe(&at(60)).is_empty());
        assert_eq!(kinds(&a.observe(&at(10))), ["cleared"]);
        assert!(!a.is_raised("RL_BUCKETS"));
        assert!(a.observe(&at(10)).is_empty());
        // Between the lines nothing is raised again...
        assert!(a.observe(&at(85)).is_empty());
        // ...until the upper line is reached.
        assert_eq!(kinds(&a.observe(&at(91))), ["raised"]);
    }

    #[test]
    fn tables_are_watched_apart() {
        let mut a = Alarm::default();
        let two = |x, y| {
            vec![
                TablePressure {
                    map: "RL_BUCKETS",
                    entries: x,
                    capacity: 10,
                    counted: Counted::Walk,
                },
                TablePressure {
                    map: "SVC_CFG",
                    entries: y,
                    capacity: 10,
                    counted: Counted::Policy,
                },
            ]
        };
        let c = a.observe(&two(10, 1));
        assert_eq!(kinds(&c), ["raised"]);
        assert!(matches!(&c[0], Change::Raised(t) if t.map == "RL_BUCKETS"));
        let c = a.observe(&two(10, 9));
        assert!(matches!(&c[..], [Change::Raised(t)] if t.map == "SVC_CFG"));
    }

    #[test]
    fn pressure_is_a_share_of_capacity() {
        let t = |entries, capacity| TablePressure {
            map: "X",
            entries,
            capacity,
            counted: Counted::Policy,
        };
        assert_eq!(t(45, 50).pressure(), 0.9);
        assert_eq!(t(0, 0).pressure(), 0.0);
        assert_eq!(t(3, 2).pressure(), 1.0);
    }
}
