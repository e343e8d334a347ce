//! The userspace agent: policy, datapath control, telemetry, and the `run` loop tying them.
//! `main.rs` only parses the command line; everything else lives here so tests reach it.

pub mod breaker;
pub mod cli;
pub mod commands;
pub mod config;
pub mod datapath;
pub mod degrade;
pub mod health;
pub mod http;
pub mod lb;
pub mod plan;
pub mod run;
pub mod state;
pub mod supervisor;
pub mod telemetry;
