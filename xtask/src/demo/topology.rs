//! The sandbox: two network namespaces joined by a veth pair. Dropping `Topology` deletes both
//! namespaces, which also deletes the veth pair.

use std::{net::Ipv4Addr, process::Command};

use super::netns;
use crate::cmd::{self, CmdError};

pub struct Spec {
    pub client_ns: &'static str,
    pub server_ns: &'static str,
    pub client_if: &'static str,
    /// The interface the agent attaches to; named by the policy.
    pub server_if: String,
    pub client_addr: Ipv4Addr,
    pub server_addr: Ipv4Addr,
    pub prefix_len: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("create the demo topology: {0}")]
pub struct TopologyError(#[from] CmdError);

pub struct Topology {
    /// Namespaces this guard created and deletes.
    namespaces: Vec<&'static str>,
}

fn ip(args: &[&str]) -> Result<String, CmdError> {
    cmd::output(Command::new("ip").args(args))
}

impl Topology {
    pub fn create(spec: &Spec) -> Result<Self, TopologyError> {
        for ns in [spec.client_ns, spec.server_ns] {
            if netns::path(ns).exists() {
                ip(&["netns", "delete", ns])?;
                println!("demo: removed netns {ns} left over from an earlier run");
            }
        }
        // From here on the guard exists, so a failure half-way cleans up what was made.
        let mut topology = Self {
            namespaces: Vec::new(),
        };
        for ns in [spec.client_ns, spec.server_ns] {
            ip(&["netns", "add", ns])?;
            topology.namespaces.push(ns);
        }
        ip(&[
            "link",
            "add",
            spec.client_if,
            "netns",
            spec.client_ns,
            "type",
            "veth",
            "peer",
            "name",
            &spec.server_if,
            "netns",
            spec.server_ns,
        ])?;
        for (ns, dev, addr) in [
            (spec.client_ns, spec.client_if, spec.client_addr),
            (spec.server_ns, spec.server_if.as_str(), spec.server_addr),
        ] {
            let cidr = format!("{addr}/{}", spec.prefix_len);
            ip(&["-n", ns, "address", "add", &cidr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
        }
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
        Ok(topology)
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
