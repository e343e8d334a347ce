//! Act 1: the agent on the server's veth rate-limiting one UDP flow sent at a multiple of its
//! limit; once a second, offered and received packets next to the agent's passed and dropped
//! (its JSON status), then the averages.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use agent_tests::{AgentProcess, SendReport, UdpFlood, UdpReceiver, UdpSender};

use super::{
    Args, CLIENT_ADDR, Demo, SERVER_ADDR, delta, policy::RateLimited, sleep_until, stop_agent,
};

/// Reads the act's policy and says what it will show.
pub fn plan(config: &Path) -> anyhow::Result<RateLimited> {
    let plan = RateLimited::load(config)?;
    println!(
        "demo: policy {}: service {} udp port {}, limit {}/s burst {}, agent on {} at http://{}",
        config.display(),
        plan.service,
        plan.port,
        plan.rate_pps,
        plan.burst,
        plan.agent.interface,
        plan.agent.listen
    );
    if !plan.matches(SERVER_ADDR) {
        println!(
            "demo: warning: service {} matches {}, which does not contain {SERVER_ADDR}, where \
             the demo sends",
            plan.service, plan.address
        );
    }
    Ok(plan)
}

pub fn run(demo: &Demo, args: &Args, plan: &RateLimited, config: &Path) -> anyhow::Result<()> {
    println!("\ndemo: act 1: rate limit");
    let topology = &demo.topology;
    let mut agent = demo.start_agent(config, &topology.server, "")?;
    if agent.is_none() {
        println!("demo: --no-agent: traffic only, nothing limits it");
    }
    let to = SocketAddr::new(SERVER_ADDR.into(), plan.port);
    let pps = plan.rate_pps.saturating_mul(args.factor);
    let seconds = Duration::from_secs(args.duration);
    // One flow (one 5-tuple): a per-flow limit applies to all of it.
    let flood = UdpFlood::new(to, CLIENT_ADDR.into(), 1, pps as f64, seconds);
    let receiver = UdpReceiver::start(&topology.server, to)?;
    let sender = UdpSender::new(&topology.client, flood)?;
    println!(
        "\ndemo: {} s of UDP {CLIENT_ADDR} -> {to} at {pps} pps ({}x the limit of {}/s, burst {})",
        args.duration, args.factor, plan.rate_pps, plan.burst
    );
    let progress = sender.progress();
    let sending = sender.spawn();
    let mut table = Table::new(agent.as_ref(), &plan.service);
    let shown = table.play(args.duration, agent.as_mut(), || {
        (progress.sent(), receiver.received())
    });
    if shown.is_err() {
        progress.stop();
    }
    let sent = match sending.join() {
        Ok(report) => report,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    shown?;
    let SendReport { sent, .. } = sent?;
    let received = receiver.finish()?.packets;
    table.summary(args.duration, sent, received, plan);
    stop_agent(agent)
}

/// The agent's counters for the service, cumulative: passed, dropped by the rate limit.
#[derive(Clone, Copy, Default)]
struct Counters {
    passed: Option<u64>,
    dropped: Option<u64>,
}

/// The live table: one row a second.
struct Table<'a> {
    service: &'a str,
    /// `false` without an agent, or once reading it failed (said once).
    reading: bool,
    start: Counters,
    last: Counters,
}

impl<'a> Table<'a> {
    fn new(agent: Option<&AgentProcess>, service: &'a str) -> Self {
        let mut table = Self {
            service,
            reading: agent.is_some(),
            start: Counters::default(),
            last: Counters::default(),
        };
        table.start = table.counters(agent);
        table.last = table.start;
        table
    }

    fn counters(&mut self, agent: Option<&AgentProcess>) -> Counters {
        let Some(agent) = agent.filter(|_| self.reading) else {
            return Counters::default();
        };
        match agent.status() {
            Ok(report) => {
                let service = report.services.iter().find(|s| s.name == self.service);
                let dropped = service.map(|s| {
                    let limited = s.dropped.iter().filter(|d| d.reason == "rate_limit");
                    limited.map(|d| d.counter.packets).sum()
                });
                Counters {
                    passed: service.map(|s| s.passed.packets),
                    dropped,
                }
            }
            Err(e) => {
                println!("demo: cannot read the agent's status: {e:#}");
                self.reading = false;
                Counters::default()
            }
        }
    }

    /// A row at the end of every second of `seconds`, from `now` (packets sent and received so
    /// far) and the agent's counters; an error when the agent dies.
    fn play(
        &mut self,
        seconds: u64,
        mut agent: Option<&mut AgentProcess>,
        now: impl Fn() -> (u64, u64),
    ) -> anyhow::Result<()> {
        println!(
            "{:>5} {:>10} {:>11} {:>14} {:>15}",
            "time", "offered/s", "received/s", "agent passed/s", "agent dropped/s"
        );
        let start = Instant::now();
        let mut before = (0, 0);
        for second in 1..=seconds {
            sleep_until(start + Duration::from_secs(second))?;
            let (sent, received) = now();
            let counters = self.counters(agent.as_deref());
            println!(
                "{:>4}s {:>10} {:>11} {:>14} {:>15}",
                second,
                sent - before.0,
                received - before.1,
                delta(counters.passed, self.last.passed),
                delta(counters.dropped, self.last.dropped),
            );
            (before, self.last) = ((sent, received), counters);
            if let Some(agent) = agent.as_deref_mut() {
                agent.check_running()?;
            }
        }
        Ok(())
    }

    fn summary(&self, seconds: u64, sent: u64, received: u64, plan: &RateLimited) {
        let seconds = seconds.max(1);
        let average = |end: Option<u64>, start: Option<u64>| {
            end.map_or("-".into(), |end| {
                format!("{:.0}", (end - start.unwrap_or(0)) as f64 / seconds as f64)
            })
        };
        println!(
            "{:>5} {:>10} {:>11} {:>14} {:>15}",
            "avg",
            sent / seconds,
            received / seconds,
            average(self.last.passed, self.start.passed),
            average(self.last.dropped, self.start.dropped),
        );
        let percent = received as f64 * 100.0 / sent.max(1) as f64;
        println!(
            "demo: sent {sent} packets, received {received} ({percent:.1}%); limit {}/s with \
             burst {}",
            plan.rate_pps, plan.burst
        );
        if self.reading && self.last.passed.is_none() {
            println!(
                "demo: the agent's status has no service {} (its services: `agent status`)",
                self.service
            );
        }
    }
}
