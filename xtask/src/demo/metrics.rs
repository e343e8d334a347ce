//! What the demo reads from the agent's HTTP endpoint. Every name lives here: when the agent's
//! metric names or paths change, change them here only.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use super::{http, netns::Netns};

pub const METRICS_PATH: &str = "/metrics";
pub const READY_PATH: &str = "/health/ready";

/// The label that names the service on every per-service series.
pub const SERVICE_LABEL: &str = "service";
/// The label that names the backend (`address:port`) on every per-backend series.
pub const BACKEND_LABEL: &str = "backend";

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

/// Packets toward a backend that its open breaker answered with a TCP RST.
pub const REJECT_RST: Series = Series {
    name: "agent_backend_datapath_packets_total",
    labels: &[("action", "reject_rst")],
};

/// `agent_lb_backend_effective_weight{service,backend}`: the weight a balanced backend has in
/// the datapath's tables now (configured x health x slow start).
pub const EFFECTIVE_WEIGHT: Series = Series {
    name: "agent_lb_backend_effective_weight",
    labels: &[],
};

/// `agent_breaker_state{service,backend,state}`: 1 for the state the breaker is in, else 0.
pub const BREAKER_STATE: &str = "agent_breaker_state";
pub const BREAKER_STATES: [&str; 3] = ["closed", "open", "half_open"];

/// `agent_breaker_transitions_total{service,backend,to,reason}`: changes of state, counted.
pub const BREAKER_TRANSITIONS: &str = "agent_breaker_transitions_total";

/// A change of breaker state: its reason label, and the states it goes from and to.
pub struct Move {
    pub reason: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

/// Every change a breaker makes, by reason (agent/src/breaker/state.rs). `panic_threshold`
/// (a breaker that stays closed because too many of its service's are open) is not a change.
pub const BREAKER_MOVES: [Move; 5] = [
    Move {
        reason: "consecutive_failures",
        from: "closed",
        to: "open",
    },
    Move {
        reason: "error_rate",
        from: "closed",
        to: "open",
    },
    Move {
        reason: "reset_timeout",
        from: "open",
        to: "half_open",
    },
    Move {
        reason: "trial_failed",
        from: "half_open",
        to: "open",
    },
    Move {
        reason: "trials_succeeded",
        from: "half_open",
        to: "closed",
    },
];

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

/// GET /metrics from inside `netns` (where the agent's listen address is reachable), parsed.
pub fn scrape(netns: &Netns, listen: SocketAddr, timeout: Duration) -> Result<Vec<Sample>, String> {
    let response = netns
        .run(|| http::get(listen, METRICS_PATH, timeout))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(format!("GET {METRICS_PATH} answered {}", response.status));
    }
    Ok(parse(&response.body))
}

/// Sum of every sample of `series` for `service` (e.g. over CPUs or interfaces); `None` when
/// the agent exports no such series.
pub fn total(samples: &[Sample], series: &Series, service: &str) -> Option<f64> {
    sum(
        samples,
        series.name,
        &[(SERVICE_LABEL, service)],
        series.labels,
    )
}

/// Like [`total`], for one backend of the service.
pub fn backend_total(
    samples: &[Sample],
    series: &Series,
    service: &str,
    backend: &str,
) -> Option<f64> {
    let selector = [(SERVICE_LABEL, service), (BACKEND_LABEL, backend)];
    sum(samples, series.name, &selector, series.labels)
}

/// The state whose `agent_breaker_state` sample is 1 for this backend of the service.
pub fn breaker_state(samples: &[Sample], service: &str, backend: &str) -> Option<&'static str> {
    BREAKER_STATES.into_iter().find(|state| {
        let selector = [
            (SERVICE_LABEL, service),
            (BACKEND_LABEL, backend),
            ("state", state),
        ];
        sum(samples, BREAKER_STATE, &selector, &[]) == Some(1.0)
    })
}

/// How often the backend's breaker made each of [`BREAKER_MOVES`] (0 when not exported).
pub fn breaker_moves(samples: &[Sample], service: &str, backend: &str) -> [u64; 5] {
    BREAKER_MOVES.map(|m| {
        let selector = [
            (SERVICE_LABEL, service),
            (BACKEND_LABEL, backend),
            ("to", m.to),
            ("reason", m.reason),
        ];
        sum(samples, BREAKER_TRANSITIONS, &selector, &[]).unwrap_or(0.0) as u64
    })
}

/// Sum of the samples named `name` that carry every label of `selector` and of `labels`.
fn sum(
    samples: &[Sample],
    name: &str,
    selector: &[(&str, &str)],
    labels: &[(&str, &str)],
) -> Option<f64> {
    let has = |sample: &Sample, (k, v): &(&str, &str)| {
        sample.labels.get(*k).map(String::as_str) == Some(*v)
    };
    let mut found = None;
    for sample in samples.iter().filter(|s| s.name == name) {
        if selector
            .iter()
            .chain(labels)
            .all(|label| has(sample, label))
        {
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
agent_breaker_state{service="pay",backend="198.18.0.12:8080",state="closed"} 0
agent_breaker_state{service="pay",backend="198.18.0.12:8080",state="open"} 1
agent_breaker_state{service="pay",backend="198.18.0.11:8080",state="closed"} 1
agent_backend_datapath_packets_total{service="pay",backend="198.18.0.12:8080",action="reject_rst"} 42
agent_backend_datapath_packets_total{service="pay",backend="198.18.0.12:8080",action="admitted"} 7
agent_breaker_transitions_total{service="pay",backend="198.18.0.12:8080",to="open",reason="consecutive_failures"} 1
agent_breaker_transitions_total{service="pay",backend="198.18.0.12:8080",to="half_open",reason="reset_timeout"} 2
agent_breaker_transitions_total{service="pay",backend="198.18.0.12:8080",to="open",reason="trial_failed"} 2
agent_lb_backend_effective_weight{service="shop",backend="198.18.0.23:8080"} 50
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

    #[test]
    fn reads_backends_and_breaker_states() {
        let samples = parse(TEXT);
        let (one, two) = ("198.18.0.11:8080", "198.18.0.12:8080");
        assert_eq!(breaker_state(&samples, "pay", two), Some("open"));
        assert_eq!(breaker_state(&samples, "pay", one), Some("closed"));
        assert_eq!(breaker_state(&samples, "other", one), None);
        assert_eq!(backend_total(&samples, &REJECT_RST, "pay", two), Some(42.0));
        assert_eq!(backend_total(&samples, &REJECT_RST, "pay", one), None);
        assert_eq!(breaker_moves(&samples, "pay", two), [1, 0, 2, 2, 0]);
        assert_eq!(breaker_moves(&samples, "pay", one), [0; 5]);
    }

    #[test]
    fn reads_balanced_backends() {
        let samples = parse(TEXT);
        let web3 = "198.18.0.23:8080";
        let weight = backend_total(&samples, &EFFECTIVE_WEIGHT, "shop", web3);
        assert_eq!(weight, Some(50.0));
        assert_eq!(
            backend_total(&samples, &EFFECTIVE_WEIGHT, "pay", web3),
            None
        );
    }
}
