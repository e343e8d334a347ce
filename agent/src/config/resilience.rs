//! Decoding of a service's resilience sections: `load_balancing`, `health_check`,
//! `circuit_breaker`, `degradation`, with the checks that need only the section itself.
//! Later features only read the model; every rule they rely on is enforced here.

use std::time::Duration;

use super::decode::{
    Cx, Field, MapReader, boolean, count, duration, int_u32, item, keyword, parsed, percent,
    positive_duration, seq, show, string,
};
use super::model::*;
use super::sections::backends;
use super::units::{parse_duration, parse_percent};
use super::yaml::{Node, Pos};

const LOAD_BALANCING_FIELDS: &[&str] = &[
    "algorithm",
    "vip",
    "slow_start",
    "table_size",
    "panic_threshold",
    "max_connections",
];

pub(crate) fn load_balancing(cx: &mut Cx, node: &Node, path: &str) -> Option<LoadBalancing> {
    let mut m = MapReader::new(cx, node, path, LOAD_BALANCING_FIELDS)?;
    let d = LoadBalancing::default();
    let algorithm = m.get(cx, "algorithm", keyword::<Algorithm>).or(d.algorithm);
    let vip = m.get(cx, "vip", boolean).or(d.vip);
    let slow_start = m.get(cx, "slow_start", duration).or(d.slow_start);
    let panic_threshold = m.get(cx, "panic_threshold", percent).or(d.panic_threshold);
    let max_connections = m
        .get(cx, "max_connections", |cx, n, p| {
            int_u32(cx, n, p, 1..=u64::from(MAX_TABLE_ENTRIES))
        })
        .or(d.max_connections);
    let table_size = m.get(cx, "table_size", |cx, n, p| {
        let size = int_u32(cx, n, p, 1..=u64::from(MAX_TABLE_ENTRIES))?;
        if !is_prime(size) {
            let msg = format!(
                "{size} is not prime; Maglev needs a prime table size (next prime: {})",
                next_prime(size)
            );
            cx.error(n.pos, p, msg);
            return None;
        }
        Some(size)
    });
    let table_size_set = table_size.is_set();
    let table_size_pos = m.pos_of("table_size");
    let table_size_path = m.child("table_size");
    let mut ok = m.finish(cx);
    let table_size = table_size.or(d.table_size);
    if let Some(a) = algorithm
        && a != Algorithm::Maglev
        && table_size_set
    {
        let msg = format!("table_size applies only to algorithm maglev, not {a}");
        cx.error(table_size_pos.unwrap_or(node.pos), &table_size_path, msg);
        ok = false;
    }
    let lb = LoadBalancing {
        algorithm: algorithm?,
        vip: vip?,
        slow_start: slow_start?,
        table_size: table_size?,
        panic_threshold: panic_threshold?,
        max_connections: max_connections?,
    };
    ok.then_some(lb)
}

/// Trial division: table sizes are at most 2^24, so at most 2^12 divisions.
pub(crate) fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// The smallest prime >= `n` (for suggestions in messages).
pub(crate) fn next_prime(n: u32) -> u64 {
    let mut p = u64::from(n.max(2));
    while !u32::try_from(p).is_ok_and(is_prime) {
        p += 1;
        if p > u64::from(u32::MAX) {
            break;
        }
    }
    p
}

const HEALTH_CHECK_FIELDS: &[&str] = &[
    "type",
    "path",
    "host",
    "expected_status",
    "interval",
    "unhealthy_interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "jitter",
    "retry",
    "passive",
];

pub(crate) fn health_check(cx: &mut Cx, node: &Node, path: &str) -> Option<HealthCheck> {
    let mut m = MapReader::new(cx, node, path, HEALTH_CHECK_FIELDS)?;
    let d = HealthCheck::default();
    let r#type = m.get(cx, "type", keyword::<CheckType>).or(d.r#type);
    let http_path = m.get(cx, "path", |cx, n, p| {
        let s = header_safe(cx, n, p)?;
        if !s.starts_with('/') {
            cx.error(n.pos, p, "must start with `/`");
            return None;
        }
        Some(s)
    });
    let host = m.get(cx, "host", header_safe);
    let expected_status = m.get(cx, "expected_status", |cx, n, p| {
        parsed(cx, n, p, parse_status_range)
    });
    // Fields that only an http check reads: setting them on a tcp check is a mistake.
    let http_only: Vec<(String, Pos)> = ["path", "host", "expected_status"]
        .into_iter()
        .filter_map(|k| m.pos_of(k).map(|pos| (m.child(k), pos)))
        .collect();
    let interval = m.get(cx, "interval", positive_duration);
    let unhealthy_interval = m.get(cx, "unhealthy_interval", positive_duration);
    let timeout = m.get(cx, "timeout", positive_duration);
    // How each duration reads in a message: "(default 500ms)" when the file does not set it.
    let shown = |f: &Field<Duration>, default: Duration| match f {
        Field::Set(v) => show(*v),
        _ => format!("default {}", show(default)),
    };
    let timeout_text = shown(&timeout, d.timeout);
    let interval_text = shown(&interval, d.interval);
    let unhealthy_text = shown(&unhealthy_interval, d.unhealthy_interval);
    let timeout_pos = m.pos_of("timeout").unwrap_or(m.pos);
    let timeout_path = m.child("timeout");
    let healthy_threshold = m.get(cx, "healthy_threshold", count);
    let unhealthy_threshold = m.get(cx, "unhealthy_threshold", count);
    let jitter = m.get(cx, "jitter", percent);
    let retry = m.section(cx, "retry", retry);
    let passive = m.get(cx, "passive", boolean);
    let mut ok = m.finish(cx);
    if r#type == Some(CheckType::Tcp) {
        for (p, pos) in http_only {
            let field = p.rsplit('.').next().unwrap_or_default().to_owned();
            cx.error(pos, &p, format!("`{field}` applies only to type http"));
            ok = false;
        }
    }
    let interval = interval.or(d.interval);
    let unhealthy_interval = unhealthy_interval.or(d.unhealthy_interval);
    let timeout = timeout.or(d.timeout);
    if let Some(t) = timeout {
        for (name, limit, text) in [
            ("interval", interval, interval_text),
            ("unhealthy_interval", unhealthy_interval, unhealthy_text),
        ] {
            if limit.is_some_and(|l| t >= l) {
                let msg = format!("timeout ({timeout_text}) must be shorter than {name} ({text})");
                cx.error(timeout_pos, &timeout_path, msg);
                ok = false;
            }
        }
    }
    let hc = HealthCheck {
        r#type: r#type?,
        path: http_path.or(d.path)?,
        host: host.or(d.host)?,
        expected_status: expected_status.or(d.expected_status)?,
        interval: interval?,
        unhealthy_interval: unhealthy_interval?,
        timeout: timeout?,
        healthy_threshold: healthy_threshold.or(d.healthy_threshold)?,
        unhealthy_threshold: unhealthy_threshold.or(d.unhealthy_threshold)?,
        jitter: jitter.or(d.jitter)?,
        retry: retry.or(d.retry)?,
        passive: passive.or(d.passive)?,
    };
    ok.then_some(hc)
}

/// A string that can go into an HTTP request line or header: no whitespace or control
/// characters (they would split or forge the request).
fn header_safe(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    let s = string(cx, node, path)?;
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        cx.error(
            node.pos,
            path,
            "must not contain spaces or control characters",
        );
        return None;
    }
    Some(s)
}

/// `200` or `200-399`, within 100-599.
pub(crate) fn parse_status_range(text: &str) -> Result<StatusRange, String> {
    let bad =
        || format!("`{text}` is not a status like 200 or a range like 200-399, within 100-599");
    let status = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|v| (100..=599).contains(v))
    };
    let (min, max) = match text.split_once('-') {
        Some((a, b)) => (status(a).ok_or_else(bad)?, status(b).ok_or_else(bad)?),
        None => {
            let s = status(text).ok_or_else(bad)?;
            (s, s)
        }
    };
    if min > max {
        return Err(format!("`{text}` is an empty range: {min} is above {max}"));
    }
    Ok(StatusRange { min, max })
}

const RETRY_FIELDS: &[&str] = &["max_attempts", "initial_backoff", "max_backoff"];

fn retry(cx: &mut Cx, node: &Node, path: &str) -> Option<Retry> {
    let mut m = MapReader::new(cx, node, path, RETRY_FIELDS)?;
    let d = Retry::default();
    let max_attempts = m.get(cx, "max_attempts", count).or(d.max_attempts);
    let initial_backoff = m.get(cx, "initial_backoff", duration).or(d.initial_backoff);
    let max_backoff = m.get(cx, "max_backoff", duration).or(d.max_backoff);
    let initial_pos = m.pos_of("initial_backoff").unwrap_or(m.pos);
    let initial_path = m.child("initial_backoff");
    let mut ok = m.finish(cx);
    if let (Some(initial), Some(max)) = (initial_backoff, max_backoff)
        && initial > max
    {
        let msg = format!(
            "initial_backoff ({}) must not be longer than max_backoff ({})",
            show(initial),
            show(max)
        );
        cx.error(initial_pos, &initial_path, msg);
        ok = false;
    }
    let retry = Retry {
        max_attempts: max_attempts?,
        initial_backoff: initial_backoff?,
        max_backoff: max_backoff?,
    };
    ok.then_some(retry)
}

const CIRCUIT_BREAKER_FIELDS: &[&str] = &[
    "failure_threshold",
    "error_rate",
    "min_requests",
    "window",
    "reset_timeout",
    "max_reset_timeout",
    "half_open_max_flows",
    "success_threshold",
    "on_open",
    "close_existing",
    "max_ejection_percent",
];

pub(crate) fn circuit_breaker(cx: &mut Cx, node: &Node, path: &str) -> Option<CircuitBreaker> {
    let mut m = MapReader::new(cx, node, path, CIRCUIT_BREAKER_FIELDS)?;
    let d = CircuitBreaker::default();
    let failure_threshold = m.get(cx, "failure_threshold", count);
    let error_rate = m.get(cx, "error_rate", percent);
    let min_requests = m.get(cx, "min_requests", count);
    let window = m.get(cx, "window", positive_duration);
    let reset_timeout = m.get(cx, "reset_timeout", positive_duration);
    let max_reset_timeout = m.get(cx, "max_reset_timeout", positive_duration);
    let half_open_max_flows = m.get(cx, "half_open_max_flows", count);
    let success_threshold = m.get(cx, "success_threshold", count);
    let on_open = m.get(cx, "on_open", keyword::<OnOpen>);
    let close_existing = m.get(cx, "close_existing", boolean);
    let max_ejection_percent = m.get(cx, "max_ejection_percent", percent);
    let reset_pos = m.pos_of("reset_timeout").unwrap_or(m.pos);
    let reset_path = m.child("reset_timeout");
    let mut ok = m.finish(cx);
    let reset_timeout = reset_timeout.or(d.reset_timeout);
    let max_reset_timeout = max_reset_timeout.or(d.max_reset_timeout);
    if let (Some(reset), Some(max)) = (reset_timeout, max_reset_timeout)
        && reset > max
    {
        let msg = format!(
            "reset_timeout ({}) must not be longer than max_reset_timeout ({})",
            show(reset),
            show(max)
        );
        cx.error(reset_pos, &reset_path, msg);
        ok = false;
    }
    let cb = CircuitBreaker {
        failure_threshold: failure_threshold.or(d.failure_threshold)?,
        error_rate: error_rate.or(d.error_rate)?,
        min_requests: min_requests.or(d.min_requests)?,
        window: window.or(d.window)?,
        reset_timeout: reset_timeout?,
        max_reset_timeout: max_reset_timeout?,
        half_open_max_flows: half_open_max_flows.or(d.half_open_max_flows)?,
        success_threshold: success_threshold.or(d.success_threshold)?,
        on_open: on_open.or(d.on_open)?,
        close_existing: close_existing.or(d.close_existing)?,
        max_ejection_percent: max_ejection_percent.or(d.max_ejection_percent)?,
    };
    ok.then_some(cb)
}

const DEGRADATION_FIELDS: &[&str] = &["conditions", "fallback", "recover_after"];

pub(crate) fn degradation(cx: &mut Cx, node: &Node, path: &str) -> Option<Degradation> {
    let mut m = MapReader::new(cx, node, path, DEGRADATION_FIELDS)?;
    let conditions = m.required(cx, "conditions", |cx, n, p| {
        let items = seq(cx, n, p)?;
        if items.is_empty() {
            cx.error(n.pos, p, "at least one condition is required");
            return None;
        }
        let parsed: Vec<_> = items
            .iter()
            .enumerate()
            .map(|(i, c)| condition(cx, c, &item(p, i)))
            .collect();
        parsed.into_iter().collect::<Option<Vec<_>>>()
    });
    let fallback_field = m.section(cx, "fallback", fallback);
    let fallback_absent = matches!(fallback_field, Field::Absent);
    let fallback_path = m.child("fallback");
    let recover_after = m
        .get(cx, "recover_after", duration)
        .or(DEFAULT_RECOVER_AFTER);
    let known = m.finish(cx);
    if fallback_absent {
        // The default strategy (static_response) needs backends, so a missing fallback is
        // an error, not a silent "shed".
        let msg = "required unless strategy is shed: where traffic goes while degraded";
        cx.error(node.pos, &format!("{fallback_path}.backends"), msg);
    }
    let degradation = Degradation {
        conditions: conditions?,
        fallback: fallback_field.or(Fallback::default())?,
        recover_after: recover_after?,
    };
    (known && !fallback_absent).then_some(degradation)
}

const CONDITION_FIELDS: &[&str] = &["type", "threshold", "window"];

fn condition(cx: &mut Cx, node: &Node, path: &str) -> Option<Condition> {
    let mut m = MapReader::new(cx, node, path, CONDITION_FIELDS)?;
    let kind_type = m.required(cx, "type", keyword::<ConditionType>);
    let threshold = match kind_type {
        Some(t) => m.get(cx, "threshold", |cx, n, p| threshold(cx, n, p, t)),
        None => {
            // Without a valid type the threshold cannot be read; mark it seen.
            m.take("threshold");
            Field::Bad
        }
    };
    let window = m
        .get(cx, "window", positive_duration)
        .or(DEFAULT_CONDITION_WINDOW);
    let known = m.finish(cx);
    let kind = threshold.or(ConditionKind::default_for(kind_type?))?;
    let condition = Condition {
        kind,
        window: window?,
    };
    known.then_some(condition)
}

/// A threshold of the kind its condition measures: a duration for latency, a percentage
/// for the rates.
fn threshold(cx: &mut Cx, node: &Node, path: &str, t: ConditionType) -> Option<ConditionKind> {
    let text = string(cx, node, path)?;
    let wrong_kind = |what: &str, example: &str| {
        format!("{t} thresholds are {what} (e.g. {example}), found `{text}`")
    };
    match t {
        ConditionType::Latency => match parse_duration(&text) {
            Ok(d) if d.is_zero() => {
                cx.error(node.pos, path, "must be greater than 0");
                None
            }
            Ok(threshold) => Some(ConditionKind::Latency { threshold }),
            Err(_) if parse_percent(&text).is_ok() => {
                cx.error(node.pos, path, wrong_kind("durations", "500ms"));
                None
            }
            Err(e) => {
                cx.error(node.pos, path, e.to_string());
                None
            }
        },
        ConditionType::ErrorRate | ConditionType::Availability => match parse_percent(&text) {
            Ok(threshold) if t == ConditionType::ErrorRate => {
                Some(ConditionKind::ErrorRate { threshold })
            }
            Ok(threshold) => Some(ConditionKind::Availability { threshold }),
            Err(_) if parse_duration(&text).is_ok() => {
                cx.error(node.pos, path, wrong_kind("percentages", "50%"));
                None
            }
            Err(e) => {
                cx.error(node.pos, path, e.to_string());
                None
            }
        },
    }
}

const FALLBACK_FIELDS: &[&str] = &["strategy", "backends"];

fn fallback(cx: &mut Cx, node: &Node, path: &str) -> Option<Fallback> {
    let mut m = MapReader::new(cx, node, path, FALLBACK_FIELDS)?;
    let strategy = m
        .get(cx, "strategy", keyword::<FallbackStrategy>)
        .or(FallbackStrategy::StaticResponse);
    let backends_pos = m.pos_of("backends").unwrap_or(m.pos);
    let backends_path = m.child("backends");
    let backends = m.get(cx, "backends", backends).or(Vec::new());
    let mut ok = m.finish(cx);
    let shed = strategy == Some(FallbackStrategy::Shed);
    if let Some(b) = &backends {
        if strategy.is_some() && !shed && b.is_empty() {
            let msg = "required unless strategy is shed: where traffic goes while degraded";
            cx.error(backends_pos, &backends_path, msg);
            ok = false;
        }
        if shed && !b.is_empty() {
            let msg = "not used with strategy shed, which drops the traffic; remove them";
            cx.error(backends_pos, &backends_path, msg);
            ok = false;
        }
    }
    let fallback = Fallback {
        strategy: strategy?,
        backends: backends?,
    };
    ok.then_some(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert!(is_prime(65537));
        assert!(is_prime(2));
        assert!(!is_prime(1));
        assert!(!is_prime(65536));
        assert!(!is_prime(100));
        assert_eq!(next_prime(65536), 65537);
        assert_eq!(next_prime(100), 101);
        assert!(is_prime(16_777_213));
    }

    #[test]
    fn status_ranges() {
        assert_eq!(
            parse_status_range("200-399"),
            Ok(StatusRange { min: 200, max: 399 })
        );
        assert_eq!(
            parse_status_range("204"),
            Ok(StatusRange { min: 204, max: 204 })
        );
        assert!(parse_status_range("99").is_err());
        assert!(parse_status_range("200-600").is_err());
        assert!(parse_status_range("399-200").is_err());
        assert!(parse_status_range("2xx").is_err());
        assert!(parse_status_range("").is_err());
        assert!(parse_status_range("-").is_err());
    }
}
