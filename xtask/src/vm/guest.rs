//! What goes into the guest: the shared archive, each kernel's modules, and the /init that
//! runs the tests.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::{
    Limits, Options,
    binaries::Built,
    initramfs::{self, Libraries, Staging, sh_quote},
    kernel::{self, Kernel},
};
use crate::workspace;

/// Every timing bound of the tests is multiplied by it (tests/src, agent/tests).
pub const TIME_SCALE_ENV: &str = "AGENT_TEST_TIME_SCALE";
/// Modules the tests need that Debian's cloud kernels build as modules: veth pairs, the clsact
/// qdisc (TC attach before TCX), the BPF classifier, fq for pacing, and the bridge of the LAN
/// topologies (`tests/src/lan.rs`). Nothing in an initramfs answers the kernel's module
/// autoload requests, so they are loaded up front.
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf", "sch_fq", "bridge"];
/// Where the test binaries go in the guest.
const GUEST_TESTS: &str = "/vm/tests";

/// The archive every kernel shares: tools, test binaries, the agent, the workspace files the
/// tests read.
pub fn stage_common(dir: &Path, built: &Built, agent: Option<&Path>) -> anyhow::Result<Staging> {
    let staging = Staging::new(dir)?;
    let mut libs = Libraries::default();
    initramfs::base(&staging)?;
    initramfs::tools(&staging, &mut libs)?;
    for test in &built.tests {
        let guest = Path::new(GUEST_TESTS).join(&test.name);
        staging
            .executable(&test.path, &guest, &mut libs)
            .with_context(|| format!("staging {}", test.path.display()))?;
        staging.dir(&test.package_dir.to_string_lossy())?;
    }
    // At the paths compiled into the tests (CARGO_BIN_EXE_*, AGENT_BIN).
    let mut bins: BTreeSet<&Path> = built.bins.iter().map(PathBuf::as_path).collect();
    bins.extend(agent);
    for bin in bins {
        staging
            .executable(bin, bin, &mut libs)
            .with_context(|| format!("staging {}", bin.display()))?;
    }
    // Policies and fixtures, at the workspace path the tests compute from CARGO_MANIFEST_DIR.
    let config = workspace::root().join("config");
    staging.copy_tree(&config, &config)?;
    libs.install(&staging)?;
    Ok(staging)
}

/// The kernel's modules and /init, appended to the common archive.
pub fn stage_kernel(
    initramfs_dir: &Path,
    kernel: &Kernel,
    init: &str,
    common: &Path,
) -> anyhow::Result<PathBuf> {
    let staging = Staging::new(&initramfs_dir.join(&kernel.release))?;
    for module in kernel::load_order(kernel, MODULES)? {
        initramfs::module(
            &staging,
            &kernel.modules.join(&module),
            &guest_module(kernel, &module),
        )?;
    }
    staging.text("init", init, 0o755)?;
    let own = initramfs_dir.join(format!("{}.modules.cpio", kernel.release));
    staging.write_cpio(&own)?;
    let initrd = initramfs_dir.join(format!("{}.cpio", kernel.release));
    initramfs::concat(&[common, &own], &initrd)?;
    Ok(initrd)
}

/// `/usr/lib/modules/<release>/kernel/.../veth.ko` for `kernel/.../veth.ko.xz`.
fn guest_module(kernel: &Kernel, module: &str) -> PathBuf {
    let plain = match module.find(".ko") {
        Some(at) => &module[..at + ".ko".len()],
        None => module,
    };
    Path::new("/usr/lib/modules")
        .join(&kernel.release)
        .join(plain)
}

/// /init: mounts, modules, then every test binary with `--test-threads=1`, its output and
/// `@@vm` markers on ttyS1 (the kernel keeps ttyS0), then power off.
pub fn init_script(
    kernel: &Kernel,
    built: &Built,
    agent: Option<&Path>,
    options: &Options,
    limits: &Limits,
) -> anyhow::Result<String> {
    let mut s = String::new();
    let mut env = vec![(TIME_SCALE_ENV, limits.time_scale.to_string())];
    if let Some(agent) = agent {
        env.push((
            workspace::AGENT_BIN_ENV,
            agent.to_string_lossy().into_owned(),
        ));
    }
    s.push_str(
        "#!/bin/sh\n\
         # Written by `cargo xtask vm`. busybox sh runs its own applets before PATH: the real\n\
         # iproute2 is called by its full path; the tests find it through PATH.\n\
         export PATH=/usr/sbin:/usr/bin HOME=/root TMPDIR=/tmp\n",
    );
    for (name, value) in &env {
        writeln!(s, "export {name}={}", sh_quote(value))?;
    }
    s.push_str(
        "mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         exec >/dev/ttyS1 2>&1\n\
         now() { read -r up _ </proc/uptime; echo \"$up\"; }\n\
         note() { echo \"@@vm note $*\"; }\n\
         mount -t bpf bpf /sys/fs/bpf || note 'mounting bpffs failed'\n\
         mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null\n\
         mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null\n\
         mkdir -p /dev/pts /dev/shm\n\
         mount -t devpts devpts /dev/pts\n\
         mount -t tmpfs tmpfs /dev/shm\n\
         # /tmp stays the initramfs' own (already in memory, writable): the workspace, whose\n\
         # paths the tests have compiled in, may itself lie under /tmp.\n\
         chmod 1777 /tmp\n\
         mount -t tmpfs tmpfs /run\n\
         mkdir -p /run/netns\n\
         # As systemd's LimitNOFILE: the agent holds a descriptor per balanced service.\n\
         ulimit -Hn 1048576 && ulimit -n 1048576 || note 'raising the open-files limit failed'\n\
         /usr/sbin/ip link set lo up || note 'ip link set lo up failed'\n",
    );
    for module in kernel::load_order(kernel, MODULES)? {
        let path = guest_module(kernel, &module);
        let path = sh_quote(&path.to_string_lossy());
        writeln!(s, "insmod {path} || note \"insmod {path} failed\"")?;
    }
    writeln!(
        s,
        "echo \"@@vm boot $(now)\"\n\
         run_tests() {{\n\
         \x20   name=$1 dir=$2 bin=$3\n\
         \x20   shift 3\n\
         \x20   echo \"@@vm begin $name $(now)\"\n\
         \x20   cd \"$dir\" && timeout -s KILL {} \"$bin\" --test-threads=1 --color=never \"$@\"\n\
         \x20   rc=$?\n\
         \x20   cd /\n\
         \x20   echo \"@@vm end $name $rc $(now)\"\n\
         }}",
        limits.binary_timeout.as_secs()
    )?;
    let extra: Vec<String> = options
        .filter
        .iter()
        .chain(&options.test_args)
        .map(|a| sh_quote(a))
        .collect();
    let extra = extra.join(" ");
    for test in &built.tests {
        let guest = Path::new(GUEST_TESTS).join(&test.name);
        writeln!(
            s,
            "run_tests {} {} {} {extra}",
            sh_quote(&test.name),
            sh_quote(&test.package_dir.to_string_lossy()),
            sh_quote(&guest.to_string_lossy()),
        )?;
    }
    // If poweroff failed, init would exit: a panic, and with panic=-1 and -no-reboot QEMU
    // exits all the same.
    s.push_str("echo \"@@vm done $(now)\"\npoweroff -f\n");
    Ok(s)
}
