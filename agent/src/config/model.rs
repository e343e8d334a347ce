//! The typed policy: POLICY.md as Rust types, every default as POLICY.md shows it.
//!
//! Field names are the YAML names (hence `r#match`, `r#type`), so the path in an error message
//! is also the chain of fields in code. Everything here has been validated: a `Rate` is never
//! 0, a `Cidr` has no host bits, a timeout is shorter than its interval, and so on.
//! Optional sections are `Option`s and say what their absence means; each section also
//! implements `Default` with POLICY.md's values, for code that wants "the section or its
//! defaults" (`svc.load_balancing.clone().unwrap_or_default()`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use super::net::Cidr;
pub use super::units::{Percent, Rate};
use super::yaml::SpanIndex;

/// A word-valued setting: the YAML words and their variants in one place.
pub trait Keyword: Copy + 'static {
    /// Every variant, in the order messages list them.
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
}

macro_rules! keywords {
    ($(#[$meta:meta])* $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }
        impl Keyword for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keywords! {
    LogLevel { Error = "error", Warn = "warn", #[default] Info = "info", Debug = "debug", Trace = "trace" }
}
keywords! {
    /// How XDP is attached: `auto` tries native (driver) mode and falls back to generic.
    XdpMode { #[default] Auto = "auto", Native = "native", Generic = "generic" }
}
keywords! {
    /// Which hooks an interface gets: XDP for ingress, TC for egress.
    Direction { Ingress = "ingress", Egress = "egress", #[default] Both = "both" }
}
keywords! {
    Protocol {
        #[default] Tcp = "tcp",
        Udp = "udp",
        /// Any IP protocol without a port; with a port, TCP and UDP.
        Any = "any",
    }
}
keywords! {
    /// Shedding order under degradation: `low` first, `core` last.
    Priority { #[default] Core = "core", Normal = "normal", Low = "low" }
}
keywords! {
    /// What a token bucket (or a pacing queue) is kept per.
    KeyBy {
        /// The 5-tuple.
        Flow = "flow",
        #[default] SourceIp = "source_ip",
        /// One aggregate for the whole service.
        Service = "service",
    }
}
keywords! {
    Algorithm { #[default] Maglev = "maglev", WeightedRoundRobin = "weighted_round_robin", LeastConn = "least_conn" }
}
keywords! {
    CheckType { #[default] Tcp = "tcp", Http = "http" }
}
keywords! {
    OnOpen {
        /// TCP RST / ICMP unreachable: clients fail in microseconds.
        #[default] Reject = "reject",
        Drop = "drop",
    }
}
keywords! {
    FallbackStrategy { #[default] StaticResponse = "static_response", CacheOnly = "cache_only", Shed = "shed" }
}
keywords! {
    ConditionType { #[default] Latency = "latency", ErrorRate = "error_rate", Availability = "availability" }
}

/// The file and the position of every value, for messages about a valid policy (see
/// `Policy::error_at`).
#[derive(Debug, Default)]
pub(crate) struct Source {
    pub file: String,
    pub spans: SpanIndex,
}

/// A validated policy (POLICY.md, version 1).
#[derive(Debug, Clone)]
pub struct Policy {
    pub version: u32,
    pub agent: AgentSettings,
    pub interfaces: Vec<Interface>,
    pub services: Vec<Service>,
    pub(crate) source: Arc<Source>,
}

/// Two policies are equal when they say the same thing, wherever it is written in the file:
/// a reload that only moved lines around is a no-op.
impl PartialEq for Policy {
    fn eq(&self, other: &Policy) -> bool {
        self.version == other.version
            && self.agent == other.agent
            && self.interfaces == other.interfaces
            && self.services == other.services
    }
}
impl Eq for Policy {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// Serves `/metrics`, `/health/live`, `/health/ready`.
    pub listen: SocketAddr,
    /// Where maps and links are pinned; absolute.
    pub pin_path: PathBuf,
    pub log_level: LogLevel,
}

impl Default for AgentSettings {
    fn default() -> AgentSettings {
        AgentSettings {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090),
            pin_path: PathBuf::from("/sys/fs/bpf/agent"),
            log_level: LogLevel::Info,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// A valid Linux name; whether it exists is checked by `agent run`, not here.
    pub name: String,
    pub xdp_mode: XdpMode,
    pub direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `[a-z0-9-]`, 1 to 63 characters, unique.
    pub name: String,
    pub r#match: Match,
    pub priority: Priority,
    /// `None`: no rate limit.
    pub rate_limit: Option<RateLimit>,
    /// Empty: no load balancing; traffic goes to the matched address untouched.
    pub backends: Vec<Backend>,
    /// `None` with backends: `LoadBalancing::default()` applies.
    pub load_balancing: Option<LoadBalancing>,
    /// `None`: no active probes; backends count as healthy unless the breaker opens them.
    pub health_check: Option<HealthCheck>,
    /// `None`: no circuit breaker.
    pub circuit_breaker: Option<CircuitBreaker>,
    /// `None`: the service never degrades.
    pub degradation: Option<Degradation>,
    /// `None`: no pacing.
    pub shaping: Option<Shaping>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub address: Cidr,
    /// `None`: every port.
    pub port: Option<u16>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub key: KeyBy,
    /// Never 0.
    pub rate: Rate,
    /// Packets for a packet rate, bytes for a bit or byte rate. Resolved: when the policy
    /// omits it, one second of `rate`. Never 0; for byte rates at least one full frame.
    pub burst: u64,
    /// Size of the key table (LRU), 1 to 16777216.
    pub max_keys: u32,
}

/// Default `rate_limit.max_keys`.
pub const DEFAULT_MAX_KEYS: u32 = agent_common::maps::DEFAULT_MAX_KEYS;
/// Largest `rate_limit.max_keys` (and Maglev `table_size`): 2^24.
pub const MAX_TABLE_ENTRIES: u32 = 1 << 24;
/// A byte bucket must hold one full Ethernet frame (1500 + 14), or nothing passes it.
pub const MIN_BYTE_BURST: u64 = 1514;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    /// 0 to 1000; 0 drains (existing flows stay, no new ones).
    pub weight: u16,
}

/// Default backend weight.
pub const DEFAULT_WEIGHT: u16 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancing {
    pub algorithm: Algorithm,
    /// Rewrite traffic addressed to `match` onto a backend (DNAT + reverse NAT).
    pub vip: bool,
    /// A recovered backend's weight ramps linearly over this window.
    pub slow_start: Duration,
    /// Maglev lookup table size: prime, at least 100 x backends.
    pub table_size: u32,
    /// Extension of POLICY.md v1: when the available backends (healthy, breaker not open)
    /// carry less than this share of the configured weight, the service *panics*: health and
    /// breakers are ignored and every backend gets its configured weight (Envoy's panic
    /// routing). 0% (the default) never panics: with no backend left, new flows are refused.
    pub panic_threshold: Percent,
    /// Extension of POLICY.md v1: flows the connection table holds for this service (the
    /// table is one LRU shared by the balanced services, sized by the sum; an evicted flow is
    /// balanced again on its next packet).
    pub max_connections: u32,
}

impl Default for LoadBalancing {
    fn default() -> LoadBalancing {
        LoadBalancing {
            algorithm: Algorithm::Maglev,
            vip: true,
            slow_start: Duration::ZERO,
            table_size: 65537,
            panic_threshold: Percent::whole(0),
            max_connections: 262_144,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub r#type: CheckType,
    /// http only; starts with `/`.
    pub path: String,
    /// http Host header; empty = the backend address.
    pub host: String,
    /// http only.
    pub expected_status: StatusRange,
    pub interval: Duration,
    /// Interval while a backend is unhealthy.
    pub unhealthy_interval: Duration,
    /// Shorter than both intervals.
    pub timeout: Duration,
    /// Consecutive successes to become healthy (rise), >= 1.
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy (fall), >= 1.
    pub unhealthy_threshold: u32,
    pub jitter: Percent,
    pub retry: Retry,
    /// Also count failed connection attempts the datapath sees.
    pub passive: bool,
}

impl Default for HealthCheck {
    fn default() -> HealthCheck {
        HealthCheck {
            r#type: CheckType::Tcp,
            path: "/".into(),
            host: String::new(),
            expected_status: StatusRange { min: 200, max: 399 },
            interval: Duration::from_secs(1),
            unhealthy_interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            jitter: Percent::whole(10),
            retry: Retry::default(),
            passive: true,
        }
    }
}

/// HTTP statuses that count as healthy, inclusive, within 100-599.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub min: u16,
    pub max: u16,
}

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.min..=self.max).contains(&status)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// Retries of one probe inside its interval (the datapath never retries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all, >= 1; 1 = no retry.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    /// >= `initial_backoff`.
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreaker {
    /// Consecutive failures that open the breaker, >= 1.
    pub failure_threshold: u32,
    /// 0% = off; else open when failures/attempts over `window` exceed it.
    pub error_rate: Percent,
    /// Attempts needed in `window` before `error_rate` applies, >= 1.
    pub min_requests: u32,
    pub window: Duration,
    /// open -> half_open; <= `max_reset_timeout`.
    pub reset_timeout: Duration,
    /// `reset_timeout` doubles on each consecutive re-open, up to this.
    pub max_reset_timeout: Duration,
    /// New flows admitted while half-open, >= 1.
    pub half_open_max_flows: u32,
    /// Successes in half-open that close it, >= 1.
    pub success_threshold: u32,
    pub on_open: OnOpen,
    /// Also cut established flows when it opens.
    pub close_existing: bool,
    /// Never open more than this share of a service's backends (one may always open).
    pub max_ejection_percent: Percent,
}

impl Default for CircuitBreaker {
    fn default() -> CircuitBreaker {
        CircuitBreaker {
            failure_threshold: 5,
            error_rate: Percent::whole(0),
            min_requests: 20,
            window: Duration::from_secs(10),
            reset_timeout: Duration::from_secs(30),
            max_reset_timeout: Duration::from_secs(300),
            half_open_max_flows: 3,
            success_threshold: 2,
            on_open: OnOpen::Reject,
            close_existing: false,
            max_ejection_percent: Percent::whole(50),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degradation {
    /// At least one; any condition true => degraded.
    pub conditions: Vec<Condition>,
    pub fallback: Fallback,
    /// Conditions must stay false this long before recovering.
    pub recover_after: Duration,
}

/// Default `degradation.recover_after`.
pub const DEFAULT_RECOVER_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub kind: ConditionKind,
    /// The window the measure is taken over.
    pub window: Duration,
}

/// Default condition `window`.
pub const DEFAULT_CONDITION_WINDOW: Duration = Duration::from_secs(30);

/// A condition's measure and threshold; the threshold's kind follows the `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionKind {
    /// p99 probe latency over the window above `threshold` (default 500ms).
    Latency { threshold: Duration },
    /// Failed share of attempts over the window above `threshold` (default 50%).
    ErrorRate { threshold: Percent },
    /// Healthy share of backends below `threshold` (default 80%).
    Availability { threshold: Percent },
}

impl ConditionKind {
    pub fn condition_type(&self) -> ConditionType {
        match self {
            ConditionKind::Latency { .. } => ConditionType::Latency,
            ConditionKind::ErrorRate { .. } => ConditionType::ErrorRate,
            ConditionKind::Availability { .. } => ConditionType::Availability,
        }
    }

    /// POLICY.md's threshold for a condition that gives none.
    pub fn default_for(t: ConditionType) -> ConditionKind {
        match t {
            ConditionType::Latency => ConditionKind::Latency {
                threshold: Duration::from_millis(500),
            },
            ConditionType::ErrorRate => ConditionKind::ErrorRate {
                threshold: Percent::whole(50),
            },
            ConditionType::Availability => ConditionKind::Availability {
                threshold: Percent::whole(80),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fallback {
    pub strategy: FallbackStrategy,
    /// Where traffic goes while degraded; non-empty unless `strategy` is `shed`, empty then.
    pub backends: Vec<Backend>,
}

/// Pacing instead of dropping, on egress (needs `sch_fq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shaping {
    /// Always `Rate::Bytes`: pacing spaces bytes.
    pub rate: Rate,
    pub key: KeyBy,
    /// Packets that would leave later than this are dropped; > 0.
    pub horizon: Duration,
    /// Extension of POLICY.md v1: entries of the departure table (one per key) this service
    /// needs, 1 to 16777216. The table is one LRU shared by the shaped services, sized by the
    /// sum; an evicted key starts again as idle (its next packet leaves at once).
    pub max_keys: u32,
}

/// Default `shaping.horizon`.
pub const DEFAULT_HORIZON: Duration = Duration::from_secs(2);
/// Default `shaping.max_keys`.
pub const DEFAULT_SHAPE_KEYS: u32 = agent_common::shape::DEFAULT_SHAPE_KEYS;
