//! Reading what the VM's test run printed on its second serial port: the init script's
//! `@@vm` markers around each test binary, and libtest's plain output in between.

use std::time::{Duration, Instant};

use crate::cmd::TestCounts;

/// Lines the init script prints; everything else is the test binaries'.
pub const MARK: &str = "@@vm ";
/// Lines of a failure's own output kept for the report.
const FAILURE_LINES: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Ignored,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // As libtest prints them.
        f.write_str(match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "FAILED",
            Outcome::Ignored => "ignored",
        })
    }
}

impl Outcome {
    fn parse(word: &str) -> Option<Self> {
        match word.split([',', ' ']).next()? {
            "ok" => Some(Outcome::Ok),
            "FAILED" => Some(Outcome::Failed),
            "ignored" => Some(Outcome::Ignored),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TestRun {
    pub name: String,
    pub outcome: Outcome,
    /// From the end of the test before (tests run one at a time) to this one's verdict, as
    /// seen on the host.
    pub took: Duration,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub test: String,
    pub lines: Vec<String>,
}

/// One test binary's run in the VM.
#[derive(Debug, Clone)]
pub struct BinaryRun {
    pub name: String,
    /// Guest uptime (seconds) at its start and end.
    pub started: f64,
    pub ended: Option<f64>,
    pub exit: Option<i32>,
    /// From libtest's `test result:` line; `None` when it printed none (crashed, killed).
    pub summary: Option<TestCounts>,
    pub tests: Vec<TestRun>,
    pub failures: Vec<Failure>,
    /// A test that started and has no verdict yet.
    pub running: Option<String>,
    section: Section,
    last_mark: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Tests,
    FailureOutput,
    FailureList,
}

impl BinaryRun {
    pub fn duration(&self) -> Option<f64> {
        self.ended.map(|end| end - self.started)
    }

    /// Counts for the report. A binary that ended without a summary, or failed with a
    /// summary that shows no failure, counts one failure more: its crash or kill.
    pub fn counts(&self) -> TestCounts {
        let mut counts = self.summary.unwrap_or_else(|| {
            let n = |o| self.tests.iter().filter(|t| t.outcome == o).count() as u64;
            TestCounts {
                passed: n(Outcome::Ok),
                failed: n(Outcome::Failed),
                ignored: n(Outcome::Ignored),
            }
        });
        if self.abnormal_end().is_some() {
            counts.failed += 1;
        }
        counts
    }

    /// Why this binary's end is a failure that libtest did not count, if it is.
    pub fn abnormal_end(&self) -> Option<String> {
        let during = match &self.running {
            Some(test) => format!(" during {test}"),
            None => String::new(),
        };
        match (self.exit, &self.summary) {
            (None, _) => Some(format!("did not finish: the VM stopped{during}")),
            (Some(137), None) => Some(format!(
                "killed (SIGKILL: --binary-timeout, or the OOM killer){during}"
            )),
            (Some(code), None) => Some(format!("exited with {code} before its summary{during}")),
            (Some(code), Some(s)) if code != 0 && s.failed == 0 => Some(format!(
                "exited with {code} after a summary with no failure"
            )),
            _ => None,
        }
    }
}

/// Something worth a progress line.
#[derive(Debug)]
pub enum Event<'a> {
    Booted { uptime: f64 },
    Test { binary: &'a str, test: &'a TestRun },
    BinaryDone { run: &'a BinaryRun },
    Note(String),
}

/// Everything read so far from one VM's test port.
#[derive(Debug, Default)]
pub struct Transcript {
    pending: Vec<u8>,
    pub booted: Option<f64>,
    pub done: Option<f64>,
    pub binaries: Vec<BinaryRun>,
    /// `@@vm note` lines: modules that did not load and the like.
    pub notes: Vec<String>,
    current: Option<usize>,
}

impl Transcript {
    /// Feeds bytes as they arrive; `on_event` sees each finished test and binary.
    pub fn feed(&mut self, bytes: &[u8], now: Instant, on_event: &mut dyn FnMut(Event<'_>)) {
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            self.line(line.trim_end_matches(['\n', '\r']), now, on_event);
        }
    }

    /// What is left once the VM has stopped: a last line without a newline.
    pub fn finish(&mut self, now: Instant, on_event: &mut dyn FnMut(Event<'_>)) {
        if !self.pending.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
            self.line(rest.trim_end_matches('\r'), now, on_event);
        }
    }

    fn line(&mut self, line: &str, now: Instant, on_event: &mut dyn FnMut(Event<'_>)) {
        let line = line.trim_start_matches('\r');
        // A killed binary leaves `test x ... ` unfinished, and the marker lands behind it.
        if let Some(at) = line.find(MARK) {
            if at > 0 {
                self.output(&line[..at], now, on_event);
            }
            self.mark(&line[at + MARK.len()..], now, on_event);
        } else {
            self.output(line, now, on_event);
        }
    }

    fn mark(&mut self, mark: &str, now: Instant, on_event: &mut dyn FnMut(Event<'_>)) {
        let words: Vec<&str> = mark.split_whitespace().collect();
        let uptime = |i: usize| words.get(i).and_then(|w| w.parse::<f64>().ok());
        match words.first().copied() {
            Some("boot") => {
                self.booted = uptime(1);
                on_event(Event::Booted {
                    uptime: self.booted.unwrap_or_default(),
                });
            }
            Some("begin") => {
                self.binaries.push(BinaryRun {
                    name: words.get(1).copied().unwrap_or("?").to_owned(),
                    started: uptime(2).unwrap_or_default(),
                    ended: None,
                    exit: None,
                    summary: None,
                    tests: Vec::new(),
                    failures: Vec::new(),
                    running: None,
                    section: Section::Tests,
                    last_mark: now,
                });
                self.current = Some(self.binaries.len() - 1);
            }
            Some("end") => {
                if let Some(run) = self.current.take().map(|i| &mut self.binaries[i]) {
                    run.exit = words.get(2).and_then(|w| w.parse().ok());
                    run.ended = uptime(3);
                    on_event(Event::BinaryDone { run });
                }
            }
            Some("done") => self.done = uptime(1).or(Some(0.0)),
            Some("note") => {
                let note = mark.trim_start()["note".len()..].trim().to_owned();
                self.notes.push(note.clone());
                on_event(Event::Note(note));
            }
            _ => {}
        }
    }

    fn output(&mut self, line: &str, now: Instant, on_event: &mut dyn FnMut(Event<'_>)) {
        let Some(run) = self.current.map(|i| &mut self.binaries[i]) else {
            return;
        };
        if let Some(counts) = TestCounts::parse(line) {
            let mut total = run.summary.unwrap_or_default();
            total.add(counts);
            run.summary = Some(total);
            return;
        }
        if line == "failures:" {
            run.section = match run.section {
                Section::Tests => Section::FailureOutput,
                _ => Section::FailureList,
            };
            return;
        }
        match run.section {
            Section::Tests => {}
            Section::FailureOutput => {
                if let Some(test) = line
                    .strip_prefix("---- ")
                    .and_then(|l| l.strip_suffix(" stdout ----"))
                {
                    run.failures.push(Failure {
                        test: test.to_owned(),
                        lines: Vec::new(),
                    });
                } else if let Some(failure) = run.failures.last_mut()
                    && failure.lines.len() < FAILURE_LINES
                    && !line.trim().is_empty()
                {
                    failure.lines.push(line.to_owned());
                }
                return;
            }
            Section::FailureList => return,
        }
        // `test NAME ... ok`; with output of another thread or a child in between, the verdict
        // may come on a later line of its own.
        let verdict = if let Some(rest) = line.strip_prefix("test ") {
            match rest.split_once(" ... ") {
                Some((name, word)) => match Outcome::parse(word.trim()) {
                    Some(outcome) => Some((name.to_owned(), outcome)),
                    None => {
                        run.running = Some(name.to_owned());
                        None
                    }
                },
                None => rest
                    .strip_suffix(" ...")
                    .map(|name| run.running = Some(name.to_owned()))
                    .and(None),
            }
        } else {
            let word = line.trim();
            match (Outcome::parse(word), &run.running) {
                (Some(outcome), Some(name)) if word.len() <= "ignored".len() => {
                    Some((name.clone(), outcome))
                }
                _ => None,
            }
        };
        if let Some((name, outcome)) = verdict {
            run.running = None;
            let took = now.saturating_duration_since(run.last_mark);
            run.last_mark = now;
            run.tests.push(TestRun {
                name,
                outcome,
                took,
            });
            let binary = &run.name;
            if let Some(test) = run.tests.last() {
                on_event(Event::Test { binary, test });
            }
        }
    }

    pub fn counts(&self) -> TestCounts {
        let mut total = TestCounts::default();
        for run in &self.binaries {
            total.add(run.counts());
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Transcript {
        let mut t = Transcript::default();
        let now = Instant::now();
        t.feed(text.as_bytes(), now, &mut |_| {});
        t.finish(now, &mut |_| {});
        t
    }

    #[test]
    fn reads_a_run_with_a_failure() {
        let t = read(
            "\r\n@@vm boot 3.20\r\n@@vm begin datapath 3.50\r\n\nrunning 3 tests\n\
             test a ... ok\ntest b ... FAILED\ntest c ... ignored, needs root\n\n\
             failures:\n\n---- b stdout ----\nthread 'b' panicked at x.rs:1:2:\n\
             combined stack size of 3 calls is 544. Too large\n\nfailures:\n    b\n\n\
             test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out\n\
             @@vm end datapath 101 20.25\n@@vm done 20.30\n",
        );
        assert_eq!(t.booted, Some(3.2));
        assert_eq!(t.done, Some(20.3));
        let run = &t.binaries[0];
        assert_eq!(run.exit, Some(101));
        assert_eq!(run.duration(), Some(16.75));
        assert_eq!(run.tests.len(), 3);
        assert_eq!(run.tests[2].outcome, Outcome::Ignored);
        assert_eq!(run.failures.len(), 1);
        assert_eq!(run.failures[0].test, "b");
        assert_eq!(
            run.failures[0].lines[1],
            "combined stack size of 3 calls is 544. Too large"
        );
        assert_eq!(
            t.counts(),
            TestCounts {
                passed: 1,
                failed: 1,
                ignored: 1
            }
        );
        assert!(run.abnormal_end().is_none());
    }

    #[test]
    fn a_killed_binary_counts_as_a_failure_naming_its_test() {
        let t = read(
            "@@vm begin e2e 1.0\nrunning 2 tests\ntest fast ... ok\n\
             test hangs ... @@vm end e2e 137 99.0\n@@vm done 99.1\n",
        );
        let run = &t.binaries[0];
        assert_eq!(run.running.as_deref(), Some("hangs"));
        assert_eq!(
            run.counts(),
            TestCounts {
                passed: 1,
                failed: 1,
                ignored: 0
            }
        );
        assert!(run.abnormal_end().unwrap().contains("during hangs"));
    }

    #[test]
    fn a_verdict_after_interleaved_output_still_counts() {
        let t = read(
            "@@vm begin x 0\ntest slow ... warning: from a child\nok\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             @@vm end x 0 1\n",
        );
        assert_eq!(t.binaries[0].tests.len(), 1);
        assert_eq!(t.binaries[0].tests[0].name, "slow");
    }

    #[test]
    fn a_vm_that_stopped_mid_binary_is_unfinished() {
        let t = read("@@vm boot 1\n@@vm begin x 2\ntest a ... ");
        assert!(t.done.is_none());
        let run = t.binaries.last().unwrap();
        assert!(run.exit.is_none());
        assert_eq!(run.running.as_deref(), Some("a"));
        assert_eq!(run.counts().failed, 1);
    }
}
