//! `cargo xtask bench peers failfast`: how soon a client learns that its backend is
//! unusable, the agent's circuit breaker against HAProxy's health checks and against no
//! protection, the backend blackholed.
//!
//! One backend (a TCP exchange server in the server namespace, on an address of its own),
//! reached from the client namespace through the agent's VIP, through HAProxy (a frontend on
//! 127.0.0.1 in the client namespace), or directly. Each round: the backend answers, then
//! `ip rule add from BACKEND blackhole` in the server namespace (its answers go nowhere, as a
//! hung host's); a new client attempt (connect, 64 bytes each way, close; 1 s timeout) starts
//! every 10 ms until one fails *fast*: refused, reset or closed, rather than by its own
//! timeout; then attempts one after another are timed while the backend is known bad; then
//! the rule goes and the first attempt that succeeds again is timed.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use agent_tests::{
    agent::{AgentProcess, READY_TIMEOUT, TempDir},
    backend::Blackhole,
    breaker::{BackendView, first_hit},
    netns::Topology,
    timing::Scaled,
    traffic::exchange::{self, Closes, ExchangeServer, Failure},
};
use anyhow::{Context as _, Result, bail};

use super::{
    Ctx,
    lb::{PIN_PATH, Proxy, cell, spread},
    plot::{self, Bar},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const SERVICE: &str = "web";
/// How long the agent's breaker has to close and its backend to be healthy before a round.
const SETTLE: Scaled = Scaled::secs(10);
const HAPROXY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8201);
const SERVER_THREADS: usize = 8;

// The health checks of both tools: the same interval, timeout and thresholds.
const INTERVAL: Duration = Duration::from_millis(200);
const CHECK_TIMEOUT: Duration = Duration::from_millis(100);
const FALL: u32 = 3;
const RISE: u32 = 2;
/// The agent's breaker: opens with the probe that marks the backend down.
const FAILURE_THRESHOLD: u32 = FALL;
const RESET_TIMEOUT: Duration = Duration::from_secs(1);

/// A client attempt's timeout (connect, and each read and write): the client's own
/// protection, and all that "no protection" has.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// A failure answered within this is answered at once: the tool knew.
const AT_ONCE: Duration = Duration::from_millis(10);
/// How often a new attempt starts while waiting for a fast failure or a success.
const EVERY: Duration = Duration::from_millis(10);
/// Attempts timed one after another while the backend is known bad, and without protection
/// (each of those takes the whole timeout).
const TIMED: usize = 50;
const TIMED_UNPROTECTED: usize = 3;
/// How long to wait for the first fast failure, and for the first success after the
/// restore, before the round says "not seen".
const GIVE_UP: Duration = Duration::from_secs(5);
const GIVE_UP_UNPROTECTED: Duration = Duration::from_secs(3);
/// How long the backend has to answer through a tool before a round starts.
const HEALTHY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    Agent,
    Haproxy,
    Unprotected,
}

impl Tool {
    fn label(self) -> &'static str {
        match self {
            Tool::Agent => "agent: health checks + circuit breaker (`on_open: reject`), VIP",
            Tool::Haproxy => "HAProxy 2.6: `check`, `mode tcp`",
            Tool::Unprotected => "no protection: direct connection",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Tool::Agent => "agent breaker",
            Tool::Haproxy => "HAProxy checks",
            Tool::Unprotected => "no protection",
        }
    }
}

/// One round of one tool.
struct Round {
    /// Blackhole -> the end of the first attempt that failed fast.
    detect: Option<Duration>,
    /// Blackhole -> the end of the first attempt that failed within [`AT_ONCE`]: the tool
    /// knows, rather than finds out while the client waits.
    at_once: Option<Duration>,
    /// The timed attempts while known bad: the times of those that failed fast, and of those
    /// that ended otherwise (timed out, or succeeded).
    fast: Vec<Duration>,
    slow: Vec<Duration>,
    /// Restore -> the end of the first attempt that succeeded.
    recover: Option<Duration>,
}

pub fn run(ctx: &Ctx) -> Result<String> {
    let mut topo = Topology::new()?;
    let backend = SocketAddr::from((topo.add_server_v4(1)?[0], BACKEND_PORT));
    let _server = ExchangeServer::start(&topo.server, backend, SERVER_THREADS, Closes::Client)?;
    topo.add_vip(VIP.into())?;
    let dir = TempDir::new()?;
    let vip = SocketAddr::from((VIP, VIP_PORT));

    let mut results: Vec<(Tool, Result<Vec<Round>, String>)> = Vec::new();
    {
        let path = dir.write("agent.yaml", &agent_policy(&topo.client_if, backend))?;
        let mut agent = AgentProcess::spawn(&ctx.agent, &topo.client, &path)?;
        agent.wait_ready(READY_TIMEOUT)?;
        // Each round from a closed breaker: an exchange can succeed while it is still
        // half-open (trial flows), and a round begun then would find it opening at once.
        let view = BackendView::new(&agent, SERVICE, backend);
        let closed = || -> Result<()> {
            view.wait(
                "breaker closed, backend healthy",
                Instant::now(),
                SETTLE,
                |s| s.state() == Some("closed") && s.healthy() == Some(1.0),
            )
            .map(drop)
        };
        let rounds = rounds(ctx, &topo, backend, vip, Tool::Agent, &closed)?;
        agent.stop()?;
        results.push((Tool::Agent, Ok(rounds)));
    }
    match ctx.tools.unavailable("haproxy") {
        Some(why) => results.push((Tool::Haproxy, Err(format!("skipped: {why}")))),
        None => {
            let path = dir.write("haproxy.cfg", &haproxy_config(backend))?;
            let mut command = Command::new("haproxy");
            command.arg("-db").arg("-f").arg(&path);
            let proxy = Proxy::start(&topo.client, command, &path, &[HAPROXY])?;
            // An exchange through HAProxy succeeds only once its one server is up.
            let rounds = rounds(ctx, &topo, backend, HAPROXY, Tool::Haproxy, &|| Ok(()))?;
            proxy.stop()?;
            results.push((Tool::Haproxy, Ok(rounds)));
        }
    }
    let rounds = rounds(ctx, &topo, backend, backend, Tool::Unprotected, &|| Ok(()))?;
    results.push((Tool::Unprotected, Ok(rounds)));
    report(ctx, &results)
}

/// `ctx.repeats` rounds of hanging and restoring `backend`, the client attempts going to
/// `dst`; each round begins once an exchange succeeds and `settled` returns.
fn rounds(
    ctx: &Ctx,
    topo: &Topology,
    backend: SocketAddr,
    dst: SocketAddr,
    tool: Tool,
    settled: &dyn Fn() -> Result<()>,
) -> Result<Vec<Round>> {
    let (timed, give_up) = match tool {
        Tool::Unprotected => (TIMED_UNPROTECTED, GIVE_UP_UNPROTECTED),
        _ => (TIMED, GIVE_UP),
    };
    let mut out = Vec::new();
    for i in 0..ctx.repeats {
        // Healthy first: an attempt succeeds (the checks have seen the backend up).
        let since = Instant::now();
        first_hit(&topo.client, EVERY, since, HEALTHY, move || {
            exchange::exchange(dst, ATTEMPT_TIMEOUT).result.is_ok()
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
        .with_context(|| {
            format!(
                "{}: no exchange through {dst} succeeded within {HEALTHY:?} before round {}",
                tool.short(),
                i + 1
            )
        })?;
        settled().with_context(|| format!("{}: before round {}", tool.short(), i + 1))?;
        // Spread the rounds over the checks' period: detection depends on its phase.
        std::thread::sleep(INTERVAL * i as u32 / ctx.repeats as u32);

        let mut hole = Blackhole::add(&topo.server, backend.ip())?;
        let t0 = Instant::now();
        let fast_failure = |within: Duration| {
            move || {
                let o = exchange::exchange(dst, ATTEMPT_TIMEOUT);
                o.result.is_err_and(Failure::answered) && o.took < within
            }
        };
        // Both at once, from the same instant.
        let detect = first_hit(
            &topo.client,
            EVERY,
            t0,
            give_up,
            fast_failure(ATTEMPT_TIMEOUT),
        )?;
        let at_once = first_hit(&topo.client, EVERY, t0, give_up, fast_failure(AT_ONCE))?;
        let panicked = |_| anyhow::anyhow!("a client thread panicked");
        let (detect, at_once) = (
            detect.join().map_err(panicked)?,
            at_once.join().map_err(panicked)?,
        );
        let attempts = exchange::sequential(&topo.client, &[dst], timed, ATTEMPT_TIMEOUT)?;
        let fast: Vec<Duration> = attempts
            .failures
            .iter()
            .filter(|o| o.result.is_err_and(Failure::answered))
            .map(|o| o.took)
            .collect();
        let slow: Vec<Duration> = attempts
            .times
            .iter()
            .copied()
            .chain(
                attempts
                    .failures
                    .iter()
                    .filter(|o| !o.result.is_err_and(Failure::answered))
                    .map(|o| o.took),
            )
            .collect();

        hole.remove()?;
        let t1 = Instant::now();
        let recover = first_hit(&topo.client, EVERY, t1, GIVE_UP, move || {
            exchange::exchange(dst, ATTEMPT_TIMEOUT).result.is_ok()
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        println!(
            "bench peers failfast: {}: round {}: detected {detect:?} (at once {at_once:?}), {} fast (median {:?}), {} not, recovered {recover:?}",
            tool.short(),
            i + 1,
            fast.len(),
            crate::bench::quantile(&fast, 0.5),
            slow.len(),
        );
        out.push(Round {
            detect,
            at_once,
            fast,
            slow,
            recover,
        });
    }
    Ok(out)
}

fn agent_policy(ifname: &str, backend: SocketAddr) -> String {
    format!(
        "version: 1
agent:
  listen: 127.0.0.1:9090
  pin_path: {PIN_PATH}
interfaces:
  - name: {ifname}
    xdp_mode: generic
    direction: both
services:
  - name: {SERVICE}
    match: {{ address: \"{VIP}\", port: {VIP_PORT}, protocol: tcp }}
    backends:
      - address: \"{backend}\"
    load_balancing:
      algorithm: weighted_round_robin
    health_check:
      type: tcp
      interval: {interval}ms
      unhealthy_interval: {interval}ms
      timeout: {timeout}ms
      healthy_threshold: {RISE}
      unhealthy_threshold: {FALL}
      jitter: 0%
      passive: false
    circuit_breaker:
      failure_threshold: {FAILURE_THRESHOLD}
      reset_timeout: {reset}ms
      success_threshold: {RISE}
      on_open: reject
",
        interval = INTERVAL.as_millis(),
        timeout = CHECK_TIMEOUT.as_millis(),
        reset = RESET_TIMEOUT.as_millis(),
    )
}

/// HAProxy's checks as the agent's: every INTERVAL, down after FALL failures, up after RISE
/// successes. A TCP check's connect timeout is min(`timeout connect`, `inter`), so `timeout
/// connect` is the agent's probe timeout; it is also the proxied connections' connect timeout
/// (`retries 3` by default).
fn haproxy_config(backend: SocketAddr) -> String {
    let interval = INTERVAL.as_millis();
    let timeout = CHECK_TIMEOUT.as_millis();
    format!(
        "global
    maxconn 2000

defaults
    mode tcp
    timeout connect {timeout}ms
    timeout check {timeout}ms
    timeout client 10s
    timeout server 10s

frontend web
    bind {HAPROXY}
    default_backend web

backend web
    server b0 {backend} check inter {interval}ms fastinter {interval}ms downinter {interval}ms fall {FALL} rise {RISE}
"
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(ctx: &Ctx, results: &[(Tool, Result<Vec<Round>, String>)]) -> Result<String> {
    let mut t = String::new();
    writeln!(t, "### Fail fast: a blackholed backend\n")?;
    writeln!(
        t,
        "On {}. One TCP backend in a server namespace, blackholed by `ip rule add from BACKEND \
         blackhole` (its answers go nowhere, as a hung host's), {} rounds per tool. Both tools \
         check the backend every {interval} ms (TCP connect), a check times out after {timeout} ms, down \
         after {FALL} failures, up after {RISE} successes. The agent: a VIP with that one \
         backend (generic XDP on the client veth), `health_check: {{type: tcp, interval: {interval}ms, \
         unhealthy_interval: {interval}ms, timeout: {timeout}ms, healthy_threshold: {RISE}, \
         unhealthy_threshold: {FALL}, jitter: 0%}}`, `circuit_breaker: {{failure_threshold: \
         {FAILURE_THRESHOLD}, reset_timeout: {} ms, success_threshold: {RISE}, on_open: \
         reject}}`. HAProxy: a frontend on 127.0.0.1 in the client namespace, `server ... \
         check inter {interval}ms fastinter {interval}ms downinter {interval}ms fall {FALL} rise {RISE}`, `timeout \
         connect {timeout}ms` (a TCP check's connect timeout is min(`timeout connect`, `inter`); it \
         is also the proxied connections' connect timeout, `retries 3` by default), `timeout \
         check {timeout}ms`. No protection: the client connects to the backend directly.\n",
        ctx.machine,
        ctx.repeats,
        RESET_TIMEOUT.as_millis(),
        interval = INTERVAL.as_millis(),
        timeout = CHECK_TIMEOUT.as_millis(),
    )?;
    writeln!(
        t,
        "A client attempt: connect, 64 bytes each way, close, with a {} ms timeout (connect and \
         each read). *detect*: from the blackhole to the end of the first attempt that fails \
         fast (refused, reset or closed by the other end, not its own timeout), a new attempt \
         every {} ms; \"not seen\" after {} s; *at once*: the same, for the first attempt \
         that failed within {} ms (the tool knew, rather than found out while the client \
         waited). *attempt while known bad*: then {TIMED} \
         attempts one after another ({TIMED_UNPROTECTED} without protection, where each takes \
         the whole timeout), each timed; the median and max of the fast ones, and how many \
         were not fast (and their median time). *recover*: from the removal of the rule to the end of the first attempt \
         that succeeds.\n",
        ATTEMPT_TIMEOUT.as_millis(),
        EVERY.as_millis(),
        GIVE_UP.as_secs(),
        AT_ONCE.as_millis(),
    )?;
    writeln!(
        t,
        "| tool | detect ms | detect, at once ms | attempt while known bad: median ms | max ms | not fast | recover ms |"
    )?;
    writeln!(t, "|---|---:|---:|---:|---:|---:|---:|")?;
    let mut bars = Vec::new();
    for (tool, r) in results {
        let rounds = match r {
            Err(why) => {
                writeln!(t, "| {} | {why} | | | | | |", tool.label())?;
                continue;
            }
            Ok(r) => r,
        };
        let seen = |f: fn(&Round) -> Option<Duration>| -> (Option<(f64, f64, f64)>, usize) {
            let v: Vec<f64> = rounds.iter().filter_map(f).map(ms).collect();
            let missing = rounds.len() - v.len();
            (spread(v), missing)
        };
        let with_missing = |(f, missing): (Option<(f64, f64, f64)>, usize)| -> String {
            let mut c = cell(f, 1);
            if missing > 0 {
                let _ = write!(c, "; not seen in {missing} of {}", rounds.len());
            }
            c
        };
        let detect = seen(|r| r.detect);
        let at_once = seen(|r| r.at_once);
        let recover = seen(|r| r.recover);
        let fast: Vec<Duration> = rounds.iter().flat_map(|r| r.fast.clone()).collect();
        let slow: Vec<Duration> = rounds.iter().flat_map(|r| r.slow.clone()).collect();
        let total = fast.len() + slow.len();
        let not_fast = if slow.is_empty() {
            format!("0 of {total}")
        } else {
            format!(
                "{} of {total}, median {:.1} ms",
                slow.len(),
                ms(crate::bench::quantile(&slow, 0.5))
            )
        };
        let (median, max) = if fast.is_empty() {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                format!("{:.3}", ms(crate::bench::quantile(&fast, 0.5))),
                format!("{:.3}", ms(crate::bench::quantile(&fast, 1.0))),
            )
        };
        writeln!(
            t,
            "| {} | {} | {} | {median} | {max} | {not_fast} | {} |",
            tool.label(),
            with_missing(detect),
            with_missing(at_once),
            with_missing(recover),
        )?;
        if let Some((median, min, max)) = detect.0 {
            bars.push(Bar {
                group: tool.short().to_owned(),
                series: "detect".to_owned(),
                median,
                min,
                max,
            });
        }
        if let Some((median, min, max)) = recover.0 {
            bars.push(Bar {
                group: tool.short().to_owned(),
                series: "recover".to_owned(),
                median,
                min,
                max,
            });
        }
    }
    if bars.is_empty() {
        bail!("fail fast: no figure was observed");
    }
    writeln!(t)?;
    let title = "Blackholed backend: time to the first fast failure, and back";
    plot::bars(&ctx.plots.join("failfast.svg"), title, "ms", &bars)?;
    writeln!(t, "![{title}]({}/failfast.svg)", ctx.plots_rel)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_tools_check_alike() {
        let b: SocketAddr = "198.18.2.1:8080".parse().unwrap();
        let a = agent_policy("veth-cli", b);
        let h = haproxy_config(b);
        assert!(a.contains("interval: 200ms") && h.contains("check inter 200ms"));
        assert!(a.contains("unhealthy_threshold: 3") && h.contains("fall 3"));
        assert!(a.contains("healthy_threshold: 2") && h.contains("rise 2"));
        assert!(a.contains("timeout: 100ms") && h.contains("timeout connect 100ms"));
        assert!(a.contains("on_open: reject"));
    }
}
