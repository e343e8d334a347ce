//! Degradation (POLICY.md `degradation`): the agent measures each service's conditions and
//! writes the service's mode into `DEGRADE` (one `u32` per service id, one write per
//! change); the datapath reads it for new flows only. Established flows stay where they are.
//!
//! - [`MODE_FALLBACK`] (`static_response`, `cache_only`): new flows of a balanced service
//!   go to its fallback backends, balanced as the *companion* service whose id (+ 1) the
//!   service's `ServiceConfig::fallback` names; the companion's rate limit (the
//!   `fallback.rate_limit`, else the service's own) is in force for every packet.
//! - [`MODE_SHED`] (`shed`): new flows of the service are refused (TCP RST, ICMP
//!   unreachable), as an open breaker's are.
//!
//! Fail open: a mode the datapath does not know, or [`MODE_FALLBACK`] on a service without a
//! companion in the live generation, is [`MODE_NORMAL`].

/// Not degraded: the service's own backends and rate limit.
pub const MODE_NORMAL: u32 = 0;
/// Degraded to the fallback backends (and the fallback's rate limit).
pub const MODE_FALLBACK: u32 = 1;
/// Shed: new flows refused.
pub const MODE_SHED: u32 = 2;

/// The mode's name, as logs, metrics and status show it.
pub const fn mode_name(mode: u32) -> &'static str {
    match mode {
        MODE_FALLBACK => "fallback",
        MODE_SHED => "shed",
        _ => "normal",
    }
}
