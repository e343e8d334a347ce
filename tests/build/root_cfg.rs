// Shared by the build scripts of `agent` and `agent-tests` (`include!`d): decides whether the
// tests that need root (BPF programs, network namespaces, veth) are compiled to run or to be
// reported as ignored with their reason. `cargo xtask test` runs as root, so CI runs them all;
// a contributor's plain `cargo test` as an ordinary user runs the host tests and lists the
// others as "ignored, needs root".
//
// `AGENT_TEST_ROOT=1` or `=0` overrides the detection (e.g. to see the non-root view as root).

/// Emits `cfg(root)` when the tests that need root should run.
fn emit_root_cfg() {
    println!("cargo::rustc-check-cfg=cfg(root)");
    println!("cargo::rerun-if-env-changed=AGENT_TEST_ROOT");
    // sudo and su change USER: rebuild when the user does.
    println!("cargo::rerun-if-env-changed=USER");
    let root = match std::env::var("AGENT_TEST_ROOT").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => effective_uid() == Some(0),
    };
    if root {
        println!("cargo::rustc-cfg=root");
    } else {
        println!(
            "cargo::warning=not root: the tests that need BPF and network namespaces are \
             compiled as ignored (\"needs root\"); `cargo xtask test` runs everything as root"
        );
    }
}

/// The build script's effective user id, from /proc (no libc in build-dependencies).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Uid: real effective saved filesystem
    line.split_whitespace().nth(2)?.parse().ok()
}
