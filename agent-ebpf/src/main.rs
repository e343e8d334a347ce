//! Entry points only. The failure policy of each is visible here: fail open. A packet that
//! cannot be parsed, matches no service, or meets a missing map entry passes untouched. The
//! one exception is a packet toward a backend whose breaker is open: it is refused (answered
//! with a RST / ICMP unreachable, or dropped), and when the answer cannot be built it is
//! dropped, since passing it would defeat the breaker.
//!
//! Stack: BPF gives the deepest call chain 512 bytes in all, and 6.1's verifier rounds every
//! frame of the chain up to 32 bytes first (6.12's to 8). The stages (parse,
//! breaker check, rate limit, pacing, building an answer) are BPF subprograms (`#[inline(never)]`),
//! each with its own frame, so stages that run one after the other do not add up. Answers
//! (RST / ICMP) are built in a program of their own, entered by tail call, so their frame
//! is never stacked on a main program's. The deepest chain is 448 bytes under 6.1's rounding;
//! `agent/tests/stack.rs` reads it off the object and keeps 64 bytes of headroom.
//!
//! Balancing runs in programs of its own, entered by tail call (`STAGES_XDP` / `STAGES_TC`):
//! the balancing stage (pick or look up the flow's backend, its breaker), the NAT stage
//! (rewrite) and the answer stage (a refused packet turned into its answer). Each is verified
//! apart: inlined into the main program, the paths of classification, limiting, breaker and
//! balancing multiplied past the verifier's budget of one million instructions (with the
//! answer inlined, the main programs took 551k verified instructions; without, 31k). Each
//! stage parses the frame again (a few ns).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "atomic_cxchg: the target declares no atomic CAS"
)]

mod breaker;
mod classify;
mod lb;
mod limit;
mod maps;
mod nat;
mod parse;
mod reply;
mod rt;
mod shape;
mod stats;

use agent_common::{
    ServiceConfig,
    breaker::{BSTAT_CUT, BSTAT_DROP, BSTAT_REJECT_ICMP, BSTAT_REJECT_RST, PROBE_MARK},
    classify::PROTO_TCP,
    limit::{SVC_F_ACTIVE, SVC_F_RATE_LIMIT},
    shape::SVC_F_SHAPE,
    stats::{
        GSTAT_EXT_HDR_LIMIT, GSTAT_FRAGMENT, GSTAT_NO_CONFIG, GSTAT_NON_IP, GSTAT_SEEN,
        GSTAT_UNMATCHED, GSTAT_UNPARSED, SVC_DROP_CONTENDED, SVC_DROP_RATE_LIMIT, SVC_NO_BACKEND,
        SVC_PASS_NO_BUCKET, SVC_PASSED,
    },
};
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    maps::ProgramArray,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;

use crate::{
    limit::Verdict,
    maps::{NO_BACKEND_ID, SIDE_DST, STAGES_TC, STAGES_XDP, SVC_CFG},
    parse::{Packet, ParseError, Parsed},
    reply::Rewrite,
    shape::Pace,
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
    xdp_action(process(&ctx, &pkt, len, false, &STAGES_XDP))
}

/// The balancing stage of XDP, tail-called by `agent_xdp` for packets to a VIP.
#[xdp]
pub fn agent_xdp_lb(ctx: XdpContext) -> u32 {
    let pkt = ctx.packet();
    let len = pkt.len();
    xdp_action(balanced(&ctx, &pkt, len, false, &STAGES_XDP))
}

/// The answer stage of XDP, tail-called by `agent_xdp_lb`.
#[xdp]
pub fn agent_xdp_answer(ctx: XdpContext) -> u32 {
    let pkt = ctx.packet();
    let len = pkt.len();
    xdp_action(answer_stage(&ctx, &pkt, len))
}

/// The NAT stage of XDP, tail-called by `agent_xdp_lb` (DNAT) or `agent_xdp` (reverse NAT).
#[xdp]
pub fn agent_xdp_nat(ctx: XdpContext) -> u32 {
    let pkt = ctx.packet();
    xdp_action(nat(&ctx, &pkt))
}

#[inline(always)]
fn xdp_action(action: Action) -> u32 {
    match action {
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
    tc_action(
        process(&ctx, &pkt, len, mark == PROBE_MARK, &STAGES_TC),
        ifindex,
    )
}

/// The balancing stage of TC egress, tail-called by `agent_tc_egress` for packets to a VIP.
#[classifier]
pub fn agent_tc_lb(ctx: TcContext) -> i32 {
    let pkt = ctx.packet();
    let len = u64::from(ctx.len());
    // SAFETY: the context's own skb, valid for this run.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    tc_action(
        balanced(&ctx, &pkt, len, mark == PROBE_MARK, &STAGES_TC),
        ifindex,
    )
}

/// The answer stage of TC egress, tail-called by `agent_tc_lb`.
#[classifier]
pub fn agent_tc_answer(ctx: TcContext) -> i32 {
    let pkt = ctx.packet();
    let len = u64::from(ctx.len());
    // SAFETY: the context's own skb, valid for this run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    tc_action(answer_stage(&ctx, &pkt, len), ifindex)
}

/// The NAT stage of TC egress, tail-called by `agent_tc_lb` (DNAT) or `agent_tc_egress`
/// (reverse NAT of replies from a backend on this host).
#[classifier]
pub fn agent_tc_nat(ctx: TcContext) -> i32 {
    let pkt = ctx.packet();
    // SAFETY: the context's own skb, valid for this run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    tc_action(nat(&ctx, &pkt), ifindex)
}

/// Rewrites as handed over; fails open, except that a DNAT that could not be done drops the
/// packet rather than let it reach the VIP.
#[inline(always)]
fn nat<C: nat::Nat>(ctx: &C, pkt: &Packet) -> Action {
    match parse::parse(pkt) {
        Ok(parsed) if lb::nat(ctx, &parsed) == Some(false) => Action::Drop,
        _ => Action::Pass,
    }
}

#[inline(always)]
fn tc_action(action: Action, ifindex: u32) -> i32 {
    match action {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
        // The answer goes up the local stack, to the socket that sent the packet.
        // SAFETY: plain helper call; it returns TC_ACT_REDIRECT, or TC_ACT_SHOT on error.
        Action::Bounce => unsafe { bpf_redirect(ifindex, BPF_F_INGRESS.into()) as i32 },
    }
}

/// The balancing stage: the packet parsed again, a backend of the service the main program
/// handed over picked (or found in the connection table), that backend's breaker, then the
/// NAT stage. Fails open without a service.
#[inline(always)]
fn balanced<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    pkt: &Packet,
    len: u64,
    exempt: bool,
    stages: &ProgramArray,
) -> Action {
    let (Ok(mut parsed), Some(id)) = (parse::parse(pkt), lb::handed_over()) else {
        return Action::Pass;
    };
    let (backend, addr, port, panic) = match lb::forward(id, &parsed) {
        lb::Forward::Pass => {
            stats::service(id, SVC_PASSED, len);
            return Action::Pass;
        }
        lb::Forward::NoBackend => {
            stats::service(id, SVC_NO_BACKEND, len);
            lb::hand_over_answer(ctx, stages, NO_BACKEND_ID, 0);
            return Action::Drop;
        }
        lb::Forward::To { backend, panic } => match lb::backend(backend) {
            Some((addr, port)) => (backend, addr, port, panic),
            None => return Action::Drop,
        },
    };
    // The breaker sees the backend. An answer goes back from the VIP the client addressed,
    // built in a stage of its own: no packet access here after parsing keeps the verifier's
    // paths through the pick few (parse results then merge). Rewritten in place, not copied:
    // the frame of this stage is on the 512-byte stack with those of `forward` and `track`.
    parsed.dst = addr;
    parsed.dport = port;
    // A panicking service lets every packet through to its backends (the probe exemption,
    // widened to the service).
    let exempt = exempt || panic;
    let answer = match breaker::check(&parsed, len, exempt) {
        breaker::Verdict::Continue => {
            stats::service(id, SVC_PASSED, len);
            lb::count(backend, len);
            lb::hand_over_nat(ctx, stages, SIDE_DST, &addr, port);
            // Only if the NAT stage is not loaded: the packet must not reach the VIP
            // half-done.
            return Action::Drop;
        }
        breaker::Verdict::Drop { id } => {
            stats::backend(id, BSTAT_DROP, len);
            return Action::Drop;
        }
        breaker::Verdict::Refuse { id } => (id, refusal_slot(&parsed)),
        breaker::Verdict::Cut { id } => (id, BSTAT_CUT),
    };
    lb::hand_over_answer(ctx, stages, answer.0, answer.1);
    Action::Drop
}

/// The answer stage: answers the packet the balancing stage could not send on, from the VIP.
#[inline(always)]
fn answer_stage<C: Rewrite>(ctx: &C, pkt: &Packet, len: u64) -> Action {
    let (Ok(parsed), Some((id, slot))) = (parse::parse(pkt), lb::answer_handed_over()) else {
        return Action::Drop;
    };
    if id == NO_BACKEND_ID {
        return answer_or_drop(ctx, &parsed);
    }
    bounce(ctx, &parsed, id, slot, len)
}

#[inline(always)]
fn refusal_slot(parsed: &Parsed) -> u32 {
    if parsed.proto == PROTO_TCP {
        BSTAT_REJECT_RST
    } else {
        BSTAT_REJECT_ICMP
    }
}

/// `exempt`: the agent's own health probe, which no breaker may stop.
#[inline(always)]
fn process<C: aya_ebpf::EbpfContext + Pace>(
    ctx: &C,
    pkt: &Packet,
    len: u64,
    exempt: bool,
    stages: &ProgramArray,
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
    // A backend's answer first counts for passive detection (it names the backend), then a
    // reply to a balanced flow goes to the reverse-NAT stage, which gives it the VIP back as
    // its source and passes it.
    breaker::observe_answer(&parsed);
    lb::hand_over_reply(ctx, &parsed, stages);
    // Order: the rate limit first (a dropped packet makes no state), then pacing (egress),
    // then balancing (DNAT, so the breaker sees the backend), then the breaker, then reverse
    // NAT of replies.
    let service = match classify::classify(&parsed) {
        None => Err(GSTAT_UNMATCHED),
        Some(id) => match SVC_CFG.get(id) {
            Some(c) if c.flags & SVC_F_ACTIVE != 0 => Ok((id, c)),
            _ => Err(GSTAT_NO_CONFIG),
        },
    };
    if let Ok((id, cfg)) = service
        && cfg.flags & SVC_F_RATE_LIMIT != 0
        && let Some(drop) = rate_limit(ctx, id, cfg, &parsed, len)
    {
        return drop;
    }
    // Pacing (TC egress only; `Pace` does nothing on XDP) after the limit, so a packet the
    // limit drops books no departure. A later stage may still refuse a paced packet (a
    // breaker's answer, or its drop): its slot stays booked, one packet's wire time of the
    // key's line left unused.
    if let Ok((id, cfg)) = service
        && cfg.flags & SVC_F_SHAPE != 0
        && let shape::Verdict::DropHorizon = ctx.pace(id, cfg, &parsed)
    {
        return Action::Drop;
    }
    // A balanced service's packets take their own path (DNAT, then the breaker of the chosen
    // backend); everything else may be a reply from a backend (reverse NAT). Two disjoint
    // paths keep the verifier's work a sum, not a product.
    if let Ok((id, _)) = service
        && lb::balanced(id)
    {
        lb::hand_over(ctx, id, stages);
        // Only if the stage is not loaded: fail open, the packet goes to the VIP unchanged.
        stats::service(id, SVC_PASSED, len);
        return Action::Pass;
    }
    if let Some(action) = breaker_stage(ctx, &parsed, len, exempt, stages) {
        return action;
    }
    match service {
        Ok((id, _)) => stats::service(id, SVC_PASSED, len),
        Err(class) => stats::global(class, len),
    }
    Action::Pass
}

/// The breaker's verdict on a packet: `None` to go on. A refused packet is answered by the
/// answer stage, as the balancing stage's are: building an answer inline put its frame on
/// top of this program's (480 of 512 bytes under 6.1's rounding) and its paths into this
/// program's verification.
#[inline(always)]
fn breaker_stage<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    parsed: &Parsed,
    len: u64,
    exempt: bool,
    stages: &ProgramArray,
) -> Option<Action> {
    let (id, slot) = match breaker::check(parsed, len, exempt) {
        breaker::Verdict::Continue => return None,
        breaker::Verdict::Drop { id } => {
            stats::backend(id, BSTAT_DROP, len);
            return Some(Action::Drop);
        }
        breaker::Verdict::Refuse { id } => (id, refusal_slot(parsed)),
        breaker::Verdict::Cut { id } => (id, BSTAT_CUT),
    };
    lb::hand_over_answer(ctx, stages, id, slot);
    // Only if the answer stage is not loaded: a refused packet is dropped, never passed.
    stats::backend(id, BSTAT_DROP, len);
    Some(Action::Drop)
}

/// The token bucket of a rate-limited service: `Some(Drop)` when over the limit.
#[inline(always)]
fn rate_limit<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    service_id: u32,
    cfg: &ServiceConfig,
    parsed: &Parsed,
    len: u64,
) -> Option<Action> {
    match limit::limit(service_id, cfg, parsed, len) {
        Verdict::Pass => None,
        Verdict::PassNoBucket => {
            warn!(
                ctx,
                "service {}: key table refused a new key; passing", service_id
            );
            stats::service(service_id, SVC_PASS_NO_BUCKET, len);
            None
        }
        Verdict::DropRateLimit => {
            stats::service(service_id, SVC_DROP_RATE_LIMIT, len);
            Some(Action::Drop)
        }
        Verdict::DropContended => {
            stats::service(service_id, SVC_DROP_CONTENDED, len);
            Some(Action::Drop)
        }
    }
}

/// Answers a packet no backend can take, or drops it when it cannot be answered.
#[inline(always)]
fn answer_or_drop<C: Rewrite>(ctx: &C, parsed: &Parsed) -> Action {
    if reply::answer(ctx, parsed) {
        Action::Bounce
    } else {
        Action::Drop
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
