//! The set of running checks: add and remove backends as policies change.

use std::collections::HashMap;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::probe::{Probe, ProbeOptions};
use super::schedule::run_backend;
use super::{BackendRef, Health, HealthError, ProbeResult};
use crate::config::HealthCheck;

/// Runs one probe task per backend and sends every result on one channel.
///
/// Dropping the checker stops every task. The channel is bounded on purpose: a caller that
/// falls behind slows the probes down (they wait to send) instead of growing a queue.
#[derive(Debug)]
pub struct Checker {
    results: mpsc::Sender<ProbeResult>,
    options: ProbeOptions,
    initial: Health,
    tasks: HashMap<BackendRef, AbortHandle>,
}

impl Checker {
    /// Backends start [`Health::Healthy`] (fail open): traffic is not cut before the first
    /// `unhealthy_threshold` failed probes.
    pub fn new(results: mpsc::Sender<ProbeResult>, options: ProbeOptions) -> Checker {
        Checker {
            results,
            options,
            initial: Health::Healthy,
            tasks: HashMap::new(),
        }
    }

    /// The health new backends start with (e.g. `Unhealthy` to require `healthy_threshold`
    /// successes before traffic).
    pub fn with_initial_health(mut self, initial: Health) -> Checker {
        self.initial = initial;
        self
    }

    /// Starts checking `backend`; its first probe falls somewhere in its first interval.
    /// Must be called inside a tokio runtime.
    pub fn add(&mut self, backend: BackendRef, check: &HealthCheck) -> Result<(), HealthError> {
        if self.tasks.contains_key(&backend) {
            return Err(HealthError::Duplicate(backend));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| HealthError::NoRuntime)?;
        let probe = Probe::new(check, backend.address, self.options)?;
        let task = runtime.spawn(run_backend(
            backend.clone(),
            probe,
            check.clone(),
            self.initial,
            self.results.clone(),
        ));
        self.tasks.insert(backend, task.abort_handle());
        Ok(())
    }

    /// Stops checking `backend`; `false` if it was not checked. A probe in flight is
    /// abandoned and its result never sent.
    pub fn remove(&mut self, backend: &BackendRef) -> bool {
        self.tasks.remove(backend).map(|t| t.abort()).is_some()
    }

    pub fn contains(&self, backend: &BackendRef) -> bool {
        self.tasks.contains_key(backend)
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}
