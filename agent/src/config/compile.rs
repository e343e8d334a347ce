//! Policy -> datapath map entries (agent-common types). Infallible: validation has already
//! refused everything that would not fit (rule lists, token-bucket arithmetic, service count,
//! backends with breakers, one breaker per backend address and protocol).

use std::net::SocketAddr;
use std::time::Duration;

use agent_common::breaker::{
    BackendKey, BackendState, F_CLOSE_EXISTING, F_DROP, F_PASSIVE, STATE_CLOSED,
};
use agent_common::classify::{MAX_MATCH_RULES, PORT_ANY, V4_MAPPED_PREFIX, v4_mapped};
use agent_common::limit::{RL_UNIT_BYTES, RL_UNIT_PACKETS, SVC_F_ACTIVE};
use agent_common::shape::{SVC_F_SHAPE, ShapeConfig};
use agent_common::{MatchList, MatchRule, ServiceConfig};

use agent_common::policy::model::{
    MAX_TABLE_ENTRIES, OnOpen, Policy, Priority, RateLimit, Service, Tables,
};
use agent_common::policy::rules::{
    PrefixRules, backend_key, backend_protocols, key_kind, prefix_rules, proto,
};

// Every service has one prefix, plus the IPv4 guard entry: with at most `agent.tables.services`
// services the trie (`maps::classify_entries`, twice that) never overflows.

/// Everything the datapath maps hold for one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Index == service id, in policy order (`SVC_CFG`).
    pub services: Vec<CompiledService>,
    /// `CLASSIFY` trie entries: one per distinct prefix of the policy, plus, when an IPv6
    /// prefix covers the IPv4-mapped range `::ffff:0:0/96` (e.g. `::/0`) and no `0.0.0.0/0`
    /// service exists, an empty entry for that range, so IPv4 packets never fall into IPv6
    /// rules in the trie.
    pub classify: Vec<ClassifyEntry>,
    /// Size of the token-bucket table: the sum of `max_keys` over services with a rate
    /// limit, clamped to 1..=16777216; 1 when none has one.
    pub max_keys: u32,
    /// `BACKENDS` entries: every backend of a service with a `circuit_breaker`, in policy
    /// order (services, then their backends); `id` is the position in this list.
    pub backends: Vec<CompiledBackend>,
    /// Services balanced in the datapath (`load_balancing.vip`).
    pub lb: Vec<super::balance::CompiledLb>,
    /// `agent.tables`: the sizes of the node-wide tables.
    pub tables: Tables,
    /// Size of the departure table of shaping (`SHAPE_NEXT`): the sum of `shaping.max_keys`,
    /// clamped to 1..=16777216; 1 when no service is shaped.
    pub shape_keys: u32,
    /// The longest `shaping.horizon` of the policy; `None` when no service is shaped (then
    /// no qdisc is touched).
    pub shape_horizon: Option<Duration>,
}

/// One backend whose breaker the datapath enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledBackend {
    /// Index of the service in the policy (its service id).
    pub service: usize,
    /// Index of the backend in the service's `backends` (its breaker in the `EjectionGuard`).
    pub index: usize,
    pub address: SocketAddr,
    /// `BackendState::id`: where its counters are in `BACKEND_STATS`. Sequential from 0 and
    /// below `agent.tables.backends` (validation refuses more).
    pub id: u32,
    /// One `BACKENDS` key per protocol the service matches: a breaker acts on where packets
    /// go, and `any` sends both TCP and UDP there.
    pub keys: Vec<BackendKey>,
    /// `F_*`.
    pub flags: u32,
    /// `health_check.timeout` when the backend has passive detection (`F_PASSIVE`): a SYN
    /// unanswered for this long is a failure, as a probe that long would be.
    pub passive_timeout: Option<Duration>,
}

impl CompiledBackend {
    /// The map value for a breaker state (`State::code`), its admission quota and the
    /// half-open epoch.
    pub fn state(&self, state: u32, quota: u32, epoch: u32) -> BackendState {
        BackendState {
            state,
            flags: self.flags,
            quota,
            epoch,
            id: self.id,
            _pad: 0,
            since_ns: 0,
            open_for_ns: 0,
        }
    }

    /// What the datapath starts with: closed, every flow admitted, epoch 0.
    pub fn initial(&self) -> BackendState {
        self.state(STATE_CLOSED, u32::MAX, 0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledService {
    pub id: u32,
    pub name: String,
    pub priority: Priority,
    pub config: ServiceConfig,
}

/// One key/value of the classifier trie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassifyEntry {
    /// In the 128-bit key space: IPv4 prefixes are 96 + their length.
    pub prefix_len: u32,
    pub addr: [u8; 16],
    /// Rules of this prefix and of every shorter policy prefix covering it, most specific
    /// first; the datapath takes the first that accepts the packet.
    pub rules: MatchList,
}

fn backend_flags(s: &Service) -> u32 {
    let mut flags = 0;
    if let Some(cb) = &s.circuit_breaker {
        if cb.on_open == OnOpen::Drop {
            flags |= F_DROP;
        }
        if cb.close_existing {
            flags |= F_CLOSE_EXISTING;
        }
    }
    if s.health_check.as_ref().is_some_and(|h| h.passive) {
        flags |= F_PASSIVE;
    }
    flags
}

/// Every backend of the services with a circuit breaker, ids in policy order.
pub fn compile_backends(policy: &Policy) -> Vec<CompiledBackend> {
    let enforced = policy
        .services
        .iter()
        .enumerate()
        .filter(|(_, s)| s.circuit_breaker.is_some());
    let mut out = Vec::new();
    for (service, s) in enforced {
        let flags = backend_flags(s);
        let passive_timeout = s
            .health_check
            .as_ref()
            .filter(|h| h.passive)
            .map(|h| h.timeout);
        for (index, b) in s.backends.iter().enumerate() {
            out.push(CompiledBackend {
                service,
                index,
                address: b.address,
                id: u32::try_from(out.len()).unwrap_or(u32::MAX),
                keys: backend_protocols(s.r#match.protocol)
                    .iter()
                    .map(|p| backend_key(b.address, *p))
                    .collect(),
                flags,
                passive_timeout,
            });
        }
    }
    out
}
fn service_config(service: &Service) -> ServiceConfig {
    let mut config = limit_config(service);
    if let Some(shaping) = &service.shaping {
        match ShapeConfig::try_from(shaping) {
            Ok(shape) => {
                config.flags |= SVC_F_SHAPE;
                config.shape = shape;
            }
            // Unreachable after validation; no pacing is the datapath's fail-open.
            Err(e) => debug_assert!(false, "validation let through {e}"),
        }
    }
    config
}

fn limit_config(service: &Service) -> ServiceConfig {
    let active = ServiceConfig {
        flags: SVC_F_ACTIVE,
        ..Default::default()
    };
    let Some(RateLimit {
        key, rate, burst, ..
    }) = &service.rate_limit
    else {
        return active;
    };
    let key = key_kind(*key);
    let unit = if rate.is_bytes() {
        RL_UNIT_BYTES
    } else {
        RL_UNIT_PACKETS
    };
    let config = ServiceConfig::with_rate_limit(key, unit, rate.per_second(), *burst);
    debug_assert!(config.is_some(), "validation let through {rate} {burst}");
    // Unreachable after validation; failing open (no limit) matches the datapath's policy.
    config.unwrap_or(active)
}

fn classify_entry(p: &PrefixRules<'_>) -> ClassifyEntry {
    let (addr, prefix_len) = p.prefix.trie_key();
    let mut rules = MatchList::default();
    debug_assert!(p.rules.len() <= MAX_MATCH_RULES, "validation let through");
    for (slot, (i, m)) in rules.rules.iter_mut().zip(&p.rules) {
        *slot = MatchRule {
            service_id: u32::try_from(*i).unwrap_or(u32::MAX),
            port: m.port.unwrap_or(PORT_ANY),
            proto: proto(m.protocol),
            _pad: 0,
        };
    }
    rules.count = p.rules.len().min(MAX_MATCH_RULES) as u32;
    ClassifyEntry {
        prefix_len,
        addr,
        rules,
    }
}

pub fn compile(policy: &Policy) -> Compiled {
    let services = policy
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut config = service_config(s);
            // A degradable service names its companion (`agent_common::degrade`); `Ids`
            // renumbers the two together.
            config.fallback = policy
                .companion_of(i)
                .map_or(0, |k| u32::try_from(k + 1).unwrap_or(0));
            CompiledService {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                name: s.name.clone(),
                priority: s.priority,
                config,
            }
        })
        .collect();

    // Companions are never classified into: the datapath reaches them through their service.
    let table = prefix_rules(policy.file_services().map(|(i, s)| (i, &s.r#match)));
    let mut classify: Vec<ClassifyEntry> = table.iter().map(classify_entry).collect();
    let mapped = agent_common::policy::net::Cidr::V4_MAPPED_RANGE;
    let v6_covers_v4 = table
        .iter()
        .any(|p| p.prefix.addr().is_ipv6() && p.prefix.covers(&mapped));
    let v4_default = table
        .iter()
        .any(|p| p.prefix.addr().is_ipv4() && p.prefix.prefix_len() == 0);
    if v6_covers_v4 && !v4_default {
        classify.push(ClassifyEntry {
            prefix_len: V4_MAPPED_PREFIX,
            addr: v4_mapped([0; 4]),
            rules: MatchList::default(),
        });
    }

    let keys: u64 = policy
        .services
        .iter()
        .filter_map(|s| s.rate_limit.as_ref())
        .map(|r| u64::from(r.max_keys))
        .sum();
    // `agent.tables.keys` may leave room above the total for reloads.
    let keys = keys.max(policy.agent.tables.keys.map_or(0, u64::from));
    let max_keys = keys.clamp(1, u64::from(MAX_TABLE_ENTRIES)) as u32;

    let shaped = || policy.services.iter().filter_map(|s| s.shaping.as_ref());
    let shape_keys: u64 = shaped().map(|s| u64::from(s.max_keys)).sum();
    let shape_keys = shape_keys.max(policy.agent.tables.departures.map_or(0, u64::from));
    let shape_keys = shape_keys.clamp(1, u64::from(MAX_TABLE_ENTRIES)) as u32;

    Compiled {
        services,
        classify,
        max_keys,
        backends: compile_backends(policy),
        lb: super::balance::compile_lb(policy),
        tables: policy.agent.tables,
        shape_keys,
        shape_horizon: shaped().map(|s| s.horizon).max(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use agent_common::classify::PROTO_ICMP;
    use agent_common::classify::{PROTO_TCP, PROTO_UDP};
    use agent_common::limit::{RL_KEY_FLOW, RL_KEY_SOURCE_IP};
    use agent_common::policy::model::{KeyBy, Shaping};
    use agent_common::policy::rules::ShapeCompileError;
    use std::net::IpAddr;

    /// The datapath's decision: one longest-prefix lookup, then the first accepting rule.
    fn lookup(c: &Compiled, dst: IpAddr, proto: u8, port: Option<u16>) -> Option<u32> {
        let key = match dst {
            IpAddr::V4(a) => v4_mapped(a.octets()),
            IpAddr::V6(a) => a.octets(),
        };
        let bits = |a: &[u8; 16]| u128::from_be_bytes(*a);
        let hit = c
            .classify
            .iter()
            .filter(|e| {
                let m = u128::MAX.checked_shl(128 - e.prefix_len).unwrap_or(0);
                bits(&key) & m == bits(&e.addr) & m
            })
            .max_by_key(|e| e.prefix_len)?;
        hit.rules.find(proto, port)
    }

    fn policy(services: &str) -> Policy {
        let src = format!("version: 1\ninterfaces:\n  - name: eth0\nservices:\n{services}");
        match load_str(&src, "test.yaml") {
            Ok(p) => p,
            Err(e) => panic!("expected a valid policy, got:\n{e}\n{src}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nested_prefixes_fall_back_to_the_covering_service() {
        let c = compile(&policy(
            "  - name: net\n    match: {address: 198.18.0.0/24, protocol: any}\n\
             \x20 - name: host-web\n    match: {address: 198.18.0.2, port: 80, protocol: tcp}\n",
        ));
        assert_eq!(c.classify.len(), 2);
        let host = ip("198.18.0.2");
        assert_eq!(lookup(&c, host, PROTO_TCP, Some(80)), Some(1));
        assert_eq!(
            lookup(&c, host, PROTO_TCP, Some(443)),
            Some(0),
            "another port of the /32 ends at the /24 service"
        );
        assert_eq!(lookup(&c, host, PROTO_UDP, Some(80)), Some(0));
        assert_eq!(lookup(&c, host, PROTO_ICMP, None), Some(0));
        assert_eq!(lookup(&c, ip("198.18.0.9"), PROTO_TCP, Some(80)), Some(0));
        assert_eq!(lookup(&c, ip("198.18.1.2"), PROTO_TCP, Some(80)), None);
        let e = c.classify.iter().find(|e| e.prefix_len == 128).unwrap();
        assert_eq!(e.addr, v4_mapped([198, 18, 0, 2]));
        assert_eq!(e.rules.count, 2);
        assert_eq!(e.rules.rules[0].service_id, 1);
        assert_eq!(e.rules.rules[1].service_id, 0);
    }

    #[test]
    fn port_beats_protocol_and_ties_keep_policy_order() {
        let c = compile(&policy(
            "  - name: any-tcp\n    match: {address: 198.18.0.0/24}\n\
             \x20 - name: p53-udp\n    match: {address: 198.18.0.0/24, port: 53, protocol: udp}\n\
             \x20 - name: p53-tcp\n    match: {address: 198.18.0.0/24, port: 53}\n\
             \x20 - name: p80-any\n    match: {address: 198.18.0.0/24, port: 80, protocol: any}\n",
        ));
        let e = &c.classify[0].rules;
        let order: Vec<u32> = e.rules[..e.count as usize]
            .iter()
            .map(|r| r.service_id)
            .collect();
        assert_eq!(order, [1, 2, 3, 0]);
        let a = ip("198.18.0.1");
        assert_eq!(lookup(&c, a, PROTO_UDP, Some(53)), Some(1));
        assert_eq!(lookup(&c, a, PROTO_TCP, Some(53)), Some(2));
        assert_eq!(lookup(&c, a, PROTO_UDP, Some(80)), Some(3));
        assert_eq!(lookup(&c, a, PROTO_TCP, Some(22)), Some(0));
        assert_eq!(lookup(&c, a, PROTO_UDP, Some(22)), None);
    }

    #[test]
    fn ipv6_prefixes_and_families_stay_apart() {
        let c = compile(&policy(
            "  - name: v6-all\n    match: {address: '::/0', protocol: any}\n\
             \x20 - name: v6-doc\n    match: {address: '2001:db8::/32', port: 443}\n\
             \x20 - name: v4-host\n    match: {address: 198.18.0.1, protocol: any}\n",
        ));
        let doc = ip("2001:db8::5");
        assert_eq!(lookup(&c, doc, PROTO_TCP, Some(443)), Some(1));
        assert_eq!(lookup(&c, doc, PROTO_TCP, Some(80)), Some(0));
        assert_eq!(lookup(&c, ip("2001:db9::1"), PROTO_UDP, Some(1)), Some(0));
        assert_eq!(lookup(&c, ip("198.18.0.1"), PROTO_UDP, Some(1)), Some(2));
        assert_eq!(
            lookup(&c, ip("198.18.0.2"), PROTO_UDP, Some(1)),
            None,
            "an IPv4 packet must not match ::/0"
        );
        let v4_entry = c
            .classify
            .iter()
            .find(|e| e.prefix_len == 128 && e.addr == v4_mapped([198, 18, 0, 1]))
            .unwrap();
        assert_eq!(
            v4_entry.rules.count, 1,
            "IPv6 rules never cover IPv4 prefixes"
        );
        let v6 = c.classify.iter().find(|e| e.prefix_len == 32).unwrap();
        assert_eq!(&v6.addr[..4], &[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(v6.rules.count, 2);
    }

    #[test]
    fn service_configs_and_key_table_size() {
        let c = compile(&policy(
            "  - name: pkts\n    match: {address: 198.18.0.1}\n    rate_limit: {key: flow, rate: 1000/s, burst: 200}\n\
             \x20 - name: bits\n    match: {address: 198.18.0.2}\n    rate_limit: {rate: 8Mbit/s, max_keys: 10}\n\
             \x20 - name: free\n    match: {address: 198.18.0.3}\n",
        ));
        let cfg = |i: usize| c.services[i].config;
        assert_eq!(
            Some(cfg(0)),
            ServiceConfig::with_rate_limit(RL_KEY_FLOW, RL_UNIT_PACKETS, 1000, 200)
        );
        assert_eq!(
            Some(cfg(1)),
            ServiceConfig::with_rate_limit(RL_KEY_SOURCE_IP, RL_UNIT_BYTES, 1_000_000, 1_000_000)
        );
        assert_eq!(cfg(2).flags, SVC_F_ACTIVE);
        assert_eq!(c.services[2].id, 2);
        assert_eq!(c.services[1].name, "bits");
        assert_eq!(c.max_keys, 1_048_576 + 10);

        let none = compile(&policy("  - name: a\n    match: {address: 198.18.0.1}\n"));
        assert_eq!(none.max_keys, 1);
    }

    #[test]
    fn backends_with_a_breaker_get_ids_keys_and_flags() {
        let c = compile(&policy(
            "  - name: no-breaker\n    match: {address: 198.18.0.1}\n    backends: [{address: '10.0.0.1:80'}]\n\
             \x20 - name: web\n    match: {address: 198.18.0.2, port: 80}\n    backends: [{address: '10.0.0.2:80'}, {address: '[2001:db8::2]:80'}]\n    load_balancing: {vip: false}\n    circuit_breaker: {on_open: drop}\n\
             \x20 - name: dns\n    match: {address: 198.18.0.3, protocol: any}\n    backends: [{address: '10.0.0.3:53'}]\n    health_check: {timeout: 300ms}\n    circuit_breaker: {close_existing: true}\n\
             \x20 - name: quiet\n    match: {address: 198.18.0.4, protocol: udp}\n    backends: [{address: '10.0.0.4:53'}]\n    health_check: {passive: false}\n    circuit_breaker: {}\n",
        ));
        let b = &c.backends;
        let ids: Vec<(usize, usize, u32)> = b.iter().map(|b| (b.service, b.index, b.id)).collect();
        assert_eq!(ids, [(1, 0, 0), (1, 1, 1), (2, 0, 2), (3, 0, 3)]);

        assert_eq!(
            b[0].keys,
            [backend_key("10.0.0.2:80".parse().unwrap(), PROTO_TCP)]
        );
        assert_eq!(b[0].keys[0].addr, v4_mapped([10, 0, 0, 2]), "IPv4 mapped");
        assert_eq!(b[0].keys[0].port, 80);
        let v6: std::net::Ipv6Addr = "2001:db8::2".parse().unwrap();
        assert_eq!(b[1].keys[0].addr, v6.octets(), "IPv6 as is");
        assert_eq!(b[0].flags, F_DROP);
        assert_eq!(
            b[0].passive_timeout, None,
            "no health_check, no passive detection"
        );

        let protos: Vec<u8> = b[2].keys.iter().map(|k| k.proto).collect();
        assert_eq!(protos, [PROTO_TCP, PROTO_UDP], "`any` takes both");
        assert_eq!(b[2].flags, F_CLOSE_EXISTING | F_PASSIVE);
        assert_eq!(b[2].passive_timeout, Some(Duration::from_millis(300)));

        assert_eq!(b[3].keys[0].proto, PROTO_UDP);
        assert_eq!(b[3].flags, 0, "passive: false");

        let initial = b[1].initial();
        assert_eq!(
            (
                initial.state,
                initial.quota,
                initial.epoch,
                initial.id,
                initial.flags
            ),
            (STATE_CLOSED, u32::MAX, 0, 1, F_DROP)
        );
    }

    #[test]
    fn shaping_goes_into_the_service_config_with_its_table_size() {
        let c = compile(&policy(
            "  - name: video\n    match: {address: 198.18.0.1}\n    shaping: {rate: 50Mbit/s, key: source_ip, horizon: 500ms}\n\
             \x20 - name: both\n    match: {address: 198.18.0.2}\n    rate_limit: {rate: 1000/s}\n    shaping: {rate: 12MB/s, max_keys: 10}\n\
             \x20 - name: plain\n    match: {address: 198.18.0.3}\n",
        ));
        let video = c.services[0].config;
        assert_eq!(video.flags, SVC_F_ACTIVE | SVC_F_SHAPE);
        assert_eq!(
            video.shape,
            ShapeConfig::new(RL_KEY_SOURCE_IP, 6_250_000, 500_000_000).unwrap()
        );
        let both = c.services[1].config;
        assert_eq!(
            both.flags,
            SVC_F_ACTIVE | agent_common::limit::SVC_F_RATE_LIMIT | SVC_F_SHAPE
        );
        assert_eq!(both.rl_rate, 1000, "the limit stays as it was");
        assert_eq!(
            both.shape,
            ShapeConfig::new(RL_KEY_FLOW, 12_000_000, 2_000_000_000).unwrap(),
            "defaults: key flow, horizon 2s"
        );
        assert_eq!(c.services[2].config.flags, SVC_F_ACTIVE);
        assert_eq!(c.shape_keys, 65_536 + 10);
        assert_eq!(c.shape_horizon, Some(Duration::from_secs(2)));

        let none = compile(&policy("  - name: a\n    match: {address: 198.18.0.1}\n"));
        assert_eq!((none.shape_keys, none.shape_horizon), (1, None));
    }

    #[test]
    fn a_shaping_section_that_validation_would_refuse_does_not_convert() {
        let shaping = |rate, horizon| Shaping {
            rate,
            key: KeyBy::Flow,
            horizon,
            max_keys: 1,
        };
        use agent_common::policy::units::Rate;
        let second = Duration::from_secs(1);
        assert_eq!(
            ShapeConfig::try_from(&shaping(Rate::Packets(10), second)),
            Err(ShapeCompileError::PacketRate)
        );
        assert_eq!(
            ShapeConfig::try_from(&shaping(Rate::Bytes(0), second)),
            Err(ShapeCompileError::ZeroRate)
        );
        assert_eq!(
            ShapeConfig::try_from(&shaping(Rate::Bytes(1), Duration::ZERO)),
            Err(ShapeCompileError::ZeroHorizon)
        );
        assert_eq!(
            ShapeConfig::try_from(&shaping(Rate::Bytes(1), Duration::MAX)),
            Err(ShapeCompileError::HorizonTooLong)
        );
    }

    #[test]
    fn key_table_size_is_clamped() {
        let svc = |i: u32| {
            format!(
                "  - name: s{i}\n    match: {{address: 198.18.0.{i}}}\n    rate_limit: {{rate: 1/s, max_keys: 16777216}}\n"
            )
        };
        let c = compile(&policy(&(svc(1) + &svc(2))));
        assert_eq!(c.max_keys, 16_777_216);
    }
}
