//! A budget of log lines per period, and a summary of what it held back.
//!
//! When thousands of backends change state together (a rack gone, breakers cycling
//! open -> half_open -> open), one INFO line each would flood the log at thousands of lines a
//! second. The supervisor asks [`LogLimiter::admit`] before each such line: the first
//! `per_period` of a period are logged, the rest only counted by kind, and once the period
//! is over [`LogLimiter::roll`] hands back one [`Summary`] line for them. The metrics count
//! every transition either way. Pure: time is passed in.

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, Instant},
};

/// Lines admitted per period, and the period.
#[derive(Debug)]
pub struct LogLimiter<K> {
    per_period: u32,
    period: Duration,
    /// Start of the current period; `None` before the first line.
    began: Option<Instant>,
    logged: u32,
    held: BTreeMap<K, u64>,
}

impl<K: Ord + Copy> LogLimiter<K> {
    pub fn new(per_period: u32, period: Duration) -> LogLimiter<K> {
        LogLimiter {
            per_period,
            period,
            began: None,
            logged: 0,
            held: BTreeMap::new(),
        }
    }

    /// Whether the line of kind `kind` at `now` may be logged; if not, it is counted for the
    /// summary. Call [`roll`](LogLimiter::roll) first, so an ended period is summarized
    /// before a new one begins.
    pub fn admit(&mut self, now: Instant, kind: K) -> bool {
        let began = *self.began.get_or_insert(now);
        if now.saturating_duration_since(began) >= self.period {
            // A period over with nothing held back: a new one starts here.
            self.began = Some(now);
            self.logged = 0;
        }
        if self.logged < self.per_period {
            self.logged += 1;
            true
        } else {
            *self.held.entry(kind).or_default() += 1;
            false
        }
    }

    /// When the current period ends, if it has lines held back: the time to call
    /// [`roll`](LogLimiter::roll).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.held.is_empty() {
            return None;
        }
        self.began.map(|b| b + self.period)
    }

    /// Once the period is over: the summary of the lines it held back (if any), and a new
    /// period begins.
    pub fn roll(&mut self, now: Instant) -> Option<Summary<K>> {
        let began = self.began?;
        if now.saturating_duration_since(began) < self.period {
            return None;
        }
        self.began = Some(now);
        self.logged = 0;
        if self.held.is_empty() {
            return None;
        }
        Some(Summary {
            period: self.period,
            held: std::mem::take(&mut self.held).into_iter().collect(),
        })
    }
}

/// The lines one period held back, by kind (in the kinds' order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary<K> {
    pub period: Duration,
    pub held: Vec<(K, u64)>,
}

impl<K> Summary<K> {
    pub fn total(&self) -> u64 {
        self.held.iter().map(|(_, n)| n).sum()
    }
}

impl<K: fmt::Display> Summary<K> {
    /// `"1,998 more {what} in the last 1s: 999 open->half_open, 999 half_open->open"`.
    pub fn line(&self, what: &str) -> String {
        let mut s = format!(
            "{} more {what} in the last {:?}:",
            Thousands(self.total()),
            self.period
        );
        for (i, (kind, n)) in self.held.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            s.push_str(&format!("{sep}{} {kind}", Thousands(*n)));
        }
        s
    }
}

/// A count with thousands separators: `1,998`.
struct Thousands(u64);

impl fmt::Display for Thousands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.0.to_string();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                f.write_str(",")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_budget_then_one_summary_per_period() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(2, ms(1000));
        assert_eq!(l.next_deadline(), None);
        let admitted: Vec<bool> = ["a", "b", "a", "b", "a"]
            .iter()
            .enumerate()
            .map(|(i, k)| l.admit(t0 + ms(i as u64), *k))
            .collect();
        assert_eq!(admitted, [true, true, false, false, false]);
        assert_eq!(l.next_deadline(), Some(t0 + ms(1000)));
        assert_eq!(l.roll(t0 + ms(999)), None, "the period is not over");
        let s = l.roll(t0 + ms(1000)).expect("a summary");
        assert_eq!(s.held, [("a", 2), ("b", 1)]);
        assert_eq!(
            s.line("breaker transitions"),
            "3 more breaker transitions in the last 1s: 2 a, 1 b"
        );
        // A new period with a fresh budget, nothing held.
        assert_eq!(l.next_deadline(), None);
        assert!(l.admit(t0 + ms(1001), "a"));
        assert!(l.admit(t0 + ms(1002), "a"));
        assert!(!l.admit(t0 + ms(1003), "a"));
        assert_eq!(l.roll(t0 + ms(2000)).map(|s| s.total()), Some(1));
    }

    #[test]
    fn a_quiet_period_resets_the_budget_without_a_summary() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(1, ms(1000));
        assert!(l.admit(t0, 'x'));
        assert_eq!(l.next_deadline(), None, "nothing held back");
        assert!(l.admit(t0 + ms(5000), 'x'), "a later period has its budget");
        assert!(!l.admit(t0 + ms(5001), 'x'));
        assert_eq!(l.roll(t0 + ms(5999)), None);
        assert_eq!(l.roll(t0 + ms(6000)).map(|s| s.held), Some(vec![('x', 1)]));
        assert_eq!(l.roll(t0 + ms(9000)), None, "nothing held since");
    }

    #[test]
    fn counts_have_thousands_separators() {
        let got: Vec<String> = [0, 7, 999, 1000, 1998, 1_234_567]
            .iter()
            .map(|n| Thousands(*n).to_string())
            .collect();
        assert_eq!(got, ["0", "7", "999", "1,000", "1,998", "1,234,567"]);
    }
}
