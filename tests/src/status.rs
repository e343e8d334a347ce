//! The agent's state as `GET /status` serves it (JSON), for the tests and `cargo xtask demo`:
//! the agent's own types (`agent_common::status`), so a renamed field fails to compile here.

pub use agent_common::status::{
    BackendStatus, CounterJson, DropStatus, LbBackendView, ReloadAttempt, ReloadStatus,
    ServiceStatus, StatusReport,
};
