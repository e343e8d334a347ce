//! Accounting of policy reloads: what asked for each (SIGHUP, a change of the file), how it
//! ended, the error of the latest that did not apply, and the policy generation. Served in
//! `/status` (`reload`) and `/metrics` (`agent_reload_total{result}`, ...).

use std::{
    fmt,
    time::{Duration, SystemTime},
};

pub use agent_common::status::{ReloadAttempt, ReloadStatus};

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Sighup,
    /// The policy file changed (`config::watch`).
    File,
}

impl Trigger {
    /// As `/status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Sighup => "SIGHUP",
            Trigger::File => "file",
        }
    }
}

/// As logs say it.
impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Sighup => "SIGHUP",
            Trigger::File => "policy file changed",
        })
    }
}

/// How a reload ended: the `result` label of `agent_reload_total`. A new class is a variant
/// here, its name in [`Outcome::as_str`] and [`Outcome::ALL`], and the errors of its class in
/// `run::reload_outcome` (there: telemetry does not depend on `run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The new policy is in force.
    Ok,
    /// The file is the policy in force: nothing was written.
    Unchanged,
    /// The file does not validate (or cannot be read); the running policy stays.
    Invalid,
    /// The file is valid, but the running datapath cannot take it live (the reason at the
    /// field); the running policy stays.
    Refused,
    /// The file is valid, applying it failed; the running policy stays.
    Failed,
    /// The file is gone; nothing was read, the running policy stays.
    Missing,
}

impl Outcome {
    /// Every class, in the order metrics and status list them.
    pub const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::Unchanged,
        Outcome::Invalid,
        Outcome::Refused,
        Outcome::Failed,
        Outcome::Missing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Unchanged => "unchanged",
            Outcome::Invalid => "invalid",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
            Outcome::Missing => "missing",
        }
    }

    /// Whether the reload put a new policy in force.
    pub fn applied(self) -> bool {
        self == Outcome::Ok
    }

    /// Whether the running policy is the file's after it (applied, or already was).
    pub fn in_line(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Unchanged)
    }
}

/// The reloads since start.
#[derive(Debug, Clone)]
pub struct ReloadLog {
    generation: u64,
    applied_at: SystemTime,
    counts: [u64; Outcome::ALL.len()],
    last: Option<ReloadAttempt>,
    last_failure: Option<ReloadAttempt>,
}

impl ReloadLog {
    /// Generation 0, the start's policy applied at `started`.
    pub fn new(started: SystemTime) -> ReloadLog {
        ReloadLog {
            generation: 0,
            applied_at: started,
            counts: [0; Outcome::ALL.len()],
            last: None,
            last_failure: None,
        }
    }

    /// One reload that ended at `at` after `took`; `error` is what it logged when it did not
    /// apply.
    pub fn record(
        &mut self,
        trigger: Trigger,
        outcome: Outcome,
        error: Option<String>,
        at: SystemTime,
        took: Duration,
    ) {
        let slot = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("every outcome is in ALL");
        self.counts[slot] += 1;
        let attempt = ReloadAttempt {
            trigger: trigger.as_str().to_owned(),
            result: outcome.as_str().to_owned(),
            error,
            at: unix_seconds(at),
            took_seconds: took.as_secs_f64(),
        };
        if outcome.applied() {
            self.generation += 1;
            self.applied_at = at;
        }
        if !outcome.in_line() {
            self.last_failure = Some(attempt.clone());
        }
        self.last = Some(attempt);
    }

    pub fn status(&self) -> ReloadStatus {
        ReloadStatus {
            generation: self.generation,
            applied_at: unix_seconds(self.applied_at),
            count: self.counts.iter().sum(),
            results: Outcome::ALL
                .iter()
                .zip(self.counts)
                .map(|(o, n)| (o.as_str().to_owned(), n))
                .collect(),
            last: self.last.clone(),
            last_failure: self.last_failure.clone(),
        }
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_counts_every_class_and_keeps_the_latest_failure() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut log = ReloadLog::new(t0);
        let s = log.status();
        assert_eq!((s.generation, s.applied_at, s.count), (0, 1_000.0, 0));
        assert_eq!(
            s.results.keys().collect::<Vec<_>>(),
            ["failed", "invalid", "missing", "ok", "refused", "unchanged"]
        );
        assert!(s.results.values().all(|n| *n == 0));

        let at = |s: u64| t0 + Duration::from_secs(s);
        let ms = Duration::from_millis(5);
        let error = "p.yaml:3:5: services[0].rate_limit.rate: must be greater than 0";
        log.record(
            Trigger::File,
            Outcome::Invalid,
            Some(error.into()),
            at(1),
            ms,
        );
        log.record(Trigger::Sighup, Outcome::Ok, None, at(2), ms);
        log.record(Trigger::File, Outcome::Ok, None, at(3), ms);
        let s = log.status();
        assert_eq!((s.generation, s.applied_at, s.count), (2, 1_003.0, 3));
        assert_eq!((s.results["ok"], s.results["invalid"]), (2, 1));
        let last = s.last.unwrap();
        assert_eq!(
            (last.trigger.as_str(), last.result.as_str()),
            ("file", "ok")
        );
        assert_eq!(last.error, None);
        let failure = s.last_failure.unwrap();
        assert_eq!(
            (failure.trigger.as_str(), failure.result.as_str()),
            ("file", "invalid")
        );
        assert_eq!(failure.error.as_deref(), Some(error));
        assert_eq!((failure.at, failure.took_seconds), (1_001.0, 0.005));

        log.record(Trigger::File, Outcome::Missing, None, at(4), ms);
        let s = log.status();
        assert_eq!((s.generation, s.results["missing"]), (2, 1));
        assert_eq!(s.last, s.last_failure);

        // Unchanged: no new generation, and no failure either.
        log.record(Trigger::Sighup, Outcome::Unchanged, None, at(5), ms);
        let s = log.status();
        assert_eq!(
            (s.generation, s.applied_at, s.results["unchanged"]),
            (2, 1_003.0, 1)
        );
        assert_eq!(s.last_failure.unwrap().result, "missing");
    }
}
