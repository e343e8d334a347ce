//! SipHash-2-4 (Aumasson and Bernstein, 2012) with fixed, public keys: the hash behind every
//! placement decision in this module, so that a table depends only on the policy.
//!
//! Why SipHash, written out here: Maglev needs two independent hashes of a backend (the paper
//! uses two hash functions; SipHash with two keys gives them), and the tables must come out the
//! same on every node and after every restart or upgrade of the agent, or flows move when
//! nothing changed. `std`'s `DefaultHasher` does not promise its algorithm across Rust
//! releases; `std::hash::SipHasher` is deprecated. SipHash-2-4 is fully specified, has
//! published test vectors (checked below), and is about 40 lines, less than a dependency.
//! The keys are not secrets: the inputs are addresses from the policy, not from the network.

use std::net::{IpAddr, SocketAddr};

/// Key of [`backend_key`]: the stable identity of a backend.
const KEY_BACKEND: [u8; 16] = *b"agent/backend-id";

/// SipHash-2-4 of `data` under the 128-bit `key` (the reference's byte order: `k0` is the
/// first 8 bytes, little-endian).
pub fn siphash24(key: &[u8; 16], data: &[u8]) -> u64 {
    let k0 = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
    let k1 = u64::from_le_bytes(key[8..].try_into().expect("8 bytes"));
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let m = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    // The last block: the remaining bytes, and the length's low byte on top.
    let mut last = [0u8; 8];
    let rest = chunks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    let m = u64::from_le_bytes(last) | (data.len() as u64) << 56;
    v[3] ^= m;
    round(&mut v);
    round(&mut v);
    v[0] ^= m;
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// The stable key of a backend for [`super::maglev::build`]: SipHash-2-4 under a fixed key of
/// its address as 18 bytes, the IPv6 address (IPv4 as `::ffff:a.b.c.d`, as in the datapath)
/// then the port, big-endian. The same address gives the same key on every node, forever.
pub fn backend_key(addr: &SocketAddr) -> u64 {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut bytes = [0u8; 18];
    bytes[..16].copy_from_slice(&ip.octets());
    bytes[16..].copy_from_slice(&addr.port().to_be_bytes());
    siphash24(&KEY_BACKEND, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference key `00 01 .. 0f`.
    fn ref_key() -> [u8; 16] {
        core::array::from_fn(|i| i as u8)
    }

    #[test]
    fn reference_vectors() {
        // From the SipHash paper (appendix A) and the reference implementation's vectors.h:
        // the message is `00 01 .. (len-1)`.
        let msg: Vec<u8> = (0..64).collect();
        let cases: [(usize, u64); 4] = [
            (0, 0x726f_db47_dd0e_0e31),
            (1, 0x74f8_39c5_93dc_67fd),
            (8, 0x93f5_f579_9a93_2462),
            (15, 0xa129_ca61_49be_45e5),
        ];
        for (len, want) in cases {
            let got = siphash24(&ref_key(), &msg[..len]);
            assert_eq!(
                got, want,
                "SipHash-2-4 of {len} bytes: want {want:#x}, got {got:#x}"
            );
        }
    }

    #[test]
    #[expect(
        deprecated,
        reason = "std's SipHasher is SipHash-2-4: an independent check"
    )]
    fn agrees_with_std_siphasher() {
        use std::hash::Hasher as _;
        let key = *b"0123456789abcdef";
        let k0 = u64::from_le_bytes(key[..8].try_into().unwrap());
        let k1 = u64::from_le_bytes(key[8..].try_into().unwrap());
        let msg: Vec<u8> = (0..=255).map(|i: u8| i.wrapping_mul(37)).collect();
        for len in 0..msg.len() {
            let mut h = std::hash::SipHasher::new_with_keys(k0, k1);
            h.write(&msg[..len]);
            assert_eq!(siphash24(&key, &msg[..len]), h.finish(), "length {len}");
        }
    }

    #[test]
    fn backend_keys_are_frozen() {
        // Tables are built from these keys: if this changes, every node's tables change and
        // flows move on upgrade. Change only on purpose.
        let v4: SocketAddr = "10.0.1.11:8080".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.0.1.11]:8080".parse().unwrap();
        let other_port: SocketAddr = "10.0.1.11:8081".parse().unwrap();
        assert_eq!(
            backend_key(&v4),
            backend_key(&mapped),
            "IPv4 is keyed as IPv4-mapped IPv6"
        );
        assert_ne!(
            backend_key(&v4),
            backend_key(&other_port),
            "the port is part of the key"
        );
        assert_eq!(backend_key(&v4), FROZEN_10_0_1_11_8080);
    }

    const FROZEN_10_0_1_11_8080: u64 = 8_877_993_011_349_490_477;
}
