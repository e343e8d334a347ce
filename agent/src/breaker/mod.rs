//! Circuit breakers, one per backend (POLICY.md `circuit_breaker`).
//!
//! ```text
//!            failure_threshold consecutive failures,
//!            or error_rate over window (>= min_requests)
//!   closed ------------------------------------------------> open
//!     ^                                                   |    ^
//!     | success_threshold successes     reset_timeout     |    | any failure
//!     |                                 (x2 per re-open,  v    | (reset_timeout doubles)
//!     +-------------------------------- up to max) --- half_open
//! ```
//!
//! Pure and deterministic: time is passed in, every change comes back as a [`Transition`] for
//! the caller to log, count and write to the BPF map ([`State::code`], [`Admission::quota`]).
//! A service's breakers live in an [`EjectionGuard`], which enforces `max_ejection_percent`.

mod guard;
mod machine;
mod state;
mod window;

#[cfg(test)]
mod tests;

pub use guard::{BreakerError, EjectionGuard, Event, max_ejections};
pub use machine::Breaker;
pub use state::{
    Admission, Outcome, Reason, STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, State, Transition,
};
pub use window::{BUCKETS, Totals};
