//! Running external programs with errors that name the command line.

use std::{
    io,
    process::{Command, ExitStatus, Stdio},
};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot start `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd}` failed ({status}){}", fmt_stderr(.stderr))]
    Failed {
        cmd: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("`{cmd}` printed output that is not UTF-8")]
    NotUtf8 { cmd: String },
}

fn fmt_stderr(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!(":\n{stderr}")
    }
}

/// `program arg1 arg2`, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `Ok` for a zero exit, else the command and its status (its output went to the terminal).
fn succeeded(cmd: &Command, status: std::process::ExitStatus) -> Result<(), CmdError> {
    if status.success() {
        Ok(())
    } else {
        Err(CmdError::Failed {
            cmd: describe(cmd),
            status,
            stderr: String::new(),
        })
    }
}

/// Runs with inherited stdio (the user sees the output live); fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<(), CmdError> {
    let status = cmd.status().map_err(|source| CmdError::Spawn {
        cmd: describe(cmd),
        source,
    })?;
    succeeded(cmd, status)
}

/// Tests counted from `cargo test`'s `test result:` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestCounts {
    pub fn add(&mut self, other: TestCounts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }

    /// Parses `test result: ok. 5 passed; 0 failed; 1 ignored; ...`.
    pub fn parse(line: &str) -> Option<TestCounts> {
        let rest = line.trim().strip_prefix("test result: ")?;
        let mut counts = TestCounts::default();
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match kind {
                "passed" => counts.passed = n,
                "failed" => counts.failed = n,
                "ignored" => counts.ignored = n,
                _ => {}
            }
        }
        Some(counts)
    }
}

/// Runs `cargo test` with its stdout passed through line by line (stderr inherited), and
/// sums its `test result:` lines, failed runs included; the result fails on a non-zero exit.
pub fn run_tests(cmd: &mut Command) -> (TestCounts, Result<(), CmdError>) {
    let mut counts = TestCounts::default();
    let result = run_tests_into(cmd, &mut counts);
    (counts, result)
}

fn run_tests_into(cmd: &mut Command, counts: &mut TestCounts) -> Result<(), CmdError> {
    run_with_stdout_lines(cmd, |line| {
        println!("{line}");
        if let Some(c) = TestCounts::parse(line) {
            counts.add(c);
        }
    })
}

/// Runs with stdout piped to `on_line`, one line at a time as the program prints them (stderr
/// inherited, so progress and diagnostics stay live); fails on a non-zero exit.
pub fn run_with_stdout_lines(
    cmd: &mut Command,
    mut on_line: impl FnMut(&str),
) -> Result<(), CmdError> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| CmdError::Spawn {
            cmd: describe(cmd),
            source,
        })?;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            on_line(&line);
        }
    }
    let status = child.wait().map_err(|source| CmdError::Spawn {
        cmd: describe(cmd),
        source,
    })?;
    succeeded(cmd, status)
}

/// Runs quietly and returns stdout; on failure the error carries what the program printed.
pub fn output(cmd: &mut Command) -> Result<String, CmdError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CmdError::Spawn {
            cmd: describe(cmd),
            source,
        })?;
    if !out.status.success() {
        // Some tools report on stdout (e.g. `agent check`); keep whichever said something.
        let said = if out.stderr.iter().all(u8::is_ascii_whitespace) {
            &out.stdout
        } else {
            &out.stderr
        };
        return Err(CmdError::Failed {
            cmd: describe(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(said).into_owned(),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| CmdError::NotUtf8 { cmd: describe(cmd) })
}

#[cfg(test)]
mod count_tests {
    use super::TestCounts;

    #[test]
    fn parses_cargo_test_summaries() {
        let c = TestCounts::parse(
            "test result: ok. 5 passed; 2 failed; 1 ignored; 0 measured; 3 filtered out; finished in 0.1s",
        );
        assert_eq!(
            c,
            Some(TestCounts {
                passed: 5,
                failed: 2,
                ignored: 1
            })
        );
        assert_eq!(TestCounts::parse("running 5 tests"), None);
    }
}
