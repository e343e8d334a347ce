//! Balancing maps: the agent writes each balanced service (`LB_SVC`), its backends
//! (`LB_BACKENDS`, with their effective weights) and its table (a map of its own, swapped into
//! `LB_TABLES` whole), and reads the datapath's per-backend counters and connection table.
//! See `agent_common::lb`.
//!
//! [`LbMaps`] is a handle of its own on those maps (duplicated descriptors), like
//! `BackendMaps`: the balancer writes through it without the datapath lock.

use std::collections::HashMap as StdHashMap;
use std::os::fd::{AsFd, AsRawFd};

use agent_common::{
    Counter,
    breaker::FlowKey,
    classify::generation_slot,
    lb::{
        LB_TABLE_FLAGS, LBSTAT_FORWARDED, LBSTAT_NEW_FLOWS, LbBackend, LbConn, LbService,
        LbTableSlot, conn_expired, lb_slot, lb_table_elements, lb_table_slots,
    },
    maps::{
        MAP_LB_ACTIVE_CONNS, MAP_LB_BACKENDS, MAP_LB_CONNS, MAP_LB_STATS, MAP_LB_SVC,
        MAP_LB_TABLES, MAP_SVC_STATS,
    },
    stats::{
        SVC_LB_LOST, SVC_LB_NAT_PORT, SVC_LB_NAT_PORT_BUSY, SVC_LB_REPLACED, SVC_NO_BACKEND,
        svc_slot,
    },
};
use aya::maps::{Array, ArrayOfMaps, HashMap, MapData, MapError, PerCpuArray};
use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY;

use super::{Datapath, DatapathError, map_err};
use crate::config::CompiledLb;

/// After each write of an array of maps the kernel waits for an RCU grace period (so that no
/// program still reads the table it replaced): about 10 ms. Publishing many services' tables
/// at once (start, a reload, a node-wide outage) therefore writes from this many threads, whose
/// waits overlap.
const PUBLISH_THREADS: usize = 64;

/// An independent handle on the balancing maps.
pub struct LbMaps {
    /// The policy generation this handle writes service entries and tables for
    /// (`agent_common::classify::generation_slot`): the live one, or the one a reload stages.
    generation: u32,
    svc: Array<MapData, LbService>,
    /// `PUBLISH_THREADS` handles on `LB_TABLES`, one per publishing thread.
    tables: Vec<ArrayOfMaps<MapData, MapData>>,
    /// The table each generation slot has in `LB_TABLES` now, kept open so that the agent's account
    /// of the datapath's kernel memory (its map descriptors) includes every table.
    live: StdHashMap<u32, MapData>,
    backends: Array<MapData, LbBackend>,
    conns_active: Array<MapData, u64>,
    stats: PerCpuArray<MapData, Counter>,
    svc_stats: PerCpuArray<MapData, Counter>,
    conns: HashMap<MapData, FlowKey, LbConn>,
}

impl std::fmt::Debug for LbMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LbMaps")
    }
}

/// What the datapath counted for one LB backend (counters summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LbCounters {
    /// Packets and bytes forwarded to it (client to backend).
    pub forwarded: Counter,
    /// New flows pinned to it.
    pub new_flows: u64,
    /// Connections open now (TCP until FIN/RST, UDP until its entry expires).
    pub active: u64,
}

impl Datapath {
    /// Opens a second handle on the balancing maps.
    pub fn lb_maps(&self) -> Result<LbMaps, DatapathError> {
        Ok(LbMaps {
            generation: self.generation(),
            svc: self.reopen(MAP_LB_SVC)?,
            tables: (0..PUBLISH_THREADS)
                .map(|_| self.reopen(MAP_LB_TABLES))
                .collect::<Result<_, _>>()?,
            live: StdHashMap::new(),
            backends: self.reopen(MAP_LB_BACKENDS)?,
            conns_active: self.reopen(MAP_LB_ACTIVE_CONNS)?,
            stats: self.reopen(MAP_LB_STATS)?,
            svc_stats: self.reopen(MAP_SVC_STATS)?,
            conns: self.reopen(MAP_LB_CONNS)?,
        })
    }
}

impl LbMaps {
    /// This handle, writing the services' entries and tables of `generation` from now on.
    pub fn for_generation(mut self, generation: u32) -> LbMaps {
        self.generation = generation;
        self
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    fn slot(&self, id: u32) -> u32 {
        generation_slot(id, self.generation)
    }

    /// Writes a service's backends (with `weights`) and its configuration. The configuration
    /// goes last: until it is written the datapath does not balance the service.
    pub fn write_service(
        &mut self,
        svc: &CompiledLb,
        weights: &[u32],
    ) -> Result<(), DatapathError> {
        for (i, b) in svc.backends.iter().enumerate() {
            let entry = LbBackend {
                key: b.key,
                weight: weights.get(i).copied().unwrap_or(0),
                stats_id: svc.index(i),
            };
            self.backends
                .set(svc.index(i), entry, 0)
                .map_err(map_err(MAP_LB_BACKENDS))?;
        }
        self.write_panic(svc, false)
    }

    /// Rewrites the service's entry with its panic flag.
    pub fn write_panic(&mut self, svc: &CompiledLb, panic: bool) -> Result<(), DatapathError> {
        self.svc
            .set(self.slot(svc.id), svc.service_entry(panic), 0)
            .map_err(map_err(MAP_LB_SVC))
    }

    /// The effective weight of LB backend `index` (what `least_conn` reads).
    pub fn write_weight(
        &mut self,
        svc: &CompiledLb,
        i: usize,
        weight: u32,
    ) -> Result<(), DatapathError> {
        let index = svc.index(i);
        let mut entry = self
            .backends
            .get(&index, 0)
            .map_err(map_err(MAP_LB_BACKENDS))?;
        entry.weight = weight;
        self.backends
            .set(index, entry, 0)
            .map_err(map_err(MAP_LB_BACKENDS))
    }

    /// Makes `entries` (LB indices) the service's table: a new map of exactly their size,
    /// filled through one shared mapping of its memory, then put in `LB_TABLES` with one write.
    /// The datapath reads the old table whole or the new one whole; the kernel frees the old
    /// one once no running program holds it.
    pub fn publish(&mut self, svc: &CompiledLb, entries: &[u32]) -> Result<(), DatapathError> {
        self.publish_many(vec![(svc.id, entries.to_vec())])
    }

    /// [`LbMaps::publish`] for many services (by service id), written concurrently. On an
    /// error, the services before it in each thread's share have their new table.
    pub fn publish_many(&mut self, tables: Vec<(u32, Vec<u32>)>) -> Result<(), DatapathError> {
        let made: Vec<(u32, MapData)> = tables
            .into_iter()
            .map(|(id, entries)| Ok((self.slot(id), new_table(&entries)?)))
            .collect::<Result<_, MapError>>()
            .map_err(table_error)?;
        let share = made.len().div_ceil(self.tables.len()).max(1);
        std::thread::scope(|scope| {
            let writers: Vec<_> = (self.tables.iter_mut())
                .zip(made.chunks(share))
                .map(|(outer, chunk)| {
                    scope.spawn(move || {
                        for (id, table) in chunk {
                            outer.set(*id, table, 0)?;
                        }
                        Ok::<(), MapError>(())
                    })
                })
                .collect();
            writers
                .into_iter()
                .try_for_each(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })
        .map_err(map_err(MAP_LB_TABLES))?;
        self.live.extend(made);
        Ok(())
    }

    /// The datapath's counters for backend `i` of `svc`.
    pub fn counters(&self, svc: &CompiledLb, i: usize) -> Result<LbCounters, DatapathError> {
        let index = svc.index(i);
        let sum = |slot| -> Result<Counter, DatapathError> {
            let values = self
                .stats
                .get(&lb_slot(index, slot), 0)
                .map_err(map_err(MAP_LB_STATS))?;
            let mut c = Counter::default();
            for v in values.iter() {
                c.add(v);
            }
            Ok(c)
        };
        Ok(LbCounters {
            forwarded: sum(LBSTAT_FORWARDED)?,
            new_flows: sum(LBSTAT_NEW_FLOWS)?.packets,
            active: self
                .conns_active
                .get(&index, 0)
                .map_err(map_err(MAP_LB_ACTIVE_CONNS))?,
        })
    }

    /// Per-service counters of the datapath (summed over CPUs).
    pub fn service_counters(&self, svc: &CompiledLb) -> Result<LbServiceCounters, DatapathError> {
        let sum = |slot| -> Result<u64, DatapathError> {
            let values = self
                .svc_stats
                .get(&svc_slot(svc.id, slot), 0)
                .map_err(map_err(MAP_SVC_STATS))?;
            Ok(values.iter().map(|c| c.packets).sum())
        };
        Ok(LbServiceCounters {
            no_backend: sum(SVC_NO_BACKEND)?,
            lost: sum(SVC_LB_LOST)?,
            replaced: sum(SVC_LB_REPLACED)?,
            client_ports_moved: sum(SVC_LB_NAT_PORT)?,
            client_ports_busy: sum(SVC_LB_NAT_PORT_BUSY)?,
        })
    }

    /// Connection-table entries per VIP (address, port): (live, all), walking at most
    /// `max_visits` keys. Live entries are those not expired; expired ones stay in the table
    /// until the LRU evicts them or their 5-tuple comes back.
    pub fn occupancy(
        &self,
        now_ns: u64,
        max_visits: usize,
    ) -> StdHashMap<([u8; 16], u16), (u64, u64)> {
        let mut out = StdHashMap::new();
        for item in self.conns.iter().take(max_visits) {
            let Ok((key, conn)) = item else {
                continue;
            };
            let tcp = key.proto == agent_common::classify::PROTO_TCP;
            let e: &mut (u64, u64) = out.entry((key.backend, key.backend_port)).or_default();
            e.1 += 1;
            if !conn_expired(&conn, tcp, now_ns) {
                e.0 += 1;
            }
        }
        out
    }
}

/// Why a service table could not be made, with the kernel's errno; out of descriptors (one
/// per balanced service) says which limit to raise.
fn table_error(e: MapError) -> DatapathError {
    match e {
        MapError::CreateError { io_error, .. } if io_error.raw_os_error() == Some(libc::EMFILE) => {
            DatapathError::Tables(format!(
                "creating a balanced service's table: {io_error}: the agent holds one \
                 descriptor per balanced service, and RLIMIT_NOFILE allows {}; raise the \
                 hard limit (systemd: LimitNOFILE=, as deploy/systemd/agent.service sets; a \
                 shell: ulimit -Hn)",
                super::nofile_rlimit().map_or("fewer".to_string(), |l| l.rlim_max.to_string())
            ))
        }
        MapError::CreateError { io_error, .. } => {
            DatapathError::Tables(format!("creating a balanced service's table: {io_error}"))
        }
        e => map_err(MAP_LB_TABLES)(e),
    }
}

/// A service table holding `entries` (see `agent_common::lb::LbTableSlot`), filled through
/// one shared mapping of its memory instead of a system call per entry.
fn new_table(entries: &[u32]) -> Result<MapData, MapError> {
    // At most 2^24 entries: validation bounds table sizes and schedules far below u32.
    let def = aya_obj::Map::new_from_params(
        BPF_MAP_TYPE_ARRAY as u32,
        size_of::<u32>() as u32,
        size_of::<LbTableSlot>() as u32,
        lb_table_elements(entries.len() as u32),
        LB_TABLE_FLAGS,
    );
    let map = MapData::create(def, "LB_TABLE", None)?;
    let slots: Vec<LbTableSlot> = lb_table_slots(entries).collect();
    let syscall =
        |call| move |io_error| MapError::SyscallError(aya::sys::SyscallError { call, io_error });
    // The kernel maps whole pages of the array's memory; slots are 8 bytes, 8-byte aligned.
    let len = size_of_val(slots.as_slice());
    // SAFETY: a fresh shared mapping of the new map's own memory, `len` bytes (the array's
    // size: the kernel refuses a longer one), written once and unmapped before return.
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            map.fd().as_fd().as_raw_fd(),
            0,
        );
        if ptr == libc::MAP_FAILED {
            return Err(syscall("mmap")(std::io::Error::last_os_error()));
        }
        std::ptr::copy_nonoverlapping(slots.as_ptr(), ptr.cast::<LbTableSlot>(), slots.len());
        if libc::munmap(ptr, len) != 0 {
            return Err(syscall("munmap")(std::io::Error::last_os_error()));
        }
    }
    Ok(map)
}

/// What the datapath counted for one balanced service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LbServiceCounters {
    /// New flows refused for want of an available backend.
    pub no_backend: u64,
    /// TCP packets (not SYNs) whose flow had no live entry.
    pub lost: u64,
    /// New flows whose entry replaced an expired or closed one of the same 5-tuple.
    pub replaced: u64,
    /// New flows whose client port was moved out of the ephemeral range
    /// (`agent_common::ports`), and those that kept it because a live flow held the moved one.
    pub client_ports_moved: u64,
    pub client_ports_busy: u64,
}
