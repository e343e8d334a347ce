//! Degradation in the datapath through BPF_PROG_TEST_RUN: a policy compiled and written as
//! the agent does it (`apply`, `mark_ports`, `balancer::install`), then each service's mode
//! written into the real `DEGRADE` map and its companion into its `SVC_CFG` entry (the
//! agent's plan does both: the companion from the policy, the mode from the evaluator), and
//! frames run through the real XDP and TC egress programs. Checked: where a new flow goes
//! (the rewritten frame's destination), what an established one does, the answers of a shed
//! service (RST, ICMP unreachable), the limit in force, and the counters. Needs root.
//!
//! Companions are mostly ordinary balanced services of the test policy (`*-fallback`, own
//! VIPs that no test frame addresses), linked to their parent by writing `fallback` (id + 1)
//! into the parent's live `SVC_CFG` entry, so that each case picks its own; one case takes
//! the companion the compiler makes of `degradation.fallback`.

mod packets;
mod support;

use std::net::Ipv4Addr;

use agent::{
    config::{self, Compiled},
    datapath::{Datapath, DegradeCounters, DegradeMaps},
};
use agent_common::{
    Bucket, BucketKey, Counter, ServiceConfig,
    classify::generation_slot,
    degrade::{MODE_FALLBACK, MODE_NORMAL, MODE_SHED},
    maps::{MAP_LB_RR, MAP_RL_BUCKETS, MAP_SVC_CFG, MAP_SVC_STATS},
    ports::nat_port,
    stats::{SVC_DROP_RATE_LIMIT, SVC_PASSED, svc_slot},
};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use packets::{Frame, L4};
use support::{
    ACK, Hook, RST, SYN, TC_ACT_OK, TC_ACT_REDIRECT, XDP_DROP, XDP_PASS, XDP_TX, be16, fold,
    load_balanced, require_root, sum,
};

/// Frames here are untagged IPv4 without options.
const L3: usize = 14;
const L4_AT: usize = L3 + 20;

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const WEB_VIP: [u8; 4] = [198, 18, 0, 100];
const DNS_VIP: [u8; 4] = [198, 18, 0, 53];
const PLAIN: [u8; 4] = [198, 18, 0, 200];
const LIMITED: [u8; 4] = [198, 18, 0, 201];

/// `web` (TCP) and `dns` (UDP) are balanced, each with a companion of other backends;
/// `plain` is not balanced; `limited` has a generous limit and a companion with a tight one.
const POLICY: &str = r#"version: 1
interfaces:
  - name: lo
services:
  - name: web
    match: { address: 198.18.0.100, port: 80, protocol: tcp }
    backends:
      - { address: "198.18.2.1:8080", weight: 100 }
      - { address: "198.18.2.2:8080", weight: 100 }
    load_balancing: { algorithm: weighted_round_robin }
  - name: web-fallback
    match: { address: 198.18.0.101, port: 80, protocol: tcp }
    backends:
      - { address: "198.18.9.1:8080", weight: 100 }
      - { address: "198.18.9.2:8080", weight: 100 }
    load_balancing: { algorithm: weighted_round_robin }
  - name: dns
    match: { address: 198.18.0.53, port: 53, protocol: udp }
    backends:
      - { address: "198.18.3.1:5353", weight: 100 }
    load_balancing: { algorithm: maglev }
  - name: dns-fallback
    match: { address: 198.18.0.54, port: 53, protocol: udp }
    backends:
      - { address: "198.18.9.53:5353", weight: 100 }
    load_balancing: { algorithm: maglev }
  - name: plain
    match: { address: 198.18.0.200/32, protocol: any }
  - name: limited
    match: { address: 198.18.0.201/32, port: 5000, protocol: udp }
    rate_limit: { key: service, rate: 1000000/s, burst: 1000 }
  - name: limited-fallback
    match: { address: 198.18.0.202/32, port: 5000, protocol: udp }
    rate_limit: { key: service, rate: 1/s, burst: 2 }
"#;

struct Lab {
    dp: Datapath,
    compiled: Compiled,
    modes: DegradeMaps,
}

impl Lab {
    /// The policy in the maps, every companion linked to its parent.
    fn new() -> Lab {
        let mut lab = Lab::with_policy(POLICY);
        for parent in ["web", "dns", "limited"] {
            let companion = lab.id(&format!("{parent}-fallback"));
            lab.link(parent, companion + 1);
        }
        lab
    }

    /// `text` compiled and in the maps as the agent writes them.
    fn with_policy(text: &str) -> Lab {
        require_root("degradation");
        let (dp, compiled, _) = load_balanced(text, "degrade-test.yaml");
        let modes = dp.degrade_maps().expect("degradation maps");
        Lab {
            dp,
            compiled,
            modes,
        }
    }

    fn id(&self, name: &str) -> u32 {
        self.compiled
            .services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
            .id
    }

    /// Writes `fallback` (companion id + 1, 0 for none) into `name`'s live `SVC_CFG` entry.
    fn link(&mut self, name: &str, fallback: u32) {
        let slot = generation_slot(self.id(name), self.dp.generation());
        let map = self.dp.ebpf_mut().map_mut(MAP_SVC_CFG).expect("SVC_CFG");
        let mut cfg: Array<&mut MapData, ServiceConfig> = Array::try_from(map).expect("type");
        let mut c = cfg.get(&slot, 0).expect("reading SVC_CFG");
        c.fallback = fallback;
        cfg.set(slot, c, 0).expect("writing SVC_CFG");
    }

    fn set_mode(&mut self, name: &str, mode: u32) {
        let id = self.id(name);
        self.modes.write_mode(id, mode).expect("writing DEGRADE");
    }

    fn counters(&self, name: &str) -> DegradeCounters {
        self.modes
            .counters(self.id(name))
            .expect("reading counters")
    }

    fn svc_counter(&mut self, name: &str, slot: u32) -> u64 {
        let id = self.id(name);
        let map = self
            .dp
            .ebpf_mut()
            .map_mut(MAP_SVC_STATS)
            .expect("SVC_STATS");
        let stats: PerCpuArray<&mut MapData, Counter> = PerCpuArray::try_from(map).expect("type");
        stats
            .get(&svc_slot(id, slot), 0)
            .expect("reading SVC_STATS")
            .iter()
            .map(|c| c.packets)
            .sum()
    }

    /// Service `name`'s round-robin position, summed over CPUs: how many new flows its
    /// schedule gave out.
    fn rr(&mut self, name: &str) -> u32 {
        let id = self.id(name);
        let map = self.dp.ebpf_mut().map_mut(MAP_LB_RR).expect("LB_RR");
        let rr: PerCpuArray<&mut MapData, u32> = PerCpuArray::try_from(map).expect("type");
        rr.get(&id, 0).expect("reading LB_RR").iter().sum()
    }

    fn backends(&self, name: &str) -> Vec<[u8; 4]> {
        let svc = self
            .compiled
            .lb
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} is not balanced"));
        svc.backends
            .iter()
            .map(|b| match b.address.ip() {
                std::net::IpAddr::V4(a) => a.octets(),
                a => panic!("IPv4 backends only here: {a}"),
            })
            .collect()
    }

    /// Runs `frame` through `hook`; returns the return code and the frame as it left.
    fn run(&self, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
        support::run(&self.dp, hook, frame)
    }

    /// The XDP return codes of `frame` run `n` times.
    fn verdicts(&self, frame: &[u8], n: usize) -> Vec<u32> {
        (0..n).map(|_| self.run(Hook::Xdp, frame).0).collect()
    }

    /// The rate limiter's buckets.
    fn buckets(&mut self) -> Vec<(BucketKey, Bucket)> {
        let map = self
            .dp
            .ebpf_mut()
            .map_mut(MAP_RL_BUCKETS)
            .expect("RL_BUCKETS");
        let buckets: HashMap<&mut MapData, BucketKey, Bucket> =
            HashMap::try_from(map).expect("type");
        buckets
            .iter()
            .map(|e| e.expect("reading RL_BUCKETS"))
            .collect()
    }

    /// Runs the client's `syn` through XDP and TC; checks each answers it with a RST from
    /// `from` (XDP_TX, TC redirect).
    fn assert_syn_refused(&self, syn: &[u8], from: [u8; 4]) {
        for (hook, want) in [(Hook::Xdp, XDP_TX), (Hook::Tc, TC_ACT_REDIRECT)] {
            let (ret, out) = self.run(hook, syn);
            assert_eq!(ret, want, "{hook:?}: a shed SYN is answered");
            assert_rst(syn, &out, from, &format!("{hook:?} shed SYN"));
        }
    }

    /// Runs a client's `sent` frame to a VIP through XDP; checks it left DNATed to one of
    /// `among` on `port`, from the client port the backend sees (an ephemeral one moved,
    /// `agent_common::ports`), every other byte as sent, checksums valid. Returns that
    /// backend.
    fn dnat(&self, sent: &[u8], among: &[[u8; 4]], port: u16, what: &str) -> [u8; 4] {
        let (ret, out) = self.run(Hook::Xdp, sent);
        assert_eq!(ret, XDP_PASS, "{what}: return code (frame out: {out:02x?})");
        let dst: [u8; 4] = out[L3 + 16..L3 + 20].try_into().expect("4 bytes");
        assert!(
            among.contains(&dst),
            "{what}: destination {} is not one of {among:?}",
            Ipv4Addr::from(dst)
        );
        assert_eq!(be16(&out, L4_AT + 2), port, "{what}: destination port");
        let mut want = sent.to_vec();
        want[L3 + 16..L3 + 20].copy_from_slice(&dst);
        want[L4_AT + 2..L4_AT + 4].copy_from_slice(&port.to_be_bytes());
        let client_port = nat_port(be16(sent, L4_AT));
        want[L4_AT..L4_AT + 2].copy_from_slice(&client_port.to_be_bytes());
        seal(&mut want);
        assert_eq!(
            out, want,
            "{what}: the rewritten frame, checksums recomputed"
        );
        dst
    }
}

/// Writes the IPv4 header checksum and the TCP/UDP checksum (over the pseudo-header) from
/// scratch.
fn seal(b: &mut [u8]) {
    b[L3 + 10..L3 + 12].fill(0);
    let c = !fold(sum(&b[L3..L4_AT], 0));
    b[L3 + 10..L3 + 12].copy_from_slice(&c.to_be_bytes());
    let proto = b[L3 + 9];
    let at = L4_AT + if proto == 6 { 16 } else { 6 };
    b[at..at + 2].fill(0);
    let len = b.len() - L4_AT;
    let pseudo = sum(&b[L3 + 12..L3 + 20], u32::from(proto) + len as u32);
    let mut c = !fold(sum(&b[L4_AT..], pseudo));
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    b[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

fn tcp(dst: [u8; 4], dport: u16, sport: u16, flags: u8) -> Vec<u8> {
    let mut f = Frame::tcp4(CLIENT, sport, dst, dport);
    f.l4 = L4::Tcp {
        sport,
        dport,
        flags,
    };
    let mut b = f.bytes();
    seal(&mut b);
    b
}

fn udp(dst: [u8; 4], dport: u16, sport: u16) -> Vec<u8> {
    let mut b = Frame::udp4(CLIENT, sport, dst, dport).bytes();
    seal(&mut b);
    b
}

/// Checks the IPv4 header of `out`, an answer to the client: protocol `proto`, from `from`
/// (the address the client sent to), to the client, header checksum valid. Returns what
/// follows the header.
fn answer_l4<'a>(out: &'a [u8], proto: u8, from: [u8; 4], what: &str) -> &'a [u8] {
    let ip = &out[L3..];
    assert_eq!(ip[9], proto, "{what}: IP protocol (6 TCP, 1 ICMP)");
    assert_eq!(
        &ip[12..16],
        &from,
        "{what}: from the address the client sent to"
    );
    assert_eq!(&ip[16..20], &CLIENT, "{what}: to the client");
    assert_eq!(
        fold(sum(&ip[..20], 0)),
        0xffff,
        "{what}: IPv4 header checksum"
    );
    &ip[20..]
}

/// Checks `out` is a RST from `from:port` answering the client's `sent` SYN: addresses and
/// ports swapped, the SYN acknowledged, checksums valid.
fn assert_rst(sent: &[u8], out: &[u8], from: [u8; 4], what: &str) {
    assert_eq!(out.len(), L3 + 40, "{what}: a RST is IP + 20 bytes of TCP");
    let t = answer_l4(out, 6, from, what);
    assert_eq!(be16(t, 0), be16(sent, L4_AT + 2), "{what}: source port");
    assert_eq!(be16(t, 2), be16(sent, L4_AT), "{what}: destination port");
    assert_ne!(t[13] & RST, 0, "{what}: RST flag (flags {:#04x})", t[13]);
    let pseudo = sum(&from, sum(&CLIENT, 6 + 20));
    assert_eq!(fold(sum(t, pseudo)), 0xffff, "{what}: TCP checksum");
}

/// Checks `out` is an ICMP port unreachable from `from` quoting the client's `sent` datagram.
fn assert_unreachable(sent: &[u8], out: &[u8], from: [u8; 4], what: &str) {
    assert_eq!(out.len(), L3 + 56, "{what}: IP + ICMP + quoted 28 bytes");
    let icmp = answer_l4(out, 1, from, what);
    assert_eq!((icmp[0], icmp[1]), (3, 3), "{what}: port unreachable");
    assert_eq!(fold(sum(icmp, 0)), 0xffff, "{what}: ICMP checksum");
    assert_eq!(
        &icmp[8..],
        &sent[L3..L3 + 28],
        "{what}: the quoted datagram"
    );
}

/// MODE_FALLBACK: a new flow goes to a fallback backend (DNAT, counted on the parent), in the
/// companion's round-robin order; a flow established before the switch stays on its
/// backend; back to normal, new flows go to the service's own backends again.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn fallback_sends_new_flows_to_the_companion_and_keeps_established_ones() {
    let mut lab = Lab::new();
    let own = lab.backends("web");
    let fallback = lab.backends("web-fallback");
    let established = lab.dnat(&tcp(WEB_VIP, 80, 40000, SYN), &own, 8080, "SYN, normal");
    assert_eq!(lab.rr("web"), 1, "the service's own schedule gave one flow");

    lab.set_mode("web", MODE_FALLBACK);
    let mut got = Vec::new();
    for port in 40001..40005 {
        let what = format!("SYN from port {port}, fallback");
        got.push(lab.dnat(&tcp(WEB_VIP, 80, port, SYN), &fallback, 8080, &what));
        // The flow's next packet follows its first.
        let again = lab.dnat(&tcp(WEB_VIP, 80, port, ACK), &fallback, 8080, &what);
        assert_eq!(again, *got.last().unwrap(), "{what}: its ACK");
    }
    for b in &fallback {
        assert_eq!(
            got.iter().filter(|g| *g == b).count(),
            2,
            "equal weights: each fallback backend takes 2 of 4 flows: {got:?}"
        );
    }
    assert_eq!(
        lab.rr("web-fallback"),
        4,
        "the companion's schedule gave them"
    );
    assert_eq!(lab.rr("web"), 1, "the service's own schedule is untouched");
    let after = lab.dnat(
        &tcp(WEB_VIP, 80, 40000, ACK),
        &own,
        8080,
        "established flow, fallback",
    );
    assert_eq!(
        after, established,
        "the established flow stays on its backend"
    );
    assert_eq!(
        lab.counters("web"),
        DegradeCounters {
            fallback: 4,
            shed: 0
        },
        "new flows sent to the fallback, counted on the parent"
    );
    assert_eq!(lab.counters("web-fallback"), DegradeCounters::default());

    lab.set_mode("web", MODE_NORMAL);
    lab.dnat(
        &tcp(WEB_VIP, 80, 40010, SYN),
        &own,
        8080,
        "SYN, normal again",
    );
    // A flow opened during the fallback stays there.
    let kept = lab.dnat(
        &tcp(WEB_VIP, 80, 40001, ACK),
        &fallback,
        8080,
        "back to normal",
    );
    assert_eq!(
        kept, got[0],
        "a fallback flow stays on its fallback backend"
    );
    assert_eq!(lab.counters("web").fallback, 4, "no more fallback flows");
}

/// MODE_SHED on balanced services: a new TCP flow is answered with a RST from the VIP, a UDP
/// datagram with an ICMP port unreachable, both counted as shed; an established flow goes on
/// to its backend.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn shed_balanced_service_refuses_new_flows_and_keeps_established_ones() {
    let mut lab = Lab::new();
    let own = lab.backends("web");
    let established = lab.dnat(&tcp(WEB_VIP, 80, 41000, SYN), &own, 8080, "SYN, normal");
    let dns = lab.backends("dns");
    let query = udp(DNS_VIP, 53, 5000);
    lab.dnat(&query, &dns, 5353, "datagram, normal");

    lab.set_mode("web", MODE_SHED);
    lab.set_mode("dns", MODE_SHED);
    let syn = tcp(WEB_VIP, 80, 41001, SYN);
    lab.assert_syn_refused(&syn, WEB_VIP);
    let after = lab.dnat(
        &tcp(WEB_VIP, 80, 41000, ACK),
        &own,
        8080,
        "established flow, shed",
    );
    assert_eq!(
        after, established,
        "the established flow stays on its backend"
    );

    let fresh = udp(DNS_VIP, 53, 5001);
    let (ret, out) = lab.run(Hook::Xdp, &fresh);
    assert_eq!(ret, XDP_TX, "a shed datagram is answered");
    assert_unreachable(&fresh, &out, DNS_VIP, "shed datagram");
    // A UDP flow the datapath tracks is established too.
    lab.dnat(&query, &dns, 5353, "tracked UDP flow, shed");

    assert_eq!(
        lab.counters("web"),
        DegradeCounters {
            fallback: 0,
            shed: 2
        }
    );
    assert_eq!(lab.counters("dns").shed, 1);
}

/// MODE_SHED on a service that is not balanced: SYNs and datagrams are refused (RST, ICMP
/// unreachable) in the main program, established TCP passes, and the agent's own probes
/// (the probe mark, TC egress) are never shed.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn shed_plain_service_refuses_syns_and_datagrams_but_not_probes() {
    let mut lab = Lab::new();
    lab.set_mode("plain", MODE_SHED);
    let syn = tcp(PLAIN, 443, 42000, SYN);
    lab.assert_syn_refused(&syn, PLAIN);
    let datagram = udp(PLAIN, 53, 42001);
    let (ret, out) = lab.run(Hook::Xdp, &datagram);
    assert_eq!(ret, XDP_TX, "a shed datagram is answered");
    assert_unreachable(&datagram, &out, PLAIN, "shed datagram");
    for (hook, want) in [(Hook::Xdp, XDP_PASS), (Hook::Tc, TC_ACT_OK)] {
        let ack = tcp(PLAIN, 443, 42002, ACK);
        assert_eq!(
            lab.run(hook, &ack),
            (want, ack.clone()),
            "{hook:?}: an ACK passes"
        );
    }
    let (ret, out) = lab.run(Hook::TcProbe, &syn);
    assert_eq!((ret, out), (TC_ACT_OK, syn.clone()), "a probe's SYN passes");
    assert_eq!(
        lab.counters("plain"),
        DegradeCounters {
            fallback: 0,
            shed: 3
        },
        "two SYNs and a datagram shed; ACKs and the probe not"
    );
    assert_eq!(
        lab.svc_counter("plain", SVC_PASSED),
        3,
        "the ACKs and the probe passed"
    );
}

/// MODE_FALLBACK on a rate-limited service: the companion's limit (burst 2 at 1/s) is in
/// force with the companion's bucket, drops counted on the parent; normal again, the
/// service's own limit (burst 1000) and bucket are back.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn fallback_applies_the_companions_rate_limit() {
    let mut lab = Lab::new();
    let datagram = udp(LIMITED, 5000, 43000);
    assert_eq!(lab.run(Hook::Xdp, &datagram).0, XDP_PASS, "normal");

    lab.set_mode("limited", MODE_FALLBACK);
    let verdicts = lab.verdicts(&datagram, 4);
    assert_eq!(
        verdicts,
        [XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP],
        "the companion's burst of 2"
    );
    assert_eq!(lab.svc_counter("limited", SVC_DROP_RATE_LIMIT), 2);
    assert_eq!(lab.svc_counter("limited-fallback", SVC_DROP_RATE_LIMIT), 0);
    let companion = lab.id("limited-fallback");
    let owners: Vec<u32> = lab.buckets().iter().map(|(k, _)| k.service_id).collect();
    assert!(
        owners.contains(&companion),
        "the companion id's bucket: {owners:?}"
    );

    lab.set_mode("limited", MODE_NORMAL);
    let verdicts = lab.verdicts(&datagram, 4);
    assert_eq!(verdicts, [XDP_PASS; 4], "the service's own burst of 1000");
    assert_eq!(lab.svc_counter("limited", SVC_DROP_RATE_LIMIT), 2);

    // A companion without a limit of its own (no `fallback.rate_limit`): while the service
    // falls back its own limit stays in force, on its own bucket; the datapath never runs
    // a degraded service unlimited.
    let plain = lab.id("plain");
    let limited = lab.id("limited");
    let own_tat = |lab: &mut Lab| {
        let entries = lab.buckets();
        assert!(
            entries.iter().all(|(k, _)| k.service_id != plain),
            "no bucket of the unlimited companion"
        );
        let own = entries.iter().find(|(k, _)| k.service_id == limited);
        own.expect("the service's own bucket").1.tat
    };
    let before = own_tat(&mut lab);
    lab.link("limited", plain + 1);
    lab.set_mode("limited", MODE_FALLBACK);
    let verdicts = lab.verdicts(&datagram, 4);
    assert_eq!(verdicts, [XDP_PASS; 4], "the service's own burst of 1000");
    // Each admitted packet moves the own bucket's theoretical arrival time on.
    assert!(
        own_tat(&mut lab) > before,
        "the service's own bucket charged while it falls back"
    );
}

/// Fail open: a mode the datapath does not know is normal (own backends, nothing shed), and
/// so is MODE_FALLBACK without a companion or with one that is not balanced.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn unknown_modes_and_missing_companions_are_normal() {
    let mut lab = Lab::new();
    let own = lab.backends("web");
    lab.set_mode("web", 7);
    lab.set_mode("plain", u32::MAX);
    lab.dnat(&tcp(WEB_VIP, 80, 44000, SYN), &own, 8080, "unknown mode");
    let syn = tcp(PLAIN, 443, 44001, SYN);
    assert_eq!(
        lab.run(Hook::Xdp, &syn),
        (XDP_PASS, syn.clone()),
        "unknown mode"
    );

    lab.set_mode("web", MODE_FALLBACK);
    lab.link("web", 0);
    lab.dnat(
        &tcp(WEB_VIP, 80, 44002, SYN),
        &own,
        8080,
        "fallback, no companion",
    );
    let plain = lab.id("plain");
    lab.link("web", plain + 1);
    lab.dnat(
        &tcp(WEB_VIP, 80, 44003, SYN),
        &own,
        8080,
        "fallback, companion not balanced",
    );
    lab.set_mode("limited", MODE_FALLBACK);
    lab.link("limited", 0);
    let datagram = udp(LIMITED, 5000, 44004);
    let verdicts = lab.verdicts(&datagram, 4);
    assert_eq!(
        verdicts, [XDP_PASS; 4],
        "no companion: the service's own limit"
    );
    for name in ["web", "plain", "limited"] {
        assert_eq!(lab.counters(name), DegradeCounters::default(), "{name}");
    }
}

/// A reload (ids kept by name, as the agent assigns them): a service that stays keeps its
/// mode, one that leaves has its mode reset once the switch is done, and one that joins
/// starts normal whatever its id's entry held.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn a_reload_resets_the_modes_of_ids_that_leave_or_join() {
    require_root("degradation");
    let text = |names: &[&str]| {
        let mut p = String::from("version: 1\ninterfaces:\n  - name: lo\nservices:\n");
        for (i, n) in names.iter().enumerate() {
            p += &format!("  - name: {n}\n    match: {{ address: 198.18.5.{i}/32 }}\n");
        }
        config::compile(&config::load_str(&p, "reload.yaml").expect("test policy"))
    };
    let first = text(&["stays", "leaves"]);
    let mut dp = Datapath::load_for(&first).expect("loading the datapath");
    dp.apply(&first).expect("writing the maps");
    let mut modes = dp.degrade_maps().expect("degradation maps");
    let id = |c: &Compiled, name: &str| c.services.iter().find(|s| s.name == name).unwrap().id;
    modes
        .write_mode(id(&first, "stays"), MODE_FALLBACK)
        .unwrap();
    modes.write_mode(id(&first, "leaves"), MODE_SHED).unwrap();

    let limits = config::ids::Limits {
        services: dp.sizes().services,
        backends: dp.sizes().backends,
    };
    let second = text(&["stays", "joins"]);
    let live = dp.live_ids(&second).expect("live ids");
    let (second, _) = live.assign(&second, limits).expect("ids");
    let joins = id(&second, "joins");
    assert!(
        joins != id(&first, "stays") && joins != id(&first, "leaves"),
        "a new id for the new service"
    );
    // What a service that held this id long ago left behind.
    modes.write_mode(joins, MODE_SHED).unwrap();

    let staged = dp.stage(&second).expect("stage");
    assert_eq!(
        modes.read_mode(joins).unwrap(),
        MODE_NORMAL,
        "joins: reset at the stage"
    );
    assert_eq!(
        modes.read_mode(id(&first, "leaves")).unwrap(),
        MODE_SHED,
        "leaves: still live until the switch"
    );
    dp.switch(staged).expect("switch");
    dp.retire_backends(&second).expect("retire");
    assert_eq!(
        modes.read_mode(id(&first, "leaves")).unwrap(),
        MODE_NORMAL,
        "leaves"
    );
    assert_eq!(
        modes.read_mode(id(&first, "stays")).unwrap(),
        MODE_FALLBACK,
        "stays"
    );
    assert_eq!(modes.read_mode(joins).unwrap(), MODE_NORMAL, "joins");
}

/// The policy's own companion (`degradation.fallback`, compiled as the agent does): no link
/// written by the test. In fallback, a new flow goes to the fallback backend and the
/// fallback's `rate_limit` is in force; normal, the service's own backends and limit.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn the_compiled_companion_takes_new_flows_and_its_limit_applies() {
    const COMPANION_POLICY: &str = r#"version: 1
interfaces:
  - name: lo
services:
  - name: shop
    match: { address: 198.18.0.110, port: 80, protocol: tcp }
    backends:
      - { address: "198.18.2.1:8080", weight: 100 }
    load_balancing: { algorithm: maglev, vip: true }
    rate_limit: { key: service, rate: 1000000/s, burst: 1000 }
    health_check: { type: tcp, interval: 1s, timeout: 200ms }
    degradation:
      conditions:
        - { type: availability, threshold: 50%, window: 5s }
      fallback:
        strategy: static_response
        backends:
          - address: 198.18.9.110:8080
        rate_limit: { key: service, rate: 1/s, burst: 2 }
      recover_after: 1m
"#;
    let mut lab = Lab::with_policy(COMPANION_POLICY);
    let shop = lab.id("shop");
    let linked = lab.compiled.services.iter().find(|s| s.id == shop).unwrap();
    assert_ne!(
        linked.config.fallback, 0,
        "the compiled policy links the companion"
    );
    const SHOP: [u8; 4] = [198, 18, 0, 110];
    let own = [[198, 18, 2, 1]];
    let fallback = [[198, 18, 9, 110]];
    lab.dnat(&tcp(SHOP, 80, 45000, SYN), &own, 8080, "normal");
    lab.set_mode("shop", MODE_FALLBACK);
    lab.dnat(&tcp(SHOP, 80, 45001, SYN), &fallback, 8080, "fallback, 1");
    lab.dnat(&tcp(SHOP, 80, 45002, SYN), &fallback, 8080, "fallback, 2");
    let third = tcp(SHOP, 80, 45003, SYN);
    assert_eq!(
        lab.run(Hook::Xdp, &third).0,
        XDP_DROP,
        "the fallback's burst of 2 is spent"
    );
    assert_eq!(lab.svc_counter("shop", SVC_DROP_RATE_LIMIT), 1);
    assert_eq!(lab.counters("shop").fallback, 2);
    lab.set_mode("shop", MODE_NORMAL);
    lab.dnat(&third, &own, 8080, "normal again");
}
