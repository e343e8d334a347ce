//! Token-bucket rate limiting, in its GCRA form.
//!
//! A bucket of `burst` tokens refilled at `rate` is the same decision as the generic cell rate
//! algorithm: keep one "theoretical arrival time" `tat` per key; a packet costing `inc` ns of
//! rate is admitted when `max(tat, now) + inc - now <= burst_ns`, and then `tat` moves to that
//! sum. One `u64` of state means one compare-and-swap per packet makes the bucket exact when
//! several CPUs hit the same key: a CPU whose CAS loses re-reads and decides again, so no
//! update is lost and the limit is never exceeded (see `decide`).
//!
//! Over any interval of length `T` of the bucket's clock in which the key is saturated, at
//! most `burst + rate * T` units are admitted.
//!
//! The clock: the datapath reads `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE, about
//! 3 ns) instead of `bpf_ktime_get_ns` (about 20 ns) for a service whose burst, as time, spans
//! at least [`COARSE_CLOCK_MIN_TICKS`] ticks of that clock ([`coarse_min_burst_ns`], set at
//! load time). The coarse clock lags the precise one by up to one tick (`CONFIG_HZ`: 4 ms at
//! 250 Hz) and stands still in between, so over a real interval `T` a key admits at most
//! `burst + rate * (T + tick)`, and over its whole life never more than the precise clock
//! would allow it by more than `rate * tick`. A burst shorter than a tick would cap the rate:
//! with the clock standing still, a bucket refills only once a tick, and never by more than
//! the burst; such services keep the precise clock. Each compare-and-swap stays exact.

use crate::shape::ShapeConfig;

pub use crate::NS_PER_SEC;

/// `ServiceConfig::flags`
pub const SVC_F_ACTIVE: u32 = 1 << 0;
pub const SVC_F_RATE_LIMIT: u32 = 1 << 1;

/// `ServiceConfig::rl_key` (and `ShapeConfig::key`): what a bucket (a departure line) is kept
/// per.
pub const RL_KEY_FLOW: u32 = 0;
pub const RL_KEY_SOURCE_IP: u32 = 1;
pub const RL_KEY_SERVICE: u32 = 2;

/// `ServiceConfig::rl_unit`: what a token pays for.
pub const RL_UNIT_PACKETS: u32 = 0;
/// Bytes of the L2 frame as the program sees it.
pub const RL_UNIT_BYTES: u32 = 1;

/// Compare-and-swap attempts on a contended bucket before the packet is dropped as
/// `contended` (dropping, not passing, keeps the limit exact).
pub const CAS_ATTEMPTS: u32 = 4;

/// A service uses the coarse clock when its burst spans at least this many of its ticks: a
/// step of the clock then always fits the bucket, even when the timekeeping update comes
/// late by three ticks (a loaded or virtualised host). With two, a guest under emulation
/// (`cargo xtask vm`, kernel 6.1) admitted 47% of the rate of a 2.5-tick burst.
pub const COARSE_CLOCK_MIN_TICKS: u64 = 4;

/// Name of the datapath's load-time constant (`aya_ebpf::Global<u64>`): the shortest burst,
/// in ns, for which a bucket reads the coarse clock. Its default, `u64::MAX`, keeps every
/// bucket on the precise clock when the loader does not set it.
pub const GLOBAL_COARSE_MIN_BURST_NS: &str = "COARSE_MIN_BURST_NS";

/// The value of [`GLOBAL_COARSE_MIN_BURST_NS`] for a coarse clock of `tick_ns` resolution.
pub const fn coarse_min_burst_ns(tick_ns: u64) -> u64 {
    tick_ns.saturating_mul(COARSE_CLOCK_MIN_TICKS)
}

/// The resolution of CLOCK_MONOTONIC_COARSE (`bpf_ktime_get_coarse_ns`): one scheduler tick.
/// `None` if the kernel does not say.
#[cfg(feature = "user")]
pub fn coarse_clock_tick_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    secs.checked_mul(NS_PER_SEC)?
        .checked_add(nanos)
        .filter(|&t| t > 0)
}

/// Per-service datapath configuration, indexed by service id in `SVC_CFG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceConfig {
    pub flags: u32,
    pub rl_key: u32,
    pub rl_unit: u32,
    /// The companion service of the fallback backends (`crate::degrade`): its id + 1; 0 for
    /// none. Its `SVC_CFG` entry of the same generation holds the rate limit in force while
    /// the service is degraded, its `LB_SVC` entry and table the fallback's balancing.
    pub fallback: u32,
    /// Units (packets or bytes) per second; never 0 when `SVC_F_RATE_LIMIT` is set.
    pub rl_rate: u64,
    /// The burst expressed as time at `rl_rate`: `burst * 1e9 / rate`.
    pub rl_burst_ns: u64,
    /// Pacing on egress, when `SVC_F_SHAPE` is set (`crate::shape`).
    pub shape: ShapeConfig,
}
const _: () = assert!(core::mem::size_of::<ServiceConfig>() == 56);

/// Key of the token-bucket table. Fields the service's `rl_key` does not use are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub service_id: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
    pub src: [u8; 16],
    pub dst: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<BucketKey>() == 44);

/// Value of the token-bucket table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Theoretical arrival time, ns on CLOCK_MONOTONIC: read coarse or precise as the module
    /// documentation says (the two differ by at most a tick).
    pub tat: u64,
}
const _: () = assert!(core::mem::size_of::<Bucket>() == 8);

crate::impl_pod!(ServiceConfig, BucketKey, Bucket);

impl ServiceConfig {
    /// Rate-limit settings from a rate and a burst in the same unit. `None` when the rate is
    /// 0 or the burst, as ns, does not fit 64 bits.
    pub fn with_rate_limit(key: u32, unit: u32, rate: u64, burst: u64) -> Option<ServiceConfig> {
        if rate == 0 || burst == 0 {
            return None;
        }
        let burst_ns = (burst as u128 * NS_PER_SEC as u128) / rate as u128;
        Some(ServiceConfig {
            flags: SVC_F_ACTIVE | SVC_F_RATE_LIMIT,
            rl_key: key,
            rl_unit: unit,
            fallback: 0,
            rl_rate: rate,
            rl_burst_ns: u64::try_from(burst_ns).ok()?,
            shape: ShapeConfig::default(),
        })
    }

    /// The companion service of the fallback backends, `None` without one.
    #[inline(always)]
    pub fn fallback_id(&self) -> Option<u32> {
        self.fallback.checked_sub(1)
    }

    /// Whether this service's buckets read the coarse clock, given the datapath's
    /// [`GLOBAL_COARSE_MIN_BURST_NS`].
    #[inline(always)]
    pub fn coarse_clock(&self, min_burst_ns: u64) -> bool {
        self.rl_burst_ns >= min_burst_ns
    }

    /// Rate time a packet of `len` bytes costs, in ns. Rounds down: the error is under 1 ns
    /// a packet, which matters only above 1e9 units/s.
    #[inline(always)]
    pub fn cost_ns(&self, len: u64) -> u64 {
        let units = if self.rl_unit == RL_UNIT_BYTES {
            len
        } else {
            1
        };
        // units <= 65535 * 1e9 fits u64; rate is never 0 here (checked at compile time of the
        // policy), and a 0 from a corrupted map would make the division return 0 in BPF.
        if self.rl_rate == 0 {
            return 0;
        }
        units * NS_PER_SEC / self.rl_rate
    }
}

/// Outcome of one GCRA decision on a bucket whose current `tat` was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admit, if `tat` can be swapped for this value.
    Admit(u64),
    /// Over the limit.
    Deny,
}

/// The GCRA decision. `now` and `tat` are ns on one clock; `inc` is the packet's cost in ns.
#[inline(always)]
pub fn decide(tat: u64, now: u64, inc: u64, burst_ns: u64) -> Decision {
    let base = if tat > now { tat } else { now };
    let new_tat = base.saturating_add(inc);
    if new_tat - now <= burst_ns {
        Decision::Admit(new_tat)
    } else {
        Decision::Deny
    }
}

/// `tat` of a bucket created now: full, `burst` units available.
#[inline(always)]
pub const fn fresh_tat(now: u64) -> u64 {
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `decide` like the datapath: a packet every `gap` ns for `dur` ns.
    fn admitted(cfg: &ServiceConfig, gap: u64, dur: u64, len: u64) -> u64 {
        let mut tat = fresh_tat(1_000);
        let mut n = 0;
        let mut t = 1_000;
        while t < 1_000 + dur {
            if let Decision::Admit(v) = decide(tat, t, cfg.cost_ns(len), cfg.rl_burst_ns) {
                tat = v;
                n += 1;
            }
            t += gap;
        }
        n
    }

    #[test]
    fn saturated_bucket_admits_burst_plus_rate_times_time() {
        // 10,000/s with a burst of 5,000 (the flash-sale case), offered 5x for 2 s.
        let cfg =
            ServiceConfig::with_rate_limit(RL_KEY_SERVICE, RL_UNIT_PACKETS, 10_000, 5_000).unwrap();
        let n = admitted(&cfg, NS_PER_SEC / 50_000, 2 * NS_PER_SEC, 64);
        let expect = 5_000 + 10_000 * 2;
        assert!(n.abs_diff(expect) <= 1, "admitted {n}, expected {expect}");
    }

    #[test]
    fn under_the_rate_everything_passes() {
        let cfg = ServiceConfig::with_rate_limit(RL_KEY_FLOW, RL_UNIT_PACKETS, 1_000, 1).unwrap();
        // One packet every 2 ms is 500/s.
        assert_eq!(admitted(&cfg, 2_000_000, NS_PER_SEC, 64), 500);
    }

    #[test]
    fn burst_is_available_at_once() {
        let cfg = ServiceConfig::with_rate_limit(RL_KEY_FLOW, RL_UNIT_PACKETS, 10, 7).unwrap();
        // 100 packets in the same nanosecond: exactly the burst gets through.
        let mut tat = fresh_tat(5);
        let mut n = 0;
        for _ in 0..100 {
            if let Decision::Admit(v) = decide(tat, 5, cfg.cost_ns(64), cfg.rl_burst_ns) {
                tat = v;
                n += 1;
            }
        }
        assert_eq!(n, 7);
    }

    #[test]
    fn byte_rates_charge_by_length() {
        // 1,000,000 B/s, burst 10,000 B: 1000-byte frames, offered 4x for 1 s.
        let cfg =
            ServiceConfig::with_rate_limit(RL_KEY_SOURCE_IP, RL_UNIT_BYTES, 1_000_000, 10_000)
                .unwrap();
        assert_eq!(cfg.cost_ns(1000), 1_000_000);
        let n = admitted(&cfg, 250_000, NS_PER_SEC, 1000);
        let expect_bytes = 10_000 + 1_000_000;
        assert!(
            (n * 1000).abs_diff(expect_bytes) <= 1000,
            "admitted {} B, expected {expect_bytes}",
            n * 1000
        );
    }

    #[test]
    fn idle_time_does_not_bank_more_than_the_burst() {
        let cfg = ServiceConfig::with_rate_limit(RL_KEY_FLOW, RL_UNIT_PACKETS, 100, 3).unwrap();
        let mut tat = fresh_tat(0);
        // An hour of silence, then a flood at one instant: still only the burst.
        let now = 3_600 * NS_PER_SEC;
        let mut n = 0;
        for _ in 0..10 {
            if let Decision::Admit(v) = decide(tat, now, cfg.cost_ns(1), cfg.rl_burst_ns) {
                tat = v;
                n += 1;
            }
        }
        assert_eq!(n, 3);
    }

    /// Drives `decide` as the datapath does on the coarse clock: the packet's `now` is the
    /// last tick at or before its real time.
    fn admitted_coarse(cfg: &ServiceConfig, gap: u64, dur: u64, tick: u64, phase: u64) -> u64 {
        let coarse = |t: u64| (t + phase) / tick * tick;
        let start = 10 * tick;
        let mut tat = fresh_tat(coarse(start));
        let mut n = 0;
        let mut t = start;
        while t < start + dur {
            if let Decision::Admit(v) = decide(tat, coarse(t), cfg.cost_ns(1), cfg.rl_burst_ns) {
                tat = v;
                n += 1;
            }
            t += gap;
        }
        n
    }

    #[test]
    fn coarse_clock_admits_at_most_one_tick_of_rate_more() {
        // 10,000/s, burst 1,000 (100 ms, 25 ticks of 4 ms), offered 5x for 1 s, at every
        // phase of the tick: within burst + rate x (T + tick), and not under rate x (T - tick).
        const TICK: u64 = 4_000_000;
        let cfg =
            ServiceConfig::with_rate_limit(RL_KEY_FLOW, RL_UNIT_PACKETS, 10_000, 1_000).unwrap();
        assert!(cfg.coarse_clock(coarse_min_burst_ns(TICK)));
        for phase in (0..TICK).step_by(500_000) {
            let n = admitted_coarse(&cfg, NS_PER_SEC / 50_000, NS_PER_SEC, TICK, phase);
            let exact = 1_000 + 10_000;
            let one_tick = 10_000 * TICK / NS_PER_SEC;
            assert!(
                n <= exact + one_tick && n + one_tick >= exact,
                "phase {phase}: admitted {n}, expected {exact} +- {one_tick}"
            );
        }
    }

    #[test]
    fn a_burst_shorter_than_the_ticks_keeps_the_precise_clock() {
        // 1,000,000/s with a burst of 10 is 10 us: on a clock standing still for 4 ms the
        // bucket would refill once a tick, by at most the burst, 2,500/s instead of 1,000,000.
        const TICK: u64 = 4_000_000;
        let short =
            ServiceConfig::with_rate_limit(RL_KEY_FLOW, RL_UNIT_PACKETS, 1_000_000, 10).unwrap();
        assert!(!short.coarse_clock(coarse_min_burst_ns(TICK)));
        let n = admitted_coarse(&short, 500, NS_PER_SEC / 10, TICK, 0);
        assert!(
            n <= 10 * 26,
            "on the coarse clock: {n} in 100 ms, the rate capped"
        );
        // Exactly four ticks of burst is enough, a millisecond less is not.
        let four = ServiceConfig::with_rate_limit(RL_KEY_FLOW, RL_UNIT_PACKETS, 1_000, 16).unwrap();
        assert!(four.coarse_clock(coarse_min_burst_ns(TICK)));
        let less = ServiceConfig::with_rate_limit(RL_KEY_FLOW, RL_UNIT_PACKETS, 1_000, 15).unwrap();
        assert!(!less.coarse_clock(coarse_min_burst_ns(TICK)));
        // The datapath's default: every service on the precise clock.
        assert!(!four.coarse_clock(u64::MAX));
    }

    #[test]
    fn invalid_settings_are_refused() {
        assert!(ServiceConfig::with_rate_limit(0, 0, 0, 1).is_none());
        assert!(ServiceConfig::with_rate_limit(0, 0, 1, 0).is_none());
        // Burst of u64::MAX packets at 1/s does not fit as ns.
        assert!(ServiceConfig::with_rate_limit(0, 0, 1, u64::MAX).is_none());
    }

    #[test]
    fn cost_of_a_zero_rate_is_zero_not_a_fault() {
        let cfg = ServiceConfig::default();
        assert_eq!(cfg.cost_ns(100), 0);
    }
}
