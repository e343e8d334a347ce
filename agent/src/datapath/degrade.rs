//! Degradation modes (`agent_common::degrade`): the evaluator writes each degradable
//! service's mode into `DEGRADE` through [`DegradeMaps`], a handle of its own on the map (as
//! the supervisor's [`super::BackendMaps`]), so a transition never waits on the datapath lock.

use agent_common::{
    Counter,
    maps::{MAP_DEGRADE, MAP_SVC_STATS},
    stats::{SVC_FALLBACK, SVC_SHED, svc_slot},
};
use aya::maps::{Array, MapData, PerCpuArray};

use super::{Datapath, DatapathError, map_err};

/// An independent handle on `DEGRADE` and the service counters (its own file descriptors).
pub struct DegradeMaps {
    modes: Array<MapData, u32>,
    stats: PerCpuArray<MapData, Counter>,
}

impl std::fmt::Debug for DegradeMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DegradeMaps")
    }
}

/// New flows of one service the datapath sent to its fallback, and refused by shedding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DegradeCounters {
    pub fallback: u64,
    pub shed: u64,
}

impl DegradeMaps {
    /// Writes service `id`'s mode (`MODE_*`); the datapath applies it from its next new flow.
    pub fn write_mode(&mut self, id: u32, mode: u32) -> Result<(), DatapathError> {
        self.modes.set(id, mode, 0).map_err(map_err(MAP_DEGRADE))
    }

    /// Service `id`'s mode as the map holds it: what an earlier agent left, on adoption.
    pub fn read_mode(&self, id: u32) -> Result<u32, DatapathError> {
        self.modes.get(&id, 0).map_err(map_err(MAP_DEGRADE))
    }

    /// Service `id`'s new flows sent to the fallback and shed, summed over CPUs.
    pub fn counters(&self, id: u32) -> Result<DegradeCounters, DatapathError> {
        let sum = |slot| -> Result<u64, DatapathError> {
            let per_cpu = (self.stats)
                .get(&svc_slot(id, slot), 0)
                .map_err(map_err(MAP_SVC_STATS))?;
            Ok(per_cpu.iter().map(|c| c.packets).sum())
        };
        Ok(DegradeCounters {
            fallback: sum(SVC_FALLBACK)?,
            shed: sum(SVC_SHED)?,
        })
    }
}

impl Datapath {
    /// Opens a second handle on `DEGRADE` and `SVC_STATS` (duplicated file descriptors), for
    /// the degradation evaluator.
    pub fn degrade_maps(&self) -> Result<DegradeMaps, DatapathError> {
        Ok(DegradeMaps {
            modes: self.reopen(MAP_DEGRADE)?,
            stats: self.reopen(MAP_SVC_STATS)?,
        })
    }
}
