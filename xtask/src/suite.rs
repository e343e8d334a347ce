//! `cargo xtask test`: the whole suite, the command CI runs (`.ci/run`).

use std::{
    fmt::Display,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{
    build, cmd, manifests, setup, sys,
    toolchain::Toolchain,
    vm,
    workspace::{self, AGENT_BIN_ENV, E2E_CRATE, UPGRADE_FROM_ENV},
};

const EBPF_CRATE: &str = "agent-ebpf";
const EBPF_TARGET: &str = "bpfel-unknown-none";
/// The kernel of the suite's VM pass: Debian 12's own.
const VM_KERNEL: &str = "6.1";

/// Environment for `cargo clippy`. agent/build.rs supports `AYA_BUILD_SKIP=1` (an empty object
/// is embedded), which makes a lone `cargo clippy` fast. Not set here on purpose: the build
/// script declares `rerun-if-env-changed=AYA_BUILD_SKIP`, so flipping it between clippy and the
/// test steps would rerun the script and recompile the agent twice per suite. Without it, clippy
/// builds the eBPF object once and every later step reuses that build-script run.
const CLIPPY_ENV: &[(&str, &str)] = &[];

pub fn run() -> anyhow::Result<()> {
    sys::require_root("cargo xtask test (BPF programs, network namespaces, packages)")?;
    let mut suite = Suite::default();
    let counts = std::cell::Cell::new(cmd::TestCounts::default());
    let tests = |command: &mut std::process::Command| {
        // Counted even when some failed: the closing line reports them.
        let (c, result) = cmd::run_tests(command);
        let mut total = counts.get();
        total.add(c);
        counts.set(total);
        result
    };

    let Some(toolchain) = suite.step("setup", setup::run) else {
        return suite.finish();
    };
    let cargo = |args: &[&str]| {
        let mut command = workspace::cargo(&toolchain);
        command.args(args);
        command
    };

    suite.step("fmt", || {
        cmd::run(&mut cargo(&["fmt", "--all", "--", "--check"]))
    });
    // agent-ebpf builds only for bpfel-unknown-none with nightly: it is linted on its own
    // target below, and left out of the host steps.
    suite.step("clippy (host)", || {
        let mut clippy = cargo(&[
            "clippy",
            "--workspace",
            "--exclude",
            EBPF_CRATE,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        clippy.envs(CLIPPY_ENV.iter().copied());
        cmd::run(&mut clippy)
    });
    suite.step("unused dependencies (cargo machete)", || {
        // Run directly: as `cargo machete` under `cargo xtask` it sees xtask's CARGO_PKG_NAME,
        // takes itself for a plain command and reads `machete` as the directory to analyze.
        let mut machete = std::process::Command::new(toolchain.bin_dir().join("cargo-machete"));
        machete.current_dir(workspace::root()).env_remove("CARGO");
        cmd::run(&mut machete)
    });
    suite.step("clippy (eBPF)", || {
        let mut clippy = workspace::nightly_cargo(&toolchain);
        clippy.args(["clippy", "--package", EBPF_CRATE, "--target", EBPF_TARGET]);
        clippy.args(["-Z", "build-std=core", "--", "-D", "warnings"]);
        cmd::run(&mut clippy)
    });
    // Host unit tests and the datapath tests (BPF_PROG_TEST_RUN, root) of the agent crate.
    suite.step("unit + datapath tests", || {
        tests(&mut cargo(&[
            "test",
            "--workspace",
            "--exclude",
            EBPF_CRATE,
            "--exclude",
            E2E_CRATE,
        ]))
    });
    // The datapath tests again inside QEMU on Debian 12's own kernel (6.1 LTS): every program
    // must load and behave on the kernels users run, not only on this machine's. The
    // end-to-end suite there, and 6.12, are `cargo xtask vm` (too long for CI under TCG).
    suite.step("datapath tests (VM 6.1)", || {
        let (c, result) = vm::run_suite(&toolchain, &[VM_KERNEL], vm::Suite::Datapath, None);
        let mut total = counts.get();
        total.add(c);
        counts.set(total);
        result
    });
    // The upgrade test's previous build, before the real one: both share the target directory,
    // and the real build must be the last to write target/release/agent.
    let upgrade_from = suite.step("build agent (variant)", || {
        build::upgrade_from_binary(&toolchain)
    });
    // The end-to-end tests run the agent as it ships (release): the scale tests hold it to the
    // issue's startup bound, which an unoptimized build misses (2.2 s for 1,000 services).
    let agent = suite.step("build agent (release)", || {
        build::agent_binary(&toolchain, true)
    });
    suite.step("deploy manifests", manifests::validate);
    suite.step("deploy manifests (schemas)", || {
        manifests::validate_schemas(&toolchain)
    });
    match &agent {
        Some(agent) => {
            suite.step("end-to-end tests", || {
                tests(&mut e2e(&toolchain, agent, upgrade_from.as_deref()))
            });
        }
        None => suite.skip("end-to-end tests", "the agent did not build"),
    }
    let result = suite.finish();
    // The plain closing line: every test of the suite, whatever the step.
    let c = counts.get();
    println!(
        "\ntests: {} passed, {} failed, {} skipped",
        c.passed, c.failed, c.ignored
    );
    result
}

/// Network-namespace tests: serial, because kernel state is shared. Without `upgrade_from`
/// (its build failed, and that step says so) the upgrade test reports that it did not run.
fn e2e(toolchain: &Toolchain, agent: &Path, upgrade_from: Option<&Path>) -> std::process::Command {
    let mut test = workspace::cargo(toolchain);
    test.args(["test", "--package", E2E_CRATE, "--", "--test-threads=1"])
        .env(AGENT_BIN_ENV, agent);
    if let Some(from) = upgrade_from {
        test.env(UPGRADE_FROM_ENV, from);
    }
    test
}

enum StepResult {
    Passed,
    Failed,
    Skipped(&'static str),
}

#[derive(Default)]
struct Suite {
    steps: Vec<(&'static str, StepResult, Duration)>,
}

impl Suite {
    /// Runs one step, reports it, and returns its value when it passed.
    fn step<T, E: Display>(
        &mut self,
        name: &'static str,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Option<T> {
        println!("\n==> {name}");
        let start = Instant::now();
        let result = f();
        let elapsed = start.elapsed();
        match result {
            Ok(value) => {
                println!("<== {name}: passed in {}", secs(elapsed));
                self.steps.push((name, StepResult::Passed, elapsed));
                Some(value)
            }
            Err(e) => {
                eprintln!("<== {name}: FAILED in {}: {e}", secs(elapsed));
                self.steps.push((name, StepResult::Failed, elapsed));
                None
            }
        }
    }

    fn skip(&mut self, name: &'static str, why: &'static str) {
        println!("\n==> {name}: skipped ({why})");
        self.steps
            .push((name, StepResult::Skipped(why), Duration::ZERO));
    }

    fn finish(self) -> anyhow::Result<()> {
        println!("\n{:<24} {:<8} {:>9}", "step", "result", "time");
        let mut failed = 0;
        let mut total = Duration::ZERO;
        for (name, result, elapsed) in &self.steps {
            total += *elapsed;
            let (result, note) = match result {
                StepResult::Passed => ("passed", String::new()),
                StepResult::Failed => {
                    failed += 1;
                    ("FAILED", String::new())
                }
                StepResult::Skipped(why) => ("skipped", format!("  ({why})")),
            };
            println!("{name:<24} {result:<8} {:>9}{note}", secs(*elapsed));
        }
        println!("{:<24} {:<8} {:>9}", "total", "", secs(total));
        if failed > 0 {
            bail!("{failed} of {} steps failed", self.steps.len());
        }
        Ok(())
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
