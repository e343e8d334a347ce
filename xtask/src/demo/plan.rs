//! What the demo needs to know from its policies: for every act, the interface to create, where
//! the agent listens and pins ([`AgentSide`]); for the rate-limit act (config/demo.yaml), the UDP
//! service whose rate limit it shows ([`Plan`]). Read from the files, so the demo follows the
//! policy; built-in values stand in while config/demo.yaml does not exist yet.

use std::{
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_yaml::Value;

/// The demo service and defaults, as the demo policy is specified; used when fields are absent.
pub const DEFAULT_INTERFACE: &str = "veth-agent";
const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/agent";
const DEFAULT_SERVICE: &str = "demo-udp";
const DEFAULT_PORT: u16 = 5000;
const DEFAULT_RATE_PPS: u64 = 1000;
const DEFAULT_BURST: u64 = 200;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("read {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: not YAML: {source}", .path.display())]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{}: no UDP service with a rate_limit in packets per second (looked for `{DEFAULT_SERVICE}` first)", .path.display())]
    NoUdpService { path: PathBuf },
    #[error("{}: no service with backends and a circuit_breaker", .path.display())]
    NoBreakerService { path: PathBuf },
    #[error("{}: {field}: {message}", .path.display())]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// Where one act's agent attaches, answers and pins, as its policy says.
pub struct AgentSide {
    /// The policy file; `None` when it does not exist (the agent cannot start then).
    pub policy: Option<PathBuf>,
    /// The veth the agent attaches to (`interfaces[0]`).
    pub interface: String,
    /// Where to reach the agent's HTTP endpoint from inside its namespace.
    pub listen: SocketAddr,
    pub pin_path: PathBuf,
}

impl AgentSide {
    fn builtin() -> Self {
        Self {
            policy: None,
            interface: DEFAULT_INTERFACE.into(),
            listen: DEFAULT_LISTEN,
            pin_path: DEFAULT_PIN_PATH.into(),
        }
    }

    /// The `agent` and `interfaces` sections; defaults for what is absent.
    pub fn from_policy(path: &Path, policy: &Value) -> Result<Self, PlanError> {
        let mut side = Self::builtin();
        side.policy = Some(path.to_owned());
        if let Some(name) = policy["interfaces"][0]["name"].as_str() {
            side.interface = name.to_owned();
        }
        if let Some(listen) = policy["agent"]["listen"].as_str() {
            let addr: SocketAddr = listen
                .parse()
                .map_err(|e| field_error(path, "agent.listen", format!("{listen:?}: {e}")))?;
            side.listen = reachable(addr);
        }
        if let Some(pin_path) = policy["agent"]["pin_path"].as_str() {
            side.pin_path = pin_path.into();
        }
        Ok(side)
    }
}

/// Reads and parses a policy file as plain YAML (the agent validates it; the demo only reads).
pub fn read_policy(path: &Path) -> Result<Value, PlanError> {
    let text = fs::read_to_string(path).map_err(|source| PlanError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_yaml::from_str(&text).map_err(|source| PlanError::Yaml {
        path: path.to_owned(),
        source,
    })
}

pub fn field_error(path: &Path, field: &str, message: String) -> PlanError {
    PlanError::Field {
        path: path.to_owned(),
        field: field.to_owned(),
        message,
    }
}

pub struct Plan {
    pub agent: AgentSide,
    pub service: String,
    /// Network the service matches, as written (`198.18.0.2/32`), if any.
    pub service_address: Option<String>,
    pub port: u16,
    pub rate_pps: u64,
    pub burst: u64,
}

impl Plan {
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        if !path.exists() {
            return Ok(Self::builtin());
        }
        from_policy(path, &read_policy(path)?)
    }

    fn builtin() -> Self {
        Self {
            agent: AgentSide::builtin(),
            service: DEFAULT_SERVICE.into(),
            service_address: None,
            port: DEFAULT_PORT,
            rate_pps: DEFAULT_RATE_PPS,
            burst: DEFAULT_BURST,
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.agent.policy {
            Some(path) => write!(f, "policy {}", path.display())?,
            None => write!(f, "no policy file (built-in demo values)")?,
        }
        write!(
            f,
            ": service {} udp port {}, limit {}/s burst {}, agent on {} at http://{}",
            self.service,
            self.port,
            self.rate_pps,
            self.burst,
            self.agent.interface,
            self.agent.listen
        )
    }
}

fn from_policy(path: &Path, policy: &Value) -> Result<Plan, PlanError> {
    let field_error = |field: &str, message: String| field_error(path, field, message);
    let mut plan = Plan::builtin();
    plan.agent = AgentSide::from_policy(path, policy)?;

    let services = policy["services"]
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let is_udp = |s: &&Value| s["match"]["protocol"].as_str() == Some("udp");
    let has_pps = |s: &&Value| {
        s["rate_limit"]["rate"]
            .as_str()
            .is_some_and(|r| packets_per_second(r).is_some())
    };
    let service = services
        .iter()
        .find(|s| s["name"].as_str() == Some(DEFAULT_SERVICE))
        .or_else(|| services.iter().filter(is_udp).find(has_pps))
        .ok_or_else(|| PlanError::NoUdpService {
            path: path.to_owned(),
        })?;
    let index = services
        .iter()
        .position(|s| std::ptr::eq(s, service))
        .unwrap_or_default();
    let at = |field: &str| format!("services[{index}].{field}");

    plan.service = service["name"]
        .as_str()
        .ok_or_else(|| field_error(&at("name"), "missing".into()))?
        .to_owned();
    plan.service_address = service["match"]["address"].as_str().map(str::to_owned);
    if let Some(port) = service["match"]["port"].as_u64() {
        plan.port = u16::try_from(port)
            .map_err(|_| field_error(&at("match.port"), format!("{port} is not a port")))?;
    }
    let rate = service["rate_limit"]["rate"]
        .as_str()
        .ok_or_else(|| field_error(&at("rate_limit.rate"), "missing".into()))?;
    plan.rate_pps = packets_per_second(rate).ok_or_else(|| {
        field_error(
            &at("rate_limit.rate"),
            format!("{rate:?}: the demo needs a packet rate like 1000/s"),
        )
    })?;
    plan.burst = service["rate_limit"]["burst"]
        .as_u64()
        .unwrap_or(plan.rate_pps); // POLICY.md: default burst is one second of rate
    Ok(plan)
}

/// `1000/s` -> 1000; bit and byte rates are not packet rates.
fn packets_per_second(rate: &str) -> Option<u64> {
    rate.strip_suffix("/s")?
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// `200ms`, `2s`, `1.5s`, `1m`: the single-unit durations the demo policies use.
pub fn duration(text: &str) -> Option<Duration> {
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

/// An address to connect to: a wildcard listen address is reachable on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Whether `cidr` (`198.18.0.2/32`, `198.18.0.0/24`, or a bare address) contains `ip`.
pub fn contains(cidr: &str, ip: Ipv4Addr) -> bool {
    let (net, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let (Ok(net), Ok(len)) = (net.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    if len > 32 {
        return false;
    }
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(net) & mask == u32::from(ip) & mask
}

/// Test helper for the acts' plan readers: `read` given `text` as a policy file of its own
/// (`name`: tests run in parallel).
#[cfg(test)]
pub fn with_policy_file<T>(name: &str, text: &str, read: impl FnOnce(&Path) -> T) -> T {
    let dir = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("policy.yaml");
    std::fs::write(&path, text).expect("write policy");
    let out = read(&path);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
version: 1
agent:
  listen: 0.0.0.0:9191
interfaces:
  - name: veth-x
services:
  - name: demo-tcp
    match: { address: 198.18.0.2/32, port: 5001, protocol: tcp }
  - name: other-udp
    match: { address: 198.18.0.0/24, port: 6000, protocol: udp }
    rate_limit: { key: source_ip, rate: 300/s }
"#;

    #[test]
    fn falls_back_to_the_first_udp_packet_rate_service() {
        let policy: Value = serde_yaml::from_str(POLICY).expect("test policy parses");
        let plan = from_policy(Path::new("p.yaml"), &policy).expect("plan");
        assert_eq!(plan.service, "other-udp");
        assert_eq!(plan.port, 6000);
        assert_eq!(plan.rate_pps, 300);
        assert_eq!(plan.burst, 300);
        assert_eq!(plan.agent.interface, "veth-x");
        assert_eq!(plan.agent.listen, "127.0.0.1:9191".parse().expect("addr"));
    }

    #[test]
    fn rates_and_networks() {
        assert_eq!(packets_per_second("1000/s"), Some(1000));
        assert_eq!(packets_per_second("100Mbit/s"), None);
        assert!(contains("198.18.0.2/32", Ipv4Addr::new(198, 18, 0, 2)));
        assert!(contains("198.18.0.0/24", Ipv4Addr::new(198, 18, 0, 2)));
        assert!(contains("0.0.0.0/0", Ipv4Addr::new(198, 18, 0, 2)));
        assert!(!contains("198.18.0.3", Ipv4Addr::new(198, 18, 0, 2)));
    }

    #[test]
    fn durations() {
        assert_eq!(duration("200ms"), Some(Duration::from_millis(200)));
        assert_eq!(duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(duration("1m30s"), None);
        assert_eq!(duration("fast"), None);
    }
}
