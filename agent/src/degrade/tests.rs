//! Host tests of the evaluator's pure parts: windows, conditions, hysteresis, node-wide
//! shedding, adoption and reloads. The clock is passed in; nothing sleeps.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{
    degrade::{MODE_FALLBACK, MODE_NORMAL, MODE_SHED},
    policy::units::Percent,
    status::{PassiveCounts, ServiceStatus, StatusReport},
};

use super::{
    Config, Engine, ModeSink, Note, ProbeSample, ServiceSpec,
    condition::{self, Measure},
    hysteresis::{Change, Hysteresis},
    shed::{Level, Present, Shedder},
    window::{Attempts, Windows},
};
use crate::{
    breaker::State,
    config::model::{Condition, ConditionKind, Degradation, Fallback, FallbackStrategy, Priority},
    datapath::DatapathError,
    health::Health,
    supervisor::{Backend, BackendId, Backends},
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn latency(threshold_ms: u64, window: Duration) -> Condition {
    Condition {
        kind: ConditionKind::Latency {
            threshold: ms(threshold_ms),
        },
        window,
    }
}

fn error_rate(percent: u32, window: Duration) -> Condition {
    Condition {
        kind: ConditionKind::ErrorRate {
            threshold: Percent::whole(percent),
        },
        window,
    }
}

fn availability(percent: u32, window: Duration) -> Condition {
    Condition {
        kind: ConditionKind::Availability {
            threshold: Percent::whole(percent),
        },
        window,
    }
}

fn spec(
    name: &str,
    id: u32,
    priority: Priority,
    strategy: FallbackStrategy,
    conditions: Vec<Condition>,
    recover_after: Duration,
) -> ServiceSpec {
    ServiceSpec {
        name: Arc::from(name),
        id,
        priority,
        degradation: Degradation {
            conditions,
            fallback: Fallback {
                strategy,
                ..Fallback::default()
            },
            recover_after,
        },
    }
}

/// A service falling back when its probes' p99 passes 500ms over 2s; recovers after 10s.
fn web(id: u32) -> ServiceSpec {
    spec(
        "web",
        id,
        Priority::Core,
        FallbackStrategy::StaticResponse,
        vec![latency(500, secs(2))],
        secs(10),
    )
}

/// A `shed` service degraded while less than half its backends are available over 1s.
fn shed(name: &str, id: u32, priority: Priority) -> ServiceSpec {
    spec(
        name,
        id,
        priority,
        FallbackStrategy::Shed,
        vec![availability(50, secs(1))],
        secs(5),
    )
}

/// A core `static_response` service with one condition; recovers after 5s.
fn static_response(name: &str, id: u32, condition: Condition) -> ServiceSpec {
    spec(
        name,
        id,
        Priority::Core,
        FallbackStrategy::StaticResponse,
        vec![condition],
        secs(5),
    )
}

fn config(services: Vec<ServiceSpec>) -> Config {
    Config {
        services,
        shed_step: secs(10),
        companions: Vec::new(),
    }
}

/// An engine started now on `services` with a fresh map (holding what the start wrote).
/// Returns the start time, the engine and the map.
fn started(services: Vec<ServiceSpec>) -> (Instant, Engine, Recorder) {
    let t0 = Instant::now();
    let mut map = Recorder::default();
    let (e, _) = Engine::start(config(services), t0, &mut map);
    (t0, e, map)
}

/// The map, as the engine writes it; `fail` makes every write fail.
#[derive(Debug, Default)]
struct Recorder {
    modes: HashMap<u32, u32>,
    writes: Vec<(u32, u32)>,
    fail: bool,
}

impl ModeSink for Recorder {
    fn write(&mut self, id: u32, mode: u32) -> Result<(), DatapathError> {
        if self.fail {
            return Err(DatapathError::Kernel("refused by the test".into()));
        }
        self.writes.push((id, mode));
        self.modes.insert(id, mode);
        Ok(())
    }

    fn read(&self, id: u32) -> Result<u32, DatapathError> {
        Ok(self.modes.get(&id).copied().unwrap_or(MODE_NORMAL))
    }
}

impl Recorder {
    fn mode(&self, id: u32) -> u32 {
        self.modes.get(&id).copied().unwrap_or(MODE_NORMAL)
    }

    fn take(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.writes)
    }
}

fn sample(service: &str, at: Instant, latency: Duration, ok: bool) -> ProbeSample {
    ProbeSample {
        service: Arc::from(service),
        at,
        latency,
        ok,
    }
}

fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 8000 + n))
}

fn backend(service: &str, n: u16, health: Option<Health>, breaker: Option<State>) -> Backend {
    let mut b = Backend::new(
        BackendId {
            service: 0,
            index: usize::from(n),
        },
        Arc::from(service),
        addr(n),
        health.is_some(),
        breaker.is_some(),
        Instant::now(),
    );
    b.health = health;
    b.breaker = breaker;
    b
}

/// `up` of `total` backends of `service` healthy (the rest unhealthy).
fn pool(service: &str, up: u16, total: u16) -> Backends {
    (0..total)
        .map(|n| {
            let h = if n < up {
                Health::Healthy
            } else {
                Health::Unhealthy
            };
            backend(service, n, Some(h), None)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Windows

#[test]
fn p99_is_the_nearest_rank() {
    let t0 = Instant::now();
    let now = t0 + secs(1);
    let p99 = |latencies: &[u64]| {
        let mut w = Windows::new(secs(10));
        for &l in latencies {
            w.probe(t0, ms(l), true);
        }
        w.latency_p99(now, secs(10))
    };
    // 100 samples: the 99th smallest.
    let hundred: Vec<u64> = (1..=100).rev().collect();
    assert_eq!(p99(&hundred), (Some(ms(99)), 100));
    // 200 samples: rank 198.
    let two_hundred: Vec<u64> = (1..=200).collect();
    assert_eq!(p99(&two_hundred), (Some(ms(198)), 200));
    // Fewer than 100: the largest (rank ceil(0.99 n) = n).
    assert_eq!(p99(&[5, 700, 10]), (Some(ms(700)), 3));
    assert_eq!(p99(&[42]), (Some(ms(42)), 1));
    assert_eq!(p99(&[]), (None, 0));
}

#[test]
fn a_sample_is_in_the_window_until_the_window_has_passed() {
    let t0 = Instant::now();
    let mut w = Windows::new(secs(2));
    w.probe(t0, ms(600), true);
    assert_eq!(w.latency_p99(t0 + ms(1999), secs(2)).1, 1);
    assert_eq!(
        w.latency_p99(t0 + secs(2), secs(2)).1,
        0,
        "exactly a window old: out"
    );
    // A shorter window of the same service sees less.
    assert_eq!(w.latency_p99(t0 + ms(1500), secs(1)).1, 0);
    w.prune(t0 + secs(2));
    assert_eq!(w.latency_p99(t0 + ms(1), secs(2)).1, 0, "pruned");
}

#[test]
fn the_error_rate_counts_probes_and_passive_attempts_by_difference() {
    let t0 = Instant::now();
    let mut w = Windows::new(secs(10));
    let counts = |synack, refused, timeout| PassiveCounts {
        synack,
        refused,
        timeout,
    };
    // The first reading is a baseline (history), not attempts.
    w.passive(
        t0,
        &[(addr(0), counts(100, 50, 50)), (addr(1), counts(7, 0, 0))],
    );
    assert_eq!(w.attempts(t0, secs(10)), Attempts::default());
    w.probe(t0, ms(1), true);
    w.probe(t0, ms(1), true);
    w.probe(t0, ms(1), false);
    // +5 answered, +1 refused, +1 unanswered on one backend; the other unchanged.
    w.passive(
        t0 + ms(100),
        &[(addr(0), counts(105, 51, 51)), (addr(1), counts(7, 0, 0))],
    );
    assert_eq!(
        w.attempts(t0 + ms(100), secs(10)),
        Attempts {
            total: 10,
            failed: 3
        }
    );
    // Counts that went down (another supervisor's) give a new baseline, no attempts; a
    // backend seen for the first time too.
    w.passive(
        t0 + ms(200),
        &[(addr(0), counts(1, 0, 0)), (addr(2), counts(9, 9, 9))],
    );
    assert_eq!(w.attempts(t0 + ms(200), secs(10)).total, 10);
    w.passive(
        t0 + ms(300),
        &[(addr(0), counts(2, 0, 0)), (addr(2), counts(9, 10, 9))],
    );
    assert_eq!(
        w.attempts(t0 + ms(300), secs(10)),
        Attempts {
            total: 12,
            failed: 4
        }
    );
    // Out of the window, in the order they happened.
    assert_eq!(w.attempts(t0 + ms(10_250), secs(10)).total, 2);
}

#[test]
fn availability_is_the_mean_of_the_readings_in_the_window() {
    let t0 = Instant::now();
    let mut w = Windows::new(secs(1));
    for (i, share) in [1.0, 1.0, 0.0, 0.5].into_iter().enumerate() {
        w.availability(t0 + ms(100 * i as u64), Some(share));
    }
    w.availability(t0 + ms(400), None);
    assert_eq!(w.availability_mean(t0 + ms(300), secs(1)), (Some(0.625), 4));
    assert_eq!(w.availability_mean(t0 + ms(1150), secs(1)), (Some(0.25), 2));
    assert_eq!(w.availability_mean(t0 + secs(5), secs(1)), (None, 0));
}

// ---------------------------------------------------------------------------------------
// Conditions

fn measured(c: &Condition, fill: impl FnOnce(&mut Windows, Instant)) -> Measure {
    let t0 = Instant::now();
    let mut w = Windows::new(c.window);
    fill(&mut w, t0);
    condition::measure(c, &w, t0 + ms(1))
}

#[test]
fn latency_is_met_above_its_threshold_and_never_without_samples() {
    let c = latency(500, secs(2));
    let at = |l: u64| measured(&c, |w, t0| w.probe(t0, ms(l), true));
    assert!(at(612).met);
    assert!(!at(500).met, "not above: equal");
    let none = measured(&c, |_, _| {});
    assert_eq!((none.value, none.samples, none.met), (None, 0, false));
    let m = at(612);
    assert_eq!(
        condition::describe(&c, &m),
        "latency p99 612ms > 500ms over 2s"
    );
    let st = condition::status(&c, &m);
    assert_eq!(
        (st.r#type.as_str(), st.threshold.as_str(), st.window_seconds),
        ("latency", "500ms", 2.0)
    );
    assert_eq!((st.value, st.samples, st.met), (Some(0.612), 1, true));
}

#[test]
fn a_timed_out_probe_counts_its_latency() {
    // A failed probe's latency (at least its timeout) is part of the p99.
    let c = latency(500, secs(2));
    let m = measured(&c, |w, t0| {
        w.probe(t0, ms(20), true);
        w.probe(t0, ms(1000), false);
    });
    assert_eq!(m.value, Some(1.0));
    assert!(m.met);
}

#[test]
fn error_rate_is_met_strictly_above_its_threshold() {
    let c = error_rate(50, secs(5));
    let rate = |ok: usize, failed: usize| {
        measured(&c, |w, t0| {
            (0..ok).for_each(|_| w.probe(t0, ms(1), true));
            (0..failed).for_each(|_| w.probe(t0, ms(1), false));
        })
    };
    assert!(!rate(1, 1).met, "exactly 50%");
    let m = rate(3, 5);
    assert!(m.met);
    assert_eq!((m.value, m.samples), (Some(0.625), 8));
    assert_eq!(
        condition::describe(&c, &m),
        "error_rate 62.5% > 50% over 5s"
    );
    assert!(!rate(0, 0).met, "no attempt: not met");
}

#[test]
fn availability_is_met_strictly_below_its_threshold() {
    let c = availability(80, secs(10));
    let at = |share: f64| measured(&c, |w, t0| w.availability(t0, Some(share)));
    assert!(at(0.4).met);
    assert!(!at(0.8).met);
    assert!(!measured(&c, |_, _| {}).met, "no reading: not met");
    assert_eq!(
        condition::describe(&c, &at(0.4)),
        "availability 40% < 80% over 10s"
    );
}

// ---------------------------------------------------------------------------------------
// Hysteresis

#[test]
fn recovery_comes_exactly_after_recover_after_and_not_before() {
    let t0 = Instant::now();
    let after = secs(10);
    let mut h = Hysteresis::new(t0, None);
    assert_eq!(h.update(t0, false, String::new, after), None);
    assert_eq!(
        h.update(t0 + secs(1), true, || "cause".into(), after),
        Some(Change::Degraded)
    );
    assert_eq!(h.cause(), Some("cause"));
    // Clear from 2s on.
    assert_eq!(h.update(t0 + secs(2), false, String::new, after), None);
    assert_eq!(h.clear_for(t0 + secs(7)), secs(5));
    assert_eq!(h.update(t0 + ms(11_900), false, String::new, after), None);
    assert!(h.degraded());
    assert_eq!(
        h.update(t0 + secs(12), false, String::new, after),
        Some(Change::Recovered)
    );
    assert!(!h.degraded());
    assert_eq!(h.cause(), Some("recovered: all conditions false for 10s"));
    assert_eq!(h.since(), t0 + secs(12));
    assert_eq!(h.clear_for(t0 + secs(13)), Duration::ZERO);
}

#[test]
fn an_oscillating_condition_does_not_flap() {
    let t0 = Instant::now();
    let after = secs(10);
    let mut h = Hysteresis::new(t0, None);
    let mut changes = Vec::new();
    // Met one second in three, for two minutes, at 100ms ticks.
    for tick in 0..1200u64 {
        let met = (tick / 10) % 3 == 0;
        if let Some(c) = h.update(t0 + ms(100 * tick), met, || "c".into(), after) {
            changes.push(c);
        }
    }
    assert_eq!(changes, vec![Change::Degraded], "one change, no flapping");
    // Then it stays unmet: recovered once recover_after has passed since the last met tick.
    let last_met = (0..1200u64).filter(|t| (t / 10) % 3 == 0).max().unwrap();
    let mut recovered_at = None;
    for tick in 1200..1400u64 {
        if h.update(t0 + ms(100 * tick), false, String::new, after) == Some(Change::Recovered) {
            recovered_at = Some(tick);
            break;
        }
    }
    // The clock starts at the first unmet tick after the last met one.
    assert_eq!(recovered_at, Some(last_met + 1 + 100));
}

// ---------------------------------------------------------------------------------------
// Shed level

#[test]
fn the_level_escalates_one_present_level_per_step_and_comes_back_core_first() {
    let t0 = Instant::now();
    let step = secs(10);
    let all = Present::of([Priority::Low, Priority::Normal, Priority::Core]);
    let mut s = Shedder::new(Level::None, t0);
    assert_eq!(s.update(t0, false, all, step), None);
    // The first step at once.
    assert_eq!(
        s.update(t0 + secs(1), true, all, step),
        Some((Level::None, Level::Low))
    );
    assert_eq!(s.update(t0 + ms(10_900), true, all, step), None);
    assert_eq!(
        s.update(t0 + secs(11), true, all, step),
        Some((Level::Low, Level::Normal))
    );
    assert_eq!(
        s.update(t0 + secs(21), true, all, step),
        Some((Level::Normal, Level::Core))
    );
    assert_eq!(
        s.update(t0 + secs(60), true, all, step),
        None,
        "nothing above core"
    );
    // Without pressure: one level back per step, core first.
    assert_eq!(
        s.update(t0 + secs(61), false, all, step),
        Some((Level::Core, Level::Normal))
    );
    assert_eq!(s.update(t0 + secs(65), false, all, step), None);
    assert_eq!(
        s.update(t0 + secs(71), false, all, step),
        Some((Level::Normal, Level::Low))
    );
    assert_eq!(
        s.update(t0 + secs(81), false, all, step),
        Some((Level::Low, Level::None))
    );
    assert_eq!(s.update(t0 + secs(200), false, all, step), None);
}

#[test]
fn empty_levels_are_skipped_both_ways() {
    let t0 = Instant::now();
    let step = secs(10);
    let ends = Present::of([Priority::Low, Priority::Core]);
    let mut s = Shedder::new(Level::None, t0);
    assert_eq!(
        s.update(t0, true, ends, step),
        Some((Level::None, Level::Low))
    );
    assert_eq!(
        s.update(t0 + step, true, ends, step),
        Some((Level::Low, Level::Core))
    );
    assert_eq!(
        s.update(t0 + step * 2, false, ends, step),
        Some((Level::Core, Level::Low))
    );
    assert_eq!(
        s.update(t0 + step * 3, false, ends, step),
        Some((Level::Low, Level::None))
    );
    // Only core services: core at once (nothing else is left).
    let core = Present::of([Priority::Core]);
    let mut s = Shedder::new(Level::None, t0);
    assert_eq!(
        s.update(t0, true, core, step),
        Some((Level::None, Level::Core))
    );
    // No shed group at all: nothing to shed.
    let mut s = Shedder::new(Level::None, t0);
    assert_eq!(s.update(t0, true, Present::default(), step), None);
}

#[test]
fn levels_shed_low_first_and_core_last() {
    use Priority::*;
    assert!(!Level::None.sheds(Low));
    assert!(Level::Low.sheds(Low) && !Level::Low.sheds(Normal));
    assert!(Level::Normal.sheds(Normal) && !Level::Normal.sheds(Core));
    assert!(Level::Core.sheds(Core) && Level::Core.sheds(Low));
    assert_eq!(
        [Level::None, Level::Low, Level::Normal, Level::Core].map(Level::code),
        [0, 1, 2, 3]
    );
}

// ---------------------------------------------------------------------------------------
// Engine

#[test]
fn a_slow_pool_falls_back_within_a_window_and_recovers_after_recover_after() {
    let t0 = Instant::now();
    let mut map = Recorder::default();
    let (mut e, notes) = Engine::start(config(vec![web(7)]), t0, &mut map);
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(
        map.take(),
        vec![(7, MODE_NORMAL)],
        "every mode written at start"
    );

    // Fast probes: nothing happens and nothing is written.
    let fast = [sample("web", t0, ms(20), true)];
    assert!(e.tick(t0 + ms(100), &fast, None, &mut map).is_empty());
    assert!(map.take().is_empty(), "writes on change only");

    // One slow probe: p99 over 2s is above 500ms.
    let slow = [sample("web", t0 + ms(150), ms(612), true)];
    let notes = e.tick(t0 + ms(200), &slow, None, &mut map);
    assert_eq!(
        notes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vec!["service web: normal -> fallback (latency p99 612ms > 500ms over 2s)"]
    );
    assert_eq!(map.take(), vec![(7, MODE_FALLBACK)]);
    assert_eq!(e.mode("web"), Some(MODE_FALLBACK));

    // The slow probe leaves the window at 2.15s; recovery 10s after that, not before.
    for tick in 3..=121u64 {
        let now = t0 + ms(100 * tick);
        let notes = e.tick(now, &[], None, &mut map);
        assert!(notes.is_empty(), "at {tick}: {notes:?}");
    }
    assert_eq!(e.mode("web"), Some(MODE_FALLBACK));
    let notes = e.tick(t0 + ms(12_200), &[], None, &mut map);
    assert_eq!(
        notes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vec!["service web: fallback -> normal (recovered: all conditions false for 10s)"]
    );
    assert_eq!(map.take(), vec![(7, MODE_NORMAL)]);

    let t = e.transitions();
    assert_eq!(
        t.iter()
            .map(|t| (t.from, t.to, t.count))
            .collect::<Vec<_>>(),
        vec![("normal", "fallback", 1), ("fallback", "normal", 1)]
    );
}

#[test]
fn the_first_met_condition_is_the_cause() {
    let s = spec(
        "api",
        1,
        Priority::Core,
        FallbackStrategy::CacheOnly,
        vec![latency(500, secs(5)), error_rate(50, secs(5))],
        secs(60),
    );
    let (t0, mut e, mut map) = started(vec![s]);
    let failing = [
        sample("api", t0, ms(30), false),
        sample("api", t0, ms(30), false),
        sample("other", t0, ms(9000), false),
    ];
    let notes = e.tick(t0 + ms(100), &failing, None, &mut map);
    assert_eq!(
        notes[0].to_string(),
        "service api: normal -> fallback (error_rate 100% > 50% over 5s)"
    );
    let (services, _) = e.status(t0 + ms(300));
    let (id, _, st) = &services[0];
    assert_eq!(*id, 1);
    assert!(st.degraded);
    assert_eq!(st.mode, "fallback");
    assert_eq!(st.cause.as_deref(), Some("error_rate 100% > 50% over 5s"));
    assert_eq!(st.transitions, 1);
    assert!((st.in_state_seconds - 0.2).abs() < 1e-9);
    assert_eq!(st.conditions.len(), 2);
    assert_eq!(
        (st.conditions[0].met, st.conditions[0].samples),
        (false, 2),
        "30ms is fast"
    );
    assert_eq!(st.conditions[1].value, Some(1.0));
}

#[test]
fn availability_counts_unhealthy_and_open_backends_as_unavailable() {
    let s = static_response("pay", 3, availability(60, secs(1)));
    let (t0, mut e, mut map) = started(vec![s]);
    let backends: Backends = vec![
        backend("pay", 0, Some(Health::Healthy), Some(State::Closed)),
        backend("pay", 1, Some(Health::Healthy), Some(State::HalfOpen)),
        backend("pay", 2, None, None),
        backend("pay", 3, Some(Health::Unhealthy), Some(State::Closed)),
        backend("pay", 4, Some(Health::Healthy), Some(State::Open)),
        // Another service's (a companion's) backends do not count.
        backend("pay.fallback", 5, Some(Health::Unhealthy), None),
    ];
    e.tick(t0 + ms(100), &[], Some(&backends), &mut map);
    let (services, _) = e.status(t0 + ms(100));
    assert_eq!(services[0].2.conditions[0].value, Some(0.6));
    assert!(!services[0].2.degraded, "60% is not below 60%");
    let worse: Backends = backends[2..].to_vec();
    e.tick(t0 + ms(200), &[], Some(&worse), &mut map);
    // Mean of 60% and 33%.
    let (services, _) = e.status(t0 + ms(200));
    let v = services[0].2.conditions[0].value.unwrap();
    assert!((v - (0.6 + 1.0 / 3.0) / 2.0).abs() < 1e-9, "{v}");
    assert!(services[0].2.degraded);
    assert_eq!(map.mode(3), MODE_FALLBACK);
}

#[test]
fn passive_failures_feed_the_error_rate() {
    let s = static_response("db", 4, error_rate(50, secs(5)));
    let (t0, mut e, mut map) = started(vec![s]);
    let with = |synack, refused| {
        let mut b = backend("db", 0, None, Some(State::Closed));
        b.passive = Some(PassiveCounts {
            synack,
            refused,
            timeout: 0,
        });
        vec![b]
    };
    e.tick(t0 + ms(100), &[], Some(&with(10, 0)), &mut map);
    e.tick(t0 + ms(200), &[], Some(&with(12, 1)), &mut map);
    assert_eq!(e.degraded("db"), Some(false), "1 of 3");
    e.tick(t0 + ms(300), &[], Some(&with(12, 5)), &mut map);
    assert_eq!(e.degraded("db"), Some(true), "5 of 7");
    assert_eq!(map.mode(4), MODE_FALLBACK);
}

/// Shed services: low `batch`, normal `search`, core `checkout`; each degraded while fewer
/// than half its backends are available.
fn shed_group() -> (Config, Instant, Engine, Recorder) {
    let t0 = Instant::now();
    let cfg = config(vec![
        shed("batch", 1, Priority::Low),
        shed("search", 2, Priority::Normal),
        shed("checkout", 3, Priority::Core),
    ]);
    let mut map = Recorder::default();
    let (e, _) = Engine::start(cfg.clone(), t0, &mut map);
    map.take();
    (cfg, t0, e, map)
}

fn pools(down: &[&str]) -> Backends {
    ["batch", "search", "checkout"]
        .into_iter()
        .flat_map(|s| {
            if down.contains(&s) {
                pool(s, 0, 2)
            } else {
                pool(s, 2, 2)
            }
        })
        .collect()
}

fn modes(map: &Recorder) -> [u32; 3] {
    [map.mode(1), map.mode(2), map.mode(3)]
}

#[test]
fn shedding_escalates_low_first_and_core_only_when_nothing_else_is_left() {
    let (_, t0, mut e, mut map) = shed_group();
    let down = pools(&["checkout"]);
    let at = |s: u64| t0 + ms(s);
    // checkout degraded: low shed at once, though only checkout is degraded.
    let notes = e.tick(at(100), &[], Some(&down), &mut map);
    let lines: Vec<String> = notes.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        vec![
            "checkout degraded (availability 0% < 50% over 1s): shedding pressure",
            "shed level: none -> low (degraded: checkout)",
            "service batch: normal -> shed (shed level low)",
        ]
    );
    assert_eq!(modes(&map), [MODE_SHED, MODE_NORMAL, MODE_NORMAL]);
    // One level per shed_step (10s).
    e.tick(at(10_000), &[], Some(&down), &mut map);
    assert_eq!(e.level(), Level::Low);
    e.tick(at(10_100), &[], Some(&down), &mut map);
    assert_eq!(e.level(), Level::Normal);
    assert_eq!(modes(&map), [MODE_SHED, MODE_SHED, MODE_NORMAL]);
    e.tick(at(20_000), &[], Some(&down), &mut map);
    assert_eq!(
        modes(&map),
        [MODE_SHED, MODE_SHED, MODE_NORMAL],
        "core not yet"
    );
    e.tick(at(20_100), &[], Some(&down), &mut map);
    assert_eq!(modes(&map), [MODE_SHED, MODE_SHED, MODE_SHED]);
    let (_, shedding) = e.status(at(25_100));
    assert_eq!(shedding.level, "core");
    assert!(shedding.pressure);
    assert_eq!(shedding.shed, vec!["batch", "search", "checkout"]);
    assert_eq!(shedding.level_for_seconds, 5.0);

    // Recovery: availability back; degraded until 1s window + 5s recover_after.
    let up = pools(&[]);
    let mut t = 20_200;
    while e.degraded("checkout") == Some(true) {
        e.tick(at(t), &[], Some(&up), &mut map);
        t += 100;
        assert!(t < 30_000, "recovers");
    }
    // Core first, one level per step from the last change.
    let mut seen = vec![(t, modes(&map))];
    while e.level() != Level::None {
        e.tick(at(t), &[], Some(&up), &mut map);
        if seen.last().map(|s| s.1) != Some(modes(&map)) {
            seen.push((t, modes(&map)));
        }
        t += 100;
        assert!(t < 90_000);
    }
    assert_eq!(
        seen.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![
            [MODE_SHED, MODE_SHED, MODE_SHED],
            [MODE_SHED, MODE_SHED, MODE_NORMAL],
            [MODE_SHED, MODE_NORMAL, MODE_NORMAL],
            [MODE_NORMAL, MODE_NORMAL, MODE_NORMAL],
        ]
    );
    assert_eq!(seen[2].0 - seen[1].0, 10_000);
    assert_eq!(seen[3].0 - seen[2].0, 10_000);
}

#[test]
fn a_low_service_degraded_alone_sheds_only_itself_while_pressure_lasts_one_step() {
    let (_, t0, mut e, mut map) = shed_group();
    let down = pools(&["batch"]);
    e.tick(t0 + ms(100), &[], Some(&down), &mut map);
    assert_eq!(modes(&map), [MODE_SHED, MODE_NORMAL, MODE_NORMAL]);
    let (_, shedding) = e.status(t0 + ms(100));
    assert_eq!(shedding.shed, vec!["batch"]);
}

#[test]
fn skipped_levels_in_the_engine() {
    let t0 = Instant::now();
    let mut map = Recorder::default();
    let cfg = config(vec![
        shed("batch", 1, Priority::Low),
        shed("checkout", 3, Priority::Core),
    ]);
    let (mut e, _) = Engine::start(cfg, t0, &mut map);
    let down: Backends = pool("batch", 0, 1)
        .into_iter()
        .chain(pool("checkout", 1, 1))
        .collect();
    e.tick(t0 + ms(100), &[], Some(&down), &mut map);
    assert_eq!(e.level(), Level::Low);
    e.tick(t0 + ms(10_100), &[], Some(&down), &mut map);
    assert_eq!(
        e.level(),
        Level::Core,
        "no normal service: straight to core"
    );
    assert_eq!([map.mode(1), map.mode(3)], [MODE_SHED, MODE_SHED]);
}

#[test]
fn an_adopted_fallback_starts_degraded_and_recovers_through_recover_after() {
    let t0 = Instant::now();
    let mut map = Recorder::default();
    map.modes.insert(7, MODE_FALLBACK);
    let (mut e, notes) = Engine::start(config(vec![web(7)]), t0, &mut map);
    assert!(notes.is_empty(), "no transition: {notes:?}");
    assert_eq!(e.mode("web"), Some(MODE_FALLBACK));
    assert_eq!(
        map.take(),
        vec![(7, MODE_FALLBACK)],
        "written again at start"
    );
    let (services, _) = e.status(t0);
    assert_eq!(
        services[0].2.cause.as_deref(),
        Some("adopted: the datapath held mode fallback")
    );
    // No samples: every condition false from the first tick; recovered 10s later.
    e.tick(t0 + ms(100), &[], None, &mut map);
    e.tick(t0 + ms(10_000), &[], None, &mut map);
    assert_eq!(e.mode("web"), Some(MODE_FALLBACK));
    let notes = e.tick(t0 + ms(10_100), &[], None, &mut map);
    assert_eq!(notes.len(), 1);
    assert_eq!(map.take(), vec![(7, MODE_NORMAL)]);
}

#[test]
fn adopted_shed_modes_resume_the_shed_level() {
    let t0 = Instant::now();
    let mut map = Recorder::default();
    map.modes.insert(1, MODE_SHED);
    map.modes.insert(2, MODE_SHED);
    let cfg = config(vec![
        shed("batch", 1, Priority::Low),
        shed("search", 2, Priority::Normal),
        shed("checkout", 3, Priority::Core),
    ]);
    let (mut e, notes) = Engine::start(cfg, t0, &mut map);
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(e.level(), Level::Normal);
    assert_eq!(modes(&map), [MODE_SHED, MODE_SHED, MODE_NORMAL]);
    // Degraded (adopted) until recover_after: the pressure holds the level meanwhile, and
    // after a step it goes on to core.
    let up = pools(&[]);
    e.tick(t0 + ms(100), &[], Some(&up), &mut map);
    assert_eq!(e.degraded("batch"), Some(true));
    e.tick(t0 + ms(5_000), &[], Some(&up), &mut map);
    assert_eq!(e.level(), Level::Normal);
    e.tick(t0 + ms(5_100), &[], Some(&up), &mut map);
    assert_eq!(e.degraded("batch"), Some(false), "5s clear");
    assert_eq!(e.level(), Level::Normal);
    e.tick(t0 + ms(15_100), &[], Some(&up), &mut map);
    assert_eq!(e.level(), Level::Low);
}

#[test]
fn an_unknown_mode_in_the_map_is_normal() {
    let t0 = Instant::now();
    let mut map = Recorder::default();
    map.modes.insert(7, 99);
    let (e, _) = Engine::start(config(vec![web(7)]), t0, &mut map);
    assert_eq!(e.degraded("web"), Some(false));
    assert_eq!(map.mode(7), MODE_NORMAL);
}

#[test]
fn a_failed_write_is_noted_once_and_retried_every_tick() {
    let (t0, mut e, mut map) = started(vec![web(7)]);
    map.take();
    map.fail = true;
    let slow = [sample("web", t0, ms(900), true)];
    let notes = e.tick(t0 + ms(100), &slow, None, &mut map);
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(matches!(
        notes[1],
        Note::WriteFailed {
            id: 7,
            mode: MODE_FALLBACK,
            ..
        }
    ));
    assert!(notes[1].is_warning());
    assert!(
        e.tick(t0 + ms(200), &[], None, &mut map).is_empty(),
        "noted once"
    );
    map.fail = false;
    e.tick(t0 + ms(300), &[], None, &mut map);
    assert_eq!(map.take(), vec![(7, MODE_FALLBACK)]);
    e.tick(t0 + ms(400), &[], None, &mut map);
    assert!(map.take().is_empty());
}

#[test]
fn a_reload_carries_state_and_windows_by_name() {
    let other = static_response("api", 2, error_rate(50, secs(5)));
    let (t0, mut e, mut map) = started(vec![web(7), other.clone()]);
    let slow = [sample("web", t0, ms(900), true)];
    e.tick(t0 + ms(100), &slow, None, &mut map);
    assert_eq!(e.mode("web"), Some(MODE_FALLBACK));
    map.take();

    // Reordered, `web` at another place with another id (as a policy where ids moved), a
    // new service before it; `api` gone.
    let added = static_response("new", 9, latency(100, secs(1)));
    let notes = e.reconfigure(config(vec![added, web(8)]), t0 + ms(150), &mut map);
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(e.mode("web"), Some(MODE_FALLBACK), "state carried");
    assert_eq!(e.degraded("api"), None);
    let mut writes = map.take();
    writes.sort();
    assert_eq!(
        writes,
        vec![
            (2, MODE_NORMAL),
            (7, MODE_NORMAL),
            (8, MODE_FALLBACK),
            (9, MODE_NORMAL)
        ],
        "every mode written; the ids no degradable service holds now back to normal"
    );
    // The window came along: the slow probe still holds p99 until 2s after it.
    e.tick(t0 + ms(1_900), &[], None, &mut map);
    let (services, _) = e.status(t0 + ms(1_900));
    let web = services.iter().find(|s| &*s.1 == "web").unwrap();
    assert_eq!(web.2.conditions[0].samples, 1);
    assert_eq!(web.2.clear_for_seconds, 0.0);
    assert_eq!(web.2.transitions, 1);
}

#[test]
fn a_reload_that_changes_the_degradation_starts_the_service_over() {
    let (t0, mut e, mut map) = started(vec![web(7)]);
    e.tick(
        t0 + ms(100),
        &[sample("web", t0, ms(900), true)],
        None,
        &mut map,
    );
    assert_eq!(e.mode("web"), Some(MODE_FALLBACK));
    let mut changed = web(7);
    changed.degradation.recover_after = secs(30);
    let notes = e.reconfigure(config(vec![changed]), t0 + ms(200), &mut map);
    assert_eq!(
        notes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vec!["service web: fallback -> normal (policy reloaded: its degradation changed)"]
    );
    assert_eq!(map.mode(7), MODE_NORMAL);
    let t = e.transitions();
    assert_eq!(t.iter().map(|t| t.count).sum::<u64>(), 2, "counts kept");
}

#[test]
fn a_reload_that_removes_degradation_writes_normal_until_it_succeeds() {
    let (t0, mut e, mut map) = started(vec![web(7)]);
    e.tick(
        t0 + ms(100),
        &[sample("web", t0, ms(900), true)],
        None,
        &mut map,
    );
    map.take();
    map.fail = true;
    let notes = e.reconfigure(config(vec![]), t0 + ms(200), &mut map);
    assert_eq!(notes.len(), 1);
    map.fail = false;
    e.tick(t0 + ms(300), &[], None, &mut map);
    assert_eq!(map.take(), vec![(7, MODE_NORMAL)]);
    e.tick(t0 + ms(400), &[], None, &mut map);
    assert!(map.take().is_empty(), "written once");
}

#[test]
fn shedding_carries_over_a_reload() {
    let (cfg, t0, mut e, mut map) = shed_group();
    e.tick(t0 + ms(100), &[], Some(&pools(&["checkout"])), &mut map);
    assert_eq!(e.level(), Level::Low);
    e.reconfigure(cfg, t0 + ms(200), &mut map);
    assert_eq!(e.level(), Level::Low);
    assert_eq!(e.degraded("checkout"), Some(true));
    e.tick(t0 + ms(10_100), &[], Some(&pools(&["checkout"])), &mut map);
    assert_eq!(
        e.level(),
        Level::Normal,
        "the step counts from before the reload"
    );
}

#[test]
fn status_fills_degradation_companions_and_shedding() {
    let (_, t0, mut e, mut map) = shed_group();
    e.tick(t0 + ms(100), &[], Some(&pools(&["search"])), &mut map);
    let mut cfg = config(vec![shed("batch", 1, Priority::Low)]);
    cfg.companions = vec![("web.fallback".into(), "web".into())];
    e.reconfigure(cfg, t0 + ms(200), &mut map);
    let view = super::DegradeView::new(Arc::new(std::sync::Mutex::new(e)), None);
    let svc = |name: &str, id| ServiceStatus {
        id,
        name: name.into(),
        ..ServiceStatus::default()
    };
    let mut report = StatusReport {
        services: vec![svc("batch", 1), svc("web.fallback", 5), svc("plain", 6)],
        ..StatusReport::default()
    };
    view.fill(&mut report, t0 + ms(1_200));
    let batch = report.services[0].degradation.as_ref().unwrap();
    assert_eq!(batch.mode, "shed");
    assert!(!batch.degraded);
    assert_eq!(report.services[1].fallback_of.as_deref(), Some("web"));
    assert!(report.services[1].degradation.is_none());
    assert!(report.services[2].degradation.is_none());
    assert_eq!(report.shedding.level, "low");
    assert!(!report.shedding.pressure, "search is gone");
    assert_eq!(report.shedding.shed, vec!["batch"]);
    assert_eq!(report.shedding.level_for_seconds, 1.1);
    let t = view.transitions();
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].service.as_str(), t[0].from, t[0].to),
        ("batch", "normal", "shed")
    );
}

#[test]
fn durations_are_written_as_the_policy_writes_them() {
    assert_eq!(condition::duration(secs(2)), "2s");
    assert_eq!(condition::duration(ms(500)), "500ms");
    assert_eq!(condition::duration(ms(1500)), "1500ms");
    assert_eq!(condition::duration(Duration::from_micros(400)), "0.4ms");
}

// ---------------------------------------------------------------------------------------
// The task

/// A [`Recorder`] the test keeps a handle on while the task writes through it.
#[derive(Clone, Default)]
struct Shared(Arc<std::sync::Mutex<Recorder>>);

impl ModeSink for Shared {
    fn write(&mut self, id: u32, mode: u32) -> Result<(), DatapathError> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(id, mode)
    }

    fn read(&self, id: u32) -> Result<u32, DatapathError> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).read(id)
    }
}

impl Shared {
    fn take(&self) -> Vec<(u32, u32)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[tokio::test]
async fn the_task_takes_samples_reloads_and_stops() {
    let map = Shared::default();
    let (tx, rx) = super::sample_channel();
    let ev = super::start(config(vec![web(7)]), Box::new(map.clone()), None, rx, None);
    assert_eq!(
        map.take(),
        vec![(7, MODE_NORMAL)],
        "written before start returns"
    );
    let view = ev.view();
    let mode = |view: &super::DegradeView| {
        let mut r = StatusReport {
            services: vec![ServiceStatus {
                id: 7,
                name: "web".into(),
                ..ServiceStatus::default()
            }],
            ..StatusReport::default()
        };
        view.fill(&mut r, Instant::now());
        r.services[0].degradation.as_ref().map(|d| d.mode.clone())
    };
    tx.try_send(vec![sample("web", Instant::now(), ms(900), true)])
        .unwrap_or_else(|e| panic!("{e}"));
    // A condition with a deadline: the next tick (100ms) takes the sample.
    let deadline = Instant::now() + secs(5);
    while mode(&view).as_deref() != Some("fallback") {
        assert!(
            Instant::now() < deadline,
            "the slow sample never degraded web"
        );
        tokio::time::sleep(ms(10)).await;
    }
    assert_eq!(map.take(), vec![(7, MODE_FALLBACK)]);
    // A reload returns once the modes are written.
    ev.reconfigure(config(vec![web(8)]), None).await;
    assert_eq!(
        map.take(),
        vec![(8, MODE_FALLBACK), (7, MODE_NORMAL)],
        "carried by name; its old id back to normal"
    );
    ev.stop().await;
    assert!(
        map.take().is_empty(),
        "stopping writes nothing: the modes stay"
    );
}

#[test]
fn a_backend_gone_from_the_reading_is_forgotten() {
    let t0 = Instant::now();
    let mut w = Windows::new(secs(10));
    let c = |synack| PassiveCounts {
        synack,
        refused: 0,
        timeout: 0,
    };
    w.passive(t0, &[(addr(0), c(5)), (addr(1), c(5))]);
    w.passive(t0, &[(addr(0), c(6))]);
    // Back (higher than it was: its counts went on meanwhile): a baseline again, not a
    // difference from before it went.
    w.passive(t0, &[(addr(0), c(6)), (addr(1), c(9))]);
    w.passive(t0, &[(addr(0), c(6)), (addr(1), c(11))]);
    assert_eq!(w.attempts(t0, secs(10)).total, 3);
}

#[test]
fn the_config_takes_the_degradable_services_of_the_file_with_their_ids() {
    let text = "
version: 1
agent: {shed_step: 4s}
interfaces:
  - name: eth0
services:
  - name: plain
    match: {address: 198.18.0.9, port: 80}
  - name: web
    priority: low
    match: {address: 198.18.0.10, port: 80}
    backends:
      - address: 10.0.1.11:8080
    health_check: {timeout: 200ms}
    degradation:
      conditions: [{type: latency, threshold: 100ms, window: 2s}]
      fallback: {strategy: shed}
      recover_after: 7s
";
    let mut policy = crate::config::load_str(text, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
    let mut compiled = crate::config::compile(&policy);
    // Ids as `Plan::with_ids` may give them: not the positions.
    compiled.services[0].id = 4;
    compiled.services[1].id = 2;
    // A companion, as the loaded policy appends it: not degradable itself.
    let mut companion = policy.services[1].clone();
    companion.name = "web.fallback".into();
    companion.fallback_of = Some(1);
    policy.services.push(companion);
    let c = Config::new(&policy, &compiled);
    assert_eq!(c.shed_step, secs(4));
    assert_eq!(c.companions, vec![("web.fallback".into(), "web".into())]);
    assert_eq!(c.services.len(), 1);
    let web = &c.services[0];
    assert_eq!(
        (&*web.name, web.id, web.priority),
        ("web", 2, Priority::Low)
    );
    assert!(web.sheds());
    assert_eq!(web.span(), secs(2));
    assert_eq!(web.degradation.recover_after, secs(7));
}
