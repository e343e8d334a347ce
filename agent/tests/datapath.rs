//! Datapath tests through BPF_PROG_TEST_RUN: crafted frames run through the real programs
//! with real maps, each with the verdict and the counter effect it must have.
//! Needs root (loading BPF programs); run by `cargo xtask test`.

mod cpu;
mod packets;

use std::{
    net::Ipv6Addr,
    time::{Duration, Instant},
};

use agent::{
    config,
    datapath::{Datapath, Snapshot},
};
use agent_tests::timing::{self, Scaled};
use aya::programs::{TestRun, TestRunOptions};
use cpu::pin_to_cpu;
use packets::{EXT_DSTOPTS, EXT_FRAGMENT, EXT_HOPOPTS, EXT_ROUTING, Ext, Frame, L3, L4};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const POLICY: &str = r#"
version: 1
interfaces:
  - name: lo
services:
  - name: udp-limited
    match: { address: 198.18.0.2/32, port: 5000, protocol: udp }
    rate_limit: { key: flow, rate: 10/s, burst: 2 }
  - name: tcp-80
    match: { address: 198.18.0.2/32, port: 80, protocol: tcp }
  - name: net-any
    match: { address: 198.18.0.0/24, protocol: any }
  - name: v6-tcp
    match: { address: "2001:db8::2/128", port: 80, protocol: tcp }
  - name: v6-net
    match: { address: "2001:db8::/64", protocol: any }
  - name: aggregate
    match: { address: 198.18.0.4/32, port: 6000, protocol: udp }
    rate_limit: { key: service, rate: 1000000/s, burst: 1000 }
"#;

const CLIENT: [u8; 4] = [198, 18, 1, 1];
const SERVER: [u8; 4] = [198, 18, 0, 2];

fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("test address")
}

/// Where a packet must be counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    /// `passed` of a service.
    Passed(&'static str),
    /// A drop reason of a service.
    Dropped(&'static str, &'static str),
    /// A global class (all of which pass).
    Global(&'static str),
}

struct Case {
    what: String,
    frame: Vec<u8>,
    pass: bool,
    effects: Vec<Effect>,
}

fn case(what: &str, frame: Vec<u8>, pass: bool, effects: &[Effect]) -> Case {
    Case {
        what: what.to_string(),
        frame,
        pass,
        effects: effects.to_vec(),
    }
}

fn require_root() {
    // SAFETY: trivial syscall.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "datapath tests load BPF programs and need root; run them with `cargo xtask test` as root"
    );
}

struct Harness {
    dp: Datapath,
    /// Service names by id; leaked once so counter effects can name them as `&'static str`.
    names: Vec<&'static str>,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// The tests of this file share CPUs and kernel timing; the contention test needs both CPUs
/// to itself, so they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Harness {
    fn new() -> Harness {
        Self::with_policy(POLICY)
    }

    fn with_policy(policy: &str) -> Harness {
        require_root();
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let policy = config::load_str(policy, "datapath-test.yaml")
            .unwrap_or_else(|e| panic!("test policy invalid:\n{e}"));
        let compiled = config::compile(&policy);
        let mut dp = Datapath::load(compiled.max_keys).expect("loading the datapath");
        dp.apply(&compiled).expect("writing the maps");
        let names = compiled
            .services
            .iter()
            .map(|s| &*s.name.clone().leak())
            .collect();
        Harness {
            dp,
            names,
            _serial: serial,
        }
    }

    fn snapshot(&self) -> Snapshot {
        self.dp
            .snapshot(&(0..self.names.len() as u32).collect::<Vec<_>>())
            .expect("reading counters")
    }

    /// Every counter as (name, packets), for diffs.
    fn flat(&self, s: &Snapshot) -> Vec<(Effect, u64)> {
        let mut out = Vec::new();
        for (i, svc) in s.services.iter().enumerate() {
            let name = self.names[i];
            out.push((Effect::Passed(name), svc.passed.packets));
            for (reason, c) in &svc.dropped {
                out.push((Effect::Dropped(name, reason), c.packets));
            }
        }
        for (class, c) in &s.global {
            if *class != "seen" {
                out.push((Effect::Global(class), c.packets));
            }
        }
        out
    }

    /// Runs a frame through XDP; returns the action and what it changed.
    fn run_xdp(&self, frame: &[u8]) -> (u32, Vec<Effect>, Vec<u8>) {
        self.run_with(frame, |frame, out| {
            let prog = self.dp.xdp_program().expect("xdp program");
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(out),
                    ..TestRunOptions::new()
                })
                .expect("BPF_PROG_TEST_RUN on xdp");
            (r.return_value, r.data_size_out as usize)
        })
    }

    fn run_tc(&self, frame: &[u8]) -> (u32, Vec<Effect>, Vec<u8>) {
        self.run_with(frame, |frame, out| {
            let prog = self.dp.tc_program().expect("tc program");
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(out),
                    ..TestRunOptions::new()
                })
                .expect("BPF_PROG_TEST_RUN on tc");
            (r.return_value, r.data_size_out as usize)
        })
    }

    fn run_with(
        &self,
        frame: &[u8],
        f: impl FnOnce(&[u8], &mut [u8]) -> (u32, usize),
    ) -> (u32, Vec<Effect>, Vec<u8>) {
        let before = self.flat(&self.snapshot());
        let mut out = vec![0u8; frame.len() + 256];
        let (ret, len) = f(frame, &mut out);
        out.truncate(len);
        let after = self.flat(&self.snapshot());
        let mut effects = Vec::new();
        for ((k, a), (_, b)) in after.iter().zip(&before) {
            for _ in 0..a - b {
                effects.push(*k);
            }
        }
        (ret, effects, out)
    }
}

fn check(h: &Harness, c: &Case) {
    let (ret, effects, out) = h.run_xdp(&c.frame);
    let want = if c.pass { XDP_PASS } else { XDP_DROP };
    assert_eq!(ret, want, "{}: XDP verdict {ret}, expected {want}", c.what);
    assert_eq!(effects, c.effects, "{}: XDP counter effect", c.what);
    if c.pass {
        assert_eq!(out, c.frame, "{}: XDP changed a passed frame", c.what);
    }
}

fn check_tc(h: &Harness, c: &Case) {
    let (ret, effects, _) = h.run_tc(&c.frame);
    let want = if c.pass { TC_ACT_OK } else { TC_ACT_SHOT };
    assert_eq!(ret, want, "{}: TC verdict {ret}, expected {want}", c.what);
    assert_eq!(effects, c.effects, "{}: TC counter effect", c.what);
}

fn table() -> Vec<Case> {
    use Effect::*;
    let mut v = Vec::new();
    // Distinct source ports keep every case in its own token-bucket key (key: flow).
    let mut port = 40_000;
    let mut next = || {
        port += 1;
        port
    };

    v.push(case(
        "IPv4 UDP to the limited service",
        Frame::udp4(CLIENT, next(), SERVER, 5000).bytes(),
        true,
        &[Passed("udp-limited")],
    ));
    v.push(case(
        "IPv4 TCP SYN to the exact port",
        Frame::tcp4(CLIENT, next(), SERVER, 80).bytes(),
        true,
        &[Passed("tcp-80")],
    ));
    v.push(case(
        "TCP to another port of the /32 falls back to the covering /24",
        Frame::tcp4(CLIENT, next(), SERVER, 443).bytes(),
        true,
        &[Passed("net-any")],
    ));
    v.push(case(
        "UDP on the TCP service's port is not TCP: /24",
        Frame::udp4(CLIENT, next(), SERVER, 80).bytes(),
        true,
        &[Passed("net-any")],
    ));
    let mut icmp = Frame::udp4(CLIENT, 0, SERVER, 0);
    icmp.l4 = L4::Icmp;
    v.push(case(
        "ICMP has no port: only the port-less /24 rule accepts it",
        icmp.bytes(),
        true,
        &[Passed("net-any")],
    ));
    v.push(case(
        "address outside every service",
        Frame::udp4(CLIENT, next(), [198, 19, 0, 1], 5000).bytes(),
        true,
        &[Global("unmatched")],
    ));
    v.push(case(
        "802.1Q tag",
        Frame::udp4(CLIENT, next(), SERVER, 5000)
            .with_vlans(&[100], packets::ETH_P_8021Q)
            .bytes(),
        true,
        &[Passed("udp-limited")],
    ));
    v.push(case(
        "QinQ (802.1ad outer, 802.1Q inner)",
        Frame::udp4(CLIENT, next(), SERVER, 5000)
            .with_vlans(&[100, 200], packets::ETH_P_8021AD)
            .bytes(),
        true,
        &[Passed("udp-limited")],
    ));
    v.push(case(
        "three tags: more than the parser walks, passed as non-IP",
        Frame::udp4(CLIENT, next(), SERVER, 5000)
            .with_vlans(&[1, 2, 3], packets::ETH_P_8021AD)
            .bytes(),
        true,
        &[Global("non_ip")],
    ));
    let mut opts = Frame::udp4(CLIENT, next(), SERVER, 5000);
    if let L3::V4 { ihl, .. } = &mut opts.l3 {
        *ihl = 15;
    }
    v.push(case(
        "IPv4 with 40 bytes of options",
        opts.bytes(),
        true,
        &[Passed("udp-limited")],
    ));
    for bad in [0u8, 4] {
        let mut f = Frame::udp4(CLIENT, next(), SERVER, 5000);
        if let L3::V4 { ihl, .. } = &mut f.l3 {
            *ihl = bad;
        }
        let mut bytes = f.bytes();
        // `bytes()` pads the header to at least 20; write the bogus IHL back.
        bytes[14] = 0x40 | bad;
        v.push(case(
            &format!("bogus IHL {bad}"),
            bytes,
            true,
            &[Global("unparsed")],
        ));
    }
    let mut f = Frame::udp4(CLIENT, next(), SERVER, 5000);
    if let L3::V4 { frag, .. } = &mut f.l3 {
        *frag = 0x2000; // MF, offset 0: the first fragment carries the UDP header
    }
    v.push(case(
        "first IPv4 fragment is classified with its ports",
        f.bytes(),
        true,
        &[Passed("udp-limited")],
    ));
    let mut f = Frame::udp4(CLIENT, 0, SERVER, 0);
    f.l3 = L3::V4 {
        src: CLIENT.into(),
        dst: SERVER.into(),
        ihl: 5,
        frag: 185, // offset 1480 bytes, no MF: the last fragment
    };
    f.l4 = L4::Raw(packets::IPPROTO_UDP, vec![0xcd; 64]);
    v.push(case(
        "non-first IPv4 fragment has no ports: port-less rule",
        f.bytes(),
        true,
        &[Passed("net-any"), Global("fragment")],
    ));
    v.push(case(
        "ARP is not IP",
        Frame {
            l3: L3::Other(packets::ETH_P_ARP),
            ..Frame::udp4(CLIENT, 1, SERVER, 1)
        }
        .bytes(),
        true,
        &[Global("non_ip")],
    ));

    let (c6, s6) = (v6("2001:db8:1::1"), v6("2001:db8::2"));
    let tcp = |sport| L4::Tcp {
        sport,
        dport: 80,
        flags: 0x02,
    };
    v.push(case(
        "IPv6 TCP to the exact port",
        Frame::v6(c6, s6, tcp(next())).bytes(),
        true,
        &[Passed("v6-tcp")],
    ));
    let mut f = Frame::v6(c6, s6, tcp(next()));
    if let L3::V6 { ext, .. } = &mut f.l3 {
        for kind in [EXT_HOPOPTS, EXT_ROUTING, EXT_DSTOPTS] {
            ext.push(Ext {
                kind,
                len: 16,
                frag_offset: 0,
            });
        }
    }
    v.push(case(
        "IPv6 with hop-by-hop, routing and destination options",
        f.bytes(),
        true,
        &[Passed("v6-tcp")],
    ));
    let mut f = Frame::v6(c6, s6, tcp(next()));
    if let L3::V6 { ext, .. } = &mut f.l3 {
        for _ in 0..7 {
            ext.push(Ext {
                kind: EXT_DSTOPTS,
                len: 8,
                frag_offset: 0,
            });
        }
    }
    v.push(case(
        "IPv6 with 7 extension headers: past the walk bound, passed",
        f.bytes(),
        true,
        &[Global("ipv6_ext_header_limit")],
    ));
    let mut f = Frame::v6(c6, s6, L4::Raw(packets::IPPROTO_TCP, vec![0xcd; 32]));
    if let L3::V6 { ext, .. } = &mut f.l3 {
        ext.push(Ext {
            kind: EXT_FRAGMENT,
            len: 8,
            frag_offset: 100,
        });
    }
    v.push(case(
        "non-first IPv6 fragment: no ports, port-less /64 rule",
        f.bytes(),
        true,
        &[Passed("v6-net"), Global("fragment")],
    ));
    let mut f = Frame::v6(c6, s6, tcp(next()));
    if let L3::V6 { ext, .. } = &mut f.l3 {
        ext.push(Ext {
            kind: EXT_FRAGMENT,
            len: 8,
            frag_offset: 0,
        });
    }
    v.push(case(
        "first IPv6 fragment is classified with its ports",
        f.bytes(),
        true,
        &[Passed("v6-tcp")],
    ));
    v
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn verdicts_and_counters_xdp() {
    let h = Harness::new();
    for c in table() {
        check(&h, &c);
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn verdicts_and_counters_tc_egress() {
    let h = Harness::new();
    for c in table() {
        check_tc(&h, &c);
    }
}

/// Truncating a valid frame at every byte (from the Ethernet header on; BPF_PROG_TEST_RUN
/// refuses frames shorter than 14 bytes) passes it and counts it as unparsed.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn truncated_at_every_offset() {
    use Effect::*;
    let h = Harness::new();
    let frames = [
        ("vlan + ipv4 with options + udp", {
            let mut f =
                Frame::udp4(CLIENT, 41_000, SERVER, 5000).with_vlans(&[7], packets::ETH_P_8021Q);
            if let L3::V4 { ihl, .. } = &mut f.l3 {
                *ihl = 7;
            }
            f.payload = 0;
            f
        }),
        ("ipv4 + tcp", {
            let mut f = Frame::tcp4(CLIENT, 41_001, SERVER, 80);
            f.payload = 0;
            f
        }),
        ("ipv6 + ext + tcp", {
            let mut f = Frame::v6(
                v6("2001:db8:1::1"),
                v6("2001:db8::2"),
                L4::Tcp {
                    sport: 41_002,
                    dport: 80,
                    flags: 2,
                },
            );
            if let L3::V6 { ext, .. } = &mut f.l3 {
                ext.push(Ext {
                    kind: EXT_HOPOPTS,
                    len: 8,
                    frag_offset: 0,
                });
            }
            f.payload = 0;
            f
        }),
    ];
    for (what, frame) in frames {
        let full = frame.bytes();
        for len in 14..full.len() {
            let (ret, effects, _) = h.run_xdp(&full[..len]);
            assert_eq!(ret, XDP_PASS, "{what} truncated to {len}: verdict");
            assert_eq!(
                effects,
                vec![Global("unparsed")],
                "{what} truncated to {len} bytes of {}",
                full.len()
            );
        }
        let (ret, effects, _) = h.run_xdp(&full);
        assert_eq!(ret, XDP_PASS, "{what} complete");
        assert_eq!(effects.len(), 1, "{what} complete: {effects:?}");
        assert!(
            matches!(effects[0], Passed(_)),
            "{what} complete: {effects:?}"
        );
    }
}

/// The bucket of one flow: `burst` packets at once, then drops counted as `rate_limit`; other
/// flows have their own buckets.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn burst_then_drop_per_flow() {
    use Effect::*;
    let h = Harness::new();
    let a = Frame::udp4(CLIENT, 50_000, SERVER, 5000).bytes();
    let b = Frame::udp4(CLIENT, 50_001, SERVER, 5000).bytes();
    // burst: 2 in the policy; at 10/s no token comes back within the test's microseconds.
    for i in 0..2 {
        let (ret, eff, _) = h.run_xdp(&a);
        assert_eq!(
            (ret, eff),
            (XDP_PASS, vec![Passed("udp-limited")]),
            "packet {i} of the burst"
        );
    }
    let (ret, eff, _) = h.run_xdp(&a);
    assert_eq!(
        (ret, eff),
        (XDP_DROP, vec![Dropped("udp-limited", "rate_limit")]),
        "third packet of flow a"
    );
    let (ret, eff, _) = h.run_xdp(&b);
    assert_eq!(
        (ret, eff),
        (XDP_PASS, vec![Passed("udp-limited")]),
        "flow b has its own bucket"
    );
    let s = h.snapshot();
    assert_eq!(s.services[0].new_keys, 2, "two flows, two keys");
}

/// Two CPUs hammer one bucket (`key: service`) at once through BPF_PROG_TEST_RUN. The
/// compare-and-swap must not lose updates: what passes stays within `burst + rate x time`
/// over the wall time both ran in. A plain read-modify-write would let each CPU spend the same
/// tokens, up to twice the limit.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn two_cpus_on_one_bucket_never_exceed_the_limit() {
    // The limit is what the two CPUs must be able to exceed twice over: 1M/s on hardware, a
    // tenth of it on a CPU emulated ten times slower (AGENT_TEST_TIME_SCALE). Whatever the
    // rate, what passes must stay within burst + rate x time.
    const RATE_AT_SCALE_1: f64 = 1_000_000.0;
    let rate = (RATE_AT_SCALE_1 / timing::scale()).round();
    const LIMIT: &str = "rate: 1000000/s, burst: 1000";
    assert!(
        POLICY.contains(LIMIT),
        "the test policy's aggregate limit moved"
    );
    let policy = POLICY.replace(LIMIT, &format!("rate: {rate}/s, burst: 1000"));
    let h = Harness::with_policy(&policy);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "this test needs two CPUs to make them contend; this machine has {cpus}"
    );
    const BURST: f64 = 1_000.0;
    const CHUNK: u32 = 20_000;
    // How long the two CPUs contend. Not a bound: the ceiling below is computed from the
    // wall time. Scaled so that a slower CPU still runs several chunks each and they
    // interleave.
    const WINDOW: Scaled = Scaled::millis(300);
    let svc = h.names.iter().position(|n| *n == "aggregate").unwrap();
    let frame = Frame::udp4(CLIENT, 7, [198, 18, 0, 4], 6000).bytes();
    let prog = h.dp.xdp_program().expect("xdp program");
    let before = h.snapshot().services[svc].clone();

    // Both threads pinned, released together by a barrier, then short BPF_PROG_TEST_RUN calls
    // until the window ends, so that the two CPUs interleave even if one is briefly busy.
    let barrier = std::sync::Barrier::new(2);
    let start = Instant::now();
    let results: Vec<(Instant, Instant, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|cpu| {
                let (frame, barrier) = (&frame, &barrier);
                s.spawn(move || {
                    pin_to_cpu(cpu);
                    barrier.wait();
                    let t0 = Instant::now();
                    let mut runs = 0u64;
                    while t0.elapsed() < WINDOW.get() {
                        prog.test_run(TestRunOptions {
                            data_in: Some(frame),
                            repeat: CHUNK,
                            ..TestRunOptions::new()
                        })
                        .expect("BPF_PROG_TEST_RUN");
                        runs += u64::from(CHUNK);
                    }
                    (t0, Instant::now(), runs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let spans: Vec<(Instant, Instant)> = results.iter().map(|r| (r.0, r.1)).collect();
    let offered: u64 = results.iter().map(|r| r.2).sum();
    let wall = start.elapsed();

    let after = h.snapshot().services[svc].clone();
    let passed = (after.passed.packets - before.passed.packets) as f64;
    let dropped: u64 = after
        .dropped
        .iter()
        .zip(&before.dropped)
        .map(|((_, a), (_, b))| a.packets - b.packets)
        .sum();
    let contended = after.dropped[1].1.packets - before.dropped[1].1.packets;
    assert_eq!(
        passed as u64 + dropped,
        offered,
        "every run is counted once"
    );
    let overlap_start = spans[0].0.max(spans[1].0);
    let overlap_end = spans[0].1.min(spans[1].1);
    let overlap = overlap_end.saturating_duration_since(overlap_start);
    let shortest = spans
        .iter()
        .map(|(a, b)| *b - *a)
        .min()
        .unwrap_or(Duration::ZERO);
    assert!(
        overlap.as_secs_f64() >= 0.5 * shortest.as_secs_f64(),
        "the two CPUs did not run together (overlap {overlap:?} of {shortest:?}): no contention tested"
    );
    // Plus a tick of rate when the burst is long enough for the coarse clock (at a scaled-down
    // rate), which lags by up to a tick (`agent_common::limit`).
    let ceiling = BURST + rate * wall.as_secs_f64() + agent_tests::clock_slack(rate, BURST);
    // Offering no more than the limit allows would pass the check below whatever the
    // datapath did: the CPUs must have offered more (a slow CPU may not).
    timing::require(offered as f64 > 2.0 * ceiling, || {
        format!(
            "the two CPUs offered {offered} packets in {wall:?}, not over twice the {ceiling:.0} \
             the limit lets through (burst {BURST} + {rate}/s x time): the bucket was never \
             contended"
        )
    });
    assert!(
        passed <= ceiling,
        "two CPUs on one bucket passed {passed} in {wall:?}; the limit allows at most {ceiling:.0} \
         (burst {BURST} + {rate}/s x time): lost updates ({contended} dropped as contended)"
    );
    // Not trivially satisfied by dropping everything: while both ran, the rate was granted.
    let floor = 0.5 * rate * overlap.as_secs_f64();
    assert!(
        passed >= floor,
        "passed {passed} in {wall:?}, expected at least {floor:.0}: the bucket starves \
         ({contended} dropped as contended)"
    );
    eprintln!(
        "two CPUs: passed {passed} of {offered} in {wall:?} (ceiling {ceiling:.0}), {contended} contended"
    );
}

/// Every program passes the verifier with room to spare: a program past the verifier's
/// budget of 1,000,000 processed instructions is refused at load (as the balancing stage was
/// before it was split into stages). Changes that grow a program toward the budget show here
/// first, with the figures.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn every_program_verifies_with_headroom() {
    require_root();
    let dp = Datapath::load(64).expect("loading the datapath");
    let counts = dp.verified_instructions();
    for (program, insns) in &counts {
        println!("{program}: {insns:?} instructions verified");
    }
    for (program, insns) in counts {
        let insns = insns.unwrap_or_else(|| panic!("{program}: the kernel gave no count"));
        assert!(
            insns < 800_000,
            "{program}: {insns} instructions verified, over 80% of the 1,000,000 budget"
        );
    }
}
