//! Breakers survive the agent (issue 10): an agent killed with SIGKILL leaves its programs
//! enforcing on the pinned maps, and the agent that adopts those pins takes up every
//! breaker where the dead one left it, in `/status` from its first answer.
//!
//! Same setup as breaker.rs: the agent in the client namespace on the client veth
//! (`direction: both`, generic XDP), the backend a real server in the server namespace on an
//! address of its own, hung by a policy-routing blackhole on that address.
//!
//! Root only; run serially: `cargo test -p agent-tests --test adopt_breaker -- --test-threads=1`.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent_tests::{
    agent::{AgentProcess, READY_TIMEOUT, TempDir, agent_bin},
    backend::{Blackhole, TcpServer},
    breaker::BackendView,
    netns::{Netns, Topology},
    timing::Scaled,
};

/// Set-up waits that are not under test (first probe after start).
const SETUP: Scaled = Scaled::secs(5);
/// Probes every 200 ms with a 100 ms timeout; the breaker opens on the third failure.
const INTERVAL: Scaled = Scaled::millis(200);
const TIMEOUT: Scaled = Scaled::millis(100);
const FAILURES: u32 = 3;
/// The open period: longer than killing one agent and starting the next takes, so the
/// breaker is still in it when the second agent starts.
const RESET: Scaled = Scaled::secs(60);
/// Scrape and scheduling slack on a loaded 2-core machine (as in breaker.rs).
const SLACK: Scaled = Scaled::millis(100);
/// How long the new agent's `/status` is watched after its first answer.
const WATCH: Duration = Duration::from_secs(1);
const SERVICE: &str = "pay";
const PORT: u16 = 8080;

fn policy(ifname: &str, backend: SocketAddr, pins: &Path) -> String {
    format!(
        "version: 1\n\
         agent:\n  listen: 127.0.0.1:9090\n  pin_path: {pins}\n\
         interfaces:\n  - name: {ifname}\n    xdp_mode: generic\n    direction: both\n\
         services:\n\
         \x20 - name: {SERVICE}\n\
         \x20   match:\n      address: \"198.18.0.100/32\"\n      port: {PORT}\n      protocol: tcp\n\
         \x20   backends:\n      - address: \"{backend}\"\n\
         \x20   load_balancing:\n      vip: false\n\
         \x20   health_check:\n      type: tcp\n      interval: {interval}\n\
         \x20     unhealthy_interval: {interval}\n      timeout: {timeout}\n\
         \x20     healthy_threshold: 2\n      unhealthy_threshold: {FAILURES}\n      jitter: 0%\n\
         \x20   circuit_breaker:\n      failure_threshold: {FAILURES}\n      reset_timeout: {reset}\n\
         \x20     max_reset_timeout: {reset}\n      half_open_max_flows: 3\n\
         \x20     success_threshold: 2\n      on_open: reject\n",
        pins = pins.display(),
        interval = INTERVAL.yaml(),
        timeout = TIMEOUT.yaml(),
        reset = RESET.yaml(),
    )
}

/// A pin directory of this test's own on bpffs; whatever the agents leave there (they leave
/// their datapath running on exit) is removed on drop: `agent uninstall` first, the files
/// themselves if that fails.
struct Pins {
    path: PathBuf,
    uninstall: Option<(Netns, PathBuf)>,
}

impl Pins {
    fn new() -> Pins {
        Pins {
            path: PathBuf::from(format!(
                "/sys/fs/bpf/agent-test-adopt-{}",
                std::process::id()
            )),
            uninstall: None,
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let (Some((ns, config)), Ok(bin)) = (&self.uninstall, agent_bin()) {
            let mut cmd = Command::new(bin);
            cmd.arg("uninstall")
                .arg("--config")
                .arg(config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            match ns
                .spawn_process(&mut cmd)
                .and_then(|c| Ok(c.wait_with_output()?))
            {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "warning: agent uninstall exited {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("warning: agent uninstall: {e:#}"),
            }
        }
        if self.path.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.path)
        {
            eprintln!("warning: removing {}: {e}", self.path.display());
        }
    }
}

/// The backend's breaker and time in state in one `/status` answer.
fn breaker_in_status(agent: &AgentProcess, backend: SocketAddr) -> Option<(String, u64)> {
    let report = agent.status().ok()?;
    let b = report
        .backends
        .iter()
        .find(|b| b.service == SERVICE && b.address == backend.to_string())?;
    Some((b.breaker.clone()?, b.in_state_ms))
}

#[test]
fn an_open_breaker_is_open_from_the_first_status_of_the_agent_that_adopts_its_pins() {
    let bin = agent_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let mut topo = Topology::new().expect("topology");
    let ip: IpAddr = topo.add_server_v4(1).expect("server address")[0].into();
    let backend = SocketAddr::new(ip, PORT);
    let _server = TcpServer::start(&topo.server, backend).unwrap_or_else(|e| panic!("{e:#}"));
    let dir = TempDir::new().expect("temp dir");
    let mut pins = Pins::new();
    let text = policy(&topo.client_if, backend, &pins.path);
    let config = dir.write("adopt.yaml", &text).expect("policy file");
    pins.uninstall = Some((topo.client.handle(), config.clone()));

    // The first agent: the backend probed closed, then hung until its breaker opens.
    let first = AgentProcess::start(&topo.client, &config)
        .unwrap_or_else(|e| panic!("starting the agent with\n{text}\n{e:#}"));
    let view = BackendView::new(&first, SERVICE, backend);
    view.wait("first successful probe", Instant::now(), SETUP, |s| {
        s.probes().0 >= 1 && s.state() == Some("closed")
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let _hole = Blackhole::add(&topo.server, backend.ip()).unwrap_or_else(|e| panic!("{e:#}"));
    let open_bound = INTERVAL * FAILURES + TIMEOUT + SLACK;
    view.wait_state("open", Instant::now(), open_bound)
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Opened at or before this instant.
    let t_open = Instant::now();
    let first_log = first.log_text();

    let status = first.kill().expect("SIGKILL the first agent");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the first agent must die of SIGKILL, not exit ({status})"
    );

    // The second agent on the same pins, the backend still hung.
    let mut second = AgentProcess::spawn(&bin, &topo.client, &config).expect("spawning");
    second
        .wait_ready(READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n---- first agent's output ----\n{first_log}"));
    let log = second.log_text();
    assert!(
        log.contains("adopted pins at"),
        "the second agent must adopt the first one's pins at {}; its output:\n{log}",
        pins.path.display()
    );
    // Every answer from the first one on: open, and open since the first agent opened it.
    let mut seen = Vec::new();
    let mut first_answer: Option<Instant> = None;
    while first_answer.is_none_or(|t| t.elapsed() < WATCH) {
        let floor = t_open.elapsed();
        if let Some((state, in_state_ms)) = breaker_in_status(&second, backend) {
            first_answer.get_or_insert_with(Instant::now);
            seen.push((state, in_state_ms, floor.as_millis() as u64));
        } else if first_answer.is_none() {
            second.check_running().unwrap_or_else(|e| panic!("{e:#}"));
            assert!(
                t_open.elapsed() < READY_TIMEOUT.get() + SETUP.get(),
                "no /status answer with the backend {backend} from the second agent"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "second agent's /status (breaker, in_state_ms, ms since the first agent saw it open): \
         {:?} ... {} answers",
        seen.first(),
        seen.len()
    );
    let wrong: Vec<_> = seen.iter().filter(|(s, _, _)| s != "open").collect();
    assert!(
        wrong.is_empty(),
        "every /status of the second agent must show the breaker open (its open period of \
         {RESET} is not over); saw {wrong:?} of {} answers",
        seen.len()
    );
    let (_, in_state_ms, floor_ms) = &seen[0];
    assert!(
        in_state_ms >= floor_ms,
        "open since the first agent opened it ({floor_ms} ms ago at least), not since the \
         second one started: in_state_ms {in_state_ms}"
    );
    let log = second.log_text();
    assert!(
        log.contains("adopted 1 breakers not closed from the datapath: 1 open, 0 half_open"),
        "the second agent logs the breaker it adopted open; its output:\n{log}"
    );
    let status = second.stop().expect("stopping the second agent");
    assert!(
        status.success(),
        "the second agent exits 0 on SIGTERM: {status}"
    );
}
