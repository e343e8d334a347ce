//! What the agent leaves in the kernel (issue 10): its pins under `agent.pin_path`, the
//! programs, links and maps behind them as `bpftool` shows them (and, for what is left after
//! an uninstall, as the kernel's id lists hold them: [`live_ids`]), a guard that runs
//! `agent uninstall` whatever happens, and one-shot agent runs whose exit code and output a
//! test judges.
//!
//! `bpftool` is asked in JSON (`-j`) and only for what it prints the same way on every
//! version the suite meets: ids, `prog_id`, `map_ids`, `tag`, the `xdp` entries of
//! `bpftool net show`.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::agent::agent_bin;
use crate::netns::Netns;
use crate::timing::Scaled;

/// How long a one-shot agent run ([`run_agent`]) may take to exit on its own: it refuses
/// before it loads anything, but a wrong build might start serving instead.
pub const ONE_SHOT_EXIT: Scaled = Scaled::secs(20);
/// Interval of polling a one-shot run for its exit (a period, not a bound).
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Runs `bpftool -j ARGS` in `ns` (the root namespace when `None`) and parses its output.
/// Only the network namespace changes (no `ip netns exec`, which would hide the bpffs).
pub fn bpftool(ns: Option<&Netns>, args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new("bpftool");
    cmd.arg("-j")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match ns {
        Some(ns) => ns.spawn_process(&mut cmd)?,
        None => cmd
            .spawn()
            .context("spawning bpftool (Debian package `bpftool`)")?,
    };
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`bpftool -j {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text)
        .with_context(|| format!("`bpftool -j {}` printed no JSON: {text}", args.join(" ")))
}

/// Runs `bpftool ARGS` (not JSON: `link detach`, `map update`); an error with its output
/// unless it exits 0.
pub fn bpftool_do(args: &[&str]) -> Result<()> {
    let out = Command::new("bpftool")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("spawning bpftool")?;
    if !out.status.success() {
        bail!(
            "`bpftool {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn id_of(v: &Value, key: &str) -> Option<u32> {
    v.get(key)?.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// The id of the XDP program attached to `ifname` in `ns` (any mode), per
/// `bpftool net show dev IFNAME`; `None` when none is.
pub fn xdp_prog_id(ns: &Netns, ifname: &str) -> Result<Option<u32>> {
    let v = bpftool(Some(ns), &["net", "show", "dev", ifname])?;
    let entries = v.as_array().map(Vec::as_slice).unwrap_or_default();
    Ok(entries
        .iter()
        .filter_map(|e| e.get("xdp")?.as_array())
        .flatten()
        .find_map(|x| id_of(x, "id").or_else(|| id_of(x, "prog_id"))))
}

/// Every program id attached to `ifname` in `ns` (XDP and TC, links or not).
pub fn attached_prog_ids(ns: &Netns, ifname: &str) -> Result<BTreeSet<u32>> {
    let v = bpftool(Some(ns), &["net", "show", "dev", ifname])?;
    let mut ids = BTreeSet::new();
    for entry in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        for hook in ["xdp", "tc"] {
            for x in entry
                .get(hook)
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if let Some(id) = id_of(x, "id").or_else(|| id_of(x, "prog_id")) {
                    ids.insert(id);
                }
            }
        }
    }
    Ok(ids)
}

/// A bpf_link as `bpftool link show` has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
}

/// The link pinned at `path`.
pub fn pinned_link(path: &Path) -> Result<LinkInfo> {
    let p = path.to_str().context("pin path is not UTF-8")?;
    let v = bpftool(None, &["link", "show", "pinned", p])?;
    match (id_of(&v, "id"), id_of(&v, "prog_id")) {
        (Some(id), Some(prog_id)) => Ok(LinkInfo { id, prog_id }),
        _ => bail!("`bpftool link show pinned {p}` has no id and prog_id: {v}"),
    }
}

/// The tag (hash of the instructions) of program `id`: two builds whose programs differ have
/// different tags; loading the same build again keeps the tag and changes the id.
pub fn prog_tag(id: u32) -> Result<String> {
    let v = bpftool(None, &["prog", "show", "id", &id.to_string()])?;
    v.get("tag")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("`bpftool prog show id {id}` has no tag: {v}"))
}

/// The id of the map pinned at `path`.
pub fn pinned_map_id(path: &Path) -> Result<u32> {
    let p = path.to_str().context("pin path is not UTF-8")?;
    let v = bpftool(None, &["map", "show", "pinned", p])?;
    id_of(&v, "id").with_context(|| format!("`bpftool map show pinned {p}` has no id: {v}"))
}

/// Ids of everything of one agent instance, read from its pins.
#[derive(Clone, Debug, Default)]
pub struct Ours {
    pub maps: BTreeSet<u32>,
    pub links: BTreeSet<u32>,
    pub progs: BTreeSet<u32>,
}

impl Ours {
    /// The maps pinned under `pin_path` (`layout`, `maps/*`), the links pinned under
    /// `links/*`, and every loaded program that uses one of those maps or is a link's
    /// program (the tail-called stages too: they use the maps).
    pub fn read(pin_path: &Path) -> Result<Ours> {
        let mut ours = Ours::default();
        let layout = pin_path.join("layout");
        if layout.exists() {
            ours.maps.insert(pinned_map_id(&layout)?);
        }
        for entry in list(&pin_path.join("maps"))? {
            ours.maps.insert(pinned_map_id(&entry)?);
        }
        for entry in list(&pin_path.join("links"))? {
            let link = pinned_link(&entry)?;
            ours.links.insert(link.id);
            ours.progs.insert(link.prog_id);
        }
        for p in all("prog")? {
            let uses_ours = p
                .get("map_ids")
                .and_then(Value::as_array)
                .is_some_and(|ids| {
                    ids.iter()
                        .filter_map(Value::as_u64)
                        .any(|m| ours.maps.contains(&(m as u32)))
                });
            if uses_ours && let Some(id) = id_of(&p, "id") {
                ours.progs.insert(id);
            }
        }
        Ok(ours)
    }

    /// What of `self` the kernel still has: programs, links and maps by id.
    ///
    /// Read from the kernel's id lists ([`live_ids`]), never by opening an object: opening a
    /// program array by id after its last user reference closed can itself keep it alive
    /// for good (see [`live_ids`]), so the check would make the leak it looks for.
    pub fn still_loaded(&self) -> Result<Ours> {
        let live = |kind: IdKind, want: &BTreeSet<u32>| -> Result<BTreeSet<u32>> {
            Ok(live_ids(kind)?.intersection(want).copied().collect())
        };
        Ok(Ours {
            maps: live(IdKind::Map, &self.maps)?,
            links: live(IdKind::Link, &self.links)?,
            progs: live(IdKind::Prog, &self.progs)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty() && self.links.is_empty() && self.progs.is_empty()
    }
}

/// Which of the kernel's id lists [`live_ids`] walks.
#[derive(Clone, Copy, Debug)]
pub enum IdKind {
    Prog,
    Map,
    Link,
}

/// The ids of every program, map or link the kernel has, from `BPF_*_GET_NEXT_ID`, which
/// takes no reference and opens nothing (`bpftool KIND show` opens each object by id).
///
/// Why that matters, for maps: when a program array's last user reference (descriptor or
/// pin) goes, the kernel schedules a deferred clear of it that holds a reference until it
/// runs (`kernel/bpf/arraymap.c`, `prog_array_map_clear`: `bpf_map_inc` then
/// `schedule_work`). Opening the array by id in that window and closing it schedules the
/// clear again; while the first is still pending the second `schedule_work` does nothing,
/// so one reference is never put back and the empty array stays until reboot. Seen on
/// 6.18 (`bpftool map show` during `agent uninstall` left `STAGES_XDP`/`STAGES_TC`
/// behind in 3 of 4 runs) and reproduced without the agent (create a program array, close
/// it, reopen it by id, close: most of 500 stay on a busy machine).
pub fn live_ids(kind: IdKind) -> Result<BTreeSet<u32>> {
    // uapi/linux/bpf.h `enum bpf_cmd`.
    const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
    const BPF_MAP_GET_NEXT_ID: libc::c_long = 12;
    const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
    /// The `union bpf_attr` member these commands read: `start_id`, `next_id`, `open_flags`.
    #[repr(C)]
    #[derive(Default)]
    struct NextId {
        start_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let cmd = match kind {
        IdKind::Prog => BPF_PROG_GET_NEXT_ID,
        IdKind::Map => BPF_MAP_GET_NEXT_ID,
        IdKind::Link => BPF_LINK_GET_NEXT_ID,
    };
    let mut ids = BTreeSet::new();
    let mut attr = NextId::default();
    loop {
        // SAFETY: `attr` is a valid, writable `NextId` for the call, and the size passed is
        // its own; the kernel reads `start_id` and writes `next_id`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &mut attr as *mut NextId,
                std::mem::size_of::<NextId>(),
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(ids);
            }
            return Err(e).with_context(|| format!("bpf(GET_NEXT_ID) for {kind:?}s"));
        }
        ids.insert(attr.next_id);
        attr.start_id = attr.next_id;
    }
}

/// `bpftool KIND show`: every program, link or map the kernel has.
fn all(kind: &str) -> Result<Vec<Value>> {
    Ok(match bpftool(None, &[kind, "show"])? {
        Value::Array(v) => v,
        Value::Null => Vec::new(),
        other => bail!("`bpftool {kind} show` printed no list: {other}"),
    })
}

/// The entries of `dir`, sorted; none when it does not exist.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = rd
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    out.sort();
    Ok(out)
}

/// Everything below `dir`, recursively (what `ls -R` would show), as paths.
pub fn tree(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in list(dir)? {
        if p.is_dir() {
            out.extend(tree(&p)?);
        }
        out.push(p);
    }
    Ok(out)
}

/// How one agent command ended: its exit status and everything it printed.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub output: String,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `BIN ARGS` in `ns` until it exits, its output (stdout and stderr) in `log`. An agent
/// still running after [`ONE_SHOT_EXIT`] is killed and that is an error, with its output.
pub fn run_agent(bin: &Path, ns: &Netns, args: &[&str], log: &Path) -> Result<Outcome> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: prctl is async-signal-safe and touches only the child (as in AgentProcess).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = ns.spawn_process(&mut cmd)?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() >= ONE_SHOT_EXIT.get() {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`agent {}` still ran after {ONE_SHOT_EXIT} and was killed; its output:\n{}",
                args.join(" "),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(EXIT_POLL);
    };
    let output = std::fs::read_to_string(log).unwrap_or_default();
    Ok(Outcome { status, output })
}

/// Runs `agent uninstall --config CONFIG` in the policy's namespace when created and when
/// dropped, so a test leaves no pins, links or programs behind, also when it panics. Declare
/// it after the topology and before the agent: locals drop in reverse order, so the agent
/// stops first (uninstall refuses while an agent holds the pins), then this runs, then the
/// namespaces go.
#[derive(Debug)]
pub struct Uninstall {
    bin: PathBuf,
    ns: Netns,
    config: PathBuf,
    pin_path: PathBuf,
}

impl Uninstall {
    /// Removes what a crashed earlier run may have left at `pin_path`, then guards it.
    pub fn guard(ns: &Netns, config: &Path, pin_path: &Path) -> Result<Uninstall> {
        let guard = Uninstall {
            bin: agent_bin()?,
            ns: ns.handle(),
            config: config.to_owned(),
            pin_path: pin_path.to_owned(),
        };
        if pin_path.exists() {
            eprintln!(
                "{} exists before the test (a crashed earlier run?): uninstalling it",
                pin_path.display()
            );
            guard.run()?;
        }
        Ok(guard)
    }

    /// `agent uninstall --config CONFIG` now; an error unless it exits 0.
    pub fn run(&self) -> Result<Outcome> {
        let config = self.config.to_str().context("config path is not UTF-8")?;
        let log = self.config.with_extension("uninstall.log");
        let o = run_agent(
            &self.bin,
            &self.ns,
            &["uninstall", "--config", config],
            &log,
        )?;
        if !o.status.success() {
            bail!(
                "`agent uninstall --config {config}` exited {}:\n{}",
                o.status,
                o.output
            );
        }
        Ok(o)
    }
}

impl Drop for Uninstall {
    fn drop(&mut self) {
        if let Err(e) = self.run() {
            eprintln!("warning: {e:#}");
        }
        // Whatever uninstall did or not: no pins outlive the test (a pinned link or map goes
        // with its last reference).
        if self.pin_path.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.pin_path)
        {
            eprintln!("warning: removing {}: {e}", self.pin_path.display());
        }
    }
}
