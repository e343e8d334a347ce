//! Shaping end to end: the agent paces TCP egress of the client namespace (EDT in the
//! datapath, `fq` as the veth's root qdisc) toward a server over veth.
//!
//! Where the kernel has no `sch_fq` (found by adding an fq qdisc in a scratch namespace),
//! the agent must refuse the policy before touching anything, and that is what is tested;
//! the pacing tests then say why they do not run, and pass without measuring (the refusal
//! test covers such a kernel). `cargo xtask vm --suite e2e --filter shaping` runs them on
//! Debian's 6.1 and 6.12 kernels, which have `sch_fq`.

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_tests::{
    AgentProcess, Netns, TempDir, Topology, agent_bin, metric, netns::unique_name, tcp_transfer,
    timing::Scaled,
};

/// The rate the tests pace at, 50 Mbit/s (6,250,000 bytes per second on the wire), where
/// the machine carries at least 4 times that unpaced; a slower machine (a VM under software
/// emulation) is tested at a quarter of what it carries, and the test says so. What is
/// checked is the same: the paced rate is the configured one, within the tolerance.
const RATE_MBIT: u64 = 50;
/// Measured rates must be within this of the policy's.
const TOLERANCE: f64 = 0.05;
/// How long the agent may take to refuse a policy it cannot apply.
const REFUSAL: Scaled = Scaled::secs(30);
/// Deadline of one transfer (about 4 s at the rate).
const TRANSFER: Scaled = Scaled::secs(60);
const PORT: u16 = 5201;

fn require_agent() {
    if let Err(e) = agent_bin() {
        panic!("{e:#}");
    }
}

/// `Ok` where this kernel has `sch_fq`, else the kernel's words: adding an fq qdisc as root
/// of the loopback device of a scratch namespace.
fn fq_available() -> Result<(), String> {
    let ns = Netns::create(&unique_name("fq")).map_err(|e| format!("{e:#}"))?;
    let out = Command::new("tc")
        .args(["-n", ns.name(), "qdisc", "add", "dev", "lo", "root", "fq"])
        .output()
        .map_err(|e| format!("running tc (is iproute2 installed?): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A policy with the client's veth as the only (egress) interface and the given services.
fn policy(topo: &Topology, listen_port: u16, services: &str) -> String {
    format!(
        "version: 1\nagent:\n  listen: 127.0.0.1:{listen_port}\n  pin_path: /sys/fs/bpf/agt-shape-{}\n\
         interfaces:\n  - name: {}\n    direction: egress\nservices:\n{services}",
        std::process::id(),
        topo.client_if
    )
}

fn shaped_service(topo: &Topology, key: &str, horizon: &str, mbit: u64) -> String {
    format!(
        "  - name: paced\n    match: {{ address: {}/32, protocol: tcp }}\n    shaping:\n      \
         rate: {mbit}Mbit/s\n      key: {key}\n      horizon: {horizon}\n",
        topo.server_v4
    )
}

/// The root qdisc of `ifname` in `ns`, as `tc` prints it.
fn root_qdisc(ns: &Netns, ifname: &str) -> String {
    let out = Command::new("tc")
        .args(["-n", ns.name(), "qdisc", "show", "dev", ifname, "root"])
        .output()
        .expect("running tc");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn shaping_is_refused_without_sch_fq_before_anything_is_touched() {
    require_agent();
    if let Ok(()) = fq_available() {
        println!(
            "this kernel has sch_fq: the refusal does not apply here (the pacing tests run \
             instead)"
        );
        return;
    }
    let topo = Topology::new().expect("topology");
    let dir = TempDir::new().expect("temp dir");
    let text = policy(
        &topo,
        19_481,
        &shaped_service(&topo, "flow", "2s", RATE_MBIT),
    );
    let file = dir.write("shaping.yaml", &text).expect("policy file");
    let qdisc_before = root_qdisc(&topo.client, &topo.client_if);

    // `agent check` validates without the kernel: shaping is valid.
    let check = Command::new(agent_bin().unwrap())
        .arg("check")
        .arg(&file)
        .output()
        .expect("agent check");
    assert!(
        check.status.success(),
        "agent check refused shaping: {check:?}"
    );

    let mut child = Command::new("ip")
        .args(["netns", "exec", topo.client.name()])
        .arg(agent_bin().unwrap())
        .args(["run", "--config"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the agent");
    let deadline = Instant::now() + REFUSAL.get();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the agent") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the agent did not refuse the policy within {REFUSAL}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("agent output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        status.code(),
        Some(2),
        "exit code of a policy this kernel cannot apply (signal {:?}); stderr:\n{stderr}",
        status.signal()
    );
    // FILE:LINE:COLUMN: services[0].shaping: ..., at the section's value (its first field),
    // where `agent check` points its own errors about a section.
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with("shaping:"))
        .expect("shaping in the policy")
        + 1;
    let column = lines[at].len() - lines[at].trim_start().len() + 1;
    let prefix = format!(
        "{}:{}:{column}: services[0].shaping: ",
        file.display(),
        at + 1
    );
    let release = kernel_release();
    let refusal = stderr
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{stderr}"));
    assert!(
        refusal.contains(&format!("kernel {release}")) && refusal.contains("sch_fq"),
        "the refusal names the kernel ({release}) and sch_fq: {refusal}"
    );
    assert_eq!(
        root_qdisc(&topo.client, &topo.client_if),
        qdisc_before,
        "nothing touched: the root qdisc is as before"
    );
    let tc = Command::new("tc")
        .args([
            "-n",
            topo.client.name(),
            "filter",
            "show",
            "dev",
            &topo.client_if,
            "egress",
        ])
        .output()
        .expect("tc filter show");
    assert!(
        String::from_utf8_lossy(&tc.stdout).trim().is_empty(),
        "nothing attached: {tc:?}"
    );
    let _ = std::io::stdout().flush();
}

/// The rate to test at (Mbit/s): `RATE_MBIT`, or a quarter of what an unpaced TCP stream
/// reaches on this machine when that is less than four times `RATE_MBIT`.
fn test_rate(topo: &Topology) -> u64 {
    let (rates, _) = transfers(topo, 1, 8_000_000);
    let carried = rates[0] / 1e6;
    if carried >= 4.0 * RATE_MBIT as f64 {
        return RATE_MBIT;
    }
    let rate = ((carried / 4.0) as u64).max(1);
    println!(
        "this machine carries {carried:.1} Mbit/s unpaced, under 4 x {RATE_MBIT}: pacing is \
         tested at {rate} Mbit/s"
    );
    rate
}

/// Starts the agent in the client namespace with the services `services(rate in Mbit/s)`
/// makes; `None`, with the reason printed, where the kernel has no `sch_fq` (the refusal
/// test covers that kernel).
fn paced_agent(
    topo: &Topology,
    dir: &TempDir,
    services: impl FnOnce(u64) -> String,
) -> Option<(AgentProcess, f64)> {
    require_agent();
    if let Err(why) = fq_available() {
        println!(
            "SKIPPED: kernel {} has no sch_fq ({why}); pacing cannot be measured here. \
             Run `cargo xtask vm --suite e2e --filter shaping` (6.1, 6.12 have it).",
            kernel_release()
        );
        return None;
    }
    let mbit = test_rate(topo);
    static PORT_N: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(19_500);
    let listen = PORT_N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = dir
        .write("shaping.yaml", &policy(topo, listen, &services(mbit)))
        .expect("policy file");
    let agent = AgentProcess::start(&topo.client, &file).expect("agent start");
    let qdisc = root_qdisc(&topo.client, &topo.client_if);
    assert!(
        qdisc.starts_with("qdisc fq a6e:"),
        "fq is the root qdisc: {qdisc}"
    );
    Some((agent, mbit as f64 * 1e6))
}

/// `/proc/net/dev` of `ns`: bytes sent on `ifname` (L2 frames: what the pacer paces).
fn tx_bytes(ns: &Netns, ifname: &str) -> u64 {
    let ifname = ifname.to_owned();
    ns.run(move || {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev").expect("net/dev");
        text.lines()
            .skip(2)
            .find_map(|l| {
                let (name, rest) = l.split_once(':')?;
                (name.trim() == ifname).then(|| rest.split_whitespace().nth(8)?.parse().ok())?
            })
            .expect("the interface in /proc/net/dev")
    })
    .expect("reading /proc/net/dev")
}

/// `Tcp: RetransSegs` of `ns` (`/proc/net/snmp`).
fn retransmissions(ns: &Netns) -> u64 {
    ns.run(|| {
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().expect("header"), tcp.next().expect("values"));
        let at = names
            .split_whitespace()
            .position(|n| n == "RetransSegs")
            .expect("RetransSegs");
        values
            .split_whitespace()
            .nth(at)
            .and_then(|v| v.parse().ok())
            .expect("a number")
    })
    .expect("reading /proc/net/snmp")
}

/// Runs `flows` TCP transfers of `bytes` at once from the client to `PORT + i` on the server;
/// returns each one's rate on the wire's terms (bits per second of payload, with the TCP/IP
/// and Ethernet headers of full segments added) and the rate of the client veth as a whole.
fn transfers(topo: &Topology, flows: usize, bytes: u64) -> (Vec<f64>, f64) {
    let tx0 = tx_bytes(&topo.client, &topo.client_if);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..flows)
        .map(|i| {
            let (client, server) = (topo.client.handle(), topo.server.handle());
            let addr = SocketAddr::new(topo.server_v4.into(), PORT + i as u16);
            std::thread::spawn(move || {
                tcp_transfer(&client, &server, addr, bytes, TRANSFER).expect("transfer")
            })
        })
        .collect();
    let mut rates = Vec::new();
    for h in handles {
        let t = h.join().expect("transfer thread");
        assert!(t.intact(), "transfer incomplete or corrupted: {t:?}");
        // 1448 payload bytes ride in 1514 bytes on the wire (Ethernet 14, IP 20, TCP 32).
        rates.push(t.received as f64 * 8.0 / t.elapsed.as_secs_f64() * 1514.0 / 1448.0);
    }
    let wall = t0.elapsed().as_secs_f64();
    let wire = (tx_bytes(&topo.client, &topo.client_if) - tx0) as f64 * 8.0 / wall;
    (rates, wire)
}

fn within(measured: f64, expected: f64) -> bool {
    (measured - expected).abs() <= TOLERANCE * expected
}

fn counter(agent: &AgentProcess, name: &str) -> f64 {
    let text = agent.metrics().expect("metrics");
    metric(&text, name, &[("service", "paced")]).unwrap_or(0.0)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn shaping_paces_a_tcp_stream_to_the_rate_without_retransmissions() {
    let topo = Topology::new().expect("topology");
    let dir = TempDir::new().expect("temp dir");
    let paced = paced_agent(&topo, &dir, |mbit| {
        shaped_service(&topo, "flow", "2s", mbit)
    });
    let Some((agent, rate)) = paced else {
        return;
    };
    let retrans0 = retransmissions(&topo.client);
    // About 4 s at the rate.
    let (rates, wire) = transfers(&topo, 1, (rate / 2.0) as u64);
    let retrans = retransmissions(&topo.client) - retrans0;
    println!(
        "one flow: {:.2} Mbit/s (wire, veth {:.2} Mbit/s), {retrans} retransmissions",
        rates[0] / 1e6,
        wire / 1e6
    );
    assert!(
        within(rates[0], rate),
        "{:.2} Mbit/s, expected {} +-5%",
        rates[0] / 1e6,
        rate / 1e6
    );
    assert_eq!(
        retrans, 0,
        "the pacer below its horizon must cause no retransmission"
    );
    assert!(counter(&agent, "agent_shaping_paced_packets_total") > 0.0);
    assert_eq!(counter(&agent, "agent_shaping_horizon_drops_total"), 0.0);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn shaping_key_flow_gives_each_flow_the_rate() {
    let topo = Topology::new().expect("topology");
    let dir = TempDir::new().expect("temp dir");
    let paced = paced_agent(&topo, &dir, |mbit| {
        shaped_service(&topo, "flow", "2s", mbit)
    });
    let Some((_agent, rate)) = paced else {
        return;
    };
    let (rates, _) = transfers(&topo, 2, (rate / 2.0) as u64);
    println!(
        "two flows, key flow: {:?} Mbit/s",
        rates.iter().map(|r| r / 1e6).collect::<Vec<_>>()
    );
    for r in &rates {
        assert!(
            within(*r, rate),
            "each flow {:.2} Mbit/s, expected {} +-5%",
            r / 1e6,
            rate / 1e6
        );
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn shaping_key_source_ip_shares_one_rate_among_a_sources_flows() {
    let topo = Topology::new().expect("topology");
    let dir = TempDir::new().expect("temp dir");
    let paced = paced_agent(&topo, &dir, |mbit| {
        shaped_service(&topo, "source_ip", "2s", mbit)
    });
    let Some((_agent, rate)) = paced else {
        return;
    };
    let (_, wire) = transfers(&topo, 2, (rate / 4.0) as u64);
    println!(
        "two flows, key source_ip: {:.2} Mbit/s together",
        wire / 1e6
    );
    assert!(
        within(wire, rate),
        "{:.2} Mbit/s together, expected {} +-5%",
        wire / 1e6,
        rate / 1e6
    );
}

/// UDP at `times` the rate for `secs`, 1,400-byte datagrams, from one socket with a send
/// buffer large enough to fill the horizon.
fn udp_burst(topo: &Topology, rate: f64, times: f64, secs: f64) {
    let dst = SocketAddr::new(topo.server_v4.into(), 9);
    topo.client
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
            let size: libc::c_int = 64 << 20;
            // SAFETY: a valid socket and option value. SNDBUFFORCE: root, past wmem_max.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                );
            }
            let payload = [0u8; 1400];
            let gap = Duration::from_secs_f64(1442.0 * 8.0 / (rate * times));
            let t0 = Instant::now();
            let mut next = t0;
            while t0.elapsed().as_secs_f64() < secs {
                let _ = s.send_to(&payload, dst);
                next += gap;
                while Instant::now() < next {
                    std::hint::spin_loop();
                }
            }
        })
        .expect("sending UDP");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn shaping_horizon_drops_only_past_the_horizon() {
    let topo = Topology::new().expect("topology");
    let dir = TempDir::new().expect("temp dir");
    let service = |mbit| {
        format!(
            "  - name: paced\n    match: {{ address: {}/32, protocol: udp }}\n    shaping:\n      \
             rate: {mbit}Mbit/s\n      key: flow\n      horizon: 50ms\n",
            topo.server_v4
        )
    };
    let Some((agent, rate)) = paced_agent(&topo, &dir, service) else {
        return;
    };
    // Half the rate: the queue never grows, nothing is near the horizon.
    udp_burst(&topo, rate, 0.5, 1.0);
    assert_eq!(counter(&agent, "agent_shaping_horizon_drops_total"), 0.0);
    assert!(counter(&agent, "agent_shaping_paced_packets_total") > 0.0);
    // Four times the rate for a second: the queue passes 50 ms within the first 70 ms.
    udp_burst(&topo, rate, 4.0, 1.0);
    let drops = counter(&agent, "agent_shaping_horizon_drops_total");
    println!("4x the rate for 1 s with a 50 ms horizon: {drops} horizon drops");
    assert!(drops > 0.0, "offered past the horizon, nothing was dropped");
}
