//! `cargo xtask bench degrade` (issue 12): how fast degradation reacts. From the moment a
//! service's backends become slow (the latency condition becomes true) to the first new flow
//! that lands on the fallback backend, p50 and max over `--runs` runs.
//!
//! The agent runs in the client namespace of a fresh topology (generic XDP and TC egress on
//! its veth), balancing a VIP over two HTTP backends with a fallback backend and one latency
//! condition (`--threshold-ms` over `--window-ms`, `recover_after` `--recover-ms`), probed
//! every `--interval-ms`. A client on an address of its own opens a new connection to the VIP
//! every `--connect-ms` and closes it, noting when each one started and its port. A run:
//! the backends' answers switch to `--delay-ms` (above the threshold, below the probes'
//! timeout) at t0; the reaction is the start of the first connection after t0 that the
//! fallback server accepted (its peers, by port) minus t0, to within `--connect-ms`. The
//! agent's own part is read from `/status` (polled every 10 ms): when its mode became
//! `fallback` (`in_state_seconds` back from the read), split into *decision* (t0 to the
//! switch) and *datapath* (the switch to the first flow on the fallback). Then the backends
//! are fast again, the service recovers (`recover_after`), and the next run starts after a
//! pause that moves t0 across the probes' grid (the probes run with `jitter: 0%`).
//!
//! What it is made of: the next probe starts within `--interval-ms` of t0 and answers after
//! `--delay-ms`; the evaluator acts at its next 100 ms tick; new flows follow the map write
//! at once.
//!
//! Writes its own section of BENCHMARKS.md (`--out`), keeping the others.

use std::{
    fmt::Write as _,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_common::ports::nat_port;
use agent_tests::{
    agent::{AgentProcess, TempDir},
    netns::Topology,
    slow::HttpBackend,
    status::StatusReport,
    timing::Scaled,
};
use anyhow::{Context as _, Result, bail};
use clap::Parser;

use super::{first_word, quantile};
use crate::{build, setup, sys};

const SECTION: &str = "## Degradation: reaction time";
const LISTEN: &str = "127.0.0.1:9090";
const SERVICE: &str = "pool";
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const READY: Scaled = Scaled::secs(60);
/// A run whose fallback takes no flow within this is an error of the agent, not a figure;
/// the same for a recovery past `recover_after`.
const GIVE_UP: Duration = Duration::from_secs(10);
/// How often `/status` is read while waiting for a switch.
const STATUS_POLL: Duration = Duration::from_millis(10);
/// The client's connect timeout (the VIP answers in microseconds on a veth).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause between a recovery and the next run: a base, plus a step per run that moves t0
/// across the probes' grid.
const PAUSE: Duration = Duration::from_millis(300);
const PAUSE_STEP: Duration = Duration::from_millis(37);

#[derive(Parser, Debug)]
#[command(name = "cargo xtask bench degrade")]
struct Args {
    /// Runs (slowdown, fallback, recovery).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Probe interval, ms (`health_check.interval`).
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// Probe timeout, ms (above the slow answer, below the interval).
    #[arg(long, default_value_t = 150)]
    timeout_ms: u64,
    /// The latency condition's threshold, ms.
    #[arg(long, default_value_t = 50)]
    threshold_ms: u64,
    /// The slow backends' answer time, ms (above the threshold, below the timeout).
    #[arg(long, default_value_t = 100)]
    delay_ms: u64,
    /// The condition's window, ms.
    #[arg(long, default_value_t = 1000)]
    window_ms: u64,
    /// `recover_after`, ms.
    #[arg(long, default_value_t = 1000)]
    recover_ms: u64,
    /// The client opens a connection to the VIP this often, ms: the figures' resolution.
    #[arg(long, default_value_t = 5)]
    connect_ms: u64,
    /// The agent binary to measure; default: built here, release.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The Markdown file whose section is replaced (or appended).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
}

impl Args {
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn check(&self) -> Result<()> {
        if self.runs == 0 || self.connect_ms == 0 {
            bail!("--runs and --connect-ms must be above 0");
        }
        if !(self.threshold_ms < self.delay_ms
            && self.delay_ms < self.timeout_ms
            && self.timeout_ms < self.interval_ms)
        {
            bail!(
                "need --threshold-ms < --delay-ms < --timeout-ms < --interval-ms (a slow probe \
                 is above the threshold and still succeeds); got {} < {} < {} < {}",
                self.threshold_ms,
                self.delay_ms,
                self.timeout_ms,
                self.interval_ms
            );
        }
        Ok(())
    }
}

/// One run's times from t0 (the switch of the backends' answer time).
struct Run {
    /// To the first new flow accepted by the fallback.
    reaction: Duration,
    /// To the agent's mode `fallback`, by its own clock (`in_state_seconds`).
    decision: Duration,
    /// From the fast answers again to mode `normal`.
    recovery: Duration,
}

pub fn run(extra: &[String]) -> Result<()> {
    let args =
        Args::try_parse_from(std::iter::once("degrade".to_owned()).chain(extra.iter().cloned()))?;
    args.check()?;
    sys::require_root("cargo xtask bench degrade (network namespaces, BPF, bpffs)")?;
    let agent = match &args.agent_bin {
        Some(bin) => bin.clone(),
        None => build::agent_binary(&setup::run()?, true)?,
    };
    let (runs, discarded) = measure(&agent, &args)?;
    super::publish(&args.out, &render(&runs, discarded, &args))
}

/// The policy: one balanced service on the VIP, its backends, its fallback.
fn policy(
    ifname: &str,
    pin: &str,
    backends: &[SocketAddr],
    fallback: SocketAddr,
    a: &Args,
) -> String {
    let mut y = format!(
        "version: 1\n\
         agent:\n  listen: {LISTEN}\n  pin_path: {pin}\n  log_level: info\n\
         interfaces:\n  - name: {ifname}\n    xdp_mode: generic\n    direction: both\n\
         services:\n  - name: {SERVICE}\n    match: {{ address: {VIP}/32, port: {VIP_PORT}, protocol: tcp }}\n\
         \x20   backends:\n"
    );
    for b in backends {
        let _ = writeln!(y, "      - address: {b}");
    }
    let _ = write!(
        y,
        "    load_balancing: {{ algorithm: weighted_round_robin, vip: true }}\n\
         \x20   health_check:\n      type: http\n      path: /health\n      interval: {i}ms\n\
         \x20     unhealthy_interval: {i}ms\n      timeout: {t}ms\n      jitter: 0%\n\
         \x20   degradation:\n      conditions:\n        - type: latency\n          \
         threshold: {th}ms\n          window: {w}ms\n      fallback:\n        \
         strategy: static_response\n        backends:\n          - address: {fallback}\n      \
         recover_after: {r}ms\n",
        i = a.interval_ms,
        t = a.timeout_ms,
        th = a.threshold_ms,
        w = a.window_ms,
        r = a.recover_ms,
    );
    y
}

/// The client: a new connection to the VIP every `every`, each noted (start, local port).
struct Client {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    log: Arc<Mutex<Vec<(Instant, u16)>>>,
    failed: Arc<Mutex<Vec<ErrorKind>>>,
}

impl Client {
    fn start(topo: &Topology, every: Duration) -> Result<Client> {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let (flag, notes, errors) = (stop.clone(), log.clone(), failed.clone());
        let vip = SocketAddr::new(VIP.into(), VIP_PORT);
        let thread = topo.client.spawn(move || {
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let at = Instant::now();
                match TcpStream::connect_timeout(&vip, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        if let Ok(local) = s.local_addr() {
                            notes
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                // As the backends see it (the datapath moves
                                // ephemeral client ports).
                                .push((at, nat_port(local.port())));
                        }
                    }
                    Err(e) => errors
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(e.kind()),
                }
                while next <= Instant::now() {
                    next += every;
                }
            }
        })?;
        Ok(Client {
            stop,
            thread: Some(thread),
            log,
            failed,
        })
    }

    /// The start of the first connection since `t0` whose port is one of `ports`.
    fn first_of(&self, t0: Instant, ports: &[u16]) -> Option<Instant> {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.iter()
            .filter(|(at, port)| *at >= t0 && ports.contains(port))
            .map(|(at, _)| *at)
            .min()
    }

    fn failures(&self) -> Vec<ErrorKind> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The service's degradation mode and seconds in its state, from `/status`; `None` before
/// the agent's first evaluation.
fn mode(agent: &AgentProcess) -> Result<Option<(String, f64)>> {
    let report: StatusReport = agent.status()?;
    let service = report
        .services
        .iter()
        .find(|s| s.name == SERVICE)
        .with_context(|| format!("no service {SERVICE} in /status"))?;
    Ok(service
        .degradation
        .as_ref()
        .map(|d| (d.mode.clone(), d.in_state_seconds)))
}

/// Polls `/status` until the mode is `want`; when it was seen and the agent's seconds in it.
fn wait_mode(agent: &AgentProcess, want: &str, since: Instant) -> Result<(Instant, f64)> {
    loop {
        let now = mode(agent)?;
        let seen = Instant::now();
        if let Some((mode, in_state)) = &now
            && mode == want
        {
            return Ok((seen, *in_state));
        }
        if since.elapsed() > GIVE_UP {
            bail!("mode {want} not within {GIVE_UP:?} (last seen: {now:?})");
        }
        std::thread::sleep(STATUS_POLL);
    }
}

/// The runs, and how many attempts were discarded (the service degraded by a late probe,
/// not by the slowdown).
fn measure(agent_bin: &Path, a: &Args) -> Result<(Vec<Run>, usize)> {
    let mut topo = Topology::new()?;
    let addrs = topo.add_server_v4(3)?;
    let backends: Vec<SocketAddr> = addrs[..2]
        .iter()
        .map(|ip| SocketAddr::new((*ip).into(), BACKEND_PORT))
        .collect();
    let fallback_addr = SocketAddr::new(addrs[2].into(), BACKEND_PORT);
    let pool = backends
        .iter()
        .enumerate()
        .map(|(i, b)| HttpBackend::start(&topo.server, *b, &format!("backend-{}", i + 1)))
        .collect::<Result<Vec<_>>>()?;
    let fallback = HttpBackend::start(&topo.server, fallback_addr, "fallback")?;
    // The client on an address of its own: the agent's probes leave from the main one.
    let client_ip = topo.add_client_v4(1)?[0];
    topo.add_vip(VIP.into())?;
    topo.client.ip(&[
        "route",
        "replace",
        &format!("{VIP}/32"),
        "dev",
        &topo.client_if,
        "src",
        &client_ip.to_string(),
    ])?;
    let dir = TempDir::new()?;
    let pin = format!("/sys/fs/bpf/agt-{}-degrade-bench", std::process::id());
    let text = policy(&topo.client_if, &pin, &backends, fallback_addr, a);
    let file = dir.write("policy.yaml", &text)?;
    let mut agent = AgentProcess::spawn(agent_bin, &topo.client, &file)?;
    agent.wait_ready(READY)?;
    wait_mode(&agent, "normal", Instant::now())?;
    let client = Client::start(&topo, Args::ms(a.connect_ms))?;
    let mine = |ip: IpAddr| ip == IpAddr::from(client_ip);
    let mut runs = Vec::new();
    let mut discarded = 0;
    let mut k = 0;
    while runs.len() < a.runs {
        k += 1;
        if k > 2 * a.runs {
            bail!(
                "{discarded} of {} runs discarded: the machine is too loaded",
                k - 1
            );
        }
        // Normal, and the window clean of the last run's slow probes.
        wait_mode(&agent, "normal", Instant::now())?;
        std::thread::sleep(PAUSE + PAUSE_STEP * u32::try_from(k)?);
        if mode(&agent)?.is_none_or(|(m, _)| m != "normal") {
            continue;
        }
        let seen_before = fallback.peers().len();
        let t0 = Instant::now();
        for b in &pool {
            b.set_delay(Args::ms(a.delay_ms));
        }
        let (seen, in_state) = wait_mode(&agent, "fallback", t0)?;
        let switched = seen
            .checked_sub(Duration::from_secs_f64(in_state))
            .unwrap_or(seen);
        let first = loop {
            let ports: Vec<u16> = fallback.peers()[seen_before..]
                .iter()
                .filter(|p| mine(p.ip()))
                .map(SocketAddr::port)
                .collect();
            if let Some(at) = client.first_of(t0, &ports) {
                break at;
            }
            if t0.elapsed() > GIVE_UP {
                bail!(
                    "run {k}: in fallback, but no new flow reached the fallback within {GIVE_UP:?}"
                );
            }
            std::thread::sleep(STATUS_POLL);
        };
        for b in &pool {
            b.set_delay(Duration::ZERO);
        }
        let fast = Instant::now();
        let (back, _) = wait_mode(&agent, "normal", fast)?;
        let run = Run {
            reaction: first.saturating_duration_since(t0),
            decision: switched.saturating_duration_since(t0),
            recovery: back.saturating_duration_since(fast),
        };
        if run.decision < Args::ms(a.delay_ms) {
            // No probe can have seen the slowdown yet: a late probe on a loaded machine
            // degraded the service by itself. Not a figure of the reaction.
            discarded += 1;
            eprintln!(
                "bench degrade: attempt {k} discarded: the agent switched {} ms after the \
                 slowdown, before any probe could answer slowly ({} ms)",
                ms(run.decision),
                a.delay_ms
            );
            continue;
        }
        eprintln!(
            "bench degrade: run {}: first flow on the fallback {} ms after the slowdown (the \
             agent's switch at {} ms); normal again {} ms after fast answers",
            runs.len() + 1,
            ms(run.reaction),
            ms(run.decision),
            ms(run.recovery)
        );
        runs.push(run);
    }
    let failures = client.failures();
    drop(client);
    if !failures.is_empty() {
        eprintln!(
            "bench degrade: {} connections to the VIP failed: {failures:?}",
            failures.len()
        );
    }
    agent.stop()?;
    drop((pool, fallback));
    Ok((runs, discarded))
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

fn render(runs: &[Run], discarded: usize, a: &Args) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let column = |f: fn(&Run) -> Duration| runs.iter().map(f).collect::<Vec<_>>();
    let (reaction, decision) = (column(|r| r.reaction), column(|r| r.decision));
    let datapath: Vec<Duration> = runs
        .iter()
        .map(|r| r.reaction.saturating_sub(r.decision))
        .collect();
    let recovery = column(|r| r.recovery);
    let mut t = String::new();
    let _ = writeln!(t, "{SECTION}\n");
    let _ = writeln!(
        t,
        "Produced by `cargo xtask bench degrade` (release agent) at {} on kernel {}, {cpus} \
         CPUs, load average {} when it ended (other work shared the machine). The agent on the \
         client's veth (generic XDP and TC egress) balances a VIP over two HTTP backends with a \
         fallback backend; one latency condition: p99 of the probes above {} ms over {} ms, \
         `recover_after` {} ms; HTTP probes every {} ms (timeout {} ms, no jitter). A run: at \
         t0 the backends' answers take {} ms instead of none (the condition is then true of \
         every probe). *reaction*: t0 to the start of the first new connection that the \
         fallback accepted (a client connects to the VIP every {} ms: the resolution). \
         *decision*: t0 to the agent's switch to `fallback` (its `in_state_seconds` in \
         `/status`); *datapath*: the rest. The decision waits for the next probe (up to one \
         interval), its slow answer ({} ms) and the evaluator's next tick (100 ms). *recovery*: \
         fast answers again to `normal` (the slow probes leave the window, then \
         `recover_after`). {} runs, t0 moved across the probe grid; {discarded} more \
         discarded, where the agent switched before any probe could answer slowly (a late probe \
         on the loaded machine degraded the service by itself).\n",
        super::git_head(),
        first_word("/proc/sys/kernel/osrelease"),
        first_word("/proc/loadavg"),
        a.threshold_ms,
        a.window_ms,
        a.recover_ms,
        a.interval_ms,
        a.timeout_ms,
        a.delay_ms,
        a.connect_ms,
        a.delay_ms,
        runs.len(),
    );
    let _ = writeln!(t, "| | p50 ms | max ms | min ms |");
    let _ = writeln!(t, "|---|---:|---:|---:|");
    for (name, v) in [
        (
            "reaction: slowdown to the first new flow on the fallback",
            &reaction,
        ),
        ("decision: slowdown to the agent's switch", &decision),
        (
            "datapath: the switch to the first new flow on the fallback",
            &datapath,
        ),
        ("recovery: fast again to normal", &recovery),
    ] {
        let _ = writeln!(
            t,
            "| {name} | {} | {} | {} |",
            ms(quantile(v, 0.5)),
            ms(quantile(v, 1.0)),
            ms(quantile(v, 0.0)),
        );
    }
    let _ = writeln!(
        t,
        "\nPer run, reaction ms: {}.",
        reaction
            .iter()
            .map(|d| ms(*d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("degrade").chain(extra.iter().copied()))
            .expect("arguments")
    }

    #[test]
    fn the_policy_is_valid_and_its_timings_are_checked() {
        let a = args(&[]);
        a.check().expect("defaults");
        let b: Vec<SocketAddr> = vec![
            "198.18.2.1:8080".parse().unwrap(),
            "198.18.2.2:8080".parse().unwrap(),
        ];
        let text = policy(
            "veth0",
            "/sys/fs/bpf/x",
            &b,
            "198.18.2.3:8080".parse().unwrap(),
            &a,
        );
        let p = agent_common::policy::load_str(&text, "p.yaml").expect("a valid policy");
        let d = p.services[0].degradation.as_ref().expect("degradation");
        assert_eq!(d.recover_after, Duration::from_secs(1));
        let e = args(&["--delay-ms", "200"])
            .check()
            .expect_err("delay above the timeout");
        assert!(e.to_string().contains("--threshold-ms < --delay-ms"), "{e}");
    }
}
