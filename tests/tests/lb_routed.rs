//! L4 load balancing of traffic routed through the host (issue 4): XDP ingress does the DNAT.
//!
//! Three namespaces: a client, a router where the agent runs, and servers:
//!
//! ```text
//! client 198.18.10.1 --veth-- 198.18.10.2 router 198.18.20.2 --veth-- 198.18.20.1 servers
//!        2001:db8:10::1         (agent, XDP on both)    2001:db8:20::2         backends .11 .12
//! ```
//!
//! The client reaches the VIPs (198.18.30.100, 2001:db8:30::100) through the router. XDP on
//! the router's client side rewrites a flow's packets toward a backend, the router forwards
//! them; XDP on its server side rewrites the backends' replies back to the VIP. Checksum
//! offload is off on every veth end, so the client and the servers verify every checksum.
//!
//! Root only; run serially: `cargo test -p agent-tests --test lb_routed -- --test-threads=1`.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
};

use agent_tests::{
    agent::{AgentProcess, TempDir},
    backend::TcpServer,
    lan::forwarding,
    netns::{Netns, unique_name},
    timing::Scaled,
};
use anyhow::{Context, Result, bail, ensure};

const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const CONNECT_TIMEOUT: Scaled = Scaled::secs(2);
/// Read timeout of a client waiting for its echo.
const READ_TIMEOUT: Scaled = Scaled::secs(5);
/// Bound on duplicate address detection of the new links' IPv6 addresses (about 2 s).
const DAD_DONE: Scaled = Scaled::secs(10);

/// One address family's plan of the three namespaces.
struct Plan {
    /// `-4` or `-6` for `ip`.
    family: &'static str,
    prefix: u8,
    client: &'static str,
    router_client_side: &'static str,
    router_server_side: &'static str,
    server: &'static str,
    backends: [&'static str; 2],
    vip: &'static str,
    vip_net: &'static str,
}

const V4: Plan = Plan {
    family: "-4",
    prefix: 24,
    client: "198.18.10.1",
    router_client_side: "198.18.10.2",
    router_server_side: "198.18.20.2",
    server: "198.18.20.1",
    backends: ["198.18.20.11", "198.18.20.12"],
    vip: "198.18.30.100",
    vip_net: "198.18.30.0/24",
};

const V6: Plan = Plan {
    family: "-6",
    prefix: 64,
    client: "2001:db8:10::1",
    router_client_side: "2001:db8:10::2",
    router_server_side: "2001:db8:20::2",
    server: "2001:db8:20::1",
    backends: ["2001:db8:20::11", "2001:db8:20::12"],
    vip: "2001:db8:30::100",
    vip_net: "2001:db8:30::/64",
};

/// The three namespaces and their links (deleted with the namespaces on drop).
struct Routed {
    // Drop order: the router (where the agent runs) last.
    client: Netns,
    server: Netns,
    router: Netns,
}

impl Routed {
    const CLIENT_IF: &'static str = "veth-c";
    const ROUTER_CLIENT_IF: &'static str = "veth-rc";
    const ROUTER_SERVER_IF: &'static str = "veth-rs";
    const SERVER_IF: &'static str = "veth-s";

    fn new() -> Result<Routed> {
        let r = Routed {
            client: Netns::create(&unique_name("c"))?,
            server: Netns::create(&unique_name("s"))?,
            router: Netns::create(&unique_name("r"))?,
        };
        for (a, a_if, b, b_if) in [
            (
                &r.client,
                Self::CLIENT_IF,
                &r.router,
                Self::ROUTER_CLIENT_IF,
            ),
            (
                &r.server,
                Self::SERVER_IF,
                &r.router,
                Self::ROUTER_SERVER_IF,
            ),
        ] {
            a.ip(&[
                "link",
                "add",
                a_if,
                "type",
                "veth",
                "peer",
                "name",
                b_if,
                "netns",
                b.name(),
            ])?;
            a.ip(&["link", "set", a_if, "up"])?;
            b.ip(&["link", "set", b_if, "up"])?;
            // Full checksums on the wire, verified by every receiver.
            for (ns, ifname) in [(a, a_if), (b, b_if)] {
                ethtool_off(ns, ifname)?;
            }
        }
        for plan in [&V4, &V6] {
            r.address(plan)?;
        }
        forwarding(&r.router, true)?;
        // The link-local addresses go through duplicate address detection for about 2 s
        // after a link comes up, and until then the router cannot resolve a backend (it asks
        // from its link-local address): a forwarded SYN would wait for that, past the SYN
        // retransmission a 2 s connect timeout allows.
        for ns in [&r.client, &r.router, &r.server] {
            ns.addresses_ready(DAD_DONE)?;
        }
        Ok(r)
    }

    fn address(&self, p: &Plan) -> Result<()> {
        let with = |a: &str| format!("{a}/{}", p.prefix);
        let nodad: &[&str] = if p.family == "-6" { &["nodad"] } else { &[] };
        let add = |ns: &Netns, addr: &str, ifname: &str| -> Result<()> {
            let cidr = with(addr);
            let mut args = vec![p.family, "addr", "add", cidr.as_str(), "dev", ifname];
            args.extend_from_slice(nodad);
            ns.ip(&args)?;
            Ok(())
        };
        add(&self.client, p.client, Self::CLIENT_IF)?;
        add(&self.router, p.router_client_side, Self::ROUTER_CLIENT_IF)?;
        add(&self.router, p.router_server_side, Self::ROUTER_SERVER_IF)?;
        add(&self.server, p.server, Self::SERVER_IF)?;
        for b in p.backends {
            add(&self.server, b, Self::SERVER_IF)?;
        }
        self.client.ip(&[
            p.family,
            "route",
            "add",
            p.vip_net,
            "via",
            p.router_client_side,
        ])?;
        self.server.ip(&[
            p.family,
            "route",
            "add",
            "default",
            "via",
            p.router_server_side,
        ])?;
        Ok(())
    }
}

fn ethtool_off(ns: &Netns, ifname: &str) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "ethtool", "-K", ifname])
        .args(["tx", "off", "rx", "off"])
        .output()
        .context("running ethtool (Debian package `ethtool`)")?;
    if !out.status.success() {
        bail!(
            "ethtool -K {ifname} tx off rx off: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn policy() -> String {
    let service = |name: &str, p: &Plan| {
        let list: String = p
            .backends
            .iter()
            .map(|b| {
                let addr = SocketAddr::new(b.parse().expect("literal"), BACKEND_PORT);
                format!("      - address: \"{addr}\"\n")
            })
            .collect();
        format!(
            "  - name: {name}\n    match: {{ address: \"{vip}\", port: {VIP_PORT}, protocol: tcp }}\n\
             \x20   backends:\n{list}    load_balancing: {{ algorithm: maglev, table_size: 211 }}\n",
            vip = p.vip,
        )
    };
    format!(
        "version: 1\n\
         agent:\n  listen: 127.0.0.1:9090\n\
         interfaces:\n\
         \x20 - {{ name: {rc}, xdp_mode: generic, direction: ingress }}\n\
         \x20 - {{ name: {rs}, xdp_mode: generic, direction: ingress }}\n\
         services:\n{v4}{v6}",
        rc = Routed::ROUTER_CLIENT_IF,
        rs = Routed::ROUTER_SERVER_IF,
        v4 = service("web4", &V4),
        v6 = service("web6", &V6),
    )
}

/// Client and server TCP checksum errors (the TCP counters cover IPv4 and IPv6).
fn csum_errors(r: &Routed) -> Result<(u64, u64)> {
    Ok((r.client.tcp_csum_errors()?, r.server.tcp_csum_errors()?))
}

fn routed(p: &Plan) -> Result<()> {
    let r = Routed::new()?;
    let servers = p
        .backends
        .iter()
        .map(|b| TcpServer::start(&r.server, SocketAddr::new(b.parse()?, BACKEND_PORT)))
        .collect::<Result<Vec<_>>>()?;
    let dir = TempDir::new()?;
    let path = dir.write("policy.yaml", &policy())?;
    let _agent = AgentProcess::start(&r.router, &path)?;
    let before = csum_errors(&r)?;
    let vip = SocketAddr::new(p.vip.parse::<IpAddr>()?, VIP_PORT);

    // 200 connections, each echoing 64 KiB through the VIP.
    let n = 200;
    let len = 64 * 1024;
    let peers = r.client.run(move || -> Result<Vec<SocketAddr>> {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut peers = Vec::with_capacity(n);
        for i in 0..n {
            let mut s = TcpStream::connect_timeout(&vip, CONNECT_TIMEOUT.get())
                .with_context(|| format!("connection {i} of {n} to {vip}"))?;
            s.set_read_timeout(Some(READ_TIMEOUT.get()))?;
            let mut reader = s.try_clone()?;
            let reading = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
                let mut got = vec![0u8; len];
                reader.read_exact(&mut got)?;
                Ok(got)
            });
            s.write_all(&data)?;
            let got = reading
                .join()
                .map_err(|_| anyhow::anyhow!("reader panicked"))??;
            ensure!(got == data, "connection {i}: the echo came back different");
            peers.push(s.peer_addr()?);
        }
        Ok(peers)
    })??;
    ensure!(
        peers.iter().all(|a| *a == vip),
        "the client saw peers other than the VIP {vip}"
    );
    let accepted: Vec<u64> = servers.iter().map(TcpServer::accepted).collect();
    ensure!(
        accepted.iter().sum::<u64>() == n as u64 && accepted.iter().all(|&a| a > 0),
        "backends accepted {accepted:?} of {n}: every connection must reach one, both some"
    );
    let after = csum_errors(&r)?;
    ensure!(
        after == before,
        "TCP checksum errors (client, servers) went from {before:?} to {after:?}"
    );
    println!(
        "{n} connections routed through the agent's host to {vip}, 64 KiB echoed on each; \
         backends accepted {accepted:?}; 0 checksum errors on client and servers"
    );
    Ok(())
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv4_traffic_routed_through_the_host_is_balanced_by_xdp() -> Result<()> {
    routed(&V4)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv6_traffic_routed_through_the_host_is_balanced_by_xdp() -> Result<()> {
    routed(&V6)
}
