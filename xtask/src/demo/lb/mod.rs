//! Act 3, "flash sale": the agent on the client's veth balances a VIP over backends in the
//! server namespace, in the kernel (TC egress rewrites the clients' packets toward a backend,
//! XDP ingress rewrites the answers back to the VIP). Shoppers open short TCP connections to the
//! VIP, first at the usual rate, then at 10x when the sale opens; every backend answers with its
//! name, so the clients count who served them. One backend dies (its listener closed): its
//! breaker opens, its weight drops to 0 and failed connects stop. Restarted, its breaker goes
//! half-open, then closed, and its weight ramps back over `slow_start`. Every number printed is
//! measured: the clients' counts, the agent's /metrics, the times between events. A phase that
//! does not happen within its deadline fails the act.

mod clients;

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    ops::ControlFlow,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use agent_tests::{AgentProcess, Netns, Scaled, backend::TcpServer, wait};
use anyhow::bail;

use self::clients::{Counts, Tally, WORKERS};
use super::{
    Client, Demo,
    breaker::{close_bound, open_bound, saturating_u32},
    check_addresses, clock,
    policy::{Balanced, Guarded},
    scene, since, stop_agent,
    watch::{Event, Transition, Watch},
};

/// Where the shoppers connect from: an address of their own on the client's veth, not
/// `CLIENT_ADDR`, which the agent's probes to the backends leave from. The datapath keys its
/// reverse-NAT entries by the 5-tuple and keeps them after their flow closed (until LRU
/// eviction); a probe that happened to reuse the client port of an earlier VIP connection to
/// the same backend would have its SYN-ACK rewritten to come from the VIP, and time out.
const SHOPPERS_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// Connections per second before the sale, and the surge when it opens.
const USUAL_RATE: u64 = 40;
const SURGE_FACTOR: u64 = 10;
/// Seconds at the usual rate, then seconds of the sale with every backend healthy.
const USUAL_SECS: u64 = 1;
const SALE_SECS: u64 = 3;
/// How often the agent is read: the resolution of the timings shown.
const TICK: Duration = Duration::from_millis(100);
const TICKS_PER_SECOND: u32 = 10;
/// Scrape, balancer and scheduling slack on top of what the policy implies.
const SLACK: Duration = Duration::from_secs(1);
/// Rows at full weight again, after the ramp, before the act ends.
const FULL_ROWS: u32 = 2;
/// Largest gap, in percentage points, between a backend's share of the connections and its
/// share of the weights, over the rows the act checks (a few hundred connections each).
const SHARE_TOLERANCE: f64 = 0.10;
/// How long the agent may take to publish the configured weights once ready.
const WEIGHTS_TIMEOUT: Scaled = Scaled::secs(5);
/// The act gives up after this, whatever the phase.
const ACT_LIMIT: Duration = Duration::from_secs(50);

/// The act's policy: the guarded service (as act 2 reads it) and its balancing.
pub type LbPlan = (Guarded, Balanced);

/// Reads the act's policy, says what it will show, and checks that the demo can place the VIP
/// and every backend on an address of its own.
pub fn plan(config: &Path) -> anyhow::Result<LbPlan> {
    let (g, lb) = (Guarded::load(config)?, Balanced::load(config)?);
    let backends: Vec<String> = (g.backends.iter().zip(&lb.weights))
        .map(|(b, w)| format!("{b} (weight {w})"))
        .collect();
    println!(
        "demo: policy {}: service {} VIP {} -> {}, {}, slow_start {:?}; probes every {:?} \
         (timeout {:?}), breaker opens after {} failures, reset_timeout {:?}; agent on {} at \
         http://{}",
        config.display(),
        g.service,
        lb.vip,
        backends.join(" "),
        lb.algorithm,
        lb.slow_start,
        g.interval,
        g.timeout,
        g.failure_threshold,
        g.reset_timeout,
        g.agent.interface,
        g.agent.listen
    );
    let file = config.display();
    check_addresses(&file, lb.vip, &g.backends, SHOPPERS_ADDR)?;
    if g.backends.len() < 2 {
        bail!(
            "{file}: service {}: the act needs at least 2 backends (one dies, the others serve)",
            g.service
        );
    }
    Ok((g, lb))
}

pub fn run(demo: &Demo, plan: &LbPlan, config: &Path) -> anyhow::Result<()> {
    println!("\ndemo: act 3: flash sale, balanced in the kernel");
    let (g, lb) = plan;
    if demo.agent_bin.is_none() {
        println!(
            "demo: --no-agent: skipped; the VIP {} exists only in the agent's datapath",
            lb.vip
        );
        return Ok(());
    }
    let topology = &demo.topology;
    demo.route_vip(*lb.vip.ip(), SHOPPERS_ADDR)?;
    let names: Vec<String> = (1..=g.backends.len()).map(|i| format!("web-{i}")).collect();
    let mut servers = Vec::new();
    for (&addr, name) in g.backends.iter().zip(&names) {
        topology.add_server_addr((*addr.ip()).into())?;
        servers.push(TcpServer::start_named(&topology.server, addr.into(), name)?);
    }
    let mut agent = demo.start_agent(config, &topology.client, "lb-")?;
    let mut watch = Watch::new(agent.as_ref(), &g.service, &g.backends);
    wait_for_weights(&mut watch, agent.as_ref(), lb)?;
    introduce(demo, plan, &names);
    let tally = Tally::new(names.len());
    let mut story = Story::new(plan, &names);
    let rate = AtomicU64::new(USUAL_RATE);
    let mut stage = Stage {
        server_ns: &topology.server,
        servers: &mut servers,
        rate: &rate,
        tally: &tally,
    };
    let shoppers = (0..WORKERS).map(|i| {
        let (client, names, rate, tally) = (&topology.client, &names, &rate, &tally);
        Box::new(move |stop: &_| clients::run(client, lb.vip, names, i, rate, tally, stop))
            as Client<'_>
    });
    story.header();
    story.counts_at_row = tally.counts();
    story.start = Instant::now();
    let ending = scene(TICK, shoppers.collect(), agent.as_mut(), |n, agent| {
        story.tick(n, agent, &mut stage, &mut watch)
    })?;
    let verdict = match ending {
        Ending::Done => story.summary(&tally),
        Ending::Missed(what) => {
            println!("\ndemo: act 3 failed: {what}");
            Err(what)
        }
    };
    drop(watch);
    stop_agent(agent)?;
    // The agent has let go of the interface; the servers go.
    drop(servers);
    if let Err(what) = verdict {
        bail!("act 3 (flash sale): {what}");
    }
    Ok(())
}

/// Waits until the agent's datapath holds every backend at its configured weight: the starting
/// point of the story.
fn wait_for_weights(
    watch: &mut Watch,
    agent: Option<&AgentProcess>,
    plan: &Balanced,
) -> anyhow::Result<()> {
    let configured =
        |watch: &Watch| (0..plan.weights.len()).all(|i| watch.weight(i) == Some(plan.weights[i]));
    let sample = || {
        watch.poll(agent);
        configured(watch)
    };
    match wait::poll(Instant::now(), WEIGHTS_TIMEOUT, TICK, sample, |all| *all) {
        Ok(_) => Ok(()),
        Err(_) => bail!(
            "the agent did not publish the configured weights {:?} within {WEIGHTS_TIMEOUT}",
            plan.weights
        ),
    }
}

fn introduce(demo: &Demo, (g, lb): &LbPlan, names: &[String]) {
    let shares = lb.shares();
    let backends: Vec<String> = names
        .iter()
        .zip(&g.backends)
        .zip(lb.weights.iter().zip(&shares))
        .map(|((name, addr), (weight, share))| {
            format!("{name} {addr} (weight {weight}, {:.0}%)", share * 100.0)
        })
        .collect();
    println!(
        "demo: {} serves VIP {}: {}",
        g.service,
        lb.vip,
        backends.join(", ")
    );
    println!(
        "demo: shoppers in {} ({SHOPPERS_ADDR}) open short TCP connections to the VIP \
         ({WORKERS} threads); each backend in {} answers with its name, so the shoppers count \
         who served them",
        demo.topology.client.name(),
        demo.topology.server.name()
    );
    let victim = names.last().map_or("", String::as_str);
    println!(
        "demo: script: {USUAL_SECS} s at the usual {USUAL_RATE}/s, then the sale: {}/s \
         ({SURGE_FACTOR}x); {SALE_SECS} s later {victim}'s server dies (listener closed); once \
         its breaker has been open for half its reset_timeout ({:.1} s), it is restarted",
        USUAL_RATE * SURGE_FACTOR,
        (g.reset_timeout / 2).as_secs_f64()
    );
    println!(
        "demo: per second: connections started; per backend, connections it served (the \
         shoppers' count) and its effective weight (agent status); failed connections; \
         breakers not closed\n"
    );
}

/// How the story ended.
enum Ending {
    Done,
    /// A phase did not happen within its deadline: what.
    Missed(String),
}

/// What the story acts on.
struct Stage<'a> {
    server_ns: &'a Netns,
    /// Each backend's server; `None` while dead.
    servers: &'a mut Vec<TcpServer>,
    rate: &'a AtomicU64,
    tally: &'a Tally,
}

/// Where the story is; each row is tagged with it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Usual,
    /// The surge, every backend healthy.
    Sale,
    /// From the death of the victim to its restart.
    Failover,
    /// From the restart until the victim is back at full weight.
    Recovery,
    /// At full weight again.
    Full,
}

/// One row: what happened in one second.
struct Row {
    phase: Phase,
    /// Whether the victim's weight was 0 all through the row (it reached 0 before the row
    /// began and was still 0 at its end).
    drained: bool,
    counts: Counts,
}

/// The act's timeline, and what it measured.
struct Story<'a> {
    g: &'a Guarded,
    lb: &'a Balanced,
    names: &'a [String],
    /// The backend that dies: the last one.
    victim: usize,
    phase: Phase,
    start: Instant,
    killed_at: Option<Instant>,
    opened_at: Option<Instant>,
    drained_at: Option<Instant>,
    /// End of the first row without a failed connection after the drain.
    quiet_at: Option<Instant>,
    restored_at: Option<Instant>,
    half_open_at: Option<Instant>,
    closed_at: Option<Instant>,
    /// When the victim's weight came back, step by step, after the restart.
    ramp: Vec<(Instant, u32)>,
    full_at: Option<Instant>,
    full_rows: u32,
    rows: Vec<Row>,
    counts_at_row: Counts,
}

impl<'a> Story<'a> {
    fn new((g, lb): &'a LbPlan, names: &'a [String]) -> Self {
        Self {
            g,
            lb,
            names,
            victim: names.len() - 1,
            phase: Phase::Usual,
            start: Instant::now(),
            killed_at: None,
            opened_at: None,
            drained_at: None,
            quiet_at: None,
            restored_at: None,
            half_open_at: None,
            closed_at: None,
            ramp: Vec::new(),
            full_at: None,
            full_rows: 0,
            rows: Vec::new(),
            counts_at_row: Counts::default(),
        }
    }

    /// Every tick: the agent's changes, and whether a phase is late; every second: the row,
    /// then the script.
    fn tick(
        &mut self,
        n: u32,
        agent: Option<&AgentProcess>,
        stage: &mut Stage<'_>,
        watch: &mut Watch,
    ) -> anyhow::Result<ControlFlow<Ending>> {
        for event in watch.poll(agent) {
            self.event(&event, watch);
        }
        if n.is_multiple_of(TICKS_PER_SECOND) {
            let second = u64::from(n / TICKS_PER_SECOND);
            self.row(second, stage.tally, watch);
            if self.step(second, stage, watch)?.is_break() {
                return Ok(ControlFlow::Break(Ending::Done));
            }
        }
        Ok(match self.missed() {
            Some(missed) => ControlFlow::Break(Ending::Missed(missed)),
            None => ControlFlow::Continue(()),
        })
    }

    fn header(&self) {
        let mut names = String::new();
        let mut columns = String::new();
        for name in self.names {
            let _ = write!(names, "  {name:<13}");
            let _ = write!(columns, "  {:>6} {:>6}", "served", "weight");
        }
        println!(
            "{:>5} {:>6}{names}  {:>6}  breakers",
            "time", "conns", "failed"
        );
        println!("{:>5} {:>6}{columns}", "", "");
    }

    /// The row of `second`: connections started, each backend's served count and weight, the
    /// failed connections, breakers not closed.
    fn row(&mut self, second: u64, tally: &Tally, watch: &Watch) {
        let now = tally.counts();
        let counts = now.since(&self.counts_at_row);
        self.counts_at_row = now;
        let mut line = format!("{:>5} {:>6}", format!("{second}s"), counts.started);
        let mut breakers = Vec::new();
        for (i, name) in self.names.iter().enumerate() {
            let weight = watch.weight(i).map_or("-".into(), |w| w.to_string());
            let served = counts.served.get(i).copied().unwrap_or(0);
            let _ = write!(line, "  {served:>6} {weight:>6}");
            match watch.state(i) {
                Some("closed") => {}
                state => breakers.push(format!("{name} {}", state.unwrap_or("?"))),
            }
        }
        let _ = write!(line, "  {:>6}  {}", counts.failed(), breakers.join(", "));
        println!("{}", line.trim_end());
        // The row began a second ago: drained before that, or not.
        let began = Instant::now() - TICK * TICKS_PER_SECOND;
        self.rows.push(Row {
            phase: self.phase,
            drained: self.drained_at.is_some_and(|t| t <= began)
                && watch.weight(self.victim) == Some(0),
            counts,
        });
    }

    /// What happens at the end of `second`, after its row.
    fn step(
        &mut self,
        second: u64,
        stage: &mut Stage<'_>,
        watch: &Watch,
    ) -> anyhow::Result<ControlFlow<()>> {
        match self.phase {
            Phase::Usual if second >= USUAL_SECS => {
                let surge = USUAL_RATE * SURGE_FACTOR;
                stage.rate.store(surge, Ordering::Relaxed);
                self.phase = Phase::Sale;
                println!(
                    "demo: {} the sale opens: {surge} connections/s, {SURGE_FACTOR}x the usual",
                    clock(self.start)
                );
            }
            Phase::Sale if second >= USUAL_SECS + SALE_SECS => {
                // Timed from before: connections are refused from the moment the listener
                // closes, before `stop` returns.
                self.killed_at = Some(Instant::now());
                stage.servers[self.victim].stop();
                self.phase = Phase::Failover;
                println!(
                    "demo: {} {} ({}) dies: its listener is closed, connections to it are \
                     refused",
                    clock(self.start),
                    self.names[self.victim],
                    self.g.backends[self.victim]
                );
            }
            Phase::Failover => {
                let row = self.rows.last();
                if self.quiet_at.is_none()
                    && row.is_some_and(|r| r.drained && r.counts.failed() == 0)
                {
                    self.quiet_at = Some(Instant::now());
                }
                let open_long_enough = self
                    .opened_at
                    .is_some_and(|t| t.elapsed() >= self.g.reset_timeout / 2);
                if self.quiet_at.is_some() && open_long_enough {
                    let (name, addr) = (&self.names[self.victim], self.g.backends[self.victim]);
                    stage.servers[self.victim] =
                        TcpServer::start_named(stage.server_ns, addr.into(), name)?;
                    self.restored_at = Some(Instant::now());
                    self.phase = Phase::Recovery;
                    println!(
                        "demo: {} {} restarted: listening again; its breaker stays open until \
                         its reset_timeout ({:?}) has passed",
                        clock(self.start),
                        name,
                        self.g.reset_timeout
                    );
                }
            }
            Phase::Recovery => {
                if self.closed_at.is_some() && self.at_full_weight(watch) {
                    self.phase = Phase::Full;
                }
            }
            Phase::Full => {
                self.full_rows += 1;
                if self.full_rows >= FULL_ROWS {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Phase::Usual | Phase::Sale => {}
        }
        Ok(ControlFlow::Continue(()))
    }

    fn at_full_weight(&self, watch: &Watch) -> bool {
        watch.state(self.victim) == Some("closed")
            && watch.weight(self.victim) == Some(self.lb.weights[self.victim])
    }

    /// Prints a change the agent made, timed against the event it follows from, and records
    /// the victim's.
    fn event(&mut self, event: &Event, watch: &Watch) {
        match event {
            Event::Breaker(t) => self.transition(t),
            &Event::Weight { backend, from, to } => self.weight(backend, from, to, watch),
        }
    }

    fn transition(&mut self, t: &Transition) {
        let now = Instant::now();
        let victim = t.backend == self.victim;
        let reason = t.reason.map_or_else(String::new, |r| format!(" ({r})"));
        let why = match (t.from, t.to) {
            ("closed", "open") if victim && self.opened_at.is_none() => {
                self.opened_at = Some(now);
                self.killed_at.map(|k| {
                    format!(
                        "{} after its death (by probes alone: within {:.1} s); the datapath \
                         skips it from now on",
                        since(k, now),
                        open_bound(self.g).as_secs_f64()
                    )
                })
            }
            ("open", "half_open") if victim && self.restored_at.is_some() => {
                self.half_open_at.get_or_insert(now);
                self.opened_at.map(|o| {
                    format!(
                        "{} after it opened; up to {} trial flows may pass",
                        since(o, now),
                        self.g.half_open_max_flows
                    )
                })
            }
            ("half_open", "closed") if victim && self.restored_at.is_some() => {
                self.closed_at.get_or_insert(now);
                self.restored_at.map(|r| {
                    format!(
                        "{} after the restart; the slow-start ramp begins",
                        since(r, now)
                    )
                })
            }
            ("half_open", "open") => Some("the trial failed, refused again".into()),
            _ => None,
        };
        let why = why.map_or_else(String::new, |why| format!(": {why}"));
        println!(
            "demo: {} {} breaker {} -> {}{reason}{why}",
            clock(self.start),
            self.names[t.backend],
            t.from,
            t.to
        );
    }

    fn weight(&mut self, backend: usize, from: Option<u32>, to: u32, watch: &Watch) {
        let Some(from) = from else {
            return; // the first reading
        };
        let now = Instant::now();
        let configured = self.lb.weights[backend];
        let victim = backend == self.victim;
        if victim && to == 0 && self.killed_at.is_some() && self.drained_at.is_none() {
            self.drained_at = Some(now);
        }
        if victim && self.restored_at.is_some() {
            self.ramp.push((now, to));
            if to == configured && self.closed_at.is_some() {
                self.full_at.get_or_insert(now);
            }
        }
        let why = if to == 0 {
            let after = self
                .killed_at
                .filter(|_| victim)
                .map_or_else(String::new, |k| {
                    format!(", {} after its death", since(k, now))
                });
            format!("drained: new flows go to the others{after}")
        } else if watch.state(backend) == Some("half_open") {
            "half-open: a trickle of trial flows".into()
        } else if to < configured {
            format!("slow start: {to} of {configured}")
        } else {
            let after = self
                .closed_at
                .filter(|_| victim)
                .map_or_else(String::new, |c| {
                    format!(", {} after its breaker closed", since(c, now))
                });
            format!("full weight{after}")
        };
        println!(
            "demo: {} {} weight {from} -> {to} ({why})",
            clock(self.start),
            self.names[backend]
        );
    }

    /// The phase that is late, if one is: what did not happen, and within what.
    fn missed(&self) -> Option<String> {
        let now = Instant::now();
        let late = |since: Option<Instant>, done: Option<Instant>, limit: Duration| {
            since.is_some_and(|t| done.is_none() && now - t > limit)
        };
        let victim = &self.names[self.victim];
        let open_limit = open_bound(self.g) + SLACK;
        let drain_limit = open_limit + SLACK;
        // Two full rows after the drain, and the one the drain happened in.
        let quiet_limit = SLACK * 3;
        let close_limit = close_bound(self.g) + SLACK;
        // The ramp starts once the backend is also healthy again, which may lag the breaker.
        let healthy = self.g.unhealthy_interval * saturating_u32(self.g.healthy_threshold);
        let ramp_limit = self.lb.slow_start + healthy + SLACK * 2;
        let within = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        if late(self.killed_at, self.opened_at, open_limit) {
            return Some(format!(
                "the breaker of {victim} did not open within {} of its death",
                within(open_limit)
            ));
        }
        if late(self.killed_at, self.drained_at, drain_limit) {
            return Some(format!(
                "the weight of {victim} did not drop to 0 within {} of its death",
                within(drain_limit)
            ));
        }
        if late(self.drained_at, self.quiet_at, quiet_limit) {
            return Some(format!(
                "connections still failed {} after the weight of {victim} dropped to 0",
                within(quiet_limit)
            ));
        }
        if late(self.restored_at, self.closed_at, close_limit) {
            return Some(format!(
                "the breaker of {victim} did not close within {} of its restart",
                within(close_limit)
            ));
        }
        if late(self.closed_at, self.full_at, ramp_limit) {
            return Some(format!(
                "the weight of {victim} did not ramp back to {} within {} of its breaker closing \
                 (slow_start {:?})",
                self.lb.weights[self.victim],
                within(ramp_limit),
                self.lb.slow_start
            ));
        }
        if now - self.start > ACT_LIMIT {
            return Some(format!(
                "the act did not end within {} s",
                ACT_LIMIT.as_secs()
            ));
        }
        None
    }

    /// Totals of the rows in `phase` (and drained, when asked).
    fn totals(&self, keep: impl Fn(&Row) -> bool) -> (Counts, usize) {
        let mut sum = Counts::default();
        let mut n = 0;
        for row in self.rows.iter().filter(|r| keep(r)) {
            sum.add(&row.counts);
            n += 1;
        }
        (sum, n)
    }

    /// Each backend's share of `counts` against its weight share; `Err` with the line when a
    /// share is off by more than [`SHARE_TOLERANCE`].
    fn shares(&self, counts: &Counts, weights: &[f64]) -> (String, bool) {
        let total = counts.served_total().max(1) as f64;
        let mut ok = true;
        let parts: Vec<String> = self
            .names
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (name, want))| {
                let got = counts.served.get(i).copied().unwrap_or(0) as f64 / total;
                ok &= (got - want).abs() <= SHARE_TOLERANCE;
                format!("{name} {:.1}% (weight {:.1}%)", got * 100.0, want * 100.0)
            })
            .collect();
        (parts.join(", "), ok)
    }

    /// The act in a few lines, from what was measured; `Err` when the shares during the sale or
    /// at full weight again were not what the weights say.
    fn summary(&self, tally: &Tally) -> Result<(), String> {
        println!("\ndemo: the act, measured");
        let weights = self.lb.shares();
        let mut problems = Vec::new();
        let (sale, rows) = self.totals(|r| r.phase == Phase::Sale);
        let (line, ok) = self.shares(&sale, &weights);
        println!(
            "demo:   the sale, all healthy ({} connections in {rows} s): {line}",
            sale.served_total()
        );
        if !ok {
            problems.push("the shares during the sale");
        }
        self.failover(tally);
        self.recovery();
        let (full, rows) = self.totals(|r| r.phase == Phase::Full);
        let (line, ok) = self.shares(&full, &weights);
        println!(
            "demo:   back at full weight ({} connections in {rows} s): {line}",
            full.served_total()
        );
        if !ok {
            problems.push("the shares back at full weight");
        }
        let all = tally.counts();
        println!(
            "demo:   in all: {} connections started, {} served, {} failed",
            all.started,
            all.served_total(),
            all.failed()
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} off by more than {:.0} points from the weights",
                problems.join(" and "),
                SHARE_TOLERANCE * 100.0
            ))
        }
    }

    fn failover(&self, tally: &Tally) {
        let victim = &self.names[self.victim];
        let (Some(killed), Some(opened), Some(drained)) =
            (self.killed_at, self.opened_at, self.drained_at)
        else {
            return;
        };
        let failures = tally.failures();
        let after_kill: Vec<&Instant> = failures.iter().filter(|t| **t >= killed).collect();
        let last = after_kill.last().map_or_else(
            || "none".into(),
            |t| format!("the last {} after it", since(killed, **t)),
        );
        println!(
            "demo:   {victim} died: its breaker opened {} later, its weight was 0 after {}; {} \
             connections failed ({last})",
            since(killed, opened),
            since(killed, drained),
            after_kill.len()
        );
        let (quiet, rows) = self.totals(|r| r.drained);
        let survivors: Vec<String> = self
            .names
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.victim)
            .map(|(i, name)| {
                let got = quiet.served.get(i).copied().unwrap_or(0) as f64;
                format!(
                    "{name} {:.1}%",
                    got * 100.0 / quiet.served_total().max(1) as f64
                )
            })
            .collect();
        println!(
            "demo:   while {victim} was drained ({rows} s): {} connections, {} failed; {}",
            quiet.served_total(),
            quiet.failed(),
            survivors.join(", ")
        );
    }

    fn recovery(&self) {
        let victim = &self.names[self.victim];
        let (Some(restored), Some(closed)) = (self.restored_at, self.closed_at) else {
            return;
        };
        let half_open = self.half_open_at.map_or_else(String::new, |h| {
            format!("half-open {} after, ", since(restored, h))
        });
        let steps: Vec<String> = self
            .ramp
            .iter()
            .filter(|(t, _)| *t >= closed)
            .map(|(t, w)| format!("{w} at +{:.1}s", t.duration_since(closed).as_secs_f64()))
            .collect();
        println!(
            "demo:   {victim} restarted: {half_open}closed {} after; weight ramped {} (slow_start \
             {:?})",
            since(restored, closed),
            steps.join(", "),
            self.lb.slow_start
        );
        let (recovering, _) = self.totals(|r| r.phase == Phase::Recovery);
        if recovering.failed() > 0 {
            println!(
                "demo:   warning: {} connections failed while {victim} recovered",
                recovering.failed()
            );
        }
    }
}
