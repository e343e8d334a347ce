//! The payments field case (`config/payments.yaml`), end to end: fail fast, never retry in the
//! datapath, recover gradually.
//!
//! The policy is the file's own `payments-api` service ([`derive`]): the pin path becomes one of
//! the test's own, the interface the test's client veth (generic XDP, as in every end-to-end test, `direction: both` as written),
//! the addresses stay as written (the VIP 198.18.40.10 and the processors 198.18.41.1-3 lie in
//! the test network 198.18.0.0/16: each processor is a server on exactly that address in the
//! server namespace), and every duration is divided by [`SPEEDUP`] and then multiplied by
//! `AGENT_TEST_TIME_SCALE`, so the story takes seconds instead of minutes. Counts, thresholds,
//! rates and shares are the file's. The `ledger` service (IPv6, a drain by weight 0) is a
//! story of its own and left out.
//!
//! The story: shoppers pay through the VIP (each connection asks `GET` and reads which
//! processor answered), and a terminal talks to one processor directly. That processor hangs
//! (a blackhole on its address: SYNs reach it, nothing comes back). Once its breaker is open:
//! the terminal's connects are refused by the datapath's RST in under 10 ms, the shoppers'
//! new payments go to the other processors without one failing, and a payment in flight on
//! the hung processor is left alone (it completes once the processor answers again). When it
//! answers again: half-open admits `half_open_max_flows` trial flows and refuses the rest,
//! then closed, its weight ramps over `slow_start` and the shoppers' flows follow the ramp.
//!
//! Root only; run serially: `cargo test -p agent-tests --test payments -- --test-threads=1`.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_common::ports::nat_port;
use agent_tests::{
    agent::{AgentProcess, TempDir, agent_bin, metric},
    backend::{Blackhole, TcpServer, served_by},
    breaker::BackendView,
    netns::{Netns, Topology},
    timing::{REFUSED_CONNECT, Scaled, TABLE_FOLLOWS},
    wait::poll,
};
use anyhow::{Context as _, Result, bail, ensure};

/// The field case's policy and the service it is about.
const POLICY_FILE: &str = "config/payments.yaml";
const SERVICE: &str = "payments-api";
/// Every duration of the file is divided by this (then scaled as any bound).
const SPEEDUP: u32 = 5;
/// The durations of the service that [`derive`] speeds up.
const DURATIONS: [&str; 9] = [
    "interval",
    "unhealthy_interval",
    "timeout",
    "window",
    "reset_timeout",
    "max_reset_timeout",
    "slow_start",
    "initial_backoff",
    "max_backoff",
];
/// Set-up waits that are not under test (first probes, weights published).
const SETUP: Scaled = Scaled::secs(5);
/// Scrape, probe scheduling and balancer slack on a loaded 2-core machine.
const SLACK: Scaled = Scaled::millis(500);
/// Connect and read timeout of the clients: longer than TCP's 1 s initial RTO (not scaled:
/// the kernel's), so a SYN retransmitted into an open breaker ends refused, not timed out.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Shoppers: threads, and each one's period between payments (40 per second in all, about
/// 200 packets per second from one source: under the file's 500/s per source).
const SHOPPERS: usize = 4;
const SHOPPER_PERIOD: Duration = Duration::from_millis(100);
/// The terminal's period between connects to its processor.
const TERMINAL_PERIOD: Duration = Duration::from_millis(20);
/// Payments in flight (echo connections through the VIP) opened before the hang.
const HELD: usize = 20;
/// After the ramp, traffic at full weight for this long (a measurement window, not a bound):
/// about 160 payments, so a fair share of a third is judged within 4 standard deviations.
const AT_FULL: Scaled = Scaled::secs(4);

// ---------------------------------------------------------------------------------------
// The policy, derived from the file.

/// What the test follows of the derived policy; durations already sped up.
#[derive(Debug)]
struct Payments {
    text: String,
    vip: SocketAddr,
    processors: Vec<SocketAddr>,
    interval: Scaled,
    unhealthy_interval: Scaled,
    timeout: Scaled,
    failure_threshold: u32,
    reset_timeout: Scaled,
    half_open_max_flows: u64,
    success_threshold: u32,
    slow_start: Scaled,
    weight: u32,
}

fn workspace_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

/// `key: value  # comment` -> (`key`, `value`), a list item's `- ` dropped, quotes stripped.
fn key_value(line: &str) -> Option<(&str, &str)> {
    let t = line.trim_start();
    let t = t.strip_prefix("- ").unwrap_or(t);
    if t.starts_with('#') {
        return None;
    }
    let (k, v) = t.split_once(':')?;
    let v = v.split('#').next().unwrap_or("").trim().trim_matches('"');
    Some((k.trim(), v))
}

/// `line` with its value replaced by `value`; indentation, key and comment kept.
fn with_value(line: &str, value: &str) -> String {
    let colon = line.find(':').expect("a key: value line");
    let comment = line[colon..].find('#').map(|i| &line[colon + i..]);
    match comment {
        Some(c) => format!("{}: {value}  {c}", &line[..colon]),
        None => format!("{}: {value}", &line[..colon]),
    }
}

/// `250ms`, `1s`, `5m` as written in the field case.
fn duration(text: &str) -> Result<Duration> {
    let (n, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .with_context(|| format!("`{text}`: no unit"))?;
    let n: u64 = n.parse().with_context(|| format!("`{text}`"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(60 * n),
        _ => bail!("`{text}`: the test reads ms, s and m only"),
    })
}

fn sped_up(text: &str) -> Result<Scaled> {
    Ok(Scaled::new(duration(text)? / SPEEDUP))
}

/// The file's text, its `payments-api` service only, on `ifname` with generic XDP, every
/// duration of the service divided by [`SPEEDUP`] (and scaled); the rest as written.
fn derive(file: &str, ifname: &str) -> Result<Payments> {
    let mut text = String::new();
    let mut section = "";
    let mut keep = true;
    let mut block = Vec::new();
    for line in file.lines() {
        let top_level = !line.starts_with(' ') && !line.starts_with('#') && !line.is_empty();
        if top_level {
            section = line.split(':').next().unwrap_or("");
            keep = true;
        }
        if section == "services" && line.starts_with("  - name:") {
            keep = key_value(line).map(|(_, v)| v) == Some(SERVICE);
        }
        if !keep {
            continue;
        }
        let out = match (section, key_value(line)) {
            // A pin path of its own: the suite may share the machine with other agents.
            ("agent", Some(("pin_path", _))) => with_value(
                line,
                &format!("/sys/fs/bpf/agt-{}-payments", std::process::id()),
            ),
            ("interfaces", Some(("name", _))) => with_value(line, ifname),
            ("interfaces", Some(("xdp_mode", _))) => with_value(line, "generic"),
            ("services", Some((k, v))) if DURATIONS.contains(&k) => {
                with_value(line, &sped_up(v)?.yaml())
            }
            _ => line.to_owned(),
        };
        if section == "services" {
            block.push(line);
        }
        text.push_str(&out);
        text.push('\n');
    }
    ensure!(
        block.len() > 1,
        "{POLICY_FILE} has no service {SERVICE}: the field case changed, and this test with it"
    );
    let field = |key: &str| -> Result<&str> {
        block
            .iter()
            .filter_map(|l| key_value(l))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .with_context(|| format!("{POLICY_FILE}: {SERVICE} has no `{key}`"))
    };
    let number = |key: &str| -> Result<u64> {
        let v = field(key)?;
        v.parse()
            .with_context(|| format!("{POLICY_FILE}: {SERVICE}.{key}: `{v}`"))
    };
    let processors = block
        .iter()
        .filter(|l| l.trim_start().starts_with("- address:"))
        .filter_map(|l| key_value(l))
        .map(|(_, v)| v.parse().with_context(|| format!("backend `{v}`")))
        .collect::<Result<Vec<SocketAddr>>>()?;
    let address = field("address")?;
    let vip_ip: IpAddr = address
        .strip_suffix("/32")
        .unwrap_or(address)
        .parse()
        .with_context(|| format!("match.address `{address}`"))?;
    ensure!(
        field("vip")? == "true",
        "{SERVICE}: the story needs vip: true"
    );
    ensure!(
        field("on_open")? == "reject" && field("close_existing")? == "false",
        "{SERVICE}: the story is on_open: reject, close_existing: false"
    );
    ensure!(
        processors.len() >= 2,
        "{SERVICE}: the story needs 2 processors or more"
    );
    let weight = block
        .iter()
        .filter_map(|l| key_value(l))
        .find(|(k, _)| *k == "weight")
        .map_or(Ok(100), |(_, v)| v.parse())?;
    Ok(Payments {
        text,
        vip: SocketAddr::new(vip_ip, u16::try_from(number("port")?)?),
        processors,
        interval: sped_up(field("interval")?)?,
        unhealthy_interval: sped_up(field("unhealthy_interval")?)?,
        timeout: sped_up(field("timeout")?)?,
        failure_threshold: u32::try_from(number("failure_threshold")?)?,
        reset_timeout: sped_up(field("reset_timeout")?)?,
        half_open_max_flows: number("half_open_max_flows")?,
        success_threshold: u32::try_from(number("success_threshold")?)?,
        slow_start: sped_up(field("slow_start")?)?,
        weight,
    })
}

impl Payments {
    /// Hung -> open by the probes alone: the first failing probe, then `failure_threshold`
    /// failures at most `unhealthy_interval` apart, each taking `timeout` (the clients' own
    /// SYN timeouts, counted passively, usually open it sooner).
    fn open_bound(&self) -> Scaled {
        self.interval + self.unhealthy_interval * self.failure_threshold + self.timeout + SLACK
    }

    /// Half-open -> closed: `success_threshold` probes (half-open probes at the unhealthy
    /// interval) and their answers.
    fn close_bound(&self) -> Scaled {
        self.unhealthy_interval * (self.success_threshold + 1) + self.timeout + SLACK
    }
}

// ---------------------------------------------------------------------------------------
// Clients.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Connected; through the VIP, the processor that answered (its index).
    Served(Option<usize>),
    Refused,
    TimedOut,
    Failed(String),
}

/// One connect, when it started and how long it took.
#[derive(Debug, Clone)]
struct Try {
    at: Instant,
    took: Duration,
    outcome: Outcome,
}

type Log = Arc<Mutex<Vec<Try>>>;

fn outcome_of(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::TimedOut,
        k => Outcome::Failed(format!("{k:?}: {e}")),
    }
}

/// A payment through the VIP: connect, `GET`, read the answer; who served it.
fn payment(vip: SocketAddr, names: &[String]) -> Outcome {
    let mut s = match TcpStream::connect_timeout(&vip, CLIENT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return outcome_of(&e),
    };
    let mut answer = String::new();
    let r = s
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| s.write_all(b"GET /pay HTTP/1.1\r\nHost: payments\r\n\r\n"))
        .and_then(|()| s.read_to_string(&mut answer));
    match r {
        Ok(_) => Outcome::Served(
            served_by(&answer).and_then(|n| names.iter().position(|m| m.as_str() == n)),
        ),
        Err(e) => Outcome::Failed(format!("after connecting: {e}")),
    }
}

/// A connect to `addr`, closed at once.
fn knock(addr: SocketAddr) -> Outcome {
    match TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT) {
        Ok(_) => Outcome::Served(None),
        Err(e) => outcome_of(&e),
    }
}

/// Threads that each run `attempt` every `period` in `ns` until stopped, logging every try.
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    log: Log,
}

impl Clients {
    fn start(
        ns: &Netns,
        threads: usize,
        period: Duration,
        attempt: impl Fn() -> Outcome + Clone + Send + 'static,
    ) -> Result<Clients> {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Log = Arc::default();
        let threads = (0..threads)
            .map(|i| {
                let (stop, log, attempt) = (stop.clone(), log.clone(), attempt.clone());
                ns.spawn(move || {
                    // Staggered, then on a fixed grid; a late try skips the slots it missed.
                    let start = Instant::now() + period * i as u32 / threads as u32;
                    let mut next = start;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let at = Instant::now();
                        let outcome = attempt();
                        let t = Try {
                            at,
                            took: at.elapsed(),
                            outcome,
                        };
                        log.lock().unwrap_or_else(|e| e.into_inner()).push(t);
                        while next <= Instant::now() {
                            next += period;
                        }
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Clients { stop, threads, log })
    }

    fn tries(&self) -> Vec<Try> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn finish(mut self) -> Vec<Try> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.tries()
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The tries that started in `[from, to)`.
fn between(tries: &[Try], from: Instant, to: Instant) -> Vec<&Try> {
    tries.iter().filter(|t| t.at >= from && t.at < to).collect()
}

/// How many of `tries` each processor served.
fn served(tries: &[&Try], n: usize) -> Vec<u64> {
    let mut counts = vec![0; n];
    for t in tries {
        if let Outcome::Served(Some(i)) = t.outcome {
            counts[i] += 1;
        }
    }
    counts
}

fn failed<'a>(tries: &[&'a Try]) -> Vec<&'a Try> {
    tries
        .iter()
        .copied()
        .filter(|t| !matches!(t.outcome, Outcome::Served(_)))
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------------
// The story.

/// The processor that hangs.
const HUNG: usize = 1;

/// `agent check` accepts the field case as written, and the policy this test derives from it.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn payments_policy_passes_agent_check() -> Result<()> {
    let bin = agent_bin()?;
    let file = workspace_file(POLICY_FILE);
    let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
    let dir = TempDir::new()?;
    let derived = dir.write("payments.yaml", &derive(&text, "veth-cli")?.text)?;
    for path in [file, derived] {
        let out = Command::new(&bin).arg("check").arg(&path).output()?;
        ensure!(
            out.status.success(),
            "`agent check {}` exited {}:\n{}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    }
    Ok(())
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn a_hung_processor_fails_fast_and_comes_back_gradually() -> Result<()> {
    let file = workspace_file(POLICY_FILE);
    let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
    let mut topo = Topology::new()?;
    let pay = derive(&text, &topo.client_if)?;
    println!(
        "derived from {POLICY_FILE} (durations / {SPEEDUP}, scaled): VIP {}, processors {:?}, \
         probes every {} ({} unhealthy, timeout {}), reset_timeout {}, half_open_max_flows {}, \
         success_threshold {}, slow_start {}",
        pay.vip,
        pay.processors,
        pay.interval,
        pay.unhealthy_interval,
        pay.timeout,
        pay.reset_timeout,
        pay.half_open_max_flows,
        pay.success_threshold,
        pay.slow_start
    );
    let n = pay.processors.len();
    let hung = pay.processors[HUNG];

    // The processors on the file's addresses; the shoppers on an address of their own (the
    // agent's probes leave from the client's main address, where the terminal is).
    let names: Vec<String> = (1..=n).map(|i| format!("processor-{i}")).collect();
    let mut servers = Vec::new();
    for (addr, name) in pay.processors.iter().zip(&names) {
        topo.add_server_addr(addr.ip())?;
        servers.push(TcpServer::start_named(&topo.server, *addr, name)?);
    }
    let shopper = topo.add_client_v4(1)?[0];
    topo.add_vip(pay.vip.ip())?;
    topo.client.ip(&[
        "route",
        "replace",
        &format!("{}/32", pay.vip.ip()),
        "dev",
        &topo.client_if,
        "src",
        &shopper.to_string(),
    ])?;
    let dir = TempDir::new()?;
    let path = dir.write("payments.yaml", &pay.text)?;
    let agent = AgentProcess::start(&topo.client, &path)?;
    let view = BackendView::new(&agent, SERVICE, hung);
    let weights = || -> Result<Vec<u32>> {
        let text = agent.metrics()?;
        pay.processors
            .iter()
            .map(|b| {
                metric(
                    &text,
                    "agent_lb_backend_effective_weight",
                    &[("service", SERVICE), ("backend", &b.to_string())],
                )
                .map(|w| w as u32)
                .with_context(|| format!("no effective weight for {b}"))
            })
            .collect()
    };
    let healthy = |text: &str| {
        pay.processors.iter().all(|b| {
            metric(
                text,
                "agent_backend_healthy",
                &[("service", SERVICE), ("backend", &b.to_string())],
            ) == Some(1.0)
        })
    };
    let ready = poll(
        Instant::now(),
        SETUP,
        Duration::from_millis(50),
        || -> Result<bool> {
            Ok(weights()?.iter().all(|w| *w == pay.weight) && healthy(&agent.metrics()?))
        },
        |r| matches!(r, Ok(true)),
    );
    if ready.is_err() {
        bail!(
            "every processor healthy at weight {}: not within {SETUP}",
            pay.weight
        );
    }

    // Payments in flight: echo connections through the VIP, held across the hang.
    let vip = pay.vip;
    let held = topo.client.run(move || -> Result<Vec<TcpStream>> {
        (0..HELD)
            .map(|_| {
                let s = TcpStream::connect_timeout(&vip, CLIENT_TIMEOUT)?;
                s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
                Ok(s)
            })
            .collect()
    })??;
    let ports: Vec<u16> = held
        .iter()
        // As the processors see them (the datapath moves ephemeral client ports).
        .map(|s| Ok(nat_port(s.local_addr()?.port())))
        .collect::<Result<_>>()?;
    let on_hung: Vec<bool> = {
        let owner = |port: u16| {
            servers.iter().position(|s| {
                s.peers()
                    .iter()
                    .any(|p| p.port() == port && p.ip() == shopper)
            })
        };
        let found = poll(
            Instant::now(),
            SETUP,
            Duration::from_millis(20),
            || ports.iter().map(|p| owner(*p)).collect::<Vec<_>>(),
            |o| o.iter().all(Option::is_some),
        )
        .map_err(|o| anyhow::anyhow!("held connections not all accepted: {o:?}"))?;
        found.1.iter().map(|o| *o == Some(HUNG)).collect()
    };
    let held_on_hung = on_hung.iter().filter(|h| **h).count();
    ensure!(
        held_on_hung > 0,
        "none of {HELD} held connections landed on {hung}: the check of payments in flight \
         would be empty"
    );

    // Shoppers through the VIP, a terminal straight to the processor that will hang.
    let shoppers = {
        let names = names.clone();
        Clients::start(&topo.client, SHOPPERS, SHOPPER_PERIOD, move || {
            payment(vip, &names)
        })?
    };
    let terminal = Clients::start(&topo.client, 1, TERMINAL_PERIOD, move || knock(hung))?;
    let steady = poll(
        Instant::now(),
        SETUP,
        Duration::from_millis(50),
        || served(&shoppers.tries().iter().collect::<Vec<_>>(), n),
        |c| c.iter().all(|c| *c >= 5),
    );
    let steady = steady.map_err(|c| anyhow::anyhow!("shoppers served by each: {c:?}"))?;
    println!("steady: shoppers served by each processor {:?}", steady.1);
    let before = view.scrape()?;
    let trials_before = before.action_or_zero("trial");

    // The hang.
    let hung_at = Instant::now();
    let mut hole = Blackhole::add(&topo.server, hung.ip())?;
    let (took, _) = view.wait_state("open", hung_at, pay.open_bound())?;
    let open_at = Instant::now();
    println!(
        "{hung} hung (`{}`); breaker open after {took:?}",
        hole.command("add")
    );

    // It answers again at once; its breaker stays open for reset_timeout.
    hole.remove()?;
    let restored_at = Instant::now();
    // A payment in flight on it is left alone: it completes while the breaker is open.
    let echoes = topo.client.run(move || {
        held.into_iter()
            .map(|mut s| {
                let mut buf = [0u8; 4];
                s.write_all(b"paid")
                    .and_then(|()| s.read_exact(&mut buf))
                    .map(|()| buf == *b"paid")
                    .map_err(|e| e.kind())
            })
            .collect::<Vec<_>>()
    })?;
    let state = view.scrape()?.state();
    ensure!(
        state == Some("open"),
        "the payments in flight were meant to be checked while the breaker is open; it is \
         {state:?}"
    );
    ensure!(
        echoes.iter().all(|e| *e == Ok(true)),
        "every payment in flight must complete, {held_on_hung} of them on the hung processor \
         (close_existing: false): {echoes:?}"
    );
    println!(
        "{HELD} payments in flight ({held_on_hung} on {hung}) completed while its breaker was open"
    );

    let (took, _) = view.wait_state("half_open", open_at, pay.reset_timeout + SLACK)?;
    let half_open_at = Instant::now();
    println!(
        "half-open {took:?} after it opened (reset_timeout {})",
        pay.reset_timeout
    );
    let (took, _) = view.wait_state("closed", half_open_at, pay.close_bound())?;
    let closed_at = Instant::now();
    println!("closed {took:?} after half-open");

    // The ramp: its weight, every 100 ms, until the configured weight.
    let mut ramp = Vec::new();
    let full = poll(
        closed_at,
        pay.slow_start + TABLE_FOLLOWS + SLACK,
        Duration::from_millis(100),
        || -> Result<u32> {
            let w = weights()?[HUNG];
            ramp.push((closed_at.elapsed(), w));
            Ok(w)
        },
        |w| matches!(w, Ok(w) if *w == pay.weight),
    );
    let full_at = Instant::now();
    let steps: Vec<String> = ramp
        .iter()
        .scan(None, |last, (t, w)| {
            let step = (*last != Some(*w)).then(|| format!("{w} at +{:.1}s", t.as_secs_f64()));
            *last = Some(*w);
            Some(step)
        })
        .flatten()
        .collect();
    println!("weight after closed: {}", steps.join(", "));
    if full.is_err() {
        bail!(
            "back to weight {} within slow_start {} + {TABLE_FOLLOWS} + {SLACK} of closing: \
             not reached; {steps:?}",
            pay.weight,
            pay.slow_start
        );
    }
    // Payments at full weight: a window to count them in, not a wait for a condition.
    std::thread::sleep(AT_FULL.get());
    let shop = shoppers.finish();
    let term = terminal.finish();
    let end = view.scrape()?;
    let trials = end.action_or_zero("trial") - trials_before;
    let half_opens = metric(
        &agent.metrics()?,
        "agent_breaker_transitions_total",
        &[
            ("service", SERVICE),
            ("backend", &hung.to_string()),
            ("to", "half_open"),
            ("reason", "reset_timeout"),
        ],
    )
    .unwrap_or(0.0) as u64;

    // Fail fast: while open (the first half of reset_timeout after it was seen open, well
    // before it can turn half-open), every connect of the terminal is refused by the RST.
    let open_window = between(&term, open_at, open_at + pay.reset_timeout.get() / 2);
    let mut times: Vec<Duration> = open_window.iter().map(|t| t.took).collect();
    times.sort();
    ensure!(!times.is_empty(), "the terminal made no connect while open");
    let bad: Vec<_> = open_window
        .iter()
        .filter(|t| t.outcome != Outcome::Refused)
        .collect();
    ensure!(
        bad.is_empty(),
        "while open, every connect to {hung} must be refused: {bad:?}"
    );
    let (median, max) = (times[times.len() / 2], times[times.len() - 1]);
    println!(
        "fail fast: {} connects to {hung} while open, all refused: median {}, max {}",
        times.len(),
        ms(median),
        ms(max)
    );
    ensure!(
        max < REFUSED_CONNECT.get(),
        "the slowest refused connect took {max:?}, expected under {REFUSED_CONNECT}"
    );
    let in_hang = between(&term, hung_at, open_at);
    println!(
        "  the terminal's connects started during the hang, before the breaker opened: {} ({:?})",
        in_hang.len(),
        in_hang
            .iter()
            .map(|t| (t.outcome.clone(), t.took))
            .collect::<Vec<_>>()
    );

    // The other processors take new payments: once the table follows the breaker, none fails
    // and none goes to the hung one, until it is trusted again.
    let taken = between(&shop, open_at + TABLE_FOLLOWS.get(), half_open_at);
    let counts = served(&taken, n);
    let lost = failed(&taken);
    println!(
        "while open: {} payments, served by each processor {counts:?}, failed {}",
        taken.len(),
        lost.len()
    );
    ensure!(
        lost.is_empty(),
        "payments failed while {hung} was open: {lost:?}"
    );
    ensure!(
        counts[HUNG] == 0 && counts.iter().filter(|c| **c > 0).count() == n - 1,
        "while open, the other processors take every payment: {counts:?}"
    );
    let during = between(&shop, hung_at, open_at + TABLE_FOLLOWS.get());
    println!(
        "  payments started between the hang and the table following the breaker: {}, failed {} \
         ({:?})",
        during.len(),
        failed(&during).len(),
        failed(&during)
            .iter()
            .map(|t| (t.outcome.clone(), t.took))
            .collect::<Vec<_>>()
    );

    // Half-open: its quota of trial flows, no more (the terminal's SYNs offer many).
    let trials_in = between(&term, half_open_at, closed_at);
    println!(
        "half-open: {trials} trial flow(s) admitted over {half_opens} half-open period(s) \
         (half_open_max_flows {}); the terminal's connects then: {:?}",
        pay.half_open_max_flows,
        trials_in
            .iter()
            .map(|t| t.outcome.clone())
            .collect::<Vec<_>>()
    );
    ensure!(
        half_opens >= 1 && trials >= 1 && trials <= pay.half_open_max_flows * half_opens,
        "half-open admits half_open_max_flows ({}) trial flows per period: {trials} over \
         {half_opens} period(s)",
        pay.half_open_max_flows
    );

    // Slow start: the weight ramps, never the full weight before slow_start, and the
    // payments follow.
    let weights_seen: Vec<u32> = ramp.iter().map(|(_, w)| *w).collect();
    ensure!(
        weights_seen.windows(2).all(|w| w[0] <= w[1])
            && weights_seen.iter().any(|w| *w > 0 && *w < pay.weight),
        "the weight must ramp up step by step: {steps:?}"
    );
    let lag = TABLE_FOLLOWS.get();
    let to_full = full_at - closed_at;
    ensure!(
        to_full + lag >= pay.slow_start.get(),
        "full weight {to_full:?} after closing, before slow_start {}",
        pay.slow_start
    );
    let first = between(&shop, closed_at, closed_at + pay.slow_start.get() / 4);
    let last = between(&shop, full_at, full_at + AT_FULL.get());
    let share = |tries: &[&Try]| {
        let c = served(tries, n);
        c[HUNG] as f64 / c.iter().sum::<u64>().max(1) as f64
    };
    let (early, late) = (share(&first), share(&last));
    let fair = f64::from(pay.weight) / (f64::from(pay.weight) * n as f64);
    println!(
        "slow start: {hung}'s share of payments in the first quarter of slow_start {:.1}% ({:?}), \
         at full weight {:.1}% ({:?}; fair share {:.1}%)",
        early * 100.0,
        served(&first, n),
        late * 100.0,
        served(&last, n),
        fair * 100.0
    );
    ensure!(
        early < late && (late - fair).abs() < 0.15,
        "payments must follow the ramp: {:.1}% early, {:.1}% at full weight (fair {:.1}%)",
        early * 100.0,
        late * 100.0,
        fair * 100.0
    );
    let lost = failed(&between(&shop, half_open_at, full_at + AT_FULL.get()));
    ensure!(
        lost.is_empty(),
        "payments failed during the recovery: {lost:?}"
    );
    println!(
        "recovery: {:.1}s from answering again to full weight",
        (full_at - restored_at).as_secs_f64()
    );
    drop(servers);
    Ok(())
}
