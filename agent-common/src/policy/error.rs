//! Policy errors as users see them: `FILE:LINE:COLUMN: FIELD.PATH: message`, one a line.

use std::fmt;

/// One problem in a policy file. Lines and columns are 1-based; the position is the value the
/// message is about (for a missing field: the mapping that lacks it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {path}: {message}")]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Field path like `services[0].rate_limit.rate`; `(root)` for the document itself and
    /// `(file)` when the file could not be read.
    pub path: String,
    pub message: String,
}

/// Every problem found in a policy, in file order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<Diagnostic>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// The path as printed: the document itself has an empty path.
pub(crate) fn display_path(path: &str) -> String {
    if path.is_empty() {
        "(root)".into()
    } else {
        path.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_diagnostic() {
        let d = |line, message: &str| Diagnostic {
            file: "config/x.yaml".into(),
            line,
            column: 13,
            path: "services[0].rate_limit.rate".into(),
            message: message.into(),
        };
        let e = PolicyErrors(vec![d(9, "must be greater than 0"), d(10, "second")]);
        assert_eq!(
            e.to_string(),
            "config/x.yaml:9:13: services[0].rate_limit.rate: must be greater than 0\n\
             config/x.yaml:10:13: services[0].rate_limit.rate: second"
        );
    }
}
