//! Degradation enforced in the kernel (issue 12), end to end.
//!
//! The agent runs in the client namespace on the client veth (`direction: both`, generic
//! XDP), balancing VIPs toward real HTTP servers in the server namespace
//! ([`HttpBackend`]: its answer delay and status switch at run time, every answer names the
//! server). A pool is made slow, made to answer 500, or stopped; the agent must see it over
//! its condition's window, write the service's mode, and a real client (new TCP connections
//! to the VIP) must then be answered by the fallback server, or refused when shed. What
//! the agent decided is read from `GET /status` (`ServiceStatus.degradation`,
//! `StatusReport.shedding`); who served a client is read from the answer itself.
//!
//! Policies are written here, with their times scaled down through the policy (windows of
//! 1-2 s, `recover_after` of 3-4 s) and, like every bound computed from them, scaled by
//! `AGENT_TEST_TIME_SCALE` ([`Scaled`]). Every wait polls a condition up to a bound computed
//! from the policy's numbers plus [`DEGRADE_TICK`] and [`DEGRADE_SLACK`]; the figures
//! measured are printed.
//!
//! The flash-sale story (config/flash-sale.yaml) is in this file too: the field case must
//! pass `agent check`, and its services behave as the file says on real servers.
//!
//! Root only; run serially:
//! `cargo test -p agent-tests --test degradation -- --test-threads=1`.

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use agent_common::{
    policy::{ConditionKind, FallbackStrategy, Priority, Service},
    status::{DegradationStatus, StatusReport},
};
use agent_tests::{
    agent::{AgentProcess, TempDir, agent_bin, http_get, limit_verdicts, metric},
    backend::connect_many,
    netns::{Netns, Topology},
    slow::HttpBackend,
    timing::{DEGRADE_SLACK, DEGRADE_TICK, SHED_REFUSAL, Scaled},
};
use anyhow::{Context, Result, bail, ensure};

const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// How often `/status` is read while waiting (a period, not a bound).
const POLL: Duration = Duration::from_millis(25);
/// Set-up waits that are not under test (first probes after start).
const SETUP: Scaled = Scaled::secs(10);
/// Connect timeout of a client that expects an answer (a handshake or a refusal).
const CONNECT_TIMEOUT: Scaled = Scaled::secs(1);
/// Timeout of one HTTP request through a VIP (a slow backend answers within 1 s).
const REQUEST_TIMEOUT: Scaled = Scaled::secs(3);

/// The latency rule of the latency cases: p99 above 500 ms ...
const LATENCY_THRESHOLD: Scaled = Scaled::millis(500);
/// ... against a pool that answers after 600 ms once it is slow (above the threshold) ...
const SLOW_ANSWER: Scaled = Scaled::millis(600);
/// ... or after 400 ms (below it: the other half of the hysteresis case's oscillation).
const BELOW_THRESHOLD: Scaled = Scaled::millis(400);

// ---------------------------------------------------------------------------------------
// The policy, as numbers the bounds are computed from.

/// A health check as the policy writes it (`jitter: 0%`: probes on their grid).
#[derive(Clone, Copy, Debug)]
struct Check {
    /// `tcp` | `http`
    kind: &'static str,
    interval: Scaled,
    timeout: Scaled,
    rise: u32,
    fall: u32,
}

impl Check {
    /// HTTP probes that wait for a slow answer: the timeout (800 ms) above the slow pool's
    /// 600 ms, so a slow probe succeeds and measures its latency; the interval must exceed
    /// the timeout (validation), hence 1 s.
    const SLOW_HTTP: Check = Check {
        kind: "http",
        interval: Scaled::millis(1000),
        timeout: Scaled::millis(800),
        rise: 2,
        fall: 3,
    };

    /// HTTP probes every 200 ms, 100 ms timeout: failures (500, refusals) seen fast.
    const FAST_HTTP: Check = Check {
        kind: "http",
        interval: Scaled::millis(200),
        timeout: Scaled::millis(100),
        rise: 2,
        fall: 2,
    };

    /// TCP probes every 200 ms, 100 ms timeout, fall after 2, rise after 2.
    const FAST_TCP: Check = Check {
        kind: "tcp",
        ..Check::FAST_HTTP
    };

    fn yaml(&self) -> String {
        let path = if self.kind == "http" {
            "      path: /health\n"
        } else {
            ""
        };
        format!(
            "    health_check:\n      type: {}\n{path}      interval: {}\n\
             \x20     unhealthy_interval: {}\n      timeout: {}\n      healthy_threshold: {}\n\
             \x20     unhealthy_threshold: {}\n      jitter: 0%\n",
            self.kind,
            self.interval.yaml(),
            self.interval.yaml(),
            self.timeout.yaml(),
            self.rise,
            self.fall,
        )
    }
}

/// One degradation condition.
#[derive(Clone, Debug)]
struct Cond {
    kind: &'static str,
    threshold: String,
    window: Scaled,
}

impl Cond {
    fn latency(threshold: Scaled, window: Scaled) -> Cond {
        Cond {
            kind: "latency",
            threshold: threshold.yaml(),
            window,
        }
    }

    fn error_rate(percent: u32, window: Scaled) -> Cond {
        Cond {
            kind: "error_rate",
            threshold: format!("{percent}%"),
            window,
        }
    }

    fn availability(percent: u32, window: Scaled) -> Cond {
        Cond {
            kind: "availability",
            threshold: format!("{percent}%"),
            window,
        }
    }
}

/// One balanced service with `degradation`.
#[derive(Clone, Debug)]
struct Svc {
    name: String,
    vip: SocketAddr,
    priority: &'static str,
    backends: Vec<SocketAddr>,
    check: Check,
    conditions: Vec<Cond>,
    /// `static_response` | `cache_only` | `shed`
    strategy: &'static str,
    fallback: Vec<SocketAddr>,
    recover_after: Scaled,
}

impl Svc {
    fn yaml(&self) -> String {
        let list = |b: &[SocketAddr]| -> String {
            b.iter()
                .map(|a| format!("      - address: \"{a}\"\n"))
                .collect()
        };
        let mut y = format!(
            "  - name: {name}\n    match: {{ address: \"{ip}/32\", port: {port}, protocol: tcp }}\n\
             \x20   priority: {prio}\n    backends:\n{backends}\
             \x20   load_balancing:\n      algorithm: weighted_round_robin\n      vip: true\n\
             {check}    degradation:\n      conditions:\n",
            name = self.name,
            ip = self.vip.ip(),
            port = self.vip.port(),
            prio = self.priority,
            backends = list(&self.backends),
            check = self.check.yaml(),
        );
        for c in &self.conditions {
            y += &format!(
                "        - type: {}\n          threshold: {}\n          window: {}\n",
                c.kind,
                c.threshold,
                c.window.yaml()
            );
        }
        y += &format!("      fallback:\n        strategy: {}\n", self.strategy);
        if !self.fallback.is_empty() {
            y += &format!(
                "        backends:\n{}",
                list(&self.fallback).replace("      -", "          -")
            );
        }
        y += &format!("      recover_after: {}\n", self.recover_after.yaml());
        y
    }
}

/// The whole policy: the agent on the client veth; `shed_step` when given.
fn policy(ifname: &str, shed_step: Option<Scaled>, services: &[Svc]) -> String {
    let step = shed_step.map_or_else(String::new, |s| format!("  shed_step: {}\n", s.yaml()));
    let mut y = format!(
        "version: 1\n\
         agent:\n  listen: 127.0.0.1:9090\n{step}\
         interfaces:\n  - name: {ifname}\n    xdp_mode: generic\n    direction: both\n\
         services:\n"
    );
    for s in services {
        y += &s.yaml();
    }
    y
}

// ---------------------------------------------------------------------------------------
// The lab: a topology, servers, VIPs and the agent.

struct Lab {
    topo: Topology,
    dir: TempDir,
    agent: Option<AgentProcess>,
    vips: u8,
}

impl Lab {
    fn new() -> Result<Lab> {
        agent_bin()?;
        Ok(Lab {
            topo: Topology::new()?,
            dir: TempDir::new()?,
            agent: None,
            vips: 0,
        })
    }

    /// A new VIP (198.18.0.100, .101, ...) on `port`, reachable from the client.
    fn vip_on(&mut self, port: u16) -> Result<SocketAddr> {
        let ip = Ipv4Addr::new(198, 18, 0, 100 + self.vips);
        self.vips += 1;
        self.topo.add_vip(ip.into())?;
        Ok(SocketAddr::new(ip.into(), port))
    }

    fn vip(&mut self) -> Result<SocketAddr> {
        self.vip_on(VIP_PORT)
    }

    /// One server per name, each on an address of its own, on `port`.
    fn servers_on(&mut self, port: u16, names: &[&str]) -> Result<Vec<HttpBackend>> {
        let addrs = self.topo.add_server_v4(names.len())?;
        addrs
            .into_iter()
            .zip(names)
            .map(|(a, n)| HttpBackend::start(&self.topo.server, SocketAddr::new(a.into(), port), n))
            .collect()
    }

    fn servers(&mut self, names: &[&str]) -> Result<Vec<HttpBackend>> {
        self.servers_on(BACKEND_PORT, names)
    }

    fn start(&mut self, policy: &str) -> Result<()> {
        let path = self.dir.write("policy.yaml", policy)?;
        let agent = AgentProcess::start(&self.topo.client, &path)
            .with_context(|| format!("starting the agent with\n{policy}"))?;
        self.agent = Some(agent);
        Ok(())
    }

    fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("started")
    }

    fn status(&self) -> Result<StatusReport> {
        self.agent().status()
    }

    /// One HTTP request on a new connection to `vip`, from the client.
    fn get(&self, vip: SocketAddr) -> Result<Answer> {
        get(&self.topo.client, vip)
    }

    /// One `connect()` to `vip` from the client, timed.
    fn connect(&self, vip: SocketAddr) -> Result<(Result<(), ErrorKind>, Duration)> {
        let a = connect_many(&self.topo.client, vip, 1, CONNECT_TIMEOUT.get())?;
        let a = &a[0];
        Ok((a.kind(), a.took))
    }

    /// Polls `/status` until `cond` accepts a report (`Err(what was seen)` otherwise) or
    /// `limit` has passed since `since`.
    fn wait<T>(
        &self,
        what: &str,
        since: Instant,
        limit: Scaled,
        mut cond: impl FnMut(&StatusReport) -> Result<T, String>,
    ) -> Result<(Duration, T)> {
        let mut last;
        loop {
            match self.status() {
                Ok(r) => match cond(&r) {
                    Ok(v) => return Ok((since.elapsed(), v)),
                    Err(seen) => last = seen,
                },
                Err(e) => last = format!("{e:#}"),
            }
            if since.elapsed() >= limit.get() {
                if let Some(a) = &self.agent {
                    eprintln!("---- agent output so far ----\n{}\n----", a.log_text());
                }
                bail!("{what}: not within {limit}; last seen: {last}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// As [`Lab::wait`], on one service's degradation.
    fn wait_service(
        &self,
        name: &str,
        what: &str,
        since: Instant,
        limit: Scaled,
        mut cond: impl FnMut(&DegradationStatus) -> bool,
    ) -> Result<(Duration, DegradationStatus)> {
        self.wait(what, since, limit, |r| {
            let d = degradation(r, name).map_err(|e| format!("{e:#}"))?;
            if cond(d) {
                Ok(d.clone())
            } else {
                Err(show(name, d))
            }
        })
    }

    /// Waits until `name` is normal and each condition has a value (the evaluator has
    /// samples to judge on).
    fn wait_measured(&self, name: &str) -> Result<()> {
        self.wait_service(
            name,
            &format!("{name} normal, every condition measured and false"),
            Instant::now(),
            SETUP,
            |d| {
                d.mode == "normal"
                    && !d.degraded
                    && d.conditions.iter().all(|c| !c.met && c.value.is_some())
            },
        )?;
        Ok(())
    }
}

/// An HTTP answer through a VIP: its status, the server that gave it, how long it took.
#[derive(Debug)]
struct Answer {
    status: u16,
    server: String,
    took: Duration,
}

fn get(ns: &Netns, vip: SocketAddr) -> Result<Answer> {
    ns.run(move || -> Result<Answer> {
        let t = Instant::now();
        let (status, body) = http_get(vip, "/", REQUEST_TIMEOUT.get())?;
        let body = body.trim();
        Ok(Answer {
            status,
            server: body.strip_prefix("served by ").unwrap_or(body).to_owned(),
            took: t.elapsed(),
        })
    })?
    .with_context(|| format!("GET / through {vip}"))
}

/// `n` requests on new connections to `vip`: every one answered 200 by a server of `by`.
/// Returns the slowest answer's time.
fn served_by(ns: &Netns, vip: SocketAddr, n: usize, by: &[&str], when: &str) -> Result<Duration> {
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let a = get(ns, vip).with_context(|| format!("{when}: request {i} of {n}"))?;
        ensure!(
            a.status == 200 && by.contains(&a.server.as_str()),
            "{when}: request {i} of {n} through {vip} must be answered 200 by one of {by:?}; \
             got {a:?}"
        );
        slowest = slowest.max(a.took);
    }
    Ok(slowest)
}

/// The service's degradation in a report; an error that says what is missing.
fn degradation<'a>(r: &'a StatusReport, name: &str) -> Result<&'a DegradationStatus> {
    let s = r
        .services
        .iter()
        .find(|s| s.name == name)
        .with_context(|| {
            let names: Vec<&str> = r.services.iter().map(|s| s.name.as_str()).collect();
            format!("no service {name} in /status (services: {names:?})")
        })?;
    s.degradation.as_ref().with_context(|| {
        format!(
            "service {name} has no `degradation` in /status: the agent does not report (or \
             does not evaluate) its degradation"
        )
    })
}

/// One service's degradation, for messages.
fn show(name: &str, d: &DegradationStatus) -> String {
    let conds: Vec<String> = d
        .conditions
        .iter()
        .map(|c| {
            format!(
                "{} {:?} over {} samples (> {}? met {})",
                c.r#type, c.value, c.samples, c.threshold, c.met
            )
        })
        .collect();
    format!(
        "{name}: mode {} degraded {} cause {:?} in state {:.2}s clear for {:.2}s transitions {} \
         [{}] fallback_flows {} shed_flows {}",
        d.mode,
        d.degraded,
        d.cause,
        d.in_state_seconds,
        d.clear_for_seconds,
        d.transitions,
        conds.join("; "),
        d.fallback_flows,
        d.shed_flows
    )
}

fn addrs(servers: &[HttpBackend]) -> Vec<SocketAddr> {
    servers.iter().map(HttpBackend::addr).collect()
}

fn names(servers: &[HttpBackend]) -> Vec<&str> {
    servers.iter().map(HttpBackend::name).collect()
}

/// An echo connection through `vip`, opened from the client (the flow stays established
/// while the stream lives).
fn open_echo(ns: &Netns, vip: SocketAddr) -> Result<TcpStream> {
    let s = ns.run(move || TcpStream::connect_timeout(&vip, CONNECT_TIMEOUT.get()))??;
    s.set_read_timeout(Some(REQUEST_TIMEOUT.get()))?;
    Ok(s)
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> Result<()> {
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    ensure!(got == msg, "echo answered {got:?}, not {msg:?}");
    Ok(())
}

/// The servers that accepted a connection from client port `port`.
fn accepted_port(servers: &[&HttpBackend], port: u16) -> Vec<String> {
    servers
        .iter()
        .filter(|s| s.peers().iter().any(|p| p.port() == port))
        .map(|s| s.name().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------
// One service degrades to its fallback and recovers.

/// What one degrade-and-recover cycle measured.
#[derive(Debug)]
struct Cycle {
    /// From breaking the pool to the fallback mode in `/status`.
    reaction: Duration,
    /// From repairing the pool to the normal mode in `/status`.
    recovery: Duration,
    /// From the conditions seen all false to the normal mode (`recover_after`, measured).
    clear_to_normal: Duration,
}

impl Cycle {
    fn summary(&self) -> String {
        format!(
            "reaction {:?}, recovery {:?}, all conditions false -> normal {:?}",
            self.reaction, self.recovery, self.clear_to_normal
        )
    }
}

/// The numbers of one cycle's bounds.
struct Bounds {
    /// Breaking the pool -> the fallback mode: what the conditions need (probe cadence,
    /// window), plus a tick and the slack.
    flip: Scaled,
    /// Repairing the pool -> normal, at most.
    recover: Scaled,
}

/// `svc` (one pool, one fallback server) is normal and measured; `break_pool` degrades it:
/// it must flip to its fallback within `bounds.flip` with `cause` named first, new
/// connections through the VIP must be answered by the fallback server and an echo
/// connection opened before must stay on its backend (when `held`). `repair` ends it: the
/// service must stay degraded for `recover_after` once its conditions are all false, and be
/// normal by `bounds.recover`, its clients back on the pool.
#[expect(clippy::too_many_arguments, reason = "one scenario, its parts named")]
fn degrade_and_recover(
    lab: &Lab,
    svc: &Svc,
    pool: &mut [HttpBackend],
    fallback: &HttpBackend,
    cause: &str,
    bounds: Bounds,
    held: bool,
    break_pool: impl FnOnce(&mut [HttpBackend]) -> Result<()>,
    repair: impl FnOnce(&mut [HttpBackend]) -> Result<()>,
) -> Result<Cycle> {
    let name = svc.name.as_str();
    let vip = svc.vip;
    let ns = &lab.topo.client;
    lab.wait_measured(name)?;
    let own: Vec<String> = names(pool).iter().map(|s| s.to_string()).collect();
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    served_by(ns, vip, 4, &own, "normal, before the pool breaks")?;

    // A flow established before the flip, on one of the pool's backends.
    let mut conn = if held {
        let mut s = open_echo(ns, vip)?;
        echo(&mut s, b"before the flip\n")?;
        Some(s)
    } else {
        None
    };

    let t_break = Instant::now();
    break_pool(pool)?;
    let (reaction, d) = lab.wait_service(
        name,
        &format!("{name} in fallback mode after its pool broke"),
        t_break,
        bounds.flip,
        |d| d.mode == "fallback",
    )?;
    println!(
        "{name}: pool broken -> fallback mode in {reaction:?} (bound {}); cause {:?}",
        bounds.flip, d.cause
    );
    ensure!(
        d.degraded,
        "fallback mode but not degraded: {}",
        show(name, &d)
    );
    let c = d.cause.clone().unwrap_or_default();
    ensure!(
        c.starts_with(cause),
        "the cause of the flip must name `{cause}` first; it is {c:?}"
    );

    // New connections: the fallback server answers, at once after the mode is written.
    let fb = fallback.name();
    let t = Instant::now();
    loop {
        let a = lab.get(vip)?;
        if a.server == fb && a.status == 200 {
            break;
        }
        ensure!(
            t.elapsed() < DEGRADE_SLACK.get(),
            "{name} is in fallback mode but a new connection through {vip} was still answered \
             {a:?} {DEGRADE_SLACK} later, not by {fb}"
        );
    }
    let slowest = served_by(ns, vip, 5, &[fb], "fallback mode")?;
    ensure!(
        slowest < LATENCY_THRESHOLD.get(),
        "the fallback server answers at once, yet a client waited {slowest:?} (the pool's \
         latency threshold is {LATENCY_THRESHOLD})"
    );

    // The established flow stays where it was.
    if let Some(s) = conn.as_mut() {
        let port = s.local_addr()?.port();
        echo(s, b"after the flip\n")
            .context("the flow established before the flip must still be served")?;
        let mut all: Vec<&HttpBackend> = pool.iter().collect();
        all.push(fallback);
        let by = accepted_port(&all, port);
        ensure!(
            by.len() == 1 && own.contains(&by[0].as_str()),
            "the flow from client port {port} must have been accepted once, by the pool; \
             accepted by {by:?}"
        );
        println!("the flow established before the flip stayed on {}", by[0]);
    }
    lab.wait_service(
        name,
        "the datapath's fallback counter to count the new flows",
        Instant::now(),
        DEGRADE_SLACK + Scaled::secs(1),
        |d| d.fallback_flows >= 6,
    )?;

    // Recovery: not before recover_after once the conditions are all false.
    let t_fix = Instant::now();
    repair(pool)?;
    let mut clear: Option<Instant> = None;
    let (recovery, d) = lab.wait(
        &format!("{name} back to normal after its pool was repaired"),
        t_fix,
        bounds.recover,
        |r| {
            let d = degradation(r, name).map_err(|e| format!("{e:#}"))?;
            if d.mode == "normal" {
                return Ok(d.clone());
            }
            if clear.is_none() && d.conditions.iter().all(|c| !c.met) {
                clear = Some(Instant::now());
            }
            Err(show(name, d))
        },
    )?;
    let t_normal = Instant::now();
    let clear_to_normal = clear.map_or(Duration::ZERO, |c| t_normal - c);
    println!(
        "{name}: pool repaired -> normal in {recovery:?} (bound {}); conditions seen all false \
         {clear_to_normal:?} before (recover_after {})",
        bounds.recover, svc.recover_after
    );
    let early = svc.recover_after.get().saturating_sub(DEGRADE_SLACK.get());
    ensure!(
        recovery >= early,
        "{name} recovered {recovery:?} after the repair: before recover_after ({}) less the \
         slack ({DEGRADE_SLACK}); {}",
        svc.recover_after,
        show(name, &d)
    );
    ensure!(
        clear.is_some(),
        "{name} recovered without ever being seen with all conditions false"
    );
    let floor = svc
        .recover_after
        .get()
        .saturating_sub((DEGRADE_TICK + DEGRADE_SLACK).get());
    ensure!(
        clear_to_normal >= floor,
        "{name} recovered {clear_to_normal:?} after its conditions were seen all false: \
         sooner than recover_after ({}) less a tick and the slack",
        svc.recover_after
    );
    ensure!(
        clear_to_normal <= (svc.recover_after + DEGRADE_TICK + DEGRADE_SLACK).get(),
        "{name} recovered {clear_to_normal:?} after its conditions were seen all false: later \
         than recover_after ({}) and a tick and the slack",
        svc.recover_after
    );
    ensure!(
        !d.degraded && d.transitions == 2,
        "after one flip and one recovery: {}",
        show(name, &d)
    );
    served_by(ns, vip, 4, &own, "normal again")?;

    let text = lab.agent().metrics()?;
    for (from, to) in [("normal", "fallback"), ("fallback", "normal")] {
        let v = metric(
            &text,
            "agent_degradation_transitions_total",
            &[("service", name), ("from", from), ("to", to)],
        );
        ensure!(
            v == Some(1.0),
            "agent_degradation_transitions_total{{service={name},from={from},to={to}}} must be \
             1, is {v:?}"
        );
    }
    let mode = metric(&text, "agent_degradation_mode", &[("service", name)]);
    ensure!(
        mode == Some(0.0),
        "agent_degradation_mode{{service={name}}} is {mode:?}, not 0"
    );
    let cycle = Cycle {
        reaction,
        recovery,
        clear_to_normal,
    };
    println!("{name}: {}", cycle.summary());
    Ok(cycle)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn latency_flips_to_the_fallback_within_a_window_and_recovers_after_recover_after() -> Result<()> {
    const WINDOW: Scaled = Scaled::secs(2);
    const RECOVER: Scaled = Scaled::secs(4);
    let check = Check::SLOW_HTTP;
    // The first probe after the switch starts within an interval, and answers after the
    // slow delay: then the p99 of the window is above the threshold.
    let detect = check.interval + SLOW_ANSWER + DEGRADE_TICK;
    assert!(
        detect <= WINDOW,
        "the policy must let the flip happen within one window"
    );

    let mut lab = Lab::new()?;
    let vip = lab.vip()?;
    let mut pool = lab.servers(&["web-a", "web-b"])?;
    let fallback = lab.servers(&["web-static"])?.remove(0);
    let svc = Svc {
        name: "web".into(),
        vip,
        priority: "core",
        backends: addrs(&pool),
        check,
        conditions: vec![Cond::latency(LATENCY_THRESHOLD, WINDOW)],
        strategy: "static_response",
        fallback: vec![fallback.addr()],
        recover_after: RECOVER,
    };
    lab.start(&policy(
        &lab.topo.client_if,
        None,
        std::slice::from_ref(&svc),
    ))?;
    let cycle = degrade_and_recover(
        &lab,
        &svc,
        &mut pool,
        &fallback,
        "latency",
        Bounds {
            flip: WINDOW + DEGRADE_SLACK,
            // The last slow probe may answer just after the repair; it leaves the window a
            // window later; then recover_after.
            recover: SLOW_ANSWER + WINDOW + RECOVER + DEGRADE_TICK * 2 + DEGRADE_SLACK,
        },
        true,
        |pool| {
            pool.iter().for_each(|b| b.set_delay(SLOW_ANSWER.get()));
            Ok(())
        },
        |pool| {
            pool.iter().for_each(|b| b.set_delay(Duration::ZERO));
            Ok(())
        },
    )?;
    println!("latency: {}", cycle.summary());
    Ok(())
}

/// error_rate alone: the pool's probes fail (`how`: answers 500, or refuses).
fn error_rate_alone(refuse: bool) -> Result<()> {
    const WINDOW: Scaled = Scaled::secs(1);
    const RECOVER: Scaled = Scaled::secs(3);
    let check = Check::FAST_HTTP;
    let mut lab = Lab::new()?;
    let vip = lab.vip()?;
    let mut pool = lab.servers(&["api-a", "api-b"])?;
    let fallback = lab.servers(&["api-static"])?.remove(0);
    let svc = Svc {
        name: "api".into(),
        vip,
        priority: "core",
        backends: addrs(&pool),
        check,
        conditions: vec![Cond::error_rate(50, WINDOW)],
        strategy: "static_response",
        fallback: vec![fallback.addr()],
        recover_after: RECOVER,
    };
    lab.start(&policy(
        &lab.topo.client_if,
        None,
        std::slice::from_ref(&svc),
    ))?;
    let cycle = degrade_and_recover(
        &lab,
        &svc,
        &mut pool,
        &fallback,
        "error_rate",
        Bounds {
            // Failures from the next probe on; more than half the window's attempts failed
            // after about half a window.
            flip: check.interval + WINDOW + DEGRADE_TICK + DEGRADE_SLACK,
            // The failures leave the window; the backends' health rises; recover_after.
            recover: check.interval * check.rise
                + WINDOW
                + RECOVER
                + DEGRADE_TICK * 2
                + DEGRADE_SLACK,
        },
        false,
        |pool| {
            for b in pool.iter_mut() {
                if refuse {
                    b.stop();
                } else {
                    b.set_status(500);
                }
            }
            Ok(())
        },
        |pool| {
            for b in pool.iter_mut() {
                if refuse {
                    b.restart()?;
                } else {
                    b.set_status(200);
                }
            }
            Ok(())
        },
    )?;
    println!(
        "error_rate ({}): {cycle:?}",
        if refuse { "refused" } else { "500" }
    );
    Ok(())
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn error_rate_alone_flips_on_answers_500_and_recovers() -> Result<()> {
    error_rate_alone(false)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn error_rate_alone_flips_on_refusals_and_recovers() -> Result<()> {
    error_rate_alone(true)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn availability_alone_flips_when_the_pool_stops_and_recovers() -> Result<()> {
    const WINDOW: Scaled = Scaled::secs(1);
    const RECOVER: Scaled = Scaled::secs(3);
    let check = Check::FAST_TCP;
    let mut lab = Lab::new()?;
    let vip = lab.vip()?;
    let mut pool = lab.servers(&["stock-a", "stock-b"])?;
    let fallback = lab.servers(&["stock-cache"])?.remove(0);
    let svc = Svc {
        name: "stock".into(),
        vip,
        priority: "core",
        backends: addrs(&pool),
        check,
        conditions: vec![Cond::availability(50, WINDOW)],
        strategy: "cache_only",
        fallback: vec![fallback.addr()],
        recover_after: RECOVER,
    };
    lab.start(&policy(
        &lab.topo.client_if,
        None,
        std::slice::from_ref(&svc),
    ))?;
    let cycle = degrade_and_recover(
        &lab,
        &svc,
        &mut pool,
        &fallback,
        "availability",
        Bounds {
            // Unhealthy after `fall` probes; the window's mean share below 50% half a window
            // later.
            flip: check.interval * check.fall
                + check.timeout
                + WINDOW
                + DEGRADE_TICK
                + DEGRADE_SLACK,
            recover: check.interval * check.rise
                + WINDOW
                + RECOVER
                + DEGRADE_TICK * 2
                + DEGRADE_SLACK,
        },
        false,
        |pool| {
            pool.iter_mut().for_each(HttpBackend::stop);
            Ok(())
        },
        |pool| pool.iter_mut().try_for_each(HttpBackend::restart),
    )?;
    println!("availability: {}", cycle.summary());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Hysteresis: a condition oscillating around its threshold does not flap.

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn a_condition_oscillating_around_its_threshold_does_not_flap() -> Result<()> {
    // A window of one probe interval: the condition follows each probe, true after a slow
    // one, false after a fast one, so it is false for about an interval at a time, well
    // under recover_after.
    const WINDOW: Scaled = Scaled::secs(1);
    const RECOVER: Scaled = Scaled::secs(4);
    const OSCILLATE: Scaled = Scaled::secs(12);
    let check = Check::SLOW_HTTP;
    let mut lab = Lab::new()?;
    let vip = lab.vip()?;
    let pool = lab.servers(&["feed-a"])?;
    let fallback = lab.servers(&["feed-static"])?.remove(0);
    let svc = Svc {
        name: "feed".into(),
        vip,
        priority: "core",
        backends: addrs(&pool),
        check,
        conditions: vec![Cond::latency(LATENCY_THRESHOLD, WINDOW)],
        strategy: "static_response",
        fallback: vec![fallback.addr()],
        recover_after: RECOVER,
    };
    lab.start(&policy(
        &lab.topo.client_if,
        None,
        std::slice::from_ref(&svc),
    ))?;
    lab.wait_measured("feed")?;

    // Probes alternate: 600 ms (above 500 ms), 400 ms (below).
    let t0 = Instant::now();
    pool[0].set_alternating(SLOW_ANSWER.get(), BELOW_THRESHOLD.get());
    let (took, _) = lab.wait_service(
        "feed",
        "feed degraded once its probes alternate around the threshold",
        t0,
        check.interval * 2 + SLOW_ANSWER + DEGRADE_TICK + DEGRADE_SLACK,
        |d| d.degraded && d.mode == "fallback",
    )?;
    println!("oscillation started -> degraded in {took:?}");

    // While it oscillates: degraded throughout, one transition, and the condition seen both
    // true and false (else the test shows nothing).
    let t1 = Instant::now();
    let (mut met, mut unmet) = (0u32, 0u32);
    let mut unmet_since: Option<Instant> = None;
    let mut longest_unmet = Duration::ZERO;
    while t1.elapsed() < OSCILLATE.get() {
        let r = lab.status()?;
        let d = degradation(&r, "feed")?;
        ensure!(
            d.degraded && d.mode == "fallback" && d.transitions == 1,
            "{:?} into the oscillation the service must still be degraded after exactly one \
             transition: {}",
            t1.elapsed(),
            show("feed", d)
        );
        if d.conditions.iter().any(|c| c.met) {
            met += 1;
            unmet_since = None;
        } else {
            unmet += 1;
            let since = *unmet_since.get_or_insert_with(Instant::now);
            longest_unmet = longest_unmet.max(since.elapsed());
        }
        std::thread::sleep(POLL);
    }
    println!(
        "oscillating for {OSCILLATE}: condition seen met {met} times, unmet {unmet} times, \
         longest unmet stretch {longest_unmet:?} (recover_after {RECOVER}); probes answered {}",
        pool[0].requests()
    );
    ensure!(
        met > 0 && unmet > 0,
        "the condition must have oscillated (seen met {met} times, unmet {unmet} times): the \
         test showed nothing"
    );

    // Steady and fast again: it recovers, once.
    let t_fix = Instant::now();
    pool[0].set_delay(Duration::ZERO);
    let (took, d) = lab.wait_service(
        "feed",
        "feed normal once its probes are fast for good",
        t_fix,
        SLOW_ANSWER + WINDOW + RECOVER + DEGRADE_TICK * 2 + DEGRADE_SLACK,
        |d| d.mode == "normal",
    )?;
    println!("steady -> normal in {took:?}");
    ensure!(
        took >= RECOVER.get().saturating_sub(DEGRADE_SLACK.get()),
        "recovered {took:?} after the oscillation ended, before recover_after ({RECOVER})"
    );
    ensure!(d.transitions == 2, "{}", show("feed", &d));
    let text = lab.agent().metrics()?;
    let flips = metric(
        &text,
        "agent_degradation_transitions_total",
        &[("service", "feed"), ("from", "normal"), ("to", "fallback")],
    );
    ensure!(
        flips == Some(1.0),
        "agent_degradation_transitions_total normal->fallback is {flips:?}, not 1"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Shedding by priority: low first, then normal, core last.

/// The shed services' priorities, lowest first: the level names, in order.
const LEVELS: [&str; 4] = ["none", "low", "normal", "core"];

fn level_index(level: &str) -> Result<usize> {
    LEVELS
        .iter()
        .position(|l| *l == level)
        .with_context(|| format!("unknown shedding level {level:?}"))
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn shedding_takes_low_first_then_normal_and_core_last() -> Result<()> {
    const WINDOW: Scaled = Scaled::secs(1);
    const RECOVER: Scaled = Scaled::secs(3);
    const SHED_STEP: Scaled = Scaled::secs(2);
    let check = Check::SLOW_HTTP;
    let mut lab = Lab::new()?;
    let mut services = Vec::new();
    let mut servers = Vec::new();
    for prio in ["low", "normal", "core"] {
        let vip = lab.vip()?;
        let pool = lab.servers(&[&format!("{prio}-a")])?;
        services.push(Svc {
            name: format!("svc-{prio}"),
            vip,
            priority: prio,
            backends: addrs(&pool),
            check,
            conditions: vec![Cond::latency(LATENCY_THRESHOLD, WINDOW)],
            strategy: "shed",
            fallback: Vec::new(),
            recover_after: RECOVER,
        });
        servers.extend(pool);
    }
    lab.start(&policy(&lab.topo.client_if, Some(SHED_STEP), &services))?;
    for s in &services {
        lab.wait_measured(&s.name)?;
    }
    let r = lab.status()?;
    ensure!(
        r.shedding.level == "none" && !r.shedding.pressure && r.shedding.shed.is_empty(),
        "before any condition: shedding {:?}",
        r.shedding
    );
    for s in &services {
        let (res, _) = lab.connect(s.vip)?;
        ensure!(
            res.is_ok(),
            "{} must be served before shedding: {res:?}",
            s.name
        );
    }

    // The condition they share becomes true: every pool slow.
    let t0 = Instant::now();
    servers.iter().for_each(|b| b.set_delay(SLOW_ANSWER.get()));
    let first = check.interval + SLOW_ANSWER + DEGRADE_TICK + DEGRADE_SLACK;
    let up = first + (SHED_STEP + DEGRADE_TICK) * 2 + DEGRADE_SLACK;
    let mut t_fast: Option<Instant> = None;
    let down = SLOW_ANSWER + WINDOW + RECOVER + (SHED_STEP + DEGRADE_TICK) * 3 + DEGRADE_SLACK;
    // Level changes as seen: (when, level).
    let mut changes: Vec<(Instant, String)> = vec![(t0, "none".into())];
    let mut checked = BTreeSet::new();
    loop {
        let r = lab.status()?;
        let level = r.shedding.level.clone();
        let li = level_index(&level)?;
        // What the level implies, and what every service's mode says.
        let want: BTreeSet<&str> = services
            .iter()
            .filter(|s| level_index(s.priority).is_ok_and(|p| p <= li))
            .map(|s| s.name.as_str())
            .collect();
        let shed: BTreeSet<&str> = r.shedding.shed.iter().map(String::as_str).collect();
        ensure!(
            shed == want,
            "at level {level} the shed services must be {want:?}; status says {shed:?}"
        );
        for s in &services {
            let d = degradation(&r, &s.name)?;
            let is_shed = d.mode == "shed";
            ensure!(
                is_shed == want.contains(s.name.as_str()),
                "at level {level}: {}",
                show(&s.name, d)
            );
        }
        if changes.last().is_some_and(|(_, l)| *l != level) {
            changes.push((Instant::now(), level.clone()));
            println!("{:?}: shedding level {level}", t0.elapsed());
        }
        // Clients, once per level on the way up: the shed refused at once, the others served.
        if t_fast.is_none() && li > 0 && checked.insert(li) {
            for s in &services {
                let (res, took) = lab.connect(s.vip)?;
                if want.contains(s.name.as_str()) {
                    ensure!(
                        res == Err(ErrorKind::ConnectionRefused) && took <= SHED_REFUSAL.get(),
                        "at level {level}, {} is shed: a connect must be refused within \
                         {SHED_REFUSAL}; it ended {res:?} after {took:?}",
                        s.name
                    );
                } else {
                    ensure!(
                        res.is_ok(),
                        "at level {level}, {} is not shed: a connect must succeed; {res:?}",
                        s.name
                    );
                }
            }
        }
        match t_fast {
            None if level == "core" => {
                t_fast = Some(Instant::now());
                servers.iter().for_each(|b| b.set_delay(Duration::ZERO));
            }
            None => ensure!(
                t0.elapsed() < up.get(),
                "shedding did not reach core within {up} of the pools slowing: changes {:?}",
                levels(&changes, t0)
            ),
            Some(t) if level == "none" && !r.shedding.pressure => {
                println!(
                    "pressure gone and nothing shed {:?} after the repair",
                    t.elapsed()
                );
                break;
            }
            Some(t) => ensure!(
                t.elapsed() < down.get(),
                "shedding did not come back to none within {down} of the repair: changes {:?}",
                levels(&changes, t0)
            ),
        }
        std::thread::sleep(POLL);
    }

    let seen: Vec<&str> = changes.iter().map(|(_, l)| l.as_str()).collect();
    ensure!(
        seen == ["none", "low", "normal", "core", "normal", "low", "none"],
        "levels must go up one at a time, low first, and back core first; seen {:?}",
        levels(&changes, t0)
    );
    // One level per shed_step, both ways (each change seen up to a poll late).
    let tolerance = (DEGRADE_TICK + DEGRADE_SLACK).get();
    for (i, pair) in changes.windows(2).enumerate().skip(1) {
        // Skipped: none -> low (the first step is at once) and core -> normal (after the
        // pressure ends, which recover_after decides).
        if i == 3 {
            continue;
        }
        let gap = pair[1].0 - pair[0].0;
        ensure!(
            gap + tolerance >= SHED_STEP.get() && gap <= SHED_STEP.get() + tolerance,
            "{} -> {} took {gap:?}; one level per shed_step ({SHED_STEP}) ± {tolerance:?}",
            pair[0].1,
            pair[1].1
        );
    }
    let r = lab.status()?;
    let low = degradation(&r, "svc-low")?;
    ensure!(
        low.shed_flows >= 3,
        "svc-low refused a connect at each of three levels: shed_flows {}",
        low.shed_flows
    );
    Ok(())
}

fn levels(changes: &[(Instant, String)], t0: Instant) -> Vec<(Duration, String)> {
    changes
        .iter()
        .map(|(t, l)| (t.saturating_duration_since(t0), l.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The flash-sale story (config/flash-sale.yaml).

fn flash_sale_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/flash-sale.yaml")
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn flash_sale_policy_passes_agent_check() -> Result<()> {
    let file = flash_sale_file();
    let out = Command::new(agent_bin()?)
        .arg("check")
        .arg(&file)
        .output()
        .context("running agent check")?;
    ensure!(
        out.status.success(),
        "`agent check {}` must exit 0; it exited {}:\n{}{}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `name` of the field case, as the file writes it.
fn field_service<'a>(services: &'a [Service], name: &str) -> Result<&'a Service> {
    services
        .iter()
        .find(|s| s.name == name)
        .with_context(|| format!("config/flash-sale.yaml has no service {name}"))
}

/// The first condition of `kind` of a field service's degradation.
fn field_condition<'a>(s: &'a Service, kind: &str) -> Result<&'a ConditionKind> {
    s.degradation
        .as_ref()
        .and_then(|d| {
            d.conditions
                .iter()
                .find(|c| c.kind.condition_type().to_string() == kind)
        })
        .map(|c| &c.kind)
        .with_context(|| {
            format!(
                "{} has no {kind} condition in config/flash-sale.yaml",
                s.name
            )
        })
}

/// Sends `n` SYNs to `vip` as fast as the client can, each from a socket closed at once
/// (no retransmission, no accepted connection left on the backend); returns when the
/// first was sent.
fn syn_burst(ns: &Netns, vip: SocketAddr, n: usize) -> Result<Instant> {
    ns.run(move || -> Result<Instant> {
        let mut first = None;
        for _ in 0..n {
            // SAFETY: plain socket calls on a descriptor this loop owns and closes.
            unsafe {
                let fd = libc::socket(
                    libc::AF_INET,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                );
                ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
                let IpAddr::V4(ip) = vip.ip() else {
                    bail!("an IPv4 VIP")
                };
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: vip.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                first.get_or_insert_with(Instant::now);
                let rc = libc::connect(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                );
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                ensure!(
                    rc == 0 || err.raw_os_error() == Some(libc::EINPROGRESS),
                    "connect: {err}"
                );
            }
        }
        first.context("no SYN sent")
    })?
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn flash_sale_story_degrades_recommendation_and_inventory_and_keeps_checkout() -> Result<()> {
    // The field case's numbers, read from the file: the story follows it if it changes.
    let field = agent_common::policy::load_file(&flash_sale_file())
        .map_err(|e| anyhow::anyhow!("config/flash-sale.yaml: {e}"))?;
    let checkout = field_service(&field.services, "checkout")?;
    let recommendation = field_service(&field.services, "recommendation")?;
    let inventory = field_service(&field.services, "inventory")?;
    ensure!(
        checkout.priority == Priority::Core && checkout.degradation.is_none(),
        "the story expects checkout core and never degraded"
    );
    let strategy = |s: &Service| s.degradation.as_ref().map(|d| d.fallback.strategy);
    ensure!(
        strategy(recommendation) == Some(FallbackStrategy::StaticResponse)
            && strategy(inventory) == Some(FallbackStrategy::CacheOnly),
        "the story expects recommendation static_response and inventory cache_only"
    );
    let ConditionKind::Latency {
        threshold: rec_latency,
    } = *field_condition(recommendation, "latency")?
    else {
        bail!("recommendation's latency condition is not a latency");
    };
    let ConditionKind::ErrorRate {
        threshold: rec_errors,
    } = *field_condition(recommendation, "error_rate")?
    else {
        bail!("recommendation's error_rate condition is not an error rate");
    };
    let ConditionKind::Availability {
        threshold: inv_available,
    } = *field_condition(inventory, "availability")?
    else {
        bail!("inventory's availability condition is not an availability");
    };
    let limit = checkout
        .rate_limit
        .as_ref()
        .context("checkout has no rate_limit in config/flash-sale.yaml")?;
    // Offered loads a 2-CPU machine can exceed: the file's rate and burst divided by 10
    // (10,000/s burst 5,000 -> 1,000/s burst 500; burst/rate kept).
    let (rate, burst) = (limit.rate.per_second() / 10, limit.burst / 10);

    // Times scaled down through the policy: the file's windows and recover_after / 15
    // (30 s -> 2 s, 60 s -> 4 s, 2 m -> 8 s); probes of 1 s -> 200 ms where the latency
    // allows it.
    const WINDOW: Scaled = Scaled::secs(2);
    const REC_RECOVER: Scaled = Scaled::secs(4);
    const INV_RECOVER: Scaled = Scaled::secs(8);
    // A recommendation pool slower than the threshold, within the probes' timeout.
    let rec_threshold = Scaled::new(rec_latency);
    let rec_slow = rec_threshold + Scaled::millis(150);
    let rec_check = Check {
        kind: "http",
        interval: Scaled::millis(1000),
        timeout: rec_slow + Scaled::millis(200),
        rise: 2,
        fall: 3,
    };

    let mut lab = Lab::new()?;
    let (co_vip, rec_vip, inv_vip) = (lab.vip_on(443)?, lab.vip_on(443)?, lab.vip_on(8080)?);
    let co_pool = lab.servers_on(8443, &["checkout-1", "checkout-2", "checkout-3"])?;
    let rec_pool = lab.servers(&["recommendation-1", "recommendation-2"])?;
    let rec_static = lab.servers(&["recommendation-top-items"])?.remove(0);
    let mut inv_pool = lab.servers(&["inventory-1", "inventory-2", "inventory-3"])?;
    let inv_cache = lab.servers(&["inventory-cache"])?.remove(0);

    let rec = Svc {
        name: "recommendation".into(),
        vip: rec_vip,
        priority: "low",
        backends: addrs(&rec_pool),
        check: rec_check,
        conditions: vec![
            Cond::latency(rec_threshold, WINDOW),
            Cond {
                kind: "error_rate",
                threshold: rec_errors.to_string(),
                window: WINDOW,
            },
        ],
        strategy: "static_response",
        fallback: vec![rec_static.addr()],
        recover_after: REC_RECOVER,
    };
    let inv = Svc {
        name: "inventory".into(),
        vip: inv_vip,
        priority: "normal",
        backends: addrs(&inv_pool),
        check: Check::FAST_TCP,
        conditions: vec![Cond {
            kind: "availability",
            threshold: inv_available.to_string(),
            window: WINDOW,
        }],
        strategy: "cache_only",
        fallback: vec![inv_cache.addr()],
        recover_after: INV_RECOVER,
    };
    let co_backends: String = co_pool
        .iter()
        .map(|b| format!("      - address: \"{}\"\n", b.addr()))
        .collect();
    let inv_yaml = inv
        .yaml()
        .replace("algorithm: weighted_round_robin", "algorithm: least_conn")
        .replace(
            "    degradation:\n",
            "    circuit_breaker:\n      failure_threshold: 3\n      error_rate: 50%\n\
             \x20     min_requests: 20\n      window: 2s\n    degradation:\n",
        );
    let text = format!(
        "version: 1\n\
         agent:\n  listen: 127.0.0.1:9090\n\
         interfaces:\n  - name: {ifname}\n    xdp_mode: generic\n    direction: both\n\
         services:\n\
         \x20 - name: checkout\n    match: {{ address: \"{co_ip}/32\", port: {co_port}, protocol: tcp }}\n\
         \x20   priority: core\n\
         \x20   rate_limit:\n      key: {key}\n      rate: {rate}/s\n      burst: {burst}\n\
         \x20   backends:\n{co_backends}\
         \x20   load_balancing:\n      algorithm: maglev\n      vip: true\n      slow_start: 2s\n\
         \x20   health_check:\n      type: http\n      path: /healthz\n      expected_status: 200-299\n\
         \x20     interval: {co_interval}\n      unhealthy_interval: {co_interval}\n      timeout: {co_timeout}\n\
         \x20   circuit_breaker:\n      failure_threshold: 5\n      reset_timeout: 10s\n      on_open: reject\n\
         {rec}{inv}",
        ifname = lab.topo.client_if,
        co_ip = co_vip.ip(),
        co_port = co_vip.port(),
        key = limit.key,
        co_interval = Scaled::millis(500).yaml(),
        co_timeout = Scaled::millis(300).yaml(),
        rec = rec.yaml(),
        inv = inv_yaml,
    );
    lab.start(&text)?;
    let ns = &lab.topo.client;
    lab.wait_measured("recommendation")?;
    lab.wait_measured("inventory")?;
    let co_names = names(&co_pool);
    served_by(ns, co_vip, 3, &co_names, "the sale starts: checkout")?;
    served_by(
        ns,
        rec_vip,
        3,
        &names(&rec_pool),
        "the sale starts: recommendation",
    )?;
    served_by(
        ns,
        inv_vip,
        3,
        &names(&inv_pool),
        "the sale starts: inventory",
    )?;

    // The surge slows recommendation down: its static top items answer instead.
    let t = Instant::now();
    rec_pool.iter().for_each(|b| b.set_delay(rec_slow.get()));
    let (took, _) = lab.wait_service(
        "recommendation",
        "recommendation on its static fallback",
        t,
        WINDOW + DEGRADE_SLACK,
        |d| d.mode == "fallback",
    )?;
    println!("recommendation slow -> static fallback in {took:?}");
    served_by(
        ns,
        rec_vip,
        3,
        &[rec_static.name()],
        "recommendation degraded",
    )?;
    served_by(
        ns,
        co_vip,
        3,
        &co_names,
        "recommendation degraded: checkout",
    )?;

    // Two of three inventory backends fail: the cache answers.
    let t = Instant::now();
    inv_pool[0].stop();
    inv_pool[1].stop();
    let (took, _) = lab.wait_service(
        "inventory",
        "inventory on its cache fallback",
        t,
        Check::FAST_TCP.interval * Check::FAST_TCP.fall + WINDOW + DEGRADE_TICK + DEGRADE_SLACK,
        |d| d.mode == "fallback",
    )?;
    println!("inventory at 1/3 available -> cache fallback in {took:?}");
    served_by(ns, inv_vip, 3, &[inv_cache.name()], "inventory degraded")?;

    // Checkout: core, served, never shed, its limit held under a burst of new connections.
    let r = lab.status()?;
    let co = r
        .services
        .iter()
        .find(|s| s.name == "checkout")
        .context("checkout in /status")?;
    ensure!(
        co.degradation.is_none() && !r.shedding.shed.iter().any(|s| s == "checkout"),
        "checkout must be neither degraded nor shed: {:?} shedding {:?}",
        co.degradation,
        r.shedding
    );
    served_by(ns, co_vip, 3, &co_names, "both degraded: checkout")?;
    let before = limit_verdicts(&lab.agent().metrics()?, "checkout")?;
    let offered = (burst * 4) as usize;
    let first = syn_burst(ns, co_vip, offered)?;
    let after = limit_verdicts(&lab.agent().metrics()?, "checkout")?;
    let span = first.elapsed();
    let (passed, dropped) = (after.0 - before.0, after.1 - before.1);
    let allowed = burst as f64 + rate as f64 * span.as_secs_f64();
    println!(
        "checkout: {offered} SYNs offered in {span:?}: {passed} passed, {dropped} dropped by the \
         limit (burst {burst} + {rate}/s x span = {allowed:.0})"
    );
    ensure!(
        passed as f64 <= allowed * 1.03 && dropped > 0,
        "checkout's limit must hold: {passed} passed (at most burst + rate x span = \
         {allowed:.0}, +3%), {dropped} dropped (some must be)"
    );
    // The burst emptied the bucket: a SYN may be dropped, and its retransmission a second
    // later (inside the request's connect timeout) finds the bucket refilled.
    served_by(ns, co_vip, 1, &co_names, "after the burst: checkout")?;

    // Throughout, nothing was shed (no service of the story has strategy shed).
    let r = lab.status()?;
    ensure!(
        r.shedding.shed.is_empty() && r.shedding.level == "none",
        "nothing is shed in the story: {:?}",
        r.shedding
    );
    Ok(())
}
