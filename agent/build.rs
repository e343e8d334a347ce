//! Builds the eBPF object (`agent-ebpf`) through aya-build; `datapath` embeds it with
//! `include_bytes_aligned!`, so the agent is one binary with no path lookups.
//!
//! `AYA_BUILD_SKIP=1` keeps `cargo check`/`clippy` fast: an empty object is embedded, and
//! loading it fails with a clear error at run time.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

include!("../tests/build/root_cfg.rs");

fn main() -> anyhow::Result<()> {
    emit_root_cfg();
    // Read by agent-ebpf (`option_env!`): the variant build of the upgrade test.
    println!("cargo:rerun-if-env-changed=AGENT_EBPF_VARIANT");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let ebpf_dir = manifest_dir.join("../agent-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("agent-ebpf path is not UTF-8")?;

    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;

    for name in ["agent-ebpf", "bench-trivial"] {
        let object = out_dir.join(name);
        if !object.exists() {
            // Only reachable with AYA_BUILD_SKIP: aya-build built nothing.
            fs::write(&object, b"").context("writing the empty eBPF placeholder")?;
        }
    }
    Ok(())
}
