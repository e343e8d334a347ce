//! Breaker enforcement in the datapath through BPF_PROG_TEST_RUN: backend states written to
//! the real `BACKENDS` map, crafted frames run through the real XDP and TC programs, and the
//! answers they produce (RST, ICMP unreachable) parsed back and checked byte by byte,
//! checksums included. Needs root; run by `cargo xtask test`.

mod packets;
mod support;

use std::net::{Ipv4Addr, Ipv6Addr};

use agent::{config, datapath::Datapath};
use agent_common::{
    Counter,
    breaker::{
        AdmittedFlow, BSTAT_ADMITTED, BSTAT_CUT, BSTAT_DROP, BSTAT_REFUSED, BSTAT_REJECT_ICMP,
        BSTAT_REJECT_RST, BSTAT_SLOTS, BSTAT_SYNACK, BSTAT_TRIAL, BackendKey, BackendState,
        F_CLOSE_EXISTING, F_DROP, F_PASSIVE, FlowKey, PendingSyn, STATE_CLOSED, STATE_HALF_OPEN,
        STATE_OPEN, backend_slot, port_bit,
    },
    classify::v4_mapped,
    maps::{
        MAP_BACKEND_PORTS, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_HALF_OPEN_FLOWS, MAP_PENDING_SYNS,
    },
};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use packets::{EXT_DSTOPTS, Ext, Frame, L3, L4};
use support::{
    ACK, Hook, RST, SYN, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX, be16,
    be32, folds_to_zero, require_root, sum,
};

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const BACKEND: [u8; 4] = [198, 18, 2, 10];
const PORT: u16 = 8080;

const POLICY: &str = "version: 1\ninterfaces:\n  - name: lo\nservices:\n  - name: any\n    match: { address: 203.0.113.0/24 }\n";

struct Harness {
    dp: Datapath,
}

impl Harness {
    fn new() -> Harness {
        require_root("breaker");
        let policy = config::load_str(POLICY, "breaker-test.yaml").expect("test policy");
        let compiled = config::compile(&policy);
        let mut dp = Datapath::load(compiled.max_keys).expect("loading the datapath");
        dp.apply(&compiled).expect("writing the maps");
        Harness { dp }
    }

    fn backends(&mut self) -> HashMap<&mut MapData, BackendKey, BackendState> {
        let map = self.dp.ebpf_mut().map_mut(MAP_BACKENDS).expect("BACKENDS");
        HashMap::try_from(map).expect("BACKENDS type")
    }

    /// Writes a backend's state, and its port's bit in the prefilter as the agent does.
    fn set(&mut self, key: BackendKey, state: BackendState) {
        self.backends()
            .insert(key, state, 0)
            .expect("writing BACKENDS");
        let map = self
            .dp
            .ebpf_mut()
            .map_mut(MAP_BACKEND_PORTS)
            .expect("BACKEND_PORTS");
        let mut ports: Array<&mut MapData, u32> = Array::try_from(map).expect("type");
        let (word, mask) = port_bit(key.port);
        let old = ports.get(&word, 0).expect("reading BACKEND_PORTS");
        ports
            .set(word, old | mask, 0)
            .expect("writing BACKEND_PORTS");
    }

    fn get(&mut self, key: BackendKey) -> BackendState {
        self.backends().get(&key, 0).expect("reading BACKENDS")
    }

    fn counter(&mut self, id: u32, slot: u32) -> u64 {
        let map = self
            .dp
            .ebpf_mut()
            .map_mut(MAP_BACKEND_STATS)
            .expect("BACKEND_STATS");
        let stats: PerCpuArray<&mut MapData, Counter> = PerCpuArray::try_from(map).expect("type");
        stats
            .get(&backend_slot(id, slot), 0)
            .expect("reading BACKEND_STATS")
            .iter()
            .map(|c| c.packets)
            .sum()
    }

    fn counters(&mut self, id: u32) -> Vec<u64> {
        (0..BSTAT_SLOTS).map(|s| self.counter(id, s)).collect()
    }

    fn pending(&mut self, key: &FlowKey) -> Option<PendingSyn> {
        let map = self
            .dp
            .ebpf_mut()
            .map_mut(MAP_PENDING_SYNS)
            .expect("PENDING_SYNS");
        let m: HashMap<&mut MapData, FlowKey, PendingSyn> = HashMap::try_from(map).expect("type");
        m.get(key, 0).ok()
    }

    fn admitted(&mut self, key: &FlowKey) -> Option<AdmittedFlow> {
        let map = self
            .dp
            .ebpf_mut()
            .map_mut(MAP_HALF_OPEN_FLOWS)
            .expect("HALF_OPEN_FLOWS");
        let m: HashMap<&mut MapData, FlowKey, AdmittedFlow> = HashMap::try_from(map).expect("type");
        m.get(key, 0).ok()
    }

    /// Runs `frame` through `hook`; returns the return code and the frame as it left.
    fn run(&self, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
        support::run(&self.dp, hook, frame)
    }
}

fn key4(proto: u8) -> BackendKey {
    BackendKey {
        addr: v4_mapped(BACKEND),
        port: PORT,
        proto,
        _pad: 0,
    }
}

fn state(state: u32, flags: u32, id: u32) -> BackendState {
    BackendState {
        state,
        flags,
        quota: if state == STATE_CLOSED { u32::MAX } else { 0 },
        epoch: 0,
        id,
        ..BackendState::default()
    }
}

/// A TCP segment from the client to the backend (18 bytes of payload, seq 1, ack 0).
fn tcp(sport: u16, flags: u8) -> Frame {
    let mut f = Frame::tcp4(CLIENT, sport, BACKEND, PORT);
    f.l4 = L4::Tcp {
        sport,
        dport: PORT,
        flags,
    };
    f
}

/// Sets the sequence and acknowledgment numbers of the TCP header at `l4`.
fn with_seq(mut b: Vec<u8>, l4: usize, seq: u32, ack: u32) -> Vec<u8> {
    b[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
    b[l4 + 8..l4 + 12].copy_from_slice(&ack.to_be_bytes());
    b
}

/// Checks `out` is the IPv4 RST answering `sent` (L3 at `l3`): MACs and addresses swapped,
/// valid checksums; returns (seq, ack, flags).
fn parse_rst_v4(sent: &[u8], out: &[u8], l3: usize) -> (u32, u32, u8) {
    assert_eq!(
        out.len(),
        l3 + 40,
        "a RST is IP + 20 bytes of TCP: {out:02x?}"
    );
    assert_eq!(&out[0..6], &sent[6..12], "destination MAC = sender's");
    assert_eq!(
        &out[6..12],
        &sent[0..6],
        "source MAC = the one it was sent to"
    );
    assert_eq!(&out[12..l3], &sent[12..l3], "VLAN tags and ether type kept");
    let ip = &out[l3..];
    assert_eq!(ip[0], 0x45);
    assert_eq!(be16(ip, 2), 40, "total length");
    assert_eq!(ip[9], 6, "protocol TCP");
    assert_eq!(&ip[12..16], &BACKEND, "from the backend");
    assert_eq!(&ip[16..20], &CLIENT, "to the client");
    assert!(folds_to_zero(sum(&ip[..20], 0)), "IPv4 header checksum");
    let t = &ip[20..];
    let sent_l4 = l3 + 20;
    assert_eq!(
        be16(t, 0),
        be16(sent, sent_l4 + 2),
        "source port = refused port"
    );
    assert_eq!(
        be16(t, 2),
        be16(sent, sent_l4),
        "destination port = client's"
    );
    let pseudo = sum(&BACKEND, sum(&CLIENT, 6 + 20));
    assert!(folds_to_zero(sum(t, pseudo)), "TCP checksum");
    (be32(t, 4), be32(t, 8), t[13])
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn closed_backend_passes_and_counts_new_flows() {
    let mut h = Harness::new();
    h.set(key4(6), state(STATE_CLOSED, 0, 1));
    for hook in [Hook::Xdp, Hook::Tc] {
        let f = tcp(40000, SYN).bytes();
        let (ret, out) = h.run(hook, &f);
        assert_eq!(ret, hook.pass(), "{hook:?}");
        assert_eq!(out, f, "{hook:?}: a passed frame is unchanged");
        // Established traffic is not a new flow.
        h.run(hook, &tcp(40000, ACK).bytes());
    }
    assert_eq!(h.counter(1, BSTAT_ADMITTED), 2, "one SYN per hook");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn open_backend_answers_a_syn_with_a_rst_that_acknowledges_it() {
    let mut h = Harness::new();
    h.set(key4(6), state(STATE_OPEN, 0, 2));
    for (hook, want) in [(Hook::Xdp, XDP_TX), (Hook::Tc, TC_ACT_REDIRECT)] {
        let f = with_seq(tcp(40001, SYN).bytes(), 34, 0xffff_fff0, 0);
        let (ret, out) = h.run(hook, &f);
        assert_eq!(ret, want, "{hook:?}: sent back");
        let (seq, ack, flags) = parse_rst_v4(&f, &out, 14);
        assert_eq!(flags, RST | ACK, "{hook:?}");
        assert_eq!(seq, 0, "{hook:?}");
        // SYN counts one, plus 18 bytes of payload, wrapping.
        assert_eq!(ack, 0xffff_fff0u32.wrapping_add(19), "{hook:?}");
    }
    assert_eq!(h.counter(2, BSTAT_REJECT_RST), 2);
    assert_eq!(h.counter(2, BSTAT_ADMITTED), 0);
    // A retransmitted SYN of a refused flow is refused again, not let through.
    let (ret, _) = h.run(Hook::Xdp, &tcp(40001, SYN).bytes());
    assert_eq!(ret, XDP_TX);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn open_backend_behind_vlan_tags_keeps_them_in_the_answer() {
    let mut h = Harness::new();
    h.set(key4(6), state(STATE_OPEN, 0, 3));
    let f = tcp(40002, SYN)
        .with_vlans(&[100, 200], packets::ETH_P_8021AD)
        .bytes();
    let (ret, out) = h.run(Hook::Xdp, &f);
    assert_eq!(ret, XDP_TX);
    parse_rst_v4(&f, &out, 22);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn established_flows_pass_an_open_breaker_unless_close_existing() {
    let mut h = Harness::new();
    h.set(key4(6), state(STATE_OPEN, 0, 4));
    let f = with_seq(tcp(40003, ACK).bytes(), 34, 500, 7777);
    assert_eq!(h.run(Hook::Tc, &f).0, TC_ACT_OK);
    assert_eq!(h.run(Hook::Xdp, &f).0, XDP_PASS);

    h.set(key4(6), state(STATE_OPEN, F_CLOSE_EXISTING, 4));
    for (hook, want) in [(Hook::Xdp, XDP_TX), (Hook::Tc, TC_ACT_REDIRECT)] {
        let (ret, out) = h.run(hook, &f);
        assert_eq!(ret, want, "{hook:?}");
        let (seq, _, flags) = parse_rst_v4(&f, &out, 14);
        assert_eq!(flags, RST, "{hook:?}: a RST without ACK");
        assert_eq!(
            seq, 7777,
            "{hook:?}: in sequence: the ACK number the client sent"
        );
    }
    // The client's own RST is never answered with one.
    let (ret, _) = h.run(Hook::Xdp, &tcp(40003, RST | ACK).bytes());
    assert_eq!(ret, XDP_DROP);
    assert_eq!(h.counter(4, BSTAT_CUT), 2);
    assert_eq!(h.counter(4, BSTAT_DROP), 1);

    // on_open: drop cuts by dropping.
    h.set(key4(6), state(STATE_OPEN, F_CLOSE_EXISTING | F_DROP, 4));
    assert_eq!(h.run(Hook::Tc, &f).0, TC_ACT_SHOT);
    assert_eq!(h.run(Hook::Xdp, &tcp(40004, SYN).bytes()).0, XDP_DROP);
    assert_eq!(h.counter(4, BSTAT_DROP), 3);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn a_backend_port_missing_from_the_prefilter_is_not_enforced() {
    let mut h = Harness::new();
    // The entry alone, without its port bit: the datapath never looks it up.
    h.backends()
        .insert(key4(6), state(STATE_OPEN, 0, 12), 0)
        .expect("writing BACKENDS");
    assert_eq!(h.run(Hook::Xdp, &tcp(40010, SYN).bytes()).0, XDP_PASS);
    h.set(key4(6), state(STATE_OPEN, 0, 12));
    assert_eq!(h.run(Hook::Xdp, &tcp(40010, SYN).bytes()).0, XDP_TX);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn on_open_drop_drops_new_flows() {
    let mut h = Harness::new();
    h.set(key4(6), state(STATE_OPEN, F_DROP, 5));
    h.set(key4(17), state(STATE_OPEN, F_DROP, 5));
    assert_eq!(h.run(Hook::Xdp, &tcp(40005, SYN).bytes()).0, XDP_DROP);
    assert_eq!(h.run(Hook::Tc, &tcp(40005, SYN).bytes()).0, TC_ACT_SHOT);
    let udp = Frame::udp4(CLIENT, 5353, BACKEND, PORT).bytes();
    assert_eq!(h.run(Hook::Tc, &udp).0, TC_ACT_SHOT);
    assert_eq!(h.counter(5, BSTAT_DROP), 3);
    assert_eq!(h.counter(5, BSTAT_REJECT_RST), 0);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn open_udp_backend_answers_with_icmp_port_unreachable() {
    let mut h = Harness::new();
    h.set(key4(17), state(STATE_OPEN, 0, 6));
    // The TCP key is not there: TCP to the same port is not this breaker's business.
    assert_eq!(h.run(Hook::Xdp, &tcp(40006, SYN).bytes()).0, XDP_PASS);
    for (hook, want) in [(Hook::Xdp, XDP_TX), (Hook::Tc, TC_ACT_REDIRECT)] {
        let f = Frame::udp4(CLIENT, 5353, BACKEND, PORT).bytes();
        let (ret, out) = h.run(hook, &f);
        assert_eq!(ret, want, "{hook:?}");
        assert_eq!(out.len(), 14 + 56, "{hook:?}: IP + ICMP + quoted 28 bytes");
        let ip = &out[14..];
        assert_eq!(ip[9], 1, "ICMP");
        assert_eq!(&ip[12..16], &BACKEND);
        assert_eq!(&ip[16..20], &CLIENT);
        assert!(folds_to_zero(sum(&ip[..20], 0)), "IPv4 header checksum");
        let icmp = &ip[20..];
        assert_eq!((icmp[0], icmp[1]), (3, 3), "port unreachable");
        assert!(folds_to_zero(sum(icmp, 0)), "ICMP checksum");
        assert_eq!(
            &icmp[8..],
            &f[14..14 + 28],
            "quotes the datagram's first 28 bytes"
        );
    }
    assert_eq!(h.counter(6, BSTAT_REJECT_ICMP), 2);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn open_ipv6_backend_answers_rst_and_icmpv6() {
    let mut h = Harness::new();
    let client: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let backend: Ipv6Addr = "2001:db8::2:10".parse().unwrap();
    for proto in [6, 17] {
        h.set(
            BackendKey {
                addr: backend.octets(),
                port: PORT,
                proto,
                _pad: 0,
            },
            state(STATE_OPEN, 0, 7),
        );
    }
    let syn = Frame::v6(
        client,
        backend,
        L4::Tcp {
            sport: 40007,
            dport: PORT,
            flags: SYN,
        },
    )
    .bytes();
    let (ret, out) = h.run(Hook::Tc, &syn);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 14 + 60);
    let ip = &out[14..];
    assert_eq!(be16(ip, 4), 20, "payload length");
    assert_eq!(&ip[8..24], &backend.octets());
    assert_eq!(&ip[24..40], &client.octets());
    let t = &ip[40..];
    assert_eq!(t[13], RST | ACK);
    assert_eq!(be32(t, 8), 1 + 1 + 18, "acknowledges SYN and payload");
    let pseudo = sum(&ip[8..40], 6 + 20);
    assert!(folds_to_zero(sum(t, pseudo)), "TCP checksum over IPv6");

    let udp = Frame::v6(
        client,
        backend,
        L4::Udp {
            sport: 5353,
            dport: PORT,
        },
    )
    .bytes();
    let (ret, out) = h.run(Hook::Xdp, &udp);
    assert_eq!(ret, XDP_TX);
    assert_eq!(out.len(), 14 + 96);
    let ip = &out[14..];
    assert_eq!(ip[6], 58, "ICMPv6");
    let icmp = &ip[40..];
    assert_eq!((icmp[0], icmp[1]), (1, 4), "port unreachable");
    let pseudo = sum(&ip[8..40], 58 + 56);
    assert!(folds_to_zero(sum(icmp, pseudo)), "ICMPv6 checksum");
    assert_eq!(&icmp[8..], &udp[14..14 + 48]);

    // An extension header: no answer is built, the SYN is dropped (never passed).
    let mut with_ext = Frame::v6(
        client,
        backend,
        L4::Tcp {
            sport: 40008,
            dport: PORT,
            flags: SYN,
        },
    );
    with_ext.l3 = L3::V6 {
        src: client,
        dst: backend,
        ext: vec![Ext {
            kind: EXT_DSTOPTS,
            len: 8,
            frag_offset: 0,
        }],
    };
    assert_eq!(h.run(Hook::Xdp, &with_ext.bytes()).0, XDP_DROP);
    assert_eq!(h.counter(7, BSTAT_DROP), 1);
    assert_eq!(h.counter(7, BSTAT_REJECT_RST), 1);
    assert_eq!(h.counter(7, BSTAT_REJECT_ICMP), 1);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn ipv4_options_cannot_be_answered_and_are_dropped() {
    let mut h = Harness::new();
    h.set(key4(6), state(STATE_OPEN, 0, 8));
    let mut f = tcp(40009, SYN);
    f.l3 = L3::V4 {
        src: Ipv4Addr::from(CLIENT),
        dst: Ipv4Addr::from(BACKEND),
        ihl: 6,
        frag: 0,
    };
    assert_eq!(h.run(Hook::Tc, &f.bytes()).0, TC_ACT_SHOT);
    assert_eq!(h.counter(8, BSTAT_DROP), 1);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn half_open_admits_exactly_the_quota_and_remembers_admitted_flows() {
    let mut h = Harness::new();
    let mut st = state(STATE_HALF_OPEN, 0, 9);
    st.quota = 2;
    st.epoch = 1;
    h.set(key4(6), st);
    let verdicts: Vec<u32> = (0..5)
        .map(|i| h.run(Hook::Tc, &tcp(41000 + i, SYN).bytes()).0)
        .collect();
    assert_eq!(
        verdicts,
        [
            TC_ACT_OK,
            TC_ACT_OK,
            TC_ACT_REDIRECT,
            TC_ACT_REDIRECT,
            TC_ACT_REDIRECT
        ]
    );
    assert_eq!(
        h.get(key4(6)).quota,
        0,
        "the quota was counted down in the map"
    );
    assert_eq!(h.counter(9, BSTAT_TRIAL), 2);
    // A retransmitted SYN of an admitted flow passes without quota; its data passes too.
    assert_eq!(h.run(Hook::Tc, &tcp(41000, SYN).bytes()).0, TC_ACT_OK);
    assert_eq!(h.run(Hook::Tc, &tcp(41001, ACK).bytes()).0, TC_ACT_OK);
    assert_eq!(
        h.counter(9, BSTAT_TRIAL),
        2,
        "no second trial for a retransmission"
    );
    let flow = FlowKey {
        client: v4_mapped(CLIENT),
        backend: v4_mapped(BACKEND),
        client_port: 41000,
        backend_port: PORT,
        proto: 6,
        _pad: [0; 3],
    };
    assert_eq!(h.admitted(&flow).map(|f| f.epoch), Some(1));

    // The next half-open period (new epoch, fresh quota): the old admission does not count.
    st.epoch = 2;
    st.quota = 1;
    h.set(key4(6), st);
    assert_eq!(h.run(Hook::Tc, &tcp(41000, SYN).bytes()).0, TC_ACT_OK);
    assert_eq!(h.run(Hook::Tc, &tcp(41001, SYN).bytes()).0, TC_ACT_REDIRECT);
    assert_eq!(h.counter(9, BSTAT_TRIAL), 3);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn probes_carrying_the_mark_pass_an_open_breaker() {
    let mut h = Harness::new();
    h.set(key4(6), state(STATE_OPEN, F_CLOSE_EXISTING, 10));
    let syn = tcp(42000, SYN).bytes();
    let (ret, out) = h.run(Hook::TcProbe, &syn);
    assert_eq!(ret, TC_ACT_OK, "the probe's SYN");
    assert_eq!(out, syn);
    assert_eq!(h.run(Hook::TcProbe, &tcp(42000, ACK).bytes()).0, TC_ACT_OK);
    // The same SYN without the mark is refused.
    assert_eq!(h.run(Hook::Tc, &syn).0, TC_ACT_REDIRECT);
    assert_eq!(
        h.counters(10)[BSTAT_ADMITTED as usize],
        0,
        "probes are not counted"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn passive_detection_pairs_answers_with_tracked_syns() {
    let mut h = Harness::new();
    h.set(key4(6), state(STATE_CLOSED, F_PASSIVE, 11));
    let flow = |port| FlowKey {
        client: v4_mapped(CLIENT),
        backend: v4_mapped(BACKEND),
        client_port: port,
        backend_port: PORT,
        proto: 6,
        _pad: [0; 3],
    };
    // Backend -> client answers, as the XDP program sees them coming in.
    let answer = |port, flags| {
        let mut f = Frame::tcp4(BACKEND, PORT, CLIENT, port);
        f.l4 = L4::Tcp {
            sport: PORT,
            dport: port,
            flags,
        };
        f.bytes()
    };

    assert_eq!(h.run(Hook::Tc, &tcp(43000, SYN).bytes()).0, TC_ACT_OK);
    let first = h.pending(&flow(43000)).expect("the SYN is tracked").at_ns;
    // A retransmission keeps the first time.
    h.run(Hook::Tc, &tcp(43000, SYN).bytes());
    assert_eq!(h.pending(&flow(43000)).map(|p| p.at_ns), Some(first));
    assert_eq!(h.run(Hook::Xdp, &answer(43000, SYN | ACK)).0, XDP_PASS);
    assert!(h.pending(&flow(43000)).is_none(), "answered");
    assert_eq!(h.counter(11, BSTAT_SYNACK), 1);

    h.run(Hook::Tc, &tcp(43001, SYN).bytes());
    h.run(Hook::Xdp, &answer(43001, RST | ACK));
    assert_eq!(h.counter(11, BSTAT_REFUSED), 1);
    // An answer nobody asked for (a probe's, a duplicate) counts nothing.
    h.run(Hook::Xdp, &answer(43001, RST | ACK));
    h.run(Hook::Xdp, &answer(43002, SYN | ACK));
    assert_eq!(h.counter(11, BSTAT_REFUSED), 1);
    assert_eq!(h.counter(11, BSTAT_SYNACK), 1);

    // Unanswered SYNs stay for the agent to time out.
    h.run(Hook::Tc, &tcp(43003, SYN).bytes());
    assert!(h.pending(&flow(43003)).is_some());
    // Without F_PASSIVE nothing is tracked.
    h.set(key4(6), state(STATE_CLOSED, 0, 11));
    h.run(Hook::Tc, &tcp(43004, SYN).bytes());
    assert!(h.pending(&flow(43004)).is_none());
}
