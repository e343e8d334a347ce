//! `cargo xtask bench health`: what a health check costs, the agent against HAProxy, in one
//! run on one topology.
//!
//! ```text
//! client namespace (veth-cli 198.18.0.1)        server namespace (veth-srv 198.18.0.2)
//!   HAProxy, then the agent  --- veth --->  198.19.0.0/16 local on lo (AnyIP)
//!   probing BACKENDS addresses                 :8080 one listener (accepts, drops)
//!                                              :8081 nothing: the kernel answers RST
//!                                              nft counter of SYNs (the probes)
//! ```
//!
//! Backend `i` is 198.19.0.0 + i + 1, on port 8080 when `i` is even (listening) and 8081
//! when odd (refusing). Each checker runs alone: warm-up, then `--seconds` of measurement:
//! process CPU (utime + stime from /proc/PID/stat, every thread), SYNs seen by the
//! backends, and the lines the checker printed (sampled every second for the peak). The table
//! goes to stdout and into `--out`, replacing its own section.

use std::{
    fmt::Write as _,
    fs,
    io::{ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_tests::{
    agent::{AgentProcess, TempDir},
    netns::{Netns, Topology},
    scale,
    timing::Scaled,
};
use anyhow::{Context as _, Result, bail};
use clap::Parser;

use crate::{build, setup, sys};

const SECTION: &str = "## Health checks, CPU per probe";
/// What this benchmark runs beyond the project's own packages.
const PACKAGES: &[&str] = &["haproxy", "nftables"];
/// The backends' range: local on the server's loopback, routed there from the client.
const BACKEND_NET: &str = "198.19.0.0/16";
const BACKEND_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
const LISTENING_PORT: u16 = 8080;
const REFUSING_PORT: u16 = 8081;
const NFT_TABLE: &str = "health_bench";
const AGENT_LISTEN: &str = "127.0.0.1:9090";
const READY: Scaled = Scaled::secs(60);

#[derive(Parser, Debug)]
#[command(name = "cargo xtask bench health")]
struct Args {
    /// Backends, half listening, half refusing.
    #[arg(long, default_value_t = 4000)]
    backends: usize,
    /// Backends per service in the agent's policy (each service gets a breaker of its own).
    #[arg(long, default_value_t = 100)]
    per_service: usize,
    /// Seconds of measurement per checker.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Rounds: each runs every checker in turn; a checker's figures are summed over them (the
    /// machine's other load then falls on all checkers alike), with the spread per round.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds each checker runs before the measurement starts.
    #[arg(long, default_value_t = 8)]
    warmup: u64,
    /// The agent binary to measure; default: built here, release.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The Markdown file whose section is replaced (or appended).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
}

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    let args =
        Args::try_parse_from(std::iter::once("health".to_owned()).chain(extra.iter().cloned()))?;
    sys::require_root("cargo xtask bench health (network namespaces, nftables, the agent)")?;
    let toolchain = setup::run()?;
    install_packages()?;
    let agent = match &args.agent_bin {
        Some(bin) => bin.clone(),
        None => build::agent_binary(&toolchain, true)?,
    };
    if args.backends < 2 || args.per_service == 0 {
        bail!("--backends must be at least 2 and --per-service at least 1");
    }

    let topo = Topology::new()?;
    let bench = Bench::new(&topo, &args)?;
    let tmp = TempDir::new()?;
    let backends = backends(args.backends);

    let haproxy_cfg = tmp.write("haproxy.cfg", &haproxy_config(&backends))?;
    let mut agent_cfgs = Vec::new();
    for (name, breakers) in [
        ("health.yaml", None),
        ("cycling.yaml", Some(MAX_RESET_CYCLING)),
        ("doubling.yaml", Some(MAX_RESET_DOUBLING)),
    ] {
        let policy = agent_policy(&topo.client_if, &backends, args.per_service, breakers);
        agent_cfgs.push(tmp.write(name, &policy)?);
    }
    let labels = [
        "HAProxy 2.6 (`check inter 1s fall 3 rise 2`)",
        "agent, health checks",
        "agent, + a breaker per backend, reopening every 2 s",
        "agent, + a breaker per backend, open periods doubling",
    ];
    let mut runs: Vec<Vec<Row>> = labels.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds.max(1) {
        println!("bench health: round {round} of {}", args.rounds.max(1));
        runs[0].push(bench.measure(labels[0], || Checker::haproxy(&topo.client, &haproxy_cfg))?);
        for (i, config) in agent_cfgs.iter().enumerate() {
            runs[i + 1].push(bench.measure(labels[i + 1], || {
                Checker::agent(&agent, &topo.client, config)
            })?);
        }
    }
    let rows: Vec<Row> = runs.iter().map(|r| Row::sum(r)).collect();
    drop(bench);

    let section = report(&args, &rows);
    super::publish(&args.out, &section)
}

/// haproxy and nft, installed with apt-get when missing (as `cargo xtask setup` installs the
/// project's packages).
fn install_packages() -> Result<()> {
    let missing = setup::missing_packages(PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    Ok(setup::apt_install(&missing)?)
}

/// Backend `i`: 198.19.0.0 + i + 1, listening when `i` is even.
fn backends(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(BACKEND_BASE) + i as u32 + 1);
            let port = if i % 2 == 0 {
                LISTENING_PORT
            } else {
                REFUSING_PORT
            };
            SocketAddr::from((ip, port))
        })
        .collect()
}

fn haproxy_config(backends: &[SocketAddr]) -> String {
    let mut c = String::from(
        "global
    maxconn 2000
    log stdout format raw local0

defaults
    mode tcp
    log global
    timeout connect 500ms
    timeout check 500ms
    timeout client 5s
    timeout server 5s
    default-server check inter 1s fall 3 rise 2

# HAProxy wants a listener; nothing connects to it.
frontend bench
    bind 127.0.0.1:8999
    default_backend bench

backend bench
",
    );
    for (i, b) in backends.iter().enumerate() {
        let _ = writeln!(c, "    server b{i} {b}");
    }
    c
}

/// `max_reset_timeout` of the breakers that stay at `reset_timeout` (1 s): every refusing
/// backend's breaker reopens about every 2 s, thousands of transitions a second (each a map write;
/// the log's worst case).
const MAX_RESET_CYCLING: &str = "1s";
/// The policy's default: open periods double from 1 s on, as deployed.
const MAX_RESET_DOUBLING: &str = "300s";

/// Services of `per_service` backends, each with the same TCP check as HAProxy's (1 s, fall
/// 3, rise 2, 500 ms timeout); with `breakers` (their `max_reset_timeout`), a breaker per
/// backend, any share of them open.
fn agent_policy(
    ifname: &str,
    backends: &[SocketAddr],
    per_service: usize,
    breakers: Option<&str>,
) -> String {
    let mut p = format!(
        "version: 1
agent:
  listen: {AGENT_LISTEN}
  log_level: info
interfaces:
  - name: {ifname}
    xdp_mode: generic
    direction: both
services:
"
    );
    for (s, chunk) in backends.chunks(per_service).enumerate() {
        // A match no packet goes to: the backends' breakers follow their own addresses.
        let _ = writeln!(
            p,
            "  - name: svc-{s}
    match:
      address: \"198.18.{}.{}/32\"
      port: 80
      protocol: tcp
    load_balancing:
      vip: false
    health_check:
      type: tcp
      interval: 1s
      unhealthy_interval: 1s
      timeout: 500ms
      healthy_threshold: 2
      unhealthy_threshold: 3
      passive: false
    backends:",
            100 + s / 250,
            1 + s % 250
        );
        for b in chunk {
            let _ = writeln!(p, "      - address: {b}");
        }
        if let Some(max_reset) = breakers {
            let _ = writeln!(
                p,
                "    circuit_breaker:
      failure_threshold: 3
      reset_timeout: 1s
      max_reset_timeout: {max_reset}
      success_threshold: 2
      max_ejection_percent: 100%"
            );
        }
    }
    p
}

/// The server side: the backends' addresses, a listener, the SYN counter.
struct Bench<'a> {
    server: &'a Netns,
    seconds: u64,
    warmup: u64,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<Result<()>>>,
}

impl<'a> Bench<'a> {
    fn new(topo: &'a Topology, args: &Args) -> Result<Bench<'a>> {
        // AnyIP: the whole range is local in the server namespace, one route, no addresses.
        topo.server
            .ip(&["route", "add", "local", BACKEND_NET, "dev", "lo"])?;
        topo.client.ip(&[
            "route",
            "add",
            BACKEND_NET,
            "via",
            &topo.server_v4.to_string(),
        ])?;
        let nft = format!(
            "table inet {NFT_TABLE} {{
    counter syns {{ }}
    chain input {{
        type filter hook input priority 0; policy accept;
        tcp flags & (syn | ack) == syn counter name syns
    }}
}}
"
        );
        let mut child = topo
            .server
            .exec(&["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("spawning nft")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(nft.as_bytes())?;
        if !child.wait()?.success() {
            bail!("nft -f - refused the counter table:\n{nft}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let acceptor = topo.server.spawn(move || accept_all(&flag))?;
        Ok(Bench {
            server: &topo.server,
            seconds: args.seconds,
            warmup: args.warmup,
            stop,
            acceptor: Some(acceptor),
        })
    }

    fn syns(&self) -> Result<u64> {
        let out = self
            .server
            .exec(&["nft", "list", "counter", "inet", NFT_TABLE, "syns"])
            .output()
            .context("nft list counter")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        while let Some(w) = words.next() {
            if w == "packets"
                && let Some(n) = words.next().and_then(|n| n.parse().ok())
            {
                return Ok(n);
            }
        }
        bail!("no `packets N` in `nft list counter`: {text}")
    }

    /// Starts a checker, lets it warm up, measures it, stops it.
    fn measure(&self, label: &str, start: impl FnOnce() -> Result<Checker>) -> Result<Row> {
        println!("bench health: {label}: warming up for {} s", self.warmup);
        let mut checker = start()?;
        std::thread::sleep(Duration::from_secs(self.warmup));
        checker.check_running()?;
        let pid = checker.pid();
        let (cpu0, syn0, lines0) = (scale::cpu_time(pid)?, self.syns()?, checker.lines());
        let began = Instant::now();
        let mut last_lines = lines0;
        let mut peak = 0;
        for s in 1..=self.seconds {
            let next = began + Duration::from_secs(s);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let lines = checker.lines();
            peak = peak.max(lines - last_lines);
            last_lines = lines;
        }
        let (cpu1, syn1) = (scale::cpu_time(pid)?, self.syns()?);
        let wall = began.elapsed();
        checker.check_running()?;
        checker.stop()?;
        let row = Row {
            label: label.to_owned(),
            spread: (f64::NAN, f64::NAN),
            cpu: cpu1.total() - cpu0.total(),
            system: cpu1.system - cpu0.system,
            wall,
            probes: syn1 - syn0,
            lines: last_lines - lines0,
            peak_lines: peak,
        };
        println!(
            "bench health: {label}: {:.1}% of a core, {} probes, {:.1} us per probe ({:.1} system), {} log lines",
            row.cpu_percent(),
            row.probes,
            row.us_per_probe(),
            row.per_probe(row.system),
            row.lines
        );
        Ok(row)
    }
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            match a.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("warning: backend listener: {e:#}"),
                Err(_) => eprintln!("warning: backend listener panicked"),
            }
        }
    }
}

/// The listening half: one wildcard listener for every backend address, accepting and
/// closing until `stop`. Non-blocking, so it sees `stop`; a full backlog would drop SYNs and
/// turn listening backends into timeouts.
fn accept_all(stop: &AtomicBool) -> Result<()> {
    let listener =
        TcpListener::bind(("0.0.0.0", LISTENING_PORT)).context("binding the backends' listener")?;
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => drop(conn),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
            Err(e) => return Err(e).context("accept"),
        }
    }
    Ok(())
}

/// A checker under measurement.
enum Checker {
    Haproxy(Haproxy),
    Agent(AgentProcess),
}

/// HAProxy as a child process, killed on drop if still running.
struct Haproxy {
    child: Child,
    log: PathBuf,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Checker {
    /// `haproxy -db -f CONFIG` in the client namespace, its output in CONFIG.log.
    fn haproxy(ns: &Netns, config: &Path) -> Result<Checker> {
        let log = config.with_extension("log");
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new("haproxy");
        command
            .arg("-db")
            .arg("-f")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = ns.spawn_process(&mut command)?;
        Ok(Checker::Haproxy(Haproxy { child, log }))
    }

    fn agent(bin: &Path, ns: &Netns, config: &Path) -> Result<Checker> {
        let mut agent = AgentProcess::spawn(bin, ns, config)?;
        agent.wait_ready(READY)?;
        Ok(Checker::Agent(agent))
    }

    fn pid(&self) -> u32 {
        match self {
            Checker::Haproxy(h) => h.child.id(),
            Checker::Agent(a) => a.pid(),
        }
    }

    fn log_path(&self) -> &Path {
        match self {
            Checker::Haproxy(h) => &h.log,
            Checker::Agent(a) => a.log_path(),
        }
    }

    fn lines(&self) -> u64 {
        fs::read(self.log_path()).map_or(0, |t| t.iter().filter(|&&b| b == b'\n').count() as u64)
    }

    fn check_running(&mut self) -> Result<()> {
        match self {
            Checker::Haproxy(h) => match h.child.try_wait()? {
                None => Ok(()),
                Some(status) => bail!(
                    "haproxy exited ({status}); its output:\n{}",
                    fs::read_to_string(&h.log).unwrap_or_default()
                ),
            },
            Checker::Agent(a) => a.check_running(),
        }
    }

    fn stop(self) -> Result<()> {
        match self {
            Checker::Haproxy(mut h) => {
                // SAFETY: kill(2) on our own child, not reaped yet.
                unsafe { libc::kill(h.child.id() as libc::pid_t, libc::SIGTERM) };
                h.child.wait()?;
            }
            Checker::Agent(a) => {
                a.stop()?;
            }
        }
        Ok(())
    }
}

struct Row {
    label: String,
    /// us CPU per probe of the least and the most costly round.
    spread: (f64, f64),
    cpu: Duration,
    /// The kernel's share of `cpu` (stime): syscalls, and the softirq work of the probes'
    /// packets that runs in the process's context.
    system: Duration,
    wall: Duration,
    probes: u64,
    lines: u64,
    peak_lines: u64,
}

impl Row {
    /// The rounds of one checker as one row.
    fn sum(rounds: &[Row]) -> Row {
        let per_probe: Vec<f64> = rounds.iter().map(Row::us_per_probe).collect();
        Row {
            label: rounds[0].label.clone(),
            spread: (
                per_probe.iter().copied().fold(f64::INFINITY, f64::min),
                per_probe.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ),
            cpu: rounds.iter().map(|r| r.cpu).sum(),
            system: rounds.iter().map(|r| r.system).sum(),
            wall: rounds.iter().map(|r| r.wall).sum(),
            probes: rounds.iter().map(|r| r.probes).sum(),
            lines: rounds.iter().map(|r| r.lines).sum(),
            peak_lines: rounds.iter().map(|r| r.peak_lines).max().unwrap_or(0),
        }
    }

    fn cpu_percent(&self) -> f64 {
        100.0 * self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    fn us_per_probe(&self) -> f64 {
        self.per_probe(self.cpu)
    }

    fn per_probe(&self, cpu: Duration) -> f64 {
        if self.probes == 0 {
            return f64::NAN;
        }
        cpu.as_secs_f64() * 1e6 / self.probes as f64
    }
}

fn report(args: &Args, rows: &[Row]) -> String {
    let mut t = String::new();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(t, "{SECTION}\n");
    let _ = writeln!(
        t,
        "Produced by `cargo xtask bench health` on kernel {}, {cpus} CPUs. {} TCP backends in \
         a server namespace, half listening (one wildcard listener that accepts and closes), \
         half refusing (nothing listens: the kernel answers RST); each checker runs alone in \
         the client namespace across a veth, probing every backend every second, warmed up \
         {} s, then measured for {} s, in {} rounds of every checker in turn (figures summed \
         over the rounds; the machine is shared, so the rounds also show the noise): process \
         CPU (utime + stime of all threads, /proc/PID/stat; *system* is stime: syscalls and \
         the softirq work of the probes' packets, run in the process's context), probes \
         (SYNs counted by an nftables counter in the server namespace), lines printed (and \
         the most in one second). HAProxy: one `backend` of \
         every server, `default-server check inter 1s fall 3 rise 2`, `timeout check 500ms`, \
         its default threads. The agent: services of {} backends, `health_check: {{type: \
         tcp, interval: 1s, unhealthy_interval: 1s, timeout: 500ms, healthy_threshold: 2, \
         unhealthy_threshold: 3, passive: false}}`, generic XDP on the client veth; with \
         breakers, `circuit_breaker: {{failure_threshold: 3, reset_timeout: 1s, \
         max_reset_timeout: {MAX_RESET_CYCLING}, success_threshold: 2, max_ejection_percent: \
         100%}}`, so that every refusing backend cycles open -> half_open -> open about every \
         2 s (thousands of transitions a second; the agent writes `BACKENDS` when the state the datapath enforces changes), or with \
         `max_reset_timeout: {MAX_RESET_DOUBLING}` (the default), so that open periods double \
         (1, 2, 4, ... s) as a deployment's would.\n",
        kernel.trim(),
        args.backends,
        args.warmup,
        args.seconds,
        args.rounds.max(1),
        args.per_service
    );
    let _ = writeln!(
        t,
        "| checker | CPU, % of a core | probes | probes/s | us CPU per probe | of which system | rounds: least-most | x HAProxy | log lines | most lines in 1 s |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let base = rows.first().map(Row::us_per_probe).unwrap_or(f64::NAN);
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {:.1} | {} | {:.0} | {:.1} | {:.1} | {:.1}-{:.1} | {:.2} | {} | {} |",
            r.label,
            r.cpu_percent(),
            r.probes,
            r.probes as f64 / r.wall.as_secs_f64(),
            r.us_per_probe(),
            r.per_probe(r.system),
            r.spread.0,
            r.spread.1,
            r.us_per_probe() / base,
            r.lines,
            r.peak_lines
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_backends_listen() {
        let b = backends(4);
        assert_eq!(b[0], "198.19.0.1:8080".parse().unwrap());
        assert_eq!(b[1], "198.19.0.2:8081".parse().unwrap());
        assert_eq!(b[3], "198.19.0.4:8081".parse().unwrap());
        let b = backends(4000);
        assert_eq!(b[3999], "198.19.15.160:8081".parse().unwrap());
    }
}
