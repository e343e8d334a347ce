//! Circuit breakers enforced in the kernel (issue 3), end to end.
//!
//! The agent runs in the client namespace, attached to the client veth with `direction: both`
//! and generic XDP: TC egress sees the client's SYNs and datagrams toward a backend, XDP
//! ingress the backend's answers. Each backend is a real server in the server namespace on an
//! address of its own, so it can be broken alone: it *hangs* under a policy-routing blackhole
//! on its address (`ip rule add from ADDR blackhole`: its answers go nowhere) and *refuses*
//! once its listener is closed. Clients are plain std sockets in the client namespace.
//!
//! Every deadline is computed from the policy's numbers (see [`Check`] and [`Breaker`]) plus
//! [`SLACK`]; every wait polls a condition, and the figures measured are printed.
//!
//! Root only; run serially: `cargo test -p agent-tests --test breaker -- --test-threads=1`.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_tests::{
    agent::{AgentProcess, TempDir, agent_bin, metric, parse_metrics},
    netns::{Netns, Topology},
};

/// Scrape and scheduling slack on a loaded 2-core machine (as in health.rs).
const SLACK: Duration = Duration::from_millis(100);
/// The agent feeds the datapath's passive results to the breakers this often.
const PASSIVE_PERIOD: Duration = Duration::from_millis(100);
/// A refused connect must fail within this: the datapath answers the SYN itself.
const FAST_FAIL: Duration = Duration::from_millis(10);
/// Set-up waits that are not under test (first probe after start, agent bookkeeping).
const SETUP: Duration = Duration::from_secs(5);
/// Connect timeout of clients that expect an answer (a refusal or a handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// An address no packet is sent to: the services' `match`, so enforcement is shown to follow
/// the backend's address, not the service's match.
const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const BACKEND_PORT: u16 = 8080;

// ---------------------------------------------------------------------------------------
// The policy, as numbers the deadlines are computed from.

#[derive(Clone, Copy, Debug)]
struct Check {
    /// `tcp` | `http`
    kind: &'static str,
    /// `http` only.
    path: &'static str,
    interval: Duration,
    unhealthy_interval: Duration,
    timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    passive: bool,
}

impl Check {
    /// Active TCP probes every 200 ms, 100 ms timeout, fall after 3.
    fn fast_tcp() -> Check {
        Check {
            kind: "tcp",
            path: "/",
            interval: ms(200),
            unhealthy_interval: ms(200),
            timeout: ms(100),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            passive: true,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Breaker {
    failure_threshold: u32,
    reset_timeout: Duration,
    max_reset_timeout: Duration,
    half_open_max_flows: u32,
    success_threshold: u32,
    /// `reject` | `drop`
    on_open: &'static str,
    close_existing: bool,
}

impl Breaker {
    /// Opens on 3 consecutive failures (the checks' fall), stays open 2 s.
    fn default_for(check: &Check) -> Breaker {
        Breaker {
            failure_threshold: check.unhealthy_threshold,
            reset_timeout: Duration::from_secs(2),
            max_reset_timeout: Duration::from_secs(4),
            half_open_max_flows: 3,
            success_threshold: 2,
            on_open: "reject",
            close_existing: false,
        }
    }
}

#[derive(Clone, Debug)]
struct Service {
    name: &'static str,
    match_address: IpAddr,
    match_port: u16,
    /// `tcp` | `udp` | `any`
    protocol: &'static str,
    backend: SocketAddr,
    check: Check,
    breaker: Breaker,
}

impl Service {
    /// The service's `match` (a VIP no packet goes to) and its one backend.
    fn new(name: &'static str, backend: SocketAddr, check: Check, breaker: Breaker) -> Service {
        Service {
            name,
            match_address: match backend.ip() {
                IpAddr::V4(_) => VIP_V4.into(),
                IpAddr::V6(_) => VIP_V6.into(),
            },
            match_port: backend.port(),
            protocol: "tcp",
            backend,
            check,
            breaker,
        }
    }

    /// From the first failing probe's start (at most one healthy interval after the backend
    /// broke) to the breaker open: `failure_threshold` probes an interval apart, the last one
    /// failing after at most `timeout`.
    fn open_bound(&self) -> Duration {
        self.check.interval * self.breaker.failure_threshold + self.check.timeout + SLACK
    }

    /// From a backend restored while its breaker is open to the breaker closed: the rest of
    /// the open period, then `success_threshold` probes at the unhealthy interval.
    fn close_bound(&self) -> Duration {
        self.breaker.reset_timeout
            + self.check.unhealthy_interval * self.breaker.success_threshold
            + self.check.timeout
            + SLACK
    }

    fn backend_label(&self) -> String {
        self.backend.to_string()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn dur(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The policy: the agent on the client veth, both directions, generic XDP.
fn policy(ifname: &str, services: &[Service]) -> String {
    let mut y = format!(
        "version: 1\n\
         agent:\n  listen: 127.0.0.1:9090\n\
         interfaces:\n  - name: {ifname}\n    xdp_mode: generic\n    direction: both\n\
         services:\n"
    );
    for s in services {
        let prefix = if s.match_address.is_ipv4() { 32 } else { 128 };
        let c = &s.check;
        let b = &s.breaker;
        y += &format!(
            "  - name: {name}\n\
             \x20   match:\n\
             \x20     address: \"{addr}/{prefix}\"\n\
             \x20     port: {port}\n\
             \x20     protocol: {proto}\n\
             \x20   backends:\n\
             \x20     - address: \"{backend}\"\n\
             \x20   health_check:\n\
             \x20     type: {kind}\n",
            name = s.name,
            addr = s.match_address,
            port = s.match_port,
            proto = s.protocol,
            backend = s.backend,
            kind = c.kind,
        );
        if c.kind == "http" {
            y += &format!("      path: {}\n", c.path);
        }
        y += &format!(
            "      interval: {}\n      unhealthy_interval: {}\n      timeout: {}\n\
             \x20     healthy_threshold: {}\n      unhealthy_threshold: {}\n      jitter: 0%\n\
             \x20     passive: {}\n\
             \x20   circuit_breaker:\n      failure_threshold: {}\n      reset_timeout: {}\n\
             \x20     max_reset_timeout: {}\n      half_open_max_flows: {}\n\
             \x20     success_threshold: {}\n      on_open: {}\n      close_existing: {}\n",
            dur(c.interval),
            dur(c.unhealthy_interval),
            dur(c.timeout),
            c.healthy_threshold,
            c.unhealthy_threshold,
            c.passive,
            b.failure_threshold,
            dur(b.reset_timeout),
            dur(b.max_reset_timeout),
            b.half_open_max_flows,
            b.success_threshold,
            b.on_open,
            b.close_existing,
        );
    }
    y
}

/// Writes the policy and starts the agent in the client namespace.
fn start_agent(topo: &Topology, dir: &TempDir, services: &[Service]) -> AgentProcess {
    agent_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let text = policy(&topo.client_if, services);
    let config = dir.write("breaker.yaml", &text).expect("policy file");
    AgentProcess::start(&topo.client, &config)
        .unwrap_or_else(|e| panic!("starting the agent with\n{text}\n{e:#}"))
}

// ---------------------------------------------------------------------------------------
// What the agent exports about one backend.

/// One scrape of `/metrics`, read for one service's backend.
struct Scrape {
    text: String,
    service: String,
    backend: String,
}

impl Scrape {
    fn take(agent: &AgentProcess, s: &Service) -> Scrape {
        let text = agent
            .metrics()
            .unwrap_or_else(|e| panic!("GET /metrics: {e:#}"));
        Scrape {
            text,
            service: s.name.to_owned(),
            backend: s.backend_label(),
        }
    }

    fn labelled(&self, name: &str, key: &str, value: &str) -> Option<f64> {
        metric(
            &self.text,
            name,
            &[
                ("service", &self.service),
                ("backend", &self.backend),
                (key, value),
            ],
        )
    }

    /// A sample that must be exported; the panic lists what is exported under that name.
    fn required(&self, name: &str, key: &str, value: &str) -> u64 {
        match self.labelled(name, key, value) {
            Some(v) => v as u64,
            None => {
                let have: Vec<String> = parse_metrics(&self.text)
                    .into_iter()
                    .filter(|s| s.name == name)
                    .map(|s| format!("{:?} = {}", s.labels, s.value))
                    .collect();
                panic!(
                    "{name}{{service={:?},backend={:?},{key}={value:?}}} is not exported; \
                     samples under that name: {have:?}",
                    self.service, self.backend
                )
            }
        }
    }

    /// `agent_backend_datapath_packets_total{action}`.
    fn action(&self, action: &str) -> u64 {
        self.required("agent_backend_datapath_packets_total", "action", action)
    }

    /// Like [`Scrape::action`], 0 when not exported (yet): for the "before" side of a delta.
    fn action_or_zero(&self, action: &str) -> u64 {
        self.labelled("agent_backend_datapath_packets_total", "action", action)
            .unwrap_or(0.0) as u64
    }

    /// `agent_backend_passive_total{result}`.
    fn passive(&self, result: &str) -> u64 {
        self.required("agent_backend_passive_total", "result", result)
    }

    fn passive_or_zero(&self, result: &str) -> u64 {
        self.labelled("agent_backend_passive_total", "result", result)
            .unwrap_or(0.0) as u64
    }

    /// The breaker state whose `agent_breaker_state` sample is 1.
    fn state(&self) -> Option<String> {
        ["closed", "open", "half_open"]
            .into_iter()
            .find(|s| self.labelled("agent_breaker_state", "state", s) == Some(1.0))
            .map(str::to_owned)
    }

    /// Active probes by outcome: (successes, failures of any reason).
    fn probes(&self) -> (u64, u64) {
        let mut ok = 0;
        let mut failed = 0;
        for s in parse_metrics(&self.text) {
            if s.name != "agent_probes_total" {
                continue;
            }
            let get = |k: &str| s.labels.iter().find(|(sk, _)| sk == k).map(|(_, v)| v);
            if get("service") != Some(&self.service) || get("backend") != Some(&self.backend) {
                continue;
            }
            match get("result").map(String::as_str) {
                Some("success") => ok += s.value as u64,
                _ => failed += s.value as u64,
            }
        }
        (ok, failed)
    }
}

/// Polls `/metrics` until `cond` holds on a scrape; returns the time since `since` and that
/// scrape. Panics at `since + limit` with `what`, the bound, and the last scrape's state.
fn wait_for(
    agent: &AgentProcess,
    s: &Service,
    what: &str,
    since: Instant,
    limit: Duration,
    mut cond: impl FnMut(&Scrape) -> bool,
) -> (Duration, Scrape) {
    loop {
        let scrape = Scrape::take(agent, s);
        let took = since.elapsed();
        if cond(&scrape) {
            return (took, scrape);
        }
        assert!(
            took < limit,
            "{what}: not within {limit:?} (the bound the policy implies); last seen: breaker \
             {:?}, probes (ok, failed) {:?}",
            scrape.state(),
            scrape.probes()
        );
        std::thread::sleep(ms(10));
    }
}

/// Polls a condition outside the agent; returns how long it took, or panics at `limit`.
fn poll_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(ms(1));
    }
    start.elapsed()
}

fn wait_state(
    agent: &AgentProcess,
    s: &Service,
    state: &str,
    since: Instant,
    limit: Duration,
) -> (Duration, Scrape) {
    wait_for(
        agent,
        s,
        &format!("breaker of {} {state}", s.backend),
        since,
        limit,
        |sc| sc.state().as_deref() == Some(state),
    )
}

/// Closed, and at least one active probe came back successful.
fn wait_probed_closed(agent: &AgentProcess, s: &Service) {
    wait_for(
        agent,
        s,
        &format!("first successful probe of {}", s.backend),
        Instant::now(),
        SETUP,
        |sc| sc.probes().0 >= 1 && sc.state().as_deref() == Some("closed"),
    );
}

// ---------------------------------------------------------------------------------------
// Backends.

/// A TCP server that counts accepted connections and keeps each open: a connection whose
/// first four bytes are `GET ` gets an HTTP answer (200 or 503 per `healthy`) and is closed,
/// any other is echoed until the peer closes. Dropping it closes the listener (the port then
/// refuses).
struct TcpServer {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    fn start(ns: &Netns, addr: SocketAddr) -> TcpServer {
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .expect("entering the namespace")
            .unwrap_or_else(|e| panic!("binding backend {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let (flag, count, health) = (stop.clone(), accepted.clone(), healthy.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let (flag, health) = (flag.clone(), health.clone());
                        std::thread::spawn(move || serve(conn, &flag, &health));
                    }
                    Err(_) => std::thread::sleep(ms(1)),
                }
            }
        });
        TcpServer {
            stop,
            accepted,
            healthy,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// What `GET` answers from now on: 200, or 503.
    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One accepted connection of [`TcpServer`].
fn serve(mut conn: TcpStream, stop: &AtomicBool, healthy: &AtomicBool) {
    // Blocking reads with a timeout, so the thread notices `stop`.
    if conn.set_nonblocking(false).is_err() || conn.set_read_timeout(Some(ms(50))).is_err() {
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
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
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

/// A UDP echo server counting the datagrams it received.
struct UdpEcho {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    fn start(ns: &Netns, addr: SocketAddr) -> UdpEcho {
        let sock = ns
            .run(move || UdpSocket::bind(addr))
            .expect("entering the namespace")
            .unwrap_or_else(|e| panic!("binding UDP backend {addr}: {e}"));
        sock.set_read_timeout(Some(ms(20))).expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        UdpEcho {
            stop,
            received,
            thread: Some(thread),
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A backend that hangs: in the server namespace, everything sent *from* its address is
/// routed into a blackhole, so a SYN to it is never answered. Removed on drop (the namespace
/// goes anyway; this keeps a failing test's later steps honest).
struct Blackhole {
    ns: Netns,
    addr: IpAddr,
    active: bool,
}

impl Blackhole {
    fn add(ns: &Netns, addr: IpAddr) -> Blackhole {
        let mut b = Blackhole {
            ns: ns.handle(),
            addr,
            active: false,
        };
        b.rule("add").unwrap_or_else(|e| panic!("{e:#}"));
        b.active = true;
        b
    }

    /// `ip -4|-6 rule ACTION from ADDR blackhole` in the server namespace.
    fn rule(&self, action: &str) -> anyhow::Result<String> {
        let family = if self.addr.is_ipv4() { "-4" } else { "-6" };
        let addr = self.addr.to_string();
        self.ns
            .ip(&[family, "rule", action, "from", &addr, "blackhole"])
    }

    fn remove(&mut self) {
        if std::mem::take(&mut self.active) {
            self.rule("del").unwrap_or_else(|e| panic!("{e:#}"));
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if std::mem::take(&mut self.active) {
            let _ = self.rule("del");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clients.

/// One client `connect()`: how it ended and how long it took. A connected stream is kept
/// (the flow stays established until the attempt is dropped).
#[derive(Debug)]
struct Attempt {
    result: Result<TcpStream, ErrorKind>,
    took: Duration,
}

impl Attempt {
    fn kind(&self) -> Result<(), ErrorKind> {
        self.result.as_ref().map(|_| ()).map_err(|k| *k)
    }
}

/// `n` sequential `connect_timeout(addr, timeout)` from the client namespace; each is
/// timed around the call alone.
fn connect_many(ns: &Netns, addr: SocketAddr, n: usize, timeout: Duration) -> Vec<Attempt> {
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
    .expect("entering the client namespace")
}

/// min / median / max of the attempts' times.
fn spread(attempts: &[Attempt]) -> (Duration, Duration, Duration) {
    let mut t: Vec<Duration> = attempts.iter().map(|a| a.took).collect();
    t.sort();
    (t[0], t[t.len() / 2], t[t.len() - 1])
}

/// Connects that must all succeed (the path to a backend works).
fn assert_connects(ns: &Netns, addr: SocketAddr, n: usize, when: &str) {
    let attempts = connect_many(ns, addr, n, CONNECT_TIMEOUT);
    let bad: Vec<_> = attempts
        .iter()
        .enumerate()
        .filter(|(_, a)| a.result.is_err())
        .map(|(i, a)| (i, a.kind(), a.took))
        .collect();
    assert!(
        bad.is_empty(),
        "{when}: every connect to {addr} must succeed; failed (index, error, time): {bad:?}"
    );
}

// ---------------------------------------------------------------------------------------
// A hung backend: refused fast while open, back once restored.

fn hung_backend_is_refused_fast_and_comes_back(v6: bool) {
    let mut topo = Topology::new().expect("topology");
    let ip: IpAddr = if v6 {
        topo.add_server_v6(1).expect("server address")[0].into()
    } else {
        topo.add_server_v4(1).expect("server address")[0].into()
    };
    let backend = SocketAddr::new(ip, BACKEND_PORT);
    let _server = TcpServer::start(&topo.server, backend);
    let check = Check::fast_tcp();
    let svc = Service::new("pay", backend, check, Breaker::default_for(&check));
    let dir = TempDir::new().expect("temp dir");
    let agent = start_agent(&topo, &dir, std::slice::from_ref(&svc));
    wait_probed_closed(&agent, &svc);

    // Closed: connects reach the backend and are counted as admitted.
    let before = Scrape::take(&agent, &svc);
    assert_connects(&topo.client, backend, 3, "breaker closed");
    let after = Scrape::take(&agent, &svc);
    let admitted = after.action("admitted") - before.action_or_zero("admitted");
    assert!(
        admitted >= 3,
        "3 connects while closed: admitted grew by {admitted}, expected at least 3"
    );

    // Hang it: open within failure_threshold probes + timeout of the rule.
    let t0 = Instant::now();
    let mut hole = Blackhole::add(&topo.server, ip);
    let bound = svc.open_bound();
    let (took, _) = wait_state(&agent, &svc, "open", t0, bound);
    eprintln!("[{backend}] hung -> open in {took:?} (bound {bound:?})");

    // Open: every connect refused by the datapath's RST, each in well under FAST_FAIL.
    const ATTEMPTS: usize = 20;
    let before = Scrape::take(&agent, &svc);
    let attempts = connect_many(&topo.client, backend, ATTEMPTS, CONNECT_TIMEOUT);
    let after = Scrape::take(&agent, &svc);
    let (min, med, max) = spread(&attempts);
    eprintln!("[{backend}] {ATTEMPTS} connects while open: min {min:?} median {med:?} max {max:?}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(
            a.kind(),
            Err(ErrorKind::ConnectionRefused),
            "connect {i} to the open backend {backend}: expected ECONNREFUSED (took {:?})",
            a.took
        );
    }
    assert!(
        max < FAST_FAIL,
        "the slowest refused connect took {max:?}, expected under {FAST_FAIL:?}"
    );
    let rst = after.action("reject_rst") - before.action_or_zero("reject_rst");
    eprintln!("[{backend}] reject_rst grew by {rst}");
    assert_eq!(
        rst, ATTEMPTS as u64,
        "reject_rst must grow by one per refused connect"
    );
    assert_eq!(
        after.state().as_deref(),
        Some("open"),
        "the connects were meant to run while open"
    );

    // match.protocol tcp (the default): UDP to the same address:port is not the breaker's
    // business and reaches the backend's stack (which has no UDP socket there; its ICMP
    // answer is blackholed like every answer from that address).
    let before = Scrape::take(&agent, &svc);
    let snmp0 = topo.server.udp_snmp().expect("server UDP counters");
    let (r, _) = udp_exchange(&topo.client, backend, b"not tcp", ms(100));
    let snmp1 = topo.server.udp_snmp().expect("server UDP counters");
    let after = Scrape::take(&agent, &svc);
    let icmp = after.action_or_zero("reject_icmp") - before.action_or_zero("reject_icmp");
    eprintln!(
        "[{backend}] UDP while the TCP breaker is open: {r:?}; reached the backend's stack: {}; \
         reject_icmp +{icmp}",
        snmp1.no_ports - snmp0.no_ports
    );
    assert_eq!(icmp, 0, "a TCP service's breaker must not answer UDP");
    assert_eq!(
        snmp1.no_ports - snmp0.no_ports,
        1,
        "the datagram must reach the backend's stack"
    );

    // Restore: closed within the rest of the open period + success_threshold probes.
    let t1 = Instant::now();
    hole.remove();
    let bound = svc.close_bound();
    let (took, _) = wait_state(&agent, &svc, "closed", t1, bound);
    eprintln!("[{backend}] restored -> closed in {took:?} (bound {bound:?})");
    assert_connects(&topo.client, backend, 3, "breaker closed again");
}

#[test]
fn hung_backend_is_refused_fast_and_comes_back_v4() {
    hung_backend_is_refused_fast_and_comes_back(false);
}

#[test]
fn hung_backend_is_refused_fast_and_comes_back_v6() {
    hung_backend_is_refused_fast_and_comes_back(true);
}

// ---------------------------------------------------------------------------------------
// Passive detection, and the half-open quota.

/// A backend under passive detection alone: active probes practically off (the first one
/// falls somewhere in the first day). The breaker opens on 3 failures for 1 s, then admits 3
/// trial flows and closes only after 10 successes (so it stays half-open while a test looks).
/// `timeout`: how long an admitted SYN may go unanswered before it counts as a failure.
fn passive_only(backend: SocketAddr, timeout: Duration) -> Service {
    let check = Check {
        interval: Duration::from_secs(86_400),
        unhealthy_interval: Duration::from_secs(86_400),
        timeout,
        ..Check::fast_tcp()
    };
    let breaker = Breaker {
        failure_threshold: 3,
        reset_timeout: Duration::from_secs(1),
        max_reset_timeout: Duration::from_secs(2),
        half_open_max_flows: 3,
        success_threshold: 10,
        ..Breaker::default_for(&check)
    };
    Service::new("pay", backend, check, breaker)
}

/// With the backend's port closed, `failure_threshold` connects are refused by its own
/// kernel; the breaker must open on these passive refusals alone, within PASSIVE_PERIOD of the
/// last. Returns when it was seen open.
fn open_by_refusals(topo: &Topology, agent: &AgentProcess, svc: &Service) -> Instant {
    let backend = svc.backend;
    let first = Scrape::take(agent, svc);
    assert_eq!(first.state().as_deref(), Some("closed"), "starts closed");
    let n = svc.breaker.failure_threshold as usize;
    let attempts = connect_many(&topo.client, backend, n, CONNECT_TIMEOUT);
    let t_last = Instant::now();
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(
            a.kind(),
            Err(ErrorKind::ConnectionRefused),
            "connect {i} to the closed port {backend} while the breaker is closed"
        );
    }
    let bound = PASSIVE_PERIOD + SLACK;
    let (took, opened) = wait_state(agent, svc, "open", t_last, bound);
    let t_open = Instant::now();
    let refused = opened.passive("refused") - first.passive_or_zero("refused");
    let (probes_ok, probes_failed) = opened.probes();
    eprintln!(
        "{n} refused connects -> open {took:?} after the last (bound {bound:?}); passive \
         refused +{refused}; active probes ok {probes_ok} failed {probes_failed}"
    );
    assert_eq!(
        refused, n as u64,
        "each refused connect is one passive `refused`"
    );
    assert_eq!(
        (probes_ok, probes_failed),
        (0, 0),
        "the breaker must have opened on passive results alone (no active probe ran)"
    );
    t_open
}

#[test]
fn passive_refusals_open_and_half_open_admits_exactly_max_flows() {
    let mut topo = Topology::new().expect("topology");
    let ip: IpAddr = topo.add_server_v4(1).expect("server address")[0].into();
    let backend = SocketAddr::new(ip, BACKEND_PORT);
    let svc = passive_only(backend, Duration::from_secs(1));
    let breaker = svc.breaker;
    let dir = TempDir::new().expect("temp dir");
    // No listener yet: the backend's own kernel refuses.
    let agent = start_agent(&topo, &dir, std::slice::from_ref(&svc));
    let t_open = open_by_refusals(&topo, &agent, &svc);

    // A backend that accepts, counted; half-open after reset_timeout.
    let server = TcpServer::start(&topo.server, backend);
    let bound = breaker.reset_timeout + SLACK;
    let (took, _) = wait_state(&agent, &svc, "half_open", t_open, bound);
    eprintln!("open -> half_open in {took:?} (bound {bound:?})");

    // M connects in quick succession: exactly half_open_max_flows reach the backend, the
    // rest are refused by the datapath.
    const M: usize = 10;
    let quota = breaker.half_open_max_flows as usize;
    let before = Scrape::take(&agent, &svc);
    let segs0 = topo.server.tcp_in_segs().expect("server TCP counters");
    let attempts = connect_many(&topo.client, backend, M, CONNECT_TIMEOUT);
    let outcomes: Vec<Result<(), ErrorKind>> = attempts.iter().map(Attempt::kind).collect();
    let (min, med, max) = spread(&attempts);
    eprintln!("{M} connects while half-open: {outcomes:?}; min {min:?} median {med:?} max {max:?}");
    let mut expected = vec![Ok(()); quota];
    expected.resize(M, Err(ErrorKind::ConnectionRefused));
    assert_eq!(
        outcomes, expected,
        "half-open with half_open_max_flows {quota}: the first {quota} connects admitted, the \
         rest refused"
    );
    let refused_times: Vec<Duration> = attempts[quota..].iter().map(|a| a.took).collect();
    assert!(
        refused_times.iter().all(|t| *t < FAST_FAIL),
        "refusals in half-open must be as fast as in open: {refused_times:?}"
    );

    // The backend saw exactly the admitted flows: `quota` accepted, and its stack received
    // exactly SYN + ACK of each (a leaked SYN would add at least one segment).
    let took = poll_until("backend accepted the admitted connects", SETUP, || {
        server.accepted() >= quota as u64
    });
    let segs = topo.server.tcp_in_segs().expect("server TCP counters") - segs0;
    eprintln!(
        "backend accepted {} (after {took:?}); its stack received {segs} TCP segments",
        server.accepted()
    );
    assert_eq!(
        server.accepted(),
        quota as u64,
        "connections the backend accepted"
    );
    assert_eq!(
        segs,
        2 * quota as u64,
        "segments the backend received: SYN + ACK per admitted connect, nothing else"
    );

    let after = Scrape::take(&agent, &svc);
    let trial = after.action("trial") - before.action_or_zero("trial");
    let rst = after.action("reject_rst") - before.action_or_zero("reject_rst");
    eprintln!("trial +{trial}, reject_rst +{rst}");
    assert_eq!(trial, quota as u64, "trial flows counted");
    assert_eq!(rst, (M - quota) as u64, "refusals counted");
    // The admitted flows' SYN-ACKs are passive successes, fewer than success_threshold.
    let (took, last) = wait_for(
        &agent,
        &svc,
        "passive synack of the admitted flows",
        Instant::now(),
        PASSIVE_PERIOD + SLACK,
        |sc| sc.passive_or_zero("synack") >= before.passive_or_zero("synack") + quota as u64,
    );
    eprintln!(
        "passive synack +{} after {took:?}",
        last.passive("synack") - before.passive_or_zero("synack")
    );
    assert_eq!(
        last.passive("synack") - before.passive_or_zero("synack"),
        quota as u64,
        "one passive synack per admitted flow"
    );
    assert_eq!(
        last.state().as_deref(),
        Some("half_open"),
        "{quota} successes < success_threshold {}: still half-open",
        breaker.success_threshold
    );
    drop(attempts);
}

/// Half-open: a SYN the client retransmits belongs to a flow admitted already and takes no
/// second slot of the quota.
#[test]
fn half_open_counts_a_retransmitted_syn_once() {
    let mut topo = Topology::new().expect("topology");
    let ip: IpAddr = topo.add_server_v4(1).expect("server address")[0].into();
    let backend = SocketAddr::new(ip, BACKEND_PORT);
    // The passive timeout outlasts the hung trial below (SYN at 0, its retransmission after
    // the initial RTO of 1 s, given up at 1.5 s), so that flow is not judged, and the breaker
    // not re-opened, before the quota is checked at about 1.5 s.
    let svc = passive_only(backend, Duration::from_secs(3));
    let quota = svc.breaker.half_open_max_flows as usize;
    let dir = TempDir::new().expect("temp dir");
    let agent = start_agent(&topo, &dir, std::slice::from_ref(&svc));
    let t_open = open_by_refusals(&topo, &agent, &svc);
    let _server = TcpServer::start(&topo.server, backend);
    let bound = svc.breaker.reset_timeout + SLACK;
    wait_state(&agent, &svc, "half_open", t_open, bound);

    // One trial flow toward the backend while it hangs: the client sends its SYN twice.
    let mut hole = Blackhole::add(&topo.server, ip);
    let before = Scrape::take(&agent, &svc);
    let hung = connect_many(&topo.client, backend, 1, ms(1500));
    let after = Scrape::take(&agent, &svc);
    hole.remove();
    let admitted = after.action("admitted") - before.action_or_zero("admitted");
    let trial = after.action("trial") - before.action_or_zero("trial");
    eprintln!(
        "hung trial flow: {:?} after {:?}; SYNs admitted +{admitted}, trial +{trial}",
        hung[0].kind(),
        hung[0].took
    );
    assert_eq!(
        hung[0].kind(),
        Err(ErrorKind::TimedOut),
        "the trial flow hung"
    );
    assert!(
        admitted >= 2,
        "the client must have retransmitted its SYN (admitted +{admitted}): the test's premise"
    );
    assert_eq!(
        trial, 1,
        "a retransmitted SYN must not take a second trial slot"
    );

    // What is left of the quota: quota - 1 new flows, then refusals.
    let attempts = connect_many(&topo.client, backend, quota, CONNECT_TIMEOUT);
    let outcomes: Vec<Result<(), ErrorKind>> = attempts.iter().map(Attempt::kind).collect();
    let end = Scrape::take(&agent, &svc);
    eprintln!(
        "{quota} connects after it: {outcomes:?}; breaker {:?}",
        end.state()
    );
    let mut expected = vec![Ok(()); quota - 1];
    expected.push(Err(ErrorKind::ConnectionRefused));
    assert_eq!(
        outcomes, expected,
        "half_open_max_flows {quota}, one slot spent on the retransmitted flow"
    );
    assert_eq!(end.state().as_deref(), Some("half_open"), "still half-open");
}

/// Passive detection of a hung backend: SYNs left unanswered for `health_check.timeout` are
/// failures, and open the breaker with no active probe involved.
#[test]
fn passive_syn_timeouts_open_the_breaker_of_a_hung_backend() {
    let mut topo = Topology::new().expect("topology");
    let ip: IpAddr = topo.add_server_v4(1).expect("server address")[0].into();
    let backend = SocketAddr::new(ip, BACKEND_PORT);
    let _server = TcpServer::start(&topo.server, backend);
    // Active probes practically off, as above.
    let check = Check {
        interval: Duration::from_secs(86_400),
        unhealthy_interval: Duration::from_secs(86_400),
        timeout: ms(200),
        ..Check::fast_tcp()
    };
    let breaker = Breaker {
        reset_timeout: Duration::from_secs(10),
        max_reset_timeout: Duration::from_secs(10),
        ..Breaker::default_for(&check)
    };
    let svc = Service::new("pay", backend, check, breaker);
    let dir = TempDir::new().expect("temp dir");
    let agent = start_agent(&topo, &dir, std::slice::from_ref(&svc));
    assert_connects(&topo.client, backend, 1, "before the backend hangs");
    let _hole = Blackhole::add(&topo.server, ip);
    let first = Scrape::take(&agent, &svc);
    assert_eq!(
        first.state().as_deref(),
        Some("closed"),
        "closed before the SYNs"
    );

    // failure_threshold connects that give up after 300 ms (before any SYN retransmission).
    // The last SYN times out `timeout` after it left; the agent reads it within
    // PASSIVE_PERIOD.
    let n = breaker.failure_threshold as usize;
    let give_up = ms(300);
    let attempts = connect_many(&topo.client, backend, n - 1, give_up);
    let t_last = Instant::now();
    let last = connect_many(&topo.client, backend, 1, give_up);
    for (i, a) in attempts.iter().chain(&last).enumerate() {
        assert_eq!(
            a.kind(),
            Err(ErrorKind::TimedOut),
            "connect {i} to the hung backend while closed"
        );
    }
    let bound = check.timeout + PASSIVE_PERIOD + SLACK;
    let (took, opened) = wait_state(&agent, &svc, "open", t_last, bound);
    let timeouts = opened.passive("timeout") - first.passive_or_zero("timeout");
    let (probes_ok, probes_failed) = opened.probes();
    eprintln!(
        "{n} unanswered SYNs -> open {took:?} after the last was sent (bound {bound:?}); \
         passive timeout +{timeouts}; active probes ok {probes_ok} failed {probes_failed}"
    );
    assert_eq!(
        timeouts, n as u64,
        "each unanswered SYN is one passive `timeout`"
    );
    assert_eq!(
        (probes_ok, probes_failed),
        (0, 0),
        "the breaker must have opened on passive results alone (no active probe ran)"
    );
}

// ---------------------------------------------------------------------------------------
// on_open: drop.

#[test]
fn open_breaker_with_on_open_drop_drops_syns() {
    let mut topo = Topology::new().expect("topology");
    let ip: IpAddr = topo.add_server_v4(1).expect("server address")[0].into();
    let backend = SocketAddr::new(ip, BACKEND_PORT);
    let server = TcpServer::start(&topo.server, backend);
    let check = Check::fast_tcp();
    let svc = Service::new(
        "pay",
        backend,
        check,
        Breaker {
            // Stays open through the connects below.
            reset_timeout: Duration::from_secs(10),
            max_reset_timeout: Duration::from_secs(10),
            on_open: "drop",
            ..Breaker::default_for(&check)
        },
    );
    let dir = TempDir::new().expect("temp dir");
    let agent = start_agent(&topo, &dir, std::slice::from_ref(&svc));
    wait_probed_closed(&agent, &svc);

    // The backend refuses from now on: without the breaker a connect would be refused at
    // once, so a timeout can only be the datapath dropping the SYN.
    let t0 = Instant::now();
    drop(server);
    let bound = svc.open_bound();
    let (took, _) = wait_state(&agent, &svc, "open", t0, bound);
    eprintln!("[{backend}] refusing -> open in {took:?} (bound {bound:?})");

    const ATTEMPTS: usize = 3;
    let timeout = ms(300);
    let before = Scrape::take(&agent, &svc);
    let attempts = connect_many(&topo.client, backend, ATTEMPTS, timeout);
    let after = Scrape::take(&agent, &svc);
    for (i, a) in attempts.iter().enumerate() {
        eprintln!("connect {i}: {:?} after {:?}", a.kind(), a.took);
        assert_eq!(
            a.kind(),
            Err(ErrorKind::TimedOut),
            "connect {i} to the open backend with on_open: drop: the SYN must vanish"
        );
        assert!(a.took >= timeout, "connect {i} gave up early: {:?}", a.took);
    }
    let dropped = after.action("drop") - before.action_or_zero("drop");
    let rst = after.action_or_zero("reject_rst") - before.action_or_zero("reject_rst");
    eprintln!("drop +{dropped}, reject_rst +{rst}");
    // A SYN is first retransmitted after 1 s, so each attempt sent one.
    assert_eq!(dropped, ATTEMPTS as u64, "one dropped SYN per attempt");
    assert_eq!(rst, 0, "on_open: drop sends no RST");
    assert_eq!(after.state().as_deref(), Some("open"), "still open");
}

// ---------------------------------------------------------------------------------------
// Established flows: close_existing.

/// Writes `msg` on `conn` and reads the echo; the error kind if either fails.
fn echo(conn: &mut TcpStream, msg: &[u8]) -> Result<(), ErrorKind> {
    conn.write_all(msg).map_err(|e| e.kind())?;
    let mut got = vec![0u8; msg.len()];
    conn.read_exact(&mut got).map_err(|e| e.kind())?;
    assert_eq!(got, msg, "the echo came back changed");
    Ok(())
}

fn established_flow_when_the_breaker_opens(close_existing: bool) {
    let mut topo = Topology::new().expect("topology");
    let ip: IpAddr = topo.add_server_v4(1).expect("server address")[0].into();
    let backend = SocketAddr::new(ip, BACKEND_PORT);
    let server = TcpServer::start(&topo.server, backend);
    let check = Check {
        kind: "http",
        path: "/health",
        ..Check::fast_tcp()
    };
    let svc = Service::new(
        "pay",
        backend,
        check,
        Breaker {
            reset_timeout: Duration::from_secs(10),
            max_reset_timeout: Duration::from_secs(10),
            close_existing,
            ..Breaker::default_for(&check)
        },
    );
    let dir = TempDir::new().expect("temp dir");
    let agent = start_agent(&topo, &dir, std::slice::from_ref(&svc));
    wait_probed_closed(&agent, &svc);

    // An established flow, echoing while the breaker is closed.
    let mut held = topo
        .client
        .run(move || TcpStream::connect_timeout(&backend, CONNECT_TIMEOUT))
        .expect("entering the client namespace")
        .unwrap_or_else(|e| panic!("connecting to {backend}: {e}"));
    held.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
    held.set_write_timeout(Some(CONNECT_TIMEOUT)).unwrap();
    assert_eq!(echo(&mut held, b"PING"), Ok(()), "echo while closed");

    // Health fails (503) while TCP works: open within the probes' bound.
    let t0 = Instant::now();
    server.set_healthy(false);
    let bound = svc.open_bound();
    let (took, _) = wait_state(&agent, &svc, "open", t0, bound);
    eprintln!("[{backend}] 503 -> open in {took:?} (bound {bound:?})");

    let before = Scrape::take(&agent, &svc);
    let t = Instant::now();
    let r = echo(&mut held, b"PONG");
    let took = t.elapsed();
    let after = Scrape::take(&agent, &svc);
    let cut = after.action_or_zero("close_existing") - before.action_or_zero("close_existing");
    eprintln!(
        "close_existing {close_existing}: held flow after opening: {r:?} in {took:?}; \
         close_existing counter +{cut}"
    );
    if close_existing {
        assert!(
            matches!(r, Err(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)),
            "close_existing: the held flow's next packet must be answered by a RST, got {r:?}"
        );
        assert!(
            took < FAST_FAIL,
            "the reset must come at once, took {took:?}"
        );
        assert!(
            after.action("close_existing") > before.action_or_zero("close_existing"),
            "the close_existing counter must grow"
        );
    } else {
        assert_eq!(
            r,
            Ok(()),
            "without close_existing the held flow keeps working"
        );
        assert_eq!(cut, 0, "nothing cut without close_existing");
    }

    // New flows are refused either way.
    let before = Scrape::take(&agent, &svc);
    let attempts = connect_many(&topo.client, backend, 1, CONNECT_TIMEOUT);
    let after = Scrape::take(&agent, &svc);
    eprintln!(
        "new connect while open: {:?} in {:?}",
        attempts[0].kind(),
        attempts[0].took
    );
    assert_eq!(
        attempts[0].kind(),
        Err(ErrorKind::ConnectionRefused),
        "a new connect to the open backend"
    );
    assert!(attempts[0].took < FAST_FAIL, "refused at once");
    assert_eq!(
        after.action("reject_rst") - before.action_or_zero("reject_rst"),
        1,
        "one reject_rst"
    );
    assert_eq!(after.state().as_deref(), Some("open"), "still open");
}

#[test]
fn close_existing_resets_established_flows_when_open() {
    established_flow_when_the_breaker_opens(true);
}

#[test]
fn established_flows_survive_an_open_breaker_without_close_existing() {
    established_flow_when_the_breaker_opens(false);
}

// ---------------------------------------------------------------------------------------
// UDP: ICMP port unreachable.

/// Sends `msg` on a fresh UDP socket connected to `addr` and waits up to `timeout` for an
/// answer; the answer, or the error kind of the receive.
fn udp_exchange(
    ns: &Netns,
    addr: SocketAddr,
    msg: &'static [u8],
    timeout: Duration,
) -> (Result<Vec<u8>, ErrorKind>, Duration) {
    ns.run(move || {
        let local: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let sock = UdpSocket::bind(local).expect("binding a UDP client");
        sock.connect(addr).expect("connecting a UDP client");
        sock.set_read_timeout(Some(timeout)).expect("read timeout");
        let t = Instant::now();
        let r = sock.send(msg).map_err(|e| e.kind()).and_then(|_| {
            let mut buf = [0u8; 2048];
            sock.recv(&mut buf)
                .map(|n| buf[..n].to_vec())
                .map_err(|e| e.kind())
        });
        (r, t.elapsed())
    })
    .expect("entering the client namespace")
}

fn open_breaker_of_a_udp_service_answers_icmp_unreachable(v6: bool) {
    let mut topo = Topology::new().expect("topology");
    let ip: IpAddr = if v6 {
        topo.add_server_v6(1).expect("server address")[0].into()
    } else {
        topo.add_server_v4(1).expect("server address")[0].into()
    };
    let backend = SocketAddr::new(ip, 5353);
    let echo_server = UdpEcho::start(&topo.server, backend);
    // TCP probes of a port with no TCP listener: refused, so the breaker opens; slowly
    // enough (at least (failure_threshold - 1) x interval after the first probe) that the
    // echo below runs while it is still closed, which is checked, not assumed.
    let check = Check {
        interval: Duration::from_secs(1),
        unhealthy_interval: Duration::from_secs(1),
        timeout: ms(200),
        unhealthy_threshold: 5,
        ..Check::fast_tcp()
    };
    let svc = Service {
        match_address: ip,
        protocol: "udp",
        ..Service::new(
            "dns",
            backend,
            check,
            Breaker {
                // Stays open through the datagrams below.
                reset_timeout: Duration::from_secs(10),
                max_reset_timeout: Duration::from_secs(10),
                ..Breaker::default_for(&check)
            },
        )
    };
    assert_eq!(svc.breaker.failure_threshold, 5);
    let dir = TempDir::new().expect("temp dir");
    let agent = start_agent(&topo, &dir, std::slice::from_ref(&svc));
    let ready = Instant::now();

    let (r, took) = udp_exchange(&topo.client, backend, b"hello", CONNECT_TIMEOUT);
    let closed = Scrape::take(&agent, &svc);
    eprintln!("echo before opening: {r:?} in {took:?}");
    assert_eq!(
        closed.state().as_deref(),
        Some("closed"),
        "the echo was meant to run while closed (the agent opened sooner than \
         (failure_threshold - 1) x interval after its first probe?)"
    );
    assert_eq!(
        r,
        Ok(b"hello".to_vec()),
        "UDP echo while the breaker is closed"
    );

    // The first probe anywhere in the first interval, then failure_threshold failures.
    let bound = svc.check.interval + svc.open_bound();
    let (took, _) = wait_state(&agent, &svc, "open", ready, bound);
    eprintln!("[{backend}] refused probes -> open {took:?} after ready (bound {bound:?})");

    const ATTEMPTS: usize = 5;
    let before = Scrape::take(&agent, &svc);
    let rx0 = echo_server.received();
    let snmp0 = topo.server.udp_snmp().expect("server UDP counters");
    let mut times = Vec::new();
    for i in 0..ATTEMPTS {
        let (r, took) = udp_exchange(&topo.client, backend, b"ping", CONNECT_TIMEOUT);
        eprintln!("datagram {i} while open: {r:?} in {took:?}");
        assert_eq!(
            r,
            Err(ErrorKind::ConnectionRefused),
            "datagram {i} to the open UDP backend: ICMP port unreachable expected"
        );
        times.push(took);
    }
    let after = Scrape::take(&agent, &svc);
    let snmp1 = topo.server.udp_snmp().expect("server UDP counters");
    let icmp = after.action("reject_icmp") - before.action_or_zero("reject_icmp");
    eprintln!(
        "reject_icmp +{icmp}; echo server received {} after opening; server UDP in {} + \
         no-port {}",
        echo_server.received() - rx0,
        snmp1.in_datagrams - snmp0.in_datagrams,
        snmp1.no_ports - snmp0.no_ports
    );
    assert_eq!(icmp, ATTEMPTS as u64, "one reject_icmp per datagram");
    assert_eq!(
        echo_server.received(),
        rx0,
        "the echo server must receive nothing while the breaker is open"
    );
    assert_eq!(
        (
            snmp1.in_datagrams - snmp0.in_datagrams,
            snmp1.no_ports - snmp0.no_ports
        ),
        (0, 0),
        "no datagram may reach the backend's stack while the breaker is open"
    );
    let max = times.iter().max().copied().unwrap_or_default();
    assert!(max < FAST_FAIL, "slowest ICMP refusal {max:?}");

    // match.protocol udp: TCP to the same address:port is not the breaker's business (the
    // backend's own kernel refuses it, no reject_rst).
    let before = Scrape::take(&agent, &svc);
    let attempts = connect_many(&topo.client, backend, 1, CONNECT_TIMEOUT);
    let after = Scrape::take(&agent, &svc);
    assert_eq!(
        attempts[0].kind(),
        Err(ErrorKind::ConnectionRefused),
        "no TCP listener on the UDP backend's port"
    );
    assert_eq!(
        after.action_or_zero("reject_rst") - before.action_or_zero("reject_rst"),
        0,
        "a UDP service's breaker must not touch TCP"
    );
    assert_eq!(after.state().as_deref(), Some("open"), "still open");
}

#[test]
fn open_breaker_of_a_udp_service_answers_icmp_unreachable_v4() {
    open_breaker_of_a_udp_service_answers_icmp_unreachable(false);
}

#[test]
fn open_breaker_of_a_udp_service_answers_icmpv6_unreachable_v6() {
    open_breaker_of_a_udp_service_answers_icmp_unreachable(true);
}
