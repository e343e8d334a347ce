//! Next-hop delivery after a NAT: the packet goes to its new destination's real next hop
//! instead of the one its frame was addressed to.
//!
//! Why: on a client host, TC egress rewrites a packet to the VIP toward a backend, but its
//! frame still carries the MAC the stack resolved for the VIP (the default gateway's, say).
//! It then reaches the backend only if that gateway routes it back (a hairpin); with its
//! forwarding off it is lost. On a balancing router (XDP), a DNAT'd packet went up the stack
//! to be forwarded. Here the kernel's FIB names the backend's next hop (`bpf_fib_lookup`),
//! the frame's MACs are rewritten, and the packet is sent there.
//!
//! - TC egress, DNAT: the lookup from the local host's perspective (`BPF_FIB_LOOKUP_OUTPUT`)
//!   through the device the packet is leaving by. Resolved: new MACs, and the packet goes on
//!   out of this device (no redirect). Neighbour not resolved yet, or forwarding disabled on
//!   the host (the helper checks the device's forwarding first, whatever the perspective,
//!   and answers nothing more):
//!   `bpf_redirect_neigh`, which routes the packet, resolves the neighbour (ARP / ND) and
//!   queues the packet until it answers. Such a packet passes this device's TC egress a
//!   second time: it is marked in `skb->tc_index` (as Cilium marks its own) and the entry
//!   point lets the marked packet go at once (`tc_second_pass`).
//! - XDP, DNAT and reverse NAT: the router's perspective (the ingress device's). Resolved:
//!   TTL / hop limit decremented as a router does (the IPv4 checksum updated), new MACs,
//!   `XDP_TX` out of the ingress device or `bpf_redirect` to another one. A destination on
//!   this host (a reply to a local client) goes up the stack, where it belongs, uncounted;
//!   so does a destination without a route, which the helper reports the same way
//!   (`BPF_FIB_LKUP_RET_NOT_FWDED`).
//!
//! Anything else the lookup cannot resolve goes to the stack, as before (fail open), counted
//! in `GSTAT_NAT_TO_STACK`: a route the lookup refuses (blackhole, unreachable, prohibit, a
//! packet over the MTU; on TC also no route), forwarding disabled on an XDP host, a
//! neighbour XDP cannot resolve (the stack resolves it), a frame with VLAN tags, a TTL that
//! would expire.

use agent_common::stats::GSTAT_NAT_TO_STACK;
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup as FibParams,
        bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};
use core::{
    mem,
    ptr::{read_unaligned, write_unaligned},
};
use network_types::eth::EthHdr;

use crate::{
    maps::{LB_HANDOVER, SIDE_SRC},
    parse::{HasPacket, Packet, Parsed},
    stats,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// The loopback device's index in every namespace: nothing to resolve behind it (and the
/// device BPF_PROG_TEST_RUN runs programs on).
const LOOPBACK_IFINDEX: u32 = 1;
/// The Ethernet header's length: only untagged frames are delivered to a next hop.
const ETH_LEN: usize = EthHdr::LEN;
const ETH_SRC: usize = 6;
/// Offsets in the IPv4 header: TTL (then protocol, one 16-bit word), checksum, total length.
const V4_TTL: usize = 8;
const V4_CSUM: usize = 10;
const V4_TOT_LEN: usize = 2;
const V4_TOS: usize = 1;
const V4_SRC: usize = 12;
/// Offsets in the IPv6 header: payload length, hop limit, addresses.
const V6_PAYLOAD_LEN: usize = 4;
const V6_HOP_LIMIT: usize = 7;
const V6_SRC: usize = 8;
const V6_HDR_LEN: u16 = 40;

/// `skb->tc_index` bit of a packet this program sent through `bpf_redirect_neigh` on the
/// device it was leaving by: it comes through TC egress again, already done.
pub const TC_INDEX_NAT_DONE: u32 = 1 << 15;

/// Which NAT the packet just went through.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Toward a backend.
    Dnat,
    /// A backend's reply, its source given the VIP back.
    Reverse,
}

/// Where the packet goes.
pub enum Verdict {
    /// On as it is: up the stack (XDP) or out of the device (TC), with new MACs or not.
    Pass,
    /// XDP: out of the device it came in by (`XDP_TX`).
    Tx,
    /// A redirect helper was called; its return value is the hook's verdict.
    Redirect(i64),
}

pub trait NextHop {
    /// Sends the rewritten packet to its next hop; `Verdict::Pass` to leave it to the stack.
    fn next_hop(&self, p: &Parsed, nat: Nat) -> Verdict;
}

/// The FIB lookup's parameters for the packet as it is now (after the NAT), `None` when it
/// is not an untagged frame with its IP header in reach. `ifindex` is the device the lookup
/// starts from.
#[inline(always)]
fn params(pkt: &Packet, p: &Parsed, ifindex: u32) -> Option<FibParams> {
    if p.l3 != ETH_LEN {
        return None;
    }
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut f: FibParams = unsafe { mem::zeroed() };
    f.l4_protocol = p.proto;
    f.ifindex = ifindex;
    if p.has_ports {
        f.sport = p.sport.to_be();
        f.dport = p.dport.to_be();
    }
    if p.ipv6 {
        let addrs = pkt.ptr_at::<[[u32; 4]; 2]>(p.l3 + V6_SRC).ok()?;
        let len = pkt.ptr_at::<[u8; 2]>(p.l3 + V6_PAYLOAD_LEN).ok()?;
        // SAFETY: bounds-checked by `ptr_at`.
        let ([src, dst], len) = unsafe { (read_unaligned(addrs), read_unaligned(len)) };
        f.family = AF_INET6;
        f.__bindgen_anon_1.tot_len = u16::from_be_bytes(len).saturating_add(V6_HDR_LEN);
        f.__bindgen_anon_3.ipv6_src = src;
        f.__bindgen_anon_4.ipv6_dst = dst;
    } else {
        let addrs = pkt.ptr_at::<[u32; 2]>(p.l3 + V4_SRC).ok()?;
        let len = pkt.ptr_at::<[u8; 2]>(p.l3 + V4_TOT_LEN).ok()?;
        let tos = pkt.ptr_at::<u8>(p.l3 + V4_TOS).ok()?;
        // SAFETY: bounds-checked by `ptr_at`.
        let ([src, dst], len, tos) = unsafe { (read_unaligned(addrs), read_unaligned(len), *tos) };
        f.family = AF_INET;
        f.__bindgen_anon_1.tot_len = u16::from_be_bytes(len);
        f.__bindgen_anon_2.tos = tos;
        f.__bindgen_anon_3.ipv4_src = src;
        f.__bindgen_anon_4.ipv4_dst = dst;
    }
    Some(f)
}

/// Writes the looked-up MACs into the frame; `false` if it is too short (it cannot be).
#[inline(always)]
fn set_macs(pkt: &Packet, f: &FibParams) -> bool {
    let Ok(eth) = pkt.ptr_at::<[u8; ETH_LEN]>(0) else {
        return false;
    };
    // SAFETY: bounds-checked by `ptr_at`; nothing resized the packet since.
    unsafe {
        let eth = eth as *mut u8;
        write_unaligned(eth as *mut [u8; 6], f.dmac);
        write_unaligned(eth.add(ETH_SRC) as *mut [u8; 6], f.smac);
    }
    true
}

/// Decrements the TTL (IPv4, checksum updated as RFC 1624 does for one word) or the hop
/// limit (IPv6), as a router forwarding the packet; `false` when it would reach 0 (the
/// stack then sends the ICMP time exceeded).
#[inline(always)]
fn decrement_ttl(pkt: &Packet, p: &Parsed) -> bool {
    if p.ipv6 {
        let Ok(hl) = pkt.ptr_at::<u8>(p.l3 + V6_HOP_LIMIT) else {
            return false;
        };
        // SAFETY: bounds-checked by `ptr_at`.
        unsafe {
            if *hl <= 1 {
                return false;
            }
            *(hl as *mut u8) -= 1;
        }
        return true;
    }
    let (Ok(ttl), Ok(csum)) = (
        pkt.ptr_at::<u8>(p.l3 + V4_TTL),
        pkt.ptr_at::<[u8; 2]>(p.l3 + V4_CSUM),
    ) else {
        return false;
    };
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        if *ttl <= 1 {
            return false;
        }
        *(ttl as *mut u8) -= 1;
        // The TTL is the high byte of its 16-bit word: the word fell by 0x0100, so the
        // checksum (its one's complement sum) rises by as much, end-around carry included.
        let sum = u32::from(u16::from_be_bytes(read_unaligned(csum))) + 0x0100;
        let sum = (sum & 0xffff) + (sum >> 16);
        write_unaligned(csum as *mut [u8; 2], (sum as u16).to_be_bytes());
    }
    true
}

impl NextHop for XdpContext {
    // A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
    #[inline(never)]
    fn next_hop(&self, p: &Parsed, nat: Nat) -> Verdict {
        let ifindex = self.ingress_ifindex() as u32;
        if ifindex == LOOPBACK_IFINDEX {
            return Verdict::Pass;
        }
        let pkt = self.packet();
        let Some(mut f) = params(&pkt, p, ifindex) else {
            return to_stack(pkt.len());
        };
        // SAFETY: the context's own frame, and a params struct of the size passed.
        let rc = unsafe {
            bpf_fib_lookup(
                self.ctx as *mut _,
                &mut f,
                mem::size_of::<FibParams>() as i32,
                0,
            )
        };
        match rc as u32 {
            BPF_FIB_LKUP_RET_SUCCESS => {}
            // A destination on this host: the stack is its next hop.
            BPF_FIB_LKUP_RET_NOT_FWDED => return Verdict::Pass,
            // A host that does not forward receives its replies itself.
            BPF_FIB_LKUP_RET_FWD_DISABLED if nat == Nat::Reverse => return Verdict::Pass,
            _ => return to_stack(pkt.len()),
        }
        if !decrement_ttl(&pkt, p) || !set_macs(&pkt, &f) {
            return to_stack(pkt.len());
        }
        if f.ifindex == ifindex {
            return Verdict::Tx;
        }
        // SAFETY: plain helper call; XDP_REDIRECT, or XDP_ABORTED for bad flags (none here).
        Verdict::Redirect(unsafe { bpf_redirect(f.ifindex, 0) })
    }
}

impl NextHop for TcContext {
    // A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
    #[inline(never)]
    fn next_hop(&self, p: &Parsed, nat: Nat) -> Verdict {
        // A reply leaves toward its client, whose MAC the stack resolved: nothing to change.
        if nat == Nat::Reverse {
            return Verdict::Pass;
        }
        // SAFETY: the context's own skb, valid for this run.
        let ifindex = unsafe { (*self.skb.skb).ifindex };
        if ifindex == LOOPBACK_IFINDEX {
            return Verdict::Pass;
        }
        let pkt = self.packet();
        let Some(mut f) = params(&pkt, p, ifindex) else {
            return to_stack(pkt.len());
        };
        // SAFETY: the context's own skb, and a params struct of the size passed.
        let rc = unsafe {
            bpf_fib_lookup(
                self.skb.skb as *mut _,
                &mut f,
                mem::size_of::<FibParams>() as i32,
                BPF_FIB_LOOKUP_OUTPUT,
            )
        };
        match rc as u32 {
            BPF_FIB_LKUP_RET_SUCCESS if f.ifindex == ifindex => {
                if set_macs(&pkt, &f) {
                    Verdict::Pass
                } else {
                    to_stack(pkt.len())
                }
            }
            BPF_FIB_LKUP_RET_NO_NEIGH if f.ifindex == ifindex => {
                // The lookup left the next hop (a gateway, or the backend on-link) in `dst`.
                // SAFETY: all-zero is a valid value of this plain C struct.
                let mut nh: bpf_redir_neigh = unsafe { mem::zeroed() };
                // SAFETY: union fields of plain integers, written whole by the lookup.
                unsafe {
                    if p.ipv6 {
                        nh.nh_family = u32::from(AF_INET6);
                        nh.__bindgen_anon_1.ipv6_nh = f.__bindgen_anon_4.ipv6_dst;
                    } else {
                        nh.nh_family = u32::from(AF_INET);
                        nh.__bindgen_anon_1.ipv4_nh = f.__bindgen_anon_4.ipv4_dst;
                    }
                }
                self.redirect_neigh(ifindex, &mut nh)
            }
            // The host does not forward, so the helper answers nothing; the kernel routes it
            // itself through this device.
            BPF_FIB_LKUP_RET_FWD_DISABLED => self.redirect_neigh(ifindex, core::ptr::null_mut()),
            _ => to_stack(pkt.len()),
        }
    }
}

trait RedirectNeigh {
    fn redirect_neigh(&self, ifindex: u32, nh: *mut bpf_redir_neigh) -> Verdict;
}

impl RedirectNeigh for TcContext {
    /// Out of `ifindex` (the device the packet was leaving by) through the neighbour
    /// subsystem; marked, since it comes through this TC egress again.
    #[inline(always)]
    fn redirect_neigh(&self, ifindex: u32, nh: *mut bpf_redir_neigh) -> Verdict {
        let size = if nh.is_null() {
            0
        } else {
            mem::size_of::<bpf_redir_neigh>() as i32
        };
        // SAFETY: the context's own skb; `nh` null or a struct of the size passed.
        unsafe {
            (*self.skb.skb).tc_index |= TC_INDEX_NAT_DONE;
            Verdict::Redirect(bpf_redirect_neigh(ifindex, nh, size, 0))
        }
    }
}

/// Whether this TC egress run sees a packet it already sent on through `bpf_redirect_neigh`
/// (the mark is cleared: the packet leaves this time).
#[inline(always)]
pub fn tc_second_pass(ctx: &TcContext) -> bool {
    // SAFETY: the context's own skb, valid for this run.
    unsafe {
        let skb = ctx.skb.skb;
        if (*skb).tc_index & TC_INDEX_NAT_DONE == 0 {
            return false;
        }
        (*skb).tc_index &= !TC_INDEX_NAT_DONE;
    }
    true
}

#[inline(always)]
fn to_stack(len: u64) -> Verdict {
    stats::global(GSTAT_NAT_TO_STACK, len);
    Verdict::Pass
}

/// The NAT the stage was handed over (`Handover::side`).
#[inline(always)]
pub fn handed_over_nat() -> Nat {
    match LB_HANDOVER.get(0) {
        Some(h) if h.side == SIDE_SRC => Nat::Reverse,
        _ => Nat::Dnat,
    }
}
