//! Load balancing on the agent's side (POLICY.md `backends`, `load_balancing`): the tables the
//! datapath reads, and the [`balancer`] task that rebuilds them as health, breakers and slow
//! start change weights. The maps it writes are `datapath::lb`; the compiled layout of each
//! balanced service (`CompiledLb`) is `config`'s.
//!
//! The table builders are pure and deterministic: time and health come in as arguments,
//! tables come out as plain vectors of backend indices for the caller to write to a map and
//! swap in.
//!
//! - [`weight::effective`]: configured weight x health/breaker (unless the service fails open
//!   past its panic threshold) x slow-start ramp; [`weight::SlowStart`] tracks the ramps and
//!   says when to rebuild.
//! - `maglev`: [`maglev::build`], a weighted Maglev table of `table_size` entries; the datapath
//!   indexes it with a flow hash, so a flow keeps its backend while the set stays the same.
//! - `weighted_round_robin`: [`wrr::build`], one cycle of smooth weighted round robin; the
//!   datapath indexes it with a per-service counter.
//! - `least_conn`: the datapath counts active connections; it needs only the effective weights.
//!
//! A backend whose effective weight is 0 (drained, unhealthy, breaker open) never gets a new
//! flow. When they all are 0 there is no backend: a Maglev table is all [`NO_BACKEND`], a WRR
//! schedule is empty, and the datapath passes or refuses the flow.

pub mod balancer;
mod hash;
pub mod maglev;
pub mod weight;
pub mod wrr;

pub use hash::backend_key;

/// A Maglev table entry that names no backend: every weight is 0.
pub const NO_BACKEND: u32 = u32::MAX;
