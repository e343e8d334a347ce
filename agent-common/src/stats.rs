//! Counter slots. Counters are per-CPU in the datapath and summed by the agent.

/// One counter slot: packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
crate::impl_pod!(Counter);

impl Counter {
    pub fn add(&mut self, other: &Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

/// Per-service slots (`service_id * SVC_STAT_SLOTS + slot`).
/// Packets the service let through.
pub const SVC_PASSED: u32 = 0;
/// Dropped: the token bucket had no tokens.
pub const SVC_DROP_RATE_LIMIT: u32 = 1;
/// Dropped: the bucket stayed contended by other CPUs past the retry bound (never over-admits).
pub const SVC_DROP_CONTENDED: u32 = 2;
/// Passed without a limit decision: the key table refused a new key (fail open).
pub const SVC_PASS_NO_BUCKET: u32 = 3;
/// `packets` counts new keys inserted into the token-bucket table (bytes unused).
pub const SVC_NEW_KEYS: u32 = 4;
/// A new flow to a balanced service found no backend to take it (every weight 0 or every
/// breaker open): refused like an open breaker (RST / ICMP unreachable).
pub const SVC_NO_BACKEND: u32 = 5;
/// A balanced service's TCP packet, not a SYN, whose flow had no live entry in the connection
/// table (evicted by the LRU, or expired): it is balanced again (Maglev finds the same backend
/// while the table is unchanged).
pub const SVC_LB_LOST: u32 = 6;
/// A balanced service's new flow whose connection-table entry took the place of an expired or
/// closed one with the same 5-tuple (not an eviction: the agent subtracts these).
pub const SVC_LB_REPLACED: u32 = 7;
/// Shaping (TC egress): packets given a departure time (`skb->tstamp`).
pub const SVC_SHAPE_PACED: u32 = 8;
/// Shaping: dropped, their departure would have been more than `horizon` from now.
pub const SVC_SHAPE_HORIZON: u32 = 9;
/// Shaping: passed unpaced, the departure table refused a new key (fail open).
pub const SVC_SHAPE_NO_KEY: u32 = 10;
/// Shaping: paced after every compare-and-swap on the key's departure time lost to other
/// CPUs; it left at the time its last attempt computed (also counted in `SVC_SHAPE_PACED`).
pub const SVC_SHAPE_CONTENDED: u32 = 11;
/// New flows refused (RST / ICMP unreachable, or dropped when no answer can be built)
/// because the service is shed (`crate::degrade::MODE_SHED`).
pub const SVC_SHED: u32 = 12;
/// New flows sent to the fallback backends (`crate::degrade::MODE_FALLBACK`).
pub const SVC_FALLBACK: u32 = 13;
/// New balanced flows whose client port was in the ephemeral range: they leave with a port of
/// the agent's range (`crate::ports`), so they cannot land on a direct connection's 4-tuple.
pub const SVC_LB_NAT_PORT: u32 = 14;
/// New balanced flows that found every port tried of the agent's range held by a live flow
/// to the same backend: they kept the client's port (fail open).
pub const SVC_LB_NAT_PORT_BUSY: u32 = 15;
pub const SVC_STAT_SLOTS: u32 = 16;

/// Drop reasons as exported in metrics, by slot.
pub const SVC_DROP_REASONS: [(u32, &str); 5] = [
    (SVC_DROP_RATE_LIMIT, "rate_limit"),
    (SVC_DROP_CONTENDED, "contended"),
    (SVC_NO_BACKEND, "no_backend"),
    (SVC_SHED, "shed"),
    (SVC_SHAPE_HORIZON, "horizon"),
];

/// Global slots, for packets that never reach a service.
/// Every packet the program saw.
pub const GSTAT_SEEN: u32 = 0;
/// Passed: not IPv4/IPv6 (ARP, LLDP, ...).
pub const GSTAT_NON_IP: u32 = 1;
/// Passed: truncated or malformed headers (fail open).
pub const GSTAT_UNPARSED: u32 = 2;
/// Passed: more IPv6 extension headers than the parser walks.
pub const GSTAT_EXT_HDR_LIMIT: u32 = 3;
/// Passed: IP matched no service.
pub const GSTAT_UNMATCHED: u32 = 4;
/// Non-first IP fragments seen (classified without ports).
pub const GSTAT_FRAGMENT: u32 = 5;
/// Passed: the service id had no configuration (fail open).
pub const GSTAT_NO_CONFIG: u32 = 6;
/// Passed to the stack after a NAT: the FIB lookup toward the packet's next hop did not
/// resolve it (a refused route, forwarding disabled on an XDP host, a neighbour XDP cannot
/// resolve, a tagged frame, a TTL at its end), so the stack routes it, as before next-hop
/// delivery existed (fail open). A reply to a client on this host is not counted: the stack
/// is its next hop (`agent-ebpf/src/fib.rs` has the whole list).
pub const GSTAT_NAT_TO_STACK: u32 = 7;
pub const GSTAT_SLOTS: u32 = 8;

/// Global slot names as exported in metrics.
pub const GSTAT_NAMES: [(u32, &str); 8] = [
    (GSTAT_SEEN, "seen"),
    (GSTAT_NON_IP, "non_ip"),
    (GSTAT_UNPARSED, "unparsed"),
    (GSTAT_EXT_HDR_LIMIT, "ipv6_ext_header_limit"),
    (GSTAT_UNMATCHED, "unmatched"),
    (GSTAT_FRAGMENT, "fragment"),
    (GSTAT_NO_CONFIG, "no_config"),
    (GSTAT_NAT_TO_STACK, "nat_next_hop_unresolved"),
];

/// Index of a service slot in `SVC_STATS`.
#[inline(always)]
pub const fn svc_slot(service_id: u32, slot: u32) -> u32 {
    service_id * SVC_STAT_SLOTS + slot
}
