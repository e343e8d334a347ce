//! Checks of `deploy/kubernetes`, both in `cargo xtask test`.
//!
//! [`validate`], offline: every document parses, names its kind, and the DaemonSet's
//! references (ServiceAccount, ConfigMap) exist; the policy inside each ConfigMap is valid,
//! read by the agent's own policy reader (`agent_common::policy`); each DaemonSet container
//! runs the image `cargo xtask image` builds, is unprivileged, drops ALL capabilities and adds
//! exactly those the systemd unit grants (`deploy/systemd/agent.service`), so the two
//! deployments cannot drift apart.
//!
//! [`validate_schemas`]: every manifest against the Kubernetes API's own schemas, with PyPI's
//! `kubernetes-validate` (it bundles them; installed once, pinned, in a virtual environment
//! under the project toolchain directory), strict: an unknown or misspelled field fails.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use agent_common::policy::{self, PolicyErrors};
use serde_json::Value;

use crate::{
    cmd::{self, CmdError},
    image,
    toolchain::Toolchain,
    workspace::{self, MetadataError},
};

const KUBERNETES_DIR: &str = "deploy/kubernetes";
const SYSTEMD_UNIT: &str = "deploy/systemd/agent.service";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("read {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {source}", .path.display())]
    Yaml {
        path: PathBuf,
        source: Box<serde_saphyr::Error>,
    },
    #[error("{}: document {doc}: missing {field}", .path.display())]
    Missing {
        path: PathBuf,
        doc: usize,
        field: &'static str,
    },
    #[error("DaemonSet {daemonset}: {what} {name} is not defined in {KUBERNETES_DIR}")]
    Dangling {
        daemonset: String,
        what: &'static str,
        name: String,
    },
    #[error("{SYSTEMD_UNIT}: {0}")]
    Unit(String),
    #[error(
        "DaemonSet {daemonset}, container {container}: image {found}, but `cargo xtask image` \
         builds {expected}"
    )]
    Image {
        daemonset: String,
        container: String,
        found: String,
        expected: String,
    },
    #[error("DaemonSet {daemonset}, container {container}: {what}")]
    Privilege {
        daemonset: String,
        container: String,
        what: String,
    },
    #[error("ConfigMap {configmap}, key {key}: the policy is invalid:\n{source}")]
    Policy {
        configmap: String,
        key: String,
        source: PolicyErrors,
    },
}

/// Every problem found, one per line.
#[derive(Debug)]
pub struct Problems(Vec<ManifestError>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in &self.0 {
            writeln!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

struct Object {
    kind: String,
    name: String,
    doc: Value,
}

pub fn validate() -> Result<(), Problems> {
    let mut problems = Vec::new();
    let objects = load(&workspace::root().join(KUBERNETES_DIR), &mut problems);
    check_references(&objects, &mut problems);
    check_images(&objects, &image::reference(), &mut problems);
    check_policies(&objects, &mut problems);
    let unit = workspace::root().join(SYSTEMD_UNIT);
    match fs::read_to_string(&unit) {
        Ok(text) => match unit_capabilities(&text) {
            Ok(caps) => check_capabilities(&objects, &caps, &mut problems),
            Err(e) => problems.push(e),
        },
        Err(source) => problems.push(ManifestError::Io { path: unit, source }),
    }
    if problems.is_empty() {
        println!("deploy manifests: {} objects valid", objects.len());
        Ok(())
    } else {
        Err(Problems(problems))
    }
}

fn load(dir: &Path, problems: &mut Vec<ManifestError>) -> Vec<Object> {
    let mut files = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect::<Vec<_>>(),
        Err(source) => {
            problems.push(ManifestError::Io {
                path: dir.to_owned(),
                source,
            });
            return Vec::new();
        }
    };
    files.sort();
    let mut objects = Vec::new();
    for path in files {
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(source) => {
                problems.push(ManifestError::Io { path, source });
                continue;
            }
        };
        let documents = match serde_saphyr::from_multiple::<Value>(&text) {
            Ok(documents) => documents,
            Err(source) => {
                problems.push(ManifestError::Yaml {
                    path,
                    source: Box::new(source),
                });
                continue;
            }
        };
        for (index, value) in documents.into_iter().enumerate() {
            if value.is_null() {
                continue; // an empty document, e.g. after a trailing `---`
            }
            match object(&path, index + 1, value) {
                Ok(object) => objects.push(object),
                Err(e) => problems.push(e),
            }
        }
    }
    objects
}

fn object(path: &Path, doc: usize, value: Value) -> Result<Object, ManifestError> {
    let missing = |field| ManifestError::Missing {
        path: path.to_owned(),
        doc,
        field,
    };
    value["apiVersion"]
        .as_str()
        .ok_or_else(|| missing("apiVersion"))?;
    let kind = value["kind"].as_str().ok_or_else(|| missing("kind"))?;
    let name = value["metadata"]["name"]
        .as_str()
        .ok_or_else(|| missing("metadata.name"))?;
    Ok(Object {
        kind: kind.to_owned(),
        name: name.to_owned(),
        doc: value,
    })
}

fn names<'a>(objects: &'a [Object], kind: &str) -> BTreeSet<&'a str> {
    objects
        .iter()
        .filter(|o| o.kind == kind)
        .map(|o| o.name.as_str())
        .collect()
}

fn check_references(objects: &[Object], problems: &mut Vec<ManifestError>) {
    let accounts = names(objects, "ServiceAccount");
    let configmaps = names(objects, "ConfigMap");
    for daemonset in objects.iter().filter(|o| o.kind == "DaemonSet") {
        let pod = &daemonset.doc["spec"]["template"]["spec"];
        let dangling = |what, name: &str| ManifestError::Dangling {
            daemonset: daemonset.name.clone(),
            what,
            name: name.to_owned(),
        };
        if let Some(account) = pod["serviceAccountName"].as_str()
            && !accounts.contains(account)
        {
            problems.push(dangling("ServiceAccount", account));
        }
        for volume in pod["volumes"].as_array().into_iter().flatten() {
            if let Some(configmap) = volume["configMap"]["name"].as_str()
                && !configmaps.contains(configmap)
            {
                problems.push(dangling("ConfigMap", configmap));
            }
        }
    }
}

/// Every DaemonSet container runs `image`.
fn check_images(objects: &[Object], image: &str, problems: &mut Vec<ManifestError>) {
    for daemonset in objects.iter().filter(|o| o.kind == "DaemonSet") {
        let containers = daemonset.doc["spec"]["template"]["spec"]["containers"].as_array();
        for container in containers.into_iter().flatten() {
            let found = container["image"].as_str().unwrap_or("(none)");
            if found != image {
                problems.push(ManifestError::Image {
                    daemonset: daemonset.name.clone(),
                    container: container["name"].as_str().unwrap_or("?").to_owned(),
                    found: found.to_owned(),
                    expected: image.to_owned(),
                });
            }
        }
    }
}

/// The capabilities of the unit's `CapabilityBoundingSet=`, without `CAP_`; its
/// `AmbientCapabilities=` must be the same.
fn unit_capabilities(unit: &str) -> Result<BTreeSet<String>, ManifestError> {
    let set = |key: &str| -> Result<BTreeSet<String>, ManifestError> {
        let line = unit
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .ok_or_else(|| ManifestError::Unit(format!("no {key} line")))?;
        Ok(line
            .split_whitespace()
            .map(|c| c.strip_prefix("CAP_").unwrap_or(c).to_owned())
            .collect())
    };
    let bounding = set("CapabilityBoundingSet=")?;
    let ambient = set("AmbientCapabilities=")?;
    if bounding != ambient {
        return Err(ManifestError::Unit(format!(
            "CapabilityBoundingSet {bounding:?} and AmbientCapabilities {ambient:?} differ"
        )));
    }
    Ok(bounding)
}

/// Every DaemonSet container: not privileged, drops ALL, adds exactly `caps`.
fn check_capabilities(
    objects: &[Object],
    caps: &BTreeSet<String>,
    problems: &mut Vec<ManifestError>,
) {
    for daemonset in objects.iter().filter(|o| o.kind == "DaemonSet") {
        let containers = daemonset.doc["spec"]["template"]["spec"]["containers"].as_array();
        for container in containers.into_iter().flatten() {
            let problem = |what: String| ManifestError::Privilege {
                daemonset: daemonset.name.clone(),
                container: container["name"].as_str().unwrap_or("?").to_owned(),
                what,
            };
            let context = &container["securityContext"];
            if context["privileged"].as_bool() == Some(true) {
                problems.push(problem("privileged: true instead of capabilities".into()));
            }
            let list = |key: &str| -> BTreeSet<String> {
                context["capabilities"][key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.as_str())
                    .map(|c| c.strip_prefix("CAP_").unwrap_or(c).to_owned())
                    .collect()
            };
            if !list("drop").contains("ALL") {
                problems.push(problem("capabilities.drop lacks ALL".into()));
            }
            let add = list("add");
            if add != *caps {
                problems.push(problem(format!(
                    "capabilities.add {add:?}, but {SYSTEMD_UNIT} grants {caps:?}"
                )));
            }
        }
    }
}

/// Reads every `*.yaml` key of every ConfigMap as a policy.
fn check_policies(objects: &[Object], problems: &mut Vec<ManifestError>) {
    for configmap in objects.iter().filter(|o| o.kind == "ConfigMap") {
        let Some(data) = configmap.doc["data"].as_object() else {
            continue;
        };
        for (key, value) in data {
            let Some(text) = value.as_str() else {
                continue;
            };
            if !(key.ends_with(".yaml") || key.ends_with(".yml")) {
                continue;
            }
            let name = format!("{KUBERNETES_DIR} ConfigMap {} key {key}", configmap.name);
            if let Err(source) = policy::load_str(text, &name) {
                problems.push(ManifestError::Policy {
                    configmap: configmap.name.clone(),
                    key: key.clone(),
                    source,
                });
            }
        }
    }
}

/// The validator's version, pinned: it decides the bundled schemas (its default Kubernetes
/// version is its own version's).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// Its virtual environment, under the project toolchain directory.
const KUBERNETES_VALIDATE_DIR: &str = "kubernetes-validate";

/// A DaemonSet the validator must refuse (a misspelled field): if it passes, the validator
/// checks nothing and the step fails rather than vouch for the real manifests.
const MUST_FAIL: &str = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: broken\n\
spec:\n  selector:\n    matchLabels: {app: x}\n  template:\n    metadata:\n      labels: {app: x}\n\
    spec:\n      hostNetwrk: true\n      containers:\n        - name: x\n          image: x\n";

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("{action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} does not report version {KUBERNETES_VALIDATE_VERSION} once installed", .0.display())]
    NotInstalled(PathBuf),
    #[error("no *.yaml in {KUBERNETES_DIR}")]
    NoManifests,
    #[error(
        "kubernetes-validate passed a DaemonSet with a misspelled field ({}): it validates \
         nothing, so its word on {KUBERNETES_DIR} is worth nothing",
        .0.display()
    )]
    PassedBroken(PathBuf),
    #[error("{}", .0.trim_end())]
    Invalid(String),
}

/// Installs the pinned kubernetes-validate when needed, makes sure it refuses a broken
/// manifest, then validates every manifest of [`KUBERNETES_DIR`] (strict). The failure names
/// each file and field it refused.
pub fn validate_schemas(toolchain: &Toolchain) -> Result<(), SchemaError> {
    let validator = kubernetes_validate(toolchain)?;
    let validate = |files: &[PathBuf]| {
        let mut command = Command::new(&validator);
        command.args(["--strict", "--no-warn"]).args(files);
        // It reports on stdout, one line per resource: the error carries them.
        let out = command.output().map_err(|source| CmdError::Spawn {
            cmd: cmd::describe(&command),
            source,
        })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        Ok::<_, SchemaError>((out.status.success(), text))
    };

    let scratch = workspace::target_dir()?.join("manifests");
    fs::create_dir_all(&scratch).map_err(|source| SchemaError::Io {
        action: "create",
        path: scratch.clone(),
        source,
    })?;
    let broken = scratch.join("must-fail-daemonset.yaml");
    fs::write(&broken, MUST_FAIL).map_err(|source| SchemaError::Io {
        action: "write",
        path: broken.clone(),
        source,
    })?;
    let (passed, _) = validate(std::slice::from_ref(&broken))?;
    if passed {
        return Err(SchemaError::PassedBroken(broken));
    }

    let dir = workspace::root().join(KUBERNETES_DIR);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(|source| SchemaError::Io {
            action: "read",
            path: dir.clone(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(SchemaError::NoManifests);
    }
    let (passed, text) = validate(&files)?;
    print!("{text}");
    if passed {
        Ok(())
    } else {
        Err(SchemaError::Invalid(
            text.lines()
                .filter(|l| !l.starts_with("INFO "))
                .collect::<Vec<_>>()
                .join("\n"),
        ))
    }
}

/// The pinned validator's executable, installed (a virtual environment, pip) when missing or
/// of another version.
fn kubernetes_validate(toolchain: &Toolchain) -> Result<PathBuf, SchemaError> {
    let venv = toolchain.root().join(KUBERNETES_VALIDATE_DIR);
    let bin = venv.join("bin").join("kubernetes-validate");
    let installed = || {
        cmd::output(Command::new(&bin).arg("--version"))
            .is_ok_and(|v| v.trim() == KUBERNETES_VALIDATE_VERSION)
    };
    let what = format!("kubernetes-validate {KUBERNETES_VALIDATE_VERSION}");
    if installed() {
        println!("deploy manifests: {what} at {} (installed)", bin.display());
        return Ok(bin);
    }
    let python = venv.join("bin").join("python3");
    if !python.exists() {
        cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    cmd::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )),
    )?;
    if !installed() {
        return Err(SchemaError::NotInstalled(bin));
    }
    println!("deploy manifests: installed {what} at {}", bin.display());
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_manifests_are_valid() {
        if let Err(problems) = validate() {
            panic!("{problems}");
        }
    }

    #[test]
    fn daemonset_capabilities_must_match_the_unit() {
        let unit = "[Service]\nCapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON\n\
                    AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON\n";
        let caps = unit_capabilities(unit).unwrap();
        assert_eq!(
            caps.iter().map(String::as_str).collect::<Vec<_>>(),
            ["BPF", "NET_ADMIN", "PERFMON"]
        );
        let ds = |context: &str| {
            let text = format!(
                "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: agent}}\nspec:\n  \
                 template:\n    spec:\n      containers:\n        - name: agent\n          \
                 securityContext: {context}\n"
            );
            let doc: Value = serde_saphyr::from_str(&text).unwrap();
            let objects = [object(Path::new("x.yaml"), 1, doc).unwrap()];
            let mut problems = Vec::new();
            check_capabilities(&objects, &caps, &mut problems);
            problems.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert!(
            ds("{capabilities: {drop: [ALL], add: [PERFMON, BPF, NET_ADMIN]}}").is_empty(),
            "same set, another order"
        );
        assert_eq!(
            ds(
                "{privileged: true, capabilities: {drop: [ALL], add: [BPF, NET_ADMIN, PERFMON, SYS_ADMIN]}}"
            ),
            [
                "DaemonSet agent, container agent: privileged: true instead of capabilities",
                "DaemonSet agent, container agent: capabilities.add {\"BPF\", \"NET_ADMIN\", \
                 \"PERFMON\", \"SYS_ADMIN\"}, but deploy/systemd/agent.service grants {\"BPF\", \
                 \"NET_ADMIN\", \"PERFMON\"}",
            ]
        );
        assert_eq!(
            ds("{capabilities: {add: [BPF, NET_ADMIN, PERFMON]}}"),
            ["DaemonSet agent, container agent: capabilities.drop lacks ALL"]
        );
        assert!(
            unit_capabilities("CapabilityBoundingSet=CAP_BPF\nAmbientCapabilities=\n")
                .unwrap_err()
                .to_string()
                .contains("differ")
        );
    }

    #[test]
    fn an_invalid_policy_in_a_configmap_is_reported_with_its_position() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p}\ndata:\n  \
                    policy.yaml: |\n    version: 2\n";
        let doc: Value = serde_saphyr::from_str(text).unwrap();
        let objects = [object(Path::new("x.yaml"), 1, doc).unwrap()];
        let mut problems = Vec::new();
        check_policies(&objects, &mut problems);
        let [ManifestError::Policy { source, .. }] = problems.as_slice() else {
            panic!("{problems:?}");
        };
        assert!(
            source
                .to_string()
                .contains(":1:10: version: unsupported version 2"),
            "{source}"
        );
    }

    #[test]
    fn daemonset_containers_must_run_the_built_image() {
        let ds = |image: &str| {
            let text = format!(
                "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: agent}}\nspec:\n  \
                 template:\n    spec:\n      containers:\n        - name: agent\n          \
                 image: {image}\n"
            );
            let doc: Value = serde_saphyr::from_str(&text).unwrap();
            let objects = [object(Path::new("x.yaml"), 1, doc).unwrap()];
            let mut problems = Vec::new();
            check_images(&objects, "localhost/agent:1.2.3", &mut problems);
            problems.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert!(ds("localhost/agent:1.2.3").is_empty());
        assert_eq!(
            ds("agent:1.2.3"),
            [
                "DaemonSet agent, container agent: image agent:1.2.3, but `cargo xtask image` \
              builds localhost/agent:1.2.3"
            ]
        );
    }
}
