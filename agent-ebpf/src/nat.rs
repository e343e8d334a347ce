//! Address and port rewriting (DNAT toward a backend, reverse NAT of its replies) with the
//! checksums kept valid: the IPv4 header checksum, and the TCP/UDP checksum whose
//! pseudo-header holds the addresses.
//!
//! XDP sees frames off the wire, whose L4 checksums are complete: they are updated in place
//! (RFC 1624, `agent_common::lb::csum_replace`). TC egress sees the local stack's skbs, whose
//! L4 checksum is often left for the device to finish (CHECKSUM_PARTIAL): the kernel's
//! `bpf_l3/l4_csum_replace` helpers update either form correctly, so TC uses them.
//! An IPv4 UDP checksum of 0 means "none" and stays 0.

use agent_common::{
    classify::{PROTO_UDP, v4_mapped},
    lb::csum_replace,
    reply::checksum,
};
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::{TcContext, XdpContext},
};
use core::ptr::{read_unaligned, write_unaligned};

use crate::parse::{HasPacket, Packet, Parsed};

const V4_SRC: usize = 12;
const V4_DST: usize = 16;
const V4_CSUM: usize = 10;
const V6_SRC: usize = 8;
const V6_DST: usize = 24;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

pub trait Nat {
    /// Rewrites `side`'s address and port to `addr` (`::ffff:a.b.c.d` for IPv4) and `port`.
    /// `false` when the packet could not be rewritten (it is then unchanged).
    fn nat(&self, p: &Parsed, side: Side, addr: &[u8; 16], port: u16) -> bool;
}

#[inline(always)]
fn offsets(p: &Parsed, side: Side) -> (usize, usize, usize) {
    let addr = p.l3
        + match (p.ipv6, side) {
            (false, Side::Src) => V4_SRC,
            (false, Side::Dst) => V4_DST,
            (true, Side::Src) => V6_SRC,
            (true, Side::Dst) => V6_DST,
        };
    let port = p.l4 + if side == Side::Src { 0 } else { 2 };
    let csum = p.l4
        + if p.proto == PROTO_UDP {
            UDP_CSUM
        } else {
            TCP_CSUM
        };
    (addr, port, csum)
}

#[inline(always)]
fn v4(mapped: &[u8; 16]) -> [u8; 4] {
    [mapped[12], mapped[13], mapped[14], mapped[15]]
}

impl Nat for XdpContext {
    #[inline(always)]
    fn nat(&self, p: &Parsed, side: Side, addr: &[u8; 16], port: u16) -> bool {
        if p.ipv6 {
            xdp_nat_v6(self, p, side, addr, port)
        } else {
            xdp_nat_v4(self, p, side, addr, port)
        }
    }
}

/// The L4 checksum and the old port of a packet, as `xdp_nat_*` need them; `None` when the
/// headers are not all in the packet.
#[inline(always)]
fn l4_fields(
    pkt: &Packet,
    port_at: usize,
    csum_at: usize,
) -> Option<(*const [u8; 2], *const [u8; 2], u16)> {
    let csum = pkt.ptr_at::<[u8; 2]>(csum_at).ok()?;
    let old_port = pkt.ptr_at::<[u8; 2]>(port_at).ok()?;
    // SAFETY: bounds-checked by `ptr_at`.
    let l4 = u16::from_be_bytes(unsafe { read_unaligned(csum) });
    Some((csum, old_port, l4))
}

/// Rewrites the port and stores the L4 checksum (`no_csum`: an IPv4 UDP datagram without one).
///
/// # Safety
/// `csum` and `old_port` must point into the packet, bounds-checked.
#[inline(always)]
unsafe fn finish_l4(
    p: &Parsed,
    csum: *const [u8; 2],
    old_port: *const [u8; 2],
    mut l4: u16,
    port: u16,
    no_csum: bool,
) {
    let new_port = port.to_be_bytes();
    // SAFETY: per the function's contract.
    unsafe {
        l4 = csum_replace(l4, &read_unaligned(old_port), &new_port);
        write_unaligned(old_port as *mut [u8; 2], new_port);
        if !no_csum {
            // A computed UDP checksum of 0 is sent as all ones (RFC 768).
            if p.proto == PROTO_UDP && l4 == 0 {
                l4 = 0xffff;
            }
            write_unaligned(csum as *mut [u8; 2], l4.to_be_bytes());
        }
    }
}

// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
fn xdp_nat_v4(ctx: &XdpContext, p: &Parsed, side: Side, addr: &[u8; 16], port: u16) -> bool {
    let pkt = ctx.packet();
    let (addr_at, port_at, csum_at) = offsets(p, side);
    let (Some((csum, old_port, l4)), Ok(a), Ok(ip_csum)) = (
        l4_fields(&pkt, port_at, csum_at),
        pkt.ptr_at::<[u8; 4]>(addr_at),
        pkt.ptr_at::<[u8; 2]>(p.l3 + V4_CSUM),
    ) else {
        return false;
    };
    let no_csum = p.proto == PROTO_UDP && l4 == 0;
    // SAFETY: every pointer was bounds-checked by `ptr_at` against this packet, and nothing
    // resizes it in between.
    unsafe {
        let (old, new) = (read_unaligned(a), v4(addr));
        let ip = csum_replace(u16::from_be_bytes(read_unaligned(ip_csum)), &old, &new);
        write_unaligned(ip_csum as *mut [u8; 2], ip.to_be_bytes());
        write_unaligned(a as *mut [u8; 4], new);
        finish_l4(
            p,
            csum,
            old_port,
            csum_replace(l4, &old, &new),
            port,
            no_csum,
        );
    }
    true
}

// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
fn xdp_nat_v6(ctx: &XdpContext, p: &Parsed, side: Side, addr: &[u8; 16], port: u16) -> bool {
    let pkt = ctx.packet();
    let (addr_at, port_at, csum_at) = offsets(p, side);
    let (Some((csum, old_port, l4)), Ok(a)) = (
        l4_fields(&pkt, port_at, csum_at),
        pkt.ptr_at::<[u8; 16]>(addr_at),
    ) else {
        return false;
    };
    // SAFETY: as in `xdp_nat_v4`; the helper reads 16 bytes at each pointer, both valid.
    unsafe {
        // The kernel sums the 16-byte difference (the same RFC 1624 update as
        // `csum_replace`, without copying the addresses onto the small BPF stack). It sums
        // 16-bit words as they lie in memory, native order: the seed goes in, and the result
        // comes out, byte-swapped against `l4` (read big-endian). One's-complement sums
        // commute with the swap, so swapping in and out is exact.
        let sum = bpf_csum_diff(
            a as *mut u32,
            16,
            addr.as_ptr() as *mut u32,
            16,
            u32::from(u16::from_be(!l4)),
        );
        if sum < 0 {
            return false;
        }
        write_unaligned(a as *mut [u8; 16], *addr);
        let l4 = u16::from_be(checksum(sum as u32));
        finish_l4(p, csum, old_port, l4, port, false);
    }
    true
}

impl Nat for TcContext {
    // A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
    #[inline(never)]
    fn nat(&self, p: &Parsed, side: Side, addr: &[u8; 16], port: u16) -> bool {
        let pkt = self.packet();
        let (addr_at, port_at, csum_at) = offsets(p, side);
        let mangled = if p.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled;
        // Read everything first: the helpers below invalidate packet pointers.
        let Ok(old_port) = pkt.ptr_at::<[u8; 2]>(port_at) else {
            return false;
        };
        // SAFETY: bounds-checked by `ptr_at`.
        let old_port = u16::from_ne_bytes(unsafe { read_unaligned(old_port) });
        let new_port = u16::from_ne_bytes(port.to_be_bytes());
        let old: [u8; 16] = if p.ipv6 {
            let Ok(a) = pkt.ptr_at::<[u8; 16]>(addr_at) else {
                return false;
            };
            // SAFETY: bounds-checked by `ptr_at`.
            unsafe { read_unaligned(a) }
        } else {
            let Ok(a) = pkt.ptr_at::<[u8; 4]>(addr_at) else {
                return false;
            };
            // SAFETY: bounds-checked by `ptr_at`.
            v4_mapped(unsafe { read_unaligned(a) })
        };
        let word = |b: &[u8; 16], i: usize| {
            u64::from(u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]))
        };
        let ok = if p.ipv6 {
            let mut ok = true;
            let mut i = 0;
            while i < 16 {
                ok &= self
                    .l4_csum_replace(csum_at, word(&old, i), word(addr, i), pseudo | 4)
                    .is_ok();
                i += 4;
            }
            ok && self.store(addr_at, addr, 0).is_ok()
        } else {
            let (from, to) = (word(&old, 12), word(addr, 12));
            self.l3_csum_replace(p.l3 + V4_CSUM, from, to, 4).is_ok()
                && self.l4_csum_replace(csum_at, from, to, pseudo | 4).is_ok()
                && self.store(addr_at, &v4(addr), 0).is_ok()
        };
        ok && self
            .l4_csum_replace(
                csum_at,
                u64::from(old_port),
                u64::from(new_port),
                mangled | 2,
            )
            .is_ok()
            && self.store(port_at, &port.to_be_bytes(), 0).is_ok()
    }
}
