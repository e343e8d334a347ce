//! How a policy's matches and backends map onto the datapath's keys: shared by validation
//! (which refuses what would not fit) and by the agent's compile step (which writes them).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use crate::MatchRule;
use crate::breaker::BackendKey;
use crate::classify::{PORT_ANY, PROTO_ANY, PROTO_TCP, PROTO_UDP, v4_mapped};
use crate::limit::{RL_KEY_FLOW, RL_KEY_SERVICE, RL_KEY_SOURCE_IP};
use crate::shape::{ShapeConfig, ShapeConfigError};

use super::model::{Cidr, KeyBy, Match, Protocol, Shaping};

/// The rules that apply at one prefix, most specific first.
pub struct PrefixRules<'a> {
    pub prefix: Cidr,
    /// (service index, its match), sorted by `MatchRule::specificity`, ties in policy order.
    pub rules: Vec<(usize, &'a Match)>,
}

/// The datapath's protocol of a match (`PROTO_*`).
pub fn proto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
        Protocol::Any => PROTO_ANY,
    }
}

/// The protocols a service's backends receive, as `BACKENDS` keys them. Shared with
/// validation, which refuses a backend address with two breakers for one protocol.
pub fn backend_protocols(p: Protocol) -> &'static [u8] {
    match p {
        Protocol::Tcp => &[PROTO_TCP],
        Protocol::Udp => &[PROTO_UDP],
        Protocol::Any => &[PROTO_TCP, PROTO_UDP],
    }
}

/// `BACKENDS` key of a backend address and protocol (IPv4 as `::ffff:a.b.c.d`).
pub fn backend_key(address: SocketAddr, proto: u8) -> BackendKey {
    let addr = match address.ip() {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    };
    BackendKey {
        addr,
        port: address.port(),
        proto,
        _pad: 0,
    }
}

/// Why a `shaping` section does not fit the datapath; validation refuses all of these first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShapeCompileError {
    #[error("shaping.rate: pacing spaces bytes; a packet rate cannot be paced")]
    PacketRate,
    #[error("shaping.rate: must be greater than 0")]
    ZeroRate,
    #[error("shaping.horizon: must be greater than 0")]
    ZeroHorizon,
    #[error("shaping.horizon: longer than 2^64 ns")]
    HorizonTooLong,
}

/// The datapath's form of a `shaping` section (`ServiceConfig::shape`).
impl TryFrom<&Shaping> for ShapeConfig {
    type Error = ShapeCompileError;

    fn try_from(s: &Shaping) -> Result<ShapeConfig, ShapeCompileError> {
        if !s.rate.is_bytes() {
            return Err(ShapeCompileError::PacketRate);
        }
        let horizon =
            u64::try_from(s.horizon.as_nanos()).map_err(|_| ShapeCompileError::HorizonTooLong)?;
        ShapeConfig::new(key_kind(s.key), s.rate.per_second(), horizon).map_err(|e| match e {
            ShapeConfigError::ZeroRate => ShapeCompileError::ZeroRate,
            ShapeConfigError::ZeroHorizon => ShapeCompileError::ZeroHorizon,
        })
    }
}

/// `RL_KEY_*` of a `key` setting (token buckets and departure lines alike).
pub fn key_kind(key: KeyBy) -> u32 {
    match key {
        KeyBy::Flow => RL_KEY_FLOW,
        KeyBy::SourceIp => RL_KEY_SOURCE_IP,
        KeyBy::Service => RL_KEY_SERVICE,
    }
}

fn specificity(m: &Match) -> (u32, u8, u8) {
    let (_, prefix_len) = m.address.trie_key();
    MatchRule::specificity(prefix_len, m.port.unwrap_or(PORT_ANY), proto(m.protocol))
}

/// For each distinct prefix, the rules that apply there: what the one LPM lookup of the
/// datapath must find. Shared with validation, which limits the list length.
pub fn prefix_rules<'a>(
    matches: impl IntoIterator<Item = (usize, &'a Match)>,
) -> Vec<PrefixRules<'a>> {
    // The matches at each prefix; those that cover a prefix are at one of its covering
    // prefixes (a few dozen lookups, where comparing every pair grows with the square of the
    // services).
    let mut at: foldhash::HashMap<Cidr, Vec<(usize, &Match)>> = Default::default();
    for (i, m) in matches {
        at.entry(m.address).or_default().push((i, m));
    }
    let prefixes: BTreeSet<Cidr> = at.keys().copied().collect();
    prefixes
        .into_iter()
        .map(|prefix| {
            let mut rules: Vec<(usize, &Match)> = prefix
                .covering()
                .filter_map(|p| at.get(&p))
                .flatten()
                .copied()
                .collect();
            rules.sort_by_key(|(i, m)| (specificity(m), *i));
            PrefixRules { prefix, rules }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::model::{StatusRange, parse_status_range};
    use super::*;

    /// The rules of each prefix are those of every match that covers it, whichever way they
    /// are found: here against comparing every pair.
    #[test]
    fn prefix_rules_are_the_covering_matches() {
        let addresses = [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3",
            "10.1.2.4",
            "10.2.0.0/16",
            "10.1.2.3",
            "::/0",
            "2001:db8::/32",
            "2001:db8::1",
            "::/1",
        ];
        let matches: Vec<Match> = addresses
            .iter()
            .enumerate()
            .map(|(i, a)| Match {
                address: super::super::net::parse_cidr(a).unwrap(),
                port: (i % 3 != 0).then_some(80 + i as u16 % 2),
                protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Any][i % 3],
            })
            .collect();
        let table = prefix_rules(matches.iter().enumerate());
        let prefixes: BTreeSet<Cidr> = matches.iter().map(|m| m.address).collect();
        assert_eq!(
            table.iter().map(|p| p.prefix).collect::<Vec<_>>(),
            prefixes.iter().copied().collect::<Vec<_>>()
        );
        for p in &table {
            let mut expected: Vec<(usize, &Match)> = matches
                .iter()
                .enumerate()
                .filter(|(_, m)| m.address.covers(&p.prefix))
                .collect();
            expected.sort_by_key(|(i, m)| (specificity(m), *i));
            let got: Vec<usize> = p.rules.iter().map(|(i, _)| *i).collect();
            let want: Vec<usize> = expected.iter().map(|(i, _)| *i).collect();
            assert_eq!(got, want, "{}", p.prefix);
        }
        let rules = |p: &str| {
            let p = super::super::net::parse_cidr(p).unwrap();
            table.iter().find(|t| t.prefix == p).unwrap().rules.len()
        };
        assert_eq!(rules("10.1.2.3/32"), 6);
        assert_eq!(rules("2001:db8::1/128"), 4);
    }

    #[test]
    fn status_ranges() {
        assert_eq!(
            parse_status_range("200-399"),
            Ok(StatusRange { min: 200, max: 399 })
        );
        assert_eq!(
            parse_status_range("204"),
            Ok(StatusRange { min: 204, max: 204 })
        );
        assert!(parse_status_range("99").is_err());
        assert!(parse_status_range("200-600").is_err());
        assert!(parse_status_range("399-200").is_err());
        assert!(parse_status_range("2xx").is_err());
        assert!(parse_status_range("").is_err());
        assert!(parse_status_range("-").is_err());
    }
}
