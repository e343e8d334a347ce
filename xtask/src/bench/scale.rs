//! `cargo xtask bench scale` (issue 16): the agent with N balanced services of 4 backends
//! (N = 1, 100, 1,000, 10,000 by default), each in a fresh topology (`agent_tests::scale`):
//! time to ready, the maps' memory as the kernel accounts it, the agent's RSS, the agent's
//! CPU for TCP health checks of every backend over a fixed window, and the per-packet cost of
//! a balanced flow's first and later packets in the running agent's own XDP program.
//!
//! The packet cost is BPF_PROG_TEST_RUN through `bpftool prog run` on the agent's loaded
//! `agent_xdp` (the maps as the policy sized them), and on a trivial XDP program
//! (`agent_tests::xdp`, `return XDP_PASS`) for scale. agent-bench's own LB rows cannot take
//! a service count without a change in the agent crate; `bpftool` runs the same kernel
//! command with `repeat 1`, each frame once, as agent-bench's rows marked *run once each*.
//!
//! Writes its own section of BENCHMARKS.md (`--out`), keeping the others.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use agent_tests::{
    netns::Netns,
    scale::{self, ScaleLab, ScalePolicy},
    timing,
    xdp::{self, Verdict, XdpMode},
};
use anyhow::{Context, Result, bail};

use crate::{build, setup, sys};

const DEFAULT_OUT: &str = "BENCHMARKS.md";
const SECTION: &str = "## Scale: balanced services";
const BACKENDS: usize = 4;
const DEFAULT_SERVICES: &[usize] = &[1, 100, 1_000, 10_000];
/// The window over which the agent's CPU is read, after [`SETTLE`].
const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// From ready to the start of the CPU window: the first probes of every backend are sent
/// and answered (interval 1 s, jitter 10%).
const SETTLE: Duration = Duration::from_secs(2);
/// Distinct flows run once each per packet-cost row.
const DEFAULT_FLOWS: u16 = 500;
/// How long to wait for the previous agent's maps to be freed before the next start.
const TEARDOWN: Duration = Duration::from_secs(120);
/// Free memory may stay this far below what it was before an agent ran and still count as
/// given back.
const TEARDOWN_SLACK_KIB: u64 = 256 * 1024;

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const SPORT_BASE: u16 = 20_000;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

struct Args {
    out: PathBuf,
    services: Vec<usize>,
    window: Duration,
    flows: u16,
    health_checks: bool,
}

impl Args {
    fn parse(extra: &[String]) -> Result<Args> {
        let mut args = Args {
            out: PathBuf::from(DEFAULT_OUT),
            services: DEFAULT_SERVICES.to_vec(),
            window: DEFAULT_WINDOW,
            flows: DEFAULT_FLOWS,
            health_checks: true,
        };
        let mut it = extra.iter();
        while let Some(arg) = it.next() {
            let (name, value) = match arg.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (arg.as_str(), None),
            };
            let mut value = || {
                value
                    .clone()
                    .or_else(|| it.next().cloned())
                    .with_context(|| format!("{name} needs a value"))
            };
            match name {
                "--out" => args.out = PathBuf::from(value()?),
                "--services" => {
                    args.services = value()?
                        .split(',')
                        .map(|s| s.trim().replace('_', "").parse::<usize>())
                        .collect::<Result<_, _>>()
                        .context("--services: a comma-separated list of counts")?
                }
                "--window" => {
                    args.window =
                        Duration::from_secs(value()?.parse().context("--window: seconds")?)
                }
                "--flows" => args.flows = value()?.parse().context("--flows: a count")?,
                // Packet costs without the probes' load on the CPUs (no CPU figure then).
                "--no-health-checks" => args.health_checks = false,
                other => bail!(
                    "bench scale: unknown argument {other}; it takes --services 1,100,1000,10000, \
                     --window SECS, --flows N, --no-health-checks, --out FILE"
                ),
            }
        }
        Ok(args)
    }
}

/// One row: a policy's figures, or why there are none.
struct Row {
    services: usize,
    outcome: Result<Figures, String>,
}

struct Figures {
    ready: Duration,
    map_mib: f64,
    maps: usize,
    rss_mib: f64,
    /// CPU time over the window / the window, in percent of one CPU.
    cpu_percent: f64,
    /// Connections the backends accepted per second over the window (health checks).
    probes_per_sec: f64,
    /// Median program ns of a new flow's SYN and of an established flow's ACK.
    new_flow_ns: Option<f64>,
    established_ns: Option<f64>,
    /// Median program ns of the trivial program, measured right after those.
    trivial_ns: f64,
}

pub fn run(extra: &[String]) -> Result<()> {
    let args = Args::parse(extra)?;
    sys::require_root("cargo xtask bench scale (network namespaces, BPF)")?;
    let toolchain = setup::run()?;
    let agent = build::agent_binary(&toolchain, true)?;
    let commit = super::git_head();
    let load = loadavg();

    let trivial = Trivial::load()?;
    let mut rows = Vec::new();
    for &n in &args.services {
        eprintln!("{n} services x {BACKENDS} backends ...");
        let outcome = measure(&agent, &trivial, n, &args).map_err(|e| format!("{e:#}"));
        match &outcome {
            Ok(f) => eprintln!(
                "  ready {:.2} s, maps {:.1} MiB, RSS {:.1} MiB, CPU {:.1}%, LB new {:?} ns, \
                 established {:?} ns, trivial {:.0} ns",
                f.ready.as_secs_f64(),
                f.map_mib,
                f.rss_mib,
                f.cpu_percent,
                f.new_flow_ns,
                f.established_ns,
                f.trivial_ns
            ),
            Err(e) => eprintln!("  no figures: {}", reason(e)),
        }
        rows.push(Row {
            services: n,
            outcome,
        });
    }
    let section = render(&rows, &args, &commit, &load);
    super::publish(&args.out, &section)
}

/// Starts the agent with `n` services, measures, stops it and waits for its maps to be
/// freed (so the next start does not compete with their teardown).
fn measure(agent: &Path, trivial: &Trivial, n: usize, args: &Args) -> Result<Figures> {
    let mut policy = ScalePolicy::new(n, BACKENDS);
    policy.health_checks = args.health_checks;
    let free_before = mem_free_kib()?;
    let mut lab = ScaleLab::new(&policy.ports())?;
    let result = measure_in(&mut lab, agent, trivial, &policy, args);
    lab.stop()?;
    drop(lab);
    wait_for_teardown(free_before)?;
    result
}

fn measure_in(
    lab: &mut ScaleLab,
    agent: &Path,
    trivial: &Trivial,
    policy: &ScalePolicy,
    args: &Args,
) -> Result<Figures> {
    let start = lab.spawn(agent, policy)?;
    let ready = lab.wait_ready(start, timing::READY_GIVE_UP)?;
    let pid = lab.agent()?.pid();
    let maps = scale::map_memory(pid)?;
    let rss = scale::rss(pid)?;

    std::thread::sleep(SETTLE);
    let (cpu0, acc0, t0) = (scale::cpu_time(pid)?, lab.accepted(), Instant::now());
    std::thread::sleep(args.window);
    let (cpu1, acc1, elapsed) = (scale::cpu_time(pid)?, lab.accepted(), t0.elapsed());
    let overflows = lab.listen_overflows()?;
    if overflows > 0 {
        bail!(
            "the backend listeners' accept queues overflowed {overflows} times: the probes/s \
             would be the harness's, not the agent's"
        );
    }
    lab.agent()?.get("/health/ready")?;

    let prog = agent_xdp_id(pid)?;
    let vip = scale::vip(policy.services - 1);
    let vip_ip = match vip.ip() {
        std::net::IpAddr::V4(a) => a.octets(),
        std::net::IpAddr::V6(_) => bail!("IPv4 VIPs only"),
    };
    let syns: Vec<Vec<u8>> = (0..args.flows)
        .map(|i| tcp_frame(CLIENT, SPORT_BASE + i, vip_ip, vip.port(), TCP_SYN))
        .collect();
    let acks: Vec<Vec<u8>> = (0..args.flows)
        .map(|i| tcp_frame(CLIENT, SPORT_BASE + i, vip_ip, vip.port(), TCP_ACK))
        .collect();
    // Every SYN first (each a new flow), then every ACK (each flow established), as
    // agent-bench does.
    let frames: Vec<&[u8]> = syns.iter().chain(&acks).map(Vec::as_slice).collect();
    let runs = prog_runs(prog, &frames)?;
    let (syn_runs, ack_runs) = runs.split_at(syns.len());
    for (i, (_, out)) in syn_runs.iter().enumerate() {
        let (dst, dport) = (&out[30..34], u16::from_be_bytes([out[36], out[37]]));
        if dst[..2] != [198, 19] || dst[2] >= 128 || dport < scale::BACKEND_PORT {
            bail!("flow {i}: the SYN to {vip} came out to {dst:?}:{dport}, not to a backend");
        }
    }
    let new_ns = syn_runs.iter().map(|r| r.0).collect();
    let est_ns = ack_runs.iter().map(|r| r.0).collect();
    // Right after, under the same load (the health checks' packets and the agent's work
    // share the CPUs with these runs): the ratio compares like with like.
    let trivial_ns = trivial.ns(args.flows)?;
    Ok(Figures {
        ready,
        map_mib: maps.mib(),
        maps: maps.by_id.len(),
        rss_mib: rss as f64 / MIB,
        cpu_percent: (cpu1.total() - cpu0.total()).as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        probes_per_sec: (acc1 - acc0) as f64 / elapsed.as_secs_f64(),
        new_flow_ns: median(new_ns),
        established_ns: median(est_ns),
        trivial_ns,
    })
}

const MIB: f64 = 1024.0 * 1024.0;

/// The trivial XDP program (`agent_tests::xdp`, `return XDP_PASS`), attached to `lo` of a
/// namespace of its own for as long as this lives: the scale of the LB rows.
struct Trivial {
    id: u32,
    // Field order is drop order: the program before its namespace.
    _guard: xdp::XdpGuard,
    _ns: Netns,
}

impl Trivial {
    fn load() -> Result<Trivial> {
        let ns = Netns::create(&agent_tests::netns::unique_name("b"))?;
        ns.ip(&["link", "set", "lo", "up"])?;
        let before = prog_ids(std::process::id())?;
        let guard = xdp::attach_trivial(&ns, "lo", XdpMode::Generic, Verdict::Pass)?;
        let after = prog_ids(std::process::id())?;
        let Some(&id) = after.iter().find(|id| !before.contains(id)) else {
            bail!("the trivial XDP program's id is not among this process's fds");
        };
        Ok(Trivial {
            id,
            _guard: guard,
            _ns: ns,
        })
    }

    /// Median program ns of `flows` frames run once each, as the LB rows are.
    fn ns(&self, flows: u16) -> Result<f64> {
        let frames: Vec<Vec<u8>> = (0..flows)
            .map(|i| tcp_frame(CLIENT, SPORT_BASE + i, [198, 19, 128, 1], 80, TCP_ACK))
            .collect();
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let v = prog_runs(self.id, &refs)?
            .into_iter()
            .map(|r| r.0)
            .collect();
        median(v).context("no runs of the trivial program")
    }
}

/// Program ids held by process `pid` (fdinfo `prog_id`).
fn prog_ids(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some(id) = agent_common::fdinfo::field(&text, "prog_id").and_then(|v| v.parse().ok())
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// The id of the program named `agent_xdp` that the agent holds.
fn agent_xdp_id(pid: u32) -> Result<u32> {
    for id in prog_ids(pid)? {
        let out = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string(), "--json"])
            .output()
            .context("running bpftool (Debian package `bpftool`)")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["name"] == "agent_xdp" {
            return Ok(id);
        }
    }
    bail!("the agent (pid {pid}) holds no program named agent_xdp")
}

/// `prog run id ID data_in FRAME data_out OUT repeat 1` for each frame, in order, in one
/// `bpftool batch` (one process, so the runs follow each other as agent-bench's do): the
/// kernel's duration of each run (ns) and the frame as the program left it.
fn prog_runs(id: u32, frames: &[&[u8]]) -> Result<Vec<(f64, Vec<u8>)>> {
    let dir = agent_tests::agent::TempDir::new()?;
    let mut batch = String::new();
    for (i, frame) in frames.iter().enumerate() {
        let input = dir.path().join(format!("in-{i}.bin"));
        std::fs::write(&input, frame).with_context(|| format!("writing {}", input.display()))?;
        let _ = writeln!(
            batch,
            "prog run id {id} data_in {} data_out {} repeat 1",
            input.display(),
            dir.path().join(format!("out-{i}.bin")).display()
        );
    }
    let file = dir.write("batch", &batch)?;
    let out = Command::new("bpftool")
        .args(["batch", "file"])
        .arg(&file)
        .output()
        .context("running bpftool batch (Debian package `bpftool`)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "bpftool batch of prog run id {id}: {}{}",
            text.lines().last().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let durations: Vec<f64> = text.lines().filter_map(parse_duration_ns).collect();
    if durations.len() != frames.len() {
        bail!(
            "bpftool batch of {} runs of prog id {id} reported {} durations: {}",
            frames.len(),
            durations.len(),
            text.lines().take(3).collect::<Vec<_>>().join(" / ")
        );
    }
    durations
        .into_iter()
        .enumerate()
        .map(|(i, ns)| {
            let path = dir.path().join(format!("out-{i}.bin"));
            let data =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            Ok((ns, data))
        })
        .collect()
}

/// The ns of `duration: 52ns` (`duration (average): 52ns` with repeats) in bpftool's answer.
fn parse_duration_ns(text: &str) -> Option<f64> {
    let (_, rest) = text.split_once("duration")?;
    let (_, rest) = rest.split_once(':')?;
    let v: String = rest
        .trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    v.parse().ok()
}

/// A 64-byte Ethernet/IPv4/TCP frame with `flags` from `src:sport` to `dst:dport`, laid out
/// as agent-bench's (checksums zero: the datapath does not verify them).
fn tcp_frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut b = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    b.extend([0x45, 0]);
    b.extend((20u16 + 20 + 10).to_be_bytes());
    b.extend([0, 1, 0, 0, 64, 6, 0, 0]);
    b.extend(src);
    b.extend(dst);
    b.extend(sport.to_be_bytes());
    b.extend(dport.to_be_bytes());
    b.extend(1u32.to_be_bytes()); // seq
    b.extend(0u32.to_be_bytes()); // ack
    b.extend([5 << 4, flags]);
    b.extend(64_240u16.to_be_bytes()); // window
    b.extend([0, 0, 0, 0]); // checksum, urgent
    b.resize(64, 0xab);
    b
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn mem_free_kib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemFree:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .context("/proc/meminfo: no MemFree")
}

/// Waits until free memory is back to `before` (less [`TEARDOWN_SLACK_KIB`]): the kernel
/// frees a map's memory in deferred work after its last fd closes.
fn wait_for_teardown(before: u64) -> Result<()> {
    let deadline = Instant::now() + TEARDOWN;
    loop {
        let now = mem_free_kib()?;
        if now + TEARDOWN_SLACK_KIB >= before {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "free memory {} MiB, {} MiB before the agent ran, {TEARDOWN:?} after it stopped",
                now / 1024,
                before / 1024
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Why a row has no figures, in one line: the agent's first line of output when the error
/// carries it (a refused policy), else the error's first line.
fn reason(e: &str) -> String {
    let first = e.lines().next().unwrap_or("");
    match e.split_once("its output:") {
        Some((_, output)) => match output.lines().map(str::trim).find(|l| !l.is_empty()) {
            Some(line) => format!("{} ({line})", first.trim_end_matches("; its output:")),
            None => first.to_owned(),
        },
        None => first.to_owned(),
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The 1-minute load average (`/proc/loadavg`).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The Markdown section.
fn render(rows: &[Row], args: &Args, commit: &str, load: &str) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut s = String::new();
    let _ = write!(
        s,
        "{SECTION}\n\n\
         Produced by `cargo xtask bench scale` (release agent at {commit}) on {}, {cpus} CPUs, \
         kernel {}. N services of {BACKENDS} backends each, `load_balancing: {{algorithm: \
         maglev, vip: true}}` at the default table sizes, {checks}; the agent in a network namespace on a veth (generic XDP, both \
         directions), every backend address answered by one listener in the server namespace \
         (`agent_tests::scale`). Each N in a fresh topology, after the previous agent's maps \
         were freed. Load average when it started: {load} (work of others on the machine \
         shows there, and in every figure).\n\n",
        cpu_model(),
        kernel(),
        checks = if args.health_checks {
            "a TCP health check of every backend every second"
        } else {
            "no health checks (`--no-health-checks`)"
        },
    );
    s.push_str(
        "| services | ready s | maps MiB (maps) | agent RSS MiB | agent CPU % | probes/s | \
         LB new flow ns | x trivial | LB established ns | x trivial | trivial ns |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        match &r.outcome {
            Ok(f) => {
                let ns = |v: Option<f64>| {
                    v.map_or(("-".to_owned(), "-".to_owned()), |v| {
                        (format!("{v:.0}"), format!("{:.1}", v / f.trivial_ns))
                    })
                };
                let (new, new_x) = ns(f.new_flow_ns);
                let (est, est_x) = ns(f.established_ns);
                let _ = writeln!(
                    s,
                    "| {} | {:.2} | {:.1} ({}) | {:.1} | {:.1} | {:.0} | {new} | {new_x} | {est} | \
                     {est_x} | {:.0} |",
                    r.services,
                    f.ready.as_secs_f64(),
                    f.map_mib,
                    f.maps,
                    f.rss_mib,
                    f.cpu_percent,
                    f.probes_per_sec,
                    f.trivial_ns,
                );
            }
            Err(e) => {
                let why = reason(e).replace('|', "\\|");
                let _ = writeln!(
                    s,
                    "| {} | not ready: {why} | - | - | - | - | - | - | - | - | - |",
                    r.services
                );
            }
        }
    }
    let _ = write!(
        s,
        "\n- *ready*: from the spawn of `agent run` until `/health/ready` answers 200.\n\
         - *maps*: `memlock` summed over the distinct BPF maps the agent holds \
         (`/proc/PID/fdinfo`), the kernel's own accounting, read once ready.\n\
         - *agent CPU*: user + system time of the agent (`/proc/PID/stat`) over {window} s, \
         starting {settle} s after ready, in percent of one CPU; *probes/s*: connections the \
         backends accepted in that window (the health checks).\n\
         - *LB ns*: BPF_PROG_TEST_RUN (`bpftool batch` of `prog run ... repeat 1`) of the running agent's \
         `agent_xdp` on a TCP frame to the last service's VIP: the SYN of a new flow (pick, \
         connection-table inserts, tail calls, DNAT; checked to come out to a backend), then \
         its ACK (established: lookup, DNAT); medians over {flows} flows, each frame run once. \
         *x trivial*: over a `return XDP_PASS` program run the same way right after, under \
         the same load (*trivial ns*): the health checks' packets and the agent share the CPUs \
         with these runs, so figures at 10,000 services carry that load. Single runs carry the \
         kernel's timer overhead and cold caches, as agent-bench's rows marked *run once \
         each*; compare within a table, not with agent-bench's figures.\n",
        window = args.window.as_secs(),
        settle = SETTLE.as_secs(),
        flows = args.flows,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpftool_duration_and_arguments() {
        assert_eq!(
            parse_duration_ns("Return value: 3, duration (average): 412ns\n"),
            Some(412.0)
        );
        assert_eq!(
            parse_duration_ns("Return value: 2, duration: 602ns\n"),
            Some(602.0)
        );
        assert_eq!(parse_duration_ns("Error: ..."), None);
        let a = Args::parse(&["--services=1,1_000".into(), "--window".into(), "3".into()]).unwrap();
        assert_eq!(a.services, [1, 1000]);
        assert_eq!(a.window, Duration::from_secs(3));
        assert!(Args::parse(&["--bogus".into()]).is_err());
    }

    #[test]
    fn reason_is_the_agents_first_line() {
        assert_eq!(
            reason(
                "agent exited with exit status: 2 before it was ready; its output:\n\
                 /tmp/x.yaml:5:3: agent.tables: unknown field\n/tmp/x.yaml: 1 error\n"
            ),
            "agent exited with exit status: 2 before it was ready \
             (/tmp/x.yaml:5:3: agent.tables: unknown field)"
        );
        assert_eq!(reason("no such file\nmore"), "no such file");
    }

    #[test]
    fn frame_is_tcp_to_the_vip() {
        let f = tcp_frame(CLIENT, 20_000, [198, 19, 128, 1], 80, TCP_SYN);
        assert_eq!(f.len(), 64);
        assert_eq!(f[23], 6);
        assert_eq!(&f[30..34], &[198, 19, 128, 1]);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 80);
        assert_eq!(f[47], TCP_SYN);
    }
}
