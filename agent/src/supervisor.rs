//! The backend supervisor: health checks and passive observations feed each backend's
//! circuit breaker, and every breaker transition is written to the datapath, which enforces
//! it (`BACKENDS`: RST / ICMP unreachable or drop while open, a quota of trial flows while
//! half-open; see `agent_common::breaker`). Each backend's typed state and counters are
//! published on a `watch` channel ([`Backends`], keyed by [`BackendId`]): the balancer takes
//! its weights from it, `/status` and `/metrics` show it.
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
//! the programs are attached, where no entry exists yet; the supervisor writes through its own
//! handle on the maps ([`BackendMaps`]), so a transition never waits on the datapath lock. A
//! failed write is logged, counted (`map_write_errors`) and retried; it never stops the
//! supervisor.
//!
//! Pinned maps outlive the agent: at start the supervisor reads every enforced backend's
//! entry and resumes its breaker from it (`agent_common::breaker::resume`): open stays open
//! for the rest of its period, half-open stays half-open, so userspace and kernel agree from
//! the first published value on. Every write stamps the entry with when its state began and
//! its open period, which is what the next agent resumes from.
//!
//! A supervisor serves one policy: its rows, guards and checks are built once, at start. A
//! caller follows a reload that changes backends, health checks or breakers by stopping it
//! and starting another from [`Origin::Reload`] with its last published value: a backend of
//! the same service name, address and `health_check` keeps its health, counters and `since`,
//! its probes resume from that health, and every breaker resumes from the maps as above.

mod backend;
mod log_limit;
mod passive;
mod samples;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::breaker::{
    BackendKey, BackendState, PROBE_MARK, STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, in_state_ns,
    resume,
};
use tokio::sync::{mpsc, watch};

pub use agent_common::status::{BackendStatus, LATENCY_BUCKETS, PassiveCounts};
pub use backend::{Backend, BackendId, Backends, BackendsRx, UNCHECKED};
pub use passive::{PASSIVE_FEED_CAP, PASSIVE_TICK};
pub use samples::{ProbeSample, SAMPLE_BATCHES, SampleRx, SampleTx, sample_channel};

use log_limit::LogLimiter;
use passive::{BreakerFeed as _, PassiveBackend, PassiveBatch};

use agent_common::breaker::Resumed;

use crate::{
    breaker::{EjectionGuard, Event, Outcome, State},
    config::{CompiledBackend, model::Policy},
    datapath::{BackendMaps, Datapath, DatapathError, ktime_now_ns},
    health::{BackendRef, Checker, HealthError, ProbeOptions, ProbeResult, on_grid},
};

// The agent's breaker codes are the datapath's: a mismatch would enforce the wrong state.
const _: () = assert!(
    State::Closed.code() == STATE_CLOSED
        && State::Open.code() == STATE_OPEN
        && State::HalfOpen.code() == STATE_HALF_OPEN
);

/// A failed map write is tried again after this long (the entry keeps its last state).
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// Probe results taken from the channel at once: one publication and one deadline
/// computation for all of them.
const PROBE_BATCH: usize = 256;

/// Per-backend INFO lines of breaker transitions (and, apart, of health changes) per
/// [`LOG_PERIOD`]; the rest are summed up in one line per period. Metrics count them all.
const LOG_LINES: u32 = 20;
const LOG_PERIOD: Duration = Duration::from_secs(1);

/// A kind of breaker transition, as the log's summary counts them: `open->half_open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Move(State, State);

impl std::fmt::Display for Move {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}->{}", self.0, self.1)
    }
}

/// The supervisor's side of the channel: it alone writes, at every probe, passive report and
/// transition. `send_modify` updates the value even while nobody is subscribed.
struct Publisher(watch::Sender<Backends>);

impl Publisher {
    fn update(&self, f: impl FnOnce(&mut Backends)) {
        self.0.send_modify(f);
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
    #[error("starting the health checks' runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// The channel the balancer and status read, and the task that publishes on it.
pub type Started = (BackendsRx, tokio::task::JoinHandle<()>);

/// Where a supervisor starts from: what the maps hold, and what an earlier supervisor of
/// this agent saw.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// Maps this agent created: every breaker entry is the initial one (closed), and what
    /// the passive counters hold happened since the attach: news.
    Fresh,
    /// Pinned maps an earlier agent left: breakers resume from their entries, and the
    /// passive counters' totals are that agent's history, the base rather than news.
    Adopted,
    /// A reload in this agent, after the previous supervisor stopped: as [`Adopted`]
    /// for breakers and passive counters, and every backend that
    /// [`continues`](Backend::continues) one of the previous supervisor's last published
    /// backends (same service name and address, same `health_check`; matched by name, not
    /// position) takes over its health, counters and `since` ([`Backend::carry`]). Its
    /// probes start from that health: an unhealthy backend stays unhealthy until
    /// `healthy_threshold` successes. Others start as on a fresh start.
    ///
    /// [`Adopted`]: Origin::Adopted
    Reload(&'a Backends),
}

impl<'a> Origin<'a> {
    /// Whether the passive counters' totals at start are history (the base) rather than news.
    fn counters_are_history(self) -> bool {
        !matches!(self, Origin::Fresh)
    }

    /// The previous supervisor's backends, on a reload.
    fn carried(self) -> Option<&'a Backends> {
        match self {
            Origin::Reload(backends) => Some(backends),
            Origin::Fresh | Origin::Adopted => None,
        }
    }
}

/// Where breaker states go: the kernel's `BACKENDS` map, or a recorder in tests.
trait StateSink: Send {
    fn write(&mut self, key: &BackendKey, state: &BackendState) -> Result<(), DatapathError>;
    /// The entry under `key`, `None` when there is none.
    fn read(&self, key: &BackendKey) -> Result<Option<BackendState>, DatapathError>;
}

impl StateSink for BackendMaps {
    fn write(&mut self, key: &BackendKey, state: &BackendState) -> Result<(), DatapathError> {
        self.write_backend(key, state)
    }

    fn read(&self, key: &BackendKey) -> Result<Option<BackendState>, DatapathError> {
        self.read_backend(key)
    }
}

/// One backend's entry as the datapath holds it: the first of its keys' entries, and whether
/// every key holds that same entry (keys are written together, but a failed write may have
/// reached some and not others). `None` when no key has an entry or none can be read.
fn read_entry(
    sink: &dyn StateSink,
    keys: &[BackendKey],
    name: impl std::fmt::Display,
) -> Option<(BackendState, bool)> {
    let mut found: Option<BackendState> = None;
    let mut agree = true;
    for k in keys {
        match sink.read(k) {
            Ok(Some(st)) => match found {
                None => found = Some(st),
                Some(first) => agree &= first == st,
            },
            Ok(None) => agree = false,
            Err(e) => {
                tracing::warn!(
                    "reading the breaker state of {name} (protocol {}): {e}",
                    k.proto
                );
                agree = false;
            }
        }
    }
    found.map(|st| (st, agree))
}

/// `at` on the clock of `bpf_ktime_get_ns`, from one reading of both clocks (`Instant` is
/// CLOCK_MONOTONIC too, so the offset holds); 0 without a reading.
fn ktime_at(clock: Option<(Instant, u64)>, at: Instant) -> u64 {
    let Some((base, base_ns)) = clock else {
        return 0;
    };
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    if at >= base {
        base_ns.saturating_add(ns(at - base))
    } else {
        base_ns.saturating_sub(ns(base - at))
    }
}

/// The breaker state of every enforced backend as the datapath holds it now, as [`start`]
/// will resume it (an open period already over is half-open): for the balancer's first
/// tables when the agent adopted pinned maps. Closed ones are left out, and so is a backend
/// whose entry cannot be read (logged): closed, fail open, as the balancer treats a backend
/// the supervisor does not publish.
pub fn breakers_in(datapath: &Datapath, enforced: &[CompiledBackend]) -> HashMap<BackendId, State> {
    if enforced.is_empty() {
        return HashMap::new();
    }
    match datapath.backend_maps() {
        Ok(maps) => not_closed(&maps, enforced, ktime_now_ns().unwrap_or(0)),
        Err(e) => {
            tracing::warn!("reading breaker states for the first tables: {e}");
            HashMap::new()
        }
    }
}

fn not_closed(
    sink: &dyn StateSink,
    enforced: &[CompiledBackend],
    now_ns: u64,
) -> HashMap<BackendId, State> {
    enforced
        .iter()
        .filter_map(|b| {
            let (entry, _) = read_entry(sink, &b.keys, b.address)?;
            let state = State::resumed(resume(&entry, now_ns));
            let id = BackendId {
                service: b.service,
                index: b.index,
            };
            (state != State::Closed).then_some((id, state))
        })
        .collect()
}

/// The state a resumed entry holds as written, before an open period that is over turns
/// half-open (which [`State::resumed`] anticipates).
fn held(r: Option<Resumed>) -> State {
    match r {
        None | Some(Resumed::Closed) => State::Closed,
        Some(Resumed::Open { .. }) => State::Open,
        Some(Resumed::HalfOpen { .. }) => State::HalfOpen,
    }
}

/// A backend whose breaker the datapath enforces: its map entries and half-open epoch.
struct Enforced {
    backend: CompiledBackend,
    /// Bumped on every entry into half-open, so the datapath tells this period's trial flows
    /// from an earlier one's.
    epoch: u32,
    /// What the datapath holds under every key (the initial entry `Datapath::apply` wrote,
    /// then the last write that succeeded for all keys); `None` after a failed write, when
    /// the keys may differ: a state the datapath would enforce alike is not written again.
    written: Option<BackendState>,
}

/// Whether the datapath holds `b` already, as far as it matters. The epoch matters only
/// while half-open (it tags that period's trial flows); an open or closed entry that differs
/// from the last written one by its epoch alone need not be written. The stamps
/// (`since_ns`, `open_for_ns`) matter: the datapath ignores them, but an agent that adopts
/// the maps resumes from them, so a re-open between two writes (open -> half_open -> open,
/// the half-open never written) is written for its new period.
fn same_enforcement(a: &BackendState, b: &BackendState) -> bool {
    a == b
        || (a.state != STATE_HALF_OPEN
            && BackendState {
                epoch: b.epoch,
                ..*a
            } == *b)
}

/// One backend of the supervisor.
struct Row {
    /// Position in the published [`Backends`].
    entry: usize,
    /// Its service has breakers.
    breaker: bool,
    enforced: Option<Enforced>,
    /// Carried over a reload: the breaker state the previous supervisor published and its
    /// `since`, which [`resume`](Supervisor::resume) keeps when the datapath holds that
    /// state still (the map's stamp is coarser: none at all for a breaker never written).
    was: Option<(State, Instant)>,
}

/// A backend by its service's index in the policy and its index there: rows and guards are
/// looked up by position, with no hash of a service name per probe.
type Key = BackendId;

/// Owns the breakers; the only writer of the published backends and of `BACKENDS` after
/// start.
struct Supervisor {
    table: Publisher,
    /// By service (policy order), then backend index.
    rows: Vec<Vec<Row>>,
    /// By service (policy order): `None` for a service without breakers.
    guards: Vec<Option<EjectionGuard>>,
    /// Service names by index, for log lines.
    names: Vec<Arc<str>>,
    /// Enforced backends by datapath id, for passive reports.
    by_id: HashMap<u32, Key>,
    sink: Option<Box<dyn StateSink>>,
    /// Backends whose last write failed, written again at `retry_at`.
    unsynced: BTreeSet<Key>,
    retry_at: Option<Instant>,
    transitions_log: LogLimiter<Move>,
    health_log: LogLimiter<crate::health::Health>,
    /// Scratch of [`on_probes`](Supervisor::on_probes), kept to spare an allocation a batch.
    found: Vec<(usize, usize, bool)>,
    /// One reading of `Instant` and of the datapath's clock, to stamp the entries written
    /// (`BackendState::since_ns`); `None` if the clock could not be read.
    clock: Option<(Instant, u64)>,
    /// Where probe results of degradable services go (the degradation evaluator).
    samples: Option<SampleTx>,
    /// By service (policy order): whether its probes are sent on `samples` (a service of
    /// the file with `degradation`).
    degradable: Vec<bool>,
}

/// Starts health checks and breakers for every service with backends, and the passive
/// poller when a backend has passive detection. `enforced` are the backends whose entries
/// `Datapath::apply` wrote (`Compiled::backends`); with `datapath`, breakers resume from
/// there and transitions are written there, without it they stay in the agent (tests).
/// `origin` says what the start takes up ([`Origin`]). Every probe result of a degradable
/// service's backend is sent on `samples` (without waiting: a full channel drops them).
/// Returns the channel, whose first value already holds the carried and resumed states, and
/// the task, or `None` when no service has backends. Stops when `stop` turns true.
pub fn start(
    policy: &Policy,
    enforced: &[CompiledBackend],
    datapath: Option<&Datapath>,
    origin: Origin<'_>,
    samples: Option<SampleTx>,
    stop: watch::Receiver<bool>,
) -> Result<Option<Started>, SupervisorError> {
    // Probes carry the mark the datapath exempts, or an open backend could never recover.
    let options = ProbeOptions {
        mark: Some(PROBE_MARK),
    };
    start_probing(policy, enforced, datapath, origin, options, samples, stop)
}

/// [`start`] with its probes' socket options: tests without CAP_NET_ADMIN probe unmarked.
fn start_probing(
    policy: &Policy,
    enforced: &[CompiledBackend],
    datapath: Option<&Datapath>,
    origin: Origin<'_>,
    options: ProbeOptions,
    samples: Option<SampleTx>,
    stop: watch::Receiver<bool>,
) -> Result<Option<Started>, SupervisorError> {
    let (tx, rx) = mpsc::channel(1024);
    let mut checker = Checker::new(tx, options);
    let mut sup = Supervisor::new(policy, enforced, origin.carried(), Instant::now());
    if sup.rows.is_empty() {
        return Ok(None);
    }
    if sup.degradable.contains(&true) {
        sup.samples = samples;
    }
    // The probes and the supervisor share a thread and a current-thread runtime of their
    // own: thousands of probes a second then wake one thread, which takes their results
    // in batches, instead of bouncing work between the agent's workers (a futex wake and a
    // thread switch each time).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SupervisorError::Runtime)?;
    {
        let _in = runtime.enter();
        add_checks(policy, &sup, &mut checker)?;
    }
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
        // Before the channel is handed out: its first value carries the resumed states.
        let (open, half_open) = sup.resume(Instant::now());
        if open + half_open > 0 {
            tracing::info!(
                "adopted {} breakers not closed from the datapath: {open} open, {half_open} half_open",
                open + half_open
            );
        }
        if !passive.is_empty() {
            let maps = dp.backend_maps().map_err(SupervisorError::Maps)?;
            let stop = stop.clone();
            let history = origin.counters_are_history();
            poller = Some(std::thread::spawn(move || {
                passive::poll(maps, passive, history, passive_tx, stop)
            }));
        }
    }
    let backends = sup.table.0.subscribe();
    let task = tokio::task::spawn_blocking(move || {
        // A task, not the future `block_on` polls: waking that one writes the runtime's
        // eventfd even from its own thread, and a result arrives every few hundred
        // microseconds.
        runtime.block_on(async move {
            if let Err(e) = tokio::spawn(sup.run(checker, rx, passive_rx, stop)).await {
                tracing::warn!("backend supervisor: {e}");
            }
        });
        if let Some(p) = poller
            && p.join().is_err()
        {
            tracing::warn!("passive detection poller panicked");
        }
    });
    Ok(Some((backends, task)))
}

/// Every backend of every service with a `health_check`, to the checker, from the health
/// the supervisor publishes for it (healthy, or carried over a reload): the checker's
/// rise/fall and the published health never disagree.
fn add_checks(
    policy: &Policy,
    sup: &Supervisor,
    checker: &mut Checker,
) -> Result<(), SupervisorError> {
    let table = sup.table.0.borrow();
    for (service_id, svc) in policy.services.iter().enumerate() {
        let Some(hc) = &svc.health_check else {
            continue;
        };
        let service = &sup.names[service_id];
        for (index, b) in svc.backends.iter().enumerate() {
            let backend = BackendRef {
                service: service.clone(),
                service_id,
                index,
                address: b.address,
            };
            let health = sup
                .row(BackendId {
                    service: service_id,
                    index,
                })
                .and_then(|row| table[row.entry].health)
                .unwrap_or_default();
            checker
                .add_from(backend.clone(), hc, health)
                .map_err(|source| SupervisorError::Health {
                    backend: backend.to_string(),
                    source,
                })?;
        }
    }
    Ok(())
}

/// The supervisor's key of a probed backend.
fn key_of(b: &BackendRef) -> Key {
    BackendId {
        service: b.service_id,
        index: b.index,
    }
}

/// One probe's counters in its backend's published row.
fn count_probe(b: &mut Backend, r: &ProbeResult, has_breaker: bool) {
    match &r.outcome {
        Ok(()) => b.probes_ok += 1,
        Err(f) => {
            b.probes_failed += 1;
            *b.failures.entry(f.label()).or_default() += 1;
            // Kept typed, formatted for /status only: no string per failed probe.
            if b.last_failure.as_ref() != Some(f) {
                b.last_failure = Some(f.clone());
            }
        }
    }
    let secs = r.latency.as_secs_f64();
    b.latency_sum += secs;
    if let Some(i) = LATENCY_BUCKETS.iter().position(|le| secs <= *le) {
        b.latency_buckets[i] += 1;
    }
    if r.changed {
        b.health = Some(r.health);
        if !has_breaker {
            b.since = r.at;
        }
    }
}

impl Supervisor {
    /// A row per backend and a guard per service with a breaker. A backend that continues
    /// one of `carried` (the previous supervisor's, on a reload) takes over its state
    /// ([`Backend::carry`]); the others start healthy and closed.
    fn new(
        policy: &Policy,
        enforced: &[CompiledBackend],
        carried: Option<&Backends>,
        now: Instant,
    ) -> Supervisor {
        let mut sup = Supervisor {
            table: Publisher(watch::channel(Vec::new()).0),
            rows: Vec::new(),
            guards: Vec::new(),
            names: Vec::new(),
            by_id: HashMap::new(),
            sink: None,
            unsynced: BTreeSet::new(),
            retry_at: None,
            transitions_log: LogLimiter::new(LOG_LINES, LOG_PERIOD),
            health_log: LogLimiter::new(LOG_LINES, LOG_PERIOD),
            found: Vec::new(),
            clock: ktime_now_ns().map(|ns| (Instant::now(), ns)),
            samples: None,
            degradable: (policy.services.iter())
                .map(|s| s.degradation.is_some() && s.fallback_of.is_none())
                .collect(),
        };
        let mut by_position: HashMap<(usize, usize), &CompiledBackend> =
            enforced.iter().map(|b| ((b.service, b.index), b)).collect();
        // By service name and address: positions may differ between the two policies.
        let carried: HashMap<(&str, SocketAddr), &Backend> = carried
            .into_iter()
            .flatten()
            .map(|b| ((&*b.service, b.address), b))
            .collect();
        for (s, svc) in policy.services.iter().enumerate() {
            let name: Arc<str> = Arc::from(svc.name.as_str());
            let check = svc.health_check.clone().map(Arc::new);
            sup.guards.push(
                svc.circuit_breaker
                    .as_ref()
                    .map(|cb| EjectionGuard::new(cb, svc.backends.len(), now)),
            );
            sup.names.push(name.clone());
            sup.rows.push(Vec::with_capacity(svc.backends.len()));
            for (index, b) in svc.backends.iter().enumerate() {
                let enforced = by_position.remove(&(s, index)).map(|c| Enforced {
                    backend: c.clone(),
                    epoch: c.initial().epoch,
                    written: Some(c.initial()),
                });
                let mut backend = Backend::new(
                    BackendId { service: s, index },
                    name.clone(),
                    b.address,
                    svc.health_check.is_some(),
                    svc.circuit_breaker.is_some(),
                    now,
                );
                backend.health_check = check.clone();
                let old = carried
                    .get(&(svc.name.as_str(), b.address))
                    .copied()
                    .filter(|old| backend.continues(old));
                sup.add_row(BackendId { service: s, index }, backend, enforced, old);
            }
        }
        sup
    }

    fn add_row(
        &mut self,
        key: Key,
        mut backend: Backend,
        enforced: Option<Enforced>,
        carried: Option<&Backend>,
    ) {
        if let Some(e) = &enforced {
            backend.datapath_id = Some(e.backend.id);
            if e.backend.passive_timeout.is_some() {
                backend.passive = Some(PassiveCounts::default());
            }
            self.by_id.insert(e.backend.id, key);
        }
        if let Some(old) = carried {
            backend.carry(old);
        }
        let entry = self.table.0.borrow().len();
        let breaker = backend.breaker.is_some();
        self.table.update(|v| v.push(backend));
        // Rows are added in policy order: `key.index` is the row's place.
        self.rows[key.service].push(Row {
            entry,
            breaker,
            enforced,
            was: carried.and_then(|old| Some((old.breaker?, old.since))),
        });
    }

    fn row(&self, key: Key) -> Option<&Row> {
        self.rows.get(key.service)?.get(key.index)
    }

    fn row_mut(&mut self, key: Key) -> Option<&mut Row> {
        self.rows.get_mut(key.service)?.get_mut(key.index)
    }

    async fn run(
        mut self,
        checker: Checker,
        mut results: mpsc::Receiver<ProbeResult>,
        mut passive: mpsc::Receiver<PassiveBatch>,
        mut stop: watch::Receiver<bool>,
    ) {
        // The checker's task lives as long as it does.
        let _checker = checker;
        let mut batch = Vec::with_capacity(PROBE_BATCH);
        loop {
            let deadline = self
                .guards
                .iter()
                .flatten()
                .filter_map(|g| g.next_deadline())
                .chain(self.retry_at)
                .chain(self.transitions_log.next_deadline())
                .chain(self.health_log.next_deadline())
                .min();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(on_grid(d).into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                n = results.recv_many(&mut batch, PROBE_BATCH) => {
                    if n == 0 {
                        return;
                    }
                    self.on_probes(&batch);
                    batch.clear();
                },
                // Without a poller the channel is closed and this branch disabled.
                Some(batch) = passive.recv() => self.on_passive(batch, Instant::now()),
                _ = timer => self.on_timers(Instant::now()),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Counts a batch of probe results (one publication for all of them), then feeds each
    /// to its backend's breaker.
    fn on_probes(&mut self, batch: &[ProbeResult]) {
        let changed = batch.iter().filter(|r| r.changed);
        let mut now = None;
        for r in changed {
            let now = *now.get_or_insert_with(|| {
                let now = Instant::now();
                self.summarize_logs(now);
                now
            });
            if self.health_log.admit(now, r.health) {
                tracing::info!("backend {} is now {}", r.backend, r.health);
            }
        }
        // One lookup per result: (position in the batch, in the table, has a breaker).
        let mut found = std::mem::take(&mut self.found);
        found.clear();
        for (i, r) in batch.iter().enumerate() {
            if let Some(row) = self.row(key_of(&r.backend)) {
                found.push((i, row.entry, row.breaker));
            }
        }
        self.table.update(|v| {
            for &(i, entry, breaker) in &found {
                count_probe(&mut v[entry], &batch[i], breaker);
            }
        });
        self.send_samples(batch);
        // The batch's transitions are applied together: one publication, one log check.
        let mut events = Vec::new();
        for &(i, _, breaker) in &found {
            if !breaker {
                continue;
            }
            let r = &batch[i];
            let outcome = if r.outcome.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            };
            self.record(key_of(&r.backend), r.at, &[outcome], &mut events);
        }
        self.found = found;
        if let Some(last) = batch.last() {
            self.apply(events, last.at);
        }
    }

    /// The batch's results of degradable services, to the evaluator; dropped (with a debug
    /// line) when it is that far behind: the supervisor never waits on it.
    fn send_samples(&self, batch: &[ProbeResult]) {
        let Some(tx) = &self.samples else {
            return;
        };
        let samples: Vec<ProbeSample> = batch
            .iter()
            .filter(|r| self.degradable.get(r.backend.service_id) == Some(&true))
            .map(|r| ProbeSample {
                service: r.backend.service.clone(),
                at: r.at,
                latency: r.latency,
                ok: r.outcome.is_ok(),
            })
            .collect();
        if samples.is_empty() {
            return;
        }
        if let Err(e) = tx.try_send(samples) {
            tracing::debug!("degradation evaluator behind, probe samples dropped: {e}");
        }
    }

    /// Counts one tick of passive observations and feeds them to the breakers.
    fn on_passive(&mut self, batch: PassiveBatch, now: Instant) {
        let mut events = Vec::new();
        for (id, seen) in batch {
            let Some(&key) = self.by_id.get(&id) else {
                continue;
            };
            let Some(entry) = self.row(key).map(|row| row.entry) else {
                continue;
            };
            self.table.update(|v| {
                v[entry]
                    .passive
                    .get_or_insert_with(PassiveCounts::default)
                    .add(&seen)
            });
            self.record(key, now, &seen.outcomes(PASSIVE_FEED_CAP), &mut events);
        }
        self.apply(events, now);
    }

    /// Feeds outcomes to one backend's breaker; the transitions they cause go to `events`
    /// (with their service), for [`apply`](Supervisor::apply).
    fn record(
        &mut self,
        key: Key,
        at: Instant,
        outcomes: &[Outcome],
        events: &mut Vec<(usize, Event)>,
    ) {
        let BackendId { service, index } = key;
        let Some(guard) = self.guards.get_mut(service).and_then(Option::as_mut) else {
            return;
        };
        for outcome in outcomes {
            match guard.record(index, at, *outcome) {
                Ok(ev) => events.extend(ev.into_iter().map(|e| (service, e))),
                Err(e) => {
                    tracing::warn!("breaker of {}[{index}]: {e}", self.names[service]);
                    return;
                }
            }
        }
    }

    /// The summaries of log periods that are over.
    fn summarize_logs(&mut self, now: Instant) {
        if let Some(s) = self.transitions_log.roll(now) {
            tracing::info!("{}", s.line("breaker transitions"));
        }
        if let Some(s) = self.health_log.roll(now) {
            tracing::info!("{}", s.line("backend health changes"));
        }
    }

    fn on_timers(&mut self, now: Instant) {
        self.summarize_logs(now);
        let fired: Vec<(usize, Event)> = self
            .guards
            .iter_mut()
            .enumerate()
            .filter_map(|(service, g)| Some((service, g.as_mut()?)))
            .flat_map(|(service, g)| g.poll(now).into_iter().map(move |e| (service, e)))
            .collect();
        self.apply(fired, now);
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            let pending: Vec<Key> = std::mem::take(&mut self.unsynced).into_iter().collect();
            for key in pending {
                self.sync(key, now);
            }
        }
    }

    /// Logs and counts breaker transitions, then writes each changed backend's state to the
    /// datapath once, as its breaker stands after all of them.
    fn apply(&mut self, events: Vec<(usize, Event)>, now: Instant) {
        if events.is_empty() {
            return;
        }
        let mut changed = BTreeSet::new();
        let mut applied = Vec::with_capacity(events.len());
        for (service, ev) in events {
            let t = ev.transition;
            let key = BackendId {
                service,
                index: ev.backend,
            };
            let Some(row) = self.row_mut(key) else {
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
            applied.push((service, row.entry, ev));
        }
        // One publication for all of them.
        self.table.update(|v| {
            for (_, entry, ev) in &applied {
                let t = ev.transition;
                let b = &mut v[*entry];
                *b.transitions.entry((t.to, t.reason)).or_default() += 1;
                if t.from != t.to {
                    b.breaker = Some(t.to);
                    b.since = t.at;
                }
            }
        });
        let real_now = Instant::now();
        self.summarize_logs(real_now);
        for (service, entry, ev) in applied {
            let t = ev.transition;
            if self.transitions_log.admit(real_now, Move(t.from, t.to)) {
                tracing::info!(
                    "breaker {}[{}] {}: {} -> {} ({})",
                    self.names[service],
                    ev.backend,
                    self.table.0.borrow()[entry].address,
                    t.from,
                    t.to,
                    t.reason.as_str()
                );
            }
        }
        for key in changed {
            self.sync(key, now);
        }
    }

    /// Takes up every enforced breaker's state from the datapath (see the module doc), then
    /// fires the timers already due (an open period over goes half-open, written at once),
    /// all before the first publication is read. An entry that does not hold this policy's
    /// flags and id, or not on every key, is written again. Returns how many breakers are
    /// open and half-open.
    fn resume(&mut self, now: Instant) -> (usize, usize) {
        let now_ns = ktime_at(self.clock, now);
        let Some(sink) = self.sink.as_deref() else {
            return (0, 0);
        };
        let mut resumed = Vec::new();
        let mut rewrite = Vec::new();
        for (service, rows) in self.rows.iter_mut().enumerate() {
            let Some(guard) = self.guards.get_mut(service).and_then(Option::as_mut) else {
                continue;
            };
            for (index, row) in rows.iter_mut().enumerate() {
                let Some(e) = &mut row.enforced else {
                    continue;
                };
                let name = format_args!("{}[{index}] {}", self.names[service], e.backend.address);
                let Some((entry, agree)) = read_entry(sink, &e.backend.keys, name) else {
                    continue;
                };
                let r = resume(&entry, now_ns);
                let since = match (row.was, entry.since_ns) {
                    // Carried over a reload in the state the map holds: the previous
                    // supervisor's own reading of when it began.
                    (Some((was, since)), _) if was == held(r) => since,
                    // Stamped 0: never written by a breaker (the initial entry): in its
                    // state since this start, as far as anyone can tell.
                    (_, 0) => now,
                    _ => now
                        .checked_sub(Duration::from_nanos(in_state_ns(&entry, now_ns)))
                        .unwrap_or(now),
                };
                let open_for = Duration::from_nanos(entry.open_for_ns);
                let Ok(()) =
                    guard.resume(index, r.unwrap_or(Resumed::Closed), since, open_for, now)
                else {
                    continue;
                };
                e.epoch = entry.epoch;
                let current = agree
                    && r.is_some()
                    && entry.flags == e.backend.flags
                    && entry.id == e.backend.id;
                e.written = current.then_some(entry);
                let key = BackendId { service, index };
                if !current {
                    rewrite.push(key);
                }
                if let Some(b) = guard.breaker(index) {
                    resumed.push((row.entry, b.state(), since));
                }
            }
        }
        self.table.update(|v| {
            for &(entry, state, since) in &resumed {
                v[entry].breaker = Some(state);
                v[entry].since = since;
            }
        });
        for key in rewrite {
            self.sync(key, now);
        }
        self.on_timers(now);
        let mut counts = (0, 0);
        for b in self.guards.iter().flatten().flat_map(|g| g.breakers()) {
            match b.state() {
                State::Open => counts.0 += 1,
                State::HalfOpen => counts.1 += 1,
                State::Closed => {}
            }
        }
        counts
    }

    /// Writes one enforced backend's current breaker state to every key it has, unless the
    /// datapath already enforces it alike; on failure logs, counts and schedules a retry.
    fn sync(&mut self, key: Key, now: Instant) {
        let BackendId { service, index } = key;
        let Some(guard) = self.guards.get(service).and_then(Option::as_ref) else {
            return;
        };
        let clock = self.clock;
        let (Some(row), Some(sink)) = (
            self.rows.get_mut(service).and_then(|r| r.get_mut(index)),
            self.sink.as_mut(),
        ) else {
            return;
        };
        let (Some(enforced), Some(breaker)) = (&mut row.enforced, guard.breaker(index)) else {
            return;
        };
        let b = &enforced.backend;
        // Stamped for the agent that adopts these maps after this one.
        let state = BackendState {
            since_ns: ktime_at(clock, breaker.since()),
            open_for_ns: u64::try_from(breaker.reset_timeout().as_nanos()).unwrap_or(u64::MAX),
            ..b.state(
                breaker.state().code(),
                breaker.admission().quota(),
                enforced.epoch,
            )
        };
        if enforced
            .written
            .is_some_and(|w| same_enforcement(&w, &state))
        {
            // Nothing the datapath would do differently; a pending retry is moot too.
            self.unsynced.remove(&key);
            return;
        }
        let service = &self.names[service];
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
            // Some keys may hold the new state and some the old: write all of them again.
            enforced.written = None;
            let entry = row.entry;
            self.table.update(|v| v[entry].map_write_errors += 1);
            self.unsynced.insert(key);
            self.retry_at.get_or_insert(now + WRITE_RETRY);
        } else {
            enforced.written = Some(state);
            // A retry now would rewrite a half-open quota the datapath is counting down.
            self.unsynced.remove(&key);
        }
    }
}
