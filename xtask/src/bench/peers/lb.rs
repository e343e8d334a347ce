//! `cargo xtask bench peers lb`: L4 load balancing, the agent's VIP against HAProxy and nginx
//! `stream` and a direct connection, over the same two backends, in one topology.
//!
//! ```text
//! client namespace (veth-cli 198.18.0.1)                server namespace (veth-srv)
//!   the clients                                           198.18.2.1:8080  backend 0
//!   HAProxy 127.0.0.1:8101 (roundrobin), :8102 (leastconn)  198.18.2.2:8080  backend 1
//!   nginx 127.0.0.1:8103 (stream, round robin)            (read 64 B, answer 64 B, wait
//!   the agent: VIP 198.18.0.100:80 on veth-cli             for the client's close)
//! ```
//!
//! Every row is measured the same way: (b) one client makes short exchanges one after
//! another (connect, 64 bytes each way, close), each timed, for p50/p95/p99/max; then (a)
//! several clients make them for a fixed time, for connections per second, and (c) all CPUs'
//! busy time over that interval (/proc/stat) per connection. The rows run in the order a user
//! would try them, in one topology (issue 14, item 5: what direct connections leave behind
//! matters to the VIP that follows): direct, HAProxy, nginx, the agent (generic, then native
//! XDP), then the agent's VIP while a second client connects directly to the same backends.
//! A round is one pass over the rows; each figure is the median of the rounds, with min-max.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agent_tests::{
    agent::{AgentProcess, READY_TIMEOUT, TempDir, backend_items},
    netns::{Netns, Topology},
    scale,
    traffic::exchange::{self, Background, Closes, ExchangeServer, Exchanges},
};
use anyhow::{Context as _, Result, bail};

use super::{
    Ctx,
    plot::{self, Bar},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const HAPROXY_RR: SocketAddr = proxy_addr(8101);
const HAPROXY_LC: SocketAddr = proxy_addr(8102);
const NGINX: SocketAddr = proxy_addr(8103);
/// Debian 12 builds nginx's `stream` as a module of its own (package libnginx-mod-stream).
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// Threads of each backend: more than the clients that connect at once.
const SERVER_THREADS: usize = 16;
/// Clients at once while connections per second are measured.
const CLIENTS: usize = 4;
/// Sequential exchanges of the latency measure (the issue's 3,000), and with `--quick`.
const SEQUENTIAL: usize = 3000;
const QUICK_SEQUENTIAL: usize = 500;
/// How long the clients run for connections per second, and with `--quick`.
const RATE_TIME: Duration = Duration::from_secs(2);
const QUICK_RATE_TIME: Duration = Duration::from_millis(700);
/// Timeout of one exchange's connect and of each read: above TCP's 1 s initial SYN
/// retransmission, so that a lost SYN shows as a slow exchange rather than a failure.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// The agents' pins: a path of the bench's own, so that an agent running on the host (or
/// another bench or test, on the default path) does not stop it (one agent per path).
pub(super) const PIN_PATH: &str = "/sys/fs/bpf/agent-bench-peers";
/// The mixed row: exchanges the direct client makes at least, unless this passes first.
const MIXED_DIRECT_MIN: usize = 3;
const MIXED_DIRECT_WAIT: Duration = Duration::from_secs(10);
/// The client namespace's settings.
const CLIENT_SYSCTLS: [&str; 1] = ["net.ipv4.tcp_tw_reuse=1"];
/// How long a proxy has to start listening.
const PROXY_READY: Duration = Duration::from_secs(10);

const fn proxy_addr(port: u16) -> SocketAddr {
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// The rows, in the order they run in each round.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Row {
    Direct,
    HaproxyRr,
    HaproxyLc,
    Nginx,
    AgentGeneric,
    AgentNative,
    /// The agent's VIP (native XDP) while a second client connects directly.
    Mixed,
    /// That second client's direct exchanges, measured beside the mixed row.
    MixedDirect,
}

const ROWS: [Row; 8] = [
    Row::Direct,
    Row::HaproxyRr,
    Row::HaproxyLc,
    Row::Nginx,
    Row::AgentGeneric,
    Row::AgentNative,
    Row::Mixed,
    Row::MixedDirect,
];

impl Row {
    fn label(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::HaproxyRr => "HAProxy roundrobin",
            Row::HaproxyLc => "HAProxy leastconn",
            Row::Nginx => "nginx stream",
            Row::AgentGeneric => "agent VIP, generic XDP",
            Row::AgentNative => "agent VIP, native XDP",
            Row::Mixed => "mixed: agent VIP (native)",
            Row::MixedDirect => "mixed: direct beside it",
        }
    }

    /// The label in the charts, where groups are narrow.
    fn short(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::HaproxyRr => "HAProxy rr",
            Row::HaproxyLc => "HAProxy lc",
            Row::Nginx => "nginx",
            Row::AgentGeneric => "agent generic",
            Row::AgentNative => "agent native",
            Row::Mixed => "mixed: VIP",
            Row::MixedDirect => "mixed: direct",
        }
    }

    /// The peer tool a row needs (a package name of `peers::TOOLS`).
    fn tool(self) -> Option<&'static str> {
        match self {
            Row::HaproxyRr | Row::HaproxyLc => Some("haproxy"),
            Row::Nginx => Some("nginx"),
            _ => None,
        }
    }

    /// Whether (a) and (c) are measured: the mixed rows have latency only (two clients of
    /// different kinds share the interval).
    fn rated(self) -> bool {
        !matches!(self, Row::Mixed | Row::MixedDirect)
    }
}

/// What one round measured of one row.
struct Sample {
    /// Sequential exchanges: p50, p95, p99, max, in microseconds.
    latency: [f64; 4],
    /// Exchanges of the latency measure that failed, and the first in words.
    failed: usize,
    failure: String,
    /// Connections per second and busy CPU microseconds per connection (rated rows).
    rate: Option<(f64, f64)>,
    /// Exchanges of the rate measure that failed.
    rate_failed: usize,
    /// Exchanges made, both measures.
    made: usize,
    /// CPU microseconds per connection of the agent's or the proxy's processes over the same
    /// interval (rated rows with one).
    process: Option<f64>,
}

pub fn run(ctx: &Ctx) -> Result<String> {
    let (sequential, rate_time) = if ctx.quick {
        (QUICK_SEQUENTIAL, QUICK_RATE_TIME)
    } else {
        (SEQUENTIAL, RATE_TIME)
    };
    let load_before = crate::bench::first_word("/proc/loadavg");
    let lab = Lab::new()?;
    let skipped: Vec<(Row, String)> = ROWS
        .iter()
        .filter_map(|r| Some((*r, ctx.tools.unavailable(r.tool()?)?.to_owned())))
        .chain(
            fs::metadata(NGINX_STREAM_MODULE)
                .err()
                .filter(|_| ctx.tools.unavailable("nginx").is_none())
                .map(|e| {
                    (
                        Row::Nginx,
                        format!("skipped: nginx's stream module {NGINX_STREAM_MODULE}: {e}"),
                    )
                }),
        )
        .collect();
    let runs = |r: Row| !skipped.iter().any(|(s, _)| *s == r);
    let haproxy = runs(Row::HaproxyRr);
    let nginx = runs(Row::Nginx);

    let mut samples: Vec<(Row, Vec<Sample>)> = ROWS.iter().map(|r| (*r, Vec::new())).collect();
    let mut record = |row: Row, s: Sample| {
        println!(
            "bench peers lb: {}: p50 {:.0} p95 {:.0} p99 {:.0} max {:.0} us{}{}",
            row.label(),
            s.latency[0],
            s.latency[1],
            s.latency[2],
            s.latency[3],
            s.rate
                .map(|(cps, cpu)| format!(", {cps:.0} conn/s, {cpu:.1} us CPU/conn"))
                .unwrap_or_default(),
            if s.failed + s.rate_failed > 0 {
                format!(", failed {} + {} ({})", s.failed, s.rate_failed, s.failure)
            } else {
                String::new()
            }
        );
        if let Some((_, v)) = samples.iter_mut().find(|(r, _)| *r == row) {
            v.push(s);
        }
    };
    for round in 1..=ctx.repeats {
        println!("bench peers lb: round {round} of {}", ctx.repeats);
        let backends = lab.backends.clone();
        record(
            Row::Direct,
            lab.measure(&backends, Row::Direct, None, sequential, rate_time)?,
        );
        if haproxy {
            let proxy = lab.haproxy()?;
            for (row, addr) in [(Row::HaproxyRr, HAPROXY_RR), (Row::HaproxyLc, HAPROXY_LC)] {
                let pid = Some(proxy.pid());
                record(row, lab.measure(&[addr], row, pid, sequential, rate_time)?);
            }
            proxy.stop()?;
        }
        if nginx {
            let proxy = lab.nginx()?;
            let pid = Some(proxy.pid());
            record(
                Row::Nginx,
                lab.measure(&[NGINX], Row::Nginx, pid, sequential, rate_time)?,
            );
            proxy.stop()?;
        }
        let vip = [SocketAddr::from((VIP, VIP_PORT))];
        let agent = lab.agent(ctx, "generic")?;
        let pid = Some(agent.pid());
        record(
            Row::AgentGeneric,
            lab.measure(&vip, Row::AgentGeneric, pid, sequential, rate_time)?,
        );
        agent.stop()?;
        let agent = lab.agent(ctx, "native")?;
        let pid = Some(agent.pid());
        record(
            Row::AgentNative,
            lab.measure(&vip, Row::AgentNative, pid, sequential, rate_time)?,
        );
        let beside = Background::start(&lab.topo.client, &backends, EXCHANGE_TIMEOUT)?;
        let mixed = lab.measure(&vip, Row::Mixed, None, sequential, rate_time);
        // The direct client's exchanges may hang for their whole timeout: wait for a few
        // (bounded), so its row says what they do.
        let since = Instant::now();
        while beside.made() < MIXED_DIRECT_MIN && since.elapsed() < MIXED_DIRECT_WAIT {
            std::thread::sleep(Duration::from_millis(10));
        }
        let direct = beside.finish();
        record(Row::Mixed, mixed?);
        record(Row::MixedDirect, Sample::sequential(&direct, None));
        agent.stop()?;
    }
    drop(lab);
    let load = (load_before, crate::bench::first_word("/proc/loadavg"));
    report(ctx, sequential, rate_time, &samples, &skipped, &load)
}

/// The topology, the two backends, and where the proxies' files go.
struct Lab {
    topo: Topology,
    backends: Vec<SocketAddr>,
    servers: Vec<ExchangeServer>,
    dir: TempDir,
}

impl Lab {
    fn new() -> Result<Lab> {
        let mut topo = Topology::new()?;
        let backends: Vec<SocketAddr> = topo
            .add_server_v4(2)?
            .into_iter()
            .map(|a| SocketAddr::from((a, BACKEND_PORT)))
            .collect();
        let servers = backends
            .iter()
            .map(|b| ExchangeServer::start(&topo.server, *b, SERVER_THREADS, Closes::Client))
            .collect::<Result<Vec<_>>>()?;
        // Tens of thousands of connections a round to the same two backends: ports in
        // TIME_WAIT would run out within TIME_WAIT's 60 s (a load generator's settings).
        for setting in CLIENT_SYSCTLS {
            let status = topo
                .client
                .exec(&["sysctl", "-qw", setting])
                .status()
                .context("running sysctl in the client namespace")?;
            if !status.success() {
                bail!("sysctl -w {setting} in {}: {status}", topo.client.name());
            }
        }
        // The VIP is on the client's own subnet: a permanent neighbour entry sends its frames
        // to the server's MAC, as the balancing tests do.
        topo.add_vip(VIP.into())?;
        Ok(Lab {
            topo,
            backends,
            servers,
            dir: TempDir::new()?,
        })
    }

    /// Answers the backends gave so far.
    fn answered(&self) -> u64 {
        self.servers.iter().map(ExchangeServer::answered).sum()
    }

    /// (b), then (a) and (c) for a rated row, with the CPU of process `pid` and its children
    /// (the agent, a proxy) apart.
    fn measure(
        &self,
        dsts: &[SocketAddr],
        row: Row,
        pid: Option<u32>,
        sequential: usize,
        rate_time: Duration,
    ) -> Result<Sample> {
        let answered = self.answered();
        let seq = exchange::sequential(&self.topo.client, dsts, sequential, EXCHANGE_TIMEOUT)?;
        if seq.times.is_empty() {
            bail!(
                "{}: no exchange of {sequential} succeeded: {}",
                row.label(),
                seq.describe_failures(3)
            );
        }
        if self.answered() == answered {
            bail!(
                "{}: exchanges succeeded but no backend answered: something else did",
                row.label()
            );
        }
        if !row.rated() {
            return Ok(Sample::sequential(&seq, None));
        }
        let process_cpu = || pid.map(tree_cpu).transpose();
        let process0 = process_cpu()?;
        let busy = Busy::now()?;
        let started = Instant::now();
        let load = exchange::for_duration(
            &self.topo.client,
            dsts,
            CLIENTS,
            rate_time,
            EXCHANGE_TIMEOUT,
        )?;
        let wall = started.elapsed();
        let cpu = busy.since()?;
        let process1 = process_cpu()?;
        let done = load.times.len();
        if done == 0 {
            bail!(
                "{}: no exchange succeeded under load: {}",
                row.label(),
                load.describe_failures(3)
            );
        }
        let mut s = Sample::sequential(
            &seq,
            Some((
                done as f64 / wall.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / done as f64,
            )),
        );
        s.rate_failed = load.failures.len();
        s.made += load.total();
        s.process = process0
            .zip(process1)
            .map(|(a, b)| b.saturating_sub(a).as_secs_f64() * 1e6 / done as f64);
        if s.failure.is_empty() {
            s.failure = load.describe_failures(1);
        }
        Ok(s)
    }

    /// HAProxy in the client namespace, both frontends, until stopped.
    fn haproxy(&self) -> Result<Proxy> {
        let mut servers = String::new();
        for (i, b) in self.backends.iter().enumerate() {
            let _ = writeln!(servers, "    server b{i} {b}");
        }
        let config = format!(
            "global
    maxconn 4000

defaults
    mode tcp
    timeout connect {t}ms
    timeout client 10s
    timeout server 10s

frontend rr
    bind {HAPROXY_RR}
    default_backend rr

backend rr
    balance roundrobin
{servers}
frontend lc
    bind {HAPROXY_LC}
    default_backend lc

backend lc
    balance leastconn
{servers}",
            t = EXCHANGE_TIMEOUT.as_millis()
        );
        let path = self.dir.write("haproxy.cfg", &config)?;
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(&path);
        Proxy::start(&self.topo.client, command, &path, &[HAPROXY_RR, HAPROXY_LC])
    }

    /// nginx (master and its workers, one per CPU) in the client namespace, until stopped.
    fn nginx(&self) -> Result<Proxy> {
        let dir = self.dir.path().display();
        let servers: String = self
            .backends
            .iter()
            .map(|b| format!("        server {b};\n"))
            .collect();
        let config = format!(
            "load_module {NGINX_STREAM_MODULE};
daemon off;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err warn;
events {{
    worker_connections 4096;
}}
stream {{
    upstream backends {{
{servers}    }}
    server {{
        listen {NGINX};
        proxy_pass backends;
        proxy_connect_timeout {t}ms;
    }}
}}
",
            t = EXCHANGE_TIMEOUT.as_millis()
        );
        let path = self.dir.write("nginx.conf", &config)?;
        let mut command = Command::new("nginx");
        // -e: the error log before the configuration is read (the default is under /var/log).
        command
            .arg("-e")
            .arg(self.dir.path().join("nginx.err"))
            .arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(&path);
        Proxy::start(&self.topo.client, command, &path, &[NGINX])
    }

    /// The agent on the client veth, balancing the VIP over the backends (smooth weighted
    /// round robin, equal weights), XDP in `mode`.
    fn agent(&self, ctx: &Ctx, mode: &str) -> Result<AgentProcess> {
        let path = self.dir.write(
            "agent.yaml",
            &agent_policy(&self.topo.client_if, mode, &self.backends),
        )?;
        let mut agent = AgentProcess::spawn(&ctx.agent, &self.topo.client, &path)?;
        agent.wait_ready(READY_TIMEOUT)?;
        Ok(agent)
    }
}

fn agent_policy(ifname: &str, mode: &str, backends: &[SocketAddr]) -> String {
    let list = backend_items(backends);
    format!(
        "version: 1
agent:
  listen: 127.0.0.1:9090
  pin_path: {PIN_PATH}
interfaces:
  - name: {ifname}
    xdp_mode: {mode}
    direction: both
services:
  - name: web
    match: {{ address: \"{VIP}\", port: {VIP_PORT}, protocol: tcp }}
    backends:
{list}    load_balancing:
      algorithm: weighted_round_robin
"
    )
}

/// A proxy process (HAProxy, nginx) in a namespace; stopped with SIGTERM (nginx's master
/// stops its workers), killed if it does not exit.
pub(super) struct Proxy {
    child: Child,
    log: PathBuf,
}

/// How long a proxy has to exit after SIGTERM.
const PROXY_STOP: Duration = Duration::from_secs(5);

impl Proxy {
    /// Spawns `command` in `ns` (its output next to `config`) and waits until every address
    /// of `listen` accepts a connection.
    pub(super) fn start(
        ns: &Netns,
        mut command: Command,
        config: &Path,
        listen: &[SocketAddr],
    ) -> Result<Proxy> {
        let log = config.with_extension("log");
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let mut proxy = Proxy {
            child: ns.spawn_process(&mut command)?,
            log,
        };
        let started = Instant::now();
        for &addr in listen {
            loop {
                if let Some(status) = proxy.child.try_wait()? {
                    bail!(
                        "{} exited ({status}); its output:\n{}",
                        command.get_program().to_string_lossy(),
                        proxy.output()
                    );
                }
                let up = ns.run(move || {
                    TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
                })?;
                if up {
                    break;
                }
                if started.elapsed() > PROXY_READY {
                    bail!(
                        "{} not listening on {addr} after {PROXY_READY:?}; its output:\n{}",
                        command.get_program().to_string_lossy(),
                        proxy.output()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(proxy)
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit within [`PROXY_STOP`].
    pub(super) fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let since = Instant::now();
        while since.elapsed() < PROXY_STOP {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!(
            "the proxy (pid {}) did not exit within {PROXY_STOP:?} of SIGTERM; killed",
            self.child.id()
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// The CPU time of process `pid` and of its descendants (nginx's workers), utime + stime.
fn tree_cpu(pid: u32) -> Result<Duration> {
    let mut total = scale::cpu_time(pid)?.total();
    for child in children(pid) {
        // A child that exited between the listing and the read has nothing more to count.
        total += tree_cpu(child).unwrap_or_default();
    }
    Ok(total)
}

/// The children of `pid`, from every thread's `/proc/PID/task/TID/children`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// All CPUs' busy time (/proc/stat `cpu` line: every field but idle and iowait) from a
/// starting point.
struct Busy(u64);

impl Busy {
    fn now() -> Result<Busy> {
        Ok(Busy(busy_ticks()?))
    }

    /// Busy time of all CPUs since [`Busy::now`].
    fn since(&self) -> Result<Duration> {
        let ticks = busy_ticks()? - self.0;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
    }
}

fn busy_ticks() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_busy(&stat).context("no `cpu` line in /proc/stat")
}

/// The busy ticks of /proc/stat's first `cpu` line: user nice system idle iowait irq softirq
/// steal (guest and guest_nice are inside user and nice already).
fn parse_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    Some(v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
}

impl Sample {
    /// The latency figures of `seq`, with the rate figures if measured.
    fn sequential(seq: &Exchanges, rate: Option<(f64, f64)>) -> Sample {
        let q = |p: f64| {
            if seq.times.is_empty() {
                return f64::NAN;
            }
            crate::bench::quantile(&seq.times, p).as_secs_f64() * 1e6
        };
        Sample {
            latency: [q(0.50), q(0.95), q(0.99), q(1.0)],
            failed: seq.failures.len(),
            failure: seq.describe_failures(1),
            rate,
            rate_failed: 0,
            made: seq.total(),
            process: None,
        }
    }
}

/// Median, min and max of the finite values; `None` without any.
pub(super) fn spread(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    v.retain(|x| x.is_finite());
    (!v.is_empty()).then(|| super::median_min_max(v))
}

/// "median (min-max)", with `decimals`.
pub(super) fn cell(f: Option<(f64, f64, f64)>, decimals: usize) -> String {
    match f {
        Some((m, lo, hi)) => format!("{m:.decimals$} ({lo:.decimals$}-{hi:.decimals$})"),
        None => "-".to_owned(),
    }
}

fn report(
    ctx: &Ctx,
    sequential: usize,
    rate_time: Duration,
    samples: &[(Row, Vec<Sample>)],
    skipped: &[(Row, String)],
    (load_before, load_after): &(String, String),
) -> Result<String> {
    let fig = |s: &[Sample], f: &dyn Fn(&Sample) -> Option<f64>| -> Option<(f64, f64, f64)> {
        spread(s.iter().filter_map(f).collect())
    };
    let direct = &samples
        .iter()
        .find(|(r, _)| *r == Row::Direct)
        .expect("the direct row")
        .1;
    let direct_q: Vec<Option<f64>> = (0..3)
        .map(|i| fig(direct, &|s| Some(s.latency[i])).map(|f| f.0))
        .collect();

    let mut t = String::new();
    writeln!(
        t,
        "### Load balancing: the agent's VIP, HAProxy, nginx, direct\n"
    )?;
    writeln!(
        t,
        "On {}. Client namespace <-veth-> server namespace; two TCP backends on addresses of \
         their own in the server namespace ({} threads each: read 64 bytes, answer them, then \
         wait for the client's close). Proxies in the client namespace, listening on \
         127.0.0.1: HAProxy 2.6 (`mode tcp`, one process, a `balance roundrobin` and a \
         `balance leastconn` frontend), nginx `stream` (an `upstream` of both backends, round \
         robin, `worker_processes auto`). The agent on the client veth (`direction: both`), a \
         VIP {VIP}:{VIP_PORT} on the client's subnet (a permanent neighbour entry to the server's \
         MAC), `algorithm: weighted_round_robin`, equal weights, no health checks; generic \
         then native XDP. Direct: the client alternates between the backends. The client \
         namespace (clients and proxies) runs with `{}` (ports in TIME_WAIT toward the same \
         two backends would run out otherwise).\n",
        ctx.machine,
        SERVER_THREADS,
        CLIENT_SYSCTLS.join("`, `")
    )?;
    writeln!(
        t,
        "Each round runs the rows in the table's order, in one topology, the proxies and the \
         agent started for their rows and stopped after them; {} rounds. Per row: \
         **latency**, one client making {sequential} exchanges one after another (connect, 64 \
         bytes each way, close; timed from before `connect()` to after `close()`; p50/p95/p99/max \
         of the round, in us), *added* = the row's median minus direct's; then **conn/s**, \
         {CLIENTS} clients making exchanges for {:.1} s; **CPU/conn**, all CPUs' busy time over \
         that interval (/proc/stat: user, nice, system, irq, softirq, steal) per exchange, in \
         us: client, proxy or datapath and backends together (the machine is shared with other \
         work, so this figure is the noisiest); *of which agent or proxy*: the utime + stime of \
         the agent's process, or of the proxy's processes (nginx: master and workers), over \
         the same interval (the datapath's programs run in softirq or in the senders' \
         context, not in the agent's process). *mixed*: the agent's VIP measured while a \
         second client makes exchanges directly to the same backends, one after another (after \
         the VIP's, the row waits until that client has made {MIXED_DIRECT_MIN}, at most {} \
         s); its own latency is the next row. Exchanges that fail (timeout {} s) are counted (*failed*: of \
         all the row's exchanges, every round), not timed.\n",
        ctx.repeats,
        rate_time.as_secs_f64(),
        MIXED_DIRECT_WAIT.as_secs(),
        EXCHANGE_TIMEOUT.as_secs()
    )?;
    writeln!(
        t,
        "The machine's 1-minute load average: {load_before} before the rounds, {load_after} \
         after.\n"
    )?;
    writeln!(
        t,
        "| row | p50 us | p95 us | p99 us | max us | added p50/p95/p99 us | conn/s | CPU us/conn | of which agent or proxy | failed |"
    )?;
    writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut lat_bars = Vec::new();
    let mut rate_bars = Vec::new();
    let mut cpu_bars = Vec::new();
    for (row, s) in samples {
        if let Some((_, why)) = skipped.iter().find(|(r, _)| r == row) {
            writeln!(t, "| {} | {why} | | | | | | | | |", row.label())?;
            continue;
        }
        let q: Vec<Option<(f64, f64, f64)>> =
            (0..4).map(|i| fig(s, &|x| Some(x.latency[i]))).collect();
        let added: Vec<String> = (0..3)
            .map(|i| match (q[i], direct_q[i]) {
                (Some(v), Some(d)) if *row != Row::Direct => format!("{:+.0}", v.0 - d),
                _ => "-".to_owned(),
            })
            .collect();
        let cps = fig(s, &|x| x.rate.map(|r| r.0));
        let cpu = fig(s, &|x| x.rate.map(|r| r.1));
        let process = fig(s, &|x| x.process);
        let failed: usize = s.iter().map(|x| x.failed + x.rate_failed).sum();
        let made: usize = s.iter().map(|x| x.made).sum();
        let failure = s
            .iter()
            .map(|x| x.failure.as_str())
            .find(|f| !f.is_empty())
            .map(|f| format!(" (first: {f})"))
            .unwrap_or_default();
        writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {failed} of {made}{failure} |",
            row.label(),
            cell(q[0], 0),
            cell(q[1], 0),
            cell(q[2], 0),
            cell(q[3], 0),
            added.join(" / "),
            cell(cps, 0),
            cell(cpu, 1),
            cell(process, 1),
        )?;
        // The direct client beside the mixed row makes a few exchanges a round, some hanging
        // until their timeout: on the same axis, its whiskers would flatten every other bar.
        let charted = *row != Row::MixedDirect;
        for (i, series) in [(0, "p50"), (2, "p99")] {
            if let Some((median, min, max)) = q[i].filter(|_| charted) {
                lat_bars.push(bar(row.short(), series, (median, min, max)));
            }
        }
        if let Some(f) = cps {
            rate_bars.push(bar(row.short(), "connections/s", f));
        }
        if let Some(f) = cpu {
            cpu_bars.push(bar(row.short(), "CPU us per connection", f));
        }
    }
    writeln!(t)?;
    for (name, title, y, bars) in [
        (
            "lb-latency",
            "Sequential short exchanges: latency by row",
            "us",
            &lat_bars,
        ),
        (
            "lb-connections",
            "New connections per second by row",
            "connections/s",
            &rate_bars,
        ),
        (
            "lb-cpu",
            "All CPUs' busy time per connection by row",
            "us",
            &cpu_bars,
        ),
    ] {
        if bars.is_empty() {
            continue;
        }
        plot::bars(&ctx.plots.join(format!("{name}.svg")), title, y, bars)?;
        writeln!(t, "![{title}]({}/{name}.svg)", ctx.plots_rel)?;
        if name == "lb-latency" {
            writeln!(
                t,
                "\n(Without *{}*: a few exchanges a round, some of them waiting for their \
                 timeout, on the same axis as the others.)\n",
                Row::MixedDirect.label()
            )?;
        }
    }
    Ok(t)
}

fn bar(group: &str, series: &str, (median, min, max): (f64, f64, f64)) -> Bar {
    Bar {
        group: group.to_owned(),
        series: series.to_owned(),
        median,
        min,
        max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  10 1 5 1000 7 2 3 4 9 0\ncpu0 5 0 2 500 3 1 1 2 4 0\n";
        assert_eq!(parse_busy(stat), Some(10 + 1 + 5 + 2 + 3 + 4));
        assert_eq!(parse_busy("intr 1 2 3\n"), None);
    }

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(spread(vec![4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(spread(vec![f64::NAN]), None);
        assert_eq!(spread(vec![]), None);
    }

    #[test]
    fn the_policy_balances_the_vip_over_every_backend() {
        let b: Vec<SocketAddr> = vec![
            "198.18.2.1:8080".parse().unwrap(),
            "198.18.2.2:8080".parse().unwrap(),
        ];
        let p = agent_policy("veth-cli", "native", &b);
        assert!(p.contains("xdp_mode: native"));
        assert!(p.contains("address: \"198.18.2.2:8080\""));
        assert!(p.contains("match: { address: \"198.18.0.100\", port: 80, protocol: tcp }"));
    }
}
