//! Backends for end-to-end tests, the ways to break them, and timed client connects toward
//! them: a TCP server that counts what it accepts (echo, or an HTTP health answer), a UDP
//! echo server, a policy-routing blackhole that makes a backend hang, and `connect()`s timed
//! one by one. Short timed exchanges, either end closing first, are in
//! [`crate::traffic::exchange`].
//! Servers bind inside a namespace and serve from a thread of this process (a socket
//! stays in the namespace it was created in).

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::netns::Netns;

/// How long a server thread waits on its socket before it looks at its stop flag again.
pub(crate) const ACCEPT_IDLE: Duration = Duration::from_millis(1);
pub(crate) const READ_IDLE: Duration = Duration::from_millis(50);
const UDP_IDLE: Duration = Duration::from_millis(20);

/// A server's thread and the flag that stops it; stopped and joined on drop.
pub(crate) struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `body` on a new thread; it must return soon after its flag is set.
    pub(crate) fn spawn(body: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        Worker {
            stop,
            thread: Some(std::thread::spawn(move || body(flag))),
        }
    }

    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP server that counts accepted connections and keeps each open: a connection whose
/// first four bytes are `GET ` gets an HTTP answer (200 or 503 per [`TcpServer::set_healthy`])
/// and is closed, any other is echoed until the peer closes. Stopping or dropping it closes
/// the listener: the port refuses (RST, ECONNREFUSED) from then on.
pub struct TcpServer {
    accepted: Arc<AtomicU64>,
    peers: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    healthy: Arc<AtomicBool>,
    worker: Worker,
}

impl TcpServer {
    /// Binds `addr` in `ns` and serves until stopped.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<TcpServer> {
        TcpServer::serve(ns, addr, None)
    }

    /// Like [`TcpServer::start`], and every HTTP answer names the server: a header
    /// `X-Served-By: NAME` ([`served_by`]), so clients that only see a VIP can count who
    /// served them.
    pub fn start_named(ns: &Netns, addr: SocketAddr, name: &str) -> Result<TcpServer> {
        TcpServer::serve(ns, addr, Some(name.into()))
    }

    fn serve(ns: &Netns, addr: SocketAddr, name: Option<Arc<str>>) -> Result<TcpServer> {
        let listener = ns
            .run(move || TcpListener::bind(addr))?
            .with_context(|| format!("binding the TCP backend {addr}"))?;
        listener.set_nonblocking(true)?;
        let accepted = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let healthy = Arc::new(AtomicBool::new(true));
        let (count, health, seen) = (accepted.clone(), healthy.clone(), peers.clone());
        let worker = Worker::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                        count.fetch_add(1, Ordering::SeqCst);
                        let (stop, health, name) = (stop.clone(), health.clone(), name.clone());
                        std::thread::spawn(move || serve(conn, &stop, &health, name.as_deref()));
                    }
                    Err(_) => std::thread::sleep(ACCEPT_IDLE),
                }
            }
        });
        Ok(TcpServer {
            accepted,
            peers,
            healthy,
            worker,
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The client address and port of every connection accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What `GET` answers from now on: 200, or 503.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Closes the listener; open connections end at their next read timeout.
    pub fn stop(&mut self) {
        self.worker.stop();
    }
}

/// The header of [`TcpServer::start_named`]'s answers.
pub const SERVED_BY: &str = "X-Served-By: ";

/// The server named in an HTTP answer of [`TcpServer::start_named`], if any.
pub fn served_by(answer: &str) -> Option<&str> {
    answer
        .lines()
        .find_map(|line| line.strip_prefix(SERVED_BY))
        .map(str::trim)
}

/// One accepted connection of [`TcpServer`].
fn serve(mut conn: TcpStream, stop: &AtomicBool, healthy: &AtomicBool, name: Option<&str>) {
    // Blocking reads with a timeout, so the thread notices `stop`.
    if conn.set_nonblocking(false).is_err() || conn.set_read_timeout(Some(READ_IDLE)).is_err() {
        return;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
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
        if head.len() < 4 {
            head.extend_from_slice(&buf[..n]);
            if head.len() < 4 {
                continue;
            }
            if head.starts_with(b"GET ") {
                // An HTTP request: answer once the headers are in, then close.
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let status = if healthy.load(Ordering::SeqCst) {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let name = name.map_or_else(String::new, |n| format!("{SERVED_BY}{n}\r\n"));
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n{name}\r\n"
                );
                return;
            }
            if conn.write_all(&head).is_err() {
                return;
            }
            continue;
        }
        if conn.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// A UDP echo server counting the datagrams it received, until dropped.
pub struct UdpEcho {
    received: Arc<AtomicU64>,
    _worker: Worker,
}

impl UdpEcho {
    /// Binds `addr` in `ns` and echoes until dropped.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<UdpEcho> {
        let sock = ns
            .run(move || UdpSocket::bind(addr))?
            .with_context(|| format!("binding the UDP backend {addr}"))?;
        sock.set_read_timeout(Some(UDP_IDLE))?;
        let received = Arc::new(AtomicU64::new(0));
        let count = received.clone();
        let worker = Worker::spawn(move |stop| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpEcho {
            received,
            _worker: worker,
        })
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

/// A backend that hangs while this lives: in its namespace, everything sent *from* its
/// address is routed into a blackhole (`ip -4|-6 rule add from ADDR blackhole`), so its
/// SYN-ACKs and probe answers go nowhere. Removed on drop (the namespace may go anyway; this
/// keeps a failing test's later steps honest).
pub struct Blackhole {
    ns: Netns,
    addr: IpAddr,
    active: bool,
}

impl Blackhole {
    pub fn add(ns: &Netns, addr: IpAddr) -> Result<Blackhole> {
        let mut hole = Blackhole {
            ns: ns.handle(),
            addr,
            active: false,
        };
        hole.rule("add")?;
        hole.active = true;
        Ok(hole)
    }

    /// Restores the backend: its answers are routed again.
    pub fn remove(&mut self) -> Result<()> {
        if std::mem::take(&mut self.active) {
            self.rule("del")?;
        }
        Ok(())
    }

    fn rule(&self, action: &str) -> Result<String> {
        let family = if self.addr.is_ipv4() { "-4" } else { "-6" };
        let addr = self.addr.to_string();
        self.ns
            .ip(&[family, "rule", action, "from", &addr, "blackhole"])
    }

    /// The command line [`Blackhole::add`] (`add`) or [`Blackhole::remove`] (`del`) runs,
    /// for a reader to see what was done.
    pub fn command(&self, action: &str) -> String {
        let family = if self.addr.is_ipv4() { "-4" } else { "-6" };
        format!(
            "ip -n {} {family} rule {action} from {} blackhole",
            self.ns.name(),
            self.addr
        )
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// One client `connect()`: how it ended and how long it took. A connected stream is kept
/// (the flow stays established until the attempt is dropped).
#[derive(Debug)]
pub struct Attempt {
    pub result: Result<TcpStream, ErrorKind>,
    pub took: Duration,
}

impl Attempt {
    pub fn kind(&self) -> Result<(), ErrorKind> {
        self.result.as_ref().map(|_| ()).map_err(|k| *k)
    }
}

/// `n` sequential `connect_timeout(addr, timeout)` from `ns`; each is timed around the call
/// alone.
pub fn connect_many(
    ns: &Netns,
    addr: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Attempt>> {
    ns.run(move || {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                let result = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.kind());
                Attempt {
                    result,
                    took: t.elapsed(),
                }
            })
            .collect()
    })
}

/// `n` extra IPv4 server addresses on `topo`, each with a [`TcpServer`] on `port`: the
/// backends of the balancing labs.
pub fn tcp_backends(
    topo: &mut crate::netns::Topology,
    n: usize,
    port: u16,
) -> Result<(Vec<SocketAddr>, Vec<TcpServer>)> {
    let addrs: Vec<SocketAddr> = topo
        .add_server_v4(n)?
        .into_iter()
        .map(|a| SocketAddr::new(a.into(), port))
        .collect();
    let servers = addrs
        .iter()
        .map(|b| TcpServer::start(&topo.server, *b))
        .collect::<Result<Vec<_>>>()?;
    Ok((addrs, servers))
}
