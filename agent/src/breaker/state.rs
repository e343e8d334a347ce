//! What a breaker is in, and the events its changes are reported as.

use std::fmt;
use std::time::Instant;

use agent_common::breaker::Resumed;

/// The state of one backend's breaker.
///
/// The datapath cannot read a Rust enum: it gets [`State::code`], a `u32` that stays stable
/// across agent versions because pinned maps outlive the agent that wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Traffic flows; failures are counted.
    Closed,
    /// New flows are rejected or dropped (`on_open`) until `reset_timeout` passes.
    Open,
    /// A few trial flows (`half_open_max_flows`) decide between closing and re-opening.
    HalfOpen,
}

/// Map code of [`State::Closed`].
pub const STATE_CLOSED: u32 = 0;
/// Map code of [`State::Open`].
pub const STATE_OPEN: u32 = 1;
/// Map code of [`State::HalfOpen`].
pub const STATE_HALF_OPEN: u32 = 2;

impl State {
    /// The code written to the BPF map (closed=0, open=1, half_open=2).
    pub const fn code(self) -> u32 {
        match self {
            State::Closed => STATE_CLOSED,
            State::Open => STATE_OPEN,
            State::HalfOpen => STATE_HALF_OPEN,
        }
    }

    /// The state of a map code; `None` for a code no version of the agent writes.
    pub const fn from_code(code: u32) -> Option<State> {
        match code {
            STATE_CLOSED => Some(State::Closed),
            STATE_OPEN => Some(State::Open),
            STATE_HALF_OPEN => Some(State::HalfOpen),
            _ => None,
        }
    }

    /// The state a breaker taken up from the datapath ([`Breaker::resume`]) is in once its
    /// due timers fire: an open period already over is half-open; a code no agent writes
    /// is closed (the datapath passes it).
    ///
    /// [`Breaker::resume`]: super::Breaker::resume
    pub const fn resumed(r: Option<Resumed>) -> State {
        match r {
            None | Some(Resumed::Closed) => State::Closed,
            Some(Resumed::Open { remaining_ns: 0 }) | Some(Resumed::HalfOpen { .. }) => {
                State::HalfOpen
            }
            Some(Resumed::Open { .. }) => State::Open,
        }
    }

    /// The name used in logs, metrics labels and `agent status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a breaker changed state (or, for [`Reason::PanicThreshold`], why it did not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// `failure_threshold` consecutive failures while closed.
    ConsecutiveFailures,
    /// The failure share over `window` exceeded `error_rate` with at least `min_requests`.
    ErrorRate,
    /// `reset_timeout` (as doubled by re-opens) passed while open.
    ResetTimeout,
    /// `success_threshold` successes while half-open.
    TrialsSucceeded,
    /// A failure while half-open.
    TrialFailed,
    /// The breaker wanted to open but `max_ejection_percent` of its service's backends were
    /// already open: it stays closed (the backend fails open). `from == to == Closed`.
    PanicThreshold,
}

impl Reason {
    /// The name used in logs and as a metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::ConsecutiveFailures => "consecutive_failures",
            Reason::ErrorRate => "error_rate",
            Reason::ResetTimeout => "reset_timeout",
            Reason::TrialsSucceeded => "trials_succeeded",
            Reason::TrialFailed => "trial_failed",
            Reason::PanicThreshold => "panic_threshold",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change of state, returned to the caller to log, count and write to the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: Reason,
    /// The time passed in by the call that made the change.
    pub at: Instant,
}

/// What one attempt toward a backend came to: a probe, a trial flow, or a passive
/// observation of the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Failure,
}

/// How many new flows the datapath may admit toward a backend, as it will be written to the
/// map next to the state code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: every new flow.
    All,
    /// Half-open: at most this many more trial flows (the datapath counts them atomically).
    Trial(u32),
    /// Open: none.
    None,
}

impl Admission {
    /// The quota as a map value: `u32::MAX` for all, 0 for none.
    pub const fn quota(self) -> u32 {
        match self {
            Admission::All => u32::MAX,
            Admission::Trial(n) => n,
            Admission::None => 0,
        }
    }
}
