//! Traffic shaping by Earliest Departure Time (EDT): pacing instead of dropping.
//!
//! On TC egress, every packet of a shaped service gets a departure time in `skb->tstamp`
//! (ns on CLOCK_MONOTONIC, the `bpf_ktime_get_ns` clock), and the `fq` qdisc holds it until
//! then. Per key (`flow`, `source_ip`, `service`, as for rate limits) the datapath keeps one
//! `next` time: the earliest a further packet of the key may leave. A packet of `wire_len`
//! bytes at `rate` bytes per second occupies `wire_len * 1e9 / rate` ns of the key's line:
//!
//! ```text
//! t    = max(now, next)          (never earlier than the packet before it has left)
//! next = t + wire_len * 1e9 / rate
//! ```
//!
//! so the key's bytes leave at `rate` however fast they are offered. A packet whose `t` lies
//! more than `horizon` past `now` is dropped instead (the queue would hold it too long);
//! nothing of the key's state moves for it. A departure time the sender already set later
//! than `t` (TCP's own pacing sets one) is kept: shaping never makes a packet leave earlier
//! than its sender asked.
//!
//! One `u64` of state per key means one compare-and-swap per packet keeps the schedule exact
//! when several CPUs send on one key (see the datapath's `shape.rs`).

/// `ServiceConfig::flags`: the service is shaped on egress (`ServiceConfig::shape` holds how).
pub const SVC_F_SHAPE: u32 = 1 << 2;

/// Compare-and-swap attempts on a contended key; after them the packet leaves at the time its
/// last attempt computed, without moving the key's `next` (see the datapath's `shape.rs`).
pub const SHAPE_CAS_ATTEMPTS: u32 = 4;

/// Default size of the departure table per shaped service (`shaping.max_keys`, an extension
/// of POLICY.md v1).
pub const DEFAULT_SHAPE_KEYS: u32 = 65_536;

/// How a service is shaped; part of its `ServiceConfig`, so that one map write switches a
/// service's whole configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShapeConfig {
    /// `RL_KEY_*` of `limit`: what a departure line is kept per.
    pub key: u32,
    pub _pad: u32,
    /// Bytes per second; never 0 when `SVC_F_SHAPE` is set.
    pub rate: u64,
    /// Packets departing later than `now + horizon_ns` are dropped.
    pub horizon_ns: u64,
}
const _: () = assert!(core::mem::size_of::<ShapeConfig>() == 24);

/// Value of the departure table (`SHAPE_NEXT`), keyed like the token buckets (`BucketKey`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Departure {
    /// Earliest departure of the key's next packet, ns on the `bpf_ktime_get_ns` clock.
    pub next: u64,
}
const _: () = assert!(core::mem::size_of::<Departure>() == 8);

/// Per CPU and service (`SHAPE_DELAY`): the latest packet this CPU paced for the service.
/// The agent reports, for the service, how long the latest of them still waits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShapeDelay {
    /// Its departure time (the `tstamp` it was given).
    pub departure: u64,
    /// How long it was set to wait when it was paced: `departure - now` then.
    pub delay: u64,
}
const _: () = assert!(core::mem::size_of::<ShapeDelay>() == 16);

crate::impl_pod!(ShapeConfig, Departure, ShapeDelay);

/// Why a shaping section cannot go into the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapeConfigError {
    /// A rate of 0 bytes per second would never let a packet leave.
    ZeroRate,
    /// A horizon of 0 would drop every packet that has to wait at all.
    ZeroHorizon,
}

impl ShapeConfig {
    /// Shaping at `rate` bytes per second per `key` (`RL_KEY_*`), dropping past `horizon_ns`.
    pub fn new(key: u32, rate: u64, horizon_ns: u64) -> Result<ShapeConfig, ShapeConfigError> {
        if rate == 0 {
            return Err(ShapeConfigError::ZeroRate);
        }
        if horizon_ns == 0 {
            return Err(ShapeConfigError::ZeroHorizon);
        }
        Ok(ShapeConfig {
            key,
            _pad: 0,
            rate,
            horizon_ns,
        })
    }

    /// Time on the key's line a packet of `wire_len` bytes takes, in ns (rounded down: under
    /// 1 ns a packet, which matters only above 1e9 bytes/s). `wire_len` is at most 64 KiB
    /// (256 KiB with BIG TCP) so the product fits 64 bits; a rate of 0 (a corrupted map) gives
    /// 0, never a fault.
    #[inline(always)]
    pub fn delay_ns(&self, wire_len: u64) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        wire_len * crate::NS_PER_SEC / self.rate
    }
}

/// What the schedule says of one packet, given the key's `next` as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Leave at `at` (>= now); the key's `next` becomes `next`, if it can be swapped in.
    Depart { at: u64, next: u64 },
    /// It would leave more than the horizon from now: drop it, leave the key as it is.
    BeyondHorizon,
}

/// The EDT step. `next`: the key's state as read; `now`: the clock; `sender`: the `tstamp`
/// the packet came with (0 for none); `delay`: [`ShapeConfig::delay_ns`] of the packet.
///
/// A sender's time is taken only when it is later than the schedule and within the horizon:
/// outside it, it is most likely not a CLOCK_MONOTONIC departure time at all (a forwarded
/// packet's receive timestamp on the real-time clock), and taking it would drop the packet.
#[inline(always)]
pub fn schedule(next: u64, now: u64, sender: u64, delay: u64, horizon_ns: u64) -> Schedule {
    let mut at = if next > now { next } else { now };
    if sender > at && sender - now <= horizon_ns {
        at = sender;
    }
    if at - now > horizon_ns {
        return Schedule::BeyondHorizon;
    }
    Schedule::Depart {
        at,
        next: at.saturating_add(delay),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{NS_PER_SEC, RL_KEY_FLOW};

    /// 50 Mbit/s, the end-to-end tests' rate: 6,250,000 bytes per second.
    fn cfg(horizon_ns: u64) -> ShapeConfig {
        ShapeConfig::new(RL_KEY_FLOW, 6_250_000, horizon_ns).unwrap()
    }

    #[test]
    fn delay_is_wire_time_at_the_rate() {
        let c = cfg(NS_PER_SEC);
        // 1514 bytes at 6.25 MB/s: 242.24 us, rounded down.
        assert_eq!(c.delay_ns(1514), 242_240);
        assert_eq!(c.delay_ns(0), 0);
        // A 64 KiB GSO packet: its whole wire length counts.
        assert_eq!(c.delay_ns(65_536), 10_485_760);
        assert_eq!(ShapeConfig::default().delay_ns(1500), 0, "rate 0: no fault");
    }

    #[test]
    fn an_idle_key_sends_at_once_and_books_its_wire_time() {
        let d = cfg(NS_PER_SEC).delay_ns(1514);
        assert_eq!(
            schedule(0, 1_000, 0, d, NS_PER_SEC),
            Schedule::Depart {
                at: 1_000,
                next: 1_000 + d
            }
        );
        // A `next` in the past counts as idle: no credit is banked for the gap.
        assert_eq!(
            schedule(500, 1_000, 0, d, NS_PER_SEC),
            Schedule::Depart {
                at: 1_000,
                next: 1_000 + d
            }
        );
    }

    #[test]
    fn back_to_back_packets_are_spaced_by_their_wire_time() {
        let c = cfg(NS_PER_SEC);
        let now = 5_000_000;
        let mut next = 0;
        let mut departures = [0u64; 5];
        for d in &mut departures {
            match schedule(next, now, 0, c.delay_ns(1514), c.horizon_ns) {
                Schedule::Depart { at, next: n } => {
                    *d = at;
                    next = n;
                }
                Schedule::BeyondHorizon => panic!("within the horizon"),
            }
        }
        for (i, w) in departures.windows(2).enumerate() {
            assert_eq!(w[1] - w[0], 242_240, "gap after packet {i}: {departures:?}");
        }
        assert_eq!(departures[0], now);
    }

    #[test]
    fn the_rate_holds_over_a_second_of_saturation() {
        // Offered at 10x the rate for 1 s of sending time; what the schedule lets depart
        // within that second is the rate (the rest is queued, within a long horizon).
        let c = cfg(10 * NS_PER_SEC);
        let d = c.delay_ns(1500);
        let (mut next, mut departed_bytes, mut now) = (0u64, 0u64, 0u64);
        while now < NS_PER_SEC {
            if let Schedule::Depart { at, next: n } = schedule(next, now, 0, d, c.horizon_ns) {
                next = n;
                if at < NS_PER_SEC {
                    departed_bytes += 1500;
                }
            }
            now += d / 10;
        }
        assert!(
            departed_bytes.abs_diff(6_250_000) <= 1500,
            "{departed_bytes} bytes left in 1 s at 6,250,000 B/s"
        );
    }

    #[test]
    fn packets_past_the_horizon_are_refused_without_moving_the_key() {
        let c = cfg(1_000_000); // 1 ms: about 4 full frames at 50 Mbit/s
        let d = c.delay_ns(1514);
        let now = 10_000;
        let mut next = 0;
        let mut sent = 0;
        for _ in 0..10 {
            match schedule(next, now, 0, d, c.horizon_ns) {
                Schedule::Depart { next: n, .. } => {
                    next = n;
                    sent += 1;
                }
                Schedule::BeyondHorizon => {}
            }
        }
        // Departures at now + 0, d, 2d, 3d, 4d are within 1 ms (4d = 968,960 ns).
        assert_eq!(sent, 5);
        assert_eq!(next, now + 5 * d, "refused packets book nothing");
        // Later, once the queue drained, the key sends again.
        assert!(matches!(
            schedule(next, now + 5 * d, 0, d, c.horizon_ns),
            Schedule::Depart { .. }
        ));
    }

    #[test]
    fn a_later_sender_time_is_kept_and_an_implausible_one_ignored() {
        let d = 100;
        // TCP's own pacing asked for 700: the packet leaves then, and the key follows it.
        assert_eq!(
            schedule(600, 500, 700, d, 1_000),
            Schedule::Depart { at: 700, next: 800 }
        );
        // Earlier than the schedule: the schedule wins.
        assert_eq!(
            schedule(600, 500, 550, d, 1_000),
            Schedule::Depart { at: 600, next: 700 }
        );
        // A real-time receive stamp (far beyond the horizon): ignored, not a drop.
        assert_eq!(
            schedule(0, 500, 1_700_000_000_000_000_000, d, 1_000),
            Schedule::Depart { at: 500, next: 600 }
        );
    }

    #[test]
    fn no_overflow_at_the_end_of_the_clock() {
        assert_eq!(
            schedule(u64::MAX - 10, u64::MAX - 20, 0, 100, 1_000),
            Schedule::Depart {
                at: u64::MAX - 10,
                next: u64::MAX
            }
        );
    }

    #[test]
    fn invalid_settings_are_refused() {
        assert_eq!(
            ShapeConfig::new(RL_KEY_FLOW, 0, 1),
            Err(ShapeConfigError::ZeroRate)
        );
        assert_eq!(
            ShapeConfig::new(RL_KEY_FLOW, 1, 0),
            Err(ShapeConfigError::ZeroHorizon)
        );
    }
}
