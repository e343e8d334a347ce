//! Header parsing. Every access goes through `Packet::ptr_at`, the one bounds check the
//! verifier needs to see.
//!
//! What is parsed:
//! - Ethernet, then up to `MAX_VLAN_TAGS` 802.1Q / 802.1ad tags (QinQ);
//! - IPv4 with options (IHL 5..15; IHL < 5 is malformed);
//! - IPv6, walking at most `MAX_IPV6_EXT_HDRS` extension headers (hop-by-hop, routing,
//!   destination options, fragment, AH); a chain longer than that is reported as
//!   `ExtHdrLimit` and passed;
//! - TCP, UDP (full fixed header), ICMP/ICMPv6 (type and code).
//!
//! Fragments: the first fragment carries the L4 header and is parsed like any packet; a
//! non-first fragment carries no ports, so it is classified with `port: None` and matches only
//! services without a port. Packets of other protocols also carry no ports.

use agent_common::classify::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, v4_mapped};
use aya_ebpf::programs::{TcContext, XdpContext};
use core::mem;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const VLAN_HDR_LEN: usize = 4;
pub const MAX_VLAN_TAGS: usize = 2;

pub const IPV4_MIN_IHL: u8 = 5;
/// IPv4 fragment offset bits of the flags+offset field.
pub const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;

pub const IPV6_EXT_HOPOPTS: u8 = 0;
pub const IPV6_EXT_ROUTING: u8 = 43;
pub const IPV6_EXT_FRAGMENT: u8 = 44;
pub const IPV6_EXT_AH: u8 = 51;
pub const IPV6_EXT_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up (fail open). Real traffic rarely has more than
/// two; the bound keeps the verifier's view of the loop small.
pub const MAX_IPV6_EXT_HDRS: usize = 6;
const IPV6_FRAG_HDR_LEN: usize = 8;
/// Fragment offset bits of the IPv6 fragment header's offset field (host order).
const IPV6_FRAG_OFFSET_MASK: u16 = 0xfff8;

pub const ICMP_HDR_MIN_LEN: usize = 4;
/// Byte of the TCP header holding the flags (CWR..FIN).
pub const TCP_FLAGS_OFFSET: usize = 13;

/// Why a packet was not parsed. Every one of these passes (fail open).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not IPv4 or IPv6.
    NotIp,
    /// A header runs past the end of the packet, or has an impossible length field.
    Malformed,
    /// More IPv6 extension headers than `MAX_IPV6_EXT_HDRS`.
    ExtHdrLimit,
}

/// Raw packet bounds, as `data` / `data_end` of the context.
pub struct Packet {
    pub start: usize,
    pub end: usize,
}

impl Packet {
    /// A pointer to a `T` at `offset`, or `Malformed` when it would run past the end.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Result<*const T, ParseError> {
        let len = mem::size_of::<T>();
        if self.start + offset + len > self.end {
            return Err(ParseError::Malformed);
        }
        Ok((self.start + offset) as *const T)
    }

    #[inline(always)]
    pub fn len(&self) -> u64 {
        (self.end - self.start) as u64
    }
}

/// A hook's packet: XDP and TC (the linear part of the skb) alike.
pub trait HasPacket {
    fn packet(&self) -> Packet;
}

impl HasPacket for XdpContext {
    #[inline(always)]
    fn packet(&self) -> Packet {
        Packet {
            start: self.data(),
            end: self.data_end(),
        }
    }
}

impl HasPacket for TcContext {
    #[inline(always)]
    fn packet(&self) -> Packet {
        Packet {
            start: self.data(),
            end: self.data_end(),
        }
    }
}

/// The facts classification and limiting need. Addresses are 16 bytes, IPv4 as `::ffff:a.b.c.d`.
/// `#[repr(C)]`: the main program hands it to the stages it tail-calls in `LB_HANDOVER`
/// (`crate::maps::Handover`), so that no stage parses the frame again.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Parsed {
    /// Offsets of the IP header and of the L4 header (the latter meaningful with `has_ports`
    /// or an ICMP header).
    pub l3: usize,
    pub l4: usize,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host order; meaningful only when `has_ports`.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flag bits (byte 13 of the header); 0 for other protocols.
    pub tcp_flags: u8,
    pub has_ports: bool,
    pub fragment: bool,
    /// IPv6 (else IPv4).
    pub ipv6: bool,
    pub _pad: [u8; 7],
}
const _: () = assert!(mem::size_of::<Parsed>() == 64);

/// Every offset `parse` can produce is below this (Ethernet, two VLAN tags, IPv6 and
/// `MAX_IPV6_EXT_HDRS` extension headers of at most 2,048 bytes each: under 12,400): a stage
/// that takes offsets handed over in a map masks them with `OFFSET_MASK` so the verifier
/// sees them bounded, which changes none of them.
pub const OFFSET_MASK: usize = 0x3fff;
const _: () = assert!(
    EthHdr::LEN + MAX_VLAN_TAGS * VLAN_HDR_LEN + Ipv6Hdr::LEN + MAX_IPV6_EXT_HDRS * 2_048
        < OFFSET_MASK
);

impl Parsed {
    #[inline(always)]
    pub fn dport(&self) -> Option<u16> {
        if self.has_ports {
            Some(self.dport)
        } else {
            None
        }
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

impl Parsed {
    /// What `parse` writes over.
    pub const EMPTY: Parsed = Parsed {
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        has_ports: false,
        fragment: false,
        ipv6: false,
        l3: 0,
        l4: 0,
        tcp_flags: 0,
        _pad: [0; 7],
    };

    /// This one as a stage finds it in the hand-over: its offsets masked (`OFFSET_MASK`).
    #[inline(always)]
    pub fn handed_over(&self) -> Parsed {
        Parsed {
            l3: self.l3 & OFFSET_MASK,
            l4: self.l4 & OFFSET_MASK,
            ..*self
        }
    }
}

/// Parses the packet into `out`. A BPF subprogram with its own stack frame (see "Stack" in
/// pipeline.rs), so its signature goes into the object's BTF: `Result<(), _>` and an out
/// parameter, not `Result<Parsed, _>`, whose tag sits in a niche of `Parsed` and comes out as
/// a union member at an offset, which the kernel refuses (`Invalid member bits_offset`), and
/// without loaded BTF the maps defined by BTF (`LB_TABLES`) cannot be created.
#[inline(never)]
pub fn parse(pkt: &Packet, out: &mut Parsed) -> Result<(), ParseError> {
    let eth: *const EthHdr = pkt.ptr_at(0)?;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut off = EthHdr::LEN;

    let mut tags = 0;
    while tags < MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        // Tag: 2 bytes TCI, then the encapsulated ether type.
        let inner: *const [u8; 2] = pkt.ptr_at(off + 2)?;
        ether_type = be16(unsafe { *inner });
        off += VLAN_HDR_LEN;
        tags += 1;
    }

    match ether_type {
        ETH_P_IP => parse_ipv4(pkt, off, out),
        ETH_P_IPV6 => parse_ipv6(pkt, off, out),
        _ => Err(ParseError::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4(pkt: &Packet, off: usize, p: &mut Parsed) -> Result<(), ParseError> {
    let ip: *const Ipv4Hdr = pkt.ptr_at(off)?;
    let ip = unsafe { &*ip };
    let vihl = ip.vihl;
    let ihl = vihl & 0x0f;
    if vihl >> 4 != 4 || ihl < IPV4_MIN_IHL {
        return Err(ParseError::Malformed);
    }
    let hdr_len = (ihl as usize) * 4;
    // Options must be inside the packet too.
    pkt.ptr_at::<u8>(off + hdr_len - 1)?;
    let fragment = be16(ip.frags) & IPV4_FRAG_OFFSET_MASK != 0;
    *p = Parsed {
        proto: ip.proto,
        src: v4_mapped(ip.src_addr),
        dst: v4_mapped(ip.dst_addr),
        sport: 0,
        dport: 0,
        has_ports: false,
        fragment,
        ipv6: false,
        l3: off,
        l4: off + hdr_len,
        tcp_flags: 0,
        _pad: [0; 7],
    };
    if !fragment {
        parse_l4(pkt, off + hdr_len, p)?;
    }
    Ok(())
}

#[inline(always)]
fn parse_ipv6(pkt: &Packet, off: usize, p: &mut Parsed) -> Result<(), ParseError> {
    let ip: *const Ipv6Hdr = pkt.ptr_at(off)?;
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    *p = Parsed {
        proto: ip.next_hdr,
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport: 0,
        dport: 0,
        has_ports: false,
        fragment: false,
        ipv6: true,
        l3: off,
        l4: off + Ipv6Hdr::LEN,
        tcp_flags: 0,
        _pad: [0; 7],
    };
    let mut off = off + Ipv6Hdr::LEN;
    let mut walked = 0;
    while matches!(
        p.proto,
        IPV6_EXT_HOPOPTS | IPV6_EXT_ROUTING | IPV6_EXT_DSTOPTS | IPV6_EXT_AH | IPV6_EXT_FRAGMENT
    ) {
        if walked == MAX_IPV6_EXT_HDRS {
            return Err(ParseError::ExtHdrLimit);
        }
        // Every extension header starts with next header and a length byte.
        let hdr: *const [u8; 2] = pkt.ptr_at(off)?;
        let [next, len] = unsafe { *hdr };
        let hdr_len = match p.proto {
            IPV6_EXT_FRAGMENT => {
                let frag: *const [u8; 4] = pkt.ptr_at(off)?;
                let f = unsafe { *frag };
                if be16([f[2], f[3]]) & IPV6_FRAG_OFFSET_MASK != 0 {
                    p.fragment = true;
                }
                IPV6_FRAG_HDR_LEN
            }
            // AH counts 4-byte units minus 2.
            IPV6_EXT_AH => (len as usize + 2) * 4,
            _ => (len as usize + 1) * 8,
        };
        p.proto = next;
        off += hdr_len;
        walked += 1;
    }
    p.l4 = off;
    if !p.fragment {
        parse_l4(pkt, off, p)?;
    }
    Ok(())
}

#[inline(always)]
fn parse_l4(pkt: &Packet, off: usize, p: &mut Parsed) -> Result<(), ParseError> {
    match p.proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = pkt.ptr_at(off)?;
            // SAFETY: the whole fixed header was bounds-checked; the flags byte is inside it
            // (read through the same pointer, so the verifier sees the same checked range).
            p.tcp_flags = unsafe { *(tcp as *const u8).add(TCP_FLAGS_OFFSET) };
            let tcp = unsafe { &*tcp };
            p.sport = be16(tcp.source);
            p.dport = be16(tcp.dest);
            p.has_ports = true;
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = pkt.ptr_at(off)?;
            let udp = unsafe { &*udp };
            p.sport = be16(udp.src);
            p.dport = be16(udp.dst);
            p.has_ports = true;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            pkt.ptr_at::<[u8; ICMP_HDR_MIN_LEN]>(off)?;
        }
        _ => {}
    }
    Ok(())
}
