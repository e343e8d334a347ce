//! What the supervisor publishes of each backend, over a `tokio::sync::watch` channel: typed
//! state ([`Health`], breaker [`State`]) keyed by [`BackendId`], which the balancer decides
//! on, and the counters that status and metrics show. Display strings exist only in
//! [`Backend::status`], the conversion to the JSON of `/status`.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Instant};

use agent_common::status::{BackendStatus, LATENCY_BUCKETS, PassiveCounts};
use tokio::sync::watch;

use crate::{
    breaker::{Reason, State},
    config::HealthCheck,
    health::{Health, ProbeFailure},
};

/// `BackendStatus::health` of a backend without `health_check`.
pub const UNCHECKED: &str = "unchecked";

/// A backend by its place in the policy: its service's index in `services` (the service id
/// of `CompiledLb::service` and `CompiledBackend::service`) and its own index in that
/// service's `backends` (the order of `CompiledLb::backends` and of the service's
/// `EjectionGuard`). Tasks name a backend by this, never by its formatted address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId {
    pub service: usize,
    pub index: usize,
}

/// Every backend of every service with backends, in policy order.
pub type Backends = Vec<Backend>;

/// The receiving end of the supervisor's channel.
pub type BackendsRx = watch::Receiver<Backends>;

/// One backend as the supervisor last saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub id: BackendId,
    pub service: Arc<str>,
    pub address: SocketAddr,
    /// After rise/fall; `None` without `health_check` (never probed: takes flows).
    pub health: Option<Health>,
    /// `None` without `circuit_breaker` (takes flows).
    pub breaker: Option<State>,
    /// Entry into the current breaker state (or health, without a breaker).
    pub since: Instant,
    /// Its id in the datapath (`BACKEND_STATS`) when its breaker is enforced there.
    pub datapath_id: Option<u32>,
    pub probes_ok: u64,
    pub probes_failed: u64,
    /// Failed probes by `ProbeFailure::label`.
    pub failures: BTreeMap<&'static str, u64>,
    pub last_failure: Option<ProbeFailure>,
    /// Breaker transitions by target state and reason.
    pub transitions: BTreeMap<(State, Reason), u64>,
    /// Probe latency: counts per `LATENCY_BUCKETS` bucket, and the sum in seconds.
    pub latency_buckets: [u64; LATENCY_BUCKETS.len()],
    pub latency_sum: f64,
    /// `None` without `health_check.passive`.
    pub passive: Option<PassiveCounts>,
    pub map_write_errors: u64,
    /// Its service's `health_check` (`None` without, and as [`Backend::new`] makes it): what
    /// its health and probe counters mean, so that a reload carries them over only to the
    /// same check ([`Backend::continues`]).
    pub health_check: Option<Arc<HealthCheck>>,
}

impl Backend {
    /// A backend as it starts: healthy when checked, its breaker closed when it has one.
    pub fn new(
        id: BackendId,
        service: Arc<str>,
        address: SocketAddr,
        checked: bool,
        breaker: bool,
        now: Instant,
    ) -> Backend {
        Backend {
            id,
            service,
            address,
            health: checked.then_some(Health::Healthy),
            breaker: breaker.then_some(State::Closed),
            since: now,
            datapath_id: None,
            probes_ok: 0,
            probes_failed: 0,
            failures: BTreeMap::new(),
            last_failure: None,
            transitions: BTreeMap::new(),
            latency_buckets: [0; LATENCY_BUCKETS.len()],
            latency_sum: 0.0,
            passive: None,
            map_write_errors: 0,
            health_check: None,
        }
    }

    /// Whether `old`, published by the supervisor before a reload, is this backend: the same
    /// service (by name) and address, probed under the same `health_check`. Positions are
    /// not compared: a reload that adds or removes a service or a backend before it moves it.
    pub fn continues(&self, old: &Backend) -> bool {
        self.address == old.address
            && self.service == old.service
            && self.health_check == old.health_check
    }

    /// Takes over what `old` (of which this backend [`continues`](Backend::continues)) has
    /// seen: health after rise/fall, probe counters, failures, latency, passive counts (when
    /// this one has passive detection), breaker transitions and failed map writes. `since`
    /// too, when it dates the same state: the same breaker state, or without breakers the
    /// same (carried) health. Its place, datapath id and breaker stay this policy's: the
    /// breaker resumes from the datapath, as on adoption.
    pub fn carry(&mut self, old: &Backend) {
        self.health = old.health;
        self.probes_ok = old.probes_ok;
        self.probes_failed = old.probes_failed;
        self.failures = old.failures.clone();
        self.last_failure = old.last_failure.clone();
        self.transitions = old.transitions.clone();
        self.latency_buckets = old.latency_buckets;
        self.latency_sum = old.latency_sum;
        if self.passive.is_some() {
            self.passive = Some(old.passive.unwrap_or_default());
        }
        self.map_write_errors = old.map_write_errors;
        if self.breaker == old.breaker {
            self.since = old.since;
        }
    }

    /// As `/status` shows it, with `in_state_ms` as of `now`; `datapath` is the caller's to
    /// fill in from the maps.
    pub fn status(&self, now: Instant) -> BackendStatus {
        BackendStatus {
            service: self.service.to_string(),
            address: self.address.to_string(),
            health: self.health.map_or(UNCHECKED, Health::as_str).to_string(),
            breaker: self.breaker.map(|s| s.as_str().to_string()),
            in_state_ms: now.saturating_duration_since(self.since).as_millis() as u64,
            probes_ok: self.probes_ok,
            probes_failed: self.probes_failed,
            failures: self
                .failures
                .iter()
                .map(|(k, n)| ((*k).to_string(), *n))
                .collect(),
            last_failure: self.last_failure.as_ref().map(ToString::to_string),
            transitions: self
                .transitions
                .iter()
                .map(|((to, reason), n)| (format!("{to}/{reason}"), *n))
                .collect(),
            latency_buckets: self.latency_buckets.to_vec(),
            latency_sum: self.latency_sum,
            id: self.datapath_id,
            datapath: BTreeMap::new(),
            passive: self.passive,
            map_write_errors: self.map_write_errors,
        }
    }
}
