//! What one service's conditions are measured over: probe samples, passive attempts and
//! availability readings, each stamped, kept for the longest window of the service's
//! conditions, and measured over any shorter one.
//!
//! A sample taken at `at` is in the window of length `w` ending at `now` when
//! `now - at < w`.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use agent_common::status::PassiveCounts;

/// Passive attempts seen in one tick: answered SYNs, refused, unanswered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attempts {
    pub total: u64,
    pub failed: u64,
}

impl Attempts {
    fn of(c: &PassiveCounts) -> Attempts {
        let failed = c.refused.saturating_add(c.timeout);
        Attempts {
            total: c.synack.saturating_add(failed),
            failed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Probe {
    at: Instant,
    latency: Duration,
    ok: bool,
}

/// One service's samples.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    probes: VecDeque<Probe>,
    passive: VecDeque<(Instant, Attempts)>,
    availability: VecDeque<(Instant, f64)>,
    /// Each backend's cumulative passive counts at the last reading: the next reading's
    /// difference is what happened in between.
    baseline: HashMap<SocketAddr, PassiveCounts>,
    /// How long samples are kept: the longest window.
    span: Duration,
}

fn within(now: Instant, at: Instant, window: Duration) -> bool {
    now.saturating_duration_since(at) < window
}

impl Windows {
    pub fn new(span: Duration) -> Windows {
        Windows {
            span,
            ..Windows::default()
        }
    }

    pub fn probe(&mut self, at: Instant, latency: Duration, ok: bool) {
        self.probes.push_back(Probe { at, latency, ok });
    }

    /// One reading of the service's backends' cumulative passive counts, taken at `now`: the
    /// differences since the last reading are this tick's attempts. A backend seen for the
    /// first time, or whose counts went down (another supervisor's), gives its baseline
    /// only. Backends no longer read are forgotten.
    pub fn passive(&mut self, now: Instant, backends: &[(SocketAddr, PassiveCounts)]) {
        let mut seen = Attempts::default();
        for &(address, counts) in backends {
            // Updated in place: no map built per tick.
            if let Some(old) = self.baseline.insert(address, counts)
                && counts.synack >= old.synack
                && counts.refused >= old.refused
                && counts.timeout >= old.timeout
            {
                let d = Attempts::of(&PassiveCounts {
                    synack: counts.synack - old.synack,
                    refused: counts.refused - old.refused,
                    timeout: counts.timeout - old.timeout,
                });
                seen.total += d.total;
                seen.failed += d.failed;
            }
        }
        if self.baseline.len() > backends.len() {
            (self.baseline).retain(|a, _| backends.iter().any(|(b, _)| b == a));
        }
        if seen.total > 0 {
            self.passive.push_back((now, seen));
        }
    }

    /// The share of the service's backends available at `now`; `None` when it has none
    /// published (no reading).
    pub fn availability(&mut self, now: Instant, share: Option<f64>) {
        if let Some(share) = share {
            self.availability.push_back((now, share));
        }
    }

    /// Forgets the samples older than the longest window.
    pub fn prune(&mut self, now: Instant) {
        let span = self.span;
        self.probes.retain(|p| within(now, p.at, span));
        self.passive.retain(|(at, _)| within(now, *at, span));
        self.availability.retain(|(at, _)| within(now, *at, span));
    }

    /// The p99 (nearest rank: the `ceil(0.99 n)`-th smallest) of the probe latencies in the
    /// window, and how many there are; `None` without one.
    pub fn latency_p99(&self, now: Instant, window: Duration) -> (Option<Duration>, u64) {
        let mut l: Vec<Duration> = (self.probes.iter())
            .filter(|p| within(now, p.at, window))
            .map(|p| p.latency)
            .collect();
        let n = l.len();
        if n == 0 {
            return (None, 0);
        }
        let rank = (99 * n).div_ceil(100);
        let (_, p99, _) = l.select_nth_unstable(rank - 1);
        (Some(*p99), n as u64)
    }

    /// Failed attempts over attempts in the window: probes, and passive attempts (refused
    /// and unanswered SYNs failed).
    pub fn attempts(&self, now: Instant, window: Duration) -> Attempts {
        let mut a = Attempts::default();
        for p in self.probes.iter().filter(|p| within(now, p.at, window)) {
            a.total += 1;
            a.failed += u64::from(!p.ok);
        }
        for (_, seen) in self
            .passive
            .iter()
            .filter(|(at, _)| within(now, *at, window))
        {
            a.total += seen.total;
            a.failed += seen.failed;
        }
        a
    }

    /// The mean availability over the window, and how many readings it is over.
    pub fn availability_mean(&self, now: Instant, window: Duration) -> (Option<f64>, u64) {
        let (sum, n) = (self.availability.iter())
            .filter(|(at, _)| within(now, *at, window))
            .fold((0.0, 0u64), |(s, n), (_, share)| (s + share, n + 1));
        if n == 0 {
            (None, 0)
        } else {
            (Some(sum / n as f64), n)
        }
    }
}
