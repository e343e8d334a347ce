//! Circuit-breaker enforcement: what the agent writes per backend, what the datapath counts.
//!
//! The agent runs the state machine (agent `breaker` module) and writes each backend's state
//! to `BACKENDS` on every transition. The datapath looks up every TCP/UDP packet's
//! destination there:
//! - closed: pass;
//! - open: a new flow (TCP SYN, any UDP datagram) is rejected (TCP RST / ICMP port
//!   unreachable, `on_open: reject`) or dropped (`on_open: drop`); other TCP packets pass,
//!   unless `close_existing`, when they are answered with a RST (or dropped);
//! - half-open: at most `quota` new flows are admitted, counted down atomically by the
//!   datapath; a flow admitted in this half-open period (same `epoch`) stays admitted, so SYN
//!   retransmissions do not spend the quota twice; the rest are treated as open.
//!
//! Packets carrying `PROBE_MARK` (the agent's own health probes, by `SO_MARK`) are exempt, or
//! an open backend could never be seen to recover.
//!
//! Passive detection (`F_PASSIVE`): an admitted SYN leaves a `Pending` entry; the backend's
//! SYN-ACK removes it (`BSTAT_SYNACK`), its RST removes it as a failure (`BSTAT_REFUSED`), and
//! the agent sweeps entries older than the timeout as failures.

use crate::classify::ADDR_LEN;

/// The socket mark of the agent's probes (`SO_MARK`); the egress program lets them through.
/// Chosen clear of the marks kube-proxy (0x4000, 0x8000) and Calico/Cilium use in the low
/// and high bits.
pub const PROBE_MARK: u32 = 0x0a6e_0b00;

/// `BackendState::state`, the codes of the agent's `breaker::State`.
pub const STATE_CLOSED: u32 = 0;
pub const STATE_OPEN: u32 = 1;
pub const STATE_HALF_OPEN: u32 = 2;

/// `BackendState::flags`
/// `on_open: drop` (else reject).
pub const F_DROP: u32 = 1 << 0;
/// `close_existing: true`.
pub const F_CLOSE_EXISTING: u32 = 1 << 1;
/// `health_check.passive: true`: track SYNs for passive failure detection.
pub const F_PASSIVE: u32 = 1 << 2;

/// Half-open flows remembered, and SYNs awaiting an answer (LRU tables).
pub const MAX_TRACKED_FLOWS: u32 = 65_536;

/// Words of the `BACKEND_PORTS` bitmap: one bit per port.
pub const PORT_BITMAP_WORDS: u32 = 65_536 / 32;

/// Word index and bit mask of `port` in the `BACKEND_PORTS` bitmap.
#[inline(always)]
pub const fn port_bit(port: u16) -> (u32, u32) {
    ((port / 32) as u32, 1 << (port % 32))
}

/// Key of `BACKENDS`: where packets go. IPv4 as `::ffff:a.b.c.d`; port in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub addr: [u8; ADDR_LEN],
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<BackendKey>() == 20);

/// Value of `BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendState {
    /// `STATE_*`.
    pub state: u32,
    /// `F_*`.
    pub flags: u32,
    /// Half-open: new flows still to admit; the datapath counts it down by compare-and-swap.
    pub quota: u32,
    /// Bumped by the agent on every entry into half-open, so flows admitted in an earlier
    /// half-open period are not taken for this one's.
    pub epoch: u32,
    /// Index of the backend's counters in `BACKEND_STATS` (< `agent.tables.backends`).
    pub id: u32,
    pub _pad: u32,
    /// When the breaker entered `state`, on the clock of `bpf_ktime_get_ns` (CLOCK_MONOTONIC);
    /// 0 in the initial entry. The datapath never reads it: an agent that adopts pinned maps
    /// resumes each breaker from it ([`resume`]).
    pub since_ns: u64,
    /// Open: how long this open period lasts (`reset_timeout`, doubled by each re-open);
    /// otherwise how long the next one will. Read back on adoption, like `since_ns`.
    pub open_for_ns: u64,
}
const _: () = assert!(core::mem::size_of::<BackendState>() == 40);

/// A connection toward a backend, as the client sends it: `LRU` key of `HALF_OPEN_FLOWS` and
/// `PENDING_SYNS`. Ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: [u8; ADDR_LEN],
    pub backend: [u8; ADDR_LEN],
    pub client_port: u16,
    pub backend_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of `HALF_OPEN_FLOWS`: the half-open period in which the flow was admitted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmittedFlow {
    pub epoch: u32,
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<AdmittedFlow>() == 8);

/// Value of `PENDING_SYNS`: a SYN toward a backend with passive detection, not yet answered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSyn {
    /// When the first SYN of the flow was seen, `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub at_ns: u64,
    /// The backend's `BackendState::id`.
    pub id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PendingSyn>() == 16);

crate::impl_pod!(BackendKey, BackendState, FlowKey, AdmittedFlow, PendingSyn);

/// Per-backend counter slots in `BACKEND_STATS` (`id * BSTAT_SLOTS + slot`).
/// New flows admitted (closed or half-open; SYN or UDP datagram counted once per packet).
pub const BSTAT_ADMITTED: u32 = 0;
/// Half-open trial flows admitted from the quota.
pub const BSTAT_TRIAL: u32 = 1;
/// New flows answered with a TCP RST because the breaker is open.
pub const BSTAT_REJECT_RST: u32 = 2;
/// UDP datagrams answered with ICMP port unreachable because the breaker is open.
pub const BSTAT_REJECT_ICMP: u32 = 3;
/// Packets dropped because the breaker is open (`on_open: drop`, or a reply could not be
/// built).
pub const BSTAT_DROP: u32 = 4;
/// Packets of established flows cut (`close_existing`).
pub const BSTAT_CUT: u32 = 5;
/// Passive: the backend answered a tracked SYN with a SYN-ACK.
pub const BSTAT_SYNACK: u32 = 6;
/// Passive: the backend answered a tracked SYN with a RST (refused).
pub const BSTAT_REFUSED: u32 = 7;
pub const BSTAT_SLOTS: u32 = 8;

/// Rejects and drops by reason, as exported in metrics.
pub const BSTAT_ACTIONS: [(u32, &str); 4] = [
    (BSTAT_REJECT_RST, "reject_rst"),
    (BSTAT_REJECT_ICMP, "reject_icmp"),
    (BSTAT_DROP, "drop"),
    (BSTAT_CUT, "close_existing"),
];

/// Index of a backend slot in `BACKEND_STATS`.
#[inline(always)]
pub const fn backend_slot(id: u32, slot: u32) -> u32 {
    id * BSTAT_SLOTS + slot
}

/// What the datapath does with a packet toward a backend, decided from its state: the pure
/// part of enforcement, shared with the host tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforce {
    Pass,
    /// A new flow while half-open: take one from the quota (or pass, if this flow was already
    /// admitted in this epoch); without quota, `Refuse`.
    Trial,
    /// Refuse: RST / ICMP unless `F_DROP`, when drop.
    Refuse,
    /// An established TCP flow's packet while open with `close_existing`: RST / drop.
    Cut,
}

/// `new_flow`: a TCP SYN without ACK, or any UDP datagram.
#[inline(always)]
pub fn enforce(state: &BackendState, new_flow: bool) -> Enforce {
    match state.state {
        STATE_OPEN if new_flow => Enforce::Refuse,
        STATE_OPEN if state.flags & F_CLOSE_EXISTING != 0 => Enforce::Cut,
        STATE_HALF_OPEN if new_flow => Enforce::Trial,
        _ => Enforce::Pass,
    }
}

/// A breaker as an earlier agent left it in `BACKENDS`, resumed at `now_ns` by an agent that
/// adopted the pinned maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumed {
    Closed,
    /// Open for `remaining_ns` more: 0 when its open period is over, and the breaker goes
    /// half-open at once, as it would have.
    Open {
        remaining_ns: u64,
    },
    /// Half-open, with `quota` trial flows left to admit (the datapath counts them down).
    HalfOpen {
        quota: u32,
    },
}

/// What the breaker of `entry` is at `now_ns` (the `bpf_ktime_get_ns` clock); `None` for a
/// state code no agent writes, which the caller treats as closed (the datapath passes it).
pub fn resume(entry: &BackendState, now_ns: u64) -> Option<Resumed> {
    match entry.state {
        STATE_CLOSED => Some(Resumed::Closed),
        STATE_OPEN => Some(Resumed::Open {
            remaining_ns: entry
                .since_ns
                .saturating_add(entry.open_for_ns)
                .saturating_sub(now_ns),
        }),
        STATE_HALF_OPEN => Some(Resumed::HalfOpen { quota: entry.quota }),
        _ => None,
    }
}

/// How long `entry` has been in its state at `now_ns`: 0 for an entry stamped later (or
/// never: the initial entry is stamped 0 and counts from boot).
pub fn in_state_ns(entry: &BackendState, now_ns: u64) -> u64 {
    now_ns.saturating_sub(entry.since_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(state: u32, flags: u32) -> BackendState {
        BackendState {
            state,
            flags,
            ..BackendState::default()
        }
    }

    #[test]
    fn closed_passes_everything() {
        for flags in [0, F_DROP, F_CLOSE_EXISTING, F_PASSIVE] {
            assert_eq!(enforce(&st(STATE_CLOSED, flags), true), Enforce::Pass);
            assert_eq!(enforce(&st(STATE_CLOSED, flags), false), Enforce::Pass);
        }
    }

    #[test]
    fn open_refuses_new_flows_and_cuts_only_with_close_existing() {
        assert_eq!(enforce(&st(STATE_OPEN, 0), true), Enforce::Refuse);
        assert_eq!(enforce(&st(STATE_OPEN, 0), false), Enforce::Pass);
        assert_eq!(
            enforce(&st(STATE_OPEN, F_CLOSE_EXISTING), false),
            Enforce::Cut
        );
        assert_eq!(
            enforce(&st(STATE_OPEN, F_CLOSE_EXISTING | F_DROP), true),
            Enforce::Refuse
        );
    }

    #[test]
    fn half_open_trials_new_flows_and_keeps_established_ones() {
        assert_eq!(enforce(&st(STATE_HALF_OPEN, 0), true), Enforce::Trial);
        assert_eq!(
            enforce(&st(STATE_HALF_OPEN, F_CLOSE_EXISTING), false),
            Enforce::Pass
        );
    }

    #[test]
    fn every_port_has_its_own_bit() {
        let mut seen = [0u32; PORT_BITMAP_WORDS as usize];
        for port in 0..=u16::MAX {
            let (word, mask) = port_bit(port);
            assert_eq!(mask.count_ones(), 1);
            assert_eq!(seen[word as usize] & mask, 0, "port {port}");
            seen[word as usize] |= mask;
        }
        assert!(seen.iter().all(|w| *w == u32::MAX));
    }

    const S: u64 = 1_000_000_000;

    fn stamped(state: u32, since_ns: u64, open_for_ns: u64) -> BackendState {
        BackendState {
            state,
            quota: 2,
            since_ns,
            open_for_ns,
            ..BackendState::default()
        }
    }

    #[test]
    fn an_open_breaker_resumes_for_the_rest_of_its_period() {
        let e = stamped(STATE_OPEN, 100 * S, 30 * S);
        assert_eq!(
            resume(&e, 110 * S),
            Some(Resumed::Open {
                remaining_ns: 20 * S
            })
        );
        assert_eq!(in_state_ns(&e, 110 * S), 10 * S);
    }

    #[test]
    fn an_open_period_over_resumes_with_nothing_left() {
        let e = stamped(STATE_OPEN, 100 * S, 30 * S);
        let over = Some(Resumed::Open { remaining_ns: 0 });
        assert_eq!(resume(&e, 130 * S), over, "exactly at the end");
        assert_eq!(resume(&e, 500 * S), over);
        let far = stamped(STATE_OPEN, u64::MAX - S, u64::MAX);
        assert_eq!(
            resume(&far, 0),
            Some(Resumed::Open {
                remaining_ns: u64::MAX
            }),
            "no overflow"
        );
    }

    #[test]
    fn half_open_and_closed_resume_as_they_are() {
        assert_eq!(
            resume(&stamped(STATE_HALF_OPEN, 100 * S, 30 * S), 1_000 * S),
            Some(Resumed::HalfOpen { quota: 2 })
        );
        assert_eq!(
            resume(&stamped(STATE_CLOSED, 0, 0), 1_000 * S),
            Some(Resumed::Closed)
        );
        assert_eq!(resume(&stamped(7, 0, 0), 1_000 * S), None);
    }

    #[test]
    fn an_entry_stamped_after_now_has_been_in_state_no_time() {
        assert_eq!(in_state_ns(&stamped(STATE_OPEN, 200 * S, S), 100 * S), 0);
    }

    #[test]
    fn unknown_state_fails_open() {
        assert_eq!(enforce(&st(7, F_CLOSE_EXISTING), true), Enforce::Pass);
    }
}
