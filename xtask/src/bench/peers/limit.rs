//! The rate-limiting rows of `cargo xtask bench peers`: the agent (native and generic XDP)
//! against an nftables meter, iptables `hashlimit` and no limiter, keyed per source and per
//! flow, with 1, 1,000 and 100,000 keys, on one veth pair.
//!
//! ```text
//! sender namespace (veth-cli)                      receiver namespace (veth-srv 198.18.0.2)
//!   paced raw-socket generator, IP_HDRINCL  ---->  the limiter: agent XDP on veth-srv, or
//!   sources 198.18.64.0 + i (spoofed:              nft / iptables at prerouting (raw)
//!   nothing needs to answer UDP)                   UDP receiver on port 5301..5306, counting
//! ```
//!
//! One port per case (keying x key count): every case has its own agent service, nft set
//! or hashlimit table. Each round sets a limiter up afresh (an empty key table), runs every
//! case once, and tears it down; rows take turns within a round, so the machine's other
//! load falls on all of them alike. A figure is the median of the rounds, with min-max.
//!
//! CPU per offered packet counts the tasks that do the path's work, not the whole machine
//! (other jobs share it): this process (the generator's `sendmmsg`, with the softirq work
//! that runs in its context: veth, XDP, netfilter, UDP delivery; and the receiver), the
//! `ksoftirqd` threads (softirq work deferred to them) and the agent process. The generator
//! sleeps between its batches (`SendMethod::Spoofed`), so its time is its sends.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use agent_tests::{
    agent::{AgentProcess, TempDir},
    netns::Topology,
    timing::Scaled,
    traffic::{SendMethod, SendReport, UdpFlood, UdpReceiver, UdpSender},
    xdp::{Verdict, XdpGuard, XdpMode, attach_trivial},
};
use anyhow::{Context as _, Result, bail};

use crate::cmd;

use super::{
    Ctx, median_min_max,
    plot::{self, Bar},
    thousands,
};

const HEADING: &str =
    "### Rate limiting: the agent against an nftables meter and iptables hashlimit";
/// Packets per second the generator offers in every case, all keys together.
const OFFERED_PPS: f64 = 200_000.0;
/// Offered rate per key over the limit, where a limit of at least 1/s allows it.
const OVER: f64 = 10.0;
const KEY_COUNTS: [usize; 3] = [1, 1_000, 100_000];
/// Receiver ports: case `i` listens on `FIRST_PORT + i`.
const FIRST_PORT: u16 = 5301;
/// Sources: `FIRST_SOURCE + i`, up to 198.19.198.159 for 100,000 (all in 198.18.0.0/15).
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 0);
/// The receiver's route back to the sources beyond its own /16.
const SOURCE_ROUTE: &str = "198.19.0.0/16";
/// Per-flow keys: flows from as few sources as the port space allows.
const FLOWS_PER_SOURCE: usize = 50_000;
const SOURCE_PORT: u16 = 10_000;
const PAYLOAD: usize = 64;
const NFT_TABLE: &str = "peers_limit";
const AGENT_LISTEN: &str = "127.0.0.1:9090";
const AGENT_READY: Scaled = Scaled::secs(60);
/// Two median errors (%, whole packets) this close count as equal accuracy.
const ACCURACY_SLACK_PCT: f64 = 0.1;
/// Runs of a case at most, while the generator stalls longer than burst/rate (the machine is
/// shared); the last one counts whatever it did, and the table says how many stalled.
const ATTEMPTS: u32 = 3;
/// The bench's nice value: the machine may be running builds meanwhile.
const GENERATOR_NICE: i32 = -15;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keying {
    Source,
    Flow,
}

impl Keying {
    fn label(self) -> &'static str {
        match self {
            Keying::Source => "per source",
            Keying::Flow => "per flow",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Row {
    AgentNative,
    AgentGeneric,
    Nft,
    Iptables,
    Unlimited,
    /// A trivial `XDP_DROP` program, native: what the generator and the path up to the
    /// agent's native hook cost (on veth, native XDP takes the frame out of its skb).
    FloorNative,
    /// The same, generic: the path up to the earliest hook of the other rows (generic XDP
    /// runs before netfilter's prerouting).
    FloorGeneric,
}

const ROWS: [Row; 7] = [
    Row::AgentNative,
    Row::AgentGeneric,
    Row::Nft,
    Row::Iptables,
    Row::Unlimited,
    Row::FloorNative,
    Row::FloorGeneric,
];

impl Row {
    fn label(self) -> &'static str {
        match self {
            Row::AgentNative => "agent, native XDP",
            Row::AgentGeneric => "agent, generic XDP",
            Row::Nft => "nftables meter",
            Row::Iptables => "iptables hashlimit",
            Row::Unlimited => "no limiter",
            Row::FloorNative => "floor: XDP_DROP, native",
            Row::FloorGeneric => "floor: XDP_DROP, generic",
        }
    }

    /// The row whose cost this one's is counted above: the cheapest drop on its path.
    fn floor(self) -> Option<Row> {
        match self {
            Row::AgentNative => Some(Row::FloorNative),
            Row::AgentGeneric | Row::Nft | Row::Iptables | Row::Unlimited => {
                Some(Row::FloorGeneric)
            }
            Row::FloorNative | Row::FloorGeneric => None,
        }
    }

    /// The Debian package the row needs beyond the project's own.
    fn tool(self) -> Option<&'static str> {
        match self {
            Row::Nft => Some("nftables"),
            Row::Iptables => Some("iptables"),
            _ => None,
        }
    }
}

/// One measured configuration: a keying, a key count, its limit and its port.
#[derive(Clone, Debug)]
struct Case {
    keying: Keying,
    keys: usize,
    port: u16,
    /// Packets per second per key.
    rate: u64,
    /// Packets.
    burst: u64,
    duration: Duration,
}

impl Case {
    fn group(&self) -> String {
        format!("{}, {}", self.keying.label(), keys_label(self.keys))
    }

    /// Entries of the key table: room above the keys.
    fn table_size(&self) -> usize {
        (self.keys * 5 / 4).next_power_of_two().max(16)
    }

    /// burst / rate: the time an empty bucket takes to fill. A generator stall longer than
    /// this loses tokens, and `burst + rate x T` no longer predicts the count.
    fn refill(&self) -> Duration {
        Duration::from_secs_f64(self.burst as f64 / self.rate as f64)
    }

    fn offered_per_key(&self) -> f64 {
        OFFERED_PPS / self.keys as f64
    }

    /// The generator's flows: one per key, from `keys` sources (per source) or from as few
    /// sources as the ports allow (per flow).
    fn flood(&self, dst: SocketAddr) -> UdpFlood {
        let sources = match self.keying {
            Keying::Source => self.keys,
            Keying::Flow => self.keys.div_ceil(FLOWS_PER_SOURCE),
        };
        UdpFlood {
            dst,
            sources: (0..sources)
                .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(FIRST_SOURCE) + i as u32)))
                .collect(),
            flows: self.keys,
            rate_per_flow: self.offered_per_key(),
            duration: self.duration,
            payload: PAYLOAD,
            method: SendMethod::Spoofed,
            base_port: SOURCE_PORT,
        }
    }

    /// What the limit lets through: per key, `burst + rate x span` (the key's first to last
    /// packet sent), at most what the key sent; summed over the keys. `whole`: per key, the
    /// whole packets of it (a bucket cannot spend the fraction of a token left at the end).
    fn allowed(&self, sent: &SendReport, whole: bool) -> f64 {
        let allowed = |n: u64, span: Duration| {
            let tokens = self.burst as f64 + self.rate as f64 * span.as_secs_f64();
            let tokens = if whole { tokens.floor() } else { tokens };
            tokens.min(n as f64)
        };
        match self.keying {
            Keying::Source => {
                let spans = sent.span_per_ip();
                sent.sent_per_ip()
                    .iter()
                    .map(|(ip, n)| allowed(*n, spans.get(ip).copied().unwrap_or_default()))
                    .sum()
            }
            Keying::Flow => sent.flows.iter().map(|f| allowed(f.sent, f.span())).sum(),
        }
    }
}

/// The cases, per source then per flow, each key count: the limit is a tenth of the offered
/// rate per key (at least 1/s), the burst one second of it (the policy's default), longer
/// than the generator's usual stalls: a stall shorter than burst/rate delays tokens and
/// loses none, so `burst + rate x T` still predicts the count.
fn cases(quick: bool) -> Vec<Case> {
    let mut cases = Vec::new();
    for keying in [Keying::Source, Keying::Flow] {
        for keys in KEY_COUNTS {
            let per_key = OFFERED_PPS / keys as f64;
            let rate = ((per_key / OVER) as u64).max(1);
            let millis = match (keys >= 100_000, quick) {
                // Few packets per key: a longer run, or the burst is most of the count.
                (true, false) => 2_000,
                (true, true) => 1_000,
                (false, false) => 1_000,
                (false, true) => 500,
            };
            cases.push(Case {
                keying,
                keys,
                port: FIRST_PORT + cases.len() as u16,
                rate,
                burst: rate,
                duration: Duration::from_millis(millis),
            });
        }
    }
    cases
}

fn keys_label(keys: usize) -> String {
    match keys {
        1 => "1 key".into(),
        n => format!("{} keys", thousands(n as u64)),
    }
}

/// One run of one case under one row.
#[derive(Clone, Debug)]
struct Sample {
    offered: u64,
    asked_pps: f64,
    achieved_pps: f64,
    delivered: u64,
    allowed: f64,
    /// `allowed` in whole packets per key.
    allowed_whole: f64,
    cpu: Duration,
    /// The agent process's part of `cpu` (its user-space work: metrics, key-table walks).
    agent_cpu: Duration,
    /// Packets lost before any limiter (veth) or at the receiving socket.
    lost: u64,
    /// The generator's longest delay behind its schedule.
    max_lag: Duration,
    /// Runs of this case it took (see [`ATTEMPTS`]).
    attempts: u32,
}

impl Sample {
    fn cpu_ns_per_packet(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.offered.max(1) as f64
    }

    fn agent_ns_per_packet(&self) -> f64 {
        self.agent_cpu.as_nanos() as f64 / self.offered.max(1) as f64
    }

    fn error_pct(&self) -> f64 {
        (self.delivered as f64 - self.allowed) / self.allowed.max(1.0) * 100.0
    }

    fn whole_error_pct(&self) -> f64 {
        (self.delivered as f64 - self.allowed_whole) / self.allowed_whole.max(1.0) * 100.0
    }
}

/// What the rounds measured: the samples of each (case index, row), and why a row stopped
/// (a missing tool, a failed setup), shown in its place or under the table.
#[derive(Default)]
struct Outcomes {
    samples: HashMap<(usize, Row), Vec<Sample>>,
    stopped: HashMap<Row, String>,
}

impl Outcomes {
    fn of(&self, case: usize, row: Row) -> &[Sample] {
        self.samples.get(&(case, row)).map_or(&[], Vec::as_slice)
    }
}

pub fn run(ctx: &Ctx) -> Result<String> {
    let cases = cases(ctx.quick);
    // The generator (and the softirq work in its context), the receiver and the agent
    // inherit this thread's priority, above the machine's other jobs.
    let _priority = Priority::raise(GENERATOR_NICE)?;
    let topo = Topology::new()?;
    // The sources beyond the receiver's /16 (nothing answers them; rp_filter stays off,
    // the route is for any policy that looks).
    topo.server
        .ip(&["route", "add", SOURCE_ROUTE, "dev", &topo.server_if])?;
    let softirqd = softirq_threads()?;
    let tmp = TempDir::new()?;
    let mut outcomes = Outcomes::default();
    for row in ROWS {
        if let Some(why) = row.tool().and_then(|t| ctx.tools.unavailable(t)) {
            outcomes.stopped.insert(row, format!("skipped: {why}"));
        }
    }

    for round in 1..=ctx.repeats {
        for row in ROWS {
            if outcomes.stopped.contains_key(&row) {
                continue;
            }
            println!(
                "bench peers limit: round {round} of {}, {}",
                ctx.repeats,
                row.label()
            );
            let limiter = match Limiter::start(ctx, &topo, &tmp, row, &cases, round) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("bench peers limit: {}: {e:#}", row.label());
                    outcomes
                        .stopped
                        .insert(row, format!("failed in round {round}: {e:#}"));
                    continue;
                }
            };
            for (c, case) in cases.iter().enumerate() {
                let mut attempts = 1;
                let sample = loop {
                    let mut sample = measure(&topo, case, limiter.pid(), &softirqd)
                        .with_context(|| format!("{}, {}", row.label(), case.group()))?;
                    sample.attempts = attempts;
                    if sample.max_lag < case.refill() || attempts == ATTEMPTS {
                        break sample;
                    }
                    println!(
                        "  {}: the generator stalled for {:?}, longer than burst/rate: again",
                        case.group(),
                        sample.max_lag
                    );
                    // Every bucket is full again after burst/rate without traffic: the
                    // next attempt starts as the first did, but with its keys in the table.
                    std::thread::sleep(case.refill());
                    attempts += 1;
                };
                println!(
                    "  {}: offered {} ({:.0} pps), delivered {} of {:.0} allowed ({:+.2}%), \
                     {:.0} ns CPU per packet",
                    case.group(),
                    sample.offered,
                    sample.achieved_pps,
                    sample.delivered,
                    sample.allowed,
                    sample.error_pct(),
                    sample.cpu_ns_per_packet()
                );
                outcomes.samples.entry((c, row)).or_default().push(sample);
            }
            limiter.stop()?;
        }
    }
    drop(topo);
    report(ctx, &cases, &outcomes)
}

/// This thread's nice value, restored when dropped (nice is per thread on Linux, and threads
/// and processes started meanwhile inherit it).
struct Priority {
    old: i32,
}

impl Priority {
    fn raise(nice: i32) -> Result<Priority> {
        // SAFETY: getpriority/setpriority read and set this thread's nice value.
        unsafe {
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, 0);
            if old == -1 && *libc::__errno_location() != 0 {
                return Err(std::io::Error::last_os_error()).context("getpriority");
            }
            if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setpriority({nice})"));
            }
            Ok(Priority { old })
        }
    }
}

impl Drop for Priority {
    fn drop(&mut self) {
        // SAFETY: as in `raise`.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, self.old) };
    }
}

/// One run: the receiver on the case's port, the generator's whole schedule, the counts and
/// the CPU time of the tasks on the path.
fn measure(topo: &Topology, case: &Case, agent: Option<u32>, softirqd: &[u32]) -> Result<Sample> {
    let dst = SocketAddr::new(topo.server_v4.into(), case.port);
    let receiver = UdpReceiver::start(&topo.server, dst)?;
    let sender = UdpSender::new(&topo.client, case.flood(dst))?;
    let drops = topo.path_drops()?;
    let agent_cpu = agent.map(run_time).transpose()?;
    let cpu = path_cpu(agent, softirqd)?;
    let sent = sender.run()?;
    let got = receiver.finish()?;
    let cpu = path_cpu(agent, softirqd)?.saturating_sub(cpu);
    let agent_cpu = match (agent, agent_cpu) {
        (Some(pid), Some(before)) => run_time(pid)?.saturating_sub(before),
        _ => Duration::ZERO,
    };
    let lost = topo.path_drops()? - drops + u64::from(got.socket_drops);
    if sent.failed > 0 {
        bail!(
            "the generator failed {} sends of {}",
            sent.failed,
            sent.sent + sent.failed
        );
    }
    Ok(Sample {
        offered: sent.sent,
        asked_pps: sent.offered_pps,
        achieved_pps: sent.achieved_pps,
        delivered: got.packets,
        allowed: case.allowed(&sent, false),
        allowed_whole: case.allowed(&sent, true),
        cpu,
        agent_cpu,
        lost,
        max_lag: sent.max_lag,
        attempts: 1,
    })
}

/// CPU time so far of the tasks that do the path's work: this process's (the generator and
/// the receiver), the agent's and the ksoftirqd threads'. All are the scheduler's run time
/// in nanoseconds; softirq work is charged to the task it interrupted (this kernel has no
/// IRQ time accounting), which on this path is the generator's `sendmmsg`.
fn path_cpu(agent: Option<u32>, softirqd: &[u32]) -> Result<Duration> {
    let mut total = process_cpu()?;
    for &pid in agent.iter().chain(softirqd) {
        total += run_time(pid)?;
    }
    Ok(total)
}

/// The run time of every live thread of process `pid`, in nanoseconds (the first field of
/// `/proc/PID/task/TID/schedstat`; `/proc/PID/stat` counts in 10 ms ticks).
fn run_time(pid: u32) -> Result<Duration> {
    let dir = format!("/proc/{pid}/task");
    let mut ns = 0u64;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = task?.path().join("schedstat");
        // A thread that exited since the listing has nothing more to add.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        ns += text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .with_context(|| format!("{}: {text:?}", path.display()))?;
    }
    Ok(Duration::from_nanos(ns))
}

/// This process's CPU time, every thread (`CLOCK_PROCESS_CPUTIME_ID`).
fn process_cpu() -> Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives on this stack frame.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error()).context("clock_gettime");
    }
    Ok(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The pids of the `ksoftirqd/N` kernel threads.
fn softirq_threads() -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.starts_with("ksoftirqd/") {
            pids.push(pid);
        }
    }
    if pids.is_empty() {
        bail!("no ksoftirqd threads in /proc");
    }
    Ok(pids)
}

/// A limiter set up in the receiver namespace for every case; `stop` removes it.
enum Limiter<'t> {
    Agent(AgentProcess),
    Netfilter {
        topo: &'t Topology,
        undo: Vec<Vec<String>>,
    },
    Xdp(XdpGuard),
    Nothing,
}

impl<'t> Limiter<'t> {
    fn start(
        ctx: &Ctx,
        topo: &'t Topology,
        tmp: &TempDir,
        row: Row,
        cases: &[Case],
        round: usize,
    ) -> Result<Limiter<'t>> {
        match row {
            Row::AgentNative | Row::AgentGeneric => {
                let mode = if row == Row::AgentNative {
                    "native"
                } else {
                    "generic"
                };
                let name = format!("limit-{mode}-{round}.yaml");
                let config = tmp.write(&name, &agent_policy(topo, mode, cases, round))?;
                let mut agent = AgentProcess::spawn(&ctx.agent, &topo.server, &config)?;
                agent.wait_ready(AGENT_READY)?;
                Ok(Limiter::Agent(agent))
            }
            Row::Nft => {
                let file = tmp.write("limit.nft", &nft_ruleset(topo, cases))?;
                let file = file
                    .to_str()
                    .context("a temporary path that is not UTF-8")?;
                cmd::output(&mut topo.server.exec(&["nft", "-f", file]))?;
                Ok(Limiter::Netfilter {
                    topo,
                    undo: vec![words(&["nft", "delete", "table", "ip", NFT_TABLE])],
                })
            }
            Row::Iptables => {
                for case in cases {
                    let rule = iptables_rule(topo, case);
                    let mut add = vec!["iptables", "-t", "raw", "-A", "PREROUTING"];
                    add.extend(rule.iter().map(String::as_str));
                    cmd::output(&mut topo.server.exec(&add))?;
                }
                Ok(Limiter::Netfilter {
                    topo,
                    undo: vec![words(&["iptables", "-t", "raw", "-F", "PREROUTING"])],
                })
            }
            Row::Unlimited => Ok(Limiter::Nothing),
            Row::FloorNative | Row::FloorGeneric => Ok(Limiter::Xdp(attach_trivial(
                &topo.server,
                &topo.server_if,
                if row == Row::FloorNative {
                    XdpMode::Native
                } else {
                    XdpMode::Generic
                },
                Verdict::Drop,
            )?)),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Limiter::Agent(agent) => Some(agent.pid()),
            _ => None,
        }
    }

    fn stop(self) -> Result<()> {
        match self {
            Limiter::Agent(agent) => {
                let status = agent.stop()?;
                if !status.success() {
                    bail!("the agent exited with {status}");
                }
            }
            Limiter::Netfilter { topo, undo } => {
                for cmd in &undo {
                    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
                    cmd::output(&mut topo.server.exec(&args))?;
                }
            }
            Limiter::Xdp(guard) => drop(guard),
            Limiter::Nothing => {}
        }
        Ok(())
    }
}

fn words(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| (*s).to_owned()).collect()
}

/// One service per case, on the receiver's veth, XDP in `mode`.
fn agent_policy(topo: &Topology, mode: &str, cases: &[Case], round: usize) -> String {
    // A pin path of its own: nothing shared with another run or another bench.
    let pin = format!("/sys/fs/bpf/peers-limit-{}-{round}", std::process::id());
    let mut p = format!(
        "version: 1\n\
         agent:\n  listen: {AGENT_LISTEN}\n  pin_path: {pin}\n  log_level: warn\n\
         interfaces:\n  - name: {}\n    xdp_mode: {mode}\n    direction: ingress\n\
         services:\n",
        topo.server_if
    );
    for case in cases {
        let key = match case.keying {
            Keying::Source => "source_ip",
            Keying::Flow => "flow",
        };
        let _ = write!(
            p,
            "  - name: limit-{port}\n    match:\n      address: {addr}/32\n      port: {port}\n      \
             protocol: udp\n    rate_limit:\n      key: {key}\n      rate: {rate}/s\n      \
             burst: {burst}\n      max_keys: {size}\n",
            port = case.port,
            addr = topo.server_v4,
            rate = case.rate,
            burst = case.burst,
            size = case.table_size(),
        );
    }
    p
}

/// A dynamic set per case with a `limit` per element, at prerouting before conntrack (which
/// nothing here loads), as the issue writes it: `add @m { KEY limit rate over R/second burst B
/// packets } drop`.
fn nft_ruleset(topo: &Topology, cases: &[Case]) -> String {
    let mut sets = String::new();
    let mut rules = String::new();
    for case in cases {
        let (ty, key) = match case.keying {
            Keying::Source => ("ipv4_addr", "ip saddr"),
            Keying::Flow => (
                "ipv4_addr . ipv4_addr . inet_service . inet_service",
                "ip saddr . ip daddr . udp sport . udp dport",
            ),
        };
        let _ = writeln!(
            sets,
            "  set m{port} {{ type {ty}; size {size}; flags dynamic; }}",
            port = case.port,
            size = case.table_size()
        );
        let _ = writeln!(
            rules,
            "    ip daddr {addr} udp dport {port} add @m{port} {{ {key} limit rate over \
             {rate}/second burst {burst} packets }} drop",
            addr = topo.server_v4,
            port = case.port,
            rate = case.rate,
            burst = case.burst,
        );
    }
    format!(
        "table ip {NFT_TABLE} {{\n{sets}  chain prerouting {{\n    type filter hook prerouting \
         priority raw; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// The `hashlimit` rule of a case (after `iptables -t raw -A PREROUTING`).
fn iptables_rule(topo: &Topology, case: &Case) -> Vec<String> {
    let mode = match case.keying {
        Keying::Source => "srcip",
        Keying::Flow => "srcip,dstip,srcport,dstport",
    };
    let size = case.table_size().to_string();
    [
        "-d",
        &topo.server_v4.to_string(),
        "-p",
        "udp",
        "--dport",
        &case.port.to_string(),
        "-m",
        "hashlimit",
        "--hashlimit-name",
        &format!("m{}", case.port),
        "--hashlimit-mode",
        mode,
        "--hashlimit-above",
        &format!("{}/sec", case.rate),
        "--hashlimit-burst",
        &case.burst.to_string(),
        "--hashlimit-htable-size",
        &size,
        "--hashlimit-htable-max",
        &size,
        "-j",
        "DROP",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// The first line a tool prints for `args` (its version), or why not.
fn version(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| format!("`{}` not runnable", args.join(" ")))
}

fn report(ctx: &Ctx, cases: &[Case], outcomes: &Outcomes) -> Result<String> {
    let mut s = format!("{HEADING}\n\n");
    let _ = writeln!(
        s,
        "A sender namespace floods UDP ({PAYLOAD}-byte payloads, {} pps asked in every case, \
         all keys together) at a receiver namespace over a veth pair; the limiter sits on the \
         receiver's side: the agent's XDP program on its veth (`xdp_mode: native` or \
         `generic`), or an nftables set (`add @m {{ KEY limit rate over R/second burst B \
         packets }} drop`) or an iptables `hashlimit` rule (`--hashlimit-above R/sec \
         --hashlimit-burst B`, table and set sized >= keys) at prerouting, priority raw. The \
         generator is the project's paced `sendmmsg` sender (tests/src/traffic/send.rs) with \
         `IP_HDRINCL`: any number of source addresses without assigning them, as `hping3 \
         --rand-source` does. Per source, every key is its own source address; per flow, \
         keys are source ports of at most {} per source. {}; {}. Machine: {}.\n",
        thousands(OFFERED_PPS as u64),
        thousands(FLOWS_PER_SOURCE as u64),
        version(&["nft", "--version"]),
        version(&["iptables", "-V"]),
        ctx.machine,
    );
    let _ = writeln!(
        s,
        "| case | rate per key | burst | offered per key | time | allowed per key, burst + rate x T |\n\
         |---|--:|--:|--:|--:|--:|"
    );
    for case in cases {
        let t = case.duration.as_secs_f64();
        let _ = writeln!(
            s,
            "| {} | {}/s | {} | {}/s | {t:.0} s | {:.1} |",
            case.group(),
            thousands(case.rate),
            thousands(case.burst),
            thousands(case.offered_per_key() as u64),
            (case.burst as f64 + case.rate as f64 * t).min(case.offered_per_key() * t),
        );
    }
    let _ = writeln!(
        s,
        "\n*Error* is the delivered count (at the receiving socket) against the sum over keys of \
         `burst + rate x T`, T being each key's own first-to-last packet at the sender, capped \
         at what the key sent. A bucket cannot spend the fraction of a token left at the end \
         of T, so with few packets per key this reads low for any limiter (up to -1 packet \
         per key); the second error is against the whole packets of it per key, \
         `floor(burst + rate x T)`, and is the one the chart shows. *CPU* is per offered packet: the run time (the scheduler's, in ns) of the \
         generator thread (its `sendmmsg` calls and the softirq work that runs in their \
         context: veth, XDP, netfilter, UDP delivery), the receiving thread, the ksoftirqd \
         threads and the agent process, over the run; not the whole machine's busy time, \
         which other jobs share. It holds the generator's own cost, the same per packet in \
         every row: the two *floor* rows drop every packet at once with a trivial `XDP_DROP` \
         program (native: where the agent's native XDP runs; generic: before netfilter's \
         prerouting, the earliest hook of the other rows), and *above its floor* is what a \
         row costs beyond the floor of its path: the limiter, and the delivery of what it \
         admits. The ratios are of these. *Generator's longest stall*: its largest delay \
         behind schedule (the machine is shared); a stall longer than burst/rate (1 s) loses \
         tokens, so such a run is run again (after burst/rate without traffic, its keys \
         still in the table), up to {ATTEMPTS} times; runs that stalled even so are counted \
         in bold. \
         Median of {} rounds [min-max]; each round sets every limiter up afresh (empty key \
         tables) and runs every case once.\n",
        ctx.repeats
    );
    let _ = writeln!(
        s,
        "| case | row | offered pps (asked) | generator's longest stall | delivered | allowed | error | allowed, whole packets | error | lost on the path | CPU ns / offered packet | of which the agent process | above its floor | x no limiter | x nftables |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    let mut cpu_bars = Vec::new();
    // Per agent row, over the cases: its CPU above its floor over nftables', and whether its
    // median error (whole packets) is within nftables' (for the goal line under the table).
    let mut against_nft: HashMap<Row, Vec<(f64, bool)>> = HashMap::new();
    let mut error_bars = Vec::new();
    for (c, case) in cases.iter().enumerate() {
        let cpu_of = |row: Row| -> Option<(f64, f64, f64)> {
            let samples = outcomes.of(c, row);
            (!samples.is_empty())
                .then(|| median_min_max(samples.iter().map(Sample::cpu_ns_per_packet).collect()))
        };
        // A row's CPU above its floor's: (median, min, max) of its runs less the floor's
        // median.
        let above = |row: Row| -> Option<(f64, f64, f64)> {
            let floor = cpu_of(row.floor()?)?.0;
            let (m, lo, hi) = cpu_of(row)?;
            Some((m - floor, lo - floor, hi - floor))
        };
        let (unlimited, nft) = (above(Row::Unlimited), above(Row::Nft));
        let whole_error = |row: Row| {
            let samples = outcomes.of(c, row);
            (!samples.is_empty())
                .then(|| median_min_max(samples.iter().map(Sample::whole_error_pct).collect()).0)
        };
        for row in [Row::AgentNative, Row::AgentGeneric] {
            if let (Some(mine), Some(theirs), Some(e), Some(nft_e)) =
                (above(row), nft, whole_error(row), whole_error(Row::Nft))
                && theirs.0 > 0.0
            {
                let accurate = e.abs() <= nft_e.abs() + ACCURACY_SLACK_PCT;
                against_nft
                    .entry(row)
                    .or_default()
                    .push((mine.0 / theirs.0, accurate));
            }
        }
        for row in ROWS {
            let samples = outcomes.of(c, row);
            if samples.is_empty() {
                let why = outcomes.stopped.get(&row).map_or("no run", String::as_str);
                let _ = writeln!(
                    s,
                    "| {} | {} | {why} | | | | | | | | | | | | |",
                    case.group(),
                    row.label()
                );
                continue;
            }
            let pick = |f: fn(&Sample) -> f64| median_min_max(samples.iter().map(f).collect());
            let achieved = pick(|x| x.achieved_pps);
            let asked = samples[0].asked_pps;
            let stall = pick(|x| x.max_lag.as_secs_f64() * 1e3);
            let retried = samples.iter().filter(|x| x.attempts > 1).count();
            let stalled = samples
                .iter()
                .filter(|x| x.max_lag >= case.refill())
                .count();
            let mut stall_cell = format!("{:.0} ms [{:.0}-{:.0}]", stall.0, stall.1, stall.2);
            if retried > 0 {
                let _ = write!(stall_cell, "; {retried} run again");
            }
            if stalled > 0 {
                let _ = write!(stall_cell, "; **{stalled} over burst/rate**");
            }
            let delivered = pick(|x| x.delivered as f64);
            let allowed = pick(|x| x.allowed);
            let allowed_whole = pick(|x| x.allowed_whole);
            let error = pick(Sample::error_pct);
            let whole_error = pick(Sample::whole_error_pct);
            let lost = pick(|x| x.lost as f64);
            let cpu = pick(Sample::cpu_ns_per_packet);
            let agent_cell = if matches!(row, Row::AgentNative | Row::AgentGeneric) {
                format!("{:.0}", pick(Sample::agent_ns_per_packet).0)
            } else {
                String::new()
            };
            let mine = above(row);
            let ratio = |base: Option<(f64, f64, f64)>| match (mine, base) {
                (Some(m), Some(b)) if b.0 > 0.0 => format!("{:.2}", m.0 / b.0),
                _ => "n/a".into(),
            };
            let limits = !matches!(row, Row::Unlimited | Row::FloorNative | Row::FloorGeneric);
            let (error_cell, whole_cell) = if limits {
                let cell =
                    |e: (f64, f64, f64)| format!("{:+.2}% [{:+.2} to {:+.2}]", e.0, e.1, e.2);
                (cell(error), cell(whole_error))
            } else {
                let share = delivered.0 / pick(|x| x.offered as f64).0 * 100.0;
                (format!("(delivered {share:.1}% of offered)"), String::new())
            };
            let above_cell = match mine {
                Some((m, lo, hi)) => format!("{m:.0} [{lo:.0} to {hi:.0}]"),
                None => "n/a".to_owned(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} ({}) | {stall_cell} | {} | {} | {error_cell} | {} | {whole_cell} | {} | {:.0} [{:.0}-{:.0}] | {agent_cell} | {above_cell} | {} | {} |",
                case.group(),
                row.label(),
                thousands(achieved.0 as u64),
                thousands(asked as u64),
                thousands(delivered.0 as u64),
                thousands(allowed.0 as u64),
                thousands(allowed_whole.0 as u64),
                thousands(lost.0 as u64),
                cpu.0,
                cpu.1,
                cpu.2,
                ratio(unlimited),
                ratio(nft),
            );
            if let Some((m, lo, hi)) = mine {
                cpu_bars.push(Bar {
                    group: case.group(),
                    series: row.label().into(),
                    median: m,
                    min: lo,
                    max: hi,
                });
            }
            if limits {
                error_bars.push(Bar {
                    group: case.group(),
                    series: row.label().into(),
                    median: whole_error.0,
                    min: whole_error.1,
                    max: whole_error.2,
                });
            }
        }
    }
    s.push('\n');
    for row in [Row::AgentNative, Row::AgentGeneric] {
        let Some(v) = against_nft.get(&row) else {
            continue;
        };
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), (r, _)| {
            (lo.min(*r), hi.max(*r))
        });
        let cheaper = v.iter().filter(|(r, _)| *r <= 1.0 / 3.0).count();
        let accurate = v.iter().filter(|(_, a)| *a).count();
        let _ = writeln!(
            s,
            "- Goal (issue 14: at least 3x less CPU per packet than the nftables meter, at \
             equal or better accuracy), {}: CPU above its floor {lo:.2}x to {hi:.2}x \
             nftables' over the {} cases, 3x less in {cheaper}; accuracy (whole packets) \
             within {ACCURACY_SLACK_PCT} point of nftables' in {accurate}. {}",
            row.label(),
            v.len(),
            if cheaper == v.len() && accurate == v.len() {
                "Met."
            } else {
                "**Not met.**"
            }
        );
    }
    // A row that stopped after some rounds keeps its figures above; say why it has fewer.
    for row in ROWS {
        if let Some(why) = outcomes.stopped.get(&row)
            && (0..cases.len()).any(|c| !outcomes.of(c, row).is_empty())
        {
            let _ = writeln!(s, "- {}: {why}", row.label());
        }
    }
    for (name, title, y, bars) in [
        (
            "limit-cpu.svg",
            "Rate limiting: CPU per offered packet above the floor (XDP_DROP on the same path)",
            "ns per offered packet",
            &cpu_bars,
        ),
        (
            "limit-error.svg",
            "Rate limiting: delivered against whole packets of burst + rate x T per key",
            "error, %",
            &error_bars,
        ),
    ] {
        if bars.is_empty() {
            let _ = writeln!(s, "({name}: no figures to draw)\n");
            continue;
        }
        plot::bars(&ctx.plots.join(name), title, y, bars)?;
        let _ = writeln!(s, "![{title}]({}/{name})\n", ctx.plots_rel);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_has_its_port_and_a_limit_below_the_offered_rate() {
        let cases = cases(false);
        assert_eq!(cases.len(), 6);
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(c.port, FIRST_PORT + i as u16);
            assert!(c.rate >= 1 && c.burst >= 1);
            assert!((c.rate as f64) < c.offered_per_key(), "{c:?}");
            assert!(c.table_size() >= c.keys);
        }
        // 100,000 sources fit in 198.18.0.0/15 above FIRST_SOURCE.
        let last = u32::from(FIRST_SOURCE) + 100_000;
        assert!(last < u32::from(Ipv4Addr::new(198, 20, 0, 0)));
    }
}
