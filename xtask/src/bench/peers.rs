//! `cargo xtask bench peers [PART...]`: the agent side by side with the tools users would
//! pick instead (nftables and iptables for rate limits, HAProxy and nginx `stream` for L4
//! balancing and health checks), in one run, on veth / network-namespace topologies.
//!
//! Each part measures on its own topology and returns the Markdown of its subsection(s), with
//! links to the SVG charts it drew (`plot::bars`) into `target/bench-peers-plots/`. With no
//! part named, every part runs, the charts are copied to `tests/benchmarks/` and the section
//! [`SECTION`] of BENCHMARKS.md (`--out`) is replaced; with parts named (or when one failed),
//! each one's Markdown is printed and written to `target/bench-peers-PART.md`, its charts stay
//! in `target/`, and BENCHMARKS.md and its charts are left alone (a partial section would
//! replace the whole one).
//!
//! The peer tools are Debian packages, installed with apt-get when missing; when that fails
//! the parts still run and write the rows of the missing tool with the reason
//! ([`Tools::unavailable`]).

mod failfast;
mod lb;
mod limit;
mod plot;

use std::{fmt::Write as _, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

use crate::{build, setup, sys, workspace};

pub const SECTION: &str = "## Peers: the agent against nftables, iptables, HAProxy and nginx";
/// Where the published charts go, relative to the workspace root and so to BENCHMARKS.md.
const PLOTS_REL: &str = "tests/benchmarks";
/// Where the parts draw them, in the target directory (and so relative to
/// `target/bench-peers-PART.md`).
const DRAWN_REL: &str = "bench-peers-plots";
/// Repeats of each figure by default, and with `--quick`.
const REPEATS: usize = 5;
const QUICK_REPEATS: usize = 3;

/// What every part gets.
pub struct Ctx {
    /// The release agent binary.
    pub agent: PathBuf,
    /// The absolute directory the parts draw their SVGs in (`target/bench-peers-plots`).
    pub plots: PathBuf,
    /// Where the Markdown links them: relative to BENCHMARKS.md when every part runs (the
    /// charts are published there), else relative to `target/bench-peers-PART.md`.
    pub plots_rel: String,
    /// Each figure is the median of `repeats` runs, with their min and max.
    pub repeats: usize,
    /// Shorter durations, for a smoke run.
    pub quick: bool,
    /// "CPU model, N CPUs, kernel X", noted in each subsection.
    pub machine: String,
    /// Which peer tools are installed, and why not.
    pub tools: Tools,
}

/// A part: the Markdown of its subsection(s).
type Part = fn(&Ctx) -> Result<String>;

/// The parts, in the order of the section.
const PARTS: &[(&str, Part)] = &[
    ("limit", limit::run),
    ("lb", lb::run),
    ("failfast", failfast::run),
];

#[derive(Parser, Debug)]
#[command(name = "cargo xtask bench peers")]
struct Args {
    /// Parts to run alone (their Markdown goes to target/bench-peers-PART.md); none: all of
    /// them, and the section of BENCHMARKS.md is replaced.
    parts: Vec<String>,
    /// Runs per figure (its median, min and max); default 5, 3 with --quick.
    #[arg(long)]
    repeats: Option<usize>,
    /// Shorter durations: a smoke run, not figures to publish.
    #[arg(long)]
    quick: bool,
    /// The agent binary to measure; default: built here, release.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The Markdown file whose section is replaced (or appended).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
}

pub fn run(extra: &[String]) -> Result<()> {
    let args = match Args::try_parse_from(
        std::iter::once("peers".to_owned()).chain(extra.iter().cloned()),
    ) {
        Ok(args) => args,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            print!("{e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let selected = select(&args.parts)?;
    sys::require_root("cargo xtask bench peers (network namespaces, nftables, the agent)")?;
    let toolchain = setup::run()?;
    let tools = Tools::install();
    let agent = match &args.agent_bin {
        Some(bin) => bin.clone(),
        None => build::agent_binary(&toolchain, true)?,
    };
    let target = workspace::target_dir()?;
    let plots = target.join(DRAWN_REL);
    // Charts of an earlier run must not be published with this one's.
    if plots.exists() {
        std::fs::remove_dir_all(&plots).with_context(|| format!("emptying {}", plots.display()))?;
    }
    std::fs::create_dir_all(&plots).with_context(|| format!("creating {}", plots.display()))?;
    let ctx = Ctx {
        agent,
        plots,
        plots_rel: if args.parts.is_empty() {
            PLOTS_REL
        } else {
            DRAWN_REL
        }
        .to_owned(),
        repeats: args
            .repeats
            .unwrap_or(if args.quick { QUICK_REPEATS } else { REPEATS })
            .max(1),
        quick: args.quick,
        machine: machine(),
        tools,
    };

    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (name, part) in &selected {
        println!("bench peers: {name}");
        match part(&ctx) {
            Ok(markdown) => done.push((*name, markdown)),
            Err(e) => {
                eprintln!("bench peers: {name} failed: {e:#}");
                failed.push(format!("{name}: {e:#}"));
            }
        }
    }
    if args.parts.is_empty() && failed.is_empty() {
        publish_plots(&ctx.plots, &workspace::root().join(PLOTS_REL))?;
        return super::publish(&args.out, &section(&ctx, &done));
    }
    // Parts alone, or some failed: the section would be partial; each part's Markdown is
    // kept apart, with its charts.
    for (name, markdown) in &done {
        println!("\n{markdown}");
        let file = target.join(format!("bench-peers-{name}.md"));
        std::fs::write(&file, markdown).with_context(|| format!("writing {}", file.display()))?;
        println!("written to {}", file.display());
    }
    if !failed.is_empty() {
        bail!("bench peers: {}", failed.join("; "));
    }
    Ok(())
}

/// Copies every chart drawn in `from` into `to` (BENCHMARKS.md's charts).
fn publish_plots(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, to.join(name))
                .with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
        }
    }
    Ok(())
}

/// The parts named (all when none), in the section's order; an unknown name is an error.
fn select(names: &[String]) -> Result<Vec<(&'static str, Part)>> {
    if let Some(unknown) = names.iter().find(|n| !PARTS.iter().any(|(p, _)| p == n)) {
        let known: Vec<&str> = PARTS.iter().map(|(p, _)| *p).collect();
        bail!(
            "no part {unknown:?} in bench peers (parts: {})",
            known.join(", ")
        );
    }
    Ok(PARTS
        .iter()
        .filter(|(p, _)| names.is_empty() || names.iter().any(|n| n == p))
        .copied()
        .collect())
}

/// The whole section: how it was measured, then each part's subsections.
fn section(ctx: &Ctx, parts: &[(&str, String)]) -> String {
    let mut s = format!("{SECTION}\n\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench peers` at {}, on {}. Each figure is the median of {} runs, \
         with their min-max. The charts are in `{}/`.\n",
        super::git_head(),
        ctx.machine,
        ctx.repeats,
        ctx.plots_rel,
    );
    for (_, markdown) in parts {
        s.push_str(markdown.trim_end());
        s.push_str("\n\n");
    }
    s
}

/// The median, min and max of `v`; zeros when it is empty.
pub fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "CPU model, N CPUs, kernel X".
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = super::first_word("/proc/sys/kernel/osrelease");
    format!("{model}, {cpus} CPUs, kernel {kernel}")
}

/// The peer tools, by the Debian packages that bring them; a tool's name is its first
/// package's.
const TOOLS: &[&[&str]] = &[
    &["nftables"],
    &["iptables"],
    &["haproxy"],
    // Debian 12 builds nginx's `stream` module as a module package of its own.
    &["nginx", "libnginx-mod-stream"],
];
// No iperf3 or hping3: the floods come from the project's own generator
// (`agent_tests::traffic`, `SendMethod::Spoofed`), which the rate-limiting part documents.

/// Which peer tools are missing after the install, and why.
pub struct Tools {
    /// (tool, why it is missing).
    missing: Vec<(&'static str, String)>,
}

impl Tools {
    /// Installs the missing packages with apt-get; what is still missing afterwards is noted
    /// with apt-get's error.
    fn install() -> Tools {
        let all: Vec<&str> = TOOLS.iter().flat_map(|t| t.iter().copied()).collect();
        let wanted = setup::missing_packages(&all);
        let apt = if wanted.is_empty() {
            Ok(())
        } else {
            setup::apt_install(&wanted).map_err(|e| format!("{e:#}"))
        };
        let missing = TOOLS
            .iter()
            .filter_map(|packages| {
                let absent = setup::missing_packages(packages);
                if absent.is_empty() {
                    return None;
                }
                let why = match &apt {
                    Err(e) => format!("apt-get install failed: {e}"),
                    Ok(()) => "apt-get install did not install it".to_owned(),
                };
                Some((
                    packages[0],
                    format!("{} not installed: {why}", absent.join(", ")),
                ))
            })
            .collect();
        Tools { missing }
    }

    /// `Some(why)` when `tool` (a package name of [`TOOLS`], e.g. "haproxy") is not
    /// installed: its rows read "skipped: WHY".
    pub fn unavailable(&self, tool: &str) -> Option<&str> {
        debug_assert!(
            TOOLS.iter().any(|t| t[0] == tool),
            "{tool} is not a peer tool"
        );
        self.missing
            .iter()
            .find(|(t, _)| *t == tool)
            .map(|(_, why)| why.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median_min_max(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(median_min_max(vec![4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(median_min_max(Vec::new()), (0.0, 0.0, 0.0));
    }

    #[test]
    fn parts_are_selected_by_name_in_the_section_order() {
        let all = select(&[]).unwrap();
        assert_eq!(all.len(), PARTS.len());
        let limit = select(&["limit".to_owned()]).unwrap();
        assert_eq!(limit.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["limit"]);
        let err = select(&["nope".to_owned()]).err().unwrap().to_string();
        assert!(err.contains("no part \"nope\""), "{err}");
    }
}
