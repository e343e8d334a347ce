//! The sandbox: two network namespaces joined by a veth pair. Dropping `Topology` deletes both
//! namespaces, which also deletes the veth pair and whatever was added to them.

use std::{ffi::OsStr, net::Ipv4Addr, process::Command};

use super::netns;
use crate::cmd::{self, CmdError};

/// Fixed, locally administered MACs, so neighbour entries can be written before any packet.
const CLIENT_MAC: &str = "02:de:00:00:00:01";
const SERVER_MAC: &str = "02:de:00:00:00:02";

pub struct Spec {
    pub client_ns: &'static str,
    pub server_ns: &'static str,
    /// The client's veth; the breaker and balancing acts' agents attach here, named by their
    /// policies.
    pub client_if: String,
    /// The server's veth; the rate-limit act's agent attaches here, named by its policy.
    pub server_if: String,
    pub client_addr: Ipv4Addr,
    pub server_addr: Ipv4Addr,
    pub prefix_len: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("demo topology: {0}")]
pub struct TopologyError(#[from] CmdError);

pub struct Topology {
    spec: Spec,
    /// Namespaces this guard created and deletes.
    namespaces: Vec<&'static str>,
}

fn ip(args: &[impl AsRef<OsStr>]) -> Result<String, CmdError> {
    cmd::output(Command::new("ip").args(args))
}

impl Topology {
    pub fn create(spec: Spec) -> Result<Self, TopologyError> {
        for ns in [spec.client_ns, spec.server_ns] {
            if netns::path(ns).exists() {
                ip(&["netns", "delete", ns])?;
                println!("demo: removed netns {ns} left over from an earlier run");
            }
        }
        // From here on the guard exists, so a failure half-way cleans up what was made.
        let mut topology = Self {
            spec,
            namespaces: Vec::new(),
        };
        let spec = &topology.spec;
        for ns in [spec.client_ns, spec.server_ns] {
            ip(&["netns", "add", ns])?;
            topology.namespaces.push(ns);
        }
        topology.link()?;
        topology.describe();
        Ok(topology)
    }

    /// The veth pair, its addresses, every link up.
    fn link(&self) -> Result<(), CmdError> {
        let spec = &self.spec;
        ip(&[
            "link",
            "add",
            &spec.client_if,
            "address",
            CLIENT_MAC,
            "netns",
            spec.client_ns,
            "type",
            "veth",
            "peer",
            "name",
            &spec.server_if,
            "address",
            SERVER_MAC,
            "netns",
            spec.server_ns,
        ])?;
        for (ns, dev, addr) in [
            (spec.client_ns, spec.client_if.as_str(), spec.client_addr),
            (spec.server_ns, spec.server_if.as_str(), spec.server_addr),
        ] {
            let cidr = format!("{addr}/{}", spec.prefix_len);
            ip(&["-n", ns, "address", "add", &cidr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
        }
        Ok(())
    }

    fn describe(&self) {
        let spec = &self.spec;
        println!(
            "demo: {} ({} {}/{}) <-> {} ({} {}/{})",
            spec.client_ns,
            spec.client_if,
            spec.client_addr,
            spec.prefix_len,
            spec.server_ns,
            spec.server_if,
            spec.server_addr,
            spec.prefix_len
        );
    }

    /// One more server address (a backend of its own, which can be broken alone), and a
    /// permanent neighbour entry for it on the client: a SYN toward it leaves the client at
    /// once, through TC egress, instead of waiting in ARP resolution.
    pub fn add_server_addr(&self, addr: Ipv4Addr) -> Result<(), TopologyError> {
        let spec = &self.spec;
        let cidr = format!("{addr}/{}", spec.prefix_len);
        ip(&[
            "-n",
            spec.server_ns,
            "address",
            "add",
            &cidr,
            "dev",
            &spec.server_if,
        ])?;
        self.neighbour(addr)
    }

    /// A virtual address no interface holds: the client reaches it through the server's MAC (a
    /// permanent neighbour entry, as nothing answers ARP for it), and the agent's datapath on
    /// the client rewrites it to a backend before the packet leaves. Connections to it leave
    /// from `source`, an address of their own added to the client's veth (a route for the VIP
    /// alone says so), apart from everything else the client sends.
    pub fn add_vip(&self, vip: Ipv4Addr, source: Ipv4Addr) -> Result<(), TopologyError> {
        let spec = &self.spec;
        let cidr = format!("{source}/{}", spec.prefix_len);
        ip(&[
            "-n",
            spec.client_ns,
            "address",
            "add",
            &cidr,
            "dev",
            &spec.client_if,
        ])?;
        let route = format!("{vip}/32");
        ip(&[
            "-n",
            spec.client_ns,
            "route",
            "replace",
            &route,
            "dev",
            &spec.client_if,
            "src",
            &source.to_string(),
        ])?;
        self.neighbour(vip)
    }

    /// `ip -n CLIENT neigh replace ADDR lladdr SERVER_MAC dev CLIENT_IF nud permanent`
    fn neighbour(&self, addr: Ipv4Addr) -> Result<(), TopologyError> {
        let spec = &self.spec;
        let addr = addr.to_string();
        ip(&[
            "-n",
            spec.client_ns,
            "neigh",
            "replace",
            &addr,
            "lladdr",
            SERVER_MAC,
            "dev",
            &spec.client_if,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    /// Makes the server at `addr` hang: in the server namespace everything sent *from* it is
    /// routed into a blackhole, so SYNs to it are received and never answered. Undone by
    /// [`Hang::restore`], or on drop.
    pub fn hang(&self, addr: Ipv4Addr) -> Result<Hang, TopologyError> {
        let mut hang = Hang {
            server_ns: self.spec.server_ns,
            addr,
            active: false,
        };
        ip(&hang.rule("add"))?;
        hang.active = true;
        Ok(hang)
    }
}

/// A blackhole rule in the server namespace, for one address.
pub struct Hang {
    server_ns: &'static str,
    addr: Ipv4Addr,
    active: bool,
}

impl Hang {
    /// `ip -n SERVER rule ACTION from ADDR blackhole`
    fn rule(&self, action: &'static str) -> Vec<String> {
        ["-n", self.server_ns, "rule", action, "from"]
            .into_iter()
            .map(str::to_owned)
            .chain([self.addr.to_string(), "blackhole".to_owned()])
            .collect()
    }

    /// The command line, for the demo to show what it did.
    pub fn command(&self, action: &'static str) -> String {
        format!("ip {}", self.rule(action).join(" "))
    }

    pub fn restore(mut self) -> Result<(), TopologyError> {
        self.active = false;
        ip(&self.rule("del"))?;
        Ok(())
    }
}

impl Drop for Hang {
    fn drop(&mut self) {
        if self.active {
            let _ = ip(&self.rule("del"));
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            match ip(&["netns", "delete", ns]) {
                Ok(_) => println!("demo: deleted netns {ns}"),
                Err(e) => eprintln!("demo: could not delete netns {ns}: {e}"),
            }
        }
    }
}
