//! A LAN: one Linux bridge in a namespace of its own, and hosts (namespaces) joined to it,
//! each by a veth pair whose other end is a port of the bridge. Unlike [`crate::Topology`]'s
//! single veth pair, hosts on it find each other through ARP / neighbour discovery and see
//! each other's broadcasts, as machines on one switch do.

use anyhow::Result;

use crate::netns::{Netns, unique_name};

/// The bridge namespace and the hosts' namespaces, deleted on drop (their veth pairs go with
/// them).
pub struct Lan {
    // Field order is drop order: the hosts first.
    hosts: Vec<Netns>,
    bridge: Netns,
    /// Bridge ports made so far (their names are `p1`, `p2`, ...).
    ports: usize,
}

impl Lan {
    const BRIDGE: &'static str = "br0";

    /// A bridge, up, with no host yet.
    pub fn new() -> Result<Lan> {
        let bridge = Netns::create(&unique_name("br"))?;
        no_dad(&bridge)?;
        bridge.ip(&["link", "add", Self::BRIDGE, "type", "bridge"])?;
        bridge.ip(&["link", "set", Self::BRIDGE, "up"])?;
        Ok(Lan {
            hosts: Vec::new(),
            bridge,
            ports: 0,
        })
    }

    /// A new host namespace (named after `role`) joined to the bridge by interface `ifname`
    /// ([`Lan::join`]); IPv6 duplicate address detection is off in it, so addresses and
    /// link-local addresses are usable at once. Returns a handle; the `Lan` owns it.
    pub fn host(&mut self, role: &str, ifname: &str) -> Result<Netns> {
        let ns = Netns::create(&unique_name(role))?;
        no_dad(&ns)?;
        self.join(&ns, ifname)?;
        let handle = ns.handle();
        self.hosts.push(ns);
        Ok(handle)
    }

    /// Joins `ns` (a host of another LAN too, say a router) to the bridge by a new interface
    /// `ifname`, up, without addresses.
    pub fn join(&mut self, ns: &Netns, ifname: &str) -> Result<()> {
        self.ports += 1;
        let port = format!("p{}", self.ports);
        ns.ip(&[
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            self.bridge.name(),
        ])?;
        self.bridge
            .ip(&["link", "set", &port, "master", Self::BRIDGE, "up"])?;
        ns.ip(&["link", "set", ifname, "up"])?;
        Ok(())
    }
}

/// Turns IPv6 duplicate address detection off for the links made in `ns` from now on.
pub fn no_dad(ns: &Netns) -> Result<()> {
    ns.run(|| -> std::io::Result<()> {
        for conf in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0")?;
        }
        Ok(())
    })??;
    Ok(())
}

/// Sets IPv4 and IPv6 forwarding of `ns` (every interface).
pub fn forwarding(ns: &Netns, on: bool) -> Result<()> {
    let v = if on { "1" } else { "0" };
    ns.run(move || -> std::io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", v)?;
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", v)
    })??;
    Ok(())
}
