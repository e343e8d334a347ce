//! Direct and balanced connections from one client to the same backends (issue 14, item 5).
//!
//! The agent runs in the client namespace on the client veth, as in `lb.rs` (TC egress DNAT,
//! XDP reverse NAT). The client makes short exchanges (connect, 64 bytes each way, close) to
//! two backends in the server namespace, directly and through the VIP; the backends close
//! first, so they hold each connection's TIME_WAIT, as HTTP/1.0 servers do. Before the agent
//! moved balanced flows' client ports out of the ephemeral range (`agent_common::ports`), a
//! VIP connection could land on a 4-tuple a backend still held from a direct one: about half
//! of those SYNs were refused (PAWS), and the client retransmitted after 8-12 ms (HZ=250) or a
//! second; a direct connection landing on a balanced flow's tuple had its replies rewritten to
//! the VIP and died. The tests count the client's retransmissions (the stall's signature,
//! which no load makes up) and the backends' PAWS refusals, bound each exchange, and read the
//! client ports the backends saw.
//!
//! Root only; run serially: `cargo test -p agent-tests --test lb_mixed -- --test-threads=1`.
//! The measurement (`mixed_latency_table`, ignored) prints p50/p95/p99/max of both kinds:
//! `cargo test -p agent-tests --test lb_mixed -- --ignored --nocapture --test-threads=1`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use agent_common::ports::{NAT_PORT_FIRST, NAT_PORT_LAST, needs_nat_port};
use agent_tests::{
    agent::{AgentProcess, TempDir, backend_items, metric},
    benchmarks::quantile,
    netns::Topology,
    scale::tcp_ext,
    timing::{self, MIXED_EXCHANGE, Scaled},
    traffic::exchange::{Closes, ExchangeServer, exchange_closed_by},
};
use anyhow::{Context, Result, anyhow, ensure};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// Exchanges of each kind per run: with 3,000 direct ones first, main's datapath stalled
/// about one VIP connection in twenty.
const EXCHANGES: usize = 3_000;
const CONNECT_TIMEOUT: Scaled = Scaled::secs(2);

/// Which way an exchange went.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Direct,
    Vip,
}

/// Two close-first backends, the VIP, and the agent balancing it to them.
struct Lab {
    topo: Topology,
    backends: Vec<SocketAddr>,
    servers: Vec<ExchangeServer>,
    agent: AgentProcess,
    _dir: TempDir,
}

impl Lab {
    fn new() -> Result<Lab> {
        let mut topo = Topology::new()?;
        let backends: Vec<SocketAddr> = topo
            .add_server_v4(2)?
            .into_iter()
            .map(|a| SocketAddr::new(a.into(), BACKEND_PORT))
            .collect();
        let servers = backends
            .iter()
            .map(|b| ExchangeServer::start(&topo.server, *b, 1, Closes::Server))
            .collect::<Result<Vec<_>>>()?;
        topo.add_vip(VIP.into())?;
        let list = backend_items(&backends);
        let policy = format!(
            "version: 1\n\
             agent:\n  listen: 127.0.0.1:9090\n\
             interfaces:\n  - name: {ifname}\n    xdp_mode: generic\n    direction: both\n\
             services:\n  - name: web\n    match: {{ address: \"{VIP}\", port: {VIP_PORT}, protocol: tcp }}\n\
             \x20   backends:\n{list}\
             \x20   load_balancing:\n      algorithm: weighted_round_robin\n",
            ifname = topo.client_if,
        );
        let dir = TempDir::new()?;
        let path = dir.write("policy.yaml", &policy)?;
        let agent = AgentProcess::start(&topo.client, &path)?;
        Ok(Lab {
            topo,
            backends,
            servers,
            agent,
            _dir: dir,
        })
    }

    /// Runs `kinds` in order from the client namespace, direct ones alternating between the
    /// backends; each exchange's time.
    fn run(&self, kinds: &[Kind]) -> Result<Vec<(Kind, Duration)>> {
        let (kinds, backends) = (kinds.to_vec(), self.backends.clone());
        let vip = SocketAddr::new(VIP.into(), VIP_PORT);
        self.topo.client.run(move || {
            let mut direct = backends.iter().cycle();
            kinds
                .iter()
                .enumerate()
                .map(|(i, &kind)| {
                    let to = match kind {
                        Kind::Direct => *direct.next().expect("cycle"),
                        Kind::Vip => vip,
                    };
                    let o = exchange_closed_by(to, CONNECT_TIMEOUT.get(), Closes::Server);
                    o.result
                        .map(|()| (kind, o.took))
                        .map_err(|f| anyhow!("exchange {i} ({kind:?}) to {to}: {f:?}"))
                })
                .collect()
        })?
    }

    /// Client ports the backends accepted, all of them.
    fn ports(&self) -> Vec<u16> {
        self.servers
            .iter()
            .flat_map(ExchangeServer::ports)
            .collect()
    }

    fn moved(&self) -> Result<f64> {
        let text = self.agent.metrics()?;
        metric(
            &text,
            "agent_lb_client_ports_moved_total",
            &[("service", "web")],
        )
        .context("no agent_lb_client_ports_moved_total for web")
    }
}

/// `TcpExt:` counter `name` of `ns` (absolute; the namespaces are fresh).
fn tcp_ext_of(ns: &agent_tests::netns::Netns, name: &str) -> Result<u64> {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/netstat"))??;
    tcp_ext(&text, name).with_context(|| format!("/proc/net/netstat: no TcpExt {name}"))
}

/// Runs `kinds` on a fresh lab and checks what a stall would break: no segment retransmitted
/// by the client, no SYN refused by a backend's TIME_WAIT, every exchange within
/// [`MIXED_EXCHANGE`], each VIP connection seen by its backend from a moved port and each
/// direct one from the client's own, and the agent's count of moved ports.
fn check(kinds: &[Kind]) -> Result<()> {
    let lab = Lab::new()?;
    let retrans = lab.topo.client.tcp_retrans_segs()?;
    let times = lab.run(kinds)?;
    let retrans = lab.topo.client.tcp_retrans_segs()? - retrans;
    let paws = tcp_ext_of(&lab.topo.server, "PAWSTimewait")?;
    let vips = kinds.iter().filter(|k| **k == Kind::Vip).count();
    let slow: Vec<_> = times
        .iter()
        .enumerate()
        .filter(|(_, (_, t))| *t > MIXED_EXCHANGE.get())
        .map(|(i, (k, t))| format!("{i} {k:?} {t:?}"))
        .collect();
    ensure!(
        retrans == 0 && paws == 0,
        "the client retransmitted {retrans} segments and the backends refused {paws} SYNs \
         in TIME_WAIT (PAWS) over {} exchanges: balanced and direct connections met on a \
         backend 4-tuple",
        kinds.len()
    );
    ensure!(
        slow.is_empty(),
        "{} exchanges took more than {MIXED_EXCHANGE} ({}): {slow:?}",
        slow.len(),
        timing::describe()
    );
    let ports = lab.ports();
    let moved = ports
        .iter()
        .filter(|p| (NAT_PORT_FIRST..=NAT_PORT_LAST).contains(*p))
        .count();
    let ephemeral = ports.iter().filter(|p| needs_nat_port(**p)).count();
    ensure!(
        moved == vips && ephemeral == kinds.len() - vips,
        "the backends saw {moved} connections from moved ports and {ephemeral} from ephemeral \
         ones; {vips} went through the VIP, {} directly",
        kinds.len() - vips
    );
    let counted = lab.moved()?;
    ensure!(
        counted == vips as f64,
        "agent_lb_client_ports_moved_total is {counted}, {vips} VIP connections were made"
    );
    println!(
        "{} exchanges ({vips} through the VIP): no retransmission, no PAWS refusal, every \
         exchange within {MIXED_EXCHANGE}, {moved} moved client ports",
        kinds.len()
    );
    Ok(())
}

/// The run: direct exchanges first, then the same number through the VIP.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn vip_connections_after_direct_ones_to_the_same_backends_do_not_stall() -> Result<()> {
    let kinds: Vec<Kind> = [Kind::Direct, Kind::Vip]
        .iter()
        .flat_map(|k| std::iter::repeat_n(*k, EXCHANGES))
        .collect();
    check(&kinds)
}

/// Direct and VIP exchanges taking turns: each kind follows the other (a direct connection
/// after a VIP one is the case whose replies main's datapath took for the balanced flow's).
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn interleaved_direct_and_vip_connections_do_not_stall() -> Result<()> {
    let kinds: Vec<Kind> = (0..2 * EXCHANGES)
        .map(|i| if i % 2 == 0 { Kind::Direct } else { Kind::Vip })
        .collect();
    check(&kinds)
}

/// The measurement: p50/p95/p99/max of direct and VIP exchanges in the mixed runs (direct
/// then VIP, and interleaved), each on a fresh lab, `REPEATS` times; prints a table with the
/// median of the repeats and their min-max.
#[test]
#[ignore = "a measurement: prints a table (needs root)"]
fn mixed_latency_table() -> Result<()> {
    const REPEATS: usize = 5;
    let sequential: Vec<Kind> = [Kind::Direct, Kind::Vip]
        .iter()
        .flat_map(|k| std::iter::repeat_n(*k, EXCHANGES))
        .collect();
    let interleaved: Vec<Kind> = (0..2 * EXCHANGES)
        .map(|i| if i % 2 == 0 { Kind::Direct } else { Kind::Vip })
        .collect();
    println!("| run | kind | p50 us | p95 us | p99 us | max us |\n|---|---|---|---|---|---|");
    for (name, kinds) in [
        ("direct, then VIP", &sequential),
        ("interleaved", &interleaved),
    ] {
        // Per kind, per quantile: one value per repeat.
        let mut rows: Vec<[Vec<Duration>; 4]> = vec![Default::default(), Default::default()];
        for _ in 0..REPEATS {
            let lab = Lab::new()?;
            let times = lab.run(kinds)?;
            for (row, kind) in rows.iter_mut().zip([Kind::Direct, Kind::Vip]) {
                let t: Vec<Duration> = times
                    .iter()
                    .filter(|(k, _)| *k == kind)
                    .map(|(_, t)| *t)
                    .collect();
                for (q, v) in [0.5, 0.95, 0.99, 1.0].iter().zip(row.iter_mut()) {
                    v.push(quantile(&t, *q));
                }
            }
        }
        for (row, kind) in rows.iter().zip(["direct", "VIP"]) {
            let cells: Vec<String> = row
                .iter()
                .map(|v| {
                    let us = |d: Duration| d.as_micros();
                    format!(
                        "{} ({}-{})",
                        us(quantile(v, 0.5)),
                        us(quantile(v, 0.0)),
                        us(quantile(v, 1.0))
                    )
                })
                .collect();
            println!("| {name} | {kind} | {} |", cells.join(" | "));
        }
    }
    println!(
        "\n{EXCHANGES} exchanges of each kind per run, median of {REPEATS} runs (min-max); \
         machine: {} CPUs, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    Ok(())
}
