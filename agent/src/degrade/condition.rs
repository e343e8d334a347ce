//! One condition measured over its window: its value, whether it is met, and the words logs
//! and status use for it (`latency p99 612ms > 500ms over 2s`).

use std::time::{Duration, Instant};

use agent_common::status::ConditionStatus;

use super::window::Windows;
use crate::config::model::{Condition, ConditionKind};

/// A condition as last evaluated.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Measure {
    /// Seconds (latency p99) or a share from 0 to 1; `None` without a sample.
    pub value: Option<f64>,
    pub samples: u64,
    pub met: bool,
}

/// Measures `c` over its window ending at `now`. Without a sample a condition is not met.
pub fn measure(c: &Condition, w: &Windows, now: Instant) -> Measure {
    match c.kind {
        ConditionKind::Latency { threshold } => {
            let (p99, samples) = w.latency_p99(now, c.window);
            Measure {
                value: p99.map(|d| d.as_secs_f64()),
                samples,
                met: p99.is_some_and(|p| p > threshold),
            }
        }
        ConditionKind::ErrorRate { threshold } => {
            let a = w.attempts(now, c.window);
            // Exact: failed / total > millionths / 1e6.
            let met = a.total > 0
                && u128::from(a.failed) * 1_000_000
                    > u128::from(threshold.millionths()) * u128::from(a.total);
            Measure {
                value: (a.total > 0).then(|| a.failed as f64 / a.total as f64),
                samples: a.total,
                met,
            }
        }
        ConditionKind::Availability { threshold } => {
            let (mean, samples) = w.availability_mean(now, c.window);
            Measure {
                value: mean,
                samples,
                met: mean.is_some_and(|m| m < threshold.fraction()),
            }
        }
    }
}

/// The threshold as the policy writes it: `500ms`, `50%`.
pub fn threshold(c: &Condition) -> String {
    match c.kind {
        ConditionKind::Latency { threshold } => duration(threshold),
        ConditionKind::ErrorRate { threshold } | ConditionKind::Availability { threshold } => {
            threshold.to_string()
        }
    }
}

/// What a met condition says, with its value: `latency p99 612ms > 500ms over 2s`,
/// `error_rate 62.5% > 50% over 30s`, `availability 40% < 80% over 10s`.
pub fn describe(c: &Condition, m: &Measure) -> String {
    let over = duration(c.window);
    let limit = threshold(c);
    match (c.kind, m.value) {
        (ConditionKind::Latency { .. }, Some(v)) => {
            format!("latency p99 {} > {limit} over {over}", seconds(v))
        }
        (ConditionKind::ErrorRate { .. }, Some(v)) => {
            format!("error_rate {} > {limit} over {over}", percent(v))
        }
        (ConditionKind::Availability { .. }, Some(v)) => {
            format!("availability {} < {limit} over {over}", percent(v))
        }
        (kind, None) => format!("{} without samples over {over}", kind.condition_type()),
    }
}

/// As status shows it.
pub fn status(c: &Condition, m: &Measure) -> ConditionStatus {
    ConditionStatus {
        r#type: c.kind.condition_type().to_string(),
        threshold: threshold(c),
        window_seconds: c.window.as_secs_f64(),
        value: m.value,
        samples: m.samples,
        met: m.met,
    }
}

/// `2s`, `500ms`, `1500ms`, `0.4ms`: whole seconds, else milliseconds (rounded from 10 ms).
pub fn duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 && !d.is_zero() {
        return format!("{}s", d.as_secs());
    }
    seconds(d.as_secs_f64())
}

fn seconds(s: f64) -> String {
    let ms = s * 1e3;
    if ms >= 10.0 {
        format!("{}ms", ms.round() as u64)
    } else {
        let text = format!("{ms:.1}");
        format!("{}ms", text.trim_end_matches(".0"))
    }
}

/// `62.5%`, `40%`.
fn percent(share: f64) -> String {
    let text = format!("{:.1}", share * 100.0);
    format!("{}%", text.trim_end_matches(".0"))
}
