//! What the act reads from the agent: per backend, its breaker (state and changes, as the
//! breaker act reads them) and its effective weight in the datapath's tables, scraped from
//! /metrics every tick.

use std::time::Duration;

use super::plan::LbPlan;
use crate::demo::{
    breaker::watch::{BreakerSeen, Transition},
    metrics::{self, EFFECTIVE_WEIGHT},
    netns::Netns,
};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);

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
    breaker: BreakerSeen,
    weight: Option<u32>,
}

pub struct Watch<'a> {
    client: &'a Netns,
    plan: &'a LbPlan,
    backends: Vec<Seen>,
    /// The last scrape's error, once printed.
    scrape_failed: bool,
}

impl<'a> Watch<'a> {
    pub fn new(client: &'a Netns, plan: &'a LbPlan) -> Self {
        let backends = plan.backends().iter().map(|b| Seen {
            label: b.to_string(),
            breaker: BreakerSeen::default(),
            weight: None,
        });
        let mut watch = Self {
            client,
            plan,
            backends: backends.collect(),
            scrape_failed: false,
        };
        watch.poll();
        watch
    }

    /// The backend's breaker state at the last poll.
    pub fn state(&self, backend: usize) -> Option<&'static str> {
        self.backends[backend].breaker.state
    }

    /// The backend's effective weight at the last poll.
    pub fn weight(&self, backend: usize) -> Option<u32> {
        self.backends[backend].weight
    }

    /// Scrapes /metrics; returns the changes of breaker state (in order) and of effective
    /// weight since the last poll.
    pub fn poll(&mut self) -> Vec<Event> {
        let samples =
            match metrics::scrape(self.client, self.plan.breaker.agent.listen, SCRAPE_TIMEOUT) {
                Ok(samples) => {
                    self.scrape_failed = false;
                    samples
                }
                Err(e) => {
                    if !std::mem::replace(&mut self.scrape_failed, true) {
                        println!("demo: cannot read agent metrics: {e}");
                    }
                    return Vec::new();
                }
            };
        let service = self.plan.service();
        let mut events = Vec::new();
        for (backend, seen) in self.backends.iter_mut().enumerate() {
            let label = &seen.label;
            let changes = seen.breaker.update(&samples, service, label, backend);
            events.extend(changes.into_iter().map(Event::Breaker));
            let weight = metrics::backend_total(&samples, &EFFECTIVE_WEIGHT, service, label);
            // A weight is a small whole number (0 to 1000).
            let Some(weight) = weight.map(|w| w as u32) else {
                continue;
            };
            let from = seen.weight.replace(weight);
            if from != Some(weight) {
                events.push(Event::Weight {
                    backend,
                    from,
                    to: weight,
                });
            }
        }
        events
    }
}
