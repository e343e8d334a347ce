//! Short TCP exchanges, as a request/response client makes them: connect, send
//! [`EXCHANGE_BYTES`], read as many back, close. A backend that answers them ([`ExchangeServer`]),
//! and clients that make them one after another ([`sequential`], each timed), from several
//! threads for a fixed time ([`for_duration`], connections per second), or in the background
//! until stopped ([`Background`], traffic beside a measured client).
//!
//! Which end closes first, and so holds the connection's TIME_WAIT, is chosen per server and
//! client ([`Closes`]): the client by default (as request/response clients do; the server
//! closes on its FIN), or the server right after its answer (as an HTTP/1.0 server does; the
//! client waits for its FIN). Every exchange is timed from before `connect()` to after
//! `close()`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::backend::{ACCEPT_IDLE, READ_IDLE, Worker};
use crate::netns::Netns;

/// Bytes each way of one exchange (issue 14's 64).
pub const EXCHANGE_BYTES: usize = 64;

/// Which end of an exchange closes first, and so holds the connection's TIME_WAIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closes {
    /// The client, after the answer; the server closes on the client's FIN.
    Client,
    /// The server, right after its answer; the client waits for the server's FIN.
    Server,
}

/// How long a server waits on a connected client's request or close before giving up on it.
const SERVER_IDLE: Duration = Duration::from_secs(5);

/// A TCP backend for exchanges: `threads` threads accept on one listener, each serving one
/// connection at a time: read [`EXCHANGE_BYTES`], write them back, then close or wait for the
/// client's close ([`Closes`]). Blocking `accept()`s: the kernel wakes one waiting thread per
/// connection (a `poll()` would wake them all, and charge every connection for it). Records
/// every client port it accepted. Stopped on drop.
pub struct ExchangeServer {
    accepted: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    ports: Arc<Mutex<Vec<u16>>>,
    listener: TcpListener,
    workers: Vec<Worker>,
}

impl ExchangeServer {
    /// Binds `addr` in `ns` and serves with `threads` threads until dropped. `threads` bounds
    /// the connections served at once: give it more than the clients that connect at once.
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        threads: usize,
        closes: Closes,
    ) -> Result<ExchangeServer> {
        let listener = ns
            .run(move || TcpListener::bind(addr))?
            .with_context(|| format!("binding the exchange backend {addr}"))?;
        let accepted = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let ports = Arc::new(Mutex::new(Vec::new()));
        let mut workers = Vec::with_capacity(threads);
        for _ in 0..threads.max(1) {
            let listener = listener.try_clone().context("cloning the listener")?;
            let (accepted, answered, ports) = (accepted.clone(), answered.clone(), ports.clone());
            workers.push(Worker::spawn(move |stop| {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, peer)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            ports
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(peer.port());
                            if answer(conn, &stop, closes) {
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Shut down (EINVAL from then on) or a passing error: look at the
                        // stop flag again, without spinning.
                        Err(_) => std::thread::sleep(ACCEPT_IDLE),
                    }
                }
            }));
        }
        Ok(ExchangeServer {
            accepted,
            answered,
            ports,
            listener,
            workers,
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// The client port of every connection accepted so far, in order.
    pub fn ports(&self) -> Vec<u16> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for ExchangeServer {
    fn drop(&mut self) {
        // Wakes every thread blocked in accept() (they see EINVAL), then stops them.
        // SAFETY: shutdown(2) on a descriptor this server owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        self.workers.clear();
    }
}

/// Serves one exchange; whether the request was answered.
fn answer(mut conn: TcpStream, stop: &AtomicBool, closes: Closes) -> bool {
    if conn.set_nonblocking(false).is_err()
        || conn.set_nodelay(true).is_err()
        || conn.set_read_timeout(Some(READ_IDLE)).is_err()
    {
        return false;
    }
    let since = Instant::now();
    let mut buf = [0u8; EXCHANGE_BYTES];
    let mut got = 0;
    // Reads until the request is in, then until the client's close (EOF), each wait bounded
    // by the stop flag and SERVER_IDLE.
    let mut answered = false;
    loop {
        if stop.load(Ordering::Relaxed) || since.elapsed() > SERVER_IDLE {
            return answered;
        }
        let into = if answered {
            &mut buf[..]
        } else {
            &mut buf[got..]
        };
        match conn.read(into) {
            Ok(0) => return answered,
            Ok(n) if !answered => {
                got += n;
                if got == EXCHANGE_BYTES {
                    if conn.write_all(&buf).is_err() {
                        return false;
                    }
                    if closes == Closes::Server {
                        // Dropped: this end closes first.
                        return true;
                    }
                    answered = true;
                }
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return answered,
        }
    }
}

/// How an exchange failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `connect()` refused (a RST to the SYN): ECONNREFUSED.
    Refused,
    /// The connection was reset after it was established.
    Reset,
    /// The peer closed before the whole answer came.
    Closed,
    /// Nothing, or not all of it, within the timeout.
    TimedOut,
    /// The answer differs from the request, or more came after it.
    Garbled,
    /// Any other error, by kind.
    Other(ErrorKind),
}

impl Failure {
    fn of(e: &std::io::Error) -> Failure {
        match e.kind() {
            ErrorKind::ConnectionRefused => Failure::Refused,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                Failure::Reset
            }
            ErrorKind::UnexpectedEof => Failure::Closed,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::TimedOut,
            k => Failure::Other(k),
        }
    }

    /// Whether the client learned of the failure from an answer (refused, reset, closed),
    /// not from its own timeout.
    pub fn answered(self) -> bool {
        !matches!(self, Failure::TimedOut)
    }
}

/// One exchange's outcome and duration.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub took: Duration,
    pub result: Result<(), Failure>,
}

/// One exchange with `dst` from the calling thread's namespace, the client closing first;
/// `timeout` bounds the connect and each read and write.
pub fn exchange(dst: SocketAddr, timeout: Duration) -> Outcome {
    exchange_closed_by(dst, timeout, Closes::Client)
}

/// [`exchange`] with a server that closes as `closes` says: with [`Closes::Server`] the client
/// waits for the server's close before its own, so the TIME_WAIT stays with the server.
pub fn exchange_closed_by(dst: SocketAddr, timeout: Duration, closes: Closes) -> Outcome {
    let start = Instant::now();
    let result = try_exchange(dst, timeout, closes);
    Outcome {
        took: start.elapsed(),
        result,
    }
}

fn try_exchange(dst: SocketAddr, timeout: Duration, closes: Closes) -> Result<(), Failure> {
    let f = |e: std::io::Error| Failure::of(&e);
    let mut s = TcpStream::connect_timeout(&dst, timeout).map_err(f)?;
    s.set_nodelay(true).map_err(f)?;
    s.set_read_timeout(Some(timeout)).map_err(f)?;
    s.set_write_timeout(Some(timeout)).map_err(f)?;
    let request: [u8; EXCHANGE_BYTES] = std::array::from_fn(|i| i as u8);
    s.write_all(&request).map_err(f)?;
    let mut answer = [0u8; EXCHANGE_BYTES];
    s.read_exact(&mut answer).map_err(f)?;
    if answer != request {
        return Err(Failure::Garbled);
    }
    if closes == Closes::Server {
        let mut rest = [0u8; 1];
        if s.read(&mut rest).map_err(f)? != 0 {
            return Err(Failure::Garbled);
        }
    }
    Ok(())
}

/// Exchanges of one or more clients: the times of those that succeeded, and the failures.
#[derive(Clone, Debug, Default)]
pub struct Exchanges {
    pub times: Vec<Duration>,
    pub failures: Vec<Outcome>,
}

impl Exchanges {
    fn push(&mut self, o: Outcome) {
        match o.result {
            Ok(()) => self.times.push(o.took),
            Err(_) => self.failures.push(o),
        }
    }

    fn merge(&mut self, other: Exchanges) {
        self.times.extend(other.times);
        self.failures.extend(other.failures);
    }

    /// Exchanges made, successful or not.
    pub fn total(&self) -> usize {
        self.times.len() + self.failures.len()
    }

    /// The first failures, in words (at most `n`).
    pub fn describe_failures(&self, n: usize) -> String {
        self.failures
            .iter()
            .take(n)
            .filter_map(|o| {
                let f = o.result.err()?;
                Some(format!("{f:?} after {:.1} ms", o.took.as_secs_f64() * 1e3))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `n` exchanges one after another from `ns`, the i-th to `dsts[i % len]`.
pub fn sequential(
    ns: &Netns,
    dsts: &[SocketAddr],
    n: usize,
    timeout: Duration,
) -> Result<Exchanges> {
    if dsts.is_empty() {
        bail!("no destination to exchange with");
    }
    let dsts = dsts.to_vec();
    ns.run(move || {
        let mut out = Exchanges::default();
        for i in 0..n {
            out.push(exchange(dsts[i % dsts.len()], timeout));
        }
        out
    })
}

/// `threads` clients in `ns`, each making exchanges one after another (to `dsts` in turn)
/// until `duration` has passed since the call; every exchange of every client.
pub fn for_duration(
    ns: &Netns,
    dsts: &[SocketAddr],
    threads: usize,
    duration: Duration,
    timeout: Duration,
) -> Result<Exchanges> {
    if dsts.is_empty() {
        bail!("no destination to exchange with");
    }
    let end = Instant::now() + duration;
    let clients = (0..threads.max(1))
        .map(|t| {
            let dsts = dsts.to_vec();
            ns.spawn(move || {
                let mut out = Exchanges::default();
                let mut i = t;
                while Instant::now() < end {
                    out.push(exchange(dsts[i % dsts.len()], timeout));
                    i += 1;
                }
                out
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut all = Exchanges::default();
    for c in clients {
        match c.join() {
            Ok(e) => all.merge(e),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
    Ok(all)
}

/// A client making exchanges one after another (to its destinations in turn) until
/// [`Background::finish`].
pub struct Background {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicU64>,
    thread: Option<JoinHandle<Exchanges>>,
}

impl Background {
    pub fn start(ns: &Netns, dsts: &[SocketAddr], timeout: Duration) -> Result<Background> {
        if dsts.is_empty() {
            bail!("no destination to exchange with");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicU64::new(0));
        let (flag, count, dsts) = (stop.clone(), made.clone(), dsts.to_vec());
        let thread = ns.spawn(move || {
            let mut out = Exchanges::default();
            let mut i = 0;
            while !flag.load(Ordering::Relaxed) {
                out.push(exchange(dsts[i % dsts.len()], timeout));
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            out
        })?;
        Ok(Background {
            stop,
            made,
            thread: Some(thread),
        })
    }

    /// Exchanges finished so far, successful or not.
    pub fn made(&self) -> usize {
        self.made.load(Ordering::Relaxed) as usize
    }

    /// Stops the client after its current exchange; what it made.
    pub fn finish(mut self) -> Exchanges {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(e)) => e,
            Some(Err(p)) => std::panic::resume_unwind(p),
            None => Exchanges::default(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
