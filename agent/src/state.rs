//! State shared by the reconcile loop and the HTTP endpoints.

use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    atomic::{AtomicBool, Ordering},
};

use crate::{
    datapath::{
        BACKEND_ACTIONS, Datapath, DatapathError, KeyCounts,
        pressure::{self, ArrayUse, Reading},
    },
    degrade::{DegradeView, TransitionCount},
    lb::balancer::LbView,
    supervisor::BackendsRx,
    telemetry::{
        reload::{Outcome, ReloadLog, Trigger},
        status::{self, ServiceInfo, StatusReport},
    },
};

pub struct AgentState {
    /// Readers (counters, key walks) share it; policy writes and attachment take it alone.
    datapath: RwLock<Datapath>,
    services: Mutex<Vec<ServiceInfo>>,
    keys: Mutex<KeyCounts>,
    ready: AtomicBool,
    policy_file: String,
    /// The supervisor's channel, when it runs.
    backends: Mutex<Option<BackendsRx>>,
    balancing: Mutex<Option<Arc<LbView>>>,
    /// What the policy uses of the arrays indexed by service or backend, and the latest
    /// reading of the maps' pressure and memory.
    arrays: Mutex<Vec<ArrayUse>>,
    maps: Mutex<Reading>,
    /// The reloads since start and the policy generation.
    reloads: Mutex<ReloadLog>,
    /// The degradation evaluator's view, when it runs.
    degrade: Mutex<Option<Arc<DegradeView>>>,
}

/// A poisoned lock only means another thread panicked while holding it; the data is counters
/// and descriptions, still fine to read.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AgentState {
    pub fn new(datapath: Datapath, services: Vec<ServiceInfo>, policy_file: String) -> Self {
        Self {
            datapath: RwLock::new(datapath),
            services: Mutex::new(services),
            keys: Mutex::new(KeyCounts::default()),
            ready: AtomicBool::new(false),
            policy_file,
            backends: Mutex::new(None),
            balancing: Mutex::new(None),
            arrays: Mutex::new(Vec::new()),
            maps: Mutex::new(Reading::default()),
            reloads: Mutex::new(ReloadLog::new(std::time::SystemTime::now())),
            degrade: Mutex::new(None),
        }
    }

    pub fn datapath(&self) -> RwLockReadGuard<'_, Datapath> {
        self.datapath.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn datapath_mut(&self) -> RwLockWriteGuard<'_, Datapath> {
        self.datapath
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_services(&self, services: Vec<ServiceInfo>) {
        *lock(&self.services) = services;
    }

    /// A receiver of the supervisor's channel, for another reader (the balancer).
    pub fn backends(&self) -> Option<BackendsRx> {
        lock(&self.backends).clone()
    }

    pub fn set_backends(&self, backends: Option<BackendsRx>) {
        *lock(&self.backends) = backends;
    }

    pub fn set_degrade(&self, view: Option<Arc<DegradeView>>) {
        *lock(&self.degrade) = view;
    }

    /// Mode transitions of degradable services since start (for `/metrics`).
    pub fn degrade_transitions(&self) -> Vec<TransitionCount> {
        lock(&self.degrade)
            .as_ref()
            .map(|v| v.transitions())
            .unwrap_or_default()
    }

    pub fn set_balancing(&self, view: Option<Arc<LbView>>) {
        *lock(&self.balancing) = view;
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Walks the key table (slow for big tables: call it off the async threads) and says how
    /// long the walk took.
    pub fn refresh_key_counts(&self) -> Result<std::time::Duration, DatapathError> {
        let ids: Vec<u32> = lock(&self.services).iter().map(|s| s.id).collect();
        let start = std::time::Instant::now();
        let counts = self.datapath().count_keys(&ids)?;
        *lock(&self.keys) = counts;
        Ok(start.elapsed())
    }

    /// The policy's use of the arrays, for the pressure readings (set again on reload).
    pub fn set_array_use(&self, arrays: Vec<ArrayUse>) {
        *lock(&self.arrays) = arrays;
    }

    /// Reads the maps' pressure and memory (walks tables: call it off the async threads),
    /// keeps the reading for reports, and returns it.
    pub fn refresh_map_pressure(&self) -> Reading {
        let arrays = lock(&self.arrays).clone();
        let reading = pressure::read(&self.datapath(), &arrays);
        *lock(&self.maps) = reading.clone();
        reading
    }

    /// Counts one reload, which took `took`; `at` is when it put its policy in force (an
    /// applied one: the switch) or ended; `error` is what it logged when it did not apply.
    /// Call it once the reload's work is done: an applied one moves the generation.
    pub fn record_reload(
        &self,
        trigger: Trigger,
        outcome: Outcome,
        error: Option<String>,
        at: std::time::SystemTime,
        took: std::time::Duration,
    ) {
        lock(&self.reloads).record(trigger, outcome, error, at, took);
    }

    pub fn report(&self) -> Result<StatusReport, DatapathError> {
        let services = lock(&self.services).clone();
        let now = std::time::Instant::now();
        let mut backends: Vec<_> = lock(&self.backends)
            .as_ref()
            .map(|rx| rx.borrow().iter().map(|b| b.status(now)).collect())
            .unwrap_or_default();
        let (snapshot, attachments) = {
            let dp = self.datapath();
            for b in &mut backends {
                if let Some(id) = b.id {
                    let counters = dp.backend_counters(id)?;
                    b.datapath = BACKEND_ACTIONS
                        .iter()
                        .map(|(slot, action)| {
                            let packets = counters.get(*slot as usize).map_or(0, |c| c.packets);
                            ((*action).to_string(), packets)
                        })
                        .collect();
                }
            }
            let ids: Vec<u32> = services.iter().map(|s| s.id).collect();
            (dp.snapshot(&ids)?, dp.attachments())
        };
        let keys = lock(&self.keys).clone();
        let (balancing, lb_backends) = lock(&self.balancing)
            .as_ref()
            .map(|v| v.snapshot())
            .unwrap_or_default();
        let mut report = status::build(
            self.is_ready(),
            &self.policy_file,
            attachments,
            &services,
            &snapshot,
            &keys,
            backends,
        );
        report.balancing = balancing;
        report.lb_backends = lb_backends;
        {
            let dp = self.datapath();
            report.repairs = dp.repairs();
            report.adopted = dp.adopted();
            report.pin_path = dp.pin_dir().map(|p| p.root().display().to_string());
        }
        status::add_maps(&mut report, &lock(&self.maps));
        report.reload = lock(&self.reloads).status();
        let degrade = lock(&self.degrade).clone();
        if let Some(view) = degrade {
            view.fill(&mut report, now);
        }
        Ok(report)
    }
}
