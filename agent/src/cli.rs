//! Command line: `agent check`, `agent run`, `agent status`, and the exit codes
//! (POLICY.md): 0 success, [`EXIT_RUNTIME`], [`EXIT_INVALID`].

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

/// A runtime failure (kernel, network, I/O).
pub const EXIT_RUNTIME: u8 = 1;
/// An invalid policy or command line.
pub const EXIT_INVALID: u8 = 2;

/// eBPF traffic shaper and health agent.
#[derive(Debug, Parser)]
#[command(name = "agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a policy without touching the kernel. Exit 0 when valid, 2 otherwise, with
    /// every error as FILE:LINE:COLUMN: FIELD.PATH: message.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Apply a policy: load and attach the datapath, serve /metrics and health endpoints.
    /// SIGHUP re-reads the file; SIGTERM/SIGINT detach and exit.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print services and counters of the running datapath.
    Status {
        /// The agent's `agent.listen` address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        addr: SocketAddr,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}
