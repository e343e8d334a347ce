//! The policy (POLICY.md): read, validate, compile.
//!
//! ```text
//! YAML text --yaml--> tree with positions --sections/resilience--> typed parts (local checks)
//!           --validate--> cross checks --> Policy --compile--> map entries (agent-common)
//! ```
//!
//! Every error of a file is reported at once, each as `FILE:LINE:COLUMN: FIELD.PATH: message`
//! (`agent check`), in file order. A `Policy` is only ever built from a file without errors,
//! so code reading it never re-checks what validation guarantees.

mod balance;
mod compile;
mod decode;
mod error;
pub mod model;
pub mod net;
mod resilience;
mod sections;
pub mod units;
mod validate;
mod yaml;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

pub use balance::{CompiledLb, LbBackendPlan};
pub use compile::{
    ClassifyEntry, Compiled, CompiledBackend, CompiledService, backend_key, compile,
    compile_backends,
};
pub use error::{Diagnostic, PolicyErrors};
pub use model::*;

use decode::Cx;
use error::display_path;
use model::Source;
use yaml::SpanIndex;

/// Reads, parses and validates a policy file. An unreadable file is one diagnostic at 1:1
/// with the path `(file)`. The file name in messages is `path` as given.
pub fn load_file(path: &Path) -> Result<Policy, PolicyErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(src) => load_str(&src, &file),
        Err(e) => {
            let message = if e.kind() == std::io::ErrorKind::InvalidData {
                "the file is not valid UTF-8".to_owned()
            } else {
                format!("cannot read the policy: {e}")
            };
            Err(PolicyErrors(vec![Diagnostic {
                file,
                line: 1,
                column: 1,
                path: "(file)".into(),
                message,
            }]))
        }
    }
}

/// Parses and validates policy text; `file_name` is what messages call the file.
pub fn load_str(src: &str, file_name: &str) -> Result<Policy, PolicyErrors> {
    let root = yaml::parse(src).map_err(|e| {
        PolicyErrors(vec![Diagnostic {
            file: file_name.to_owned(),
            line: e.pos.line,
            column: e.pos.column,
            path: display_path(&e.path),
            message: format!("YAML syntax error: {}", e.message),
        }])
    })?;
    let spans = SpanIndex::build(&root);
    let mut cx = Cx::new(file_name);
    let draft = sections::policy(&mut cx, &root);
    validate::check(&draft, &spans, &mut cx);
    let complete = draft.complete();
    let mut diags = cx.diags;
    if diags.is_empty() && complete.is_none() {
        // A part failed without saying why: a bug here, reported rather than hidden.
        diags.push(Diagnostic {
            file: file_name.to_owned(),
            line: 1,
            column: 1,
            path: "(root)".into(),
            message: "the policy could not be read (internal error)".into(),
        });
    }
    match complete {
        Some((version, agent, interfaces, services)) if diags.is_empty() => Ok(Policy {
            version,
            agent,
            interfaces,
            services,
            source: Arc::new(Source {
                file: file_name.to_owned(),
                spans,
            }),
        }),
        _ => {
            diags.sort_by_key(|d| (d.line, d.column));
            Err(PolicyErrors(diags))
        }
    }
}

impl Policy {
    /// A diagnostic about a field of this valid policy, found wrong at run time (e.g.
    /// `interfaces[0].name`, "interface \"eth9\" does not exist"), at the field's position in
    /// the file it was loaded from (or its closest enclosing field that is in the file).
    pub fn error_at(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        let pos = self.source.spans.lookup(path);
        Diagnostic {
            file: self.source.file.clone(),
            line: pos.line,
            column: pos.column,
            path: display_path(path),
            message: message.into(),
        }
    }

    /// The file name the policy was loaded under.
    pub fn file_name(&self) -> &str {
        &self.source.file
    }
}
