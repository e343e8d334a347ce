//! Degradation (`agent_common::degrade`): the mode the agent wrote for a service, read for
//! its new flows (shed, or balanced onto the fallback's backends) and, while it falls back,
//! for the rate limit of every packet (the companion's). Fail open: a mode this program does
//! not know is normal, and so is `MODE_FALLBACK` without a companion in the packet's
//! generation.

use agent_common::{
    ServiceConfig,
    classify::generation_slot,
    degrade::{MODE_FALLBACK, MODE_NORMAL, MODE_SHED, opens_flow},
    limit::{SVC_F_ACTIVE, SVC_F_RATE_LIMIT},
};

use crate::{
    maps::{DEGRADE, SVC_CFG},
    parse::Parsed,
};

/// Service `id`'s mode; normal without an entry.
#[inline(always)]
fn mode(id: u32) -> u32 {
    DEGRADE.get(id).copied().unwrap_or(MODE_NORMAL)
}

/// Whether new flows of service `id` are refused.
#[inline(always)]
pub fn shed(id: u32) -> bool {
    mode(id) == MODE_SHED
}

/// What becomes of a new flow of a balanced service.
pub enum NewFlow {
    /// Balanced over the service's own backends.
    Normal,
    /// Refused, as when no backend can take it.
    Shed,
    /// Balanced over the backends of the companion `id`, whose entries of the packet's
    /// generation are at `slot`.
    Fallback { id: u32, slot: u32 },
}

/// The mode of service `id` (generation slot `slot`) for one of its new flows.
#[inline(always)]
pub fn new_flow_mode(id: u32, slot: u32) -> NewFlow {
    match mode(id) {
        MODE_SHED => NewFlow::Shed,
        MODE_FALLBACK => match SVC_CFG.get(slot).and_then(ServiceConfig::fallback_id) {
            Some(f) => NewFlow::Fallback {
                id: f,
                slot: generation_slot(f, slot & 1),
            },
            None => NewFlow::Normal,
        },
        _ => NewFlow::Normal,
    }
}

/// The companion of service `id` (configuration `cfg`, generation slot `slot`) when the
/// service falls back: the companion's id and its slot of the same generation.
#[inline(always)]
pub fn fallback(id: u32, cfg: &ServiceConfig, slot: u32) -> Option<(u32, u32)> {
    // No companion: no map read at all (most services).
    let f = cfg.fallback_id()?;
    if mode(id) != MODE_FALLBACK {
        return None;
    }
    Some((f, generation_slot(f, slot & 1)))
}

/// The rate limit in force for a packet of service `id`: the service's own (its id's
/// buckets), or while it falls back the companion's (the companion id's buckets) when the
/// companion has one (`fallback.rate_limit`; without it the service's own stays). Returns
/// the id of the buckets and the configuration.
#[inline(always)]
pub fn limit_config(id: u32, cfg: &ServiceConfig, slot: u32) -> (u32, &ServiceConfig) {
    if let Some((f, fslot)) = fallback(id, cfg, slot)
        && let Some(c) = SVC_CFG.get(fslot)
        && c.flags & (SVC_F_ACTIVE | SVC_F_RATE_LIMIT) == SVC_F_ACTIVE | SVC_F_RATE_LIMIT
    {
        return (f, c);
    }
    (id, cfg)
}

/// A packet that opens a flow, for a service without connection tracking
/// (`agent_common::degrade::opens_flow`).
#[inline(always)]
pub fn new_flow(p: &Parsed) -> bool {
    opens_flow(p.proto, p.tcp_flags)
}
