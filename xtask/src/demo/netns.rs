//! Doing things inside a named network namespace (`/run/netns/NAME`, as `ip netns` makes them).
//!
//! Only the network namespace changes: unlike `ip netns exec`, which also remounts /sys and so
//! hides the bpffs at /sys/fs/bpf, processes and threads keep the host's mounts and therefore see
//! the same pinned maps as the host.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
};

pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("open network namespace {name} ({}): {source}", .path.display())]
    Open {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("enter network namespace {name}: {source}")]
    Enter { name: String, source: io::Error },
    #[error("a thread inside network namespace {name} panicked")]
    Panicked { name: String },
}

pub struct Netns {
    name: String,
    file: File,
}

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

impl Netns {
    pub fn open(name: &str) -> Result<Self, NetnsError> {
        let path = path(name);
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            name: name.to_owned(),
            path,
            source,
        })?;
        Ok(Self {
            name: name.to_owned(),
            file,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the calling thread into the namespace, for good. Call it only on a thread made for
    /// that purpose (`run`, or threads of the traffic generator), never on the main thread.
    pub fn enter_this_thread(&self) -> Result<(), NetnsError> {
        // SAFETY: a valid namespace fd, owned by `self` for the duration of the call.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
            Ok(())
        } else {
            Err(NetnsError::Enter {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            })
        }
    }

    /// Runs `f` on a fresh thread inside the namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter_this_thread()?;
                    Ok(f())
                })
                .join()
                .map_err(|_| NetnsError::Panicked {
                    name: self.name.clone(),
                })?
        })
    }

    /// Spawns `command` with the child moved into the namespace before it executes.
    pub fn spawn(&self, command: &mut Command) -> io::Result<Child> {
        let fd = self.file.as_raw_fd();
        // SAFETY: between fork and exec the closure only makes one syscall (async-signal-safe);
        // `fd` stays open because `self` is borrowed until `spawn` returns.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        command.spawn()
    }
}
