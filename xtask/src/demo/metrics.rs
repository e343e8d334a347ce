//! What the demo reads from the agent's HTTP endpoint. Every name lives here: when the agent's
//! metric names or paths change, change them here only.

use std::collections::BTreeMap;

pub const METRICS_PATH: &str = "/metrics";
pub const READY_PATH: &str = "/health/ready";

/// The label that names the service on every per-service series.
pub const SERVICE_LABEL: &str = "service";

/// A counter and the labels (besides `service`) that select the series to sum.
pub struct Series {
    pub name: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
}

/// Packets of the service that the datapath let through.
pub const PASSED: Series = Series {
    name: "agent_service_packets_total",
    labels: &[("verdict", "passed")],
};

/// Packets of the service that the token bucket dropped.
pub const DROPPED_RATE_LIMIT: Series = Series {
    name: "agent_service_dropped_packets_total",
    labels: &[("reason", "rate_limit")],
};

/// One line of the Prometheus text format.
#[derive(Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text exposition format, skipping comments and lines it does not understand.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, remainder) = parse_labels(after_brace)?;
        labels = parsed;
        rest = remainder;
    }
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"}` -> labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

/// Sum of every sample of `series` for `service` (e.g. over CPUs or interfaces); `None` when
/// the agent exports no such series.
pub fn total(samples: &[Sample], series: &Series, service: &str) -> Option<f64> {
    let mut found = None;
    for sample in samples.iter().filter(|s| s.name == series.name) {
        let matches = sample.labels.get(SERVICE_LABEL).map(String::as_str) == Some(service)
            && series
                .labels
                .iter()
                .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v));
        if matches {
            *found.get_or_insert(0.0) += sample.value;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
# HELP agent_service_packets_total Packets per service and verdict.
# TYPE agent_service_packets_total counter
agent_service_packets_total{service="demo-udp",verdict="passed"} 1200
agent_service_packets_total{service="demo-udp",verdict="dropped"} 3
agent_service_packets_total{service="demo-tcp",verdict="passed"} 7 1712345678000
agent_service_dropped_packets_total{reason="rate_limit",service="demo-udp",cpu="0"} 10
agent_service_dropped_packets_total{reason="rate_limit",service="demo-udp",cpu="1"} 5.5
weird{service="a\"b\\c"} 1
up 1
"#;

    #[test]
    fn sums_matching_series_only() {
        let samples = parse(TEXT);
        assert_eq!(total(&samples, &PASSED, "demo-udp"), Some(1200.0));
        assert_eq!(total(&samples, &PASSED, "demo-tcp"), Some(7.0));
        assert_eq!(total(&samples, &DROPPED_RATE_LIMIT, "demo-udp"), Some(15.5));
        assert_eq!(total(&samples, &DROPPED_RATE_LIMIT, "demo-tcp"), None);
    }

    #[test]
    fn parses_escapes_and_bare_names() {
        let samples = parse(TEXT);
        let weird = samples
            .iter()
            .find(|s| s.name == "weird")
            .expect("weird parsed");
        assert_eq!(weird.labels["service"], "a\"b\\c");
        assert!(samples.iter().any(|s| s.name == "up" && s.value == 1.0));
    }
}
