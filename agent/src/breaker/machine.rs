//! One backend's breaker: closed -> open -> half_open -> closed, driven by outcomes and by
//! the time the caller passes in.
//!
//! Nothing here reads a clock or sleeps: the same calls with the same times give the same
//! transitions, so every edge is unit-tested, and the agent decides when to call [`poll`]
//! (at [`next_deadline`]).
//!
//! [`poll`]: Breaker::poll
//! [`next_deadline`]: Breaker::next_deadline

use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::breaker::Resumed;

use super::state::{Admission, Outcome, Reason, State, Transition};
use super::window::{Totals, Window};
use crate::config::CircuitBreaker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, successes: u32 },
}

/// What an outcome did, for the [`EjectionGuard`](super::EjectionGuard) to decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Observed {
    Nothing,
    Changed(Transition),
    /// Closed and a trip condition holds: opening is up to the caller.
    WantsOpen(Reason),
}

/// The circuit breaker of one backend.
#[derive(Debug, Clone)]
pub struct Breaker {
    /// Shared by the breakers of a service: one copy, not one per backend, keeps each
    /// breaker small (a probe's outcome touches fewer cache lines).
    cfg: Arc<CircuitBreaker>,
    inner: Inner,
    /// When the current state was entered, for "time in state".
    since: Instant,
    consecutive_failures: u32,
    window: Window,
    /// The open period of the next (or current) opening: `reset_timeout`, doubled by each
    /// re-open from half-open, back to `reset_timeout` once the breaker closes.
    open_for: Duration,
    /// Set while a wish to open is refused by the ejection guard; cleared once the wish goes.
    pub(crate) refused_at: Option<Instant>,
}

impl Breaker {
    /// A closed breaker; `now` is the origin of its error-rate window.
    pub fn new(cfg: &CircuitBreaker, now: Instant) -> Breaker {
        Breaker::shared(Arc::new(cfg.clone()), now)
    }

    /// A closed breaker on a configuration shared with others (a service's).
    pub(crate) fn shared(cfg: Arc<CircuitBreaker>, now: Instant) -> Breaker {
        Breaker {
            inner: Inner::Closed,
            since: now,
            consecutive_failures: 0,
            window: Window::new(cfg.window, now),
            open_for: cfg.reset_timeout,
            refused_at: None,
            cfg,
        }
    }

    pub fn state(&self) -> State {
        match self.inner {
            Inner::Closed => State::Closed,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// When the current state was entered.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// How long the current (when open) or the next opening lasts.
    pub fn reset_timeout(&self) -> Duration {
        self.open_for
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Attempts and failures over `window` as of `at` (counted while closed only).
    pub fn window_totals(&self, at: Instant) -> Totals {
        self.window.totals(at)
    }

    /// Whether the ejection guard is holding this breaker closed against its wish to open.
    pub fn is_refused(&self) -> bool {
        self.refused_at.is_some()
    }

    /// When [`poll`](Breaker::poll) has a transition to make: the end of an open period.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.inner {
            Inner::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Moves an open breaker whose `reset_timeout` has passed to half-open.
    pub fn poll(&mut self, at: Instant) -> Option<Transition> {
        match self.inner {
            Inner::Open { until } if at >= until => Some(self.enter(
                Inner::HalfOpen {
                    admitted: 0,
                    successes: 0,
                },
                Reason::ResetTimeout,
                at,
            )),
            _ => None,
        }
    }

    /// Takes up the state an earlier agent's breaker left in the datapath (pinned maps adopted
    /// at start), read at `now`: `since` is when it entered that state, `open_for` its open
    /// period (the current one when open, the next one otherwise), kept within this
    /// configuration's `reset_timeout..=max_reset_timeout`. Open stays open for what is left
    /// of its period: one already over ends at the next [`poll`](Breaker::poll), which goes
    /// half-open as it would have. Half-open keeps the trials the datapath admitted
    /// (`half_open_max_flows` minus the quota left); its successes so far are not known, so
    /// they count from 0. Counters and the error-rate window start empty. No transition: the
    /// state is not new, only its keeper.
    pub fn resume(&mut self, resumed: Resumed, since: Instant, open_for: Duration, now: Instant) {
        let cfg = &self.cfg;
        let longest = cfg.max_reset_timeout.max(cfg.reset_timeout);
        self.open_for = open_for.clamp(cfg.reset_timeout, longest);
        self.inner = match resumed {
            Resumed::Closed => {
                self.open_for = cfg.reset_timeout;
                Inner::Closed
            }
            Resumed::Open { remaining_ns } => Inner::Open {
                until: now
                    .checked_add(Duration::from_nanos(remaining_ns))
                    .unwrap_or(now),
            },
            Resumed::HalfOpen { quota } => Inner::HalfOpen {
                admitted: cfg.half_open_max_flows.saturating_sub(quota),
                successes: 0,
            },
        };
        self.since = since;
        self.refused_at = None;
    }

    /// Counts an outcome and opens the breaker when it should, with no ejection limit (a
    /// service's breakers go through an [`EjectionGuard`](super::EjectionGuard) instead).
    ///
    /// While open, outcomes are ignored: only time (through `poll`) leads to half-open,
    /// so call `poll` first when `at` may be past [`next_deadline`](Breaker::next_deadline).
    pub fn record(&mut self, at: Instant, outcome: Outcome) -> Option<Transition> {
        match self.observe(at, outcome) {
            Observed::Nothing => None,
            Observed::Changed(t) => Some(t),
            Observed::WantsOpen(reason) => Some(self.open(at, reason)),
        }
    }

    /// The new flows the datapath may admit now (see [`Admission::quota`]).
    pub fn admission(&self) -> Admission {
        match self.inner {
            Inner::Closed => Admission::All,
            Inner::Open { .. } => Admission::None,
            Inner::HalfOpen { admitted, .. } => {
                Admission::Trial(self.cfg.half_open_max_flows.saturating_sub(admitted))
            }
        }
    }

    /// Takes one new flow from the admission quota; `false` when it must be refused. The
    /// datapath enforces its own copy of the quota; this one serves callers in userspace.
    pub fn try_admit(&mut self) -> bool {
        match &mut self.inner {
            Inner::Closed => true,
            Inner::Open { .. } => false,
            Inner::HalfOpen { admitted, .. } => {
                if *admitted < self.cfg.half_open_max_flows {
                    *admitted += 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Counts an outcome; leaves opening from closed to the caller.
    pub(crate) fn observe(&mut self, at: Instant, outcome: Outcome) -> Observed {
        match (self.inner, outcome) {
            (Inner::Closed, _) => {
                let failed = outcome == Outcome::Failure;
                self.window.add(at, 1, u64::from(failed));
                self.consecutive_failures = if failed {
                    self.consecutive_failures.saturating_add(1)
                } else {
                    0
                };
                match self.trip_reason(at) {
                    Some(reason) => Observed::WantsOpen(reason),
                    None => {
                        self.refused_at = None;
                        Observed::Nothing
                    }
                }
            }
            (Inner::Open { .. }, _) => Observed::Nothing,
            (Inner::HalfOpen { .. }, Outcome::Failure) => {
                // Each consecutive re-open waits twice as long before the next trial.
                self.open_for = self
                    .open_for
                    .saturating_mul(2)
                    .min(self.cfg.max_reset_timeout);
                Observed::Changed(self.enter_open(at, Reason::TrialFailed))
            }
            (
                Inner::HalfOpen {
                    admitted,
                    successes,
                },
                Outcome::Success,
            ) => {
                let successes = successes.saturating_add(1);
                if successes >= self.cfg.success_threshold {
                    self.open_for = self.cfg.reset_timeout;
                    self.consecutive_failures = 0;
                    // Failures from before the opening must not trip the fresh closed state.
                    self.window.clear();
                    Observed::Changed(self.enter(Inner::Closed, Reason::TrialsSucceeded, at))
                } else {
                    self.inner = Inner::HalfOpen {
                        admitted,
                        successes,
                    };
                    Observed::Nothing
                }
            }
        }
    }

    /// Why a closed breaker should open as of `at`, if it should.
    pub(crate) fn trip_reason(&self, at: Instant) -> Option<Reason> {
        if self.inner != Inner::Closed {
            return None;
        }
        if self.consecutive_failures >= self.cfg.failure_threshold {
            return Some(Reason::ConsecutiveFailures);
        }
        let rate = self.cfg.error_rate;
        if rate.is_zero() {
            return None;
        }
        let t = self.window.totals(at);
        // failures / attempts > rate, in integers: exact at every percentage.
        let exceeded = u128::from(t.failures) * 1_000_000
            > u128::from(t.attempts) * u128::from(rate.millionths());
        (t.attempts >= u64::from(self.cfg.min_requests) && exceeded).then_some(Reason::ErrorRate)
    }

    /// Opens a closed breaker (the first opening of a streak: the base `reset_timeout`).
    pub(crate) fn open(&mut self, at: Instant, reason: Reason) -> Transition {
        self.enter_open(at, reason)
    }

    fn enter_open(&mut self, at: Instant, reason: Reason) -> Transition {
        let until = at.checked_add(self.open_for).unwrap_or(at);
        self.refused_at = None;
        self.enter(Inner::Open { until }, reason, at)
    }

    fn enter(&mut self, inner: Inner, reason: Reason, at: Instant) -> Transition {
        let from = self.state();
        self.inner = inner;
        self.since = at;
        Transition {
            from,
            to: self.state(),
            reason,
            at,
        }
    }
}
