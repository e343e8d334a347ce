//! The policy as the agent uses it: the model, reading and validation live in
//! `agent_common::policy` (shared with xtask and the tests, no eBPF toolchain needed); the
//! compile step, which turns a validated `Policy` into map entries, is here.

mod balance;
mod compile;
pub mod ids;
pub mod watch;

#[cfg(test)]
mod tests;

pub use agent_common::policy::rules::{ShapeCompileError, backend_key};
pub use agent_common::policy::*;
pub use balance::{CompiledLb, LbBackendPlan};
pub use compile::{
    ClassifyEntry, Compiled, CompiledBackend, CompiledService, compile, compile_backends,
};
