//! Project automation, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! Every command except `setup` itself first runs the idempotent setup, so a fresh machine needs
//! nothing but `cargo xtask demo` or `cargo xtask test`.

mod bench;
mod build;
mod cmd;
#[cfg(test)]
mod cycles;
mod demo;
mod image;
mod manifests;
mod setup;
mod suite;
mod sys;
mod toolchain;
mod vm;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, test and demo the traffic-shaping agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build and the tests need; every step is skipped when already done.
    Setup,
    /// Build the host crates (the eBPF object is built by agent/build.rs).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// The whole suite, as CI runs it: fmt, clippy, unit and datapath tests, end-to-end tests.
    Test,
    /// The demo in two network namespaces, with live counters: a rate limit under a 5x flood,
    /// a payment path whose hung backend is refused in microseconds by its breaker, a flash
    /// sale balanced in the kernel over backends, one dying and ramping back, then a service
    /// whose slow backends make it fall back to a static answer, and come back.
    Demo(demo::Args),
    /// Run the benchmarks and write BENCHMARKS.md: per-packet costs (agent-bench), then the
    /// breaker's time to detect and recover, end to end (breaker-bench). `bench scale`: time
    /// to ready, map memory and LB cost at 1 to 10,000 balanced services; `bench health`: CPU
    /// per health-check probe, the agent against HAProxy on the same 4,000 backends; `bench
    /// restart`: traffic across a SIGKILL and an adopting restart, time to ready, agent RSS/CPU;
    /// `bench reload`: file save to the new policy in force, with 10 and 1,000 services;
    /// `bench degrade`: slow backends to new flows on the fallback, p50/max over 10 runs;
    /// `bench peers [limit|lb|failfast]`: the agent against nftables, iptables, HAProxy and
    /// nginx on one veth topology, with SVG charts in tests/benchmarks/.
    Bench {
        /// Extra arguments: `--rounds`, `--connects`, `--passive` go to breaker-bench, `--out`
        /// to both, the rest to agent-bench.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The datapath and end-to-end tests in QEMU on Debian's cloud kernels (default 6.1 and
    /// 6.12): one boot per kernel, a table of results per kernel at the end.
    Vm(vm::Args),
    /// The agent's container image (Dockerfile) with buildah or podman, installed with apt-get
    /// when missing; its base is bootstrapped from Debian's archive when no registry has it.
    Image(image::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup => setup::run().map(drop).map_err(Into::into),
        Command::Build { release } => build::run(release),
        Command::Test => suite::run(),
        Command::Demo(args) => demo::run(&args),
        Command::Bench { args } => bench::run(&args),
        Command::Vm(args) => vm::run(&args),
        Command::Image(args) => image::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The chain of causes on one line each; no backtrace: these are reports, not bugs.
        Err(e) => {
            eprintln!("error: {e:#}");
            if sys::interrupted() {
                ExitCode::from(130) // 128 + SIGINT, as shells report it
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
