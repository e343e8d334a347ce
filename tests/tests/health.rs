//! Health checks and circuit breakers end to end: the agent (server namespace) probes real TCP
//! backends in the client namespace across the veth; backends are killed and restored, and the
//! breaker states are read from `/metrics` with deadlines derived from the policy.
//!
//! This covers the agent side of issue 3 (probes -> breaker -> visibility). Enforcement of the
//! breaker in the datapath (RST/drop toward an open backend) is not built yet.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use agent_tests::{
    agent::{AgentProcess, TempDir, agent_bin},
    backend::TcpServer,
    breaker::Scrape,
    netns::Topology,
    timing::Scaled,
    wait::wait_until,
};

// The policy's timings, and every bound computed from them, scale together (the probes get
// as much more time as the bounds do), so the bounds keep their meaning on a slow machine.
const INTERVAL: Scaled = Scaled::millis(200);
const TIMEOUT: Scaled = Scaled::millis(100);
const UNHEALTHY_THRESHOLD: u32 = 3;
const SUCCESS_THRESHOLD: u32 = 2;
const RESET_TIMEOUT: Scaled = Scaled::secs(1);
const MAX_RESET_TIMEOUT: Scaled = Scaled::secs(4);
/// Scrape and scheduling slack on a loaded 2-core machine.
const SLACK: Scaled = Scaled::millis(100);
/// Set-up waits that are not under test (the first probes after start).
const SETUP: Scaled = Scaled::secs(5);
/// How often a condition is checked while waiting on it.
const POLL: Duration = Duration::from_millis(10);

fn policy(topo: &Topology, backends: &[SocketAddr]) -> String {
    let list: String = backends
        .iter()
        .map(|b| format!("      - address: {b}\n"))
        .collect();
    format!(
        "version: 1\n\
         agent:\n  listen: 127.0.0.1:9090\n\
         interfaces:\n  - name: {ifname}\n    xdp_mode: generic\n    direction: ingress\n\
         services:\n  - name: pay\n    match: {{ address: {vip}/32, port: 8443 }}\n    backends:\n{list}\
         \x20   load_balancing: {{ vip: false }}\n\
         \x20   health_check:\n      interval: {interval}\n      unhealthy_interval: {interval}\n      timeout: {timeout}\n\
         \x20     healthy_threshold: 2\n      unhealthy_threshold: {UNHEALTHY_THRESHOLD}\n      jitter: 0%\n\
         \x20   circuit_breaker:\n      failure_threshold: {UNHEALTHY_THRESHOLD}\n      reset_timeout: {reset}\n\
         \x20     max_reset_timeout: {max_reset}\n      success_threshold: {SUCCESS_THRESHOLD}\n\
         \x20     max_ejection_percent: 50%\n",
        ifname = topo.server_if,
        vip = topo.server_v4,
        interval = INTERVAL.yaml(),
        timeout = TIMEOUT.yaml(),
        reset = RESET_TIMEOUT.yaml(),
        max_reset = MAX_RESET_TIMEOUT.yaml(),
    )
}

/// One scrape for `backend`; an unreadable `/metrics` reads as nothing exported.
fn scrape(agent: &AgentProcess, backend: SocketAddr) -> Scrape {
    Scrape::new(agent.metrics().unwrap_or_default(), "pay", backend)
}

fn breaker_is(agent: &AgentProcess, backend: SocketAddr, state: &str) -> bool {
    scrape(agent, backend).is_state(state)
}

fn healthy(agent: &AgentProcess, backend: SocketAddr) -> Option<f64> {
    scrape(agent, backend).healthy()
}

/// Backend addresses: the client namespace, seen across the veth from the agent's.
fn start_backend(topo: &Topology, addr: SocketAddr) -> TcpServer {
    TcpServer::start(&topo.client, addr).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn breaker_opens_on_a_killed_backend_and_closes_after_restore() {
    agent_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let topo = Topology::new().expect("topology");
    let addrs: Vec<SocketAddr> = [18081u16, 18082]
        .iter()
        .map(|p| SocketAddr::new(topo.client_v4.into(), *p))
        .collect();
    let mut backends: Vec<TcpServer> = addrs.iter().map(|a| start_backend(&topo, *a)).collect();
    let dir = TempDir::new().unwrap();
    let config = dir.write("health.yaml", &policy(&topo, &addrs)).unwrap();
    let agent = AgentProcess::start(&topo.server, &config).expect("agent start");

    // Both closed and healthy once the first probes came back.
    wait_until("both backends probed healthy", SETUP, POLL, || {
        addrs.iter().all(|a| healthy(&agent, *a) == Some(1.0))
    });
    assert!(addrs.iter().all(|a| breaker_is(&agent, *a, "closed")));

    // Kill one: open within unhealthy_threshold x interval + timeout (+ slack).
    let open_bound = INTERVAL * UNHEALTHY_THRESHOLD + TIMEOUT + SLACK;
    backends[0].stop();
    let took = wait_until(
        "breaker of the killed backend open",
        open_bound,
        POLL,
        || breaker_is(&agent, addrs[0], "open"),
    );
    eprintln!("time to open: {took:?} (bound {open_bound})");
    assert!(
        breaker_is(&agent, addrs[1], "closed"),
        "the live backend's breaker must stay closed"
    );

    // Restore it: closed within the longest reset timeout + success_threshold probes.
    backends[0] = start_backend(&topo, addrs[0]);
    let close_bound = MAX_RESET_TIMEOUT + INTERVAL * SUCCESS_THRESHOLD + TIMEOUT + SLACK;
    let took = wait_until(
        "breaker of the restored backend closed",
        close_bound,
        POLL,
        || breaker_is(&agent, addrs[0], "closed"),
    );
    eprintln!("time to close after restore: {took:?} (bound {close_bound})");

    // Kill both: max_ejection_percent 50% of 2 backends lets only one open.
    for b in &mut backends {
        b.stop();
    }
    wait_until("both backends probed unhealthy", open_bound, POLL, || {
        addrs.iter().all(|a| healthy(&agent, *a) == Some(0.0))
    });
    // Watch for three more probe intervals, longer than a breaker needs to open: at no sample
    // may both be ejected, and one must be.
    let ejected = || {
        addrs
            .iter()
            .filter(|a| breaker_is(&agent, **a, "open") || breaker_is(&agent, **a, "half_open"))
            .count()
    };
    let watch = Instant::now();
    let mut last = 0;
    while watch.elapsed() < (INTERVAL * 3).get() {
        last = ejected();
        assert!(
            last <= 1,
            "with every backend dead, max_ejection_percent 50% of 2 allows one ejected, saw {last}"
        );
        std::thread::sleep(POLL);
    }
    assert_eq!(last, 1, "one of the two dead backends must be ejected");
    let status = agent.get("/status").expect("status");
    assert!(
        status.1.contains("\"breaker\""),
        "status lists backends: {}",
        status.1
    );
}
