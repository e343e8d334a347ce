//! `cargo xtask build`, and the agent binary other commands run.

use std::{fs, path::PathBuf};

use crate::{
    cmd::{self, CmdError},
    setup,
    toolchain::Toolchain,
    workspace::{self, MetadataError},
};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("cargo built the agent but {} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("copying the agent to {}: {source}", .path.display())]
    Copy {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn run(release: bool) -> anyhow::Result<()> {
    let toolchain = setup::run()?;
    // Default members only: the host crates. agent/build.rs builds the eBPF object.
    let mut build = workspace::cargo(&toolchain);
    build.args(["build", "--all-targets"]);
    if release {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    Ok(())
}

/// Builds `-p agent` and returns the path of its binary.
pub fn agent_binary(toolchain: &Toolchain, release: bool) -> Result<PathBuf, BuildError> {
    let mut build = workspace::cargo(toolchain);
    build.args(["build", "--package", "agent", "--bin", "agent"]);
    if release {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    let profile = if release { "release" } else { "debug" };
    let bin = workspace::target_dir()?.join(profile).join("agent");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(BuildError::Missing(bin))
    }
}

/// The upgrade test's "previous build" (tests/tests/survive.rs): the release agent built with
/// `AGENT_EBPF_VARIANT=1` (an XDP program whose instructions differ), copied to
/// `<target>/upgrade-from/agent`; returns that path.
///
/// Built in the workspace's own target directory, so it reuses every dependency of the
/// release build; a target directory of its own would build them all again on CI's fresh
/// clone. What it costs is the agent crate and its eBPF object once more: agent/build.rs
/// reruns when the variable changes, here and again for the real build after it (27 s each
/// on 2 CPUs at the time of writing).
pub fn upgrade_from_binary(toolchain: &Toolchain) -> Result<PathBuf, BuildError> {
    let mut build = workspace::cargo(toolchain);
    build
        .args(["build", "--package", "agent", "--bin", "agent", "--release"])
        .env(workspace::EBPF_VARIANT_ENV, "1");
    cmd::run(&mut build)?;
    let target = workspace::target_dir()?;
    let built = target.join("release").join("agent");
    if !built.is_file() {
        return Err(BuildError::Missing(built));
    }
    let dir = target.join("upgrade-from");
    let bin = dir.join("agent");
    fs::create_dir_all(&dir)
        .and_then(|()| fs::copy(&built, &bin))
        .map_err(|source| BuildError::Copy {
            path: bin.clone(),
            source,
        })?;
    Ok(bin)
}
