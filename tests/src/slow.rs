//! An HTTP backend whose answers can be changed while it runs: how long it waits before it
//! answers, which status it answers, or that it refuses (listener closed). Every answer
//! names the server (`X-Served-By: NAME` and a body `served by NAME`), so a client that only
//! sees a VIP knows who served it: a service's own backends, or its fallback.
//!
//! A connection whose first bytes are not `GET ` is echoed until the peer closes, without
//! delay: an established flow through the VIP shows where it is pinned.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::backend::SERVED_BY;
use crate::netns::Netns;

/// How long the accept loop waits before it looks at its stop flag again.
const ACCEPT_IDLE: Duration = Duration::from_millis(1);
/// Read timeout of a connection's thread, so it notices the stop flag.
const READ_IDLE: Duration = Duration::from_millis(50);
/// A delayed answer sleeps in steps this long, so stopping the server is not held up.
const DELAY_STEP: Duration = Duration::from_millis(10);

/// What the server answers, shared with its threads.
#[derive(Debug, Default)]
struct Behaviour {
    /// Milliseconds to wait between the end of a request's headers and the answer.
    delay_ms: AtomicU64,
    /// When non-zero: requests alternate between `delay_ms` (even) and this (odd).
    alternate_ms: AtomicU64,
    /// The HTTP status of the answers.
    status: AtomicU16,
    /// HTTP requests answered so far (the alternation counts these).
    requests: AtomicU64,
}

impl Behaviour {
    /// The delay of the next request.
    fn next_delay(&self) -> Duration {
        let n = self.requests.fetch_add(1, Ordering::SeqCst);
        let alt = self.alternate_ms.load(Ordering::SeqCst);
        let ms = if alt != 0 && n % 2 == 1 {
            alt
        } else {
            self.delay_ms.load(Ordering::SeqCst)
        };
        Duration::from_millis(ms)
    }
}

/// The accept loop of one bind; stopped (listener closed) and joined on drop.
struct Listening {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listening {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP backend in a namespace whose delay and status are switched at run time.
pub struct HttpBackend {
    ns: Netns,
    addr: SocketAddr,
    name: Arc<str>,
    behaviour: Arc<Behaviour>,
    accepted: Arc<AtomicU64>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    listening: Option<Listening>,
}

impl HttpBackend {
    /// Binds `addr` in `ns`; answers 200 at once until told otherwise.
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> Result<HttpBackend> {
        let mut b = HttpBackend {
            ns: ns.handle(),
            addr,
            name: name.into(),
            behaviour: Arc::new(Behaviour {
                status: AtomicU16::new(200),
                ..Behaviour::default()
            }),
            accepted: Arc::new(AtomicU64::new(0)),
            peers: Arc::new(Mutex::new(Vec::new())),
            listening: None,
        };
        b.listen()?;
        Ok(b)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every answer from now on waits `delay` after the request (constant: any alternation
    /// ends).
    pub fn set_delay(&self, delay: Duration) {
        self.behaviour.alternate_ms.store(0, Ordering::SeqCst);
        self.behaviour
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// From now on requests alternate: one waits `a`, the next `b`, and so on.
    pub fn set_alternating(&self, a: Duration, b: Duration) {
        self.behaviour
            .delay_ms
            .store(a.as_millis() as u64, Ordering::SeqCst);
        self.behaviour
            .alternate_ms
            .store(b.as_millis().max(1) as u64, Ordering::SeqCst);
    }

    /// The status of the answers from now on (200, 500, ...).
    pub fn set_status(&self, status: u16) {
        self.behaviour.status.store(status, Ordering::SeqCst);
    }

    /// HTTP requests answered (or being answered) so far.
    pub fn requests(&self) -> u64 {
        self.behaviour.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The client address of every connection accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Closes the listener: the port refuses (RST) until [`HttpBackend::restart`].
    /// Connections already open end at their next read timeout.
    pub fn stop(&mut self) {
        if let Some(mut l) = self.listening.take() {
            l.stop();
        }
    }

    /// Binds the address again after [`HttpBackend::stop`].
    pub fn restart(&mut self) -> Result<()> {
        if self.listening.is_some() {
            bail!("{} ({}) is already listening", self.name, self.addr);
        }
        self.listen()
    }

    fn listen(&mut self) -> Result<()> {
        let addr = self.addr;
        // std sets SO_REUSEADDR on Unix: a restart binds while old connections linger.
        let listener = self
            .ns
            .run(move || TcpListener::bind(addr))?
            .with_context(|| format!("binding the HTTP backend {addr}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, behaviour, name, count, seen) = (
            stop.clone(),
            self.behaviour.clone(),
            self.name.clone(),
            self.accepted.clone(),
            self.peers.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                        count.fetch_add(1, Ordering::SeqCst);
                        let (flag, behaviour, name) =
                            (flag.clone(), behaviour.clone(), name.clone());
                        std::thread::spawn(move || serve(conn, &flag, &behaviour, &name));
                    }
                    Err(_) => std::thread::sleep(ACCEPT_IDLE),
                }
            }
        });
        self.listening = Some(Listening {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }
}

/// The body of every answer of server `name`.
pub fn body_of(name: &str) -> String {
    format!("served by {name}\n")
}

/// One connection: an HTTP GET answered after the delay (then closed), anything else echoed.
fn serve(mut conn: TcpStream, stop: &AtomicBool, behaviour: &Behaviour, name: &str) {
    if conn.set_nonblocking(false).is_err() || conn.set_read_timeout(Some(READ_IDLE)).is_err() {
        return;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let mut http = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let n = match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        };
        match http {
            Some(false) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
                continue;
            }
            Some(true) => head.extend_from_slice(&buf[..n]),
            None => {
                head.extend_from_slice(&buf[..n]);
                if head.len() < 4 {
                    continue;
                }
                let is_get = head.starts_with(b"GET ");
                http = Some(is_get);
                if !is_get {
                    if conn.write_all(&head).is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        if !head.windows(4).any(|w| w == b"\r\n\r\n") {
            continue;
        }
        let delay = behaviour.next_delay();
        let mut waited = Duration::ZERO;
        while waited < delay {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let step = DELAY_STEP.min(delay - waited);
            std::thread::sleep(step);
            waited += step;
        }
        let status = behaviour.status.load(Ordering::SeqCst);
        let reason = match status {
            200 => "OK",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Status",
        };
        let body = body_of(name);
        let _ = write!(
            conn,
            "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\
             {SERVED_BY}{name}\r\n\r\n{body}",
            body.len()
        );
        return;
    }
}
