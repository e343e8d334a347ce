//! Offline checks of `deploy/kubernetes`: every document parses, names its kind, and the
//! DaemonSet's references (ServiceAccount, ConfigMap) exist; the policy inside each ConfigMap
//! is valid, read by the agent's own policy reader (`agent_common::policy`). Cheap and without
//! network, so it runs in `cargo xtask test`.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    path::{Path, PathBuf},
};

use agent_common::policy::{self, PolicyErrors};
use serde_json::Value;

use crate::workspace;

const KUBERNETES_DIR: &str = "deploy/kubernetes";

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
    check_policies(&objects, &mut problems);
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
}
