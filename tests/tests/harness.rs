//! Tests of the harness itself, without the agent: the topology carries traffic, the
//! receiver counts every packet, TCP transfers arrive intact, and guards clean up after a
//! panicking test. Plus `measure_capacity` (ignored by default), which measured the numbers
//! that the rate-limit tests are sized by.
//!
//! Root only; run serially: `cargo test -p agent-tests -- --test-threads=1`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use agent_tests::netns::netns_list;
use agent_tests::xdp::{Verdict, XdpMode, attach_trivial};
use agent_tests::{Scaled, SendMethod, Topology, UdpFlood, UdpReceiver, UdpSender, tcp_transfer};

const PORT: u16 = 5300;
/// How much of its second a paced flow may lose at its ends to a late first packet: a
/// scheduling latency, which a slower CPU lengthens.
const PACING_SLACK: Scaled = Scaled::millis(10);
/// Deadline of the TCP transfer.
const TCP_TIMEOUT: Scaled = Scaled::secs(30);

/// One run of a flood with no agent in the path: what was sent and what arrived.
struct Run {
    offered: f64,
    achieved: f64,
    sent: u64,
    received: u64,
    path_drops: u64,
    socket_drops: u32,
    stack_losses: u64,
    max_lag: Duration,
}

fn flood_once(
    topo: &Topology,
    flows: usize,
    rate_per_flow: f64,
    duration: Duration,
    method: SendMethod,
) -> Run {
    let dst = SocketAddr::new(IpAddr::V4(topo.server_v4), PORT);
    let rx = UdpReceiver::start(&topo.server, dst).expect("receiver");
    let mut spec = UdpFlood::new(
        dst,
        IpAddr::V4(topo.client_v4),
        flows,
        rate_per_flow,
        duration,
    );
    spec.method = method;
    let sender = UdpSender::new(&topo.client, spec).expect("sender");
    let drops0 = topo.path_drops().expect("link stats");
    let snmp0 = topo.server.udp_snmp().expect("snmp");
    let sent = sender.run().expect("send");
    let got = rx.finish().expect("receive");
    let drops1 = topo.path_drops().expect("link stats");
    let snmp1 = topo.server.udp_snmp().expect("snmp");
    Run {
        offered: sent.offered_pps,
        achieved: sent.achieved_pps,
        sent: sent.sent,
        received: got.packets,
        path_drops: drops1 - drops0,
        socket_drops: got.socket_drops,
        stack_losses: snmp1.losses_since(&snmp0),
        max_lag: sent.max_lag,
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn harness_selftest() {
    let topo = Topology::new().expect("topology");
    // Modest load: 20 flows x 500 pps for 1 s over raw sockets, then 1 flow over a plain
    // socket; every packet must arrive and be attributed to its own flow.
    for (flows, rate, method) in [
        (20, 500.0, SendMethod::Raw),
        (1, 5000.0, SendMethod::Sockets),
    ] {
        let dst = SocketAddr::new(IpAddr::V4(topo.server_v4), PORT);
        let rx = UdpReceiver::start(&topo.server, dst).expect("receiver");
        let spec = UdpFlood {
            method,
            ..UdpFlood::new(
                dst,
                IpAddr::V4(topo.client_v4),
                flows,
                rate,
                Duration::from_secs(1),
            )
        };
        let sender = UdpSender::new(&topo.client, spec).expect("sender");
        let sent = sender.run().expect("send");
        sent.ensure_on_schedule(0.97).expect("on schedule");
        let got = rx.finish().expect("receive");
        assert_eq!(got.socket_drops, 0, "receiver socket dropped packets");
        assert_eq!(got.malformed, 0, "payloads changed on the way");
        assert_eq!(
            got.packets, sent.sent,
            "{method:?}: sent {} packets in {flows} flows, received {}",
            sent.sent, got.packets
        );
        for f in &sent.flows {
            assert_eq!(got.from(&f.src), f.sent, "{method:?} flow {}", f.src);
            // Paced, not bursted: a flow's packets spread over the whole second.
            let min_span = Duration::from_secs(1).saturating_sub(PACING_SLACK.get());
            assert!(
                f.span() > min_span,
                "flow {} spanned only {:?}, expected over {min_span:?}",
                f.src,
                f.span()
            );
        }
    }
    // IPv6 over raw sockets, from an extra client address: kernel-filled checksum accepted.
    let mut topo = topo;
    let src6 = topo.add_client_v6(1).expect("v6 address")[0];
    let dst6 = SocketAddr::new(IpAddr::V6(topo.server_v6), PORT);
    let rx = UdpReceiver::start(&topo.server, dst6).expect("receiver v6");
    let spec = UdpFlood::new(dst6, IpAddr::V6(src6), 4, 250.0, Duration::from_millis(400));
    let sent = UdpSender::new(&topo.client, spec)
        .expect("sender v6")
        .run()
        .expect("send v6");
    let got = rx.finish().expect("receive v6");
    assert_eq!(
        got.packets, sent.sent,
        "IPv6: sent {}, received {}",
        sent.sent, got.packets
    );
    assert_eq!(
        got.per_ip().len(),
        1,
        "one IPv6 source expected: {:?}",
        got.per_ip()
    );
    // TCP: 20 MB intact.
    let addr = SocketAddr::new(IpAddr::V4(topo.server_v4), 8080);
    let t = tcp_transfer(&topo.client, &topo.server, addr, 20 << 20, TCP_TIMEOUT)
        .expect("tcp transfer");
    assert!(t.intact(), "TCP transfer damaged: {t:?}");
    assert_eq!(
        topo.path_drops().expect("link stats"),
        0,
        "the veth path dropped packets"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn namespaces_are_removed_after_a_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::thread::spawn(move || {
        let topo = Topology::new().expect("topology");
        tx.send([topo.client.name().to_owned(), topo.server.name().to_owned()])
            .expect("send names");
        panic!("deliberate panic while holding the topology");
    })
    .join();
    assert!(r.is_err(), "the thread was meant to panic");
    let names = rx.recv().expect("names");
    let left = netns_list().expect("ip netns list");
    for n in &names {
        assert!(
            !left.contains(n),
            "namespace {n} survived the panic: {left:?}"
        );
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn extra_client_addresses_are_distinct_sources() {
    let mut topo = Topology::new().expect("topology");
    let srcs = topo.add_client_v4(4).expect("addresses");
    let dst = SocketAddr::new(IpAddr::V4(topo.server_v4), PORT);
    let rx = UdpReceiver::start(&topo.server, dst).expect("receiver");
    let spec = UdpFlood {
        sources: srcs.iter().map(|&a| IpAddr::V4(a)).collect(),
        ..UdpFlood::new(
            dst,
            IpAddr::V4(srcs[0]),
            8,
            200.0,
            Duration::from_millis(500),
        )
    };
    let sent = UdpSender::new(&topo.client, spec)
        .expect("sender")
        .run()
        .expect("send");
    let got = rx.finish().expect("receive");
    let per_ip = got.per_ip();
    assert_eq!(per_ip.len(), 4, "expected 4 sources, got {per_ip:?}");
    assert_eq!(
        per_ip,
        sent.sent_per_ip(),
        "per-source counts differ from what was sent"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn spoofed_sources_need_no_address() {
    let topo = Topology::new().expect("topology");
    let dst = SocketAddr::new(IpAddr::V4(topo.server_v4), PORT);
    let rx = UdpReceiver::start(&topo.server, dst).expect("receiver");
    // 1,000 sources that no interface holds, 2 flows each (source ports 10000 and 10001).
    let sources: Vec<IpAddr> = (0..1000u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + i)))
        .collect();
    let spec = UdpFlood {
        sources: sources.clone(),
        method: SendMethod::Spoofed,
        base_port: 10_000,
        ..UdpFlood::new(dst, sources[0], 2000, 10.0, Duration::from_millis(500))
    };
    let sent = UdpSender::new(&topo.client, spec)
        .expect("sender")
        .run()
        .expect("send");
    assert_eq!(sent.failed, 0, "sends failed");
    let got = rx.finish().expect("receive");
    assert_eq!(got.malformed, 0, "payloads changed on the way");
    assert_eq!(
        got.packets, sent.sent,
        "sent {}, received {}",
        sent.sent, got.packets
    );
    for (i, f) in sent.flows.iter().enumerate() {
        let expected = SocketAddr::new(sources[i / 2], 10_000 + (i % 2) as u16);
        assert_eq!(f.src, expected, "flow {i}");
        assert_eq!(got.from(&f.src), f.sent, "flow {i} from {}", f.src);
    }
}

/// Capacity of this machine: for 1, 100 and 10,000 flows and both send methods, step the
/// offered rate up and print offered / achieved / received / losses, with nothing on the
/// server veth and with a trivial `XDP_PASS` program attached in generic and native mode
/// (what the agent's hook costs before its own work).
/// Run: `cargo test -p agent-tests --test harness -- --ignored --nocapture measure_capacity`.
#[test]
#[ignore = "measurement, prints a table; takes several minutes"]
fn measure_capacity() {
    let topo = Topology::new().expect("topology");
    let dur = Duration::from_secs(2);
    println!(
        "{:>8} {:>6} {:>8} {:>9} {:>9} {:>9} {:>6} {:>5} {:>5} {:>5} {:>9}",
        "xdp",
        "flows",
        "method",
        "offered",
        "achieved",
        "received",
        "lost",
        "path",
        "sock",
        "stack",
        "max_lag"
    );
    for xdp in [None, Some(XdpMode::Generic), Some(XdpMode::Native)] {
        let _guard = xdp.map(|mode| {
            attach_trivial(&topo.server, &topo.server_if, mode, Verdict::Pass).expect("attach XDP")
        });
        for flows in [1usize, 100, 10_000] {
            for method in [SendMethod::Sockets, SendMethod::Raw] {
                for agg in [
                    100_000.0, 200_000.0, 300_000.0, 400_000.0, 600_000.0, 800_000.0,
                ] {
                    let r = flood_once(&topo, flows, agg / flows as f64, dur, method);
                    println!(
                        "{:>8} {:>6} {:>8} {:>9.0} {:>9.0} {:>9} {:>6} {:>5} {:>5} {:>5} {:>9.1?}",
                        xdp.map_or("none".to_owned(), |m| format!("{m:?}")),
                        flows,
                        format!("{method:?}"),
                        r.offered,
                        r.achieved,
                        r.received,
                        r.sent - r.received,
                        r.path_drops,
                        r.socket_drops,
                        r.stack_losses,
                        r.max_lag
                    );
                    if r.achieved < 0.97 * r.offered || r.received < r.sent {
                        break;
                    }
                }
            }
        }
    }
}
