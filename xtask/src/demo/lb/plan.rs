//! What the balancing act needs from its policy (config/demo-lb.yaml): the first service with
//! backends and a circuit breaker, balanced on a VIP; its IPv4 VIP and backends with their
//! weights, and the numbers the act's deadlines follow from. Fields the policy leaves out take
//! POLICY.md's defaults, as the agent does.

use std::{fmt, net::SocketAddrV4, path::Path, time::Duration};

use serde_yaml::Value;

use crate::demo::{
    breaker::plan::{BreakerPlan, Fields},
    plan::{self, PlanError},
};

/// POLICY.md defaults (agent/src/config/model.rs) for what the policy may leave out.
const DEFAULT_WEIGHT: u32 = 100;
const DEFAULT_ALGORITHM: &str = "maglev";
const DEFAULT_HEALTHY_THRESHOLD: u64 = 2;

pub struct LbPlan {
    /// The service's agent side, backends, probes and breaker (the breaker act reads the same).
    pub breaker: BreakerPlan,
    pub vip: SocketAddrV4,
    /// Configured weight of each backend, in the order of `breaker.backends`.
    pub weights: Vec<u32>,
    pub algorithm: String,
    pub slow_start: Duration,
    /// Probe successes that make an unhealthy backend healthy again.
    pub healthy_threshold: u64,
}

impl LbPlan {
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let breaker = BreakerPlan::load(path)?;
        let policy = plan::read_policy(path)?;
        let services = policy["services"]
            .as_sequence()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (index, service) = services
            .iter()
            .enumerate()
            .find(|(_, s)| s["name"].as_str() == Some(breaker.service.as_str()))
            .ok_or_else(|| PlanError::NoBreakerService {
                path: path.to_owned(),
            })?;
        let fields = Fields::new(path, index, service);
        if service["load_balancing"]["vip"].as_bool() == Some(false) {
            return Err(fields.error(
                "load_balancing.vip",
                "false: the act balances a VIP (the first service with backends and a \
                 circuit_breaker)",
            ));
        }
        Ok(Self {
            vip: vip(&fields, service)?,
            weights: weights(&fields, service)?,
            algorithm: service["load_balancing"]["algorithm"]
                .as_str()
                .unwrap_or(DEFAULT_ALGORITHM)
                .to_owned(),
            slow_start: fields.duration("load_balancing", "slow_start", Duration::ZERO)?,
            healthy_threshold: fields.count(
                "health_check",
                "healthy_threshold",
                DEFAULT_HEALTHY_THRESHOLD,
            )?,
            breaker,
        })
    }

    pub fn service(&self) -> &str {
        &self.breaker.service
    }

    pub fn backends(&self) -> &[SocketAddrV4] {
        &self.breaker.backends
    }

    /// Each backend's share of new flows when all are at their configured weight.
    pub fn shares(&self) -> Vec<f64> {
        let total: u32 = self.weights.iter().sum();
        self.weights
            .iter()
            .map(|&w| f64::from(w) / f64::from(total.max(1)))
            .collect()
    }
}

/// `match.address` (one IPv4 address, bare or /32) and `match.port`; TCP.
fn vip(fields: &Fields<'_>, service: &Value) -> Result<SocketAddrV4, PlanError> {
    let text = service["match"]["address"].as_str().unwrap_or_default();
    let (address, len) = text.split_once('/').unwrap_or((text, "32"));
    let ip = match (address.parse(), len) {
        (Ok(ip), "32") => ip,
        _ => {
            return Err(fields.error(
                "match.address",
                format!("{text:?}: the demo needs one IPv4 address as the VIP"),
            ));
        }
    };
    let port = service["match"]["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p > 0)
        .ok_or_else(|| fields.error("match.port", "the demo needs the VIP's port"))?;
    match service["match"]["protocol"].as_str() {
        None | Some("tcp" | "any") => Ok(SocketAddrV4::new(ip, port)),
        Some(other) => Err(fields.error(
            "match.protocol",
            format!("{other:?}: the demo's clients connect over TCP"),
        )),
    }
}

fn weights(fields: &Fields<'_>, service: &Value) -> Result<Vec<u32>, PlanError> {
    let list = service["backends"].as_sequence().map(Vec::as_slice);
    list.unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, backend)| match &backend["weight"] {
            Value::Null => Ok(DEFAULT_WEIGHT),
            value => value
                .as_u64()
                .and_then(|w| u32::try_from(w).ok())
                .ok_or_else(|| {
                    fields.error(&format!("backends[{i}].weight"), format!("{value:?}"))
                }),
        })
        .collect()
}

impl fmt::Display for LbPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(policy) = &self.breaker.agent.policy {
            write!(f, "policy {}: ", policy.display())?;
        }
        let backends: Vec<String> = self
            .backends()
            .iter()
            .zip(&self.weights)
            .map(|(b, w)| format!("{b} (weight {w})"))
            .collect();
        write!(
            f,
            "service {} VIP {} -> {}, {}, slow_start {:?}; probes every {:?} (timeout {:?}), \
             breaker opens after {} failures, reset_timeout {:?}; agent on {} at http://{}",
            self.service(),
            self.vip,
            backends.join(" "),
            self.algorithm,
            self.slow_start,
            self.breaker.interval,
            self.breaker.timeout,
            self.breaker.failure_threshold,
            self.breaker.reset_timeout,
            self.breaker.agent.interface,
            self.breaker.agent.listen
        )
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
  - name: shop
    match: { address: 198.18.0.100/32, port: 80, protocol: tcp }
    backends:
      - address: 198.18.0.21:8080
      - address: 198.18.0.22:8080
        weight: 300
    load_balancing: { algorithm: maglev, table_size: 1009, slow_start: 4s }
    health_check: { interval: 200ms, timeout: 100ms }
    circuit_breaker: { failure_threshold: 3, reset_timeout: 3s }
"#;

    fn load(name: &str, text: &str) -> Result<LbPlan, PlanError> {
        crate::demo::plan::with_policy_file(name, text, LbPlan::load)
    }

    #[test]
    fn reads_the_vip_weights_and_ramp() {
        let plan = load("lb-plan", POLICY).expect("plan");
        assert_eq!(plan.service(), "shop");
        assert_eq!(plan.vip, "198.18.0.100:80".parse().expect("addr"));
        assert_eq!(plan.weights, [100, 300]);
        assert_eq!(plan.shares(), [0.25, 0.75]);
        assert_eq!(plan.algorithm, "maglev");
        assert_eq!(plan.slow_start, Duration::from_secs(4));
        assert_eq!(plan.healthy_threshold, DEFAULT_HEALTHY_THRESHOLD);
        assert_eq!(plan.breaker.reset_timeout, Duration::from_secs(3));
    }

    #[test]
    fn names_the_field_it_cannot_use() {
        let error = |text: &str| {
            load("lb-plan-bad", text)
                .err()
                .expect("refused")
                .to_string()
        };
        let prefix = POLICY.replace("198.18.0.100/32", "198.18.0.96/28");
        assert!(
            error(&prefix).ends_with(
                "services[0].match.address: \"198.18.0.96/28\": the demo needs one IPv4 \
                 address as the VIP"
            ),
            "{}",
            error(&prefix)
        );
        let no_vip = POLICY.replace("algorithm: maglev,", "vip: false, algorithm: maglev,");
        assert!(
            error(&no_vip).contains("services[0].load_balancing.vip: false"),
            "{}",
            error(&no_vip)
        );
    }
}
