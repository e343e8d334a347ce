//! `cargo xtask bench`, second part: the circuit breaker measured end to end. Time to detect a
//! hung backend, the cost of a refused `connect()` while its breaker is open, and time to
//! recover, over real namespaces, a real agent and real sockets. Prints a Markdown section and
//! writes it into a file, replacing its previous version (the `## Breaker, end to end` heading
//! up to the next `## ` heading or the end), so runs are idempotent.
//!
//! The agent runs in the client namespace on the client veth (`direction: both`, generic XDP):
//! TC egress sees the client's SYNs toward the backend. The backend is a TCP listener in the
//! server namespace on an address of its own, made to hang by a policy-routing blackhole on
//! that address (`ip rule add from ADDR blackhole`: its answers go nowhere).
//!
//! Root only; needs `AGENT_BIN` (set by `cargo xtask bench`).

use std::{
    fmt::Write as _,
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::ExitCode,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_tests::{
    agent::{AgentProcess, TempDir, agent_bin},
    backend::{Blackhole, TcpServer, connect_many},
    breaker::{self, BackendView},
    netns::{Netns, Topology},
    timing::Scaled,
};
use anyhow::{Context as _, Result, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The Markdown file whose `## Breaker, end to end` section is replaced (or appended).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Hang-and-restore rounds; each figure is a median and a maximum over them.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Refused connects timed in each round while the breaker is open.
    #[arg(long, default_value_t = 100)]
    connects: usize,
    /// Turn on passive detection (`health_check.passive`): the client's own unanswered SYNs
    /// then count as failures too, and the breaker may open before the probes alone open it.
    #[arg(long)]
    passive: bool,
}

// The policy, as the numbers the bounds are computed from.
const INTERVAL: Duration = Duration::from_millis(200);
const UNHEALTHY_INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(100);
const HEALTHY_THRESHOLD: u32 = 2;
const UNHEALTHY_THRESHOLD: u32 = 3;
/// Equal to `UNHEALTHY_THRESHOLD`: the breaker opens on the same probe that marks the backend
/// unhealthy.
const FAILURE_THRESHOLD: u32 = 3;
const RESET_TIMEOUT: Duration = Duration::from_secs(1);
const SUCCESS_THRESHOLD: u32 = 2;

const SERVICE: &str = "bench";
const BACKEND_PORT: u16 = 8080;
/// The service's `match`: an address no packet goes to; enforcement follows the backend's.
const VIP: &str = "198.18.0.100";

/// Scrape and scheduling slack on top of every bound (as in the end-to-end tests).
const SLACK: Duration = Duration::from_millis(100);
/// How often a client attempt starts while waiting for a refusal or a success: as often as
/// `/metrics` is read while waiting for a breaker state.
const POLL: Duration = breaker::POLL;
/// Timeout of one client attempt while waiting for a refusal or a success.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(50);
/// Timeout of one timed connect while the breaker is open: well over the target, so a slow
/// refusal is measured rather than cut off.
const TIMED_CONNECT_TIMEOUT: Duration = Duration::from_millis(100);
/// The target for a refused connect.
const REFUSE_TARGET: Duration = Duration::from_millis(10);
/// A wait gives up at this many times its bound: far enough to measure a figure over the
/// bound, near enough that a breaker that never moves fails the run quickly. The give-up
/// times scale with `AGENT_TEST_TIME_SCALE` (they are deadlines); the bounds in the report,
/// the policy and the timeouts of the measured connects do not (they are what is measured).
const GIVE_UP_FACTOR: u32 = 3;
/// Waits that are not measured: first probes after start, health back before a round.
const SETUP: Scaled = Scaled::secs(5);
const SECTION: &str = "## Breaker, end to end";

/// From the backend hung to the breaker open: the next probe starts within one interval,
/// `failure_threshold` probes an interval apart, the last failing after `timeout`.
fn detect_bound() -> Duration {
    INTERVAL * FAILURE_THRESHOLD + TIMEOUT + SLACK
}

/// From the backend restored to the breaker closed: at most the whole open period (it began
/// before the restore), then `success_threshold` probes at the unhealthy interval.
fn recover_bound() -> Duration {
    RESET_TIMEOUT + UNHEALTHY_INTERVAL * SUCCESS_THRESHOLD + TIMEOUT + SLACK
}

fn policy(ifname: &str, backend: SocketAddr, passive: bool) -> String {
    format!(
        "version: 1
agent:
  listen: 127.0.0.1:9090
interfaces:
  - name: {ifname}
    xdp_mode: generic
    direction: both
services:
  - name: {SERVICE}
    match:
      address: \"{VIP}/32\"
      port: {BACKEND_PORT}
      protocol: tcp
    backends:
      - address: \"{backend}\"
    health_check:
      type: tcp
      interval: {interval}ms
      unhealthy_interval: {unhealthy}ms
      timeout: {timeout}ms
      healthy_threshold: {HEALTHY_THRESHOLD}
      unhealthy_threshold: {UNHEALTHY_THRESHOLD}
      jitter: 0%
      passive: {passive}
    circuit_breaker:
      failure_threshold: {FAILURE_THRESHOLD}
      reset_timeout: {reset}ms
      success_threshold: {SUCCESS_THRESHOLD}
",
        interval = INTERVAL.as_millis(),
        unhealthy = UNHEALTHY_INTERVAL.as_millis(),
        timeout = TIMEOUT.as_millis(),
        reset = RESET_TIMEOUT.as_millis(),
    )
}

/// What one round measured.
struct Round {
    /// Rule added -> `agent_breaker_state{state="open"} 1`.
    open_seen: Duration,
    /// Rule added -> the first client connect refused (`None`: not within the give-up time).
    refused: Option<Duration>,
    /// The timed connects while open: refused ones' times, and how the others ended.
    refuse_times: Vec<Duration>,
    not_refused: Vec<String>,
    /// Breaker seen open -> rule deleted.
    open_before_restore: Duration,
    /// Rule deleted -> `agent_breaker_state{state="closed"} 1`.
    closed_seen: Duration,
    /// Rule deleted -> the first client connect that succeeds.
    connected: Option<Duration>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = run(&args).and_then(|section| {
        println!("{section}");
        agent_tests::benchmarks::write_section(&args.out, &section)
            .with_context(|| format!("writing {}", args.out.display()))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("breaker-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<String> {
    if args.rounds == 0 || args.connects == 0 {
        bail!("--rounds and --connects must be at least 1");
    }
    agent_bin()?;
    let mut topo = Topology::new()?;
    let backend = SocketAddr::new(topo.add_server_v4(1)?[0].into(), BACKEND_PORT);
    let _server = TcpServer::start(&topo.server, backend)?;
    let dir = TempDir::new()?;
    let config = dir.write(
        "breaker-bench.yaml",
        &policy(&topo.client_if, backend, args.passive),
    )?;
    let agent = AgentProcess::start(&topo.client, &config)?;
    let view = BackendView::new(&agent, SERVICE, backend);
    let mut rounds = Vec::new();
    for i in 0..args.rounds {
        let r = round(&topo, &view, backend, i, args)
            .with_context(|| format!("round {} of {}", i + 1, args.rounds))?;
        eprintln!(
            "round {}: open {:?}, refused {:?}, recovered: closed {:?}, connected {:?}",
            i + 1,
            r.open_seen,
            r.refused,
            r.closed_seen,
            r.connected
        );
        rounds.push(r);
    }
    report(args, &rounds)
}

/// Hang the backend, wait for detection, time refused connects, restore, wait for recovery.
fn round(
    topo: &Topology,
    view: &BackendView,
    backend: SocketAddr,
    i: u32,
    args: &Args,
) -> Result<Round> {
    view.wait(
        "backend healthy, breaker closed",
        Instant::now(),
        SETUP,
        |s| s.state() == Some("closed") && s.healthy() == Some(1.0),
    )?;
    // Anchor on the probe grid (just after a successful probe), then spread the rounds'
    // start over one interval: detection depends on where in the grid the backend hangs.
    let probed = view.scrape()?.probes().0;
    view.wait("the next successful probe", Instant::now(), SETUP, |s| {
        s.probes().0 > probed
    })?;
    std::thread::sleep(INTERVAL * i / args.rounds);

    let mut hole = Blackhole::add(&topo.server, backend.ip())?;
    let t0 = Instant::now();
    let give_up = Scaled::new(detect_bound() * GIVE_UP_FACTOR);
    let client = first_attempt(&topo.client, backend, Want::Refused, t0, give_up.get())?;
    let (open_seen, _) = view.wait_state("open", t0, give_up)?;
    let refused = join(client)?;
    let t_open = t0 + open_seen;

    let (refuse_times, not_refused) = timed_connects(&topo.client, backend, args.connects)?;

    hole.remove()?;
    let t1 = Instant::now();
    let give_up = Scaled::new(recover_bound() * GIVE_UP_FACTOR);
    let client = first_attempt(&topo.client, backend, Want::Connected, t1, give_up.get())?;
    let (closed_seen, _) = view.wait_state("closed", t1, give_up)?;
    let connected = join(client)?;
    Ok(Round {
        open_seen,
        refused,
        refuse_times,
        not_refused,
        open_before_restore: t1 - t_open,
        closed_seen,
        connected,
    })
}

// ---------------------------------------------------------------------------------------
// Client attempts, from the client namespace.

#[derive(Clone, Copy, PartialEq)]
enum Want {
    Refused,
    Connected,
}

/// Starts a connect to `addr` every [`POLL`], each with an [`ATTEMPT_TIMEOUT`], until one
/// ends as `want` ([`breaker::first_hit`]): the time from `since` to the end of that attempt,
/// or `None` after `give_up`.
fn first_attempt(
    ns: &Netns,
    addr: SocketAddr,
    want: Want,
    since: Instant,
    give_up: Duration,
) -> Result<JoinHandle<Option<Duration>>> {
    breaker::first_hit(ns, POLL, since, give_up, move || {
        match (want, TcpStream::connect_timeout(&addr, ATTEMPT_TIMEOUT)) {
            (Want::Connected, Ok(_)) => true,
            (Want::Refused, Err(e)) => e.kind() == ErrorKind::ConnectionRefused,
            _ => false,
        }
    })
}

fn join(client: JoinHandle<Option<Duration>>) -> Result<Option<Duration>> {
    client
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))
}

/// `n` connects one after the other, each timed around `connect()` alone: the refused ones'
/// times, and a description of every other outcome.
fn timed_connects(ns: &Netns, addr: SocketAddr, n: usize) -> Result<(Vec<Duration>, Vec<String>)> {
    let mut refused = Vec::with_capacity(n);
    let mut other = Vec::new();
    for a in connect_many(ns, addr, n, TIMED_CONNECT_TIMEOUT)? {
        match a.result {
            Err(ErrorKind::ConnectionRefused) => refused.push(a.took),
            Err(kind) => other.push(format!("{kind:?} after {:?}", a.took)),
            Ok(_) => other.push(format!("connected after {:?}", a.took)),
        }
    }
    Ok((refused, other))
}

// ---------------------------------------------------------------------------------------
// The report.

/// Median (the upper one for an even count, as agent-bench) and maximum.
fn median_max(mut v: Vec<Duration>) -> Option<(Duration, Duration)> {
    v.sort();
    Some((*v.get(v.len() / 2)?, *v.last()?))
}

/// Milliseconds: whole ones from 10 ms up, three decimals below.
fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// One line of the table.
struct Row {
    what: &'static str,
    count: String,
    figures: Vec<Duration>,
    /// Figures needed for a result.
    needed: usize,
    bound: Duration,
    bound_text: String,
}

fn report(args: &Args, rounds: &[Round]) -> Result<String> {
    let n = rounds.len();
    let all = |f: fn(&Round) -> Option<Duration>| -> Vec<Duration> {
        rounds.iter().filter_map(f).collect()
    };
    let per_round = |what, figures, bound| Row {
        what,
        count: n.to_string(),
        figures,
        needed: n,
        bound,
        bound_text: ms(bound),
    };
    let refuse_times: Vec<Duration> = rounds
        .iter()
        .flat_map(|r| r.refuse_times.iter().copied())
        .collect();
    let not_refused: Vec<&String> = rounds.iter().flat_map(|r| &r.not_refused).collect();
    let timed = n * args.connects;
    let rows = [
        per_round(
            "detect: breaker `open` in /metrics",
            all(|r| Some(r.open_seen)),
            detect_bound(),
        ),
        per_round(
            "detect: client connect() refused (ECONNREFUSED)",
            all(|r| r.refused),
            detect_bound(),
        ),
        Row {
            what: "refused connect() while open",
            count: format!("{n} x {}", args.connects),
            figures: refuse_times.clone(),
            // The ones not refused are listed under the table.
            needed: 1,
            bound: REFUSE_TARGET,
            bound_text: format!("{} (target)", ms(REFUSE_TARGET)),
        },
        per_round(
            "recover: breaker `closed` in /metrics",
            all(|r| Some(r.closed_seen)),
            recover_bound(),
        ),
        per_round(
            "recover: client connect() succeeds",
            all(|r| r.connected),
            recover_bound(),
        ),
    ];

    let mut t = String::new();
    writeln!(t, "{SECTION}\n")?;
    writeln!(
        t,
        "Produced by `cargo xtask bench` (`breaker-bench --rounds {} --connects {}{}`) on \
         kernel {}, {} CPUs. The agent runs in a client network namespace on its veth \
         (`direction: both`, generic XDP); one service has one backend, a TCP listener on an \
         address of its own in a server namespace. Policy: a TCP health check every {} ms \
         (also while unhealthy), timeout {} ms, unhealthy after {}, healthy after {}, jitter \
         0%, passive detection {}; breaker `failure_threshold: {}`, `reset_timeout: {} ms`, \
         `success_threshold: {}`. Each round hangs the backend (`ip rule add from BACKEND \
         blackhole` in the server namespace: its answers are dropped), then restores it (`ip \
         rule del`). Round *i* (from 0) hangs the backend *i* x interval / rounds after a \
         successful probe was seen, so the rounds cover the phases of the probe grid.\n",
        args.rounds,
        args.connects,
        if args.passive { " --passive" } else { "" },
        kernel(),
        std::thread::available_parallelism().map_or(0, usize::from),
        INTERVAL.as_millis(),
        TIMEOUT.as_millis(),
        UNHEALTHY_THRESHOLD,
        HEALTHY_THRESHOLD,
        if args.passive { "on" } else { "off" },
        FAILURE_THRESHOLD,
        RESET_TIMEOUT.as_millis(),
        SUCCESS_THRESHOLD,
    )?;
    writeln!(t, "| what | rounds | median ms | max ms | bound ms |")?;
    writeln!(t, "|---|---:|---:|---:|---:|")?;
    let mut over = Vec::new();
    let mut missing = Vec::new();
    for row in &rows {
        if row.figures.len() < row.needed {
            missing.push(format!(
                "{}: {} of {} not observed",
                row.what,
                row.needed - row.figures.len(),
                row.needed
            ));
        }
        let (median, max) = match median_max(row.figures.clone()) {
            Some((median, max)) => {
                if max > row.bound {
                    over.push(row.what);
                }
                (ms(median), ms(max))
            }
            None => ("-".to_owned(), "-".to_owned()),
        };
        writeln!(
            t,
            "| {} | {} | {median} | {max} | {} |",
            row.what, row.count, row.bound_text
        )?;
    }
    let before_restore = median_max(rounds.iter().map(|r| r.open_before_restore).collect())
        .map_or_else(|| "-".to_owned(), |(m, _)| ms(m));
    writeln!(
        t,
        "\n- *detect*: from the return of `ip rule add` until `agent_breaker_state{{state=\"open\"}}` \
         reads 1 (`/metrics` polled every {poll} ms), and until a client `connect()` fails with \
         ECONNREFUSED (a new attempt every {poll} ms, each with a {attempt} ms timeout, so one \
         that hangs does not hide the change; the time is taken when the refused attempt \
         returns).\n\
         - *refused connect() while open*: right after both, {c} connects per round one after \
         the other, each timed around `connect()` alone (timeout {timed_to} ms); {refused} of \
         {timed} were refused{others}.\n\
         - *recover*: from the return of `ip rule del` (median {before_restore} ms after the \
         breaker was seen open) until `agent_breaker_state{{state=\"closed\"}}` reads 1, and \
         until a client `connect()` succeeds (attempts as above). A connect can succeed before `closed`: half-open admits \
         trial flows.\n\
         - Bounds: detect = failure_threshold x interval + timeout; recover = reset_timeout + \
         success_threshold x unhealthy_interval + timeout (an upper bound: the open period \
         began before the restore); each + {slack} ms of scrape and scheduling slack. The \
         refused connect's target is the issue's.\n",
        poll = POLL.as_millis(),
        attempt = ATTEMPT_TIMEOUT.as_millis(),
        c = args.connects,
        timed_to = TIMED_CONNECT_TIMEOUT.as_millis(),
        refused = refuse_times.len(),
        others = if not_refused.is_empty() {
            String::new()
        } else {
            format!("; the others: {not_refused:?}")
        },
        slack = SLACK.as_millis(),
    )?;
    if over.is_empty() {
        writeln!(t, "Every maximum is within its bound.")?;
    } else {
        writeln!(t, "Over the bound: {}.", over.join("; "))?;
    }
    if !missing.is_empty() {
        // Printed, not written: a table with holes is not a result.
        println!("{t}");
        bail!(
            "not every figure was observed ({}); {} left unchanged",
            missing.join("; "),
            args.out.display()
        );
    }
    Ok(t)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}
