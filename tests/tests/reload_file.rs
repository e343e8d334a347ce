//! End-to-end tests of the policy file watch (issue 11): the agent runs in a server namespace
//! with XDP on its veth and one rate-limited UDP service; each test changes its policy file
//! the way people and tools do, and checks the outcome within [`FILE_RELOAD`] (2 s, the
//! issue's bound) of the change:
//!
//! | test | the change | the outcome |
//! |---|---|---|
//! | `broken_yaml_is_reported_and_the_running_policy_stays` | YAML syntax error, written in place | `invalid`, `FILE:8:6: ... YAML syntax error` in status, the metric, the rate unchanged; then fixed: applied |
//! | `a_bad_value_is_reported_and_the_datapath_keeps_the_old_rate` | `rate: 0/s`, in place | `invalid` with the exact error; packets still limited at the old rate |
//! | `a_deleted_file_is_reported_and_its_return_reloads` | `rm`, then written again | `missing` naming the file, policy unchanged; then applied |
//! | `an_editor_write_and_rename_reloads` | a new file renamed over; a backup rename then a write | applied each time, nothing reported missing |
//! | `a_configmap_symlink_swap_reloads_and_the_datapath_follows` | a new `..data` symlink renamed over the old | applied; packets limited at the old rate before and the new one after |
//! | `a_half_written_file_is_invalid_and_the_finished_one_applies` | half a file, a pause, the rest | `invalid` (the half), then applied |
//!
//! The applied policy is read from `/status` (the service's rate-limit summary and the
//! policy generation, which moves on every applied reload); the datapath, in two tests, by
//! flooding the service at 5x its limit and counting what got through (burst + rate x span
//! ± 3%, as `ratelimit.rs` does).
//!
//! As root, serially, with the agent built: `cargo xtask test`, or
//! `AGENT_BIN=target/release/agent cargo test -p agent-tests --test reload_file --
//! --test-threads=1`.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agent_tests::status::ReloadStatus;
use agent_tests::timing::{self, FILE_RELOAD};
use agent_tests::wait::poll;
use agent_tests::{
    AgentProcess, KeyCount, TempDir, Topology, UdpFlood, UdpReceiver, UdpSender, agent_bin,
    check_counts, require_metric,
};

const SERVICE: &str = "limited";
const PORT: u16 = 5300;
/// Rates before and after a change; the burst is a fifth of a second of each.
const RATE_BEFORE: u64 = 2_000;
const RATE_AFTER: u64 = 500;
/// How often the status is polled while waiting for an outcome (a period, not a bound).
const POLL: Duration = Duration::from_millis(10);
/// One flood that measures a rate: 5x the limit, for this long.
const FLOOD: Duration = Duration::from_secs(2);
const OVERLOAD: f64 = 5.0;
/// ±3% of burst + rate x span, as the rate-limit tests.
const TOLERANCE: f64 = 0.03;
/// A run that reached less than this share of its offered rate tested another load.
const MIN_ON_SCHEDULE: f64 = 0.97;

fn require_agent() {
    if let Err(e) = agent_bin() {
        panic!("{e:#}");
    }
}

/// The policy: the server veth, ingress, one UDP service limited per flow at `rate`/s.
fn policy(topo: &Topology, pin: &str, rate: u64) -> String {
    format!(
        "version: 1
agent:
  listen: 127.0.0.1:9090
  pin_path: {pin}
  log_level: info
interfaces:
  - name: {ifname}
    xdp_mode: generic
    direction: ingress
services:
  - name: {SERVICE}
    match:
      address: {addr}/32
      port: {PORT}
      protocol: udp
    rate_limit:
      key: flow
      rate: {rate}/s
      burst: {burst}
      max_keys: 1024
",
        ifname = topo.server_if,
        addr = topo.server_v4,
        burst = burst(rate),
    )
}

fn burst(rate: u64) -> u64 {
    rate / 5
}

/// What `agent status` says of the service's limit at `rate`.
fn summary(rate: u64) -> String {
    format!("flow {rate}/s burst {}", burst(rate))
}

/// `(line, column)`, from 1, where `needle` first starts in `text`.
fn position(text: &str, needle: &str) -> (usize, usize) {
    text.lines()
        .enumerate()
        .find_map(|(i, l)| l.find(needle).map(|c| (i + 1, c + 1)))
        .unwrap_or_else(|| panic!("{needle:?} not in the policy"))
}

/// A topology, an agent on the server veth running `policy(RATE_BEFORE)` from `file` (in
/// `dir`), and what the test needs to change it.
struct Lab {
    // Field order is drop order: the agent before the namespaces and its files.
    agent: AgentProcess,
    topo: Topology,
    _dir: TempDir,
    pin: String,
    /// The path the agent was given.
    file: PathBuf,
}

impl Lab {
    /// The agent on a plain file `policy.yaml`.
    fn new() -> Lab {
        Lab::with(|dir, text| {
            let file = dir.join("policy.yaml");
            std::fs::write(&file, text).expect("policy");
            file
        })
    }

    /// The agent on the file `place` puts the policy text in (under the directory given).
    fn with(place: impl FnOnce(&Path, &str) -> PathBuf) -> Lab {
        require_agent();
        let topo = Topology::new().expect("topology");
        let dir = TempDir::new().expect("temp dir");
        static N: AtomicU32 = AtomicU32::new(0);
        // A pin path of its own: never another agent's maps.
        let pin = format!(
            "/sys/fs/bpf/agt-{}-reload-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let file = place(dir.path(), &policy(&topo, &pin, RATE_BEFORE));
        let agent = AgentProcess::start(&topo.server, &file).expect("agent start");
        let lab = Lab {
            agent,
            topo,
            _dir: dir,
            pin,
            file,
        };
        let s = lab.reloads();
        assert_eq!(
            (s.generation, s.count),
            (0, 0),
            "a fresh agent: generation 0, no reloads"
        );
        assert_eq!(lab.limit(), summary(RATE_BEFORE));
        lab
    }

    fn text(&self, rate: u64) -> String {
        policy(&self.topo, &self.pin, rate)
    }

    fn reloads(&self) -> ReloadStatus {
        self.agent.status().expect("GET /status").reload
    }

    /// The service's rate limit as `agent status` shows it.
    fn limit(&self) -> String {
        let status = self.agent.status().expect("GET /status");
        let svc = status
            .services
            .iter()
            .find(|s| s.name == SERVICE)
            .unwrap_or_else(|| panic!("no service {SERVICE} in {status:?}"));
        svc.rate_limit
            .as_ref()
            .map(|r| r.summary.clone())
            .unwrap_or_default()
    }

    /// Polls the status from `since` (the change) until `done` holds on its reload block;
    /// panics naming `what` and the last block seen once [`FILE_RELOAD`] has passed.
    fn wait(
        &self,
        what: &str,
        since: Instant,
        done: impl FnMut(&ReloadStatus) -> bool,
    ) -> ReloadStatus {
        match poll(since, FILE_RELOAD, POLL, || self.reloads(), done) {
            Ok((took, s)) => {
                eprintln!("{what}: after {took:?}");
                s
            }
            Err(last) => panic!(
                "{what}: not within {FILE_RELOAD} of the change; the status's reload block: \
                 {last:#?}\nthe agent's output:\n{}",
                self.agent.log_text()
            ),
        }
    }

    /// Waits for the policy at `rate` to be in force: the generation past `generation`, the
    /// limit in the status.
    fn wait_applied(&self, what: &str, since: Instant, generation: u64, rate: u64) {
        let s = self.wait(what, since, |s| s.generation > generation);
        let last = s.last.as_ref().expect("a reload");
        assert_eq!(
            (last.result.as_str(), last.trigger.as_str()),
            ("ok", "file"),
            "{what}: {s:#?}"
        );
        assert_eq!(self.limit(), summary(rate), "{what}: the applied limit");
    }

    /// The latest reload was `invalid` with exactly `error`, the policy generation is still
    /// `generation` and the limit still `rate`'s; `/metrics` agrees.
    fn check_invalid(&self, what: &str, s: &ReloadStatus, error: &str, generation: u64, rate: u64) {
        let last = s.last.as_ref().expect("a reload");
        assert_eq!(
            (last.result.as_str(), last.trigger.as_str()),
            ("invalid", "file"),
            "{what}: {s:#?}"
        );
        assert_eq!(last.error.as_deref(), Some(error), "{what}: the error");
        assert_eq!(s.last_failure.as_ref(), Some(last), "{what}");
        assert_eq!(s.generation, generation, "{what}: nothing applied");
        assert_eq!(self.limit(), summary(rate), "{what}: the running limit");
        let metrics = self.agent.metrics().expect("GET /metrics");
        let invalid = require_metric(&metrics, "agent_reload_total", &[("result", "invalid")])
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(invalid as u64, s.results["invalid"], "{what}: the metric");
        assert!(
            invalid >= 1.0,
            "{what}: agent_reload_total{{result=\"invalid\"}} {invalid}"
        );
        assert_eq!(
            require_metric(&metrics, "agent_policy_generation", &[]).expect("generation"),
            generation as f64,
            "{what}"
        );
        assert_eq!(
            require_metric(&metrics, "agent_reload_last_success", &[]).expect("last success"),
            0.0,
            "{what}"
        );
    }

    /// Floods the service from source port `port` (a flow key of its own, its bucket full
    /// at its first packet) at 5x `rate` and checks that burst + rate x span got through.
    fn check_rate(&self, what: &str, port: u16, rate: u64) {
        let dst = SocketAddr::new(IpAddr::V4(self.topo.server_v4), PORT);
        let src = IpAddr::V4(self.topo.client_v4);
        let rx = UdpReceiver::start(&self.topo.server, dst).expect("receiver");
        let spec = UdpFlood {
            base_port: port,
            ..UdpFlood::new(dst, src, 1, rate as f64 * OVERLOAD, FLOOD)
        };
        let sent = UdpSender::new(&self.topo.client, spec)
            .expect("sender")
            .run()
            .expect("send");
        let got = rx.finish().expect("receive");
        if let Err(e) = sent.ensure_on_schedule(MIN_ON_SCHEDULE) {
            panic!("{what}: {e:#}");
        }
        assert_eq!(
            got.socket_drops, 0,
            "{what}: the receiver's socket dropped packets"
        );
        let burst_time = Duration::from_secs_f64(burst(rate) as f64 / rate as f64);
        timing::require(sent.max_lag < burst_time, || {
            format!(
                "{what}: the sender stalled for {:?}, longer than burst/rate = {burst_time:?}",
                sent.max_lag
            )
        });
        let f = &sent.flows[0];
        let count = KeyCount::limited(
            f.src.to_string(),
            f.sent,
            f.span(),
            rate as f64,
            burst(rate) as f64,
            got.from(&f.src),
        );
        eprintln!(
            "{what}: sent {} at {:.0} pps, received {} (expected {:.0})",
            f.sent, sent.achieved_pps, count.got, count.expected
        );
        if let Err(e) = check_counts(what, &[count], TOLERANCE) {
            panic!("{e:#}");
        }
    }

    /// The agent said which trigger it reloaded on.
    fn check_logged_file_trigger(&self) {
        let log = self.agent.log_text();
        assert!(
            log.contains(&format!(
                "policy file changed: reloading {}",
                self.file.display()
            )),
            "the log does not name the file change as the trigger:\n{log}"
        );
    }
}

/// Replaces `file` the way editors and atomic writers do: a new file beside it, renamed over.
fn write_rename(file: &Path, text: &str) {
    let tmp = file.with_extension("yaml.new");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, file).expect("rename");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn broken_yaml_is_reported_and_the_running_policy_stays() {
    let lab = Lab::new();
    // The `port` line one space short: a syntax error at its line, column 6.
    let good = lab.text(RATE_AFTER);
    let broken = good.replacen("      port:", "     port:", 1);
    let (line, _) = position(&broken, "     port:");
    let error = format!(
        "{}:{line}:6: services[0]: YAML syntax error: while parsing a block mapping, did not \
         find expected key",
        lab.file.display()
    );
    // In place, as `echo > file` or an editor without a backup: the watch may read it
    // half-written first (an invalid outcome too); the last outcome is the broken file's.
    let since = Instant::now();
    std::fs::write(&lab.file, &broken).expect("write");
    let s = lab.wait("the broken file reported", since, |s| {
        s.last.as_ref().and_then(|l| l.error.as_deref()) == Some(error.as_str())
    });
    lab.check_invalid("broken YAML", &s, &error, 0, RATE_BEFORE);
    lab.check_logged_file_trigger();
    let status = lab
        .agent
        .command(&["status", "--addr", &lab.agent.listen().to_string()])
        .expect("agent status");
    assert!(
        status.contains(&format!("  {error}")),
        "`agent status` does not show the error:\n{status}"
    );

    // Fixed: applied.
    let since = Instant::now();
    std::fs::write(&lab.file, &good).expect("write");
    lab.wait_applied("the fixed file applied", since, 0, RATE_AFTER);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn a_bad_value_is_reported_and_the_datapath_keeps_the_old_rate() {
    let lab = Lab::new();
    let bad = lab.text(0).replacen("burst: 0", "burst: 1", 1);
    let (line, column) = position(&bad, "0/s");
    let error = format!(
        "{}:{line}:{column}: services[0].rate_limit.rate: must be greater than 0",
        lab.file.display()
    );
    let since = Instant::now();
    std::fs::write(&lab.file, &bad).expect("write");
    let s = lab.wait("the bad value reported", since, |s| {
        s.last.as_ref().and_then(|l| l.error.as_deref()) == Some(error.as_str())
    });
    lab.check_invalid("rate 0/s", &s, &error, 0, RATE_BEFORE);
    // The datapath still limits at the old rate.
    lab.check_rate("after the invalid reload", 20_000, RATE_BEFORE);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn a_deleted_file_is_reported_and_its_return_reloads() {
    let lab = Lab::new();
    let since = Instant::now();
    std::fs::remove_file(&lab.file).expect("rm");
    let s = lab.wait("the deletion reported", since, |s| s.count > 0);
    let last = s.last.as_ref().expect("a reload");
    assert_eq!(
        (last.result.as_str(), last.trigger.as_str()),
        ("missing", "file"),
        "{s:#?}"
    );
    let error = last.error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with(&format!("{}: the policy file is gone", lab.file.display())),
        "the error should name the file: {error:?}"
    );
    assert_eq!((s.generation, s.results["missing"]), (0, 1), "{s:#?}");
    assert_eq!(lab.limit(), summary(RATE_BEFORE), "the running limit");
    let metrics = lab.agent.metrics().expect("GET /metrics");
    assert_eq!(
        require_metric(&metrics, "agent_reload_total", &[("result", "missing")]).expect("metric"),
        1.0
    );
    assert!(
        lab.agent.log_text().contains("the policy file is gone"),
        "the deletion is not logged:\n{}",
        lab.agent.log_text()
    );

    // Back, with a new rate.
    let since = Instant::now();
    std::fs::write(&lab.file, lab.text(RATE_AFTER)).expect("write");
    lab.wait_applied("the re-created file applied", since, 0, RATE_AFTER);
    lab.check_logged_file_trigger();
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn an_editor_write_and_rename_reloads() {
    let lab = Lab::new();
    let since = Instant::now();
    write_rename(&lab.file, &lab.text(RATE_AFTER));
    lab.wait_applied("the renamed-over file applied", since, 0, RATE_AFTER);

    // An editor keeping a backup: the file renamed away, the new one written, the backup
    // removed. The moment without a file is no `missing`.
    let since = Instant::now();
    let backup = lab.file.with_extension("yaml~");
    std::fs::rename(&lab.file, &backup).expect("rename to the backup");
    std::fs::write(&lab.file, lab.text(RATE_BEFORE)).expect("write");
    std::fs::remove_file(&backup).expect("rm the backup");
    lab.wait_applied("the editor's new file applied", since, 1, RATE_BEFORE);
    let s = lab.reloads();
    assert_eq!(
        (s.generation, s.results["ok"], s.results["missing"]),
        (2, 2, 0),
        "{s:#?}"
    );
    lab.check_logged_file_trigger();
}

/// A ConfigMap volume as the kubelet writes it: `policy.yaml -> ..data/policy.yaml`,
/// `..data -> ..<timestamp>`; an update writes a new timestamped directory, makes a
/// `..data_tmp` symlink to it, renames that over `..data` and removes the old directory.
struct ConfigMap {
    dir: PathBuf,
    stamp: u32,
}

impl ConfigMap {
    const FILE: &str = "policy.yaml";

    fn create(dir: &Path, text: &str) -> (ConfigMap, PathBuf) {
        let mut cm = ConfigMap {
            dir: dir.to_owned(),
            stamp: 0,
        };
        cm.update(text);
        let file = dir.join(Self::FILE);
        symlink(format!("..data/{}", Self::FILE), &file).expect("symlink");
        (cm, file)
    }

    fn stamped(&self, n: u32) -> String {
        format!("..2026_12_05_10_00_00.{n:09}")
    }

    fn update(&mut self, text: &str) {
        let old = self.stamped(self.stamp);
        self.stamp += 1;
        let new = self.stamped(self.stamp);
        std::fs::create_dir(self.dir.join(&new)).expect("mkdir");
        std::fs::write(self.dir.join(&new).join(Self::FILE), text).expect("write");
        let tmp = self.dir.join("..data_tmp");
        symlink(&new, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("rename");
        let _ = std::fs::remove_dir_all(self.dir.join(old));
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn a_configmap_symlink_swap_reloads_and_the_datapath_follows() {
    let mut cm = None;
    let lab = Lab::with(|dir, text| {
        let (c, file) = ConfigMap::create(dir, text);
        cm = Some(c);
        file
    });
    let mut cm = cm.expect("the ConfigMap");
    lab.check_rate("before the update", 20_000, RATE_BEFORE);

    let since = Instant::now();
    cm.update(&lab.text(RATE_AFTER));
    lab.wait_applied("the ConfigMap update applied", since, 0, RATE_AFTER);
    lab.check_logged_file_trigger();
    // A new flow key: its bucket starts full, at the new limit.
    lab.check_rate("after the update", 21_000, RATE_AFTER);

    // A second update: the watch follows the new timestamped directory.
    let since = Instant::now();
    cm.update(&lab.text(RATE_BEFORE));
    lab.wait_applied("the second ConfigMap update applied", since, 1, RATE_BEFORE);
    let s = lab.reloads();
    assert_eq!((s.generation, s.count), (2, 2), "{s:#?}");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn a_half_written_file_is_invalid_and_the_finished_one_applies() {
    use std::io::Write as _;
    let lab = Lab::new();
    let text = lab.text(RATE_AFTER);
    // Cut inside the service's address: `198.18` is no address.
    let cut = text
        .find(&format!("{}/32", lab.topo.server_v4))
        .expect("address")
        + 6;
    let (head, tail) = text.split_at(cut);
    assert!(head.ends_with("198.18"), "{head}");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&lab.file)
        .expect("open");
    let since = Instant::now();
    f.write_all(head.as_bytes()).expect("write");
    f.flush().expect("flush");
    let (line, column) = position(head, "198.18");
    let error = format!(
        "{}:{line}:{column}: services[0].match.address: `198.18` is not an IPv4 or IPv6 \
         address or CIDR (e.g. 198.18.0.0/24)",
        lab.file.display()
    );
    let s = lab.wait("the half-written file reported", since, |s| {
        s.last.as_ref().and_then(|l| l.error.as_deref()) == Some(error.as_str())
    });
    lab.check_invalid("half-written", &s, &error, 0, RATE_BEFORE);

    // The writer finishes.
    let since = Instant::now();
    f.write_all(tail.as_bytes()).expect("write");
    drop(f);
    lab.wait_applied("the finished file applied", since, 0, RATE_AFTER);
}
