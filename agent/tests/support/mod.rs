//! What the datapath test files share: the root check, a policy loaded and written the way
//! the agent does it, running a frame through the real XDP or TC program
//! (BPF_PROG_TEST_RUN, with the agent's probe mark if asked), the programs' return codes, TCP
//! flags, and the one's-complement arithmetic the checks recompute checksums with.
#![allow(dead_code, reason = "each test binary uses a subset")]

use agent::{
    config::{self, Compiled},
    datapath::{Datapath, LbMaps},
    lb::balancer,
};
use agent_common::breaker::PROBE_MARK;
use aya::programs::{TestRun, TestRunOptions};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// `struct __sk_buff` as BPF_PROG_TEST_RUN takes it; `mark` is at byte 8.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK_AT: usize = 8;

/// Panics unless running as root; `what` names the tests ("breaker", "lb", ...).
pub fn require_root(what: &str) {
    // SAFETY: trivial syscall.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{what} datapath tests load BPF programs and need root"
    );
}

/// `text` compiled, loaded and in the maps as the agent writes them (`run.rs`, before
/// attaching): `apply`, the backend ports marked, the balanced services installed.
pub fn load_balanced(text: &str, file: &str) -> (Datapath, Compiled, LbMaps) {
    let policy = config::load_str(text, file).unwrap_or_else(|e| panic!("test policy:\n{e}"));
    let compiled = config::compile(&policy);
    let mut dp = Datapath::load_for(&compiled).expect("loading the datapath");
    dp.apply(&compiled).expect("writing the maps");
    let ports = compiled.lb.iter().flat_map(|s| &s.backends);
    dp.mark_ports(ports.map(|b| b.address.port()))
        .expect("marking backend ports");
    let mut maps = dp.lb_maps().expect("balancing maps");
    balancer::install(&mut maps, &compiled.lb).expect("installing the balanced services");
    (dp, compiled, maps)
}

/// Which hook a frame runs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
    /// TC with the agent's probe mark on the skb.
    TcProbe,
}

impl Hook {
    /// The return code of a packet passed on (rewritten or not).
    pub fn pass(self) -> u32 {
        match self {
            Hook::Xdp => XDP_PASS,
            Hook::Tc | Hook::TcProbe => TC_ACT_OK,
        }
    }
}

/// Runs `frame` through `hook` of `dp`; returns the return code and the frame as it left.
pub fn run(dp: &Datapath, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_MARK_AT..SKB_MARK_AT + 4].copy_from_slice(&PROBE_MARK.to_ne_bytes());
    let r = match hook {
        Hook::Xdp => dp.xdp_program().expect("xdp").test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        }),
        Hook::Tc | Hook::TcProbe => dp.tc_program().expect("tc").test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: (hook == Hook::TcProbe).then_some(&ctx[..]),
            ..TestRunOptions::new()
        }),
    }
    .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// One's-complement sum of big-endian 16-bit words, an odd last byte padded with zero.
pub fn sum(b: &[u8], mut acc: u32) -> u32 {
    for c in b.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// A receiver's check: a sum over a header or segment, its checksum included, folds to all
/// ones.
pub fn folds_to_zero(acc: u32) -> bool {
    fold(acc) == 0xffff
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
