//! `cargo xtask image`: the agent's container image, from the workspace's `Dockerfile`, built
//! with buildah (default) or podman, the Debian packages, which this installs when missing.
//!
//! Both stages start from the Dockerfile's `DEBIAN_IMAGE`. When that image is neither stored
//! nor pullable (no registry reachable), a stand-in is bootstrapped from Debian's archive with
//! mmdebstrap (minbase, without documentation and locales, as Debian's `-slim` images are)
//! and stored as `localhost/debian:<tag>`. RUN steps use chroot isolation: it needs root, and
//! neither cgroups nor rlimits, which OCI runtimes set up and may be refused (on this machine
//! kind crun fails: "cgroups in hybrid mode not supported"). The build stage runs
//! `cargo xtask image --build-stage OUT` (the toolchain steps of `setup`, then the release
//! agent), so versions live in the xtask code only.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::ValueEnum;

use crate::{build, cmd, setup, sys, toolchain::NIGHTLY, workspace};

/// The image `cargo xtask image` builds and the DaemonSet runs, without its tag. `localhost/`
/// is what buildah and podman put before a name without a registry; spelled out, the name is
/// the same in a node's runtime after `podman save` and an import, and no registry is asked.
pub const IMAGE_NAME: &str = "localhost/agent";
const DOCKERFILE: &str = "Dockerfile";
/// The Dockerfile's base image argument; its default there is the one base of both stages.
const BASE_ARG: &str = "DEBIAN_IMAGE";
/// Where a stand-in base goes when the Dockerfile's cannot be had: `localhost/debian:<tag>`.
const STAND_IN_REPOSITORY: &str = "localhost/debian";
/// The Dockerfile's argument naming the build stage's nightly (`nightly-YYYY-MM-DD`):
/// `cargo xtask image` passes this machine's, the one the suite tests with. A newer nightly
/// may build programs the verifier refuses (tried: 1.101.0-nightly of 2026-10-29, LLVM 23,
/// and Linux 6.18 refused `agent_xdp_nat`: "R11 is invalid").
const NIGHTLY_ARG: &str = "AGENT_NIGHTLY";
/// Local CA certificates (Debian's place for them). RUN steps see the host's, read-only, so
/// the build stage's downloads (rustup, crates) trust what the host trusts, a TLS-inspecting
/// proxy included; the runtime stage installs no certificates and holds none of them.
const LOCAL_CA_DIR: &str = "/usr/local/share/ca-certificates";

/// The image's full reference: [`IMAGE_NAME`] tagged with the workspace's version (the
/// agent's and xtask's are both `version.workspace`).
pub fn reference() -> String {
    format!("{IMAGE_NAME}:{}", env!("CARGO_PKG_VERSION"))
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The tool that builds the image (installed with apt-get when missing).
    #[arg(long, value_enum, default_value_t = Builder::Buildah)]
    builder: Builder,
    /// Inside the Dockerfile's build stage: install the build toolchain, build the release
    /// agent and copy it to this path.
    #[arg(long, hide = true, value_name = "PATH")]
    build_stage: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Builder {
    Buildah,
    Podman,
}

impl Builder {
    fn program(self) -> &'static str {
        match self {
            Builder::Buildah => "buildah",
            Builder::Podman => "podman",
        }
    }

    fn command(self) -> Command {
        Command::new(self.program())
    }

    /// Whether `image` is in local storage.
    fn has_image(self, image: &str) -> bool {
        let mut command = self.command();
        match self {
            Builder::Buildah => command.args(["inspect", "--type", "image", image]),
            Builder::Podman => command.args(["image", "exists", image]),
        };
        cmd::output(&mut command).is_ok()
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(out) = &args.build_stage {
        return build_stage(out);
    }
    sys::require_root(
        "cargo xtask image (chroot isolation, installing buildah/podman and mmdebstrap)",
    )?;
    let builder = args.builder;
    install(&[builder.program(), "mmdebstrap"])?;
    let root = workspace::root();
    let dockerfile = root.join(DOCKERFILE);
    let text = fs::read_to_string(&dockerfile)
        .with_context(|| format!("reading {}", dockerfile.display()))?;
    let Some(default_base) = default_arg(&text, BASE_ARG) else {
        bail!("{}: no `ARG {BASE_ARG}=<image>` line", dockerfile.display());
    };
    let base = base_image(builder, &default_base)?;
    let nightly = host_nightly()?;
    println!("image: the build stage's {NIGHTLY} is this machine's, {nightly}");
    let image = reference();

    let mut build = builder.command();
    match builder {
        Builder::Buildah => build.arg("bud"),
        Builder::Podman => build.arg("build"),
    };
    build
        .args(["--isolation", "chroot", "--layers", "--pull=never"])
        .arg("--file")
        .arg(&dockerfile)
        .args(["--tag", &image])
        .args(["--build-arg", &format!("{BASE_ARG}={base}")])
        .args(["--build-arg", &format!("{NIGHTLY_ARG}={nightly}")]);
    if has_local_cas() {
        println!("image: RUN steps see the host's {LOCAL_CA_DIR} (read-only)");
        build
            .arg("--volume")
            .arg(format!("{LOCAL_CA_DIR}:{LOCAL_CA_DIR}:ro"));
    }
    build.arg(root);
    println!(
        "image: building {image} from {base} with {}",
        builder.program()
    );
    let start = Instant::now();
    cmd::run(&mut build)?;
    let took = start.elapsed();

    let version = smoke_test(builder, &image)?;
    let mut size = builder.command();
    size.args(["images", "--format", "{{.Size}}", &image]);
    let size = cmd::output(&mut size)?;
    println!(
        "image: {image} built in {:.0} s, {} ({version}, from {base})",
        took.as_secs_f64(),
        size.trim(),
    );
    Ok(())
}

/// The build stage's step: the toolchain part of `cargo xtask setup`, then the release agent.
/// With [`NIGHTLY_ARG`] set, the stage's `nightly` is that dated nightly first.
fn build_stage(out: &Path) -> anyhow::Result<()> {
    if let Some(dated) = std::env::var(NIGHTLY_ARG).ok().filter(|v| !v.is_empty()) {
        pin_nightly(&dated)?;
    }
    let toolchain = setup::build_toolchain()?;
    // agent/build.rs does not rerun when the nightly changes, and the target directory is a
    // cache mount: an eBPF object of another nightly would be embedded again. So the agent
    // package is cleaned whenever the nightly differs from the last build's.
    let nightly = cmd::output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let stamp = workspace::target_dir()?.join("image-build-stage-nightly");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(nightly.as_str()) {
        println!(
            "image: build stage: no agent built with this nightly yet: cleaning the agent package"
        );
        let mut clean = workspace::cargo(&toolchain);
        clean.args(["clean", "--release", "--package", "agent"]);
        cmd::run(&mut clean)?;
    }
    let agent = build::agent_binary(&toolchain, true)?;
    fs::write(&stamp, &nightly).with_context(|| format!("writing {}", stamp.display()))?;
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(&agent, out)
        .with_context(|| format!("copying {} to {}", agent.display(), out.display()))?;
    println!(
        "image: build stage: {} -> {}",
        agent.display(),
        out.display()
    );
    Ok(())
}

/// The date of the channel manifest a rustup toolchain was installed from (its `date = "..."`).
fn toolchain_date(sysroot: &Path) -> Option<String> {
    let manifest = sysroot.join("lib/rustlib/multirust-channel-manifest.toml");
    fs::read_to_string(manifest).ok()?.lines().find_map(|line| {
        let value = line.strip_prefix("date")?.trim().strip_prefix('=')?.trim();
        Some(value.trim_matches('"').to_owned())
    })
}

/// This machine's nightly as a dated toolchain, `nightly-YYYY-MM-DD`.
fn host_nightly() -> anyhow::Result<String> {
    let sysroot =
        cmd::output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let sysroot = PathBuf::from(sysroot.trim());
    let date = toolchain_date(&sysroot).with_context(|| {
        format!(
            "no `date` in {}/lib/rustlib/multirust-channel-manifest.toml: which nightly is it?",
            sysroot.display()
        )
    })?;
    Ok(format!("{NIGHTLY}-{date}"))
}

/// Makes `dated` (`nightly-YYYY-MM-DD`) the toolchain called `nightly`, which setup, xtask
/// and aya-build (agent/build.rs) all run. rustup refuses `nightly` as a custom toolchain's
/// name, so the dated toolchain's directory is renamed to the channel's: rustup knows a
/// toolchain by its directory, and its components by the manifest inside.
fn pin_nightly(dated: &str) -> anyhow::Result<()> {
    let Some(date) = dated.strip_prefix(&format!("{NIGHTLY}-")) else {
        bail!("{NIGHTLY_ARG}={dated}: expected {NIGHTLY}-YYYY-MM-DD");
    };
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .context("RUSTUP_HOME is not set (the Dockerfile sets it)")?;
    let host = cmd::output(Command::new("rustc").arg("-vV"))?;
    let triple = host
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("`rustc -vV` printed no `host:` line")?
        .trim()
        .to_owned();
    let toolchains = rustup_home.join("toolchains");
    let channel_dir = toolchains.join(format!("{NIGHTLY}-{triple}"));
    match toolchain_date(&channel_dir) {
        Some(d) if d == date => {
            println!("image: build stage: {NIGHTLY} is {dated} (installed)");
            return Ok(());
        }
        Some(other) => {
            println!("image: build stage: {NIGHTLY} is of {other}; replacing it by {dated}");
            fs::remove_dir_all(&channel_dir)
                .with_context(|| format!("removing {}", channel_dir.display()))?;
        }
        None if channel_dir.exists() => {
            fs::remove_dir_all(&channel_dir)
                .with_context(|| format!("removing {}", channel_dir.display()))?;
        }
        None => {}
    }
    cmd::run(Command::new("rustup").args(["toolchain", "install", dated, "--profile", "minimal"]))?;
    let dated_dir = toolchains.join(format!("{dated}-{triple}"));
    fs::rename(&dated_dir, &channel_dir).with_context(|| {
        format!(
            "renaming {} to {}",
            dated_dir.display(),
            channel_dir.display()
        )
    })?;
    println!("image: build stage: {NIGHTLY} is {dated}");
    Ok(())
}

/// Installs the Debian packages among `packages` that are missing.
fn install(packages: &[&str]) -> anyhow::Result<()> {
    let missing = setup::missing_packages(packages);
    if missing.is_empty() {
        return Ok(());
    }
    if which("apt-get").is_none() {
        bail!(
            "cargo xtask image needs {} (Debian packages; no apt-get here to install them)",
            missing.join(", ")
        );
    }
    println!("image: installing {}", missing.join(", "));
    Ok(setup::apt_install(&missing)?)
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The default of `ARG <name>=<value>` in a Dockerfile.
fn default_arg(dockerfile: &str, name: &str) -> Option<String> {
    dockerfile.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("ARG ")?.trim();
        let value = rest.strip_prefix(name)?.strip_prefix('=')?.trim();
        (!value.is_empty()).then(|| value.to_owned())
    })
}

/// The base to build from: the Dockerfile's when it is stored or can be pulled, else the
/// stand-in (bootstrapped once, then reused).
fn base_image(builder: Builder, wanted: &str) -> anyhow::Result<String> {
    if builder.has_image(wanted) {
        return Ok(wanted.to_owned());
    }
    let mut pull = builder.command();
    pull.args(["pull", "--quiet", wanted]);
    let pull_error = match cmd::output(&mut pull) {
        Ok(_) => return Ok(wanted.to_owned()),
        Err(e) => e.to_string(),
    };
    let Some((suite, tag)) = debian_suite(wanted) else {
        bail!(
            "the base image {wanted} is not stored and cannot be pulled, and is no Debian \
             `<suite>[-slim]` image to bootstrap a stand-in for:\n{pull_error}"
        );
    };
    let stand_in = format!("{STAND_IN_REPOSITORY}:{tag}");
    // The first line of the pull's error says why (the registry's name does not resolve...).
    let why = pull_error
        .lines()
        .find(|l| l.starts_with("Error:"))
        .unwrap_or(pull_error.lines().last().unwrap_or(""));
    println!("image: {wanted} is not stored and cannot be pulled ({why})");
    if builder.has_image(&stand_in) {
        println!("image: using the stand-in {stand_in} bootstrapped earlier");
        return Ok(stand_in);
    }
    println!("image: bootstrapping {stand_in} from Debian's archive ({suite}, mmdebstrap)");
    bootstrap(builder, suite, &stand_in)?;
    Ok(stand_in)
}

/// `debian:bookworm-slim` (any registry) -> (`bookworm`, `bookworm-slim`).
fn debian_suite(image: &str) -> Option<(&str, &str)> {
    let (repository, tag) = image.rsplit_once(':')?;
    let name = repository.rsplit('/').next()?;
    if name != "debian" {
        return None;
    }
    let suite = tag.strip_suffix("-slim").unwrap_or(tag);
    let plain = !suite.is_empty() && suite.chars().all(|c| c.is_ascii_lowercase());
    plain.then_some((suite, tag))
}

/// A Debian minbase root file system as an image named `name`.
fn bootstrap(builder: Builder, suite: &str, name: &str) -> anyhow::Result<()> {
    let dir = workspace::target_dir()?.join("image");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tarball = dir.join(format!("{suite}.tar"));
    let mut debootstrap = Command::new("mmdebstrap");
    // Merged /usr set up by mmdebstrap's hook, not by the usrmerge package, which would pull
    // in perl (about 50 MB).
    debootstrap.args([
        "--variant=minbase",
        "--mode=root",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    ]);
    // What Debian's -slim images leave out (the copyright files stay).
    for option in [
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/info/*",
        "path-exclude=/usr/share/locale/*",
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
    ] {
        debootstrap.arg(format!("--dpkgopt={option}"));
    }
    debootstrap.arg(suite).arg(&tarball);
    cmd::run(&mut debootstrap)?;
    match builder {
        Builder::Podman => {
            let mut import = builder.command();
            import.args(["import", "--change", "CMD [\"bash\"]"]);
            import.arg(&tarball).arg(name);
            cmd::output(&mut import)?;
        }
        Builder::Buildah => {
            let container = cmd::output(builder.command().args(["from", "scratch"]))?;
            let container = container.trim();
            let made = cmd::run(
                builder
                    .command()
                    .args(["add", container])
                    .arg(&tarball)
                    .arg("/"),
            )
            .and_then(|()| {
                cmd::run(
                    builder
                        .command()
                        .args(["config", "--cmd", "bash", container]),
                )
            })
            .and_then(|()| {
                cmd::output(
                    builder
                        .command()
                        .args(["commit", "--quiet", container, name]),
                )
            });
            let removed = cmd::output(builder.command().args(["rm", container]));
            made?;
            removed?;
        }
    }
    fs::remove_file(&tarball).with_context(|| format!("removing {}", tarball.display()))?;
    Ok(())
}

/// Whether the host has local CA certificates for RUN steps to see.
fn has_local_cas() -> bool {
    fs::read_dir(LOCAL_CA_DIR).is_ok_and(|mut entries| entries.next().is_some())
}

/// Runs the image's agent (`agent --version`) in its own root file system, through a mount of
/// the image and chroot: no container runtime needed. Returns what it printed.
fn smoke_test(builder: Builder, image: &str) -> anyhow::Result<String> {
    let agent = "/usr/local/bin/agent";
    let version = match builder {
        Builder::Buildah => {
            let container = cmd::output(builder.command().args(["from", "--pull=never", image]))?;
            let container = container.trim();
            let result =
                cmd::output(builder.command().args(["mount", container])).and_then(|mount| {
                    cmd::output(
                        Command::new("chroot")
                            .arg(mount.trim())
                            .args([agent, "--version"]),
                    )
                });
            let removed = cmd::output(builder.command().args(["rm", container]));
            let version = result?;
            removed?;
            version
        }
        Builder::Podman => {
            let mount = cmd::output(builder.command().args(["image", "mount", image]))?;
            let result = cmd::output(
                Command::new("chroot")
                    .arg(mount.trim())
                    .args([agent, "--version"]),
            );
            let unmounted = cmd::output(builder.command().args(["image", "unmount", image]));
            let version = result?;
            unmounted?;
            version
        }
    };
    Ok(version.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dockerfile_names_its_debian_base() {
        let text = fs::read_to_string(workspace::root().join(DOCKERFILE)).unwrap();
        let base = default_arg(&text, BASE_ARG).expect("an ARG DEBIAN_IMAGE=... line");
        assert!(
            debian_suite(&base).is_some(),
            "{base}: a stand-in could not be bootstrapped for it"
        );
        assert!(
            text.contains(&format!("FROM ${{{BASE_ARG}}} AS build")),
            "the build stage starts from ${BASE_ARG}"
        );
    }

    #[test]
    fn debian_suites_are_read_from_image_names() {
        assert_eq!(
            debian_suite("docker.io/library/debian:bookworm-slim"),
            Some(("bookworm", "bookworm-slim"))
        );
        assert_eq!(debian_suite("debian:trixie"), Some(("trixie", "trixie")));
        assert_eq!(
            debian_suite("debian:12-slim"),
            None,
            "a version, not a suite"
        );
        assert_eq!(debian_suite("ubuntu:noble"), None);
        assert_eq!(debian_suite("debian"), None);
    }

    #[test]
    fn a_toolchain_date_is_read_from_its_channel_manifest() {
        let sysroot = std::env::temp_dir().join(format!("xtask-image-test-{}", std::process::id()));
        let rustlib = sysroot.join("lib/rustlib");
        fs::create_dir_all(&rustlib).unwrap();
        fs::write(
            rustlib.join("multirust-channel-manifest.toml"),
            "manifest-version = \"2\"\ndate = \"2026-05-20\"\n[pkg.cargo]\nversion = \"x\"\n",
        )
        .unwrap();
        let date = toolchain_date(&sysroot);
        fs::remove_dir_all(&sysroot).unwrap();
        assert_eq!(date.as_deref(), Some("2026-05-20"));
        assert_eq!(toolchain_date(Path::new("/nonexistent")), None);
    }

    #[test]
    fn the_dockerfile_takes_the_nightly_argument() {
        let text = fs::read_to_string(workspace::root().join(DOCKERFILE)).unwrap();
        assert!(
            text.lines()
                .any(|l| l.trim() == format!("ARG {NIGHTLY_ARG}=")),
            "the build stage declares ARG {NIGHTLY_ARG}= (empty: rustup's nightly of the day)"
        );
    }

    #[test]
    fn dockerfile_arg_defaults() {
        let text =
            "# x\nARG OTHER=1\nARG DEBIAN_IMAGE=debian:bookworm-slim\nFROM ${DEBIAN_IMAGE}\n";
        assert_eq!(
            default_arg(text, "DEBIAN_IMAGE").as_deref(),
            Some("debian:bookworm-slim")
        );
        assert_eq!(
            default_arg(text, "DEBIAN"),
            None,
            "a prefix is not the name"
        );
        assert_eq!(default_arg("ARG DEBIAN_IMAGE\n", "DEBIAN_IMAGE"), None);
    }
}
