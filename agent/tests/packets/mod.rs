//! Crafting test frames byte by byte, so that malformed ones (bogus IHL, truncation at any
//! offset, long IPv6 extension chains) are as easy to write as valid ones.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// L4 part of a frame.
#[derive(Clone, Debug)]
pub enum L4 {
    Udp {
        sport: u16,
        dport: u16,
    },
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Icmp,
    /// Raw bytes after the IP header (e.g. a non-first fragment's payload).
    Raw(u8, Vec<u8>),
}

impl L4 {
    fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Icmp if v6 => IPPROTO_ICMPV6,
            L4::Icmp => IPPROTO_ICMP,
            L4::Raw(p, _) => *p,
        }
    }

    fn bytes(&self, payload: usize) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            L4::Udp { sport, dport } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(((8 + payload) as u16).to_be_bytes());
                b.extend([0, 0]); // checksum 0: "none" for IPv4
            }
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(1u32.to_be_bytes()); // seq
                b.extend(0u32.to_be_bytes()); // ack
                b.push(5 << 4); // data offset 5 words
                b.push(*flags);
                b.extend(64240u16.to_be_bytes());
                b.extend([0, 0, 0, 0]); // checksum, urgent
            }
            L4::Icmp => b.extend([8, 0, 0, 0, 0, 1, 0, 1]),
            L4::Raw(_, raw) => b.extend(raw),
        }
        b.extend(std::iter::repeat_n(0xab, payload));
        b
    }
}

/// An IPv6 extension header: (type, total length in bytes, a multiple of 8).
#[derive(Clone, Copy, Debug)]
pub struct Ext {
    pub kind: u8,
    pub len: usize,
    /// Fragment offset in 8-byte units, for fragment headers.
    pub frag_offset: u16,
}

pub const EXT_HOPOPTS: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_FRAGMENT: u8 = 44;
pub const EXT_DSTOPTS: u8 = 60;

#[derive(Clone, Debug)]
pub struct Frame {
    pub vlans: Vec<u16>,
    /// Outer tag ether type for the first tag (802.1ad for QinQ).
    pub outer_tpid: u16,
    pub l3: L3,
    pub l4: L4,
    pub payload: usize,
}

#[derive(Clone, Debug)]
pub enum L3 {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        /// IHL field as written (5 = no options); options are zero-filled to match it.
        ihl: u8,
        /// Flags+offset field (host order): 0x2000 = MF, low 13 bits = offset.
        frag: u16,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ext: Vec<Ext>,
    },
    /// A non-IP ether type with some payload bytes.
    Other(u16),
}

impl Frame {
    pub fn udp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Frame {
        Frame {
            vlans: vec![],
            outer_tpid: ETH_P_8021Q,
            l3: L3::V4 {
                src: src.into(),
                dst: dst.into(),
                ihl: 5,
                frag: 0,
            },
            l4: L4::Udp { sport, dport },
            payload: 18,
        }
    }

    pub fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Frame {
        Frame {
            l4: L4::Tcp {
                sport,
                dport,
                flags: 0x02,
            },
            ..Frame::udp4(src, sport, dst, dport)
        }
    }

    pub fn v6(src: Ipv6Addr, dst: Ipv6Addr, l4: L4) -> Frame {
        Frame {
            vlans: vec![],
            outer_tpid: ETH_P_8021Q,
            l3: L3::V6 {
                src,
                dst,
                ext: vec![],
            },
            l4,
            payload: 18,
        }
    }

    pub fn with_vlans(mut self, tags: &[u16], outer_tpid: u16) -> Frame {
        self.vlans = tags.to_vec();
        self.outer_tpid = outer_tpid;
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend([0x02, 0, 0, 0, 0, 0x02]); // dst mac
        b.extend([0x02, 0, 0, 0, 0, 0x01]); // src mac
        let inner_type = match &self.l3 {
            L3::V4 { .. } => ETH_P_IP,
            L3::V6 { .. } => ETH_P_IPV6,
            L3::Other(t) => *t,
        };
        for (i, vid) in self.vlans.iter().enumerate() {
            let tpid = if i == 0 { self.outer_tpid } else { ETH_P_8021Q };
            b.extend(tpid.to_be_bytes());
            b.extend(vid.to_be_bytes()); // TCI = priority 0, VID
        }
        b.extend(inner_type.to_be_bytes());
        match &self.l3 {
            L3::V4 {
                src,
                dst,
                ihl,
                frag,
            } => {
                let l4 = self.l4.bytes(self.payload);
                let hdr_len = usize::from(*ihl).max(5) * 4;
                let mut ip = vec![0x40 | (ihl & 0x0f), 0];
                ip.extend(((hdr_len + l4.len()) as u16).to_be_bytes());
                ip.extend([0x12, 0x34]); // id
                ip.extend(frag.to_be_bytes());
                ip.push(64);
                ip.push(self.l4.proto(false));
                ip.extend([0, 0]); // checksum (the datapath does not verify it)
                ip.extend(src.octets());
                ip.extend(dst.octets());
                ip.resize(hdr_len, 0x01); // NOP options
                b.extend(ip);
                b.extend(l4);
            }
            L3::V6 { src, dst, ext } => {
                let l4 = self.l4.bytes(self.payload);
                let mut chain = Vec::new();
                for (i, e) in ext.iter().enumerate() {
                    let next = ext
                        .get(i + 1)
                        .map(|n| n.kind)
                        .unwrap_or(self.l4.proto(true));
                    let mut h = vec![next, 0];
                    if e.kind == EXT_FRAGMENT {
                        h.extend((e.frag_offset << 3).to_be_bytes());
                        h.extend([0, 0, 0, 1]);
                    } else {
                        h[1] = (e.len / 8 - 1) as u8;
                        h.resize(e.len, 0);
                    }
                    chain.extend(h);
                }
                let first = ext.first().map(|e| e.kind).unwrap_or(self.l4.proto(true));
                b.extend([0x60, 0, 0, 0]);
                b.extend(((chain.len() + l4.len()) as u16).to_be_bytes());
                b.push(first);
                b.push(64);
                b.extend(src.octets());
                b.extend(dst.octets());
                b.extend(chain);
                b.extend(l4);
            }
            L3::Other(_) => b.extend([0u8; 28]),
        }
        b
    }
}
