//! Entry points only. The failure policy of each is visible here: fail open. A packet that
//! cannot be parsed, matches no service, or meets a missing map entry passes untouched.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "atomic_cxchg: the target declares no atomic CAS"
)]

mod classify;
mod limit;
mod maps;
mod parse;
mod rt;
mod stats;

use agent_common::{
    limit::{SVC_F_ACTIVE, SVC_F_RATE_LIMIT},
    stats::{
        GSTAT_EXT_HDR_LIMIT, GSTAT_FRAGMENT, GSTAT_NO_CONFIG, GSTAT_NON_IP, GSTAT_SEEN,
        GSTAT_UNMATCHED, GSTAT_UNPARSED, SVC_DROP_CONTENDED, SVC_DROP_RATE_LIMIT,
        SVC_PASS_NO_BUCKET, SVC_PASSED,
    },
};
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;

use crate::{
    limit::Verdict,
    maps::SVC_CFG,
    parse::{Packet, ParseError},
};

/// What the shared pipeline decided; each hook maps it to its own return codes.
enum Action {
    Pass,
    Drop,
}

#[xdp]
pub fn agent_xdp(ctx: XdpContext) -> u32 {
    let pkt = Packet {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let len = pkt.len();
    match process(&ctx, &pkt, len) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

/// Egress: the same pipeline on locally sent packets. Only the linear part of the skb is
/// parsed; headers that are not in it pass (fail open).
#[classifier]
pub fn agent_tc_egress(ctx: TcContext) -> i32 {
    let pkt = Packet {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let len = u64::from(ctx.len());
    match process(&ctx, &pkt, len) {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn process<C: aya_ebpf::EbpfContext>(ctx: &C, pkt: &Packet, len: u64) -> Action {
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
