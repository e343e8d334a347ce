//! `cargo xtask bench`: per-packet cost of the XDP program through BPF_PROG_TEST_RUN, next to
//! a trivial XDP program measured in the same run. Prints a table and writes it to a file.
//!
//! Each figure is the median, over `--samples` runs, of the kernel's own per-run average of a
//! BPF_PROG_TEST_RUN with `--repeat` repetitions of one 64-byte frame (the kernel times the
//! loop; syscall cost is not in it). One frame repeated means one key, hot in cache: the figure
//! is the cost of the path, not of cache misses across a large working set.
use std::{fmt::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use agent::{
    config,
    datapath::{Datapath, EBPF_BENCH_TRIVIAL},
};
use agent_common::{
    Bucket, BucketKey,
    classify::{PROTO_UDP, v4_mapped},
    maps::MAP_RL_BUCKETS,
};
use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Where the Markdown table goes.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Repetitions inside one BPF_PROG_TEST_RUN.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// BPF_PROG_TEST_RUN calls per figure; the median is reported.
    #[arg(long, default_value_t = 11)]
    samples: usize,
}

const SERVER: [u8; 4] = [198, 18, 0, 2];
const CLIENT: [u8; 4] = [198, 18, 1, 1];
const DPORT: u16 = 5000;
const SPORT: u16 = 40_000;

fn frame(sport: u16) -> Vec<u8> {
    let mut b = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let ip_len: u16 = 20 + 8 + 22;
    b.extend([0x45, 0]);
    b.extend(ip_len.to_be_bytes());
    b.extend([0, 1, 0, 0, 64, PROTO_UDP, 0, 0]);
    b.extend(CLIENT);
    b.extend(SERVER);
    b.extend(sport.to_be_bytes());
    b.extend(DPORT.to_be_bytes());
    b.extend(30u16.to_be_bytes());
    b.extend([0, 0]);
    b.resize(64, 0xab);
    b
}

fn policy(rate: &str, burst: u64, max_keys: u32) -> String {
    format!(
        r#"
version: 1
interfaces: [{{ name: lo }}]
services:
  - name: bench
    match: {{ address: 198.18.0.2/32, port: {DPORT}, protocol: udp }}
    rate_limit: {{ key: flow, rate: {rate}, burst: {burst}, max_keys: {max_keys} }}
"#
    )
}

fn median_ns(prog: &Xdp, data: &[u8], args: &Args) -> anyhow::Result<f64> {
    let mut v = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(data),
                repeat: args.repeat,
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN")?;
        v.push(duration_ns(r.duration));
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// The kernel reports the average per repetition, in whole ns.
fn duration_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// Fills the key table with `keys` flows of the service, the measured one among them.
fn fill(dp: &mut Datapath, keys: u32) -> anyhow::Result<()> {
    let mut table: HashMap<&mut MapData, BucketKey, Bucket> = dp
        .ebpf_mut()
        .map_mut(MAP_RL_BUCKETS)
        .context("key table")?
        .try_into()?;
    for i in 0..keys {
        // Distinct flows: vary the source address and port.
        let src = [198, 18, 1 + (i >> 16) as u8, (i >> 8) as u8];
        let mut key = BucketKey {
            service_id: 0,
            sport: (i & 0xffff) as u16,
            dport: DPORT,
            proto: PROTO_UDP,
            src: v4_mapped(src),
            dst: v4_mapped(SERVER),
            ..BucketKey::default()
        };
        if i == 0 {
            key.src = v4_mapped(CLIENT);
            key.sport = SPORT;
        }
        table.insert(key, Bucket { tat: 0 }, 0)?;
    }
    Ok(())
}

struct Row {
    keys: u32,
    admitted: f64,
    limited: f64,
}

fn measure_limiter(keys: u32, rate: &str, burst: u64, args: &Args) -> anyhow::Result<f64> {
    let policy = config::load_str(&policy(rate, burst, keys + 64), "bench.yaml")
        .map_err(|e| anyhow::anyhow!("bench policy:\n{e}"))?;
    let compiled = config::compile(&policy);
    let mut dp = Datapath::load(compiled.max_keys)?;
    dp.apply(&compiled)?;
    fill(&mut dp, keys)?;
    median_ns(dp.xdp_program()?, &frame(SPORT), args)
}

fn trivial(args: &Args) -> anyhow::Result<f64> {
    if EBPF_BENCH_TRIVIAL.is_empty() {
        bail!("built with AYA_BUILD_SKIP: no bench object");
    }
    let mut ebpf = Ebpf::load(EBPF_BENCH_TRIVIAL)?;
    let prog: &mut Xdp = ebpf
        .program_mut("bench_trivial")
        .context("bench_trivial program")?
        .try_into()?;
    prog.load()?;
    median_ns(prog, &frame(SPORT), args)
}

fn run(args: &Args) -> anyhow::Result<String> {
    let base = trivial(args)?;
    let mut rows = Vec::new();
    for keys in [1, 10_000, 1_000_000] {
        eprintln!("measuring with {keys} keys ...");
        rows.push(Row {
            keys,
            // Never runs out of tokens: every packet takes the compare-and-swap.
            admitted: measure_limiter(keys, "1000000000/s", 1_000_000, args)?,
            // Out of tokens after the burst: the deny path, no write.
            limited: measure_limiter(keys, "1/s", 1, args)?,
        });
    }
    let base_after = trivial(args)?;

    let mut t = String::new();
    writeln!(t, "# Benchmarks\n")?;
    writeln!(
        t,
        "Produced by `cargo xtask bench` (`agent-bench --repeat {} --samples {}`); figures are \
         medians of the kernel's per-run average over BPF_PROG_TEST_RUN, one 64-byte IPv4/UDP \
         frame repeated (one key, hot in cache). Machine: {}, kernel {}.\n",
        args.repeat,
        args.samples,
        cpu_model(),
        kernel()
    )?;
    writeln!(t, "## XDP per-packet cost\n")?;
    writeln!(
        t,
        "| path | keys in table | ns/packet | x trivial |\n|---|---:|---:|---:|"
    )?;
    writeln!(t, "| trivial XDP (count, pass) | - | {base:.1} | 1.00 |")?;
    for r in &rows {
        writeln!(
            t,
            "| limiter, admitted (CAS) | {} | {:.1} | {:.2} |",
            r.keys,
            r.admitted,
            r.admitted / base
        )?;
    }
    for r in &rows {
        writeln!(
            t,
            "| limiter, over limit (drop) | {} | {:.1} | {:.2} |",
            r.keys,
            r.limited,
            r.limited / base
        )?;
    }
    writeln!(
        t,
        "| trivial XDP, measured again at the end | - | {base_after:.1} | {:.2} |",
        base_after / base
    )?;
    let (lo, hi) = rows.iter().fold((f64::MAX, 0f64), |(lo, hi), r| {
        (lo.min(r.admitted), hi.max(r.admitted))
    });
    writeln!(
        t,
        "\nAdmitted path from 1 to 1,000,000 keys: {:.1}% spread (max/min - 1); \
         worst ratio to trivial: {:.2}x (goals: within 20% and at most 3x).",
        (hi / lo - 1.0) * 100.0,
        hi / base
    )?;
    Ok(t)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
        + &format!(
            ", {} CPUs",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        )
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(table) => {
            print!("{table}");
            if let Err(e) = std::fs::write(&args.out, &table) {
                eprintln!("agent-bench: writing {}: {e}", args.out.display());
                return ExitCode::FAILURE;
            }
            eprintln!("written to {}", args.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agent-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
