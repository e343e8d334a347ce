//! Replies the datapath sends in place of a refused packet: a TCP RST (RFC 793 reset
//! generation) or an ICMP / ICMPv6 port unreachable quoting the refused datagram.
//!
//! Each builder returns the reply from its IP header on, checksums done, as a fixed-size array:
//! the datapath resizes the packet to `l3 offset + N`, writes these bytes at the L3 offset and
//! swaps the MAC addresses. Fixed sizes and plain loops keep the code verifier-friendly; the
//! same code is tested here on the host against known-good packets.

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;
pub const TCP_HDR_LEN: usize = 20;
pub const UDP_HDR_LEN: usize = 8;
const ICMP_HDR_LEN: usize = 8;
const REPLY_TTL: u8 = 64;

/// A RST for IPv4: IP header + TCP header.
pub const RST_V4_LEN: usize = IPV4_HDR_LEN + TCP_HDR_LEN;
/// A RST for IPv6: IPv6 header + TCP header.
pub const RST_V6_LEN: usize = IPV6_HDR_LEN + TCP_HDR_LEN;
/// What an ICMP error quotes of an IPv4 datagram: its header (no options) and 8 bytes.
pub const QUOTE_V4_LEN: usize = IPV4_HDR_LEN + UDP_HDR_LEN;
/// What an ICMPv6 error quotes here: the IPv6 header (no extension headers) and 8 bytes.
pub const QUOTE_V6_LEN: usize = IPV6_HDR_LEN + UDP_HDR_LEN;
pub const UNREACH_V4_LEN: usize = IPV4_HDR_LEN + ICMP_HDR_LEN + QUOTE_V4_LEN;
pub const UNREACH_V6_LEN: usize = IPV6_HDR_LEN + ICMP_HDR_LEN + QUOTE_V6_LEN;

/// Sequence, acknowledgment and flags of the RST answering a segment (RFC 793, "Reset
/// Generation"): if the segment has ACK, the RST takes its sequence number from that ACK
/// (exactly what the sender expects next, so RFC 5961 accepts it); otherwise it acknowledges
/// the segment, SYN and FIN counting one each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rst {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

#[inline(always)]
pub fn rst_for(seq: u32, ack: u32, flags: u8, payload_len: u32) -> Rst {
    if flags & TCP_ACK != 0 {
        return Rst {
            seq: ack,
            ack: 0,
            flags: TCP_RST,
        };
    }
    let mut len = payload_len;
    if flags & TCP_SYN != 0 {
        len = len.wrapping_add(1);
    }
    if flags & TCP_FIN != 0 {
        len = len.wrapping_add(1);
    }
    Rst {
        seq: 0,
        ack: seq.wrapping_add(len),
        flags: TCP_RST | TCP_ACK,
    }
}

/// Adds `bytes` as big-endian 16-bit words to a one's-complement running sum (even length).
#[inline(always)]
pub fn sum_words(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    acc
}

/// Folds a running sum into the 16-bit checksum field value.
#[inline(always)]
pub fn checksum(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

#[inline(always)]
fn put16(b: &mut [u8], at: usize, v: u16) {
    let [h, l] = v.to_be_bytes();
    b[at] = h;
    b[at + 1] = l;
}

#[inline(always)]
fn put32(b: &mut [u8], at: usize, v: u32) {
    let [a, c, d, e] = v.to_be_bytes();
    b[at] = a;
    b[at + 1] = c;
    b[at + 2] = d;
    b[at + 3] = e;
}

/// An IPv4 header (no options, DF, TTL 64) with its checksum, in `b[..20]`.
#[inline(always)]
fn ipv4_header(b: &mut [u8], total_len: u16, proto: u8, src: [u8; 4], dst: [u8; 4]) {
    b[0] = 0x45;
    b[1] = 0;
    put16(b, 2, total_len);
    put32(b, 4, 0x0000_4000); // id 0, DF
    b[8] = REPLY_TTL;
    b[9] = proto;
    put16(b, 10, 0);
    b[12..16].copy_from_slice(&src);
    b[16..20].copy_from_slice(&dst);
    let sum = checksum(sum_words(0, &b[..IPV4_HDR_LEN]));
    put16(b, 10, sum);
}

/// An IPv6 header (TTL 64, no flow label) in `b[..40]`.
#[inline(always)]
fn ipv6_header(b: &mut [u8], payload_len: u16, next: u8, src: &[u8; 16], dst: &[u8; 16]) {
    put32(b, 0, 0x6000_0000);
    put16(b, 4, payload_len);
    b[6] = next;
    b[7] = REPLY_TTL;
    b[8..24].copy_from_slice(src);
    b[24..40].copy_from_slice(dst);
}

/// The 20-byte TCP header of a RST from `sport` to `dport` in `t[..20]`, checksum zero.
#[inline(always)]
fn rst_header(t: &mut [u8], sport: u16, dport: u16, rst: Rst) {
    put16(t, 0, sport);
    put16(t, 2, dport);
    put32(t, 4, rst.seq);
    put32(t, 8, rst.ack);
    t[12] = 5 << 4;
    t[13] = rst.flags;
    put32(t, 14, 0); // window, checksum
    put16(t, 18, 0); // urgent pointer
}

/// Pseudo-header sum for IPv4 (RFC 793): addresses, protocol, L4 length.
#[inline(always)]
fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    sum_words(sum_words(u32::from(proto) + u32::from(len), &src), &dst)
}

/// Pseudo-header sum for IPv6 (RFC 8200 section 8.1).
#[inline(always)]
fn pseudo_v6(src: &[u8; 16], dst: &[u8; 16], next: u8, len: u16) -> u32 {
    sum_words(sum_words(u32::from(next) + u32::from(len), src), dst)
}

/// Writes the RST from `src:sport` (the refused destination) to `dst:dport` (the sender),
/// over IPv4, into `b`.
#[inline(always)]
pub fn rst_v4(
    b: &mut [u8; RST_V4_LEN],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    rst: Rst,
) {
    ipv4_header(b, RST_V4_LEN as u16, IPPROTO_TCP, src, dst);
    let t = &mut b[IPV4_HDR_LEN..];
    rst_header(t, sport, dport, rst);
    let sum = sum_words(pseudo_v4(src, dst, IPPROTO_TCP, TCP_HDR_LEN as u16), t);
    put16(t, 16, checksum(sum));
}

/// Writes the RST from `src:sport` to `dst:dport`, over IPv6, into `b`.
#[inline(always)]
pub fn rst_v6(
    b: &mut [u8; RST_V6_LEN],
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
    rst: Rst,
) {
    ipv6_header(b, TCP_HDR_LEN as u16, IPPROTO_TCP, src, dst);
    let t = &mut b[IPV6_HDR_LEN..];
    rst_header(t, sport, dport, rst);
    let sum = sum_words(pseudo_v6(src, dst, IPPROTO_TCP, TCP_HDR_LEN as u16), t);
    put16(t, 16, checksum(sum));
}

/// Offset of the quoted datagram in an IPv4 port unreachable.
pub const QUOTE_AT_V4: usize = IPV4_HDR_LEN + ICMP_HDR_LEN;
/// Offset of the quoted datagram in an IPv6 port unreachable.
pub const QUOTE_AT_V6: usize = IPV6_HDR_LEN + ICMP_HDR_LEN;

/// ICMP destination unreachable / port unreachable (type 3, code 3), sent from the quoted
/// datagram's destination back to its source. `b[QUOTE_AT_V4..]` must already hold the first
/// `QUOTE_V4_LEN` bytes of the datagram (copied there first, so no copy is made here).
#[inline(always)]
pub fn port_unreachable_v4(b: &mut [u8; UNREACH_V4_LEN]) {
    let q = QUOTE_AT_V4;
    let src = [b[q + 16], b[q + 17], b[q + 18], b[q + 19]];
    let dst = [b[q + 12], b[q + 13], b[q + 14], b[q + 15]];
    ipv4_header(b, UNREACH_V4_LEN as u16, IPPROTO_ICMP, src, dst);
    let icmp = &mut b[IPV4_HDR_LEN..];
    put32(icmp, 0, 0x0303_0000);
    put32(icmp, 4, 0);
    let sum = checksum(sum_words(0, icmp));
    put16(icmp, 2, sum);
}

/// ICMPv6 destination unreachable / port unreachable (type 1, code 4); `b[QUOTE_AT_V6..]`
/// must already hold the first `QUOTE_V6_LEN` bytes of the datagram.
#[inline(always)]
pub fn port_unreachable_v6(b: &mut [u8; UNREACH_V6_LEN]) {
    let q = QUOTE_AT_V6;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&b[q + 24..q + 40]);
    dst.copy_from_slice(&b[q + 8..q + 24]);
    let icmp_len = (ICMP_HDR_LEN + QUOTE_V6_LEN) as u16;
    ipv6_header(b, icmp_len, IPPROTO_ICMPV6, &src, &dst);
    let icmp = &mut b[IPV6_HDR_LEN..];
    put32(icmp, 0, 0x0104_0000);
    put32(icmp, 4, 0);
    let sum = checksum(sum_words(
        pseudo_v6(&src, &dst, IPPROTO_ICMPV6, icmp_len),
        icmp,
    ));
    put16(icmp, 2, sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verifies a checksum the way a receiver does: the sum over everything, checksum field
    /// included, folds to zero.
    fn verifies(acc: u32) -> bool {
        checksum(acc) == 0
    }

    fn sum_slice(acc: u32, b: &[u8]) -> u32 {
        b.chunks(2).fold(acc, |a, c| {
            a + u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
        })
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2 (before complement).
        let b = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(sum_words(0, &b)), !0xddf2);
        // Carries fold twice: 0xffff + 0xffff + 0x0002.
        assert_eq!(
            checksum(sum_words(0, &[0xff, 0xff, 0xff, 0xff, 0, 2])),
            !0x0002
        );
    }

    #[test]
    fn rst_answers_a_syn_by_acknowledging_it() {
        let r = rst_for(1000, 0, TCP_SYN, 0);
        assert_eq!(
            r,
            Rst {
                seq: 0,
                ack: 1001,
                flags: TCP_RST | TCP_ACK
            }
        );
        // A SYN with data (TFO) and wrap-around.
        assert_eq!(rst_for(u32::MAX, 0, TCP_SYN, 10).ack, 10);
        assert_eq!(rst_for(5, 0, TCP_FIN, 3).ack, 9);
    }

    #[test]
    fn rst_answers_an_ack_with_its_ack_number_as_sequence() {
        let r = rst_for(1000, 777, TCP_ACK, 100);
        assert_eq!(
            r,
            Rst {
                seq: 777,
                ack: 0,
                flags: TCP_RST
            }
        );
    }

    #[test]
    fn rst_v4_is_a_valid_packet() {
        let src = [10, 0, 1, 11];
        let dst = [10, 0, 0, 1];
        let mut b = [0xee; RST_V4_LEN];
        rst_v4(&mut b, src, dst, 8080, 40000, rst_for(1000, 0, TCP_SYN, 0));
        assert_eq!(b[0], 0x45);
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 40);
        assert_eq!(b[9], IPPROTO_TCP);
        assert_eq!(&b[12..16], &src);
        assert_eq!(&b[16..20], &dst);
        assert!(verifies(sum_slice(0, &b[..20])), "IPv4 header checksum");
        assert_eq!(&b[4..10], &[0, 0, 0x40, 0, 64, IPPROTO_TCP], "id, DF, TTL");
        let tcp = &b[20..];
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 8080);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
        assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 1001);
        assert_eq!(tcp[12] >> 4, 5);
        assert_eq!(tcp[13], TCP_RST | TCP_ACK);
        assert_eq!(&tcp[14..16], &[0, 0], "window");
        assert_eq!(&tcp[18..20], &[0, 0], "urgent pointer");
        let pseudo = sum_slice(sum_slice(6 + 20, &src), &dst);
        assert!(verifies(sum_slice(pseudo, tcp)), "TCP checksum");
    }

    #[test]
    fn rst_v6_is_a_valid_packet() {
        let mut src = [0u8; 16];
        src[0] = 0x20;
        src[1] = 0x01;
        src[15] = 2;
        let mut dst = src;
        dst[15] = 1;
        let mut b = [0xee; RST_V6_LEN];
        rst_v6(
            &mut b,
            &src,
            &dst,
            443,
            50000,
            rst_for(0xfffffff0, 0, TCP_SYN, 0),
        );
        assert_eq!(b[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), 20);
        assert_eq!(b[6], IPPROTO_TCP);
        let tcp = &b[40..];
        let pseudo = sum_slice(sum_slice(6 + 20, &src), &dst);
        assert!(verifies(sum_slice(pseudo, tcp)), "TCP checksum");
        assert_eq!(
            u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            0xfffffff1
        );
    }

    #[test]
    fn port_unreachable_v4_quotes_the_datagram() {
        // A UDP datagram 10.0.0.1:5000 -> 10.0.1.11:53, header checksum not checked here.
        let mut q = [0u8; QUOTE_V4_LEN];
        q[0] = 0x45;
        q[9] = IPPROTO_UDP;
        q[12..16].copy_from_slice(&[10, 0, 0, 1]);
        q[16..20].copy_from_slice(&[10, 0, 1, 11]);
        q[20..22].copy_from_slice(&5000u16.to_be_bytes());
        q[22..24].copy_from_slice(&53u16.to_be_bytes());
        let mut b = [0xee; UNREACH_V4_LEN];
        b[QUOTE_AT_V4..].copy_from_slice(&q);
        port_unreachable_v4(&mut b);
        assert_eq!(&b[12..16], &[10, 0, 1, 11], "from the refused destination");
        assert_eq!(&b[16..20], &[10, 0, 0, 1], "to the sender");
        assert_eq!(b[9], IPPROTO_ICMP);
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), UNREACH_V4_LEN as u16);
        assert!(verifies(sum_slice(0, &b[..20])));
        assert_eq!((b[20], b[21]), (3, 3));
        assert!(verifies(sum_slice(0, &b[20..])), "ICMP checksum");
        assert_eq!(&b[28..], &q);
    }

    #[test]
    fn port_unreachable_v6_quotes_the_datagram() {
        let mut q = [0u8; QUOTE_V6_LEN];
        q[0] = 0x60;
        q[6] = IPPROTO_UDP;
        q[8] = 0x20;
        q[23] = 1;
        q[24] = 0x20;
        q[39] = 2;
        let mut b = [0xee; UNREACH_V6_LEN];
        b[QUOTE_AT_V6..].copy_from_slice(&q);
        port_unreachable_v6(&mut b);
        assert_eq!(b[8], 0x20);
        assert_eq!(b[23], 2, "from the refused destination");
        assert_eq!(b[39], 1, "to the sender");
        assert_eq!(b[6], IPPROTO_ICMPV6);
        let len = (UNREACH_V6_LEN - 40) as u32;
        assert_eq!(u16::from_be_bytes([b[4], b[5]]) as u32, len);
        let pseudo = sum_slice(sum_slice(58 + len, &b[8..24]), &b[24..40]);
        assert!(verifies(sum_slice(pseudo, &b[40..])), "ICMPv6 checksum");
        assert_eq!((b[40], b[41]), (1, 4));
    }
}
