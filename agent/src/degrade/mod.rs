//! The degradation evaluator (POLICY.md `degradation`, `agent_common::degrade`): every
//! [`DEGRADE_TICK`] it measures each degradable service's conditions over their windows,
//! decides whether the service is degraded (with hysteresis), the node-wide shed level, and
//! each service's mode, and writes the modes that changed into `DEGRADE`, which the datapath
//! reads for new flows.
//!
//! ```text
//! supervisor: probe results ---------> samples channel --\
//! supervisor: Backends watch (health, breakers, passive) -+-> Engine::tick -> DEGRADE[id]
//! ```
//!
//! - Inputs per degradable service (a service of the file with `degradation`; companions
//!   are not), its own backends only: probe samples (latency, success) sent by the
//!   supervisor, passive counts (cumulative in [`Backends`], windowed by differences), and
//!   the share of backends available (healthy or unchecked, breaker not open), each tick.
//! - Measures ([`window`], [`condition`]): latency p99 (nearest rank) of probes, error rate
//!   over probes and passive attempts, availability as the mean of the per-tick shares.
//! - Hysteresis ([`hysteresis`]): degraded as soon as a condition is met; back to normal only
//!   once every condition has been unmet for `recover_after` without a break.
//! - Node-wide shedding ([`shed`]): while a `shed` service is degraded, one more priority
//!   level is shed every `agent.shed_step`, `low` first; back one level per step after.
//! - Writes go through [`ModeSink`] (the kernel's map, or a recorder in tests), on change
//!   only, and for every service at start and reload; a failed write is retried next tick.
//!
//! The pure part ([`Engine`]) takes the time as an argument; [`task`] runs it on a timer.

pub mod condition;
mod engine;
pub mod hysteresis;
pub mod shed;
pub mod task;
#[cfg(test)]
mod tests;
mod view;
pub mod window;

use std::{sync::Arc, time::Duration};

use crate::{
    config::{
        Compiled,
        model::{Degradation, FallbackStrategy, Policy, Priority},
    },
    datapath::{DatapathError, DegradeMaps},
};

// The samples channel is the supervisor's (the sending side): no import cycle.
pub use crate::supervisor::{ProbeSample, SAMPLE_BATCHES, SampleRx, SampleTx, sample_channel};
pub use engine::{Engine, Note};
pub use shed::Level;
pub use task::{Evaluator, start};
pub use view::{DegradeView, TransitionCount};

#[cfg(doc)]
use crate::supervisor::Backends;

/// How often conditions are measured and modes decided.
pub const DEGRADE_TICK: Duration = Duration::from_millis(100);

/// Where modes go: the kernel's `DEGRADE` map, or a recorder in tests.
pub trait ModeSink: Send {
    fn write(&mut self, id: u32, mode: u32) -> Result<(), DatapathError>;
    /// What the map holds for `id` (what an earlier agent left, on adoption).
    fn read(&self, id: u32) -> Result<u32, DatapathError>;
}

impl ModeSink for DegradeMaps {
    fn write(&mut self, id: u32, mode: u32) -> Result<(), DatapathError> {
        self.write_mode(id, mode)
    }

    fn read(&self, id: u32) -> Result<u32, DatapathError> {
        self.read_mode(id)
    }
}

/// One degradable service as the evaluator needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: Arc<str>,
    /// Its id in the datapath (`DEGRADE` index).
    pub id: u32,
    pub priority: Priority,
    pub degradation: Degradation,
}

impl ServiceSpec {
    pub fn strategy(&self) -> FallbackStrategy {
        self.degradation.fallback.strategy
    }

    /// Whether it belongs to the shed group (its strategy is `shed`).
    pub fn sheds(&self) -> bool {
        self.strategy() == FallbackStrategy::Shed
    }

    /// The longest window of its conditions: how long samples are kept.
    pub fn span(&self) -> Duration {
        (self.degradation.conditions.iter())
            .map(|c| c.window)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

/// What the evaluator serves: a policy's degradable services, and node-wide settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub services: Vec<ServiceSpec>,
    /// `agent.shed_step`.
    pub shed_step: Duration,
    /// Companion services by name, and the service whose fallback each balances (status).
    pub companions: Vec<(String, String)>,
}

impl Config {
    /// The degradable services of `policy` (those of the file with `degradation`), with
    /// their ids from `compiled` (after `Plan::with_ids`; index = index in
    /// `policy.services`).
    pub fn new(policy: &Policy, compiled: &Compiled) -> Config {
        let mut services = Vec::new();
        let mut companions = Vec::new();
        for (i, s) in policy.services.iter().enumerate() {
            if let Some(parent) = s.fallback_of {
                if let Some(p) = policy.services.get(parent) {
                    companions.push((s.name.clone(), p.name.clone()));
                }
                continue;
            }
            // In policy order; by name should a compiled policy ever be in another.
            let compiled = (compiled.services.get(i))
                .filter(|c| c.name == s.name)
                .or_else(|| compiled.services.iter().find(|c| c.name == s.name));
            let (Some(d), Some(c)) = (&s.degradation, compiled) else {
                continue;
            };
            services.push(ServiceSpec {
                name: Arc::from(s.name.as_str()),
                id: c.id,
                priority: s.priority,
                degradation: d.clone(),
            });
        }
        Config {
            services,
            shed_step: policy.agent.shed_step,
            companions,
        }
    }
}
