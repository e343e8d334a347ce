//! Offline checks of `deploy/kubernetes`: every document parses, names its kind, and the
//! DaemonSet's references (ServiceAccount, ConfigMap) exist; the policy inside each ConfigMap
//! passes `agent check`. Cheap and without network, so it runs in `cargo xtask test`.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize as _;
use serde_yaml::Value;

use crate::{
    cmd::{self, CmdError},
    workspace::{self, MetadataError},
};

const KUBERNETES_DIR: &str = "deploy/kubernetes";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("read {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: document {doc}: {source}", .path.display())]
    Yaml {
        path: PathBuf,
        doc: usize,
        source: serde_yaml::Error,
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
    #[error("ConfigMap {configmap}, key {key}: `agent check` rejects the policy: {source}")]
    Policy {
        configmap: String,
        key: String,
        source: CmdError,
    },
    #[error(transparent)]
    Metadata(#[from] MetadataError),
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

pub fn validate(agent: Option<&Path>) -> Result<(), Problems> {
    let mut problems = Vec::new();
    let objects = load(&workspace::root().join(KUBERNETES_DIR), &mut problems);
    check_references(&objects, &mut problems);
    match agent {
        Some(agent) => check_policies(agent, &objects, &mut problems),
        None => println!("deploy manifests: no agent binary, policies not checked"),
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
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let doc = index + 1;
            match Value::deserialize(document) {
                Ok(Value::Null) => {} // empty document, e.g. after a trailing `---`
                Ok(value) => match object(&path, doc, value) {
                    Ok(object) => objects.push(object),
                    Err(e) => problems.push(e),
                },
                Err(source) => problems.push(ManifestError::Yaml {
                    path: path.clone(),
                    doc,
                    source,
                }),
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
        for volume in pod["volumes"].as_sequence().into_iter().flatten() {
            if let Some(configmap) = volume["configMap"]["name"].as_str()
                && !configmaps.contains(configmap)
            {
                problems.push(dangling("ConfigMap", configmap));
            }
        }
    }
}

/// Runs `agent check` on every `*.yaml` key of every ConfigMap.
fn check_policies(agent: &Path, objects: &[Object], problems: &mut Vec<ManifestError>) {
    let dir = match workspace::target_dir() {
        Ok(target) => target.join("xtask").join("deploy-policies"),
        Err(e) => return problems.push(e.into()),
    };
    if let Err(source) = fs::create_dir_all(&dir) {
        return problems.push(ManifestError::Io { path: dir, source });
    }
    for configmap in objects.iter().filter(|o| o.kind == "ConfigMap") {
        let Some(data) = configmap.doc["data"].as_mapping() else {
            continue;
        };
        for (key, value) in data {
            let (Some(key), Some(policy)) = (key.as_str(), value.as_str()) else {
                continue;
            };
            if !(key.ends_with(".yaml") || key.ends_with(".yml")) {
                continue;
            }
            let file = dir.join(format!("{}-{key}", configmap.name));
            if let Err(source) = fs::write(&file, policy) {
                problems.push(ManifestError::Io { path: file, source });
                continue;
            }
            if let Err(source) = cmd::output(Command::new(agent).arg("check").arg(&file)) {
                problems.push(ManifestError::Policy {
                    configmap: configmap.name.clone(),
                    key: key.to_owned(),
                    source,
                });
            }
        }
    }
}
