//! When probes run and what they mean: the rise/fall counter, retry backoff, jitter, and the
//! loop one backend's task runs.
//!
//! Each backend is one tokio task, asleep on tokio's timer wheel between probes: thousands of
//! backends cost thousands of small futures, not threads. Probes follow a grid: probe `n` is
//! due at a nominal time, starts up to `jitter` of the interval after it (so backends spread
//! out instead of probing in lockstep), and must be done, retries included, by the next
//! nominal time. Jitter never accumulates, so a backend is probed once per interval on
//! average however long its probes take.

use std::time::Duration;

use fastrand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::probe::{Probe, ProbeFailure};
use super::{BackendRef, Health, ProbeResult};
use crate::config::{HealthCheck, Percent, Retry};

/// A retry needs at least this much of the interval left, or it is not started.
pub const MIN_ATTEMPT: Duration = Duration::from_millis(10);

/// Rise and fall: how many consecutive results against the current health flip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RiseFall {
    health: Health,
    /// Consecutive results contradicting `health`.
    streak: u32,
    rise: u32,
    fall: u32,
}

impl RiseFall {
    /// `rise` = `healthy_threshold`, `fall` = `unhealthy_threshold` (both at least 1).
    pub fn new(initial: Health, rise: u32, fall: u32) -> RiseFall {
        RiseFall {
            health: initial,
            streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Counts one probe result; `true` when it flipped the health.
    pub fn observe(&mut self, success: bool) -> bool {
        let (against, needed, flipped) = match self.health {
            Health::Healthy => (!success, self.fall, Health::Unhealthy),
            Health::Unhealthy => (success, self.rise, Health::Healthy),
        };
        if !against {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        if self.streak >= needed {
            self.health = flipped;
            self.streak = 0;
            true
        } else {
            false
        }
    }
}

/// The backoff before retry `n` (0 = before the second attempt), before jitter:
/// `initial_backoff * 2^n`, at most `max_backoff`.
pub fn backoff(retry: &Retry, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n).unwrap_or(u32::MAX);
    retry
        .initial_backoff
        .saturating_mul(factor)
        .min(retry.max_backoff)
}

/// "Equal jitter": uniform in `[b/2, b]`. Retries of backends that failed together spread
/// out, and a retry never waits less than half its backoff.
pub fn jittered_backoff(b: Duration, rng: &mut Rng) -> Duration {
    b / 2 + b.mul_f64(rng.f64() / 2.0)
}

/// How late after its nominal time a probe starts: uniform in `[0, jitter x interval)`.
pub fn start_delay(interval: Duration, jitter: Percent, rng: &mut Rng) -> Duration {
    interval.mul_f64(jitter.fraction() * rng.f64())
}

/// What one probe (all its attempts) came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRun {
    pub outcome: Result<(), ProbeFailure>,
    pub attempts: u32,
    /// The last attempt's.
    pub latency: Duration,
    /// From the first attempt's start to the last attempt's end.
    pub elapsed: Duration,
}

/// Runs up to `retry.max_attempts` attempts with backoff, all before `deadline`. The first
/// attempt gets the full `timeout`; a retry gets what is left of it before the deadline.
pub async fn run_probe(
    probe: &Probe,
    timeout: Duration,
    retry: &Retry,
    deadline: Instant,
    rng: &mut Rng,
) -> ProbeRun {
    let began = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let start = Instant::now();
        let budget = if attempts == 1 {
            timeout
        } else {
            timeout.min(deadline.saturating_duration_since(start))
        };
        let outcome = probe.attempt(budget).await;
        let end = Instant::now();
        let run = ProbeRun {
            outcome,
            attempts,
            latency: end - start,
            elapsed: end - began,
        };
        if run.outcome.is_ok() || attempts >= retry.max_attempts {
            return run;
        }
        let wait = jittered_backoff(backoff(retry, attempts - 1), rng);
        if deadline.saturating_duration_since(end + wait) < MIN_ATTEMPT {
            return run;
        }
        tokio::time::sleep(wait).await;
    }
}

/// The loop of one backend's task; ends when the receiver of results is gone.
pub(crate) async fn run_backend(
    backend: BackendRef,
    probe: Probe,
    check: HealthCheck,
    initial: Health,
    results: mpsc::Sender<ProbeResult>,
) {
    let mut rng = Rng::new();
    let mut rise_fall = RiseFall::new(initial, check.healthy_threshold, check.unhealthy_threshold);
    let first_interval = interval_for(&check, initial);
    // The first probe anywhere in the first interval: backends added together do not probe
    // together for ever after.
    let mut nominal = Instant::now() + first_interval.mul_f64(rng.f64());
    loop {
        let interval = interval_for(&check, rise_fall.health());
        tokio::time::sleep_until(nominal + start_delay(interval, check.jitter, &mut rng)).await;
        let deadline = nominal + interval;
        let run = run_probe(&probe, check.timeout, &check.retry, deadline, &mut rng).await;
        let changed = rise_fall.observe(run.outcome.is_ok());
        let result = ProbeResult {
            backend: backend.clone(),
            at: std::time::Instant::now(),
            outcome: run.outcome,
            attempts: run.attempts,
            latency: run.latency,
            elapsed: run.elapsed,
            health: rise_fall.health(),
            changed,
        };
        if results.send(result).await.is_err() {
            return;
        }
        // Behind schedule (a loaded host, a slow receiver): resume from now rather than
        // firing the missed probes in a burst.
        nominal = deadline.max(Instant::now());
    }
}

fn interval_for(check: &HealthCheck, health: Health) -> Duration {
    match health {
        Health::Healthy => check.interval,
        Health::Unhealthy => check.unhealthy_interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut rf = RiseFall::new(Health::Healthy, 2, 3);
        let seq = [
            false, false, true, false, false, false, true, false, true, true,
        ];
        let got: Vec<(bool, Health)> = seq
            .iter()
            .map(|&ok| (rf.observe(ok), rf.health()))
            .collect();
        use Health::{Healthy as H, Unhealthy as U};
        assert_eq!(
            got,
            [
                (false, H),
                (false, H),
                (false, H), // a success breaks the fall streak
                (false, H),
                (false, H),
                (true, U), // third consecutive failure
                (false, U),
                (false, U), // a failure breaks the rise streak
                (false, U),
                (true, H), // second consecutive success
            ]
        );
    }

    #[test]
    fn thresholds_of_one_flip_at_once() {
        let mut rf = RiseFall::new(Health::Unhealthy, 1, 1);
        assert!(rf.observe(true));
        assert!(rf.observe(false));
        assert!(!rf.observe(false));
    }

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let retry = Retry {
            max_attempts: 10,
            initial_backoff: ms(50),
            max_backoff: ms(500),
        };
        let got: Vec<Duration> = (0..6).map(|n| backoff(&retry, n)).collect();
        assert_eq!(got, [50, 100, 200, 400, 500, 500].map(ms));
        assert_eq!(backoff(&retry, 40), ms(500), "no overflow");
    }

    #[test]
    fn jitter_stays_in_its_bounds() {
        let mut rng = Rng::with_seed(7);
        for _ in 0..10_000 {
            let b = jittered_backoff(ms(100), &mut rng);
            assert!((ms(50)..=ms(100)).contains(&b), "{b:?}");
            let d = start_delay(ms(1000), Percent::whole(10), &mut rng);
            assert!(d < ms(100), "{d:?}");
        }
        assert_eq!(
            start_delay(ms(1000), Percent::whole(0), &mut rng),
            Duration::ZERO
        );
    }
}
