//! Entry points only: one function per program, each turning the pipeline's `Action` into its
//! hook's return code. The pipeline itself, and why it is split into tail-called stages, is in
//! `pipeline.rs`.
//!
//! The failure policy of each is visible here: fail open. A packet that cannot be parsed,
//! matches no service, or meets a missing map entry passes untouched. The one exception is a
//! packet toward a backend whose breaker is open: it is refused (answered with a RST / ICMP
//! unreachable, or dropped), and when the answer cannot be built it is dropped, since passing
//! it would defeat the breaker.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "atomic_cxchg: the target declares no atomic CAS"
)]

mod breaker;
mod classify;
mod degrade;
mod fib;
mod lb;
mod limit;
mod maps;
mod nat;
mod neigh;
mod parse;
mod pipeline;
mod ports;
mod reply;
mod rt;
mod shape;
mod stats;

use agent_common::breaker::PROBE_MARK;
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{
    maps::{STAGES_TC, STAGES_XDP},
    parse::HasPacket,
    pipeline::{Action, answer_stage, lb_stage, main_stage, nat_stage},
};

/// False in every build the project ships. Set `AGENT_EBPF_VARIANT` (to anything) at build
/// time for a program whose instructions differ and whose behaviour does not: the "previous
/// build" that the upgrade test (`tests/tests/survive.rs`) replaces with the current one.
const BUILD_VARIANT: bool = option_env!("AGENT_EBPF_VARIANT").is_some();

/// Ingress: the main stage on every packet off the wire. Fails open (see above).
#[xdp]
pub fn agent_xdp(ctx: XdpContext) -> u32 {
    let pkt = ctx.packet();
    let len = pkt.len();
    // The variant's extra test and jump: no frame of zero bytes reaches XDP, and one would
    // pass anyway (fail open).
    if BUILD_VARIANT && len == 0 {
        return xdp_action::XDP_PASS;
    }
    // Forwarded traffic: XDP cannot see socket marks, and the agent's probes never come in.
    xdp_action(main_stage(&ctx, &pkt, len, false, &STAGES_XDP))
}

/// The balancing stage of XDP, tail-called by `agent_xdp` for packets to a VIP. Fails open
/// without a service handed over or a flow to balance; a balanced packet that cannot go on to
/// its backend is answered or dropped, never passed to the VIP.
#[xdp]
pub fn agent_xdp_lb(ctx: XdpContext) -> u32 {
    let len = ctx.packet().len();
    xdp_action(lb_stage(&ctx, len, false, &STAGES_XDP))
}

/// The answer stage of XDP, tail-called by `agent_xdp_lb`. Fails closed: the packet was
/// refused, so one that cannot be answered is dropped.
#[xdp]
pub fn agent_xdp_answer(ctx: XdpContext) -> u32 {
    let pkt = ctx.packet();
    let len = pkt.len();
    xdp_action(answer_stage(&ctx, &pkt, len))
}

/// The NAT stage of XDP, tail-called by `agent_xdp_lb` (DNAT) or `agent_xdp` (reverse NAT).
/// Fails open, except a DNAT that could not be done: dropped rather than reach the VIP.
#[xdp]
pub fn agent_xdp_nat(ctx: XdpContext) -> u32 {
    xdp_action(nat_stage(&ctx))
}

#[inline(always)]
fn xdp_action(action: Action) -> u32 {
    match action {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Bounce => xdp_action::XDP_TX,
        Action::Redirect(verdict) => verdict as u32,
    }
}

/// Egress: the same pipeline on locally sent packets. Only the linear part of the skb is
/// parsed; headers that are not in it pass (fail open). Before it: a packet the NAT stage
/// already sent on (`fib.rs`) leaves, and the host's own ARP request or neighbour
/// solicitation for a VIP is answered (`neigh.rs`).
#[classifier]
pub fn agent_tc_egress(ctx: TcContext) -> i32 {
    if fib::tc_second_pass(&ctx) {
        return TC_ACT_OK;
    }
    let pkt = ctx.packet();
    let len = u64::from(ctx.len());
    // SAFETY: the context's own skb, valid for this run.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    if neigh::may_ask(&pkt) && neigh::answer(&pkt) {
        return tc_action(Action::Bounce, ifindex);
    }
    tc_action(
        main_stage(&ctx, &pkt, len, mark == PROBE_MARK, &STAGES_TC),
        ifindex,
    )
}

/// The balancing stage of TC egress, tail-called by `agent_tc_egress` for packets to a VIP.
/// Fails as `agent_xdp_lb` does.
#[classifier]
pub fn agent_tc_lb(ctx: TcContext) -> i32 {
    let len = u64::from(ctx.len());
    // SAFETY: the context's own skb, valid for this run.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    tc_action(lb_stage(&ctx, len, mark == PROBE_MARK, &STAGES_TC), ifindex)
}

/// The answer stage of TC egress, tail-called by `agent_tc_lb`. Fails closed, as
/// `agent_xdp_answer` does.
#[classifier]
pub fn agent_tc_answer(ctx: TcContext) -> i32 {
    let pkt = ctx.packet();
    let len = u64::from(ctx.len());
    // SAFETY: the context's own skb, valid for this run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    tc_action(answer_stage(&ctx, &pkt, len), ifindex)
}

/// The NAT stage of TC egress, tail-called by `agent_tc_lb` (DNAT) or `agent_tc_egress`
/// (reverse NAT of replies from a backend on this host). Fails as `agent_xdp_nat` does.
#[classifier]
pub fn agent_tc_nat(ctx: TcContext) -> i32 {
    // SAFETY: the context's own skb, valid for this run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    tc_action(nat_stage(&ctx), ifindex)
}

#[inline(always)]
fn tc_action(action: Action, ifindex: u32) -> i32 {
    match action {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
        // The answer goes up the local stack, to the socket that sent the packet.
        // SAFETY: plain helper call; it returns TC_ACT_REDIRECT, or TC_ACT_SHOT on error.
        Action::Bounce => unsafe { bpf_redirect(ifindex, BPF_F_INGRESS.into()) as i32 },
        Action::Redirect(verdict) => verdict as i32,
    }
}
