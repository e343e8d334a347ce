//! Act 2, "payment path fails fast": the agent on the client's veth (TC egress sees the
//! clients' SYNs, XDP ingress the backends' answers) guards a service's backends, each a TCP
//! server on an address of its own in the server namespace. Clients connect to every backend
//! all along. After a few healthy seconds one backend hangs (a blackhole rule for its address:
//! SYNs arrive, nothing comes back); its breaker opens and the clients' connects to it turn
//! from timeouts into refusals in microseconds, answered by the datapath. Restored, the breaker
//! goes half-open, then closed. Timings are measured and set against what the policy implies.

mod clients;

use std::{
    ops::ControlFlow,
    path::Path,
    time::{Duration, Instant},
};

use agent_tests::{AgentProcess, Netns, backend::Blackhole, backend::TcpServer};
use anyhow::bail;

use self::clients::{CONNECT_EVERY, CONNECT_TIMEOUT, Counts, Tally};
use super::{
    CLIENT_ADDR, Client, Demo, PREFIX_LEN, SERVER_ADDR, clock, delta, free_address, millis,
    policy::Guarded,
    scene, stop_agent,
    watch::{Event, Transition, Watch},
};

/// Seconds of healthy traffic before the last backend hangs, and how long it hangs.
const HEALTHY_SECS: u64 = 3;
const HANG_SECS: u64 = 4;
/// How often the agent's breaker states are read: the resolution of the timings shown.
const TICK: Duration = Duration::from_millis(50);
const TICKS_PER_SECOND: u32 = 20;
/// Scrape and scheduling slack on top of the policy's bound, before the act stops waiting.
const SLACK: Duration = Duration::from_secs(1);
/// Rows a breaker must be seen closed in, after the restore, before the act ends.
const CLOSED_ROWS: u32 = 2;
/// Without an agent nothing closes: seconds shown after the restore.
const BASELINE_AFTER_RESTORE: u64 = 2;

/// Reads the act's policy, says what it will show, and checks that the demo can place every
/// backend on an address of its own.
pub fn plan(config: &Path) -> anyhow::Result<Guarded> {
    let plan = Guarded::load(config)?;
    let backends: Vec<String> = plan.backends.iter().map(ToString::to_string).collect();
    println!(
        "demo: policy {}: service {} backends {}, probes every {:?} (timeout {:?}), breaker \
         opens after {} failures, on_open {}, reset_timeout {:?}, closes after {} successes, \
         agent on {} at http://{}",
        config.display(),
        plan.service,
        backends.join(" "),
        plan.interval,
        plan.timeout,
        plan.failure_threshold,
        plan.on_open,
        plan.reset_timeout,
        plan.success_threshold,
        plan.agent.interface,
        plan.agent.listen
    );
    for (i, backend) in plan.backends.iter().enumerate() {
        if !free_address(*backend.ip(), &[]) {
            bail!(
                "{}: backend {backend}: the demo places backends on addresses of their own in \
                 {CLIENT_ADDR}/{PREFIX_LEN}, other than {CLIENT_ADDR} and {SERVER_ADDR}",
                config.display()
            );
        }
        if plan.backends[..i].iter().any(|b| b.ip() == backend.ip()) {
            bail!(
                "{}: backend {backend}: each backend needs an address of its own (the demo \
                 makes one hang alone)",
                config.display()
            );
        }
    }
    Ok(plan)
}

/// From a backend hanging to its breaker open, by active probes alone: the first failing
/// probe starts at most one interval after the hang, `failure_threshold` of them run an
/// interval apart, the last fails after `timeout`. Passive detection can be sooner.
pub fn open_bound(plan: &Guarded) -> Duration {
    plan.interval * saturating_u32(plan.failure_threshold) + plan.timeout
}

/// From a restored backend to its breaker closed: what is left of the open period (at most
/// `max_reset_timeout`), then `success_threshold` probes at the unhealthy interval.
pub fn close_bound(plan: &Guarded) -> Duration {
    plan.max_reset_timeout
        + plan.unhealthy_interval * saturating_u32(plan.success_threshold)
        + plan.timeout
}

pub fn saturating_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

pub fn run(demo: &Demo, plan: &Guarded, config: &Path) -> anyhow::Result<()> {
    println!("\ndemo: act 2: payment path fails fast");
    let topology = &demo.topology;
    let servers = plan
        .backends
        .iter()
        .map(|&backend| {
            topology.add_server_addr((*backend.ip()).into())?;
            TcpServer::start(&topology.server, backend.into())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut agent = demo.start_agent(config, &topology.client, "breaker-")?;
    introduce(demo, plan, agent.is_some());
    let tallies: Vec<Tally> = plan.backends.iter().map(|_| Tally::default()).collect();
    let mut watch = Watch::new(agent.as_ref(), &plan.service, &plan.backends);
    let mut story = Story::new(plan, &topology.server);
    let clients = plan.backends.iter().zip(&tallies).map(|(&backend, tally)| {
        let client = &topology.client;
        Box::new(move |stop: &_| clients::run(client, backend, tally, stop)) as Client<'_>
    });
    let mut rows = Rows::new(&watch, &tallies);
    story.start = Instant::now();
    scene(TICK, clients.collect(), agent.as_mut(), |n, agent| {
        story.tick(n, agent, &mut watch, &mut rows)
    })?;
    story.summary(&watch, &tallies);
    drop(watch);
    stop_agent(agent)?;
    // The agent has let go of the interface; the servers go.
    drop(servers);
    Ok(())
}

fn introduce(demo: &Demo, plan: &Guarded, with_agent: bool) {
    println!(
        "demo: backends of {} in {}, each a TCP server on an address of its own; clients in {} \
         connect to each every {} ms (timeout {} ms)",
        plan.service,
        demo.topology.server.name(),
        demo.topology.client.name(),
        CONNECT_EVERY.as_millis(),
        CONNECT_TIMEOUT.as_millis()
    );
    if with_agent {
        let passive = if plan.passive {
            " and watches the clients' own SYNs"
        } else {
            ""
        };
        println!(
            "demo: the agent probes each backend every {:?} (timeout {:?}){passive}; {} failures \
             in a row open its breaker",
            plan.interval, plan.timeout, plan.failure_threshold
        );
    } else {
        println!("demo: --no-agent: no breaker, connects to a hung backend hang");
    }
    println!(
        "demo: script: {HEALTHY_SECS} s healthy, then {} hangs for {HANG_SECS} s, then it is \
         restored",
        plan.backends
            .last()
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    println!(
        "demo: per second and backend: connects ok, refused (ECONNREFUSED; max ms: the slowest), \
         timed out; the breaker's state and the RSTs the datapath sent (agent status)\n"
    );
}

/// The act's timeline, and what it measured.
struct Story<'a> {
    plan: &'a Guarded,
    /// Where the backends live.
    server: &'a Netns,
    /// The backend made to hang: the last one.
    victim: usize,
    start: Instant,
    hang: Option<Blackhole>,
    hung_at: Option<Instant>,
    restored_at: Option<Instant>,
    opened_after: Option<Duration>,
    closed_after: Option<Duration>,
    /// Rows since the restore in which every breaker was closed, in a row.
    closed_rows: u32,
}

impl<'a> Story<'a> {
    fn new(plan: &'a Guarded, server: &'a Netns) -> Self {
        Self {
            plan,
            server,
            victim: plan.backends.len().saturating_sub(1),
            start: Instant::now(),
            hang: None,
            hung_at: None,
            restored_at: None,
            opened_after: None,
            closed_after: None,
            closed_rows: 0,
        }
    }

    /// Every tick: the breakers' changes; every second: the rows, then the script.
    fn tick(
        &mut self,
        n: u32,
        agent: Option<&AgentProcess>,
        watch: &mut Watch,
        rows: &mut Rows,
    ) -> anyhow::Result<ControlFlow<()>> {
        for event in watch.poll(agent) {
            if let Event::Breaker(transition) = event {
                self.transition(&transition, watch);
            }
        }
        if !n.is_multiple_of(TICKS_PER_SECOND) {
            return Ok(ControlFlow::Continue(()));
        }
        let second = u64::from(n / TICKS_PER_SECOND);
        rows.print(second, watch);
        self.step(second, watch)
    }

    /// What happens at the end of `second`.
    fn step(&mut self, second: u64, watch: &Watch) -> anyhow::Result<ControlFlow<()>> {
        let restore = HEALTHY_SECS + HANG_SECS;
        if second == HEALTHY_SECS {
            self.hang()?;
        } else if second == restore {
            self.restore()?;
        } else if second > restore {
            return Ok(self.recovered(second - restore, watch));
        }
        Ok(ControlFlow::Continue(()))
    }

    fn hang(&mut self) -> anyhow::Result<()> {
        let backend = self.plan.backends[self.victim];
        let hang = Blackhole::add(self.server, (*backend.ip()).into())?;
        self.hung_at = Some(Instant::now());
        println!(
            "demo: {} {backend} hangs: `{}` (SYNs reach it, nothing it sends leaves)",
            clock(self.start),
            hang.command("add")
        );
        self.hang = Some(hang);
        Ok(())
    }

    fn restore(&mut self) -> anyhow::Result<()> {
        let Some(mut hang) = self.hang.take() else {
            return Ok(());
        };
        let command = hang.command("del");
        hang.remove()?;
        self.restored_at = Some(Instant::now());
        println!(
            "demo: {} {} restored: `{command}`",
            clock(self.start),
            self.plan.backends[self.victim]
        );
        Ok(())
    }

    /// After the restore: done once every breaker has been closed for [`CLOSED_ROWS`] rows, or
    /// when the policy's bound (plus slack) has passed.
    fn recovered(&mut self, since_restore: u64, watch: &Watch) -> ControlFlow<()> {
        if !watch.reading() {
            return if since_restore >= BASELINE_AFTER_RESTORE {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            };
        }
        self.closed_rows = if watch.all_closed() {
            self.closed_rows + 1
        } else {
            0
        };
        if self.closed_rows >= CLOSED_ROWS {
            return ControlFlow::Break(());
        }
        let bound = close_bound(self.plan) + SLACK;
        if Duration::from_secs(since_restore) >= bound {
            println!(
                "demo: warning: not every breaker closed within {:.1} s of the restore (the \
                 policy's bound plus {} s of slack)",
                bound.as_secs_f64(),
                SLACK.as_secs()
            );
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    /// Prints a breaker's change of state, timed against the hang or the restore when it is
    /// the one the script was waiting for.
    fn transition(&mut self, t: &Transition, watch: &Watch) {
        let reason = t.reason.map_or_else(String::new, |r| format!(" ({r})"));
        let why = self
            .why(t)
            .map_or_else(String::new, |why| format!(": {why}"));
        println!(
            "demo: {} {} breaker {} -> {}{reason}{why}",
            clock(self.start),
            watch.label(t.backend),
            t.from,
            t.to
        );
    }

    fn why(&mut self, t: &Transition) -> Option<String> {
        let now = Instant::now();
        let victim = t.backend == self.victim;
        match (t.from, t.to) {
            ("closed", "open") if victim && self.opened_after.is_none() => {
                let took = now - self.hung_at?;
                self.opened_after = Some(took);
                Some(format!(
                    "{:.2} s after the hang (by active probes alone: within {:.2} s); new \
                     connects are refused",
                    took.as_secs_f64(),
                    open_bound(self.plan).as_secs_f64()
                ))
            }
            ("half_open", "closed") if victim && self.closed_after.is_none() => {
                let took = now - self.restored_at?;
                self.closed_after = Some(took);
                Some(format!("{:.2} s after the restore", took.as_secs_f64()))
            }
            ("open", "half_open") => Some(format!(
                "up to {} trial connects may pass",
                self.plan.half_open_max_flows
            )),
            ("half_open", "open") => Some("still failing, refused again".into()),
            _ => None,
        }
    }

    fn summary(&self, watch: &Watch, tallies: &[Tally]) {
        println!("\ndemo: connects over the act");
        for (i, tally) in tallies.iter().enumerate() {
            let c = tally.counts();
            let other = if c.other > 0 {
                format!(", other errors {}", c.other)
            } else {
                String::new()
            };
            let spread = tally
                .refusal_spread()
                .map_or_else(String::new, |(median, max)| {
                    format!(
                        " (median {} ms, slowest {} ms)",
                        millis(median),
                        millis(max)
                    )
                });
            println!(
                "demo:   {:<21} ok {:>4}, refused {:>4}{spread}, timed out {:>3}{other}",
                watch.label(i),
                c.ok,
                c.refused,
                c.timed_out,
            );
        }
        self.timings(watch, &tallies[self.victim]);
    }

    fn timings(&self, watch: &Watch, victim_tally: &Tally) {
        if !watch.reading() {
            return;
        }
        let victim = watch.label(self.victim);
        let refused = victim_tally.refusal_spread().map_or_else(
            || "-".into(),
            |(median, max)| format!("{} ms (slowest {} ms)", millis(median), millis(max)),
        );
        match self.opened_after {
            Some(took) => println!(
                "demo: {victim} hung: its breaker opened {:.2} s later (active probes alone: \
                 within {:.2} s); from then on a connect to it was refused in {refused} \
                 instead of hanging for {} ms",
                took.as_secs_f64(),
                open_bound(self.plan).as_secs_f64(),
                CONNECT_TIMEOUT.as_millis()
            ),
            None => println!("demo: warning: the breaker of {victim} never opened"),
        }
        if let Some(took) = self.closed_after {
            println!(
                "demo: {victim} restored: its breaker closed {:.2} s later (within {:.2} s: what \
                 was left of the open period, then {} successes)",
                took.as_secs_f64(),
                close_bound(self.plan).as_secs_f64(),
                self.plan.success_threshold
            );
        }
    }
}

/// The table: once a second a row per backend of the clients' connects that ended in that
/// second, the slowest refusal among them, the breaker's state now, and the RSTs the datapath
/// sent in that second.
struct Rows<'a> {
    tallies: &'a [Tally],
    /// Per backend, at the last row: connects, and the RSTs.
    before: Vec<(Counts, Option<u64>)>,
}

impl<'a> Rows<'a> {
    fn new(watch: &Watch, tallies: &'a [Tally]) -> Self {
        println!(
            "{:>5}  {:<21} {:>4} {:>8} {:>7} {:>10}  {:<10} {:>10}",
            "time", "backend", "ok", "refused", "max ms", "timed out", "breaker", "reject_rst"
        );
        let before = (0..watch.count()).map(|i| (Counts::default(), watch.rst(i)));
        Self {
            tallies,
            before: before.collect(),
        }
    }

    fn print(&mut self, second: u64, watch: &Watch) {
        for (i, (before, tally)) in self.before.iter_mut().zip(self.tallies).enumerate() {
            let now = (tally.counts(), watch.rst(i));
            let counts = now.0.since(&before.0);
            let time = if i == 0 {
                format!("{second}s")
            } else {
                String::new()
            };
            println!(
                "{time:>5}  {:<21} {:>4} {:>8} {:>7} {:>10}  {:<10} {:>10}",
                watch.label(i),
                counts.ok,
                counts.refused,
                tally.take_slowest_refusal().map_or("-".into(), millis),
                counts.timed_out,
                watch.state(i).unwrap_or("-"),
                delta(now.1, before.1),
            );
            *before = now;
        }
    }
}
