//! Every timing bound of the tests, in one place, scaled for slow machines.
//!
//! The bounds are written as they hold on real hardware. `AGENT_TEST_TIME_SCALE` (a number
//! of at least 1, default 1; `cargo xtask vm` sets it under software emulation) multiplies
//! each one: deadlines (readiness, a breaker opening, connect and read timeouts, drains),
//! latency bounds that only hold on fast hardware ("refused within 10 ms"), and the policy
//! timings a test's bounds are computed from. At scale 1 every bound is exactly the written
//! one.
//!
//! What never scales: what a test measures against a tolerance (a delivered rate, a share
//! of connections), offered loads, and timings tied to the kernel (TCP's 1 s initial RTO). A
//! slow machine cannot make a correct datapath deliver a wrong rate, but it can keep a
//! generator from offering the load: such a test checks that precondition with [`require`]
//! and fails saying so, naming the scale, instead of passing or failing on a meaningless
//! figure.
//!
//! Sampling periods (how often a condition is polled) are not bounds and are not scaled.

use std::fmt;
use std::ops::{Add, Mul};
use std::sync::LazyLock;
use std::time::Duration;

/// The variable that scales every bound.
pub const SCALE_ENV: &str = "AGENT_TEST_TIME_SCALE";

/// Read once per test process. A bad value is kept as its message, so that every test that
/// reads it panics with the same clear message (a panicking `LazyLock` would poison it and
/// the later tests would only say so).
static SCALE: LazyLock<Result<f64, String>> = LazyLock::new(|| match std::env::var(SCALE_ENV) {
    Err(std::env::VarError::NotPresent) => Ok(1.0),
    Err(std::env::VarError::NotUnicode(v)) => Err(format!("{SCALE_ENV}={v:?} is not UTF-8")),
    Ok(v) => parse_scale(&v),
});

/// `text` as a scale: a finite number >= 1.
pub fn parse_scale(text: &str) -> Result<f64, String> {
    let bad = |why: &str| {
        format!("{SCALE_ENV}={text:?}: {why}; it must be a number >= 1 (e.g. 10), or unset for 1")
    };
    let v: f64 = text.trim().parse().map_err(|_| bad("not a number"))?;
    if !v.is_finite() {
        return Err(bad("not finite"));
    }
    if v < 1.0 {
        return Err(bad("below 1 (bounds are never tightened)"));
    }
    Ok(v)
}

/// The scale of this run; panics, naming the variable and its value, if it is not valid.
pub fn scale() -> f64 {
    match &*SCALE {
        Ok(v) => *v,
        Err(msg) => panic!("{msg}"),
    }
}

/// `d` at this run's scale; exactly `d` at scale 1.
pub fn scaled(d: Duration) -> Duration {
    scale_by(d, scale())
}

fn scale_by(d: Duration, s: f64) -> Duration {
    if s == 1.0 {
        return d;
    }
    // In whole nanoseconds, rounded: 700 ms x 3 is 2.1 s, not 2.099999999 s.
    let ns = (d.as_nanos() as f64 * s).round();
    if ns >= u64::MAX as f64 {
        panic!("{d:?} x {SCALE_ENV} {s} is too long for a Duration");
    }
    Duration::from_nanos(ns as u64)
}

/// A time bound as it holds on real hardware; [`Scaled::get`] is what it is in this run.
/// `const`-friendly, so bounds can stay named constants:
/// `const SETUP: Scaled = Scaled::secs(5);` and `SETUP.get()` where a `Duration` is needed.
/// Sums and multiples of bounds are bounds (`INTERVAL * 3 + TIMEOUT + SLACK`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Scaled(Duration);

impl Scaled {
    pub const fn new(base: Duration) -> Scaled {
        Scaled(base)
    }

    pub const fn secs(n: u64) -> Scaled {
        Scaled(Duration::from_secs(n))
    }

    pub const fn millis(n: u64) -> Scaled {
        Scaled(Duration::from_millis(n))
    }

    /// The bound as written (real hardware, scale 1).
    pub const fn base(self) -> Duration {
        self.0
    }

    /// The bound in this run: [`Scaled::base`] x [`scale`].
    pub fn get(self) -> Duration {
        scaled(self.0)
    }

    /// As a policy duration in milliseconds (`"200ms"`), at this run's scale.
    pub fn yaml(self) -> String {
        format!("{}ms", self.get().as_millis())
    }
}

impl Add for Scaled {
    type Output = Scaled;
    fn add(self, rhs: Scaled) -> Scaled {
        Scaled(self.0 + rhs.0)
    }
}

impl Mul<u32> for Scaled {
    type Output = Scaled;
    fn mul(self, rhs: u32) -> Scaled {
        Scaled(self.0 * rhs)
    }
}

/// The bound in this run; at a scale other than 1 also the written one and the scale, so a
/// message read from a slow machine says where the number came from.
impl fmt::Debug for Scaled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = scale();
        if s == 1.0 {
            write!(f, "{:?}", self.0)
        } else {
            write!(f, "{:?} ({:?} x {SCALE_ENV} {s})", self.get(), self.0)
        }
    }
}

impl fmt::Display for Scaled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `AGENT_TEST_TIME_SCALE=N`, for messages.
pub fn describe() -> String {
    format!("{SCALE_ENV}={}", scale())
}

/// The message of a failed precondition: `what` did not hold, so the measurement would mean
/// nothing on this machine.
pub fn unmet(what: &str) -> String {
    format!(
        "precondition not met: {what}. This machine is too slow for what the test measures at \
         {} (bounds scale with it; offered loads and measured rates do not), so the test fails \
         here rather than judge a meaningless figure",
        describe()
    )
}

/// Panics with [`unmet`] when a precondition of a measurement does not hold (a generator
/// reached its offered rate, enough samples fell inside a ramp, ...).
#[track_caller]
pub fn require(holds: bool, what: impl FnOnce() -> String) {
    if !holds {
        panic!("{}", unmet(&what()));
    }
}

/// Scale (issue 16): from `agent run` to `/health/ready` answering 200 with 1,000 balanced
/// services of 4 backends each, at the default table sizes. The goal, as written:
/// a release agent meets it (1.1-1.2 s at 822d94f on 2 CPUs), and `cargo xtask test` runs the
/// end-to-end tests with a release agent; a debug agent takes 2.2-2.3 s there and fails it.
pub const READY_1K_SERVICES: Scaled = Scaled::secs(2);

/// Scale (issue 16): the same with 10,000 services of 6 backends. Generous: the issue asks
/// only that such a policy is accepted and served, not how fast (measured on 2 CPUs at
/// 822d94f: 6.2 s with a release agent, 20 s with a debug one).
pub const READY_10K_SERVICES: Scaled = Scaled::secs(60);

/// How long a scale test or the scale benchmark waits for readiness before it gives up. Not
/// the bound a test judges (that is one of the above): a longer wait, so that a failing run
/// still reports the time it took (on the pre-issue-16 datapath, 30 s and more).
pub const READY_GIVE_UP: Scaled = Scaled::secs(300);

/// Survive the agent (issue 10): the watchdog checks every second, so an XDP or TCX link
/// detached by someone else, or a removed pin, is back within 2 s (the bound).
pub const REPAIR: Scaled = Scaled::secs(2);

/// Survive the agent (issue 10): the flood during which a new agent starts and adopts the
/// pins. It must outlast the start (0.66 s measured on 2 CPUs), which a slower machine takes
/// longer for, so it scales; the count it yields is judged against burst + rate x span of
/// whatever span it had, so its length changes no expectation.
pub const ADOPTION_FLOOD: Scaled = Scaled::secs(4);

/// Survive the agent (issue 10): after `agent uninstall` (or an exit with
/// `--detach-on-exit`), how long the kernel may take to free the programs, links and maps
/// that nothing references any more (freed after an RCU grace period, in deferred work, not
/// in the call). A million-entry LRU table takes its time to free on a loaded machine: a CI
/// run saw one map outlive 2 s, and with the double-buffered policy (two table maps per
/// balanced service inside `LB_TABLES`, freed in deferred work after it) one saw two maps
/// outlive 10 s. The test asks that everything goes, not how fast.
pub const RELEASED: Scaled = Scaled::secs(30);

/// Survive the agent (issue 10): an echo through a VIP that takes longer than this is an
/// error. A lost packet costs TCP at least its 200 ms minimum RTO, so a datapath gap during
/// a restart or an upgrade shows up as a late echo; a healthy echo takes well under 10 ms.
pub const ECHO_TIMEOUT: Scaled = Scaled::secs(1);

/// Live reload (issue 11): from SIGHUP to the new policy's generation in force in the maps.
/// A reload stages the whole policy beside the running one, starts the supervisor and the
/// balancer again and switches with one write: tens of milliseconds for these tests' policies.
pub const RELOAD_STAGED: Scaled = Scaled::secs(2);

/// Reload (issue 11): a change of the policy file (written in place, renamed over, deleted
/// or re-created, a ConfigMap's `..data` swap) has its outcome within 2 s (the issue's
/// bound): applied, or reported as invalid (or missing) in `agent status` and `/metrics`,
/// the running policy unchanged. The watch itself takes its debounce (10 ms) and a reload of
/// a small policy a few ms; the rest is the machine's.
pub const FILE_RELOAD: Scaled = Scaled::secs(2);

/// Degradation (issue 12): the evaluator's period (`DEGRADE_TICK` in the agent). A condition
/// that changes is acted on at the next tick, and a `shed_step` counts in ticks.
pub const DEGRADE_TICK: Scaled = Scaled::millis(100);

/// Degradation (issue 12): what a bound computed from a test policy's numbers (probe
/// cadence, window, `recover_after`, `shed_step`, plus [`DEGRADE_TICK`]) is allowed on top:
/// a scrape of `/status`, the tests' own polling period, a probe's thread scheduling on a
/// loaded 2-CPU machine. Also how much earlier than `recover_after` a recovery may be seen
/// (the conditions' clearing is observed up to a scrape late).
pub const DEGRADE_SLACK: Scaled = Scaled::millis(300);

/// Degradation (issue 12): a new flow of a shed service is refused by the datapath itself
/// (a RST from the VIP), so its `connect()` fails within this. A latency bound of real
/// hardware, as an open breaker's refusal.
pub const SHED_REFUSAL: Scaled = Scaled::millis(10);

// payments / demo / bench

/// A `connect()` refused by an open breaker returns within this: the datapath answers the
/// SYN with a RST itself (the payments field case: a hung processor is refused in under
/// 10 ms). A latency bound of real hardware.
pub const REFUSED_CONNECT: Scaled = Scaled::millis(10);

/// From a breaker's change in the agent to the balancer's table that follows it in the
/// datapath: the balancer's 100 ms tick, the rebuild and swap, and a scrape's delay on a
/// loaded machine.
pub const TABLE_FOLLOWS: Scaled = Scaled::millis(500);

/// Direct and balanced connections mixed (issue 14, item 5): one short exchange (connect, 64
/// bytes each way, close) through the VIP or directly must end within this. A collision with
/// a backend's TIME_WAIT costs a SYN retransmission: 8-12 ms at HZ=250 (counted by the tests
/// in the client's `RetransSegs`, which no load makes up), a whole second on a second
/// collision; a healthy exchange takes well under a millisecond, and tens of ms on this
/// loaded 2-CPU machine at worst.
pub const MIXED_EXCHANGE: Scaled = Scaled::millis(500);

/// Topologies (issue 14): a new veth end joined to a bridge takes its carrier through the
/// kernel's link watch, which delays a carrier coming up by up to a second; until then IPv6
/// addresses on it stay tentative (even without duplicate detection) and cannot be bound.
pub const LINK_READY: Scaled = Scaled::secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_is_a_finite_number_of_at_least_one() {
        assert_eq!(parse_scale("1"), Ok(1.0));
        assert_eq!(parse_scale("10"), Ok(10.0));
        assert_eq!(parse_scale(" 2.5 "), Ok(2.5));
        for bad in ["", "0", "0.5", "-3", "ten", "NaN", "inf", "1e999"] {
            let e = parse_scale(bad).expect_err(bad);
            assert!(
                e.contains(SCALE_ENV) && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
    }

    #[test]
    fn scale_one_changes_nothing_and_others_multiply() {
        let d = Duration::from_millis(123) + Duration::from_nanos(7);
        assert_eq!(scale_by(d, 1.0), d);
        assert_eq!(
            scale_by(Duration::from_millis(200), 3.0),
            Duration::from_millis(600)
        );
        assert_eq!(
            scale_by(Duration::from_millis(100), 2.5),
            Duration::from_millis(250)
        );
        assert_eq!(
            scale_by(Duration::from_millis(700), 3.0),
            Duration::from_millis(2100)
        );
    }

    #[test]
    fn bounds_add_and_multiply_before_scaling() {
        let b = Scaled::millis(200) * 3 + Scaled::millis(100);
        assert_eq!(b.base(), Duration::from_millis(700));
    }
}
