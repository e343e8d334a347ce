//! Waiting on a condition with a deadline: tests never sleep to hope.

use std::time::{Duration, Instant};

use crate::timing::Scaled;

/// Takes a `sample` every `every` until `done` holds on one; returns the time from `since` to
/// that sample, and the sample. Once `limit` (scaled: [`Scaled::get`]) has passed since
/// `since` with no such sample, `Err` with the last one, so the caller's message can say what
/// was seen instead. `every` is a sampling period, not a bound, and is not scaled.
pub fn poll<S>(
    since: Instant,
    limit: Scaled,
    every: Duration,
    mut sample: impl FnMut() -> S,
    mut done: impl FnMut(&S) -> bool,
) -> Result<(Duration, S), S> {
    let limit = limit.get();
    loop {
        let s = sample();
        let took = since.elapsed();
        if done(&s) {
            return Ok((took, s));
        }
        if took >= limit {
            return Err(s);
        }
        std::thread::sleep(every);
    }
}

/// Checks `cond` every `every` until it holds; returns how long that took. Panics with `what`
/// once `limit` (scaled) has passed.
#[track_caller]
pub fn wait_until(
    what: &str,
    limit: Scaled,
    every: Duration,
    cond: impl FnMut() -> bool,
) -> Duration {
    match poll(Instant::now(), limit, every, cond, |held| *held) {
        Ok((took, _)) => took,
        Err(_) => panic!("{what}: not within {limit}"),
    }
}
