//! Prometheus exposition of the datapath's counters, read from the maps at scrape time
//! (a `prometheus_client` collector: no copies of the counters live in the agent).

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::status::StatusReport;
use crate::{
    breaker::State, datapath::BACKEND_ACTIONS, degrade::TransitionCount, health::Health,
    supervisor::UNCHECKED,
};

/// Renders the Prometheus text format of one status report, and of the degradation
/// evaluator's mode transitions by from and to (which the report only sums).
pub fn render(
    report: &StatusReport,
    transitions: &[TransitionCount],
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReportCollector(
        report.clone(),
        transitions.to_vec(),
    )));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

#[derive(Debug)]
struct ReportCollector(StatusReport, Vec<TransitionCount>);

type Labels = Vec<(&'static str, String)>;

/// One metric family: name, help, type, and its samples.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    kind: MetricType,
    samples: Vec<(Labels, u64)>,
}

impl Family<'_> {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.samples.is_empty() {
            return Ok(());
        }
        let mut metric = encoder.encode_descriptor(self.name, self.help, None, self.kind)?;
        for (labels, value) in &self.samples {
            let fam = metric.encode_family(labels)?;
            match self.kind {
                MetricType::Counter => ConstCounter::new(*value).encode(fam)?,
                _ => ConstGauge::new(*value as i64).encode(fam)?,
            }
        }
        Ok(())
    }
}

impl Collector for ReportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = &self.0;
        let svc = |name: &str| vec![("service", name.to_string())];
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        let mut dropped_packets = Vec::new();
        let mut dropped_bytes = Vec::new();
        let mut keys = Vec::new();
        let mut new_keys = Vec::new();
        let mut evictions = Vec::new();
        let mut no_bucket = Vec::new();
        for s in &r.services {
            let mut passed = svc(&s.name);
            passed.push(("verdict", "passed".into()));
            packets.push((passed.clone(), s.passed.packets));
            bytes.push((passed, s.passed.bytes));
            for d in &s.dropped {
                let mut l = svc(&s.name);
                l.push(("reason", d.reason.clone()));
                dropped_packets.push((l.clone(), d.counter.packets));
                dropped_bytes.push((l, d.counter.bytes));
            }
            no_bucket.push((svc(&s.name), s.passed_no_bucket.packets));
            if let Some(rl) = &s.rate_limit {
                keys.push((svc(&s.name), rl.keys));
                new_keys.push((svc(&s.name), rl.new_keys));
                evictions.push((svc(&s.name), rl.evictions));
            }
        }
        let global = r
            .global
            .iter()
            .map(|(class, c)| (vec![("class", class.clone())], c.packets))
            .collect();
        let families = [
            Family {
                name: "agent_service_packets",
                help: "Packets of a service by verdict.",
                kind: MetricType::Counter,
                samples: packets,
            },
            Family {
                name: "agent_service_bytes",
                help: "Bytes (L2 frames) of a service by verdict.",
                kind: MetricType::Counter,
                samples: bytes,
            },
            Family {
                name: "agent_service_dropped_packets",
                help: "Packets of a service dropped by the datapath, by reason.",
                kind: MetricType::Counter,
                samples: dropped_packets,
            },
            Family {
                name: "agent_service_dropped_bytes",
                help: "Bytes of a service dropped by the datapath, by reason.",
                kind: MetricType::Counter,
                samples: dropped_bytes,
            },
            Family {
                name: "agent_service_passed_without_bucket_packets",
                help: "Packets passed unlimited because the key table refused a new key (fail open).",
                kind: MetricType::Counter,
                samples: no_bucket,
            },
            Family {
                name: "agent_ratelimit_keys",
                help: "Entries of the token-bucket key table per service (occupancy), from the last table walk.",
                kind: MetricType::Gauge,
                samples: keys,
            },
            Family {
                name: "agent_ratelimit_new_keys",
                help: "Keys inserted into the token-bucket table per service.",
                kind: MetricType::Counter,
                samples: new_keys,
            },
            Family {
                name: "agent_ratelimit_key_evictions",
                help: "Keys gone from the token-bucket table (LRU evictions): inserted minus present at the last walk.",
                kind: MetricType::Counter,
                samples: evictions,
            },
            Family {
                name: "agent_datapath_packets",
                help: "Packets seen by the datapath outside any service, by class (all passed: fail open).",
                kind: MetricType::Counter,
                samples: global,
            },
            Family {
                name: "agent_ready",
                help: "1 once programs are attached and the policy applied.",
                kind: MetricType::Gauge,
                samples: vec![(vec![], u64::from(r.ready))],
            },
        ];
        for f in &families {
            f.encode(&mut encoder)?;
        }
        encode_shaping(r, &mut encoder)?;
        encode_backends(&r.backends, &mut encoder)?;
        encode_balancing(r, &mut encoder)?;
        encode_maps(r, &mut encoder)?;
        encode_degradation(r, &self.1, &mut encoder)?;
        encode_reload(r, &mut encoder)
    }
}

/// Degradable services' modes, transitions and conditions, and the node's shed level.
fn encode_degradation(
    r: &StatusReport,
    transitions: &[TransitionCount],
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let degradable: Vec<(&str, &agent_common::status::DegradationStatus)> = (r.services.iter())
        .filter_map(|s| Some((s.name.as_str(), s.degradation.as_ref()?)))
        .collect();
    let svc = |name: &str| vec![("service", name.to_string())];
    let mode_code = |mode: &str| match mode {
        "fallback" => agent_common::degrade::MODE_FALLBACK,
        "shed" => agent_common::degrade::MODE_SHED,
        _ => agent_common::degrade::MODE_NORMAL,
    };
    for f in [
        Family {
            name: "agent_degradation_transitions",
            help: "Mode transitions of a degradable service since start, by from and to mode (normal, fallback, shed).",
            kind: MetricType::Counter,
            samples: transitions
                .iter()
                .map(|t| {
                    let mut l = svc(&t.service);
                    l.push(("from", t.from.to_string()));
                    l.push(("to", t.to.to_string()));
                    (l, t.count)
                })
                .collect(),
        },
        Family {
            name: "agent_degradation_mode",
            help: "The mode the datapath enforces for a degradable service's new flows: 0 normal, 1 fallback, 2 shed.",
            kind: MetricType::Gauge,
            samples: (degradable.iter())
                .map(|(name, d)| (svc(name), u64::from(mode_code(&d.mode))))
                .collect(),
        },
    ] {
        f.encode(encoder)?;
    }
    if !degradable.is_empty() {
        let mut metric = encoder.encode_descriptor(
            "agent_degradation_condition",
            "A degradation condition's measure over its window: latency p99 in seconds, error rate and availability as shares from 0 to 1; NaN without a sample. The first condition of each type.",
            None,
            MetricType::Gauge,
        )?;
        for (name, d) in &degradable {
            let mut seen = Vec::new();
            for c in &d.conditions {
                // One sample per (service, type): a second condition of a type is in status.
                if seen.contains(&c.r#type.as_str()) {
                    continue;
                }
                seen.push(c.r#type.as_str());
                let mut l = svc(name);
                l.push(("type", c.r#type.clone()));
                ConstGauge::new(c.value.unwrap_or(f64::NAN)).encode(metric.encode_family(&l)?)?;
            }
        }
    }
    // Only while an evaluator runs (the level is set then).
    let level = match r.shedding.level.as_str() {
        "" => return Ok(()),
        "low" => 1,
        "normal" => 2,
        "core" => 3,
        _ => 0,
    };
    Family {
        name: "agent_shed_level",
        help: "The highest priority shed node-wide: 0 none, 1 low, 2 normal, 3 core.",
        kind: MetricType::Gauge,
        samples: vec![(vec![], level)],
    }
    .encode(encoder)
}

/// Reloads by result, the policy generation and when the policy in force was applied.
fn encode_reload(r: &StatusReport, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let reload = &r.reload;
    let last_ok = reload
        .last
        .as_ref()
        .is_none_or(|l| l.result == "ok" || l.result == "unchanged");
    for f in [
        Family {
            name: "agent_reload",
            help: "Policy reloads (SIGHUP or a change of the policy file) by result: ok (applied), unchanged (nothing to write), invalid (the file does not validate), refused (the kernel cannot take it live), failed (applying it failed), missing (the file was gone); the running policy stays in force unless ok.",
            kind: MetricType::Counter,
            samples: reload
                .results
                .iter()
                .map(|(result, n)| (vec![("result", result.clone())], *n))
                .collect(),
        },
        Family {
            name: "agent_policy_generation",
            help: "Policies applied since start: 0 is the start's, every applied reload adds 1.",
            kind: MetricType::Gauge,
            samples: vec![(vec![], reload.generation)],
        },
        Family {
            name: "agent_reload_last_success",
            help: "1 when the latest reload applied the file or found it in force (or none was tried since start), 0 when it did not: the running policy is not the file's.",
            kind: MetricType::Gauge,
            samples: vec![(vec![], u64::from(last_ok))],
        },
    ] {
        f.encode(encoder)?;
    }
    let mut metric = encoder.encode_descriptor(
        "agent_reload_last_success_timestamp_seconds",
        "When the policy in force was applied (at start, or by the latest applied reload), in seconds since the Unix epoch.",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(reload.applied_at).encode(metric.encode_family(&Labels::new())?)?;
    Ok(())
}

/// Shaped services: pacing counters, and the current delay (a float gauge).
fn encode_shaping(
    r: &StatusReport,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let shaped: Vec<(&str, &super::status::ShapingStatus)> = r
        .services
        .iter()
        .filter_map(|s| s.shaping.as_ref().map(|sh| (s.name.as_str(), sh)))
        .collect();
    if shaped.is_empty() {
        return Ok(());
    }
    let svc = |name: &str| vec![("service", name.to_string())];
    let per_service = |f: fn(&super::status::ShapingStatus) -> u64| {
        shaped
            .iter()
            .map(|(name, sh)| (svc(name), f(sh)))
            .collect::<Vec<_>>()
    };
    for f in [
        Family {
            name: "agent_shaping_paced_packets",
            help: "Packets of a shaped service given a departure time on egress (fq holds each until then).",
            kind: MetricType::Counter,
            samples: per_service(|s| s.paced.packets),
        },
        Family {
            name: "agent_shaping_paced_bytes",
            help: "Bytes on the wire (every GSO segment) of the paced packets.",
            kind: MetricType::Counter,
            samples: per_service(|s| s.paced.bytes),
        },
        Family {
            name: "agent_shaping_horizon_drops",
            help: "Packets dropped because their departure would have been more than shaping.horizon from now.",
            kind: MetricType::Counter,
            samples: per_service(|s| s.horizon_drops.packets),
        },
        Family {
            name: "agent_shaping_unpaced_packets",
            help: "Packets passed unpaced because the departure table refused a new key (fail open).",
            kind: MetricType::Counter,
            samples: per_service(|s| s.unpaced.packets),
        },
        Family {
            name: "agent_shaping_contended_packets",
            help: "Packets paced after losing every compare-and-swap on their key's departure time to other CPUs.",
            kind: MetricType::Counter,
            samples: per_service(|s| s.contended),
        },
    ] {
        f.encode(encoder)?;
    }
    let mut metric = encoder.encode_descriptor(
        "agent_shaping_delay_seconds",
        "How long the latest paced packet of the service still waits for its departure time (0 once it has left).",
        None,
        MetricType::Gauge,
    )?;
    for (name, sh) in &shaped {
        ConstGauge::new(sh.delay_seconds).encode(metric.encode_family(&svc(name))?)?;
    }
    Ok(())
}

/// Balanced services (`load_balancing.vip`) and their backends.
fn encode_balancing(
    r: &StatusReport,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let svc = |name: &str| vec![("service", name.to_string())];
    let who = |b: &crate::lb::balancer::LbBackendView| {
        vec![
            ("service", b.service.clone()),
            ("backend", b.address.clone()),
        ]
    };
    let per_backend = |f: fn(&crate::lb::balancer::LbBackendView) -> u64| {
        r.lb_backends
            .iter()
            .map(|b| (who(b), f(b)))
            .collect::<Vec<_>>()
    };
    let per_service = |f: fn(&crate::lb::balancer::LbServiceView) -> u64| {
        r.balancing
            .iter()
            .map(|s| (svc(&s.service), f(s)))
            .collect::<Vec<_>>()
    };
    for f in [
        Family {
            name: "agent_lb_backend_weight",
            help: "Configured weight of a balanced backend.",
            kind: MetricType::Gauge,
            samples: per_backend(|b| u64::from(b.configured)),
        },
        Family {
            name: "agent_lb_backend_effective_weight",
            help: "Weight in the datapath now: configured x health x breaker x slow-start ramp.",
            kind: MetricType::Gauge,
            samples: per_backend(|b| u64::from(b.effective)),
        },
        Family {
            name: "agent_lb_backend_active_connections",
            help: "Connections pinned to the backend and open (TCP until FIN/RST).",
            kind: MetricType::Gauge,
            samples: per_backend(|b| b.active),
        },
        Family {
            name: "agent_lb_backend_new_flows",
            help: "New flows the datapath pinned to the backend.",
            kind: MetricType::Counter,
            samples: per_backend(|b| b.new_flows),
        },
        Family {
            name: "agent_lb_backend_packets",
            help: "Packets forwarded to the backend (client to backend).",
            kind: MetricType::Counter,
            samples: per_backend(|b| b.packets),
        },
        Family {
            name: "agent_lb_backend_bytes",
            help: "Bytes forwarded to the backend (client to backend).",
            kind: MetricType::Counter,
            samples: per_backend(|b| b.bytes),
        },
        Family {
            name: "agent_lb_connections",
            help: "Live entries of the service in the connection table (walked once a second).",
            kind: MetricType::Gauge,
            samples: per_service(|s| s.connections),
        },
        Family {
            name: "agent_lb_conntrack_evictions",
            help: "Connection-table entries the LRU evicted: flows tracked, minus those that took \
                   an expired entry's place, minus entries present (as of the last walk).",
            kind: MetricType::Counter,
            samples: per_service(|s| s.evictions),
        },
        Family {
            name: "agent_lb_conntrack_lost",
            help: "TCP packets whose flow had lost its connection-table entry (LRU eviction or \
                   expiry) and was balanced again.",
            kind: MetricType::Counter,
            samples: per_service(|s| s.lost),
        },
        Family {
            name: "agent_lb_client_ports_moved",
            help: "New flows whose client port (from the ephemeral range, where the host's direct \
                   connections take theirs too) the backend sees moved below that range.",
            kind: MetricType::Counter,
            samples: per_service(|s| s.client_ports_moved),
        },
        Family {
            name: "agent_lb_client_ports_busy",
            help: "New flows that kept their client port: a live flow from another VIP held the \
                   moved one at the same backend.",
            kind: MetricType::Counter,
            samples: per_service(|s| s.client_ports_busy),
        },
        Family {
            name: "agent_lb_no_backend",
            help: "New flows refused because no backend could take them.",
            kind: MetricType::Counter,
            samples: per_service(|s| s.no_backend),
        },
        Family {
            name: "agent_lb_panic",
            help: "1 while the service panics (available backends below panic_threshold): health \
                   and breakers are ignored.",
            kind: MetricType::Gauge,
            samples: per_service(|s| u64::from(s.panic)),
        },
        Family {
            name: "agent_lb_table_swaps",
            help: "Table or weight updates published to the datapath.",
            kind: MetricType::Counter,
            samples: per_service(|s| s.publishes),
        },
        Family {
            name: "agent_lb_write_errors",
            help: "Failed writes of weights or tables (retried).",
            kind: MetricType::Counter,
            samples: per_service(|s| s.write_errors),
        },
    ] {
        f.encode(encoder)?;
    }
    Ok(())
}

/// The BPF maps: pressure of the tables that can fill, and kernel memory, from the latest
/// reading (`datapath::pressure`, on a timer).
fn encode_maps(r: &StatusReport, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let map = |name: &str| vec![("map", name.to_string())];
    let tables: Vec<(&str, &super::status::MapUsage)> = r
        .maps
        .iter()
        .filter_map(|m| m.usage.as_ref().map(|u| (m.map.as_str(), u)))
        .collect();
    if !tables.is_empty() {
        let mut metric = encoder.encode_descriptor(
            "agent_bpf_map_pressure",
            "Entries in use over capacity (0 to 1) of a BPF table that can fill: hash, LRU hash \
             and LPM tables by a periodic walk of their keys (a walk that meets more keys than \
             the table holds, because keys were evicted under it, counts as full); arrays \
             indexed by service or backend by the services or backends of the policy. A full \
             LRU table that is evicting reads a little below 1 (the kernel evicts in batches).",
            None,
            MetricType::Gauge,
        )?;
        for (name, u) in &tables {
            ConstGauge::new(u.pressure).encode(metric.encode_family(&map(name))?)?;
        }
    }
    let per_table = |f: fn(&super::status::MapUsage) -> u64| {
        tables
            .iter()
            .map(|(name, u)| (map(name), f(u)))
            .collect::<Vec<_>>()
    };
    for f in [
        Family {
            name: "agent_bpf_map_entries",
            help: "Entries in use of a BPF table that can fill, as agent_bpf_map_pressure counts \
                   them: keys found by the last walk, or services or backends of the policy.",
            kind: MetricType::Gauge,
            samples: per_table(|u| u.entries),
        },
        Family {
            name: "agent_bpf_map_capacity",
            help: "Capacity of a BPF table that can fill: its max_entries, or for an array \
                   indexed by service or backend the services or backends it has room for.",
            kind: MetricType::Gauge,
            samples: per_table(|u| u.capacity),
        },
        Family {
            name: "agent_bpf_map_memory_bytes",
            help: "Kernel memory of the agent's BPF maps of one name (memlock in \
                   /proc/self/fdinfo, each map once by id, summed over the maps of the name).",
            kind: MetricType::Gauge,
            samples: r
                .maps
                .iter()
                .map(|m| (map(&m.map), m.memory_bytes))
                .collect(),
        },
        Family {
            name: "agent_datapath_kernel_memory_bytes",
            help: "Kernel memory of every BPF map the agent holds a descriptor for, the object's \
                   and those made at run time (memlock in /proc/self/fdinfo, each map once by \
                   id): the sum of agent_bpf_map_memory_bytes.",
            kind: MetricType::Gauge,
            samples: r
                .kernel_memory_bytes
                .map(|b| (vec![], b))
                .into_iter()
                .collect(),
        },
        Family {
            name: "agent_repairs",
            help: "Repairs the watchdog made since start, by what was broken: xdp_link, \
                   tc_link (a program detached by someone else), pin (a removed pin).",
            kind: MetricType::Counter,
            samples: r
                .repairs
                .iter()
                .map(|(what, n)| (vec![("what", what.clone())], *n))
                .collect(),
        },
    ] {
        f.encode(encoder)?;
    }
    Ok(())
}

fn encode_backends(
    backends: &[crate::supervisor::BackendStatus],
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    if backends.is_empty() {
        return Ok(());
    }
    let who = |b: &crate::supervisor::BackendStatus| {
        vec![
            ("service", b.service.clone()),
            ("backend", b.address.clone()),
        ]
    };
    let mut healthy = Vec::new();
    let mut state = Vec::new();
    let mut transitions = Vec::new();
    let mut probes = Vec::new();
    let mut datapath = Vec::new();
    let mut passive = Vec::new();
    let mut write_errors = Vec::new();
    for b in backends {
        if b.id.is_some() {
            for (_, action) in BACKEND_ACTIONS {
                let mut l = who(b);
                l.push(("action", action.to_string()));
                datapath.push((l, b.action(action)));
            }
            write_errors.push((who(b), b.map_write_errors));
        }
        if let Some(p) = &b.passive {
            for (result, n) in p.by_result() {
                let mut l = who(b);
                l.push(("result", result.to_string()));
                passive.push((l, n));
            }
        }
        if b.health != UNCHECKED {
            healthy.push((who(b), u64::from(b.health == Health::Healthy.as_str())));
        }
        if let Some(current) = &b.breaker {
            for s in [State::Closed, State::Open, State::HalfOpen].map(State::as_str) {
                let mut l = who(b);
                l.push(("state", s.to_string()));
                state.push((l, u64::from(current == s)));
            }
        }
        for (key, n) in &b.transitions {
            let (to, reason) = key.split_once('/').unwrap_or((key.as_str(), ""));
            let mut l = who(b);
            l.push(("to", to.to_string()));
            l.push(("reason", reason.to_string()));
            transitions.push((l, *n));
        }
        let mut ok = who(b);
        ok.push(("result", "success".into()));
        probes.push((ok, b.probes_ok));
        for (reason, n) in &b.failures {
            let mut l = who(b);
            l.push(("result", reason.clone()));
            probes.push((l, *n));
        }
    }
    for f in [
        Family {
            name: "agent_backend_healthy",
            help: "1 while active health checks find the backend healthy (rise/fall applied).",
            kind: MetricType::Gauge,
            samples: healthy,
        },
        Family {
            name: "agent_breaker_state",
            help: "Circuit breaker state of a backend: 1 for the current state.",
            kind: MetricType::Gauge,
            samples: state,
        },
        Family {
            name: "agent_breaker_transitions",
            help: "Circuit breaker transitions by target state and reason.",
            kind: MetricType::Counter,
            samples: transitions,
        },
        Family {
            name: "agent_probes",
            help: "Health probes by result (success, or the failure reason).",
            kind: MetricType::Counter,
            samples: probes,
        },
        Family {
            name: "agent_backend_datapath_packets",
            help: "Packets toward a backend by breaker action in the datapath: new flows admitted, half-open trials, rejected (TCP RST, ICMP unreachable), dropped, established flows cut.",
            kind: MetricType::Counter,
            samples: datapath,
        },
        Family {
            name: "agent_backend_passive",
            help: "Passive detection: tracked SYNs answered by a SYN-ACK, refused by a RST, or unanswered past health_check.timeout.",
            kind: MetricType::Counter,
            samples: passive,
        },
        Family {
            name: "agent_backend_map_write_errors",
            help: "Breaker states the datapath map refused (each retried until written).",
            kind: MetricType::Counter,
            samples: write_errors,
        },
    ] {
        f.encode(encoder)?;
    }
    let mut metric = encoder.encode_descriptor(
        "agent_probe_latency_seconds",
        "Latency of a probe's last attempt.",
        None,
        MetricType::Histogram,
    )?;
    for b in backends.iter().filter(|b| b.health != UNCHECKED) {
        let labels = who(b);
        // Per-bucket counts; the encoder accumulates them.
        let total = b.probes_ok + b.probes_failed;
        let finite: u64 = b.latency_buckets.iter().sum();
        let buckets: Vec<(f64, u64)> = crate::supervisor::LATENCY_BUCKETS
            .iter()
            .copied()
            .zip(b.latency_buckets.iter().copied())
            .chain([(f64::INFINITY, total.saturating_sub(finite))])
            .collect();
        metric
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(
                b.latency_sum,
                b.probes_ok + b.probes_failed,
                &buckets,
                None,
            )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::PassiveCounts;
    use crate::telemetry::status::{
        CounterJson, DropStatus, MapUsage, RateLimitStatus, ServiceStatus, ShapingStatus,
        render_text,
    };

    fn report() -> StatusReport {
        StatusReport {
            ready: true,
            policy_file: "p.yaml".into(),
            attachments: vec!["xdp (native) on veth0".into()],
            services: vec![ServiceStatus {
                id: 0,
                name: "checkout".into(),
                matches: "198.18.0.2/32 udp/5000".into(),
                rate_limit: Some(RateLimitStatus {
                    summary: "flow 10/s burst 5".into(),
                    keys: 7,
                    new_keys: 9,
                    evictions: 2,
                }),
                passed: CounterJson {
                    packets: 100,
                    bytes: 6400,
                },
                dropped: vec![
                    DropStatus {
                        reason: "rate_limit".into(),
                        counter: CounterJson {
                            packets: 400,
                            bytes: 25600,
                        },
                    },
                    DropStatus {
                        reason: "contended".into(),
                        counter: CounterJson::default(),
                    },
                ],
                passed_no_bucket: CounterJson::default(),
                shaping: Some(ShapingStatus {
                    summary: "flow 6250000B/s horizon 2s".into(),
                    paced: CounterJson {
                        packets: 90,
                        bytes: 136_260,
                    },
                    horizon_drops: CounterJson {
                        packets: 5,
                        bytes: 7570,
                    },
                    unpaced: CounterJson::default(),
                    contended: 1,
                    delay_seconds: 0.0025,
                    last_delay_seconds: 0.003,
                }),
                degradation: None,
                fallback_of: None,
            }],
            global: vec![(
                "unmatched".into(),
                CounterJson {
                    packets: 3,
                    bytes: 180,
                },
            )],
            backends: vec![
                crate::supervisor::BackendStatus {
                    service: "checkout".into(),
                    address: "198.18.0.11:8080".into(),
                    health: "unhealthy".into(),
                    breaker: Some("open".into()),
                    probes_ok: 4,
                    probes_failed: 3,
                    failures: [("refused".to_string(), 3)].into(),
                    transitions: [("open/consecutive_failures".to_string(), 1)].into(),
                    latency_buckets: vec![5, 2, 0, 0, 0, 0, 0, 0, 0, 0],
                    latency_sum: 0.004,
                    id: Some(0),
                    datapath: [
                        ("admitted".to_string(), 120),
                        ("reject_rst".to_string(), 40),
                        ("drop".to_string(), 2),
                    ]
                    .into(),
                    passive: Some(PassiveCounts {
                        synack: 90,
                        refused: 6,
                        timeout: 1,
                    }),
                    map_write_errors: 1,
                    ..Default::default()
                },
                crate::supervisor::BackendStatus {
                    service: "checkout".into(),
                    address: "198.18.0.12:8080".into(),
                    health: "unchecked".into(),
                    latency_buckets: vec![0; 10],
                    ..Default::default()
                },
            ],
            balancing: vec![crate::lb::balancer::LbServiceView {
                service: "checkout".into(),
                algorithm: "maglev".into(),
                connections: 12,
                evictions: 4,
                no_backend: 1,
                lost: 2,
                client_ports_moved: 5,
                client_ports_busy: 1,
                publishes: 3,
                write_errors: 0,
                panic: false,
            }],
            lb_backends: vec![crate::lb::balancer::LbBackendView {
                service: "checkout".into(),
                address: "198.18.0.11:8080".into(),
                configured: 100,
                effective: 10,
                active: 7,
                new_flows: 40,
                packets: 400,
                bytes: 40_000,
            }],
            maps: vec![
                crate::telemetry::status::MapStatus {
                    map: "RL_BUCKETS".into(),
                    maps: 1,
                    memory_bytes: 12_672,
                    usage: Some(MapUsage {
                        entries: 60,
                        capacity: 64,
                        pressure: 0.9375,
                        counted: "walk".into(),
                    }),
                },
                crate::telemetry::status::MapStatus {
                    map: "SVC_CFG".into(),
                    maps: 1,
                    memory_bytes: 8_192,
                    usage: Some(MapUsage {
                        entries: 1,
                        capacity: 1024,
                        pressure: 1.0 / 1024.0,
                        counted: "policy".into(),
                    }),
                },
                crate::telemetry::status::MapStatus {
                    map: "AYA_LOGS".into(),
                    maps: 1,
                    memory_bytes: 4_096,
                    usage: None,
                },
            ],
            kernel_memory_bytes: Some(24_960),
            repairs: vec![("xdp_link".into(), 2), ("pin".into(), 1)],
            adopted: true,
            pin_path: Some("/sys/fs/bpf/agent".into()),
            reload: reloads(),
            shedding: Default::default(),
        }
    }

    /// `report()` with `checkout` degraded to its fallback by latency, a second latency
    /// condition and an availability condition without a sample, and shedding at `low`.
    fn degraded() -> (StatusReport, Vec<TransitionCount>) {
        use agent_common::status::{ConditionStatus, DegradationStatus, SheddingStatus};
        let mut r = report();
        let condition = |t: &str, value| ConditionStatus {
            r#type: t.into(),
            threshold: "500ms".into(),
            window_seconds: 2.0,
            value,
            samples: 3,
            met: true,
        };
        r.services[0].degradation = Some(DegradationStatus {
            mode: "fallback".into(),
            degraded: true,
            cause: Some("latency p99 612ms > 500ms over 2s".into()),
            conditions: vec![
                condition("latency", Some(0.612)),
                condition("latency", Some(0.1)),
                condition("availability", None),
            ],
            transitions: 3,
            ..Default::default()
        });
        r.shedding = SheddingStatus {
            level: "low".into(),
            pressure: true,
            shed: vec!["batch".into()],
            level_for_seconds: 1.0,
        };
        let t = |from, to, count| TransitionCount {
            service: "checkout".into(),
            from,
            to,
            count,
        };
        (
            r,
            vec![t("normal", "fallback", 2), t("fallback", "normal", 1)],
        )
    }

    #[test]
    fn exposition_has_degradation_and_shedding() {
        let (r, transitions) = degraded();
        let text = render(&r, &transitions).unwrap();
        for line in [
            "# TYPE agent_degradation_transitions_total counter",
            "agent_degradation_transitions_total{service=\"checkout\",from=\"normal\",to=\"fallback\"} 2",
            "agent_degradation_transitions_total{service=\"checkout\",from=\"fallback\",to=\"normal\"} 1",
            "# TYPE agent_degradation_mode gauge",
            "agent_degradation_mode{service=\"checkout\"} 1",
            "# TYPE agent_degradation_condition gauge",
            "agent_degradation_condition{service=\"checkout\",type=\"latency\"} 0.612",
            "agent_degradation_condition{service=\"checkout\",type=\"availability\"} NaN",
            "# TYPE agent_shed_level gauge",
            "agent_shed_level 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing line {line:?} in:\n{text}"
            );
        }
        assert_eq!(
            text.matches("agent_degradation_condition{service=\"checkout\",type=\"latency\"}")
                .count(),
            1,
            "one sample per service and type:\n{text}"
        );
        // Without an evaluator: none of them.
        let plain = render(&report(), &[]).unwrap();
        assert!(!plain.contains("agent_degradation"), "{plain}");
        assert!(!plain.contains("agent_shed_level"), "{plain}");
        let text = render_text(&r);
        assert!(text.contains("DEGRADATION"), "{text}");
        assert!(text.contains("latency p99 612ms > 500ms over 2s"), "{text}");
        assert!(text.contains("shed level: low"), "{text}");
    }

    /// Two reloads: an invalid file, then an applied one.
    fn reloads() -> crate::telemetry::reload::ReloadStatus {
        use crate::telemetry::reload::{Outcome, ReloadLog, Trigger};
        use std::time::{Duration, SystemTime};
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut log = ReloadLog::new(t0);
        let error = "p.yaml:9:13: services[0].rate_limit.rate: must be greater than 0\n\
                     p.yaml:10:14: services[0].rate_limit.burst: must be at least 1";
        log.record(
            Trigger::File,
            Outcome::Invalid,
            Some(error.into()),
            t0 + Duration::from_secs(10),
            Duration::from_millis(2),
        );
        log.record(
            Trigger::Sighup,
            Outcome::Ok,
            None,
            t0 + Duration::from_millis(20_500),
            Duration::from_millis(3),
        );
        log.status()
    }

    #[test]
    fn exposition_has_the_reloads() {
        let text = render(&report(), &[]).unwrap();
        for line in [
            "# TYPE agent_reload_total counter",
            "agent_reload_total{result=\"ok\"} 1",
            "agent_reload_total{result=\"invalid\"} 1",
            "agent_reload_total{result=\"failed\"} 0",
            "agent_reload_total{result=\"missing\"} 0",
            "agent_reload_total{result=\"refused\"} 0",
            "agent_reload_total{result=\"unchanged\"} 0",
            "agent_policy_generation 1",
            "agent_reload_last_success 1",
            "agent_reload_last_success_timestamp_seconds 1700000020.5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing line {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn status_text_shows_the_latest_failed_reload_with_every_error() {
        let text = render_text(&report());
        for line in [
            "policy generation: 1   reloads: 2 (invalid 1, ok 1)",
            "  p.yaml:9:13: services[0].rate_limit.rate: must be greater than 0",
            "  p.yaml:10:14: services[0].rate_limit.burst: must be at least 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing line {line:?} in:\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("last reload: ok (SIGHUP)")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("last failed reload: invalid (file)")),
            "{text}"
        );
    }

    #[test]
    fn exposition_has_map_pressure_and_memory() {
        let text = render(&report(), &[]).unwrap();
        for line in [
            "# TYPE agent_bpf_map_pressure gauge",
            "agent_bpf_map_pressure{map=\"RL_BUCKETS\"} 0.9375",
            "agent_bpf_map_pressure{map=\"SVC_CFG\"} 0.0009765625",
            "agent_bpf_map_entries{map=\"RL_BUCKETS\"} 60",
            "agent_bpf_map_capacity{map=\"RL_BUCKETS\"} 64",
            "agent_bpf_map_capacity{map=\"SVC_CFG\"} 1024",
            "agent_bpf_map_memory_bytes{map=\"RL_BUCKETS\"} 12672",
            "agent_bpf_map_memory_bytes{map=\"AYA_LOGS\"} 4096",
            "agent_datapath_kernel_memory_bytes 24960",
            "agent_repairs_total{what=\"xdp_link\"} 2",
            "agent_repairs_total{what=\"pin\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing line {line:?} in:\n{text}"
            );
        }
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("agent_bpf_map_pressure{map=\"AYA_LOGS\"")),
            "a map that cannot fill has no pressure:\n{text}"
        );
        let empty = render(&StatusReport::default(), &[]).unwrap();
        assert!(
            !empty.contains("agent_datapath_kernel_memory_bytes"),
            "no memory sample before the first reading:\n{empty}"
        );
    }

    #[test]
    fn status_text_shows_the_fullest_tables_first() {
        let text = render_text(&report());
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip_while(|l| !l.starts_with("BPF MAPS"))
            .skip(2)
            .take(4)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec![
                    "RL_BUCKETS",
                    "1",
                    "60",
                    "64",
                    "93.8%",
                    "walk",
                    "12.4",
                    "KiB"
                ],
                vec!["SVC_CFG", "1", "1", "1024", "0.1%", "policy", "8192", "B"],
                vec!["AYA_LOGS", "1", "-", "-", "-", "-", "4096", "B"],
                vec!["kernel", "memory", "of", "all", "maps:", "24.4", "KiB"],
            ],
            "{text}"
        );
    }

    #[test]
    fn exposition_has_every_family_with_labels() {
        let text = render(&report(), &[]).unwrap();
        for line in [
            "agent_service_packets_total{service=\"checkout\",verdict=\"passed\"} 100",
            "agent_service_bytes_total{service=\"checkout\",verdict=\"passed\"} 6400",
            "agent_service_dropped_packets_total{service=\"checkout\",reason=\"rate_limit\"} 400",
            "agent_service_dropped_bytes_total{service=\"checkout\",reason=\"rate_limit\"} 25600",
            "agent_service_dropped_packets_total{service=\"checkout\",reason=\"contended\"} 0",
            "agent_ratelimit_keys{service=\"checkout\"} 7",
            "agent_ratelimit_new_keys_total{service=\"checkout\"} 9",
            "agent_ratelimit_key_evictions_total{service=\"checkout\"} 2",
            "agent_datapath_packets_total{class=\"unmatched\"} 3",
            "# TYPE agent_ratelimit_keys gauge",
            "# TYPE agent_service_packets_total counter",
            "agent_backend_healthy{service=\"checkout\",backend=\"198.18.0.11:8080\"} 0",
            "agent_breaker_state{service=\"checkout\",backend=\"198.18.0.11:8080\",state=\"open\"} 1",
            "agent_breaker_state{service=\"checkout\",backend=\"198.18.0.11:8080\",state=\"closed\"} 0",
            "agent_breaker_transitions_total{service=\"checkout\",backend=\"198.18.0.11:8080\",to=\"open\",reason=\"consecutive_failures\"} 1",
            "agent_probes_total{service=\"checkout\",backend=\"198.18.0.11:8080\",result=\"refused\"} 3",
            "agent_probe_latency_seconds_bucket{service=\"checkout\",backend=\"198.18.0.11:8080\",le=\"0.001\"} 7",
            "agent_probe_latency_seconds_bucket{service=\"checkout\",backend=\"198.18.0.11:8080\",le=\"+Inf\"} 7",
            "agent_probe_latency_seconds_count{service=\"checkout\",backend=\"198.18.0.11:8080\"} 7",
            "# TYPE agent_backend_datapath_packets_total counter",
            "agent_backend_datapath_packets_total{service=\"checkout\",backend=\"198.18.0.11:8080\",action=\"admitted\"} 120",
            "agent_backend_datapath_packets_total{service=\"checkout\",backend=\"198.18.0.11:8080\",action=\"trial\"} 0",
            "agent_backend_datapath_packets_total{service=\"checkout\",backend=\"198.18.0.11:8080\",action=\"reject_rst\"} 40",
            "agent_backend_datapath_packets_total{service=\"checkout\",backend=\"198.18.0.11:8080\",action=\"reject_icmp\"} 0",
            "agent_backend_datapath_packets_total{service=\"checkout\",backend=\"198.18.0.11:8080\",action=\"drop\"} 2",
            "agent_backend_datapath_packets_total{service=\"checkout\",backend=\"198.18.0.11:8080\",action=\"close_existing\"} 0",
            "agent_lb_backend_effective_weight{service=\"checkout\",backend=\"198.18.0.11:8080\"} 10",
            "agent_lb_backend_active_connections{service=\"checkout\",backend=\"198.18.0.11:8080\"} 7",
            "agent_lb_backend_new_flows_total{service=\"checkout\",backend=\"198.18.0.11:8080\"} 40",
            "agent_lb_backend_bytes_total{service=\"checkout\",backend=\"198.18.0.11:8080\"} 40000",
            "agent_lb_connections{service=\"checkout\"} 12",
            "agent_lb_conntrack_lost_total{service=\"checkout\"} 2",
            "agent_lb_client_ports_moved_total{service=\"checkout\"} 5",
            "agent_lb_client_ports_busy_total{service=\"checkout\"} 1",
            "agent_lb_conntrack_evictions_total{service=\"checkout\"} 4",
            "# TYPE agent_backend_passive_total counter",
            "agent_backend_passive_total{service=\"checkout\",backend=\"198.18.0.11:8080\",result=\"synack\"} 90",
            "agent_backend_passive_total{service=\"checkout\",backend=\"198.18.0.11:8080\",result=\"refused\"} 6",
            "agent_backend_passive_total{service=\"checkout\",backend=\"198.18.0.11:8080\",result=\"timeout\"} 1",
            "agent_backend_map_write_errors_total{service=\"checkout\",backend=\"198.18.0.11:8080\"} 1",
            "agent_shaping_paced_packets_total{service=\"checkout\"} 90",
            "agent_shaping_paced_bytes_total{service=\"checkout\"} 136260",
            "agent_shaping_horizon_drops_total{service=\"checkout\"} 5",
            "agent_shaping_unpaced_packets_total{service=\"checkout\"} 0",
            "agent_shaping_contended_packets_total{service=\"checkout\"} 1",
            "# TYPE agent_shaping_delay_seconds gauge",
            "agent_shaping_delay_seconds{service=\"checkout\"} 0.0025",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing line {line:?} in:\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("agent_ready") && l.ends_with(" 1")),
            "agent_ready missing in:\n{text}"
        );
        let unenforced = "backend=\"198.18.0.12:8080\"";
        for family in [
            "agent_backend_datapath_packets",
            "agent_backend_passive",
            "agent_backend_map_write_errors",
            "agent_backend_healthy",
            "agent_breaker_state",
        ] {
            assert!(
                !text
                    .lines()
                    .any(|l| l.starts_with(family) && l.contains(unenforced)),
                "{family} for a backend without breaker or checks in:\n{text}"
            );
        }
    }

    #[test]
    fn status_json_round_trips() {
        let r = report();
        let json = serde_json::to_string(&r).unwrap();
        let back: StatusReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let text = render_text(&r);
        assert!(text.contains("checkout"), "{text}");
        assert!(text.contains("rate_limit"), "{text}");
    }

    #[test]
    fn status_text_shows_breakers_in_the_datapath() {
        let text = render_text(&report());
        let line = |needle: &str| {
            text.lines()
                .filter(|l| l.contains(needle))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            line("198.18.0.11:8080"),
            [
                "checkout 198.18.0.11:8080 unhealthy open 0.0s 4 3 -",
                "checkout 198.18.0.11:8080 open 120 0 40 2 0 90/6/1 (1 map write errors)",
                "checkout 198.18.0.11:8080 100 10 7 40 400 40000",
            ],
            "{text}"
        );
        assert_eq!(
            line("198.18.0.12:8080"),
            ["checkout 198.18.0.12:8080 unchecked - 0.0s 0 0 -"],
            "no breaker: not in the datapath table\n{text}"
        );
        assert!(text.contains("BREAKERS IN THE DATAPATH"), "{text}");
        assert_eq!(
            line("flow 6250000B/s"),
            ["checkout flow 6250000B/s horizon 2s 90 5 0 1 2.500ms"],
            "{text}"
        );
    }
}
