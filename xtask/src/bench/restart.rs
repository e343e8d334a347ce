//! `cargo xtask bench restart` (issue 10): what a restart of the agent costs the traffic now
//! that the datapath is pinned and outlives it, how long a start takes that adopts the pins
//! against a fresh one, and what the agent itself costs in memory and CPU.
//!
//! ```text
//! client namespace (veth-cli 198.18.0.1)             server namespace (veth-srv 198.18.0.2)
//!   the agent on veth-cli (generic XDP + TC egress)
//!   UDP sender, sequence-numbered    --- veth --->    receivers on :5300 and :5301
//!     --rate pps to :5300 (limit far above it)
//!     --capped-rate pps to :5301 (limit 1/s, burst 1)
//!   TCP to the VIP 198.18.0.100:80   --- veth --->    echo backends 198.18.2.1-2:8080
//!     one connection, an echo every ms (DNAT on TC egress, reverse NAT on XDP ingress)
//!     a new connection every 20 ms
//! ```
//!
//! Each UDP packet carries its sequence number and the time it was sent. The receiver records
//! the time it arrived. The TCP client records each echo's round trip on its one long
//! connection (which lives in the balancer's connection table across the restart), and each
//! new connection's outcome. A run is cut into phases by what the agent is doing: *running*
//! (before the stop), *down* (from the stop until the new agent is spawned, `--down-ms`),
//! *starting* (spawn to `/health/ready`: adoption or a fresh load) and *running again*. For
//! each phase, by the time a packet was sent: packets lost (sequence numbers that never
//! arrived), the largest gap between arrivals and between sends (a sender stalled by the
//! machine shows in both; only the receiver's gap beyond it is the datapath's), how many
//! packets of the capped flow got through (what passed unenforced when there were none to
//! drop them: with enforcement, about burst + 1/s), the echoes and the slowest, and the new
//! connections and how many failed.
//!
//! Two runs: the agent as deployed now (`agent run`, killed with SIGKILL, a new `agent run`
//! adopting the pins), and for context the earlier behaviour (`agent run --detach-on-exit`,
//! stopped with SIGTERM, which detaches and removes everything, then started fresh).
//!
//! Then: time to ready of a fresh start (after `agent uninstall --config F`) and of a start
//! that adopts the pins, same policy, `--runs` each, alternating; the adopted agent's RSS
//! and CPU when idle; and the same with 1,000 backends (`--backends`) probed every second
//! (`agent_tests::scale`). Writes its own section of BENCHMARKS.md (`--out`).

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_tests::{
    agent::{AgentProcess, TempDir, backend_items},
    backend::TcpServer,
    netns::{Netns, Topology},
    scale::{self, ScaleLab, ScalePolicy},
    timing::Scaled,
    traffic::{RCVBUF_BYTES, socket_drops},
};
use anyhow::{Context as _, Result, bail};
use clap::Parser;

use crate::{build, setup, sys};

const SECTION: &str = "## Restart: the pinned datapath without its agent";
const STEADY_PORT: u16 = 5300;
const CAPPED_PORT: u16 = 5301;
const VIP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100), 80));
const BACKEND_PORT: u16 = 8080;
const BACKENDS: usize = 2;
/// One echo on the long connection every this long.
const ECHO_EVERY: Duration = Duration::from_millis(1);
/// One new connection through the VIP every this long, each given [`CONNECT_TIMEOUT`].
const CONNECT_EVERY: Duration = Duration::from_millis(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Payload: sequence number and send time (ns since the run's epoch), padded.
const PAYLOAD: usize = 64;
const READY: Scaled = Scaled::secs(60);
/// After the sender stops, the receivers end once nothing arrived for this long.
const QUIET: Duration = Duration::from_millis(200);
/// How often the receivers look at their stop flag (a period, not a bound).
const RECV_WAKE: Duration = Duration::from_millis(20);
/// Backends per service in the health-check row (`agent_tests::scale`'s policy).
const PER_SERVICE: usize = 4;
/// From ready to the start of a CPU window: the first probes of every backend are answered.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(name = "cargo xtask bench restart")]
struct Args {
    /// Packets per second of the steady flow (rate limit far above it).
    #[arg(long, default_value_t = 20_000)]
    rate: u32,
    /// Packets per second of the capped flow (limit 1/s, burst 1).
    #[arg(long, default_value_t = 1_000)]
    capped_rate: u32,
    /// How long the agent stays down between the stop and the next start, ms.
    #[arg(long, default_value_t = 1_000)]
    down_ms: u64,
    /// Traffic before the stop, ms.
    #[arg(long, default_value_t = 1_000)]
    before_ms: u64,
    /// Traffic after the new agent is ready, ms: long enough for a TCP connection stalled
    /// by a restart to retransmit (backing off: 0.2, 0.6, 1.4, 3 s after the first loss).
    #[arg(long, default_value_t = 3_000)]
    after_ms: u64,
    /// Starts of each kind (fresh, adopting) for the time to ready.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds over which RSS and CPU are read.
    #[arg(long, default_value_t = 20)]
    window: u64,
    /// Backends probed every second in the second RSS/CPU row.
    #[arg(long, default_value_t = 1_000)]
    backends: usize,
    /// The agent binary to measure; default: built here, release.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The Markdown file whose section is replaced (or appended).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
}

pub fn run(extra: &[String]) -> Result<()> {
    let args =
        Args::try_parse_from(std::iter::once("restart".to_owned()).chain(extra.iter().cloned()))?;
    if args.rate == 0 || args.capped_rate == 0 || args.capped_rate > args.rate {
        bail!("--rate and --capped-rate must be above 0, --capped-rate at most --rate");
    }
    sys::require_root("cargo xtask bench restart (network namespaces, BPF, bpffs)")?;
    let agent = match &args.agent_bin {
        Some(bin) => bin.clone(),
        None => build::agent_binary(&setup::run()?, true)?,
    };

    let mut lab = Lab::new(&agent, args.rate)?;
    println!("bench restart: SIGKILL, then a new agent adopting the pins");
    let survive = lab.restart_run(&args, Restart::KillAdopt)?;
    println!("{}", survive.summary());

    println!(
        "bench restart: the adopted agent, idle, for {} s",
        args.window
    );
    let idle = lab.idle_cost(args.window)?;

    println!(
        "bench restart: time to ready, {} fresh and {} adopting starts",
        args.runs, args.runs
    );
    let ready = lab.ready_times(args.runs)?;

    println!("bench restart: --detach-on-exit, SIGTERM, then a fresh agent");
    lab.uninstall()?;
    let detach = lab.restart_run(&args, Restart::DetachFresh)?;
    println!("{}", detach.summary());
    lab.stop()?;
    let killed_by_sigterm = (lab.killed_by_sigterm, lab.sigterms);
    drop(lab);

    println!(
        "bench restart: {} backends probed every second, for {} s",
        args.backends, args.window
    );
    let probing = probing_cost(&agent, args.backends, args.window)?;

    let section = report(
        &args,
        &[survive, detach],
        &ready,
        &[idle, probing],
        killed_by_sigterm,
    );
    super::publish(&args.out, &section)
}

/// A pin path of this process's own under the bpffs: never another agent's.
fn pin_path(role: &str) -> String {
    format!("/sys/fs/bpf/agt-{}-{role}", std::process::id())
}

/// On the client veth, both directions: two UDP services to the server, one limited far
/// above the steady flow, one capped at 1/s; the VIP balanced over `backends`.
fn policy(ifname: &str, pin: &str, rate: u32, backends: &[SocketAddr]) -> String {
    let addr = "198.18.0.2/32";
    let list = backend_items(backends);
    format!(
        "version: 1
agent:
  listen: 127.0.0.1:9090
  pin_path: {pin}
  log_level: info
interfaces:
  - name: {ifname}
    xdp_mode: generic
    direction: both
services:
  - name: steady
    match: {{ address: {addr}, port: {STEADY_PORT}, protocol: udp }}
    rate_limit: {{ key: flow, rate: {limit}/s, burst: {limit}, max_keys: 1024 }}
  - name: capped
    match: {{ address: {addr}, port: {CAPPED_PORT}, protocol: udp }}
    rate_limit: {{ key: flow, rate: 1/s, burst: 1, max_keys: 1024 }}
  - name: web
    match: {{ address: \"{vip}\", port: {port}, protocol: tcp }}
    load_balancing: {{ algorithm: maglev, vip: true }}
    backends:
{list}",
        limit = u64::from(rate) * 10,
        vip = VIP.ip(),
        port = VIP.port(),
    )
}

/// `BIN uninstall --config CONFIG` inside `ns`; its output, an error unless it exits 0.
fn uninstall(bin: &Path, ns: &Netns, config: &Path) -> Result<String> {
    let mut cmd = Command::new(bin);
    cmd.arg("uninstall")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = ns.spawn_process(&mut cmd)?.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "`agent uninstall --config {}` failed ({}): {text}",
            config.display(),
            out.status
        );
    }
    Ok(text)
}

/// Removes the pinned datapath on drop (`agent uninstall`), after the agent has stopped.
struct Pins {
    bin: PathBuf,
    ns: Netns,
    config: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = uninstall(&self.bin, &self.ns, &self.config) {
            eprintln!("warning: {e:#}");
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Restart {
    /// `agent run`, SIGKILL, `agent run` adopting the pins.
    KillAdopt,
    /// `agent run --detach-on-exit`, SIGTERM (detaches, removes the pins), a fresh one.
    DetachFresh,
}

impl Restart {
    fn label(self) -> &'static str {
        match self {
            Restart::KillAdopt => "`agent run`, SIGKILL, new agent adopts the pins",
            Restart::DetachFresh => {
                "`agent run --detach-on-exit`, SIGTERM, new agent starts fresh (before issue 10)"
            }
        }
    }

    fn extra(self) -> &'static [&'static str] {
        match self {
            Restart::KillAdopt => &[],
            Restart::DetachFresh => &["--detach-on-exit"],
        }
    }
}

/// The topology, the policy and the agent on the server veth.
struct Lab {
    // Field order is drop order: the agent, then its pins, then the namespaces.
    agent: Option<AgentProcess>,
    _pins: Pins,
    _servers: Vec<TcpServer>,
    topo: Topology,
    bin: PathBuf,
    config: PathBuf,
    /// Stops in which SIGTERM killed the agent instead of stopping it (see [`Lab::stop`]).
    killed_by_sigterm: u32,
    sigterms: u32,
    _dir: TempDir,
}

impl Lab {
    fn new(bin: &Path, rate: u32) -> Result<Lab> {
        let mut topo = Topology::new()?;
        let backends: Vec<SocketAddr> = topo
            .add_server_v4(BACKENDS)?
            .into_iter()
            .map(|a| SocketAddr::from((a, BACKEND_PORT)))
            .collect();
        let servers = backends
            .iter()
            .map(|&b| TcpServer::start(&topo.server, b))
            .collect::<Result<Vec<_>>>()?;
        topo.add_vip(VIP.ip())?;
        let dir = TempDir::new()?;
        let config = dir.write(
            "restart.yaml",
            &policy(&topo.client_if, &pin_path("restart"), rate, &backends),
        )?;
        Ok(Lab {
            agent: None,
            _pins: Pins {
                bin: bin.to_owned(),
                ns: topo.client.handle(),
                config: config.clone(),
            },
            _servers: servers,
            topo,
            bin: bin.to_owned(),
            config,
            killed_by_sigterm: 0,
            sigterms: 0,
            _dir: dir,
        })
    }

    /// Spawns the agent with `extra` and waits until it is ready; the time that took from
    /// the spawn.
    fn start(&mut self, extra: &[&str]) -> Result<Duration> {
        let t = Instant::now();
        let mut agent =
            AgentProcess::spawn_args(&self.bin, &self.topo.client, &self.config, extra)?;
        agent.wait_ready(READY)?;
        let took = t.elapsed();
        self.agent = Some(agent);
        Ok(took)
    }

    fn agent(&self) -> Result<&AgentProcess> {
        self.agent.as_ref().context("the agent is not running")
    }

    /// SIGTERM and wait (the datapath stays unless the agent runs with --detach-on-exit).
    fn stop(&mut self) -> Result<()> {
        if let Some(a) = self.agent.take() {
            let status = a.stop()?;
            self.sigterms += 1;
            if status.signal() == Some(libc::SIGTERM) {
                // `agent run` answers /health/ready 200 before it installs its SIGTERM
                // handler: a SIGTERM right after ready kills it (the datapath stays, as
                // after SIGKILL). Counted and reported, not hidden.
                eprintln!("bench restart: the agent died of a SIGTERM sent right after ready");
                self.killed_by_sigterm += 1;
            } else if !status.success() {
                bail!("the agent exited with {status} on SIGTERM");
            }
        }
        Ok(())
    }

    /// SIGKILL and reap.
    fn kill(&mut self) -> Result<()> {
        let a = self.agent.take().context("the agent is not running")?;
        // SAFETY: kill(2) on our own child, not reaped yet (AgentProcess reaps in stop).
        if unsafe { libc::kill(a.pid() as libc::pid_t, libc::SIGKILL) } != 0 {
            bail!("SIGKILL: {}", std::io::Error::last_os_error());
        }
        a.stop()?;
        Ok(())
    }

    fn uninstall(&mut self) -> Result<()> {
        self.stop()?;
        uninstall(&self.bin, &self.topo.client, &self.config)?;
        Ok(())
    }

    /// One run of steady traffic across a stop and a start of the agent.
    fn restart_run(&mut self, args: &Args, how: Restart) -> Result<RestartRun> {
        self.stop()?;
        self.start(how.extra())?;
        let traffic = Traffic::start(&self.topo, args.rate, args.capped_rate)?;
        let epoch = traffic.epoch;
        // Let the flow be seen arriving before the clock of the run starts.
        traffic.wait_first(Duration::from_secs(5))?;
        let t_run = epoch.elapsed();
        std::thread::sleep(Duration::from_millis(args.before_ms));
        let t_stop = epoch.elapsed();
        match how {
            Restart::KillAdopt => self.kill()?,
            Restart::DetachFresh => self.stop()?,
        }
        let t_stopped = epoch.elapsed();
        std::thread::sleep(
            (t_stop + Duration::from_millis(args.down_ms)).saturating_sub(epoch.elapsed()),
        );
        let t_spawn = epoch.elapsed();
        self.start(how.extra())?;
        let t_ready = epoch.elapsed();
        std::thread::sleep(Duration::from_millis(args.after_ms));
        let t_end = epoch.elapsed();
        let log = self.agent()?.log_text();
        let adopted = log.contains("adopted pins at");
        if adopted != (how == Restart::KillAdopt) {
            bail!(
                "the new agent {} the pins; expected the other. Its output:\n{log}",
                if adopted { "adopted" } else { "did not adopt" }
            );
        }
        let got = traffic.finish()?;
        let phases = [
            ("running", t_run, t_stop),
            ("down", t_stop, t_spawn),
            ("starting", t_spawn, t_ready),
            ("running again", t_ready, t_end),
        ];
        Ok(RestartRun {
            how,
            exit: t_stopped - t_stop,
            phases: phases
                .iter()
                .map(|&(name, from, to)| got.phase(name, from, to))
                .collect(),
        })
    }

    /// RSS and CPU of the running agent over `window` seconds, no traffic.
    fn idle_cost(&self, window: u64) -> Result<Cost> {
        let pid = self.agent()?.pid();
        let (cpu0, t0) = (scale::cpu_time(pid)?, Instant::now());
        std::thread::sleep(Duration::from_secs(window));
        let (cpu1, elapsed) = (scale::cpu_time(pid)?, t0.elapsed());
        Ok(Cost {
            label: format!(
                "2 UDP services and a VIP of {BACKENDS} backends, no traffic, no health checks \
                 (the adopting agent)"
            ),
            rss: scale::rss(pid)?,
            cpu_percent: (cpu1.total() - cpu0.total()).as_secs_f64() / elapsed.as_secs_f64()
                * 100.0,
            probes_per_sec: 0.0,
        })
    }

    /// Fresh (after `agent uninstall`) and adopting starts, alternating.
    fn ready_times(&mut self, runs: usize) -> Result<ReadyTimes> {
        let mut times = ReadyTimes::default();
        for _ in 0..runs {
            self.uninstall()?;
            times.fresh.push(self.start(&[])?);
            self.stop()?;
            let took = self.start(&[])?;
            if !self.agent()?.log_text().contains("adopted pins at") {
                bail!("a start on existing pins did not adopt them");
            }
            times.adopted.push(took);
        }
        Ok(times)
    }
}

/// What a run's receiver saw, and when the sender sent.
struct Received {
    /// Send time of every steady packet, by sequence number (ns since the epoch).
    sent: Vec<u64>,
    /// Every steady packet that arrived, in arrival order.
    arrived: Vec<Arrival>,
    /// Every capped packet that arrived.
    capped: Vec<Arrival>,
    /// Every echo on the long TCP connection.
    echoes: Vec<Attempt>,
    /// Every new TCP connection.
    connects: Vec<Attempt>,
}

/// An echo or a new connection through the VIP: when it began (ns since the epoch), how long
/// until it was answered or failed (ns), and whether it was answered.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    began: u64,
    took: u64,
    ok: bool,
}

/// Attempts begun in a phase: how many, how many failed, the longest (answered or failed).
#[derive(Default)]
struct Attempts {
    n: u64,
    failed: u64,
    slowest: Duration,
}

impl Attempts {
    /// The longest, ms; `-` when there was none.
    fn slowest(&self) -> String {
        if self.n == 0 {
            "-".to_owned()
        } else {
            format!("{:.2}", ms(self.slowest))
        }
    }

    fn of(all: &[Attempt], inside: impl Fn(u64) -> bool) -> Attempts {
        let mut a = Attempts::default();
        for x in all.iter().filter(|x| inside(x.began)) {
            a.n += 1;
            a.failed += u64::from(!x.ok);
            a.slowest = a.slowest.max(Duration::from_nanos(x.took));
        }
        a
    }
}

impl Received {
    fn phase(&self, name: &'static str, from: Duration, to: Duration) -> Phase {
        let (from, to) = (from.as_nanos() as u64, to.as_nanos() as u64);
        let inside = |t: u64| t >= from && t < to;
        let mut got = vec![false; self.sent.len()];
        for a in &self.arrived {
            if let Some(g) = got.get_mut(a.seq as usize) {
                *g = true;
            }
        }
        let (mut sent, mut lost) = (0, 0);
        for (seq, &t) in self.sent.iter().enumerate() {
            if inside(t) {
                sent += 1;
                lost += u64::from(!got[seq]);
            }
        }
        // The largest interval between consecutive times that overlaps the phase: a phase
        // in which nothing arrived still shows the gap that spans it.
        let max_gap = |times: &mut dyn Iterator<Item = u64>| {
            let mut prev = None;
            let mut gap = 0;
            for t in times {
                if let Some(p) = prev
                    && p < to
                    && t > from
                {
                    gap = u64::max(gap, t.saturating_sub(p));
                }
                prev = Some(t);
            }
            Duration::from_nanos(gap)
        };
        Phase {
            name,
            span: Duration::from_nanos(to - from),
            sent,
            lost,
            recv_gap: max_gap(&mut self.arrived.iter().map(|a| a.at)),
            send_gap: max_gap(&mut self.sent.iter().copied()),
            capped: self.capped.iter().filter(|a| inside(a.sent)).count() as u64,
            echoes: Attempts::of(&self.echoes, inside),
            connects: Attempts::of(&self.connects, inside),
        }
    }
}

struct Phase {
    name: &'static str,
    span: Duration,
    sent: u64,
    lost: u64,
    recv_gap: Duration,
    send_gap: Duration,
    capped: u64,
    echoes: Attempts,
    connects: Attempts,
}

struct RestartRun {
    how: Restart,
    /// From the signal to the old agent's exit.
    exit: Duration,
    phases: Vec<Phase>,
}

impl RestartRun {
    fn summary(&self) -> String {
        let mut s = String::new();
        for p in &self.phases {
            let _ = writeln!(
                s,
                "  {:>13} {:>7.1} ms: sent {}, lost {}, largest gap {:.2} ms (sender {:.2} ms), \
                 capped flow passed {}; echoes {} ({} failed, longest {} ms), new \
                 connections {} ({} failed, longest {} ms)",
                p.name,
                ms(p.span),
                p.sent,
                p.lost,
                ms(p.recv_gap),
                ms(p.send_gap),
                p.capped,
                p.echoes.n,
                p.echoes.failed,
                p.echoes.slowest(),
                p.connects.n,
                p.connects.failed,
                p.connects.slowest(),
            );
        }
        s.trim_end().to_owned()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The sender (client namespace) and the two receivers (server namespace) of one run.
struct Traffic {
    epoch: Instant,
    stop: Arc<AtomicBool>,
    sender: Option<JoinHandle<Result<Vec<u64>>>>,
    steady: Option<JoinHandle<Result<Vec<Arrival>>>>,
    capped: Option<JoinHandle<Result<Vec<Arrival>>>>,
    echoes: Option<JoinHandle<Result<Vec<Attempt>>>>,
    connects: Option<JoinHandle<Result<Vec<Attempt>>>>,
    first: Arc<AtomicBool>,
}

impl Traffic {
    fn start(topo: &Topology, rate: u32, capped_rate: u32) -> Result<Traffic> {
        let epoch = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let first = Arc::new(AtomicBool::new(false));
        let server = topo.server_v4;
        let receiver = |port: u16, first: Option<Arc<AtomicBool>>| {
            let stop = stop.clone();
            topo.server.spawn(move || {
                receive(
                    SocketAddr::from((server, port)),
                    epoch,
                    &stop,
                    first.as_deref(),
                )
            })
        };
        let steady = receiver(STEADY_PORT, Some(first.clone()))?;
        let capped = receiver(CAPPED_PORT, None)?;
        let flag = stop.clone();
        let echoes = topo.client.spawn(move || echo_loop(epoch, &flag))?;
        let flag = stop.clone();
        let connects = topo.client.spawn(move || connect_loop(epoch, &flag))?;
        let client = topo.client_v4;
        let flag = stop.clone();
        let sender = topo.client.spawn(move || {
            send(
                SocketAddr::from((client, 0)),
                server,
                rate,
                capped_rate,
                epoch,
                &flag,
            )
        })?;
        Ok(Traffic {
            epoch,
            stop,
            sender: Some(sender),
            steady: Some(steady),
            capped: Some(capped),
            echoes: Some(echoes),
            connects: Some(connects),
            first,
        })
    }

    fn wait_first(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.first.load(Ordering::Relaxed) {
            if Instant::now() >= deadline {
                bail!("no steady packet arrived within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Received> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = join(self.sender.take())?;
        let arrived = join(self.steady.take())?;
        let capped = join(self.capped.take())?;
        let echoes = join(self.echoes.take())?;
        let connects = join(self.connects.take())?;
        Ok(Received {
            sent,
            arrived,
            capped,
            echoes,
            connects,
        })
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in [self.steady.take(), self.capped.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
        for h in [self.echoes.take(), self.connects.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
    }
}

fn join<T>(h: Option<JoinHandle<Result<T>>>) -> Result<T> {
    match h.context("joined twice")?.join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

fn since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// Sends sequence-numbered datagrams on schedule: steady packet `n` is due at `n / rate`
/// s; every `rate / capped_rate`-th is followed by one of the capped flow. A late sender
/// catches up at once (what was due goes out back to back), so a stall shows as a gap in the
/// send times, which the report puts next to the receiver's. Returns each steady packet's
/// send time.
fn send(
    bind: SocketAddr,
    server: std::net::Ipv4Addr,
    rate: u32,
    capped_rate: u32,
    epoch: Instant,
    stop: &AtomicBool,
) -> Result<Vec<u64>> {
    let sock = UdpSocket::bind(bind).with_context(|| format!("binding the sender to {bind}"))?;
    let steady = SocketAddr::from((server, STEADY_PORT));
    let capped = SocketAddr::from((server, CAPPED_PORT));
    let every = (rate / capped_rate).max(1) as u64;
    let period_ns = 1e9 / f64::from(rate);
    let start = since(epoch);
    let mut sent = Vec::with_capacity(rate as usize * 8);
    let mut buf = [0u8; PAYLOAD];
    let mut capped_seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let seq = sent.len() as u64;
        let due = start + (seq as f64 * period_ns) as u64;
        let now = since(epoch);
        if now < due {
            // Sleeps overshoot by tens of µs; the catch-up above absorbs that.
            std::thread::sleep(Duration::from_nanos((due - now).min(200_000)));
            continue;
        }
        buf[..8].copy_from_slice(&seq.to_le_bytes());
        buf[8..16].copy_from_slice(&now.to_le_bytes());
        sock.send_to(&buf, steady)
            .context("sending the steady flow")?;
        sent.push(now);
        if seq.is_multiple_of(every) {
            buf[..8].copy_from_slice(&capped_seq.to_le_bytes());
            match sock.send_to(&buf, capped) {
                // A drop on TC egress may come back to the sender as ENOBUFS.
                Err(e) if e.raw_os_error() != Some(libc::ENOBUFS) => {
                    return Err(e).context("sending the capped flow");
                }
                _ => {}
            }
            capped_seq += 1;
        }
    }
    Ok(sent)
}

/// A connection to the VIP, Nagle off, reads waking up often enough to see `stop`.
fn connect_vip() -> std::io::Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&VIP, CONNECT_TIMEOUT)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(RECV_WAKE))?;
    Ok(conn)
}

/// One long connection to the VIP: an echo of 16 bytes every [`ECHO_EVERY`], each waited
/// for however long it takes (TCP retransmits what the path lost). A connection that fails
/// counts its echo as failed and is opened again.
fn echo_loop(epoch: Instant, stop: &AtomicBool) -> Result<Vec<Attempt>> {
    let mut conn = Some(connect_vip().with_context(|| format!("connecting to {VIP}"))?);
    let mut echoes = Vec::new();
    let mut next = Instant::now();
    let mut buf = [0u8; 16];
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next = Instant::max(next + ECHO_EVERY, Instant::now());
        let began = since(epoch);
        let Some(c) = conn.as_mut() else {
            echoes.push(Attempt {
                began,
                took: 0,
                ok: false,
            });
            conn = connect_vip().ok();
            continue;
        };
        buf[..8].copy_from_slice(&(echoes.len() as u64).to_le_bytes());
        buf[8..].copy_from_slice(&began.to_le_bytes());
        let answered = c.write_all(&buf).and_then(|()| {
            let mut got = 0;
            let mut back = [0u8; 16];
            while got < back.len() {
                match c.read(&mut back[got..]) {
                    Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => got += n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if stop.load(Ordering::Relaxed) {
                            return Err(e);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            if back != buf {
                return Err(std::io::Error::other("the echo came back changed"));
            }
            Ok(())
        });
        echoes.push(Attempt {
            began,
            took: since(epoch) - began,
            ok: answered.is_ok(),
        });
        if answered.is_err() && !stop.load(Ordering::Relaxed) {
            conn = connect_vip().ok();
        }
    }
    Ok(echoes)
}

/// A new connection to the VIP every [`CONNECT_EVERY`]: connect, 4 bytes echoed, close.
fn connect_loop(epoch: Instant, stop: &AtomicBool) -> Result<Vec<Attempt>> {
    let mut attempts = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next = Instant::max(next + CONNECT_EVERY, Instant::now());
        let began = since(epoch);
        let ok = (|| -> std::io::Result<()> {
            let mut c = connect_vip()?;
            c.set_read_timeout(Some(CONNECT_TIMEOUT))?;
            c.write_all(b"ping")?;
            let mut back = [0u8; 4];
            c.read_exact(&mut back)?;
            Ok(())
        })();
        attempts.push(Attempt {
            began,
            took: since(epoch) - began,
            ok: ok.is_ok(),
        });
    }
    Ok(attempts)
}

/// One datagram as the receiver saw it (ns since the run's epoch).
#[derive(Clone, Copy, Debug)]
struct Arrival {
    seq: u64,
    sent: u64,
    at: u64,
}

/// Receives until `stop` and then [`QUIET`]: each datagram in arrival order. Fails if the
/// socket itself dropped any (its counts would be wrong).
fn receive(
    bind: SocketAddr,
    epoch: Instant,
    stop: &AtomicBool,
    first: Option<&AtomicBool>,
) -> Result<Vec<Arrival>> {
    let sock = UdpSocket::bind(bind).with_context(|| format!("binding a receiver to {bind}"))?;
    let bytes: libc::c_int = RCVBUF_BYTES;
    // SAFETY: setsockopt with a valid fd and a pointer to an int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVBUFFORCE");
    }
    sock.set_read_timeout(Some(RECV_WAKE))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let mut last = Instant::now();
    loop {
        match sock.recv(&mut buf) {
            Ok(n) if n >= 16 => {
                got.push(Arrival {
                    seq: u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")),
                    sent: u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")),
                    at: since(epoch),
                });
                last = Instant::now();
                if let Some(f) = first {
                    f.store(true, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving"),
        }
        if stop.load(Ordering::Relaxed) && last.elapsed() >= QUIET {
            break;
        }
    }
    let drops = socket_drops(sock.as_raw_fd())?;
    if drops > 0 {
        bail!("the receiver on {bind} dropped {drops} datagrams itself: its counts are wrong");
    }
    Ok(got)
}

#[derive(Default)]
struct ReadyTimes {
    fresh: Vec<Duration>,
    adopted: Vec<Duration>,
}

struct Cost {
    label: String,
    rss: u64,
    cpu_percent: f64,
    probes_per_sec: f64,
}

/// An agent with `backends` backends (services of [`PER_SERVICE`]) probed every second,
/// `agent_tests::scale`'s topology: its RSS and CPU over `window` seconds.
fn probing_cost(bin: &Path, backends: usize, window: u64) -> Result<Cost> {
    let mut policy = ScalePolicy::new(backends.div_ceil(PER_SERVICE), PER_SERVICE);
    policy.agent_extra = format!("  pin_path: {}\n", pin_path("probing"));
    let mut lab = ScaleLab::new(&policy.ports())?;
    let start = lab.spawn(bin, &policy)?;
    lab.wait_ready(start, READY)?;
    std::thread::sleep(SETTLE);
    let pid = lab.agent()?.pid();
    let (cpu0, acc0, t0) = (scale::cpu_time(pid)?, lab.accepted(), Instant::now());
    std::thread::sleep(Duration::from_secs(window));
    let (cpu1, acc1, elapsed) = (scale::cpu_time(pid)?, lab.accepted(), t0.elapsed());
    let cost = Cost {
        label: format!(
            "{} balanced services x {PER_SERVICE} backends, TCP health check every 1 s",
            policy.services
        ),
        rss: scale::rss(pid)?,
        cpu_percent: (cpu1.total() - cpu0.total()).as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        probes_per_sec: (acc1 - acc0) as f64 / elapsed.as_secs_f64(),
    };
    // --detach-on-exit (ScaleLab's spawn): the stop removes this agent's pins.
    lab.stop()?;
    Ok(cost)
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn report(
    args: &Args,
    runs: &[RestartRun],
    ready: &ReadyTimes,
    costs: &[Cost],
    (killed_by_sigterm, sigterms): (u32, u32),
) -> String {
    let mut t = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(t, "{SECTION}\n");
    let _ = writeln!(
        t,
        "Produced by `cargo xtask bench restart` (release agent) on kernel {}, {cpus} CPUs, \
         load average {} when it ended (other work shared the machine and shows in every \
         figure). The agent on the client veth of two namespaces (generic XDP and TCX \
         egress), pinned, enforcing two UDP services on egress: *steady*, {} packets/s \
         sequence-numbered, under a limit ten times above that; *capped*, {} packets/s, \
         limited to 1/s with a burst of 1; and balancing a TCP VIP over {BACKENDS} echo \
         backends (maglev; DNAT on egress, reverse NAT on XDP ingress). Phases by the \
         time a packet was sent: *running* {} ms, *down* from the signal until the next \
         agent is spawned ({} ms), *starting* from the spawn until `/health/ready` answers, \
         *running again* {} ms.\n",
        kernel.trim(),
        load.split_whitespace().next().unwrap_or("?"),
        args.rate,
        args.capped_rate,
        args.before_ms,
        args.down_ms,
        args.after_ms,
    );
    let _ = writeln!(
        t,
        "| restart | phase | ms | UDP sent | lost | largest gap at the receiver, ms | largest gap at the sender, ms | capped flow passed | echoes (failed) | longest echo, ms | new connections (failed) | longest connection, ms |"
    );
    let _ = writeln!(
        t,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in runs {
        for p in &r.phases {
            let _ = writeln!(
                t,
                "| {} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {} | {} ({}) | {} | {} ({}) | {} |",
                r.how.label(),
                p.name,
                ms(p.span),
                p.sent,
                p.lost,
                ms(p.recv_gap),
                ms(p.send_gap),
                p.capped,
                p.echoes.n,
                p.echoes.failed,
                p.echoes.slowest(),
                p.connects.n,
                p.connects.failed,
                p.connects.slowest(),
            );
        }
    }
    let _ = writeln!(
        t,
        "\nThe old agent had exited {} ms after SIGKILL, {} ms after SIGTERM (--detach-on-exit: \
         detaching and removing the pins), its exit polled every 20 ms. *capped flow passed* \
         counts what got through a 1/s limit: with the datapath enforcing, the burst and 1 a \
         second; without it, every packet sent while no program was attached. Echoes: 16 \
         bytes every {} ms on one connection through the VIP, each waited for however long \
         it takes (TCP retransmits; *failed*: the connection failed, or the echo was still \
         unanswered when the run ended); new connections: one every {} ms (or as soon as the \
         previous one ended), connect and a 4-byte echo within {} s each. *longest*: from the \
         start of an echo or a connection until its answer, or its failure.\n",
        runs.first().map_or(0.0, |r| ms(r.exit)).round(),
        runs.get(1).map_or(0.0, |r| ms(r.exit)).round(),
        ECHO_EVERY.as_millis(),
        CONNECT_EVERY.as_millis(),
        CONNECT_TIMEOUT.as_secs(),
    );
    let _ = writeln!(
        t,
        "Time to ready (spawn of `agent run` to `/health/ready` 200), the same policy, {} \
         starts each, alternating; *fresh* after `agent uninstall --config F`:\n",
        args.runs
    );
    let _ = writeln!(t, "| start | median s | least-most s |");
    let _ = writeln!(t, "|---|---:|---:|");
    for (label, v) in [
        ("fresh (loads, pins)", &ready.fresh),
        ("adopting the pins", &ready.adopted),
    ] {
        let least = v.iter().min().copied().unwrap_or_default();
        let most = v.iter().max().copied().unwrap_or_default();
        let _ = writeln!(
            t,
            "| {label} | {:.3} | {:.3}-{:.3} |",
            median(v).as_secs_f64(),
            least.as_secs_f64(),
            most.as_secs_f64()
        );
    }
    if killed_by_sigterm > 0 {
        let _ = writeln!(
            t,
            "\n{killed_by_sigterm} of the {sigterms} SIGTERMs of this run killed the agent \
             instead of stopping it (each sent right after `/health/ready` answered 200, \
             between the starts above): `agent run` reports ready before it installs its \
             SIGTERM handler."
        );
    }
    let _ = writeln!(
        t,
        "\nThe agent's memory and CPU (VmRSS at the end; utime + stime of every thread over \
         {} s; the probing agent measured from {} s after ready, the probes/s being \
         connections its backends accepted):\n",
        args.window,
        SETTLE.as_secs()
    );
    let _ = writeln!(t, "| agent | RSS MiB | CPU, % of a core | probes/s |");
    let _ = writeln!(t, "|---|---:|---:|---:|");
    for c in costs {
        let _ = writeln!(
            t,
            "| {} | {:.1} | {:.2} | {:.0} |",
            c.label,
            c.rss as f64 / (1024.0 * 1024.0),
            c.cpu_percent,
            c.probes_per_sec
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_count_losses_and_gaps_by_send_time() {
        let ms = |n: u64| n * 1_000_000;
        // Packets sent every ms; 3 and 4 lost; 5 arrives 3 ms after 2.
        let arrival = |seq: u64| Arrival {
            seq,
            sent: ms(seq),
            at: ms(seq) + 10,
        };
        let got = Received {
            sent: (0..8).map(ms).collect(),
            arrived: [0, 1, 2, 5, 6, 7].into_iter().map(arrival).collect(),
            capped: vec![arrival(3), arrival(6)],
            echoes: vec![
                Attempt {
                    began: ms(3),
                    took: ms(2),
                    ok: true,
                },
                Attempt {
                    began: ms(4),
                    took: ms(1),
                    ok: false,
                },
            ],
            connects: Vec::new(),
        };
        let p = got.phase("down", Duration::from_millis(3), Duration::from_millis(5));
        assert_eq!((p.sent, p.lost, p.capped), (2, 2, 1));
        assert_eq!((p.echoes.n, p.echoes.failed), (2, 1));
        assert_eq!(p.echoes.slowest(), "2.00");
        assert_eq!(p.connects.slowest(), "-");
        assert_eq!(p.send_gap, Duration::from_millis(1));
        assert_eq!(
            p.recv_gap,
            Duration::from_millis(3),
            "nothing arrived inside: the gap that spans the phase"
        );
        let p = got.phase("after", Duration::from_millis(6), Duration::from_millis(8));
        assert_eq!((p.sent, p.lost), (2, 0));
        assert_eq!(p.recv_gap, Duration::from_millis(1));
    }

    #[test]
    fn arguments() {
        let a = Args::try_parse_from(["restart", "--rate", "5000", "--runs=3"]).unwrap();
        assert_eq!((a.rate, a.runs, a.capped_rate), (5000, 3, 1000));
        assert!(Args::try_parse_from(["restart", "--bogus"]).is_err());
    }
}
