//! Network namespaces, a veth pair between them, and running code inside one.
//!
//! Everything is created through `ip` (iproute2): it is what an operator would type, and a
//! failing step names the exact command and its stderr. The veth pair is created directly
//! inside the namespaces (`ip -n CLIENT link add ... peer ... netns SERVER`), so no interface
//! ever exists in the root namespace and fixed interface names and addresses cannot clash
//! between parallel runs; only the namespace names need to be unique.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::timing::Scaled;
use crate::wait::poll;

/// Runs `ip ARGS`; on failure the error names the command and carries its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("spawning `ip {}` (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of the namespaces that exist now (`ip netns list`).
pub fn netns_list() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Deletes namespaces left behind by test processes that died without running their guards
/// (SIGKILL, a CI timeout): names `agt-<pid>-...` whose pid no longer exists. Namespaces of
/// live processes (a parallel run) are left alone. Returns the names deleted.
pub fn sweep_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in netns_list()? {
        let Some(pid) = name
            .strip_prefix("agt-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        if ip(&["netns", "del", &name]).is_ok() {
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Whether `pid` is a live process (a zombie is not: it is dead, only not reaped yet).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A unique name: `agt-<pid>-<counter>-<role>`. The pid keeps parallel test processes apart,
/// the counter keeps topologies of one process apart.
pub fn unique_name(role: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("agt-{}-{}-{}", std::process::id(), n, role)
}

/// A named network namespace (`/var/run/netns/NAME`). Deleted on drop when owned.
#[derive(Debug)]
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// Creates a fresh namespace with loopback up.
    pub fn create(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        // Owned from here on, so a failure below still deletes it.
        let ns = Netns {
            name: name.to_owned(),
            owned: true,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle to the same namespace that does not delete it on drop.
    pub fn handle(&self) -> Netns {
        Netns {
            name: self.name.clone(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Waits up to `limit` until no IPv6 address of this namespace is tentative: its links
    /// have their carrier and finished duplicate address detection, so its addresses can be
    /// bound, used as sources and resolved from.
    pub fn addresses_ready(&self, limit: Scaled) -> Result<()> {
        let tentative = || self.ip(&["-6", "addr", "show", "tentative"]);
        let done = |out: &Result<String>| out.as_ref().is_ok_and(|o| o.trim().is_empty());
        match poll(
            Instant::now(),
            limit,
            Duration::from_millis(10),
            tentative,
            done,
        ) {
            Ok(_) => Ok(()),
            Err(out) => bail!(
                "IPv6 addresses in {} still tentative after {limit}:\n{}",
                self.name,
                out?
            ),
        }
    }

    /// Runs `f` on a new thread that first joins this namespace, and waits for it. Sockets
    /// created by `f` stay in this namespace wherever they are used afterwards.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let handle = self.spawn(f)?;
        match handle.join() {
            Ok(v) => Ok(v),
            // Re-raise the closure's panic in the caller: a test's assertion inside `run`
            // must fail the test with its own message.
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Like [`Netns::run`], but returns the thread's handle at once.
    pub fn spawn<T, F>(&self, f: F) -> Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        // Opened here, not in the thread, so a missing namespace is an error of the caller.
        let file = self.open()?;
        let name = self.name.clone();
        let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let handle = std::thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn(move || {
                // SAFETY: setns on a valid fd; only this thread's network namespace changes
                // (CLONE_NEWNET is per thread), the file is kept open for the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    let _ = tx.send(Err(std::io::Error::last_os_error()));
                    // The closure must not run in the wrong namespace.
                    panic!("setns into {name} failed");
                }
                drop(file);
                let _ = tx.send(Ok(()));
                f()
            })
            .context("spawning a namespace thread")?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e).with_context(|| format!("setns(CLONE_NEWNET) into {}", self.name))
            }
            Err(_) => bail!("namespace thread for {} died before setns", self.name),
        }
    }

    fn open(&self) -> Result<File> {
        let path = format!("/var/run/netns/{}", self.name);
        File::open(&path).with_context(|| format!("opening {path}"))
    }

    /// Moves the calling thread into this namespace, for good: call it only on a thread made
    /// for the purpose (threads of a traffic generator that borrow from their scope).
    pub fn enter(&self) -> Result<()> {
        let file = self.open()?;
        // SAFETY: setns on a valid fd; only this thread's network namespace changes.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setns(CLONE_NEWNET) into {}", self.name));
        }
        Ok(())
    }

    /// Spawns `command` with the child moved into this namespace before it executes. Only
    /// the network namespace changes: unlike `ip netns exec`, which also remounts /sys and so
    /// hides the bpffs at /sys/fs/bpf, the child keeps the host's mounts, and its pid is the
    /// program's own.
    pub fn spawn_process(&self, command: &mut Command) -> Result<Child> {
        let file = self.open()?;
        let fd = file.as_raw_fd();
        // SAFETY: between fork and exec the closure makes one async-signal-safe syscall; `fd`
        // stays open because `file` lives until `spawn` returns.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command.spawn().with_context(|| {
            format!(
                "spawning {} in namespace {}",
                command.get_program().to_string_lossy(),
                self.name
            )
        })?;
        drop(file);
        Ok(child)
    }

    /// `ip netns exec NAME ARGS...`, to be run (for tools that want the namespace's /sys).
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    /// `/proc/net/dev` counters of `ifname` in this namespace.
    pub fn link_stats(&self, ifname: &str) -> Result<LinkStats> {
        let ifname = ifname.to_owned();
        self.run(move || read_link_stats(&ifname))?
    }

    /// `/proc/net/snmp` `Udp:` counters of this namespace (IPv4 only).
    pub fn udp_snmp(&self) -> Result<UdpSnmp> {
        self.run(|| {
            // thread-self: /proc/self/net would show the namespace of the main thread.
            let text = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            let text6 = std::fs::read_to_string("/proc/thread-self/net/snmp6")?;
            parse_udp_snmp(&text, &text6)
        })?
    }

    /// `/proc/net/snmp` `Tcp: InSegs` of this namespace: TCP segments its stack received,
    /// IPv4 and IPv6 alike (one MIB for both).
    pub fn tcp_in_segs(&self) -> Result<u64> {
        self.run(|| {
            let text = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            snmp_field(snmp_table(&text, "Tcp:")?, "InSegs")
                .context("no Tcp: InSegs in /proc/net/snmp")
        })?
    }

    /// `/proc/net/snmp` `Tcp: RetransSegs` of this namespace: segments its stack sent again
    /// (a lost segment or ACK on the way shows here before it breaks anything).
    pub fn tcp_retrans_segs(&self) -> Result<u64> {
        self.run(|| {
            let text = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            snmp_field(snmp_table(&text, "Tcp:")?, "RetransSegs")
                .context("no Tcp: RetransSegs in /proc/net/snmp")
        })?
    }

    /// Datagrams this namespace's stack forwarded, IPv4 (`Ip: ForwDatagrams`) and IPv6
    /// (`Ip6OutForwDatagrams`) added up.
    pub fn forwarded_datagrams(&self) -> Result<u64> {
        self.run(|| {
            let text = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            let text6 = std::fs::read_to_string("/proc/thread-self/net/snmp6")?;
            let v4 = snmp_field(snmp_table(&text, "Ip:")?, "ForwDatagrams")
                .context("no Ip: ForwDatagrams in /proc/net/snmp")?;
            let v6 = text6
                .lines()
                .filter_map(|l| l.split_once(char::is_whitespace))
                .find(|(k, _)| *k == "Ip6OutForwDatagrams")
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                .context("no Ip6OutForwDatagrams in /proc/net/snmp6")?;
            Ok(v4 + v6)
        })?
    }

    /// TCP segments received with a bad checksum (IPv4 and IPv6 share the TCP counters).
    pub fn tcp_csum_errors(&self) -> Result<u64> {
        self.run(|| {
            let text = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            snmp_field(snmp_table(&text, "Tcp:")?, "InCsumErrors")
                .context("no Tcp: InCsumErrors in /proc/net/snmp")
        })?
    }

    fn delete(&mut self) -> Result<()> {
        if self.owned {
            self.owned = false;
            ip(&["netns", "del", &self.name])?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("warning: cleaning up namespace: {e:#}");
        }
    }
}

/// Interface counters, as `/proc/net/dev` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

fn read_link_stats(ifname: &str) -> Result<LinkStats> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != ifname {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        if v.len() < 16 {
            bail!("short /proc/net/dev line for {ifname}: {line}");
        }
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop ...
        return Ok(LinkStats {
            rx_packets: v[1],
            rx_dropped: v[3],
            tx_packets: v[9],
            tx_dropped: v[11],
        });
    }
    bail!("interface {ifname} not in /proc/net/dev")
}

/// UDP counters of a namespace, IPv4 and IPv6 added up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpSnmp {
    pub in_datagrams: u64,
    pub no_ports: u64,
    pub in_errors: u64,
    pub rcvbuf_errors: u64,
    pub in_csum_errors: u64,
}

impl UdpSnmp {
    /// Counters that mean a datagram reached the namespace's UDP layer and was lost there.
    pub fn losses_since(&self, before: &UdpSnmp) -> u64 {
        (self.in_errors - before.in_errors)
            + (self.rcvbuf_errors - before.rcvbuf_errors)
            + (self.in_csum_errors - before.in_csum_errors)
    }
}

/// The header and value lines of one `/proc/net/snmp` table (`Tcp:`, `Udp:`, ...).
fn snmp_table<'a>(snmp: &'a str, prefix: &str) -> Result<(&'a str, &'a str)> {
    let mut lines = snmp.lines().filter(|l| l.starts_with(prefix));
    let (Some(head), Some(vals)) = (lines.next(), lines.next()) else {
        bail!("no {prefix} lines in /proc/net/snmp");
    };
    Ok((head, vals))
}

/// One field of a table from [`snmp_table`]; `None` when this kernel does not count it.
fn snmp_field((head, vals): (&str, &str), field: &str) -> Option<u64> {
    head.split_whitespace()
        .zip(vals.split_whitespace())
        .find(|(h, _)| *h == field)
        .and_then(|(_, v)| v.parse().ok())
}

fn parse_udp_snmp(snmp: &str, snmp6: &str) -> Result<UdpSnmp> {
    let udp = snmp_table(snmp, "Udp:")?;
    let get4 = |field: &str| -> u64 { snmp_field(udp, field).unwrap_or(0) };
    let get6 = |field: &str| -> u64 {
        snmp6
            .lines()
            .filter_map(|l| l.split_once(char::is_whitespace))
            .find(|(k, _)| *k == field)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(UdpSnmp {
        in_datagrams: get4("InDatagrams") + get6("Udp6InDatagrams"),
        no_ports: get4("NoPorts") + get6("Udp6NoPorts"),
        in_errors: get4("InErrors") + get6("Udp6InErrors"),
        rcvbuf_errors: get4("RcvbufErrors") + get6("Udp6RcvbufErrors"),
        in_csum_errors: get4("InCsumErrors") + get6("Udp6InCsumErrors"),
    })
}

/// Fixed MACs, so static neighbour entries can be written before any packet flows.
const CLIENT_MAC: &str = "02:a9:00:00:00:01";
const SERVER_MAC: &str = "02:a9:00:00:00:02";
/// Prefix lengths of the test network (198.18.0.0/15 and 2001:db8::/32 are reserved for
/// benchmarking and documentation; this workplace allows only them for test hosts).
const V4_PREFIX: u8 = 16;
const V6_PREFIX: u8 = 64;

/// One end of the topology's veth pair.
#[derive(Clone, Copy, Debug)]
enum Side {
    Client,
    Server,
}

/// Two namespaces, client and server, joined by a veth pair, with IPv4 and IPv6 addresses.
/// Dropping it deletes the links and the namespaces, also while a test unwinds from a panic.
#[derive(Debug)]
pub struct Topology {
    // Field order is drop order: the server (where an agent may run) goes last.
    pub client: Netns,
    pub server: Netns,
    /// The veth end inside `client`.
    pub client_if: String,
    /// The veth end inside `server`: where the agent attaches XDP.
    pub server_if: String,
    pub client_v4: Ipv4Addr,
    pub server_v4: Ipv4Addr,
    pub client_v6: Ipv6Addr,
    pub server_v6: Ipv6Addr,
    extra_v4: Vec<Ipv4Addr>,
    extra_v6: Vec<Ipv6Addr>,
    extra_server_v4: Vec<Ipv4Addr>,
    extra_server_v6: Vec<Ipv6Addr>,
}

impl Topology {
    pub const CLIENT_IF: &'static str = "veth-cli";
    pub const SERVER_IF: &'static str = "veth-srv";

    /// Builds client ns <-veth-> server ns: 198.18.0.1/16 and 2001:db8::1/64 on the client,
    /// 198.18.0.2/16 and 2001:db8::2/64 on the server, every link up, permanent neighbour
    /// entries both ways (a paced sender must not lose its first packets to ARP/ND
    /// resolution, whose queue holds only a few packets). Namespaces of unique names.
    pub fn new() -> Result<Topology> {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| match sweep_stale() {
            Ok(gone) if !gone.is_empty() => eprintln!("removed stale namespaces: {gone:?}"),
            Ok(_) => {}
            Err(e) => eprintln!("warning: sweeping stale namespaces: {e:#}"),
        });
        Self::named(
            &unique_name("c"),
            &unique_name("s"),
            Self::CLIENT_IF,
            Self::SERVER_IF,
        )
    }

    /// Like [`Topology::new`], with the namespaces and veth ends named by the caller (the
    /// demo's fixed names; the namespaces must not exist yet).
    pub fn named(
        client_ns: &str,
        server_ns: &str,
        client_if: &str,
        server_if: &str,
    ) -> Result<Topology> {
        let client = Netns::create(client_ns)?;
        let server = Netns::create(server_ns)?;
        let topo = Topology {
            client,
            server,
            client_if: client_if.to_owned(),
            server_if: server_if.to_owned(),
            client_v4: Ipv4Addr::new(198, 18, 0, 1),
            server_v4: Ipv4Addr::new(198, 18, 0, 2),
            client_v6: "2001:db8::1".parse().expect("literal"),
            server_v6: "2001:db8::2".parse().expect("literal"),
            extra_v4: Vec::new(),
            extra_v6: Vec::new(),
            extra_server_v4: Vec::new(),
            extra_server_v6: Vec::new(),
        };
        topo.client.ip(&[
            "link",
            "add",
            client_if,
            "address",
            CLIENT_MAC,
            "type",
            "veth",
            "peer",
            "name",
            server_if,
            "address",
            SERVER_MAC,
            "netns",
            topo.server.name(),
        ])?;
        for (ns, ifname) in [(&topo.client, client_if), (&topo.server, server_if)] {
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        for (side, v4, v6) in [
            (Side::Client, topo.client_v4, topo.client_v6),
            (Side::Server, topo.server_v4, topo.server_v6),
        ] {
            topo.add_addr(side, v4.into())?;
            topo.add_addr(side, v6.into())?;
        }
        Ok(topo)
    }

    /// The prefix length of the test network's IPv4 addresses.
    pub const V4_PREFIX: u8 = V4_PREFIX;

    /// One more address of the caller's choosing on the server's veth end (a backend of its
    /// own, which can be broken alone), reached from the client without ARP/ND.
    pub fn add_server_addr(&self, addr: IpAddr) -> Result<()> {
        self.add_addr(Side::Server, addr)
    }

    /// One more address of the caller's choosing on the client's veth end.
    pub fn add_client_addr(&self, addr: IpAddr) -> Result<()> {
        self.add_addr(Side::Client, addr)
    }

    /// One more address on `side`'s veth end (IPv6 without duplicate detection), and a
    /// permanent neighbour entry for it on the other side: nothing toward it waits on ARP/ND
    /// resolution (a SYN waiting there would not yet have passed TC egress).
    fn add_addr(&self, side: Side, addr: IpAddr) -> Result<()> {
        let (ns, ifname, mac, peer, peer_if) = match side {
            Side::Client => (
                &self.client,
                &self.client_if,
                CLIENT_MAC,
                &self.server,
                &self.server_if,
            ),
            Side::Server => (
                &self.server,
                &self.server_if,
                SERVER_MAC,
                &self.client,
                &self.client_if,
            ),
        };
        let cidr = match addr {
            IpAddr::V4(_) => format!("{addr}/{V4_PREFIX}"),
            IpAddr::V6(_) => format!("{addr}/{V6_PREFIX}"),
        };
        let mut add = vec!["addr", "add", &cidr, "dev", ifname];
        if addr.is_ipv6() {
            // Usable at once instead of after duplicate detection.
            add.push("nodad");
        }
        ns.ip(&add)?;
        peer.ip(&[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            mac,
            "dev",
            peer_if,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    /// Adds `n` addresses to `side`: the i-th of those in `list` is `nth(i)`.
    fn add_addrs<A: Copy + Into<IpAddr>>(
        &mut self,
        side: Side,
        n: usize,
        list: fn(&mut Topology) -> &mut Vec<A>,
        nth: fn(usize) -> Result<A>,
    ) -> Result<Vec<A>> {
        let mut added = Vec::with_capacity(n);
        for _ in 0..n {
            let addr = nth(list(self).len())?;
            self.add_addr(side, addr.into())?;
            list(self).push(addr);
            added.push(addr);
        }
        Ok(added)
    }

    /// Adds `n` more IPv4 addresses to the client (198.18.1.1, 198.18.1.2, ...), for tests
    /// that need several sources; returns the new ones. The server learns their MAC statically.
    pub fn add_client_v4(&mut self, n: usize) -> Result<Vec<Ipv4Addr>> {
        self.add_addrs(
            Side::Client,
            n,
            |t| &mut t.extra_v4,
            |i| {
                if i >= 250 * 250 {
                    bail!("at most 62,500 extra client addresses");
                }
                Ok(Ipv4Addr::new(
                    198,
                    18,
                    1 + (i / 250) as u8,
                    (i % 250) as u8 + 1,
                ))
            },
        )
    }

    /// Adds `n` more IPv6 addresses to the client (2001:db8::1:1, ...).
    pub fn add_client_v6(&mut self, n: usize) -> Result<Vec<Ipv6Addr>> {
        self.add_addrs(
            Side::Client,
            n,
            |t| &mut t.extra_v6,
            |i| Ok(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, i as u16 + 1)),
        )
    }

    /// Adds `n` more IPv4 addresses to the server (198.18.2.1, 198.18.2.2, ...), one per
    /// backend that a test must be able to break alone (e.g. `ip rule add from ADDR
    /// blackhole`); returns the new ones. The client learns their MAC statically.
    pub fn add_server_v4(&mut self, n: usize) -> Result<Vec<Ipv4Addr>> {
        self.add_addrs(
            Side::Server,
            n,
            |t| &mut t.extra_server_v4,
            |i| {
                if i >= 250 {
                    bail!("at most 250 extra server addresses");
                }
                Ok(Ipv4Addr::new(198, 18, 2, i as u8 + 1))
            },
        )
    }

    /// Adds `n` more IPv6 addresses to the server (2001:db8::2:1, ...).
    pub fn add_server_v6(&mut self, n: usize) -> Result<Vec<Ipv6Addr>> {
        self.add_addrs(
            Side::Server,
            n,
            |t| &mut t.extra_server_v6,
            |i| Ok(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 2, i as u16 + 1)),
        )
    }

    /// A VIP for the client: an address no interface holds, reached through the server's MAC
    /// (a permanent neighbour entry on the client), so the client's packets to it leave
    /// through the client veth, where the datapath rewrites them toward a backend.
    pub fn add_vip(&self, addr: IpAddr) -> Result<()> {
        self.client.ip(&[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            SERVER_MAC,
            "dev",
            &self.client_if,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    /// Turns checksum offload off on both veth ends (`ethtool -K IF tx off rx off`): senders
    /// then write full checksums, and receivers verify them in software instead of trusting
    /// a veth peer, so a wrong checksum after NAT is a dropped packet and a failed transfer.
    pub fn checksum_offload_off(&self) -> Result<()> {
        for (ns, ifname) in [
            (&self.client, &self.client_if),
            (&self.server, &self.server_if),
        ] {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns.name(),
                    "ethtool",
                    "-K",
                    ifname,
                    "tx",
                    "off",
                    "rx",
                    "off",
                ])
                .output()
                .context("running ethtool (Debian package `ethtool`)")?;
            if !out.status.success() {
                bail!(
                    "ethtool -K {ifname} tx off rx off: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    /// Drop counters of the path client socket -> server stack, before any XDP verdict:
    /// the client veth's tx_dropped and the server veth's rx_dropped (which also counts
    /// backlog overflow in `netif_rx`). A limiter test whose path dropped packets would
    /// blame the limiter for them, so tests check this stays unchanged.
    pub fn path_drops(&self) -> Result<u64> {
        let c = self.client.link_stats(&self.client_if)?;
        let s = self.server.link_stats(&self.server_if)?;
        Ok(c.tx_dropped + s.rx_dropped)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair as well; deleting the link first
        // makes that explicit and frees the peer at once even if something (an agent that
        // did not exit) still holds the server namespace open.
        let _ = self.client.ip(&["link", "del", &self.client_if]);
    }
}
