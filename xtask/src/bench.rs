//! `cargo xtask bench`: the plumbing around `agent-bench` (written in the agent crate).

use crate::{cmd, setup, sys, workspace};

const DEFAULT_OUT: &str = "BENCHMARKS.md";

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    // BPF_PROG_TEST_RUN needs CAP_BPF / CAP_SYS_ADMIN.
    sys::require_root("cargo xtask bench (BPF_PROG_TEST_RUN)")?;
    let toolchain = setup::run()?;
    let mut bench = workspace::cargo(&toolchain);
    bench.args([
        "run",
        "--release",
        "--package",
        "agent",
        "--bin",
        "agent-bench",
        "--",
    ]);
    let user_chose_out = extra
        .iter()
        .any(|arg| arg == "--out" || arg.starts_with("--out="));
    if !user_chose_out {
        // Relative to the workspace root, where cargo runs.
        bench.args(["--out", DEFAULT_OUT]);
    }
    bench.args(extra);
    cmd::run(&mut bench)?;
    Ok(())
}
