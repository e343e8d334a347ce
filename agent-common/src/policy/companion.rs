//! Companion services: the fallback backends of a degradable service (`degradation.fallback`
//! with `static_response` or `cache_only`) are balanced, health-checked and guarded by
//! breakers like any service's, so the loaded policy lists them as one more service after
//! the file's, named `<name>.fallback` (`.` is not in the names a file may give). No packet
//! is classified into a companion: the datapath sends a degraded service's new flows to its
//! companion's backends (`agent_common::degrade`), and the companion's rate limit, the
//! `fallback.rate_limit`, is in force for the service while it is degraded.

use super::model::{FallbackStrategy, Policy, Service};

/// What a companion's name adds to its service's.
pub const COMPANION_SUFFIX: &str = ".fallback";

/// The companion of `parent`, the service at `index` in `services`; `None` when it has no
/// fallback backends (no `degradation`, or `shed`).
pub fn companion(index: usize, parent: &Service) -> Option<Service> {
    let d = parent.degradation.as_ref()?;
    if d.fallback.strategy == FallbackStrategy::Shed || d.fallback.backends.is_empty() {
        return None;
    }
    Some(Service {
        name: format!("{}{COMPANION_SUFFIX}", parent.name),
        r#match: parent.r#match.clone(),
        priority: parent.priority,
        rate_limit: d.fallback.rate_limit.clone(),
        backends: d.fallback.backends.clone(),
        load_balancing: parent.load_balancing.clone(),
        health_check: parent.health_check.clone(),
        circuit_breaker: parent.circuit_breaker.clone(),
        degradation: None,
        shaping: None,
        fallback_of: Some(index),
    })
}

/// The companions of `services` (the file's), in the order of their services.
pub(crate) fn companions(services: &[Service]) -> Vec<Service> {
    (services.iter().enumerate())
        .filter(|(_, s)| s.fallback_of.is_none())
        .filter_map(|(i, s)| companion(i, s))
        .collect()
}

impl Policy {
    /// Appends the companion services (once: a policy that has them is left alone).
    pub(crate) fn add_companions(&mut self) {
        if self.services.iter().any(|s| s.fallback_of.is_some()) {
            return;
        }
        let more = companions(&self.services);
        self.services.extend(more);
    }

    /// The index of the companion of `services[index]`, if it has one.
    pub fn companion_of(&self, index: usize) -> Option<usize> {
        self.services
            .iter()
            .position(|s| s.fallback_of == Some(index))
    }

    /// The services the file lists, with their index (companions left out).
    pub fn file_services(&self) -> impl Iterator<Item = (usize, &Service)> {
        (self.services.iter().enumerate()).filter(|(_, s)| s.fallback_of.is_none())
    }
}

impl Service {
    /// Whether this is a companion service (not in the file, never classified into).
    pub fn is_companion(&self) -> bool {
        self.fallback_of.is_some()
    }
}
