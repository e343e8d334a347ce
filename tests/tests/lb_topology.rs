//! Load balancing in the topologies a new user has (issue 14, item 4): the agent on a client
//! host (TC egress DNAT, XDP ingress reverse NAT, `direction: both`), on a LAN shared with a
//! gateway and the backends.
//!
//! ```text
//!            client .1 (agent)     gateway .254 (forwarding off)
//!                 |                     |
//!   ==================== bridge: 198.18.40.0/24, 2001:db8:40::/64 =====================
//!                 |                     |                    |
//!           backends .11 .12      router r1 .21         router r2 .22
//!                                 (holds 198.18.61.11)  (holds 198.18.62.11)
//! ```
//!
//! - off-link VIP (198.18.50.100, 2001:db8:50::100), reached through the default gateway,
//!   which does not forward: after the DNAT the frame must go to the backend's MAC, not the
//!   gateway's (before next-hop delivery, every connection timed out);
//! - on-link VIP (198.18.40.100, 2001:db8:40::100): the client asks who has it (ARP / NS),
//!   and only the agent answers (before, nobody did and every connection timed out);
//! - backends behind two different next hops (r1 and r2, routes on the client): both used;
//! - the agent on a router between two LANs instead (XDP ingress DNAT and reverse NAT): its
//!   XDP sends the packets to their next hop itself, the router's stack forwards almost none.
//!
//! The client host forwards or not (two paths in `fib.rs`); the cases run where it does not,
//! as a client's default, and the off-link case also where it does.
//!
//! Which backend took a connection is read from the servers. Root only; run serially:
//! `cargo test -p agent-tests --test lb_topology -- --test-threads=1`.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
};

use agent_tests::{
    agent::{AgentProcess, TempDir, backend_items, metric},
    backend::TcpServer,
    lan::{Lan, forwarding},
    netns::Netns,
    timing::{LINK_READY, Scaled},
};
use anyhow::{Context, Result, ensure};

const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// A first connection waits for the backend's neighbour resolution (ARP / ND) too.
const CONNECT_TIMEOUT: Scaled = Scaled::secs(2);
/// Read timeout of a client waiting for its echo.
const READ_TIMEOUT: Scaled = Scaled::secs(2);
/// Connections per case: with two backends and Maglev, both see some.
const CONNECTIONS: usize = 40;
const CLIENT_IF: &str = "eth-c";
/// Packets a balancing router's XDP may leave to its stack in one case: the first of each
/// direction toward each of two backends, and a client, whose neighbour is not resolved yet.
const MAX_UNRESOLVED: u64 = 8;
const HOST_IF: &str = "eth0";

/// One address family's addresses.
struct Plan {
    /// `-4` or `-6` for `ip`.
    family: &'static str,
    prefix: u8,
    client: &'static str,
    gateway: &'static str,
    /// Backends on the LAN itself.
    backends: [&'static str; 2],
    vip_off_link: &'static str,
    vip_on_link: &'static str,
    /// The routers' LAN addresses, and the backend address each holds behind it.
    routers: [&'static str; 2],
    behind: [&'static str; 2],
    /// The balancing router's address on the backends' LAN, and backends there.
    server_gateway: &'static str,
    server_backends: [&'static str; 2],
}

const V4: Plan = Plan {
    family: "-4",
    prefix: 24,
    client: "198.18.40.1",
    gateway: "198.18.40.254",
    backends: ["198.18.40.11", "198.18.40.12"],
    vip_off_link: "198.18.50.100",
    vip_on_link: "198.18.40.100",
    routers: ["198.18.40.21", "198.18.40.22"],
    behind: ["198.18.61.11", "198.18.62.11"],
    server_gateway: "198.18.70.254",
    server_backends: ["198.18.70.11", "198.18.70.12"],
};

const V6: Plan = Plan {
    family: "-6",
    prefix: 64,
    client: "2001:db8:40::1",
    gateway: "2001:db8:40::fe",
    backends: ["2001:db8:40::11", "2001:db8:40::12"],
    vip_off_link: "2001:db8:50::100",
    vip_on_link: "2001:db8:40::100",
    routers: ["2001:db8:40::21", "2001:db8:40::22"],
    behind: ["2001:db8:61::11", "2001:db8:62::11"],
    server_gateway: "2001:db8:70::fe",
    server_backends: ["2001:db8:70::11", "2001:db8:70::12"],
};

/// The LAN with the client (default route through the gateway) and the gateway, which
/// does not forward. The client forwards or not: the kernel's FIB lookup helper answers
/// only on a host that forwards, so the datapath takes one of two paths (`fib.rs`).
struct Lab {
    // Drop order: servers and agent before their namespaces.
    servers: Vec<TcpServer>,
    agent: Option<AgentProcess>,
    dir: TempDir,
    client: Netns,
    plan: &'static Plan,
    lan: Lan,
}

impl Lab {
    fn new(plan: &'static Plan, client_forwards: bool) -> Result<Lab> {
        let mut lan = Lan::new()?;
        let client = lan.host("c", CLIENT_IF)?;
        let gateway = lan.host("gw", HOST_IF)?;
        address(&client, plan, plan.client, CLIENT_IF)?;
        address(&gateway, plan, plan.gateway, HOST_IF)?;
        forwarding(&gateway, false)?;
        forwarding(&client, client_forwards)?;
        client.ip(&[plan.family, "route", "add", "default", "via", plan.gateway])?;
        Ok(Lab {
            servers: Vec::new(),
            agent: None,
            dir: TempDir::new()?,
            client,
            plan,
            lan,
        })
    }

    /// A host on the LAN holding `addrs` (on its LAN interface), a server on each.
    fn backends_on_lan(&mut self, addrs: &[&str]) -> Result<Vec<SocketAddr>> {
        let host = self.lan.host("b", HOST_IF)?;
        let mut out = Vec::new();
        for a in addrs {
            address(&host, self.plan, a, HOST_IF)?;
            out.push(self.serve(&host, a)?);
        }
        Ok(out)
    }

    /// Two routers on the LAN, each holding one backend address behind it (on its loopback),
    /// with a server there; the client routes to each through its router.
    fn backends_behind_routers(&mut self) -> Result<Vec<SocketAddr>> {
        let p = self.plan;
        let mut out = Vec::new();
        for (router, behind) in p.routers.iter().zip(p.behind) {
            let host = self.lan.host("r", HOST_IF)?;
            address(&host, p, router, HOST_IF)?;
            let full = if p.family == "-6" { 128 } else { 32 };
            host.ip(&[
                p.family,
                "addr",
                "add",
                &format!("{behind}/{full}"),
                "dev",
                "lo",
            ])?;
            self.client
                .ip(&[p.family, "route", "add", behind, "via", router])?;
            out.push(self.serve(&host, behind)?);
        }
        Ok(out)
    }

    fn serve(&mut self, ns: &Netns, addr: &str) -> Result<SocketAddr> {
        ns.addresses_ready(LINK_READY)?;
        let addr = SocketAddr::new(addr.parse()?, BACKEND_PORT);
        self.servers.push(TcpServer::start(ns, addr)?);
        Ok(addr)
    }

    /// Starts the agent on the client, balancing `vip` over `backends`.
    fn start(&mut self, vip: &str, backends: &[SocketAddr]) -> Result<()> {
        let interfaces =
            format!("  - {{ name: {CLIENT_IF}, xdp_mode: generic, direction: both }}\n");
        let path = self
            .dir
            .write("policy.yaml", &policy(&interfaces, vip, backends))?;
        self.agent = Some(AgentProcess::start(&self.client, &path)?);
        Ok(())
    }

    /// [`exchange`] through `vip`; then every backend must have taken some, and the
    /// datapath must have sent every DNAT'd packet to its next hop itself.
    fn check(&self, vip: &str) -> Result<()> {
        exchange(&self.client, vip)?;
        all_used(&self.servers)?;
        let unresolved = unresolved(self.agent.as_ref().context("agent not started")?)?;
        ensure!(
            unresolved == 0,
            "{unresolved} packets passed to the stack for want of a next hop (want 0)"
        );
        Ok(())
    }
}

/// The policy: the agent on `interfaces` (YAML list items), one service balancing `vip`
/// over `backends` (Maglev).
fn policy(interfaces: &str, vip: &str, backends: &[SocketAddr]) -> String {
    let list = backend_items(backends);
    format!(
        "version: 1\n\
         agent:\n  listen: 127.0.0.1:9090\n  pin_path: {pins}\n\
         interfaces:\n{interfaces}\
         services:\n  - name: web\n    match: {{ address: \"{vip}\", port: {VIP_PORT}, protocol: tcp }}\n\
         \x20   backends:\n{list}    load_balancing: {{ algorithm: maglev, table_size: 211 }}\n",
        pins = pin_path(),
    )
}

/// `CONNECTIONS` connections from `client` to `vip`, each echoing 64 bytes, every one with
/// the VIP as its peer.
fn exchange(client: &Netns, vip: &str) -> Result<()> {
    client.addresses_ready(LINK_READY)?;
    let vip = SocketAddr::new(vip.parse::<IpAddr>()?, VIP_PORT);
    let peers = client.run(move || -> Result<Vec<SocketAddr>> {
        let data = [0x5a_u8; 64];
        let mut peers = Vec::with_capacity(CONNECTIONS);
        for i in 0..CONNECTIONS {
            let mut s = TcpStream::connect_timeout(&vip, CONNECT_TIMEOUT.get())
                .with_context(|| format!("connection {i} of {CONNECTIONS} to {vip}"))?;
            s.set_read_timeout(Some(READ_TIMEOUT.get()))?;
            s.write_all(&data)?;
            let mut got = [0u8; 64];
            s.read_exact(&mut got)
                .with_context(|| format!("the echo of connection {i} to {vip}"))?;
            ensure!(got == data, "connection {i}: the echo came back different");
            peers.push(s.peer_addr()?);
        }
        Ok(peers)
    })??;
    ensure!(
        peers.iter().all(|a| *a == vip),
        "the client saw peers other than the VIP {vip}: {peers:?}"
    );
    Ok(())
}

/// Every connection reached a server, and each server took some.
fn all_used(servers: &[TcpServer]) -> Result<()> {
    let accepted: Vec<u64> = servers.iter().map(TcpServer::accepted).collect();
    ensure!(
        accepted.iter().sum::<u64>() == CONNECTIONS as u64 && accepted.iter().all(|&a| a > 0),
        "backends accepted {accepted:?} of {CONNECTIONS}: every connection must reach one, \
         each backend some"
    );
    println!("{CONNECTIONS} connections: backends accepted {accepted:?}");
    Ok(())
}

/// The agent's count of NAT'd packets it left to the stack for want of a next hop.
fn unresolved(agent: &AgentProcess) -> Result<u64> {
    let text = agent.metrics()?;
    let n = metric(
        &text,
        "agent_datapath_packets_total",
        &[("class", "nat_next_hop_unresolved")],
    )
    .context("no agent_datapath_packets_total{class=\"nat_next_hop_unresolved\"}")?;
    Ok(n as u64)
}

/// Where this test process's agents pin: a path of their own, so agents of other runs on the
/// machine are left alone. Each runs with `--detach-on-exit`, so the next test finds it free.
fn pin_path() -> String {
    format!("/sys/fs/bpf/agt-topo-{}", std::process::id())
}

/// `addr/prefix` on `ifname` of `ns`.
fn address(ns: &Netns, p: &Plan, addr: &str, ifname: &str) -> Result<()> {
    let cidr = format!("{addr}/{}", p.prefix);
    ns.ip(&[p.family, "addr", "add", &cidr, "dev", ifname])?;
    Ok(())
}

fn off_link(p: &'static Plan, client_forwards: bool) -> Result<()> {
    let mut lab = Lab::new(p, client_forwards)?;
    let backends = lab.backends_on_lan(&p.backends)?;
    lab.start(p.vip_off_link, &backends)?;
    lab.check(p.vip_off_link)
}

fn on_link(p: &'static Plan) -> Result<()> {
    let mut lab = Lab::new(p, false)?;
    let backends = lab.backends_on_lan(&p.backends)?;
    lab.start(p.vip_on_link, &backends)?;
    lab.check(p.vip_on_link)
}

fn two_next_hops(p: &'static Plan) -> Result<()> {
    let mut lab = Lab::new(p, false)?;
    let backends = lab.backends_behind_routers()?;
    lab.start(p.vip_off_link, &backends)?;
    lab.check(p.vip_off_link)
}

/// The agent on a router between the client's LAN and the backends' (XDP ingress on both
/// sides, forwarding on, as in `lb_routed.rs`): the DNAT'd packets and the reverse-NAT'd
/// replies go to their next hop from XDP itself. The router's stack forwards only the few
/// packets XDP left to it while a neighbour was not resolved yet, and those are counted.
/// (With the router's forwarding off, the kernel's FIB lookup helper answers nothing and
/// XDP leaves every packet to the stack, which drops them: not supported.)
fn through_a_router(p: &'static Plan) -> Result<()> {
    const ROUTER_CLIENT_IF: &str = "eth-rc";
    const ROUTER_SERVER_IF: &str = "eth-rs";
    let mut client_lan = Lan::new()?;
    let mut server_lan = Lan::new()?;
    let client = client_lan.host("c", CLIENT_IF)?;
    let router = client_lan.host("r", ROUTER_CLIENT_IF)?;
    server_lan.join(&router, ROUTER_SERVER_IF)?;
    let backends = server_lan.host("b", HOST_IF)?;
    address(&client, p, p.client, CLIENT_IF)?;
    address(&router, p, p.gateway, ROUTER_CLIENT_IF)?;
    address(&router, p, p.server_gateway, ROUTER_SERVER_IF)?;
    forwarding(&router, true)?;
    client.ip(&[p.family, "route", "add", "default", "via", p.gateway])?;
    for b in p.server_backends {
        address(&backends, p, b, HOST_IF)?;
    }
    backends.ip(&[p.family, "route", "add", "default", "via", p.server_gateway])?;
    for ns in [&router, &backends] {
        ns.addresses_ready(LINK_READY)?;
    }
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for b in p.server_backends {
        let addr = SocketAddr::new(b.parse()?, BACKEND_PORT);
        servers.push(TcpServer::start(&backends, addr)?);
        addrs.push(addr);
    }
    let interfaces = format!(
        "  - {{ name: {ROUTER_CLIENT_IF}, xdp_mode: generic, direction: ingress }}\n\
         \x20 - {{ name: {ROUTER_SERVER_IF}, xdp_mode: generic, direction: ingress }}\n"
    );
    let dir = TempDir::new()?;
    let path = dir.write("policy.yaml", &policy(&interfaces, p.vip_off_link, &addrs))?;
    let agent = AgentProcess::start(&router, &path)?;
    let before = router.forwarded_datagrams()?;
    exchange(&client, p.vip_off_link)?;
    all_used(&servers)?;
    let by_stack = router.forwarded_datagrams()? - before;
    let unresolved = unresolved(&agent)?;
    ensure!(
        by_stack <= unresolved && unresolved <= MAX_UNRESOLVED,
        "the router's stack forwarded {by_stack} datagrams, the agent left {unresolved} to it \
         (want at most {MAX_UNRESOLVED}, and no more forwarded than left): XDP must deliver \
         the rest"
    );
    println!("router: {by_stack} datagrams forwarded by the stack, {unresolved} left to it by XDP");
    Ok(())
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv4_off_link_vip_through_a_gateway_that_does_not_forward() -> Result<()> {
    off_link(&V4, false)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv4_off_link_vip_from_a_client_that_forwards() -> Result<()> {
    off_link(&V4, true)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv6_off_link_vip_through_a_gateway_that_does_not_forward() -> Result<()> {
    off_link(&V6, false)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv6_off_link_vip_from_a_client_that_forwards() -> Result<()> {
    off_link(&V6, true)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv4_on_link_vip_is_answered_for() -> Result<()> {
    on_link(&V4)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv6_on_link_vip_is_answered_for() -> Result<()> {
    on_link(&V6)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv4_backends_behind_two_next_hops_are_both_used() -> Result<()> {
    two_next_hops(&V4)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv6_backends_behind_two_next_hops_are_both_used() -> Result<()> {
    two_next_hops(&V6)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv4_xdp_on_a_router_delivers_to_the_next_hop_itself() -> Result<()> {
    through_a_router(&V4)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv6_xdp_on_a_router_delivers_to_the_next_hop_itself() -> Result<()> {
    through_a_router(&V6)
}
