//! The agent under test as a child process, its HTTP endpoints, its status and its metrics.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;
use crate::status::StatusReport;
use crate::timing::Scaled;

/// The variable `cargo xtask test` sets to the built agent binary.
pub const AGENT_BIN_ENV: &str = "AGENT_BIN";
/// How long the agent may take from spawn to `/health/ready` (loading and verifying the
/// eBPF object, attaching XDP).
pub const READY_TIMEOUT: Scaled = Scaled::secs(30);
/// How long the agent may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Scaled = Scaled::secs(10);
/// Connect, read and write timeout of one request to the agent's HTTP endpoints.
pub const HTTP_TIMEOUT: Scaled = Scaled::secs(5);
/// Interval of polling a condition (readiness, exit) while waiting for it with a deadline.
const POLL: Duration = Duration::from_millis(20);
/// Interval of polling `/metrics` in [`AgentProcess::wait_metric`].
const METRIC_POLL: Duration = Duration::from_millis(100);

/// The agent binary from `$AGENT_BIN`. A test that needs the agent calls this first and
/// fails (never passes silently) when it is not set.
pub fn agent_bin() -> Result<PathBuf> {
    let Some(p) = std::env::var_os(AGENT_BIN_ENV) else {
        bail!(
            "{AGENT_BIN_ENV} is not set: this test needs the agent binary. Run the end-to-end \
             tests through `cargo xtask test`, or set {AGENT_BIN_ENV}=/path/to/agent"
        );
    };
    let p = PathBuf::from(p);
    if !p.is_file() {
        bail!("{AGENT_BIN_ENV}={} is not a file", p.display());
    }
    Ok(p)
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Result<TempDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "agt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::write(&p, contents).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The items of a service's `backends:` list as the policies of the tests and benches write
/// it (six spaces in, under `    backends:`): one `- address: "ADDR"` per backend, at the
/// default weight.
pub fn backend_items(backends: &[SocketAddr]) -> String {
    backends
        .iter()
        .map(|b| format!("      - address: \"{b}\"\n"))
        .collect()
}

/// `agent.listen` of a policy file, or the policy's default. A line scan, not a YAML parser:
/// the test policies are written by these tests.
pub fn listen_of(policy: &str) -> Result<SocketAddr> {
    let mut in_agent = false;
    for line in policy.lines() {
        let code = line.split('#').next().unwrap_or("");
        if code.trim().is_empty() {
            continue;
        }
        if !code.starts_with(' ') {
            in_agent = code.trim_end() == "agent:";
            continue;
        }
        if in_agent && let Some(v) = code.trim().strip_prefix("listen:") {
            let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
            return v
                .parse()
                .with_context(|| format!("agent.listen `{v}` is not IP:port"));
        }
    }
    Ok(SocketAddr::from(([127, 0, 0, 1], 9090)))
}

/// The agent running inside a namespace. Dropping it stops it: SIGTERM, then SIGKILL after
/// [`STOP_TIMEOUT`]; a test that is failing also gets the agent's output on stderr.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    bin: PathBuf,
    ns: Netns,
    listen: SocketAddr,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `$AGENT_BIN run --config CONFIG` in `netns` and waits until
    /// `GET /health/ready` on `agent.listen` answers 200.
    pub fn start(netns: &Netns, config: &Path) -> Result<AgentProcess> {
        let mut agent = AgentProcess::spawn(&agent_bin()?, netns, config)?;
        agent.wait_ready(READY_TIMEOUT)?;
        Ok(agent)
    }

    /// Starts `BIN run --config CONFIG --detach-on-exit` in `netns`
    /// ([`Netns::spawn_process`]), its output in `CONFIG` with the extension `agent.log`;
    /// returns at once. `--detach-on-exit`: a test's datapath goes with its agent, as tests
    /// share interfaces' names and pin paths (tests of the pinned datapath outliving the
    /// agent use [`AgentProcess::spawn_args`]).
    pub fn spawn(bin: &Path, netns: &Netns, config: &Path) -> Result<AgentProcess> {
        AgentProcess::spawn_args(bin, netns, config, &["--detach-on-exit"])
    }

    /// As [`AgentProcess::spawn`], with `extra` arguments after `run --config CONFIG`
    /// instead of `--detach-on-exit`.
    pub fn spawn_args(
        bin: &Path,
        netns: &Netns,
        config: &Path,
        extra: &[&str],
    ) -> Result<AgentProcess> {
        AgentProcess::spawn_under(&[], bin, netns, config, extra)
    }

    /// As [`AgentProcess::spawn_args`], through `wrapper` (a program and its arguments) that
    /// execs the agent in its own process, as `setpriv ... --` does: the pid stays the
    /// agent's, and the wrapper runs after the namespace is entered.
    pub fn spawn_under(
        wrapper: &[String],
        bin: &Path,
        netns: &Netns,
        config: &Path,
        extra: &[&str],
    ) -> Result<AgentProcess> {
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("reading {}", config.display()))?;
        let listen = listen_of(&text)?;
        let log = config.with_extension("agent.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = match wrapper {
            [] => Command::new(bin),
            [program, args @ ..] => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin);
                cmd
            }
        };
        // SAFETY: prctl is async-signal-safe and touches only the child. PDEATHSIG: if the
        // test process dies without running Drop (SIGKILL, CI timeout), the kernel kills the
        // agent too instead of leaving it attached. It fires when the spawning *thread*
        // exits, which is fine: the test thread outlives its AgentProcess.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .args(extra)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = netns.spawn_process(&mut cmd)?;
        Ok(AgentProcess {
            child: Some(child),
            bin: bin.to_owned(),
            ns: netns.handle(),
            listen,
            log,
        })
    }

    /// Polls `/health/ready` until it answers 200 (returns how long that took from now), the
    /// agent exits, or `timeout` passes; the errors carry the agent's output.
    pub fn wait_ready(&mut self, timeout: Scaled) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait()? {
                bail!(
                    "agent exited with {status} before it was ready; its output:\n{}",
                    self.log_text()
                );
            }
            let last = match self.get("/health/ready") {
                Ok((200, _)) => return Ok(start.elapsed()),
                Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() >= timeout.get() {
                bail!(
                    "agent not ready after {timeout} (last /health/ready: {last}); its \
                     output:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// An error, with the agent's output, once the agent is no longer running.
    pub fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("agent already stopped");
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "the agent exited ({status}); its output:\n{}",
                self.log_text()
            );
        }
        Ok(())
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The agent's process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Where the agent's output goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the agent printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("<{}: {e}>", self.log.display()))
    }

    /// GET `path` on the agent's listen address, from inside its namespace.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let addr = self.listen;
        let path = path.to_owned();
        self.ns
            .run(move || http_get(addr, &path, HTTP_TIMEOUT.get()))?
    }

    /// The text of `GET /metrics`; an error unless it answers 200.
    pub fn metrics(&self) -> Result<String> {
        match self.get("/metrics")? {
            (200, body) => Ok(body),
            (code, body) => bail!("GET /metrics answered {code}: {body}"),
        }
    }

    /// `GET /status`: the agent's state as JSON (what `agent status --output json` prints).
    pub fn status(&self) -> Result<StatusReport> {
        match self.get("/status")? {
            (200, body) => serde_json::from_str(&body)
                .with_context(|| format!("GET /status answered no status report: {body}")),
            (code, body) => bail!("GET /status answered {code}: {body}"),
        }
    }

    /// Runs the agent binary with `args` (e.g. `status --addr ...`) inside the agent's
    /// namespace and returns what it printed; an error unless it exits 0.
    pub fn command(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = self.ns.spawn_process(&mut cmd)?.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "`agent {}` failed ({}):\n{text}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    }

    /// Polls `/metrics` until the sample `name{labels}` satisfies `ok`, for gauges the agent
    /// refreshes on its own schedule (e.g. key-table occupancy from a periodic walk).
    /// Returns the satisfying value, or an error with the last value seen after `timeout`.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Scaled,
        ok: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout.get();
        loop {
            let text = self.metrics()?;
            let v = metric(&text, name, labels);
            if let Some(v) = v
                && ok(v)
            {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("{name}{labels:?} still {v:?} after {timeout}");
            }
            std::thread::sleep(METRIC_POLL);
        }
    }

    /// Asks the agent to reload its policy file (SIGHUP); returns at once.
    pub fn reload(&self) -> Result<()> {
        let Some(child) = &self.child else {
            bail!("agent already stopped");
        };
        // SAFETY: kill(2) on our own child, which is not reaped yet.
        if unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) } != 0 {
            bail!("SIGHUP: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kills the agent with SIGKILL, as a crash or the OOM killer would (nothing of it runs
    /// on the way out), and returns how it exited.
    pub fn kill(mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped");
        };
        // `Child::kill` is SIGKILL on Unix.
        child.kill()?;
        Ok(child.wait()?)
    }

    /// Stops the agent (SIGTERM, SIGKILL after [`STOP_TIMEOUT`]) and returns how it exited.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped");
        };
        // The child's pid is the agent's (spawned directly, no wrapper).
        let pid = child.id() as libc::pid_t;
        if child.try_wait()?.is_none() {
            // SAFETY: kill(2) on our own child, which is not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT.get();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                child.kill()?;
                let status = child.wait()?;
                bail!(
                    "agent did not exit within {STOP_TIMEOUT} of SIGTERM and was killed \
                     ({status})"
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let r = self.terminate();
        if std::thread::panicking() || r.is_err() {
            eprintln!(
                "---- agent output ({}) ----\n{}\n---- end of agent output ----",
                self.log.display(),
                self.log_text()
            );
        }
        if let Err(e) = r {
            eprintln!("warning: stopping the agent: {e:#}");
        }
    }
}

/// A minimal HTTP/1.0 GET: one request per connection, the server closes after the answer.
/// Returns (status, body). Call it from a thread in the server's namespace.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in the answer to GET {path}: {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in the answer to GET {path}: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// One sample of the Prometheus text format: name, labels in order, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses every sample line of the Prometheus text exposition format (comments skipped,
/// label values unescaped, an optional timestamp ignored). Malformed lines are skipped.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_sample).collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let end = loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let &(start, c) = chars.peek()?;
            if c == '}' {
                break start + 1;
            }
            let eq = r[start..].find('=')? + start;
            let key = r[start..eq].trim().to_owned();
            while chars.peek()?.0 <= eq {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut val = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => val.push('\n'),
                        other => val.push(other),
                    },
                    other => val.push(other),
                }
            }
            labels.push((key, val));
        };
        rest = &r[end..];
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The value of the first sample named `name` that carries every label of `labels` (it may
/// carry more). `None` when no such sample exists.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter_map(parse_sample).find_map(|s| {
        let all = labels
            .iter()
            .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v));
        (s.name == name && all).then_some(s.value)
    })
}

/// Like [`metric`], but an error that names the metric and lists what the text does have
/// under that name.
/// A rate-limited service's packets in an exposition: (passed, dropped by its limit, the
/// bucket's own and contended drops together).
pub fn limit_verdicts(text: &str, service: &str) -> Result<(u64, u64)> {
    let m = |name: &str, labels: &[(&str, &str)]| -> Result<u64> {
        Ok(require_metric(text, name, labels)? as u64)
    };
    let svc = ("service", service);
    let passed = m("agent_service_packets_total", &[svc, ("verdict", "passed")])?;
    let dropped = m(
        "agent_service_dropped_packets_total",
        &[svc, ("reason", "rate_limit")],
    )? + m(
        "agent_service_dropped_packets_total",
        &[svc, ("reason", "contended")],
    )?;
    Ok((passed, dropped))
}

pub fn require_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    if let Some(v) = metric(text, name, labels) {
        return Ok(v);
    }
    let have: Vec<String> = parse_metrics(text)
        .into_iter()
        .filter(|s| s.name == name)
        .map(|s| format!("{:?} = {}", s.labels, s.value))
        .collect();
    bail!(
        "metric {name}{labels:?} not exported; samples under that name: {}",
        if have.is_empty() {
            "none".to_owned()
        } else {
            have.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP agent_service_packets_total Packets seen per service.
# TYPE agent_service_packets_total counter
agent_service_packets_total{service="dns",verdict="passed"} 1234
agent_service_packets_total{service="dns",verdict="dropped"} 5.5e3
agent_service_dropped_packets_total{service="a\"b",reason="rate_limit"} 7 1700000000000
agent_up 1
"#;

    #[test]
    fn metric_matches_name_and_label_subset() {
        assert_eq!(
            metric(
                TEXT,
                "agent_service_packets_total",
                &[("service", "dns"), ("verdict", "passed")]
            ),
            Some(1234.0)
        );
        assert_eq!(
            metric(
                TEXT,
                "agent_service_packets_total",
                &[("verdict", "dropped")]
            ),
            Some(5500.0)
        );
        assert_eq!(metric(TEXT, "agent_up", &[]), Some(1.0));
        assert_eq!(
            metric(
                TEXT,
                "agent_service_dropped_packets_total",
                &[("service", "a\"b")]
            ),
            Some(7.0)
        );
        assert_eq!(metric(TEXT, "agent_service_packets", &[]), None);
        assert_eq!(
            metric(TEXT, "agent_service_packets_total", &[("service", "x")]),
            None
        );
        assert!(
            require_metric(TEXT, "agent_service_packets_total", &[("service", "x")])
                .unwrap_err()
                .to_string()
                .contains("verdict")
        );
    }

    #[test]
    fn listen_is_read_from_the_agent_section() {
        let p = "version: 1\nagent:\n  listen: \"127.0.0.1:9191\" # x\ninterfaces: []\n";
        assert_eq!(listen_of(p).unwrap(), "127.0.0.1:9191".parse().unwrap());
        let p = "version: 1\nservices:\n  - name: a\n    listen: 1.2.3.4:1\n";
        assert_eq!(listen_of(p).unwrap(), "127.0.0.1:9090".parse().unwrap());
    }
}
