//! The payment clients: per backend, a `connect()` every [`CONNECT_EVERY`] from the client
//! namespace, each on a thread of its own so that one hanging does not delay the next, and
//! what became of them.

use std::{
    io,
    net::{SocketAddrV4, TcpStream},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::demo::{netns::Netns, traffic::TrafficError};

pub const CONNECT_EVERY: Duration = Duration::from_millis(20);
/// What a payment client would wait for a handshake before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);

/// What became of the connects to one backend, counted as they end.
#[derive(Default)]
pub struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    other: AtomicU64,
    /// Slowest refused connect since the last [`Tally::take_slowest_refusal`], in ns.
    slowest_refusal: AtomicU64,
    /// Every refused connect's time, for the median and the maximum of the run.
    refusals: Mutex<Vec<Duration>>,
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
    pub fn counts(&self) -> Counts {
        Counts {
            ok: self.ok.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }

    /// The slowest refusal since the last call; `None` when nothing was refused.
    pub fn take_slowest_refusal(&self) -> Option<Duration> {
        nanos(self.slowest_refusal.swap(0, Ordering::Relaxed))
    }

    /// Median and slowest refused connect of the run; `None` when nothing was refused.
    pub fn refusal_spread(&self) -> Option<(Duration, Duration)> {
        let mut times = self
            .refusals
            .lock()
            .map_or_else(|e| e.into_inner().clone(), |t| t.clone());
        times.sort_unstable();
        Some((*times.get(times.len() / 2)?, *times.last()?))
    }

    fn record(&self, result: io::Result<TcpStream>, took: Duration) {
        let counter = match result {
            Ok(_) => &self.ok,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
                self.slowest_refusal.fetch_max(ns, Ordering::Relaxed);
                if let Ok(mut times) = self.refusals.lock() {
                    times.push(took);
                }
                &self.refused
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => &self.timed_out,
            Err(_) => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn nanos(ns: u64) -> Option<Duration> {
    (ns > 0).then(|| Duration::from_nanos(ns))
}

/// Connects to `backend` from inside `client` every [`CONNECT_EVERY`] until `stop`; the
/// connection, if any, is closed at once. Slots missed while the thread was not scheduled are
/// skipped, not made up in a burst.
pub fn run(
    client: &Netns,
    backend: SocketAddrV4,
    tally: &Tally,
    stop: &AtomicBool,
) -> Result<(), TrafficError> {
    client.enter_this_thread()?;
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
