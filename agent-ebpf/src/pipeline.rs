//! The pipeline the entry points run, one function per program: the main stage (parse,
//! classify, limit, pace, breaker; hand-over of balanced packets and of backends' replies),
//! the balancing stage, the NAT stage and the answer stage. Each returns an `Action` that the
//! hook turns into its own return code (`main.rs`).
//!
//! Stack: BPF gives the deepest call chain 512 bytes in all, and 6.1's verifier rounds every
//! frame of the chain up to 32 bytes first (6.12's to 8). The stages (parse,
//! breaker check, rate limit, pacing, building an answer) are BPF subprograms (`#[inline(never)]`),
//! each with its own frame, so stages that run one after the other do not add up. Answers
//! (RST / ICMP) are built in a program of their own, entered by tail call, so their frame
//! is never stacked on a main program's. The deepest chain (TC's balancing stage, `forward`,
//! `track`) is 448 bytes under 6.1's rounding, at the bound: `agent/tests/stack.rs` reads it
//! off the object and keeps 64 bytes of headroom.
//!
//! Balancing runs in programs of its own, entered by tail call (`STAGES_XDP` / `STAGES_TC`):
//! the balancing stage (pick or look up the flow's backend, its breaker), the NAT stage
//! (rewrite) and the answer stage (a refused packet turned into its answer). Each is verified
//! apart: inlined into the main program, the paths of classification, limiting, breaker and
//! balancing multiplied past the verifier's budget of one million instructions (with the
//! answer inlined, the main programs took 551k verified instructions; without, 31k). The
//! main program hands what it parsed to the stages (`LB_HANDOVER`), which do not parse the
//! frame again; only the answer stage, which builds an answer from the frame, does.

use agent_common::{
    ServiceConfig,
    breaker::{BSTAT_CUT, BSTAT_DROP, BSTAT_REJECT_ICMP, BSTAT_REJECT_RST},
    classify::PROTO_TCP,
    limit::{SVC_F_ACTIVE, SVC_F_RATE_LIMIT},
    shape::SVC_F_SHAPE,
    stats::{
        GSTAT_EXT_HDR_LIMIT, GSTAT_FRAGMENT, GSTAT_NO_CONFIG, GSTAT_NON_IP, GSTAT_SEEN,
        GSTAT_UNMATCHED, GSTAT_UNPARSED, SVC_DROP_CONTENDED, SVC_DROP_RATE_LIMIT, SVC_NO_BACKEND,
        SVC_PASS_NO_BUCKET, SVC_PASSED, SVC_SHED,
    },
};
use aya_ebpf::{EbpfContext, maps::ProgramArray};
use aya_log_ebpf::warn;

use crate::{
    breaker, classify, degrade,
    fib::{self, NextHop},
    lb, limit,
    maps::{NO_BACKEND_ID, SIDE_DST, SVC_CFG},
    nat::Nat,
    parse::{self, Packet, ParseError, Parsed},
    reply::{self, Rewrite},
    shape::{self, Pace},
    stats,
};

/// What the pipeline decided; each hook maps it to its own return codes.
pub enum Action {
    Pass,
    Drop,
    /// The packet was rewritten into its answer: send it back where it came from. On XDP,
    /// also a packet whose next hop is out of the device it came in by (`XDP_TX`).
    Bounce,
    /// A redirect helper was called (`fib.rs`); its return value is the verdict.
    Redirect(i64),
}

/// The main stage. `exempt`: the agent's own health probe, which no breaker may stop.
#[inline(always)]
pub fn main_stage<C: EbpfContext + Pace>(
    ctx: &C,
    pkt: &Packet,
    len: u64,
    exempt: bool,
    stages: &ProgramArray,
) -> Action {
    stats::global(GSTAT_SEEN, len);
    let mut parsed = Parsed::EMPTY;
    match parse::parse(pkt, &mut parsed) {
        Ok(()) => {}
        Err(e) => {
            let slot = match e {
                ParseError::NotIp => GSTAT_NON_IP,
                ParseError::Malformed => GSTAT_UNPARSED,
                ParseError::ExtHdrLimit => GSTAT_EXT_HDR_LIMIT,
            };
            stats::global(slot, len);
            return Action::Pass;
        }
    }
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
    // NAT of replies. Shedding (`degrade`) refuses a new flow where a breaker would: in the
    // balancing stage for a balanced service, just before the breaker otherwise.
    let service = match classify::classify(&parsed) {
        None => Err(GSTAT_UNMATCHED),
        Some(svc) => match SVC_CFG.get(svc.slot) {
            Some(c) if c.flags & SVC_F_ACTIVE != 0 => Ok((svc.id, c, svc.slot)),
            _ => Err(GSTAT_NO_CONFIG),
        },
    };
    // While the service falls back, the companion's limit and buckets are in force.
    if let Ok((id, cfg, slot)) = service
        && let (bucket_id, limit_cfg) = degrade::limit_config(id, cfg, slot)
        && limit_cfg.flags & SVC_F_RATE_LIMIT != 0
        && let Some(drop) = rate_limit(ctx, id, bucket_id, limit_cfg, &parsed, len)
    {
        return drop;
    }
    // Pacing (TC egress only; `Pace` does nothing on XDP) after the limit, so a packet the
    // limit drops books no departure. A later stage may still refuse a paced packet (a
    // breaker's answer, or its drop): its slot stays booked, one packet's wire time of the
    // key's line left unused.
    if let Ok((id, cfg, _)) = service
        && cfg.flags & SVC_F_SHAPE != 0
        && let shape::Verdict::DropHorizon = ctx.pace(id, cfg, &parsed)
    {
        return Action::Drop;
    }
    // A balanced service's packets take their own path (DNAT, then the breaker of the chosen
    // backend); everything else may be a reply from a backend (reverse NAT). Two disjoint
    // paths keep the verifier's work a sum, not a product.
    if let Ok((id, _, slot)) = service
        && lb::balanced(slot)
    {
        lb::hand_over(ctx, id, slot, &parsed, stages);
        // Only if the stage is not loaded: fail open, the packet goes to the VIP unchanged.
        stats::service(id, SVC_PASSED, len);
        return Action::Pass;
    }
    // A shed service refuses new flows (the balanced ones' in the balancing stage), as an
    // open breaker does; the agent's own probes are never shed.
    if let Ok((id, _, _)) = service
        && !exempt
        && degrade::new_flow(&parsed)
        && degrade::shed(id)
    {
        stats::service(id, SVC_SHED, len);
        lb::hand_over_answer(ctx, stages, NO_BACKEND_ID, 0);
        // Only if the answer stage is not loaded: a refused packet is dropped, never passed.
        return Action::Drop;
    }
    if let Some(action) = breaker_stage(ctx, &parsed, len, exempt, stages) {
        return action;
    }
    match service {
        Ok((id, _, _)) => stats::service(id, SVC_PASSED, len),
        Err(class) => stats::global(class, len),
    }
    Action::Pass
}

/// The breaker's verdict on a packet: `None` to go on. A refused packet is answered by the
/// answer stage, as the balancing stage's are: building an answer inline put its frame on
/// top of this program's (480 of 512 bytes under 6.1's rounding) and its paths into this
/// program's verification.
#[inline(always)]
fn breaker_stage<C: EbpfContext>(
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

/// The token bucket of a rate-limited service: `Some(Drop)` when over the limit. The buckets
/// are `bucket_id`'s (the companion's while the service falls back), the counters
/// `service_id`'s.
#[inline(always)]
fn rate_limit<C: EbpfContext>(
    ctx: &C,
    service_id: u32,
    bucket_id: u32,
    cfg: &ServiceConfig,
    parsed: &Parsed,
    len: u64,
) -> Option<Action> {
    match limit::limit(bucket_id, cfg, parsed, len) {
        limit::Verdict::Pass => None,
        limit::Verdict::PassNoBucket => {
            // The target the datapath's records have always had (`RUST_LOG` filters on it).
            warn!(
                ctx,
                target: "agent_ebpf",
                "service {}: key table refused a new key; passing",
                service_id
            );
            stats::service(service_id, SVC_PASS_NO_BUCKET, len);
            None
        }
        limit::Verdict::DropRateLimit => {
            stats::service(service_id, SVC_DROP_RATE_LIMIT, len);
            Some(Action::Drop)
        }
        limit::Verdict::DropContended => {
            stats::service(service_id, SVC_DROP_CONTENDED, len);
            Some(Action::Drop)
        }
    }
}

/// The balancing stage: a backend of the service the main program handed over picked (or
/// found in the connection table), that backend's breaker, then the NAT stage. The frame is
/// not read: the main program handed over what it parsed. Fails open without a service.
#[inline(always)]
pub fn lb_stage<C: EbpfContext>(ctx: &C, len: u64, exempt: bool, stages: &ProgramArray) -> Action {
    let mut parsed = Parsed::EMPTY;
    let Some((id, slot)) = lb::handed_over(&mut parsed) else {
        return Action::Pass;
    };
    let (backend, addr, port, panic, client_port) = match lb::forward(id, slot, &parsed) {
        lb::Forward::Pass => {
            stats::service(id, SVC_PASSED, len);
            return Action::Pass;
        }
        lb::Forward::NoBackend => {
            stats::service(id, SVC_NO_BACKEND, len);
            lb::hand_over_answer(ctx, stages, NO_BACKEND_ID, 0);
            return Action::Drop;
        }
        lb::Forward::Shed => {
            stats::service(id, SVC_SHED, len);
            lb::hand_over_answer(ctx, stages, NO_BACKEND_ID, 0);
            return Action::Drop;
        }
        lb::Forward::To {
            backend,
            panic,
            client_port,
        } => match lb::backend(backend) {
            Some((addr, port)) => (backend, addr, port, panic, client_port),
            None => return Action::Drop,
        },
    };
    // The breaker sees the backend. An answer goes back from the VIP the client addressed,
    // built in a stage of its own: no packet access here after parsing keeps the verifier's
    // paths through the pick few (parse results then merge). Rewritten in place, not copied:
    // the frame of this stage is on the 512-byte stack with those of `forward` and `track`.
    parsed.dst = addr;
    parsed.dport = port;
    // And the client port the backend sees, so the breaker's records match its answers.
    parsed.sport = client_port;
    // A panicking service lets every packet through to its backends (the probe exemption,
    // widened to the service).
    let exempt = exempt || panic;
    let answer = match breaker::check(&parsed, len, exempt) {
        breaker::Verdict::Continue => {
            stats::service(id, SVC_PASSED, len);
            lb::count(backend, len);
            lb::hand_over_nat(ctx, stages, SIDE_DST, &addr, port, client_port);
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

/// The NAT stage: rewrites as handed over (what to write, and where, as the main program
/// parsed the frame), then sends the packet to its new next hop (`fib.rs`); fails open,
/// except that a DNAT that could not be done drops the packet rather than let it reach the
/// VIP.
#[inline(always)]
pub fn nat_stage<C: Nat + NextHop>(ctx: &C) -> Action {
    let Some(mut parsed) = lb::handed_over_frame() else {
        return Action::Pass;
    };
    match lb::nat(ctx, &mut parsed) {
        Some(false) => Action::Drop,
        Some(true) => match ctx.next_hop(&parsed, fib::handed_over_nat()) {
            fib::Verdict::Pass => Action::Pass,
            fib::Verdict::Tx => Action::Bounce,
            fib::Verdict::Redirect(verdict) => Action::Redirect(verdict),
        },
        None => Action::Pass,
    }
}

/// The answer stage: answers the packet the balancing stage could not send on, from the VIP.
#[inline(always)]
pub fn answer_stage<C: Rewrite>(ctx: &C, pkt: &Packet, len: u64) -> Action {
    let mut parsed = Parsed::EMPTY;
    let (Ok(()), Some((id, slot))) = (parse::parse(pkt, &mut parsed), lb::answer_handed_over())
    else {
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
