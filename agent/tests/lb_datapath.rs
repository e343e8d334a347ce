//! L4 load balancing in the datapath through BPF_PROG_TEST_RUN: a policy with balanced
//! services compiled and written the way the agent does it (`apply`, `mark_ports`,
//! `balancer::install`), frames to a VIP run through the real XDP and TC egress programs,
//! and the frames that come out checked byte by byte: destination rewritten to a backend
//! (DNAT), a backend's reply rewritten back to the VIP (reverse NAT), every other byte
//! untouched, and the checksums recomputed here from scratch (IPv4 header; TCP and UDP over
//! their pseudo-header), never with the datapath's own arithmetic. Needs root.

mod packets;
mod support;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use agent::{
    config::{Compiled, CompiledLb},
    datapath::{Datapath, LbMaps},
};
use agent_common::ports::nat_port;
use packets::{ETH_P_IP, ETH_P_IPV6, Frame, IPPROTO_TCP, IPPROTO_UDP, L4};
use support::{ACK, Hook, SYN, be16, fold, load_balanced, require_root, sum};

/// Frames here are untagged: L3 starts after the Ethernet header.
const ETH_LEN: usize = 14;

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// Three balanced services, two backends each, equal weights, Maglev.
const POLICY: &str = r#"version: 1
interfaces:
  - name: lo
services:
  - name: web4
    match: { address: 198.18.0.100, port: 80, protocol: tcp }
    backends:
      - { address: "198.18.2.1:8080", weight: 100 }
      - { address: "198.18.2.2:8080", weight: 100 }
    load_balancing: { algorithm: maglev, table_size: 1009 }
  - name: web6
    match: { address: "2001:db8::100", port: 80, protocol: tcp }
    backends:
      - { address: "[2001:db8::2:1]:8080", weight: 100 }
      - { address: "[2001:db8::2:2]:8080", weight: 100 }
    load_balancing: { algorithm: maglev, table_size: 1009 }
  - name: dns4
    match: { address: 198.18.0.53, port: 53, protocol: udp }
    backends:
      - { address: "198.18.3.1:5353", weight: 100 }
      - { address: "198.18.3.2:5353", weight: 100 }
    load_balancing: { algorithm: maglev, table_size: 1009 }
"#;

/// L4 of a test frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp(u8),
    Udp,
    /// UDP over IPv4 with checksum 0 ("none").
    UdpNoChecksum,
}

/// A datapath loaded and set up the way the agent does it (`run.rs`), before attaching.
struct Lab {
    dp: Datapath,
    compiled: Compiled,
    maps: LbMaps,
}

impl Lab {
    fn new() -> Lab {
        require_root("lb");
        let (dp, compiled, maps) = load_balanced(POLICY, "lb-test.yaml");
        assert_eq!(compiled.lb.len(), 3, "three balanced services");
        Lab { dp, compiled, maps }
    }

    fn svc(&self, name: &str) -> &CompiledLb {
        self.compiled
            .lb
            .iter()
            .find(|s| s.name == name)
            .expect("a balanced service of the policy")
    }

    fn backends(&self, name: &str) -> Vec<SocketAddr> {
        self.svc(name).backends.iter().map(|b| b.address).collect()
    }

    /// Runs `frame` through `hook`; returns the return code and the frame as it left.
    fn run(&self, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
        support::run(&self.dp, hook, frame)
    }

    /// Runs a forward packet `sent` (client to the VIP of `svc`) through `hook` and checks it
    /// left DNATed toward one of the service's backends, from the client port the backend
    /// sees ([`moved`]), intact otherwise, with valid checksums. Returns that backend.
    fn dnat(&self, hook: Hook, svc: &str, sent: &[u8]) -> SocketAddr {
        let (ret, out) = self.run(hook, sent);
        let what = format!("{hook:?} {svc} DNAT of {:?}", tuple(sent));
        assert_eq!(ret, hook.pass(), "{what}: return code");
        let got = tuple(&out);
        let backends = self.backends(svc);
        assert!(
            backends.contains(&got.dst),
            "{what}: destination {} is not a backend of {backends:?}; frame out: {out:02x?}",
            got.dst
        );
        let src = moved(tuple(sent).src);
        assert_frame(&out, &rewritten(sent, Some(src), Some(got.dst)), &what);
        got.dst
    }

    /// Runs a backend's reply `sent` (to the client port the backend sees) through `hook` and
    /// checks its source left rewritten to `vip` and its destination to `client`, intact
    /// otherwise, with valid checksums.
    fn reverse(&self, hook: Hook, sent: &[u8], vip: SocketAddr, client: SocketAddr) {
        let (ret, out) = self.run(hook, sent);
        let what = format!("{hook:?} reverse NAT of {:?}", tuple(sent));
        assert_eq!(ret, hook.pass(), "{what}: return code");
        assert_frame(&out, &rewritten(sent, Some(vip), Some(client)), &what);
    }
}

/// An untagged Ethernet frame from `src` to `dst` with 18 bytes of payload (TCP seq 1,
/// ack 0) and every checksum computed from scratch (except for `UdpNoChecksum`).
fn frame(src: SocketAddr, dst: SocketAddr, proto: Proto) -> Vec<u8> {
    frame_with_payload(src, dst, proto, 18)
}

fn frame_with_payload(src: SocketAddr, dst: SocketAddr, proto: Proto, payload: usize) -> Vec<u8> {
    let (sport, dport) = (src.port(), dst.port());
    let l4 = match proto {
        Proto::Tcp(flags) => L4::Tcp {
            sport,
            dport,
            flags,
        },
        Proto::Udp | Proto::UdpNoChecksum => L4::Udp { sport, dport },
    };
    let mut f = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut f = Frame::udp4(s.octets(), sport, d.octets(), dport);
            f.l4 = l4;
            f
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => Frame::v6(s, d, l4),
        _ => panic!("one family per frame: {src} -> {dst}"),
    };
    f.payload = payload;
    let mut b = f.bytes();
    seal(&mut b, proto != Proto::UdpNoChecksum);
    b
}

/// Writes the IPv4 header checksum and (if `l4_csum`) the TCP/UDP checksum, from scratch.
fn seal(b: &mut [u8], l4_csum: bool) {
    let h = headers(b);
    if !h.v6 {
        let c = ipv4_header_checksum(b);
        b[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
    }
    if l4_csum {
        let c = l4_checksum(b);
        b[h.csum_at..h.csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

/// Where things are in a frame (untagged; IPv4 without options or IPv6 without extension
/// headers; TCP or UDP).
#[derive(Clone, Copy, Debug)]
struct Headers {
    v6: bool,
    proto: u8,
    /// Offset of the L4 header.
    l4: usize,
    /// Offset of the L4 checksum field.
    csum_at: usize,
}

fn headers(b: &[u8]) -> Headers {
    let (v6, proto, l4) = match be16(b, 12) {
        ETH_P_IP => {
            assert_eq!(b[ETH_LEN], 0x45, "IPv4 without options: {b:02x?}");
            (false, b[ETH_LEN + 9], ETH_LEN + 20)
        }
        ETH_P_IPV6 => (true, b[ETH_LEN + 6], ETH_LEN + 40),
        t => panic!("not IP (ether type {t:#06x}): {b:02x?}"),
    };
    let csum_at = match proto {
        IPPROTO_TCP => l4 + 16,
        IPPROTO_UDP => l4 + 6,
        p => panic!("not TCP or UDP (protocol {p}): {b:02x?}"),
    };
    Headers {
        v6,
        proto,
        l4,
        csum_at,
    }
}

/// A frame's addresses and ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuple {
    src: SocketAddr,
    dst: SocketAddr,
}

fn tuple(b: &[u8]) -> Tuple {
    let h = headers(b);
    let (src, dst): (IpAddr, IpAddr) = if h.v6 {
        let a = |at: usize| -> [u8; 16] { b[at..at + 16].try_into().expect("16 bytes") };
        (
            Ipv6Addr::from(a(ETH_LEN + 8)).into(),
            Ipv6Addr::from(a(ETH_LEN + 24)).into(),
        )
    } else {
        let a = |at: usize| -> [u8; 4] { b[at..at + 4].try_into().expect("4 bytes") };
        (
            Ipv4Addr::from(a(ETH_LEN + 12)).into(),
            Ipv4Addr::from(a(ETH_LEN + 16)).into(),
        )
    };
    Tuple {
        src: SocketAddr::new(src, be16(b, h.l4)),
        dst: SocketAddr::new(dst, be16(b, h.l4 + 2)),
    }
}

/// `sent` with its source and/or destination (address and port) replaced and its checksums
/// recomputed from scratch: the frame the datapath should produce. An IPv4 UDP checksum of 0
/// stays 0.
fn rewritten(sent: &[u8], src: Option<SocketAddr>, dst: Option<SocketAddr>) -> Vec<u8> {
    let mut b = sent.to_vec();
    let h = headers(&b);
    let mut put = |addr: SocketAddr, addr_v4: usize, addr_v6: usize, port_at: usize| {
        match addr.ip() {
            IpAddr::V4(a) if !h.v6 => {
                b[ETH_LEN + addr_v4..ETH_LEN + addr_v4 + 4].copy_from_slice(&a.octets())
            }
            IpAddr::V6(a) if h.v6 => {
                b[ETH_LEN + addr_v6..ETH_LEN + addr_v6 + 16].copy_from_slice(&a.octets())
            }
            _ => panic!("{addr} is not of the frame's family"),
        }
        b[port_at..port_at + 2].copy_from_slice(&addr.port().to_be_bytes());
    };
    if let Some(a) = src {
        put(a, 12, 8, h.l4);
    }
    if let Some(a) = dst {
        put(a, 16, 24, h.l4 + 2);
    }
    let no_csum = !h.v6 && h.proto == IPPROTO_UDP && be16(&b, h.csum_at) == 0;
    seal(&mut b, !no_csum);
    b
}

/// Checks `out` equals `want` in every byte but the checksum fields, then checks the
/// checksums of `out` by recomputing them; `want`'s checksum fields say whether an L4
/// checksum is expected (an IPv4 UDP checksum of 0 must stay 0).
fn assert_frame(out: &[u8], want: &[u8], what: &str) {
    assert_eq!(
        out.len(),
        want.len(),
        "{what}: length\n got: {out:02x?}\nwant: {want:02x?}"
    );
    let h = headers(want);
    let mut masked = [out.to_vec(), want.to_vec()];
    for m in &mut masked {
        if !h.v6 {
            m[ETH_LEN + 10..ETH_LEN + 12].fill(0);
        }
        m[h.csum_at..h.csum_at + 2].fill(0);
    }
    let diffs: Vec<String> = (0..out.len())
        .filter(|&i| masked[0][i] != masked[1][i])
        .map(|i| format!("@{i}: got {:02x} want {:02x}", out[i], want[i]))
        .collect();
    assert!(
        diffs.is_empty(),
        "{what}: frame differs from the expected one (checksums aside): {diffs:?}\n got: {out:02x?}\nwant: {want:02x?}"
    );
    if !h.v6 {
        let (got, scratch) = (be16(out, ETH_LEN + 10), ipv4_header_checksum(out));
        assert!(
            ipv4_header_valid(out),
            "{what}: IPv4 header checksum: got {got:#06x}, recomputed {scratch:#06x}"
        );
    }
    let got = be16(out, h.csum_at);
    let name = if h.proto == IPPROTO_TCP { "TCP" } else { "UDP" };
    if !h.v6 && h.proto == IPPROTO_UDP && be16(want, h.csum_at) == 0 {
        assert_eq!(
            got, 0,
            "{what}: an IPv4 UDP datagram without checksum must keep checksum 0"
        );
    } else {
        let scratch = l4_checksum(out);
        assert!(
            l4_valid(out),
            "{what}: {name} checksum over the pseudo-header: got {got:#06x}, recomputed {scratch:#06x}\n got: {out:02x?}"
        );
        if h.proto == IPPROTO_UDP {
            assert_ne!(
                got, 0,
                "{what}: a computed UDP checksum of 0 is sent as ffff"
            );
        }
    }
}

fn ipv4_header(b: &[u8]) -> &[u8] {
    &b[ETH_LEN..ETH_LEN + 20]
}

/// The IPv4 header checksum computed from scratch (the field taken as 0).
fn ipv4_header_checksum(b: &[u8]) -> u16 {
    let mut hdr = ipv4_header(b).to_vec();
    hdr[10..12].fill(0);
    !fold(sum(&hdr, 0))
}

/// A receiver's check: the header, its checksum included, sums to all ones.
fn ipv4_header_valid(b: &[u8]) -> bool {
    fold(sum(ipv4_header(b), 0)) == 0xffff
}

/// The sum of the pseudo-header (addresses, protocol, L4 length) and the L4 bytes, checksum
/// field as it is.
fn l4_sum(b: &[u8]) -> u32 {
    let h = headers(b);
    let seg = &b[h.l4..];
    let addrs = if h.v6 {
        &b[ETH_LEN + 8..ETH_LEN + 40]
    } else {
        &b[ETH_LEN + 12..ETH_LEN + 20]
    };
    // The length: IPv4 total length minus the header, or the IPv6 payload length; both
    // equal to what is left of the frame here (no options, no extension headers).
    let len = if h.v6 {
        usize::from(be16(b, ETH_LEN + 4))
    } else {
        usize::from(be16(b, ETH_LEN + 2)) - 20
    };
    assert_eq!(len, seg.len(), "IP length field vs frame length");
    sum(seg, sum(addrs, u32::from(h.proto) + len as u32))
}

/// The TCP/UDP checksum computed from scratch (the field taken as 0; UDP's 0 sent as ffff).
fn l4_checksum(b: &[u8]) -> u16 {
    let h = headers(b);
    let mut z = b.to_vec();
    z[h.csum_at..h.csum_at + 2].fill(0);
    let c = !fold(l4_sum(&z));
    if h.proto == IPPROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// A receiver's check: pseudo-header and segment, checksum included, sum to all ones.
fn l4_valid(b: &[u8]) -> bool {
    fold(l4_sum(b)) == 0xffff
}

/// The client address and port a backend sees for a flow from `client`.
fn moved(client: SocketAddr) -> SocketAddr {
    SocketAddr::new(client.ip(), nat_port(client.port()))
}

fn v4(a: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(a.into(), port)
}

fn v6(a: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(a.into(), port)
}

/// A TCP connection's first packets through `hook`: the SYN goes to a backend of `svc`, the
/// ACK to the same one, the backend's SYN-ACK comes back from the VIP. A reply from that
/// backend to a client port no flow used passes unchanged.
fn tcp_flow(lab: &Lab, hook: Hook, svc: &str, client: SocketAddr) {
    let vip = lab.svc(svc).vip;
    let backend = lab.dnat(hook, svc, &frame(client, vip, Proto::Tcp(SYN)));
    let again = lab.dnat(hook, svc, &frame(client, vip, Proto::Tcp(ACK)));
    assert_eq!(
        again, backend,
        "{hook:?} {svc}: the flow's ACK follows its SYN"
    );
    let seen = moved(client);
    lab.reverse(
        hook,
        &frame(backend, seen, Proto::Tcp(SYN | ACK)),
        vip,
        client,
    );

    let stranger = SocketAddr::new(client.ip(), seen.port() + 1);
    let reply = frame(backend, stranger, Proto::Tcp(SYN | ACK));
    let (ret, out) = lab.run(hook, &reply);
    assert_eq!(ret, hook.pass(), "{hook:?} {svc}: unknown reply");
    assert_eq!(
        out, reply,
        "{hook:?} {svc}: a reply of no balanced flow is untouched"
    );
}

/// XDP, IPv4 TCP: a SYN to the VIP goes to a backend (address and port), from the client's
/// address and its ephemeral port moved (`agent_common::ports`), checksums valid; the flow's ACK goes to the same backend; the backend's SYN-ACK leaves
/// with the VIP as its source and valid checksums.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn xdp_ipv4_tcp_dnat_and_reverse_nat() {
    let lab = Lab::new();
    tcp_flow(&lab, Hook::Xdp, "web4", v4(CLIENT4, 40000));
}

/// XDP, IPv6 TCP: the same, with the TCP checksum over the IPv6 pseudo-header.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn xdp_ipv6_tcp_dnat_and_reverse_nat() {
    let lab = Lab::new();
    tcp_flow(&lab, Hook::Xdp, "web6", v6(CLIENT6, 40000));
}

/// TC egress, IPv4 TCP (test-run skbs are CHECKSUM_NONE: the checksum fields themselves must
/// come out right from `bpf_l3/l4_csum_replace`): DNAT, then reverse NAT of the reply.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn tc_ipv4_tcp_dnat_and_reverse_nat() {
    let lab = Lab::new();
    tcp_flow(&lab, Hook::Tc, "web4", v4(CLIENT4, 40000));
}

/// TC egress, IPv6 TCP: DNAT, then reverse NAT of the reply.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn tc_ipv6_tcp_dnat_and_reverse_nat() {
    let lab = Lab::new();
    tcp_flow(&lab, Hook::Tc, "web6", v6(CLIENT6, 40000));
}

/// XDP, IPv4 UDP: a datagram (odd length) to the VIP goes to a backend with a valid UDP
/// checksum, the next one of the flow to the same backend, the backend's answer comes back
/// from the VIP; a datagram without checksum (0) keeps 0, its header checksum valid.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn xdp_ipv4_udp_dnat_keeps_checksums_and_no_checksum() {
    let lab = Lab::new();
    let vip = lab.svc("dns4").vip;
    let client = v4(CLIENT4, 5000);
    let query = frame_with_payload(client, vip, Proto::Udp, 17);
    let backend = lab.dnat(Hook::Xdp, "dns4", &query);
    assert_eq!(lab.dnat(Hook::Xdp, "dns4", &query), backend, "same flow");
    let answer = frame_with_payload(backend, moved(client), Proto::Udp, 33);
    lab.reverse(Hook::Xdp, &answer, vip, client);

    // From an ephemeral port: moved, and the checksum still 0.
    let client = v4(CLIENT4, 50001);
    let bare = frame(client, vip, Proto::UdpNoChecksum);
    assert_eq!(be16(&bare, ETH_LEN + 20 + 6), 0, "sent without checksum");
    let backend = lab.dnat(Hook::Xdp, "dns4", &bare);
    lab.reverse(
        Hook::Xdp,
        &frame(backend, moved(client), Proto::UdpNoChecksum),
        vip,
        client,
    );
}

/// XDP, 2,000 flows (distinct source ports) to one VIP with two equal backends: each backend
/// gets half of them within 10% (Maglev table, flow hash), every flow's second packet goes
/// where its first went, and the datapath's new-flow counters agree.
#[test]
#[cfg_attr(not(root), ignore = "needs root: BPF, network namespaces")]
fn xdp_many_flows_spread_evenly_and_stick() {
    let lab = Lab::new();
    let vip = lab.svc("web4").vip;
    let flows = 2000u16;
    let mut chosen = Vec::new();
    let mut count: HashMap<SocketAddr, u64> = HashMap::new();
    for i in 0..flows {
        let client = v4(CLIENT4, 20000 + i);
        let b = lab.dnat(Hook::Xdp, "web4", &frame(client, vip, Proto::Tcp(SYN)));
        *count.entry(b).or_default() += 1;
        chosen.push((client, b));
    }
    let half = u64::from(flows) / 2;
    for b in lab.backends("web4") {
        let n = count.get(&b).copied().unwrap_or(0);
        assert!(
            n.abs_diff(half) <= half / 10,
            "backend {b}: {n} of {flows} flows; all: {count:?}"
        );
    }
    for (client, b) in chosen {
        let again = lab.dnat(Hook::Xdp, "web4", &frame(client, vip, Proto::Tcp(ACK)));
        assert_eq!(again, b, "flow from {client}");
    }
    let svc = lab.svc("web4");
    for (i, b) in svc.backends.iter().enumerate() {
        let c = lab.maps.counters(svc, i).expect("reading LB counters");
        assert_eq!(c.new_flows, count[&b.address], "new flows of {}", b.address);
        assert_eq!(
            c.forwarded.packets,
            2 * count[&b.address],
            "packets forwarded to {}",
            b.address
        );
    }
}
