//! End-to-end test harness: network namespaces joined by veth, code run inside them, the
//! agent as a guarded child process, paced traffic and exact counting at the receiver, test
//! backends and the ways to break them, the agent's status as JSON, and waiting on a condition
//! with a deadline. Every timing bound comes from [`timing`] and scales with
//! `AGENT_TEST_TIME_SCALE`. `cargo xtask demo` is built on the same pieces.
//!
//! Everything here needs root (namespaces, raw sockets, SO_RCVBUFFORCE). Tests built on it
//! share kernel state and run serially: `cargo test -p agent-tests -- --test-threads=1`.

pub mod agent;
pub mod backend;
pub mod benchmarks;
pub mod breaker;
pub mod echo;
pub mod lan;
pub mod netns;
pub mod pins;
pub mod scale;
pub mod slow;
pub mod status;
pub mod timing;
pub mod traffic;
pub mod verify;
pub mod wait;
pub mod xdp;

pub use agent::{AgentProcess, TempDir, agent_bin, limit_verdicts, metric, require_metric};
pub use netns::{Netns, Topology};
pub use timing::Scaled;
pub use traffic::{
    RecvReport, SendMethod, SendReport, TcpTransfer, UdpFlood, UdpReceiver, UdpSender, tcp_transfer,
};
pub use verify::{KeyCount, check_counts, clock_slack};
