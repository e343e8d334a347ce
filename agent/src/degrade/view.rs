//! What status and metrics read of the evaluator: the engine itself, shared with its task
//! (a report locks it for as long as it takes to copy what it shows), and a handle on the
//! flow counters the datapath keeps per service.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use agent_common::status::StatusReport;

use super::Engine;
use crate::datapath::DegradeMaps;

/// Mode transitions of one service from one mode to another
/// (`agent_degradation_transitions_total`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionCount {
    pub service: String,
    pub from: &'static str,
    pub to: &'static str,
    pub count: u64,
}

/// The evaluator as status sees it.
#[derive(Debug)]
pub struct DegradeView {
    engine: Arc<Mutex<Engine>>,
    /// `None` in tests: the flow counters show 0.
    counters: Mutex<Option<DegradeMaps>>,
}

/// A poisoned lock only means a panic elsewhere; the state is still fine to read.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DegradeView {
    pub fn new(engine: Arc<Mutex<Engine>>, counters: Option<DegradeMaps>) -> DegradeView {
        DegradeView {
            engine,
            counters: Mutex::new(counters),
        }
    }

    /// Fills in `ServiceStatus::degradation` of every degradable service (with its flow
    /// counters), `ServiceStatus::fallback_of` of every companion, and `shedding`.
    pub fn fill(&self, report: &mut StatusReport, now: Instant) {
        let (services, shedding, companions) = {
            let engine = lock(&self.engine);
            let (services, shedding) = engine.status(now);
            (services, shedding, engine.companions().to_vec())
        };
        let mut by_name: HashMap<&str, _> = (services.iter())
            .map(|(_, name, status)| (&**name, status))
            .collect();
        let companions: HashMap<&str, &str> = (companions.iter())
            .map(|(c, parent)| (c.as_str(), parent.as_str()))
            .collect();
        let counters = lock(&self.counters);
        for s in &mut report.services {
            if let Some(status) = by_name.remove(s.name.as_str()) {
                let mut status = status.clone();
                if let Some(c) = counters.as_ref().and_then(|m| m.counters(s.id).ok()) {
                    status.fallback_flows = c.fallback;
                    status.shed_flows = c.shed;
                }
                s.degradation = Some(status);
            }
            if let Some(parent) = companions.get(s.name.as_str()) {
                s.fallback_of = Some((*parent).to_string());
            }
        }
        report.shedding = shedding;
    }

    /// Mode transitions since start, by service, from and to.
    pub fn transitions(&self) -> Vec<TransitionCount> {
        lock(&self.engine).transitions()
    }
}
