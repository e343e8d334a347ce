//! Decoding of the policy's top level and of a service's own sections (`match`,
//! `rate_limit`, `backends`, `shaping`), with the checks that need only one section.
//! Resilience sections are in `resilience.rs`; checks across sections in `validate.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;

use agent_common::ServiceConfig;
use agent_common::limit::{RL_KEY_FLOW, RL_UNIT_BYTES, RL_UNIT_PACKETS};
use agent_common::maps::MAX_SERVICES;

use super::decode::{
    Cx, MapReader, int, int_u32, item, keyword, parsed, positive_duration, seq, string,
};
use super::model::*;
use super::net::{check_interface_name, parse_backend, parse_cidr};
use super::resilience;
use super::units::parse_rate;
use super::yaml::{Node, Value};

/// What decoding produced: every part that decoded, each list item in its place (so paths
/// and service ids stay those of the file). It becomes a `Policy` only when complete.
#[derive(Debug, Default)]
pub(crate) struct Draft {
    pub version: Option<u32>,
    pub agent: Option<AgentSettings>,
    pub interfaces: Option<Vec<Option<Interface>>>,
    pub services: Option<Vec<Option<Service>>>,
    /// No unknown top-level field.
    pub known_fields: bool,
}

impl Draft {
    /// Every service that decoded, with its index in the file.
    pub fn services(&self) -> impl Iterator<Item = (usize, &Service)> {
        self.services
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    pub fn interfaces(&self) -> impl Iterator<Item = (usize, &Interface)> {
        self.interfaces
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    /// The policy parts, when every one decoded.
    pub fn complete(self) -> Option<(u32, AgentSettings, Vec<Interface>, Vec<Service>)> {
        if !self.known_fields {
            return None;
        }
        let interfaces = self.interfaces?.into_iter().collect::<Option<Vec<_>>>()?;
        let services = self.services?.into_iter().collect::<Option<Vec<_>>>()?;
        Some((self.version?, self.agent?, interfaces, services))
    }
}

const POLICY_FIELDS: &[&str] = &["version", "agent", "interfaces", "services"];

pub(crate) fn policy(cx: &mut Cx, root: &Node) -> Draft {
    let mut draft = Draft::default();
    if root.value == Value::Null {
        cx.error(
            root.pos,
            "",
            "the file is empty; a policy needs version, interfaces and services",
        );
        return draft;
    }
    let Some(mut m) = MapReader::new(cx, root, "", POLICY_FIELDS) else {
        return draft;
    };
    draft.version = m.required(cx, "version", |cx, n, p| {
        let v = int(cx, n, p, 0..=u64::MAX)?;
        if v != 1 {
            cx.error(
                n.pos,
                p,
                format!("unsupported version {v}; this agent reads version 1"),
            );
            return None;
        }
        Some(1)
    });
    draft.agent = m.section(cx, "agent", agent).or(AgentSettings::default());
    draft.interfaces = m.required(cx, "interfaces", |cx, n, p| {
        let items = seq(cx, n, p)?;
        if items.is_empty() {
            cx.error(n.pos, p, "at least one interface is required");
            return None;
        }
        Some(
            items
                .iter()
                .enumerate()
                .map(|(i, node)| interface(cx, node, &item(p, i)))
                .collect(),
        )
    });
    draft.services = m.required(cx, "services", |cx, n, p| {
        let items = seq(cx, n, p)?;
        if items.is_empty() {
            cx.error(n.pos, p, "at least one service is required");
            return None;
        }
        if items.len() > MAX_SERVICES as usize {
            let msg = format!(
                "{} services; the datapath holds at most {MAX_SERVICES}",
                items.len()
            );
            cx.error(n.pos, p, msg);
        }
        Some(
            items
                .iter()
                .enumerate()
                .map(|(i, node)| service(cx, node, &item(p, i)))
                .collect(),
        )
    });
    draft.known_fields = m.finish(cx);
    draft
}

const AGENT_FIELDS: &[&str] = &["listen", "pin_path", "log_level"];

fn agent(cx: &mut Cx, node: &Node, path: &str) -> Option<AgentSettings> {
    let mut m = MapReader::new(cx, node, path, AGENT_FIELDS)?;
    let d = AgentSettings::default();
    let listen = m.get(cx, "listen", |cx, n, p| {
        parsed(cx, n, p, |s| {
            s.parse::<SocketAddr>().map_err(|_| {
                format!("`{s}` is not a socket address; expected e.g. 127.0.0.1:9090 or [::1]:9090")
            })
        })
    });
    let pin_path = m.get(cx, "pin_path", |cx, n, p| {
        let s = string(cx, n, p)?;
        if !s.starts_with('/') {
            cx.error(n.pos, p, format!("`{s}` is not an absolute path"));
            return None;
        }
        Some(s.into())
    });
    let log_level = m.get(cx, "log_level", keyword::<LogLevel>);
    let known = m.finish(cx);
    let agent = AgentSettings {
        listen: listen.or(d.listen)?,
        pin_path: pin_path.or(d.pin_path)?,
        log_level: log_level.or(d.log_level)?,
    };
    known.then_some(agent)
}

const INTERFACE_FIELDS: &[&str] = &["name", "xdp_mode", "direction"];

fn interface(cx: &mut Cx, node: &Node, path: &str) -> Option<Interface> {
    let mut m = MapReader::new(cx, node, path, INTERFACE_FIELDS)?;
    let name = m.required(cx, "name", |cx, n, p| {
        parsed(cx, n, p, |s| check_interface_name(s).map(|()| s.to_owned()))
    });
    let xdp_mode = m.get(cx, "xdp_mode", keyword::<XdpMode>).or(XdpMode::Auto);
    let direction = m
        .get(cx, "direction", keyword::<Direction>)
        .or(Direction::Both);
    let known = m.finish(cx);
    let interface = Interface {
        name: name?,
        xdp_mode: xdp_mode?,
        direction: direction?,
    };
    known.then_some(interface)
}

const SERVICE_FIELDS: &[&str] = &[
    "name",
    "match",
    "priority",
    "rate_limit",
    "backends",
    "load_balancing",
    "health_check",
    "circuit_breaker",
    "degradation",
    "shaping",
];

fn service(cx: &mut Cx, node: &Node, path: &str) -> Option<Service> {
    let mut m = MapReader::new(cx, node, path, SERVICE_FIELDS)?;
    let name = m.required(cx, "name", |cx, n, p| parsed(cx, n, p, check_service_name));
    let r#match = m.required(cx, "match", match_);
    let priority = m
        .get(cx, "priority", keyword::<Priority>)
        .or(Priority::Core);
    let rate_limit = m.section(cx, "rate_limit", rate_limit).optional();
    let backends = m.get(cx, "backends", backends).or(Vec::new());
    let load_balancing = m
        .section(cx, "load_balancing", resilience::load_balancing)
        .optional();
    let health_check = m
        .section(cx, "health_check", resilience::health_check)
        .optional();
    let circuit_breaker = m
        .section(cx, "circuit_breaker", resilience::circuit_breaker)
        .optional();
    let degradation = m
        .section(cx, "degradation", resilience::degradation)
        .optional();
    let shaping = m.section(cx, "shaping", shaping).optional();
    let known = m.finish(cx);
    let service = Service {
        name: name?,
        r#match: r#match?,
        priority: priority?,
        rate_limit: rate_limit?,
        backends: backends?,
        load_balancing: load_balancing?,
        health_check: health_check?,
        circuit_breaker: circuit_breaker?,
        degradation: degradation?,
        shaping: shaping?,
    };
    known.then_some(service)
}

/// `[a-z0-9-]`, 1 to 63 characters: the name goes into metric labels, log fields and DNS-like
/// contexts unchanged.
fn check_service_name(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("service name is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "service name `{}` contains {c:?}; use only a-z, 0-9 and -",
            name.escape_debug()
        ));
    }
    if name.len() > 63 {
        return Err(format!(
            "service name is {} characters; at most 63",
            name.len()
        ));
    }
    Ok(name.to_owned())
}

const MATCH_FIELDS: &[&str] = &["address", "port", "protocol"];

fn match_(cx: &mut Cx, node: &Node, path: &str) -> Option<Match> {
    let mut m = MapReader::new(cx, node, path, MATCH_FIELDS)?;
    let address = m.required(cx, "address", |cx, n, p| parsed(cx, n, p, parse_cidr));
    let port = m.get(cx, "port", port).optional();
    let protocol = m.get(cx, "protocol", keyword::<Protocol>).or(Protocol::Tcp);
    let known = m.finish(cx);
    let r#match = Match {
        address: address?,
        port: port?,
        protocol: protocol?,
    };
    known.then_some(r#match)
}

fn port(cx: &mut Cx, node: &Node, path: &str) -> Option<u16> {
    int(cx, node, path, 1..=65535).and_then(|p| u16::try_from(p).ok())
}

const RATE_LIMIT_FIELDS: &[&str] = &["key", "rate", "burst", "max_keys"];
/// Above this a packet costs 0 ns in the datapath's arithmetic and nothing is limited.
const MAX_PACKET_RATE: u64 = 1_000_000_000;

fn rate_limit(cx: &mut Cx, node: &Node, path: &str) -> Option<RateLimit> {
    let mut m = MapReader::new(cx, node, path, RATE_LIMIT_FIELDS)?;
    let key = m.get(cx, "key", keyword::<KeyBy>).or(KeyBy::SourceIp);
    let rate = m.required(cx, "rate", |cx, n, p| {
        let rate = parsed(cx, n, p, parse_rate)?;
        if rate.per_second() == 0 {
            cx.error(n.pos, p, "must be greater than 0");
            return None;
        }
        if let Rate::Packets(r) = rate
            && r > MAX_PACKET_RATE
        {
            let msg = format!(
                "must be at most {MAX_PACKET_RATE}/s: the datapath charges a packet in whole \
                 nanoseconds"
            );
            cx.error(n.pos, p, msg);
            return None;
        }
        Some(rate)
    });
    let burst = m.get(cx, "burst", |cx, n, p| {
        let b = int(cx, n, p, 0..=u64::MAX)?;
        if b == 0 {
            cx.error(n.pos, p, "must be greater than 0");
            return None;
        }
        Some(b)
    });
    let max_keys = m
        .get(cx, "max_keys", |cx, n, p| {
            int_u32(cx, n, p, 1..=u64::from(MAX_TABLE_ENTRIES))
        })
        .or(DEFAULT_MAX_KEYS);
    let burst_path = m.child("burst");
    let burst_pos = m.pos_of("burst").unwrap_or(m.pos);
    let known = m.finish(cx);
    let given = burst.optional()?;
    let rate = rate?;
    let burst = given.unwrap_or(rate.per_second());
    if rate.is_bytes() && burst < MIN_BYTE_BURST {
        let msg = if given.is_some() {
            format!(
                "must be at least {MIN_BYTE_BURST} bytes (one full frame) with a byte rate, \
                 or no full-size packet ever passes"
            )
        } else {
            format!(
                "the default burst (one second of {rate} = {burst} bytes) is less than one full \
                 frame; set burst to at least {MIN_BYTE_BURST}"
            )
        };
        cx.error(burst_pos, &burst_path, msg);
        return None;
    }
    let unit = if rate.is_bytes() {
        RL_UNIT_BYTES
    } else {
        RL_UNIT_PACKETS
    };
    if ServiceConfig::with_rate_limit(RL_KEY_FLOW, unit, rate.per_second(), burst).is_none() {
        let msg = format!("burst {burst} at {rate} is more tokens than the datapath can hold");
        cx.error(burst_pos, &burst_path, msg);
        return None;
    }
    let limit = RateLimit {
        key: key?,
        rate,
        burst,
        max_keys: max_keys?,
    };
    known.then_some(limit)
}

const BACKEND_FIELDS: &[&str] = &["address", "weight"];

/// A list of backends (also `degradation.fallback.backends`); duplicates are refused because
/// a backend listed twice silently gets twice its weight.
pub(crate) fn backends(cx: &mut Cx, node: &Node, path: &str) -> Option<Vec<Backend>> {
    let items = seq(cx, node, path)?;
    let mut out = Vec::with_capacity(items.len());
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    let mut ok = true;
    for (i, node) in items.iter().enumerate() {
        let p = item(path, i);
        let Some(b) = backend(cx, node, &p) else {
            ok = false;
            continue;
        };
        if let Some(first) = seen.get(&b.address) {
            let msg = format!(
                "duplicate backend {} (also {})",
                b.address,
                item(path, *first)
            );
            let pos = match &node.value {
                Value::Map(entries) => entries
                    .iter()
                    .find(|(k, _)| matches!(&k.value, Value::Scalar { text, .. } if text == "address"))
                    .map_or(node.pos, |(_, v)| v.pos),
                _ => node.pos,
            };
            cx.error(pos, &format!("{p}.address"), msg);
            ok = false;
            continue;
        }
        seen.insert(b.address, i);
        out.push(b);
    }
    ok.then_some(out)
}

fn backend(cx: &mut Cx, node: &Node, path: &str) -> Option<Backend> {
    let mut m = MapReader::new(cx, node, path, BACKEND_FIELDS)?;
    let address = m.required(cx, "address", |cx, n, p| parsed(cx, n, p, parse_backend));
    let weight = m
        .get(cx, "weight", |cx, n, p| {
            int(cx, n, p, 0..=1000).and_then(|w| u16::try_from(w).ok())
        })
        .or(DEFAULT_WEIGHT);
    let known = m.finish(cx);
    let backend = Backend {
        address: address?,
        weight: weight?,
    };
    known.then_some(backend)
}

const SHAPING_FIELDS: &[&str] = &["rate", "key", "horizon", "max_keys"];

fn shaping(cx: &mut Cx, node: &Node, path: &str) -> Option<Shaping> {
    let mut m = MapReader::new(cx, node, path, SHAPING_FIELDS)?;
    let rate = m.required(cx, "rate", |cx, n, p| {
        let rate = parsed(cx, n, p, parse_rate)?;
        match rate {
            Rate::Packets(_) => {
                let msg = "pacing spaces bytes; use a bit or byte rate like 100Mbit/s";
                cx.error(n.pos, p, msg);
                None
            }
            Rate::Bytes(0) => {
                cx.error(n.pos, p, "must be greater than 0");
                None
            }
            Rate::Bytes(_) => Some(rate),
        }
    });
    let key = m.get(cx, "key", keyword::<KeyBy>).or(KeyBy::Flow);
    let horizon = m.get(cx, "horizon", positive_duration).or(DEFAULT_HORIZON);
    let max_keys = m
        .get(cx, "max_keys", |cx, n, p| {
            int_u32(cx, n, p, 1..=u64::from(MAX_TABLE_ENTRIES))
        })
        .or(DEFAULT_SHAPE_KEYS);
    let known = m.finish(cx);
    let shaping = Shaping {
        rate: rate?,
        key: key?,
        horizon: horizon?,
        max_keys: max_keys?,
    };
    known.then_some(shaping)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert!(check_service_name("checkout").is_ok());
        assert!(check_service_name("a-1").is_ok());
        assert!(check_service_name(&"a".repeat(63)).is_ok());
        assert!(check_service_name(&"a".repeat(64)).is_err());
        assert!(check_service_name("").is_err());
        assert_eq!(
            check_service_name("Checkout"),
            Err("service name `Checkout` contains 'C'; use only a-z, 0-9 and -".into())
        );
        assert!(check_service_name("a_b").is_err());
        assert!(check_service_name("é").is_err());
    }
}
