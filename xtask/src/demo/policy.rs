//! Everything the demo reads from its policies, and the only place that reads them: where each
//! act's agent attaches and answers, the rate-limited UDP service of act 1, the guarded (and
//! balanced) service of acts 2 and 3. The agent validates the files; this reads the handful of
//! values the acts follow, with POLICY.md's defaults for what a file leaves out.
//!
//! TODO(merge): read through `agent_common::config::load_file` (the policy model, feature
//! `policy`) instead of `serde_yaml::Value`: the bodies below shrink to field accesses, and the
//! defaults, duration parser and CIDR check here go.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use serde_yaml::Value;

/// POLICY.md's defaults, for fields the demo reads and a policy may leave out.
mod default {
    use std::time::Duration;

    pub const LISTEN: &str = "127.0.0.1:9090";
    pub const INTERVAL: Duration = Duration::from_secs(1);
    pub const TIMEOUT: Duration = Duration::from_millis(500);
    pub const HEALTHY_THRESHOLD: u64 = 2;
    pub const FAILURE_THRESHOLD: u64 = 5;
    pub const RESET_TIMEOUT: Duration = Duration::from_secs(30);
    pub const MAX_RESET_TIMEOUT: Duration = Duration::from_secs(300);
    pub const HALF_OPEN_MAX_FLOWS: u64 = 3;
    pub const SUCCESS_THRESHOLD: u64 = 2;
    pub const ON_OPEN: &str = "reject";
    pub const WEIGHT: u64 = 100;
    pub const ALGORITHM: &str = "maglev";
}

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
    /// `match.address` as written (`198.18.0.2/32`), if any.
    pub address: Option<String>,
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

impl RateLimited {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let policy = Policy::read(path)?;
        let pps = |s: &Value| {
            s["rate_limit"]["rate"]
                .as_str()
                .and_then(packets_per_second)
        };
        let (index, service) = policy
            .find(|s| s["name"].as_str() == Some(RATE_LIMITED_SERVICE))
            .or_else(|| {
                policy.find(|s| s["match"]["protocol"].as_str() == Some("udp") && pps(s).is_some())
            })
            .ok_or_else(|| {
                anyhow!(
                    "{}: no UDP service with a rate_limit in packets per second (looked for \
                     `{RATE_LIMITED_SERVICE}` first)",
                    path.display()
                )
            })?;
        let s = policy.service(index, service);
        let rate_pps = pps(service).ok_or_else(|| {
            s.error(
                "rate_limit.rate",
                "the demo needs a packet rate like 1000/s".into(),
            )
        })?;
        let port = service["match"]["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| s.error("match.port", "the demo needs the service's port".into()))?;
        Ok(Self {
            agent: policy.agent_side()?,
            service: s.string("name")?,
            address: service["match"]["address"].as_str().map(str::to_owned),
            port,
            rate_pps,
            // POLICY.md: the default burst is one second of rate.
            burst: s.count("rate_limit", "burst", rate_pps)?,
        })
    }

    /// Whether the service's `match.address` (if any) covers `ip`.
    pub fn matches(&self, ip: Ipv4Addr) -> bool {
        self.address
            .as_deref()
            .is_none_or(|cidr| contains(cidr, ip))
    }
}

impl Guarded {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let policy = Policy::read(path)?;
        let (index, service) = policy.guarded()?;
        let s = policy.service(index, service);
        let interval = s.duration("health_check", "interval", default::INTERVAL)?;
        let reset_timeout =
            s.duration("circuit_breaker", "reset_timeout", default::RESET_TIMEOUT)?;
        let cb_count = |key, default| s.count("circuit_breaker", key, default);
        Ok(Self {
            agent: policy.agent_side()?,
            service: s.string("name")?,
            backends: s.backends()?,
            interval,
            unhealthy_interval: s.duration("health_check", "unhealthy_interval", interval)?,
            timeout: s.duration("health_check", "timeout", default::TIMEOUT)?,
            passive: service["health_check"]["passive"].as_bool().unwrap_or(true),
            healthy_threshold: s.count(
                "health_check",
                "healthy_threshold",
                default::HEALTHY_THRESHOLD,
            )?,
            failure_threshold: cb_count("failure_threshold", default::FAILURE_THRESHOLD)?,
            reset_timeout,
            max_reset_timeout: s
                .duration(
                    "circuit_breaker",
                    "max_reset_timeout",
                    default::MAX_RESET_TIMEOUT,
                )?
                .max(reset_timeout),
            half_open_max_flows: cb_count("half_open_max_flows", default::HALF_OPEN_MAX_FLOWS)?,
            success_threshold: cb_count("success_threshold", default::SUCCESS_THRESHOLD)?,
            on_open: service["circuit_breaker"]["on_open"]
                .as_str()
                .unwrap_or(default::ON_OPEN)
                .to_owned(),
        })
    }
}

impl Balanced {
    /// The guarded service's VIP (`match.address`, one IPv4 address; `match.port`; TCP) and
    /// its backends' weights.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let policy = Policy::read(path)?;
        let (index, service) = policy.guarded()?;
        let s = policy.service(index, service);
        let lb = &service["load_balancing"];
        if lb["vip"].as_bool() == Some(false) {
            return Err(s.error(
                "load_balancing.vip",
                "false: the act balances a VIP (the first service with backends and a \
                 circuit_breaker)"
                    .into(),
            ));
        }
        let address = service["match"]["address"].as_str().unwrap_or_default();
        let ip = match address.split_once('/').unwrap_or((address, "32")) {
            (ip, "32") => ip.parse().ok(),
            _ => None,
        };
        let ip = ip.ok_or_else(|| {
            s.error(
                "match.address",
                format!("{address:?}: the demo needs one IPv4 address as the VIP"),
            )
        })?;
        let port = service["match"]["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p > 0)
            .ok_or_else(|| s.error("match.port", "the demo needs the VIP's port".into()))?;
        if let Some(other) = service["match"]["protocol"]
            .as_str()
            .filter(|p| !["tcp", "any"].contains(p))
        {
            return Err(s.error(
                "match.protocol",
                format!("{other:?}: the demo's clients connect over TCP"),
            ));
        }
        let weights = s.list("backends", |i, backend| {
            let weight = backend["weight"]
                .as_u64()
                .or(backend["weight"].is_null().then_some(default::WEIGHT));
            let weight = weight.and_then(|w| u32::try_from(w).ok());
            weight.ok_or_else(|| s.error(&format!("backends[{i}].weight"), "not a weight".into()))
        })?;
        Ok(Self {
            vip: SocketAddrV4::new(ip, port),
            weights,
            algorithm: lb["algorithm"]
                .as_str()
                .unwrap_or(default::ALGORITHM)
                .to_owned(),
            slow_start: s.duration("load_balancing", "slow_start", Duration::ZERO)?,
        })
    }

    /// Each backend's share of new flows when all are at their configured weight.
    pub fn shares(&self) -> Vec<f64> {
        let total: u32 = self.weights.iter().sum();
        let total = f64::from(total.max(1));
        self.weights.iter().map(|&w| f64::from(w) / total).collect()
    }
}

/// A policy file as plain YAML.
struct Policy {
    path: PathBuf,
    yaml: Value,
}

impl Policy {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let yaml =
            serde_yaml::from_str(&text).with_context(|| format!("{}: not YAML", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            yaml,
        })
    }

    fn services(&self) -> &[Value] {
        self.yaml["services"]
            .as_sequence()
            .map_or(&[], Vec::as_slice)
    }

    /// The first service that satisfies `pick`, and its index.
    fn find(&self, pick: impl Fn(&Value) -> bool) -> Option<(usize, &Value)> {
        self.services().iter().enumerate().find(|(_, s)| pick(s))
    }

    fn guarded(&self) -> anyhow::Result<(usize, &Value)> {
        self.find(|s| s["backends"].is_sequence() && s["circuit_breaker"].is_mapping())
            .ok_or_else(|| {
                anyhow!(
                    "{}: no service with backends and a circuit_breaker",
                    self.path.display()
                )
            })
    }

    fn service<'a>(&'a self, index: usize, yaml: &'a Value) -> Service<'a> {
        Service {
            path: &self.path,
            at: format!("services[{index}]"),
            yaml,
        }
    }

    /// The `agent` and `interfaces` sections.
    fn agent_side(&self) -> anyhow::Result<AgentSide> {
        let agent = &self.yaml["agent"];
        let listen = agent["listen"].as_str().unwrap_or(default::LISTEN);
        let Some(interface) = self.yaml["interfaces"][0]["name"].as_str() else {
            bail!("{}: interfaces[0].name: missing", self.path.display());
        };
        Ok(AgentSide {
            interface: interface.to_owned(),
            listen: listen
                .parse()
                .with_context(|| format!("{}: agent.listen: {listen:?}", self.path.display()))?,
        })
    }
}

/// One service of a policy, read field by field with errors that name the field.
struct Service<'a> {
    path: &'a Path,
    at: String,
    yaml: &'a Value,
}

impl Service<'_> {
    fn error(&self, field: &str, message: String) -> anyhow::Error {
        anyhow!("{}: {}.{field}: {message}", self.path.display(), self.at)
    }

    fn string(&self, key: &str) -> anyhow::Result<String> {
        let value = self.yaml[key].as_str().map(str::to_owned);
        value.ok_or_else(|| self.error(key, "missing".into()))
    }

    fn duration(&self, section: &str, key: &str, default: Duration) -> anyhow::Result<Duration> {
        match &self.yaml[section][key] {
            Value::Null => Ok(default),
            Value::String(text) => duration(text).ok_or_else(|| {
                self.error(
                    &format!("{section}.{key}"),
                    format!("{text:?}: the demo reads durations like 200ms or 2s"),
                )
            }),
            other => Err(self.error(&format!("{section}.{key}"), format!("{other:?}"))),
        }
    }

    fn count(&self, section: &str, key: &str, default: u64) -> anyhow::Result<u64> {
        match &self.yaml[section][key] {
            Value::Null => Ok(default),
            value => value
                .as_u64()
                .ok_or_else(|| self.error(&format!("{section}.{key}"), format!("{value:?}"))),
        }
    }

    /// Every item of the list `key`, read by `item` (given its index).
    fn list<T>(
        &self,
        key: &str,
        item: impl Fn(usize, &Value) -> anyhow::Result<T>,
    ) -> anyhow::Result<Vec<T>> {
        let list = self.yaml[key].as_sequence().map_or(&[][..], Vec::as_slice);
        list.iter().enumerate().map(|(i, v)| item(i, v)).collect()
    }

    /// Every backend address; the demo's network is IPv4.
    fn backends(&self) -> anyhow::Result<Vec<SocketAddrV4>> {
        let backends = self.list("backends", |i, backend| {
            let text = backend["address"].as_str().unwrap_or_default();
            match text.parse::<SocketAddr>() {
                Ok(SocketAddr::V4(addr)) => Ok(addr),
                _ => Err(self.error(
                    &format!("backends[{i}].address"),
                    format!("{text:?}: the demo needs IPv4:port"),
                )),
            }
        })?;
        if backends.is_empty() {
            return Err(self.error("backends", "empty".into()));
        }
        Ok(backends)
    }
}

/// `1000/s` -> 1000; bit and byte rates are not packet rates.
fn packets_per_second(rate: &str) -> Option<u64> {
    let n = rate.strip_suffix("/s")?.trim().parse().ok();
    n.filter(|&n| n > 0)
}

/// `200ms`, `2s`, `1.5s`, `1m`: the single-unit durations the demo policies use.
fn duration(text: &str) -> Option<Duration> {
    let (number, seconds_per_unit) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        (text.strip_suffix('m')?, 60.0)
    };
    let n: f64 = number.trim().parse().ok()?;
    Duration::try_from_secs_f64(n * seconds_per_unit).ok()
}

/// Whether `cidr` (`198.18.0.2/32`, `198.18.0.0/24`, or a bare address) contains `ip`.
fn contains(cidr: &str, ip: Ipv4Addr) -> bool {
    let (net, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let (Ok(net), Ok(len)) = (net.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    let mask = u32::MAX.checked_shl(32u32.saturating_sub(len)).unwrap_or(0);
    len <= 32 && u32::from(net) & mask == u32::from(ip) & mask
}

#[cfg(test)]
mod tests {
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
                (Duration::from_millis(200), Duration::from_secs(2))
            );
            assert_eq!(g.success_threshold, default::SUCCESS_THRESHOLD);
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
        let v6 = POLICY.replace("198.18.0.22:8080", "\"[2001:db8::1]:8080\"");
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
    fn rates_durations_and_networks() {
        assert_eq!(
            (
                packets_per_second("1000/s"),
                packets_per_second("100Mbit/s")
            ),
            (Some(1000), None)
        );
        assert_eq!(
            (duration("200ms"), duration("1.5s")),
            (
                Some(Duration::from_millis(200)),
                Some(Duration::from_millis(1500))
            )
        );
        assert_eq!(
            (duration("1m"), duration("1m30s")),
            (Some(Duration::from_secs(60)), None)
        );
        assert!(contains("0.0.0.0/0", Ipv4Addr::new(198, 18, 0, 2)));
        assert!(!contains("198.18.0.3", Ipv4Addr::new(198, 18, 0, 2)));
    }
}
