//! The agent's state as `GET /status` serves it (JSON), for the tests and `cargo xtask demo`.
//! The single import point of those types outside the agent.

// TODO(merge): replace this line and `mod copy` below with
// `pub use agent_common::status::{BackendStatus, CounterJson, DropStatus, LbBackendView,
// ServiceStatus, StatusReport};` (agent-common, feature `user`) once that module exists.
pub use copy::{
    BackendStatus, CounterJson, DropStatus, LbBackendView, ServiceStatus, StatusReport,
};

/// The fields the readers here use, copied from the agent's `telemetry::status`,
/// `backends::BackendStatus` and `balancer::LbBackendView` under the same names and types
/// (serde skips the fields left out); this crate must not depend on the agent.
mod copy {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
    pub struct StatusReport {
        pub ready: bool,
        pub policy_file: String,
        pub attachments: Vec<String>,
        pub services: Vec<ServiceStatus>,
        #[serde(default)]
        pub backends: Vec<BackendStatus>,
        #[serde(default)]
        pub lb_backends: Vec<LbBackendView>,
    }

    #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
    pub struct ServiceStatus {
        pub id: u32,
        pub name: String,
        pub passed: CounterJson,
        pub dropped: Vec<DropStatus>,
    }

    #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
    pub struct DropStatus {
        pub reason: String,
        pub counter: CounterJson,
    }

    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
    pub struct CounterJson {
        pub packets: u64,
        pub bytes: u64,
    }

    #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
    pub struct BackendStatus {
        pub service: String,
        pub address: String,
        /// `healthy` / `unhealthy`; `unchecked` without `health_check`.
        pub health: String,
        /// `closed` / `open` / `half_open`; `None` without `circuit_breaker`.
        pub breaker: Option<String>,
        /// Breaker transitions by `to/reason`.
        pub transitions: BTreeMap<String, u64>,
        /// The backend's id in the datapath when its breaker is enforced there.
        #[serde(default)]
        pub id: Option<u32>,
        /// Datapath packets toward the backend by action (`admitted`, `reject_rst`, ...).
        #[serde(default)]
        pub datapath: BTreeMap<String, u64>,
    }

    impl BackendStatus {
        /// Packets of one datapath action (0 when never seen).
        pub fn action(&self, action: &str) -> u64 {
            self.datapath.get(action).copied().unwrap_or(0)
        }
    }

    #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
    pub struct LbBackendView {
        pub service: String,
        pub address: String,
        pub configured: u32,
        /// The weight in the datapath now.
        pub effective: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the agent serves, abridged from a real `/status` (fields this copy leaves out
    /// included, as the agent sends them).
    #[test]
    fn reads_a_status_report() {
        let json = r#"{"ready":true,"policy_file":"p.yaml","attachments":["xdp (native) on veth-agent"],
            "services":[{"id":0,"name":"demo-udp","matches":"198.18.0.2/32 udp/5000","rate_limit":null,
              "passed":{"packets":1200,"bytes":9},"dropped":[{"reason":"rate_limit","counter":{"packets":30,"bytes":1}}],
              "passed_no_bucket":{"packets":0,"bytes":0}}],
            "global":[["seen",{"packets":5,"bytes":5}]],
            "backends":[{"service":"pay","address":"198.18.0.12:8080","health":"unhealthy","breaker":"open",
              "in_state_ms":5,"probes_ok":1,"probes_failed":3,"failures":{},"last_failure":null,
              "transitions":{"open/consecutive_failures":1},"latency_buckets":[],"latency_sum":0.0,
              "id":1,"datapath":{"reject_rst":42}}],
            "balancing":[],
            "lb_backends":[{"service":"shop","address":"198.18.0.23:8080","configured":200,"effective":50,
              "active":0,"new_flows":0,"packets":0,"bytes":0}]}"#;
        let report: StatusReport = serde_json::from_str(json).expect("a status report");
        assert_eq!(report.services[0].passed.packets, 1200);
        assert_eq!(report.services[0].dropped[0].reason, "rate_limit");
        let pay = &report.backends[0];
        assert_eq!(pay.breaker.as_deref(), Some("open"));
        assert_eq!(pay.transitions["open/consecutive_failures"], 1);
        assert_eq!((pay.action("reject_rst"), pay.action("trial")), (42, 0));
        assert_eq!(report.lb_backends[0].effective, 50);
    }
}
