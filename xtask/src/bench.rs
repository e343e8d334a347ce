//! `cargo xtask bench`: the plumbing around the two benchmarks. `agent-bench` (agent crate)
//! measures per-packet costs through BPF_PROG_TEST_RUN and writes the file; then
//! `breaker-bench` (agent-tests crate) measures the circuit breaker end to end with the agent
//! binary and replaces its own section of the same file.
//!
//! Extra arguments go to `agent-bench`, except `--rounds N`, `--connects N` and `--passive`,
//! which only `breaker-bench` has; `--out FILE` goes to both. Benchmarks of their own run
//! instead when named first: `scale` (scale.rs), `health` (health.rs), `restart`
//! (restart.rs), `reload` (reload.rs), `degrade` (degrade.rs) and `peers` (peers.rs).

mod degrade;
mod health;
mod peers;
mod reload;
mod restart;
mod scale;

use std::process::Command;

/// The `q` quantile (0 to 1) by nearest rank, shared with the tests' harnesses.
use agent_tests::benchmarks::quantile;

use crate::{build, cmd, setup, sys, toolchain::Toolchain, workspace};

const DEFAULT_OUT: &str = "BENCHMARKS.md";
/// breaker-bench's own options: (name, takes a value).
const BREAKER_ONLY: &[(&str, bool)] = &[
    ("--rounds", true),
    ("--connects", true),
    ("--passive", false),
];
const SHARED: &[(&str, bool)] = &[("--out", true)];

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    match extra.first().map(String::as_str) {
        Some("scale") => return scale::run(&extra[1..]),
        Some("health") => return health::run(&extra[1..]),
        Some("restart") => return restart::run(&extra[1..]),
        Some("reload") => return reload::run(&extra[1..]),
        Some("degrade") => return degrade::run(&extra[1..]),
        Some("peers") => return peers::run(&extra[1..]),
        _ => {}
    }
    // BPF_PROG_TEST_RUN, network namespaces and the agent need root.
    sys::require_root("cargo xtask bench (BPF_PROG_TEST_RUN, network namespaces)")?;
    let toolchain = setup::run()?;
    let args = Split::new(extra);

    let mut bench = release_bin(&toolchain, "agent", "agent-bench");
    bench.args(&args.xdp);
    cmd::run(&mut bench)?;

    // The agent binary as `cargo xtask test` builds it, in release like the benchmark: the
    // crate is already built by the step above.
    let agent = build::agent_binary(&toolchain, true)?;
    let mut breaker = release_bin(&toolchain, "agent-tests", "breaker-bench");
    breaker
        .args(&args.breaker)
        .env(workspace::AGENT_BIN_ENV, &agent);
    cmd::run(&mut breaker)?;
    Ok(())
}

/// `cargo run --release --package PACKAGE --bin BIN --`, in the workspace root.
fn release_bin(toolchain: &Toolchain, package: &str, bin: &str) -> Command {
    let mut run = workspace::cargo(toolchain);
    run.args(["run", "--release", "--package", package, "--bin", bin, "--"]);
    run
}

/// The extra arguments, split between the two benchmarks.
struct Split {
    xdp: Vec<String>,
    breaker: Vec<String>,
}

impl Split {
    fn new(extra: &[String]) -> Split {
        let mut split = Split {
            xdp: Vec::new(),
            breaker: Vec::new(),
        };
        let mut out_given = false;
        let mut args = extra.iter();
        while let Some(arg) = args.next() {
            let (name, inline_value) = match arg.split_once('=') {
                Some((name, _)) => (name, true),
                None => (arg.as_str(), false),
            };
            let known =
                |table: &[(&str, bool)]| table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
            // (to agent-bench, to breaker-bench, takes a value)
            let (xdp, breaker, takes_value) = if let Some(v) = known(BREAKER_ONLY) {
                (false, true, v)
            } else if let Some(v) = known(SHARED) {
                out_given = true;
                (true, true, v)
            } else {
                (true, false, false)
            };
            let mut words = vec![arg.clone()];
            if takes_value && !inline_value {
                words.extend(args.next().cloned());
            }
            if xdp {
                split.xdp.extend(words.iter().cloned());
            }
            if breaker {
                split.breaker.extend(words);
            }
        }
        if !out_given {
            // Relative to the workspace root, where cargo runs.
            for dest in [&mut split.xdp, &mut split.breaker] {
                dest.extend(["--out".to_owned(), DEFAULT_OUT.to_owned()]);
            }
        }
        split
    }
}

/// Prints a bench's section and writes it into `out` (relative to the workspace root), in
/// place of the section of the same title.
fn publish(out: &std::path::Path, section: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    println!("\n{section}");
    let out = if out.is_absolute() {
        out.to_path_buf()
    } else {
        workspace::root().join(out)
    };
    agent_tests::benchmarks::write_section(&out, section)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("written to {}", out.display());
    Ok(())
}

/// The commit a benchmark ran at (`git rev-parse --short HEAD`), or `unknown`.
fn git_head() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace::root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// The first word of the file at `path` (`/proc/loadavg`, ...), or `unknown`.
fn first_word(path: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(args: &[&str]) -> (Vec<String>, Vec<String>) {
        let owned: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let s = Split::new(&owned);
        (s.xdp, s.breaker)
    }

    #[test]
    fn arguments_go_to_the_benchmark_that_has_them() {
        assert_eq!(
            split(&[]),
            (
                vec!["--out".into(), "BENCHMARKS.md".into()],
                vec!["--out".into(), "BENCHMARKS.md".into()]
            )
        );
        assert_eq!(
            split(&["--repeat", "10", "--rounds", "2", "--passive", "--out=x.md"]),
            (
                vec!["--repeat".into(), "10".into(), "--out=x.md".into()],
                vec![
                    "--rounds".into(),
                    "2".into(),
                    "--passive".into(),
                    "--out=x.md".into()
                ]
            )
        );
        assert_eq!(
            split(&["--connects=5", "--out", "y.md", "--samples", "3"]),
            (
                vec![
                    "--out".into(),
                    "y.md".into(),
                    "--samples".into(),
                    "3".into()
                ],
                vec!["--connects=5".into(), "--out".into(), "y.md".into()]
            )
        );
    }
}
