//! The panic threshold: never open more than `max_ejection_percent` of a service's backends.
//!
//! When most backends of a service fail at once, the cause is usually shared (a bad deploy,
//! an overloaded database), and ejecting them all would turn a partial outage into a total
//! one. So the guard owns the breakers of one service and grants openings against a quota;
//! a breaker refused stays closed (its backend fails open) and is granted in the order of
//! refusal once another breaker closes, if it still wants to open then.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use agent_common::breaker::Resumed;
use thiserror::Error;

use super::machine::{Breaker, Observed};
use super::state::{Outcome, Reason, State, Transition};
use crate::config::{CircuitBreaker, Percent};

/// A transition of one backend's breaker, by its index in the service's `backends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub backend: usize,
    pub transition: Transition,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BreakerError {
    #[error("backend index {backend} is out of range: the service has {backends} backends")]
    UnknownBackend { backend: usize, backends: usize },
}

/// The breakers of one service's backends, and the quota of how many may be open at once.
#[derive(Debug, Clone)]
pub struct EjectionGuard {
    breakers: Vec<Breaker>,
    max_open: usize,
    /// Kept up to date at every transition, so that a probe's outcome (every backend, every
    /// second) costs O(1) and not a walk over the service's breakers.
    open: usize,
    /// The end of each open period, soonest first: `(until, backend)`. A breaker leaves
    /// `open` only through [`poll`](EjectionGuard::poll), which pops its entry.
    deadlines: BinaryHeap<Reverse<(Instant, usize)>>,
}

/// How many of `backends` may be open at once: `max_ejection_percent` of them rounded down,
/// but at least one (POLICY.md: "one may always open").
pub fn max_ejections(max_ejection_percent: Percent, backends: usize) -> usize {
    let share = usize::try_from(max_ejection_percent.of(backends as u64)).unwrap_or(usize::MAX);
    share.max(1).min(backends)
}

impl EjectionGuard {
    /// Closed breakers for `backends` backends, all configured by `cfg`.
    pub fn new(cfg: &CircuitBreaker, backends: usize, now: Instant) -> EjectionGuard {
        let shared = std::sync::Arc::new(cfg.clone());
        EjectionGuard {
            breakers: (0..backends)
                .map(|_| Breaker::shared(shared.clone(), now))
                .collect(),
            max_open: max_ejections(cfg.max_ejection_percent, backends),
            open: 0,
            deadlines: BinaryHeap::new(),
        }
    }

    pub fn breakers(&self) -> &[Breaker] {
        &self.breakers
    }

    pub fn breaker(&self, backend: usize) -> Option<&Breaker> {
        self.breakers.get(backend)
    }

    /// How many breakers may be open (or half-open) at once.
    pub fn max_open(&self) -> usize {
        self.max_open
    }

    /// Breakers open or half-open: both keep their backend out of normal rotation.
    pub fn open_count(&self) -> usize {
        self.open
    }

    /// The earliest time [`poll`](EjectionGuard::poll) has a transition to make.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((until, _))| *until)
    }

    /// Moves every breaker whose open period has passed to half-open.
    pub fn poll(&mut self, at: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(&Reverse((until, backend))) = self.deadlines.peek() {
            if until > at {
                break;
            }
            self.deadlines.pop();
            if let Some(transition) = self.breakers[backend].poll(at) {
                events.push(Event {
                    backend,
                    transition,
                });
            }
        }
        events
    }

    /// Takes up one backend's breaker state from the datapath (see [`Breaker::resume`]). An
    /// open or half-open breaker counts against `max_ejection_percent` as it did before,
    /// even if this configuration allows fewer: the guard refuses further openings until
    /// enough have closed. Call [`poll`](EjectionGuard::poll) after: an open period that
    /// ended meanwhile goes half-open there.
    pub fn resume(
        &mut self,
        backend: usize,
        resumed: Resumed,
        since: Instant,
        open_for: Duration,
        now: Instant,
    ) -> Result<(), BreakerError> {
        let backends = self.breakers.len();
        let b = self
            .breakers
            .get_mut(backend)
            .ok_or(BreakerError::UnknownBackend { backend, backends })?;
        let was_closed = b.state() == State::Closed;
        b.resume(resumed, since, open_for, now);
        match (was_closed, b.state() == State::Closed) {
            (true, false) => self.open += 1,
            (false, true) => self.open -= 1,
            _ => {}
        }
        if let Some(until) = b.next_deadline() {
            self.deadlines.push(Reverse((until, backend)));
        }
        Ok(())
    }

    /// Keeps the open count and the deadlines in step with a transition.
    fn note(&mut self, backend: usize, t: &Transition) {
        match (t.from == State::Closed, t.to == State::Closed) {
            (true, false) => self.open += 1,
            (false, true) => self.open -= 1,
            _ => {}
        }
        if let Some(until) = self.breakers[backend].next_deadline()
            && t.to == State::Open
        {
            self.deadlines.push(Reverse((until, backend)));
        }
    }

    /// Counts an outcome for one backend. Timers due by `at` fire first, so an outcome right
    /// after the end of an open period counts as a half-open trial.
    pub fn record(
        &mut self,
        backend: usize,
        at: Instant,
        outcome: Outcome,
    ) -> Result<Vec<Event>, BreakerError> {
        let backends = self.breakers.len();
        if backend >= backends {
            return Err(BreakerError::UnknownBackend { backend, backends });
        }
        let mut events = self.poll(at);
        match self.breakers[backend].observe(at, outcome) {
            Observed::Nothing => {}
            Observed::Changed(transition) => {
                events.push(Event {
                    backend,
                    transition,
                });
                self.note(backend, &transition);
                if transition.to == State::Closed {
                    self.grant_refused(at, &mut events);
                }
            }
            Observed::WantsOpen(reason) => {
                if self.open_count() < self.max_open {
                    let transition = self.breakers[backend].open(at, reason);
                    events.push(Event {
                        backend,
                        transition,
                    });
                    self.note(backend, &transition);
                } else if self.breakers[backend].refused_at.is_none() {
                    // Reported once per refusal, not per failure: a dead backend held closed
                    // would otherwise flood the log at its probe rate.
                    self.breakers[backend].refused_at = Some(at);
                    events.push(Event {
                        backend,
                        transition: Transition {
                            from: State::Closed,
                            to: State::Closed,
                            reason: Reason::PanicThreshold,
                            at,
                        },
                    });
                }
            }
        }
        Ok(events)
    }

    /// Takes one new flow from a backend's admission quota (see [`Breaker::try_admit`]).
    pub fn try_admit(&mut self, backend: usize) -> Result<bool, BreakerError> {
        let backends = self.breakers.len();
        self.breakers
            .get_mut(backend)
            .map(Breaker::try_admit)
            .ok_or(BreakerError::UnknownBackend { backend, backends })
    }

    /// After a closing: opens refused breakers that still want to, oldest refusal first,
    /// while the quota allows; forgets refusals whose wish has gone.
    fn grant_refused(&mut self, at: Instant, events: &mut Vec<Event>) {
        let mut waiting: Vec<(Instant, usize)> = self
            .breakers
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.refused_at.map(|t| (t, i)))
            .collect();
        waiting.sort();
        for (_, backend) in waiting {
            let b = &mut self.breakers[backend];
            match b.trip_reason(at) {
                None => b.refused_at = None,
                Some(reason) => {
                    if self.open_count() >= self.max_open {
                        break;
                    }
                    let transition = self.breakers[backend].open(at, reason);
                    events.push(Event {
                        backend,
                        transition,
                    });
                    // The quota check above reads the count.
                    self.note(backend, &transition);
                }
            }
        }
    }
}
