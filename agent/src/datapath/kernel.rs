//! What the running kernel offers the datapath, said before anything is loaded, and a
//! verifier refusal said in one line instead of the verifier's whole log.

use std::fmt;

use aya::util::KernelVersion;

/// The oldest kernel the datapath loads on: its token buckets and breaker quotas use the
/// value BPF's atomic compare-and-exchange returns (BPF ISA v3, Linux 5.12).
pub const MIN_KERNEL: (u8, u8) = (5, 12);

/// The node's memory in bytes (`MemTotal` of /proc/meminfo), what `agent.tables.connections:
/// auto` follows; `None` if it cannot be read.
pub fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The running kernel's version, as aya reads it (`uname`, or Debian and Ubuntu's own
/// version files where `uname` lies).
#[derive(Clone, Copy, Debug)]
pub struct Kernel(Option<KernelVersion>);

impl Kernel {
    pub fn current() -> Self {
        Self(KernelVersion::current().ok())
    }

    /// `Err` with the reason when the datapath cannot run here. A version that cannot be read
    /// is let through: loading then says what is missing.
    pub fn check(self) -> Result<(), String> {
        let (major, minor) = MIN_KERNEL;
        match self.0 {
            Some(v) if v < KernelVersion::new(major, minor, 0) => Err(format!(
                "kernel {v} is too old: the datapath needs {major}.{minor} or later (BPF atomic \
                 compare-and-exchange, used by the token buckets and breaker quotas)"
            )),
            _ => Ok(()),
        }
    }

    /// Whether TC programs attach as TCX links (6.6 and later).
    pub fn has_tcx(self) -> bool {
        self.0.is_none_or(|v| v >= KernelVersion::new(6, 6, 0))
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("(version unknown)"),
        }
    }
}

/// The line of a verifier log that says why a program was refused: the last one before the
/// statistics the kernel appends (`verification time`, `stack depth`, `processed N insns`).
pub fn refusal_reason(log: &str) -> &str {
    const STATS: [&str; 3] = ["verification time", "stack depth", "processed "];
    log.lines()
        .map(str::trim)
        .rev()
        .find(|line| !line.is_empty() && !STATS.iter().any(|s| line.starts_with(s)))
        .unwrap_or("(the verifier gave no reason)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_is_the_last_line_before_the_statistics() {
        let log = "0: R1=ctx() R10=fp0\n; let pkt = ctx.packet();\n\
                   combined stack size of 3 calls is 544. Too large\n\
                   verification time 1234 usec\n\
                   stack depth 176+136+0+112+56+200+176\n\
                   processed 627387 insns (limit 1000000) max_states_per_insn 4\n\n";
        assert_eq!(
            refusal_reason(log),
            "combined stack size of 3 calls is 544. Too large"
        );
        assert_eq!(refusal_reason(""), "(the verifier gave no reason)");
    }

    #[test]
    fn kernels_before_5_12_are_refused_and_tcx_starts_at_6_6() {
        let k = |a, b, c| Kernel(Some(KernelVersion::new(a, b, c)));
        let old = k(5, 10, 0).check().unwrap_err();
        assert!(old.contains("5.10.0") && old.contains("5.12"), "{old}");
        assert!(k(5, 12, 0).check().is_ok());
        assert!(Kernel(None).check().is_ok());
        assert!(!k(6, 1, 0).has_tcx());
        assert!(k(6, 6, 0).has_tcx() && k(6, 12, 57).has_tcx());
    }
}
