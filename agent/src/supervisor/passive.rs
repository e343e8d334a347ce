//! Passive failure detection (`health_check.passive`): the datapath answers for real client
//! connections what a probe answers for its own. Per backend, it counts SYN-ACKs
//! (`BSTAT_SYNACK`) and RSTs (`BSTAT_REFUSED`) answering tracked SYNs, and leaves unanswered
//! SYNs in `PENDING_SYNS`. Every [`PASSIVE_TICK`] a blocking poller turns the counters into
//! deltas, sweeps the SYNs older than the service's `health_check.timeout` (timeouts), and
//! sends what it saw to the supervisor, which feeds it to the breakers.
//!
//! The pure part ([`PassiveTracker`], [`BreakerFeed::outcomes`]) is unit-tested; the loop
//! around it only reads and deletes map entries.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agent_common::{
    breaker::{BSTAT_REFUSED, BSTAT_SYNACK},
    status::PassiveCounts,
};
use tokio::sync::{mpsc, watch};

use crate::breaker::Outcome;
use crate::datapath::{BackendMaps, ktime_now_ns};

/// How often the counters are read (and, when the table is small, the SYNs swept).
pub const PASSIVE_TICK: Duration = Duration::from_millis(100);

/// At most this many outcomes per backend and tick reach its breaker (10 000 a second): each
/// costs a breaker update, and beyond this the proportions carry the signal, not the count.
pub const PASSIVE_FEED_CAP: u64 = 1_000;

/// A sweep walks the whole `PENDING_SYNS` table (two syscalls per entry); like the key-table
/// walk, it may take at most 1/this of the time, so a full table is swept less often.
const SWEEP_DUTY: u32 = 20;

/// What passive detection saw, as breaker input. A trait because [`PassiveCounts`] is the
/// status JSON's type (`agent_common::status`), which knows nothing of breakers.
pub trait BreakerFeed {
    /// The outcomes to feed the breaker: a success per SYN-ACK, a failure per refusal or
    /// timeout, at most `cap` of them in the same proportions (a kind seen at all keeps at
    /// least one).
    ///
    /// Within one tick the order is unknown, so failures are spread evenly among successes:
    /// 3 refusals among 300 SYN-ACKs are not "3 consecutive failures", while a tick of
    /// nothing but failures is.
    fn outcomes(&self, cap: u64) -> Vec<Outcome>;
}

impl BreakerFeed for PassiveCounts {
    fn outcomes(&self, cap: u64) -> Vec<Outcome> {
        let (successes, failures) =
            scale(self.synack, self.refused.saturating_add(self.timeout), cap);
        let n = successes + failures;
        (0..n)
            .map(|i| {
                // Bresenham: the i-th outcome is a failure when the failure count owed by
                // its end exceeds the one owed by its start.
                let owed = |k: u64| u128::from(k) * u128::from(failures) / u128::from(n);
                if owed(i + 1) > owed(i) {
                    Outcome::Failure
                } else {
                    Outcome::Success
                }
            })
            .collect()
    }
}

/// Scales `(successes, failures)` down to at most `cap` in all, rounding to the nearest and
/// keeping one of each kind that was seen (when `cap` allows two).
fn scale(successes: u64, failures: u64, cap: u64) -> (u64, u64) {
    let n = u128::from(successes) + u128::from(failures);
    if n <= u128::from(cap) {
        return (successes, failures);
    }
    let rounded = (u128::from(failures) * u128::from(cap) + n / 2) / n;
    let mut f = u64::try_from(rounded).unwrap_or(cap).min(cap);
    if failures > 0 {
        f = f.max(1);
    }
    if successes > 0 && cap > 1 {
        f = f.min(cap - 1);
    }
    (cap - f, f)
}

/// Turns the datapath's cumulative counters into what is new since the last read.
#[derive(Debug, Default)]
pub struct PassiveTracker {
    /// (SYN-ACK, refused) totals per backend id as last read.
    last: HashMap<u32, (u64, u64)>,
}

impl PassiveTracker {
    /// Takes the totals the counters hold when the poller starts as the base: pinned maps an
    /// agent adopted carry their whole history, which is not news to this one (nor, after a
    /// reload, to the next supervisor).
    pub fn seed(&mut self, id: u32, synack: u64, refused: u64) {
        self.last.insert(id, (synack, refused));
    }

    /// What is new since the previous read of backend `id` (or its seed; an unseeded first
    /// read counts from zero). A total below the last one means the counter was reset: it
    /// becomes the new base.
    pub fn delta(&mut self, id: u32, synack: u64, refused: u64) -> PassiveCounts {
        let (last_s, last_r) = self.last.insert(id, (synack, refused)).unwrap_or((0, 0));
        PassiveCounts {
            synack: synack.saturating_sub(last_s),
            refused: refused.saturating_sub(last_r),
            timeout: 0,
        }
    }
}

/// A backend with passive detection, as the poller knows it.
#[derive(Debug, Clone, Copy)]
pub struct PassiveBackend {
    pub id: u32,
    /// `health_check.timeout`: an unanswered SYN older than this is a failure.
    pub timeout: Duration,
}

/// One tick's observations: backend id and what is new, only backends with something new.
pub type PassiveBatch = Vec<(u32, PassiveCounts)>;

/// The poller: reads, sweeps and reports every [`PASSIVE_TICK`] until `stop` turns true (or
/// its sender is gone) or the supervisor is gone. Blocking (map syscalls): run it on a
/// blocking thread, which a runtime waits for when it shuts down: hence every way out.
/// `history`: the counters' totals at its start are not news (adopted maps, or a reload).
pub fn poll(
    mut maps: BackendMaps,
    backends: Vec<PassiveBackend>,
    history: bool,
    results: mpsc::Sender<PassiveBatch>,
    stop: watch::Receiver<bool>,
) {
    let timeouts: HashMap<u32, u64> = backends
        .iter()
        .map(|b| {
            (
                b.id,
                u64::try_from(b.timeout.as_nanos()).unwrap_or(u64::MAX),
            )
        })
        .collect();
    let mut tracker = PassiveTracker::default();
    // Adopted counters hold the earlier agent's history, and on a reload the previous
    // poller's: the base, not news. Fresh ones count from zero (what they held before this
    // thread's first read happened since the attach, and is news).
    for b in backends.iter().filter(|_| history) {
        // A backend that cannot be read now is read from zero later.
        if let Ok((synack, refused)) = read(&maps, b.id) {
            tracker.seed(b.id, synack, refused);
        }
    }
    let mut failing = false;
    let mut next_sweep = Instant::now();
    let stopped = || *stop.borrow() || stop.has_changed().is_err() || results.is_closed();
    while !stopped() {
        let started = Instant::now();
        let mut seen: HashMap<u32, PassiveCounts> = HashMap::new();
        let mut errors = Vec::new();
        if started >= next_sweep {
            match sweep(&mut maps, &timeouts) {
                Ok(timed_out) => {
                    for (id, n) in timed_out {
                        seen.entry(id).or_default().timeout += n;
                    }
                }
                Err(e) => errors.push(e),
            }
            next_sweep = started + PASSIVE_TICK.max(started.elapsed() * SWEEP_DUTY);
        }
        for b in &backends {
            match read(&maps, b.id) {
                Ok((synack, refused)) => seen
                    .entry(b.id)
                    .or_default()
                    .add(&tracker.delta(b.id, synack, refused)),
                Err(e) => errors.push(e),
            }
        }
        failing = report_errors(&errors, failing);
        let mut batch: PassiveBatch = seen.into_iter().filter(|(_, c)| !c.is_empty()).collect();
        batch.sort_by_key(|(id, _)| *id);
        if !batch.is_empty() && results.blocking_send(batch).is_err() {
            return;
        }
        std::thread::sleep(PASSIVE_TICK.saturating_sub(started.elapsed()));
    }
}

fn sweep(maps: &mut BackendMaps, timeouts: &HashMap<u32, u64>) -> Result<Vec<(u32, u64)>, String> {
    let now = ktime_now_ns().ok_or("CLOCK_MONOTONIC unreadable")?;
    maps.sweep_pending(now, |id| timeouts.get(&id).copied())
        .map_err(|e| format!("sweeping unanswered SYNs: {e}"))
}

fn read(maps: &BackendMaps, id: u32) -> Result<(u64, u64), String> {
    let slot = |slot| {
        maps.backend_counter(id, slot)
            .map(|c| c.packets)
            .map_err(|e| format!("reading the counters of backend id {id}: {e}"))
    };
    Ok((slot(BSTAT_SYNACK)?, slot(BSTAT_REFUSED)?))
}

/// Logs the first error of a failing streak and its end, not every tick's (ten a second).
fn report_errors(errors: &[String], was_failing: bool) -> bool {
    match (errors.first(), was_failing) {
        (Some(e), false) => {
            tracing::warn!("passive detection: {e} (further errors not logged until it recovers)");
            true
        }
        (None, true) => {
            tracing::info!("passive detection: map reads work again");
            false
        }
        (_, failing) => failing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::{Failure as F, Success as S};

    fn counts(synack: u64, refused: u64, timeout: u64) -> PassiveCounts {
        PassiveCounts {
            synack,
            refused,
            timeout,
        }
    }

    #[test]
    fn counts_from_zero_then_deltas() {
        let mut t = PassiveTracker::default();
        assert_eq!(t.delta(3, 50, 7), counts(50, 7, 0));
        assert_eq!(t.delta(3, 55, 7), counts(5, 0, 0));
        assert_eq!(t.delta(3, 55, 9), counts(0, 2, 0));
        assert_eq!(t.delta(3, 55, 9), PassiveCounts::default());
        assert_eq!(t.delta(4, 1, 1), counts(1, 1, 0), "ids are tracked apart");
    }

    #[test]
    fn adopted_totals_are_the_base_not_news() {
        let mut t = PassiveTracker::default();
        t.seed(3, 1_000, 4);
        assert_eq!(t.delta(3, 1_000, 4), PassiveCounts::default());
        assert_eq!(t.delta(3, 1_002, 5), counts(2, 1, 0));
    }

    #[test]
    fn a_counter_going_back_is_a_new_baseline_not_a_flood() {
        let mut t = PassiveTracker::default();
        t.delta(0, 1_000, 1_000);
        assert_eq!(t.delta(0, 10, 2), PassiveCounts::default());
        assert_eq!(t.delta(0, 12, 5), counts(2, 3, 0));
    }

    #[test]
    fn outcomes_are_one_per_observation() {
        assert_eq!(counts(0, 0, 0).outcomes(100), []);
        assert_eq!(counts(2, 0, 0).outcomes(100), [S, S]);
        assert_eq!(
            counts(0, 2, 1).outcomes(100),
            [F, F, F],
            "refusals and timeouts are failures"
        );
    }

    #[test]
    fn failures_are_spread_among_successes() {
        let o = counts(6, 2, 0).outcomes(100);
        assert_eq!(o, [S, S, S, F, S, S, S, F]);
        let o = counts(300, 3, 0).outcomes(1_000);
        let longest_failure_run = o
            .split(|x| *x == S)
            .map(<[Outcome]>::len)
            .max()
            .unwrap_or(0);
        assert_eq!(longest_failure_run, 1, "3 in 303 are never consecutive");
        assert_eq!(o.iter().filter(|x| **x == F).count(), 3);
    }

    #[test]
    fn a_flood_is_scaled_to_the_cap_in_proportion() {
        let o = counts(90_000, 5_000, 5_000).outcomes(1_000);
        assert_eq!(o.len(), 1_000);
        assert_eq!(o.iter().filter(|x| **x == F).count(), 100);
    }

    #[test]
    fn scaling_keeps_a_rare_kind_seen() {
        let o = counts(1_000_000, 1, 0).outcomes(1_000);
        assert_eq!(o.len(), 1_000);
        assert_eq!(o.iter().filter(|x| **x == F).count(), 1);
        let o = counts(1, 1_000_000, 0).outcomes(1_000);
        assert_eq!(o.iter().filter(|x| **x == S).count(), 1);
        assert_eq!(
            scale(5, 5, 1),
            (0, 1),
            "a cap of one keeps the failure (the conservative side)"
        );
    }

    #[test]
    fn labels_are_the_metric_results() {
        assert_eq!(
            counts(1, 2, 3).by_result(),
            [("synack", 1), ("refused", 2), ("timeout", 3)]
        );
    }
}
