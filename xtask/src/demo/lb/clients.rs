//! The shoppers: a pool of threads in the client namespace opening short TCP connections to
//! the VIP at a shared rate (changed while they run), each reading the answer to learn which
//! backend served it, then closing. What became of every connection is counted.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use agent_tests::{Netns, backend::served_by};

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

/// What became of the connections, counted as they end, and when each failure ended.
pub struct Tally(Mutex<(Counts, Vec<Instant>)>);

/// Connections so far.
#[derive(Clone, Default)]
pub struct Counts {
    /// Connections started (the offered load).
    pub started: u64,
    /// Per backend, by the name in its answer: connections it served.
    pub served: Vec<u64>,
    pub refused: u64,
    pub timed_out: u64,
    /// Anything else: reset, no or an unknown answer, unreachable.
    pub other: u64,
}

impl Counts {
    /// These counts minus `before` (`add` with `sign` -1), or plus.
    fn combine(&self, other: &Counts, sign: i64) -> Counts {
        let f = |a: u64, b: u64| a.saturating_add_signed(sign * b as i64);
        let n = self.served.len().max(other.served.len());
        let at = |c: &Counts, i: usize| c.served.get(i).copied().unwrap_or(0);
        Counts {
            started: f(self.started, other.started),
            served: (0..n).map(|i| f(at(self, i), at(other, i))).collect(),
            refused: f(self.refused, other.refused),
            timed_out: f(self.timed_out, other.timed_out),
            other: f(self.other, other.other),
        }
    }

    pub fn since(&self, before: &Counts) -> Counts {
        self.combine(before, -1)
    }

    pub fn add(&mut self, other: &Counts) {
        *self = self.combine(other, 1);
    }

    pub fn failed(&self) -> u64 {
        self.refused + self.timed_out + self.other
    }

    pub fn served_total(&self) -> u64 {
        self.served.iter().sum()
    }
}

impl Tally {
    pub fn new(backends: usize) -> Self {
        let served = vec![0; backends];
        Self(Mutex::new((
            Counts {
                served,
                ..Counts::default()
            },
            Vec::new(),
        )))
    }

    fn with<T>(&self, f: impl FnOnce(&mut (Counts, Vec<Instant>)) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn counts(&self) -> Counts {
        self.with(|(counts, _)| counts.clone())
    }

    /// When every failed connection ended, in order.
    pub fn failures(&self) -> Vec<Instant> {
        let mut times = self.with(|(_, failures)| failures.clone());
        times.sort_unstable();
        times
    }

    fn fail(&self, counter: impl FnOnce(&mut Counts) -> &mut u64) {
        self.with(|(counts, failures)| {
            *counter(counts) += 1;
            failures.push(Instant::now());
        });
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
) -> anyhow::Result<()> {
    client.enter()?;
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
        tally.with(|(counts, _)| counts.started += 1);
        shop(vip, names, tally);
    }
    Ok(())
}

/// One connection: connect, ask, read the answer, close with a RST (`SO_LINGER` 0: no TIME_WAIT on
/// either side however many connections the act opens), count the outcome.
fn shop(vip: SocketAddrV4, names: &[String], tally: &Tally) {
    let stream = match TcpStream::connect_timeout(&vip.into(), CONNECT_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) => {
            tally.fail(|c| match e.kind() {
                io::ErrorKind::ConnectionRefused => &mut c.refused,
                io::ErrorKind::TimedOut => &mut c.timed_out,
                _ => &mut c.other,
            });
            return;
        }
    };
    let mut answer = String::new();
    let read = stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .and_then(|()| (&stream).write_all(b"GET / HTTP/1.0\r\n\r\n"))
        .and_then(|()| (&stream).take(MAX_ANSWER).read_to_string(&mut answer));
    reset_on_close(&stream);
    drop(stream);
    let backend = served_by(&answer).and_then(|name| names.iter().position(|n| n == name));
    match (read, backend) {
        (Ok(_), Some(i)) => tally.with(|(counts, _)| counts.served[i] += 1),
        _ => tally.fail(|c| &mut c.other),
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
