//! Balancing maps: the agent writes each balanced service (`LB_SVC`), its backends
//! (`LB_BACKENDS`, with their effective weights) and its table halves (`LB_TABLE`, flipped
//! live by one write of `LB_ACTIVE`), and reads the datapath's per-backend counters and
//! connection table. See `agent_common::lb`.
//!
//! [`LbMaps`] is a handle of its own on those maps (duplicated descriptors), like
//! `BackendMaps`: the balancer writes through it without the datapath lock.

use std::collections::HashMap as StdHashMap;

use agent_common::{
    Counter,
    breaker::FlowKey,
    lb::{
        LBSTAT_FORWARDED, LBSTAT_NEW_FLOWS, LbBackend, LbConn, LbService, conn_expired, lb_active,
        lb_slot,
    },
    maps::{
        MAP_LB_ACTIVE, MAP_LB_ACTIVE_CONNS, MAP_LB_BACKENDS, MAP_LB_CONNS, MAP_LB_STATS,
        MAP_LB_SVC, MAP_LB_TABLE, MAP_SVC_STATS,
    },
    stats::{SVC_LB_LOST, SVC_LB_REPLACED, SVC_NO_BACKEND, svc_slot},
};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};

use super::{Datapath, DatapathError, map_err};
use crate::config::CompiledLb;

/// An independent handle on the balancing maps.
pub struct LbMaps {
    svc: Array<MapData, LbService>,
    active: Array<MapData, u32>,
    table: Array<MapData, u32>,
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
            svc: self.reopen(MAP_LB_SVC)?,
            active: self.reopen(MAP_LB_ACTIVE)?,
            table: self.reopen(MAP_LB_TABLE)?,
            backends: self.reopen(MAP_LB_BACKENDS)?,
            conns_active: self.reopen(MAP_LB_ACTIVE_CONNS)?,
            stats: self.reopen(MAP_LB_STATS)?,
            svc_stats: self.reopen(MAP_SVC_STATS)?,
            conns: self.reopen(MAP_LB_CONNS)?,
        })
    }
}

impl LbMaps {
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
            .set(svc.service as u32, svc.service_entry(panic), 0)
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

    /// The half `LB_ACTIVE` names as live now (0 before the first publish).
    pub fn live_half(&self, svc: &CompiledLb) -> Result<u32, DatapathError> {
        let a = self
            .active
            .get(&(svc.service as u32), 0)
            .map_err(map_err(MAP_LB_ACTIVE))?;
        Ok(a & 1)
    }

    /// Writes `entries` (LB indices; at most the service's capacity) into the half that is not
    /// live, then makes it live with one write of `LB_ACTIVE`. The datapath reads either the
    /// old half whole or the new one whole. Returns the half now live.
    ///
    /// The half written was live before the previous publish; a packet that read `LB_ACTIVE`
    /// before that flip could still be reading it only if it were still running, and a
    /// datapath run lasts microseconds: the caller spaces publishes of a service by far more
    /// (`balancer::MIN_PUBLISH_GAP`).
    pub fn publish(&mut self, svc: &CompiledLb, entries: &[u32]) -> Result<u32, DatapathError> {
        let len = (entries.len() as u32).min(svc.capacity);
        let half = self.live_half(svc)? ^ 1;
        let base = svc.table_base + half * svc.capacity;
        for (i, e) in entries.iter().take(len as usize).enumerate() {
            self.table
                .set(base + i as u32, e, 0)
                .map_err(map_err(MAP_LB_TABLE))?;
        }
        self.active
            .set(svc.service as u32, lb_active(half, len), 0)
            .map_err(map_err(MAP_LB_ACTIVE))?;
        Ok(half)
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
                .get(&svc_slot(svc.service as u32, slot), 0)
                .map_err(map_err(MAP_SVC_STATS))?;
            Ok(values.iter().map(|c| c.packets).sum())
        };
        Ok(LbServiceCounters {
            no_backend: sum(SVC_NO_BACKEND)?,
            lost: sum(SVC_LB_LOST)?,
            replaced: sum(SVC_LB_REPLACED)?,
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

/// What the datapath counted for one balanced service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LbServiceCounters {
    /// New flows refused for want of an available backend.
    pub no_backend: u64,
    /// TCP packets (not SYNs) whose flow had no live entry.
    pub lost: u64,
    /// New flows whose entry replaced an expired or closed one of the same 5-tuple.
    pub replaced: u64,
}
