//! The test executables a suite runs in the VM, as cargo builds them for the host: read from
//! `cargo test --no-run --message-format=json`, so the names and paths are cargo's own.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use crate::{
    cmd::{self, CmdError},
    toolchain::Toolchain,
    workspace,
};

/// One package's tests that a suite takes.
#[derive(Debug, Clone, Copy)]
pub struct PackageTests {
    pub package: &'static str,
    /// The package's directory in the workspace (where its Cargo.toml is).
    pub dir: &'static str,
    /// cargo target kinds: `test` (tests/*.rs), `lib` and `bin` (unit tests).
    pub kinds: &'static [&'static str],
}

#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("`cargo test --no-run` printed a line that is not JSON: {line}: {source}")]
    Json {
        line: String,
        source: serde_json::Error,
    },
    #[error("`cargo test --no-run` built no test executable of {0}")]
    Nothing(String),
}

/// A test executable and where cargo would run it from.
#[derive(Debug, Clone)]
pub struct TestBinary {
    /// Unique within a run: the target name, or `<target>-lib` / `<target>-bin` for unit tests.
    pub name: String,
    pub path: PathBuf,
    /// cargo runs tests in their package's directory; some read files relative to it.
    pub package_dir: PathBuf,
    /// A lib or bin target's own tests (not tests/*.rs).
    pub unit: bool,
}

#[derive(Debug, Default)]
pub struct Built {
    pub tests: Vec<TestBinary>,
    /// The packages' binaries (`agent`): tests run them at the path cargo compiled in
    /// (`CARGO_BIN_EXE_<name>`).
    pub bins: BTreeSet<PathBuf>,
}

/// Builds the tests of `sets` (one cargo invocation) and returns the executables.
pub fn build(
    toolchain: &Toolchain,
    sets: &[PackageTests],
    release: bool,
) -> Result<Built, BinariesError> {
    let mut cargo = workspace::cargo(toolchain);
    // Diagnostics rendered to stderr as usual; only artifact records on stdout.
    cargo.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for set in sets {
        cargo.args(["--package", set.package]);
    }
    if release {
        cargo.arg("--release");
    }
    let mut lines = Vec::new();
    cmd::run_with_stdout_lines(&mut cargo, |line| lines.push(line.to_owned()))?;
    let mut built = Built::default();
    for line in lines {
        let json: serde_json::Value =
            serde_json::from_str(&line).map_err(|source| BinariesError::Json {
                line: line.clone(),
                source,
            })?;
        take(&json, sets, workspace::root(), &mut built);
    }
    // cargo reports in build order, which varies; unit tests first, then by name.
    built.tests.sort_by_key(|t| (!t.unit, t.name.clone()));
    if built.tests.is_empty() {
        let names: Vec<&str> = sets.iter().map(|s| s.package).collect();
        return Err(BinariesError::Nothing(names.join(", ")));
    }
    Ok(built)
}

/// Adds one cargo message's executable to `built` if it belongs to `sets`.
fn take(json: &serde_json::Value, sets: &[PackageTests], root: &Path, built: &mut Built) {
    if json["reason"] != "compiler-artifact" {
        return;
    }
    let (Some(executable), Some(manifest)) =
        (json["executable"].as_str(), json["manifest_path"].as_str())
    else {
        return;
    };
    let package_dir = Path::new(manifest).parent().unwrap_or(root);
    let Some(set) = sets.iter().find(|s| root.join(s.dir) == package_dir) else {
        return;
    };
    let target = json["target"]["name"].as_str().unwrap_or("?");
    let kinds: Vec<&str> = json["target"]["kind"]
        .as_array()
        .map(|k| k.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let is_test = json["profile"]["test"].as_bool().unwrap_or(false);
    if !is_test {
        if kinds.contains(&"bin") {
            built.bins.insert(PathBuf::from(executable));
        }
        return;
    }
    let Some(kind) = kinds.iter().find(|k| set.kinds.contains(k)) else {
        return;
    };
    let mut name = match *kind {
        "test" => target.to_owned(),
        other => format!("{target}-{other}"),
    };
    if built.tests.iter().any(|t| t.name == name) {
        name = format!("{}-{name}", set.package);
    }
    built.tests.push(TestBinary {
        name,
        path: PathBuf::from(executable),
        package_dir: package_dir.to_owned(),
        unit: *kind != "test",
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_executables_of_the_chosen_kinds() {
        let sets = [PackageTests {
            package: "agent",
            dir: "agent",
            kinds: &["test", "lib"],
        }];
        let root = Path::new("/w");
        let mut built = Built::default();
        for line in [
            r#"{"reason":"compiler-artifact","manifest_path":"/w/agent/Cargo.toml","target":{"name":"datapath","kind":["test"]},"profile":{"test":true},"executable":"/w/target/debug/deps/datapath-1"}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/w/agent/Cargo.toml","target":{"name":"agent","kind":["lib"]},"profile":{"test":true},"executable":"/w/target/debug/deps/agent-2"}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/w/agent/Cargo.toml","target":{"name":"agent","kind":["bin"]},"profile":{"test":true},"executable":"/w/target/debug/deps/agent-3"}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/w/agent/Cargo.toml","target":{"name":"agent","kind":["bin"]},"profile":{"test":false},"executable":"/w/target/debug/agent"}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/w/tests/Cargo.toml","target":{"name":"lb","kind":["test"]},"profile":{"test":true},"executable":"/w/target/debug/deps/lb-4"}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/w/agent/Cargo.toml","target":{"name":"agent","kind":["lib"]},"profile":{"test":false},"executable":null}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ] {
            take(
                &serde_json::from_str(line).unwrap(),
                &sets,
                root,
                &mut built,
            );
        }
        let names: Vec<&str> = built.tests.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["datapath", "agent-lib"]);
        assert_eq!(built.tests[0].package_dir, Path::new("/w/agent"));
        assert_eq!(
            built.bins.iter().collect::<Vec<_>>(),
            [Path::new("/w/target/debug/agent")]
        );
    }
}
