//! Checks across sections and across services, on everything that decoded. Positions come
//! from the span index by field path.

use std::collections::HashMap;
use std::net::SocketAddr;

use agent_common::breaker::MAX_BACKENDS;
use agent_common::classify::{MAX_MATCH_RULES, PROTO_TCP};
use agent_common::lb::{MAX_LB_BACKENDS, MAX_LEAST_CONN_BACKENDS};

use super::compile::{backend_protocols, prefix_rules};
use super::decode::{Cx, item};
use super::model::{Algorithm, ConditionKind, Direction, LoadBalancing, Service};
use super::resilience::next_prime;
use super::sections::Draft;
use super::yaml::SpanIndex;

struct Checker<'a> {
    cx: &'a mut Cx,
    spans: &'a SpanIndex,
}

impl Checker<'_> {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        let pos = self.spans.lookup(path);
        self.cx.error(pos, path, message);
    }
}

pub(crate) fn check(draft: &Draft, spans: &SpanIndex, cx: &mut Cx) {
    let mut c = Checker { cx, spans };
    unique_interfaces(&mut c, draft);
    for (i, service) in draft.services() {
        service_sections(&mut c, &item("services", i), service);
    }
    unique_services(&mut c, draft);
    rule_limits(&mut c, draft);
    one_breaker_per_backend(&mut c, draft);
    backend_id_limit(&mut c, draft);
    lb_backend_limit(&mut c, draft);
    shaping_needs_egress(&mut c, draft);
}

fn unique_interfaces(c: &mut Checker<'_>, draft: &Draft) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, interface) in draft.interfaces() {
        if let Some(first) = seen.get(interface.name.as_str()) {
            let msg = format!(
                "interface `{}` is listed twice (also interfaces[{first}])",
                interface.name
            );
            c.error(&format!("interfaces[{i}].name"), msg);
        } else {
            seen.insert(&interface.name, i);
        }
    }
}

/// Rules between the sections of one service.
fn service_sections(c: &mut Checker<'_>, path: &str, s: &Service) {
    if s.backends.is_empty() {
        let sections = [
            ("load_balancing", s.load_balancing.is_some()),
            ("health_check", s.health_check.is_some()),
            ("circuit_breaker", s.circuit_breaker.is_some()),
            ("degradation", s.degradation.is_some()),
        ];
        for (name, present) in sections {
            if present {
                let msg = format!("{name} needs backends; add `backends` or remove {name}");
                c.error(&format!("{path}.{name}"), msg);
            }
        }
        return;
    }

    let lb = s.load_balancing.clone().unwrap_or_default();
    vip(c, path, s, &lb);
    let needed = 100 * s.backends.len() as u64;
    if lb.algorithm == Algorithm::Maglev && u64::from(lb.table_size) < needed {
        let shown = match &s.load_balancing {
            Some(_) => lb.table_size.to_string(),
            None => format!("the default {}", LoadBalancing::default().table_size),
        };
        let next = u32::try_from(needed).map_or(needed, next_prime);
        let msg = format!(
            "table_size {shown} is less than 100 x {} backends; use a prime >= {needed} \
             (e.g. {next}) so every backend gets its share of the Maglev table",
            s.backends.len()
        );
        c.error(&format!("{path}.load_balancing.table_size"), msg);
    }

    if let Some(d) = &s.degradation {
        for (k, cond) in d.conditions.iter().enumerate() {
            let cpath = format!("{path}.degradation.conditions[{k}].type");
            match cond.kind {
                ConditionKind::Latency { .. } if s.health_check.is_none() => {
                    let msg = "latency is measured by health-check probes; add health_check";
                    c.error(&cpath, msg);
                }
                ConditionKind::Availability { .. }
                    if s.health_check.is_none() && s.circuit_breaker.is_none() =>
                {
                    let msg = "availability needs health_check or circuit_breaker: without \
                               them no backend is ever unhealthy";
                    c.error(&cpath, msg);
                }
                _ => {}
            }
        }
    }
}

fn unique_services(c: &mut Checker<'_>, draft: &Draft) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut matches = HashMap::new();
    for (i, s) in draft.services() {
        if let Some(first) = names.get(s.name.as_str()) {
            let msg = format!(
                "duplicate service name `{}` (also services[{first}])",
                s.name
            );
            c.error(&format!("services[{i}].name"), msg);
        } else {
            names.insert(&s.name, i);
        }
        let m = &s.r#match;
        let key = (m.address, m.port, m.protocol);
        if let Some((first, first_name)) = matches.get(&key) {
            let port = m
                .port
                .map_or("every port".to_owned(), |p| format!("port {p}"));
            let msg = format!(
                "ambiguous: services[{first}] (`{first_name}`) has the same match \
                 ({}, {port}, {})",
                m.address, m.protocol
            );
            c.error(&format!("services[{i}].match"), msg);
        } else {
            matches.insert(key, (i, s.name.as_str()));
        }
    }
}

/// The datapath keeps at most `MAX_MATCH_RULES` rules per prefix: its own and those of every
/// covering prefix. Reported at the first service of the prefix that overflows.
fn rule_limits(c: &mut Checker<'_>, draft: &Draft) {
    let services: Vec<(usize, &Service)> = draft.services().collect();
    let table = prefix_rules(services.iter().map(|(i, s)| (*i, &s.r#match)));
    for p in table {
        if p.rules.len() <= MAX_MATCH_RULES {
            continue;
        }
        let Some(owner) = services.iter().find(|(_, s)| s.r#match.address == p.prefix) else {
            continue;
        };
        let names: Vec<String> = p
            .rules
            .iter()
            .filter_map(|(i, _)| services.iter().find(|(j, _)| j == i))
            .map(|(_, s)| s.name.clone())
            .collect();
        let msg = format!(
            "service `{}`: {} rules apply to {} (its own and those of covering prefixes: {}); \
             the datapath matches at most {MAX_MATCH_RULES} rules per prefix",
            owner.1.name,
            p.rules.len(),
            p.prefix,
            names.join(", ")
        );
        c.error(&format!("services[{}].match.address", owner.0), msg);
    }
}

/// The datapath keys breaker state by where packets go (backend address, port, protocol): two
/// services with breakers on one backend would overwrite each other's state, so v1 allows one.
/// Reported at the later backend, once per backend even when both protocols collide.
fn one_breaker_per_backend(c: &mut Checker<'_>, draft: &Draft) {
    let mut owners: HashMap<(SocketAddr, u8), (usize, &str)> = HashMap::new();
    for (i, s) in draft
        .services()
        .filter(|(_, s)| s.circuit_breaker.is_some())
    {
        let protocols = backend_protocols(s.r#match.protocol);
        for (k, b) in s.backends.iter().enumerate() {
            let clash = protocols
                .iter()
                .find_map(|p| owners.get(&(b.address, *p)).map(|o| (*p, *o)));
            if let Some((proto, (first, first_name))) = clash {
                let proto = if proto == PROTO_TCP { "tcp" } else { "udp" };
                let msg = format!(
                    "backend {} already has a circuit breaker for {proto} in services[{first}] \
                     (`{first_name}`); a backend address can have one breaker per protocol",
                    b.address
                );
                c.error(&format!("services[{i}].backends[{k}].address"), msg);
                continue;
            }
            for p in protocols {
                owners.insert((b.address, *p), (i, s.name.as_str()));
            }
        }
    }
}

/// Every backend with a breaker gets an id (its counters in `BACKEND_STATS`, sized for
/// `MAX_BACKENDS`; `BACKENDS` holds two keys for each, TCP and UDP). Reported once, at the
/// breaker of the service that crosses the limit.
fn backend_id_limit(c: &mut Checker<'_>, draft: &Draft) {
    let with_breaker: Vec<(usize, &Service)> = draft
        .services()
        .filter(|(_, s)| s.circuit_breaker.is_some())
        .collect();
    let total: usize = with_breaker.iter().map(|(_, s)| s.backends.len()).sum();
    let mut running = 0;
    for (i, s) in with_breaker {
        running += s.backends.len();
        if running > MAX_BACKENDS as usize {
            let msg = format!(
                "services with circuit_breaker have {total} backends in all; the datapath \
                 enforces breakers for at most {MAX_BACKENDS}"
            );
            c.error(&format!("services[{i}].circuit_breaker"), msg);
            return;
        }
    }
}

/// A service balanced in the kernel (`load_balancing.vip`, the default with backends): the
/// packets its `match` selects are rewritten toward a backend, so no backend may itself be
/// one of them (its traffic would be balanced again), and every backend must be of the
/// match's IP family (addresses are rewritten in place).
fn vip(c: &mut Checker<'_>, path: &str, s: &Service, lb: &LoadBalancing) {
    if !lb.vip {
        return;
    }
    let m = &s.r#match;
    for (k, b) in s.backends.iter().enumerate() {
        let bpath = format!("{path}.backends[{k}].address");
        if b.address.is_ipv4() != m.address.addr().is_ipv4() {
            let msg = format!(
                "backend {} and the VIP {} are of different IP families; the datapath \
                 rewrites addresses in place and cannot translate between them",
                b.address, m.address
            );
            c.error(&bpath, msg);
        } else if m.address.contains(b.address.ip()) && m.port.is_none_or(|p| p == b.address.port())
        {
            let msg = format!(
                "backend {} is itself matched by the VIP (match {}{}): its traffic would be \
                 balanced again; give the service an address of its own, or set \
                 load_balancing.vip: false to enforce breakers on traffic addressed to the \
                 backends themselves",
                b.address,
                m.address,
                m.port.map_or(String::new(), |p| format!(" port {p}")),
            );
            c.error(&bpath, msg);
        }
    }
    if lb.algorithm == Algorithm::LeastConn && s.backends.len() > MAX_LEAST_CONN_BACKENDS as usize {
        let msg = format!(
            "least_conn scans every backend of a new flow in the datapath, at most \
             {MAX_LEAST_CONN_BACKENDS}; this service has {} (use maglev or \
             weighted_round_robin)",
            s.backends.len()
        );
        c.error(&format!("{path}.load_balancing.algorithm"), msg);
    }
}

/// Backends of balanced services share `LB_BACKENDS` (`MAX_LB_BACKENDS`). Reported once, at
/// the service that crosses the limit.
fn lb_backend_limit(c: &mut Checker<'_>, draft: &Draft) {
    let mut running = 0;
    for (i, s) in draft.services() {
        if !s.backends.is_empty() && s.load_balancing.clone().unwrap_or_default().vip {
            running += s.backends.len();
            if running > MAX_LB_BACKENDS as usize {
                let msg = format!(
                    "balanced services (load_balancing.vip) have more than {MAX_LB_BACKENDS} \
                     backends in all, the most the datapath balances to"
                );
                c.error(&format!("services[{i}].backends"), msg);
                return;
            }
        }
    }
}

/// Pacing happens on egress: a policy that shapes with no egress hook would do nothing.
fn shaping_needs_egress(c: &mut Checker<'_>, draft: &Draft) {
    let egress = draft
        .interfaces()
        .any(|(_, i)| matches!(i.direction, Direction::Egress | Direction::Both));
    let all_decoded = draft
        .interfaces
        .as_ref()
        .is_some_and(|v| v.iter().all(Option::is_some));
    if egress || !all_decoded {
        return;
    }
    for (i, s) in draft.services() {
        if s.shaping.is_some() {
            let msg = "shaping paces egress traffic, but no interface has direction egress or both";
            c.error(&format!("services[{i}].shaping"), msg);
        }
    }
}
