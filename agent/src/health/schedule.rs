//! When probes run and what they mean: the rise/fall counter, retry backoff, jitter, and the
//! loop one backend's task runs.
//!
//! One task runs every backend's schedule ([`drive`]): a heap of due times and the probes in
//! flight, woken at most once per [`BATCH`] by its timer, so thousands of backends cost
//! neither thousands of tasks nor a wake-up (and a thread switch) per probe. Probes follow a
//! grid: probe `n` is due at a nominal time, starts up to `jitter` of the interval after it
//! (so backends spread out instead of probing in lockstep), and must be done, retries
//! included, by the next nominal time. Jitter never accumulates, so a backend is probed once
//! per interval on average however long its probes take.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use fastrand::Rng;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::probe::{Probe, ProbeFailure, Started, finish_connect};
use super::{BackendRef, Health, ProbeResult};
use crate::config::{HealthCheck, Percent, Retry};

/// A retry needs at least this much of the interval left, or it is not started.
pub const MIN_ATTEMPT: Duration = Duration::from_millis(10);

/// Rise and fall: how many consecutive results against the current health flip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RiseFall {
    health: Health,
    /// Consecutive results contradicting `health`.
    streak: u32,
    rise: u32,
    fall: u32,
}

impl RiseFall {
    /// `rise` = `healthy_threshold`, `fall` = `unhealthy_threshold` (both at least 1).
    pub fn new(initial: Health, rise: u32, fall: u32) -> RiseFall {
        RiseFall {
            health: initial,
            streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Counts one probe result; `true` when it flipped the health.
    pub fn observe(&mut self, success: bool) -> bool {
        let (against, needed, flipped) = match self.health {
            Health::Healthy => (!success, self.fall, Health::Unhealthy),
            Health::Unhealthy => (success, self.rise, Health::Healthy),
        };
        if !against {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        if self.streak >= needed {
            self.health = flipped;
            self.streak = 0;
            true
        } else {
            false
        }
    }
}

/// The backoff before retry `n` (0 = before the second attempt), before jitter:
/// `initial_backoff * 2^n`, at most `max_backoff`.
pub fn backoff(retry: &Retry, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n).unwrap_or(u32::MAX);
    retry
        .initial_backoff
        .saturating_mul(factor)
        .min(retry.max_backoff)
}

/// "Equal jitter": uniform in `[b/2, b]`. Retries of backends that failed together spread
/// out, and a retry never waits less than half its backoff.
pub fn jittered_backoff(b: Duration, rng: &mut Rng) -> Duration {
    b / 2 + b.mul_f64(rng.f64() / 2.0)
}

/// How late after its nominal time a probe starts: uniform in `[0, jitter x interval)`.
pub fn start_delay(interval: Duration, jitter: Percent, rng: &mut Rng) -> Duration {
    interval.mul_f64(jitter.fraction() * rng.f64())
}

/// What one probe (all its attempts) came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRun {
    pub outcome: Result<(), ProbeFailure>,
    pub attempts: u32,
    /// The last attempt's.
    pub latency: Duration,
    /// From the first attempt's start to the last attempt's end.
    pub elapsed: Duration,
}

/// Runs up to `retry.max_attempts` attempts with backoff, all before `deadline`. The first
/// attempt gets the full `timeout`; a retry gets what is left of it before the deadline.
pub async fn run_probe(
    probe: &Probe,
    timeout: Duration,
    retry: &Retry,
    deadline: Instant,
    rng: &mut Rng,
) -> ProbeRun {
    let began = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let start = Instant::now();
        let budget = if attempts == 1 {
            timeout
        } else {
            timeout.min(deadline.saturating_duration_since(start))
        };
        let outcome = probe.attempt(budget).await;
        let end = Instant::now();
        let run = ProbeRun {
            outcome,
            attempts,
            latency: end - start,
            elapsed: end - began,
        };
        if run.outcome.is_ok() || attempts >= retry.max_attempts {
            return run;
        }
        let wait = jittered_backoff(backoff(retry, attempts - 1), rng);
        if deadline.saturating_duration_since(end + wait) < MIN_ATTEMPT {
            return run;
        }
        tokio::time::sleep(wait).await;
    }
}

/// What the [`Checker`](super::Checker) asks of its task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Boxed: it is the large variant, and sent once per backend.
    Add(Box<Added>),
    Remove(BackendRef),
}

#[derive(Debug)]
pub(crate) struct Added {
    pub backend: BackendRef,
    pub probe: Probe,
    pub check: HealthCheck,
    pub initial: Health,
}

/// Probes due within one tick of this grid start together, at its end: the task wakes a few
/// hundred times a second for thousands of backends, not once per probe. A probe starts at
/// most this late; its deadline and its own grid do not move.
pub const BATCH: Duration = Duration::from_millis(5);

/// The first tick of the [`BATCH`] grid at or after `t`. The probes' timer and the
/// supervisor's (breakers reopening) both fire on it, so their thread wakes once for both.
pub fn on_grid(t: std::time::Instant) -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    let batch = BATCH.as_nanos();
    let ticks = t
        .saturating_duration_since(epoch)
        .as_nanos()
        .div_ceil(batch);
    epoch + Duration::from_nanos(u64::try_from(ticks * batch).unwrap_or(u64::MAX))
}

/// One checked backend.
struct Slot {
    /// Its id in [`Slots`].
    id: u64,
    backend: BackendRef,
    probe: Probe,
    check: HealthCheck,
    rise_fall: RiseFall,
    /// Nominal time of the next (or current) probe.
    nominal: Instant,
    /// The current probe's deadline: the next nominal time.
    deadline: Instant,
    /// When the next probe starts (`None` while one is in flight): a heap entry of another
    /// time is stale.
    due: Option<Instant>,
}

impl Slot {
    fn interval(&self) -> Duration {
        interval_for(&self.check, self.rise_fall.health())
    }
}

/// The checked backends by id: a slab (index in the low 32 bits of the id, a generation in
/// the high ones), so that a probe's result finds its backend without hashing, and the
/// result of a removed backend's probe finds nothing even once its place is reused.
#[derive(Default)]
struct Slots {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    generation: u32,
}

impl Slots {
    fn next_id(&mut self) -> u64 {
        let index = self.free.last().copied().unwrap_or(self.slots.len());
        self.generation = self.generation.wrapping_add(1);
        (u64::from(self.generation) << 32) | index as u64
    }

    /// Puts a slot whose id came from [`next_id`](Slots::next_id), just before.
    fn insert(&mut self, slot: Slot) {
        let index = (slot.id & u64::from(u32::MAX)) as usize;
        if self.free.last() == Some(&index) {
            self.free.pop();
            self.slots[index] = Some(slot);
        } else {
            self.slots.push(Some(slot));
        }
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Slot> {
        let index = (id & u64::from(u32::MAX)) as usize;
        self.slots
            .get_mut(index)?
            .as_mut()
            .filter(|slot| slot.id == id)
    }

    fn remove(&mut self, id: u64) {
        let index = (id & u64::from(u32::MAX)) as usize;
        if let Some(place) = self.slots.get_mut(index)
            && place.as_ref().is_some_and(|slot| slot.id == id)
        {
            *place = None;
            self.free.push(index);
        }
    }
}

/// What is left of a probe once it is started, owning what it needs, so that many run
/// inside one task.
enum Work {
    /// Every attempt, with backoff ([`run_probe`]).
    Attempts {
        probe: Probe,
        timeout: Duration,
        retry: Retry,
        deadline: Instant,
        seed: u64,
    },
    /// A single TCP attempt whose connect is in progress ([`Probe::start_tcp`]).
    Connecting {
        socket: socket2::Socket,
        timeout: Duration,
        began: Instant,
    },
}

async fn probe_once(id: u64, work: Work) -> (u64, ProbeRun) {
    let run = match work {
        Work::Attempts {
            probe,
            timeout,
            retry,
            deadline,
            seed,
        } => {
            let mut rng = Rng::with_seed(seed);
            run_probe(&probe, timeout, &retry, deadline, &mut rng).await
        }
        Work::Connecting {
            socket,
            timeout,
            began,
        } => {
            let outcome = finish_connect(socket, timeout).await;
            single_attempt(outcome, began)
        }
    };
    (id, run)
}

/// The run of a probe of one attempt that began at `began` and just ended.
fn single_attempt(outcome: Result<(), ProbeFailure>, began: Instant) -> ProbeRun {
    let took = began.elapsed();
    ProbeRun {
        outcome,
        attempts: 1,
        latency: took,
        elapsed: took,
    }
}

/// Counts a finished probe in its backend's rise/fall, schedules the next one and returns
/// the result to send.
fn conclude(
    slot: &mut Slot,
    id: u64,
    run: ProbeRun,
    due: &mut BinaryHeap<Reverse<(Instant, u64)>>,
    rng: &mut Rng,
) -> ProbeResult {
    let changed = slot.rise_fall.observe(run.outcome.is_ok());
    let at = std::time::Instant::now();
    let result = ProbeResult {
        backend: slot.backend.clone(),
        at,
        outcome: run.outcome,
        attempts: run.attempts,
        latency: run.latency,
        elapsed: run.elapsed,
        health: slot.rise_fall.health(),
        changed,
    };
    // Behind schedule (a loaded host, a slow receiver): resume from now rather than firing
    // the missed probes in a burst.
    slot.nominal = slot.deadline.max(Instant::from_std(at));
    schedule(slot, id, due, rng);
    result
}

/// The checker's task: every backend's schedule in a heap, every probe in flight in one
/// `FuturesUnordered`, each result sent as it comes. Ends when the receiver of results or
/// the checker is gone.
///
/// Per backend, probes follow a grid: probe `n` is due at a nominal time, starts up to
/// `jitter` of the interval after it, and must be done, retries included, by the next
/// nominal time. A loaded host or a slow receiver delays the grid; it never fires the missed
/// probes in a burst.
pub(crate) async fn drive(
    mut commands: mpsc::UnboundedReceiver<Command>,
    results: mpsc::Sender<ProbeResult>,
) {
    let mut rng = Rng::new();
    let mut slots = Slots::default();
    let mut ids: HashMap<BackendRef, u64> = HashMap::new();
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut in_flight = FuturesUnordered::new();
    // Probes over as soon as started: (id, run), concluded after the starting loop.
    let mut done: Vec<(u64, ProbeRun)> = Vec::new();
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    loop {
        let now = Instant::now();
        while let Some(&Reverse((at, id))) = due.peek() {
            if at > now {
                break;
            }
            due.pop();
            let Some(slot) = slots.get_mut(id) else {
                continue;
            };
            if slot.due != Some(at) {
                continue;
            }
            slot.due = None;
            slot.deadline = slot.nominal + slot.interval();
            let timeout = slot.check.timeout;
            // A TCP probe without retries is started here: most are over before connect()
            // returns, and need no future, no timer and no wake-up.
            let began = Instant::now();
            let started = if slot.check.retry.max_attempts <= 1 {
                slot.probe.start_tcp()
            } else {
                None
            };
            let work = match started {
                Some(Started::Done(outcome)) => {
                    done.push((id, single_attempt(outcome, began)));
                    continue;
                }
                Some(Started::Connecting(socket)) => Work::Connecting {
                    socket,
                    timeout,
                    began,
                },
                None => Work::Attempts {
                    probe: slot.probe.clone(),
                    timeout,
                    retry: slot.check.retry.clone(),
                    deadline: slot.deadline,
                    seed: rng.u64(..),
                },
            };
            in_flight.push(probe_once(id, work));
        }
        for (id, run) in done.drain(..) {
            let Some(slot) = slots.get_mut(id) else {
                continue;
            };
            let result = conclude(slot, id, run, &mut due, &mut rng);
            if results.send(result).await.is_err() {
                return;
            }
        }
        // Wake at the grid's tick after the next due probe; an earlier wake already set
        // stays (re-arming costs a timer update per completed probe).
        if let Some(&Reverse((at, _))) = due.peek() {
            let wake = Instant::from_std(on_grid(at.into_std()));
            if armed.is_none_or(|a| a > wake) {
                sleep.as_mut().reset(wake);
                armed = Some(wake);
            }
        }
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Add(added)) => {
                    let Added { backend, probe, check, initial } = *added;
                    if let Some(old) = ids.remove(&backend) {
                        slots.remove(old);
                    }
                    let id = slots.next_id();
                    let rise_fall =
                        RiseFall::new(initial, check.healthy_threshold, check.unhealthy_threshold);
                    // The first probe anywhere in the first interval: backends added together
                    // do not probe together for ever after.
                    let nominal = now + interval_for(&check, initial).mul_f64(rng.f64());
                    let mut slot = Slot {
                        id,
                        backend: backend.clone(),
                        probe,
                        check,
                        rise_fall,
                        nominal,
                        deadline: nominal,
                        due: None,
                    };
                    schedule(&mut slot, id, &mut due, &mut rng);
                    ids.insert(backend, id);
                    slots.insert(slot);
                }
                Some(Command::Remove(backend)) => {
                    if let Some(id) = ids.remove(&backend) {
                        slots.remove(id);
                    }
                }
            },
            Some((id, run)) = in_flight.next(), if !in_flight.is_empty() => {
                // A removed backend's probe: its result is never sent.
                let Some(slot) = slots.get_mut(id) else {
                    continue;
                };
                let result = conclude(slot, id, run, &mut due, &mut rng);
                if results.send(result).await.is_err() {
                    return;
                }
            },
            () = &mut sleep, if armed.is_some() => {
                armed = None;
            },
        }
    }
}

/// Puts the slot's next probe in the heap: its nominal time plus jitter.
fn schedule(
    slot: &mut Slot,
    id: u64,
    due: &mut BinaryHeap<Reverse<(Instant, u64)>>,
    rng: &mut Rng,
) {
    let at = slot.nominal + start_delay(slot.interval(), slot.check.jitter, rng);
    slot.due = Some(at);
    due.push(Reverse((at, id)));
}

fn interval_for(check: &HealthCheck, health: Health) -> Duration {
    match health {
        Health::Healthy => check.interval,
        Health::Unhealthy => check.unhealthy_interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut rf = RiseFall::new(Health::Healthy, 2, 3);
        let seq = [
            false, false, true, false, false, false, true, false, true, true,
        ];
        let got: Vec<(bool, Health)> = seq
            .iter()
            .map(|&ok| (rf.observe(ok), rf.health()))
            .collect();
        use Health::{Healthy as H, Unhealthy as U};
        assert_eq!(
            got,
            [
                (false, H),
                (false, H),
                (false, H), // a success breaks the fall streak
                (false, H),
                (false, H),
                (true, U), // third consecutive failure
                (false, U),
                (false, U), // a failure breaks the rise streak
                (false, U),
                (true, H), // second consecutive success
            ]
        );
    }

    #[test]
    fn thresholds_of_one_flip_at_once() {
        let mut rf = RiseFall::new(Health::Unhealthy, 1, 1);
        assert!(rf.observe(true));
        assert!(rf.observe(false));
        assert!(!rf.observe(false));
    }

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let retry = Retry {
            max_attempts: 10,
            initial_backoff: ms(50),
            max_backoff: ms(500),
        };
        let got: Vec<Duration> = (0..6).map(|n| backoff(&retry, n)).collect();
        assert_eq!(got, [50, 100, 200, 400, 500, 500].map(ms));
        assert_eq!(backoff(&retry, 40), ms(500), "no overflow");
    }

    #[test]
    fn jitter_stays_in_its_bounds() {
        let mut rng = Rng::with_seed(7);
        for _ in 0..10_000 {
            let b = jittered_backoff(ms(100), &mut rng);
            assert!((ms(50)..=ms(100)).contains(&b), "{b:?}");
            let d = start_delay(ms(1000), Percent::whole(10), &mut rng);
            assert!(d < ms(100), "{d:?}");
        }
        assert_eq!(
            start_delay(ms(1000), Percent::whole(0), &mut rng),
            Duration::ZERO
        );
    }
}
