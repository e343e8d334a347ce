//! `cargo xtask setup`: installs what the build and the tests need, idempotently.
//!
//! One line per step, `done` or `skipped`. Root is needed only for a step that has work to do
//! (apt-get, mounting bpffs). Facts behind each step: /work/shared/TOOLCHAIN.md.

use std::{
    ffi::OsString,
    fs, io,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{
    cmd::{self, CmdError},
    sys::{self, NotRoot},
    toolchain::{NIGHTLY, Toolchain, ToolchainError},
    workspace,
};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Finds dependencies a crate declares and never uses (`cargo xtask test` runs it); a lint
/// (`unused_crate_dependencies`) cannot: it flags every dev-dependency in every test binary.
const CARGO_MACHETE_VERSION: &str = "0.9.2";
/// What the build, the tests, the demo and `cargo xtask vm` call; nothing else (no compilers:
/// rustup brings them). The VM: QEMU, busybox for the initramfs, cpio to pack it, xz for
/// compressed modules, kmod's depmod for module dependencies, binutils' strip. util-linux
/// (essential, so always there) for `setpriv`, which runs the agent with fewer capabilities.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "bpftool",
    "iputils-ping",
    "curl",
    "ethtool",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "kmod",
    "binutils",
];
pub const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    NotRoot(#[from] NotRoot),
    #[error(transparent)]
    Toolchain(#[from] ToolchainError),
    #[error("`rustc +{NIGHTLY} -vV` printed no `LLVM version: MAJOR.x` line")]
    NoLlvmVersion,
    #[error("no libLLVM.so.{major}.*-rust-* in {}: the nightly toolchain ships its own libLLVM", .dir.display())]
    NoLibLlvm { major: u32, dir: PathBuf },
    #[error("{action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SetupError {
    let path = path.to_owned();
    move |source| SetupError::Io {
        action,
        path,
        source,
    }
}

enum Outcome {
    Done(String),
    Skipped(String),
}

fn report(step: &str, outcome: &Outcome) {
    match outcome {
        Outcome::Done(detail) => println!("setup: {step:<20} done     ({detail})"),
        Outcome::Skipped(detail) => println!("setup: {step:<20} skipped  ({detail})"),
    }
}

pub fn run() -> Result<Toolchain, SetupError> {
    let toolchain = build_toolchain()?;
    report("debian packages", &debian_packages()?);
    report("cargo-machete", &cargo_machete(&toolchain)?);
    report("bpffs", &bpffs()?);
    Ok(toolchain)
}

/// Only what building the agent needs (nightly, rust-src, bpf-linker): the image's build
/// stage runs this (`cargo xtask image`), where the tests' packages and bpffs have no use.
pub fn build_toolchain() -> Result<Toolchain, SetupError> {
    let toolchain = Toolchain::locate()?;
    report("nightly toolchain", &nightly_toolchain()?);
    report("rust-src (nightly)", &rust_src()?);
    report("bpf-linker", &bpf_linker(&toolchain)?);
    Ok(toolchain)
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn nightly_toolchain() -> Result<Outcome, SetupError> {
    let list = cmd::output(rustup().args(["toolchain", "list"]))?;
    let prefix = format!("{NIGHTLY}-");
    if list
        .lines()
        .any(|line| line == NIGHTLY || line.starts_with(&prefix))
    {
        return Ok(Outcome::Skipped("installed".into()));
    }
    cmd::run(rustup().args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    Ok(Outcome::Done(format!("rustup toolchain install {NIGHTLY}")))
}

fn rust_src() -> Result<Outcome, SetupError> {
    let installed =
        cmd::output(rustup().args(["component", "list", "--toolchain", NIGHTLY, "--installed"]))?;
    if installed.lines().any(|line| line.trim() == "rust-src") {
        return Ok(Outcome::Skipped("installed".into()));
    }
    cmd::run(rustup().args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    Ok(Outcome::Done(format!(
        "rustup component add rust-src --toolchain {NIGHTLY}"
    )))
}

pub fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed"
        })
}

/// The packages of `packages` that are not installed.
pub fn missing_packages<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect()
}

/// `apt-get update`, then installs `packages` without their recommends.
pub fn apt_install(packages: &[&str]) -> Result<(), cmd::CmdError> {
    cmd::run(apt_get().arg("update"))?;
    cmd::run(
        apt_get()
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages),
    )
}

/// How long `apt-get` waits for the dpkg lock that another apt run (unattended-upgrades on a
/// fresh machine, a second set-up) holds, instead of failing at once (apt >= 1.9.11;
/// Debian 12 has 2.6).
const DPKG_LOCK_TIMEOUT_SECS: u32 = 600;

/// `apt-get -q`, non-interactive, waiting for the dpkg lock.
pub fn apt_get() -> Command {
    let mut command = Command::new("apt-get");
    command
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .arg("-q")
        .arg(format!("-oDPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT_SECS}"));
    command
}

fn debian_packages() -> Result<Outcome, SetupError> {
    let missing = missing_packages(DEBIAN_PACKAGES);
    if missing.is_empty() {
        return Ok(Outcome::Skipped(format!(
            "{} installed",
            DEBIAN_PACKAGES.join(", ")
        )));
    }
    sys::require_root(&format!("installing {}", missing.join(", ")))?;
    apt_install(&missing)?;
    Ok(Outcome::Done(format!("installed {}", missing.join(", "))))
}

/// The nightly toolchain's own libLLVM, which bpf-linker must link against: its LLVM major has
/// to match the one that emits the eBPF bitcode.
struct NightlyLlvm {
    major: u32,
    lib: PathBuf,
}

fn nightly_llvm() -> Result<NightlyLlvm, SetupError> {
    let nightly = format!("+{NIGHTLY}");
    let version = cmd::output(Command::new("rustc").args([nightly.as_str(), "-vV"]))?;
    let major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.trim().split('.').next()?.parse().ok())
        .ok_or(SetupError::NoLlvmVersion)?;
    let sysroot =
        cmd::output(Command::new("rustc").args([nightly.as_str(), "--print", "sysroot"]))?;
    let dir = Path::new(sysroot.trim()).join("lib");
    // e.g. libLLVM.so.22.1-rust-1.97.0-nightly
    let prefix = format!("libLLVM.so.{major}.");
    for entry in fs::read_dir(&dir).map_err(io_error("read", &dir))? {
        let entry = entry.map_err(io_error("read", &dir))?;
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix) && n.contains("-rust-"))
        {
            return Ok(NightlyLlvm {
                major,
                lib: entry.path(),
            });
        }
    }
    Err(SetupError::NoLibLlvm { major, dir })
}

/// `D/lib/libLLVM.so` and `D/lib/<file name>`, both pointing at the nightly's libLLVM.
/// Returns whether anything changed.
fn link_libllvm(lib_dir: &Path, target: &Path) -> Result<bool, SetupError> {
    fs::create_dir_all(lib_dir).map_err(io_error("create", lib_dir))?;
    let own_name = target.file_name().unwrap_or_default();
    let mut changed = false;
    for name in [OsString::from("libLLVM.so"), own_name.to_owned()] {
        let link = lib_dir.join(name);
        if fs::read_link(&link).is_ok_and(|current| current == target) {
            continue;
        }
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).map_err(io_error("remove", &link))?;
        }
        symlink(target, &link).map_err(io_error("symlink", &link))?;
        changed = true;
    }
    Ok(changed)
}

/// Why the installed bpf-linker must be (re)built, or `None` when it is the right one.
fn bpf_linker_problem(toolchain: &Toolchain, feature: &str) -> Option<String> {
    let bin = toolchain.bin_dir().join("bpf-linker");
    if !bin.exists() {
        return Some("not installed".into());
    }
    // Running it also proves its libLLVM (rpath into llvm/lib) still resolves.
    match Command::new(&bin).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if version != format!("bpf-linker {BPF_LINKER_VERSION}") {
                return Some(format!("found `{version}`"));
            }
        }
        Ok(out) => {
            return Some(format!(
                "`bpf-linker --version` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Err(e) => return Some(format!("cannot run {}: {e}", bin.display())),
    }
    // cargo's install record says which LLVM feature the binary was built with.
    let record = toolchain.root().join(".crates2.json");
    let features = fs::read_to_string(&record)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|json| {
            let installs = json.get("installs")?.as_object()?;
            let (_, install) = installs
                .iter()
                .find(|(key, _)| key.starts_with("bpf-linker "))?;
            Some(install.get("features")?.as_array()?.clone())
        });
    match features {
        None => Some(format!("no cargo install record in {}", record.display())),
        Some(features) if !features.iter().any(|f| f.as_str() == Some(feature)) => {
            Some(format!("built without {feature}"))
        }
        Some(_) => None,
    }
}

fn bpf_linker(toolchain: &Toolchain) -> Result<Outcome, SetupError> {
    let llvm = nightly_llvm()?;
    let feature = format!("llvm-{}", llvm.major);
    let prefix = toolchain.llvm_prefix();
    let relinked = link_libllvm(&prefix.join("lib"), &llvm.lib)?;
    let bin = toolchain.bin_dir().join("bpf-linker");
    let Some(problem) = bpf_linker_problem(toolchain, &feature) else {
        let what = format!("{BPF_LINKER_VERSION} with {feature} at {}", bin.display());
        return Ok(if relinked {
            Outcome::Done(format!("{what}; relinked libLLVM"))
        } else {
            Outcome::Skipped(what)
        });
    };
    println!(
        "setup: bpf-linker: {problem}; building it against {}",
        llvm.lib.display()
    );
    let mut install = workspace::cargo(toolchain);
    install
        .env("LLVM_PREFIX", &prefix)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &feature, "--force"])
        .arg("--root")
        .arg(toolchain.root());
    cmd::run(&mut install)?;
    Ok(Outcome::Done(format!(
        "{problem} -> installed {BPF_LINKER_VERSION} with {feature} at {}",
        bin.display()
    )))
}

fn cargo_machete(toolchain: &Toolchain) -> Result<Outcome, SetupError> {
    let bin = toolchain.bin_dir().join("cargo-machete");
    let wanted = format!("cargo-machete {CARGO_MACHETE_VERSION}");
    // It prints its bare version.
    let installed = cmd::output(Command::new(&bin).arg("--version")).ok();
    if installed.as_deref().map(str::trim) == Some(CARGO_MACHETE_VERSION) {
        return Ok(Outcome::Skipped(format!("{wanted} at {}", bin.display())));
    }
    let mut install = workspace::cargo(toolchain);
    install
        .args(["install", "--locked", "cargo-machete", "--version"])
        .arg(CARGO_MACHETE_VERSION)
        .arg("--root")
        .arg(toolchain.root());
    cmd::run(&mut install)?;
    Ok(Outcome::Done(format!("{wanted} at {}", bin.display())))
}

fn bpffs() -> Result<Outcome, SetupError> {
    let path = Path::new(BPFFS);
    if sys::bpffs_mounted(path).map_err(io_error("read mounts for", path))? {
        return Ok(Outcome::Skipped(format!("mounted at {BPFFS}")));
    }
    sys::require_root(&format!("mounting bpffs at {BPFFS}"))?;
    fs::create_dir_all(path).map_err(io_error("create", path))?;
    sys::mount_bpffs(path).map_err(io_error("mount bpffs at", path))?;
    Ok(Outcome::Done(format!("mount -t bpf bpf {BPFFS}")))
}
