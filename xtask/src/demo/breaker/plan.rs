//! What the breaker act needs from its policy (config/demo-breaker.yaml): the first service with
//! backends and a circuit breaker, its IPv4 backends, and the numbers the act's bounds follow
//! from. Fields the policy leaves out take POLICY.md's defaults, as the agent does.

use std::{
    fmt,
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use serde_yaml::Value;

use crate::demo::plan::{self, AgentSide, PlanError, field_error};

/// POLICY.md defaults (agent/src/config/model.rs) for what the policy may leave out.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
const DEFAULT_FAILURE_THRESHOLD: u64 = 5;
const DEFAULT_RESET_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_RESET_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_HALF_OPEN_MAX_FLOWS: u64 = 3;
const DEFAULT_SUCCESS_THRESHOLD: u64 = 2;
const DEFAULT_ON_OPEN: &str = "reject";

pub struct BreakerPlan {
    pub agent: AgentSide,
    pub service: String,
    pub backends: Vec<SocketAddrV4>,
    pub interval: Duration,
    /// Probe interval while a backend is unhealthy (and so while its breaker is half-open).
    pub unhealthy_interval: Duration,
    pub timeout: Duration,
    /// Whether the clients' own connection attempts count as probe results.
    pub passive: bool,
    pub failure_threshold: u64,
    pub reset_timeout: Duration,
    pub max_reset_timeout: Duration,
    /// New flows let through while half-open.
    pub half_open_max_flows: u64,
    pub success_threshold: u64,
    pub on_open: String,
}

impl BreakerPlan {
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let policy = plan::read_policy(path)?;
        let services = policy["services"]
            .as_sequence()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (index, service) = services
            .iter()
            .enumerate()
            .find(|(_, s)| s["backends"].is_sequence() && s["circuit_breaker"].is_mapping())
            .ok_or_else(|| PlanError::NoBreakerService {
                path: path.to_owned(),
            })?;
        let fields = Fields::new(path, index, service);
        let interval = fields.duration("health_check", "interval", DEFAULT_INTERVAL)?;
        let reset_timeout =
            fields.duration("circuit_breaker", "reset_timeout", DEFAULT_RESET_TIMEOUT)?;
        Ok(Self {
            agent: AgentSide::from_policy(path, &policy)?,
            service: fields.string("name")?,
            backends: fields.backends()?,
            interval,
            unhealthy_interval: fields.duration("health_check", "unhealthy_interval", interval)?,
            timeout: fields.duration("health_check", "timeout", DEFAULT_TIMEOUT)?,
            passive: service["health_check"]["passive"].as_bool().unwrap_or(true),
            failure_threshold: fields.count(
                "circuit_breaker",
                "failure_threshold",
                DEFAULT_FAILURE_THRESHOLD,
            )?,
            reset_timeout,
            max_reset_timeout: fields
                .duration(
                    "circuit_breaker",
                    "max_reset_timeout",
                    DEFAULT_MAX_RESET_TIMEOUT,
                )?
                .max(reset_timeout),
            half_open_max_flows: fields.count(
                "circuit_breaker",
                "half_open_max_flows",
                DEFAULT_HALF_OPEN_MAX_FLOWS,
            )?,
            success_threshold: fields.count(
                "circuit_breaker",
                "success_threshold",
                DEFAULT_SUCCESS_THRESHOLD,
            )?,
            on_open: service["circuit_breaker"]["on_open"]
                .as_str()
                .unwrap_or(DEFAULT_ON_OPEN)
                .to_owned(),
        })
    }

    /// From a backend hanging to its breaker open, by active probes alone: the first failing
    /// probe starts at most one interval after the hang, `failure_threshold` of them run an
    /// interval apart, the last fails after `timeout`. Passive detection can be sooner.
    pub fn open_bound(&self) -> Duration {
        self.interval * saturating_u32(self.failure_threshold) + self.timeout
    }

    /// From a restored backend to its breaker closed: what is left of the open period (at most
    /// `max_reset_timeout`), then `success_threshold` probes at the unhealthy interval.
    pub fn close_bound(&self) -> Duration {
        self.max_reset_timeout
            + self.unhealthy_interval * saturating_u32(self.success_threshold)
            + self.timeout
    }
}

impl fmt::Display for BreakerPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backends: Vec<String> = self.backends.iter().map(ToString::to_string).collect();
        if let Some(policy) = &self.agent.policy {
            write!(f, "policy {}: ", policy.display())?;
        }
        write!(
            f,
            "service {} backends {}, probes every {:?} (timeout {:?}), breaker opens \
             after {} failures, on_open {}, reset_timeout {:?}, closes after {} successes, \
             agent on {} at http://{}",
            self.service,
            backends.join(" "),
            self.interval,
            self.timeout,
            self.failure_threshold,
            self.on_open,
            self.reset_timeout,
            self.success_threshold,
            self.agent.interface,
            self.agent.listen
        )
    }
}

fn saturating_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One service of the policy, read field by field with errors that name the field.
pub(in crate::demo) struct Fields<'a> {
    path: &'a Path,
    at: String,
    service: &'a Value,
}

impl<'a> Fields<'a> {
    /// `services[index]` of the policy at `path`.
    pub(in crate::demo) fn new(path: &'a Path, index: usize, service: &'a Value) -> Self {
        Self {
            path,
            at: format!("services[{index}]"),
            service,
        }
    }

    pub(in crate::demo) fn error(&self, field: &str, message: impl Into<String>) -> PlanError {
        field_error(self.path, &format!("{}.{field}", self.at), message.into())
    }

    pub(in crate::demo) fn string(&self, key: &str) -> Result<String, PlanError> {
        self.service[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.error(key, "missing"))
    }

    pub(in crate::demo) fn duration(
        &self,
        section: &str,
        key: &str,
        default: Duration,
    ) -> Result<Duration, PlanError> {
        match &self.service[section][key] {
            Value::Null => Ok(default),
            Value::String(text) => plan::duration(text).ok_or_else(|| {
                self.error(
                    &format!("{section}.{key}"),
                    format!("{text:?}: the demo reads durations like 200ms or 2s"),
                )
            }),
            other => Err(self.error(&format!("{section}.{key}"), format!("{other:?}"))),
        }
    }

    pub(in crate::demo) fn count(
        &self,
        section: &str,
        key: &str,
        default: u64,
    ) -> Result<u64, PlanError> {
        match &self.service[section][key] {
            Value::Null => Ok(default),
            value => value
                .as_u64()
                .ok_or_else(|| self.error(&format!("{section}.{key}"), format!("{value:?}"))),
        }
    }

    /// Every backend address; the demo's network is IPv4.
    pub(in crate::demo) fn backends(&self) -> Result<Vec<SocketAddrV4>, PlanError> {
        let list = self.service["backends"].as_sequence().map(Vec::as_slice);
        let backends = list
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, backend)| {
                let field = format!("backends[{i}].address");
                let text = backend["address"].as_str().unwrap_or_default();
                match text.parse::<SocketAddr>() {
                    Ok(SocketAddr::V4(addr)) => Ok(addr),
                    _ => Err(self.error(&field, format!("{text:?}: the demo needs IPv4:port"))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if backends.is_empty() {
            return Err(self.error("backends", "empty"));
        }
        Ok(backends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
version: 1
interfaces:
  - name: veth-c
services:
  - name: plain
    match: { address: 198.18.0.2/32, port: 5001, protocol: tcp }
  - name: pay
    match: { address: 198.18.0.8/29, port: 8080, protocol: tcp }
    backends:
      - address: 198.18.0.11:8080
      - address: 198.18.0.12:8080
    load_balancing: { vip: false }
    health_check: { interval: 200ms, timeout: 100ms }
    circuit_breaker: { failure_threshold: 3, reset_timeout: 2s, max_reset_timeout: 2s }
"#;

    fn load(name: &str, text: &str) -> Result<BreakerPlan, PlanError> {
        crate::demo::plan::with_policy_file(name, text, BreakerPlan::load)
    }

    #[test]
    fn reads_the_breaker_service_and_its_bounds() {
        let plan = load("breaker-plan", POLICY).expect("plan");
        assert_eq!(plan.service, "pay");
        assert_eq!(plan.agent.interface, "veth-c");
        assert_eq!(plan.backends.len(), 2);
        assert_eq!(plan.unhealthy_interval, Duration::from_millis(200));
        assert_eq!(plan.success_threshold, DEFAULT_SUCCESS_THRESHOLD);
        assert_eq!(plan.open_bound(), Duration::from_millis(700));
        assert_eq!(plan.close_bound(), Duration::from_millis(2500));
    }

    #[test]
    fn names_the_field_it_cannot_use() {
        let text = POLICY.replace("198.18.0.12:8080", "\"[2001:db8::1]:8080\"");
        let error = load("breaker-plan-v6", &text)
            .err()
            .expect("an IPv6 backend is refused")
            .to_string();
        assert!(
            error.ends_with(
                "services[1].backends[1].address: \"[2001:db8::1]:8080\": the demo needs IPv4:port"
            ),
            "{error}"
        );
    }
}
