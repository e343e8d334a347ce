//! What the datapath needs of the process's capabilities, said before anything is loaded.
//!
//! Without them the kernel answers EPERM or EACCES from somewhere deep in loading: aya says
//! "failed to create map `X`", or the verifier "refused" a program with no reason. The set
//! was found by running `agent run` on Linux 6.18 under `setpriv --bounding-set` with one
//! capability taken away at a time (`tests/tests/privilege.rs` runs it):
//! - without CAP_BPF, creating the first map fails (EPERM);
//! - without CAP_PERFMON, the verifier refuses `agent_xdp` with `R6 pointer -= pointer
//!   prohibited` (EACCES): the parsers' pointer arithmetic needs it;
//! - without CAP_NET_ADMIN, loading an XDP or TC program fails (EPERM), and every health probe
//!   fails too (SO_MARK), which would open the breaker of every healthy backend.
//!
//! CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as it does in the kernel
//! (`bpf_capable()`, `perfmon_capable()`), but not for CAP_NET_ADMIN: SO_MARK and rtnetlink
//! ask for CAP_NET_ADMIN itself. Nothing else is needed on the kernels the agent runs on
//! (5.12 and later): BPF memory is charged to the memory cgroup, not RLIMIT_MEMLOCK, so
//! CAP_SYS_RESOURCE is not.

use std::fmt;

/// A capability number (linux/capability.h).
pub type Cap = u32;

pub(crate) const CAP_NET_ADMIN: Cap = 12;
pub(crate) const CAP_SYS_ADMIN: Cap = 21;
pub(crate) const CAP_PERFMON: Cap = 38;
pub(crate) const CAP_BPF: Cap = 39;

/// Each capability loading needs, and what for.
pub(crate) const NEEDED: [(Cap, &str); 3] = [
    (CAP_BPF, "to create maps and load programs"),
    (
        CAP_NET_ADMIN,
        "to load and attach XDP and TC programs, and to mark probes",
    ),
    (
        CAP_PERFMON,
        "for the verifier to accept the programs' pointer arithmetic",
    ),
];

/// Names of capabilities 0 to 40 (linux/capability.h), as `capsh --print` spells them.
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The name of capability `cap` (`CAP_41` and so on past the ones this build knows).
pub(crate) fn name(cap: Cap) -> String {
    NAMES
        .get(cap as usize)
        .map_or_else(|| format!("CAP_{cap}"), |n| (*n).to_owned())
}

/// A set of capabilities, as the `Cap*` lines of /proc/PID/status give it (a bit per
/// capability).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities(pub(crate) u64);

impl Capabilities {
    /// The effective set of this process (`CapEff` of /proc/self/status); `None` when it
    /// cannot be read (no /proc).
    pub(crate) fn effective() -> Option<Self> {
        Self::from_status(&std::fs::read_to_string("/proc/self/status").ok()?)
    }

    /// The `CapEff` line of the text of a /proc/PID/status.
    pub(crate) fn from_status(status: &str) -> Option<Self> {
        let hex = status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))?
            .trim();
        u64::from_str_radix(hex, 16).ok().map(Self)
    }

    pub(crate) fn has(self, cap: Cap) -> bool {
        cap < 64 && self.0 & (1 << cap) != 0
    }

    /// Whether the kernel grants what `cap` grants: CAP_SYS_ADMIN stands in for CAP_BPF and
    /// CAP_PERFMON (`bpf_capable()`, `perfmon_capable()`).
    fn grants(self, cap: Cap) -> bool {
        self.has(cap) || (matches!(cap, CAP_BPF | CAP_PERFMON) && self.has(CAP_SYS_ADMIN))
    }
}

impl fmt::Display for Capabilities {
    /// The names, in number order, comma-separated; `none` for the empty set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = (0..64).filter(|&c| self.has(c)).map(name).collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

/// The process lacks capabilities that loading the datapath needs.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "loading eBPF needs {needed}; this process lacks {lacks}; it has: {has}. Run the agent as \
     root with at least these (deploy/systemd/agent.service and \
     deploy/kubernetes/03-daemonset.yaml grant exactly them); nothing was loaded",
    needed = needed(),
    lacks = self.lacks(),
    has = self.has
)]
pub struct MissingCapabilities {
    /// What the process lacks, in [`NEEDED`] order.
    pub missing: Vec<Cap>,
    /// The process's effective set.
    pub has: Capabilities,
}

impl MissingCapabilities {
    /// `CAP_BPF (to create maps ...) and CAP_PERFMON (...)`.
    fn lacks(&self) -> String {
        let each: Vec<String> = self
            .missing
            .iter()
            .map(|&cap| {
                let why = NEEDED
                    .iter()
                    .find(|(c, _)| *c == cap)
                    .map_or("", |(_, why)| why);
                format!("{} ({why})", name(cap))
            })
            .collect();
        join_and(&each)
    }
}

/// `CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON`.
fn needed() -> String {
    let names: Vec<String> = NEEDED.iter().map(|&(cap, _)| name(cap)).collect();
    join_and(&names)
}

fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// `Err` naming what `caps` lacks of what loading the datapath needs.
pub(crate) fn check(caps: Capabilities) -> Result<(), MissingCapabilities> {
    let missing: Vec<Cap> = NEEDED
        .iter()
        .map(|&(cap, _)| cap)
        .filter(|&cap| !caps.grants(cap))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingCapabilities { missing, has: caps })
    }
}

/// [`check`] on this process's effective set; `Ok` when the set cannot be read (loading then
/// says what the kernel refused).
pub(crate) fn check_this_process() -> Result<(), MissingCapabilities> {
    Capabilities::effective().map_or(Ok(()), check)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP_CHECKPOINT_RESTORE: Cap = 40;

    fn set(caps: &[Cap]) -> Capabilities {
        Capabilities(caps.iter().fold(0, |bits, &c| bits | 1 << c))
    }

    /// /proc/self/status of a process under `setpriv --bounding-set=-all,+net_admin,+perfmon`
    /// (as uid 0), cut to the lines around the capabilities.
    const STATUS: &str = "Name:\tagent\nUmask:\t0022\nState:\tR (running)\n\
                          CapInh:\t0000000000000000\nCapPrm:\t0000004000001000\n\
                          CapEff:\t0000004000001000\nCapBnd:\t0000004000001000\n\
                          CapAmb:\t0000000000000000\nNoNewPrivs:\t0\n";

    #[test]
    fn the_effective_set_is_read_from_proc_status() {
        let caps = Capabilities::from_status(STATUS).expect("a CapEff line");
        assert_eq!(caps, set(&[CAP_NET_ADMIN, CAP_PERFMON]));
        assert_eq!(caps.to_string(), "CAP_NET_ADMIN, CAP_PERFMON");
        assert_eq!(Capabilities::from_status("Name:\tagent\n"), None);
        assert_eq!(Capabilities::from_status("CapEff:\tzz\n"), None);
        // Root in this sandbox: everything but CAP_SYS_RESOURCE (bit 24).
        let root = Capabilities::from_status("CapEff:\t000001fffeffffff\n").unwrap();
        assert!(root.has(CAP_BPF) && root.has(CAP_CHECKPOINT_RESTORE) && !root.has(24));
        assert_eq!(Capabilities(0).to_string(), "none");
        assert_eq!(set(&[41]).to_string(), "CAP_41");
        // This test process: readable wherever the tests run.
        assert!(Capabilities::effective().is_some());
    }

    #[test]
    fn the_three_are_enough_and_each_is_needed() {
        assert_eq!(check(set(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON])), Ok(()));
        for (cap, _) in NEEDED {
            let rest: Vec<Cap> = NEEDED
                .iter()
                .map(|&(c, _)| c)
                .filter(|&c| c != cap)
                .collect();
            let err = check(set(&rest)).unwrap_err();
            assert_eq!(err.missing, vec![cap], "without {}", name(cap));
        }
        // Root with every capability.
        assert_eq!(check(Capabilities(u64::MAX)), Ok(()));
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_but_not_net_admin() {
        assert_eq!(check(set(&[CAP_SYS_ADMIN, CAP_NET_ADMIN])), Ok(()));
        let err = check(set(&[CAP_SYS_ADMIN])).unwrap_err();
        assert_eq!(err.missing, vec![CAP_NET_ADMIN]);
    }

    #[test]
    fn the_message_says_what_is_needed_what_lacks_and_what_the_process_has() {
        let err = check(set(&[CAP_NET_ADMIN, CAP_PERFMON])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "loading eBPF needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; this process lacks \
             CAP_BPF (to create maps and load programs); it has: CAP_NET_ADMIN, CAP_PERFMON. \
             Run the agent as root with at least these (deploy/systemd/agent.service and \
             deploy/kubernetes/03-daemonset.yaml grant exactly them); nothing was loaded"
        );
        let err = check(Capabilities(0)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(
                "lacks CAP_BPF (to create maps and load programs), CAP_NET_ADMIN (to load and \
                 attach XDP and TC programs, and to mark probes) and CAP_PERFMON (for the \
                 verifier to accept the programs' pointer arithmetic); it has: none."
            ),
            "{text}"
        );
    }
}
