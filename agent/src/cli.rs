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
    /// Apply a policy: load and attach the datapath, pinned under agent.pin_path (an earlier
    /// agent's pins are adopted), serve /metrics and health endpoints. SIGHUP or a change of
    /// the file reloads it; SIGTERM/SIGINT exit and leave the datapath enforcing the last
    /// policy.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// On SIGTERM/SIGINT, detach the programs and remove the pins (as `agent uninstall`)
        /// instead of leaving the datapath running.
        #[arg(long)]
        detach_on_exit: bool,
        /// Start from empty maps: drop the pinned maps (token buckets, connection table,
        /// breaker states) before loading. Pinned links are kept and take the new programs.
        #[arg(long)]
        reset: bool,
    },
    /// Remove everything `agent run` left in the kernel: links, programs, pins under
    /// agent.pin_path, the egress filters (kernels before 6.6) and pacing qdiscs on the
    /// policy's interfaces. Refused while an agent runs on the same pin_path.
    Uninstall {
        /// The policy the agent ran (its pin_path and interfaces); without it, the default
        /// pin_path and only what is pinned there.
        #[arg(long, short)]
        config: Option<PathBuf>,
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
