//! The on-link VIP in the datapath through BPF_PROG_TEST_RUN: the host's own ARP request and
//! IPv6 neighbour solicitation for a VIP, run through the real TC egress program, come out
//! as the answer (redirected to the ingress) byte by byte as written here, the ICMPv6
//! checksum recomputed here from scratch; requests for an address that is no VIP (a plain
//! service's, or no service's) and the unspecified-source solicitations of duplicate address
//! detection leave unchanged. Needs root.

mod support;

use std::net::{Ipv4Addr, Ipv6Addr};

use support::{TC_ACT_OK, TC_ACT_REDIRECT, fold, load_balanced, require_root, sum};

const POLICY: &str = r#"version: 1
interfaces:
  - name: lo
services:
  - name: web4
    match: { address: 198.18.0.100, port: 80, protocol: tcp }
    backends:
      - { address: "198.18.2.1:8080", weight: 100 }
    load_balancing: { algorithm: maglev, table_size: 211 }
  - name: web6
    match: { address: "2001:db8::100", port: 80, protocol: tcp }
    backends:
      - { address: "[2001:db8::2:1]:8080", weight: 100 }
    load_balancing: { algorithm: maglev, table_size: 211 }
  - name: plain4
    match: { address: 198.18.0.50, port: 80, protocol: tcp }
  - name: plain6
    match: { address: "2001:db8::50", port: 80, protocol: tcp }
"#;

/// The host's MAC, the asker's: the answer names it as the VIP's.
const HOST_MAC: [u8; 6] = [0x02, 0xa9, 0, 0, 0, 1];
const HOST4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const PLAIN4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 50);
const PLAIN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x50);
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);

fn eth(dst: [u8; 6], src: [u8; 6], ether_type: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f
}

/// An ARP packet of `op` as the kernel sends it (no padding).
fn arp(
    op: u16,
    eth_dst: [u8; 6],
    sha: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut f = eth(eth_dst, sha, 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f
}

/// The solicited-node multicast address of `a`, and its MAC.
fn solicited(a: Ipv6Addr) -> (Ipv6Addr, [u8; 6]) {
    let o = a.octets();
    let mut m = [0u8; 16];
    m[..2].copy_from_slice(&[0xff, 0x02]);
    m[11] = 1;
    m[12] = 0xff;
    m[13..].copy_from_slice(&o[13..]);
    (Ipv6Addr::from(m), [0x33, 0x33, 0xff, o[13], o[14], o[15]])
}

/// An ICMPv6 neighbour message (`ty` 135 or 136) with one link-layer address option
/// (`opt` 1 or 2), `flags` in its first word, checksum computed here.
fn nd(
    ty: u8,
    flags: [u8; 4],
    eth_dst: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    opt: u8,
) -> Vec<u8> {
    let mut msg = vec![ty, 0, 0, 0];
    msg.extend_from_slice(&flags);
    msg.extend_from_slice(&target.octets());
    msg.extend_from_slice(&[opt, 1]);
    msg.extend_from_slice(&HOST_MAC);
    let mut acc = sum(&src.octets(), 0);
    acc = sum(&dst.octets(), acc);
    acc += msg.len() as u32 + 58;
    let csum = !fold(sum(&msg, acc));
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    let mut f = eth(eth_dst, HOST_MAC, 0x86dd);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&msg);
    f
}

fn ns(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let (dst, mac) = solicited(target);
    nd(135, [0; 4], mac, src, dst, target, 1)
}

/// Runs `frame` through TC egress of a fresh datapath.
fn run(frame: &[u8]) -> (u32, Vec<u8>) {
    require_root("neigh");
    let (dp, _, _maps) = load_balanced(POLICY, "neigh-test.yaml");
    support::run(&dp, support::Hook::Tc, frame)
}

#[test]
fn the_hosts_arp_request_for_a_vip_is_answered_at_its_own_mac() {
    let asked = arp(1, [0xff; 6], HOST_MAC, HOST4, [0; 6], VIP4);
    let (ret, out) = run(&asked);
    assert_eq!(ret, TC_ACT_REDIRECT, "the answer goes to the ingress");
    let want = arp(2, HOST_MAC, HOST_MAC, VIP4, HOST_MAC, HOST4);
    assert_eq!(
        out, want,
        "the ARP reply: VIP at the host's MAC, to the host"
    );
}

#[test]
fn arp_for_an_address_that_is_no_vip_leaves_unchanged() {
    for target in [PLAIN4, OTHER4] {
        let asked = arp(1, [0xff; 6], HOST_MAC, HOST4, [0; 6], target);
        let (ret, out) = run(&asked);
        assert_eq!(ret, TC_ACT_OK, "ARP for {target}");
        assert_eq!(out, asked, "ARP for {target} leaves as it was");
    }
}

#[test]
fn an_arp_reply_for_a_vip_leaves_unchanged() {
    let reply = arp(2, HOST_MAC, HOST_MAC, HOST4, HOST_MAC, VIP4);
    let (ret, out) = run(&reply);
    assert_eq!((ret, out), (TC_ACT_OK, reply));
}

#[test]
fn the_hosts_neighbour_solicitation_for_a_vip_is_answered() {
    let asked = ns(HOST6, VIP6);
    let (ret, out) = run(&asked);
    assert_eq!(ret, TC_ACT_REDIRECT, "the answer goes to the ingress");
    // Solicited and override, the VIP at the host's MAC, from the VIP to the asker.
    let want = nd(136, [0x60, 0, 0, 0], HOST_MAC, VIP6, HOST6, VIP6, 2);
    assert_eq!(out, want, "the neighbour advertisement, checksum included");
    // The checksum as a receiver checks it: the sum over pseudo-header and message.
    let acc = sum(&out[22..54], 32 + 58);
    assert_eq!(fold(sum(&out[54..], acc)), 0xffff, "ICMPv6 checksum");
}

#[test]
fn a_unicast_solicitation_for_a_vip_is_answered_too() {
    // What the kernel sends to confirm a stale entry: to the VIP itself, at its MAC.
    let asked = nd(135, [0; 4], HOST_MAC, HOST6, VIP6, VIP6, 1);
    let (ret, out) = run(&asked);
    assert_eq!(ret, TC_ACT_REDIRECT);
    let want = nd(136, [0x60, 0, 0, 0], HOST_MAC, VIP6, HOST6, VIP6, 2);
    assert_eq!(out, want);
}

#[test]
fn solicitations_that_are_no_vips_or_duplicate_detection_leave_unchanged() {
    let mut dad = ns(Ipv6Addr::UNSPECIFIED, VIP6);
    // Duplicate address detection carries no source link-layer option.
    dad.truncate(dad.len() - 8);
    dad[18..20].copy_from_slice(&24u16.to_be_bytes());
    for (what, asked) in [
        ("a plain service's address", ns(HOST6, PLAIN6)),
        ("duplicate address detection", dad),
    ] {
        let (ret, out) = run(&asked);
        assert_eq!(ret, TC_ACT_OK, "{what}");
        assert_eq!(out, asked, "{what}: leaves as it was");
    }
}
