//! The policy (POLICY.md): read and validated, for the agent, xtask and the tests alike.
//!
//! ```text
//! YAML text --read (serde-saphyr)--> model.rs types + every wrong value, with positions
//!           --validate--> required fields, rules within and across sections --> Policy
//! ```
//!
//! Every error of a file is reported at once, each as `FILE:LINE:COLUMN: FIELD.PATH: message`
//! (`agent check`), in file order. A `Policy` is only ever built from a file without errors,
//! so code reading it never re-checks what validation guarantees. Compiling a policy into
//! map entries is the agent's (`agent::config`).
//!
//! Reading has two implementations. The reference reader (read.rs) finds every error and says
//! where; it parses the text twice. A file that reads without errors, the common case and the
//! one a reload waits for, is read in one pass (tree.rs) into the same policy and index, and
//! validated as the reference reader's would be; any other goes to the reference reader, so
//! every error of reading is reported from there.

pub mod companion;
mod error;
pub mod model;
pub mod net;
mod read;
pub mod rules;
mod tree;
pub mod units;
mod validate;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

pub use error::{Diagnostic, PolicyErrors};
pub use model::*;

use error::display_path;
use model::Source;
use read::Pos;
use validate::Checker;

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
            Err(one(&file, Pos::START, "(file)", message))
        }
    }
}

fn one(file: &str, pos: Pos, path: &str, message: String) -> PolicyErrors {
    PolicyErrors(vec![Diagnostic {
        file: file.to_owned(),
        line: pos.line,
        column: pos.column,
        path: display_path(path),
        message,
    }])
}

/// Parses and validates policy text; `file_name` is what messages call the file.
pub fn load_str(src: &str, file_name: &str) -> Result<Policy, PolicyErrors> {
    // A file that reads without errors, the common case, is read in one pass (tree.rs) and
    // validated as the reference reader would validate it; any other is read again by the
    // reference reader, which reports every error of it.
    let Some((mut policy, index)) = tree::read(src) else {
        return load_str_reference(src, file_name);
    };
    let mut c = Checker::new(file_name, &index);
    validate::check(&mut policy, &mut c);
    let diags = c.diags;
    finish(Some(policy), index, diags, file_name)
}

/// `load_str` by the reference reader alone (read.rs): two passes through serde-saphyr, every
/// error of the file.
fn load_str_reference(src: &str, file_name: &str) -> Result<Policy, PolicyErrors> {
    let index = match read::index(src) {
        Ok(Some(index)) => index,
        Ok(None) => {
            let msg = "the file is empty; a policy needs version, interfaces and services";
            return Err(one(file_name, Pos::START, "", msg.into()));
        }
        Err(e) => {
            let msg = format!("YAML syntax error: {}", e.message);
            return Err(one(file_name, e.pos, &e.path, msg));
        }
    };
    let read::Read {
        policy,
        wrong,
        stopped,
    } = read::read_policy(src, &index);
    let mut c = Checker::new(file_name, &index);
    for (pos, path, first) in &index.duplicates {
        let key = path.rsplit('.').next().unwrap_or_default();
        c.error_at(
            *pos,
            path,
            format!("duplicate field `{key}` (first at line {first})"),
        );
    }
    let reverse = index.reverse();
    for (pos, message) in wrong {
        let path = reverse.value_at(pos).unwrap_or_default().to_owned();
        c.error_at(index.lookup(&path), &path, message);
    }
    if let Some((pos, path, message)) = stopped {
        c.error_at(pos, &path, message);
    }
    let mut policy = policy;
    if let Some(p) = &mut policy {
        validate::check(p, &mut c);
    }
    let diags = c.diags;
    finish(policy, index, diags, file_name)
}

/// The policy read from `file_name` if nothing is wrong with it, else every error in file
/// order.
fn finish(
    policy: Option<Policy>,
    index: read::Index,
    mut diags: Vec<Diagnostic>,
    file_name: &str,
) -> Result<Policy, PolicyErrors> {
    match policy {
        Some(mut p) if diags.is_empty() => {
            p.add_companions();
            p.source = Arc::new(Source {
                file: file_name.to_owned(),
                spans: index,
            });
            Ok(p)
        }
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
