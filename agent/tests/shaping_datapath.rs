//! Shaping (EDT pacing) through BPF_PROG_TEST_RUN on `agent_tc_egress`: the program gets a
//! `__sk_buff` context in (`wire_len`, a sender's `tstamp`) and hands it back, so the
//! departure time it wrote into `skb->tstamp` is read directly. Needs root.

mod cpu;
mod packets;

use std::sync::{Barrier, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use agent::{
    config,
    datapath::{Datapath, ShapeCounters, ktime_now_ns},
};
use agent_common::{
    BucketKey,
    classify::{PROTO_UDP, v4_mapped},
    maps::MAP_SHAPE_NEXT,
    shape::Departure,
};
use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions},
};
use cpu::pin_to_cpu;
use packets::Frame;

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// `sizeof(struct __sk_buff)` and the offsets the tests write and read (uapi `bpf.h`, stable).
const SKB_LEN: usize = 192;
const SKB_TSTAMP: usize = 152;
const SKB_WIRE_LEN: usize = 160;

const NS: u64 = 1_000_000_000;
/// Every shaped service runs at 100,000 bytes per second, and the tests give packets a wire
/// length of 65,000 bytes (a GSO packet's; the frame itself is short): 650 ms each. Spacing
/// that long keeps every check exact even when the test runs slowly (under emulation), since
/// all runs of one check happen well inside one packet's time.
const RATE: u64 = 100_000;
const WIRE: u32 = 65_000;
const DELAY: u64 = WIRE as u64 * NS / RATE;

const POLICY: &str = r#"
version: 1
interfaces:
  - name: lo
services:
  - name: per-flow
    match: { address: 198.18.0.2/32, port: 5000, protocol: udp }
    shaping: { rate: 100KB/s, key: flow, horizon: 1s }
  - name: per-source
    match: { address: 198.18.0.3/32, port: 5000, protocol: udp }
    shaping: { rate: 100KB/s, key: source_ip, horizon: 10s }
  - name: aggregate
    match: { address: 198.18.0.4/32, port: 5000, protocol: udp }
    shaping: { rate: 100KB/s, key: service, horizon: 10s }
  - name: unshaped
    match: { address: 198.18.0.5/32, port: 5000, protocol: udp }
  - name: contended
    match: { address: 198.18.0.6/32, port: 5000, protocol: udp }
    shaping: { rate: 1KB/s, key: service, horizon: 1000000000s }
"#;

const CLIENT: [u8; 4] = [198, 18, 1, 1];
const OTHER_CLIENT: [u8; 4] = [198, 18, 1, 2];

fn require_root() {
    // SAFETY: trivial syscall.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "datapath tests load BPF programs and need root; run them with `cargo xtask test` as root"
    );
}

/// The tests share the kernel's clock and CPUs; the contention test needs both CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

struct Harness {
    dp: Datapath,
    names: Vec<String>,
    _serial: MutexGuard<'static, ()>,
}

/// What one run of the TC program gave.
#[derive(Debug)]
struct Run {
    verdict: u32,
    /// `skb->tstamp` after the run.
    tstamp: u64,
    /// CLOCK_MONOTONIC just before and just after the run: the program's `now` is between.
    before: u64,
    after: u64,
}

fn now() -> u64 {
    ktime_now_ns().expect("CLOCK_MONOTONIC")
}

impl Harness {
    fn new() -> Harness {
        require_root();
        let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let policy = config::load_str(POLICY, "shaping-datapath.yaml")
            .unwrap_or_else(|e| panic!("test policy invalid:\n{e}"));
        let compiled = config::compile(&policy);
        let mut dp = Datapath::load_for(&compiled).expect("loading the datapath");
        dp.apply(&compiled).expect("writing the maps");
        Harness {
            dp,
            names: compiled.services.iter().map(|s| s.name.clone()).collect(),
            _serial: serial,
        }
    }

    fn shaping(&self, service: &str) -> ShapeCounters {
        let id = self
            .names
            .iter()
            .position(|n| n == service)
            .unwrap_or_else(|| panic!("no service {service}"));
        let snapshot = self
            .dp
            .snapshot(&(0..self.names.len() as u32).collect::<Vec<_>>())
            .expect("reading counters");
        snapshot.services[id].shaping.clone()
    }

    /// Runs `frame` through TC egress with `wire_len` and a sender's `tstamp` in the context.
    fn run_tc(&self, frame: &[u8], wire_len: u32, sender: u64) -> Run {
        let mut ctx = [0u8; SKB_LEN];
        ctx[SKB_TSTAMP..SKB_TSTAMP + 8].copy_from_slice(&sender.to_ne_bytes());
        ctx[SKB_WIRE_LEN..SKB_WIRE_LEN + 4].copy_from_slice(&wire_len.to_ne_bytes());
        let mut out = [0u8; SKB_LEN];
        let prog = self.dp.tc_program().expect("tc program");
        let before = now();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                ctx_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN on tc with a __sk_buff context");
        let after = now();
        let tstamp = u64::from_ne_bytes(out[SKB_TSTAMP..SKB_TSTAMP + 8].try_into().unwrap());
        Run {
            verdict: r.return_value,
            tstamp,
            before,
            after,
        }
    }
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4]) -> Vec<u8> {
    Frame::udp4(src, sport, dst, 5000).bytes()
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn consecutive_packets_of_a_key_leave_one_wire_time_apart() {
    let h = Harness::new();
    let frame = udp(CLIENT, 40_000, [198, 18, 0, 2]);
    let first = h.run_tc(&frame, WIRE, 0);
    assert_eq!(first.verdict, TC_ACT_OK, "{first:?}");
    assert!(
        (first.before..=first.after).contains(&first.tstamp),
        "an idle key's first packet leaves now: {first:?}"
    );
    let second = h.run_tc(&frame, WIRE, 0);
    assert_eq!(second.verdict, TC_ACT_OK, "{second:?}");
    assert!(
        second.after < first.tstamp + DELAY,
        "precondition: the second run came within one wire time ({DELAY} ns) of the first"
    );
    assert_eq!(
        second.tstamp,
        first.tstamp + DELAY,
        "the second packet leaves one wire time ({WIRE} B at {RATE} B/s) after the first"
    );
    assert!(
        second.tstamp > second.after,
        "its departure is in the future"
    );

    let c = h.shaping("per-flow");
    assert_eq!(c.paced.packets, 2);
    assert_eq!(
        c.paced.bytes,
        2 * u64::from(WIRE),
        "wire length, not frame length"
    );
    assert_eq!(c.horizon_drops.packets, 0);
    assert!(
        (second.tstamp - second.after..=second.tstamp - second.before).contains(&c.last_delay_ns),
        "the latest delay is the second packet's wait: {c:?}, {second:?}"
    );
    assert!(
        c.waiting_ns > 0 && c.waiting_ns <= DELAY,
        "the latest packet still waits: {c:?}"
    );
    // Another flow of the same service has its own line: it leaves now.
    let other = h.run_tc(&udp(CLIENT, 40_001, [198, 18, 0, 2]), WIRE, 0);
    assert!(
        (other.before..=other.after).contains(&other.tstamp),
        "key: flow, another flow is not queued behind the first: {other:?}"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn a_packet_past_the_horizon_is_dropped_and_counted() {
    let h = Harness::new();
    // Horizon 1 s, 650 ms a packet: departures now and now + 650 ms fit, now + 1300 ms not.
    let frame = udp(CLIENT, 41_000, [198, 18, 0, 2]);
    let runs: Vec<Run> = (0..3).map(|_| h.run_tc(&frame, WIRE, 0)).collect();
    assert!(
        runs[2].after - runs[0].before < 2 * DELAY - NS,
        "precondition: the three runs took under {} ms",
        (2 * DELAY - NS) / 1_000_000
    );
    let verdicts: Vec<u32> = runs.iter().map(|r| r.verdict).collect();
    assert_eq!(verdicts, [TC_ACT_OK, TC_ACT_OK, TC_ACT_SHOT], "{runs:?}");
    let c = h.shaping("per-flow");
    assert_eq!((c.paced.packets, c.horizon_drops.packets), (2, 1), "{c:?}");
    // The drop booked nothing: the key's line ends after the two packets that left.
    let next = departure_of(
        &h,
        BucketKey {
            service_id: 0,
            sport: 41_000,
            dport: 5000,
            proto: PROTO_UDP,
            src: v4_mapped(CLIENT),
            dst: v4_mapped([198, 18, 0, 2]),
            ..BucketKey::default()
        },
    );
    assert_eq!(
        next,
        runs[0].tstamp + 2 * DELAY,
        "refused packets book nothing"
    );
}

/// The key's `next` in `SHAPE_NEXT`.
fn departure_of(h: &Harness, key: BucketKey) -> u64 {
    let map =
        h.dp.ebpf()
            .map(MAP_SHAPE_NEXT)
            .expect("SHAPE_NEXT in the object");
    let table: HashMap<&MapData, BucketKey, Departure> =
        HashMap::try_from(map).expect("SHAPE_NEXT is a hash map");
    table.get(&key, 0).expect("the key has a departure").next
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn key_source_ip_shares_one_line_among_a_sources_flows() {
    let h = Harness::new();
    let dst = [198, 18, 0, 3];
    let a = h.run_tc(&udp(CLIENT, 1, dst), WIRE, 0);
    let b = h.run_tc(&udp(CLIENT, 2, dst), WIRE, 0);
    let other = h.run_tc(&udp(OTHER_CLIENT, 1, dst), WIRE, 0);
    assert_eq!(
        b.tstamp,
        a.tstamp + DELAY,
        "a second flow of the same source waits behind the first"
    );
    assert!(
        (other.before..=other.after).contains(&other.tstamp),
        "another source has its own line: {other:?}"
    );
    assert_eq!(h.shaping("per-source").paced.packets, 3);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn key_service_shares_one_line_among_everyone() {
    let h = Harness::new();
    let dst = [198, 18, 0, 4];
    let a = h.run_tc(&udp(CLIENT, 1, dst), WIRE, 0);
    let b = h.run_tc(&udp(OTHER_CLIENT, 7, dst), WIRE, 0);
    assert_eq!(b.tstamp, a.tstamp + DELAY, "one line for the whole service");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn a_senders_later_departure_is_kept_and_unshaped_services_are_untouched() {
    let h = Harness::new();
    let dst = [198, 18, 0, 4];
    // TCP's own pacing asked for 300 ms from now, within the 10 s horizon: kept.
    let asked = now() + 300_000_000;
    let r = h.run_tc(&udp(CLIENT, 9, dst), WIRE, asked);
    assert_eq!(r.tstamp, asked, "never earlier than its sender asked");
    // A real-time stamp (a forwarded packet's receive time) is no departure time: ignored.
    let realtime = 1_700_000_000 * NS;
    let r = h.run_tc(&udp(CLIENT, 10, [198, 18, 0, 2]), WIRE, realtime);
    assert_eq!(r.verdict, TC_ACT_OK);
    assert!(
        (r.before..=r.after).contains(&r.tstamp),
        "an implausible sender stamp is replaced by the schedule: {r:?}"
    );

    let r = h.run_tc(&udp(CLIENT, 1, [198, 18, 0, 5]), WIRE, 0);
    assert_eq!(
        (r.verdict, r.tstamp),
        (TC_ACT_OK, 0),
        "no shaping, no tstamp"
    );
    assert_eq!(h.shaping("unshaped"), ShapeCounters::default());

    // Ingress (XDP) never paces, even a shaped service's packets.
    let before = h.shaping("per-flow").paced.packets;
    let prog = h.dp.xdp_program().expect("xdp program");
    let frame = udp(CLIENT, 40_000, [198, 18, 0, 2]);
    let x = prog
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            ..TestRunOptions::new()
        })
        .expect("xdp run");
    assert_eq!(x.return_value, XDP_PASS);
    assert_eq!(h.shaping("per-flow").paced.packets, before);
}

/// Two CPUs book departures on one key at once. At 1 KB/s a 1,000-byte wire length is one
/// second a packet and the horizon is far away, so every packet books the slot after the
/// last: with no booking lost or doubled, the key's `next` ends exactly one second per booked
/// packet after the first departure (which lies within a second of the start).
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn two_cpus_on_one_key_book_every_slot_once() {
    let h = Harness::new();
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        panic!("this test needs 2 CPUs to contend; the machine has 1");
    }
    const WIRE_1S: u32 = 1_000;
    const CHUNK: u32 = 5_000;
    const WINDOW: Duration = Duration::from_millis(300);
    let frame = udp(CLIENT, 1, [198, 18, 0, 6]);
    let mut ctx = [0u8; SKB_LEN];
    ctx[SKB_WIRE_LEN..SKB_WIRE_LEN + 4].copy_from_slice(&WIRE_1S.to_ne_bytes());
    let prog = h.dp.tc_program().expect("tc program");
    let barrier = Barrier::new(2);
    let start = now();
    std::thread::scope(|s| {
        for cpu in 0..2 {
            let (barrier, frame, ctx) = (&barrier, &frame, &ctx);
            s.spawn(move || {
                pin_to_cpu(cpu);
                barrier.wait();
                let t0 = Instant::now();
                while t0.elapsed() < WINDOW {
                    prog.test_run(TestRunOptions {
                        data_in: Some(frame),
                        ctx_in: Some(ctx),
                        repeat: CHUNK,
                        ..TestRunOptions::new()
                    })
                    .expect("tc run");
                }
            });
        }
    });
    let c = h.shaping("contended");
    let booked = c.paced.packets - c.contended.packets;
    let next = departure_of(
        &h,
        BucketKey {
            service_id: 4,
            ..BucketKey::default()
        },
    );
    let span_s = (next - start) / NS;
    println!(
        "two CPUs: {} paced, {} after lost swaps, {booked} booked; the line ends {span_s} s on",
        c.paced.packets, c.contended.packets
    );
    assert!(c.paced.packets > u64::from(CHUNK), "{c:?}");
    assert_eq!(
        span_s, booked,
        "every booked packet took exactly one slot of the key's line"
    );
    assert_eq!(c.horizon_drops.packets, 0);
}

/// The pacing qdisc's install and restore, in a scratch network namespace of a thread of its
/// own: `fq` where the kernel has it, else `pfifo` standing in for it (the install, the
/// refusal of an operator's qdisc and the restore do not depend on the kind).
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn the_pacer_replaces_only_a_default_root_qdisc_and_puts_it_back() {
    use agent::datapath::qdisc::{self, PacerSpec, Pacers, QdiscError, Support};
    require_root();
    let fq = PacerSpec::fq(Duration::from_secs(2));
    let spec = match qdisc::probe(&fq) {
        Support::Yes => fq,
        Support::No(why) => {
            println!("no sch_fq here ({why}): pfifo stands in for fq");
            PacerSpec::plain("pfifo")
        }
        Support::Unknown(why) => panic!("the probe could not run: {why}"),
    };
    let result = std::thread::spawn(move || {
        // SAFETY: moves only this thread into a new network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("running ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        ip(&[
            "link", "add", "pace0", "type", "veth", "peer", "name", "pace1",
        ]);
        // A device that is down shows no root qdisc at all; the kernel attaches its default
        // when it comes up.
        ip(&["link", "set", "pace0", "up"]);
        ip(&["link", "set", "pace1", "up"]);
        let before = qdisc::root_qdisc("pace0")
            .expect("reading")
            .expect("a root qdisc");
        assert!(
            before.is_default(),
            "a fresh veth has the kernel's default: {before:?}"
        );

        let ifs = ["pace0".to_string()];
        let pacers = Pacers::install(&spec, &ifs).expect("installing the pacer");
        let during = qdisc::root_qdisc("pace0").unwrap().unwrap();
        assert_eq!(
            (during.kind.as_str(), during.is_ours()),
            (spec.kind(), true),
            "{during:?}"
        );
        // Installing again (as after a killed run) replaces ours without complaint.
        std::mem::forget(pacers);
        let pacers = Pacers::install(&spec, &ifs).expect("adopting our own qdisc");
        drop(pacers);
        let after = qdisc::root_qdisc("pace0").unwrap().unwrap();
        assert_eq!(after, before, "dropping the pacer puts the default back");

        // An operator's qdisc (pfifo: built into every kernel with qdiscs, so the test does
        // not depend on a module): refused by name, and left as it was.
        let tc = std::process::Command::new("tc")
            .args([
                "qdisc", "add", "dev", "pace1", "root", "handle", "1:", "pfifo",
            ])
            .output()
            .expect("running tc");
        assert!(tc.status.success(), "tc: {tc:?}");
        let both = ["pace0".to_string(), "pace1".to_string()];
        match Pacers::install(&spec, &both) {
            Err(e @ QdiscError::Foreign { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("pace1") && text.contains("pfifo") && text.contains("1:"),
                    "{text}"
                );
            }
            other => panic!("expected a refusal of pfifo on pace1, got {other:?}"),
        }
        assert!(qdisc::check("pace1").is_err());
        assert_eq!(qdisc::root_qdisc("pace1").unwrap().unwrap().kind, "pfifo");
        assert_eq!(
            qdisc::root_qdisc("pace0").unwrap().unwrap(),
            before,
            "nothing touched: every interface is checked before the first is changed"
        );
    });
    if let Err(panic) = result.join() {
        std::panic::resume_unwind(panic);
    }
}
