//! Where the workspace is, and cargo commands that run in it.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    cmd::{self, CmdError},
    toolchain::{NIGHTLY, Toolchain},
};

/// The end-to-end tests' package (tests/).
pub const E2E_CRATE: &str = "agent-tests";
/// How the end-to-end tests find the agent (tests/src/agent.rs).
pub const AGENT_BIN_ENV: &str = "AGENT_BIN";
/// How the upgrade test finds its "previous build" (tests/tests/survive.rs).
pub const UPGRADE_FROM_ENV: &str = "AGENT_UPGRADE_FROM_BIN";
/// Set at build time, agent-ebpf builds programs whose instructions differ (agent-ebpf/src/main.rs).
pub const EBPF_VARIANT_ENV: &str = "AGENT_EBPF_VARIANT";

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("`cargo metadata` printed invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("`cargo metadata` printed no target_directory")]
    NoTargetDirectory,
}

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one directory below the workspace root")
}

/// The cargo that runs xtask (cargo sets `CARGO` for `cargo run`), else the one on PATH.
fn cargo_program() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// `cargo` in the workspace root, with the project toolchain (`bpf-linker`) first on PATH.
pub fn cargo(toolchain: &Toolchain) -> Command {
    let mut command = Command::new(cargo_program());
    command
        .current_dir(root())
        .env("PATH", toolchain.path_env());
    command
}

/// `cargo` of the nightly toolchain (through rustup), set up like `cargo`: the eBPF crate
/// needs nightly features and `-Z build-std=core`.
pub fn nightly_cargo(toolchain: &Toolchain) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", NIGHTLY, "cargo"])
        .current_dir(root())
        .env("PATH", toolchain.path_env());
    command
}

/// The build directory, wherever `CARGO_TARGET_DIR` or config puts it.
pub fn target_dir() -> Result<PathBuf, MetadataError> {
    let mut command = Command::new(cargo_program());
    command
        .current_dir(root())
        .args(["metadata", "--format-version", "1", "--no-deps"]);
    let json: serde_json::Value = serde_json::from_str(&cmd::output(&mut command)?)?;
    json["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or(MetadataError::NoTargetDirectory)
}
