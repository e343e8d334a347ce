//! The short-exchange tools of `cargo xtask bench peers` (tests/src/traffic/exchange.rs),
//! without the agent: every exchange is answered by the backend it went to, and each way an
//! exchange fails is told apart (refused, a hung backend's timeout), and the end that closes
//! first ([`Closes`]) is the one left holding the TIME_WAIT.
//!
//! Root only; run serially: `cargo test -p agent-tests --test exchange -- --test-threads=1`.

use std::net::SocketAddr;
use std::time::Duration;

use agent_tests::Topology;
use agent_tests::backend::Blackhole;
use agent_tests::netns::Netns;
use agent_tests::timing::Scaled;
use agent_tests::traffic::exchange::{self, Background, Closes, ExchangeServer, Failure};
use agent_tests::wait::wait_until;

const PORT: u16 = 8080;
/// Timeout of an exchange that must succeed.
const TIMEOUT: Scaled = Scaled::secs(2);
/// Timeout of an exchange with a hung backend: it must end by this timeout.
const HUNG_TIMEOUT: Duration = Duration::from_millis(200);
/// How often a count is checked while waiting on it (a period, not a bound).
const POLL: Duration = Duration::from_millis(5);

fn lab() -> (Topology, Vec<SocketAddr>, Vec<ExchangeServer>) {
    let mut topo = Topology::new().expect("topology");
    let addrs: Vec<SocketAddr> = topo
        .add_server_v4(2)
        .expect("backend addresses")
        .into_iter()
        .map(|a| SocketAddr::from((a, PORT)))
        .collect();
    let servers = addrs
        .iter()
        .map(|a| {
            ExchangeServer::start(&topo.server, *a, 4, Closes::Client).expect("exchange server")
        })
        .collect();
    (topo, addrs, servers)
}

#[test]
fn every_exchange_is_answered_by_the_backend_it_went_to() {
    let (topo, addrs, servers) = lab();
    let seq = exchange::sequential(&topo.client, &addrs, 100, TIMEOUT.get()).expect("sequential");
    assert_eq!(
        (seq.times.len(), seq.failures.len()),
        (100, 0),
        "100 sequential exchanges; failures: {}",
        seq.describe_failures(5)
    );
    // Alternating: 50 each. A server counts an exchange once the client's close is in.
    let answered = || {
        servers
            .iter()
            .map(ExchangeServer::answered)
            .collect::<Vec<_>>()
    };
    wait_until(
        "50 exchanges answered by each backend",
        TIMEOUT,
        POLL,
        || answered() == [50, 50],
    );

    let load = exchange::for_duration(
        &topo.client,
        &addrs,
        3,
        Duration::from_millis(300),
        TIMEOUT.get(),
    )
    .expect("for_duration");
    assert!(
        !load.times.is_empty() && load.failures.is_empty(),
        "{} exchanges in 300 ms from 3 clients, failures: {}",
        load.times.len(),
        load.describe_failures(5)
    );
    let want = 100 + load.times.len() as u64;
    wait_until(&format!("{want} exchanges answered"), TIMEOUT, POLL, || {
        answered().iter().sum::<u64>() == want
    });

    let bg = Background::start(&topo.client, &addrs[..1], TIMEOUT.get()).expect("background");
    wait_until("the background client's exchanges", TIMEOUT, POLL, || {
        bg.made() >= 10
    });
    let made = bg.finish();
    assert!(made.failures.is_empty(), "{}", made.describe_failures(5));
    assert!(made.times.len() >= 10);
}

#[test]
fn a_closed_port_is_refused_and_a_hung_backend_times_out() {
    let (topo, addrs, _servers) = lab();
    let closed = SocketAddr::new(addrs[0].ip(), PORT + 1);
    let o = topo
        .client
        .run(move || exchange::exchange(closed, TIMEOUT.get()))
        .expect("client");
    assert_eq!(o.result, Err(Failure::Refused));
    assert!(Failure::Refused.answered());

    let _hole = Blackhole::add(&topo.server, addrs[0].ip()).expect("blackhole");
    let dst = addrs[0];
    let o = topo
        .client
        .run(move || exchange::exchange(dst, HUNG_TIMEOUT))
        .expect("client");
    assert_eq!(o.result, Err(Failure::TimedOut));
    assert!(!Failure::TimedOut.answered());
    assert!(o.took >= HUNG_TIMEOUT, "ended after {:?}", o.took);
}

/// Whether `ns` has a TCP socket in TIME_WAIT with `port` at either end.
fn time_wait_on(ns: &Netns, port: u16) -> bool {
    let out = ns
        .exec(&["ss", "-Htan", "state", "time-wait"])
        .output()
        .expect("ss");
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let suffix = format!(":{port}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().any(|w| w.ends_with(&suffix)))
}

#[test]
fn the_end_that_closes_first_holds_the_time_wait() {
    for closes in [Closes::Client, Closes::Server] {
        let mut topo = Topology::new().expect("topology");
        let addr = SocketAddr::from((topo.add_server_v4(1).expect("backend address")[0], PORT));
        let server = ExchangeServer::start(&topo.server, addr, 1, closes).expect("server");
        let o = topo
            .client
            .run(move || exchange::exchange_closed_by(addr, TIMEOUT.get(), closes))
            .expect("client");
        assert_eq!(o.result, Ok(()), "{closes:?}: the exchange");
        let ports = server.ports();
        assert_eq!(ports.len(), 1, "{closes:?}: client ports the server saw");
        let (holder, other) = match closes {
            Closes::Client => (&topo.client, &topo.server),
            Closes::Server => (&topo.server, &topo.client),
        };
        // The last ACK is on its way when the closer enters TIME_WAIT.
        wait_until(
            &format!("{closes:?} closes first: TIME_WAIT in {}", holder.name()),
            TIMEOUT,
            POLL,
            || time_wait_on(holder, ports[0]),
        );
        assert!(
            !time_wait_on(other, ports[0]),
            "{closes:?} closes first, yet {} holds a TIME_WAIT too",
            other.name()
        );
    }
}
