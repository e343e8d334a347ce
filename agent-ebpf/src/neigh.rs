//! An on-link VIP: this host's own ARP requests and IPv6 neighbour solicitations for a VIP,
//! seen on TC egress, are answered in place and bounced to the device's ingress, as the RST
//! answers are. Without the answer, a VIP inside the client's own subnet is never reached:
//! the stack asks who has it, nobody answers, and its packets never reach TC egress where
//! the DNAT is.
//!
//! The answer names the device's own MAC (the request's sender) as the VIP's: the packets
//! to the VIP then leave with it, the NAT stage rewrites them toward a backend and gives
//! them the backend's next hop (`fib.rs`). A VIP is an address classified to a balanced
//! service (`LB_SVC` active) of the current policy generation: the maps alone decide, so an
//! agent restart (pinned maps and programs) changes nothing. A balanced service whose
//! `match` is a prefix has every address of it answered.
//!
//! Only untagged frames; an IPv6 solicitation must be what the kernel sends: no extension
//! header, hop limit 255, a source link-layer address option (not the unspecified source of
//! duplicate address detection). Anything else goes out unchanged.

use agent_common::{
    classify::{MAX_MATCH_RULES, PROTO_ICMPV6, generation_slot, v4_mapped},
    lb::LB_F_ACTIVE,
    reply::checksum,
};
use aya_ebpf::helpers::bpf_csum_diff;
use core::ptr::{read_unaligned, write_unaligned};
use network_types::eth::EthHdr;

use crate::{
    classify,
    maps::LB_SVC,
    parse::{ETH_P_IPV6, Packet},
};

const ETH_P_ARP: u16 = 0x0806;
/// Only untagged frames are answered.
const ETH_LEN: usize = EthHdr::LEN;
const ETH_TYPE: usize = 12;
const MAC_LEN: usize = 6;

/// ARP for IPv4 over Ethernet, from the start of the ARP header.
const ARP_FIXED: [u8; 6] = [0, 1, 8, 0, 6, 4];
const ARP_OP: usize = ETH_LEN + 6;
const ARP_SHA: usize = ETH_LEN + 8;
const ARP_SPA: usize = ETH_LEN + 14;
const ARP_THA: usize = ETH_LEN + 18;
const ARP_TPA: usize = ETH_LEN + 24;
const ARP_LEN: usize = ETH_LEN + 28;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// IPv6 header fields, from the start of the frame.
const V6_PAYLOAD_LEN: usize = ETH_LEN + 4;
const V6_NEXT_HDR: usize = ETH_LEN + 6;
const V6_HOP_LIMIT: usize = ETH_LEN + 7;
const V6_SRC: usize = ETH_LEN + 8;
const V6_DST: usize = ETH_LEN + 24;
/// ICMPv6 neighbour solicitation / advertisement (RFC 4861 4.3, 4.4), from the frame start.
const ICMP6: usize = ETH_LEN + 40;
const ICMP6_CSUM: usize = ICMP6 + 2;
const ND_FLAGS: usize = ICMP6 + 4;
const ND_TARGET: usize = ICMP6 + 8;
const ND_OPT: usize = ICMP6 + 24;
/// The solicitation's length after the IPv6 header: the message and one link-layer option.
const ND_LEN: usize = 24 + 8;
const ND_HOP_LIMIT: u8 = 255;
const NS_TYPE: u8 = 135;
const NA_TYPE: u8 = 136;
/// Option types: source, target link-layer address (length 1: 8 bytes, one MAC).
const OPT_SLLA: [u8; 2] = [1, 1];
const OPT_TLLA: u8 = 2;
/// Advertisement flags: solicited and override (not a router).
const NA_FLAGS: [u8; 4] = [0x60, 0, 0, 0];

#[inline(always)]
fn ether_type(pkt: &Packet) -> Option<u16> {
    let t = pkt.ptr_at::<[u8; 2]>(ETH_TYPE).ok()?;
    // SAFETY: bounds-checked by `ptr_at`.
    Some(u16::from_be_bytes(unsafe { read_unaligned(t) }))
}

/// Whether `pkt` may be an ARP request or neighbour solicitation: two or three reads, so
/// every other packet pays only those.
#[inline(always)]
pub fn may_ask(pkt: &Packet) -> bool {
    match ether_type(pkt) {
        Some(ETH_P_ARP) => true,
        Some(ETH_P_IPV6) => match (pkt.ptr_at::<u8>(V6_NEXT_HDR), pkt.ptr_at::<u8>(ICMP6)) {
            // SAFETY: bounds-checked by `ptr_at`.
            (Ok(nh), Ok(ty)) => unsafe { *nh == PROTO_ICMPV6 && *ty == NS_TYPE },
            _ => false,
        },
        _ => false,
    }
}

/// Rewrites an ARP request or neighbour solicitation for a VIP into its answer; `false`
/// (the packet unchanged) for anything else.
// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
pub fn answer(pkt: &Packet) -> bool {
    match ether_type(pkt) {
        Some(ETH_P_ARP) => answer_arp(pkt),
        Some(ETH_P_IPV6) => answer_ns(pkt),
        _ => false,
    }
}

/// Whether `addr` is a VIP: its rules include a balanced service of this generation.
#[inline(always)]
fn is_vip(addr: &[u8; 16]) -> bool {
    let generation = classify::generation();
    let Some(rules) = classify::rules(generation, addr) else {
        return false;
    };
    let mut i = 0;
    while i < MAX_MATCH_RULES {
        if i as u32 >= rules.count {
            return false;
        }
        let slot = generation_slot(rules.rules[i].service_id, generation);
        if LB_SVC.get(slot).is_some_and(|s| s.flags & LB_F_ACTIVE != 0) {
            return true;
        }
        i += 1;
    }
    false
}

/// Copies `N` bytes within the packet.
///
/// # Safety
/// Both ranges must be bounds-checked packet pointers.
#[inline(always)]
unsafe fn copy<const N: usize>(to: *const [u8; N], from: *const [u8; N]) {
    // SAFETY: per the function's contract.
    unsafe { write_unaligned(to as *mut [u8; N], read_unaligned(from)) }
}

#[inline(always)]
fn answer_arp(pkt: &Packet) -> bool {
    let (Ok(fixed), Ok(op), Ok(sha), Ok(spa), Ok(tha), Ok(tpa), Ok(dst), Ok(src)) = (
        pkt.ptr_at::<[u8; 6]>(ETH_LEN),
        pkt.ptr_at::<[u8; 2]>(ARP_OP),
        pkt.ptr_at::<[u8; MAC_LEN]>(ARP_SHA),
        pkt.ptr_at::<[u8; 4]>(ARP_SPA),
        pkt.ptr_at::<[u8; MAC_LEN]>(ARP_THA),
        pkt.ptr_at::<[u8; 4]>(ARP_TPA),
        pkt.ptr_at::<[u8; MAC_LEN]>(0),
        pkt.ptr_at::<[u8; MAC_LEN]>(MAC_LEN),
    ) else {
        return false;
    };
    // The last byte of a request, for the verifier: everything read is inside.
    if pkt.ptr_at::<u8>(ARP_LEN - 1).is_err() {
        return false;
    }
    // SAFETY: every pointer was bounds-checked by `ptr_at`; nothing resizes the packet.
    unsafe {
        if read_unaligned(fixed) != ARP_FIXED
            || u16::from_be_bytes(read_unaligned(op)) != ARP_REQUEST
        {
            return false;
        }
        let (asker, vip) = (read_unaligned(spa), read_unaligned(tpa));
        if !is_vip(&v4_mapped(vip)) {
            return false;
        }
        // To the asker (this host), from the VIP at the asker's own MAC (the sender
        // hardware address stays).
        copy(dst, src);
        write_unaligned(op as *mut [u8; 2], ARP_REPLY.to_be_bytes());
        copy(tha, sha);
        write_unaligned(spa as *mut [u8; 4], vip);
        write_unaligned(tpa as *mut [u8; 4], asker);
    }
    true
}

#[inline(always)]
fn answer_ns(pkt: &Packet) -> bool {
    let (Ok(len), Ok(hop), Ok(code), Ok(addrs), Ok(target), Ok(opt), Ok(dst), Ok(src)) = (
        pkt.ptr_at::<[u8; 2]>(V6_PAYLOAD_LEN),
        pkt.ptr_at::<u8>(V6_HOP_LIMIT),
        pkt.ptr_at::<[u8; 2]>(ICMP6),
        pkt.ptr_at::<[u8; 64]>(V6_SRC),
        pkt.ptr_at::<[u8; 16]>(ND_TARGET),
        pkt.ptr_at::<[u8; 2]>(ND_OPT),
        pkt.ptr_at::<[u8; MAC_LEN]>(0),
        pkt.ptr_at::<[u8; MAC_LEN]>(MAC_LEN),
    ) else {
        return false;
    };
    // SAFETY: every pointer was bounds-checked by `ptr_at`; nothing resizes the packet.
    unsafe {
        if usize::from(u16::from_be_bytes(read_unaligned(len))) != ND_LEN
            || *hop != ND_HOP_LIMIT
            || read_unaligned(code) != [NS_TYPE, 0]
            || read_unaligned(opt) != OPT_SLLA
        {
            return false;
        }
        let vip = read_unaligned(target);
        if !is_vip(&vip) {
            return false;
        }
        let at = addrs as *mut u8;
        // To the asker's address and MAC, from the VIP.
        copy(dst, src);
        copy(
            at.add(V6_DST - V6_SRC) as *const [u8; 16],
            addrs as *const [u8; 16],
        );
        write_unaligned(at as *mut [u8; 16], vip);
        write_unaligned(code as *mut [u8; 2], [NA_TYPE, 0]);
        write_unaligned(at.add(ND_FLAGS - V6_SRC) as *mut [u8; 4], NA_FLAGS);
        // The link-layer address stays: the asker's own MAC becomes the VIP's.
        *(opt as *mut u8) = OPT_TLLA;
        write_unaligned(at.add(ICMP6_CSUM - V6_SRC) as *mut [u8; 2], [0, 0]);
        // The checksum over the pseudo-header (the addresses, which lie just before the
        // message, the upper-layer length and next header) and the message. The kernel sums
        // 16-bit words as they lie in memory; the two constant fields are summed so too,
        // and the result is stored the same way (see `nat.rs` on the byte order).
        let seed = u32::from(u16::from_ne_bytes([0, ND_LEN as u8]))
            + u32::from(u16::from_ne_bytes([0, PROTO_ICMPV6]));
        let sum = bpf_csum_diff(core::ptr::null_mut(), 0, addrs as *mut u32, 64, seed);
        if sum < 0 {
            return false;
        }
        write_unaligned(
            at.add(ICMP6_CSUM - V6_SRC) as *mut [u8; 2],
            checksum(sum as u32).to_ne_bytes(),
        );
    }
    true
}
