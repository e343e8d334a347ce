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

crate::impl_pod!(MatchRule, MatchList);

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
