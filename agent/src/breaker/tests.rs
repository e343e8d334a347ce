//! Every edge of the state machine and of the panic threshold, with times made up.

use std::time::{Duration, Instant};

use super::*;
use crate::config::{CircuitBreaker, Percent};

use Outcome::{Failure, Success};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A policy with one service of `backends` backends and this `circuit_breaker` body, through
/// the real loader, so the tests run on what users write.
fn policy_breaker(body: &str, backends: usize) -> CircuitBreaker {
    let list: String = (0..backends)
        .map(|i| format!("      - address: 10.0.1.{}:8080\n", i + 1))
        .collect();
    let src = format!(
        "version: 1\ninterfaces:\n  - name: eth0\nservices:\n  - name: svc\n    match:\n      \
         address: 10.96.0.10/32\n      port: 80\n    backends:\n{list}    circuit_breaker:\n{body}"
    );
    let policy = crate::config::load_str(&src, "test.yaml")
        .unwrap_or_else(|e| panic!("test policy invalid:\n{e}\n---\n{src}"));
    policy.services[0].circuit_breaker.clone().unwrap()
}

fn cfg() -> CircuitBreaker {
    CircuitBreaker::default()
}

fn feed(b: &mut Breaker, at: Instant, outcome: Outcome, n: u32) -> Vec<Transition> {
    (0..n).filter_map(|_| b.record(at, outcome)).collect()
}

#[test]
fn state_codes_are_the_map_contract() {
    assert_eq!(
        [State::Closed, State::Open, State::HalfOpen].map(State::code),
        [0, 1, 2]
    );
    for s in [State::Closed, State::Open, State::HalfOpen] {
        assert_eq!(State::from_code(s.code()), Some(s));
    }
    assert_eq!(State::from_code(3), None);
    assert_eq!(State::HalfOpen.to_string(), "half_open");
    assert_eq!(Reason::PanicThreshold.to_string(), "panic_threshold");
    assert_eq!(Admission::All.quota(), u32::MAX);
    assert_eq!(Admission::None.quota(), 0);
    assert_eq!(Admission::Trial(3).quota(), 3);
}

#[test]
fn the_policy_defaults_reach_the_breaker() {
    let c = policy_breaker("      failure_threshold: 5\n", 1);
    assert_eq!(c, CircuitBreaker::default());
    let c = policy_breaker("      error_rate: 50%\n      min_requests: 4\n", 1);
    let t0 = Instant::now();
    let mut b = Breaker::new(&c, t0);
    assert_eq!(feed(&mut b, t0, Success, 2), vec![]);
    b.record(t0, Failure);
    let t = b.record(t0, Failure);
    assert_eq!(t, None, "2 of 4 is 50%, not above it");
    let t = b.record(t0, Failure).expect("3 of 5 is above 50%");
    assert_eq!(t.reason, Reason::ErrorRate);
}

#[test]
fn opens_after_exactly_failure_threshold_consecutive_failures() {
    let t0 = Instant::now();
    let mut b = Breaker::new(&cfg(), t0);
    assert_eq!(feed(&mut b, t0, Failure, 4), vec![]);
    assert_eq!(b.state(), State::Closed);
    let t = b.record(t0 + ms(1), Failure).expect("5th failure opens");
    assert_eq!(
        t,
        Transition {
            from: State::Closed,
            to: State::Open,
            reason: Reason::ConsecutiveFailures,
            at: t0 + ms(1)
        }
    );
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.admission(), Admission::None);
    assert_eq!(b.since(), t0 + ms(1));
}

#[test]
fn a_success_resets_the_consecutive_count() {
    let t0 = Instant::now();
    let mut b = Breaker::new(&cfg(), t0);
    for _ in 0..10 {
        assert_eq!(feed(&mut b, t0, Failure, 4), vec![]);
        assert_eq!(b.consecutive_failures(), 4);
        assert_eq!(b.record(t0, Success), None);
        assert_eq!(b.consecutive_failures(), 0);
    }
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn error_rate_zero_is_off() {
    let mut c = cfg();
    c.failure_threshold = u32::MAX;
    let t0 = Instant::now();
    let mut b = Breaker::new(&c, t0);
    for _ in 0..100 {
        assert_eq!(b.record(t0, Failure), None);
        assert_eq!(b.record(t0, Success), None);
    }
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn error_rate_needs_min_requests_and_must_exceed_the_rate() {
    let mut c = cfg();
    c.failure_threshold = u32::MAX;
    c.error_rate = Percent::whole(50);
    c.min_requests = 10;
    let t0 = Instant::now();
    let mut b = Breaker::new(&c, t0);
    // 9 failures in 9 attempts: 100%, but fewer than min_requests.
    assert_eq!(feed(&mut b, t0, Failure, 9), vec![]);
    // 10 attempts, 9 failures: 90% > 50% with min_requests reached.
    let t = b.record(t0, Success).expect("opens at the 10th attempt");
    assert_eq!((t.to, t.reason), (State::Open, Reason::ErrorRate));

    // Exactly 50%: not above.
    let mut b = Breaker::new(&c, t0);
    for _ in 0..10 {
        assert_eq!(b.record(t0, Success), None);
        assert_eq!(b.record(t0, Failure), None);
    }
    assert_eq!(
        b.window_totals(t0),
        Totals {
            attempts: 20,
            failures: 10
        }
    );
    let t = b.record(t0, Failure).expect("11 of 21 is above 50%");
    assert_eq!(t.reason, Reason::ErrorRate);
}

#[test]
fn error_rate_only_counts_the_sliding_window() {
    let mut c = cfg();
    c.failure_threshold = u32::MAX;
    c.error_rate = Percent::whole(50);
    c.min_requests = 4;
    c.window = secs(10);
    let t0 = Instant::now();
    let mut b = Breaker::new(&c, t0);
    // 2 of 4 at the start: 50%, not above.
    assert_eq!(feed(&mut b, t0, Failure, 2), vec![]);
    assert_eq!(feed(&mut b, t0 + secs(1), Success, 2), vec![]);
    // 10 s later t0's bucket has expired, t0+1s's has not.
    let later = t0 + secs(10);
    assert_eq!(
        b.window_totals(later),
        Totals {
            attempts: 2,
            failures: 0
        }
    );
    // 2 of 4 again; with the expired failures it would be 4 of 6.
    assert_eq!(feed(&mut b, later, Failure, 2), vec![]);
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn open_becomes_half_open_after_reset_timeout_and_not_before() {
    let t0 = Instant::now();
    let mut b = Breaker::new(&cfg(), t0);
    feed(&mut b, t0, Failure, 5);
    assert_eq!(b.next_deadline(), Some(t0 + secs(30)));
    assert_eq!(b.poll(t0 + secs(30) - ms(1)), None);
    // Outcomes while open change nothing.
    assert_eq!(feed(&mut b, t0 + secs(1), Success, 10), vec![]);
    assert_eq!(b.state(), State::Open);
    let t = b.poll(t0 + secs(30)).expect("half-open at the deadline");
    assert_eq!(
        (t.from, t.to, t.reason, t.at),
        (
            State::Open,
            State::HalfOpen,
            Reason::ResetTimeout,
            t0 + secs(30)
        )
    );
    assert_eq!(b.poll(t0 + secs(31)), None);
    assert_eq!(b.next_deadline(), None);
}

#[test]
fn half_open_admits_at_most_half_open_max_flows() {
    let t0 = Instant::now();
    let mut b = Breaker::new(&cfg(), t0);
    assert!(b.try_admit(), "closed admits everything");
    feed(&mut b, t0, Failure, 5);
    assert!(!b.try_admit(), "open admits nothing");
    b.poll(t0 + secs(30)).unwrap();
    assert_eq!(b.admission(), Admission::Trial(3));
    let admitted: Vec<bool> = (0..5).map(|_| b.try_admit()).collect();
    assert_eq!(admitted, [true, true, true, false, false]);
    assert_eq!(b.admission(), Admission::Trial(0));
}

#[test]
fn half_open_closes_after_success_threshold_successes() {
    let t0 = Instant::now();
    let mut b = Breaker::new(&cfg(), t0);
    feed(&mut b, t0, Failure, 5);
    let t1 = t0 + secs(30);
    b.poll(t1).unwrap();
    assert_eq!(b.record(t1, Success), None, "1 of 2 successes");
    let t = b.record(t1 + ms(5), Success).expect("2nd success closes");
    assert_eq!(
        (t.from, t.to, t.reason),
        (State::HalfOpen, State::Closed, Reason::TrialsSucceeded)
    );
    assert_eq!(b.admission(), Admission::All);
    // The failures from before are forgotten: it takes a full threshold again.
    assert_eq!(feed(&mut b, t1 + ms(6), Failure, 4), vec![]);
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn a_failure_in_half_open_reopens_even_after_successes() {
    let t0 = Instant::now();
    let mut b = Breaker::new(&cfg(), t0);
    feed(&mut b, t0, Failure, 5);
    let t1 = t0 + secs(30);
    b.poll(t1).unwrap();
    assert_eq!(b.record(t1, Success), None);
    let t = b.record(t1 + ms(1), Failure).expect("reopens");
    assert_eq!(
        (t.from, t.to, t.reason),
        (State::HalfOpen, State::Open, Reason::TrialFailed)
    );
    assert_eq!(b.next_deadline(), Some(t1 + ms(1) + secs(60)));
}

#[test]
fn reset_timeout_doubles_per_reopen_up_to_the_max_and_resets_on_close() {
    let t0 = Instant::now();
    let mut b = Breaker::new(&cfg(), t0);
    feed(&mut b, t0, Failure, 5);
    let mut seen = vec![b.reset_timeout()];
    for _ in 0..6 {
        let now = b.next_deadline().unwrap();
        b.poll(now).unwrap();
        b.record(now, Failure).unwrap();
        seen.push(b.reset_timeout());
    }
    assert_eq!(seen, [30, 60, 120, 240, 300, 300, 300].map(secs));
    // Close, then open again: back to the base.
    let now = b.next_deadline().unwrap();
    b.poll(now).unwrap();
    feed(&mut b, now, Success, 2);
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.reset_timeout(), secs(30));
    feed(&mut b, now, Failure, 5);
    assert_eq!(b.next_deadline(), Some(now + secs(30)));
}

#[test]
fn max_ejections_rounds_down_but_allows_one() {
    let p = Percent::whole;
    assert_eq!(max_ejections(p(50), 4), 2);
    assert_eq!(max_ejections(p(50), 3), 1);
    assert_eq!(max_ejections(p(50), 1), 1);
    assert_eq!(max_ejections(p(10), 5), 1);
    assert_eq!(max_ejections(p(0), 5), 1);
    assert_eq!(max_ejections(p(100), 5), 5);
    assert_eq!(max_ejections(p(34), 3), 1);
    assert_eq!(max_ejections(p(50), 0), 0);
}

fn kill(g: &mut EjectionGuard, backend: usize, at: Instant) -> Vec<Event> {
    (0..5)
        .flat_map(|_| g.record(backend, at, Failure).unwrap())
        .collect()
}

#[test]
fn the_guard_refuses_openings_beyond_the_quota_once_per_refusal() {
    let c = policy_breaker("      max_ejection_percent: 50%\n", 4);
    let t0 = Instant::now();
    let mut g = EjectionGuard::new(&c, 4, t0);
    assert_eq!(g.max_open(), 2);
    for i in 0..2 {
        let ev = kill(&mut g, i, t0);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].transition.to, State::Open);
    }
    let ev = kill(&mut g, 2, t0 + ms(1));
    assert_eq!(
        ev,
        vec![Event {
            backend: 2,
            transition: Transition {
                from: State::Closed,
                to: State::Closed,
                reason: Reason::PanicThreshold,
                at: t0 + ms(1)
            }
        }]
    );
    // More failures: no more events, still closed, still admitting (fail open).
    assert_eq!(kill(&mut g, 2, t0 + ms(2)), vec![]);
    assert_eq!(g.breaker(2).unwrap().state(), State::Closed);
    assert!(g.breaker(2).unwrap().is_refused());
    assert!(g.try_admit(2).unwrap());
    assert_eq!(g.open_count(), 2);
}

#[test]
fn a_refused_breaker_opens_when_another_closes_if_it_still_wants_to() {
    let t0 = Instant::now();
    let mut g = EjectionGuard::new(&cfg(), 4, t0);
    kill(&mut g, 0, t0);
    kill(&mut g, 1, t0);
    kill(&mut g, 3, t0 + ms(1)); // refused first
    kill(&mut g, 2, t0 + ms(2)); // refused second
    // Half-open counts against the quota too: no grant at the timer.
    let t1 = t0 + secs(30);
    let ev = g.poll(t1);
    assert_eq!(ev.len(), 2);
    assert_eq!(g.open_count(), 2);
    // Backend 0 closes: the oldest refusal (backend 3) gets its opening.
    g.record(0, t1, Success).unwrap();
    let ev = g.record(0, t1, Success).unwrap();
    let got: Vec<_> = ev
        .iter()
        .map(|e| (e.backend, e.transition.to, e.transition.reason))
        .collect();
    assert_eq!(
        got,
        [
            (0, State::Closed, Reason::TrialsSucceeded),
            (3, State::Open, Reason::ConsecutiveFailures)
        ]
    );
    assert_eq!(g.open_count(), 2);
    assert!(g.breaker(2).unwrap().is_refused());
}

#[test]
fn a_refusal_lapses_when_the_backend_recovers() {
    let t0 = Instant::now();
    let mut g = EjectionGuard::new(&cfg(), 2, t0);
    assert_eq!(g.max_open(), 1);
    kill(&mut g, 0, t0);
    assert_eq!(kill(&mut g, 1, t0).len(), 1, "refusal");
    // Backend 1 recovers before a slot frees: its wish to open goes with it.
    assert_eq!(g.record(1, t0, Success).unwrap(), vec![]);
    assert!(!g.breaker(1).unwrap().is_refused());
    let t1 = t0 + secs(30);
    g.record(0, t1, Success).unwrap(); // timer fires first: half-open, 1 success
    let ev = g.record(0, t1, Success).unwrap();
    assert_eq!(ev.len(), 1, "only backend 0 closes: {ev:?}");
    assert_eq!(g.open_count(), 0);
}

#[test]
fn record_fires_due_timers_first_and_rejects_unknown_backends() {
    let t0 = Instant::now();
    let mut g = EjectionGuard::new(&cfg(), 1, t0);
    kill(&mut g, 0, t0);
    assert_eq!(g.next_deadline(), Some(t0 + secs(30)));
    let ev = g.record(0, t0 + secs(30), Failure).unwrap();
    let got: Vec<_> = ev.iter().map(|e| e.transition.to).collect();
    assert_eq!(got, [State::HalfOpen, State::Open]);
    assert_eq!(
        g.record(1, t0, Failure),
        Err(BreakerError::UnknownBackend {
            backend: 1,
            backends: 1
        })
    );
    assert_eq!(
        BreakerError::UnknownBackend {
            backend: 1,
            backends: 1
        }
        .to_string(),
        "backend index 1 is out of range: the service has 1 backends"
    );
}

/// A long random run over many backends: the quota is never exceeded, every event is a legal
/// edge, and the events replay the states exactly.
#[test]
fn random_runs_never_exceed_the_quota_and_events_track_states() {
    let mut c = cfg();
    c.failure_threshold = 3;
    c.error_rate = Percent::whole(40);
    c.min_requests = 5;
    c.reset_timeout = ms(500);
    c.max_reset_timeout = secs(4);
    c.max_ejection_percent = Percent::whole(30);
    let n = 10;
    let t0 = Instant::now();
    let mut g = EjectionGuard::new(&c, n, t0);
    let mut shadow = vec![State::Closed; n];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut now = t0;
    let mut counts = [0usize; 3];
    for _ in 0..200_000 {
        now += ms(next() % 20);
        let backend = (next() % n as u64) as usize;
        // Backends 0-5 are mostly sick, the rest mostly well.
        let sick = if backend < 6 { 70 } else { 5 };
        let outcome = if next() % 100 < sick {
            Failure
        } else {
            Success
        };
        let mut events = g.poll(now);
        events.extend(g.record(backend, now, outcome).unwrap());
        for e in events {
            let t = e.transition;
            assert_eq!(t.from, shadow[e.backend], "{e:?}");
            let legal = matches!(
                (t.from, t.to, t.reason),
                (
                    State::Closed,
                    State::Open,
                    Reason::ConsecutiveFailures | Reason::ErrorRate
                ) | (State::Closed, State::Closed, Reason::PanicThreshold)
                    | (State::Open, State::HalfOpen, Reason::ResetTimeout)
                    | (State::HalfOpen, State::Closed, Reason::TrialsSucceeded)
                    | (State::HalfOpen, State::Open, Reason::TrialFailed)
            );
            assert!(legal, "illegal edge {e:?}");
            shadow[e.backend] = t.to;
            counts[t.to.code() as usize] += 1;
        }
        assert!(g.open_count() <= g.max_open(), "quota exceeded at {now:?}");
        for (i, b) in g.breakers().iter().enumerate() {
            assert_eq!(b.state(), shadow[i]);
        }
        // The guard's own bookkeeping (kept at each transition) matches its breakers.
        let open = shadow.iter().filter(|s| **s != State::Closed).count();
        assert_eq!(g.open_count(), open, "open count at {now:?}");
        let soonest = g.breakers().iter().filter_map(|b| b.next_deadline()).min();
        assert_eq!(g.next_deadline(), soonest, "next deadline at {now:?}");
    }
    assert!(
        counts.iter().all(|&c| c > 100),
        "all states visited: {counts:?}"
    );
}

fn resumed_open(remaining: Duration) -> agent_common::breaker::Resumed {
    agent_common::breaker::Resumed::Open {
        remaining_ns: remaining.as_nanos() as u64,
    }
}

#[test]
fn a_resumed_open_breaker_stays_open_for_the_rest_of_its_period() {
    let t0 = Instant::now();
    let now = t0 + secs(100);
    let mut g = EjectionGuard::new(&cfg(), 4, t0);
    g.resume(0, resumed_open(secs(12)), now - secs(18), secs(30), now)
        .unwrap();
    let b = g.breaker(0).unwrap();
    assert_eq!(
        (b.state(), b.since(), b.admission()),
        (State::Open, now - secs(18), Admission::None)
    );
    assert_eq!(g.open_count(), 1);
    assert_eq!(g.next_deadline(), Some(now + secs(12)));
    assert_eq!(g.poll(now + secs(11)), []);
    // Outcomes are ignored while open, as for any open breaker.
    assert_eq!(g.record(0, now + secs(11), Failure).unwrap(), []);
    let ev = g.poll(now + secs(12));
    assert_eq!(ev.len(), 1, "{ev:?}");
    let t = ev[0].transition;
    assert_eq!(
        (t.from, t.to, t.reason),
        (State::Open, State::HalfOpen, Reason::ResetTimeout)
    );
}

#[test]
fn a_resumed_open_period_already_over_goes_half_open_at_the_first_poll() {
    let t0 = Instant::now();
    let mut g = EjectionGuard::new(&cfg(), 2, t0);
    g.resume(1, resumed_open(Duration::ZERO), t0, secs(30), t0)
        .unwrap();
    let ev = g.poll(t0);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].backend, 1);
    assert_eq!(ev[0].transition.to, State::HalfOpen);
    assert_eq!(g.breaker(1).unwrap().admission(), Admission::Trial(3));
    assert_eq!(
        g.open_count(),
        1,
        "half-open still counts against the quota"
    );
}

#[test]
fn a_resumed_open_period_keeps_its_doubling_within_this_configuration() {
    let t0 = Instant::now();
    let mut b = Breaker::new(&cfg(), t0);
    // Doubled twice by the earlier agent: a failed trial doubles it again.
    b.resume(resumed_open(Duration::ZERO), t0, secs(120), t0);
    assert_eq!(b.reset_timeout(), secs(120));
    b.poll(t0);
    let t = b.record(t0 + ms(1), Failure).unwrap();
    assert_eq!(t.to, State::Open);
    assert_eq!(b.next_deadline(), Some(t0 + ms(1) + secs(240)));
    // Periods outside reset_timeout..=max_reset_timeout are brought within.
    b.resume(resumed_open(secs(1)), t0, secs(3_600), t0);
    assert_eq!(b.reset_timeout(), secs(300));
    b.resume(resumed_open(secs(1)), t0, Duration::ZERO, t0);
    assert_eq!(b.reset_timeout(), secs(30));
}

#[test]
fn a_resumed_half_open_breaker_keeps_the_trials_the_datapath_admitted() {
    let t0 = Instant::now();
    let mut g = EjectionGuard::new(&cfg(), 2, t0);
    let half = agent_common::breaker::Resumed::HalfOpen { quota: 1 };
    g.resume(0, half, t0 - secs(2), secs(60), t0).unwrap();
    let b = g.breaker(0).unwrap();
    assert_eq!(b.state(), State::HalfOpen);
    assert_eq!(b.admission(), Admission::Trial(1), "3 allowed, 2 admitted");
    assert_eq!(b.next_deadline(), None);
    assert_eq!(g.open_count(), 1);
    // success_threshold (2) successes close it, as for any half-open breaker.
    assert_eq!(g.record(0, t0 + ms(1), Success).unwrap(), []);
    let ev = g.record(0, t0 + ms(2), Success).unwrap();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].transition.to, State::Closed);
    assert_eq!(g.open_count(), 0);
    // A failed trial would have re-opened for twice the resumed period.
    g.resume(1, half, t0, secs(60), t0).unwrap();
    let ev = g.record(1, t0 + ms(3), Failure).unwrap();
    assert_eq!(ev[0].transition.to, State::Open);
    assert_eq!(g.next_deadline(), Some(t0 + ms(3) + secs(120)));
}

#[test]
fn a_resumed_closed_breaker_is_closed_since_then() {
    let t0 = Instant::now();
    let mut g = EjectionGuard::new(&cfg(), 1, t0);
    g.resume(
        0,
        agent_common::breaker::Resumed::Closed,
        t0 - secs(5),
        secs(90),
        t0,
    )
    .unwrap();
    let b = g.breaker(0).unwrap();
    assert_eq!(
        (b.state(), b.since(), b.reset_timeout()),
        (State::Closed, t0 - secs(5), secs(30))
    );
    assert_eq!(g.open_count(), 0);
    assert_eq!(
        g.resume(4, agent_common::breaker::Resumed::Closed, t0, secs(1), t0),
        Err(BreakerError::UnknownBackend {
            backend: 4,
            backends: 1
        })
    );
}

#[test]
fn a_resumed_state_is_what_the_breaker_is_once_due_timers_fire() {
    use agent_common::breaker::Resumed::*;
    assert_eq!(State::resumed(Some(Closed)), State::Closed);
    assert_eq!(
        State::resumed(None),
        State::Closed,
        "unknown code: fail open"
    );
    assert_eq!(State::resumed(Some(Open { remaining_ns: 1 })), State::Open);
    assert_eq!(
        State::resumed(Some(Open { remaining_ns: 0 })),
        State::HalfOpen
    );
    assert_eq!(State::resumed(Some(HalfOpen { quota: 0 })), State::HalfOpen);
    // The guard agrees.
    let t0 = Instant::now();
    for r in [
        Closed,
        Open { remaining_ns: 1 },
        Open { remaining_ns: 0 },
        HalfOpen { quota: 2 },
    ] {
        let mut g = EjectionGuard::new(&cfg(), 1, t0);
        g.resume(0, r, t0, secs(30), t0).unwrap();
        g.poll(t0);
        assert_eq!(
            g.breaker(0).unwrap().state(),
            State::resumed(Some(r)),
            "{r:?}"
        );
    }
}
