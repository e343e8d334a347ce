//! `cargo xtask vm`: the datapath and end-to-end tests inside QEMU, on Debian's cloud kernels.
//!
//! Per kernel: the package fetched and unpacked once into `target/vm/kernels/`, an initramfs of
//! busybox, iproute2 and friends, the test binaries and the kernel's modules, then one boot that
//! runs every test binary serially and powers off. Progress is streamed from the guest's second
//! serial port; a table per kernel, the failures, and one closing line come at the end.

mod binaries;
mod guest;
mod initramfs;
mod kernel;
mod report;
mod results;
mod run;

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{build, cmd::TestCounts, setup, sys, toolchain::Toolchain, workspace};
use binaries::{Built, PackageTests};
use guest::{TIME_SCALE_ENV, init_script, stage_common, stage_kernel};
use initramfs::Staging;
use kernel::Kernel;
use report::{KernelRun, Report, print_event};
use results::{Event, Transcript};
use run::{Accel, Machine};

pub const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12"];
/// Where a whole suite's times go (its own section; `cargo xtask bench` writes the rest).
const BENCHMARKS: &str = "BENCHMARKS.md";
const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 4096;
/// How long a run waits for another one on the same target directory to finish.
const LOCK_WAIT: Duration = Duration::from_secs(3 * 3600);

/// The agent's integration tests (`agent/tests/*.rs`), the ones that ask the kernel. Its unit
/// tests are pure logic, the same on every kernel: they run on the host only.
const DATAPATH: PackageTests = PackageTests {
    package: "agent",
    dir: "agent",
    kinds: &["test"],
};
const E2E: PackageTests = PackageTests {
    package: workspace::E2E_CRATE,
    dir: "tests",
    kinds: &["test"],
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// The agent's tests that ask the kernel: datapath (BPF_PROG_TEST_RUN), stack, CLI.
    Datapath,
    /// agent-tests: network namespaces, real sockets, the agent binary.
    E2e,
    /// Both, in one boot per kernel.
    All,
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Suite::Datapath => "datapath",
            Suite::E2e => "e2e",
            Suite::All => "all",
        }
    }

    fn packages(self) -> &'static [PackageTests] {
        match self {
            Suite::Datapath => &[DATAPATH],
            Suite::E2e => &[E2E],
            Suite::All => &[DATAPATH, E2E],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when a probe guest boots with it (10 s at most), else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(clap::Args)]
pub struct Args {
    /// A kernel series (`6.1`, `6.12`: the newest Debian cloud package of it) or an exact
    /// package name (`linux-image-...`); repeat for more. Default: 6.1 and 6.12.
    #[arg(long = "kernel", value_name = "VERSION")]
    kernels: Vec<String>,
    #[arg(long, value_enum, default_value_t = Suite::All)]
    suite: Suite,
    /// Run only the tests whose name contains this (libtest's filter).
    #[arg(long, value_name = "SUBSTR")]
    filter: Option<String>,
    /// AGENT_TEST_TIME_SCALE in the VM: every timing bound of the tests is multiplied by it.
    /// Default: 10 under TCG, 1 under KVM.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    time_scale: Option<u32>,
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Per kernel: QEMU is killed after this long (boot and all test binaries).
    /// Default: 5400 under TCG, 1800 under KVM.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// Each test binary is killed inside the VM after this long.
    /// Default: 2400 under TCG, 900 under KVM.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    binary_timeout: Option<u64>,
    /// Release builds of the tests and the agent.
    #[arg(long)]
    release: bool,
    /// Passed to every test binary after the filter, e.g. `-- --nocapture`.
    #[arg(last = true, value_name = "TEST ARGS")]
    test_args: Vec<String>,
}

/// Everything a run needs besides the kernels.
#[derive(Debug, Clone)]
struct Options {
    suite: Suite,
    filter: Option<String>,
    time_scale: Option<u32>,
    accel: AccelChoice,
    timeout: Option<Duration>,
    binary_timeout: Option<Duration>,
    release: bool,
    test_args: Vec<String>,
}

impl Options {
    fn defaults(suite: Suite, filter: Option<&str>) -> Self {
        Self {
            suite,
            filter: filter.map(str::to_owned),
            time_scale: None,
            accel: AccelChoice::Auto,
            timeout: None,
            binary_timeout: None,
            release: false,
            test_args: Vec::new(),
        }
    }
}

/// `cargo xtask vm`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let toolchain = setup::run()?;
    let kernels: Vec<&str> = if args.kernels.is_empty() {
        DEFAULT_KERNELS.to_vec()
    } else {
        args.kernels.iter().map(String::as_str).collect()
    };
    let options = Options {
        suite: args.suite,
        filter: args.filter.clone(),
        time_scale: args.time_scale,
        accel: args.accel,
        timeout: args.timeout.map(Duration::from_secs),
        binary_timeout: args.binary_timeout.map(Duration::from_secs),
        release: args.release,
        test_args: args.test_args.clone(),
    };
    let report = execute(&toolchain, &kernels, &options)?;
    // Only a whole suite's figures stand for it: a filtered or partial run writes nothing.
    if options.filter.is_none() && options.test_args.is_empty() {
        let path = workspace::root().join(BENCHMARKS);
        agent_tests::benchmarks::write_section(&path, &report.markdown(options.suite.name()))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("vm: times written to {}", path.display());
    }
    report.verdict()
}

/// One suite on `kernels` with the defaults (auto accelerator, default limits), for
/// `cargo xtask test`: the counts over every kernel, and `Err` when a test failed, a VM did not
/// finish, or the VMs could not be set up at all (then the counts are zero).
pub fn run_suite(
    toolchain: &Toolchain,
    kernels: &[&str],
    suite: Suite,
    filter: Option<&str>,
) -> (TestCounts, anyhow::Result<()>) {
    match execute(toolchain, kernels, &Options::defaults(suite, filter)) {
        Ok(report) => (report.counts(), report.verdict()),
        Err(e) => (TestCounts::default(), Err(e)),
    }
}

/// The limits of one run, from the options and the accelerator.
struct Limits {
    time_scale: u32,
    timeout: Duration,
    binary_timeout: Duration,
}

impl Limits {
    fn new(options: &Options, accel: Accel) -> Self {
        // TCG runs the verifier and the tests about ten times slower than hardware.
        let (scale, timeout, binary) = match accel {
            Accel::Tcg => (10, 5400, 2400),
            Accel::Kvm => (1, 1800, 900),
        };
        Self {
            time_scale: options.time_scale.unwrap_or(scale),
            timeout: options.timeout.unwrap_or(Duration::from_secs(timeout)),
            binary_timeout: options
                .binary_timeout
                .unwrap_or(Duration::from_secs(binary)),
        }
    }
}

fn execute(toolchain: &Toolchain, specs: &[&str], options: &Options) -> anyhow::Result<Report> {
    sys::catch_interrupts().context("installing signal handlers")?;
    let vm_dir = workspace::target_dir()?.join("vm");
    let _lock = lock(&vm_dir)?;
    let mut apt = kernel::Apt::default();
    let mut kernels = Vec::new();
    for spec in specs {
        let kernel = kernel::fetch(spec, &vm_dir.join("kernels"), &mut apt)
            .with_context(|| format!("kernel {spec}"))?;
        kernels.push(kernel);
    }
    let Some(first) = kernels.first() else {
        bail!("no kernel to run");
    };
    let initramfs_dir = vm_dir.join("initramfs");
    let accel = choose_accel(options.accel, first, &initramfs_dir, &vm_dir.join("runs"))?;
    let limits = Limits::new(options, accel);
    println!(
        "vm: {accel}; {TIME_SCALE_ENV}={} set for the tests{}; {}s per kernel, {}s per test binary",
        limits.time_scale,
        if options.time_scale.is_some() {
            " (--time-scale)"
        } else {
            " (default for this accelerator; --time-scale N overrides)"
        },
        limits.timeout.as_secs(),
        limits.binary_timeout.as_secs(),
    );

    let built = binaries::build(toolchain, options.suite.packages(), options.release)
        .context("building the test binaries")?;
    // The end-to-end tests start the agent from AGENT_BIN, built as `cargo xtask test` does.
    let agent = if options.suite == Suite::Datapath {
        built.bins.iter().find(|p| p.ends_with("agent")).cloned()
    } else {
        Some(build::agent_binary(toolchain, options.release).context("building the agent")?)
    };
    let started = Instant::now();
    let common = initramfs_dir.join("common.cpio");
    let staging_dir = initramfs_dir.join("common");
    stage_common(&staging_dir, &built, agent.as_deref())?
        .write_cpio(&common)
        .context("writing the common initramfs")?;
    // As large as the archive and rebuilt every run (`cpio -t` lists the archive).
    std::fs::remove_dir_all(&staging_dir)
        .with_context(|| format!("removing {}", staging_dir.display()))?;
    println!(
        "vm: initramfs: {} test binaries, {} ({:.1}s)",
        built.tests.len(),
        size(&common),
        started.elapsed().as_secs_f64()
    );

    let machine = Machine {
        accel,
        cpus: CPUS,
        memory_mib: MEMORY_MIB,
    };
    let mut runs = Vec::new();
    for kernel in kernels {
        let init = init_script(&kernel, &built, agent.as_deref(), options, &limits)?;
        let initrd = stage_kernel(&initramfs_dir, &kernel, &init, &common)?;
        // Per suite, so a datapath run does not overwrite the logs of the last e2e run.
        let logs = vm_dir
            .join("runs")
            .join(options.suite.name())
            .join(&kernel.release);
        runs.push(boot_and_test(
            machine, kernel, &initrd, &logs, &limits, &built,
        )?);
    }
    let report = Report {
        accel,
        time_scale: limits.time_scale,
        runs,
    };
    report.print();
    Ok(report)
}

/// Held for a whole run: the staging directories, archives and logs under target/vm belong to
/// one run at a time, and other developers' runs share the target directory.
fn lock(vm_dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    let path = vm_dir.join("lock");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = Instant::now() + LOCK_WAIT;
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        if !told {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            println!(
                "vm: waiting (up to {}s) for another `cargo xtask vm` ({}) to release {}",
                LOCK_WAIT.as_secs(),
                holder.trim(),
                path.display()
            );
            told = true;
        }
        if sys::interrupted() {
            bail!("interrupted while waiting for {}", path.display());
        }
        if Instant::now() >= deadline {
            bail!(
                "another `cargo xtask vm` held {} for {}s",
                path.display(),
                LOCK_WAIT.as_secs()
            );
        }
        // flock has no timed wait: poll; a run holds the lock for minutes.
        std::thread::sleep(Duration::from_secs(1));
    }
    // Only for the message above; the lock itself is the flock.
    file.set_len(0)
        .and_then(|()| write!(file, "pid {}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

fn size(path: &Path) -> String {
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    format!("{} MiB", bytes / (1024 * 1024))
}

fn choose_accel(
    choice: AccelChoice,
    kernel: &Kernel,
    initramfs_dir: &Path,
    runs: &Path,
) -> anyhow::Result<Accel> {
    match choice {
        AccelChoice::Kvm => return Ok(Accel::Kvm),
        AccelChoice::Tcg => return Ok(Accel::Tcg),
        AccelChoice::Auto => {}
    }
    let staging = Staging::new(&initramfs_dir.join("probe"))?;
    initramfs::base(&staging)?;
    staging.text("init", &run::probe_init(), 0o755)?;
    let probe = initramfs_dir.join("probe.cpio");
    staging.write_cpio(&probe)?;
    match run::kvm_works(&kernel.vmlinuz, &probe, &runs.join("kvm-probe"))? {
        Ok(()) => {
            println!("vm: KVM works: using it");
            Ok(Accel::Kvm)
        }
        Err(why) => {
            println!("vm: KVM unusable ({why}): using TCG");
            Ok(Accel::Tcg)
        }
    }
}

fn boot_and_test(
    machine: Machine,
    kernel: Kernel,
    initrd: &Path,
    logs: &Path,
    limits: &Limits,
    built: &Built,
) -> anyhow::Result<KernelRun> {
    let tag = kernel.spec.clone();
    println!(
        "\nvm[{tag}]: booting {} ({}, {} CPUs, {} MiB; logs in {})",
        kernel.package,
        machine.accel,
        machine.cpus,
        machine.memory_mib,
        logs.display()
    );
    let cmdline = "console=ttyS0 panic=-1 mitigations=off";
    let mut transcript = Transcript::default();
    let start = Instant::now();
    let mut on_event = |event: Event<'_>| print_event(&tag, start, event);
    let finished = run::boot(
        machine,
        &run::Boot {
            kernel: &kernel.vmlinuz,
            initrd,
            cmdline,
            logs,
            timeout: limits.timeout,
            fatal: None,
        },
        &mut |bytes| transcript.feed(bytes, Instant::now(), &mut on_event),
    )
    .with_context(|| format!("running the VM of {}", kernel.package))?;
    transcript.finish(Instant::now(), &mut on_event);
    match finished.status {
        None => println!(
            "vm[{tag}]: killed after {}s (--timeout)",
            limits.timeout.as_secs()
        ),
        Some(status) => println!(
            "vm[{tag}]: QEMU exited ({status}) after {:.1}s",
            finished.elapsed.as_secs_f64()
        ),
    }
    let not_run = built
        .tests
        .iter()
        .map(|t| &t.name)
        .filter(|name| !transcript.binaries.iter().any(|b| &b.name == *name))
        .cloned()
        .collect();
    Ok(KernelRun {
        kernel,
        transcript,
        exited: finished.status,
        wall: finished.elapsed,
        logs: logs.to_owned(),
        not_run,
    })
}
