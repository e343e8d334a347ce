//! Comparing per-key counts with what a token bucket should have let through.

use std::time::Duration;

use agent_common::{
    ServiceConfig,
    limit::{RL_KEY_FLOW, RL_UNIT_PACKETS, coarse_clock_tick_ns, coarse_min_burst_ns},
};
use anyhow::{Result, bail};

/// One rate-limit key: what its sender did and what the receiver counted.
#[derive(Clone, Debug)]
pub struct KeyCount {
    pub key: String,
    pub sent: u64,
    /// The key's own first-to-last packet span at the sender.
    pub span: Duration,
    pub expected: f64,
    /// Packets the bucket's clock may add or take beyond `tolerance`: `rate x tick` when the
    /// datapath reads the coarse clock for this limit (`agent_common::limit`), else 0.
    pub clock_slack: f64,
    pub got: u64,
}

/// Packets a limit of `rate`/s with `burst` may admit beyond `burst + rate x T` (or short of
/// it) because of its clock: the coarse clock lags by up to one tick, so `rate x tick` when
/// the datapath reads it for this burst, 0 on the precise clock.
pub fn clock_slack(rate: f64, burst: f64) -> f64 {
    let Some(tick) = coarse_clock_tick_ns() else {
        return 0.0;
    };
    let coarse = ServiceConfig::with_rate_limit(
        RL_KEY_FLOW,
        RL_UNIT_PACKETS,
        rate.round() as u64,
        burst.round() as u64,
    )
    .is_some_and(|c| c.coarse_clock(coarse_min_burst_ns(tick)));
    if coarse {
        rate * tick as f64 / 1e9
    } else {
        0.0
    }
}

impl KeyCount {
    /// A key limited to `rate`/s with `burst`, saturated for its whole span, passes
    /// `burst + rate * span` packets (the token bucket starts full at the key's first packet);
    /// never more than it sent. Give or take the clock's slack ([`clock_slack`]).
    pub fn limited(
        key: String,
        sent: u64,
        span: Duration,
        rate: f64,
        burst: f64,
        got: u64,
    ) -> Self {
        let expected = (burst + rate * span.as_secs_f64()).min(sent as f64);
        KeyCount {
            key,
            sent,
            span,
            expected,
            clock_slack: clock_slack(rate, burst),
            got,
        }
    }

    /// Signed relative error of the count.
    pub fn error(&self) -> f64 {
        (self.got as f64 - self.expected) / self.expected.max(1.0)
    }

    /// Whether the count is within `tolerance` of the expectation, the clock's slack aside.
    pub fn within(&self, tolerance: f64) -> bool {
        (self.got as f64 - self.expected).abs()
            <= tolerance * self.expected.max(1.0) + self.clock_slack
    }
}

/// Ok when every key is within `tolerance` (0.03 = ±3%) of its expectation; otherwise an
/// error naming how many keys missed and the worst ten, each with expected and received.
pub fn check_counts(what: &str, keys: &[KeyCount], tolerance: f64) -> Result<()> {
    if keys.is_empty() {
        bail!("{what}: no keys to check");
    }
    let mut bad: Vec<&KeyCount> = keys.iter().filter(|k| !k.within(tolerance)).collect();
    if bad.is_empty() {
        return Ok(());
    }
    bad.sort_by(|a, b| b.error().abs().total_cmp(&a.error().abs()));
    let exp: f64 = keys.iter().map(|k| k.expected).sum();
    let got: u64 = keys.iter().map(|k| k.got).sum();
    let mut msg = format!(
        "{what}: {} of {} keys outside ±{:.1}% of burst + rate x span, give or take the \
         clock's rate x tick (all keys: expected {exp:.0}, received {got}). Worst keys:",
        bad.len(),
        keys.len(),
        tolerance * 100.0
    );
    for k in bad.iter().take(10) {
        msg.push_str(&format!(
            "\n  {}: expected {:.1} (+-{:.1} for the clock), received {} ({:+.2}%), sent {}, \
             span {:.3}s",
            k.key,
            k.expected,
            k.clock_slack,
            k.got,
            k.error() * 100.0,
            k.sent,
            k.span.as_secs_f64()
        ));
    }
    bail!(msg)
}

/// min / mean / max of the relative errors, for logs of passing runs.
pub fn error_summary(keys: &[KeyCount]) -> String {
    let errs: Vec<f64> = keys.iter().map(KeyCount::error).collect();
    let min = errs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = errs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean = errs.iter().sum::<f64>() / errs.len().max(1) as f64;
    format!(
        "{} keys, error min {:+.2}% mean {:+.2}% max {:+.2}%",
        keys.len(),
        min * 100.0,
        mean * 100.0,
        max * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_worst_keys() {
        let keys = vec![
            KeyCount::limited("a".into(), 500, Duration::from_secs(2), 50.0, 10.0, 110),
            KeyCount::limited("b".into(), 500, Duration::from_secs(2), 50.0, 10.0, 80),
        ];
        let e = check_counts("t", &keys, 0.03).unwrap_err().to_string();
        assert!(e.contains("1 of 2 keys"), "{e}");
        assert!(e.contains("b: expected 110.0 (+-"), "{e}");
        assert!(e.contains("received 80 (-27.27%)"), "{e}");
        assert!(check_counts("t", &keys[..1], 0.03).is_ok());
    }

    #[test]
    fn the_clock_slack_widens_the_band_by_rate_x_tick_only() {
        // 10,000/s: 3% of 31,000 is 930, a 4 ms tick adds 40.
        let key = |got| KeyCount {
            clock_slack: 40.0,
            ..KeyCount::limited("k".into(), 1 << 20, Duration::from_secs(3), 1e4, 1e3, got)
        };
        assert!(key(31_000 + 930 + 40).within(0.03));
        assert!(!key(31_000 + 930 + 41).within(0.03));
        assert!(key(31_000 - 970).within(0.03));
        assert!(!key(31_000 - 971).within(0.03));
    }

    #[test]
    fn the_slack_follows_the_datapath_choice_of_clock() {
        let Some(tick) = coarse_clock_tick_ns() else {
            return;
        };
        let tick_s = tick as f64 / 1e9;
        // A burst of 100 ms: the coarse clock (a tick is at most 10 ms, CONFIG_HZ 100).
        assert_eq!(clock_slack(1e4, 1e3), 1e4 * tick_s);
        // A burst of one tick: the precise clock.
        assert_eq!(clock_slack(1e6, (1e6 * tick_s).floor()), 0.0);
    }
}
