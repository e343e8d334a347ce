//! BENCHMARKS.md: each benchmark command owns one `## ` section of it and replaces only that
//! one (breaker-bench, `cargo xtask bench scale` and `health`, `cargo xtask vm`).

use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

/// The `q` quantile (0 to 1) of `v` by nearest rank; zero for none.
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Replaces, in the Markdown file at `path`, the section headed by `section`'s first line (up
/// to the next `## ` heading or the end), or appends it; the other sections stay as they are.
/// Creates the file if needed.
pub fn write_section(path: &Path, section: &str) -> std::io::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
        other => other?,
    };
    std::fs::write(path, splice(&old, section))
}

/// `old` with the section headed by `section`'s first line replaced by `section`, or with
/// `section` appended.
pub fn splice(old: &str, section: &str) -> String {
    let section = section.trim_end();
    let heading = section.lines().next().unwrap_or_default();
    let mut lines = old.lines();
    let mut before: Vec<&str> = lines.by_ref().take_while(|l| *l != heading).collect();
    let after: Vec<&str> = lines.skip_while(|l| !l.starts_with("## ")).collect();
    while before.last().is_some_and(|l| l.trim().is_empty()) {
        before.pop();
    }
    let mut text = before.join("\n");
    if !text.is_empty() {
        text.push_str("\n\n");
    }
    text.push_str(section);
    text.push('\n');
    if !after.is_empty() {
        text.push('\n');
        text.push_str(&after.join("\n"));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(5));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(10));
        assert_eq!(quantile(&v, 0.0), Duration::from_millis(1));
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn a_section_is_appended_then_replaced_in_place_and_others_kept() {
        let s1 = "## Mine\n\nfirst\n";
        let s2 = "## Mine\n\nsecond\n";
        let base = "# Benchmarks\n\n## XDP\n\ntable\n";
        let once = splice(base, s1);
        assert_eq!(once, format!("{base}\n{s1}"));
        assert_eq!(splice(&once, s1), once, "idempotent");
        assert_eq!(splice(&once, s2), format!("{base}\n{s2}"));
        let middle = format!("{base}\n{s1}\n## Later\n\nmore\n");
        assert_eq!(
            splice(&middle, s2),
            format!("{base}\n{s2}\n## Later\n\nmore\n")
        );
        assert_eq!(splice("", s1), s1);
        assert_eq!(
            splice("# B\n", "## Mine\n\nx\n\n\n"),
            "# B\n\n## Mine\n\nx\n"
        );
    }
}
