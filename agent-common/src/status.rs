//! The JSON of `/status` and `agent status --output json`, as the agent serves it: here so that
//! `xtask` and the end-to-end tests deserialize it without depending on the agent. Userspace
//! only (feature `user`); the agent fills it in (`agent::telemetry::status`).
//!
//! The field names and types are the JSON format: change them only together with every
//! reader. Health and breaker states are their display names here (`healthy`, `half_open`);
//! the agent decides on typed states and only writes these strings.

extern crate alloc;

use alloc::{collections::BTreeMap, string::String, vec::Vec};

use serde::{Deserialize, Serialize};

use crate::Counter;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub ready: bool,
    pub policy_file: String,
    pub attachments: Vec<String>,
    pub services: Vec<ServiceStatus>,
    /// Packets outside any service, by class.
    pub global: Vec<(String, CounterJson)>,
    /// Backends with health and breaker state (services with `backends`).
    #[serde(default)]
    pub backends: Vec<BackendStatus>,
    /// Services balanced in the datapath, and their backends' weights and counters.
    #[serde(default)]
    pub balancing: Vec<LbServiceView>,
    #[serde(default)]
    pub lb_backends: Vec<LbBackendView>,
    /// The BPF maps the agent holds, by name: their kernel memory, and for tables that can
    /// fill, how full they are. Empty until the first reading (taken on a timer).
    #[serde(default)]
    pub maps: Vec<MapStatus>,
    /// Kernel memory of every BPF map the agent holds (the sum of `maps[].memory_bytes`);
    /// `None` until the first reading, or when `/proc/self/fdinfo` could not be read.
    #[serde(default)]
    pub kernel_memory_bytes: Option<u64>,
    /// What the watchdog restored since start (a detached link, a removed pin), by kind.
    #[serde(default)]
    pub repairs: Vec<(String, u64)>,
    /// Whether this agent adopted an earlier agent's pinned datapath, and where it pins.
    #[serde(default)]
    pub adopted: bool,
    #[serde(default)]
    pub pin_path: Option<String>,
    /// Reloads of the policy (SIGHUP, a change of the file) and the policy generation.
    #[serde(default)]
    pub reload: ReloadStatus,
    /// Node-wide shedding by priority (services whose strategy is `shed`).
    #[serde(default)]
    pub shedding: SheddingStatus,
}

/// Node-wide shedding: while any `shed` service is degraded (the pressure), priority levels
/// are shed one per `agent.shed_step`, `low` first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SheddingStatus {
    /// The highest priority shed: `none`, `low`, `normal` or `core`.
    pub level: String,
    /// Whether some `shed` service is degraded.
    pub pressure: bool,
    /// Names of the services whose new flows are refused now.
    pub shed: Vec<String>,
    /// Seconds since `level` last changed.
    pub level_for_seconds: f64,
}

/// One service's degradation (services with `degradation`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DegradationStatus {
    /// `normal`, `fallback` or `shed`: the mode the datapath enforces
    /// (`agent_common::degrade::mode_name`).
    pub mode: String,
    /// Whether the conditions hold the service degraded (any condition true, then all false
    /// for less than `recover_after`). A `shed` service may be degraded and not shed yet:
    /// its priority's turn has not come.
    pub degraded: bool,
    /// What decided the latest transition, with the values that decided it, e.g.
    /// `latency p99 612ms > 500ms over 2s`; `None` before the first.
    pub cause: Option<String>,
    /// Seconds since the latest transition of `degraded` (or since start).
    pub in_state_seconds: f64,
    /// Seconds the conditions have been all false while still degraded (counts toward
    /// `recover_after`); 0 when not degraded.
    pub clear_for_seconds: f64,
    /// Transitions of `mode` since start.
    pub transitions: u64,
    pub conditions: Vec<ConditionStatus>,
    /// New flows the datapath sent to the fallback backends, and refused by shedding.
    pub fallback_flows: u64,
    pub shed_flows: u64,
}

/// One condition as last evaluated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConditionStatus {
    /// `latency`, `error_rate` or `availability`.
    pub r#type: String,
    /// As the policy writes it: `500ms`, `50%`.
    pub threshold: String,
    pub window_seconds: f64,
    /// The measure over the window: seconds (latency p99) or a share from 0 to 1 (error
    /// rate, availability); `None` when the window holds no sample (the condition is false).
    pub value: Option<f64>,
    /// Samples the measure is over: probes (latency), attempts (error rate), evaluations
    /// (availability).
    pub samples: u64,
    /// Whether the condition is true.
    pub met: bool,
}

/// The policy in force and the reloads since start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// Policies applied since start: 0 is the start's, and every reload that applies one
    /// adds 1.
    pub generation: u64,
    /// When the policy in force was applied (at start, or by the latest applied reload), in
    /// seconds since the Unix epoch.
    pub applied_at: f64,
    /// Reloads tried since start (the sum of `results`).
    pub count: u64,
    /// Reloads by result, every result present: `ok` (applied), `unchanged` (nothing to
    /// write), `invalid` (the file does not validate), `refused` (the kernel cannot take it
    /// live), `failed` (applying it failed), `missing` (the file was gone).
    pub results: BTreeMap<String, u64>,
    /// The latest reload, `None` before the first.
    pub last: Option<ReloadAttempt>,
    /// The latest reload that left the running policy other than the file's (neither `ok`
    /// nor `unchanged`), `None` until there is one.
    pub last_failure: Option<ReloadAttempt>,
}

/// One reload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadAttempt {
    /// What asked for it: `SIGHUP` or `file` (a change of the policy file).
    pub trigger: String,
    /// One of [`ReloadStatus::results`]' keys.
    pub result: String,
    /// Why it did not apply, as logged: for `invalid`, every error on its own line as
    /// `FILE:LINE:COLUMN: FIELD.PATH: message`.
    pub error: Option<String>,
    /// When it put its policy in force (an applied reload: the datapath's switch to it), or
    /// ended, in seconds since the Unix epoch.
    pub at: f64,
    /// How long it took (reading, validating and applying), in seconds.
    pub took_seconds: f64,
}

/// One BPF map name as the agent sees it (several maps may share a name: inner maps).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MapStatus {
    pub map: String,
    /// Maps of this name the agent holds a descriptor for.
    pub maps: u32,
    /// What the kernel charges for them (`memlock` in `/proc/self/fdinfo`), in bytes.
    pub memory_bytes: u64,
    /// Tables that can fill only.
    #[serde(default)]
    pub usage: Option<MapUsage>,
}

/// How full one table is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MapUsage {
    pub entries: u64,
    pub capacity: u64,
    /// `entries / capacity`, 0 to 1.
    pub pressure: f64,
    /// `walk`: keys counted by a walk of the table; `walk_cut`: the walk met more keys than
    /// the table holds (keys deleted or evicted under it) and was cut, `entries` is then the
    /// capacity; `policy`: an array indexed by service or backend, the slots the policy uses.
    pub counted: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub id: u32,
    pub name: String,
    /// `match` as written in the policy, e.g. `198.18.0.2/32 udp/5000`.
    pub matches: String,
    pub rate_limit: Option<RateLimitStatus>,
    pub passed: CounterJson,
    pub dropped: Vec<DropStatus>,
    pub passed_no_bucket: CounterJson,
    /// Services with `shaping` only.
    #[serde(default)]
    pub shaping: Option<ShapingStatus>,
    /// Services with `degradation` only.
    #[serde(default)]
    pub degradation: Option<DegradationStatus>,
    /// `Some(name)` for the companion service that balances `name`'s fallback backends.
    #[serde(default)]
    pub fallback_of: Option<String>,
}

/// Pacing of one service on egress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShapingStatus {
    /// e.g. `flow 6250000B/s horizon 2s`
    pub summary: String,
    /// Packets given a departure time.
    pub paced: CounterJson,
    /// Dropped: their departure would have been past the horizon.
    pub horizon_drops: CounterJson,
    /// Passed unpaced because the departure table refused a new key (fail open).
    pub unpaced: CounterJson,
    /// Paced after every compare-and-swap on the key lost to other CPUs.
    pub contended: u64,
    /// How long the latest paced packet still waits for its departure (0 once it left).
    pub delay_seconds: f64,
    /// How long that packet was set to wait when it was paced.
    pub last_delay_seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RateLimitStatus {
    /// e.g. `flow 1000/s burst 200`
    pub summary: String,
    pub keys: u64,
    pub new_keys: u64,
    pub evictions: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DropStatus {
    pub reason: String,
    pub counter: CounterJson,
}

/// `Counter` as it appears in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterJson {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Counter> for CounterJson {
    fn from(c: Counter) -> Self {
        CounterJson {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

/// Upper bounds (seconds) of the probe-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// One backend as status and metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub service: String,
    pub address: String,
    /// `healthy` / `unhealthy`; `unchecked` without `health_check`.
    pub health: String,
    /// `closed` / `open` / `half_open`; `None` without `circuit_breaker`.
    pub breaker: Option<String>,
    /// Time in the current breaker state (or health, without a breaker), in ms.
    pub in_state_ms: u64,
    pub probes_ok: u64,
    pub probes_failed: u64,
    /// Failed probes by reason (`refused`, `timeout`, `status`, ...).
    pub failures: BTreeMap<String, u64>,
    pub last_failure: Option<String>,
    /// Breaker transitions by `to/reason`.
    pub transitions: BTreeMap<String, u64>,
    /// Probe latency: counts per `LATENCY_BUCKETS` bucket (not cumulative; slower probes are
    /// the rest of `probes_ok + probes_failed`), and the sum in seconds.
    pub latency_buckets: Vec<u64>,
    pub latency_sum: f64,
    /// The backend's id in the datapath (`BACKEND_STATS`) when its breaker is enforced there.
    #[serde(default)]
    pub id: Option<u32>,
    /// Datapath packets toward the backend by action (`admitted`, `trial`, `reject_rst`,
    /// `reject_icmp`, `drop`, `close_existing`), read from the maps when a report is built.
    #[serde(default)]
    pub datapath: BTreeMap<String, u64>,
    /// Passive detection results; `None` without `health_check.passive`.
    #[serde(default)]
    pub passive: Option<PassiveCounts>,
    /// Breaker states the datapath map refused (each retried until written).
    #[serde(default)]
    pub map_write_errors: u64,
}

impl BackendStatus {
    /// Packets of one datapath action (0 when never seen).
    pub fn action(&self, action: &str) -> u64 {
        self.datapath.get(action).copied().unwrap_or(0)
    }
}

/// What passive detection saw of one backend: answered SYNs, refused ones, unanswered ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassiveCounts {
    pub synack: u64,
    pub refused: u64,
    pub timeout: u64,
}

impl PassiveCounts {
    pub fn add(&mut self, other: &PassiveCounts) {
        self.synack = self.synack.saturating_add(other.synack);
        self.refused = self.refused.saturating_add(other.refused);
        self.timeout = self.timeout.saturating_add(other.timeout);
    }

    pub fn is_empty(&self) -> bool {
        *self == PassiveCounts::default()
    }

    /// By result, as `agent_backend_passive_total{result}` labels them.
    pub fn by_result(&self) -> [(&'static str, u64); 3] {
        [
            ("synack", self.synack),
            ("refused", self.refused),
            ("timeout", self.timeout),
        ]
    }
}

/// What status and metrics show of one balanced backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbBackendView {
    pub service: String,
    pub address: String,
    pub configured: u32,
    /// The weight in the datapath now.
    pub effective: u32,
    /// Connections open now.
    pub active: u64,
    /// New flows pinned to it so far.
    pub new_flows: u64,
    /// Packets and bytes forwarded to it (client to backend).
    pub packets: u64,
    pub bytes: u64,
}

/// What status and metrics show of one balanced service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbServiceView {
    pub service: String,
    pub algorithm: String,
    /// Live connection-table entries (as of the last walk).
    pub connections: u64,
    /// Entries the LRU evicted (as of the last walk): flows tracked, minus those that took an
    /// expired entry's place, minus the entries present.
    pub evictions: u64,
    /// New flows refused for want of an available backend.
    pub no_backend: u64,
    /// TCP packets whose connection-table entry was gone (evicted or expired).
    pub lost: u64,
    /// New flows whose client port the datapath moved out of the ephemeral range
    /// (`crate::ports`), and those that kept it because a live flow held the moved one.
    #[serde(default)]
    pub client_ports_moved: u64,
    #[serde(default)]
    pub client_ports_busy: u64,
    /// Table swaps so far.
    pub publishes: u64,
    /// Panicking now (`load_balancing.panic_threshold`): health and breakers ignored.
    #[serde(default)]
    pub panic: bool,
    pub write_errors: u64,
}
