//! `cargo xtask build`, and the agent binary other commands run.

use std::path::PathBuf;

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
