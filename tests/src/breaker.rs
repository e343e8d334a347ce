//! What the agent exports about one service's backend (breaker state, health, probes,
//! datapath actions, passive results), read from `/metrics`, and waiting on it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    agent::{AgentProcess, metric, parse_metrics},
    netns::Netns,
    timing::Scaled,
    wait::poll,
};

/// How often `/metrics` is read while waiting on a backend.
pub const POLL: Duration = Duration::from_millis(10);
/// The breaker states, as `agent_breaker_state{state}` names them.
pub const STATES: [&str; 3] = ["closed", "open", "half_open"];

/// One scrape of `/metrics`, read for one service's backend.
pub struct Scrape {
    text: String,
    service: String,
    backend: String,
}

impl Scrape {
    pub fn new(text: String, service: &str, backend: SocketAddr) -> Scrape {
        Scrape {
            text,
            service: service.to_owned(),
            backend: backend.to_string(),
        }
    }

    /// The sample `name{service, backend, key=value}`.
    fn labelled(&self, name: &str, key: &str, value: &str) -> Option<f64> {
        metric(
            &self.text,
            name,
            &[
                ("service", &self.service),
                ("backend", &self.backend),
                (key, value),
            ],
        )
    }

    /// A sample that must be exported; the panic lists what is exported under that name.
    fn required(&self, name: &str, key: &str, value: &str) -> u64 {
        match self.labelled(name, key, value) {
            Some(v) => v as u64,
            None => {
                let have: Vec<String> = parse_metrics(&self.text)
                    .into_iter()
                    .filter(|s| s.name == name)
                    .map(|s| format!("{:?} = {}", s.labels, s.value))
                    .collect();
                panic!(
                    "{name}{{service={:?},backend={:?},{key}={value:?}}} is not exported; \
                     samples under that name: {have:?}",
                    self.service, self.backend
                )
            }
        }
    }

    /// `agent_backend_datapath_packets_total{action}`.
    pub fn action(&self, action: &str) -> u64 {
        self.required("agent_backend_datapath_packets_total", "action", action)
    }

    /// Like [`Scrape::action`], 0 when not exported (yet): for the "before" side of a delta.
    pub fn action_or_zero(&self, action: &str) -> u64 {
        self.labelled("agent_backend_datapath_packets_total", "action", action)
            .unwrap_or(0.0) as u64
    }

    /// `agent_backend_passive_total{result}`.
    pub fn passive(&self, result: &str) -> u64 {
        self.required("agent_backend_passive_total", "result", result)
    }

    pub fn passive_or_zero(&self, result: &str) -> u64 {
        self.labelled("agent_backend_passive_total", "result", result)
            .unwrap_or(0.0) as u64
    }

    /// Whether `agent_breaker_state{state}` is 1.
    pub fn is_state(&self, state: &str) -> bool {
        self.labelled("agent_breaker_state", "state", state) == Some(1.0)
    }

    /// The breaker state whose `agent_breaker_state` sample is 1.
    pub fn state(&self) -> Option<&'static str> {
        STATES.into_iter().find(|s| self.is_state(s))
    }

    /// `agent_backend_healthy`: 1 healthy, 0 not; `None` before the first verdict.
    pub fn healthy(&self) -> Option<f64> {
        metric(
            &self.text,
            "agent_backend_healthy",
            &[("service", &self.service), ("backend", &self.backend)],
        )
    }

    /// Active probes by outcome: (successes, failures of any reason).
    pub fn probes(&self) -> (u64, u64) {
        let mut ok = 0;
        let mut failed = 0;
        for s in parse_metrics(&self.text) {
            if s.name != "agent_probes_total" {
                continue;
            }
            let get = |k: &str| s.labels.iter().find(|(sk, _)| sk == k).map(|(_, v)| v);
            if get("service") != Some(&self.service) || get("backend") != Some(&self.backend) {
                continue;
            }
            match get("result").map(String::as_str) {
                Some("success") => ok += s.value as u64,
                _ => failed += s.value as u64,
            }
        }
        (ok, failed)
    }
}

/// The agent's view of one service's backend.
pub struct BackendView<'a> {
    agent: &'a AgentProcess,
    service: String,
    backend: SocketAddr,
}

impl BackendView<'_> {
    pub fn new<'a>(agent: &'a AgentProcess, service: &str, backend: SocketAddr) -> BackendView<'a> {
        BackendView {
            agent,
            service: service.to_owned(),
            backend,
        }
    }

    pub fn scrape(&self) -> Result<Scrape> {
        Ok(Scrape::new(
            self.agent.metrics()?,
            &self.service,
            self.backend,
        ))
    }

    /// Reads `/metrics` every [`POLL`] until `cond` holds on a scrape; returns the time from
    /// `since` to that scrape, and the scrape. An error once `limit` (scaled) has passed since
    /// `since`, naming `what` and the last state seen; at once if `/metrics` cannot be read.
    pub fn wait(
        &self,
        what: &str,
        since: Instant,
        limit: Scaled,
        mut cond: impl FnMut(&Scrape) -> bool,
    ) -> Result<(Duration, Scrape)> {
        let done = |s: &Result<Scrape>| s.as_ref().map_or(true, &mut cond);
        match poll(since, limit, POLL, || self.scrape(), done) {
            Ok((took, s)) => Ok((took, s?)),
            Err(s) => {
                let s = s?;
                bail!(
                    "{what}: not within {limit}; last seen: breaker {:?}, healthy {:?}, \
                     probes (ok, failed) {:?}",
                    s.state(),
                    s.healthy(),
                    s.probes()
                )
            }
        }
    }

    /// Waits until the breaker is in `state`.
    pub fn wait_state(
        &self,
        state: &str,
        since: Instant,
        limit: Scaled,
    ) -> Result<(Duration, Scrape)> {
        self.wait(
            &format!("breaker of {} {state}", self.backend),
            since,
            limit,
            |s| s.state() == Some(state),
        )
    }
}

/// Starts `attempt` every `every`, each on a thread of its own in `ns`, until one returns
/// true; the returned thread yields the time from `since` to the end of that attempt, or
/// `None` once `give_up` has passed since `since`. Overlapping attempts keep the resolution at
/// `every` whatever an attempt's own timeout: back to back, an attempt started just before
/// the change would hide it for its whole timeout. The attempts still running at the end
/// finish on their own (bound them with a timeout of their own).
pub fn first_hit(
    ns: &Netns,
    every: Duration,
    since: Instant,
    give_up: Duration,
    attempt: impl Fn() -> bool + Send + Sync + 'static,
) -> Result<JoinHandle<Option<Duration>>> {
    let attempt = Arc::new(attempt);
    ns.spawn(move || {
        let (tx, rx) = std::sync::mpsc::channel();
        let done = Arc::new(AtomicBool::new(false));
        while since.elapsed() < give_up {
            let (tx, stop, attempt) = (tx.clone(), done.clone(), attempt.clone());
            // Threads inherit this thread's network namespace.
            std::thread::spawn(move || {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let hit = attempt();
                let took = since.elapsed();
                if hit {
                    let _ = tx.send(took);
                }
            });
            if let Ok(took) = rx.recv_timeout(every) {
                done.store(true, Ordering::Relaxed);
                return Some(took);
            }
        }
        None
    })
}
