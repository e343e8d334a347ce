//! The balancer: drives each balanced service's weights in the datapath.
//!
//! Every `TICK` it reads each backend's health and breaker, typed, from the supervisor's
//! channel (`supervisor::Backends`, by `BackendId`; a backend it does not publish counts as
//! healthy and closed: fail open), works out effective weights (`lb::weight::effective`:
//! configured x health x slow-start ramp), and when they change, rebuilds the service's
//! table (Maglev or weighted round robin) as a new map and swaps it into `LB_TABLES`: one
//! atomic write per service. `least_conn` has no table;
//! it reads the weights in `LB_BACKENDS`, which are written for every algorithm (status
//! shows them).
//!
//! - Open breaker or unhealthy: weight 0, no new flows (established ones stay; the breaker's
//!   `close_existing` decides about them).
//! - Half-open: weight 1 (the start of a ramp): a trickle of flows, which the datapath caps
//!   at the breaker's `half_open_max_flows`.
//! - Closed again and healthy: the slow-start ramp begins (linear over `slow_start`, rebuilt
//!   in at most `weight::MAX_STEPS` steps, never more often than `weight::MIN_STEP`).
//! - Configured weight 0: drained.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::watch;

pub use agent_common::status::{LbBackendView, LbServiceView};

use crate::{
    breaker::State,
    config::{Algorithm, CompiledLb},
    datapath::{DatapathError, LbCounters, LbMaps, ktime_now_ns},
    health::Health,
    lb::{NO_BACKEND, backend_key, maglev, weight, weight::SlowStart, wrr},
    supervisor::{BackendId, BackendsRx},
};

/// How often health and breakers are read.
pub const TICK: Duration = Duration::from_millis(100);
/// Two publishes of one service are at least this far apart: a backend flapping at the
/// tick's pace rebuilds its service's table at most 20 times a second.
pub const MIN_PUBLISH_GAP: Duration = Duration::from_millis(50);
/// The connection table is walked for occupancy this often.
const OCCUPANCY_EVERY: Duration = Duration::from_secs(1);
/// ...visiting at most this many entries.
const OCCUPANCY_MAX_VISITS: usize = 1 << 20;

/// Shared between the balancer and the HTTP side. The balancer publishes weights, panic and
/// table figures each tick; the datapath's counters are read here, when a scrape asks (a
/// handle of its own on the maps), not every tick for every backend.
pub struct LbView {
    inner: Mutex<(Vec<LbServiceView>, Vec<LbBackendView>)>,
    counters: Mutex<(LbMaps, Vec<CompiledLb>)>,
}

impl LbView {
    pub fn new(maps: LbMaps, services: Vec<CompiledLb>) -> LbView {
        LbView {
            inner: Mutex::default(),
            counters: Mutex::new((maps, services)),
        }
    }

    /// The last published view, with the datapath's counters as of now (a counter that
    /// cannot be read shows 0).
    pub fn snapshot(&self) -> (Vec<LbServiceView>, Vec<LbBackendView>) {
        let (mut svcs, mut backends) = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let guard = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let (maps, plans) = &*guard;
        let mut rows = backends.iter_mut();
        for (view, plan) in svcs.iter_mut().zip(plans) {
            let c = maps.service_counters(plan).unwrap_or_default();
            view.no_backend = c.no_backend;
            view.lost = c.lost;
            view.client_ports_moved = c.client_ports_moved;
            view.client_ports_busy = c.client_ports_busy;
            for (i, row) in (0..plan.backends.len()).zip(rows.by_ref()) {
                let c: LbCounters = maps.counters(plan, i).unwrap_or_default();
                row.active = c.active;
                row.new_flows = c.new_flows;
                row.packets = c.forwarded.packets;
                row.bytes = c.forwarded.bytes;
            }
        }
        (svcs, backends)
    }
}

/// One backend's health and breaker as the balancer read them at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Seen {
    /// `None`: not checked.
    health: Option<Health>,
    /// `None`: no breaker.
    breaker: Option<State>,
}

impl Seen {
    fn healthy(self) -> bool {
        self.health != Some(Health::Unhealthy)
    }

    fn breaker(self) -> State {
        self.breaker.unwrap_or(State::Closed)
    }

    /// May take new flows at its full weight (after slow start): healthy and closed.
    fn available(self) -> bool {
        self.healthy() && self.breaker() == State::Closed
    }
}

/// Every published backend's state, copied out so the channel is not held.
fn read(backends: Option<&BackendsRx>) -> HashMap<BackendId, Seen> {
    let Some(rx) = backends else {
        return HashMap::new();
    };
    rx.borrow()
        .iter()
        .map(|b| {
            let seen = Seen {
                health: b.health,
                breaker: b.breaker,
            };
            (b.id, seen)
        })
        .collect()
}

struct Service {
    plan: CompiledLb,
    /// Each backend's address as status and metrics show it.
    addresses: Vec<String>,
    slow: SlowStart<usize>,
    /// Per backend: available (healthy, breaker closed) at the last tick.
    available: Vec<bool>,
    /// Per backend: weights in the datapath now, and the ones to publish.
    written: Vec<u32>,
    wanted: Vec<u32>,
    last_build: Instant,
    /// Configured weights changed since the last update.
    dirty: bool,
    /// Panicking in the datapath now, and wanted.
    panic: bool,
    wanted_panic: bool,
    last_publish: Option<Instant>,
    publishes: u64,
    write_errors: u64,
}

/// Writes the initial state of every balanced service (configured weights, first table),
/// before the programs are attached, on fresh maps.
pub fn install(maps: &mut LbMaps, services: &[CompiledLb]) -> Result<(), DatapathError> {
    install_resumed(maps, services, false, &HashMap::new(), &HashMap::new())
}

/// As [`install`], but when the agent `adopted` pinned maps (`Datapath::adopted`) the first
/// weights follow the breaker states the datapath holds (`breakers`, from
/// `supervisor::breakers_in`, which the supervisor resumes): a backend whose breaker is open
/// gets no new flows from the first moment, a half-open one a trickle, as the balancer's
/// first tick would decide. On fresh maps every breaker starts closed: `breakers` is not read.
/// `health`: what a reload carries over (`carried_health`): an unhealthy backend gets no new
/// flows from the new policy's first table either.
pub fn install_resumed(
    maps: &mut LbMaps,
    services: &[CompiledLb],
    adopted: bool,
    breakers: &HashMap<BackendId, State>,
    health: &HashMap<BackendId, Health>,
) -> Result<(), DatapathError> {
    let configured = |s: &CompiledLb| first_weights(s, adopted, breakers, health);
    for s in services {
        maps.write_service(s, &configured(s))?;
    }
    // Tables are built on every CPU: thousands of Maglev tables take seconds on one.
    let with_table: Vec<&CompiledLb> = (services.iter())
        .filter(|s| s.algorithm != Algorithm::LeastConn)
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = with_table.len().div_ceil(threads).max(1);
    let tables = std::thread::scope(|scope| {
        let builders: Vec<_> = (with_table.chunks(share))
            .map(|chunk| {
                scope.spawn(move || {
                    (chunk.iter())
                        .map(|s| (s.id, table(s, &configured(s))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        (builders.into_iter())
            .flat_map(|b| b.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    maps.publish_many(tables)
}

/// The weights `install_resumed` writes first: configured ones, or when `adopted` and some
/// backend's breaker is not closed, what [`Service::update`] makes of those breakers (open:
/// 0, half-open: at most 1, unless the service panics).
fn first_weights(
    plan: &CompiledLb,
    adopted: bool,
    breakers: &HashMap<BackendId, State>,
    health: &HashMap<BackendId, Health>,
) -> Vec<u32> {
    let seen: HashMap<BackendId, Seen> = (0..plan.backends.len())
        .filter_map(|index| {
            let id = BackendId {
                service: plan.service,
                index,
            };
            let breaker = breakers.get(&id).copied().filter(|_| adopted);
            let health = health.get(&id).copied();
            (breaker.is_some() || health.is_some()).then_some((id, Seen { health, breaker }))
        })
        .collect();
    if seen.is_empty() {
        return plan.backends.iter().map(|b| b.weight).collect();
    }
    let now = Instant::now();
    let mut s = Service::new(plan.clone(), now);
    s.update(&seen, now);
    s.wanted
}

/// The health a reload carries over from the running supervisor's backends (by service name
/// and address: positions may differ between the two policies), for the new policy's balanced
/// backends.
pub fn carried_health(
    carried: &[crate::supervisor::Backend],
    services: &[CompiledLb],
) -> HashMap<BackendId, Health> {
    let by_name: HashMap<(&str, std::net::SocketAddr), Health> = carried
        .iter()
        .filter_map(|b| Some(((&*b.service, b.address), b.health?)))
        .collect();
    let mut out = HashMap::new();
    for s in services {
        for (index, b) in s.backends.iter().enumerate() {
            if let Some(&h) = by_name.get(&(s.name.as_str(), b.address)) {
                out.insert(
                    BackendId {
                        service: s.service,
                        index,
                    },
                    h,
                );
            }
        }
    }
    out
}

/// The table of `svc` for `weights` (LB indices; `NO_BACKEND` for none).
pub fn table(svc: &CompiledLb, weights: &[u32]) -> Vec<u32> {
    let local = match svc.algorithm {
        Algorithm::Maglev => {
            let keyed: Vec<(u64, u32)> = svc
                .backends
                .iter()
                .zip(weights)
                .map(|(b, &w)| (backend_key(&b.address), w))
                .collect();
            maglev::build(&keyed, svc.capacity)
        }
        // Validation keeps live backends within the schedule's capacity; an error (none
        // expected) leaves the schedule empty: new flows are refused, never misrouted.
        Algorithm::WeightedRoundRobin => wrr::build(weights, svc.capacity).unwrap_or_default(),
        Algorithm::LeastConn => Vec::new(),
    };
    local
        .into_iter()
        .map(|i| {
            if i == NO_BACKEND {
                NO_BACKEND
            } else {
                svc.index(i as usize)
            }
        })
        .collect()
}

/// Runs until `stop`; blocking (map syscalls), so on a blocking thread. A reload stops it
/// and runs a new one for the new policy.
pub fn run(
    mut maps: LbMaps,
    services: Vec<CompiledLb>,
    health: Option<BackendsRx>,
    view: Arc<LbView>,
    mut stop: watch::Receiver<bool>,
) {
    // On the agent's blocking pool: its runtime wakes the tick early on a stop.
    let runtime = tokio::runtime::Handle::try_current().ok();
    let now = Instant::now();
    let mut services: Vec<Service> = services
        .into_iter()
        .map(|plan| Service::new(plan, now))
        .collect();
    let mut occupancy = Occupancy::default();
    let mut last_walk: Option<Instant> = None;
    while !*stop.borrow() {
        let now = Instant::now();
        let seen = read(health.as_ref());
        for s in &mut services {
            s.update(&seen, now);
        }
        sync(&mut services, &mut maps, now);
        if last_walk.is_none_or(|t| now.duration_since(t) >= OCCUPANCY_EVERY)
            && let Some(ns) = ktime_now_ns()
        {
            occupancy = Occupancy::walk(&maps, &services, ns);
            last_walk = Some(now);
        }
        publish_view(&services, &occupancy, &view);
        // A tick, or less when stopped (a reload waits for this thread to end).
        match &runtime {
            Some(rt) => rt.block_on(async {
                let _ = tokio::time::timeout(TICK, stop.changed()).await;
            }),
            None => std::thread::sleep(TICK),
        }
    }
}

impl Service {
    /// A service as installed: configured weights, every backend available.
    fn new(plan: CompiledLb, now: Instant) -> Service {
        let configured: Vec<u32> = plan.backends.iter().map(|b| b.weight).collect();
        Service {
            addresses: plan
                .backends
                .iter()
                .map(|b| b.address.to_string())
                .collect(),
            slow: SlowStart::new(plan.slow_start),
            available: vec![true; plan.backends.len()],
            written: configured.clone(),
            wanted: configured,
            last_build: now,
            dirty: false,
            panic: false,
            wanted_panic: false,
            last_publish: None,
            publishes: 0,
            write_errors: 0,
            plan,
        }
    }

    /// Reads health and breakers, moves slow-start ramps, and works out the wanted weights.
    fn update(&mut self, seen: &HashMap<BackendId, Seen>, now: Instant) {
        let mut changed = std::mem::take(&mut self.dirty);
        let mut states = Vec::with_capacity(self.plan.backends.len());
        for i in 0..self.plan.backends.len() {
            let id = BackendId {
                service: self.plan.service,
                index: i,
            };
            let st = seen.get(&id).copied().unwrap_or_default();
            let healthy = st.healthy();
            let breaker = st.breaker();
            let available = st.available();
            if available != self.available[i] {
                changed = true;
                if available {
                    self.slow.recovered(i, now);
                } else {
                    self.slow.lost(&i);
                }
                self.available[i] = available;
            }
            states.push((healthy, breaker == State::Open, breaker == State::HalfOpen));
        }
        let ramp_due = self
            .slow
            .next_rebuild(self.last_build)
            .is_some_and(|t| t <= now);
        if !changed && !ramp_due {
            return;
        }
        self.last_build = now;
        self.wanted_panic = panics(&self.plan, &self.available);
        let panic = self.wanted_panic;
        self.wanted = self
            .plan
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let (healthy, open, half_open) = states[i];
                if half_open && !panic {
                    return if healthy { b.weight.min(1) } else { 0 };
                }
                weight::effective(
                    b.weight,
                    healthy,
                    open,
                    panic,
                    self.slow.recovered_at(&i),
                    self.slow.window(),
                    now,
                )
            })
            .collect();
        self.slow.expire(now);
    }

    /// Whether the wanted weights differ from the datapath's and may be written now.
    fn due(&self, now: Instant) -> bool {
        (self.wanted != self.written || self.wanted_panic != self.panic)
            && self
                .last_publish
                .is_none_or(|t| now.duration_since(t) >= MIN_PUBLISH_GAP)
    }

    /// What goes before the table: the weights, and leaving panic (before the table, so new
    /// flows never see breakers ignored on a table that lacks a backend). Returns the table
    /// to publish, if the algorithm has one.
    fn write_before_table(&self, maps: &mut LbMaps) -> Result<Option<Vec<u32>>, DatapathError> {
        for (i, (&w, &old)) in self.wanted.iter().zip(&self.written).enumerate() {
            if w != old {
                maps.write_weight(&self.plan, i, w)?;
            }
        }
        if !self.wanted_panic && self.panic {
            maps.write_panic(&self.plan, false)?;
        }
        Ok((self.plan.algorithm != Algorithm::LeastConn).then(|| table(&self.plan, &self.wanted)))
    }

    /// What goes after the table: entering panic.
    fn write_after_table(&self, maps: &mut LbMaps) -> Result<(), DatapathError> {
        if self.wanted_panic && !self.panic {
            maps.write_panic(&self.plan, true)?;
        }
        Ok(())
    }

    /// Takes the outcome of a sync; a failed write is retried on the next tick. `quiet`: many
    /// services changed at once, and the caller logs them in one line (each at debug).
    fn synced(&mut self, result: Result<(), String>, now: Instant, quiet: bool) {
        match result {
            Ok(()) => {
                if quiet {
                    tracing::debug!(
                        "service {}: weights {:?} -> {:?}",
                        self.plan.name,
                        self.written,
                        self.wanted
                    );
                } else {
                    tracing::info!(
                        "service {}: weights {:?} -> {:?}",
                        self.plan.name,
                        self.written,
                        self.wanted
                    );
                }
                if self.panic != self.wanted_panic {
                    tracing::warn!(
                        "service {}: {} panic (available backends below panic_threshold {})",
                        self.plan.name,
                        if self.wanted_panic {
                            "entering"
                        } else {
                            "leaving"
                        },
                        self.plan.panic_threshold
                    );
                }
                self.panic = self.wanted_panic;
                self.written = self.wanted.clone();
                self.last_publish = Some(now);
                self.publishes += 1;
            }
            Err(e) => {
                self.write_errors += 1;
                tracing::warn!("service {}: writing weights: {e}; retrying", self.plan.name);
            }
        }
    }
}

/// Writes every service whose weights changed: weights first, then all their tables in one
/// [`LbMaps::publish_many`] (the kernel's wait after each table swap overlaps across
/// services), then the panic flags that go after the tables.
fn sync(services: &mut [Service], maps: &mut LbMaps, now: Instant) {
    let due: Vec<usize> = (0..services.len())
        .filter(|&i| services[i].due(now))
        .collect();
    let mut results: HashMap<usize, Result<(), String>> = HashMap::new();
    let mut tables = Vec::new();
    for &i in &due {
        match services[i].write_before_table(maps) {
            Ok(Some(t)) => tables.push((i, t)),
            Ok(None) => {}
            Err(e) => {
                results.insert(i, Err(e.to_string()));
            }
        }
    }
    let published: Vec<usize> = tables.iter().map(|(i, _)| *i).collect();
    let ids = tables
        .into_iter()
        .map(|(i, t)| (services[i].plan.id, t))
        .collect();
    if let Err(e) = maps.publish_many(ids) {
        for i in published {
            results.insert(i, Err(e.to_string()));
        }
    }
    // A node-wide event (a backend pool going away) changes thousands of services in one
    // tick: one line for them all, not one each.
    let quiet = due.len() > LOGGED_SERVICES_PER_TICK;
    if quiet {
        let names: Vec<&str> = (due.iter().take(LOGGED_SERVICES_PER_TICK))
            .map(|&i| services[i].plan.name.as_str())
            .collect();
        tracing::info!(
            "{} services' weights changed ({}, ...; each at log level debug)",
            due.len(),
            names.join(", ")
        );
    }
    for i in due {
        let result = match results.remove(&i) {
            Some(failed) => failed,
            None => services[i]
                .write_after_table(maps)
                .map_err(|e| e.to_string()),
        };
        services[i].synced(result, now, quiet);
    }
}

/// More services than this changing weights in one tick are logged in one line.
const LOGGED_SERVICES_PER_TICK: usize = 10;

/// The connection table as of one walk, with the counters read right after it.
#[derive(Default)]
struct Occupancy {
    /// Per VIP: (live, all) entries.
    table: HashMap<([u8; 16], u16), (u64, u64)>,
    /// Per service id: flows tracked, and flows that replaced an entry, read after the walk.
    new_flows: HashMap<usize, u64>,
    replaced: HashMap<usize, u64>,
}

impl Occupancy {
    fn walk(maps: &LbMaps, services: &[Service], now_ns: u64) -> Occupancy {
        let table = maps.occupancy(now_ns, OCCUPANCY_MAX_VISITS);
        let mut new_flows = HashMap::new();
        let mut replaced = HashMap::new();
        for s in services {
            let flows: u64 = (0..s.plan.backends.len())
                .filter_map(|i| maps.counters(&s.plan, i).ok())
                .map(|c| c.new_flows)
                .sum();
            new_flows.insert(s.plan.service, flows);
            let c = maps.service_counters(&s.plan).unwrap_or_default();
            replaced.insert(s.plan.service, c.replaced);
        }
        Occupancy {
            table,
            new_flows,
            replaced,
        }
    }
}

/// Whether a service with these available backends panics: the available backends carry
/// less than `panic_threshold` of the configured weight (never with a threshold of 0, nor
/// when every configured weight is 0).
pub fn panics(plan: &CompiledLb, available: &[bool]) -> bool {
    let total: u64 = plan.backends.iter().map(|b| u64::from(b.weight)).sum();
    if plan.panic_threshold.is_zero() || total == 0 {
        return false;
    }
    let up: u64 = plan
        .backends
        .iter()
        .zip(available)
        .filter(|(_, a)| **a)
        .map(|(b, _)| u64::from(b.weight))
        .sum();
    u128::from(up) * 1_000_000 < u128::from(plan.panic_threshold.millionths()) * u128::from(total)
}

/// Publishes what the balancer knows; the counters are filled in by [`LbView::snapshot`].
fn publish_view(services: &[Service], occupancy: &Occupancy, view: &LbView) {
    let mut svcs = Vec::with_capacity(services.len());
    let mut backends = Vec::new();
    for s in services {
        let (live, present) = occupancy
            .table
            .get(&s.plan.vip_key())
            .copied()
            .unwrap_or_default();
        let tracked = occupancy
            .new_flows
            .get(&s.plan.service)
            .copied()
            .unwrap_or(0);
        let replaced = occupancy
            .replaced
            .get(&s.plan.service)
            .copied()
            .unwrap_or(0);
        svcs.push(LbServiceView {
            service: s.plan.name.clone(),
            algorithm: s.plan.algorithm.to_string(),
            connections: live,
            evictions: tracked.saturating_sub(replaced).saturating_sub(present),
            no_backend: 0,
            lost: 0,
            client_ports_moved: 0,
            client_ports_busy: 0,
            publishes: s.publishes,
            write_errors: s.write_errors,
            panic: s.panic,
        });
        for (i, b) in s.plan.backends.iter().enumerate() {
            backends.push(LbBackendView {
                service: s.plan.name.clone(),
                address: s.addresses[i].clone(),
                configured: b.weight,
                effective: s.written[i],
                ..LbBackendView::default()
            });
        }
    }
    *view.inner.lock().unwrap_or_else(PoisonError::into_inner) = (svcs, backends);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{compile, load_str},
        supervisor::Backend,
    };

    fn service(threshold: &str, weights: &[u32]) -> CompiledLb {
        let list: String = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!(
                    "      - {{ address: \"10.0.0.{}:80\", weight: {w} }}\n",
                    i + 1
                )
            })
            .collect();
        let text = format!(
            "version: 1\ninterfaces: [{{ name: eth0 }}]\nservices:\n  - name: web\n    \
             match: {{ address: 198.18.0.1, port: 80 }}\n    backends:\n{list}    \
             load_balancing: {{ panic_threshold: \"{threshold}\" }}\n"
        );
        let policy = load_str(&text, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        compile(&policy).lb.remove(0)
    }

    #[test]
    fn panic_below_the_threshold_of_configured_weight_only() {
        let s = service("50%", &[100, 100, 200]);
        // 200 of 400 available: exactly 50%, not below it.
        assert!(!panics(&s, &[false, false, true]));
        // 100 of 400: below.
        assert!(panics(&s, &[true, false, false]));
        assert!(panics(&s, &[false, false, false]));
        assert!(!panics(&s, &[true, true, true]));
    }

    #[test]
    fn zero_threshold_or_zero_weight_never_panics() {
        assert!(!panics(&service("0%", &[100, 100]), &[false, false]));
        assert!(!panics(&service("50%", &[0, 0]), &[false, false]));
        // A drained backend (weight 0) counts for nothing either way.
        assert!(!panics(&service("50%", &[100, 0]), &[true, false]));
        assert!(panics(&service("50%", &[100, 0]), &[false, true]));
    }

    #[test]
    fn tables_name_lb_indices_and_skip_weight_zero() {
        let s = service("0%", &[100, 0, 100]);
        let t = table(&s, &[100, 0, 100]);
        assert_eq!(t.len(), s.capacity as usize);
        assert!(t.iter().all(|&i| i == s.index(0) || i == s.index(2)));
        assert!(table(&s, &[0, 0, 0]).iter().all(|&i| i == NO_BACKEND));
    }

    /// Backend `index` of service `service` as the supervisor would publish it.
    fn published(
        service: usize,
        index: usize,
        health: Option<Health>,
        breaker: Option<State>,
    ) -> Backend {
        let mut b = Backend::new(
            BackendId { service, index },
            Arc::from("web"),
            format!("10.0.0.{}:80", index + 1).parse().unwrap(),
            health.is_some(),
            breaker.is_some(),
            Instant::now(),
        );
        b.health = health;
        b.breaker = breaker;
        b
    }

    #[test]
    fn new_flows_follow_the_typed_state_on_the_channel() {
        use {Health::*, State::*};
        let t0 = Instant::now();
        let mut s = Service::new(service("0%", &[100; 6]), t0);
        let (tx, rx) = watch::channel(vec![
            published(0, 0, Some(Healthy), Some(Closed)),
            published(0, 1, Some(Unhealthy), Some(Closed)),
            published(0, 2, Some(Healthy), Some(Open)),
            published(0, 3, Some(Healthy), Some(HalfOpen)),
            published(0, 4, Some(Unhealthy), Some(HalfOpen)),
            // Neither checked nor guarded: takes flows (fail open).
            published(0, 5, None, None),
            // Another service's backend at the same index: not this one.
            published(1, 0, Some(Unhealthy), Some(Open)),
        ]);
        s.update(&read(Some(&rx)), t0);
        assert_eq!(s.available, [true, false, false, false, false, true]);
        assert_eq!(
            s.wanted,
            [100, 0, 0, 1, 0, 100],
            "unhealthy and open: no new flows; half-open: a trickle (weight 1) if healthy"
        );

        // Closed again (no slow start configured): back at its full weight.
        tx.send_modify(|v| v[2].breaker = Some(Closed));
        s.update(&read(Some(&rx)), t0 + Duration::from_millis(1));
        assert_eq!(s.available, [true, false, true, false, false, true]);
        assert_eq!(s.wanted, [100, 0, 100, 1, 0, 100]);
    }

    #[test]
    fn after_adoption_the_first_table_leaves_out_backends_whose_breaker_is_open() {
        use State::*;
        let s = service("0%", &[100, 100, 100, 100]);
        let id = |index| BackendId { service: 0, index };
        let breakers = HashMap::from([
            (id(1), Open),
            (id(2), HalfOpen),
            (id(3), Closed),
            // Another service's backend at the same index: not this one.
            (
                BackendId {
                    service: 1,
                    index: 0,
                },
                Open,
            ),
        ]);
        let w = first_weights(&s, true, &breakers, &HashMap::new());
        assert_eq!(w, [100, 0, 1, 100], "open: none; half-open: a trickle");
        let t = table(&s, &w);
        assert!(
            !t.contains(&s.index(1)),
            "the open backend gets no new flow"
        );
        assert!(t.contains(&s.index(2)) && t.contains(&s.index(0)));
    }

    #[test]
    fn fresh_maps_and_closed_breakers_start_from_configured_weights() {
        let s = service("0%", &[100, 50]);
        let open = HashMap::from([(
            BackendId {
                service: 0,
                index: 1,
            },
            State::Open,
        )]);
        assert_eq!(
            first_weights(&s, false, &open, &HashMap::new()),
            [100, 50],
            "not adopted"
        );
        assert_eq!(
            first_weights(&s, true, &HashMap::new(), &HashMap::new()),
            [100, 50]
        );
    }

    #[test]
    fn after_adoption_a_service_past_its_panic_threshold_fails_open() {
        let s = service("50%", &[100, 100]);
        let open = HashMap::from([
            (
                BackendId {
                    service: 0,
                    index: 0,
                },
                State::Open,
            ),
            (
                BackendId {
                    service: 0,
                    index: 1,
                },
                State::Open,
            ),
        ]);
        assert_eq!(first_weights(&s, true, &open, &HashMap::new()), [100, 100]);
    }

    #[test]
    fn without_a_supervisor_every_backend_takes_flows() {
        let t0 = Instant::now();
        let mut s = Service::new(service("0%", &[100, 50]), t0);
        s.dirty = true;
        s.update(&read(None), t0);
        assert_eq!(s.available, [true, true]);
        assert_eq!(s.wanted, [100, 50]);
    }
}
