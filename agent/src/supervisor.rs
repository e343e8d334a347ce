//! The backend supervisor: health checks and passive observations feed each backend's
//! circuit breaker, and every breaker transition is written to the datapath, which enforces
//! it (`BACKENDS`: RST / ICMP unreachable or drop while open, a quota of trial flows while
//! half-open; see `agent_common::breaker`). The result is kept for `/status` and `/metrics`.
//!
//! ```text
//! probes (SO_MARK = PROBE_MARK, exempt) --\
//!                                          >-- supervisor: EjectionGuard per service
//! passive poller (SYN-ACK / RST / timeout)-/        |  transition
//!                                                   v
//!                          BACKENDS[addr, port, proto] = {state, quota, epoch, flags, id}
//! ```
//!
//! The initial entries (closed, every flow admitted) are written by `Datapath::apply` before
//! the programs are attached; the supervisor writes through its own handle on the maps
//! ([`BackendMaps`]), so a transition never waits on the datapath lock. A failed write is
//! logged, counted (`map_write_errors`) and retried; it never stops the supervisor.
//!
//! A reload that changes backends, health checks or breakers is refused (see
//! `Plan::needs_restart_from`): ids and breakers are built once, at start.

mod passive;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use agent_common::breaker::{
    BackendKey, BackendState, PROBE_MARK, STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN,
};
use tokio::sync::{mpsc, watch};

pub use agent_common::status::{BackendStatus, LATENCY_BUCKETS, PassiveCounts};
pub use passive::{PASSIVE_FEED_CAP, PASSIVE_TICK};

use passive::{BreakerFeed as _, PassiveBackend, PassiveBatch};

use crate::{
    breaker::{EjectionGuard, Event, Outcome, State},
    config::{CompiledBackend, model::Policy},
    datapath::{BackendMaps, Datapath, DatapathError},
    health::{BackendRef, Checker, Health, HealthError, ProbeOptions, ProbeResult},
};

// The agent's breaker codes are the datapath's: a mismatch would enforce the wrong state.
const _: () = assert!(
    State::Closed.code() == STATE_CLOSED
        && State::Open.code() == STATE_OPEN
        && State::HalfOpen.code() == STATE_HALF_OPEN
);

/// A failed map write is tried again after this long (the entry keeps its last state).
const WRITE_RETRY: Duration = Duration::from_secs(1);

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
pub enum SupervisorError {
    #[error("health check of {backend}: {source}")]
    Health {
        backend: String,
        #[source]
        source: HealthError,
    },
    #[error("opening the breaker maps: {0}")]
    Maps(#[source] DatapathError),
}

/// The table status reads, and the task that keeps it.
pub type Started = (Arc<BackendTable>, tokio::task::JoinHandle<()>);

/// Where breaker states go: the kernel's `BACKENDS` map, or a recorder in tests.
trait StateSink: Send {
    fn write(&mut self, key: &BackendKey, state: &BackendState) -> Result<(), DatapathError>;
}

impl StateSink for BackendMaps {
    fn write(&mut self, key: &BackendKey, state: &BackendState) -> Result<(), DatapathError> {
        self.write_backend(key, state)
    }
}

/// A backend whose breaker the datapath enforces: its map entries and half-open epoch.
struct Enforced {
    backend: CompiledBackend,
    /// Bumped on every entry into half-open, so the datapath tells this period's trial flows
    /// from an earlier one's.
    epoch: u32,
}

/// One backend of the supervisor.
struct Row {
    /// Position in the table.
    entry: usize,
    enforced: Option<Enforced>,
}

type Key = (Arc<str>, usize);

/// Owns the breakers; the only writer of the table and of `BACKENDS` after start.
struct Supervisor {
    table: Arc<BackendTable>,
    rows: HashMap<Key, Row>,
    guards: HashMap<Arc<str>, EjectionGuard>,
    /// Enforced backends by datapath id, for passive reports.
    by_id: HashMap<u32, Key>,
    sink: Option<Box<dyn StateSink>>,
    /// Backends whose last write failed, written again at `retry_at`.
    unsynced: BTreeSet<Key>,
    retry_at: Option<Instant>,
}

/// Starts health checks and breakers for every service with backends, and the passive
/// poller when a backend has passive detection. `enforced` are the backends whose entries
/// `Datapath::apply` wrote (`Compiled::backends`); with `datapath`, transitions are written
/// there, without it they stay in the agent (tests). Returns the table and the task, or
/// `None` when no service has backends. Stops when `stop` turns true.
pub fn start(
    policy: &Policy,
    enforced: &[CompiledBackend],
    datapath: Option<&Datapath>,
    stop: watch::Receiver<bool>,
) -> Result<Option<Started>, SupervisorError> {
    let (tx, rx) = mpsc::channel(1024);
    // Probes carry the mark the datapath exempts, or an open backend could never recover.
    let options = ProbeOptions {
        mark: Some(PROBE_MARK),
    };
    let mut checker = Checker::new(tx, options);
    let mut sup = Supervisor::new(policy, enforced, Instant::now());
    if sup.rows.is_empty() {
        return Ok(None);
    }
    add_checks(policy, &mut checker)?;
    let passive: Vec<PassiveBackend> = enforced
        .iter()
        .filter_map(|b| {
            b.passive_timeout
                .map(|timeout| PassiveBackend { id: b.id, timeout })
        })
        .collect();
    let (passive_tx, passive_rx) = mpsc::channel(16);
    let mut poller = None;
    if let Some(dp) = datapath.filter(|_| !enforced.is_empty()) {
        sup.sink = Some(Box::new(dp.backend_maps().map_err(SupervisorError::Maps)?));
        if !passive.is_empty() {
            let maps = dp.backend_maps().map_err(SupervisorError::Maps)?;
            let stop = stop.clone();
            poller = Some(tokio::task::spawn_blocking(move || {
                passive::poll(maps, passive, passive_tx, stop)
            }));
        }
    }
    let table = sup.table.clone();
    let task = tokio::spawn(async move {
        sup.run(checker, rx, passive_rx, stop).await;
        if let Some(p) = poller
            && let Err(e) = p.await
        {
            tracing::warn!("passive detection poller: {e}");
        }
    });
    Ok(Some((table, task)))
}

/// One probe task per backend of every service with a `health_check`.
fn add_checks(policy: &Policy, checker: &mut Checker) -> Result<(), SupervisorError> {
    for svc in &policy.services {
        let Some(hc) = &svc.health_check else {
            continue;
        };
        let service: Arc<str> = Arc::from(svc.name.as_str());
        for (index, b) in svc.backends.iter().enumerate() {
            let backend = BackendRef {
                service: service.clone(),
                index,
                address: b.address,
            };
            checker
                .add(backend.clone(), hc)
                .map_err(|source| SupervisorError::Health {
                    backend: backend.to_string(),
                    source,
                })?;
        }
    }
    Ok(())
}

fn initial_status(svc: &crate::config::Service, address: String, passive: bool) -> BackendStatus {
    BackendStatus {
        service: svc.name.clone(),
        address,
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
        passive: passive.then(PassiveCounts::default),
        ..BackendStatus::default()
    }
}

impl Supervisor {
    /// A row per backend and a guard per service with a breaker.
    fn new(policy: &Policy, enforced: &[CompiledBackend], now: Instant) -> Supervisor {
        let mut sup = Supervisor {
            table: Arc::new(BackendTable::default()),
            rows: HashMap::new(),
            guards: HashMap::new(),
            by_id: HashMap::new(),
            sink: None,
            unsynced: BTreeSet::new(),
            retry_at: None,
        };
        let mut by_position: HashMap<(usize, usize), &CompiledBackend> =
            enforced.iter().map(|b| ((b.service, b.index), b)).collect();
        for (s, svc) in policy.services.iter().enumerate() {
            let name: Arc<str> = Arc::from(svc.name.as_str());
            if let Some(cb) = &svc.circuit_breaker {
                sup.guards.insert(
                    name.clone(),
                    EjectionGuard::new(cb, svc.backends.len(), now),
                );
            }
            for (index, b) in svc.backends.iter().enumerate() {
                let enforced = by_position.remove(&(s, index)).map(|c| Enforced {
                    backend: c.clone(),
                    epoch: c.initial().epoch,
                });
                let passive = enforced
                    .as_ref()
                    .is_some_and(|e| e.backend.passive_timeout.is_some());
                let status = initial_status(svc, b.address.to_string(), passive);
                sup.add_row((name.clone(), index), status, enforced, now);
            }
        }
        sup
    }

    fn add_row(
        &mut self,
        key: Key,
        mut status: BackendStatus,
        enforced: Option<Enforced>,
        now: Instant,
    ) {
        if let Some(e) = &enforced {
            status.id = Some(e.backend.id);
            self.by_id.insert(e.backend.id, key.clone());
        }
        let entry = self.table.with(|v| {
            v.push(Entry { status, since: now });
            v.len() - 1
        });
        self.rows.insert(key, Row { entry, enforced });
    }

    async fn run(
        mut self,
        checker: Checker,
        mut results: mpsc::Receiver<ProbeResult>,
        mut passive: mpsc::Receiver<PassiveBatch>,
        mut stop: watch::Receiver<bool>,
    ) {
        // The checker's tasks live as long as it does.
        let _checker = checker;
        loop {
            let deadline = self
                .guards
                .values()
                .filter_map(|g| g.next_deadline())
                .chain(self.retry_at)
                .min();
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
                // Without a poller the channel is closed and this branch disabled.
                Some(batch) = passive.recv() => self.on_passive(batch, Instant::now()),
                _ = timer => self.on_timers(Instant::now()),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    fn on_probe(&mut self, r: ProbeResult) {
        let key = (r.backend.service.clone(), r.backend.index);
        let Some(entry) = self.rows.get(&key).map(|row| row.entry) else {
            return;
        };
        if r.changed {
            tracing::info!("backend {} is now {}", r.backend, r.health);
        }
        let has_breaker = self.guards.contains_key(&r.backend.service);
        self.table.with(|v| {
            let e = &mut v[entry];
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
        let outcome = if r.outcome.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        self.record(&key, r.at, &[outcome]);
    }

    /// Counts one tick of passive observations and feeds them to the breakers.
    fn on_passive(&mut self, batch: PassiveBatch, now: Instant) {
        for (id, seen) in batch {
            let Some(key) = self.by_id.get(&id).cloned() else {
                continue;
            };
            let Some(entry) = self.rows.get(&key).map(|row| row.entry) else {
                continue;
            };
            self.table.with(|v| {
                v[entry]
                    .status
                    .passive
                    .get_or_insert_with(PassiveCounts::default)
                    .add(&seen)
            });
            self.record(&key, now, &seen.outcomes(PASSIVE_FEED_CAP));
        }
    }

    /// Feeds outcomes to one backend's breaker and applies the transitions they cause.
    fn record(&mut self, key: &Key, at: Instant, outcomes: &[Outcome]) {
        let (service, index) = key;
        let Some(guard) = self.guards.get_mut(service) else {
            return;
        };
        let mut events = Vec::new();
        for outcome in outcomes {
            match guard.record(*index, at, *outcome) {
                Ok(ev) => events.extend(ev),
                Err(e) => {
                    tracing::warn!("breaker of {service}[{index}]: {e}");
                    return;
                }
            }
        }
        self.apply(service, events, at);
    }

    fn on_timers(&mut self, now: Instant) {
        let fired: Vec<(Arc<str>, Vec<Event>)> = self
            .guards
            .iter_mut()
            .map(|(name, g)| (name.clone(), g.poll(now)))
            .collect();
        for (name, events) in fired {
            self.apply(&name, events, now);
        }
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            let pending: Vec<Key> = std::mem::take(&mut self.unsynced).into_iter().collect();
            for key in pending {
                self.sync(&key, now);
            }
        }
    }

    /// Logs and counts breaker transitions, then writes each changed backend's state to the
    /// datapath once, as its breaker stands after all of them.
    fn apply(&mut self, service: &Arc<str>, events: Vec<Event>, now: Instant) {
        let mut changed = BTreeSet::new();
        for ev in events {
            let t = ev.transition;
            let key = (service.clone(), ev.backend);
            let Some(row) = self.rows.get_mut(&key) else {
                continue;
            };
            if t.from != t.to {
                changed.insert(key);
                if t.to == State::HalfOpen
                    && let Some(e) = &mut row.enforced
                {
                    e.epoch = e.epoch.wrapping_add(1);
                }
            }
            self.table.with(|v| {
                let e = &mut v[row.entry];
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
        for key in changed {
            self.sync(&key, now);
        }
    }

    /// Writes one enforced backend's current breaker state to every key it has; on failure
    /// logs, counts and schedules a retry.
    fn sync(&mut self, key: &Key, now: Instant) {
        let (service, index) = key;
        let (Some(row), Some(guard), Some(sink)) = (
            self.rows.get(key),
            self.guards.get(service),
            self.sink.as_mut(),
        ) else {
            return;
        };
        let (Some(enforced), Some(breaker)) = (&row.enforced, guard.breaker(*index)) else {
            return;
        };
        let b = &enforced.backend;
        let state = b.state(
            breaker.state().code(),
            breaker.admission().quota(),
            enforced.epoch,
        );
        let mut failed = false;
        for k in &b.keys {
            if let Err(e) = sink.write(k, &state) {
                tracing::warn!(
                    "writing breaker state {} of {service}[{index}] {} (protocol {}) to the datapath: {e}; retrying in {WRITE_RETRY:?}",
                    breaker.state(),
                    b.address,
                    k.proto
                );
                failed = true;
            }
        }
        if failed {
            self.table
                .with(|v| v[row.entry].status.map_write_errors += 1);
            self.unsynced.insert(key.clone());
            self.retry_at.get_or_insert(now + WRITE_RETRY);
        } else {
            // A retry now would rewrite a half-open quota the datapath is counting down.
            self.unsynced.remove(key);
        }
    }
}
