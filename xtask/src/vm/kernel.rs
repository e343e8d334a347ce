//! Debian cloud kernels for the VMs: the package resolved with apt-cache, fetched with
//! `apt-get download`, unpacked with `dpkg-deb -x` into `target/vm/kernels/`, and reused by later
//! runs. Debian's packages carry no `modules.dep` (their postinst runs depmod), so `depmod -b`
//! writes one into the unpacked tree, and module dependencies are resolved from it.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    cmd::{self, CmdError},
    setup,
    sys::{self, NotRoot},
};

/// Which package flavour a series means; the rest boot the same way. 6.1 is bookworm's own
/// kernel (the signed package is the one Debian installs); 6.12 is the backport, taken unsigned
/// as /work/shared/TOOLCHAIN.md describes it.
const FLAVOURS: &[(&str, &str)] = &[
    ("6.1", "-cloud-amd64"),
    ("6.12", "+deb12-cloud-amd64-unsigned"),
];
const DEFAULT_FLAVOUR: &str = "-cloud-amd64";
const IMAGE_PREFIX: &str = "linux-image-";
/// Written into an unpacked kernel's directory once it is complete; holds the package version.
const COMPLETE_MARK: &str = ".complete";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    NotRoot(#[from] NotRoot),
    #[error(
        "`{0}` is not a kernel series (like `6.1` or `6.12`) nor a package name (`linux-image-...`)"
    )]
    BadSpec(String),
    #[error("no Debian package for kernel `{spec}`: apt-cache knows no `{pattern}`")]
    NoPackage { spec: String, pattern: String },
    #[error("`apt-cache show {0}` printed no Version")]
    NoVersion(String),
    #[error("`apt-get download {package}` left no {package}_*.deb in {}", .dir.display())]
    NoDeb { package: String, dir: PathBuf },
    #[error("{package}: no {what} in {}", .dir.display())]
    Missing {
        package: String,
        what: &'static str,
        dir: PathBuf,
    },
    #[error("module `{name}` is neither in modules.dep nor built into {release}")]
    UnknownModule { name: String, release: String },
    #[error("{action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KernelError {
    let path = path.to_owned();
    move |source| KernelError::Io {
        action,
        path,
        source,
    }
}

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// What was asked for: `6.1`, or a package name.
    pub spec: String,
    pub package: String,
    /// The package version, e.g. `6.1.192-3`.
    pub version: String,
    /// `uname -r` in the VM: the directory name under `lib/modules`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package, with a `modules.dep`.
    pub modules: PathBuf,
}

/// apt, with `apt-get update` run at most once per xtask run, and only when needed.
#[derive(Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    fn update(&mut self) -> Result<bool, KernelError> {
        if self.updated {
            return Ok(false);
        }
        sys::require_root("apt-get update (the kernel package is not in apt's lists)")?;
        println!("vm: apt-get update");
        cmd::run(apt_get().arg("update"))?;
        self.updated = true;
        Ok(true)
    }
}

fn apt_get() -> Command {
    let mut command = setup::apt_get();
    if sys::is_root() {
        // Root's apt downloads as `_apt`, which cannot write into target/; the files are ours.
        command.args(["-o", "APT::Sandbox::User=root"]);
    }
    command
}

/// What a spec selects: one exact package, or the newest of a series.
#[derive(Debug, PartialEq, Eq)]
enum Selector {
    Exact(String),
    Series {
        prefix: String,
        suffix: &'static str,
    },
}

fn selector(spec: &str) -> Result<Selector, KernelError> {
    if spec.starts_with(IMAGE_PREFIX) {
        return Ok(Selector::Exact(spec.to_owned()));
    }
    let parts: Vec<&str> = spec.split('.').collect();
    let numeric = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if parts.len() != 2 || !parts.iter().all(numeric) {
        return Err(KernelError::BadSpec(spec.to_owned()));
    }
    let suffix = FLAVOURS
        .iter()
        .find(|(series, _)| *series == spec)
        .map_or(DEFAULT_FLAVOUR, |(_, suffix)| suffix);
    // The dot after the series keeps `6.1` from matching `6.12.x`.
    Ok(Selector::Series {
        prefix: format!("{IMAGE_PREFIX}{spec}."),
        suffix,
    })
}

impl Selector {
    fn pattern(&self) -> String {
        match self {
            Selector::Exact(name) => name.clone(),
            Selector::Series { prefix, suffix } => format!("{prefix}*{suffix}"),
        }
    }

    /// The newest matching package among `names`, by the numbers in its name (ABI and
    /// upload numbers grow with every release).
    fn newest<'a>(&self, names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
        match self {
            Selector::Exact(want) => names.into_iter().find(|n| n == want),
            Selector::Series { prefix, suffix } => names
                .filter_map(|n| {
                    let middle = n.strip_prefix(prefix.as_str())?.strip_suffix(suffix)?;
                    is_version(middle).then(|| (numbers(middle), n))
                })
                .max()
                .map(|(_, n)| n),
        }
    }
}

/// `0-57`, `118+deb12`: a version; `0-57-rt`, `118+deb12-cloud-amd64` (another flavour
/// before the suffix) are not.
fn is_version(middle: &str) -> bool {
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    middle
        .split(['-', '+'])
        .all(|p| digits(p) || p.strip_prefix("deb").is_some_and(digits))
}

fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter_map(|run| run.parse().ok())
        .collect()
}

fn resolve(spec: &str, apt: &mut Apt) -> Result<String, KernelError> {
    let selector = selector(spec)?;
    let prefix = match &selector {
        Selector::Exact(name) => name.clone(),
        Selector::Series { prefix, .. } => prefix.clone(),
    };
    loop {
        let names = cmd::output(Command::new("apt-cache").args(["pkgnames", &prefix]))?;
        if let Some(name) = selector.newest(names.lines().map(str::trim)) {
            return Ok(name.to_owned());
        }
        if !apt.update()? {
            return Err(KernelError::NoPackage {
                spec: spec.to_owned(),
                pattern: selector.pattern(),
            });
        }
    }
}

fn package_version(package: &str) -> Result<String, KernelError> {
    let show = cmd::output(Command::new("apt-cache").args(["show", "--no-all-versions", package]))?;
    show.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| KernelError::NoVersion(package.to_owned()))
}

/// Resolves `spec`, downloads and unpacks its package under `cache` unless already there.
pub fn fetch(spec: &str, cache: &Path, apt: &mut Apt) -> Result<Kernel, KernelError> {
    let package = resolve(spec, apt)?;
    let version = package_version(&package)?;
    let dir = cache.join(format!("{package}_{version}"));
    let cached = fs::read_to_string(dir.join(COMPLETE_MARK)).is_ok_and(|v| v.trim() == version);
    if !cached {
        if dir.exists() {
            // A run stopped half-way: unpack again from scratch.
            fs::remove_dir_all(&dir).map_err(io_error("remove", &dir))?;
        }
        let deb = download(&package, cache, apt)?;
        println!("vm: unpacking {}", deb.display());
        cmd::output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    }
    let kernel = locate(spec, &package, &version, &dir)?;
    if !cached {
        // depmod finds dependencies in the modules' .modinfo, compressed or not. It looks in
        // BASE/lib/modules: a package with usr/lib/modules gets a `lib` link to it.
        let lib = dir.join("lib");
        if !lib.exists() {
            std::os::unix::fs::symlink("usr/lib", &lib).map_err(io_error("symlink", &lib))?;
        }
        cmd::output(
            Command::new("depmod")
                .arg("-b")
                .arg(&dir)
                .arg(&kernel.release),
        )?;
        let mark = dir.join(COMPLETE_MARK);
        fs::write(&mark, &version).map_err(io_error("write", &mark))?;
    }
    println!(
        "vm: kernel {spec}: {package} {version}{}",
        if cached { " (cached)" } else { "" }
    );
    Ok(kernel)
}

fn download(package: &str, cache: &Path, apt: &mut Apt) -> Result<PathBuf, KernelError> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).map_err(io_error("create", &debs))?;
    let find = || -> Result<Option<PathBuf>, KernelError> {
        let prefix = format!("{package}_");
        for entry in fs::read_dir(&debs).map_err(io_error("read", &debs))? {
            let path = entry.map_err(io_error("read", &debs))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with(&prefix) && name.ends_with(".deb") {
                return Ok(Some(path));
            }
        }
        Ok(None)
    };
    if let Some(deb) = find()? {
        return Ok(deb);
    }
    println!("vm: apt-get download {package}");
    let mut download = apt_get();
    download.current_dir(&debs).args(["download", package]);
    if let Err(e) = cmd::output(&mut download) {
        // Stale lists name a file the mirror no longer has: refresh once and retry.
        if !apt.update()? {
            return Err(e.into());
        }
        cmd::output(&mut download)?;
    }
    find()?.ok_or_else(|| KernelError::NoDeb {
        package: package.to_owned(),
        dir: debs,
    })
}

fn locate(spec: &str, package: &str, version: &str, dir: &Path) -> Result<Kernel, KernelError> {
    let missing = |what, dir: &Path| KernelError::Missing {
        package: package.to_owned(),
        what,
        dir: dir.to_owned(),
    };
    // Newer packages put modules under usr/lib (merged /usr).
    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| dir.join(p))
        .find(|p| p.is_dir())
        .ok_or_else(|| missing("lib/modules", dir))?;
    let release = single_entry(&modules_root)?
        .ok_or_else(|| missing("lib/modules/<release>", &modules_root))?;
    let boot = dir.join("boot");
    let vmlinuz = boot.join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(missing("vmlinuz", &boot));
    }
    Ok(Kernel {
        spec: spec.to_owned(),
        package: package.to_owned(),
        version: version.to_owned(),
        modules: modules_root.join(&release),
        release,
        vmlinuz,
    })
}

/// The name of the only directory in `dir`, if there is exactly one.
fn single_entry(dir: &Path) -> Result<Option<String>, KernelError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("read", dir))? {
        let entry = entry.map_err(io_error("read", dir))?;
        if entry.path().is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok((names.len() == 1).then(|| names.remove(0)))
}

/// `veth` for `kernel/drivers/net/veth.ko.xz`; `-` and `_` are the same to the kernel.
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Module files of `names` and of everything they depend on, each after its dependencies:
/// paths relative to the release's module directory. Built-in modules need nothing.
pub fn load_order(kernel: &Kernel, names: &[&str]) -> Result<Vec<String>, KernelError> {
    let dep_file = kernel.modules.join("modules.dep");
    let dep = fs::read_to_string(&dep_file).map_err(io_error("read", &dep_file))?;
    let builtin_file = kernel.modules.join("modules.builtin");
    // A kernel with every module built in may have no such file.
    let builtin = fs::read_to_string(&builtin_file).unwrap_or_default();
    order(&dep, &builtin, names).map_err(|name| KernelError::UnknownModule {
        name,
        release: kernel.release.clone(),
    })
}

/// The pure part of `load_order`; `Err` names a module found nowhere.
fn order(dep: &str, builtin: &str, names: &[&str]) -> Result<Vec<String>, String> {
    let mut modules: HashMap<String, (&str, Vec<&str>)> = HashMap::new();
    for line in dep.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let path = path.trim();
        modules.insert(module_name(path), (path, deps.split_whitespace().collect()));
    }
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();

    fn visit<'a>(
        name: &str,
        modules: &HashMap<String, (&'a str, Vec<&'a str>)>,
        builtin: &HashSet<String>,
        seen: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) -> Result<(), String> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let Some((path, deps)) = modules.get(name) else {
            return if builtin.contains(name) {
                Ok(())
            } else {
                Err(name.to_owned())
            };
        };
        for dep in deps {
            visit(&module_name(dep), modules, builtin, seen, out)?;
        }
        out.push((*path).to_owned());
        Ok(())
    }

    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for name in names {
        visit(&module_name(name), &modules, &builtin, &mut seen, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &str = "linux-image-6.1.0-9-cloud-amd64
linux-image-6.1.0-57-cloud-amd64
linux-image-6.1.0-57-cloud-amd64-unsigned
linux-image-6.1.0-57-cloud-amd64-dbg
linux-image-6.1.0-60-rt-amd64
linux-image-6.12.9+deb12-cloud-amd64-unsigned
linux-image-6.12.118+deb12-cloud-amd64-unsigned
linux-image-6.12.118+deb12-cloud-amd64
linux-image-6.12-cloud-amd64";

    fn pick(spec: &str) -> Option<&'static str> {
        selector(spec).unwrap().newest(NAMES.lines())
    }

    #[test]
    fn picks_the_newest_package_of_a_series() {
        assert_eq!(pick("6.1"), Some("linux-image-6.1.0-57-cloud-amd64"));
        assert_eq!(
            pick("6.12"),
            Some("linux-image-6.12.118+deb12-cloud-amd64-unsigned")
        );
        assert_eq!(pick("6.6"), None);
        assert_eq!(
            pick("linux-image-6.12.9+deb12-cloud-amd64-unsigned"),
            Some("linux-image-6.12.9+deb12-cloud-amd64-unsigned")
        );
    }

    #[test]
    fn refuses_specs_that_are_no_series() {
        for bad in ["6", "6.x", "6.1.0", "", "latest"] {
            assert!(selector(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn orders_modules_after_their_dependencies() {
        let dep =
            "kernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz
kernel/net/llc/llc.ko.xz:
kernel/drivers/net/veth.ko.xz:
";
        let builtin = "kernel/net/sched/sch_fq_codel.ko\n";
        assert_eq!(
            order(dep, builtin, &["veth", "bridge", "sch_fq_codel", "stp"]),
            Ok(vec![
                "kernel/drivers/net/veth.ko.xz".to_owned(),
                "kernel/net/llc/llc.ko.xz".to_owned(),
                "kernel/net/802/stp.ko.xz".to_owned(),
                "kernel/net/bridge/bridge.ko.xz".to_owned(),
            ])
        );
        assert_eq!(order(dep, builtin, &["tun"]), Err("tun".to_owned()));
    }
}
