//! Comparing per-key counts with what a token bucket should have let through.

use std::time::Duration;

use anyhow::{Result, bail};

/// One rate-limit key: what its sender did and what the receiver counted.
#[derive(Clone, Debug)]
pub struct KeyCount {
    pub key: String,
    pub sent: u64,
    /// The key's own first-to-last packet span at the sender.
    pub span: Duration,
    pub expected: f64,
    pub got: u64,
}

impl KeyCount {
    /// A key limited to `rate`/s with `burst`, saturated for its whole span, passes
    /// `burst + rate * span` packets (the token bucket starts full at the key's first packet);
    /// never more than it sent.
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
            got,
        }
    }

    /// Signed relative error of the count.
    pub fn error(&self) -> f64 {
        (self.got as f64 - self.expected) / self.expected.max(1.0)
    }
}

/// Ok when every key is within `tolerance` (0.03 = ±3%) of its expectation; otherwise an
/// error naming how many keys missed and the worst ten, each with expected and received.
pub fn check_counts(what: &str, keys: &[KeyCount], tolerance: f64) -> Result<()> {
    if keys.is_empty() {
        bail!("{what}: no keys to check");
    }
    let mut bad: Vec<&KeyCount> = keys
        .iter()
        .filter(|k| k.error().abs() > tolerance)
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    bad.sort_by(|a, b| b.error().abs().total_cmp(&a.error().abs()));
    let exp: f64 = keys.iter().map(|k| k.expected).sum();
    let got: u64 = keys.iter().map(|k| k.got).sum();
    let mut msg = format!(
        "{what}: {} of {} keys outside ±{:.1}% of burst + rate x span (all keys: expected \
         {exp:.0}, received {got}). Worst keys:",
        bad.len(),
        keys.len(),
        tolerance * 100.0
    );
    for k in bad.iter().take(10) {
        msg.push_str(&format!(
            "\n  {}: expected {:.1}, received {} ({:+.2}%), sent {}, span {:.3}s",
            k.key,
            k.expected,
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
        assert!(e.contains("b: expected 110.0, received 80"), "{e}");
        assert!(check_counts("t", &keys[..1], 0.03).is_ok());
    }
}
