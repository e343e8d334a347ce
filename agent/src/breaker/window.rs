//! Attempts and failures over a sliding window, in constant memory.
//!
//! A breaker may see thousands of passive observations a second; keeping each one to expire
//! it exactly would make memory follow traffic. The window is cut into [`BUCKETS`] buckets
//! instead (as Hystrix and resilience4j do): an observation falls into the bucket of its time,
//! and the totals cover the current bucket and the `BUCKETS - 1` before it. So an observation
//! counts for between `window - window/BUCKETS` and `window` after it was made.

use std::time::{Duration, Instant};

/// Buckets per window: a tenth of the window is the expiry granularity.
pub const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which slice of time (since `origin`, in widths) the counts belong to.
    index: u64,
    attempts: u64,
    failures: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Window {
    origin: Instant,
    width_ns: u64,
    buckets: [Bucket; BUCKETS],
}

/// Totals over the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub attempts: u64,
    pub failures: u64,
}

impl Window {
    pub(crate) fn new(window: Duration, origin: Instant) -> Window {
        let width = window.as_nanos() / BUCKETS as u128;
        Window {
            origin,
            // A window under BUCKETS ns still needs a width of at least 1 ns.
            width_ns: u64::try_from(width).unwrap_or(u64::MAX).max(1),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn index(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / u128::from(self.width_ns)).unwrap_or(u64::MAX)
    }

    pub(crate) fn add(&mut self, at: Instant, attempts: u64, failures: u64) {
        let index = self.index(at);
        let bucket = &mut self.buckets[(index % BUCKETS as u64) as usize];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        bucket.attempts = bucket.attempts.saturating_add(attempts);
        bucket.failures = bucket.failures.saturating_add(failures);
    }

    pub(crate) fn totals(&self, at: Instant) -> Totals {
        let now = self.index(at);
        let oldest = now.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| (oldest..=now).contains(&b.index))
            .fold(Totals::default(), |t, b| Totals {
                attempts: t.attempts.saturating_add(b.attempts),
                failures: t.failures.saturating_add(b.failures),
            })
    }

    pub(crate) fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn counts_within_the_window_and_expires_by_bucket() {
        let t0 = Instant::now();
        let mut w = Window::new(ms(1000), t0);
        w.add(t0, 1, 1);
        w.add(t0 + ms(150), 2, 0);
        assert_eq!(
            w.totals(t0 + ms(150)),
            Totals {
                attempts: 3,
                failures: 1
            }
        );
        // Bucket 0 (0..100ms) counts through bucket 9 (900..1000ms), gone in bucket 10.
        assert_eq!(w.totals(t0 + ms(999)).attempts, 3);
        assert_eq!(
            w.totals(t0 + ms(1000)),
            Totals {
                attempts: 2,
                failures: 0
            }
        );
        assert_eq!(w.totals(t0 + ms(1100)).attempts, 0);
    }

    #[test]
    fn a_reused_slot_forgets_its_old_counts() {
        let t0 = Instant::now();
        let mut w = Window::new(ms(1000), t0);
        w.add(t0, 5, 5);
        // Same slot (index 10 % 10 == 0), a later lap.
        w.add(t0 + ms(1000), 1, 0);
        assert_eq!(
            w.totals(t0 + ms(1000)),
            Totals {
                attempts: 1,
                failures: 0
            }
        );
    }

    #[test]
    fn time_before_the_origin_counts_as_the_origin_and_tiny_windows_work() {
        let t0 = Instant::now() + ms(10);
        let mut w = Window::new(Duration::from_nanos(3), t0);
        w.add(t0 - ms(5), 1, 1);
        assert_eq!(w.totals(t0).failures, 1);
        w.clear();
        assert_eq!(w.totals(t0), Totals::default());
    }
}
