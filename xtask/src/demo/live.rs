//! The live table of the demo: one row a second of offered and received packets next to the
//! agent's own counters for the service, scraped from its /metrics.

use std::time::Duration;

use super::{
    metrics,
    netns::Netns,
    plan::Plan,
    traffic::{Second, Totals},
};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);

/// Agent counters for the demo service, cumulative.
#[derive(Clone, Copy, Default)]
struct Counters {
    passed: Option<f64>,
    dropped: Option<f64>,
}

/// The live table: one row a second.
pub struct Live<'a> {
    server: &'a Netns,
    plan: &'a Plan,
    scrape: bool,
    start: Counters,
    previous: Counters,
    scrape_error: Option<String>,
}

impl<'a> Live<'a> {
    pub fn new(server: &'a Netns, plan: &'a Plan, scrape: bool) -> Self {
        let mut live = Self {
            server,
            plan,
            scrape,
            start: Counters::default(),
            previous: Counters::default(),
            scrape_error: None,
        };
        live.start = live.counters();
        live.previous = live.start;
        live
    }

    fn counters(&mut self) -> Counters {
        if !self.scrape {
            return Counters::default();
        }
        match metrics::scrape(self.server, self.plan.agent.listen, SCRAPE_TIMEOUT) {
            Ok(samples) => Counters {
                passed: metrics::total(&samples, &metrics::PASSED, &self.plan.service),
                dropped: metrics::total(&samples, &metrics::DROPPED_RATE_LIMIT, &self.plan.service),
            },
            Err(e) => {
                if self.scrape_error.is_none() {
                    println!("demo: cannot read agent metrics: {e}");
                }
                self.scrape_error = Some(e);
                Counters::default()
            }
        }
    }

    pub fn header(&self) {
        println!(
            "{:>5} {:>10} {:>11} {:>14} {:>15}",
            "time", "offered/s", "received/s", "agent passed/s", "agent dropped/s"
        );
    }

    pub fn row(&mut self, second: &Second) {
        let now = self.counters();
        println!(
            "{:>4}s {:>10} {:>11} {:>14} {:>15}",
            second.index,
            second.offered,
            second.received,
            delta(now.passed, self.previous.passed),
            delta(now.dropped, self.previous.dropped),
        );
        self.previous = now;
    }

    pub fn summary(&self, totals: &Totals) {
        let seconds = totals.seconds.max(1);
        println!(
            "{:>5} {:>10} {:>11} {:>14} {:>15}",
            "avg",
            totals.sent / seconds,
            totals.received / seconds,
            average(self.previous.passed, self.start.passed, seconds),
            average(self.previous.dropped, self.start.dropped, seconds),
        );
        println!(
            "demo: sent {} packets, received {} ({:.1}%); limit {}/s with burst {}",
            totals.sent,
            totals.received,
            percent(totals.received, totals.sent),
            self.plan.rate_pps,
            self.plan.burst
        );
        if self.scrape && self.previous.passed.is_none() && self.previous.dropped.is_none() {
            println!(
                "demo: the agent exported neither {} nor {} for service {} (names in xtask/src/demo/metrics.rs)",
                metrics::PASSED.name,
                metrics::DROPPED_RATE_LIMIT.name,
                self.plan.service
            );
        }
    }
}

pub(super) fn delta(now: Option<f64>, before: Option<f64>) -> String {
    match (now, before) {
        (Some(now), Some(before)) => format!("{:.0}", now - before),
        (Some(now), None) => format!("{now:.0}"),
        _ => "-".into(),
    }
}

fn average(end: Option<f64>, start: Option<f64>, seconds: u64) -> String {
    match end {
        Some(end) => format!("{:.0}", (end - start.unwrap_or(0.0)) / seconds as f64),
        None => "-".into(),
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}
