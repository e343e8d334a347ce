//! What the act shows of the agent and the clients: each backend's breaker state from /metrics,
//! polled often so that transitions are timed, and once a second a row per backend of the
//! clients' connects next to the breaker state and the RSTs the datapath sent.

use std::time::Duration;

use super::{
    clients::{Counts, Tally},
    plan::BreakerPlan,
};
use crate::demo::{
    live::delta,
    metrics::{self, BREAKER_MOVES, Move, Sample},
    netns::Netns,
};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);

/// A breaker that changed state between two polls.
pub struct Transition {
    pub backend: usize,
    pub from: &'static str,
    pub to: &'static str,
    /// The agent's reason label; `None` when the counters do not explain the change.
    pub reason: Option<&'static str>,
}

/// A backend's breaker as last seen: its state, and the counters that tell what it did since.
#[derive(Default)]
pub struct BreakerSeen {
    pub state: Option<&'static str>,
    /// [`metrics::BREAKER_MOVES`] counters at the last reading.
    moves: [u64; 5],
}

impl BreakerSeen {
    /// Reads the breaker of `backend` (index `index`, for the transitions) of `service` from
    /// `samples`; returns every change of state since the last reading, in order, also those
    /// too brief to be seen in the state itself (half-open for a few milliseconds): the
    /// transition counters tell them.
    pub fn update(
        &mut self,
        samples: &[Sample],
        service: &str,
        backend: &str,
        index: usize,
    ) -> Vec<Transition> {
        let moves = metrics::breaker_moves(samples, service, backend);
        let grew = std::array::from_fn(|i| moves[i].saturating_sub(self.moves[i]));
        self.moves = moves;
        let Some(state) = metrics::breaker_state(samples, service, backend) else {
            return Vec::new();
        };
        let Some(before) = self.state.replace(state) else {
            return Vec::new(); // the first reading: a state, not a change
        };
        let path = replay(before, grew);
        if path.last().map_or(before, |m| m.to) == state {
            path.into_iter()
                .map(|m| Transition {
                    backend: index,
                    from: m.from,
                    to: m.to,
                    reason: Some(m.reason),
                })
                .collect()
        } else {
            vec![Transition {
                backend: index,
                from: before,
                to: state,
                reason: None,
            }]
        }
    }
}

/// One backend as last seen.
struct Seen {
    label: String,
    breaker: BreakerSeen,
    /// `reject_rst`, cumulative: at the last poll, and at the last row.
    rst: Option<f64>,
    rst_at_row: Option<f64>,
    counts_at_row: Counts,
}

pub struct Watch<'a> {
    client: &'a Netns,
    plan: &'a BreakerPlan,
    /// `false` without an agent: nothing to scrape.
    scrape: bool,
    backends: Vec<Seen>,
    scrape_failed: bool,
}

impl<'a> Watch<'a> {
    pub fn new(client: &'a Netns, plan: &'a BreakerPlan, scrape: bool) -> Self {
        let backends = plan.backends.iter().map(|b| Seen {
            label: b.to_string(),
            breaker: BreakerSeen::default(),
            rst: None,
            rst_at_row: None,
            counts_at_row: Counts::default(),
        });
        let mut watch = Self {
            client,
            plan,
            scrape,
            backends: backends.collect(),
            scrape_failed: false,
        };
        watch.poll();
        for seen in &mut watch.backends {
            seen.rst_at_row = seen.rst;
        }
        watch
    }

    pub fn label(&self, backend: usize) -> &str {
        &self.backends[backend].label
    }

    /// Whether there is an agent to read.
    pub fn scraping(&self) -> bool {
        self.scrape
    }

    /// Whether every breaker was closed at the last poll (`false` without an agent).
    pub fn all_closed(&self) -> bool {
        self.scrape
            && self
                .backends
                .iter()
                .all(|b| b.breaker.state == Some("closed"))
    }

    /// Scrapes /metrics; returns every change of breaker state since the last poll, in order,
    /// also those too brief to be seen in the state itself (half-open for a few milliseconds):
    /// the transition counters tell them.
    pub fn poll(&mut self) -> Vec<Transition> {
        let Some(samples) = self.scrape() else {
            return Vec::new();
        };
        let service = &self.plan.service;
        let mut changes = Vec::new();
        for (backend, seen) in self.backends.iter_mut().enumerate() {
            let label = &seen.label;
            seen.rst = metrics::backend_total(&samples, &metrics::REJECT_RST, service, label);
            changes.extend(seen.breaker.update(&samples, service, label, backend));
        }
        changes
    }

    fn scrape(&mut self) -> Option<Vec<Sample>> {
        if !self.scrape {
            return None;
        }
        match metrics::scrape(self.client, self.plan.agent.listen, SCRAPE_TIMEOUT) {
            Ok(samples) => Some(samples),
            Err(e) => {
                if !std::mem::replace(&mut self.scrape_failed, true) {
                    println!("demo: cannot read agent metrics: {e}");
                }
                None
            }
        }
    }

    pub fn header(&self) {
        println!(
            "{:>5}  {:<21} {:>4} {:>8} {:>7} {:>10}  {:<10} {:>10}",
            "time", "backend", "ok", "refused", "max ms", "timed out", "breaker", "reject_rst"
        );
    }

    /// One row per backend: the connects that ended in the last second, the slowest refusal
    /// among them, the breaker's state now, and the RSTs the datapath sent in that second.
    pub fn rows(&mut self, second: u64, tallies: &[Tally]) {
        for (i, (seen, tally)) in self.backends.iter_mut().zip(tallies).enumerate() {
            let now = tally.counts();
            let counts = now.since(&seen.counts_at_row);
            let time = if i == 0 {
                format!("{second}s")
            } else {
                String::new()
            };
            println!(
                "{time:>5}  {:<21} {:>4} {:>8} {:>7} {:>10}  {:<10} {:>10}",
                seen.label,
                counts.ok,
                counts.refused,
                tally.take_slowest_refusal().map_or("-".into(), millis),
                counts.timed_out,
                seen.breaker.state.unwrap_or("-"),
                delta(seen.rst, seen.rst_at_row),
            );
            seen.counts_at_row = now;
            seen.rst_at_row = seen.rst;
        }
    }
}

/// The moves a breaker made between two readings, in order: from `state`, those whose counters
/// grew, as its state machine allows (closed -> open -> half_open -> open | closed). Half-open
/// with both a failed and a successful trial: the failure first if the breaker went on to
/// half-open again, else the success.
fn replay(mut state: &'static str, mut grew: [u64; 5]) -> Vec<&'static Move> {
    let mut path = Vec::new();
    for _ in 0..grew.iter().sum::<u64>() {
        let possible = |i: &usize| grew[*i] > 0 && BREAKER_MOVES[*i].from == state;
        let candidates: Vec<usize> = (0..BREAKER_MOVES.len()).filter(possible).collect();
        let continues = |i: &&usize| {
            let to = BREAKER_MOVES[**i].to;
            (0..BREAKER_MOVES.len()).any(|j| j != **i && grew[j] > 0 && BREAKER_MOVES[j].from == to)
        };
        let Some(&next) = candidates.iter().find(continues).or(candidates.first()) else {
            break;
        };
        grew[next] -= 1;
        state = BREAKER_MOVES[next].to;
        path.push(&BREAKER_MOVES[next]);
    }
    path
}

/// `0.042` (milliseconds, to the microsecond).
pub fn millis(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(path: &[&Move]) -> Vec<&'static str> {
        path.iter().map(|m| m.reason).collect()
    }

    #[test]
    fn replays_moves_too_brief_to_be_seen() {
        // reset_timeout, then a failed trial: seen open before and after.
        assert_eq!(
            names(&replay("open", [0, 0, 1, 1, 0])),
            ["reset_timeout", "trial_failed"]
        );
        // Half-open: a failed trial, half-open again, then the trials succeed.
        assert_eq!(
            names(&replay("half_open", [0, 0, 1, 1, 1])),
            ["trial_failed", "reset_timeout", "trials_succeeded"]
        );
        assert_eq!(
            names(&replay("closed", [1, 0, 0, 0, 0])),
            ["consecutive_failures"]
        );
        // Counters that do not start where the breaker was: nothing to replay.
        assert!(replay("closed", [0, 0, 1, 0, 0]).is_empty());
    }
}
