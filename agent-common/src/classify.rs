//! Classification: which service a packet belongs to.
//!
//! POLICY.md: first match wins, most specific first: longest prefix, then exact port over any
//! port, then exact protocol over `any`. The datapath does one LPM-trie lookup on the
//! destination address; the agent stores, for every prefix in the policy, the rules of that
//! prefix *and of every shorter prefix covering it*, already sorted by specificity. The trie
//! returns the longest prefix present, so the first rule of its list that accepts the packet's
//! port and protocol is the policy's answer.

/// `proto` value of a rule that accepts any protocol.
pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
/// `port` value of a rule that accepts any port.
pub const PORT_ANY: u16 = 0;

/// Rules stored per prefix (its own and those of covering prefixes).
pub const MAX_MATCH_RULES: usize = 8;

/// Length of the trie key's address: IPv6, IPv4 mapped as `::ffff:a.b.c.d`.
pub const ADDR_LEN: usize = 16;
/// Prefix offset of an IPv4 prefix in the mapped space.
pub const V4_MAPPED_PREFIX: u32 = 96;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatchRule {
    pub service_id: u32,
    /// Destination port in host order; [`PORT_ANY`] for every port.
    pub port: u16,
    /// IP protocol; [`PROTO_ANY`] for every protocol.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<MatchRule>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatchList {
    pub count: u32,
    pub _pad: u32,
    pub rules: [MatchRule; MAX_MATCH_RULES],
}
const _: () = assert!(core::mem::size_of::<MatchList>() == 8 + 8 * MAX_MATCH_RULES);

/// Room for a service name (POLICY.md: at most 63 bytes of `a-z0-9-`), the `.fallback` of a
/// companion service (`crate::degrade`) and a NUL.
pub const SERVICE_NAME_LEN: usize = 80;

/// A service's name in `SVC_NAMES` (indexed by service id), NUL-padded: the datapath never
/// reads it; an agent adopting pinned maps finds each service's id by its name there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub bytes: [u8; SERVICE_NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<ServiceName>() == SERVICE_NAME_LEN);

impl Default for ServiceName {
    fn default() -> Self {
        ServiceName {
            bytes: [0; SERVICE_NAME_LEN],
        }
    }
}

impl ServiceName {
    /// `None` for a name too long to keep its NUL.
    pub fn new(name: &str) -> Option<ServiceName> {
        let mut n = ServiceName::default();
        let b = name.as_bytes();
        if b.len() >= SERVICE_NAME_LEN {
            return None;
        }
        n.bytes[..b.len()].copy_from_slice(b);
        Some(n)
    }

    /// The name, `None` for an empty entry or one that is not UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        let len = self.bytes.iter().position(|&c| c == 0)?;
        core::str::from_utf8(&self.bytes[..len])
            .ok()
            .filter(|s| !s.is_empty())
    }
}

crate::impl_pod!(MatchRule, MatchList, ServiceName);

impl MatchRule {
    /// Whether this rule accepts a packet. `port` is `None` when the packet carries no
    /// ports (ICMP, non-first fragments): only port-less rules accept it. A port-bearing rule
    /// with `proto: any` accepts only TCP and UDP, the protocols that have ports.
    #[inline(always)]
    pub fn accepts(&self, proto: u8, port: Option<u16>) -> bool {
        let proto_ok = self.proto == PROTO_ANY || self.proto == proto;
        let port_ok = match port {
            _ if self.port == PORT_ANY => true,
            Some(p) => p == self.port && (proto == PROTO_TCP || proto == PROTO_UDP),
            None => false,
        };
        proto_ok && port_ok
    }

    /// Sort key, most specific first (smaller sorts first): longer prefix, then exact
    /// port, then exact protocol.
    pub fn specificity(prefix_len: u32, port: u16, proto: u8) -> (u32, u8, u8) {
        (
            u32::MAX - prefix_len,
            u8::from(port == PORT_ANY),
            u8::from(proto == PROTO_ANY),
        )
    }
}

impl MatchList {
    /// The service of the first rule that accepts the packet.
    #[inline(always)]
    pub fn find(&self, proto: u8, port: Option<u16>) -> Option<u32> {
        let mut i = 0;
        // Bounded loop: the verifier sees at most MAX_MATCH_RULES iterations.
        while i < MAX_MATCH_RULES {
            if i as u32 >= self.count {
                return None;
            }
            let r = &self.rules[i];
            if r.accepts(proto, port) {
                return Some(r.service_id);
            }
            i += 1;
        }
        None
    }
}

/// The policy is double-buffered: the agent writes a new policy's entries under the
/// generation the datapath does not read, then switches `POLICY_GEN` to it with one write
/// (`agent_common::maps::MAP_POLICY_GEN`). Two generations: the live one and the staged one.
pub const GENERATIONS: u32 = 2;

/// Length of the classifier trie's key: the generation byte, then the address. A lookup
/// names the live generation in the first byte, so it never sees the staged one's entries.
pub const CLASSIFY_KEY_LEN: usize = 1 + ADDR_LEN;
/// Prefix bits of the generation byte (every entry matches its generation exactly).
pub const GEN_PREFIX_BITS: u32 = 8;

/// The classifier trie's key bytes for `addr` in generation `generation` (0 or 1).
#[inline(always)]
pub const fn classify_key(generation: u32, addr: &[u8; ADDR_LEN]) -> [u8; CLASSIFY_KEY_LEN] {
    let mut k = [0u8; CLASSIFY_KEY_LEN];
    k[0] = generation as u8;
    let mut i = 0;
    while i < ADDR_LEN {
        k[1 + i] = addr[i];
        i += 1;
    }
    k
}

/// Index of service `id`'s entry of generation `generation` in the double-buffered
/// per-service arrays (`SVC_CFG`, `LB_SVC`, `LB_TABLES`): the two generations of a service
/// sit side by side. Counters, token buckets and round-robin positions are per service id,
/// not per generation: they survive a reload.
#[inline(always)]
pub const fn generation_slot(id: u32, generation: u32) -> u32 {
    id * GENERATIONS + (generation & 1)
}

/// Trie key bytes of an IPv4 address (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; ADDR_LEN] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(rules: &[MatchRule]) -> MatchList {
        let mut l = MatchList {
            count: rules.len() as u32,
            ..Default::default()
        };
        l.rules[..rules.len()].copy_from_slice(rules);
        l
    }

    fn rule(service_id: u32, port: u16, proto: u8) -> MatchRule {
        MatchRule {
            service_id,
            port,
            proto,
            _pad: 0,
        }
    }

    #[test]
    fn service_names_round_trip_and_refuse_what_does_not_fit() {
        let n = ServiceName::new("checkout-api").unwrap();
        assert_eq!(n.as_str(), Some("checkout-api"));
        assert_eq!(ServiceName::default().as_str(), None);
        assert!(ServiceName::new(&"a".repeat(63)).is_some());
        // The longest name a policy gives, with its companion's suffix.
        let companion = format!("{}.fallback", "a".repeat(63));
        assert_eq!(
            ServiceName::new(&companion).unwrap().as_str(),
            Some(&*companion)
        );
        assert!(ServiceName::new(&"a".repeat(SERVICE_NAME_LEN)).is_none());
    }

    #[test]
    fn generations_have_their_own_keys_and_slots() {
        let a = v4_mapped([10, 0, 0, 1]);
        assert_eq!(classify_key(1, &a)[0], 1);
        assert_eq!(&classify_key(0, &a)[1..], &a);
        assert_eq!(generation_slot(5, 0), 10);
        assert_eq!(generation_slot(5, 1), 11);
        assert_eq!(generation_slot(5, 3), 11, "the generation is a bit");
    }

    #[test]
    fn first_accepting_rule_wins() {
        let l = list(&[
            rule(1, 80, PROTO_TCP),
            rule(2, 80, PROTO_ANY),
            rule(3, PORT_ANY, PROTO_UDP),
            rule(4, PORT_ANY, PROTO_ANY),
        ]);
        assert_eq!(l.find(PROTO_TCP, Some(80)), Some(1));
        assert_eq!(l.find(PROTO_UDP, Some(80)), Some(2));
        assert_eq!(l.find(PROTO_UDP, Some(53)), Some(3));
        assert_eq!(l.find(PROTO_TCP, Some(443)), Some(4));
        assert_eq!(l.find(PROTO_ICMP, None), Some(4));
    }

    #[test]
    fn portless_packets_match_only_portless_rules() {
        let l = list(&[rule(1, 80, PROTO_UDP)]);
        assert_eq!(
            l.find(PROTO_UDP, None),
            None,
            "non-first fragment has no port"
        );
        let l = list(&[rule(1, 80, PROTO_ANY)]);
        assert_eq!(l.find(PROTO_ICMP, None), None);
    }

    #[test]
    fn port_rule_with_any_protocol_needs_a_port_protocol() {
        let r = rule(1, 80, PROTO_ANY);
        assert!(r.accepts(PROTO_TCP, Some(80)));
        assert!(r.accepts(PROTO_UDP, Some(80)));
        // SCTP or anything else whose "port" we did not parse never matches a port rule.
        assert!(!r.accepts(132, Some(80)));
    }

    #[test]
    fn count_bounds_the_scan() {
        let mut l = list(&[rule(1, 80, PROTO_TCP)]);
        l.rules[1] = rule(9, PORT_ANY, PROTO_ANY); // stale slot past `count`
        assert_eq!(l.find(PROTO_TCP, Some(443)), None);
    }

    #[test]
    fn specificity_orders_prefix_then_port_then_proto() {
        let mut v = [
            (MatchRule::specificity(24, PORT_ANY, PROTO_ANY), 'a'),
            (MatchRule::specificity(32, PORT_ANY, PROTO_ANY), 'b'),
            (MatchRule::specificity(24, 80, PROTO_ANY), 'c'),
            (MatchRule::specificity(24, PORT_ANY, PROTO_TCP), 'd'),
            (MatchRule::specificity(24, 80, PROTO_TCP), 'e'),
        ];
        v.sort();
        let order: [char; 5] = core::array::from_fn(|i| v[i].1);
        assert_eq!(order, ['b', 'e', 'c', 'd', 'a']);
    }

    #[test]
    fn v4_mapping() {
        assert_eq!(
            v4_mapped([198, 18, 0, 1]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1]
        );
    }
}
