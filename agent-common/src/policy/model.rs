//! The typed policy: POLICY.md as Rust types, declared once, read by serde.
//!
//! Field names are the YAML names (hence `r#match`, `r#type`), so the path in an error message
//! is also the chain of fields in code. Each field's rule is on the field (`deserialize_with`,
//! read.rs) or in its type's parser; each default is in its section's `Default` (POLICY.md's
//! values), which `#[serde(default)]` uses for fields the file leaves out. A required field's
//! `Default` is a placeholder that validation never lets through (it reports the field missing).
//!
//! Everything in a `Policy` from `load_str`/`load_file` has been validated: a `Rate` is never
//! 0, a `Cidr` has no host bits, a timeout is shorter than its interval, and so on.
//! Optional sections are `Option`s and say what their absence means; code that wants "the
//! section or its defaults" writes `svc.load_balancing.clone().unwrap_or_default()`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use super::net::Cidr;
use super::read::{self as r, Index, Raw};
pub use super::units::{Percent, Rate};
use super::units::{parse_duration, parse_percent};

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
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                r::keyword_leaf(d)
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
    pub spans: Index,
}

/// A validated policy (POLICY.md, version 1). Read it with `load_str` or `load_file`: the
/// `Deserialize` impls of the model are the reading half only, without validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Required.
    #[serde(default, deserialize_with = "r::version")]
    pub version: u32,
    #[serde(default, deserialize_with = "r::or_default")]
    pub agent: AgentSettings,
    /// Required, at least one.
    #[serde(default, deserialize_with = "r::list")]
    pub interfaces: Vec<Interface>,
    /// Required, at least one.
    #[serde(default, deserialize_with = "r::list")]
    pub services: Vec<Service>,
    #[serde(skip)]
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// Serves `/metrics`, `/health/live`, `/health/ready`.
    #[serde(deserialize_with = "r::socket")]
    pub listen: SocketAddr,
    /// Where maps and links are pinned; absolute.
    #[serde(deserialize_with = "r::absolute_path")]
    pub pin_path: PathBuf,
    pub log_level: LogLevel,
    /// Extension: the sizes of the datapath's node-wide tables, fixed when the agent starts.
    #[serde(deserialize_with = "r::or_default")]
    pub tables: Tables,
    /// Extension: node-wide shedding (services whose `fallback.strategy` is `shed`). While
    /// any of them is degraded, one more priority level is shed every `shed_step`, `low`
    /// first, `core` last; once none is, one level comes back every `shed_step`.
    #[serde(deserialize_with = "r::positive_duration")]
    pub shed_step: Duration,
}

/// Default `agent.shed_step`.
pub const DEFAULT_SHED_STEP: Duration = Duration::from_secs(10);

impl Default for AgentSettings {
    fn default() -> AgentSettings {
        AgentSettings {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090),
            pin_path: PathBuf::from("/sys/fs/bpf/agent"),
            log_level: LogLevel::Info,
            tables: Tables::default(),
            shed_step: DEFAULT_SHED_STEP,
        }
    }
}

/// `agent.tables`: properties of the node, not of the services a policy lists, so a policy
/// that adds or removes services never resizes (and so never empties) a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tables {
    /// The most services a policy may have (1 to 2^20).
    #[serde(deserialize_with = "r::table_limit")]
    pub services: u32,
    /// The most backends with a breaker, and the most balanced backends, each over all
    /// services (1 to 2^20).
    #[serde(deserialize_with = "r::table_limit")]
    pub backends: u32,
    /// Entries of the connection table and of the reverse-NAT table, each; `None` (`auto`):
    /// from the node's memory (`maps::auto_connections`).
    #[serde(deserialize_with = "r::connections")]
    pub connections: Option<u32>,
    /// Entries of the token-bucket table; `None`: the total of `rate_limit.max_keys` at
    /// start. Set higher, it leaves reloads room to add rate limits (the kernel cannot resize
    /// a map in use).
    #[serde(deserialize_with = "r::some_entries")]
    pub keys: Option<u32>,
    /// Entries of the departure table of shaping; `None`: the total of `shaping.max_keys`.
    #[serde(deserialize_with = "r::some_entries")]
    pub departures: Option<u32>,
}

impl Default for Tables {
    fn default() -> Tables {
        Tables {
            services: crate::maps::DEFAULT_SERVICES,
            backends: crate::maps::DEFAULT_BACKENDS,
            connections: None,
            keys: None,
            departures: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Interface {
    /// A valid Linux name; whether it exists is checked by `agent run`, not here.
    #[serde(deserialize_with = "r::interface_name")]
    pub name: String,
    pub xdp_mode: XdpMode,
    pub direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Service {
    /// `[a-z0-9-]`, 1 to 63 characters, unique. Required.
    #[serde(deserialize_with = "r::service_name")]
    pub name: String,
    /// Required.
    #[serde(deserialize_with = "r::or_default")]
    pub r#match: Match,
    pub priority: Priority,
    /// `None`: no rate limit.
    #[serde(deserialize_with = "r::section")]
    pub rate_limit: Option<RateLimit>,
    /// Empty: no load balancing; traffic goes to the matched address untouched.
    #[serde(deserialize_with = "r::list")]
    pub backends: Vec<Backend>,
    /// `None` with backends: `LoadBalancing::default()` applies.
    #[serde(deserialize_with = "r::section")]
    pub load_balancing: Option<LoadBalancing>,
    /// `None`: no active probes; backends count as healthy unless the breaker opens them.
    #[serde(deserialize_with = "r::section")]
    pub health_check: Option<HealthCheck>,
    /// `None`: no circuit breaker.
    #[serde(deserialize_with = "r::section")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// `None`: the service never degrades.
    #[serde(deserialize_with = "r::section")]
    pub degradation: Option<Degradation>,
    /// `None`: no pacing.
    #[serde(deserialize_with = "r::section")]
    pub shaping: Option<Shaping>,
    /// Not in the file: `Some(i)` for the companion service that balances the fallback
    /// backends of `services[i]` (`Policy::with_companions`), which no packet is classified
    /// into. `None` for every service the file lists.
    #[serde(skip)]
    pub fallback_of: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Match {
    /// Required.
    pub address: Cidr,
    /// `None`: every port.
    #[serde(deserialize_with = "r::port")]
    pub port: Option<u16>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    pub key: KeyBy,
    /// Never 0.
    pub rate: Rate,
    /// Packets for a packet rate, bytes for a bit or byte rate. Resolved: when the policy
    /// omits it, one second of `rate`. Never 0; for byte rates at least one full frame.
    #[serde(deserialize_with = "r::burst")]
    pub burst: u64,
    /// Size of the key table (LRU), 1 to 16777216.
    #[serde(deserialize_with = "r::entries")]
    pub max_keys: u32,
}

impl Default for RateLimit {
    /// `rate` is a placeholder (required); `burst` 0 is "not given", resolved by validation.
    fn default() -> RateLimit {
        RateLimit {
            key: KeyBy::SourceIp,
            rate: Rate::Packets(0),
            burst: 0,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

/// Default `rate_limit.max_keys`.
pub const DEFAULT_MAX_KEYS: u32 = crate::maps::DEFAULT_MAX_KEYS;
/// Largest `rate_limit.max_keys` (and Maglev `table_size`): 2^24.
pub const MAX_TABLE_ENTRIES: u32 = 1 << 24;
/// A byte bucket must hold one full Ethernet frame (1500 + 14), or nothing passes it.
pub const MIN_BYTE_BURST: u64 = 1514;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backend {
    /// Required.
    #[serde(deserialize_with = "r::backend_address")]
    pub address: SocketAddr,
    /// 0 to 1000; 0 drains (existing flows stay, no new ones).
    #[serde(deserialize_with = "r::weight")]
    pub weight: u16,
}

impl Default for Backend {
    fn default() -> Backend {
        Backend {
            address: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            weight: DEFAULT_WEIGHT,
        }
    }
}

/// Default backend weight.
pub const DEFAULT_WEIGHT: u16 = 100;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadBalancing {
    pub algorithm: Algorithm,
    /// Rewrite traffic addressed to `match` onto a backend (DNAT + reverse NAT).
    #[serde(deserialize_with = "r::boolean")]
    pub vip: bool,
    /// A recovered backend's weight ramps linearly over this window.
    #[serde(deserialize_with = "r::duration")]
    pub slow_start: Duration,
    /// Maglev lookup table size: prime, at least 100 x backends; `None`:
    /// `lb::default_maglev_size` of the service's backends.
    #[serde(deserialize_with = "r::some_entries")]
    pub table_size: Option<u32>,
    /// Extension of POLICY.md v1: when the available backends (healthy, breaker not open)
    /// carry less than this share of the configured weight, the service *panics*: health and
    /// breakers are ignored and every backend gets its configured weight (Envoy's panic
    /// routing). 0% (the default) never panics: with no backend left, new flows are refused.
    pub panic_threshold: Percent,
    /// Removed: the connection table is node-wide (`agent.tables.connections`). Read only so
    /// that validation can say so where it is written.
    #[serde(deserialize_with = "r::some_entries")]
    pub max_connections: Option<u32>,
}

impl Default for LoadBalancing {
    fn default() -> LoadBalancing {
        LoadBalancing {
            algorithm: Algorithm::Maglev,
            vip: true,
            slow_start: Duration::ZERO,
            table_size: None,
            panic_threshold: Percent::whole(0),
            max_connections: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheck {
    pub r#type: CheckType,
    /// http only; starts with `/`.
    #[serde(deserialize_with = "r::http_path")]
    pub path: String,
    /// http Host header; empty = the backend address.
    #[serde(deserialize_with = "r::header")]
    pub host: String,
    /// http only.
    pub expected_status: StatusRange,
    #[serde(deserialize_with = "r::positive_duration")]
    pub interval: Duration,
    /// Interval while a backend is unhealthy.
    #[serde(deserialize_with = "r::positive_duration")]
    pub unhealthy_interval: Duration,
    /// Shorter than both intervals.
    #[serde(deserialize_with = "r::positive_duration")]
    pub timeout: Duration,
    /// Consecutive successes to become healthy (rise), >= 1.
    #[serde(deserialize_with = "r::count")]
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy (fall), >= 1.
    #[serde(deserialize_with = "r::count")]
    pub unhealthy_threshold: u32,
    pub jitter: Percent,
    #[serde(deserialize_with = "r::or_default")]
    pub retry: Retry,
    /// Also count failed connection attempts the datapath sees.
    #[serde(deserialize_with = "r::boolean")]
    pub passive: bool,
}

impl Default for HealthCheck {
    fn default() -> HealthCheck {
        HealthCheck {
            r#type: CheckType::Tcp,
            path: "/".into(),
            host: String::new(),
            expected_status: StatusRange::default(),
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

/// 200-399: what POLICY.md counts as healthy.
impl Default for StatusRange {
    fn default() -> StatusRange {
        StatusRange { min: 200, max: 399 }
    }
}

/// `200` or `200-399`, within 100-599.
pub fn parse_status_range(text: &str) -> Result<StatusRange, String> {
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retry {
    /// Attempts in all, >= 1; 1 = no retry.
    #[serde(deserialize_with = "r::count")]
    pub max_attempts: u32,
    #[serde(deserialize_with = "r::duration")]
    pub initial_backoff: Duration,
    /// >= `initial_backoff`.
    #[serde(deserialize_with = "r::duration")]
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Consecutive failures that open the breaker, >= 1.
    #[serde(deserialize_with = "r::count")]
    pub failure_threshold: u32,
    /// 0% = off; else open when failures/attempts over `window` exceed it.
    pub error_rate: Percent,
    /// Attempts needed in `window` before `error_rate` applies, >= 1.
    #[serde(deserialize_with = "r::count")]
    pub min_requests: u32,
    #[serde(deserialize_with = "r::positive_duration")]
    pub window: Duration,
    /// open -> half_open; <= `max_reset_timeout`.
    #[serde(deserialize_with = "r::positive_duration")]
    pub reset_timeout: Duration,
    /// `reset_timeout` doubles on each consecutive re-open, up to this.
    #[serde(deserialize_with = "r::positive_duration")]
    pub max_reset_timeout: Duration,
    /// New flows admitted while half-open, >= 1.
    #[serde(deserialize_with = "r::count")]
    pub half_open_max_flows: u32,
    /// Successes in half-open that close it, >= 1.
    #[serde(deserialize_with = "r::count")]
    pub success_threshold: u32,
    pub on_open: OnOpen,
    /// Also cut established flows when it opens.
    #[serde(deserialize_with = "r::boolean")]
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Degradation {
    /// At least one; any condition true => degraded. Required.
    #[serde(deserialize_with = "r::list")]
    pub conditions: Vec<Condition>,
    /// Required unless its strategy is `shed` (validation reports it missing).
    #[serde(deserialize_with = "r::or_default")]
    pub fallback: Fallback,
    /// Conditions must stay false this long before recovering.
    #[serde(deserialize_with = "r::duration")]
    pub recover_after: Duration,
}

impl Default for Degradation {
    fn default() -> Degradation {
        Degradation {
            conditions: Vec::new(),
            fallback: Fallback::default(),
            recover_after: DEFAULT_RECOVER_AFTER,
        }
    }
}

/// Default `degradation.recover_after`.
pub const DEFAULT_RECOVER_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "ConditionYaml")]
pub struct Condition {
    pub kind: ConditionKind,
    /// The window the measure is taken over.
    pub window: Duration,
}

/// A condition as written: the kind of its threshold follows its `type`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionYaml {
    /// Required; `None` when missing or wrong (both reported).
    #[serde(default, deserialize_with = "r::known")]
    r#type: Option<ConditionType>,
    #[serde(default)]
    threshold: Option<Spanned<Raw>>,
    #[serde(
        default = "default_condition_window",
        deserialize_with = "r::positive_duration"
    )]
    window: Duration,
}

fn default_condition_window() -> Duration {
    DEFAULT_CONDITION_WINDOW
}

impl From<ConditionYaml> for Condition {
    fn from(c: ConditionYaml) -> Condition {
        // Without a valid type the threshold cannot be read; a placeholder stands in.
        let t = c.r#type.unwrap_or_default();
        let kind = match (c.r#type, c.threshold) {
            (Some(t), Some(threshold)) => r::parse_at(threshold, |raw| threshold_of(t, raw)),
            _ => None,
        };
        Condition {
            kind: kind.unwrap_or(ConditionKind::default_for(t)),
            window: c.window,
        }
    }
}

/// A threshold of the kind its condition measures: a duration for latency, a percentage
/// for the rates.
fn threshold_of(t: ConditionType, raw: &Raw) -> Result<ConditionKind, String> {
    let Raw::Scalar { text, .. } = raw else {
        return Err(format!("expected a string, found {}", raw.describe()));
    };
    let wrong_kind = |what: &str, example: &str| {
        format!("{t} thresholds are {what} (e.g. {example}), found `{text}`")
    };
    match t {
        ConditionType::Latency => match parse_duration(text) {
            Ok(d) if d.is_zero() => Err("must be greater than 0".into()),
            Ok(threshold) => Ok(ConditionKind::Latency { threshold }),
            Err(_) if parse_percent(text).is_ok() => Err(wrong_kind("durations", "500ms")),
            Err(e) => Err(e.to_string()),
        },
        ConditionType::ErrorRate | ConditionType::Availability => match parse_percent(text) {
            Ok(threshold) if t == ConditionType::ErrorRate => {
                Ok(ConditionKind::ErrorRate { threshold })
            }
            Ok(threshold) => Ok(ConditionKind::Availability { threshold }),
            Err(_) if parse_duration(text).is_ok() => Err(wrong_kind("percentages", "50%")),
            Err(e) => Err(e.to_string()),
        },
    }
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

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fallback {
    pub strategy: FallbackStrategy,
    /// Where traffic goes while degraded; non-empty unless `strategy` is `shed`, empty then.
    #[serde(deserialize_with = "r::list")]
    pub backends: Vec<Backend>,
    /// Extension: the rate limit in force while degraded, instead of the service's own
    /// (`None`: the service's own stays). Not with `shed`.
    #[serde(deserialize_with = "r::section")]
    pub rate_limit: Option<RateLimit>,
}

/// Pacing instead of dropping, on egress (needs `sch_fq`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shaping {
    /// Always `Rate::Bytes`: pacing spaces bytes. Required.
    pub rate: Rate,
    pub key: KeyBy,
    /// Packets that would leave later than this are dropped; > 0.
    #[serde(deserialize_with = "r::positive_duration")]
    pub horizon: Duration,
    /// Extension of POLICY.md v1: entries of the departure table (one per key) this service
    /// needs, 1 to 16777216. The table is one LRU shared by the shaped services, sized by the
    /// sum; an evicted key starts again as idle (its next packet leaves at once).
    #[serde(deserialize_with = "r::entries")]
    pub max_keys: u32,
}

impl Default for Shaping {
    fn default() -> Shaping {
        Shaping {
            rate: Rate::Packets(0),
            key: KeyBy::Flow,
            horizon: DEFAULT_HORIZON,
            max_keys: DEFAULT_SHAPE_KEYS,
        }
    }
}

/// Default `shaping.horizon`.
pub const DEFAULT_HORIZON: Duration = Duration::from_secs(2);
/// Default `shaping.max_keys`.
pub const DEFAULT_SHAPE_KEYS: u32 = crate::shape::DEFAULT_SHAPE_KEYS;
