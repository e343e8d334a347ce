//! Progress lines while the VMs run, and the tables, failures and closing line after.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::bail;

use super::{
    CPUS,
    guest::TIME_SCALE_ENV,
    kernel::Kernel,
    results::{self, Event, Transcript},
    run::Accel,
};
use crate::cmd::TestCounts;

/// Lines of each failure printed at the end (the logs under target/vm/runs keep everything).
const FAILURE_LINES_SHOWN: usize = 8;
const SLOWEST_SHOWN: usize = 5;
/// The heading of the section `cargo xtask vm` keeps in BENCHMARKS.md.
pub const BENCHMARKS_SECTION: &str = "## Test suites in VMs";

/// One kernel's boot and what it printed.
pub struct KernelRun {
    pub kernel: Kernel,
    pub transcript: Transcript,
    /// QEMU's exit; `None` when it was killed at the deadline.
    pub exited: Option<std::process::ExitStatus>,
    pub wall: Duration,
    pub logs: PathBuf,
    /// Test binaries the VM never reached.
    pub not_run: Vec<String>,
}

pub fn print_event(tag: &str, start: Instant, event: Event<'_>) {
    let at = clock(start.elapsed());
    match event {
        Event::Booted { uptime } => println!("vm[{tag}] {at}: booted in {uptime:.1}s"),
        Event::Test { binary, test } => println!(
            "vm[{tag}] {at}: {binary}: {} {} ({:.1}s)",
            test.name,
            test.outcome,
            test.took.as_secs_f64()
        ),
        Event::BinaryDone { run } => {
            let c = run.counts();
            if c == TestCounts::default() && run.abnormal_end().is_none() {
                return; // everything filtered out: nothing to say
            }
            println!(
                "vm[{tag}] {at}: {} done: {} passed, {} failed, {} skipped in {}{}",
                run.name,
                c.passed,
                c.failed,
                c.ignored,
                run.duration().map_or("?".into(), secs),
                match run.abnormal_end() {
                    Some(why) => format!(" ({why})"),
                    None => String::new(),
                }
            );
        }
        Event::Note(note) => println!("vm[{tag}] {at}: {note}"),
    }
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}", s / 60, s % 60)
}

fn secs(s: f64) -> String {
    if s >= 60.0 {
        format!("{}m{:04.1}s", (s / 60.0) as u64, s % 60.0)
    } else {
        format!("{s:.1}s")
    }
}

pub struct Report {
    pub accel: Accel,
    pub time_scale: u32,
    pub runs: Vec<KernelRun>,
}

impl KernelRun {
    /// Why this VM's run is incomplete, if it is.
    fn problem(&self) -> Option<String> {
        if self.exited.is_none() {
            return Some(format!(
                "was killed at the deadline (--timeout) after {}",
                secs(self.wall.as_secs_f64())
            ));
        }
        if self.transcript.booted.is_none() {
            return Some(format!(
                "never reached its init's test loop; see {}",
                self.logs.join("console.log").display()
            ));
        }
        if self.transcript.done.is_none() {
            return Some(format!(
                "stopped before its init finished; see {}",
                self.logs.join("console.log").display()
            ));
        }
        None
    }
}

impl Report {
    pub fn counts(&self) -> TestCounts {
        let mut total = TestCounts::default();
        for run in &self.runs {
            total.add(run.transcript.counts());
        }
        total
    }

    /// BENCHMARKS.md's section for this run: what each kernel's VM took, per test binary.
    pub fn markdown(&self, suite: &str) -> String {
        let mut t = format!(
            "{BENCHMARKS_SECTION}\n\nProduced by `cargo xtask vm --suite {suite}` ({}, {CPUS} \
             vCPUs, {TIME_SCALE_ENV}={}): one boot per kernel, the test binaries run serially in \
             the guest. Times are the guest's clock; *wall* is the whole VM, boot included.\n\n\
             | kernel | package | binary | passed | failed | skipped | time |\n\
             |---|---|---|---:|---:|---:|---:|\n",
            self.accel, self.time_scale
        );
        for run in &self.runs {
            let (spec, package) = (&run.kernel.spec, &run.kernel.package);
            for b in &run.transcript.binaries {
                let c = b.counts();
                t.push_str(&format!(
                    "| {spec} | {package} | {} | {} | {} | {} | {} |\n",
                    b.name,
                    c.passed,
                    c.failed,
                    c.ignored,
                    b.duration().map_or("?".into(), secs)
                ));
            }
            let c = run.transcript.counts();
            t.push_str(&format!(
                "| {spec} | {package} | **wall** | {} | {} | {} | {} |\n",
                c.passed,
                c.failed,
                c.ignored,
                secs(run.wall.as_secs_f64())
            ));
        }
        t
    }

    pub fn print(&self) {
        println!(
            "\nvm: results ({}, {CPUS} CPUs, {TIME_SCALE_ENV}={})",
            self.accel, self.time_scale
        );
        println!(
            "{:<8} {:<48} {:<20} {:>6} {:>6} {:>7} {:>10}",
            "kernel", "package", "version", "passed", "failed", "skipped", "time"
        );
        for run in &self.runs {
            let c = run.transcript.counts();
            println!(
                "{:<8} {:<48} {:<20} {:>6} {:>6} {:>7} {:>10}",
                run.kernel.spec,
                run.kernel.package,
                run.kernel.version,
                c.passed,
                c.failed,
                c.ignored,
                secs(run.wall.as_secs_f64())
            );
        }

        println!("\nvm: where the time went (guest clock)");
        println!(
            "{:<8} {:<24} {:>6} {:>6} {:>7} {:>10} {:>5}",
            "kernel", "step", "passed", "failed", "skipped", "time", "exit"
        );
        for run in &self.runs {
            let spec = &run.kernel.spec;
            if let Some(boot) = run.transcript.booted {
                println!("{spec:<8} {:<24} {:>34}", "boot", secs(boot));
            }
            for b in &run.transcript.binaries {
                let c = b.counts();
                if c == TestCounts::default() && b.abnormal_end().is_none() {
                    continue; // everything filtered out
                }
                println!(
                    "{spec:<8} {:<24} {:>6} {:>6} {:>7} {:>10} {:>5}",
                    b.name,
                    c.passed,
                    c.failed,
                    c.ignored,
                    b.duration().map_or("-".into(), secs),
                    b.exit.map_or("-".into(), |e| e.to_string()),
                );
            }
            let mut tests: Vec<_> = run
                .transcript
                .binaries
                .iter()
                .flat_map(|b| b.tests.iter().map(move |t| (b.name.as_str(), t)))
                .collect();
            tests.sort_by_key(|(_, t)| std::cmp::Reverse(t.took));
            let slowest: Vec<String> = tests
                .iter()
                .take(SLOWEST_SHOWN)
                .map(|(b, t)| format!("{b}::{} {}", t.name, secs(t.took.as_secs_f64())))
                .collect();
            if !slowest.is_empty() {
                println!("{spec:<8} slowest: {}", slowest.join(", "));
            }
        }

        let mut printed_header = false;
        let mut header = || {
            if !printed_header {
                println!("\nvm: failures");
                printed_header = true;
            }
        };
        for run in &self.runs {
            let spec = &run.kernel.spec;
            if let Some(problem) = run.problem() {
                header();
                println!("{spec}: the VM {problem}");
            }
            for note in &run.transcript.notes {
                header();
                println!("{spec}: {note}");
            }
            if !run.not_run.is_empty() {
                header();
                println!("{spec}: not run: {}", run.not_run.join(", "));
            }
            for b in &run.transcript.binaries {
                for t in b
                    .tests
                    .iter()
                    .filter(|t| t.outcome == results::Outcome::Failed)
                {
                    header();
                    println!("{spec} {}::{}", b.name, t.name);
                    let lines = b
                        .failures
                        .iter()
                        .find(|f| f.test == t.name)
                        .map(|f| f.lines.as_slice())
                        .unwrap_or_default();
                    for line in lines.iter().take(FAILURE_LINES_SHOWN) {
                        println!("    {line}");
                    }
                }
                if let Some(why) = b.abnormal_end() {
                    header();
                    println!("{spec} {}: {why}", b.name);
                }
            }
        }
        let c = self.counts();
        println!(
            "\nvm: {} passed, {} failed, {} skipped",
            c.passed, c.failed, c.ignored
        );
    }

    pub fn verdict(&self) -> anyhow::Result<()> {
        let unfinished: Vec<&str> = self
            .runs
            .iter()
            .filter(|r| r.problem().is_some() || !r.not_run.is_empty())
            .map(|r| r.kernel.spec.as_str())
            .collect();
        let failed = self.counts().failed;
        match (failed, unfinished.is_empty()) {
            (0, true) => Ok(()),
            (0, false) => bail!("the VM of {} did not finish", unfinished.join(", ")),
            (n, true) => bail!("{n} tests failed in the VMs"),
            (n, false) => bail!(
                "{n} tests failed in the VMs, and the VM of {} did not finish",
                unfinished.join(", ")
            ),
        }
    }
}
