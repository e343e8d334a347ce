//! Turns a refused packet into its answer, in place: a TCP RST, or an ICMP / ICMPv6 port
//! unreachable for UDP. The bytes are built by `agent_common::reply` (host-tested) in a
//! per-CPU scratch buffer; here the packet is resized to the answer's length, the answer
//! written at the L3 offset and the MAC addresses swapped. The hook then sends it back
//! (XDP_TX, or a redirect to the ingress of the device for TC egress).
//!
//! Only plain headers are answered: IPv4 without options, IPv6 without extension headers.
//! Anything else cannot be answered here and the caller drops it.

use agent_common::{
    classify::PROTO_TCP,
    reply::{
        IPV4_HDR_LEN, IPV6_HDR_LEN, QUOTE_AT_V4, QUOTE_AT_V6, QUOTE_V4_LEN, QUOTE_V6_LEN,
        RST_V4_LEN, RST_V6_LEN, UNREACH_V4_LEN, UNREACH_V6_LEN, port_unreachable_v4,
        port_unreachable_v6, rst_for, rst_v4, rst_v6,
    },
};
use aya_ebpf::{
    helpers::{bpf_skb_change_tail, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use core::ptr::{copy_nonoverlapping, read_unaligned, write_unaligned};

use crate::{
    maps::{REPLY_SCRATCH, REPLY_SCRATCH_LEN},
    parse::{HasPacket, Packet, Parsed},
};

/// Ethernet destination + source.
const MACS_LEN: usize = 12;
/// The deepest L3 offset the parser yields (Ethernet + two VLAN tags).
const MAX_L3: usize = 22;

/// A hook's way to resize and write the packet.
pub trait Rewrite: HasPacket {
    /// Resizes the packet to `l3 + N` bytes, writes `macs` at 0 and `bytes` at `l3`.
    fn finish<const N: usize>(&self, l3: usize, bytes: &[u8; N], macs: &[u8; MACS_LEN]) -> bool;
}

impl Rewrite for XdpContext {
    #[inline(always)]
    fn finish<const N: usize>(&self, l3: usize, bytes: &[u8; N], macs: &[u8; MACS_LEN]) -> bool {
        // The verifier refuses 32-bit arithmetic on packet pointers, which is what LLVM makes
        // of this subtraction when only the low half of the result is used; `black_box`
        // keeps it a 64-bit difference turned into a scalar first.
        let cur = core::hint::black_box(self.data_end() - self.data()) as i64;
        let delta = (l3 + N) as i64 - cur;
        // SAFETY: helper on this program's own context.
        if unsafe { bpf_xdp_adjust_tail(self.ctx, delta as i32) } != 0 {
            return false;
        }
        let pkt = self.packet();
        let (Ok(eth), Ok(dst)) = (pkt.ptr_at::<[u8; MACS_LEN]>(0), pkt.ptr_at::<[u8; N]>(l3))
        else {
            return false;
        };
        // SAFETY: both ranges were bounds-checked against the resized packet just above.
        unsafe {
            write_unaligned(eth as *mut [u8; MACS_LEN], *macs);
            copy_nonoverlapping(bytes.as_ptr(), dst as *mut u8, N);
        }
        true
    }
}

impl Rewrite for TcContext {
    #[inline(always)]
    fn finish<const N: usize>(&self, l3: usize, bytes: &[u8; N], macs: &[u8; MACS_LEN]) -> bool {
        // SAFETY: helper on this program's own skb.
        if unsafe { bpf_skb_change_tail(self.skb.skb, (l3 + N) as u32, 0) } != 0 {
            return false;
        }
        self.skb.store(0, macs, 0).is_ok() && self.skb.store(l3, bytes, 0).is_ok()
    }
}

/// The MAC addresses of the answer, the packet's swapped, written into `out` (scratch space:
/// nothing here goes on the small stack).
#[inline(always)]
fn swap_macs(pkt: &Packet, out: &mut [u8; MACS_LEN]) -> Option<()> {
    let eth = pkt.ptr_at::<[u8; 6]>(0).ok()?;
    let src = pkt.ptr_at::<[u8; 6]>(6).ok()?;
    // SAFETY: bounds-checked by `ptr_at`; `out` is map memory, apart from the packet.
    unsafe {
        copy_nonoverlapping(src as *const u8, out.as_mut_ptr(), 6);
        copy_nonoverlapping(eth as *const u8, out[6..].as_mut_ptr(), 6);
    }
    Some(())
}

/// The scratch buffer: room for the swapped MAC addresses, and the first `N` bytes of the
/// room for an answer of `N` bytes.
#[inline(always)]
fn scratch<const N: usize>() -> Option<(&'static mut [u8; MACS_LEN], &'static mut [u8; N])> {
    const { assert!(N <= REPLY_SCRATCH_LEN) };
    let p = REPLY_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU map value of MACS_LEN + REPLY_SCRATCH_LEN >= MACS_LEN + N bytes, used by
    // this run only; the two parts do not overlap.
    unsafe {
        let base = p as *mut u8;
        Some((
            &mut *(base as *mut [u8; MACS_LEN]),
            &mut *(base.add(MACS_LEN) as *mut [u8; N]),
        ))
    }
}

/// Rewrites the packet into the answer that refuses it. `false` when it cannot be answered
/// (unusual headers, a resize the hook refused); the caller drops it then.
// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
pub fn answer<R: Rewrite>(r: &R, p: &Parsed) -> bool {
    build(r, p).unwrap_or(false)
}

#[inline(always)]
fn build<R: Rewrite>(r: &R, p: &Parsed) -> Option<bool> {
    let pkt = r.packet();
    let hdr = if p.ipv6 { IPV6_HDR_LEN } else { IPV4_HDR_LEN };
    if p.l3 > MAX_L3 || p.l4 != p.l3 + hdr {
        return None;
    }
    Some(match (p.proto == PROTO_TCP, p.ipv6) {
        (true, false) => {
            let (seg, (macs, b)) = (segment(&pkt, p)?, scratch::<RST_V4_LEN>()?);
            swap_macs(&pkt, macs)?;
            rst_v4(b, v4(&p.dst), v4(&p.src), p.dport, p.sport, seg);
            r.finish(p.l3, b, macs)
        }
        (true, true) => {
            let (seg, (macs, b)) = (segment(&pkt, p)?, scratch::<RST_V6_LEN>()?);
            swap_macs(&pkt, macs)?;
            rst_v6(b, &p.dst, &p.src, p.dport, p.sport, seg);
            r.finish(p.l3, b, macs)
        }
        (false, false) => {
            let (macs, b) = scratch::<UNREACH_V4_LEN>()?;
            swap_macs(&pkt, macs)?;
            copy_quote::<QUOTE_V4_LEN>(&pkt, p.l3, &mut b[QUOTE_AT_V4..])?;
            port_unreachable_v4(b);
            r.finish(p.l3, b, macs)
        }
        (false, true) => {
            let (macs, b) = scratch::<UNREACH_V6_LEN>()?;
            swap_macs(&pkt, macs)?;
            copy_quote::<QUOTE_V6_LEN>(&pkt, p.l3, &mut b[QUOTE_AT_V6..])?;
            port_unreachable_v6(b);
            r.finish(p.l3, b, macs)
        }
    })
}

/// Copies the `Q` bytes of the packet from `l3` on into `dst`: what an ICMP error quotes.
#[inline(always)]
fn copy_quote<const Q: usize>(pkt: &Packet, l3: usize, dst: &mut [u8]) -> Option<()> {
    let q = pkt.ptr_at::<[u8; Q]>(l3).ok()?;
    if dst.len() < Q {
        return None;
    }
    // SAFETY: `q` was bounds-checked by `ptr_at`, `dst` holds `Q` bytes, and the scratch
    // buffer never overlaps the packet.
    unsafe { copy_nonoverlapping(q as *const u8, dst.as_mut_ptr(), Q) };
    Some(())
}

/// The RST's sequence fields for the TCP segment at `p.l4`.
#[inline(always)]
fn segment(pkt: &Packet, p: &Parsed) -> Option<agent_common::reply::Rst> {
    let (seq, ack, off) = (
        pkt.ptr_at::<[u8; 4]>(p.l4 + 4).ok()?,
        pkt.ptr_at::<[u8; 4]>(p.l4 + 8).ok()?,
        pkt.ptr_at::<u8>(p.l4 + 12).ok()?,
    );
    // IPv4 total length (bytes 2-3) or IPv6 payload length (bytes 4-5).
    let len = pkt
        .ptr_at::<[u8; 2]>(p.l3 + if p.ipv6 { 4 } else { 2 })
        .ok()?;
    // SAFETY: bounds-checked by `ptr_at`.
    let (seq, ack, off, len) = unsafe {
        (
            u32::from_be_bytes(read_unaligned(seq)),
            u32::from_be_bytes(read_unaligned(ack)),
            *off,
            read_unaligned(len),
        )
    };
    let doff = u32::from(off >> 4) * 4;
    let ip_len = u32::from(u16::from_be_bytes(len));
    let payload = if p.ipv6 {
        ip_len.saturating_sub(doff)
    } else {
        ip_len.saturating_sub(IPV4_HDR_LEN as u32 + doff)
    };
    Some(rst_for(seq, ack, p.tcp_flags, payload))
}

/// The IPv4 address inside `::ffff:a.b.c.d`.
#[inline(always)]
fn v4(mapped: &[u8; 16]) -> [u8; 4] {
    [mapped[12], mapped[13], mapped[14], mapped[15]]
}
