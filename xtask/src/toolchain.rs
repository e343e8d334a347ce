//! The project toolchain: the nightly Rust that builds the eBPF crate, and the project's own
//! tools (`bin/bpf-linker` and the libLLVM symlinks it links against) under one directory.
//! `setup` installs them; `workspace` runs cargo with them first on PATH.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
};

/// Overrides where bpf-linker is installed (default `$HOME/.local/share/agent-toolchain`).
const TOOLCHAIN_DIR_ENV: &str = "AGENT_TOOLCHAIN_DIR";
const TOOLCHAIN_DIR_UNDER_HOME: &str = ".local/share/agent-toolchain";
pub const NIGHTLY: &str = "nightly";

#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    #[error("neither {TOOLCHAIN_DIR_ENV} nor HOME is set: no place for the project toolchain")]
    NoToolchainDir,
    #[error("toolchain directory {} cannot go on PATH: {source}", .dir.display())]
    BadPath {
        dir: PathBuf,
        source: env::JoinPathsError,
    },
}

/// The project's own tools: `bin/bpf-linker` and the libLLVM symlinks it links against.
pub struct Toolchain {
    root: PathBuf,
    path_env: OsString,
}

impl Toolchain {
    pub fn locate() -> Result<Self, ToolchainError> {
        let root = match env::var_os(TOOLCHAIN_DIR_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => env::var_os("HOME")
                .filter(|home| !home.is_empty())
                .map(|home| PathBuf::from(home).join(TOOLCHAIN_DIR_UNDER_HOME))
                .ok_or(ToolchainError::NoToolchainDir)?,
        };
        let bin = root.join("bin");
        let inherited = env::var_os("PATH").unwrap_or_default();
        let path_env =
            env::join_paths(std::iter::once(bin.clone()).chain(env::split_paths(&inherited)))
                .map_err(|source| ToolchainError::BadPath { dir: bin, source })?;
        Ok(Self { root, path_env })
    }

    /// The directory everything is under (`cargo install --root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.root.join("bin")
    }

    /// `LLVM_PREFIX` for building bpf-linker: holds `lib/libLLVM.so*`.
    pub fn llvm_prefix(&self) -> PathBuf {
        self.root.join("llvm")
    }

    /// PATH for spawned cargo processes: the project toolchain first (aya-build looks up
    /// `bpf-linker` there).
    pub fn path_env(&self) -> &OsString {
        &self.path_env
    }
}
