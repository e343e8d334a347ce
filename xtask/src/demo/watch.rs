//! What acts 2 and 3 read of the agent, from its JSON status (`GET /status`) every tick: per
//! backend of the guarded service, its breaker's state and the changes it made (also those too
//! brief to be seen in the state: the transition counters tell them), the RSTs the datapath
//! sent for it, and its effective weight in the balancer's tables.

use std::net::SocketAddrV4;

use agent_tests::{AgentProcess, status::StatusReport};

/// A change of breaker state: the agent's reason for it, and the states it goes from and to.
pub struct Move {
    pub reason: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

const fn change(reason: &'static str, from: &'static str, to: &'static str) -> Move {
    Move { reason, from, to }
}

/// Every change a breaker makes, by reason (agent/src/breaker/state.rs), counted in the
/// status as `transitions["to/reason"]`. `panic_threshold` (a breaker that stays closed because
/// too many of its service's are open) is not a change.
const MOVES: [Move; 5] = [
    change("consecutive_failures", "closed", "open"),
    change("error_rate", "closed", "open"),
    change("reset_timeout", "open", "half_open"),
    change("trial_failed", "half_open", "open"),
    change("trials_succeeded", "half_open", "closed"),
];
const STATES: [&str; 3] = ["closed", "open", "half_open"];

/// A breaker that changed state between two polls.
pub struct Transition {
    pub backend: usize,
    pub from: &'static str,
    pub to: &'static str,
    /// The agent's reason; `None` when the counters do not explain the change.
    pub reason: Option<&'static str>,
}

/// Something that changed between two polls.
pub enum Event {
    Breaker(Transition),
    /// A backend's effective weight changed (`from` is `None` at the first reading).
    Weight {
        backend: usize,
        from: Option<u32>,
        to: u32,
    },
}

/// One backend as last seen.
struct Seen {
    label: String,
    state: Option<&'static str>,
    /// [`MOVES`] counters at the last reading.
    moves: [u64; 5],
    /// `reject_rst` packets, cumulative; `None` while the datapath does not enforce the breaker.
    rst: Option<u64>,
    weight: Option<u32>,
}

pub struct Watch {
    /// `false` without an agent: nothing to read.
    reading: bool,
    service: String,
    backends: Vec<Seen>,
    /// The last reading failed, and said so.
    failed: bool,
}

impl Watch {
    pub fn new(agent: Option<&AgentProcess>, service: &str, backends: &[SocketAddrV4]) -> Self {
        let backends = backends.iter().map(|b| Seen {
            label: b.to_string(),
            state: None,
            moves: [0; 5],
            rst: None,
            weight: None,
        });
        let mut watch = Self {
            reading: agent.is_some(),
            service: service.to_owned(),
            backends: backends.collect(),
            failed: false,
        };
        watch.poll(agent);
        watch
    }

    /// Whether there is an agent to read.
    pub fn reading(&self) -> bool {
        self.reading
    }

    /// How many backends it watches.
    pub fn count(&self) -> usize {
        self.backends.len()
    }

    pub fn label(&self, backend: usize) -> &str {
        &self.backends[backend].label
    }

    /// The backend's breaker state at the last poll.
    pub fn state(&self, backend: usize) -> Option<&'static str> {
        self.backends[backend].state
    }

    /// The backend's effective weight at the last poll.
    pub fn weight(&self, backend: usize) -> Option<u32> {
        self.backends[backend].weight
    }

    /// RSTs the datapath sent toward the backend, cumulative, at the last poll.
    pub fn rst(&self, backend: usize) -> Option<u64> {
        self.backends[backend].rst
    }

    /// Whether every breaker was closed at the last poll (`false` without an agent).
    pub fn all_closed(&self) -> bool {
        self.reading() && self.backends.iter().all(|b| b.state == Some("closed"))
    }

    /// Reads the status of `agent` (the one given to [`Watch::new`]); returns the changes of breaker state (in order) and of
    /// effective weight since the last poll.
    pub fn poll(&mut self, agent: Option<&AgentProcess>) -> Vec<Event> {
        let Some(report) = self.read(agent) else {
            return Vec::new();
        };
        let mut events = Vec::new();
        for (index, seen) in self.backends.iter_mut().enumerate() {
            let label = seen.label.clone();
            let mine = |service: &str, address: &str| service == self.service && address == label;
            if let Some(b) = report
                .backends
                .iter()
                .find(|b| mine(&b.service, &b.address))
            {
                seen.rst = b.id.map(|_| b.action("reject_rst"));
                let moves = MOVES.map(|m| {
                    let key = format!("{}/{}", m.to, m.reason);
                    b.transitions.get(&key).copied().unwrap_or(0)
                });
                let state = b
                    .breaker
                    .as_deref()
                    .and_then(|s| STATES.into_iter().find(|&k| k == s));
                let changes = seen.update(state, moves);
                events.extend(changes.into_iter().map(|(from, to, reason)| {
                    Event::Breaker(Transition {
                        backend: index,
                        from,
                        to,
                        reason,
                    })
                }));
            }
            let lb = report
                .lb_backends
                .iter()
                .find(|b| mine(&b.service, &b.address));
            if let Some(to) = lb.map(|b| b.effective) {
                let from = seen.weight.replace(to);
                if from != Some(to) {
                    events.push(Event::Weight {
                        backend: index,
                        from,
                        to,
                    });
                }
            }
        }
        events
    }

    fn read(&mut self, agent: Option<&AgentProcess>) -> Option<StatusReport> {
        match agent?.status() {
            Ok(report) => {
                self.failed = false;
                Some(report)
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failed, true) {
                    println!("demo: cannot read the agent's status: {e:#}");
                }
                None
            }
        }
    }
}

type Change = (&'static str, &'static str, Option<&'static str>);

impl Seen {
    /// Records a reading; returns every change of state since the last one, in order.
    fn update(&mut self, state: Option<&'static str>, moves: [u64; 5]) -> Vec<Change> {
        let grew = std::array::from_fn(|i| moves[i].saturating_sub(self.moves[i]));
        self.moves = moves;
        let Some(state) = state else {
            return Vec::new();
        };
        let Some(before) = self.state.replace(state) else {
            return Vec::new(); // the first reading: a state, not a change
        };
        let path = replay(before, grew);
        if path.last().map_or(before, |m| m.to) == state {
            path.into_iter()
                .map(|m| (m.from, m.to, Some(m.reason)))
                .collect()
        } else {
            vec![(before, state, None)]
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
        let possible = |i: &usize| grew[*i] > 0 && MOVES[*i].from == state;
        let candidates: Vec<usize> = (0..MOVES.len()).filter(possible).collect();
        let continues = |i: &&usize| {
            let to = MOVES[**i].to;
            (0..MOVES.len()).any(|j| j != **i && grew[j] > 0 && MOVES[j].from == to)
        };
        let Some(&next) = candidates.iter().find(continues).or(candidates.first()) else {
            break;
        };
        grew[next] -= 1;
        state = MOVES[next].to;
        path.push(&MOVES[next]);
    }
    path
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
