//! The shoppers: a pool of threads in the client namespace opening short TCP connections to
//! the VIP at a shared rate (changed while they run), each reading the answer to learn which
//! backend served it, then closing. What became of every connection is counted.

use std::{
    io::{self, Read as _},
    net::{SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::backends::served_by;
use crate::demo::{netns::Netns, traffic::TrafficError};

/// Connecting threads: each runs its connections one after the other.
pub const WORKERS: u32 = 8;
/// What a shopper waits for the handshake, and then for the answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const READ_TIMEOUT: Duration = Duration::from_millis(500);
/// An answer is a few dozen bytes; more is not read.
const MAX_ANSWER: u64 = 512;
/// A worker that fell behind its schedule by more than this skips the missed slots rather
/// than catching up in a burst.
const MAX_LAG: Duration = Duration::from_millis(100);
/// Longest sleep of a worker before it looks at the rate (and its stop flag) again.
const IDLE: Duration = Duration::from_millis(10);

/// What became of the connections, counted as they end.
pub struct Tally {
    /// Connections started (the offered load).
    started: AtomicU64,
    /// Per backend, by the name in its answer: connections it served.
    served: Vec<AtomicU64>,
    refused: AtomicU64,
    timed_out: AtomicU64,
    /// Anything else: reset, no or an unknown answer, unreachable.
    other: AtomicU64,
    /// When each failed connection ended.
    failures: Mutex<Vec<Instant>>,
}

/// A reading of a [`Tally`].
#[derive(Clone, Default)]
pub struct Counts {
    pub started: u64,
    pub served: Vec<u64>,
    pub refused: u64,
    pub timed_out: u64,
    pub other: u64,
}

impl Counts {
    pub fn since(&self, before: &Counts) -> Counts {
        Counts {
            started: self.started - before.started,
            served: self
                .served
                .iter()
                .zip(before.served.iter().chain(std::iter::repeat(&0)))
                .map(|(now, then)| now - then)
                .collect(),
            refused: self.refused - before.refused,
            timed_out: self.timed_out - before.timed_out,
            other: self.other - before.other,
        }
    }

    pub fn failed(&self) -> u64 {
        self.refused + self.timed_out + self.other
    }

    pub fn served_total(&self) -> u64 {
        self.served.iter().sum()
    }

    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &Counts) {
        self.started += other.started;
        if self.served.len() < other.served.len() {
            self.served.resize(other.served.len(), 0);
        }
        for (sum, n) in self.served.iter_mut().zip(&other.served) {
            *sum += n;
        }
        self.refused += other.refused;
        self.timed_out += other.timed_out;
        self.other += other.other;
    }
}

impl Tally {
    pub fn new(backends: usize) -> Self {
        Self {
            started: AtomicU64::new(0),
            served: (0..backends).map(|_| AtomicU64::new(0)).collect(),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            other: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            started: self.started.load(Ordering::Relaxed),
            served: self
                .served
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect(),
            refused: self.refused.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }

    /// When every failed connection ended, in order.
    pub fn failures(&self) -> Vec<Instant> {
        let mut times = self
            .failures
            .lock()
            .map_or_else(|e| e.into_inner().clone(), |t| t.clone());
        times.sort_unstable();
        times
    }

    fn fail(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut times) = self.failures.lock() {
            times.push(Instant::now());
        }
    }
}

/// One worker: connections to `vip` from inside `client`, at `rate / WORKERS` per second,
/// offset by `index` so that the workers take turns, until `stop`. `rate` is read again at
/// least every [`IDLE`], so a change of rate applies at once.
pub fn run(
    client: &Netns,
    vip: SocketAddrV4,
    names: &[String],
    index: u32,
    rate: &AtomicU64,
    tally: &Tally,
    stop: &AtomicBool,
) -> Result<(), TrafficError> {
    client.enter_this_thread()?;
    let start = Instant::now();
    let mut last: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let per_worker = rate.load(Ordering::Relaxed) as f64 / f64::from(WORKERS);
        if per_worker <= 0.0 {
            thread::sleep(IDLE);
            last = None;
            continue;
        }
        let gap = Duration::from_secs_f64(1.0 / per_worker);
        let due = last.map_or(start + gap * index / WORKERS, |t| t + gap);
        let now = Instant::now();
        if let Some(left) = due.checked_duration_since(now) {
            thread::sleep(left.min(IDLE));
            continue;
        }
        last = Some(if now - due > MAX_LAG { now } else { due });
        tally.started.fetch_add(1, Ordering::Relaxed);
        shop(vip, names, tally);
    }
    Ok(())
}

/// One connection: connect, read the answer, close with a RST (`SO_LINGER` 0: no TIME_WAIT on
/// either side however many connections the act opens), count the outcome.
fn shop(vip: SocketAddrV4, names: &[String], tally: &Tally) {
    let stream = match TcpStream::connect_timeout(&vip.into(), CONNECT_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) => {
            let counter = match e.kind() {
                io::ErrorKind::ConnectionRefused => &tally.refused,
                io::ErrorKind::TimedOut => &tally.timed_out,
                _ => &tally.other,
            };
            tally.fail(counter);
            return;
        }
    };
    let mut answer = String::new();
    let read = stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .and_then(|()| (&stream).take(MAX_ANSWER).read_to_string(&mut answer));
    reset_on_close(&stream);
    drop(stream);
    let backend = served_by(&answer).and_then(|name| names.iter().position(|n| n == name));
    match (read, backend) {
        (Ok(_), Some(i)) => {
            tally.served[i].fetch_add(1, Ordering::Relaxed);
        }
        _ => tally.fail(&tally.other),
    }
}

/// `SO_LINGER` 0: closing sends a RST instead of a FIN. Best effort.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket, and an option of the size given.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            libc::socklen_t::try_from(size_of::<libc::linger>()).unwrap_or(0),
        );
    }
}
