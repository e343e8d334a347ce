//! Backends in the running agent: active health checks feed each backend's circuit breaker;
//! the result is kept for `/status` and `/metrics`.
//!
//! Not yet here (issue 3): writing breaker state to a BPF map for the datapath to enforce,
//! passive failure counts from the datapath, and rebuilding on reload (a reload that changes
//! backends, health checks or breakers is refused; see `Plan::needs_restart_from`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::{
    breaker::{EjectionGuard, Event, Outcome, State},
    config::model::Policy,
    health::{BackendRef, Checker, Health, HealthError, ProbeOptions, ProbeResult},
};

/// Upper bounds (seconds) of the probe-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// One backend as status and metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub service: String,
    pub address: String,
    /// `healthy` / `unhealthy`; `unchecked` without `health_check`.
    pub health: String,
    /// `closed` / `open` / `half_open`; `None` without `circuit_breaker`.
    pub breaker: Option<String>,
    /// Time in the current breaker state (or health, without a breaker), in ms.
    pub in_state_ms: u64,
    pub probes_ok: u64,
    pub probes_failed: u64,
    /// Failed probes by reason (`refused`, `timeout`, `status`, ...).
    pub failures: BTreeMap<String, u64>,
    pub last_failure: Option<String>,
    /// Breaker transitions by `to/reason`.
    pub transitions: BTreeMap<String, u64>,
    /// Probe latency: counts per `LATENCY_BUCKETS` bucket (not cumulative; slower probes are
    /// the rest of `probes_ok + probes_failed`), and the sum in seconds.
    pub latency_buckets: Vec<u64>,
    pub latency_sum: f64,
}

struct Entry {
    status: BackendStatus,
    since: Instant,
}

/// The table the supervisor writes and the HTTP side reads.
#[derive(Default)]
pub struct BackendTable {
    entries: Mutex<Vec<Entry>>,
}

impl BackendTable {
    fn with<T>(&self, f: impl FnOnce(&mut Vec<Entry>) -> T) -> T {
        f(&mut self.entries.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Every backend, with `in_state_ms` as of now.
    pub fn snapshot(&self) -> Vec<BackendStatus> {
        let now = Instant::now();
        self.with(|v| {
            v.iter()
                .map(|e| {
                    let mut s = e.status.clone();
                    s.in_state_ms = now.saturating_duration_since(e.since).as_millis() as u64;
                    s
                })
                .collect()
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendsError {
    #[error("health check of {backend}: {source}")]
    Health {
        backend: String,
        #[source]
        source: HealthError,
    },
}

/// The table status reads, and the task that keeps it.
pub type Started = (Arc<BackendTable>, tokio::task::JoinHandle<()>);

/// Position of each backend in the table, and each service's breakers.
struct Supervisor {
    table: Arc<BackendTable>,
    rows: HashMap<(Arc<str>, usize), usize>,
    guards: HashMap<Arc<str>, EjectionGuard>,
}

/// Starts health checks and breakers for every service with backends. Returns the table and
/// the task, or `None` when no service has backends. Stops when `stop` turns true.
pub fn start(
    policy: &Policy,
    stop: watch::Receiver<bool>,
) -> Result<Option<Started>, BackendsError> {
    let now = Instant::now();
    let table = Arc::new(BackendTable::default());
    let (tx, rx) = mpsc::channel(1024);
    let mut checker = Checker::new(tx, ProbeOptions::default());
    let mut sup = Supervisor {
        table: table.clone(),
        rows: HashMap::new(),
        guards: HashMap::new(),
    };
    for svc in policy.services.iter().filter(|s| !s.backends.is_empty()) {
        let name: Arc<str> = Arc::from(svc.name.as_str());
        if let Some(cb) = &svc.circuit_breaker {
            sup.guards.insert(
                name.clone(),
                EjectionGuard::new(cb, svc.backends.len(), now),
            );
        }
        for (index, b) in svc.backends.iter().enumerate() {
            let backend = BackendRef {
                service: name.clone(),
                index,
                address: b.address,
            };
            sup.table.with(|v| {
                sup.rows.insert((name.clone(), index), v.len());
                v.push(Entry {
                    status: BackendStatus {
                        service: svc.name.clone(),
                        address: b.address.to_string(),
                        health: if svc.health_check.is_some() {
                            Health::Healthy.to_string()
                        } else {
                            "unchecked".into()
                        },
                        breaker: svc
                            .circuit_breaker
                            .as_ref()
                            .map(|_| State::Closed.to_string()),
                        latency_buckets: vec![0; LATENCY_BUCKETS.len()],
                        ..BackendStatus::default()
                    },
                    since: now,
                })
            });
            if let Some(hc) = &svc.health_check {
                checker
                    .add(backend.clone(), hc)
                    .map_err(|source| BackendsError::Health {
                        backend: backend.to_string(),
                        source,
                    })?;
            }
        }
    }
    if sup.rows.is_empty() {
        return Ok(None);
    }
    let task = tokio::spawn(sup.run(checker, rx, stop));
    Ok(Some((table, task)))
}

impl Supervisor {
    async fn run(
        mut self,
        checker: Checker,
        mut results: mpsc::Receiver<ProbeResult>,
        mut stop: watch::Receiver<bool>,
    ) {
        // The checker's tasks live as long as it does.
        let _checker = checker;
        loop {
            let deadline = self.guards.values().filter_map(|g| g.next_deadline()).min();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = results.recv() => match r {
                    Some(r) => self.on_probe(r),
                    None => return,
                },
                _ = timer => self.on_timers(Instant::now()),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    fn on_probe(&mut self, r: ProbeResult) {
        let key = (r.backend.service.clone(), r.backend.index);
        let Some(&row) = self.rows.get(&key) else {
            return;
        };
        if r.changed {
            tracing::info!("backend {} is now {}", r.backend, r.health);
        }
        let has_breaker = self.guards.contains_key(&r.backend.service);
        self.table.with(|v| {
            let e = &mut v[row];
            let s = &mut e.status;
            match &r.outcome {
                Ok(()) => s.probes_ok += 1,
                Err(f) => {
                    s.probes_failed += 1;
                    *s.failures.entry(f.label().to_string()).or_default() += 1;
                    s.last_failure = Some(f.to_string());
                }
            }
            let secs = r.latency.as_secs_f64();
            s.latency_sum += secs;
            if let Some(i) = LATENCY_BUCKETS.iter().position(|le| secs <= *le) {
                s.latency_buckets[i] += 1;
            }
            if r.changed {
                s.health = r.health.to_string();
                if !has_breaker {
                    e.since = r.at;
                }
            }
        });
        if let Some(guard) = self.guards.get_mut(&r.backend.service) {
            let outcome = if r.outcome.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            };
            match guard.record(r.backend.index, r.at, outcome) {
                Ok(events) => self.apply(&r.backend.service, events),
                Err(e) => tracing::warn!("breaker of {}: {e}", r.backend),
            }
        }
    }

    fn on_timers(&mut self, now: Instant) {
        let fired: Vec<(Arc<str>, Vec<Event>)> = self
            .guards
            .iter_mut()
            .map(|(name, g)| (name.clone(), g.poll(now)))
            .collect();
        for (name, events) in fired {
            self.apply(&name, events);
        }
    }

    /// Logs, counts and records breaker transitions.
    fn apply(&mut self, service: &Arc<str>, events: Vec<Event>) {
        for ev in events {
            let t = ev.transition;
            let Some(&row) = self.rows.get(&(service.clone(), ev.backend)) else {
                continue;
            };
            self.table.with(|v| {
                let e = &mut v[row];
                tracing::info!(
                    "breaker {}[{}] {}: {} -> {} ({})",
                    service,
                    ev.backend,
                    e.status.address,
                    t.from,
                    t.to,
                    t.reason.as_str()
                );
                *e.status
                    .transitions
                    .entry(format!("{}/{}", t.to, t.reason.as_str()))
                    .or_default() += 1;
                if t.from != t.to {
                    e.status.breaker = Some(t.to.to_string());
                    e.since = t.at;
                }
            });
        }
    }
}
