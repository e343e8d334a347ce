//! The payment clients: per backend, a `connect()` every [`CONNECT_EVERY`] from the client
//! namespace, each on a thread of its own so that one hanging does not delay the next, and
//! what became of them.

use std::{
    io,
    net::{SocketAddrV4, TcpStream},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use agent_tests::Netns;

pub const CONNECT_EVERY: Duration = Duration::from_millis(20);
/// What a payment client would wait for a handshake before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);

/// What became of the connects to one backend, counted as they end.
#[derive(Default)]
pub struct Tally(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    counts: Counts,
    /// Slowest refused connect since the last [`Tally::take_slowest_refusal`].
    slowest_refusal: Option<Duration>,
    /// Every refused connect's time, for the median and the maximum of the run.
    refusals: Vec<Duration>,
}

/// A reading of a [`Tally`]: connects ended so far.
#[derive(Clone, Copy, Default)]
pub struct Counts {
    pub ok: u64,
    pub refused: u64,
    pub timed_out: u64,
    /// Any other error (unreachable, ...).
    pub other: u64,
}

impl Counts {
    pub fn since(&self, before: &Counts) -> Counts {
        Counts {
            ok: self.ok - before.ok,
            refused: self.refused - before.refused,
            timed_out: self.timed_out - before.timed_out,
            other: self.other - before.other,
        }
    }
}

impl Tally {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn counts(&self) -> Counts {
        self.with(|t| t.counts)
    }

    /// The slowest refusal since the last call; `None` when nothing was refused.
    pub fn take_slowest_refusal(&self) -> Option<Duration> {
        self.with(|t| t.slowest_refusal.take())
    }

    /// Median and slowest refused connect of the run; `None` when nothing was refused.
    pub fn refusal_spread(&self) -> Option<(Duration, Duration)> {
        let mut times = self.with(|t| t.refusals.clone());
        times.sort_unstable();
        Some((*times.get(times.len() / 2)?, *times.last()?))
    }

    fn record(&self, result: io::Result<TcpStream>, took: Duration) {
        self.with(|t| match result {
            Ok(_) => t.counts.ok += 1,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                t.slowest_refusal = t.slowest_refusal.max(Some(took));
                t.refusals.push(took);
                t.counts.refused += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => t.counts.timed_out += 1,
            Err(_) => t.counts.other += 1,
        });
    }
}

/// Connects to `backend` from inside `client` every [`CONNECT_EVERY`] until `stop`; the
/// connection, if any, is closed at once. Slots missed while the thread was not scheduled are
/// skipped, not made up in a burst.
pub fn run(
    client: &Netns,
    backend: SocketAddrV4,
    tally: &Tally,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    client.enter()?;
    // Threads spawned from here inherit this thread's network namespace.
    thread::scope(|scope| {
        let start = Instant::now();
        let mut slot: u32 = 0;
        while !stop.load(Ordering::Relaxed) {
            scope.spawn(|| {
                let began = Instant::now();
                let result = TcpStream::connect_timeout(&backend.into(), CONNECT_TIMEOUT);
                tally.record(result, began.elapsed());
            });
            let now_slot = start.elapsed().as_nanos() / CONNECT_EVERY.as_nanos();
            slot = slot.max(u32::try_from(now_slot).unwrap_or(u32::MAX)) + 1;
            if let Some(left) =
                (start + CONNECT_EVERY * slot).checked_duration_since(Instant::now())
            {
                thread::sleep(left);
            }
        }
    });
    Ok(())
}
