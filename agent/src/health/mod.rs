//! Active health checks (POLICY.md `health_check`), every backend's from one tokio task.
//!
//! ```text
//! Checker::add(backend, health_check) --command--> task: heap of due times -> probes in
//!     flight (attempts with backoff, inside the interval) -> rise/fall -> ProbeResult
//!     --mpsc--> caller
//! ```
//!
//! Every probe's result goes to the caller, which feeds the breakers and the metrics; this
//! module decides nothing beyond the backend's health (rise/fall). Probes are `tcp` (connect)
//! or `http` (GET through hyper's client, status in `expected_status`), on sockets that may
//! carry an SO_MARK ([`ProbeOptions`]) so that the datapath lets them through an open breaker.

mod checker;
mod probe;
mod schedule;

#[cfg(test)]
mod servers;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_scale;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

pub use checker::Checker;
pub use probe::{Probe, ProbeFailure, ProbeOptions, connect};
pub use schedule::{
    BATCH, MIN_ATTEMPT, ProbeRun, RiseFall, backoff, jittered_backoff, on_grid, run_probe,
    start_delay,
};

/// A backend as the caller knows it: its service (by name, and by its index in the policy's
/// `services`, which the supervisor looks its rows up by: no string hash per probe), its
/// index in the service's `backends` (the index an
/// [`EjectionGuard`](crate::breaker::EjectionGuard) uses) and its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendRef {
    pub service: Arc<str>,
    pub service_id: usize,
    pub index: usize,
    pub address: SocketAddr,
}

impl fmt::Display for BackendRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}] {}", self.service, self.index, self.address)
    }
}

/// A backend's health after rise/fall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Health {
    /// The default start: fail open, a backend serves until probes say otherwise.
    #[default]
    Healthy,
    Unhealthy,
}

impl Health {
    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One probe of one backend, all its attempts included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub backend: BackendRef,
    /// When the probe ended: the time to pass to the backend's breaker.
    pub at: Instant,
    /// The last attempt's outcome.
    pub outcome: Result<(), ProbeFailure>,
    /// Attempts made, at least 1.
    pub attempts: u32,
    /// The last attempt's duration (the probe latency for metrics).
    pub latency: Duration,
    /// The whole probe, backoffs included.
    pub elapsed: Duration,
    /// The backend's health after this probe.
    pub health: Health,
    /// Whether this probe flipped the health.
    pub changed: bool,
}

impl ProbeResult {
    pub fn is_success(&self) -> bool {
        self.outcome.is_ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HealthError {
    #[error("{0} is already checked")]
    Duplicate(BackendRef),
    #[error("health_check.path {0:?} is not an HTTP path")]
    InvalidPath(String),
    #[error("health_check.host {0:?} is not a valid Host header")]
    InvalidHost(String),
    #[error("health checks need a tokio runtime")]
    NoRuntime,
}
