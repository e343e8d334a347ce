//! L4 load balancing (POLICY.md `load_balancing`, `vip: true`): what the agent writes and the
//! datapath reads, and the pure arithmetic both share (flow hash, incremental checksums).
//!
//! A packet to a service with a VIP is a *forward* packet: its flow is looked up in
//! `LB_CONNS`; a new flow gets a backend from the service's table (its own map in
//! `LB_TABLES`, replaced whole by the agent with one write, so the datapath never reads a
//! half-written table) and two entries: the forward one, and a reverse one
//! (`LB_REVERSE`, keyed by the backend side) so replies get their source rewritten back to the
//! VIP. Destination address and port are rewritten (DNAT); checksums are updated
//! incrementally.

use crate::{breaker::BackendKey, classify::ADDR_LEN};

/// Per-LB-backend counter slots in `LB_STATS` (`index * LBSTAT_SLOTS + slot`).
/// Packets and bytes forwarded to the backend (client to backend direction).
pub const LBSTAT_FORWARDED: u32 = 0;
/// New flows pinned to the backend (packets: flows; bytes: their first packets' bytes).
pub const LBSTAT_NEW_FLOWS: u32 = 1;
pub const LBSTAT_SLOTS: u32 = 2;

#[inline(always)]
pub const fn lb_slot(index: u32, slot: u32) -> u32 {
    index * LBSTAT_SLOTS + slot
}

/// `LbService::flags`
pub const LB_F_ACTIVE: u32 = 1 << 0;
/// The service panics (`load_balancing.panic_threshold`): too few backends are available, so
/// new flows go to any backend of non-zero weight, whatever its breaker says, and breakers
/// refuse none of the service's packets.
pub const LB_F_PANIC: u32 = 1 << 1;

/// `LbService::algorithm`
pub const LB_MAGLEV: u32 = 0;
pub const LB_WRR: u32 = 1;
pub const LB_LEAST_CONN: u32 = 2;

/// Map flags of every service table in `LB_TABLES`, on the template and on each table the
/// agent creates (the kernel insists they match): `BPF_F_INNER_MAP`, so tables may differ in
/// size, and `BPF_F_MMAPABLE`, so the agent fills a new table with one copy instead of a
/// system call per entry.
pub const LB_TABLE_FLAGS: u32 = (1 << 12) | (1 << 10);

/// One element of a service table: two entries. The kernel lays array elements out 8 bytes
/// apart, so a `u32` element would waste half of a table; two per element waste nothing.
/// Element 0 is the header (`[length, 0]`); entry `k` is [`lb_table_pos`]`(k)`.
pub type LbTableSlot = [u32; 2];

/// Elements of a service table of `len` entries (header included).
pub const fn lb_table_elements(len: u32) -> u32 {
    1 + len.div_ceil(2)
}

/// Element and lane (0 or 1) of entry `k` of a service table.
#[inline(always)]
pub const fn lb_table_pos(k: u32) -> (u32, usize) {
    (1 + k / 2, (k & 1) as usize)
}

/// The elements of a service table holding `entries`, header first.
#[cfg(feature = "user")]
pub fn lb_table_slots(entries: &[u32]) -> impl Iterator<Item = LbTableSlot> + '_ {
    let header = [entries.len() as u32, 0];
    core::iter::once(header).chain(
        entries
            .chunks(2)
            .map(|c| [c[0], c.get(1).copied().unwrap_or(LB_NONE)]),
    )
}

/// A table entry with no backend (every backend weighs 0).
pub const LB_NONE: u32 = u32::MAX;
/// The longest weighted round-robin schedule: fits any service of up to 65 backends exactly
/// (weights up to 1000) and approximates larger ones closely; 256 KiB as a `u32` array.
pub const WRR_MAX_LEN: u32 = 1 << 16;
/// Backends of one `least_conn` service the datapath scans for the fewest connections.
pub const MAX_LEAST_CONN_BACKENDS: u32 = 16;
/// Other table entries tried when the first pick's breaker refuses the flow.
pub const LB_RETRIES: u32 = 3;

/// How long a TCP flow's entries live after its FIN or RST, and a UDP flow's after its last
/// packet.
pub const TCP_CLOSE_GRACE_NS: u64 = 10_000_000_000;
pub const UDP_IDLE_NS: u64 = 60_000_000_000;
/// A TCP flow with no packet for this long is taken as gone.
pub const TCP_IDLE_NS: u64 = 3_600_000_000_000;

/// Per-service balancing configuration, indexed by service id in `LB_SVC`. Written when the
/// policy is applied and when the service's panic state changes; its table lives in
/// `LB_TABLES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbService {
    pub flags: u32,
    pub algorithm: u32,
    /// The service's backends are `LB_BACKENDS[backend_base .. backend_base + backend_count]`.
    pub backend_base: u32,
    pub backend_count: u32,
}
const _: () = assert!(core::mem::size_of::<LbService>() == 16);

/// Cilium's default Maglev table size: what a service of up to 163 backends gets when its
/// policy sets no `table_size`.
pub const DEFAULT_MAGLEV_SIZE: u32 = 16_381;

/// Whether `n` is prime (trial division; table sizes are at most 2^24).
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The smallest prime at least `n` (as `u64`: past `u32::MAX` when there is none in `u32`).
pub fn next_prime(n: u32) -> u64 {
    let mut p = u64::from(n.max(2));
    while !u32::try_from(p).is_ok_and(is_prime) {
        p += 1;
        if p > u64::from(u32::MAX) {
            break;
        }
    }
    p
}

/// The smallest prime at least 100 x `backends`: the smallest Maglev table the policy accepts
/// for them. `None` when that is beyond `u32`.
pub fn min_maglev_size(backends: usize) -> Option<u32> {
    let needed = u32::try_from(backends.checked_mul(100)?).ok()?.max(2);
    u32::try_from(next_prime(needed)).ok()
}

/// The Maglev table of a service whose policy sets no `table_size`: [`DEFAULT_MAGLEV_SIZE`],
/// or the smallest accepted size when its backends need more.
pub fn default_maglev_size(backends: usize) -> Option<u32> {
    min_maglev_size(backends).map(|m| m.max(DEFAULT_MAGLEV_SIZE))
}

/// One backend of a balanced service, indexed by its LB index in `LB_BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbBackend {
    /// Address (`::ffff:a.b.c.d` for IPv4) and port; `proto` is TCP for services matching
    /// `tcp` or `any`, UDP for `udp`. Laid out as the breaker's key, so the datapath looks the
    /// backend's breaker up with this very map value as the key (no copy onto the stack).
    pub key: BackendKey,
    /// Effective weight, for `least_conn` (0: no new flows).
    pub weight: u32,
    /// Index of its counters in `BACKEND_STATS`.
    pub stats_id: u32,
}
const _: () = assert!(core::mem::size_of::<LbBackend>() == 28);

/// Value of `LB_CONNS`, keyed by the client's view of the flow (`FlowKey` client -> VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConn {
    /// Last packet seen, `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE, ~3 ns a read
    /// instead of ~20): it lags CLOCK_MONOTONIC, which the agent compares it with
    /// ([`conn_expired`]), by up to one scheduler tick (4 ms at 250 Hz), so an entry looks up
    /// to a tick older than it is, against idle timeouts of seconds.
    pub last_ns: u64,
    /// LB index of the backend.
    pub backend: u32,
    /// `CONN_F_*`.
    pub flags: u16,
    /// The client port the backend sees (`crate::ports`): the client's own, or one of the
    /// agent's range; `ports::NO_NAT_PORT` in an entry from before ports were translated.
    pub nat_port: u16,
}
const _: () = assert!(core::mem::size_of::<LbConn>() == 16);

/// `LbConn::flags`: a FIN or RST was seen; the entry lives `TCP_CLOSE_GRACE_NS` more, and the
/// backend's active-connection count was already decremented.
pub const CONN_F_CLOSING: u16 = 1 << 0;

/// Value of `LB_REVERSE`, keyed by the backend's view (`FlowKey` client -> backend, with the
/// port the backend sees): the VIP the client addressed, and the client's own port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbReverse {
    pub vip: [u8; ADDR_LEN],
    pub vip_port: u16,
    /// The client's port, which replies get back (`ports::NO_NAT_PORT`: keep theirs).
    pub client_port: u16,
    /// LB index of the backend: a reply is rewritten only while the forward entry of its
    /// flow still names this backend (the reverse entry may outlive its flow in the LRU, and
    /// another connection between the same endpoints, such as a health probe reusing the
    /// port, must not be taken for it).
    pub backend: u32,
}
const _: () = assert!(core::mem::size_of::<LbReverse>() == 24);

crate::impl_pod!(LbService, LbBackend, LbConn, LbReverse);

/// Whether a tracked flow is over: TCP after its close grace or a long idle, UDP after idling.
#[inline(always)]
pub fn conn_expired(conn: &LbConn, tcp: bool, now_ns: u64) -> bool {
    let idle = now_ns.saturating_sub(conn.last_ns);
    if !tcp {
        idle > UDP_IDLE_NS
    } else if conn.flags & CONN_F_CLOSING != 0 {
        idle > TCP_CLOSE_GRACE_NS
    } else {
        idle > TCP_IDLE_NS
    }
}

/// The flow hash that picks a Maglev table entry: the murmur3 finalizer over the 5-tuple's
/// words. Stable across restarts (no random seed), so an agent restart keeps flows where they
/// were as long as the table is the same.
#[inline(always)]
pub fn flow_hash(
    src: &[u8; ADDR_LEN],
    dst: &[u8; ADDR_LEN],
    sport: u16,
    dport: u16,
    proto: u8,
) -> u32 {
    let mut h: u32 = 0x9747_b28c ^ u32::from(proto);
    let mut i = 0;
    while i < ADDR_LEN {
        h = mix(
            h,
            u32::from_le_bytes([src[i], src[i + 1], src[i + 2], src[i + 3]]),
        );
        h = mix(
            h,
            u32::from_le_bytes([dst[i], dst[i + 1], dst[i + 2], dst[i + 3]]),
        );
        i += 4;
    }
    h = mix(h, (u32::from(sport) << 16) | u32::from(dport));
    fmix(h)
}

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Updates a 16-bit one's-complement checksum field for `old` bytes replaced by `new`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')), 16-bit words, `N` even.
#[inline(always)]
pub fn csum_replace<const N: usize>(csum: u16, old: &[u8; N], new: &[u8; N]) -> u16 {
    let mut acc = u32::from(!csum);
    let mut i = 0;
    while i + 1 < N {
        acc += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        acc += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::{checksum, sum_words};

    #[test]
    fn primes_and_maglev_sizes() {
        assert!(is_prime(65537));
        assert!(is_prime(2));
        assert!(!is_prime(1));
        assert!(!is_prime(65536));
        assert!(!is_prime(100));
        assert_eq!(next_prime(65536), 65537);
        assert_eq!(next_prime(100), 101);
        assert!(is_prime(16_777_213));
        assert!(next_prime(u32::MAX) > u64::from(u32::MAX));
        assert!(is_prime(DEFAULT_MAGLEV_SIZE));
        assert_eq!(min_maglev_size(0), Some(2));
        assert_eq!(min_maglev_size(1), Some(101));
        assert_eq!(min_maglev_size(10), Some(1009));
        assert_eq!(min_maglev_size(1000), Some(100_003));
        assert_eq!(min_maglev_size(167_772), Some(16_777_213));
        assert_eq!(min_maglev_size(usize::MAX), None);
        // Up to 163 backends the default; past it the smallest accepted size.
        assert_eq!(default_maglev_size(4), Some(DEFAULT_MAGLEV_SIZE));
        assert_eq!(default_maglev_size(163), Some(DEFAULT_MAGLEV_SIZE));
        assert_eq!(default_maglev_size(164), Some(16_411));
    }

    #[cfg(feature = "user")]
    #[test]
    fn table_slots_hold_every_entry_where_the_datapath_reads_it() {
        for len in [0u32, 1, 2, 3, 16_381] {
            let entries: Vec<u32> = (0..len).map(|k| k * 7).collect();
            let slots: Vec<LbTableSlot> = lb_table_slots(&entries).collect();
            assert_eq!(slots.len() as u32, lb_table_elements(len));
            assert_eq!(slots[0][0], len);
            for k in 0..len {
                let (e, lane) = lb_table_pos(k);
                assert_eq!(slots[e as usize][lane], k * 7);
            }
        }
    }

    #[test]
    fn incremental_checksum_equals_a_full_recompute() {
        // An IPv4 header; its checksum recomputed after the destination changes must equal
        // the incremental update, for many addresses (carries included).
        let mut hdr = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 198, 18, 0, 100,
        ];
        let c = checksum(sum_words(0, &hdr));
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        for n in 0u32..5000 {
            let new = (n.wrapping_mul(2_654_435_761)).to_be_bytes();
            let old: [u8; 4] = hdr[16..20].try_into().unwrap();
            let inc = csum_replace(u16::from_be_bytes([hdr[10], hdr[11]]), &old, &new);
            hdr[16..20].copy_from_slice(&new);
            hdr[10..12].copy_from_slice(&[0, 0]);
            let full = checksum(sum_words(0, &hdr));
            assert_eq!(inc, full, "address {new:?}");
            hdr[10..12].copy_from_slice(&inc.to_be_bytes());
        }
    }

    #[test]
    fn flow_hash_spreads_and_is_stable() {
        let a = crate::classify::v4_mapped([10, 0, 0, 1]);
        let b = crate::classify::v4_mapped([198, 18, 0, 100]);
        assert_eq!(flow_hash(&a, &b, 1, 80, 6), flow_hash(&a, &b, 1, 80, 6));
        assert_ne!(flow_hash(&a, &b, 1, 80, 6), flow_hash(&a, &b, 2, 80, 6));
        assert_ne!(flow_hash(&a, &b, 1, 80, 6), flow_hash(&a, &b, 1, 80, 17));
        // Consecutive source ports spread evenly over a prime table.
        let size = 65_537u32;
        let buckets = 16;
        let mut count = [0u32; 16];
        for port in 0..64_000u16 {
            let h = flow_hash(&a, &b, port, 80, 6) % size;
            count[(h * buckets / size) as usize] += 1;
        }
        let mean = 64_000 / 16;
        for c in count {
            assert!(c.abs_diff(mean) < mean / 20, "{count:?}");
        }
    }

    #[test]
    fn expiry_by_protocol_and_state() {
        let c = LbConn {
            last_ns: 1_000,
            ..LbConn::default()
        };
        assert!(!conn_expired(&c, false, 1_000 + UDP_IDLE_NS));
        assert!(conn_expired(&c, false, 1_001 + UDP_IDLE_NS));
        assert!(!conn_expired(&c, true, 1_001 + UDP_IDLE_NS));
        let closing = LbConn {
            flags: CONN_F_CLOSING,
            ..c
        };
        assert!(conn_expired(&closing, true, 1_001 + TCP_CLOSE_GRACE_NS));
        assert!(
            !conn_expired(&c, true, 0),
            "a clock behind the entry is not expiry"
        );
    }
}
