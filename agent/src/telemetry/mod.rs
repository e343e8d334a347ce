//! What the agent tells the outside, as data: Prometheus metrics, the status report, logs.
//! The HTTP endpoints serving them are `crate::http`.

pub mod logs;
pub mod metrics;
pub mod reload;
pub mod status;
