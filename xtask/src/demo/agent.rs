//! The agent process of the demo: started inside the server namespace, stopped on drop.

use std::{
    ffi::OsString,
    fs::{self, File},
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{
    http::{self, HttpError},
    metrics::READY_PATH,
    netns::{Netns, NetnsError},
};
use crate::{cmd, sys};

/// How long a stopped agent gets to drain before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(200);
const HTTP_TIMEOUT: Duration = Duration::from_secs(1);
const LOG_TAIL_LINES: usize = 20;

/// The agent's command line (agent/src/cli.rs), in one place.
fn run_args(policy: &Path) -> Vec<OsString> {
    vec!["run".into(), "--config".into(), policy.into()]
}

fn status_args(listen: SocketAddr) -> Vec<OsString> {
    vec!["status".into(), "--addr".into(), listen.to_string().into()]
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("the agent exited ({status}) before http://{addr}{READY_PATH} answered 200; {tail}")]
    ExitedEarly {
        status: ExitStatus,
        addr: SocketAddr,
        tail: String,
    },
    #[error("the agent did not answer 200 on http://{addr}{READY_PATH} within {}s (last: {last}); {tail}", .timeout.as_secs())]
    NotReady {
        addr: SocketAddr,
        timeout: Duration,
        last: String,
        tail: String,
    },
    #[error("the agent exited ({status}) during the demo; {tail}")]
    Died { status: ExitStatus, tail: String },
    #[error("`agent status` {what}:\n{output}")]
    Status { what: String, output: String },
    #[error("interrupted")]
    Interrupted,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> AgentError {
    let path = path.to_owned();
    move |source| AgentError::Io {
        action,
        path,
        source,
    }
}

pub struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts `bin run --config policy` inside `netns`, output to `log`.
    pub fn start(bin: &Path, policy: &Path, netns: &Netns, log: &Path) -> Result<Self, AgentError> {
        let out = File::create(log).map_err(io_error("create", log))?;
        let err = out.try_clone().map_err(io_error("create", log))?;
        let mut command = Command::new(bin);
        command
            .args(run_args(policy))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = netns.spawn(&mut command).map_err(io_error("start", bin))?;
        println!(
            "demo: started `{}` in netns {} (pid {}, log {})",
            cmd::describe(&command),
            netns.name(),
            child.id(),
            log.display()
        );
        Ok(Self {
            child,
            log: log.to_owned(),
        })
    }

    /// Polls the readiness endpoint until it answers 200, the agent exits, or `timeout`.
    pub fn wait_ready(
        &mut self,
        netns: &Netns,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, AgentError> {
        let start = Instant::now();
        loop {
            if sys::interrupted() {
                return Err(AgentError::Interrupted);
            }
            if let Some(status) = self.exited()? {
                return Err(AgentError::ExitedEarly {
                    status,
                    addr,
                    tail: self.tail(),
                });
            }
            let last = match netns.run(|| http::get(addr, READY_PATH, HTTP_TIMEOUT))? {
                Ok(response) if response.status == 200 => return Ok(start.elapsed()),
                Ok(response) => format!("HTTP {}", response.status),
                Err(HttpError::Io { source, .. }) => source.to_string(),
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= timeout {
                return Err(AgentError::NotReady {
                    addr,
                    timeout,
                    last,
                    tail: self.tail(),
                });
            }
            thread::sleep(POLL);
        }
    }

    /// Fails when the agent is no longer running.
    pub fn check_running(&mut self) -> Result<(), AgentError> {
        match self.exited()? {
            None => Ok(()),
            Some(status) => Err(AgentError::Died {
                status,
                tail: self.tail(),
            }),
        }
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>, AgentError> {
        self.child.try_wait().map_err(|source| AgentError::Io {
            action: "wait for the agent",
            path: self.log.clone(),
            source,
        })
    }

    /// The last lines of the agent's log, for error messages.
    fn tail(&self) -> String {
        match fs::read_to_string(&self.log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let start = lines.len().saturating_sub(LOG_TAIL_LINES);
                format!(
                    "last lines of {}:\n{}",
                    self.log.display(),
                    lines[start..].join("\n")
                )
            }
            Err(e) => format!("no log ({}: {e})", self.log.display()),
        }
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id();
        // SIGTERM first, so the agent shuts down as it would under systemd or Kubernetes. The pid
        // cannot have been reused: the child is not reaped until `try_wait` sees it exit.
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: signalling our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        match cmd::wait_timeout(&mut self.child, STOP_GRACE) {
            Ok(Some(status)) => println!("demo: agent stopped ({status})"),
            _ => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                println!(
                    "demo: agent killed (no exit within {}s of SIGTERM)",
                    STOP_GRACE.as_secs()
                );
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `bin status` inside `netns` against the agent on `listen`; returns what it printed.
pub fn status(
    bin: &Path,
    netns: &Netns,
    listen: SocketAddr,
    scratch: &Path,
    timeout: Duration,
) -> Result<String, AgentError> {
    // A file rather than a pipe: nothing to drain while waiting with a deadline.
    let out = File::create(scratch).map_err(io_error("create", scratch))?;
    let err = out.try_clone().map_err(io_error("create", scratch))?;
    let mut command = Command::new(bin);
    command
        .args(status_args(listen))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut child = netns.spawn(&mut command).map_err(io_error("start", bin))?;
    let status = cmd::wait_timeout(&mut child, timeout).map_err(io_error("wait for", bin))?;
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output = fs::read_to_string(scratch).map_err(io_error("read", scratch))?;
    match status {
        Some(status) if status.success() => Ok(output),
        Some(status) => Err(AgentError::Status {
            what: format!("failed ({status})"),
            output,
        }),
        None => Err(AgentError::Status {
            what: format!("did not finish within {}s", timeout.as_secs()),
            output,
        }),
    }
}
