//! What serde cannot check: required fields, rules between the fields of a section, and
//! rules across sections and services. Positions come from the index by field path.
//!
//! Reading has already reported every wrong value (read.rs); a check whose inputs were
//! reported is skipped, so a placeholder never causes a second, spurious error. Checks across
//! services see only the services (and interfaces) that read without errors, as before.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::ServiceConfig;
use crate::classify::{MAX_MATCH_RULES, PROTO_TCP};
use crate::lb::{MAX_LEAST_CONN_BACKENDS, default_maglev_size, is_prime, next_prime};
use crate::limit::{RL_KEY_FLOW, RL_UNIT_BYTES, RL_UNIT_PACKETS};

use super::companion::companion;
use super::error::{Diagnostic, display_path};
use super::model::*;
use super::read::{Index, Pos, child};
use super::rules::{backend_protocols, prefix_rules};

/// Above this a packet costs 0 ns in the datapath's arithmetic and nothing is limited.
const MAX_PACKET_RATE: u64 = 1_000_000_000;

pub(crate) struct Checker<'a> {
    file: &'a str,
    index: &'a Index,
    /// Paths with an error: checks that read them (or a part of them) are skipped.
    bad: Vec<String>,
    pub diags: Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    pub fn new(file: &'a str, index: &'a Index) -> Checker<'a> {
        Checker {
            file,
            index,
            bad: Vec::new(),
            diags: Vec::new(),
        }
    }

    /// An error about `path`, at `pos`.
    pub fn error_at(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.bad.push(path.to_owned());
        self.diags.push(Diagnostic {
            file: self.file.to_owned(),
            line: pos.line,
            column: pos.column,
            path: display_path(path),
            message: message.into(),
        });
    }

    /// An error about `path`, at its value (or the closest enclosing one in the file).
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.error_at(self.index.lookup(path), path, message);
    }

    /// No error so far in `path`, in a part of it, or in what encloses it.
    fn ok(&self, path: &str) -> bool {
        let within = |inner: &str, outer: &str| {
            inner.strip_prefix(outer).is_some_and(|rest| {
                outer.is_empty() || rest.is_empty() || rest.starts_with(['.', '['])
            })
        };
        !self.bad.iter().any(|b| within(b, path) || within(path, b))
    }

    fn has(&self, path: &str) -> bool {
        self.index.has(path)
    }

    /// Reports each of `fields` of the mapping at `path` that the file leaves out.
    fn require(&mut self, path: &str, fields: &[&str]) {
        for f in fields {
            let p = child(path, f);
            if !self.has(&p) {
                self.error(&p, "required field is missing");
            }
        }
    }
}

/// Every check, on a policy as read; resolves what the file may leave to the policy
/// (`rate_limit.burst`).
pub(crate) fn check(p: &mut Policy, c: &mut Checker<'_>) {
    c.require("", &["version", "interfaces", "services"]);
    for (i, _) in p.interfaces.iter().enumerate() {
        c.require(&format!("interfaces[{i}]"), &["name"]);
    }
    non_empty(c, "interfaces", p.interfaces.is_empty(), "interface");
    non_empty(c, "services", p.services.is_empty(), "service");
    // Limits from `agent.tables` that could not be read are reported there; the defaults
    // stand in for them here.
    let mut tables = p.agent.tables;
    for (path, limit, default) in [
        (
            "agent.tables.services",
            &mut tables.services,
            Tables::default().services,
        ),
        (
            "agent.tables.backends",
            &mut tables.backends,
            Tables::default().backends,
        ),
    ] {
        if !c.ok(path) {
            *limit = default;
        }
    }
    if p.services.len() > tables.services as usize {
        let msg = format!(
            "{} services; agent.tables.services allows {} (raise it, up to {})",
            p.services.len(),
            tables.services,
            crate::maps::MAX_TABLE_LIMIT
        );
        c.error(&format!("services[{}]", tables.services), msg);
    }
    for (i, s) in p.services.iter_mut().enumerate() {
        service(c, &format!("services[{i}]"), s);
    }
    // The companions of the services that read without errors: they take breakers, balanced
    // backends and keys like the file's services (`super::companion`).
    let companions: Vec<(usize, Service)> = (p.services.iter().enumerate())
        .filter(|(i, _)| c.ok(&format!("services[{i}]")))
        .filter_map(|(i, s)| companion(i, s).map(|k| (i, k)))
        .collect();
    let draft = Draft {
        interfaces: (p.interfaces.iter().enumerate())
            .filter(|(i, _)| c.ok(&format!("interfaces[{i}]")))
            .collect(),
        services: (p.services.iter().enumerate())
            .filter(|(i, _)| c.ok(&format!("services[{i}]")))
            .collect(),
        companions: companions.iter().map(|(i, s)| (*i, s)).collect(),
        all_interfaces: c.ok("interfaces"),
    };
    unique_interfaces(c, &draft);
    for (i, service) in draft.services() {
        service_sections(c, &format!("services[{i}]"), service);
    }
    unique_services(c, &draft);
    rule_limits(c, &draft);
    one_breaker_per_backend(c, &draft);
    backend_id_limit(c, &draft, tables.backends);
    lb_backend_limit(c, &draft, tables.backends);
    shaping_needs_egress(c, &draft);
    key_tables(c, &draft, &tables);
    not_enforced(c, &draft, NOT_ENFORCED);
}

/// Service sections this build validates but does not enforce, as `(section, why)`: each
/// one a policy sets is refused (`FIELD: not enforced by this build`), never silently
/// accepted. Empty: every section of POLICY.md is enforced.
const NOT_ENFORCED: &[(&str, &str)] = &[];

fn not_enforced(c: &mut Checker<'_>, draft: &Draft<'_>, sections: &[(&str, &str)]) {
    for (i, _) in draft.services() {
        for (section, why) in sections {
            let path = format!("services[{i}].{section}");
            if c.has(&path) {
                let why = if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({why})")
                };
                c.error(&path, format!("not enforced by this build{why}"));
            }
        }
    }
}

/// `agent.tables.keys` and `.departures`, when set, hold at least the services' totals.
fn key_tables(c: &mut Checker<'_>, draft: &Draft<'_>, tables: &Tables) {
    let limits = draft
        .all_services()
        .map(|(_, s)| s.rate_limit.as_ref().map(|r| r.max_keys));
    let shaped = draft
        .services()
        .map(|(_, s)| s.shaping.as_ref().map(|s| s.max_keys));
    for (path, set, total, what) in [
        (
            "agent.tables.keys",
            tables.keys,
            limits.flatten().map(u64::from).sum::<u64>(),
            "rate_limit.max_keys",
        ),
        (
            "agent.tables.departures",
            tables.departures,
            shaped.flatten().map(u64::from).sum::<u64>(),
            "shaping.max_keys",
        ),
    ] {
        if let Some(n) = set
            && u64::from(n) < total
            && c.ok(path)
        {
            c.error(
                path,
                format!(
                    "{n} entries, fewer than the services' total of {what} ({total}); raise it \
                     or lower max_keys"
                ),
            );
        }
    }
}

/// "at least one" for a list the file gives (an absent one is reported as missing).
fn non_empty(c: &mut Checker<'_>, path: &str, empty: bool, what: &str) {
    if empty && c.has(path) && c.ok(path) {
        c.error(path, format!("at least one {what} is required"));
    }
}

/// The checks within one service: its own sections, each on its own.
fn service(c: &mut Checker<'_>, path: &str, s: &mut Service) {
    c.require(path, &["name", "match"]);
    let m = child(path, "match");
    if c.has(&m) {
        c.require(&m, &["address"]);
    }
    backends(c, &child(path, "backends"), &s.backends);
    if let Some(rl) = &mut s.rate_limit {
        rate_limit(c, &child(path, "rate_limit"), rl);
    }
    if let Some(lb) = &s.load_balancing {
        load_balancing(c, &child(path, "load_balancing"), lb);
    }
    if let Some(hc) = &s.health_check {
        health_check(c, &child(path, "health_check"), hc);
    }
    if let Some(cb) = &s.circuit_breaker {
        let p = child(path, "circuit_breaker");
        let (reset, max) = (child(&p, "reset_timeout"), child(&p, "max_reset_timeout"));
        if c.ok(&reset) && c.ok(&max) && cb.reset_timeout > cb.max_reset_timeout {
            let msg = format!(
                "reset_timeout ({}) must not be longer than max_reset_timeout ({})",
                show(cb.reset_timeout),
                show(cb.max_reset_timeout)
            );
            c.error(&reset, msg);
        }
    }
    if let Some(d) = &mut s.degradation {
        degradation(c, &child(path, "degradation"), d);
    }
    if let Some(sh) = &s.shaping {
        let p = child(path, "shaping");
        c.require(&p, &["rate"]);
        let rate = child(&p, "rate");
        if c.has(&rate) && c.ok(&rate) {
            match sh.rate {
                Rate::Packets(_) => c.error(
                    &rate,
                    "pacing spaces bytes; use a bit or byte rate like 100Mbit/s",
                ),
                Rate::Bytes(0) => c.error(&rate, "must be greater than 0"),
                Rate::Bytes(_) => {}
            }
        }
    }
}

/// A list of backends (also `degradation.fallback.backends`); duplicates are refused because
/// a backend listed twice silently gets twice its weight.
fn backends(c: &mut Checker<'_>, path: &str, backends: &[Backend]) {
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, b) in backends.iter().enumerate() {
        let p = format!("{path}[{i}]");
        c.require(&p, &["address"]);
        if !c.ok(&p) {
            continue;
        }
        match seen.get(&b.address) {
            Some(first) => {
                let msg = format!("duplicate backend {} (also {path}[{first}])", b.address);
                c.error(&child(&p, "address"), msg);
            }
            None => {
                seen.insert(b.address, i);
            }
        }
    }
}

/// Resolves the burst (one second of `rate` when the file gives none) and checks that the
/// bucket fits the datapath.
fn rate_limit(c: &mut Checker<'_>, path: &str, rl: &mut RateLimit) {
    c.require(path, &["rate"]);
    let (rate, burst) = (child(path, "rate"), child(path, "burst"));
    if !c.has(&rate) || !c.ok(&rate) {
        return;
    }
    if rl.rate.per_second() == 0 {
        return c.error(&rate, "must be greater than 0");
    }
    if let Rate::Packets(r) = rl.rate
        && r > MAX_PACKET_RATE
    {
        let msg = format!(
            "must be at most {MAX_PACKET_RATE}/s: the datapath charges a packet in whole \
             nanoseconds"
        );
        return c.error(&rate, msg);
    }
    if !c.ok(&burst) {
        return;
    }
    let given = c.has(&burst);
    if !given {
        rl.burst = rl.rate.per_second();
    }
    let (r, b) = (rl.rate, rl.burst);
    if r.is_bytes() && b < MIN_BYTE_BURST {
        let msg = if given {
            format!(
                "must be at least {MIN_BYTE_BURST} bytes (one full frame) with a byte rate, \
                 or no full-size packet ever passes"
            )
        } else {
            format!(
                "the default burst (one second of {r} = {b} bytes) is less than one full \
                 frame; set burst to at least {MIN_BYTE_BURST}"
            )
        };
        return c.error(&burst, msg);
    }
    let unit = if r.is_bytes() {
        RL_UNIT_BYTES
    } else {
        RL_UNIT_PACKETS
    };
    if ServiceConfig::with_rate_limit(RL_KEY_FLOW, unit, r.per_second(), b).is_none() {
        let msg = format!("burst {b} at {r} is more tokens than the datapath can hold");
        c.error(&burst, msg);
    }
}

fn load_balancing(c: &mut Checker<'_>, path: &str, lb: &LoadBalancing) {
    if lb.max_connections.is_some() {
        let msg = "no longer a setting: balanced flows are tracked in one node-wide table, \
                   sized by agent.tables.connections; remove it";
        c.error(&child(path, "max_connections"), msg);
    }
    let table = child(path, "table_size");
    let Some(size) = lb.table_size else {
        return;
    };
    if !c.ok(&table) {
        return;
    }
    if !is_prime(size) {
        let msg = format!(
            "{size} is not prime; Maglev needs a prime table size (next prime: {})",
            next_prime(size)
        );
        c.error(&table, msg);
    } else if c.ok(&child(path, "algorithm")) && lb.algorithm != Algorithm::Maglev {
        let msg = format!(
            "table_size applies only to algorithm maglev, not {}",
            lb.algorithm
        );
        c.error(&table, msg);
    }
}

fn health_check(c: &mut Checker<'_>, path: &str, hc: &HealthCheck) {
    // Fields that only an http check reads: setting them on a tcp check is a mistake.
    if c.ok(&child(path, "type")) && hc.r#type == CheckType::Tcp {
        for field in ["path", "host", "expected_status"] {
            let p = child(path, field);
            if c.has(&p) {
                c.error(&p, format!("`{field}` applies only to type http"));
            }
        }
    }
    // How each duration reads in a message: "(default 500ms)" when the file does not set it.
    let shown = |c: &Checker<'_>, field: &str, v: Duration| {
        if c.has(&child(path, field)) {
            show(v)
        } else {
            format!("default {}", show(v))
        }
    };
    let timeout = child(path, "timeout");
    if c.ok(&timeout) {
        for (name, limit) in [
            ("interval", hc.interval),
            ("unhealthy_interval", hc.unhealthy_interval),
        ] {
            if c.ok(&child(path, name)) && hc.timeout >= limit {
                let msg = format!(
                    "timeout ({}) must be shorter than {name} ({})",
                    shown(c, "timeout", hc.timeout),
                    shown(c, name, limit)
                );
                c.error(&timeout, msg);
            }
        }
    }
    let retry = child(path, "retry");
    let initial = child(&retry, "initial_backoff");
    if c.ok(&initial)
        && c.ok(&child(&retry, "max_backoff"))
        && hc.retry.initial_backoff > hc.retry.max_backoff
    {
        let msg = format!(
            "initial_backoff ({}) must not be longer than max_backoff ({})",
            show(hc.retry.initial_backoff),
            show(hc.retry.max_backoff)
        );
        c.error(&initial, msg);
    }
}

fn degradation(c: &mut Checker<'_>, path: &str, d: &mut Degradation) {
    c.require(path, &["conditions"]);
    let conditions = child(path, "conditions");
    non_empty(c, &conditions, d.conditions.is_empty(), "condition");
    for (i, cond) in d.conditions.iter().enumerate() {
        let cpath = format!("{conditions}[{i}]");
        c.require(&cpath, &["type"]);
        let threshold = child(&cpath, "threshold");
        if !c.ok(&cpath) {
            continue;
        }
        match cond.kind {
            // A share of failures above 100% is never seen: the condition could never hold.
            ConditionKind::ErrorRate { threshold: t } if t == Percent::FULL => c.error(
                &threshold,
                "error_rate is met when the failed share is above the threshold, which 100% \
                 never is; use a threshold below 100%",
            ),
            ConditionKind::Availability { threshold: t } if t == Percent::whole(0) => c.error(
                &threshold,
                "availability is met when the available share is below the threshold, which \
                 0% never is; use a threshold above 0%",
            ),
            _ => {}
        }
    }
    let f = child(path, "fallback");
    let list = child(&f, "backends");
    backends(c, &list, &d.fallback.backends);
    let shed = d.fallback.strategy == FallbackStrategy::Shed;
    if let Some(rl) = &mut d.fallback.rate_limit {
        let rpath = child(&f, "rate_limit");
        if shed && c.ok(&child(&f, "strategy")) {
            c.error(
                &rpath,
                "not used with strategy shed, which refuses the service's new flows; remove it",
            );
        } else {
            rate_limit(c, &rpath, rl);
        }
    }
    if c.ok(&child(&f, "strategy")) && c.ok(&list) {
        let shed = d.fallback.strategy == FallbackStrategy::Shed;
        if !shed && d.fallback.backends.is_empty() {
            // The default strategy (static_response) needs backends, so a missing fallback
            // is an error, not a silent "shed".
            c.error(
                &list,
                "required unless strategy is shed: where traffic goes while degraded",
            );
        }
        if shed && !d.fallback.backends.is_empty() {
            c.error(
                &list,
                "not used with strategy shed, which drops the traffic; remove them",
            );
        }
    }
}

/// How a duration reads in a message, in its largest whole unit: `500ms`, `10m`, `1500ms`.
pub(crate) fn show(d: Duration) -> String {
    let ns = d.as_nanos();
    let units: [(u128, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    match units.iter().find(|(n, _)| ns != 0 && ns.is_multiple_of(*n)) {
        Some((n, unit)) => format!("{}{unit}", ns / n),
        None => "0s".into(),
    }
}

/// The services and interfaces that read without errors, with their index in the file.
struct Draft<'a> {
    interfaces: Vec<(usize, &'a Interface)>,
    services: Vec<(usize, &'a Service)>,
    /// The companions of `services`, by the index of their service.
    companions: Vec<(usize, &'a Service)>,
    /// Every interface read without errors.
    all_interfaces: bool,
}

impl<'a> Draft<'a> {
    /// The file's services.
    fn services(&self) -> impl Iterator<Item = (usize, &'a Service)> + '_ {
        self.services.iter().copied()
    }

    /// The file's services, then the companions, each with the path errors about its
    /// backends go under: `services[i]`, or `services[i].degradation.fallback` for the
    /// companion of `services[i]`.
    fn all_services(&self) -> impl Iterator<Item = (String, &'a Service)> + '_ {
        let file = self.services().map(|(i, s)| (format!("services[{i}]"), s));
        let companions = (self.companions.iter())
            .map(|(i, s)| (format!("services[{i}].degradation.fallback"), *s));
        file.chain(companions)
    }

    fn interfaces(&self) -> impl Iterator<Item = (usize, &'a Interface)> + '_ {
        self.interfaces.iter().copied()
    }
}

fn unique_interfaces(c: &mut Checker<'_>, draft: &Draft<'_>) {
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
    maglev_table(c, &format!("{path}.load_balancing.table_size"), s, &lb);

    if let Some(d) = &s.degradation {
        degradation_sections(c, path, s, d, &lb);
    }
    if s.priority != Priority::Core
        && c.ok(&format!("{path}.priority"))
        && s.degradation
            .as_ref()
            .is_none_or(|d| d.fallback.strategy != FallbackStrategy::Shed)
    {
        let msg = format!(
            "priority {} orders shedding, and only services with degradation.fallback.strategy: \
             shed are ever shed; this one never is (remove priority, or make it shed)",
            s.priority
        );
        c.error(&format!("{path}.priority"), msg);
    }
}

/// A Maglev table of at least 100 entries per backend of `s` (reported at `at`).
fn maglev_table(c: &mut Checker<'_>, at: &str, s: &Service, lb: &LoadBalancing) {
    let needed = 100 * s.backends.len() as u64;
    let short = match lb.table_size {
        Some(size) => u64::from(size) < needed,
        None => default_maglev_size(s.backends.len()).is_none_or(|m| m > MAX_TABLE_ENTRIES),
    };
    if lb.algorithm == Algorithm::Maglev && short {
        let shown = match lb.table_size {
            Some(size) => size.to_string(),
            None => "the default".into(),
        };
        let next = u32::try_from(needed).map_or(needed, next_prime);
        let whose = if s.is_companion() { " fallback" } else { "" };
        let msg = format!(
            "table_size {shown} is less than 100 x {}{whose} backends; use a prime >= {needed} \
             (e.g. {next}) so every backend gets its share of the Maglev table",
            s.backends.len()
        );
        c.error(at, msg);
    }
}

/// Rules between `degradation` and the service's other sections.
fn degradation_sections(
    c: &mut Checker<'_>,
    path: &str,
    s: &Service,
    d: &Degradation,
    lb: &LoadBalancing,
) {
    let f = format!("{path}.degradation.fallback");
    let strategy = child(&f, "strategy");
    if d.fallback.strategy != FallbackStrategy::Shed && c.ok(&strategy) && c.ok(&f) {
        if !lb.vip {
            let msg = format!(
                "{} sends new flows to the fallback backends by rewriting the VIP (DNAT); \
                 the service needs load_balancing.vip: true (or use strategy shed)",
                d.fallback.strategy
            );
            c.error(&strategy, msg);
        } else if let Some(k) = companion(0, s) {
            // The companion is balanced like the service: the same rules on its backends.
            vip(c, &f, &k, lb);
            maglev_table(c, &format!("{path}.load_balancing.table_size"), &k, lb);
        }
    }
    let hc = s.health_check.as_ref();
    for (k, cond) in d.conditions.iter().enumerate() {
        let cpath = format!("{path}.degradation.conditions[{k}]");
        if !c.ok(&cpath) {
            continue;
        }
        if let (Some(hc), true) = (hc, c.ok(&format!("{path}.health_check"))) {
            if cond.window < hc.interval {
                let msg = format!(
                    "window {} is shorter than health_check.interval {}: it would hold at most \
                     one probe; use a window of several intervals",
                    show(cond.window),
                    show(hc.interval)
                );
                c.error(&child(&cpath, "window"), msg);
            }
            if let ConditionKind::Latency { threshold } = cond.kind
                && threshold > hc.timeout
            {
                let msg = format!(
                    "threshold {} is above health_check.timeout {}: a probe is cut at the \
                     timeout, so a longer latency is never measured; lower the threshold or \
                     raise the timeout",
                    show(threshold),
                    show(hc.timeout)
                );
                c.error(&child(&cpath, "threshold"), msg);
            }
        }
    }
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

fn unique_services(c: &mut Checker<'_>, draft: &Draft<'_>) {
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
fn rule_limits(c: &mut Checker<'_>, draft: &Draft<'_>) {
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
fn one_breaker_per_backend(c: &mut Checker<'_>, draft: &Draft<'_>) {
    let mut owners: HashMap<(SocketAddr, u8), (String, &str)> = HashMap::new();
    for (i, s) in draft
        .all_services()
        .filter(|(_, s)| s.circuit_breaker.is_some())
    {
        let protocols = backend_protocols(s.r#match.protocol);
        for (k, b) in s.backends.iter().enumerate() {
            let clash = protocols
                .iter()
                .find_map(|p| owners.get(&(b.address, *p)).map(|o| (*p, o.clone())));
            if let Some((proto, (first, first_name))) = clash {
                let proto = if proto == PROTO_TCP { "tcp" } else { "udp" };
                let msg = format!(
                    "backend {} already has a circuit breaker for {proto} in {first} \
                     (`{first_name}`); a backend address can have one breaker per protocol",
                    b.address
                );
                c.error(&format!("{i}.backends[{k}].address"), msg);
                continue;
            }
            for p in protocols {
                owners.insert((b.address, *p), (i.clone(), s.name.as_str()));
            }
        }
    }
}

/// Every backend with a breaker gets an id (its counters in `BACKEND_STATS`, sized for
/// `agent.tables.backends`; `BACKENDS` holds two keys for each, TCP and UDP). Reported once,
/// at the breaker of the service that crosses the limit.
fn backend_id_limit(c: &mut Checker<'_>, draft: &Draft<'_>, limit: u32) {
    let with_breaker: Vec<(String, &Service)> = draft
        .all_services()
        .filter(|(_, s)| s.circuit_breaker.is_some())
        .collect();
    let total: usize = with_breaker.iter().map(|(_, s)| s.backends.len()).sum();
    let mut running = 0;
    for (i, s) in with_breaker {
        running += s.backends.len();
        if running > limit as usize {
            let msg = format!(
                "services with circuit_breaker have {total} backends in all; \
                 agent.tables.backends allows {limit} (raise it, up to {})",
                crate::maps::MAX_TABLE_LIMIT
            );
            c.error(&format!("{i}.circuit_breaker"), msg);
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

/// Backends of balanced services share `LB_BACKENDS` (`agent.tables.backends`). Reported once,
/// at the service that crosses the limit.
fn lb_backend_limit(c: &mut Checker<'_>, draft: &Draft<'_>, limit: u32) {
    let balanced =
        |s: &&Service| !s.backends.is_empty() && s.load_balancing.clone().unwrap_or_default().vip;
    let total: usize = (draft.all_services().map(|(_, s)| s))
        .filter(balanced)
        .map(|s| s.backends.len())
        .sum();
    let mut running = 0;
    for (i, s) in draft.all_services() {
        if !s.backends.is_empty() && s.load_balancing.clone().unwrap_or_default().vip {
            running += s.backends.len();
            if running > limit as usize {
                let msg = format!(
                    "balanced services (load_balancing.vip) have {total} backends in all; \
                     agent.tables.backends allows {limit} (raise it, up to {})",
                    crate::maps::MAX_TABLE_LIMIT
                );
                c.error(&format!("{i}.backends"), msg);
                return;
            }
        }
    }
}

/// Pacing happens on egress: a policy that shapes with no egress hook would do nothing.
fn shaping_needs_egress(c: &mut Checker<'_>, draft: &Draft<'_>) {
    let egress = draft
        .interfaces()
        .any(|(_, i)| matches!(i.direction, Direction::Egress | Direction::Both));
    let all_decoded = draft.all_interfaces;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_whole_units() {
        assert_eq!(show(Duration::from_secs(600)), "10m");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(7200)), "2h");
        assert_eq!(show(Duration::from_nanos(7)), "7ns");
        assert_eq!(show(Duration::ZERO), "0s");
    }

    /// `NOT_ENFORCED` is empty in this build; the refusal it drives is checked on a list of
    /// one, at the section's line, once per service that sets it.
    #[test]
    fn a_section_not_enforced_is_refused_where_it_is_written() {
        let src = "version: 1\ninterfaces: [{name: eth0}]\nservices:\n  - name: a\n    \
                   match: {address: 10.0.0.1}\n    rate_limit: {rate: 10/s}\n  - name: b\n    \
                   match: {address: 10.0.0.2}\n";
        let (policy, index) = super::super::tree::read(src).expect("a valid policy");
        let mut c = Checker::new("t.yaml", &index);
        let draft = Draft {
            interfaces: Vec::new(),
            services: policy.services.iter().enumerate().collect(),
            companions: Vec::new(),
            all_interfaces: true,
        };
        not_enforced(&mut c, &draft, &[("rate_limit", "")]);
        let shown: Vec<String> = c.diags.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["t.yaml:6:17: services[0].rate_limit: not enforced by this build"]
        );
        assert!(
            NOT_ENFORCED.is_empty(),
            "every section of this build is enforced"
        );
    }
}
