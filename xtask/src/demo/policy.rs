//! Everything the demo reads from its policies, and the only place that reads them: where each
//! act's agent attaches and answers, the rate-limited UDP service of act 1, the guarded (and
//! balanced) service of acts 2 and 3. Read and validated by the agent's own policy reader
//! (`agent_common::policy`), defaults included: this picks out the handful of values the acts
//! follow, and refuses, naming the field, what the demo's network cannot play.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use agent_common::policy::{
    self, Cidr, ConditionKind, FallbackStrategy, Policy, Protocol, Rate, Service,
};
use anyhow::anyhow;

/// The service act 1 shows, when the policy has it; else the first UDP service with a packet
/// rate.
const RATE_LIMITED_SERVICE: &str = "demo-udp";

/// Where an act's agent attaches and answers.
pub struct AgentSide {
    /// The veth the agent attaches to (`interfaces[0].name`).
    pub interface: String,
    pub listen: SocketAddr,
}

/// Act 1's service: UDP, rate-limited in packets per second.
pub struct RateLimited {
    pub agent: AgentSide,
    pub service: String,
    /// `match.address`.
    pub address: Cidr,
    pub port: u16,
    pub rate_pps: u64,
    pub burst: u64,
}

/// Acts 2 and 3's service: the first with backends and a circuit breaker.
pub struct Guarded {
    pub agent: AgentSide,
    pub service: String,
    pub backends: Vec<SocketAddrV4>,
    pub interval: Duration,
    /// Probe interval while a backend is unhealthy (and so while its breaker is half-open).
    pub unhealthy_interval: Duration,
    pub timeout: Duration,
    /// Whether the clients' own connection attempts count as probe results.
    pub passive: bool,
    /// Probe successes that make an unhealthy backend healthy again.
    pub healthy_threshold: u64,
    pub failure_threshold: u64,
    pub reset_timeout: Duration,
    /// At least `reset_timeout`.
    pub max_reset_timeout: Duration,
    /// New flows let through while half-open.
    pub half_open_max_flows: u64,
    pub success_threshold: u64,
    pub on_open: String,
}

/// Act 3's balancing of the guarded service on a VIP.
pub struct Balanced {
    pub vip: SocketAddrV4,
    /// Configured weight of each backend, in the order of [`Guarded::backends`].
    pub weights: Vec<u32>,
    pub algorithm: String,
    pub slow_start: Duration,
}

/// Act 4's service: the first with a `degradation` that falls back to backends on a latency
/// condition, balanced on a VIP.
pub struct Degradable {
    pub agent: AgentSide,
    pub service: String,
    pub vip: SocketAddrV4,
    pub backends: Vec<SocketAddrV4>,
    /// `degradation.fallback.backends`.
    pub fallback: Vec<SocketAddrV4>,
    /// `static_response` or `cache_only`.
    pub strategy: String,
    /// The latency condition's threshold and window.
    pub threshold: Duration,
    pub window: Duration,
    /// Every condition as written (`latency > 100ms over 1s`), for the introduction.
    pub conditions: Vec<String>,
    pub recover_after: Duration,
    pub interval: Duration,
    pub timeout: Duration,
}

/// A valid policy and the file it came from, for messages.
struct Read {
    file: String,
    policy: Policy,
}

impl Read {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let policy = policy::load_file(path).map_err(|e| anyhow!("{e}"))?;
        Ok(Self {
            file: path.display().to_string(),
            policy,
        })
    }

    fn error(&self, index: usize, field: &str, message: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: services[{index}].{field}: {message}", self.file)
    }

    /// The `agent` and `interfaces` sections (validation guarantees one interface).
    fn agent_side(&self) -> AgentSide {
        AgentSide {
            interface: self.policy.interfaces[0].name.clone(),
            listen: self.policy.agent.listen,
        }
    }

    /// The first service with backends and a circuit breaker.
    fn guarded(&self) -> anyhow::Result<(usize, &Service)> {
        let found = self
            .policy
            .services
            .iter()
            .enumerate()
            .find(|(_, s)| !s.backends.is_empty() && s.circuit_breaker.is_some());
        found.ok_or_else(|| {
            anyhow!(
                "{}: no service with backends and a circuit_breaker",
                self.file
            )
        })
    }
}

/// A packet rate limit's packets per second and burst (resolved by validation: one second of
/// rate unless given); bit and byte rates are not packet rates.
fn packet_limit(service: &Service) -> Option<(u64, u64)> {
    let limit = service.rate_limit.as_ref()?;
    match limit.rate {
        Rate::Packets(n) => Some((n, limit.burst)),
        _ => None,
    }
}

impl RateLimited {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let read = Read::load(path)?;
        let services = &read.policy.services;
        let (index, service) = services
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == RATE_LIMITED_SERVICE)
            .or_else(|| {
                services
                    .iter()
                    .enumerate()
                    .find(|(_, s)| s.r#match.protocol == Protocol::Udp && packet_limit(s).is_some())
            })
            .ok_or_else(|| {
                anyhow!(
                    "{}: no UDP service with a rate_limit in packets per second (looked for \
                     `{RATE_LIMITED_SERVICE}` first)",
                    read.file
                )
            })?;
        let (rate_pps, burst) = packet_limit(service).ok_or_else(|| {
            read.error(
                index,
                "rate_limit.rate",
                "the demo needs a packet rate like 1000/s",
            )
        })?;
        let port = service
            .r#match
            .port
            .ok_or_else(|| read.error(index, "match.port", "the demo needs the service's port"))?;
        Ok(Self {
            agent: read.agent_side(),
            service: service.name.clone(),
            address: service.r#match.address,
            port,
            rate_pps,
            burst,
        })
    }

    /// Whether the service's `match.address` covers `ip`.
    pub fn matches(&self, ip: Ipv4Addr) -> bool {
        self.address.contains(IpAddr::V4(ip))
    }
}

impl Guarded {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let read = Read::load(path)?;
        let (index, service) = read.guarded()?;
        let backends = service
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| match b.address {
                SocketAddr::V4(addr) => Ok(addr),
                SocketAddr::V6(_) => Err(read.error(
                    index,
                    &format!("backends[{i}].address"),
                    format_args!("\"{}\": the demo needs IPv4:port", b.address),
                )),
            })
            .collect::<anyhow::Result<_>>()?;
        let health = service.health_check.clone().unwrap_or_default();
        let cb = service.circuit_breaker.clone().unwrap_or_default();
        Ok(Self {
            agent: read.agent_side(),
            service: service.name.clone(),
            backends,
            interval: health.interval,
            unhealthy_interval: health.unhealthy_interval,
            timeout: health.timeout,
            passive: health.passive,
            healthy_threshold: health.healthy_threshold.into(),
            failure_threshold: cb.failure_threshold.into(),
            reset_timeout: cb.reset_timeout,
            max_reset_timeout: cb.max_reset_timeout.max(cb.reset_timeout),
            half_open_max_flows: cb.half_open_max_flows.into(),
            success_threshold: cb.success_threshold.into(),
            on_open: cb.on_open.to_string(),
        })
    }
}

impl Degradable {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let read = Read::load(path)?;
        let (index, service, degradation) = read
            .policy
            .services
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.degradation.as_ref().map(|d| (i, s, d)))
            .ok_or_else(|| anyhow!("{}: no service with a degradation section", read.file))?;
        let v4 = |list: &[policy::Backend], field: &str| -> anyhow::Result<Vec<SocketAddrV4>> {
            list.iter()
                .enumerate()
                .map(|(i, b)| match b.address {
                    SocketAddr::V4(addr) => Ok(addr),
                    SocketAddr::V6(_) => Err(read.error(
                        index,
                        &format!("{field}[{i}].address"),
                        format_args!("\"{}\": the demo needs IPv4:port", b.address),
                    )),
                })
                .collect()
        };
        let fallback = &degradation.fallback;
        if fallback.strategy == FallbackStrategy::Shed || fallback.backends.is_empty() {
            return Err(read.error(
                index,
                "degradation.fallback.strategy",
                "shed: the act shows a fallback that answers (static_response or cache_only)",
            ));
        }
        let (threshold, window) = degradation
            .conditions
            .iter()
            .find_map(|c| match c.kind {
                ConditionKind::Latency { threshold } => Some((threshold, c.window)),
                _ => None,
            })
            .ok_or_else(|| {
                read.error(
                    index,
                    "degradation.conditions",
                    "the act slows the backends down: it needs a latency condition",
                )
            })?;
        let conditions = degradation
            .conditions
            .iter()
            .map(|c| match c.kind {
                ConditionKind::Latency { threshold } => {
                    format!("latency p99 > {threshold:?} over {:?}", c.window)
                }
                ConditionKind::ErrorRate { threshold } => {
                    format!("error rate > {threshold} over {:?}", c.window)
                }
                ConditionKind::Availability { threshold } => {
                    format!("availability < {threshold} over {:?}", c.window)
                }
            })
            .collect();
        let health = service.health_check.clone().unwrap_or_default();
        let vip = Balanced::vip_of(&read, index, service)?;
        Ok(Self {
            agent: read.agent_side(),
            service: service.name.clone(),
            vip,
            backends: v4(&service.backends, "backends")?,
            fallback: v4(&fallback.backends, "degradation.fallback.backends")?,
            strategy: fallback.strategy.to_string(),
            threshold,
            window,
            conditions,
            recover_after: degradation.recover_after,
            interval: health.interval,
            timeout: health.timeout,
        })
    }
}

impl Balanced {
    /// The guarded service's VIP (`match.address`, one IPv4 address; `match.port`; TCP) and
    /// its backends' weights.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let read = Read::load(path)?;
        let (index, service) = read.guarded()?;
        let lb = service.load_balancing.clone().unwrap_or_default();
        Ok(Self {
            vip: Self::vip_of(&read, index, service)?,
            weights: service
                .backends
                .iter()
                .map(|b| u32::from(b.weight))
                .collect(),
            algorithm: lb.algorithm.to_string(),
            slow_start: lb.slow_start,
        })
    }

    /// A service's VIP: `load_balancing.vip`, one IPv4 address (`match.address`),
    /// `match.port`, TCP.
    fn vip_of(read: &Read, index: usize, service: &Service) -> anyhow::Result<SocketAddrV4> {
        let lb = service.load_balancing.clone().unwrap_or_default();
        if !lb.vip {
            return Err(read.error(index, "load_balancing.vip", "false: the act balances a VIP"));
        }
        let m = &service.r#match;
        let ip = match m.address.addr() {
            IpAddr::V4(ip) if m.address.prefix_len() == 32 => ip,
            _ => {
                return Err(read.error(
                    index,
                    "match.address",
                    format_args!(
                        "\"{}\": the demo needs one IPv4 address as the VIP",
                        m.address
                    ),
                ));
            }
        };
        let port = m
            .port
            .ok_or_else(|| read.error(index, "match.port", "the demo needs the VIP's port"))?;
        if !matches!(m.protocol, Protocol::Tcp | Protocol::Any) {
            return Err(read.error(
                index,
                "match.protocol",
                format_args!("\"{}\": the demo's clients connect over TCP", m.protocol),
            ));
        }
        Ok(SocketAddrV4::new(ip, port))
    }

    /// Each backend's share of new flows when all are at their configured weight.
    pub fn shares(&self) -> Vec<f64> {
        let total: u32 = self.weights.iter().sum();
        let total = f64::from(total.max(1));
        self.weights.iter().map(|&w| f64::from(w) / total).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    const POLICY: &str =
        "version: 1\nagent: { listen: 0.0.0.0:9191 }\ninterfaces: [{ name: veth-c }]
services:
  - { name: other-udp, match: { address: 198.18.0.0/24, port: 6000, protocol: udp },
      rate_limit: { rate: 300/s } }
  - name: shop
    match: { address: 198.18.0.100/32, port: 80, protocol: tcp }
    backends: [{ address: 198.18.0.21:8080 }, { address: 198.18.0.22:8080, weight: 300 }]
    load_balancing: { algorithm: maglev, slow_start: 4s }
    health_check: { interval: 200ms, timeout: 100ms }
    circuit_breaker: { failure_threshold: 3, reset_timeout: 2s, max_reset_timeout: 2s }\n";

    /// `read` given `text` as a policy file of its own (`name`: tests run in parallel).
    fn load<T>(name: &str, text: &str, read: impl FnOnce(&Path) -> anyhow::Result<T>) -> String {
        let path = std::env::temp_dir().join(format!("xtask-{name}-{}.yaml", std::process::id()));
        fs::write(&path, text).expect("write policy");
        let out = read(&path)
            .err()
            .map_or_else(String::new, |e| e.to_string());
        let _ = fs::remove_file(&path);
        out
    }

    #[test]
    fn reads_what_the_acts_need() {
        let error = load("policy", POLICY, |path| {
            let rl = RateLimited::load(path)?;
            assert_eq!(
                (rl.service.as_str(), rl.port, rl.rate_pps, rl.burst),
                ("other-udp", 6000, 300, 300)
            );
            assert_eq!(rl.agent.listen, "0.0.0.0:9191".parse()?);
            assert!(
                rl.matches(Ipv4Addr::new(198, 18, 0, 2))
                    && !rl.matches(Ipv4Addr::new(198, 18, 1, 2))
            );
            let g = Guarded::load(path)?;
            assert_eq!(
                (g.service.as_str(), g.agent.interface.as_str()),
                ("shop", "veth-c")
            );
            assert_eq!(
                (g.unhealthy_interval, g.max_reset_timeout),
                // The agent's default (1s), not `interval` as the demo's own reader assumed.
                (Duration::from_secs(1), Duration::from_secs(2))
            );
            assert_eq!(g.success_threshold, 2, "POLICY.md's default");
            let lb = Balanced::load(path)?;
            assert_eq!(
                (lb.vip, lb.slow_start),
                ("198.18.0.100:80".parse()?, Duration::from_secs(4))
            );
            assert_eq!(
                (lb.weights.as_slice(), lb.shares()),
                (&[100, 300][..], vec![0.25, 0.75])
            );
            Ok(())
        });
        assert_eq!(error, "");
    }

    #[test]
    fn names_the_field_it_cannot_use() {
        // Without a VIP: the agent itself refuses IPv6 backends behind an IPv4 VIP.
        let v6 = POLICY
            .replace("198.18.0.22:8080", "\"[2001:db8::1]:8080\"")
            .replace("algorithm: maglev,", "vip: false, algorithm: maglev,");
        let e = load("v6", &v6, Guarded::load);
        assert!(
            e.ends_with(
                "services[1].backends[1].address: \"[2001:db8::1]:8080\": the demo needs IPv4:port"
            ),
            "{e}"
        );
        let prefix = POLICY.replace("198.18.0.100/32", "198.18.0.96/28");
        let e = load("prefix", &prefix, Balanced::load);
        assert!(e.ends_with("services[1].match.address: \"198.18.0.96/28\": the demo needs one IPv4 address as the VIP"), "{e}");
        let no_vip = POLICY.replace("algorithm: maglev,", "vip: false, algorithm: maglev,");
        let e = load("no-vip", &no_vip, Balanced::load);
        assert!(e.contains("services[1].load_balancing.vip: false"), "{e}");
    }

    #[test]
    fn reads_act_four_s_policy() {
        let path = crate::workspace::root().join("config/demo-degrade.yaml");
        let d = Degradable::load(&path).expect("config/demo-degrade.yaml");
        assert!(d.threshold < d.timeout && !d.fallback.is_empty());
    }

    #[test]
    fn reads_the_degradable_service() {
        let policy = format!(
            "{POLICY}    degradation:
      conditions:
        - {{ type: error_rate, threshold: 50%, window: 2s }}
        - {{ type: latency, threshold: 80ms, window: 1s }}
      fallback: {{ strategy: static_response, backends: [{{ address: 198.18.0.39:8080 }}] }}
      recover_after: 3s\n"
        );
        let error = load("degrade", &policy, |path| {
            let d = Degradable::load(path)?;
            assert_eq!(
                (d.service.as_str(), d.vip, d.fallback.as_slice()),
                (
                    "shop",
                    "198.18.0.100:80".parse()?,
                    &["198.18.0.39:8080".parse()?][..]
                )
            );
            assert_eq!(
                (d.threshold, d.window, d.recover_after),
                (
                    Duration::from_millis(80),
                    Duration::from_secs(1),
                    Duration::from_secs(3)
                )
            );
            assert_eq!(d.conditions.len(), 2);
            Ok(())
        });
        assert_eq!(error, "");
        let e = load(
            "no-latency",
            &policy.replace(
                "type: latency, threshold: 80ms",
                "type: availability, threshold: 80%",
            ),
            Degradable::load,
        );
        assert!(e.ends_with("services[1].degradation.conditions: the act slows the backends down: it needs a latency condition"), "{e}");
    }
}
