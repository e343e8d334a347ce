//! `cargo xtask bench`: per-packet cost of the XDP program through BPF_PROG_TEST_RUN, next to
//! a trivial XDP program measured in the same run. Prints a table and writes it to a file.
//!
//! Each figure is the median, over `--samples` runs, of the kernel's own per-run average of a
//! BPF_PROG_TEST_RUN with `--repeat` repetitions of one 64-byte frame (the kernel times the
//! loop; syscall cost is not in it). One frame repeated means one key, hot in cache: the figure
//! is the cost of the path, not of cache misses across a large working set.
use std::{fmt::Write as _, path::PathBuf, process::ExitCode, time::Instant};

use agent::{
    config,
    datapath::{Datapath, EBPF_BENCH_TRIVIAL},
    lb::{backend_key, maglev},
};
use agent_common::{
    Bucket, BucketKey, ServiceConfig,
    breaker::{BackendKey, BackendState, F_DROP, F_PASSIVE, STATE_CLOSED, STATE_OPEN, port_bit},
    classify::{PROTO_TCP, PROTO_UDP, generation_slot, v4_mapped},
    degrade::MODE_FALLBACK,
    maps::{MAP_BACKEND_PORTS, MAP_BACKENDS, MAP_RL_BUCKETS, MAP_SVC_CFG},
};
use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{TestRun, TestRunOptions, TestRunResult, Xdp},
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
    /// Only the load-balancing rows (and the trivial program run the same way), this many
    /// times over; printed, not written to `--out`. For profiling and before/after pairs.
    #[arg(long)]
    lb_only: Option<usize>,
}

const SERVER: [u8; 4] = [198, 18, 0, 2];
const CLIENT: [u8; 4] = [198, 18, 1, 1];
const DPORT: u16 = 5000;
const SPORT: u16 = 40_000;

fn frame(sport: u16) -> Vec<u8> {
    frame_to(SERVER, sport)
}

fn frame_to(dst: [u8; 4], sport: u16) -> Vec<u8> {
    let mut b = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let ip_len: u16 = 20 + 8 + 22;
    b.extend([0x45, 0]);
    b.extend(ip_len.to_be_bytes());
    b.extend([0, 1, 0, 0, 64, PROTO_UDP, 0, 0]);
    b.extend(CLIENT);
    b.extend(dst);
    b.extend(sport.to_be_bytes());
    b.extend(DPORT.to_be_bytes());
    b.extend(30u16.to_be_bytes());
    b.extend([0, 0]);
    b.resize(64, 0xab);
    b
}

/// A TCP SYN from the client to `dst:DPORT`, 64 bytes.
fn syn_to(dst: [u8; 4]) -> Vec<u8> {
    let mut b = frame_to(dst, SPORT);
    b[23] = PROTO_TCP;
    b[16..18].copy_from_slice(&(20u16 + 20 + 10).to_be_bytes());
    let tcp = 34;
    b[tcp + 4..tcp + 8].copy_from_slice(&1u32.to_be_bytes()); // seq
    b[tcp + 8..tcp + 12].copy_from_slice(&0u32.to_be_bytes()); // ack
    b[tcp + 12] = 5 << 4;
    b[tcp + 13] = 0x02; // SYN
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
  - name: unlimited
    match: {{ address: 198.18.0.3/32, port: {DPORT}, protocol: udp }}
"#
    )
}

/// The burst of the admitting limiter rows at 1e9/s: 100 ms, longer than four ticks of the
/// coarse clock at any `CONFIG_HZ` of 100 or more (the rows measure the coarse-clock path),
/// and never exhausted by a run of `--repeat` packets.
const ADMIT_BURST: u64 = 100_000_000;
/// A burst of 1 ms at 1e9/s, shorter than four ticks at any `CONFIG_HZ` up to 1000: the
/// precise-clock path (`agent_common::limit::COARSE_CLOCK_MIN_TICKS`).
const PRECISE_BURST: u64 = 1_000_000;

/// Address of the service without a limit, and one no service matches.
const UNLIMITED: [u8; 4] = [198, 18, 0, 3];
const NOWHERE: [u8; 4] = [198, 19, 0, 1];

/// One figure, two ways. `kernel`: the kernel's own per-repetition time of BPF_PROG_TEST_RUN,
/// program runs only, truncated to whole ns (so +-1 ns). `wall`: the call's wall time divided
/// by the repetitions, which also holds the test harness's per-repetition frame set-up (about
/// 20 ns here), the cost TOOLCHAIN.md's first figures were taken with.
#[derive(Clone, Copy)]
struct Measure {
    kernel: f64,
    wall: f64,
}

/// Medians over `--samples` calls of `--repeat` repetitions of one frame, through XDP or TC.
fn measure<P>(prog: &P, data: &[u8], args: &Args) -> anyhow::Result<Measure>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut kernel = Vec::with_capacity(args.samples);
    let mut wall = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let start = Instant::now();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(data),
                repeat: args.repeat,
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN")?;
        wall.push(start.elapsed().as_secs_f64() * 1e9 / f64::from(args.repeat));
        kernel.push(r.duration.as_secs_f64() * 1e9);
    }
    Ok(Measure {
        kernel: median(kernel),
        wall: median(wall),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    admitted: Measure,
    limited: Measure,
}

fn measure_limiter(keys: u32, rate: &str, burst: u64, args: &Args) -> anyhow::Result<Measure> {
    let policy = config::load_str(&policy(rate, burst, keys + 64), "bench.yaml")
        .map_err(|e| anyhow::anyhow!("bench policy:\n{e}"))?;
    let compiled = config::compile(&policy);
    let mut dp = Datapath::load(compiled.max_keys)?;
    dp.apply(&compiled)?;
    fill(&mut dp, keys)?;
    measure(dp.xdp_program()?, &frame(SPORT), args)
}

/// A baseline program of the bench object: `bench_trivial` or `bench_ktime`.
fn baseline(name: &str, args: &Args) -> anyhow::Result<Measure> {
    if EBPF_BENCH_TRIVIAL.is_empty() {
        bail!("built with AYA_BUILD_SKIP: no bench object");
    }
    let mut ebpf = Ebpf::load(EBPF_BENCH_TRIVIAL)?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("{name} program"))?
        .try_into()?;
    prog.load()?;
    measure(prog, &frame(SPORT), args)
}

/// The shaping path on TC egress: one flow of a shaped service whose packets are all paced
/// (the rate so high that the key never reaches the horizon: every packet takes the
/// compare-and-swap and gets its `tstamp`), one whose packets are all past the horizon
/// (dropped before any write), and the same frame to the service without shaping.
fn shaping_rows(args: &Args) -> anyhow::Result<Vec<(&'static str, Measure)>> {
    let text = format!(
        r#"
version: 1
interfaces: [{{ name: lo, direction: egress }}]
services:
  - name: paced
    match: {{ address: 198.18.0.2/32, port: {DPORT}, protocol: udp }}
    shaping: {{ rate: 100Gbit/s, key: flow, horizon: 2s }}
  - name: unlimited
    match: {{ address: 198.18.0.3/32, port: {DPORT}, protocol: udp }}
  - name: full
    match: {{ address: 198.18.0.4/32, port: {DPORT}, protocol: udp }}
    shaping: {{ rate: 1KB/s, key: flow, horizon: 1ms }}
"#
    );
    let policy = config::load_str(&text, "bench-shaping.yaml")
        .map_err(|e| anyhow::anyhow!("bench policy:\n{e}"))?;
    let compiled = config::compile(&policy);
    let mut dp = Datapath::load_for(&compiled)?;
    dp.apply(&compiled)?;
    let prog = dp.tc_program()?;
    Ok(vec![
        (
            "TC egress: service without shaping",
            measure(prog, &frame_to(UNLIMITED, SPORT), args)?,
        ),
        (
            "TC egress: shaped, paced (key lookup, CAS, tstamp)",
            measure(prog, &frame(SPORT), args)?,
        ),
        (
            "TC egress: shaped, past the horizon (drop)",
            measure(prog, &frame_to([198, 18, 0, 4], SPORT), args)?,
        ),
    ])
}

/// Paths of the agent's program that stop before the limiter, for the breakdown.
fn stages(args: &Args) -> anyhow::Result<Vec<(&'static str, Measure)>> {
    let policy = config::load_str(&policy("10/s", 10, 64), "bench.yaml")
        .map_err(|e| anyhow::anyhow!("bench policy:\n{e}"))?;
    let compiled = config::compile(&policy);
    let mut dp = Datapath::load(compiled.max_keys)?;
    dp.apply(&compiled)?;
    let prog = dp.xdp_program()?;
    let mut arp = frame(SPORT);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    Ok(vec![
        ("non-IP (parse Ethernet, pass)", measure(prog, &arp, args)?),
        (
            "IPv4/UDP, no service (parse, trie miss)",
            measure(prog, &frame_to(NOWHERE, SPORT), args)?,
        ),
        (
            "IPv4/UDP, service without limit (parse, trie hit, config)",
            measure(prog, &frame_to(UNLIMITED, SPORT), args)?,
        ),
    ])
}

/// Sets the prefilter bit of `DPORT`: some backend listens on that port.
fn mark_port(dp: &mut Datapath) -> anyhow::Result<()> {
    let mut ports: Array<&mut MapData, u32> = dp
        .ebpf_mut()
        .map_mut(MAP_BACKEND_PORTS)
        .context("BACKEND_PORTS")?
        .try_into()?;
    let (word, mask) = port_bit(DPORT);
    ports.set(word, mask, 0)?;
    Ok(())
}

/// The breaker on the path of a TCP SYN toward the service without a limit: every TCP/UDP
/// packet reads the port prefilter; one toward a backend port also looks its destination up
/// in `BACKENDS`; a backend's state decides the rest.
fn breaker_rows(args: &Args) -> anyhow::Result<Vec<(&'static str, Measure)>> {
    let policy = config::load_str(&policy("10/s", 10, 64), "bench.yaml")
        .map_err(|e| anyhow::anyhow!("bench policy:\n{e}"))?;
    let compiled = config::compile(&policy);
    let mut dp = Datapath::load(compiled.max_keys)?;
    dp.apply(&compiled)?;
    let syn = syn_to(UNLIMITED);
    let mut rows = vec![(
        "TCP SYN, no backend on the port (prefilter miss)",
        measure(dp.xdp_program()?, &syn, args)?,
    )];
    mark_port(&mut dp)?;
    rows.push((
        "TCP SYN, a backend port but not a backend address (hash miss)",
        measure(dp.xdp_program()?, &syn, args)?,
    ));
    let cases: [(&'static str, u32, u32); 4] = [
        ("TCP SYN to a closed backend (hit, pass)", STATE_CLOSED, 0),
        (
            "TCP SYN to a closed backend, passive (SYN tracked)",
            STATE_CLOSED,
            F_PASSIVE,
        ),
        (
            "TCP SYN to an open backend, on_open: drop",
            STATE_OPEN,
            F_DROP,
        ),
        (
            "TCP SYN to an open backend, reject (RST built, XDP_TX)",
            STATE_OPEN,
            0,
        ),
    ];
    for (what, state, flags) in cases {
        let mut backends: HashMap<&mut MapData, BackendKey, BackendState> = dp
            .ebpf_mut()
            .map_mut(MAP_BACKENDS)
            .context("BACKENDS")?
            .try_into()?;
        let key = BackendKey {
            addr: v4_mapped(UNLIMITED),
            port: DPORT,
            proto: PROTO_TCP,
            _pad: 0,
        };
        let value = BackendState {
            state,
            flags,
            quota: if state == STATE_CLOSED { u32::MAX } else { 0 },
            ..BackendState::default()
        };
        backends.insert(key, value, 0)?;
        rows.push((what, measure(dp.xdp_program()?, &syn, args)?));
    }
    Ok(rows)
}

/// The VIP of the balanced service of [`lb_rows`], its port, and its two backends.
const VIP: [u8; 4] = [198, 18, 0, 4];
const LB_BACKENDS: [[u8; 4]; 2] = [[198, 18, 3, 1], [198, 18, 3, 2]];
const BACKEND_PORT: u16 = 8080;
/// Distinct flows of the first-packet row, each run once.
const LB_NEW_FLOWS: u16 = 5_000;

/// A TCP segment with `flags` from `src:sport` to `dst:dport`, 64 bytes.
fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut b = syn_to(dst);
    b[26..30].copy_from_slice(&src);
    b[34..36].copy_from_slice(&sport.to_be_bytes());
    b[36..38].copy_from_slice(&dport.to_be_bytes());
    b[34 + 13] = flags;
    b
}

/// Medians of single runs (`repeat` 1) of each frame once: what a packet costs when every one
/// is a new flow (a repeated frame would be one flow, new only the first time).
fn measure_each(prog: &Xdp, frames: &[Vec<u8>]) -> anyhow::Result<Measure> {
    let mut kernel = Vec::with_capacity(frames.len());
    let mut wall = Vec::with_capacity(frames.len());
    for f in frames {
        let start = Instant::now();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(f),
                repeat: 1,
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN")?;
        wall.push(start.elapsed().as_secs_f64() * 1e9);
        kernel.push(r.duration.as_secs_f64() * 1e9);
    }
    Ok(Measure {
        kernel: median(kernel),
        wall: median(wall),
    })
}

/// Load balancing through XDP (a Maglev service of two backends): a new flow's first packet
/// (pick, two connection-table inserts, then the NAT stage), an established flow's packet
/// (lookup, NAT), a backend's reply (reverse NAT), each over distinct flows run once; and the
/// trivial program run once the same way, for scale.
fn lb_rows() -> anyhow::Result<Vec<(String, Measure)>> {
    let (dp, _) = balanced(&lb_policy(""), "bench-lb.yaml")?;
    let prog = dp.xdp_program()?;

    // Each flow's SYN once, noting the backend it was rewritten to.
    let syns: Vec<Vec<u8>> = (0..LB_NEW_FLOWS)
        .map(|i| tcp(CLIENT, 20_000 + i, VIP, DPORT, 0x02))
        .collect();
    let mut backend_of = Vec::with_capacity(usize::from(LB_NEW_FLOWS));
    let first = measure_each_out(prog, &syns, |i, out| {
        let dst: [u8; 4] = out[30..34].try_into()?;
        if !LB_BACKENDS.contains(&dst) || out[36..38] != BACKEND_PORT.to_be_bytes() {
            bail!("flow {i}: the SYN came out to {dst:?}, not to a backend");
        }
        backend_of.push(dst);
        Ok(())
    })?;
    // The same flows again (each has its entries), and each backend's reply.
    let acks: Vec<Vec<u8>> = (0..LB_NEW_FLOWS)
        .map(|i| tcp(CLIENT, 20_000 + i, VIP, DPORT, 0x10))
        .collect();
    let replies: Vec<Vec<u8>> = (0..LB_NEW_FLOWS)
        .zip(&backend_of)
        .map(|(i, b)| tcp(*b, BACKEND_PORT, CLIENT, 20_000 + i, 0x12))
        .collect();
    let established = measure_each(prog, &acks)?;
    let reply = measure_each(prog, &replies)?;
    let trivial = {
        let mut ebpf = Ebpf::load(EBPF_BENCH_TRIVIAL)?;
        let p: &mut Xdp = ebpf
            .program_mut("bench_trivial")
            .context("bench_trivial")?
            .try_into()?;
        p.load()?;
        measure_each(p, &acks)?
    };
    Ok(vec![
        ("trivial XDP [run once each]".into(), trivial),
        (
            "agent: LB, first packet of a new flow (pick, 2 inserts, DNAT) [run once each]".into(),
            first,
        ),
        (
            "agent: LB, established flow (lookup, DNAT) [run once each]".into(),
            established,
        ),
        (
            "agent: LB, backend's reply (reverse lookup, source NAT) [run once each]".into(),
            reply,
        ),
    ])
}

/// The fallback backends of [`degrade_rows`]' companion service.
const FALLBACK_BACKENDS: [[u8; 4]; 2] = [[198, 18, 9, 1], [198, 18, 9, 2]];

/// Runs each frame once (as [`measure_each`]) with room for the frame that comes out, and
/// hands `check` each frame's index and what came out.
fn measure_each_out(
    prog: &Xdp,
    frames: &[Vec<u8>],
    mut check: impl FnMut(usize, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Measure> {
    let mut kernel = Vec::with_capacity(frames.len());
    let mut wall = Vec::with_capacity(frames.len());
    for (i, f) in frames.iter().enumerate() {
        let mut out = vec![0u8; f.len()];
        let start = Instant::now();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(f),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN")?;
        wall.push(start.elapsed().as_secs_f64() * 1e9);
        kernel.push(r.duration.as_secs_f64() * 1e9);
        check(i, &out)?;
    }
    Ok(Measure {
        kernel: median(kernel),
        wall: median(wall),
    })
}

/// Runs each frame once (as [`measure_each`]), checking each left toward one of `among`.
fn measure_each_to(prog: &Xdp, frames: &[Vec<u8>], among: &[[u8; 4]]) -> anyhow::Result<Measure> {
    measure_each_out(prog, frames, |i, out| {
        let dst: [u8; 4] = out[30..34].try_into()?;
        if !among.contains(&dst) {
            bail!("frame {i}: came out to {dst:?}, not to one of {among:?}");
        }
        Ok(())
    })
}

/// The policy of [`lb_rows`]: the Maglev service `lb` on [`VIP`] with two backends
/// ([`LB_BACKENDS`]), then `more` (further services, YAML list items).
fn lb_policy(more: &str) -> String {
    format!(
        r#"
version: 1
interfaces: [{{ name: lo }}]
services:
  - name: lb
    match: {{ address: 198.18.0.4, port: {DPORT}, protocol: tcp }}
    backends:
      - address: 198.18.3.1:{BACKEND_PORT}
      - address: 198.18.3.2:{BACKEND_PORT}
    load_balancing: {{ algorithm: maglev, table_size: 211 }}
{more}"#
    )
}

/// `text` (backends on `BACKEND_PORT`) compiled and written the way the agent does it, its
/// balanced services installed.
fn balanced(text: &str, file: &str) -> anyhow::Result<(Datapath, config::Compiled)> {
    let policy = config::load_str(text, file).map_err(|e| anyhow::anyhow!("bench policy:\n{e}"))?;
    let compiled = config::compile(&policy);
    let mut dp = Datapath::load_for(&compiled)?;
    dp.apply(&compiled)?;
    dp.mark_ports([BACKEND_PORT])?;
    let mut maps = dp.lb_maps()?;
    agent::lb::balancer::install(&mut maps, &compiled.lb)?;
    Ok((dp, compiled))
}

/// Writes the companion link the agent's plan writes (`ServiceConfig::fallback`) into the
/// live `SVC_CFG` entry of `parent`.
fn link(dp: &mut Datapath, parent: u32, companion: u32) -> anyhow::Result<()> {
    let slot = generation_slot(parent, dp.generation());
    let mut cfg: Array<&mut MapData, ServiceConfig> = dp
        .ebpf_mut()
        .map_mut(MAP_SVC_CFG)
        .context("SVC_CFG")?
        .try_into()?;
    let mut c = cfg.get(&slot, 0)?;
    c.fallback = companion + 1;
    cfg.set(slot, c, 0)?;
    Ok(())
}

/// The degradation check on every packet of a rate-limited service with a companion (its
/// mode read; in fallback, the companion's configuration and bucket), the limiter admitting
/// (one key, the frame repeated, as the limiter rows).
fn degrade_limit_rows(args: &Args) -> anyhow::Result<Vec<(&'static str, Measure)>> {
    let text = format!(
        r#"
version: 1
interfaces: [{{ name: lo }}]
services:
  - name: bench
    match: {{ address: 198.18.0.2/32, port: {DPORT}, protocol: udp }}
    rate_limit: {{ key: flow, rate: 1000000000/s, burst: {ADMIT_BURST}, max_keys: 64 }}
  - name: bench-fallback
    match: {{ address: 198.18.0.5/32, port: {DPORT}, protocol: udp }}
    rate_limit: {{ key: flow, rate: 1000000000/s, burst: {ADMIT_BURST}, max_keys: 64 }}
"#
    );
    let policy = config::load_str(&text, "bench-degrade-limit.yaml")
        .map_err(|e| anyhow::anyhow!("bench policy:\n{e}"))?;
    let compiled = config::compile(&policy);
    let mut dp = Datapath::load(compiled.max_keys)?;
    dp.apply(&compiled)?;
    let mut rows = vec![(
        "limiter, admitted, no companion",
        measure(dp.xdp_program()?, &frame(SPORT), args)?,
    )];
    let (parent, companion) = (compiled.services[0].id, compiled.services[1].id);
    link(&mut dp, parent, companion)?;
    rows.push((
        "limiter, admitted, a companion, normal (mode read)",
        measure(dp.xdp_program()?, &frame(SPORT), args)?,
    ));
    dp.degrade_maps()?.write_mode(parent, MODE_FALLBACK)?;
    rows.push((
        "limiter, admitted, fallback (mode, companion's config and bucket)",
        measure(dp.xdp_program()?, &frame(SPORT), args)?,
    ));
    Ok(rows)
}

/// The degradation check on the balancing path (`DEGRADE` read for new flows, and for every
/// packet of a service with a companion, whose limit applies while it falls back): a Maglev
/// service linked to a companion of two fallback backends, its new flows and established
/// flows in normal mode, then the same in fallback mode (new flows balanced over the
/// companion). Distinct flows, each run once, as [`lb_rows`]' rows.
fn degrade_rows() -> anyhow::Result<Vec<(String, Measure)>> {
    let companion = format!(
        r#"  - name: lb-fallback
    match: {{ address: 198.18.0.5, port: {DPORT}, protocol: tcp }}
    backends:
      - address: 198.18.9.1:{BACKEND_PORT}
      - address: 198.18.9.2:{BACKEND_PORT}
    load_balancing: {{ algorithm: maglev, table_size: 211 }}
"#
    );
    let (mut dp, compiled) = balanced(&lb_policy(&companion), "bench-degrade.yaml")?;
    let id = |name: &str| {
        compiled
            .services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.id)
            .with_context(|| format!("service {name}"))
    };
    let (parent, companion) = (id("lb")?, id("lb-fallback")?);
    link(&mut dp, parent, companion)?;
    let mut modes = dp.degrade_maps()?;
    let prog = dp.xdp_program()?;

    let flows = |from: u16, flags: u8| -> Vec<Vec<u8>> {
        (0..LB_NEW_FLOWS)
            .map(|i| tcp(CLIENT, from + i, VIP, DPORT, flags))
            .collect()
    };
    let normal_new = measure_each_to(prog, &flows(20_000, 0x02), &LB_BACKENDS)?;
    let normal_est = measure_each_to(prog, &flows(20_000, 0x10), &LB_BACKENDS)?;
    modes.write_mode(parent, MODE_FALLBACK)?;
    let fallback_new = measure_each_to(prog, &flows(30_000, 0x02), &FALLBACK_BACKENDS)?;
    let fallback_est = measure_each_to(prog, &flows(20_000, 0x10), &LB_BACKENDS)?;
    Ok(vec![
        (
            "agent: degradation, LB new flow, normal (mode read, own backends) [run once each]"
                .into(),
            normal_new,
        ),
        (
            "agent: degradation, LB new flow, fallback (companion's table) [run once each]".into(),
            fallback_new,
        ),
        (
            "agent: degradation, LB established flow, normal [run once each]".into(),
            normal_est,
        ),
        (
            "agent: degradation, LB established flow, fallback (stays) [run once each]".into(),
            fallback_est,
        ),
    ])
}

/// Table builds timed per case; the median is reported.
const MAGLEV_RUNS: usize = 11;

/// One row of the Maglev section: a build for `backends` into `table_size` entries.
struct MaglevRow {
    backends: usize,
    table_size: u32,
    /// Median build time, all weights 100.
    equal: std::time::Duration,
    /// Median build time, weights spread over 1-1000.
    mixed: std::time::Duration,
}

/// The cases: the smallest table the policy accepts (smallest prime >= 100 x backends) for 10,
/// 100 and 1,000 backends, and the default 65537 where it is large enough.
fn maglev_cases() -> Vec<(usize, u32)> {
    let mut cases = Vec::new();
    for n in [10, 100, 1_000] {
        cases.push((n, agent_common::lb::min_maglev_size(n).expect("fits u32")));
        if n <= 100 {
            cases.push((n, 65_537));
        }
    }
    cases
}

/// Times `maglev::build` in userspace (no kernel involved).
fn maglev_rows(cases: &[(usize, u32)], runs: usize) -> Vec<MaglevRow> {
    let time = |backends: &[(u64, u32)], size: u32| {
        let mut t: Vec<std::time::Duration> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(maglev::build(std::hint::black_box(backends), size));
                start.elapsed()
            })
            .collect();
        t.sort();
        t[t.len() / 2]
    };
    cases
        .iter()
        .map(|&(n, table_size)| {
            let keys: Vec<u64> = (0..n)
                .map(|i| {
                    let addr = std::net::SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 8080));
                    backend_key(&addr)
                })
                .collect();
            let equal: Vec<(u64, u32)> = keys.iter().map(|&k| (k, 100)).collect();
            // Spread over 1-1000 without a generator: a stride coprime with 1000.
            let mixed: Vec<(u64, u32)> = keys
                .iter()
                .enumerate()
                .map(|(i, &k)| (k, (i as u32 * 389) % 1000 + 1))
                .collect();
            MaglevRow {
                backends: n,
                table_size,
                equal: time(&equal, table_size),
                mixed: time(&mixed, table_size),
            }
        })
        .collect()
}

fn maglev_section(rows: &[MaglevRow]) -> Result<String, std::fmt::Error> {
    let mut t = String::new();
    writeln!(t, "\n## Maglev table build\n")?;
    writeln!(
        t,
        "Userspace, one thread: `lb::maglev::build` of a weighted Maglev table, median of {} \
         builds. The agent rebuilds a service's table when its backends' effective weights \
         change (health, breaker, drain, slow-start steps), then swaps it in.\n",
        MAGLEV_RUNS
    )?;
    writeln!(
        t,
        "| backends | table size | weights all 100, ms | weights 1-1000, ms |\n|---:|---:|---:|---:|"
    )?;
    for r in rows {
        writeln!(
            t,
            "| {} | {} | {:.3} | {:.3} |",
            r.backends,
            r.table_size,
            r.equal.as_secs_f64() * 1e3,
            r.mixed.as_secs_f64() * 1e3
        )?;
    }
    Ok(t)
}

fn run(args: &Args) -> anyhow::Result<String> {
    let base = baseline("bench_trivial", args)?;
    let ktime = baseline("bench_ktime", args)?;
    let coarse = baseline("bench_coarse", args)?;
    let stages = stages(args)?;
    let breaker = breaker_rows(args)?;
    let lb = lb_rows()?;
    let degrade = degrade_rows()?;
    let degrade_limit = degrade_limit_rows(args)?;
    let shaping = shaping_rows(args)?;
    let mut rows = Vec::new();
    for keys in [1, 10_000, 1_000_000] {
        eprintln!("measuring with {keys} keys ...");
        rows.push(Row {
            keys,
            // Never runs out of tokens: every packet takes the compare-and-swap.
            admitted: measure_limiter(keys, "1000000000/s", ADMIT_BURST, args)?,
            // Out of tokens after the burst: the deny path, no write.
            limited: measure_limiter(keys, "1/s", 1, args)?,
        });
    }
    let precise = measure_limiter(1, "1000000000/s", PRECISE_BURST, args)?;
    let base_after = baseline("bench_trivial", args)?;

    let unlimited = stages.last().map_or(0.0, |s| s.1.kernel);
    let non_ip = stages.first().map_or(0.0, |s| s.1.kernel);
    let limiter = rows.iter().map(|r| r.admitted.kernel).fold(0f64, f64::max);
    let mut table: Vec<(String, String, Measure)> = vec![
        ("trivial XDP (count, pass)".into(), "-".into(), base),
        ("trivial + bpf_ktime_get_ns".into(), "-".into(), ktime),
        (
            "trivial + bpf_ktime_get_coarse_ns".into(),
            "-".into(),
            coarse,
        ),
    ];
    for (what, m) in stages {
        table.push((format!("agent: {what}"), "-".into(), m));
    }
    let prefilter_miss = breaker.first().map_or(0.0, |b| b.1.kernel);
    let miss = breaker.get(1).map_or(0.0, |b| b.1.kernel);
    let closed = breaker.get(2).map_or(0.0, |b| b.1.kernel);
    for (what, m) in &breaker {
        table.push((format!("agent: breaker, {what}"), "-".into(), *m));
    }
    for (what, m) in lb.iter().chain(&degrade) {
        table.push((what.clone(), "-".into(), *m));
    }
    for (what, m) in &degrade_limit {
        table.push((format!("agent: degradation, {what}"), "1".into(), *m));
    }
    for (what, m) in &shaping {
        table.push((format!("agent: {what}"), "1".into(), *m));
    }
    for r in &rows {
        table.push((
            "agent: limiter, admitted (CAS)".into(),
            r.keys.to_string(),
            r.admitted,
        ));
    }
    table.push((
        "agent: limiter, admitted, burst under four ticks (precise clock)".into(),
        "1".into(),
        precise,
    ));
    for r in &rows {
        table.push((
            "agent: limiter, over limit (drop)".into(),
            r.keys.to_string(),
            r.limited,
        ));
    }
    table.push((
        "trivial XDP, again at the end".into(),
        "-".into(),
        base_after,
    ));

    let mut t = String::new();
    writeln!(t, "# Benchmarks\n")?;
    writeln!(
        t,
        "Produced by `cargo xtask bench` (`agent-bench --repeat {} --samples {}`) on {}, kernel \
         {}. One 64-byte IPv4/UDP frame is run through the XDP program (the TC egress program for \
         the rows that say so) with BPF_PROG_TEST_RUN, \
         repeated (one key, hot in cache); each figure is a median over samples. *program* is the \
         kernel's own timing of the program runs (whole ns, +-1); *per run* is wall time per \
         repetition, which adds the test harness's frame set-up.\n",
        args.repeat,
        args.samples,
        cpu_model(),
        kernel()
    )?;
    writeln!(t, "## XDP per-packet cost\n")?;
    writeln!(
        t,
        "| path | keys in table | program ns | x trivial | per run ns | x trivial |\n\
         |---|---:|---:|---:|---:|---:|"
    )?;
    for (what, keys, m) in &table {
        writeln!(
            t,
            "| {what} | {keys} | {:.0} | {:.1} | {:.1} | {:.2} |",
            m.kernel,
            m.kernel / base.kernel,
            m.wall,
            m.wall / base.wall
        )?;
    }
    let spread = |f: fn(&Measure) -> f64| {
        let (lo, hi) = rows.iter().fold((f64::MAX, 0f64), |(lo, hi), r| {
            (lo.min(f(&r.admitted)), hi.max(f(&r.admitted)))
        });
        (hi / lo - 1.0) * 100.0
    };
    let worst = |f: fn(&Measure) -> f64| rows.iter().map(|r| f(&r.admitted)).fold(0f64, f64::max);
    writeln!(
        t,
        "\nGoals (issue 14): the limiter's admitted path at most 4x the trivial program, and \
         flat (within 20%) from 1 to 1,000,000 keys.\n\n\
         - Admitted path, spread from 1 to 1,000,000 keys: {:.1}% (program), {:.1}% (per run).\n\
         - Admitted path, worst ratio to trivial: {:.1}x (program), {:.2}x (per run).",
        spread(|m| m.kernel),
        spread(|m| m.wall),
        worst(|m| m.kernel) / base.kernel,
        worst(|m| m.wall) / base.wall,
    )?;
    writeln!(
        t,
        "\nWhere the admitted path's time goes (program ns, differences of the rows above): \
         parse and trie lookup {:.0} (service without limit minus non-IP); token bucket {:.0} \
         (limiter minus service without limit: one coarse clock read, {:.0} by itself, the \
         LRU-hash lookup of a 44-byte key, the compare-and-swap). The admitting rows' burst \
         spans four ticks or more, so their buckets read the coarse clock, at the price of up \
         to one scheduler tick of rate added to burst + rate x T; a burst under four ticks keeps \
         the precise clock ({:.0} a read; the precise-clock row, {:.0} more than the 1-key row).",
        unlimited - non_ip,
        limiter - unlimited,
        coarse.kernel - base.kernel,
        ktime.kernel - base.kernel,
        precise.kernel - rows.first().map_or(0.0, |r| r.admitted.kernel),
    )?;
    writeln!(
        t,
        "\nBreaker (TCP SYN frames toward the service without a limit; program ns): every TCP/UDP \
         packet reads one bit of a port bitmap (included in every agent row above); only packets \
         toward a port some backend uses pay the hash lookup of their destination in `BACKENDS`, \
         {:.0} more. A hit on a closed backend costs {:.0} more than a miss (the state read and \
         one per-CPU counter). Refusing with a RST builds the answer in a per-CPU scratch buffer, \
         checksums included, and rewrites the frame in place.",
        miss - prefilter_miss,
        closed - miss,
    )?;
    writeln!(
        t,
        "\nLoad balancing (TCP frames to a Maglev VIP of two backends, XDP): rows marked *run \
         once each* are medians over {LB_NEW_FLOWS} distinct flows, each frame run once, since a \
         repeated frame is one flow, new only the first time, and a rewritten frame is not \
         rewritten again (BPF_PROG_TEST_RUN repeats on the frame the program left). Single runs \
         carry the kernel's timer overhead and cold caches, so the trivial program run the same \
         way is their scale. A packet to a VIP takes two tail calls (main program, balancing \
         stage, NAT stage) and is parsed once: the main program hands what it parsed to the \
         stages (`LB_HANDOVER`). Connection entries are stamped on the coarse clock. Not in \
         these rows: the flows' client ports (from 20000) are below the ephemeral range, so \
         they keep their port (`agent_common::ports`; a moved port costs one more reverse-table \
         lookup on a new flow and one more port rewrite), and BPF_PROG_TEST_RUN runs on `lo`, \
         where the NAT stage's next-hop lookup returns at once (`fib.rs`)."
    )?;
    // lb_rows: the trivial program, a new flow, an established flow, a reply; run once each.
    if let [trivial, new, established, ..] = lb.as_slice() {
        let goal = |what: &str, m: &Measure, times: f64| {
            let ratio = m.kernel / trivial.1.kernel;
            let over = m.kernel - times * trivial.1.kernel;
            let verdict = if over <= 0.0 {
                "met".to_owned()
            } else {
                format!("not met, {over:.0} ns over")
            };
            format!(
                "- {what}: {:.0} ns against the trivial program's {:.0}, {ratio:.1}x (goal {times}x: \
                 {verdict}).",
                m.kernel, trivial.1.kernel
            )
        };
        writeln!(
            t,
            "\nGoals (issue 14), program ns of the rows run once each:\n\n{}\n{}",
            goal("established flow", &established.1, 3.0),
            goal("new flow", &new.1, 6.0),
        )?;
    }
    writeln!(
        t,
        "\nDegradation (the same, a Maglev VIP linked to a companion of two fallback backends): \
         a new flow reads the service's mode (`DEGRADE`), and in fallback its companion's \
         configuration, then picks from the companion's table. An established flow's packet \
         reads nothing more in the balancing stage. Every packet of a service with a companion \
         reads the mode in the main program (the companion's limit applies while it falls \
         back): the *degradation, limiter* rows, one frame repeated."
    )?;
    eprintln!("timing Maglev table builds ...");
    t.push_str(&maglev_section(&maglev_rows(&maglev_cases(), MAGLEV_RUNS))?);
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

/// `table`, then the `## ` sections of `old` that it does not itself write (the breaker's and
/// the VM suites', which their own commands keep up to date).
fn with_others(table: &str, old: &str) -> String {
    let mut sections: Vec<String> = Vec::new();
    let mut keep = false;
    for line in old.lines() {
        if line.starts_with("## ") {
            keep = !table.lines().any(|l| l == line);
            if keep {
                sections.push(String::new());
            }
        }
        if let Some(section) = sections.last_mut().filter(|_| keep) {
            section.push_str(line);
            section.push('\n');
        }
    }
    let mut out = table.trim_end().to_owned();
    for section in sections {
        out.push_str("\n\n");
        out.push_str(section.trim_end());
    }
    out.push('\n');
    out
}

/// `--lb-only`: the load-balancing rows, `times` over, printed.
fn lb_only(times: usize) -> anyhow::Result<()> {
    for _ in 0..times {
        for (what, m) in lb_rows()? {
            println!("{what}\t{:.0}\t{:.0}", m.kernel, m.wall);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(times) = args.lb_only {
        return match lb_only(times) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agent-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(table) => {
            print!("{table}");
            let old = std::fs::read_to_string(&args.out).unwrap_or_default();
            if let Err(e) = std::fs::write(&args.out, with_others(&table, &old)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_written_by_other_commands_are_kept() {
        let table = "# Benchmarks\n\n## XDP per-packet cost\n\nnew rows\n";
        let old = "# Benchmarks\n\n## XDP per-packet cost\n\nold rows\n\n## Breaker, end to end\n\nb\n\n## Test suites in VMs\n\nv\n";
        assert_eq!(
            with_others(table, old),
            "# Benchmarks\n\n## XDP per-packet cost\n\nnew rows\n\n## Breaker, end to end\n\nb\n\n## Test suites in VMs\n\nv\n"
        );
    }

    #[test]
    fn maglev_section_has_a_row_per_case() {
        let cases = maglev_cases();
        assert_eq!(
            cases,
            [
                (10, 1009),
                (10, 65_537),
                (100, 10_007),
                (100, 65_537),
                (1_000, 100_003)
            ]
        );
        let section = maglev_section(&maglev_rows(&cases[..2], 3)).unwrap();
        assert!(section.contains("## Maglev table build"), "{section}");
        assert!(section.contains("| 10 | 1009 | "), "{section}");
        assert!(section.contains("| 10 | 65537 | "), "{section}");
    }
}
