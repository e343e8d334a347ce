//! What the agent tells the outside: Prometheus metrics, health endpoints, status, logs.

pub mod http;
pub mod logs;
pub mod metrics;
pub mod status;
