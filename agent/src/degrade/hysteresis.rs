//! Whether one service is degraded: as soon as any condition is met; back to normal only
//! after every condition has been unmet for `recover_after` without a break (a met condition
//! restarts that clock). A condition oscillating around its threshold keeps the service
//! degraded rather than flapping.

use std::time::{Duration, Instant};

use super::condition::duration;

/// A change of [`Hysteresis::degraded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Degraded,
    Recovered,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hysteresis {
    degraded: bool,
    /// The latest change of `degraded` (or the start).
    since: Instant,
    /// While degraded: since when every condition has been unmet.
    clear_since: Option<Instant>,
    /// What decided the latest change.
    cause: Option<String>,
}

impl Hysteresis {
    /// Not degraded, since `now`; `cause` says why when it is not the first start (a reload
    /// that changed the service's `degradation`).
    pub fn new(now: Instant, cause: Option<String>) -> Hysteresis {
        Hysteresis {
            degraded: false,
            since: now,
            clear_since: None,
            cause,
        }
    }

    /// Degraded since `now`, as the datapath was found (`mode`, left by an earlier agent):
    /// it recovers through `recover_after` like any degraded service.
    pub fn adopted(now: Instant, mode: &str) -> Hysteresis {
        Hysteresis {
            degraded: true,
            since: now,
            clear_since: None,
            cause: Some(format!("adopted: the datapath held mode {mode}")),
        }
    }

    /// One evaluation at `now`: `met` whether any condition is met, `cause` the words of
    /// the first met one (asked only when it degrades the service).
    pub fn update(
        &mut self,
        now: Instant,
        met: bool,
        cause: impl FnOnce() -> String,
        recover_after: Duration,
    ) -> Option<Change> {
        if !self.degraded {
            if !met {
                return None;
            }
            self.degraded = true;
            self.since = now;
            self.clear_since = None;
            self.cause = Some(cause());
            return Some(Change::Degraded);
        }
        if met {
            self.clear_since = None;
            return None;
        }
        let clear = *self.clear_since.get_or_insert(now);
        if now.saturating_duration_since(clear) < recover_after {
            return None;
        }
        self.degraded = false;
        self.since = now;
        self.clear_since = None;
        self.cause = Some(format!(
            "recovered: all conditions false for {}",
            duration(recover_after)
        ));
        Some(Change::Recovered)
    }

    pub fn degraded(&self) -> bool {
        self.degraded
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    pub fn cause(&self) -> Option<&str> {
        self.cause.as_deref()
    }

    /// How long every condition has been unmet while degraded; zero when not degraded.
    pub fn clear_for(&self, now: Instant) -> Duration {
        self.clear_since
            .map_or(Duration::ZERO, |c| now.saturating_duration_since(c))
    }
}
