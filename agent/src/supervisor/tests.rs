//! The supervisor without a kernel: probe results and passive reports go in, breaker states
//! come out as the map writes the datapath would get.

use std::collections::HashMap;
use std::sync::{
    Mutex, PoisonError,
    atomic::{AtomicBool, Ordering},
};
use std::time::Duration;

use agent_common::breaker::{
    F_CLOSE_EXISTING, F_DROP, F_PASSIVE, STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN,
};
use agent_common::classify::{PROTO_TCP, PROTO_UDP};

use super::*;
use crate::config::{self, Compiled};
use crate::health::{Health, ProbeFailure};

const POLICY: &str = "
version: 1
interfaces:
  - name: eth0
services:
  - name: web
    match: {address: 198.18.0.10, port: 80, protocol: any}
    backends:
      - address: 10.0.1.11:8080
      - address: 10.0.1.12:8080
    health_check: {timeout: 200ms}
    circuit_breaker:
      failure_threshold: 2
      reset_timeout: 5s
      max_reset_timeout: 20s
      half_open_max_flows: 3
      success_threshold: 2
      on_open: drop
      close_existing: true
      max_ejection_percent: 50%
  - name: plain
    match: {address: 198.18.0.11, port: 53, protocol: udp}
    backends:
      - address: 10.0.2.1:53
";

/// Records every write, and keeps the entries as the map would; fails every write while
/// `fail` is set.
#[derive(Clone, Default)]
struct Recorder {
    writes: Arc<Mutex<Vec<(BackendKey, BackendState)>>>,
    map: Arc<Mutex<HashMap<BackendKey, BackendState>>>,
    fail: Arc<AtomicBool>,
}

impl StateSink for Recorder {
    fn write(&mut self, key: &BackendKey, state: &BackendState) -> Result<(), DatapathError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(DatapathError::MissingMap("BACKENDS"));
        }
        self.writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((*key, *state));
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(*key, *state);
        Ok(())
    }

    fn read(&self, key: &BackendKey) -> Result<Option<BackendState>, DatapathError> {
        Ok(self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied())
    }
}

impl Recorder {
    /// The writes since the last call, as (protocol, state, quota, epoch, id).
    fn take(&self) -> Vec<(u8, u32, u32, u32, u32)> {
        std::mem::take(&mut *self.writes.lock().unwrap_or_else(PoisonError::into_inner))
            .into_iter()
            .map(|(k, s)| (k.proto, s.state, s.quota, s.epoch, s.id))
            .collect()
    }
}

struct Fixture {
    sup: Supervisor,
    compiled: Compiled,
    rec: Recorder,
    t0: Instant,
}

/// The datapath's clock at `Fixture::t0`.
const T0_NS: u64 = 1_000 * SEC_NS;
const SEC_NS: u64 = 1_000_000_000;

fn fixture() -> Fixture {
    let policy = config::load_str(POLICY, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    let compiled = config::compile(&policy);
    let t0 = Instant::now();
    let mut sup = Supervisor::new(&policy, &compiled.backends, None, t0);
    sup.clock = Some((t0, T0_NS));
    let rec = Recorder::default();
    sup.sink = Some(Box::new(rec.clone()));
    Fixture {
        sup,
        compiled,
        rec,
        t0,
    }
}

impl Fixture {
    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn probe(&mut self, index: usize, ok: bool, ms: u64) {
        let r = ProbeResult {
            backend: BackendRef {
                service: Arc::from("web"),
                service_id: 0,
                index,
                address: self.compiled.backends[index].address,
            },
            at: self.at(ms),
            outcome: if ok {
                Ok(())
            } else {
                Err(ProbeFailure::Refused)
            },
            attempts: 1,
            latency: Duration::from_millis(1),
            elapsed: Duration::from_millis(1),
            health: Health::Healthy,
            changed: false,
        };
        self.sup.on_probes(&[r]);
    }

    /// The backend at `address` as `/status` shows it, converted from what is published.
    fn status(&self, address: &str) -> BackendStatus {
        let now = Instant::now();
        self.sup
            .table
            .0
            .borrow()
            .iter()
            .map(|b| b.status(now))
            .find(|b| b.address == address)
            .unwrap_or_else(|| panic!("no backend {address} in the table"))
    }
}

/// Both keys of backend 0 (the service matches `any`), in the order they are written.
fn both(state: u32, quota: u32, epoch: u32) -> Vec<(u8, u32, u32, u32, u32)> {
    vec![
        (PROTO_TCP, state, quota, epoch, 0),
        (PROTO_UDP, state, quota, epoch, 0),
    ]
}

#[test]
fn every_transition_is_written_with_its_quota_and_epoch() {
    let mut f = fixture();
    f.probe(0, false, 1);
    assert_eq!(f.rec.take(), [], "one failure of two: still closed");
    f.probe(0, false, 2);
    assert_eq!(f.rec.take(), both(STATE_OPEN, 0, 0), "opened");

    f.sup.on_timers(f.at(5_002));
    assert_eq!(
        f.rec.take(),
        both(STATE_HALF_OPEN, 3, 1),
        "half-open: half_open_max_flows trials, a new epoch"
    );
    f.probe(0, false, 5_010);
    assert_eq!(f.rec.take(), both(STATE_OPEN, 0, 1), "trial failed");

    // The re-open lasts twice as long.
    f.sup.on_timers(f.at(10_010));
    assert_eq!(f.rec.take(), [], "not yet");
    f.sup.on_timers(f.at(15_010));
    assert_eq!(f.rec.take(), both(STATE_HALF_OPEN, 3, 2));
    f.probe(0, true, 15_020);
    assert_eq!(f.rec.take(), [], "one success of two");
    f.probe(0, true, 15_030);
    assert_eq!(f.rec.take(), both(STATE_CLOSED, u32::MAX, 2), "closed");
}

#[test]
fn written_states_carry_the_backend_flags_and_id() {
    let mut f = fixture();
    f.probe(1, false, 1);
    f.probe(1, false, 2);
    let writes = f
        .rec
        .writes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(writes.len(), 2, "{writes:?}");
    for (key, state) in writes {
        assert_eq!(state.flags, F_DROP | F_CLOSE_EXISTING | F_PASSIVE);
        assert_eq!(state.id, 1);
        assert_eq!(
            key,
            f.compiled.backends[1].keys[usize::from(key.proto == PROTO_UDP)]
        );
    }
}

#[test]
fn a_breaker_held_closed_by_the_ejection_limit_writes_nothing() {
    let mut f = fixture();
    f.probe(0, false, 1);
    f.probe(0, false, 2);
    f.rec.take();
    // 50% of two backends: one may be open; the second stays closed (fails open).
    f.probe(1, false, 3);
    f.probe(1, false, 4);
    assert_eq!(f.rec.take(), []);
    let s = f.status("10.0.1.12:8080");
    assert_eq!(s.breaker.as_deref(), Some("closed"));
    assert_eq!(s.transitions.get("closed/panic_threshold"), Some(&1));
}

#[test]
fn passive_failures_open_the_breaker_and_are_counted() {
    let mut f = fixture();
    let seen = PassiveCounts {
        synack: 0,
        refused: 1,
        timeout: 1,
    };
    f.sup.on_passive(vec![(0, seen), (77, seen)], f.at(5));
    assert_eq!(f.rec.take(), both(STATE_OPEN, 0, 0));
    let s = f.status("10.0.1.11:8080");
    assert_eq!(s.passive, Some(seen));
    assert_eq!(s.transitions.get("open/consecutive_failures"), Some(&1));
}

#[test]
fn passive_successes_close_a_half_open_breaker() {
    let mut f = fixture();
    f.probe(0, false, 1);
    f.probe(0, false, 2);
    f.sup.on_timers(f.at(5_002));
    f.rec.take();
    let synacks = PassiveCounts {
        synack: 2,
        ..PassiveCounts::default()
    };
    f.sup.on_passive(vec![(0, synacks)], f.at(5_100));
    assert_eq!(f.rec.take(), both(STATE_CLOSED, u32::MAX, 1));
}

#[test]
fn a_failed_write_is_counted_and_retried() {
    let mut f = fixture();
    f.rec.fail.store(true, Ordering::SeqCst);
    f.probe(0, false, 1);
    f.probe(0, false, 2);
    assert_eq!(f.status("10.0.1.11:8080").map_write_errors, 1);
    assert_eq!(f.sup.retry_at, Some(f.at(2) + WRITE_RETRY));

    f.rec.fail.store(false, Ordering::SeqCst);
    f.sup.on_timers(f.at(2) + WRITE_RETRY);
    assert_eq!(f.rec.take(), both(STATE_OPEN, 0, 0), "written on retry");
    assert_eq!(f.sup.retry_at, None);
    assert!(f.sup.unsynced.is_empty());
    assert_eq!(f.status("10.0.1.11:8080").map_write_errors, 1);
}

#[test]
fn a_successful_write_cancels_a_pending_retry() {
    let mut f = fixture();
    f.rec.fail.store(true, Ordering::SeqCst);
    f.probe(0, false, 1);
    f.probe(0, false, 2);
    f.rec.fail.store(false, Ordering::SeqCst);
    // Timers run late: the half-open transition writes first, and the stale retry must not
    // rewrite the quota the datapath is counting down.
    f.sup.on_timers(f.at(5_002));
    assert_eq!(f.rec.take(), both(STATE_HALF_OPEN, 3, 1));
    assert!(f.sup.unsynced.is_empty());
}

#[test]
fn only_backends_with_a_breaker_are_enforced() {
    let f = fixture();
    let web = f.status("10.0.1.11:8080");
    assert_eq!(web.id, Some(0));
    assert_eq!(web.passive, Some(PassiveCounts::default()));
    assert_eq!(f.status("10.0.1.12:8080").id, Some(1));
    let plain = f.status("10.0.2.1:53");
    assert_eq!(plain.id, None);
    assert_eq!(plain.passive, None);
    assert_eq!(plain.breaker, None);
    assert_eq!(plain.health, "unchecked");
    assert_eq!(f.sup.by_id.len(), 2);
}

#[test]
fn the_channel_carries_typed_state_by_policy_position() {
    let mut f = fixture();
    let rx = f.sup.table.0.subscribe();
    f.probe(0, false, 1);
    f.probe(0, false, 2);
    assert!(
        rx.has_changed().unwrap_or(false),
        "a transition is published"
    );
    let backends = rx.borrow();
    let ids: Vec<BackendId> = backends.iter().map(|b| b.id).collect();
    assert_eq!(
        ids,
        [
            BackendId {
                service: 0,
                index: 0
            },
            BackendId {
                service: 0,
                index: 1
            },
            BackendId {
                service: 1,
                index: 0
            },
        ]
    );
    assert_eq!(backends[0].breaker, Some(State::Open));
    assert_eq!(backends[0].health, Some(Health::Healthy));
    assert_eq!(backends[1].breaker, Some(State::Closed));
    assert_eq!((backends[2].health, backends[2].breaker), (None, None));
}

#[test]
fn a_reopen_in_one_call_is_written_with_its_new_period() {
    let mut f = fixture();
    f.probe(0, false, 1);
    f.probe(0, false, 2);
    assert_eq!(f.rec.take(), both(STATE_OPEN, 0, 0), "opened");
    // The probe comes before the timer: open -> half_open -> open in one call. The datapath
    // enforces open alike, but the entry must say when this opening began and that it lasts
    // twice as long: an agent adopting the maps resumes from that.
    f.probe(0, false, 5_010);
    let writes = f
        .rec
        .writes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(
        f.rec.take(),
        both(STATE_OPEN, 0, 1),
        "the re-open is written"
    );
    for (_, st) in writes {
        assert_eq!(
            (st.since_ns, st.open_for_ns),
            (T0_NS + 5_010 * 1_000_000, 10 * SEC_NS),
            "{st:?}"
        );
    }
    let s = f.status("10.0.1.11:8080");
    assert_eq!(s.breaker.as_deref(), Some("open"));
    assert_eq!(s.transitions.get("half_open/reset_timeout"), Some(&1));
    assert_eq!(s.transitions.get("open/trial_failed"), Some(&1));
    // The next half-open period gets an epoch no earlier written period had.
    f.sup.on_timers(f.at(15_010));
    assert_eq!(f.rec.take(), both(STATE_HALF_OPEN, 3, 2));
}

#[test]
fn after_a_failed_write_the_next_state_is_written_even_if_it_was_held_before() {
    let mut f = fixture();
    f.probe(0, false, 1);
    f.probe(0, false, 2);
    assert_eq!(f.rec.take(), both(STATE_OPEN, 0, 0));
    // The half-open write fails (it may have reached some keys and not others)...
    f.rec.fail.store(true, Ordering::SeqCst);
    f.sup.on_timers(f.at(5_002));
    f.rec.fail.store(false, Ordering::SeqCst);
    // ...so the re-open is written, though open is what the datapath last held for sure.
    f.probe(0, false, 5_010);
    assert_eq!(f.rec.take(), both(STATE_OPEN, 0, 1));
    assert!(f.sup.unsynced.is_empty());
}

impl Fixture {
    /// What an earlier agent left in the map for backend `index` (this policy's flags and id),
    /// stamped `since_ns` on the datapath's clock.
    fn left(&self, index: usize, state: u32, quota: u32, since_ns: u64, open_for_ns: u64) {
        let st = BackendState {
            since_ns,
            open_for_ns,
            ..self.compiled.backends[index].state(state, quota, 7)
        };
        self.left_entry(index, st);
    }

    fn left_entry(&self, index: usize, st: BackendState) {
        let mut map = self.rec.map.lock().unwrap_or_else(PoisonError::into_inner);
        for k in &self.compiled.backends[index].keys {
            map.insert(*k, st);
        }
    }

    fn published(&self, index: usize) -> (Option<State>, Instant) {
        let b = &self.sup.table.0.borrow()[index];
        (b.breaker, b.since)
    }
}

#[test]
fn an_adopted_open_breaker_stays_open_for_the_rest_of_its_period() {
    let mut f = fixture();
    f.left(0, STATE_OPEN, 0, T0_NS - 2 * SEC_NS, 5 * SEC_NS);
    assert_eq!(f.sup.resume(f.t0), (1, 0));
    assert_eq!(f.rec.take(), [], "the datapath holds it already");
    assert_eq!(
        f.published(0),
        (Some(State::Open), f.t0 - Duration::from_secs(2)),
        "published open from the first value, in its state since it opened"
    );
    assert_eq!(f.published(1).0, Some(State::Closed));
    f.sup.on_timers(f.at(2_999));
    assert_eq!(f.rec.take(), [], "3 s of its 5 s are left");
    f.sup.on_timers(f.at(3_000));
    assert_eq!(
        f.rec.take(),
        both(STATE_HALF_OPEN, 3, 8),
        "half-open after the rest of the period, in an epoch after the adopted one"
    );
}

#[test]
fn an_adopted_open_period_already_over_goes_half_open_at_once() {
    let mut f = fixture();
    f.left(0, STATE_OPEN, 0, T0_NS - 60 * SEC_NS, 5 * SEC_NS);
    assert_eq!(f.sup.resume(f.t0), (0, 1));
    assert_eq!(f.rec.take(), both(STATE_HALF_OPEN, 3, 8));
    assert_eq!(f.published(0), (Some(State::HalfOpen), f.t0));
    let s = f.status("10.0.1.11:8080");
    assert_eq!(s.transitions.get("half_open/reset_timeout"), Some(&1));
}

#[test]
fn an_adopted_half_open_breaker_keeps_its_quota_and_epoch() {
    let mut f = fixture();
    f.left(0, STATE_HALF_OPEN, 1, T0_NS - SEC_NS, 10 * SEC_NS);
    assert_eq!(f.sup.resume(f.t0), (0, 1));
    assert_eq!(f.rec.take(), [], "the datapath is counting the quota down");
    assert_eq!(
        f.published(0),
        (Some(State::HalfOpen), f.t0 - Duration::from_secs(1))
    );
    f.probe(0, true, 10);
    f.probe(0, true, 20);
    assert_eq!(f.rec.take(), both(STATE_CLOSED, u32::MAX, 7), "closed");
}

#[test]
fn an_adopted_trial_failure_reopens_for_twice_the_adopted_period() {
    let mut f = fixture();
    f.left(0, STATE_HALF_OPEN, 3, T0_NS - SEC_NS, 10 * SEC_NS);
    f.sup.resume(f.t0);
    f.probe(0, false, 10);
    let writes = f
        .rec
        .writes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(f.rec.take(), both(STATE_OPEN, 0, 7));
    assert!(
        writes.iter().all(|(_, st)| st.open_for_ns == 20 * SEC_NS),
        "{writes:?}"
    );
}

#[test]
fn fresh_entries_resume_closed_and_write_nothing() {
    let mut f = fixture();
    for b in &f.compiled.backends {
        f.left_entry(b.index, b.initial());
    }
    assert_eq!(f.sup.resume(f.t0), (0, 0));
    assert_eq!(f.rec.take(), []);
    assert_eq!(f.published(0), (Some(State::Closed), f.t0));
    assert_eq!(f.published(1), (Some(State::Closed), f.t0));
}

#[test]
fn an_adopted_entry_of_another_policy_is_rewritten_with_this_ones_flags_and_id() {
    let mut f = fixture();
    let old = BackendState {
        flags: 0,
        id: 9,
        since_ns: T0_NS - SEC_NS,
        open_for_ns: 5 * SEC_NS,
        ..f.compiled.backends[0].state(STATE_OPEN, 0, 7)
    };
    f.left_entry(0, old);
    assert_eq!(f.sup.resume(f.t0), (1, 0));
    let writes = f
        .rec
        .writes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(writes.len(), 2, "{writes:?}");
    for (_, st) in writes {
        assert_eq!(
            (
                st.state,
                st.flags,
                st.id,
                st.epoch,
                st.since_ns,
                st.open_for_ns
            ),
            (
                STATE_OPEN,
                F_DROP | F_CLOSE_EXISTING | F_PASSIVE,
                0,
                7,
                T0_NS - SEC_NS,
                5 * SEC_NS
            )
        );
    }
}

#[test]
fn keys_that_disagree_are_written_again_from_the_first() {
    let mut f = fixture();
    f.left(0, STATE_OPEN, 0, T0_NS - SEC_NS, 5 * SEC_NS);
    let udp = f.compiled.backends[0].keys[1];
    f.rec
        .map
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(udp, f.compiled.backends[0].initial());
    assert_eq!(f.sup.resume(f.t0), (1, 0));
    assert_eq!(f.rec.take(), both(STATE_OPEN, 0, 7));
}

#[test]
fn the_balancer_reads_what_the_supervisor_will_resume() {
    let f = fixture();
    f.left(0, STATE_OPEN, 0, T0_NS - SEC_NS, 5 * SEC_NS);
    f.left(1, STATE_OPEN, 0, T0_NS - 60 * SEC_NS, 5 * SEC_NS);
    let got = not_closed(&f.rec, &f.compiled.backends, T0_NS);
    let id = |index| BackendId { service: 0, index };
    assert_eq!(
        got,
        HashMap::from([(id(0), State::Open), (id(1), State::HalfOpen)])
    );
    f.left(0, STATE_HALF_OPEN, 1, T0_NS - SEC_NS, 5 * SEC_NS);
    f.left(1, STATE_CLOSED, u32::MAX, T0_NS - SEC_NS, 5 * SEC_NS);
    let got = not_closed(&f.rec, &f.compiled.backends, T0_NS);
    assert_eq!(got, HashMap::from([(id(0), State::HalfOpen)]));
}

#[test]
fn stamps_are_on_the_datapath_clock_either_side_of_its_reading() {
    let t0 = Instant::now();
    let clock = Some((t0, T0_NS));
    assert_eq!(ktime_at(clock, t0), T0_NS);
    assert_eq!(
        ktime_at(clock, t0 + Duration::from_millis(1)),
        T0_NS + 1_000_000
    );
    assert_eq!(ktime_at(clock, t0 - Duration::from_secs(1)), T0_NS - SEC_NS);
    assert_eq!(
        ktime_at(Some((t0, 5)), t0 - Duration::from_secs(1)),
        0,
        "no wrap"
    );
    assert_eq!(ktime_at(None, t0), 0, "no reading: unstamped");
}

// Reloads: the previous supervisor's last published backends carried into the next one.

/// `POLICY` reloaded with a service inserted before `web`, and `web`'s backends reordered
/// with one added: every backend of `web` changes position and datapath id.
const RELOADED: &str = "
version: 1
interfaces:
  - name: eth0
services:
  - name: added
    match: {address: 198.18.0.12, port: 80}
    backends:
      - address: 10.0.3.1:80
    health_check: {timeout: 200ms}
  - name: web
    match: {address: 198.18.0.10, port: 80, protocol: any}
    backends:
      - address: 10.0.1.13:8080
      - address: 10.0.1.12:8080
      - address: 10.0.1.11:8080
    health_check: {timeout: 200ms}
    circuit_breaker:
      failure_threshold: 2
      reset_timeout: 5s
      max_reset_timeout: 20s
      half_open_max_flows: 3
      success_threshold: 2
      on_open: drop
      close_existing: true
      max_ejection_percent: 50%
  - name: plain
    match: {address: 198.18.0.11, port: 53, protocol: udp}
    backends:
      - address: 10.0.2.1:53
";

impl Fixture {
    /// What `Datapath::apply` does before the supervisor starts: the initial (closed) entry
    /// under every key the map does not hold yet; keys already there keep their state.
    fn applied(&self) {
        let mut map = self.rec.map.lock().unwrap_or_else(PoisonError::into_inner);
        for b in &self.compiled.backends {
            for k in &b.keys {
                map.entry(*k).or_insert_with(|| b.initial());
            }
        }
    }

    /// The supervisor a reload to `text` starts, `after` this one's start, on the same maps:
    /// as [`start`] builds it from `Origin::Reload` with this one's last published value,
    /// after `Datapath::apply` wrote the new policy's missing entries. Not resumed yet.
    fn reload(&self, text: &str, after: Duration) -> Fixture {
        let policy = config::load_str(text, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        let compiled = config::compile(&policy);
        let t0 = self.t0 + after;
        let last = self.sup.table.0.borrow().clone();
        let origin = Origin::Reload(&last);
        let mut sup = Supervisor::new(&policy, &compiled.backends, origin.carried(), t0);
        let after_ns = u64::try_from(after.as_nanos()).expect("a test's delay fits in u64");
        sup.clock = Some((t0, T0_NS + after_ns));
        sup.sink = Some(Box::new(self.rec.clone()));
        let f = Fixture {
            sup,
            compiled,
            rec: self.rec.clone(),
            t0,
        };
        f.applied();
        f
    }

    /// The published backend at `address` (unique in these policies).
    fn backend(&self, address: &str) -> Backend {
        self.sup
            .table
            .0
            .borrow()
            .iter()
            .find(|b| b.address.to_string() == address)
            .cloned()
            .unwrap_or_else(|| panic!("no backend {address} in the table"))
    }

    /// A probe result of the backend at `address` as the checker sends it.
    fn probe_as(&mut self, address: &str, failure: Option<ProbeFailure>, health: Health, ms: u64) {
        let b = self.backend(address);
        let r = ProbeResult {
            backend: BackendRef {
                service: b.service.clone(),
                service_id: b.id.service,
                index: b.id.index,
                address: b.address,
            },
            at: self.at(ms),
            outcome: failure.map_or(Ok(()), Err),
            attempts: 1,
            latency: Duration::from_millis(3),
            elapsed: Duration::from_millis(3),
            health,
            changed: b.health != Some(health),
        };
        self.sup.on_probes(&[r]);
    }
}

#[test]
fn a_reload_that_moves_a_backend_carries_it_whole() {
    let mut f = fixture();
    f.applied();
    let web0 = "10.0.1.11:8080";
    f.probe_as(web0, None, Health::Healthy, 1);
    let synacks = PassiveCounts {
        synack: 5,
        ..PassiveCounts::default()
    };
    f.sup.on_passive(vec![(0, synacks)], f.at(3));
    // Opens at 11 ms; the write fails once and is retried.
    f.rec.fail.store(true, Ordering::SeqCst);
    f.probe_as(web0, Some(ProbeFailure::Refused), Health::Healthy, 10);
    f.probe_as(
        web0,
        Some(ProbeFailure::Timeout(Duration::from_millis(200))),
        Health::Healthy,
        11,
    );
    f.rec.fail.store(false, Ordering::SeqCst);
    f.sup.on_timers(f.at(11) + WRITE_RETRY);
    f.probe_as(web0, Some(ProbeFailure::Refused), Health::Unhealthy, 12);
    let old = f.backend(web0);
    assert_eq!(
        (old.health, old.breaker, old.map_write_errors, old.id),
        (
            Some(Health::Unhealthy),
            Some(State::Open),
            1,
            BackendId {
                service: 0,
                index: 0
            }
        ),
        "the state before the reload"
    );
    let closed_since = f.backend("10.0.1.12:8080").since;
    f.rec.take();

    let mut g = f.reload(RELOADED, Duration::from_secs(2));
    assert_eq!(g.sup.resume(g.t0), (1, 0), "the open breaker resumes");
    let new = g.backend(web0);
    assert_eq!(
        (new.id, new.datapath_id),
        (
            BackendId {
                service: 1,
                index: 2
            },
            Some(2)
        ),
        "its place and datapath id are the new policy's"
    );
    assert_eq!(
        Backend {
            id: old.id,
            datapath_id: old.datapath_id,
            ..new
        },
        old,
        "everything else carried: health, since, probes, failures, latency, passive counts, \
         transitions, failed writes"
    );
    assert_eq!(
        g.rec.take(),
        [
            (PROTO_TCP, STATE_OPEN, 0, 0, 2),
            (PROTO_UDP, STATE_OPEN, 0, 0, 2)
        ],
        "only the entry whose id changed is written again, still open"
    );
    let kept = g.backend("10.0.1.12:8080");
    assert_eq!(
        (kept.breaker, kept.since, kept.id.service),
        (Some(State::Closed), closed_since, 1),
        "a closed breaker never written keeps its since"
    );
    let added = g.backend("10.0.1.13:8080");
    assert_eq!(
        (added.health, added.breaker, added.since, added.probes_ok),
        (Some(Health::Healthy), Some(State::Closed), g.t0, 0),
        "a new backend starts as on a fresh start"
    );

    // The open period (5 s from 11 ms) goes on from the map, under the new id.
    g.sup.on_timers(f.at(11) + Duration::from_millis(4_999));
    assert_eq!(g.rec.take(), [], "not over yet");
    g.sup.on_timers(f.at(11) + Duration::from_secs(5));
    assert_eq!(
        g.rec.take(),
        [
            (PROTO_TCP, STATE_HALF_OPEN, 3, 1, 2),
            (PROTO_UDP, STATE_HALF_OPEN, 3, 1, 2)
        ]
    );
}

#[test]
fn a_backend_whose_health_check_changed_starts_fresh() {
    let mut f = fixture();
    f.applied();
    let web0 = "10.0.1.11:8080";
    f.probe_as(web0, Some(ProbeFailure::Refused), Health::Healthy, 1);
    f.probe_as(web0, Some(ProbeFailure::Refused), Health::Unhealthy, 2);
    assert_eq!(f.backend(web0).breaker, Some(State::Open));
    let plain = f.backend("10.0.2.1:53");

    let changed = POLICY.replace(
        "health_check: {timeout: 200ms}",
        "health_check: {timeout: 300ms}",
    );
    assert_ne!(changed, POLICY);
    let g = f.reload(&changed, Duration::from_secs(1));
    let new = g.backend(web0);
    assert_eq!(
        (
            new.health,
            new.probes_ok,
            new.probes_failed,
            new.failures.len(),
            new.last_failure,
            new.transitions.len(),
            new.since,
        ),
        (Some(Health::Healthy), 0, 0, 0, None, 0, g.t0),
        "health and counters start over under another check"
    );
    assert_eq!(
        g.backend("10.0.2.1:53"),
        plain,
        "a service without a check, unchanged, is carried"
    );
}

#[test]
fn a_changed_check_still_resumes_its_breaker_from_the_maps() {
    let mut f = fixture();
    f.applied();
    f.probe_as(
        "10.0.1.11:8080",
        Some(ProbeFailure::Refused),
        Health::Healthy,
        1,
    );
    f.probe_as(
        "10.0.1.11:8080",
        Some(ProbeFailure::Refused),
        Health::Healthy,
        2,
    );
    let changed = POLICY.replace(
        "health_check: {timeout: 200ms}",
        "health_check: {timeout: 300ms}",
    );
    let mut g = f.reload(&changed, Duration::from_secs(1));
    assert_eq!(g.sup.resume(g.t0), (1, 0));
    assert_eq!(
        g.published(0),
        (Some(State::Open), f.at(2)),
        "as on adoption: open since the map's stamp"
    );
}

#[test]
fn passive_counters_are_history_unless_the_maps_are_fresh() {
    let none = Backends::new();
    let got =
        [Origin::Fresh, Origin::Adopted, Origin::Reload(&none)].map(Origin::counters_are_history);
    assert_eq!(got, [false, true, true]);
}

/// How long a backend probed every 50 ms may take to pass 3 probes on a loaded machine.
const RISE_DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_publishes_the_carried_health_first_and_probes_go_on_from_it() {
    // Accepts connections (the kernel completes them): every TCP probe succeeds.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a listener on 127.0.0.1");
    let addr = listener.local_addr().expect("its address");
    let policy = |before: &str| {
        let text = format!(
            "version: 1\ninterfaces:\n  - name: eth0\nservices:\n{before}  - name: web\n    \
             match: {{address: 198.18.0.10, port: 80}}\n    backends:\n      - address: \
             '{addr}'\n    health_check: {{interval: 50ms, unhealthy_interval: 50ms, timeout: \
             40ms, healthy_threshold: 3}}\n"
        );
        config::load_str(&text, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
    };
    let before = policy("");
    // A service before `web`, without checks: `web` moves from service 0 to 1.
    let after = policy(
        "  - name: first\n    match: {address: 198.18.0.9, port: 80}\n    backends:\n      \
         - address: 10.0.9.1:80\n",
    );
    // What the previous supervisor last published: `web` unhealthy after 4 refusals.
    let mut last = Supervisor::new(&before, &[], None, Instant::now())
        .table
        .0
        .borrow()
        .clone();
    last[0].health = Some(Health::Unhealthy);
    last[0].probes_failed = 4;
    last[0].failures.insert(ProbeFailure::Refused.label(), 4);
    last[0].last_failure = Some(ProbeFailure::Refused);

    let (stop_tx, stop_rx) = watch::channel(false);
    let (mut rx, task) = start_probing(
        &after,
        &[],
        None,
        Origin::Reload(&last),
        ProbeOptions::default(),
        None,
        stop_rx,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .expect("services with backends");
    let web = |v: &Backends| {
        v.iter()
            .find(|b| b.address == addr)
            .cloned()
            .expect("web's backend published")
    };
    // Read at once, but a probe may have come in already: it cannot have made it healthy.
    let first = web(&rx.borrow_and_update());
    assert_eq!(
        (
            first.id.service,
            first.health,
            first.failures.get("refused").copied()
        ),
        (1, Some(Health::Unhealthy), Some(4)),
        "the first value carries the health and counters, at the new position"
    );
    // Every value seen until it is healthy again: unhealthy until healthy_threshold (3)
    // successes, never healthy before (the checker starts from the carried health). A
    // probe timing out on a loaded machine only delays it.
    let deadline = tokio::time::Instant::now() + RISE_DEADLINE;
    loop {
        tokio::time::timeout_at(deadline, rx.changed())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "not healthy again within {RISE_DEADLINE:?}: {:?}",
                    web(&rx.borrow())
                )
            })
            .expect("the supervisor runs");
        let b = web(&rx.borrow_and_update());
        if b.health == Some(Health::Healthy) {
            assert!(
                b.probes_ok >= 3,
                "healthy after {} successes, healthy_threshold 3",
                b.probes_ok
            );
            break;
        }
        assert_eq!(b.health, Some(Health::Unhealthy), "{b:?}");
    }
    let _ = stop_tx.send(true);
    task.await.expect("the supervisor's task ends");
    drop(listener);
}

#[test]
fn probe_results_of_degradable_services_go_to_the_evaluator() {
    let text = POLICY.replace(
        "      max_ejection_percent: 50%\n",
        "      max_ejection_percent: 50%\n    degradation:\n      conditions: [{type: latency, threshold: 100ms, window: 2s}]\n      fallback: {strategy: shed}\n",
    );
    let policy = config::load_str(&text, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    let compiled = config::compile(&policy);
    let t0 = Instant::now();
    let mut sup = Supervisor::new(&policy, &compiled.backends, None, t0);
    assert_eq!(sup.degradable, vec![true, false]);
    let (tx, mut rx) = sample_channel();
    sup.samples = Some(tx);
    let result = |service: &str, service_id, address: &str, ok: bool| ProbeResult {
        backend: BackendRef {
            service: Arc::from(service),
            service_id,
            index: 0,
            address: address.parse().unwrap_or_else(|e| panic!("{e}")),
        },
        at: t0 + Duration::from_millis(5),
        outcome: if ok {
            Ok(())
        } else {
            Err(ProbeFailure::Timeout(Duration::from_millis(200)))
        },
        attempts: 1,
        latency: Duration::from_millis(if ok { 3 } else { 200 }),
        elapsed: Duration::from_millis(200),
        health: Health::Healthy,
        changed: false,
    };
    sup.on_probes(&[
        result("web", 0, "10.0.1.11:8080", false),
        result("plain", 1, "10.0.2.1:53", true),
        result("web", 0, "10.0.1.11:8080", true),
    ]);
    let batch = rx.try_recv().expect("one batch sent");
    assert_eq!(
        batch
            .iter()
            .map(|s| (&*s.service, s.latency.as_millis(), s.ok))
            .collect::<Vec<_>>(),
        vec![("web", 200, false), ("web", 3, true)],
        "web's results only, with their latency (a timeout's included)"
    );
    assert!(rx.try_recv().is_err(), "one batch per call");
    // Nothing from a batch without a degradable service's result.
    sup.on_probes(&[result("plain", 1, "10.0.2.1:53", true)]);
    assert!(rx.try_recv().is_err());
}
