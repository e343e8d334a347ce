//! Scale (issue 16), end to end: many balanced services, time to ready, the maps' memory as
//! the kernel accounts it, and the policy's table limits.
//!
//! The agent runs in the client namespace on the client veth (generic XDP, both directions),
//! as in `lb.rs`; VIPs and backends are addresses the client routes through the server, which
//! holds every backend address (see `agent_tests::scale`). "Ready" is `/health/ready`
//! answering 200, timed from the spawn of `agent run`. Map memory is the sum of `memlock`
//! over the distinct maps the agent holds (`/proc/PID/fdinfo`): the kernel's own accounting.
//!
//! Memory bounds are not timing bounds and do not scale with `AGENT_TEST_TIME_SCALE`.
//!
//! Root only; run serially: `cargo test -p agent-tests --test scale -- --test-threads=1`.

use agent_tests::{
    agent::{TempDir, agent_bin},
    scale::{self, ScaleLab, ScalePolicy},
    timing::{self, Scaled},
    wait::wait_until,
};

const MIB: u64 = 1024 * 1024;
const KIB: u64 = 1024;
/// The bound on the maps of 1,000 services x 4 backends at the default sizes.
const MAPS_1K_SERVICES: u64 = 256 * MIB;
/// The bound on what each added balanced service (4 backends) adds to the maps.
const MAPS_PER_SERVICE: u64 = 160 * KIB;
/// A round of health checks: the 1 s interval with its 10% jitter, and slack.
const PROBE_ROUND: Scaled = Scaled::secs(3);
/// How often a condition is checked while waiting on it (a period, not a bound).
const POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Starts the agent on `policy` in `lab`; waits for ready (giving up after
/// [`timing::READY_GIVE_UP`], so a slow start still reports its time) and returns the time to
/// ready and the maps' memory then.
fn start(lab: &mut ScaleLab, policy: &ScalePolicy) -> (std::time::Duration, scale::MapMemory) {
    let what = format!(
        "{} services x {} backends{}",
        policy.services,
        policy.backends,
        if policy.health_checks {
            ", TCP checks every 1s"
        } else {
            ""
        }
    );
    let t0 = lab
        .spawn(&agent_bin().expect("the agent binary"), policy)
        .expect("starting the agent");
    let ready = lab
        .wait_ready(t0, timing::READY_GIVE_UP)
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let pid = lab.agent().expect("running").pid();
    let maps = scale::map_memory(pid).expect("reading the agent's fdinfo");
    eprintln!(
        "{what}: ready after {ready:?}, maps {:.1} MiB in {} maps, RSS {:.1} MiB",
        maps.mib(),
        maps.by_id.len(),
        scale::rss(pid).unwrap_or(0) as f64 / MIB as f64
    );
    assert!(
        !maps.by_id.is_empty(),
        "{what}: the ready agent holds no BPF map fd (fdinfo of pid {pid} unreadable?)"
    );
    (ready, maps)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn thousand_balanced_services_are_ready_within_2s_in_256_mib_of_maps() {
    let policy = ScalePolicy::new(1_000, 4);
    let mut lab = ScaleLab::new(&policy.ports()).expect("topology");
    let (ready, maps) = start(&mut lab, &policy);
    // The health checks run and reach the backends through the topology: one probe of each
    // backend within an interval (1 s, 10% jitter), as many accepts.
    let before = lab.accepted();
    wait_until(
        "a health check of each of the 4,000 backends accepted",
        PROBE_ROUND,
        POLL,
        || lab.accepted() >= before + 4_000,
    );
    let overflows = lab.listen_overflows().expect("server netstat");
    assert_eq!(
        overflows, 0,
        "harness: the backend listeners' accept queues overflowed {overflows} times (probes \
         failed by the test's listeners, not by the agent)"
    );
    // Both bounds judged, both reported: one failing must not hide the other's figure.
    let mut failed = Vec::new();
    if ready > timing::READY_1K_SERVICES.get() {
        failed.push(format!(
            "ready after {ready:?}, bound {}",
            timing::READY_1K_SERVICES
        ));
    }
    if maps.bytes > MAPS_1K_SERVICES {
        failed.push(format!(
            "maps {:.1} MiB, bound {} MiB (largest: {})",
            maps.mib(),
            MAPS_1K_SERVICES / MIB,
            largest(&maps)
        ));
    }
    assert!(
        failed.is_empty(),
        "1,000 services x 4 backends: {}",
        failed.join("; ")
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn maps_grow_by_at_most_160_kib_per_balanced_service() {
    let one = ScalePolicy::new(1, 4);
    let thousand = ScalePolicy::new(1_000, 4);
    let mut lab = ScaleLab::new(&thousand.ports()).expect("topology");
    let (_, small) = start(&mut lab, &one);
    lab.stop().expect("stopping the agent");
    let (_, large) = start(&mut lab, &thousand);
    let per_service = large.bytes.saturating_sub(small.bytes) / 999;
    assert!(
        per_service <= MAPS_PER_SERVICE,
        "maps: {:.1} MiB for 1 service, {:.1} MiB for 1,000: {:.1} KiB per added service, \
         bound {} KiB (largest at 1,000: {})",
        small.mib(),
        large.mib(),
        per_service as f64 / KIB as f64,
        MAPS_PER_SERVICE / KIB,
        largest(&large)
    );
}

/// Health checks are left out: 60,000 TCP probes a second (connect, accept, close in the
/// same kernel) would swamp a 2-core machine, and the time to ready would measure the probes'
/// contention, not the datapath. The 1,000-service test keeps them.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ten_thousand_balanced_services_of_6_backends_are_accepted_and_ready() {
    let mut policy = ScalePolicy::new(10_000, 6);
    policy.health_checks = false;
    let dir = TempDir::new().expect("temp dir");
    let (code, out) = scale::check(
        &agent_bin().expect("the agent binary"),
        dir.path(),
        "10k.yaml",
        &policy,
    )
    .expect("agent check");
    assert_eq!(
        code,
        Some(0),
        "agent check refused 10,000 services x 6 backends:\n{}",
        head(&out)
    );
    let mut lab = ScaleLab::new(&policy.ports()).expect("topology");
    let (ready, maps) = start(&mut lab, &policy);
    assert!(
        ready <= timing::READY_10K_SERVICES.get(),
        "10,000 services x 6 backends: ready after {ready:?}, bound {} (maps {:.1} MiB)",
        timing::READY_10K_SERVICES,
        maps.mib()
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn more_services_than_agent_tables_services_is_refused_with_the_numbers_and_position() {
    let mut policy = ScalePolicy::new(101, 1);
    policy.health_checks = false;
    policy.agent_extra = "  tables:\n    services: 100\n".into();
    refused(&policy, "services.yaml", &["101", "100"]);
    // One under the limit: accepted (the refusal is the limit's, not the policy's shape).
    policy.services = 100;
    accepted(&policy, "services-ok.yaml");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn more_backends_than_agent_tables_backends_is_refused_with_the_numbers_and_position() {
    // 26 x 4 = 104 backends, over 100.
    let mut policy = ScalePolicy::new(26, 4);
    policy.health_checks = false;
    policy.agent_extra = "  tables:\n    backends: 100\n".into();
    refused(&policy, "backends.yaml", &["104", "100"]);
    // 25 x 4 = 100: accepted.
    policy.services = 25;
    accepted(&policy, "backends-ok.yaml");
}

/// `agent check` of `policy` exits 2 and names each of `numbers` and a `FILE:LINE:COLUMN`
/// inside the file.
fn refused(policy: &ScalePolicy, name: &str, numbers: &[&str]) {
    let dir = TempDir::new().expect("temp dir");
    let (code, out) = scale::check(
        &agent_bin().expect("the agent binary"),
        dir.path(),
        name,
        policy,
    )
    .expect("agent check");
    let file = dir.path().join(name);
    assert_eq!(
        code,
        Some(2),
        "agent check {name} ({} services x {} backends, {:?}): exit code; output:\n{}",
        policy.services,
        policy.backends,
        policy.agent_extra,
        head(&out)
    );
    for n in numbers {
        assert!(
            out.split(|c: char| !c.is_ascii_digit()).any(|w| w == *n),
            "agent check {name}: the refusal does not name {n}:\n{}",
            head(&out)
        );
    }
    let lines = std::fs::read_to_string(&file)
        .expect("policy")
        .lines()
        .count();
    let at = scale::positions(&out, &file);
    assert!(
        at.iter().any(|&(l, c)| l >= 1 && l <= lines && c >= 1),
        "agent check {name}: the refusal names no {}:LINE:COLUMN within its {lines} lines:\n{}",
        file.display(),
        head(&out)
    );
}

fn accepted(policy: &ScalePolicy, name: &str) {
    let dir = TempDir::new().expect("temp dir");
    let (code, out) = scale::check(
        &agent_bin().expect("the agent binary"),
        dir.path(),
        name,
        policy,
    )
    .expect("agent check");
    assert_eq!(
        code,
        Some(0),
        "agent check {name}: refused at the limit:\n{}",
        head(&out)
    );
}

/// The first lines of a long output, for messages.
fn head(out: &str) -> String {
    let lines: Vec<&str> = out.lines().collect();
    let mut s = lines
        .iter()
        .take(20)
        .copied()
        .collect::<Vec<_>>()
        .join("\n");
    if lines.len() > 20 {
        s.push_str(&format!("\n... ({} lines in all)", lines.len()));
    }
    s
}

/// The three largest maps by memlock, for messages: `id: MiB`.
fn largest(maps: &scale::MapMemory) -> String {
    let mut v: Vec<(&u32, &u64)> = maps.by_id.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .take(3)
        .map(|(id, b)| format!("map {id}: {:.1} MiB", **b as f64 / MIB as f64))
        .collect::<Vec<_>>()
        .join(", ")
}
