//! Live reload of every field (issue 11), end to end: a storm of reloads under traffic, the
//! state after it, and reloads the running datapath cannot take.
//!
//! The lab is `lb.rs`'s: the agent on the client veth (`direction: both`, generic XDP),
//! backends as real TCP servers in the server namespace, VIPs no interface holds. Two
//! policies, A and B, differ in nearly everything a reload can change: services inserted
//! before others (ids would shift), services removed and added, a balanced service whose
//! algorithm and backend set change, health checks and breakers added and removed, rate
//! limits. Both balance `web` on the same VIP to backends that are up: traffic to `web` is
//! in either policy, so none of it may be lost while the agent switches between them.
//!
//! What "in force" means is read from the datapath itself: `/policy/datapath` returns the
//! live generation of the maps, by service name; each reload must flip it. The final state
//! must equal a fresh start on the final policy, compared on that same dump (ids may differ
//! between the two: a reloaded agent keeps the ids it gave first, a fresh one numbers in
//! policy order; contents may not).
//!
//! Root only; serially: `cargo test -p agent-tests --test reload -- --test-threads=1` with
//! `AGENT_BIN` set.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent_tests::backend::{TcpServer, tcp_backends};
use agent_tests::echo::EchoLoad;
use agent_tests::pins::Uninstall;
use agent_tests::timing::{self, ECHO_TIMEOUT, RELOAD_STAGED, Scaled};
use agent_tests::wait::poll;
use agent_tests::{AgentProcess, TempDir, Topology, agent_bin};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_ADMIN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
const VIP_OPS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 102);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const BACKENDS: usize = 4;
/// The storm: this many reloads, one every `RELOAD_EVERY` (100 in 10 s).
const RELOADS: usize = 100;
const RELOAD_EVERY: Duration = Duration::from_millis(100);
/// Held connections through the VIP, echoing every 10 ms across the storm.
const HELD: usize = 50;
const ECHO_EVERY: Duration = Duration::from_millis(10);
const CONNECT_TIMEOUT: Scaled = Scaled::secs(2);
const READY: Scaled = Scaled::secs(10);
/// How often the live generation is read while waiting for a reload (a period, not a bound).
const POLL: Duration = Duration::from_millis(2);

fn pin_path(test: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/agt-reload-{test}"))
}

struct Lab {
    /// First: dropped (`agent uninstall`) while the namespaces and the policy file exist.
    _guard: Uninstall,
    topo: Topology,
    backends: Vec<SocketAddr>,
    _servers: Vec<TcpServer>,
    dir: TempDir,
    config: PathBuf,
    pin: PathBuf,
}

impl Lab {
    fn new(test: &str) -> Lab {
        agent_bin().unwrap_or_else(|e| panic!("{e:#}"));
        let mut topo = Topology::new().expect("topology");
        let (backends, servers) =
            tcp_backends(&mut topo, BACKENDS, BACKEND_PORT).expect("backends");
        for vip in [VIP, VIP_ADMIN, VIP_OPS] {
            topo.add_vip(vip.into()).expect("VIP");
        }
        let dir = TempDir::new().expect("temp dir");
        let pin = pin_path(test);
        let config = dir.write("policy.yaml", "").expect("policy file");
        let guard = Uninstall::guard(&topo.client, &config, &pin).expect("uninstall guard");
        Lab {
            topo,
            backends,
            _servers: servers,
            dir,
            config,
            pin,
            _guard: guard,
        }
    }

    fn head(&self, extra_agent: &str) -> String {
        format!(
            "version: 1\n\
             agent:\n  listen: 127.0.0.1:9090\n  pin_path: {pin}\n{extra_agent}\
             interfaces:\n  - name: {ifname}\n    xdp_mode: generic\n    direction: both\n\
             services:\n",
            pin = self.pin.display(),
            ifname = self.topo.client_if,
        )
    }

    fn backends(&self, which: &[usize]) -> String {
        which
            .iter()
            .map(|&i| format!("      - address: \"{}\"\n", self.backends[i]))
            .collect()
    }

    /// Policy A: `web` (maglev over b0, b1, with a TCP health check and a breaker),
    /// `admin` (round robin over b2, b3), a rate-limited prefix nobody sends to.
    fn policy_a(&self) -> String {
        format!(
            "{head}\
             \x20 - name: web\n    match: {{ address: \"{VIP}\", port: {VIP_PORT}, protocol: tcp }}\n\
             \x20   backends:\n{web}\
             \x20   load_balancing: {{ algorithm: maglev, table_size: 1009 }}\n\
             \x20   health_check: {{ type: tcp, interval: 200ms, unhealthy_interval: 200ms, timeout: 100ms }}\n\
             \x20   circuit_breaker: {{ failure_threshold: 5 }}\n\
             \x20 - name: admin\n    match: {{ address: \"{VIP_ADMIN}\", port: {VIP_PORT}, protocol: tcp }}\n\
             \x20   backends:\n{admin}\
             \x20   load_balancing: {{ algorithm: weighted_round_robin }}\n\
             \x20 - name: quiet-a\n    match: {{ address: 198.18.9.0/24, protocol: udp }}\n\
             \x20   rate_limit: {{ key: source_ip, rate: 1000/s, max_keys: 1000 }}\n",
            head = self.head(""),
            web = self.backends(&[0, 1]),
            admin = self.backends(&[2, 3]),
        )
    }

    /// Policy B: a service inserted before `web`; `web` on least_conn over b0, b1, b2 with no
    /// health check; `admin` gone; `ops` new; another rate limit.
    fn policy_b(&self) -> String {
        format!(
            "{head}\
             \x20 - name: zeta\n    match: {{ address: 198.18.9.1, port: 53, protocol: udp }}\n\
             \x20   rate_limit: {{ key: flow, rate: 500/s, max_keys: 500 }}\n\
             \x20 - name: web\n    match: {{ address: \"{VIP}\", port: {VIP_PORT}, protocol: tcp }}\n\
             \x20   backends:\n{web}\
             \x20   load_balancing: {{ algorithm: least_conn }}\n\
             \x20   circuit_breaker: {{ failure_threshold: 10, on_open: drop }}\n\
             \x20 - name: ops\n    match: {{ address: \"{VIP_OPS}\", port: {VIP_PORT}, protocol: tcp }}\n\
             \x20   backends:\n{ops}\
             \x20   load_balancing: {{ algorithm: maglev, table_size: 211 }}\n",
            head = self.head(""),
            web = self.backends(&[0, 1, 2]),
            ops = self.backends(&[3]),
        )
    }

    /// Writes the policy whole: a new file renamed over the old one, so that neither the
    /// file watch nor a SIGHUP ever reads half of it.
    fn write(&self, policy: &str) -> &Path {
        let tmp = self.dir.write("policy.yaml.new", policy).expect("policy");
        std::fs::rename(&tmp, &self.config).expect("renaming the policy into place");
        &self.config
    }

    fn start(&self) -> AgentProcess {
        let mut a = AgentProcess::spawn_args(
            &agent_bin().expect("agent"),
            &self.topo.client,
            &self.config,
            &["--detach-on-exit"],
        )
        .expect("spawn");
        a.wait_ready(READY).expect("agent ready");
        a
    }

    /// TCP retransmissions so far, client and backends together.
    fn retrans(&self) -> u64 {
        self.topo.client.tcp_retrans_segs().expect("client TCP")
            + self.topo.server.tcp_retrans_segs().expect("server TCP")
    }
}

/// The live generation of the maps as the agent reads them (`/policy/datapath`).
fn live(agent: &AgentProcess) -> Value {
    let (code, body) = agent.get("/policy/datapath").expect("/policy/datapath");
    assert_eq!(code, 200, "/policy/datapath: {body}");
    serde_json::from_str(&body).expect("JSON")
}

fn generation(agent: &AgentProcess) -> u64 {
    live(agent)["generation"].as_u64().expect("generation")
}

/// Writes `policy`, sends SIGHUP and waits for the live generation to flip (the new policy
/// in force: the file watch or the SIGHUP, whichever came first, applied it; the other finds
/// it unchanged).
fn reload_to(lab: &Lab, agent: &AgentProcess, policy: &str) -> Duration {
    let before = generation(agent);
    let start = Instant::now();
    lab.write(policy);
    agent.reload().expect("SIGHUP");
    match poll(
        start,
        RELOAD_STAGED,
        POLL,
        || generation(agent),
        |g| *g != before,
    ) {
        Ok((took, _)) => took,
        Err(g) => panic!(
            "the reload was not in force within {RELOAD_STAGED} (generation still {g}); log:\n{}",
            agent.log_text()
        ),
    }
}

/// New short connections through the VIP, one after another, until stopped: each connects,
/// echoes 16 bytes and closes. Returns (exchanges, failures with their first error).
fn short_connections(
    lab: &Lab,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    let vip = SocketAddr::new(VIP.into(), VIP_PORT);
    lab.topo
        .client
        .spawn(move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let r = (|| -> std::io::Result<()> {
                    let mut s = TcpStream::connect_timeout(&vip, CONNECT_TIMEOUT.get())?;
                    s.set_read_timeout(Some(ECHO_TIMEOUT.get()))?;
                    s.write_all(b"0123456789abcdef")?;
                    let mut buf = [0u8; 16];
                    s.read_exact(&mut buf)?;
                    if &buf != b"0123456789abcdef" {
                        return Err(std::io::Error::other("wrong echo"));
                    }
                    Ok(())
                })();
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
        .expect("client thread")
}

/// Waits until the agent's log says `phrase` (a reload's outcome), within [`RELOAD_STAGED`].
fn wait_log(agent: &AgentProcess, phrase: &str) {
    let said = poll(
        Instant::now(),
        RELOAD_STAGED,
        POLL,
        || agent.log_text(),
        |log| log.contains(phrase),
    );
    assert!(
        said.is_ok(),
        "the log does not say `{phrase}` within {RELOAD_STAGED}:\n{}",
        agent.log_text()
    );
}

/// Without `generation`, which a fresh agent and a reloaded one may not share.
fn contents(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("generation");
    }
    v
}

#[test]
fn a_reload_storm_loses_no_packet_and_ends_where_a_fresh_start_would() {
    let lab = Lab::new("storm");
    lab.write(&lab.policy_a());
    let agent = lab.start();
    let vip = SocketAddr::new(VIP.into(), VIP_PORT);
    let held = EchoLoad::start(
        &lab.topo.client,
        vip,
        HELD,
        ECHO_EVERY,
        CONNECT_TIMEOUT.get(),
        ECHO_TIMEOUT.get(),
    )
    .expect("held connections through the VIP");
    let stop = Arc::new(AtomicBool::new(false));
    let shorts = short_connections(&lab, stop.clone());
    let retrans_before = lab.retrans();

    let (a, b) = (lab.policy_a(), lab.policy_b());
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..RELOADS {
        let due = start + RELOAD_EVERY * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        slowest = slowest.max(reload_to(&lab, &agent, if i % 2 == 0 { &b } else { &a }));
    }
    let storm = start.elapsed();
    // Let the last policy carry traffic for a moment before counting.
    std::thread::sleep(RELOAD_EVERY);
    stop.store(true, Ordering::SeqCst);
    let (exchanges, failures) = shorts.join().expect("client thread");
    let report = held.finish();
    let retrans = lab.retrans() - retrans_before;
    println!(
        "{RELOADS} reloads in {storm:?} (slowest in force after {slowest:?}); {exchanges} new \
         connections, {} failed; held: {} connections, {} echoes, slowest {:?}, {} broken, {} \
         echo errors; {retrans} TCP retransmissions",
        failures.len(),
        report.connections,
        report.echoes,
        report.max_latency,
        report.broken,
        report.echo_errors,
    );
    timing::require(
        storm <= timing::scaled(RELOAD_EVERY * RELOADS as u32 + RELOAD_EVERY * 10),
        || format!("{RELOADS} reloads took {storm:?}, not the storm's 10 s"),
    );
    assert!(
        failures.is_empty(),
        "new connections failed: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(exchanges > 0, "no new connection was made during the storm");
    assert_eq!(
        (report.broken, report.echo_errors),
        (0, 0),
        "held connections: {:?}",
        report.failures
    );
    assert_eq!(
        retrans, 0,
        "packets of in-policy flows were lost (TCP retransmitted)"
    );

    // The last policy written was A (i = 99 is odd). Its state in the maps must be what a
    // fresh start on A writes.
    let reloaded = contents(live(&agent));
    let log = agent.log_text();
    agent.stop().expect("stop");
    let fresh_agent = lab.start();
    let fresh = contents(live(&fresh_agent));
    assert_eq!(
        reloaded, fresh,
        "the reloaded datapath differs from a fresh start on the same policy; reloaded agent's log:\n{log}"
    );
    assert!(
        reloaded["services"].get("web").is_some() && reloaded["services"].get("zeta").is_none(),
        "the final policy is A: {reloaded}"
    );
    fresh_agent.stop().expect("stop");
}

#[test]
fn reloading_the_same_policy_writes_nothing() {
    let lab = Lab::new("same");
    lab.write(&lab.policy_a());
    let agent = lab.start();
    let before = live(&agent);
    agent.reload().expect("SIGHUP");
    wait_log(&agent, "the policy is unchanged, nothing written");
    assert_eq!(
        live(&agent),
        before,
        "an unchanged policy moved the datapath"
    );
    agent.stop().expect("stop");
}

#[test]
fn a_reload_that_cannot_be_staged_leaves_the_datapath_as_it_was() {
    let lab = Lab::new("unstaged");
    // Room for 4 balanced backends: `web` holds 3; a new set of 3 must be written beside the
    // live one before the switch, and 6 do not fit.
    let tables = "  tables: { backends: 4 }\n";
    let web = |which: &[usize]| {
        format!(
            "{head}\
             \x20 - name: web\n    match: {{ address: \"{VIP}\", port: {VIP_PORT}, protocol: tcp }}\n\
             \x20   backends:\n{list}\
             \x20   load_balancing: {{ algorithm: maglev, table_size: 1009 }}\n\
             \x20 - name: limited\n    match: {{ address: 198.18.9.0/24, protocol: udp }}\n\
             \x20   rate_limit: {{ key: source_ip, rate: 1000/s, max_keys: {keys} }}\n",
            head = lab.head(tables),
            list = lab.backends(which),
            keys = 1000,
        )
    };
    lab.write(&web(&[0, 1, 2]));
    let agent = lab.start();
    let before = live(&agent);

    // The balanced set does not fit beside the live one.
    lab.write(&web(&[1, 2, 3]));
    agent.reload().expect("SIGHUP");
    wait_log(&agent, "no free run of 3 LB indices for service \"web\"");
    assert_eq!(
        live(&agent),
        before,
        "a refused reload changed the datapath"
    );

    // The key table was made for 1,000 keys: 2,000 do not fit in it.
    let bigger = web(&[0, 1, 2]).replace("max_keys: 1000", "max_keys: 2000");
    lab.write(&bigger);
    agent.reload().expect("SIGHUP");
    wait_log(
        &agent,
        "more than the 1000 entries the running RL_BUCKETS table was made with",
    );
    assert_eq!(
        live(&agent),
        before,
        "a refused reload changed the datapath"
    );

    // Still enforcing and balancing: a connection through the VIP works.
    let vip = SocketAddr::new(VIP.into(), VIP_PORT);
    lab.topo
        .client
        .run(move || TcpStream::connect_timeout(&vip, CONNECT_TIMEOUT.get()))
        .expect("client")
        .expect("a connection through the VIP after the refusals");
    agent.stop().expect("stop");
}

#[test]
fn interfaces_are_attached_and_detached_live() {
    use agent_tests::pins::xdp_prog_id;
    let lab = Lab::new("interfaces");
    // A second interface in the agent's namespace, up (a veth pair: the kernel may lack
    // the dummy driver).
    let extra = "agtx0";
    lab.topo
        .client
        .ip(&[
            "link", "add", extra, "type", "veth", "peer", "name", "agtx1",
        ])
        .expect("a second interface");
    for i in [extra, "agtx1"] {
        lab.topo
            .client
            .ip(&["link", "set", i, "up"])
            .expect("interface up");
    }
    let a = lab.policy_a();
    let with_extra = a.replacen(
        "services:\n",
        &format!("  - name: {extra}\n    xdp_mode: generic\n    direction: both\nservices:\n"),
        1,
    );
    lab.write(&a);
    let agent = lab.start();
    // The kernel's view of XDP; the agent's of both hooks (bpftool of Debian 12 does not list
    // TCX links), and the link pins.
    let xdp_on = |i: &str| xdp_prog_id(&lab.topo.client, i).expect("bpftool net show");
    let hooks_on = |i: &str| -> Vec<String> {
        let status = agent.status().expect("status");
        (status.attachments.into_iter())
            .filter(|a| {
                a.contains(&format!(" {i} ")) || a.contains(&format!("@{i}")) || a.ends_with(i)
            })
            .collect()
    };
    let pins_on = |i: &str| -> Vec<String> {
        std::fs::read_dir(lab.pin.join("links"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(&format!("@{i}")))
                    .collect()
            })
            .unwrap_or_default()
    };
    let client_xdp = xdp_on(&lab.topo.client_if);
    assert!(client_xdp.is_some() && xdp_on(extra).is_none());
    assert!(hooks_on(extra).is_empty() && pins_on(extra).is_empty());

    reload_to(&lab, &agent, &with_extra);
    assert_eq!(
        xdp_on(extra),
        client_xdp,
        "the same XDP program on {extra} as on {} after the reload",
        lab.topo.client_if
    );
    let hooks = hooks_on(extra);
    assert_eq!(hooks.len(), 2, "XDP and TC egress on {extra}: {hooks:?}");
    assert!(
        pins_on(extra).iter().any(|p| p.starts_with("xdp@")),
        "{:?}",
        pins_on(extra)
    );

    reload_to(&lab, &agent, &a);
    assert_eq!(
        xdp_on(extra),
        None,
        "{extra} detached after the reload back"
    );
    assert!(hooks_on(extra).is_empty(), "{:?}", hooks_on(extra));
    assert!(
        pins_on(extra).is_empty(),
        "link pins left: {:?}",
        pins_on(extra)
    );
    assert_eq!(
        xdp_on(&lab.topo.client_if),
        client_xdp,
        "{} untouched",
        lab.topo.client_if
    );

    // A mode the kernel cannot change on an attached XDP program is refused, with the reason.
    let native = a.replacen("xdp_mode: generic", "xdp_mode: native", 1);
    lab.write(&native);
    let before = live(&agent);
    agent.reload().expect("SIGHUP");
    wait_log(
        &agent,
        "interfaces[0].xdp_mode: the kernel cannot change the mode",
    );
    assert_eq!(live(&agent), before);
    agent.stop().expect("stop");
}

/// A breaker opened on a hung backend, then a reload that inserts a service before its own
/// (every policy-order id after it would move): the breaker stays open, its backend stays
/// unhealthy, counters and ids stay, and the datapath goes on refusing new flows to it.
#[test]
fn breakers_health_and_counters_survive_a_reload_that_inserts_a_service() {
    use agent_tests::backend::Blackhole;
    use agent_tests::breaker::BackendView;
    const INTERVAL: Scaled = Scaled::millis(200);
    const TIMEOUT: Scaled = Scaled::millis(100);
    const FAILURES: u32 = 3;
    const SLACK: Scaled = Scaled::millis(100);
    let lab = Lab::new("breaker");
    let backend = lab.backends[0];
    let pay = format!(
        "\x20 - name: pay\n    match: {{ address: \"{ip}\", port: {BACKEND_PORT}, protocol: tcp }}\n\
         \x20   backends:\n      - address: \"{backend}\"\n\
         \x20   load_balancing: {{ vip: false }}\n\
         \x20   health_check: {{ type: tcp, interval: {i}, unhealthy_interval: {i}, timeout: {t}, \
         healthy_threshold: 2, unhealthy_threshold: {FAILURES}, jitter: 0% }}\n\
         \x20   circuit_breaker: {{ failure_threshold: {FAILURES}, reset_timeout: 60s, \
         max_reset_timeout: 60s, on_open: reject }}\n",
        ip = backend.ip(),
        i = INTERVAL.yaml(),
        t = TIMEOUT.yaml(),
    );
    // Room in the key table for the rate limit the reload adds (sized at start).
    let head = lab.head("  tables: { keys: 1000 }\n");
    let before_policy = format!("{head}{pay}");
    let inserted = format!(
        "{head}\x20 - name: first\n    match: {{ address: 198.18.9.0/24, protocol: udp }}\n\
         \x20   rate_limit: {{ key: source_ip, rate: 1000/s, max_keys: 100 }}\n{pay}"
    );
    lab.write(&before_policy);
    let agent = lab.start();
    let view = BackendView::new(&agent, "pay", backend);
    view.wait("first successful probe", Instant::now(), READY, |s| {
        s.probes().0 >= 1 && s.state() == Some("closed")
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let hole = Blackhole::add(&lab.topo.server, backend.ip()).unwrap_or_else(|e| panic!("{e:#}"));
    view.wait_state(
        "open",
        Instant::now(),
        INTERVAL * FAILURES + TIMEOUT + SLACK,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // A refused SYN counts on the backend and on the service.
    let refused = || {
        lab.topo
            .client
            .run(move || TcpStream::connect_timeout(&backend, CONNECT_TIMEOUT.get()))
            .expect("client")
            .map(|_| ())
            .map_err(|e| e.kind())
    };
    assert_eq!(refused(), Err(std::io::ErrorKind::ConnectionRefused));
    let status = |a: &AgentProcess| {
        let r = a.status().expect("status");
        let b = (r.backends.iter())
            .find(|b| b.service == "pay")
            .cloned()
            .expect("pay's backend");
        let s = (r.services.iter())
            .find(|s| s.name == "pay")
            .cloned()
            .expect("pay");
        (b, s)
    };
    let (b0, s0) = status(&agent);

    reload_to(&lab, &agent, &inserted);
    let (b1, s1) = status(&agent);
    assert_eq!(
        b1.breaker.as_deref(),
        Some("open"),
        "after the reload: {b1:?}"
    );
    assert_eq!(b1.health, "unhealthy", "after the reload: {b1:?}");
    assert!(
        b1.in_state_ms >= b0.in_state_ms,
        "the open period went on ({} ms, then {} ms)",
        b0.in_state_ms,
        b1.in_state_ms
    );
    assert_eq!(
        b1.transitions, b0.transitions,
        "no transition from the reload"
    );
    assert_eq!(b1.id, b0.id, "the breaker's datapath id stays");
    assert!(
        b1.probes_failed >= b0.probes_failed,
        "probe counters carried"
    );
    assert_eq!(
        s1.id, s0.id,
        "pay keeps its service id though a service came before it"
    );
    // The agent's probes leave through the TC hook and count as `pay`'s: under an id that
    // moved, its counters would start over.
    assert!(
        s0.passed.packets > 0 && s1.passed.packets >= s0.passed.packets,
        "pay's counters carried: {} then {}",
        s0.passed.packets,
        s1.passed.packets
    );
    assert_eq!(refused(), Err(std::io::ErrorKind::ConnectionRefused));
    let (b2, _) = status(&agent);
    assert!(
        b2.datapath.get("reject_rst").copied().unwrap_or(0)
            > b0.datapath.get("reject_rst").copied().unwrap_or(0),
        "the datapath refused the SYN after the reload: {:?} then {:?}",
        b0.datapath,
        b2.datapath
    );
    drop(hole);
    agent.stop().expect("stop");
}
