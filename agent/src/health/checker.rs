//! The set of running checks: add and remove backends as policies change.

use std::collections::HashSet;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::probe::{Probe, ProbeOptions};
use super::schedule::{Added, Command, drive};
use super::{BackendRef, Health, HealthError, ProbeResult};
use crate::config::HealthCheck;

/// Probes every backend added, from one task, and sends every result on one channel.
///
/// Dropping the checker stops the task. The channel is bounded on purpose: a caller that
/// falls behind slows the probes down (they wait to send) instead of growing a queue.
#[derive(Debug)]
pub struct Checker {
    results: mpsc::Sender<ProbeResult>,
    options: ProbeOptions,
    initial: Health,
    backends: HashSet<BackendRef>,
    /// Started with the first backend (a checker can be built outside a runtime).
    driver: Option<Driver>,
}

#[derive(Debug)]
struct Driver {
    commands: mpsc::UnboundedSender<Command>,
    task: AbortHandle,
}

impl Checker {
    /// Backends start [`Health::Healthy`] (fail open): traffic is not cut before the first
    /// `unhealthy_threshold` failed probes.
    pub fn new(results: mpsc::Sender<ProbeResult>, options: ProbeOptions) -> Checker {
        Checker {
            results,
            options,
            initial: Health::Healthy,
            backends: HashSet::new(),
            driver: None,
        }
    }

    /// The health new backends start with (e.g. `Unhealthy` to require `healthy_threshold`
    /// successes before traffic).
    pub fn with_initial_health(mut self, initial: Health) -> Checker {
        self.initial = initial;
        self
    }

    /// Starts checking `backend` from the checker's initial health; its first probe falls
    /// somewhere in its first interval. Must be called inside a tokio runtime.
    pub fn add(&mut self, backend: BackendRef, check: &HealthCheck) -> Result<(), HealthError> {
        self.add_from(backend, check, self.initial)
    }

    /// As [`add`](Checker::add), from `health` (a backend's health carried over from an
    /// earlier checker): rise/fall counts from there, so an unhealthy backend needs
    /// `healthy_threshold` successes before it is healthy again, and no probe result says
    /// `changed` before then.
    pub fn add_from(
        &mut self,
        backend: BackendRef,
        check: &HealthCheck,
        health: Health,
    ) -> Result<(), HealthError> {
        if self.backends.contains(&backend) {
            return Err(HealthError::Duplicate(backend));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| HealthError::NoRuntime)?;
        let probe = Probe::new(check, backend.address, self.options)?;
        let driver = self.driver.get_or_insert_with(|| {
            let (commands, rx) = mpsc::unbounded_channel();
            let task = runtime.spawn(drive(rx, self.results.clone()));
            Driver {
                commands,
                task: task.abort_handle(),
            }
        });
        // The driver ends only when nobody takes results any more: then nothing is lost.
        let _ = driver.commands.send(Command::Add(Box::new(Added {
            backend: backend.clone(),
            probe,
            check: check.clone(),
            initial: health,
        })));
        self.backends.insert(backend);
        Ok(())
    }

    /// Stops checking `backend`; `false` if it was not checked. A probe in flight is
    /// abandoned and its result never sent.
    pub fn remove(&mut self, backend: &BackendRef) -> bool {
        if !self.backends.remove(backend) {
            return false;
        }
        if let Some(d) = &self.driver {
            let _ = d.commands.send(Command::Remove(backend.clone()));
        }
        true
    }

    pub fn contains(&self, backend: &BackendRef) -> bool {
        self.backends.contains(backend)
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        if let Some(d) = &self.driver {
            d.task.abort();
        }
    }
}
