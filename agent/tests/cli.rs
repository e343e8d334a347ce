//! The agent binary as users run it: exit codes, error lines, and what is left attached after a
//! failed start or a SIGTERM. The `run` tests need root and make their own network namespace.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use agent_tests::{
    netns::{Netns, unique_name},
    timing::Scaled,
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
/// From spawn to `/health/ready`: loading, verifying and attaching the programs.
const READY_TIMEOUT: Scaled = Scaled::secs(20);
/// From SIGTERM to exit: detaching.
const STOP_TIMEOUT: Scaled = Scaled::secs(10);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn agent(args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("running the agent binary")
}

#[test]
fn check_accepts_every_example_policy() {
    for name in ["demo", "demo-breaker", "demo-lb", "flash-sale", "payments"] {
        let file = format!("config/{name}.yaml");
        let out = agent(&["check", &file]);
        assert!(
            out.status.success(),
            "agent check {file}: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Every invalid fixture: exit code 2 and exactly the expected lines on stdout.
#[test]
fn check_reports_every_invalid_fixture_with_exit_code_2() {
    let dir = workspace().join("config/invalid");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("config/invalid") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let file = format!("config/invalid/{name}");
        let expected = std::fs::read_to_string(path.with_extension("expected"))
            .unwrap_or_else(|e| panic!("{file}: no .expected file: {e}"));
        let out = agent(&["check", &file]);
        assert_eq!(out.status.code(), Some(2), "agent check {file}: exit code");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim_end(),
            expected.trim_end(),
            "agent check {file}: output"
        );
        seen += 1;
    }
    assert!(
        seen >= 10,
        "only {seen} fixtures found in {}",
        dir.display()
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(agent(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(agent(&["run"]).status.code(), Some(2));
    assert_eq!(agent(&["--help"]).status.code(), Some(0));
}

fn require_root() {
    // SAFETY: trivial syscall.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "`agent run` tests attach XDP programs and need root; run them with `cargo xtask test`"
    );
}

/// A network namespace for one test (the shared guard: deleted on drop, even on a panic).
fn netns(tag: &str) -> Netns {
    Netns::create(&unique_name(&format!("cli-{tag}"))).expect("ip netns add")
}

fn ip(ns: &Netns, args: &[&str]) -> String {
    ns.ip(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Whether any XDP program is attached to `ifname`.
fn has_xdp(ns: &Netns, ifname: &str) -> bool {
    ip(ns, &["-d", "link", "show", ifname]).contains("prog/xdp")
}

/// The agent's egress programs on `ifname` that hang under a `clsact` qdisc as `cls_bpf`
/// filters: how the agent attaches TC before kernel 6.6 (no TCX).
fn clsact_egress_filters(ns: &Netns, ifname: &str) -> usize {
    let out = ns
        .exec(&["tc", "filter", "show", "dev", ifname, "egress"])
        .output()
        .expect("tc (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("agent_tc_egress"))
        .count()
}

/// The agent's TC egress attachments: TCX links in the whole kernel (see [`tcx_links`])
/// plus `clsact` filters on `ifname`, whichever this kernel uses.
fn tc_egress(ns: &Netns, ifname: &str) -> usize {
    tcx_links() + clsact_egress_filters(ns, ifname)
}

/// `AGENT args` in `ns`, entered with setns only: the agent pins under the host's
/// `/sys/fs/bpf`, which `ip netns exec` hides under a fresh `/sys`.
fn spawn_agent(ns: &Netns, args: &[&str], out: Stdio, err: Stdio) -> std::process::Child {
    let mut cmd = Command::new(AGENT);
    cmd.args(args).stdout(out).stderr(err);
    ns.spawn_process(&mut cmd).expect("spawning the agent")
}

/// `agent run --config POLICY` in `ns` until it exits (a start that fails), with its output.
fn run_to_exit(ns: &Netns, policy: &Path) -> Output {
    spawn_agent(
        ns,
        &["run", "--config", policy.to_str().unwrap()],
        Stdio::piped(),
        Stdio::piped(),
    )
    .wait_with_output()
    .unwrap()
}

fn write_policy(ns: &Netns, interfaces: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.yaml", ns.name()));
    std::fs::write(
        &path,
        format!(
            "version: 1\nagent:\n  listen: 127.0.0.1:9590\n  pin_path: /sys/fs/bpf/{}\n\
             interfaces:\n{interfaces}services:\n  \
             - name: web\n    match: {{ address: 198.18.0.2/32, port: 80 }}\n    rate_limit: {{ rate: 100/s }}\n",
            ns.name()
        ),
    )
    .unwrap();
    path
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn run_refuses_a_missing_interface_with_its_position() {
    require_root();
    let _lock = attach_lock();
    let ns = netns("missing");
    let policy = write_policy(&ns, "  - name: lo\n  - name: agt-nosuch0\n");
    let out = run_to_exit(&ns, &policy);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr:\n{stderr}");
    let want = format!(
        "{}:7:11: interfaces[1].name: interface \"agt-nosuch0\" does not exist",
        policy.display()
    );
    assert!(
        stderr.lines().any(|l| l == want),
        "expected the line {want:?} in:\n{stderr}"
    );
    assert!(
        !has_xdp(&ns, "lo"),
        "nothing may stay attached after a refused policy"
    );
}

/// The first interface attaches, the second cannot (loopback has no native XDP): the agent
/// must undo the first and exit 1, leaving no program behind.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn run_attaches_all_interfaces_or_none() {
    require_root();
    let _lock = attach_lock();
    let tcx_before = tcx_links();
    let ns = netns("rollback");
    ip(
        &ns,
        &[
            "link", "add", "agt-a", "type", "veth", "peer", "name", "agt-b",
        ],
    );
    ip(&ns, &["link", "set", "agt-a", "up"]);
    ip(&ns, &["link", "set", "agt-b", "up"]);
    let policy = write_policy(
        &ns,
        "  - name: agt-a\n    xdp_mode: generic\n  - name: lo\n    xdp_mode: native\n",
    );
    let out = run_to_exit(&ns, &policy);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr:\n{stderr}");
    assert!(
        stderr.contains("attaching `agent_xdp` to interface lo (native)"),
        "the error names the interface and mode:\n{stderr}"
    );
    assert!(
        !has_xdp(&ns, "agt-a"),
        "agt-a kept its program after the start failed:\n{}",
        ip(&ns, &["-d", "link", "show", "agt-a"])
    );
    assert_eq!(
        tc_egress(&ns, "agt-a"),
        tcx_before,
        "a TC egress attachment (TCX link or clsact filter) stayed after the failed start"
    );
}

/// Ready once attached; with `--detach-on-exit`, SIGTERM detaches and exits 0 (without it the
/// datapath stays: `tests/tests/survive.rs`).
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn run_serves_health_and_detaches_on_sigterm() {
    require_root();
    let _lock = attach_lock();
    let tcx_before = tcx_links();
    let ns = netns("sigterm");
    ip(
        &ns,
        &[
            "link", "add", "agt-a", "type", "veth", "peer", "name", "agt-b",
        ],
    );
    ip(&ns, &["link", "set", "agt-a", "up"]);
    ip(&ns, &["link", "set", "agt-b", "up"]);
    let policy = write_policy(&ns, "  - name: agt-a\n    direction: both\n");
    let mut child = Child(spawn_agent(
        &ns,
        &[
            "run",
            "--config",
            policy.to_str().unwrap(),
            "--detach-on-exit",
        ],
        Stdio::null(),
        Stdio::null(),
    ));

    let deadline = Instant::now() + READY_TIMEOUT.get();
    let ready = loop {
        let probe = ns
            .exec(&[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:9590/health/ready",
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&probe.stdout) == "200" {
            break true;
        }
        if Instant::now() > deadline || child.0.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        ready,
        "agent never became ready on agt-a within {READY_TIMEOUT}"
    );
    assert!(has_xdp(&ns, "agt-a"), "ready, but no XDP program on agt-a");
    assert_eq!(
        tc_egress(&ns, "agt-a"),
        tcx_before + 1,
        "direction both: expected one more TC egress attachment (a TCX link, or a clsact filter \
         before 6.6) while the agent runs"
    );

    // `agent status` reads the running agent, as text and as JSON.
    let out = ns
        .exec(&[
            AGENT,
            "status",
            "--addr",
            "127.0.0.1:9590",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "agent status --output json: {:?}",
        out.status
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(json["ready"], true, "status: {json}");
    assert_eq!(json["services"][0]["name"], "web", "status: {json}");
    let out = ns
        .exec(&[AGENT, "status", "--addr", "127.0.0.1:9590"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("web") && text.contains("source_ip 100/s"),
        "agent status text:\n{text}"
    );

    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT.get();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit within {STOP_TIMEOUT} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "exit code after SIGTERM");
    assert!(
        !has_xdp(&ns, "agt-a"),
        "XDP program left on agt-a after SIGTERM"
    );
    assert_eq!(
        tc_egress(&ns, "agt-a"),
        tcx_before,
        "TC egress attachment (TCX link or clsact filter) left after SIGTERM"
    );
}

/// TCX links in the kernel (they are not per namespace, and Debian 12's bpftool neither names
/// their interface nor lists them under `net show`): the tests that attach hold `ATTACH_LOCK`
/// so the count is theirs alone.
fn tcx_links() -> usize {
    let out = Command::new("bpftool")
        .args(["link", "show"])
        .output()
        .expect("bpftool (installed by `cargo xtask setup`)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" tcx ") || l.contains("type 11 "))
        .count()
}

/// Serialises the tests that attach programs.
static ATTACH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn attach_lock() -> std::sync::MutexGuard<'static, ()> {
    ATTACH_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Kills the agent if the test ends early.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
