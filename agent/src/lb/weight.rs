//! Effective weights: what a backend's configured weight is worth right now, given its health,
//! its breaker, the service's panic threshold and its slow-start ramp.

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

/// At most this many rebuilds per ramp: a backend's ramp rises in steps of at least
/// `slow_start / MAX_STEPS`.
pub const MAX_STEPS: u32 = 10;
/// Nor more often than this, per service.
pub const MIN_STEP: Duration = Duration::from_secs(1);

/// The weight a backend gets in the tables now (0 to `configured`).
///
/// - `configured` 0 drains: 0, whatever else holds.
/// - An unhealthy backend, or one whose breaker is open, gets 0, unless `fail_open`: the
///   service is past its panic threshold (`max_ejection_percent`), and then health and breaker
///   are ignored and every backend keeps its weight, as in Envoy's panic routing.
/// - A backend that recovered at `recovered_at` ramps linearly from its recovery to
///   `configured` at `recovered_at + slow_start`: `configured x elapsed / slow_start`, rounded
///   down but never below 1, because 0 would mean drain and a recovered backend must get some
///   flows to ramp up on. `slow_start` zero, or no recovery, means the full weight at once.
///   `now` before `recovered_at` counts as the start of the ramp.
///
/// When every backend of a service comes out 0, its tables are empty ([`super::NO_BACKEND`]).
pub fn effective(
    configured: u32,
    healthy: bool,
    breaker_open: bool,
    fail_open: bool,
    recovered_at: Option<Instant>,
    slow_start: Duration,
    now: Instant,
) -> u32 {
    if configured == 0 || (!fail_open && (!healthy || breaker_open)) {
        return 0;
    }
    let Some(recovered_at) = recovered_at else {
        return configured;
    };
    let elapsed = now.saturating_duration_since(recovered_at);
    if elapsed >= slow_start {
        return configured;
    }
    let ramped = u128::from(configured) * elapsed.as_nanos() / slow_start.as_nanos();
    u32::try_from(ramped).expect("< configured").max(1)
}

/// When each backend of a service recovered, while its slow-start ramp lasts, and when the
/// tables should next be rebuilt to follow the ramps.
///
/// The agent reports transitions ([`SlowStart::recovered`] when a backend becomes available
/// again: healthy with its breaker closed; [`SlowStart::lost`] when it stops being), passes
/// [`SlowStart::recovered_at`] to [`effective`], and rebuilds at
/// [`SlowStart::next_rebuild`]: at most [`MAX_STEPS`] steps per ramp and never sooner than
/// [`MIN_STEP`] after the last rebuild, so a ramp costs a bounded number of table swaps.
/// Keys are whatever names a backend across reloads (its address).
#[derive(Debug, Clone)]
pub struct SlowStart<K> {
    window: Duration,
    ramps: HashMap<K, Instant>,
}

impl<K: Eq + Hash> SlowStart<K> {
    /// A tracker for a service's `load_balancing.slow_start`.
    pub fn new(window: Duration) -> SlowStart<K> {
        SlowStart {
            window,
            ramps: HashMap::new(),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// A new window (policy reload). Ramps under way keep their start and follow the new
    /// window; a zero window ends them all.
    pub fn set_window(&mut self, window: Duration) {
        self.window = window;
        if window.is_zero() {
            self.ramps.clear();
        }
    }

    /// `backend` became available at `now`: its ramp starts (again). Nothing with a zero
    /// window.
    pub fn recovered(&mut self, backend: K, now: Instant) {
        if !self.window.is_zero() {
            self.ramps.insert(backend, now);
        }
    }

    /// `backend` is no longer available (or no longer configured): no ramp; the next
    /// recovery starts a new one.
    pub fn lost(&mut self, backend: &K) {
        self.ramps.remove(backend);
    }

    /// The start of `backend`'s ramp, for [`effective`]; `None` when it is not ramping.
    pub fn recovered_at(&self, backend: &K) -> Option<Instant> {
        self.ramps.get(backend).copied()
    }

    /// Backends still ramping (some may be finished since: see [`SlowStart::expire`]).
    pub fn ramping(&self) -> usize {
        self.ramps.len()
    }

    /// Forgets ramps finished at `now`: those backends are at full weight.
    pub fn expire(&mut self, now: Instant) {
        let window = self.window;
        self.ramps
            .retain(|_, start| now.saturating_duration_since(*start) < window);
    }

    /// The length of one ramp step: `window / MAX_STEPS`, at least [`MIN_STEP`], at most the
    /// window.
    pub fn step(&self) -> Duration {
        (self.window / MAX_STEPS).max(MIN_STEP).min(self.window)
    }

    /// When the tables should next be rebuilt, given the last rebuild at `last_build`: the
    /// first moment after it that some ramp moves (its start, if it recovered since; its next
    /// step boundary `start + k x step`; its end, at full weight), but not before
    /// `last_build + MIN_STEP`. `None` when nothing ramps past `last_build`.
    pub fn next_rebuild(&self, last_build: Instant) -> Option<Instant> {
        let step = self.step();
        self.ramps
            .values()
            .filter_map(|&start| {
                let end = start + self.window;
                if end <= last_build {
                    return None; // The last build already had its full weight.
                }
                if start > last_build {
                    return Some(start);
                }
                let steps = last_build.duration_since(start).as_nanos() / step.as_nanos();
                let next = u32::try_from(steps + 1)
                    .ok()
                    .and_then(|n| step.checked_mul(n))
                    .and_then(|d| start.checked_add(d))
                    .unwrap_or(end);
                Some(next.min(end))
            })
            .min()
            .map(|due| due.max(last_build + MIN_STEP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(10);

    fn ramp(configured: u32, start: Instant, at: Duration) -> u32 {
        effective(configured, true, false, false, Some(start), S, start + at)
    }

    #[test]
    fn ramp_is_linear() {
        let t0 = Instant::now();
        for tenth in 1..10 {
            let w = ramp(1000, t0, S * tenth / 10);
            assert_eq!(w, 100 * tenth, "at {tenth}/10 of slow_start");
        }
        assert_eq!(ramp(1000, t0, Duration::from_millis(2500)), 250);
        assert_eq!(ramp(7, t0, S / 2), 3, "rounded down");
    }

    #[test]
    fn ramp_clamps() {
        let t0 = Instant::now() + Duration::from_secs(100);
        assert_eq!(
            ramp(1000, t0, Duration::ZERO),
            1,
            "at recovery: 1, not 0 (drain)"
        );
        assert_eq!(ramp(1, t0, S / 2), 1, "never below 1");
        assert_eq!(ramp(1000, t0, S), 1000, "full at the end");
        assert_eq!(ramp(1000, t0, S * 5), 1000, "and after");
        let before = effective(1000, true, false, false, Some(t0), S, t0 - S);
        assert_eq!(before, 1, "now before recovery: the start of the ramp");
        assert_eq!(ramp(u32::MAX, t0, S / 2), u32::MAX / 2, "no overflow");
    }

    #[test]
    fn zero_slow_start_is_immediate() {
        let t0 = Instant::now();
        let w = effective(300, true, false, false, Some(t0), Duration::ZERO, t0);
        assert_eq!(w, 300);
        assert_eq!(
            effective(300, true, false, false, None, S, t0),
            300,
            "not recovering"
        );
    }

    #[test]
    fn health_breaker_and_panic() {
        let t0 = Instant::now();
        let eff = |healthy, open, fail_open| effective(500, healthy, open, fail_open, None, S, t0);
        assert_eq!(eff(true, false, false), 500);
        assert_eq!(eff(false, false, false), 0, "unhealthy");
        assert_eq!(eff(true, true, false), 0, "breaker open");
        assert_eq!(eff(false, true, false), 0);
        assert_eq!(eff(false, false, true), 500, "fail open: health ignored");
        assert_eq!(eff(true, true, true), 500, "fail open: breaker ignored");
        for (h, o, f) in [(true, false, false), (false, true, true)] {
            assert_eq!(
                effective(0, h, o, f, None, S, t0),
                0,
                "weight 0 drains, always"
            );
        }
        let ramping = effective(500, false, false, true, Some(t0), S, t0 + S / 5);
        assert_eq!(ramping, 100, "fail open keeps a ramp");
    }

    #[test]
    fn tracker_follows_recoveries() {
        let t0 = Instant::now();
        let mut s = SlowStart::new(S);
        s.recovered("a", t0);
        assert_eq!(s.recovered_at(&"a"), Some(t0));
        assert_eq!(s.recovered_at(&"b"), None);
        s.recovered("a", t0 + S / 2);
        assert_eq!(
            s.recovered_at(&"a"),
            Some(t0 + S / 2),
            "a second recovery restarts it"
        );
        s.lost(&"a");
        assert_eq!(s.recovered_at(&"a"), None);
        s.recovered("b", t0);
        s.expire(t0 + S - Duration::from_nanos(1));
        assert_eq!(s.ramping(), 1, "not finished yet");
        s.expire(t0 + S);
        assert_eq!(s.ramping(), 0, "finished at the end of the window");

        let mut none = SlowStart::new(Duration::ZERO);
        none.recovered("a", t0);
        assert_eq!(none.recovered_at(&"a"), None, "slow_start 0: no ramp");
        assert_eq!(none.next_rebuild(t0), None);
        s.recovered("c", t0);
        s.set_window(Duration::ZERO);
        assert_eq!(s.ramping(), 0, "a zero window ends every ramp");
    }

    #[test]
    fn steps_are_bounded() {
        let s = SlowStart::<u8>::new(Duration::from_secs(60));
        assert_eq!(s.step(), Duration::from_secs(6), "60s / 10 steps");
        let s = SlowStart::<u8>::new(Duration::from_secs(5));
        assert_eq!(s.step(), MIN_STEP, "5s / 10 is under a second");
        let s = SlowStart::<u8>::new(Duration::from_millis(300));
        assert_eq!(
            s.step(),
            Duration::from_millis(300),
            "never longer than the window"
        );
    }

    #[test]
    fn rebuilds_follow_the_steps_to_the_end() {
        let t0 = Instant::now();
        let mut s = SlowStart::new(S);
        assert_eq!(s.next_rebuild(t0), None, "nothing ramps");
        s.recovered(1, t0);
        // The agent rebuilds when told to: 10 steps of 1s, the last one at full weight.
        let mut last = t0;
        let mut builds = vec![];
        while let Some(at) = s.next_rebuild(last) {
            builds.push(effective(
                100,
                true,
                false,
                false,
                s.recovered_at(&1),
                S,
                at,
            ));
            last = at;
            s.expire(at);
            assert!(builds.len() <= 10, "more than 10 rebuilds: {builds:?}");
        }
        assert_eq!(builds, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
    }

    #[test]
    fn rebuilds_are_rate_limited_across_backends() {
        let t0 = Instant::now();
        let mut s = SlowStart::new(S);
        // Ten backends recovering 100ms apart: their steps interleave, rebuilds stay >= 1s apart.
        for i in 0..10u32 {
            s.recovered(i, t0 + Duration::from_millis(100) * i);
        }
        let mut last = t0 + Duration::from_millis(900);
        let mut count = 0;
        while let Some(at) = s.next_rebuild(last) {
            assert!(
                at - last >= MIN_STEP,
                "rebuild {:?} after the last",
                at - last
            );
            last = at;
            s.expire(at);
            count += 1;
        }
        assert!(count <= 11, "{count} rebuilds for ramps spanning 10.9s");
        assert_eq!(s.ramping(), 0);
        assert!(
            last >= t0 + Duration::from_millis(900) + S,
            "the last rebuild at full weight"
        );
    }
}
