//! Act 4, "degradation": the agent on the client's veth balances a VIP over a service's
//! backends, HTTP servers in the server namespace whose answer time can be switched; the
//! service has a fallback backend (a static answer) and a latency condition. Clients send
//! requests to the VIP all along and count who answered, and how fast. The backends slow
//! down: within one window of the condition the agent switches the service to its fallback
//! in the datapath, and new requests are answered by the fallback, fast. The backends become
//! fast again: the agent switches back only once the condition has been false for
//! `recover_after`, not before. Every number printed is measured (the clients' counts and
//! times, the agent's `/status`); a phase that misses its deadline fails the act.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    ops::ControlFlow,
    path::Path,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use agent_common::status::DegradationStatus;
use agent_tests::{
    AgentProcess, Netns, backend::served_by, slow::HttpBackend, status::StatusReport,
};
use anyhow::bail;

use super::{Client, Demo, check_addresses, clock, policy::Degradable, scene, since, stop_agent};

/// Where the clients connect from: an address of their own, not `CLIENT_ADDR` (the agent's
/// probes) nor act 3's shoppers' (both acts may run in one topology).
const CLIENTS_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
/// Client threads, each sending one request after the other every `REQUEST_EVERY`.
const CLIENT_THREADS: u32 = 4;
const REQUEST_EVERY: Duration = Duration::from_millis(100);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Seconds of normal service before the backends slow down, and seconds in fallback before
/// they are fast again.
const NORMAL_SECS: u64 = 3;
const FALLBACK_SECS: u64 = 3;
/// Rows served by the backends again before the act ends.
const AFTER_ROWS: u32 = 2;
/// How often the agent's status is read: the resolution of the timings shown.
const TICK: Duration = Duration::from_millis(100);
const TICKS_PER_SECOND: u32 = 10;
/// Probe, evaluator and scheduling slack on top of what the policy implies.
const SLACK: Duration = Duration::from_secs(1);
/// How long the agent may take to serve the first request through the VIP once ready.
const FIRST_ANSWER: Duration = Duration::from_secs(5);
/// The act gives up after this, whatever the phase.
const ACT_LIMIT: Duration = Duration::from_secs(60);

/// Reads the act's policy, says what it will show, and checks that the demo can place the VIP,
/// every backend and the fallback on an address of its own.
pub fn plan(config: &Path) -> anyhow::Result<Degradable> {
    let plan = Degradable::load(config)?;
    let list = |l: &[SocketAddrV4]| l.iter().map(ToString::to_string).collect::<Vec<_>>();
    println!(
        "demo: policy {}: service {} VIP {} -> {}, fallback ({}) {}; {}; recover_after {:?}; \
         probes every {:?} (timeout {:?}); agent on {} at http://{}",
        config.display(),
        plan.service,
        plan.vip,
        list(&plan.backends).join(" "),
        plan.strategy,
        list(&plan.fallback).join(" "),
        plan.conditions.join(", "),
        plan.recover_after,
        plan.interval,
        plan.timeout,
        plan.agent.interface,
        plan.agent.listen
    );
    let file = config.display();
    let all: Vec<SocketAddrV4> = plan
        .backends
        .iter()
        .chain(&plan.fallback)
        .copied()
        .collect();
    check_addresses(&file, plan.vip, &all, CLIENTS_ADDR)?;
    if plan.threshold >= plan.timeout {
        bail!(
            "{file}: service {}: the latency threshold {:?} must be below the probes' timeout \
             {:?}: the act slows the backends to between the two",
            plan.service,
            plan.threshold,
            plan.timeout
        );
    }
    Ok(plan)
}

/// How slow the backends become: halfway between the threshold and the probes' timeout, so
/// a probe is slow (above the threshold) and still succeeds (the backends stay healthy).
fn slow_answer(plan: &Degradable) -> Duration {
    (plan.threshold + plan.timeout) / 2
}

/// From the slowdown to the fallback: the next probe starts within an interval and takes the
/// slow answer; the evaluator acts at its next tick. Within one window of the condition.
fn flip_bound(plan: &Degradable) -> Duration {
    plan.window.max(plan.interval + slow_answer(plan)) + SLACK
}

/// From fast answers again to normal: the slow probes leave the window (at most a window
/// and a probe after the change), then `recover_after` with every condition false.
fn recover_bound(plan: &Degradable) -> Duration {
    plan.window + plan.interval + slow_answer(plan) + plan.recover_after + SLACK
}

pub fn run(demo: &Demo, plan: &Degradable, config: &Path) -> anyhow::Result<()> {
    println!("\ndemo: act 4: degradation, a fallback in the kernel");
    if demo.agent_bin.is_none() {
        println!(
            "demo: --no-agent: skipped; the VIP {} exists only in the agent's datapath",
            plan.vip
        );
        return Ok(());
    }
    let topology = &demo.topology;
    demo.route_vip(*plan.vip.ip(), CLIENTS_ADDR)?;
    let mut names: Vec<String> = (1..=plan.backends.len())
        .map(|i| format!("{}-{i}", plan.service))
        .collect();
    names.extend((1..=plan.fallback.len()).map(|i| format!("fallback-{i}")));
    let mut servers = Vec::new();
    for (&addr, name) in plan.backends.iter().chain(&plan.fallback).zip(&names) {
        topology.add_server_addr((*addr.ip()).into())?;
        servers.push(HttpBackend::start(&topology.server, addr.into(), name)?);
    }
    let mut agent = demo.start_agent(config, &topology.client, "degrade-")?;
    let tally = Tally::new(names.len());
    first_answer(&topology.client, plan.vip, &names)?;
    introduce(demo, plan, &names);
    let mut story = Story::new(plan, &names);
    let clients = (0..CLIENT_THREADS).map(|i| {
        let (client, names, tally) = (&topology.client, &names, &tally);
        Box::new(move |stop: &AtomicBool| requests(client, plan.vip, names, i, tally, stop))
            as Client<'_>
    });
    story.header();
    story.start = Instant::now();
    let backends = &servers[..plan.backends.len()];
    let ending = scene(TICK, clients.collect(), agent.as_mut(), |n, agent| {
        story.tick(n, agent, backends, &tally)
    })?;
    let verdict = match ending {
        Ending::Done => story.summary(),
        Ending::Missed(what) => {
            println!("\ndemo: act 4 failed: {what}");
            Err(what)
        }
    };
    stop_agent(agent)?;
    // The agent has let go of the interface; the servers go.
    drop(servers);
    if let Err(what) = verdict {
        bail!("act 4 (degradation): {what}");
    }
    Ok(())
}

/// Waits until a request through the VIP is answered (the agent's tables in place), and
/// shows it.
fn first_answer(ns: &Netns, vip: SocketAddrV4, names: &[String]) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let answer = ns.run(move || request(vip))?;
        if let Ok((text, _)) = &answer
            && served_by(text).is_some_and(|n| names.iter().any(|m| m == n))
        {
            return Ok(());
        }
        if start.elapsed() > FIRST_ANSWER {
            bail!("no answer through the VIP {vip} within {FIRST_ANSWER:?}: {answer:?}");
        }
        thread::sleep(TICK);
    }
}

fn introduce(demo: &Demo, plan: &Degradable, names: &[String]) {
    let n = plan.backends.len();
    println!(
        "demo: {} serves VIP {} from {} ({}); its fallback {} ({}) answers statically; \
         HTTP servers in {} that name themselves in their answers",
        plan.service,
        plan.vip,
        names[..n].join(", "),
        plan.backends
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        names[n..].join(", "),
        plan.fallback
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        demo.topology.server.name()
    );
    println!(
        "demo: clients in {} ({CLIENTS_ADDR}) send GET requests to the VIP ({CLIENT_THREADS} \
         threads, one request every {} ms each), each on a new connection",
        demo.topology.client.name(),
        REQUEST_EVERY.as_millis()
    );
    println!(
        "demo: script: {NORMAL_SECS} s normal; then {}'s backends answer after {:?} (above the \
         {:?} threshold, below the probes' {:?} timeout); {FALLBACK_SECS} s after the switch \
         they are fast again",
        plan.service,
        slow_answer(plan),
        plan.threshold,
        plan.timeout
    );
    println!(
        "demo: per second: requests answered by each server (median answer time), failed \
         requests, the service's mode and its latency measure (agent status)\n"
    );
}

// ---------------------------------------------------------------------------------------
// The clients.

/// One request through the VIP on a new connection: the answer and how long it took.
fn request(vip: SocketAddrV4) -> std::io::Result<(String, Duration)> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&vip.into(), REQUEST_TIMEOUT)?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok((answer, t.elapsed()))
}

/// One client thread: enters the client namespace, then sends a request every
/// `REQUEST_EVERY`, staggered by `index`, until `stop`.
fn requests(
    ns: &Netns,
    vip: SocketAddrV4,
    names: &[String],
    index: u32,
    tally: &Tally,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    ns.enter()?;
    let mut next = Instant::now() + REQUEST_EVERY * index / CLIENT_THREADS;
    while !stop.load(Ordering::Relaxed) {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait.min(TICK));
            continue;
        }
        let at = Instant::now();
        match request(vip) {
            Ok((answer, took)) => {
                let who = served_by(&answer).and_then(|n| names.iter().position(|m| m == n));
                let body = answer.lines().last().unwrap_or("").to_owned();
                tally.record(who, at, took, body);
            }
            Err(_) => tally.record(None, at, at.elapsed(), String::new()),
        }
        while next <= Instant::now() {
            next += REQUEST_EVERY;
        }
    }
    Ok(())
}

/// What the clients saw, per server: answers and their times, and the first answer (when
/// its request started, and the last line of its body); failures.
struct Tally(Mutex<Seen>);

#[derive(Clone, Default)]
struct Seen {
    /// Per server: answer times.
    times: Vec<Vec<Duration>>,
    failed: u64,
    /// Per server: the first answer since the last [`Tally::take`].
    first: Vec<Option<(Instant, String)>>,
}

impl Tally {
    fn new(servers: usize) -> Self {
        Self(Mutex::new(Seen {
            times: vec![Vec::new(); servers],
            failed: 0,
            first: vec![None; servers],
        }))
    }

    fn record(&self, who: Option<usize>, at: Instant, took: Duration, body: String) {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match who {
            Some(i) => {
                seen.times[i].push(took);
                if seen.first[i].is_none() {
                    seen.first[i] = Some((at, body));
                }
            }
            None => seen.failed += 1,
        }
    }

    /// What was seen since the last call; it all starts again.
    fn take(&self) -> Seen {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = seen.times.len();
        std::mem::replace(
            &mut *seen,
            Seen {
                times: vec![Vec::new(); n],
                failed: 0,
                first: vec![None; n],
            },
        )
    }
}

fn median(times: &[Duration]) -> Option<Duration> {
    let mut t = times.to_vec();
    t.sort();
    t.get(t.len() / 2).copied()
}

// ---------------------------------------------------------------------------------------
// The story.

/// How the story ended.
enum Ending {
    Done,
    /// A phase did not happen within its deadline: what.
    Missed(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Normal,
    /// The backends are slow; the service is not in fallback yet.
    Slow,
    /// In fallback (the agent said so).
    Fallback,
    /// The backends are fast again; the service is still in fallback.
    Restored,
    /// Back to normal.
    Recovered,
}

/// One row's numbers, for the summary.
struct Row {
    phase: Phase,
    /// Answers per server.
    served: Vec<u64>,
    failed: u64,
}

struct Story<'a> {
    plan: &'a Degradable,
    names: &'a [String],
    phase: Phase,
    start: Instant,
    slowed_at: Option<Instant>,
    flipped_at: Option<Instant>,
    /// The first answer of a fallback server after the switch, and what it said.
    first_fallback: Option<(Instant, String)>,
    restored_at: Option<Instant>,
    /// The first status read after the restore with every condition false.
    cleared_at: Option<Instant>,
    recovered_at: Option<Instant>,
    /// The agent's `clear_for_seconds` at the last read before it switched back.
    clear_for: f64,
    first_backend_again: Option<Instant>,
    cause: Option<String>,
    recover_cause: Option<String>,
    /// The latest degradation status.
    status: Option<DegradationStatus>,
    after_rows: u32,
    rows: Vec<Row>,
    /// The phase when the current row began.
    row_began: Phase,
    /// The slowdown waited for the service to be normal first.
    waited: bool,
    /// Every answer time by phase: (backends, fallback).
    slow_times: Vec<Duration>,
    fallback_times: Vec<Duration>,
}

impl<'a> Story<'a> {
    fn new(plan: &'a Degradable, names: &'a [String]) -> Self {
        Self {
            plan,
            names,
            phase: Phase::Normal,
            start: Instant::now(),
            slowed_at: None,
            flipped_at: None,
            first_fallback: None,
            restored_at: None,
            cleared_at: None,
            recovered_at: None,
            clear_for: 0.0,
            first_backend_again: None,
            cause: None,
            recover_cause: None,
            status: None,
            after_rows: 0,
            rows: Vec::new(),
            row_began: Phase::Normal,
            waited: false,
            slow_times: Vec::new(),
            fallback_times: Vec::new(),
        }
    }

    fn is_fallback(&self, server: usize) -> bool {
        server >= self.plan.backends.len()
    }

    fn header(&self) {
        let mut columns = String::new();
        for name in self.names {
            let _ = write!(columns, "  {name:>18}");
        }
        println!(
            "{:>5}{columns}  {:>6}  {:<8}  latency p99 (threshold {:?})",
            "time", "failed", "mode", self.plan.threshold
        );
    }

    /// Every tick: the agent's status and the clients' first answers; every second: the row,
    /// then the script.
    fn tick(
        &mut self,
        n: u32,
        agent: Option<&AgentProcess>,
        backends: &[HttpBackend],
        tally: &Tally,
    ) -> anyhow::Result<ControlFlow<Ending>> {
        if let Some(agent) = agent {
            self.read_status(&agent.status()?);
        }
        if n.is_multiple_of(TICKS_PER_SECOND) {
            let second = u64::from(n / TICKS_PER_SECOND);
            self.row(second, tally);
            let over = self.step(second, backends);
            self.row_began = self.phase;
            if over {
                return Ok(ControlFlow::Break(Ending::Done));
            }
        }
        Ok(match self.missed() {
            Some(missed) => ControlFlow::Break(Ending::Missed(missed)),
            None => ControlFlow::Continue(()),
        })
    }

    fn read_status(&mut self, report: &StatusReport) {
        let Some(d) = report
            .services
            .iter()
            .find(|s| s.name == self.plan.service)
            .and_then(|s| s.degradation.clone())
        else {
            return;
        };
        let was = self.status.as_ref().map(|s| s.mode.clone());
        if was.as_deref() != Some(d.mode.as_str()) {
            let cause = d.cause.clone().unwrap_or_default();
            if was.is_some() {
                println!(
                    "  {}  mode {} -> {} ({cause})",
                    clock(self.start),
                    was.as_deref().unwrap_or("?"),
                    d.mode
                );
            }
            match (self.phase, d.mode.as_str()) {
                (Phase::Slow, "fallback") => {
                    self.flipped_at = Some(Instant::now());
                    self.cause = Some(cause);
                    self.phase = Phase::Fallback;
                }
                (Phase::Restored, "normal") => {
                    self.recovered_at = Some(Instant::now());
                    self.recover_cause = Some(cause);
                    self.phase = Phase::Recovered;
                }
                _ => {}
            }
        }
        if self.phase == Phase::Restored {
            if d.conditions.iter().all(|c| !c.met) && self.cleared_at.is_none() {
                self.cleared_at = Some(Instant::now());
                println!("  {}  every condition false", clock(self.start));
            }
            self.clear_for = d.clear_for_seconds;
        }
        self.status = Some(d);
    }

    /// `fallback`, and the latency measure (`-` without a sample).
    fn mode_and_measure(&self) -> (String, String) {
        let Some(d) = &self.status else {
            return ("-".into(), "-".into());
        };
        let latency = d
            .conditions
            .iter()
            .find(|c| c.r#type == "latency")
            .and_then(|c| c.value)
            .map_or("-".into(), |v| format!("{:.0} ms", v * 1e3));
        (d.mode.clone(), latency)
    }

    fn row(&mut self, second: u64, tally: &Tally) {
        let seen = tally.take();
        let mut line = format!("{:>5}", format!("{second}s"));
        for (i, times) in seen.times.iter().enumerate() {
            let cell = median(times).map_or_else(
                || "0".into(),
                |m| format!("{} ({:.0} ms)", times.len(), m.as_secs_f64() * 1e3),
            );
            let _ = write!(line, "  {cell:>18}");
            if self.is_fallback(i) {
                if matches!(self.phase, Phase::Fallback | Phase::Restored) {
                    self.fallback_times.extend(times);
                }
                if self.first_fallback.is_none()
                    && let Some((at, body)) = &seen.first[i]
                {
                    self.first_fallback = Some((*at, body.clone()));
                }
            } else if self.row_began == Phase::Slow {
                // Answers of a row that began slow, the switch in it or not: all slow.
                self.slow_times.extend(times);
            }
        }
        let (mode, latency) = self.mode_and_measure();
        let _ = write!(line, "  {:>6}  {mode:<8}  {latency}", seen.failed);
        println!("{line}");
        let n = self.plan.backends.len();
        if self.phase == Phase::Recovered
            && self.first_backend_again.is_none()
            && seen.times[..n].iter().any(|t| !t.is_empty())
        {
            self.first_backend_again = Some(Instant::now());
        }
        self.rows.push(Row {
            phase: self.phase,
            served: seen.times.iter().map(|t| t.len() as u64).collect(),
            failed: seen.failed,
        });
    }

    /// What happens at the end of `second`, after its row; `true` when the act is over.
    fn step(&mut self, second: u64, backends: &[HttpBackend]) -> bool {
        match self.phase {
            Phase::Normal if second >= NORMAL_SECS => {
                // On a loaded machine a probe can be late enough to degrade the service by
                // itself: the slowdown waits until the service is normal, and says so.
                let mode = self.status.as_ref().map(|d| d.mode.as_str());
                if mode != Some("normal") {
                    if !self.waited {
                        self.waited = true;
                        println!(
                            "  {}  {} is {} before any slowdown (machine load: a late probe); \
                             the act waits for it to be normal",
                            clock(self.start),
                            self.plan.service,
                            mode.unwrap_or("not evaluated yet")
                        );
                    }
                    return false;
                }
                for b in backends {
                    b.set_delay(slow_answer(self.plan));
                }
                self.slowed_at = Some(Instant::now());
                self.phase = Phase::Slow;
                println!(
                    "  {}  {}'s backends now answer after {:?}",
                    clock(self.start),
                    self.plan.service,
                    slow_answer(self.plan)
                );
            }
            Phase::Fallback
                if self
                    .flipped_at
                    .is_some_and(|t| t.elapsed() >= Duration::from_secs(FALLBACK_SECS)) =>
            {
                for b in backends {
                    b.set_delay(Duration::ZERO);
                }
                self.restored_at = Some(Instant::now());
                self.phase = Phase::Restored;
                println!(
                    "  {}  {}'s backends answer at once again",
                    clock(self.start),
                    self.plan.service
                );
            }
            Phase::Recovered => {
                self.after_rows += 1;
                return self.after_rows > AFTER_ROWS;
            }
            _ => {}
        }
        false
    }

    /// A phase past its deadline: what was missed.
    fn missed(&self) -> Option<String> {
        if self.start.elapsed() > ACT_LIMIT {
            return Some(format!("the act did not end within {ACT_LIMIT:?}"));
        }
        match self.phase {
            Phase::Slow => {
                let bound = flip_bound(self.plan);
                let late = self.slowed_at.is_some_and(|t| t.elapsed() > bound);
                late.then(|| {
                    format!(
                        "the service did not switch to its fallback within {bound:?} of the \
                         slowdown (window {:?})",
                        self.plan.window
                    )
                })
            }
            Phase::Restored => {
                let bound = recover_bound(self.plan);
                let late = self.restored_at.is_some_and(|t| t.elapsed() > bound);
                late.then(|| {
                    let (mode, latency) = self.mode_and_measure();
                    let clear = self.status.as_ref().map_or(0.0, |d| d.clear_for_seconds);
                    format!(
                        "the service did not recover within {bound:?} of fast answers again \
                         (still {mode}, latency {latency}, conditions false for {clear:.1} s \
                         of recover_after {:?})",
                        self.plan.recover_after
                    )
                })
            }
            _ => None,
        }
    }

    /// The act in a few lines, from what was measured; `Err` when the service came back
    /// before its conditions had been false for `recover_after`, or the clients never saw the
    /// fallback answer.
    fn summary(&self) -> Result<(), String> {
        println!("\ndemo: the act, measured");
        let n = self.plan.backends.len();
        let (Some(slowed), Some(flipped), Some(restored), Some(recovered)) = (
            self.slowed_at,
            self.flipped_at,
            self.restored_at,
            self.recovered_at,
        ) else {
            return Err("the act ended before the service recovered".into());
        };
        println!(
            "demo:   slowed down: fallback {} later (window {:?}, bound {:?}): {}",
            since(slowed, flipped),
            self.plan.window,
            flip_bound(self.plan),
            self.cause.as_deref().unwrap_or("-")
        );
        let ms = |t: &[Duration]| {
            median(t).map_or("-".into(), |m| format!("{:.1} ms", m.as_secs_f64() * 1e3))
        };
        let (slow, fast) = (ms(&self.slow_times), ms(&self.fallback_times));
        println!(
            "demo:   answers: {} from the slow backends before the switch (median {slow}), {} \
             from the fallback (median {fast})",
            self.slow_times.len(),
            self.fallback_times.len()
        );
        let Some((at, body)) = &self.first_fallback else {
            return Err("no client saw an answer of the fallback".into());
        };
        println!(
            "demo:   the clients' first fallback answer (a request started {} after the \
             slowdown): \"{}\"",
            since(slowed, *at),
            body.trim()
        );
        let in_fallback: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| matches!(r.phase, Phase::Fallback | Phase::Restored))
            .collect();
        let to_backends: u64 = in_fallback
            .iter()
            .map(|r| r.served[..n].iter().sum::<u64>())
            .sum();
        let to_fallback: u64 = in_fallback
            .iter()
            .map(|r| r.served[n..].iter().sum::<u64>())
            .sum();
        println!(
            "demo:   while in fallback ({} s): {to_fallback} answers from the fallback, \
             {to_backends} from the backends (requests already on their way at the switch)",
            in_fallback.len()
        );
        let cleared = self.cleared_at.map_or_else(
            || "-".into(),
            |c| format!("every condition false {} later, ", since(restored, c)),
        );
        println!(
            "demo:   fast again: {cleared}normal {} later; the agent had seen the conditions \
             false for {:.1} s (recover_after {:?}): {}",
            since(restored, recovered),
            self.clear_for,
            self.plan.recover_after,
            self.recover_cause.as_deref().unwrap_or("-")
        );
        if let Some(back) = self.first_backend_again {
            println!(
                "demo:   the backends answered again within {} of the switch back",
                since(recovered, back)
            );
        }
        let failed: u64 = self.rows.iter().map(|r| r.failed).sum();
        println!("demo:   failed requests in all: {failed}");
        // The agent's own clock of the clearing, read at most a tick before it switched back.
        let early =
            self.clear_for + (TICK * 3).as_secs_f64() < self.plan.recover_after.as_secs_f64();
        let seen_early = self.cleared_at.is_some_and(|c| {
            recovered.saturating_duration_since(c) + TICK * 2 < self.plan.recover_after
        });
        if early || seen_early {
            return Err(format!(
                "the service recovered before its conditions had been false for recover_after \
                 {:?} (the agent: {:.1} s)",
                self.plan.recover_after, self.clear_for
            ));
        }
        Ok(())
    }
}
