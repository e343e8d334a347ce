//! Booting a kernel and initramfs in QEMU with a deadline, streaming the guest's second serial
//! port (the tests' output) as it grows.

use std::{
    fmt,
    fs::{self, File},
    io::{self, Read as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    cmd::{self, CmdError},
    sys,
};

const QEMU: &str = "qemu-system-x86_64";
/// How often the serial log is read: QEMU appends to a plain file, which has no readiness
/// event to wait on, so it is polled; 100 ms is far below any test's duration.
const POLL: Duration = Duration::from_millis(100);
/// A KVM guest that boots reaches its init well within this; a broken KVM hangs forever.
const PROBE_DEADLINE: Duration = Duration::from_secs(10);
const PROBE_MARK: &str = "vm-probe-ok";
/// What QEMU prints when KVM refuses to run the guest (QEMU then pauses instead of exiting).
const KVM_ERROR: &str = "KVM internal error";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        })
    }
}

impl Accel {
    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            // `max`: every feature TCG emulates, so the guest kernel picks the same code paths
            // (and the same BPF JIT instructions) as on modern hardware.
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("{action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("interrupted; the VM was stopped")]
    Interrupted,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RunError {
    let path = path.to_owned();
    move |source| RunError::Io {
        action,
        path,
        source,
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Machine {
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u32,
}

/// One boot: what to run and where its logs go.
pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    /// Gets `console.log` (ttyS0: the kernel), `tests.log` (ttyS1) and `qemu.log`.
    pub logs: &'a Path,
    pub timeout: Duration,
    /// Gives up at once when QEMU prints this (it pauses, rather than exits, on some errors).
    pub fatal: Option<&'a str>,
}

#[derive(Debug)]
pub struct Finished {
    /// QEMU's exit status; `None` when it was killed at the deadline.
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
}

/// QEMU's `file:` chardev takes a comma-separated option list: commas in paths are doubled.
fn chardev_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// Boots and waits for QEMU to exit or for the deadline, passing the bytes the guest writes
/// to ttyS1 to `on_output` as they come.
pub fn boot(
    machine: Machine,
    boot: &Boot<'_>,
    on_output: &mut dyn FnMut(&[u8]),
) -> Result<Finished, RunError> {
    fs::create_dir_all(boot.logs).map_err(io_error("create", boot.logs))?;
    let console = boot.logs.join("console.log");
    let tests = boot.logs.join("tests.log");
    let qemu_log = boot.logs.join("qemu.log");
    // Stale logs of an earlier run would be read as this run's.
    for log in [&console, &tests] {
        if log.exists() {
            fs::remove_file(log).map_err(io_error("remove", log))?;
        }
    }
    // Created before QEMU starts, so reading it never races its creation.
    File::create(&tests).map_err(io_error("create", &tests))?;
    let out = File::create(&qemu_log).map_err(io_error("create", &qemu_log))?;
    let err = out.try_clone().map_err(io_error("open", &qemu_log))?;

    let mut qemu = Command::new(QEMU);
    qemu.args(machine.accel.args())
        .args(["-smp", &machine.cpus.to_string()])
        .args(["-m", &format!("{}M", machine.memory_mib)])
        // No NIC, no VGA, no monitor on stdio: the two serial ports are the whole interface.
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-monitor",
            "none",
        ])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-initrd")
        .arg(boot.initrd)
        .args(["-append", boot.cmdline])
        .args(["-serial", &format!("file:{}", chardev_path(&console))])
        .args(["-serial", &format!("file:{}", chardev_path(&tests))])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let describe = cmd::describe(&qemu);
    let start = Instant::now();
    let mut child = qemu.spawn().map_err(|source| CmdError::Spawn {
        cmd: describe.clone(),
        source,
    })?;
    let mut reader = File::open(&tests).map_err(io_error("open", &tests))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pump = |reader: &mut File| -> Result<(), RunError> {
        loop {
            let n = reader.read(&mut buf).map_err(io_error("read", &tests))?;
            if n == 0 {
                return Ok(());
            }
            on_output(&buf[..n]);
        }
    };
    let deadline = start + boot.timeout;
    let wait_error = |source| CmdError::Spawn {
        cmd: describe.clone(),
        source,
    };
    loop {
        pump(&mut reader)?;
        if let Some(status) = child.try_wait().map_err(wait_error)? {
            pump(&mut reader)?;
            return Ok(Finished {
                status: Some(status),
                elapsed: start.elapsed(),
            });
        }
        let interrupted = sys::interrupted();
        let fatal = boot.fatal.is_some_and(|text| {
            fs::read_to_string(&qemu_log).is_ok_and(|said| said.contains(text))
        });
        if interrupted || fatal || Instant::now() >= deadline {
            // SIGKILL: the guest's state is of no further use, and QEMU must not linger.
            let _ = child.kill();
            child.wait().map_err(wait_error)?;
            pump(&mut reader)?;
            if interrupted {
                return Err(RunError::Interrupted);
            }
            return Ok(Finished {
                status: None,
                elapsed: start.elapsed(),
            });
        }
        thread::sleep(POLL);
    }
}

/// Whether KVM can run a guest here: `/dev/kvm` opens, and a tiny guest (`initrd`: busybox and
/// an init that prints a mark and powers off) boots to its init before a short deadline.
/// Some hosts have a `/dev/kvm` whose guests hang or abort.
pub fn kvm_works(
    kernel: &Path,
    initrd: &Path,
    logs: &Path,
) -> Result<Result<(), String>, RunError> {
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Ok(Err(format!("/dev/kvm: {e}")));
    }
    let machine = Machine {
        accel: Accel::Kvm,
        cpus: 1,
        memory_mib: 512,
    };
    let finished = boot(
        machine,
        &Boot {
            kernel,
            initrd,
            cmdline: "console=ttyS0 panic=-1 quiet",
            logs,
            timeout: PROBE_DEADLINE,
            fatal: Some(KVM_ERROR),
        },
        &mut |_| {},
    )?;
    let tests = logs.join("tests.log");
    let said = fs::read_to_string(&tests).map_err(io_error("read", &tests))?;
    let qemu_log = logs.join("qemu.log");
    let qemu_said = fs::read_to_string(&qemu_log).map_err(io_error("read", &qemu_log))?;
    Ok(match finished.status {
        _ if said.contains(PROBE_MARK) => Ok(()),
        None => Err(match qemu_said.lines().find(|l| l.contains(KVM_ERROR)) {
            Some(line) => format!("QEMU: {}", line.trim()),
            None => format!(
                "a KVM guest did not reach its init in {}s",
                PROBE_DEADLINE.as_secs()
            ),
        }),
        Some(status) => Err(format!(
            "a KVM guest failed ({status}); see {}",
            logs.join("qemu.log").display()
        )),
    })
}

/// The probe guest's /init.
pub fn probe_init() -> String {
    format!(
        "#!/bin/sh\nmount -t devtmpfs devtmpfs /dev\necho {PROBE_MARK} > /dev/ttyS1\npoweroff -f\n"
    )
}
