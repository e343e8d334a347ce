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
/// A long open period: longer than killing one agent and starting the next takes, so the
/// breaker is still in it when the second agent starts.
const LONG_RESET: Scaled = Scaled::secs(60);
/// A short one, over before the second agent starts.
const SHORT_RESET: Scaled = Scaled::secs(2);
/// Scrape and scheduling slack on a loaded 2-core machine (as in breaker.rs).
const SLACK: Scaled = Scaled::millis(100);
/// How long the new agent's `/status` is watched after its first answer.
const WATCH: Duration = Duration::from_secs(1);
const SERVICE: &str = "pay";
const PORT: u16 = 8080;

fn policy(ifname: &str, backend: SocketAddr, pins: &Path, reset: Scaled) -> String {
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
        reset = reset.yaml(),
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

/// One `/status` answer's view of the backend, and how long before it (at least) the first
/// agent had opened the breaker.
#[derive(Debug)]
struct Seen {
    breaker: String,
    in_state_ms: u64,
    opened_ms_ago: u64,
    transitions: Vec<(String, u64)>,
}

/// A breaker opened by the first agent, which was then killed with SIGKILL; the backend
/// still hung. Fields drop in order: the pins (uninstalled in the client namespace) before
/// the topology.
struct Scene {
    pins: Pins,
    _hole: Blackhole,
    _server: TcpServer,
    config: PathBuf,
    _dir: TempDir,
    backend: SocketAddr,
    /// The first agent saw the breaker open at this instant (it opened at or before).
    t_open: Instant,
    first_log: String,
    topo: Topology,
}

impl Scene {
    fn open_and_kill(reset: Scaled) -> Scene {
        agent_bin().unwrap_or_else(|e| panic!("{e:#}"));
        let mut topo = Topology::new().expect("topology");
        let ip: IpAddr = topo.add_server_v4(1).expect("server address")[0].into();
        let backend = SocketAddr::new(ip, PORT);
        let server = TcpServer::start(&topo.server, backend).unwrap_or_else(|e| panic!("{e:#}"));
        let dir = TempDir::new().expect("temp dir");
        let mut pins = Pins::new();
        let text = policy(&topo.client_if, backend, &pins.path, reset);
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
        let hole = Blackhole::add(&topo.server, backend.ip()).unwrap_or_else(|e| panic!("{e:#}"));
        let open_bound = INTERVAL * FAILURES + TIMEOUT + SLACK;
        view.wait_state("open", Instant::now(), open_bound)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let t_open = Instant::now();
        let first_log = first.log_text();
        let status = first.kill().expect("SIGKILL the first agent");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the first agent must die of SIGKILL, not exit ({status})"
        );
        Scene {
            pins,
            _hole: hole,
            _server: server,
            config,
            _dir: dir,
            backend,
            t_open,
            first_log,
            topo,
        }
    }

    /// The second agent on the same pins, ready, having adopted them.
    fn second_agent(&self) -> AgentProcess {
        let bin = agent_bin().unwrap_or_else(|e| panic!("{e:#}"));
        let mut second =
            AgentProcess::spawn(&bin, &self.topo.client, &self.config).expect("spawning");
        second.wait_ready(READY_TIMEOUT).unwrap_or_else(|e| {
            panic!("{e:#}\n---- first agent's output ----\n{}", self.first_log)
        });
        let log = second.log_text();
        assert!(
            log.contains("adopted pins at"),
            "the second agent must adopt the first one's pins at {}; its output:\n{log}",
            self.pins.path.display()
        );
        second
    }

    /// Every `/status` answer of `agent` about the backend from its first one on, for
    /// [`WATCH`].
    fn watch(&self, agent: &mut AgentProcess) -> Vec<Seen> {
        let mut seen = Vec::new();
        let mut first_answer: Option<Instant> = None;
        while first_answer.is_none_or(|t| t.elapsed() < WATCH) {
            let opened_ms_ago = self.t_open.elapsed().as_millis() as u64;
            match self.in_status(agent, opened_ms_ago) {
                Some(s) => {
                    first_answer.get_or_insert_with(Instant::now);
                    seen.push(s);
                }
                None if first_answer.is_none() => {
                    agent.check_running().unwrap_or_else(|e| panic!("{e:#}"));
                    assert!(
                        self.t_open.elapsed() < READY_TIMEOUT.get() + SETUP.get(),
                        "no /status answer with the backend {} from the second agent",
                        self.backend
                    );
                }
                None => {}
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "second agent's /status: first {:?}, last {:?}, {} answers",
            seen.first(),
            seen.last(),
            seen.len()
        );
        seen
    }

    fn in_status(&self, agent: &AgentProcess, opened_ms_ago: u64) -> Option<Seen> {
        let report = agent.status().ok()?;
        let b = report
            .backends
            .iter()
            .find(|b| b.service == SERVICE && b.address == self.backend.to_string())?;
        Some(Seen {
            breaker: b.breaker.clone()?,
            in_state_ms: b.in_state_ms,
            opened_ms_ago,
            transitions: b.transitions.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        })
    }
}

fn assert_logged(agent: &AgentProcess, line: &str) {
    let log = agent.log_text();
    assert!(
        log.contains(line),
        "the second agent must log `{line}`; its output:\n{log}"
    );
}

#[test]
fn an_open_breaker_is_open_from_the_first_status_of_the_agent_that_adopts_its_pins() {
    let scene = Scene::open_and_kill(LONG_RESET);
    let mut second = scene.second_agent();
    let seen = scene.watch(&mut second);
    let wrong: Vec<&Seen> = seen.iter().filter(|s| s.breaker != "open").collect();
    assert!(
        wrong.is_empty(),
        "every /status of the second agent must show the breaker open (its open period of \
         {LONG_RESET} is not over); saw {wrong:?} of {} answers",
        seen.len()
    );
    let first = &seen[0];
    assert!(
        first.in_state_ms >= first.opened_ms_ago,
        "open since the first agent opened it ({} ms ago at least), not since the second \
         one started: in_state_ms {}",
        first.opened_ms_ago,
        first.in_state_ms
    );
    assert_logged(
        &second,
        "adopted 1 breakers not closed from the datapath: 1 open, 0 half_open",
    );
    let status = second.stop().expect("stopping the second agent");
    assert!(
        status.success(),
        "the second agent exits 0 on SIGTERM: {status}"
    );
}

#[test]
fn an_open_period_that_ended_without_an_agent_goes_half_open_at_once() {
    let scene = Scene::open_and_kill(SHORT_RESET);
    // The open period ends while no agent runs: a deadline, not a guess.
    let over = scene.t_open + SHORT_RESET.get();
    while let Some(left) = over.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
    let mut second = scene.second_agent();
    let seen = scene.watch(&mut second);
    // Half-open at once; the hung backend's first trial probe fails and opens it again (for
    // twice the period, capped at max_reset_timeout): never closed in between.
    let closed: Vec<&Seen> = seen.iter().filter(|s| s.breaker == "closed").collect();
    assert!(
        closed.is_empty(),
        "the second agent must never show the breaker closed; saw {closed:?} of {} answers",
        seen.len()
    );
    let first = &seen[0];
    let half_opened = first
        .transitions
        .iter()
        .find(|(k, _)| k == "half_open/reset_timeout");
    assert!(
        matches!(half_opened, Some((_, 1))),
        "the first /status shows the breaker gone half-open once, on the open period's end: \
         {first:?}"
    );
    assert_logged(
        &second,
        "adopted 1 breakers not closed from the datapath: 0 open, 1 half_open",
    );
    let status = second.stop().expect("stopping the second agent");
    assert!(
        status.success(),
        "the second agent exits 0 on SIGTERM: {status}"
    );
}
