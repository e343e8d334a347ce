//! The running datapath's state as one report: served as JSON on `/status`, printed by
//! `agent status`, and the source of `/metrics`. The report's types are
//! `agent_common::status` (the JSON format, shared with `xtask` and the tests); here they are
//! built from the agent's state and rendered as text.

use std::fmt::Write as _;

pub use agent_common::status::{
    BackendStatus, CounterJson, DropStatus, LbBackendView, LbServiceView, MapStatus, MapUsage,
    RateLimitStatus, ServiceStatus, ShapingStatus, StatusReport,
};

use crate::datapath::{KeyCounts, Snapshot, pressure::Reading};

/// What the agent knows of a service beyond its counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Its service id in the datapath (stable across reloads).
    pub id: u32,
    pub name: String,
    pub matches: String,
    pub rate_limit: Option<String>,
    /// e.g. `flow 6250000B/s horizon 2s`
    pub shaping: Option<String>,
}

/// The report of the datapath's counters and the supervisor's backends; the balancer's part
/// (`balancing`, `lb_backends`) is the caller's to fill in.
pub fn build(
    ready: bool,
    policy_file: &str,
    attachments: Vec<String>,
    services: &[ServiceInfo],
    snapshot: &Snapshot,
    keys: &KeyCounts,
    backends: Vec<BackendStatus>,
) -> StatusReport {
    let services = services
        .iter()
        .zip(&snapshot.services)
        .map(|(info, c)| {
            let id = info.id;
            ServiceStatus {
                id,
                name: info.name.clone(),
                matches: info.matches.clone(),
                rate_limit: info.rate_limit.as_ref().map(|summary| RateLimitStatus {
                    summary: summary.clone(),
                    keys: keys.present(id),
                    new_keys: c.new_keys,
                    evictions: keys.evicted(id),
                }),
                passed: c.passed.into(),
                dropped: c
                    .dropped
                    .iter()
                    .map(|(reason, counter)| DropStatus {
                        reason: (*reason).to_string(),
                        counter: (*counter).into(),
                    })
                    .collect(),
                passed_no_bucket: c.passed_no_bucket.into(),
                shaping: info.shaping.as_ref().map(|summary| {
                    let sh = &c.shaping;
                    ShapingStatus {
                        summary: summary.clone(),
                        paced: sh.paced.into(),
                        horizon_drops: sh.horizon_drops.into(),
                        unpaced: sh.unpaced.into(),
                        contended: sh.contended.packets,
                        delay_seconds: sh.waiting_ns as f64 / 1e9,
                        last_delay_seconds: sh.last_delay_ns as f64 / 1e9,
                    }
                }),
                // Filled in by the degradation evaluator's view (`degrade`).
                degradation: None,
                fallback_of: None,
            }
        })
        .collect();
    StatusReport {
        ready,
        policy_file: policy_file.to_string(),
        attachments,
        services,
        global: snapshot
            .global
            .iter()
            .map(|(name, c)| ((*name).to_string(), (*c).into()))
            .collect(),
        backends,
        balancing: Vec::new(),
        lb_backends: Vec::new(),
        maps: Vec::new(),
        kernel_memory_bytes: None,
        ..StatusReport::default()
    }
}

/// Fills in the maps' part of a report from the latest pressure reading: every map name
/// with its memory, and the usage of the tables that can fill (a table whose memory could not
/// be read still shows its usage).
pub fn add_maps(report: &mut StatusReport, reading: &Reading) {
    let mut maps: Vec<MapStatus> = reading
        .memory
        .iter()
        .flatten()
        .map(|m| MapStatus {
            map: m.name.clone(),
            maps: m.maps,
            memory_bytes: m.bytes,
            usage: None,
        })
        .collect();
    for t in &reading.tables {
        let usage = MapUsage {
            entries: t.entries,
            capacity: t.capacity,
            pressure: t.pressure(),
            counted: t.counted.as_str().to_string(),
        };
        match maps.iter_mut().find(|m| m.map == t.map) {
            Some(m) => m.usage = Some(usage),
            None => maps.push(MapStatus {
                map: t.map.to_string(),
                usage: Some(usage),
                ..MapStatus::default()
            }),
        }
    }
    report.maps = maps;
    report.kernel_memory_bytes = reading.kernel_memory();
}

/// The human table of `agent status`.
pub fn render_text(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy: {}   ready: {}   attached: {}",
        report.policy_file,
        if report.ready { "yes" } else { "no" },
        if report.attachments.is_empty() {
            "-".to_string()
        } else {
            report.attachments.join(", ")
        }
    );
    if let Some(pins) = &report.pin_path {
        let repairs: Vec<String> = report
            .repairs
            .iter()
            .map(|(what, n)| format!("{what} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "pinned at: {pins} ({})   watchdog repairs: {}",
            if report.adopted {
                "adopted from an earlier agent"
            } else {
                "fresh"
            },
            if repairs.is_empty() {
                "none".to_string()
            } else {
                repairs.join(", ")
            }
        );
    }
    render_reload(report, &mut out);
    let _ = writeln!(
        out,
        "\n{:<20} {:<28} {:<26} {:>12} {:>12} {:>10} {:>10}",
        "SERVICE", "MATCH", "RATE LIMIT", "PASSED", "DROPPED", "KEYS", "EVICTED"
    );
    for s in &report.services {
        let dropped: u64 = s.dropped.iter().map(|d| d.counter.packets).sum();
        let (limit, keys, evicted) = match &s.rate_limit {
            Some(rl) => (
                rl.summary.clone(),
                rl.keys.to_string(),
                rl.evictions.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<28} {:<26} {:>12} {:>12} {:>10} {:>10}",
            s.name, s.matches, limit, s.passed.packets, dropped, keys, evicted
        );
    }
    let _ = writeln!(out, "\nDROPS BY REASON");
    for s in &report.services {
        for d in s.dropped.iter().filter(|d| d.counter.packets > 0) {
            let _ = writeln!(
                out,
                "  {:<20} {:<12} {:>12} pkts {:>14} bytes",
                s.name, d.reason, d.counter.packets, d.counter.bytes
            );
        }
    }
    render_shaping(report, &mut out);
    render_degradation(report, &mut out);
    render_backends(report, &mut out);
    render_balancing(report, &mut out);
    render_maps(report, &mut out);
    let _ = writeln!(out, "\nOUTSIDE ANY SERVICE (passed)");
    for (class, c) in &report.global {
        let _ = writeln!(out, "  {:<24} {:>12} pkts", class, c.packets);
    }
    out
}

/// The policy generation, the reloads by result, and the latest that did not apply, with
/// its error.
fn render_reload(report: &StatusReport, out: &mut String) {
    let r = &report.reload;
    let results: Vec<String> = r
        .results
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(result, n)| format!("{result} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "policy generation: {}   reloads: {}{}",
        r.generation,
        r.count,
        if results.is_empty() {
            String::new()
        } else {
            format!(" ({})", results.join(", "))
        }
    );
    if let Some(last) = &r.last {
        let _ = writeln!(
            out,
            "last reload: {} ({}), {:.1}s ago, took {:.1}ms",
            last.result,
            last.trigger,
            ago(last.at),
            last.took_seconds * 1e3
        );
    }
    if let Some(f) = &r.last_failure {
        let _ = writeln!(
            out,
            "last failed reload: {} ({}), {:.1}s ago:",
            f.result,
            f.trigger,
            ago(f.at)
        );
        for line in f.error.iter().flat_map(|e| e.lines()) {
            let _ = writeln!(out, "  {line}");
        }
    }
}

/// Seconds from `at` (seconds since the Unix epoch) to now.
fn ago(at: f64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    (now - at).max(0.0)
}

/// Shaped services: what pacing did, and how long their packets wait.
fn render_shaping(report: &StatusReport, out: &mut String) {
    let shaped: Vec<(&str, &ShapingStatus)> = report
        .services
        .iter()
        .filter_map(|s| s.shaping.as_ref().map(|sh| (s.name.as_str(), sh)))
        .collect();
    if shaped.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nSHAPING (egress, fq; delay: how long the latest paced packet still waits)\n\
         {:<20} {:<34} {:>12} {:>14} {:>9} {:>10} {:>12}",
        "SERVICE", "SHAPING", "PACED", "HORIZON DROPS", "UNPACED", "CONTENDED", "DELAY"
    );
    for (name, sh) in shaped {
        let _ = writeln!(
            out,
            "{:<20} {:<34} {:>12} {:>14} {:>9} {:>10} {:>10.3}ms",
            name,
            sh.summary,
            sh.paced.packets,
            sh.horizon_drops.packets,
            sh.unpaced.packets,
            sh.contended,
            sh.delay_seconds * 1e3,
        );
    }
}

/// Degradable services: mode, whether degraded and why, each condition's measure; then the
/// node-wide shed level.
fn render_degradation(report: &StatusReport, out: &mut String) {
    let degradable: Vec<_> = (report.services.iter())
        .filter_map(|s| Some((s.name.as_str(), s.degradation.as_ref()?)))
        .collect();
    if degradable.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nDEGRADATION\n{:<20} {:<9} {:<9} {:>10} {:>12} {:>10} {:>10}  CAUSE",
        "SERVICE", "MODE", "DEGRADED", "FOR", "CLEAR FOR", "FALLBACK", "SHED"
    );
    for (name, d) in &degradable {
        let _ = writeln!(
            out,
            "{:<20} {:<9} {:<9} {:>9.1}s {:>11.1}s {:>10} {:>10}  {}",
            name,
            d.mode,
            if d.degraded { "yes" } else { "no" },
            d.in_state_seconds,
            d.clear_for_seconds,
            d.fallback_flows,
            d.shed_flows,
            d.cause.as_deref().unwrap_or("-"),
        );
        for c in &d.conditions {
            let value = match (c.value, c.r#type.as_str()) {
                (None, _) => "no sample".to_string(),
                (Some(v), "latency") => format!("p99 {:.1}ms", v * 1e3),
                (Some(v), _) => format!("{:.1}%", v * 100.0),
            };
            let _ = writeln!(
                out,
                "  {:<18} {:<12} threshold {:<8} over {:>5}s: {} ({} samples){}",
                "",
                c.r#type,
                c.threshold,
                c.window_seconds,
                value,
                c.samples,
                if c.met { "  MET" } else { "" },
            );
        }
    }
    let sh = &report.shedding;
    let _ = writeln!(
        out,
        "shed level: {} for {:.1}s, pressure: {}, shed: {}",
        sh.level,
        sh.level_for_seconds,
        if sh.pressure { "yes" } else { "no" },
        if sh.shed.is_empty() {
            "-".to_string()
        } else {
            sh.shed.join(", ")
        }
    );
}

/// Health and probes of every backend, then what the datapath did for the backends whose
/// breaker it enforces.
fn render_backends(report: &StatusReport, out: &mut String) {
    if report.backends.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:<24} {:<10} {:<10} {:>10} {:>9} {:>9}  LAST FAILURE",
        "SERVICE", "BACKEND", "HEALTH", "BREAKER", "IN STATE", "PROBES OK", "FAILED"
    );
    for b in &report.backends {
        let _ = writeln!(
            out,
            "{:<20} {:<24} {:<10} {:<10} {:>9.1}s {:>9} {:>9}  {}",
            b.service,
            b.address,
            b.health,
            b.breaker.as_deref().unwrap_or("-"),
            b.in_state_ms as f64 / 1000.0,
            b.probes_ok,
            b.probes_failed,
            b.last_failure.as_deref().unwrap_or("-")
        );
    }
    let enforced: Vec<&BackendStatus> = report.backends.iter().filter(|b| b.id.is_some()).collect();
    if enforced.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nBREAKERS IN THE DATAPATH (packets; passive: syn-ack/refused/timeout)\n\
         {:<20} {:<24} {:<10} {:>10} {:>7} {:>9} {:>9} {:>9}  PASSIVE",
        "SERVICE", "BACKEND", "BREAKER", "ADMITTED", "TRIAL", "REJECTED", "DROPPED", "CUT"
    );
    for b in enforced {
        let passive = b.passive.map_or("-".to_string(), |p| {
            format!("{}/{}/{}", p.synack, p.refused, p.timeout)
        });
        let write_errors = if b.map_write_errors > 0 {
            format!("  ({} map write errors)", b.map_write_errors)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:<20} {:<24} {:<10} {:>10} {:>7} {:>9} {:>9} {:>9}  {passive}{write_errors}",
            b.service,
            b.address,
            b.breaker.as_deref().unwrap_or("-"),
            b.action("admitted"),
            b.action("trial"),
            b.action("reject_rst") + b.action("reject_icmp"),
            b.action("drop"),
            b.action("close_existing"),
        );
    }
}

/// Balanced services: connection table, then each backend's weights and traffic.
fn render_balancing(report: &StatusReport, out: &mut String) {
    if report.balancing.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nLOAD BALANCING (connections: live connection-table entries)\n\
         {:<20} {:<22} {:>11} {:>9} {:>10} {:>10} {:>9}",
        "SERVICE", "ALGORITHM", "CONNECTIONS", "EVICTED", "NO BACKEND", "LOST", "SWAPS"
    );
    for s in &report.balancing {
        let _ = writeln!(
            out,
            "{:<20} {:<22} {:>11} {:>9} {:>10} {:>10} {:>9}",
            s.service,
            if s.panic {
                format!("{} (PANIC)", s.algorithm)
            } else {
                s.algorithm.clone()
            },
            s.connections,
            s.evictions,
            s.no_backend,
            s.lost,
            s.publishes
        );
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:<24} {:>7} {:>9} {:>7} {:>10} {:>12} {:>14}",
        "SERVICE", "BACKEND", "WEIGHT", "EFFECTIVE", "ACTIVE", "NEW FLOWS", "PACKETS", "BYTES"
    );
    for b in &report.lb_backends {
        let _ = writeln!(
            out,
            "{:<20} {:<24} {:>7} {:>9} {:>7} {:>10} {:>12} {:>14}",
            b.service,
            b.address,
            b.configured,
            b.effective,
            b.active,
            b.new_flows,
            b.packets,
            b.bytes
        );
    }
}

/// The maps: how full each table that can fill is, and what every map costs the kernel.
fn render_maps(report: &StatusReport, out: &mut String) {
    if report.maps.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nBPF MAPS (pressure: entries in use / capacity; counted by a walk of the keys, or for \
         arrays by the policy's use)\n{:<18} {:>5} {:>10} {:>10} {:>9} {:<9} {:>12}",
        "MAP", "MAPS", "ENTRIES", "CAPACITY", "PRESSURE", "COUNTED", "MEMORY"
    );
    // The fullest tables first, then the others by name.
    let mut maps: Vec<&MapStatus> = report.maps.iter().collect();
    maps.sort_by(|a, b| {
        let p = |m: &MapStatus| m.usage.as_ref().map_or(-1.0, |u| u.pressure);
        p(b).total_cmp(&p(a)).then_with(|| a.map.cmp(&b.map))
    });
    for m in maps {
        let (entries, capacity, pressure, counted) = match &m.usage {
            Some(u) => (
                u.entries.to_string(),
                u.capacity.to_string(),
                format!("{:.1}%", u.pressure * 100.0),
                u.counted.as_str(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-"),
        };
        let _ = writeln!(
            out,
            "{:<18} {:>5} {:>10} {:>10} {:>9} {:<9} {:>12}",
            m.map,
            m.maps,
            entries,
            capacity,
            pressure,
            counted,
            bytes(m.memory_bytes)
        );
    }
    if let Some(total) = report.kernel_memory_bytes {
        let _ = writeln!(out, "kernel memory of all maps: {}", bytes(total));
    }
}

/// Bytes, in KiB or MiB when large.
fn bytes(n: u64) -> String {
    const KIB: u64 = 1024;
    if n >= 10 * KIB * KIB {
        format!("{:.1} MiB", n as f64 / (KIB * KIB) as f64)
    } else if n >= 10 * KIB {
        format!("{:.1} KiB", n as f64 / KIB as f64)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::pressure::{Counted, MapMemory, TablePressure};

    #[test]
    fn maps_join_memory_and_usage_by_name() {
        let reading = Reading {
            tables: vec![
                TablePressure {
                    map: "RL_BUCKETS",
                    entries: 64,
                    capacity: 64,
                    counted: Counted::WalkCut,
                },
                // A table whose memory was not read still shows its usage.
                TablePressure {
                    map: "SVC_CFG",
                    entries: 2,
                    capacity: 1024,
                    counted: Counted::Policy,
                },
            ],
            memory: Some(vec![
                MapMemory {
                    name: "AYA_LOGS".into(),
                    maps: 1,
                    bytes: 100,
                },
                MapMemory {
                    name: "RL_BUCKETS".into(),
                    maps: 1,
                    bytes: 900,
                },
            ]),
            took: std::time::Duration::ZERO,
        };
        let mut report = StatusReport::default();
        add_maps(&mut report, &reading);
        let summary: Vec<_> = report
            .maps
            .iter()
            .map(|m| {
                let u = m
                    .usage
                    .as_ref()
                    .map(|u| (u.entries, u.capacity, u.counted.as_str()));
                (m.map.as_str(), m.memory_bytes, u)
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("AYA_LOGS", 100, None),
                ("RL_BUCKETS", 900, Some((64, 64, "walk_cut"))),
                ("SVC_CFG", 0, Some((2, 1024, "policy"))),
            ]
        );
        assert_eq!(report.kernel_memory_bytes, Some(1000));
    }
}
