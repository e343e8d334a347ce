//! Least privilege, end to end: the agent runs as uid 0 with exactly CAP_BPF, CAP_NET_ADMIN
//! and CAP_PERFMON (what `deploy/systemd/agent.service` and the DaemonSet grant), every other
//! capability gone from its bounding set through `setpriv`, and does all it does with all of
//! them: XDP and TC egress, a rate limit, load balancing on a VIP, health checks with marked
//! probes, a breaker, `/metrics`; it pins under `agent.pin_path`, leaves the datapath on
//! SIGTERM, and the next agent under the same three adopts the pins; `agent uninstall` under
//! them removes everything. Without any one of the three it says which it lacks and exits 1
//! before loading anything.
//!
//! How the three were found (Linux 6.18, `setpriv --bounding-set=-all,+...`, this policy):
//! - without CAP_BPF, aya fails to create the first map (EPERM);
//! - without CAP_PERFMON, the verifier refuses `agent_xdp`: `R6 pointer -= pointer
//!   prohibited` (EACCES);
//! - without CAP_NET_ADMIN, loading the XDP program fails (EPERM); and with CAP_SYS_ADMIN in
//!   its place the datapath loads but every health probe fails (SO_MARK needs CAP_NET_ADMIN),
//!   which opens the breakers of healthy backends;
//! - pinning, adopting and unpinning on bpffs need nothing more: uid 0 owns /sys/fs/bpf and
//!   every pin, so no CAP_DAC_OVERRIDE; BPF_OBJ_PIN and BPF_OBJ_GET check file permissions
//!   only, beyond the CAP_BPF every bpf(2) call needs under kernel.unprivileged_bpf_disabled;
//! - CAP_SYS_RESOURCE is not needed (BPF memory is charged to the memory cgroup since 5.11,
//!   and the agent needs 5.12); CAP_SYS_ADMIN is not needed; CAP_NET_RAW is not (probes are
//!   plain TCP connects).
//!
//! Root only; run serially: `cargo test -p agent-tests --test privilege -- --test-threads=1`.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use agent_tests::agent::{READY_TIMEOUT, backend_items, limit_verdicts};
use agent_tests::backend::TcpServer;
use agent_tests::breaker::BackendView;
use agent_tests::timing::{self, Scaled};
use agent_tests::wait::wait_until;
use agent_tests::{
    AgentProcess, KeyCount, TempDir, Topology, UdpFlood, UdpReceiver, UdpSender, agent_bin,
    check_counts,
};

/// The capabilities the agent runs with, as `setpriv` names them, and their bits
/// (linux/capability.h): CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
const CAPS: [(&str, u32); 3] = [("net_admin", 12), ("perfmon", 38), ("bpf", 39)];
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const LIMITED_PORT: u16 = 5300;
/// The limit: 1,000/s with a burst of 500, flooded at 5x for 2 s from one flow. burst/rate
/// is 0.5 s: a stall of the sender shorter than that delays tokens without losing them.
const RATE: f64 = 1_000.0;
const BURST: u64 = 500;
const FLOOD_PPS: f64 = 5_000.0;
const FLOOD_TIME: Duration = Duration::from_secs(2);
/// ±3% on the flow's count, as in ratelimit.rs.
const TOLERANCE: f64 = 0.03;
/// Probes every 100 ms (failed after 50 ms), 2 failures make a backend unhealthy: bound on
/// seeing each verdict.
const HEALTH_WAIT: Scaled = Scaled::secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a condition is checked while waiting on it (a period, not a bound).
const POLL: Duration = Duration::from_millis(20);

/// `setpriv` arguments that exec the next program as the same uid 0 with exactly `caps`:
/// every other capability leaves the bounding set, and the inheritable and ambient sets are
/// emptied, so the program's permitted and effective sets are `caps`.
fn setpriv(caps: &[&str]) -> Vec<String> {
    let keep: String = caps.iter().map(|c| format!(",+{c}")).collect();
    vec![
        "setpriv".into(),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
        format!("--bounding-set=-all{keep}"),
        "--".into(),
    ]
}

/// A pin directory of this test's own, removed at the end (the agent leaves its pins when it
/// stops, by design).
struct PinDir(PathBuf);

impl PinDir {
    fn new(what: &str) -> PinDir {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/agt-priv-{what}-{}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The policy: a balanced service `web` on the VIP with health checks and breakers, and a
/// UDP service `limited` on the client's address, limited per flow.
fn policy(topo: &Topology, pins: &Path, backends: &[SocketAddr]) -> String {
    let list = backend_items(backends);
    format!(
        "version: 1\n\
         agent:\n  listen: 127.0.0.1:9090\n  pin_path: {pins}\n\
         interfaces:\n  - name: {ifname}\n    xdp_mode: generic\n    direction: both\n\
         services:\n\
         \x20 - name: web\n    match: {{ address: {VIP}/32, port: {VIP_PORT}, protocol: tcp }}\n\
         \x20   backends:\n{list}\
         \x20   load_balancing:\n      algorithm: maglev\n      table_size: 1009\n\
         \x20   health_check:\n      type: tcp\n      interval: 100ms\n      \
         unhealthy_interval: 100ms\n      timeout: 50ms\n      healthy_threshold: 1\n      \
         unhealthy_threshold: 2\n      jitter: 0%\n\
         \x20   circuit_breaker:\n      failure_threshold: 2\n      reset_timeout: 60s\n      \
         on_open: reject\n\
         \x20 - name: limited\n    match: {{ address: {client}/32, port: {LIMITED_PORT}, protocol: udp }}\n\
         \x20   rate_limit:\n      key: flow\n      rate: {RATE}/s\n      burst: {BURST}\n",
        pins = pins.display(),
        ifname = topo.client_if,
        client = topo.client_v4,
    )
}

/// The `Cap*` line `field` of /proc/PID/status, as a bit set.
fn cap_line(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let hex = text
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{path} has no {field} line"))
        .trim();
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{path} {field} {hex}: {e}"))
}

/// One TCP connection to the VIP from the client, established and closed.
fn connect_vip(topo: &Topology) -> std::io::Result<()> {
    let vip = SocketAddr::from((VIP, VIP_PORT));
    topo.client
        .run(move || TcpStream::connect_timeout(&vip, CONNECT_TIMEOUT).map(drop))
        .expect("running in the client namespace")
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn the_agent_does_everything_with_cap_bpf_net_admin_and_perfmon_only() {
    let bin = agent_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let mut topo = Topology::new().expect("topology");
    let backends: Vec<SocketAddr> = topo
        .add_server_v4(2)
        .expect("backend addresses")
        .into_iter()
        .map(|a| SocketAddr::new(a.into(), BACKEND_PORT))
        .collect();
    let mut servers: Vec<TcpServer> = backends
        .iter()
        .map(|b| TcpServer::start(&topo.server, *b).expect("backend"))
        .collect();
    topo.add_vip(VIP.into()).expect("VIP");
    let pins = PinDir::new("all");
    let dir = TempDir::new().expect("temp dir");
    let config = dir
        .write("policy.yaml", &policy(&topo, &pins.0, &backends))
        .expect("policy");

    let names: Vec<&str> = CAPS.iter().map(|(n, _)| *n).collect();
    // No --detach-on-exit: the pins are under test too.
    let mut agent = AgentProcess::spawn_under(&setpriv(&names), &bin, &topo.client, &config, &[])
        .expect("agent spawn");
    agent.wait_ready(READY_TIMEOUT).expect("agent ready");

    // It runs with exactly the three: nothing more is effective, nothing more can be had.
    let want: u64 = CAPS.iter().fold(0, |bits, (_, bit)| bits | 1 << bit);
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let have = cap_line(agent.pid(), field);
        assert_eq!(
            have, want,
            "the agent's {field} is {have:#018x}, not exactly CAP_BPF, CAP_NET_ADMIN and \
             CAP_PERFMON ({want:#018x})"
        );
    }

    // Health checks: the probes (marked with SO_MARK) succeed on both backends.
    for b in &backends {
        BackendView::new(&agent, "web", *b)
            .wait("a healthy verdict", Instant::now(), HEALTH_WAIT, |s| {
                s.probes().0 >= 2 && s.healthy() == Some(1.0) && s.state() == Some("closed")
            })
            .unwrap_or_else(|e| panic!("backend {b}: {e:#}"));
    }

    // Load balancing: TC egress sends connections to the VIP to the backends, XDP ingress
    // rewrites their answers back.
    let before: u64 = servers.iter().map(TcpServer::accepted).sum();
    for i in 0..20 {
        if let Err(e) = connect_vip(&topo) {
            panic!("connection {i} to the VIP: {e}");
        }
    }
    // Probes are connections too: at least the 20, once the servers have accepted them.
    let accepted = || servers.iter().map(TcpServer::accepted).sum::<u64>() - before;
    wait_until(
        "the backends accepting the 20 connections to the VIP",
        HEALTH_WAIT,
        POLL,
        || accepted() >= 20,
    );

    // The breaker: a backend that stops listening fails its probes, its breaker opens and
    // the VIP's connections all go to the other one.
    servers[0].stop();
    BackendView::new(&agent, "web", backends[0])
        .wait_state("open", Instant::now(), HEALTH_WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    // The balancer then takes it out of the VIP's table.
    let gone = backends[0].to_string();
    if let Err(e) = agent.wait_metric(
        "agent_lb_backend_effective_weight",
        &[("service", "web"), ("backend", &gone)],
        HEALTH_WAIT,
        |w| w == 0.0,
    ) {
        panic!("the backend whose breaker opened keeps its weight in the datapath: {e:#}");
    }
    let left = servers[1].accepted();
    for i in 0..10 {
        if let Err(e) = connect_vip(&topo) {
            panic!("connection {i} to the VIP with one backend open: {e}");
        }
    }
    wait_until(
        "the backend left accepting the 10 connections to the VIP",
        HEALTH_WAIT,
        POLL,
        || servers[1].accepted() - left >= 10,
    );

    // The rate limit: one flow from the server at 5x the limit into XDP ingress.
    let dst = SocketAddr::new(topo.client_v4.into(), LIMITED_PORT);
    let rx = UdpReceiver::start(&topo.client, dst).expect("receiver");
    let spec = UdpFlood::new(dst, topo.server_v4.into(), 1, FLOOD_PPS, FLOOD_TIME);
    let sent = UdpSender::new(&topo.server, spec)
        .expect("sender")
        .run()
        .expect("send");
    let got = rx.finish().expect("receive");
    if let Err(e) = sent.ensure_on_schedule(0.97) {
        panic!("the flood did not keep its schedule, so it tested another load: {e:#}");
    }
    let burst_time = Duration::from_secs_f64(BURST as f64 / RATE);
    timing::require(sent.max_lag < burst_time, || {
        format!(
            "the sender stalled for {:?}, longer than burst/rate = {burst_time:?}: tokens \
             overflowed the bucket and burst + rate x span no longer predicts the count",
            sent.max_lag
        )
    });
    let flow = &sent.flows[0];
    let count = KeyCount::limited(
        flow.src.to_string(),
        flow.sent,
        flow.span(),
        RATE,
        BURST as f64,
        got.from(&flow.src),
    );
    eprintln!(
        "one flow at 5x the limit: sent {} at {:.0} pps (max lag {:?}), received {} \
         (expected {:.0})",
        sent.sent, sent.achieved_pps, sent.max_lag, count.got, count.expected
    );
    check_counts("one flow at 5x the limit", &[count], TOLERANCE).unwrap_or_else(|e| {
        panic!("{e:#}");
    });

    // /metrics: the agent counts what its datapath passed and dropped.
    let text = agent.metrics().expect("GET /metrics");
    let (passed, dropped) = limit_verdicts(&text, "limited").unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        (passed, dropped),
        (got.packets, sent.sent - got.packets),
        "/metrics says passed {passed} and dropped {dropped}; the receiver got {} of {}",
        got.packets,
        sent.sent
    );

    // Pins: made under the three, left on SIGTERM, adopted by the next agent under the
    // three, removed by `agent uninstall` under the three.
    let log = agent.log_path().to_owned();
    let status = agent.stop().expect("agent stop");
    assert!(status.success(), "agent exited with {status} after SIGTERM");
    let text = std::fs::read_to_string(&log).expect("agent log");
    let pinned = format!("pinned at {}", pins.0.display());
    assert!(text.contains(&pinned), "no `{pinned}` in the log:\n{text}");
    let mut wanted = vec![
        "layout".to_owned(),
        "maps/RL_BUCKETS".to_owned(),
        "maps/BACKENDS".to_owned(),
        "maps/LB_CONNS".to_owned(),
        format!("links/xdp@{}", topo.client_if),
    ];
    if kernel_at_least(6, 6) {
        wanted.push(format!("links/tcx-egress@{}", topo.client_if));
    }
    for pin in &wanted {
        let path = pins.0.join(pin);
        assert!(
            path.exists(),
            "{} is not pinned after SIGTERM",
            path.display()
        );
    }
    assert!(
        xdp_attached(&topo),
        "the XDP program left with the agent; SIGTERM should leave it"
    );

    let mut agent = AgentProcess::spawn_under(&setpriv(&names), &bin, &topo.client, &config, &[])
        .expect("agent spawn");
    agent.wait_ready(READY_TIMEOUT).expect("second agent ready");
    let adopted = format!("adopted pins at {}", pins.0.display());
    assert!(
        agent.log_text().contains(&adopted),
        "the second agent did not say `{adopted}`:\n{}",
        agent.log_text()
    );
    agent.metrics().expect("GET /metrics of the second agent");
    // From its first table on: the breaker of the backend that is down resumed open (its
    // 60 s period is not over), so no connection goes there.
    for i in 0..10 {
        if let Err(e) = connect_vip(&topo) {
            panic!("connection {i} to the VIP under the second agent: {e}");
        }
    }
    let status = agent.stop().expect("agent stop");
    assert!(status.success(), "agent exited with {status} after SIGTERM");

    let mut uninstall = Command::new("setpriv");
    uninstall
        .args(&setpriv(&names)[1..])
        .arg(&bin)
        .arg("uninstall")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = topo
        .client
        .spawn_process(&mut uninstall)
        .expect("spawn agent uninstall")
        .wait_with_output()
        .expect("agent uninstall");
    assert!(
        out.status.success(),
        "agent uninstall exited {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !pins.0.exists(),
        "{} is still there after agent uninstall",
        pins.0.display()
    );
    // The kernel releases a link whose last pin went in deferred work: soon, not at once.
    wait_until(
        "the XDP program detached after agent uninstall",
        HEALTH_WAIT,
        POLL,
        || !xdp_attached(&topo),
    );
}

/// Whether the running kernel is `major.minor` or later (`/proc/sys/kernel/osrelease`).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}

/// Whether an XDP program is attached to the client's veth end.
fn xdp_attached(topo: &Topology) -> bool {
    topo.client
        .ip(&["-d", "link", "show", "dev", &topo.client_if])
        .expect("ip link")
        .contains("prog/xdp")
}

/// Runs the agent through `wrapper` in `topo`'s client namespace until it exits (killed
/// after [`READY_TIMEOUT`]: one that does not exit has started); returns how it exited and
/// what it printed.
fn run_to_exit(
    wrapper: &[String],
    bin: &Path,
    topo: &Topology,
    config: &Path,
) -> (ExitStatus, String) {
    let log = config.with_extension("agent.log");
    let out = File::create(&log).expect("agent log");
    let err = out.try_clone().expect("agent log");
    let mut cmd = Command::new(&wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(bin)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut child = topo.client.spawn_process(&mut cmd).expect("spawn");
    let deadline = Instant::now() + READY_TIMEOUT.get();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent was still running after {READY_TIMEOUT}; its output:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(POLL);
    };
    (status, std::fs::read_to_string(&log).expect("agent log"))
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn without_any_one_of_the_three_the_agent_says_which_and_exits_1() {
    let bin = agent_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let topo = Topology::new().expect("topology");
    let backends = [SocketAddr::from((topo.server_v4, BACKEND_PORT))];
    let pins = PinDir::new("less");
    let dir = TempDir::new().expect("temp dir");
    let config = dir
        .write("policy.yaml", &policy(&topo, &pins.0, &backends))
        .expect("policy");
    for (lacking, _) in CAPS {
        let rest: Vec<&str> = CAPS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| *n != lacking)
            .collect();
        let (status, output) = run_to_exit(&setpriv(&rest), &bin, &topo, &config);
        let name = format!("CAP_{}", lacking.to_uppercase());
        assert_eq!(
            status.code(),
            Some(1),
            "without {name} the agent should exit 1; it exited {status}:\n{output}"
        );
        let expected = format!(
            "loading eBPF needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; this process lacks \
             {name} ("
        );
        assert!(
            output.contains(&expected),
            "without {name} the agent should say `{expected}...`; it said:\n{output}"
        );
        let has: Vec<String> = rest
            .iter()
            .map(|c| format!("CAP_{}", c.to_uppercase()))
            .collect();
        let has = format!("; it has: {}.", has.join(", "));
        assert!(
            output.contains(&has),
            "the error should list what the process has (`{has}`):\n{output}"
        );
        assert!(
            !xdp_attached(&topo),
            "without {name} an XDP program is attached after all"
        );
        assert!(
            !pins.0.exists(),
            "without {name} the agent made its pin directory {} all the same",
            pins.0.display()
        );
    }
}
