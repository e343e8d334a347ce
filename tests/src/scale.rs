//! Scale (issue 16): policies of many balanced services in a topology that routes them, and
//! what the agent process costs: its BPF maps' memory as the kernel accounts it, its RSS and
//! its CPU time.
//!
//! Addresses (inside 198.18.0.0/15, the benchmarking range the tests may use): the VIPs are in
//! 198.19.128.0/17 and the backends in 198.19.0.0/17. The client (where the agent runs) routes
//! 198.19.0.0/16 through the server's veth address, so probes and balanced packets leave on
//! the veth the agent is attached to. The server holds all of 198.19.0.0/17 as a local route
//! (`ip route add local ... dev lo`, AnyIP), so every backend address answers without an
//! address per backend, and one listener per port on 0.0.0.0 accepts every backend's TCP
//! health checks. Packets to a VIP that were not balanced reach the server and are dropped
//! there (no forwarding, no local route): a VIP is never answered by accident.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_common::fdinfo;
use anyhow::{Context, Result, bail};

use crate::{
    agent::{AgentProcess, TempDir},
    netns::{Netns, Topology},
    timing::Scaled,
};

/// The port of the first backend listener; backends beyond [`BACKEND_ADDRS`] use the next
/// ports.
pub const BACKEND_PORT: u16 = 8080;
/// The port every VIP balances.
pub const VIP_PORT: u16 = 80;
/// Backend addresses in use per port (198.19.0.1 to 198.19.119.250).
pub const BACKEND_ADDRS: usize = 120 * 250;
/// At most this many services: VIPs 198.19.128.1 to 198.19.254.250.
pub const MAX_SERVICES: usize = 127 * 250;
/// At most this many backends in all: [`BACKEND_ADDRS`] on each of 4 ports.
pub const MAX_BACKENDS: usize = 4 * BACKEND_ADDRS;
/// The listen address of the agent in these policies.
pub const LISTEN: &str = "127.0.0.1:9090";

/// Service `i`'s VIP: 198.19.128.1, ..., 198.19.128.250, 198.19.129.1, ...
pub fn vip(i: usize) -> SocketAddr {
    assert!(i < MAX_SERVICES, "service {i}: at most {MAX_SERVICES}");
    let addr = Ipv4Addr::new(198, 19, 128 + (i / 250) as u8, 1 + (i % 250) as u8);
    SocketAddr::new(addr.into(), VIP_PORT)
}

/// Backend `k` (counted over all services): 198.19.0.1:8080, ... 198.19.119.250:8080, then
/// the same addresses on 8081, and so on.
pub fn backend(k: usize) -> SocketAddr {
    assert!(k < MAX_BACKENDS, "backend {k}: at most {MAX_BACKENDS}");
    let a = k % BACKEND_ADDRS;
    let addr = Ipv4Addr::new(198, 19, (a / 250) as u8, 1 + (a % 250) as u8);
    SocketAddr::new(addr.into(), BACKEND_PORT + (k / BACKEND_ADDRS) as u16)
}

/// A policy of `services` balanced services (`maglev`, `vip: true`, table size at its
/// default) of `backends` backends each.
#[derive(Clone, Debug)]
pub struct ScalePolicy {
    pub services: usize,
    pub backends: usize,
    /// A TCP health check every second on every backend (the setting).
    pub health_checks: bool,
    /// Lines under `agent:` beyond `listen` (e.g. `  tables: { services: 100 }\n`).
    pub agent_extra: String,
    pub log_level: &'static str,
}

impl ScalePolicy {
    /// `services` x `backends`, health checks on, the agent's defaults.
    pub fn new(services: usize, backends: usize) -> ScalePolicy {
        ScalePolicy {
            services,
            backends,
            health_checks: true,
            agent_extra: String::new(),
            log_level: "info",
        }
    }

    /// The YAML, attached to `ifname` (generic XDP, both directions).
    pub fn render(&self, ifname: &str) -> String {
        assert!(
            self.services * self.backends <= MAX_BACKENDS,
            "{} x {} backends: at most {MAX_BACKENDS}",
            self.services,
            self.backends
        );
        // About 60 bytes a backend line, 150 a service.
        let mut y = String::with_capacity(self.services * (150 + 60 * self.backends) + 512);
        let _ = write!(
            y,
            "version: 1\n\
             agent:\n  listen: {LISTEN}\n  log_level: {level}\n{extra}\
             interfaces:\n  - name: {ifname}\n    xdp_mode: generic\n    direction: both\n\
             services:\n",
            level = self.log_level,
            extra = self.agent_extra,
        );
        for i in 0..self.services {
            let vip = vip(i);
            let _ = write!(
                y,
                "  - name: svc-{i}\n    match: {{ address: \"{ip}\", port: {port}, protocol: tcp }}\n    backends:\n",
                ip = vip.ip(),
                port = vip.port(),
            );
            for j in 0..self.backends {
                let _ = writeln!(
                    y,
                    "      - {{ address: \"{}\" }}",
                    backend(i * self.backends + j)
                );
            }
            y.push_str("    load_balancing: { algorithm: maglev, vip: true }\n");
            if self.health_checks {
                y.push_str("    health_check: { type: tcp, interval: 1s }\n");
            }
        }
        y
    }

    /// Backend listener ports this policy's backends use.
    pub fn ports(&self) -> Vec<u16> {
        let total = self.services * self.backends;
        let n = total.div_ceil(BACKEND_ADDRS).max(1);
        (0..n as u16).map(|p| BACKEND_PORT + p).collect()
    }
}

/// The topology of this module's addresses: client and server namespaces, the routes above,
/// and a listener on each backend port in the server that accepts every backend's probes.
pub struct ScaleLab {
    // Field order is drop order: the agent first (it runs in the client), then listeners.
    agent: Option<AgentProcess>,
    listeners: Vec<Acceptor>,
    pub topo: Topology,
    pub dir: TempDir,
}

impl ScaleLab {
    /// The topology and listeners on `ports` (see [`ScalePolicy::ports`]).
    pub fn new(ports: &[u16]) -> Result<ScaleLab> {
        let topo = Topology::new()?;
        let gateway = topo.server_v4.to_string();
        topo.client
            .ip(&["route", "add", "198.19.0.0/16", "via", &gateway])?;
        topo.server
            .ip(&["route", "add", "local", "198.19.0.0/17", "dev", "lo"])?;
        let listeners = ports
            .iter()
            .map(|&p| Acceptor::start(&topo.server, SocketAddr::from(([0, 0, 0, 0], p))))
            .collect::<Result<Vec<_>>>()?;
        Ok(ScaleLab {
            agent: None,
            listeners,
            topo,
            dir: TempDir::new()?,
        })
    }

    /// Connections the backend listeners accepted so far (health checks, mostly).
    pub fn accepted(&self) -> u64 {
        self.listeners.iter().map(Acceptor::accepted).sum()
    }

    /// `TcpExtListenOverflows` of the server namespace: handshakes the backend listeners'
    /// full accept queues dropped (probes failed by the harness, not by the agent).
    pub fn listen_overflows(&self) -> Result<u64> {
        let text = self
            .topo
            .server
            .run(|| std::fs::read_to_string("/proc/thread-self/net/netstat"))??;
        tcp_ext(&text, "ListenOverflows").context("/proc/net/netstat: no TcpExt ListenOverflows")
    }

    /// Writes `policy` and starts the agent `bin` on the client veth; returns at once with
    /// the time of the start. [`ScaleLab::wait_ready`] measures from it.
    pub fn spawn(&mut self, bin: &Path, policy: &ScalePolicy) -> Result<Instant> {
        let text = policy.render(&self.topo.client_if);
        let path = self.dir.write("scale.yaml", &text)?;
        self.stop()?;
        let start = Instant::now();
        self.agent = Some(AgentProcess::spawn(bin, &self.topo.client, &path)?);
        Ok(start)
    }

    /// Waits until `/health/ready` answers 200 or `give_up` passes; returns the time from
    /// `start` (from [`ScaleLab::spawn`]).
    pub fn wait_ready(&mut self, start: Instant, give_up: Scaled) -> Result<Duration> {
        self.agent_mut()?.wait_ready(give_up)?;
        Ok(start.elapsed())
    }

    pub fn agent(&self) -> Result<&AgentProcess> {
        self.agent.as_ref().context("the agent is not running")
    }

    fn agent_mut(&mut self) -> Result<&mut AgentProcess> {
        self.agent.as_mut().context("the agent is not running")
    }

    /// Stops the agent if one runs; an error if it did not exit in time.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(a) = self.agent.take() {
            a.stop()?;
        }
        Ok(())
    }
}

/// How long the acceptor waits for a connection before it looks at its stop flag again (a
/// period, not a bound).
const ACCEPT_IDLE_MS: libc::c_int = 10;
/// The listen backlog asked for (the kernel caps it at the namespace's `net.core.somaxconn`,
/// which [`Acceptor::start`] raises to this).
const BACKLOG: libc::c_int = 65_535;

/// A listener that accepts and closes at once, counting: tens of thousands of backends'
/// health checks a second on one socket, without a thread or a record per connection (what
/// [`crate::backend::TcpServer`] keeps). It drains every pending connection each time the
/// socket is readable; a full accept queue would drop probes' handshakes and fail them for
/// the harness's sake (`TcpExtListenOverflows` in the server namespace says if it happens).
/// Stopped and joined on drop.
pub struct Acceptor {
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Binds `addr` in `ns` with a backlog of [`BACKLOG`] and serves until dropped.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Acceptor> {
        let sysctl = ns
            .exec(&["sysctl", "-qw", &format!("net.core.somaxconn={BACKLOG}")])
            .status()
            .context("running sysctl in the server namespace")?;
        if !sysctl.success() {
            bail!(
                "sysctl net.core.somaxconn={BACKLOG} in {}: {sysctl}",
                ns.name()
            );
        }
        let listener = ns
            .run(move || TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr}"))?;
        // Again, with the larger backlog: listen(2) on a listening socket updates it.
        // SAFETY: listen on a socket this function owns.
        if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
            bail!(
                "listen({addr}, {BACKLOG}): {}",
                std::io::Error::last_os_error()
            );
        }
        listener.set_nonblocking(true)?;
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, flag) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut pfd = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: one valid pollfd, for the duration of the call.
                if unsafe { libc::poll(&mut pfd, 1, ACCEPT_IDLE_MS) } <= 0 {
                    continue;
                }
                loop {
                    match listener.accept() {
                        Ok((s, _)) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            drop(s);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        // ECONNABORTED and the like: that connection only.
                        Err(_) => {}
                    }
                }
            }
        });
        Ok(Acceptor {
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A `TcpExt:` counter of a `/proc/net/netstat` text (a header line of names, then a line
/// of values).
pub fn tcp_ext(netstat: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// BPF maps a process holds, as the kernel accounts them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapMemory {
    /// The sum of `memlock` over distinct `map_id`s.
    pub bytes: u64,
    /// `memlock` per `map_id` (a map held by several fds counted once).
    pub by_id: BTreeMap<u32, u64>,
}

impl MapMemory {
    pub fn mib(&self) -> f64 {
        self.bytes as f64 / MIB
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// The maps process `pid` holds open: every fd whose `/proc/PID/fdinfo/FD` has a `map_id`,
/// its `memlock` (the bytes the kernel charges for that map) summed once per map id.
pub fn map_memory(pid: u32) -> Result<MapMemory> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut mem = MapMemory::default();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = entry?.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // An fd closed between the listing and the read.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        match fdinfo::parse_fdinfo(&text) {
            Some(m) => {
                mem.by_id.insert(m.map_id, m.memlock);
            }
            // A map whose fields do not read is not skipped silently.
            None if fdinfo::field(&text, "map_id").is_some() => {
                bail!(
                    "{}: a map without readable sizes or memlock",
                    path.display()
                )
            }
            None => {}
        }
    }
    mem.bytes = mem.by_id.values().sum();
    Ok(mem)
}

/// The resident set of process `pid` (`VmRSS` in `/proc/PID/status`), in bytes.
pub fn rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vmrss(&text).with_context(|| format!("{path}: no VmRSS"))
}

/// `VmRSS` of a `/proc/PID/status` text, in bytes.
pub fn parse_vmrss(text: &str) -> Option<u64> {
    let v = text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = v.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

/// CPU time a process has used, every thread (`utime` and `stime` of `/proc/PID/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTime {
    pub user: Duration,
    /// Syscalls, and the softirq work that runs in the process's context.
    pub system: Duration,
}

impl CpuTime {
    pub fn total(self) -> Duration {
        self.user + self.system
    }
}

/// The CPU time process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Result<CpuTime> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (user, system) =
        parse_stat_cpu_ticks(&text).with_context(|| format!("{path}: {text:?}"))?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) = {hz}");
    }
    let secs = |ticks: u64| Duration::from_secs_f64(ticks as f64 / hz as f64);
    Ok(CpuTime {
        user: secs(user),
        system: secs(system),
    })
}

/// `utime` and `stime` (clock ticks) of a `/proc/PID/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`: utime and
/// stime are fields 14 and 15, the 12th and 13th after it.
pub fn parse_stat_cpu_ticks(text: &str) -> Option<(u64, u64)> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// `BIN check FILE` of a [`ScalePolicy`] written to `dir/name` (no kernel, no namespace):
/// its exit code and its output (stdout and stderr).
pub fn check(
    bin: &Path,
    dir: &Path,
    name: &str,
    policy: &ScalePolicy,
) -> Result<(Option<i32>, String)> {
    // `lo` exists everywhere; `check` does not attach anything.
    let text = policy.render("lo");
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let out = std::process::Command::new(bin)
        .arg("check")
        .arg(&path)
        .output()
        .context("running agent check")?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code(), text))
}

/// `FILE:LINE:COLUMN` positions in `text` for `file` (every occurrence), for a refusal's
/// message.
pub fn positions(text: &str, file: &Path) -> Vec<(usize, usize)> {
    let name = file.display().to_string();
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&name) {
        rest = &rest[i + name.len()..];
        let mut parts = rest.splitn(3, ':');
        let (Some(""), Some(line), Some(col)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let col: String = col.chars().take_while(char::is_ascii_digit).collect();
        if let (Ok(l), Ok(c)) = (line.parse(), col.parse()) {
            found.push((l, c));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_and_cpu_of_proc_texts() {
        assert_eq!(
            parse_vmrss("Name:\tagent\nVmRSS:\t   49784 kB\nRssAnon:\t1 kB\n"),
            Some(49784 * 1024)
        );
        assert_eq!(parse_vmrss("Name:\tkthreadd\n"), None);
        // The command name holds a space and a ')': fields count after the last one.
        let stat = "1234 (a) b) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 9 0 1 2 3";
        assert_eq!(parse_stat_cpu_ticks(stat), Some((250, 75)));
        // Our own process: at least what it has used so far, and readable.
        assert!(cpu_time(std::process::id()).is_ok());
        assert!(rss(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn addresses_are_distinct_and_in_their_ranges() {
        let mut seen = std::collections::HashSet::new();
        for k in 0..MAX_BACKENDS {
            let b = backend(k);
            assert!(seen.insert(b), "backend {k} = {b} repeats");
            let std::net::IpAddr::V4(a) = b.ip() else {
                panic!("{b}")
            };
            assert!(a.octets()[..2] == [198, 19] && a.octets()[2] < 128, "{b}");
        }
        let vips: std::collections::HashSet<_> = (0..MAX_SERVICES).map(vip).collect();
        assert_eq!(vips.len(), MAX_SERVICES);
        assert!(vips.iter().all(|v| !seen.contains(v)));
        assert_eq!(vip(0).to_string(), "198.19.128.1:80");
        assert_eq!(backend(BACKEND_ADDRS).to_string(), "198.19.0.1:8081");
    }

    #[test]
    fn policy_lists_every_service_and_backend() {
        let p = ScalePolicy::new(3, 2).render("veth0");
        assert_eq!(p.matches("  - name: svc-").count(), 3);
        assert_eq!(p.matches("      - { address: ").count(), 6);
        assert_eq!(p.matches("health_check").count(), 3);
        assert!(p.contains("address: \"198.19.0.6:8080\""), "{p}");
        assert_eq!(ScalePolicy::new(10_000, 6).ports(), [8080, 8081]);
    }

    #[test]
    fn tcp_ext_counter_of_netstat() {
        let t = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                 TcpExt: 0 26258 26260\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(tcp_ext(t, "ListenOverflows"), Some(26258));
        assert_eq!(tcp_ext(t, "Nope"), None);
    }

    #[test]
    fn positions_of_a_file_in_a_message() {
        let f = Path::new("/tmp/x/over.yaml");
        let msg = "/tmp/x/over.yaml:4:14: agent.tables.services: 101 services, at most 100\n\
                   /tmp/x/over.yaml: invalid";
        assert_eq!(positions(msg, f), [(4, 14)]);
    }
}
