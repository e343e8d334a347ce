//! Entry points only. The failure policy of each is visible here: fail open. A packet that
//! cannot be parsed, matches no service, or meets a missing map entry passes untouched. The
//! one exception is a packet toward a backend whose breaker is open: it is refused (answered
//! with a RST / ICMP unreachable, or dropped), and when the answer cannot be built it is
//! dropped, since passing it would defeat the breaker.
//!
//! Stack: BPF gives the deepest call chain 512 bytes in all. The stages (parse, breaker check,
//! rate limit, building an answer) are BPF subprograms (`#[inline(never)]`), each with its
//! own frame, so stages that run one after the other do not add up: inlined into one frame
//! they came to 504 bytes; as subprograms the deepest chain is the entry frame plus the
//! largest stage (about 420 bytes for TC, measured with `llvm-objdump` on `r10` offsets).
//! The calls cost no measurable time (BENCHMARKS.md).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "atomic_cxchg: the target declares no atomic CAS"
)]

mod breaker;
mod classify;
mod limit;
mod maps;
mod parse;
mod reply;
mod rt;
mod stats;

use agent_common::{
    breaker::{BSTAT_CUT, BSTAT_DROP, BSTAT_REJECT_ICMP, BSTAT_REJECT_RST, PROBE_MARK},
    classify::PROTO_TCP,
    limit::{SVC_F_ACTIVE, SVC_F_RATE_LIMIT},
    stats::{
        GSTAT_EXT_HDR_LIMIT, GSTAT_FRAGMENT, GSTAT_NO_CONFIG, GSTAT_NON_IP, GSTAT_SEEN,
        GSTAT_UNMATCHED, GSTAT_UNPARSED, SVC_DROP_CONTENDED, SVC_DROP_RATE_LIMIT,
        SVC_PASS_NO_BUCKET, SVC_PASSED,
    },
};
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;

use crate::{
    limit::Verdict,
    maps::SVC_CFG,
    parse::{Packet, ParseError, Parsed},
    reply::Rewrite,
};

/// What the shared pipeline decided; each hook maps it to its own return codes.
enum Action {
    Pass,
    Drop,
    /// The packet was rewritten into its answer: send it back where it came from.
    Bounce,
}

#[xdp]
pub fn agent_xdp(ctx: XdpContext) -> u32 {
    let pkt = ctx.packet();
    let len = pkt.len();
    // Forwarded traffic: XDP cannot see socket marks, and the agent's probes never come in.
    match process(&ctx, &pkt, len, false) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Bounce => xdp_action::XDP_TX,
    }
}

/// Egress: the same pipeline on locally sent packets. Only the linear part of the skb is
/// parsed; headers that are not in it pass (fail open).
#[classifier]
pub fn agent_tc_egress(ctx: TcContext) -> i32 {
    let pkt = ctx.packet();
    let len = u64::from(ctx.len());
    // SAFETY: the context's own skb, valid for this run.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    match process(&ctx, &pkt, len, mark == PROBE_MARK) {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
        // The answer goes up the local stack, to the socket that sent the packet.
        // SAFETY: plain helper call; it returns TC_ACT_REDIRECT, or TC_ACT_SHOT on error.
        Action::Bounce => unsafe { bpf_redirect(ifindex, BPF_F_INGRESS.into()) as i32 },
    }
}

/// `exempt`: the agent's own health probe, which no breaker may stop.
#[inline(always)]
fn process<C: aya_ebpf::EbpfContext + Rewrite>(
    ctx: &C,
    pkt: &Packet,
    len: u64,
    exempt: bool,
) -> Action {
    stats::global(GSTAT_SEEN, len);
    let parsed = match parse::parse(pkt) {
        Ok(p) => p,
        Err(e) => {
            let slot = match e {
                ParseError::NotIp => GSTAT_NON_IP,
                ParseError::Malformed => GSTAT_UNPARSED,
                ParseError::ExtHdrLimit => GSTAT_EXT_HDR_LIMIT,
            };
            stats::global(slot, len);
            return Action::Pass;
        }
    };
    if parsed.fragment {
        stats::global(GSTAT_FRAGMENT, len);
    }
    match breaker::check(&parsed, len, exempt) {
        breaker::Verdict::Continue => {}
        breaker::Verdict::Drop { id } => {
            stats::backend(id, BSTAT_DROP, len);
            return Action::Drop;
        }
        breaker::Verdict::Refuse { id } => {
            let slot = if parsed.proto == PROTO_TCP {
                BSTAT_REJECT_RST
            } else {
                BSTAT_REJECT_ICMP
            };
            return bounce(ctx, &parsed, id, slot, len);
        }
        breaker::Verdict::Cut { id } => return bounce(ctx, &parsed, id, BSTAT_CUT, len),
    }
    let Some(service_id) = classify::classify(&parsed) else {
        stats::global(GSTAT_UNMATCHED, len);
        return Action::Pass;
    };
    let cfg = match SVC_CFG.get(service_id) {
        Some(c) if c.flags & SVC_F_ACTIVE != 0 => c,
        _ => {
            stats::global(GSTAT_NO_CONFIG, len);
            return Action::Pass;
        }
    };
    if cfg.flags & SVC_F_RATE_LIMIT == 0 {
        stats::service(service_id, SVC_PASSED, len);
        return Action::Pass;
    }
    match limit::limit(service_id, cfg, &parsed, len) {
        Verdict::Pass => {
            stats::service(service_id, SVC_PASSED, len);
            Action::Pass
        }
        Verdict::PassNoBucket => {
            warn!(
                ctx,
                "service {}: key table refused a new key; passing", service_id
            );
            stats::service(service_id, SVC_PASS_NO_BUCKET, len);
            stats::service(service_id, SVC_PASSED, len);
            Action::Pass
        }
        Verdict::DropRateLimit => {
            stats::service(service_id, SVC_DROP_RATE_LIMIT, len);
            Action::Drop
        }
        Verdict::DropContended => {
            stats::service(service_id, SVC_DROP_CONTENDED, len);
            Action::Drop
        }
    }
}

/// Answers a refused packet; one that cannot be answered is dropped (counted as such).
#[inline(always)]
fn bounce<C: Rewrite>(ctx: &C, parsed: &Parsed, id: u32, slot: u32, len: u64) -> Action {
    if reply::answer(ctx, parsed) {
        stats::backend(id, slot, len);
        Action::Bounce
    } else {
        stats::backend(id, BSTAT_DROP, len);
        Action::Drop
    }
}
