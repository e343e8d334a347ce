//! Act 2, "payment path fails fast": the agent on the client's veth (TC egress sees the
//! clients' SYNs, XDP ingress the backends' answers) guards a service's backends, each a TCP
//! server on an address of its own in the server namespace. Clients connect to every backend
//! all along. After a few healthy seconds one backend hangs (a blackhole rule for its address:
//! SYNs arrive, nothing comes back); its breaker opens and the clients' connects to it turn
//! from timeouts into refusals in microseconds, answered by the datapath. Restored, the breaker
//! goes half-open, then closed. Timings are measured and set against what the policy implies.

mod backends;
mod clients;
pub mod plan;
pub mod watch;

use std::{
    net::TcpListener,
    ops::ControlFlow,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;

use self::{
    clients::{CONNECT_EVERY, CONNECT_TIMEOUT, Tally},
    plan::BreakerPlan,
    watch::{Transition, Watch, millis},
};
use super::{
    CLIENT_ADDR, Demo, PREFIX_LEN, PinCleanup, SERVER_ADDR,
    agent::Agent,
    plan as policy,
    topology::{Hang, Topology},
    traffic::{self, StopOnDrop},
};
use crate::sys;

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
pub fn plan(config: &Path) -> anyhow::Result<BreakerPlan> {
    let plan = BreakerPlan::load(config)?;
    println!("demo: {plan}");
    let network = format!("{CLIENT_ADDR}/{PREFIX_LEN}");
    for (i, backend) in plan.backends.iter().enumerate() {
        let ip = *backend.ip();
        if !policy::contains(&network, ip) || [CLIENT_ADDR, SERVER_ADDR].contains(&ip) {
            bail!(
                "{}: backend {backend}: the demo places backends on addresses of their own in \
                 {network}, other than {CLIENT_ADDR} and {SERVER_ADDR}",
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

pub fn run(
    demo: &Demo,
    topology: &Topology,
    plan: &BreakerPlan,
    config: &Path,
) -> anyhow::Result<()> {
    println!("\ndemo: act 2: payment path fails fast");
    for backend in &plan.backends {
        topology.add_server_addr(*backend.ip())?;
    }
    let listeners = backends::bind(&demo.server, &plan.backends)?;
    let pins = PinCleanup::new(&plan.agent.pin_path);
    let mut agent = demo.start_agent(&plan.agent, config, &demo.client, "breaker-")?;
    introduce(demo, plan, agent.is_some());
    let tallies: Vec<Tally> = plan.backends.iter().map(|_| Tally::default()).collect();
    let mut watch = Watch::new(&demo.client, plan, agent.is_some());
    let mut story = Story::new(plan, topology);
    play(
        demo,
        &listeners,
        &tallies,
        &mut story,
        &mut watch,
        agent.as_mut(),
    )?;
    story.summary(&watch, &tallies);
    demo.print_status(&demo.client, plan.agent.listen, "breaker-")?;
    // Explicit, in order: the agent lets go of its pins and the interface, then the pins go.
    drop(agent);
    drop(pins);
    Ok(())
}

fn introduce(demo: &Demo, plan: &BreakerPlan, with_agent: bool) {
    println!(
        "demo: backends of {} in {}, each a TCP server on an address of its own; clients in {} \
         connect to each every {} ms (timeout {} ms)",
        plan.service,
        demo.server.name(),
        demo.client.name(),
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
         timed out; the breaker's state and the RSTs the datapath sent (agent /metrics)\n"
    );
}

/// Serves and connects on threads of their own while the story plays on this one; every
/// thread is stopped and joined before this returns, whatever happens.
fn play(
    demo: &Demo,
    listeners: &[TcpListener],
    tallies: &[Tally],
    story: &mut Story<'_>,
    watch: &mut Watch<'_>,
    agent: Option<&mut Agent>,
) -> anyhow::Result<()> {
    let stop = AtomicBool::new(false);
    let plan = story.plan;
    thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let stop = &stop;
        let mut threads = Vec::new();
        for listener in listeners {
            threads.push(scope.spawn(move || backends::serve(listener, stop)));
        }
        for (&backend, tally) in plan.backends.iter().zip(tallies) {
            threads.push(scope.spawn(move || clients::run(&demo.client, backend, tally, stop)));
        }
        let played = story.play(watch, tallies, agent, || {
            threads.iter().all(|t| !t.is_finished())
        });
        stop.store(true, Ordering::Relaxed);
        for thread in threads {
            traffic::join(thread)?;
        }
        played
    })
}

/// The act's timeline, and what it measured.
struct Story<'a> {
    plan: &'a BreakerPlan,
    topology: &'a Topology,
    /// The backend made to hang: the last one.
    victim: usize,
    start: Instant,
    hang: Option<Hang>,
    hung_at: Option<Instant>,
    restored_at: Option<Instant>,
    opened_after: Option<Duration>,
    closed_after: Option<Duration>,
    /// Rows since the restore in which every breaker was closed, in a row.
    closed_rows: u32,
}

impl<'a> Story<'a> {
    fn new(plan: &'a BreakerPlan, topology: &'a Topology) -> Self {
        Self {
            plan,
            topology,
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

    /// Polls the breakers every tick and prints the rows every second until the story ends,
    /// the agent dies, or a traffic thread ends (`alive` turns false; the caller's joins say
    /// why).
    fn play(
        &mut self,
        watch: &mut Watch<'_>,
        tallies: &[Tally],
        mut agent: Option<&mut Agent>,
        alive: impl Fn() -> bool,
    ) -> anyhow::Result<()> {
        watch.header();
        self.start = Instant::now();
        let mut tick: u32 = 0;
        loop {
            tick += 1;
            sleep_until(self.start + TICK * tick)?;
            if !alive() {
                return Ok(());
            }
            if let Some(agent) = agent.as_deref_mut() {
                agent.check_running()?;
            }
            for transition in watch.poll() {
                self.transition(&transition, watch);
            }
            if tick.is_multiple_of(TICKS_PER_SECOND) {
                let second = u64::from(tick / TICKS_PER_SECOND);
                watch.rows(second, tallies);
                if self.step(second, watch)?.is_break() {
                    return Ok(());
                }
            }
        }
    }

    /// What happens at the end of `second`.
    fn step(&mut self, second: u64, watch: &Watch<'_>) -> anyhow::Result<ControlFlow<()>> {
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
        let hang = self.topology.hang(*backend.ip())?;
        self.hung_at = Some(Instant::now());
        println!(
            "demo: {} {backend} hangs: `{}` (SYNs reach it, nothing it sends leaves)",
            self.clock(),
            hang.command("add")
        );
        self.hang = Some(hang);
        Ok(())
    }

    fn restore(&mut self) -> anyhow::Result<()> {
        let Some(hang) = self.hang.take() else {
            return Ok(());
        };
        let command = hang.command("del");
        hang.restore()?;
        self.restored_at = Some(Instant::now());
        println!(
            "demo: {} {} restored: `{command}`",
            self.clock(),
            self.plan.backends[self.victim]
        );
        Ok(())
    }

    /// After the restore: done once every breaker has been closed for [`CLOSED_ROWS`] rows, or
    /// when the policy's bound (plus slack) has passed.
    fn recovered(&mut self, since_restore: u64, watch: &Watch<'_>) -> ControlFlow<()> {
        if !watch.scraping() {
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
        let bound = self.plan.close_bound() + SLACK;
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
    fn transition(&mut self, t: &Transition, watch: &Watch<'_>) {
        let reason = t.reason.map_or_else(String::new, |r| format!(" ({r})"));
        let why = self
            .why(t)
            .map_or_else(String::new, |why| format!(": {why}"));
        println!(
            "demo: {} {} breaker {} -> {}{reason}{why}",
            self.clock(),
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
                    self.plan.open_bound().as_secs_f64()
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

    fn clock(&self) -> String {
        format!("+{:.2}s", self.start.elapsed().as_secs_f64())
    }

    fn summary(&self, watch: &Watch<'_>, tallies: &[Tally]) {
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

    fn timings(&self, watch: &Watch<'_>, victim_tally: &Tally) {
        if !watch.scraping() {
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
                self.plan.open_bound().as_secs_f64(),
                CONNECT_TIMEOUT.as_millis()
            ),
            None => println!("demo: warning: the breaker of {victim} never opened"),
        }
        if let Some(took) = self.closed_after {
            println!(
                "demo: {victim} restored: its breaker closed {:.2} s later (within {:.2} s: what \
                 was left of the open period, then {} successes)",
                took.as_secs_f64(),
                self.plan.close_bound().as_secs_f64(),
                self.plan.success_threshold
            );
        }
    }
}

/// Sleeps until `deadline`, failing at once on Ctrl-C.
fn sleep_until(deadline: Instant) -> anyhow::Result<()> {
    if sys::interrupted() {
        bail!("interrupted");
    }
    if let Some(left) = deadline.checked_duration_since(Instant::now()) {
        thread::sleep(left);
    }
    Ok(())
}
