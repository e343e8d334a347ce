//! L4 load balancing (see `agent_common::lb`): flows to a service's VIP are pinned to a
//! backend in `LB_CONNS` and rewritten toward it (DNAT); replies from the backend are
//! rewritten back to the VIP using `LB_REVERSE`.

use agent_common::{
    breaker::{Enforce, FlowKey, STATE_HALF_OPEN, enforce},
    classify::{ADDR_LEN, PROTO_TCP, PROTO_UDP},
    lb::{
        CONN_F_CLOSING, LB_F_ACTIVE, LB_F_PANIC, LB_LEAST_CONN, LB_NONE, LB_RETRIES, LB_WRR,
        LBSTAT_FORWARDED, LBSTAT_NEW_FLOWS, LbBackend, LbConn, LbReverse, LbService,
        MAX_LEAST_CONN_BACKENDS, conn_expired, flow_hash, lb_table_pos,
    },
    maps::{STAGE_ANSWER, STAGE_LB, STAGE_NAT},
    ports::NO_NAT_PORT,
    reply::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::{SVC_FALLBACK, SVC_LB_LOST, SVC_LB_REPLACED},
};
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns, maps::ProgramArray};
use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xsub};

use crate::{
    breaker::may_be_backend,
    degrade::{self, NewFlow},
    maps::{
        BACKENDS, LB_ACTIVE_CONNS, LB_BACKENDS, LB_CONNS, LB_HANDOVER, LB_REVERSE, LB_RR, LB_SVC,
        LB_TABLES, LEAST_CONN_BEST, SIDE_SRC,
    },
    nat::{Nat, Side},
    parse::Parsed,
    ports, stats,
};

/// What balancing decided for a packet to a service.
pub enum Forward {
    /// Not balanced (no VIP, not TCP/UDP): go on unchanged.
    Pass,
    /// To this LB backend (index in `LB_BACKENDS`), from client port `client_port`
    /// (`ports`); `panic`: the service panics (`LB_F_PANIC`), so its breakers refuse nothing.
    To {
        backend: u32,
        panic: bool,
        client_port: u16,
    },
    /// A new flow with no backend to take it (every weight 0, every breaker open): refuse it.
    NoBackend,
    /// A new flow of a shed service (`MODE_SHED`): refuse it.
    Shed,
}

/// Whether the service of generation slot `slot` is load-balanced (has a VIP).
#[inline(always)]
pub fn balanced(slot: u32) -> bool {
    LB_SVC.get(slot).is_some_and(|s| s.flags & LB_F_ACTIVE != 0)
}

/// Hands the packet, parsed, to the balancing stage of the hook's `stages`. Returns only if
/// the tail call failed (the stage is not loaded).
#[inline(always)]
pub fn hand_over<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    service_id: u32,
    slot: u32,
    p: &Parsed,
    stages: &ProgramArray,
) {
    if let Some(h) = LB_HANDOVER.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; the tail-called program reads it on this CPU, before anything
        // else can run here.
        unsafe {
            (*h).service_id = service_id;
            (*h).slot = slot;
            (*h).parsed = *p;
            stages.tail_call(ctx, STAGE_LB);
        }
    }
}

/// In the balancing stage: the service the main program handed over and its generation slot;
/// the frame as the main program parsed it goes into `parsed`.
#[inline(always)]
pub fn handed_over(parsed: &mut Parsed) -> Option<(u32, u32)> {
    // Copied into the caller's `parsed`, not returned in a tuple: that took a second copy on
    // the balancing stage's frame, the first of the deepest chain (`agent/tests/stack.rs`).
    let h = LB_HANDOVER.get(0)?;
    *parsed = h.parsed.handed_over();
    Some((h.service_id, h.slot))
}

/// Hands the packet to the NAT stage of the hook's `stages`, to rewrite `side` to `addr` and
/// `port`, and the client's side to `client_port`. Returns only if the tail call failed.
#[inline(always)]
pub fn hand_over_nat<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    stages: &ProgramArray,
    side: u32,
    addr: &[u8; ADDR_LEN],
    port: u16,
    client_port: u16,
) {
    if let Some(h) = LB_HANDOVER.get_ptr_mut(0) {
        // SAFETY: as in `hand_over`.
        unsafe {
            (*h).side = side;
            (*h).addr = *addr;
            (*h).port = port;
            (*h).client_port = client_port;
            stages.tail_call(ctx, STAGE_NAT);
        }
    }
}

/// Hands the packet to the answer stage of the hook's `stages`, which answers it (RST / ICMP
/// unreachable, from the VIP) and counts the answer on backend `id` in `slot`. Returns only
/// if the tail call failed.
#[inline(always)]
pub fn hand_over_answer<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    stages: &ProgramArray,
    id: u32,
    slot: u32,
) {
    if let Some(h) = LB_HANDOVER.get_ptr_mut(0) {
        // SAFETY: as in `hand_over`.
        unsafe {
            (*h).answer_id = id;
            (*h).answer_slot = slot;
            stages.tail_call(ctx, STAGE_ANSWER);
        }
    }
}

/// In the answer stage: the backend and counter slot the balancing stage handed over.
#[inline(always)]
pub fn answer_handed_over() -> Option<(u32, u32)> {
    LB_HANDOVER.get(0).map(|h| (h.answer_id, h.answer_slot))
}

/// In the NAT stage: the frame as the main program parsed it (unchanged since).
#[inline(always)]
pub fn handed_over_frame() -> Option<Parsed> {
    LB_HANDOVER.get(0).map(|h| h.parsed.handed_over())
}

/// The NAT stage: rewrites the packet `p` (from `handed_over_frame`) as handed over, and
/// leaves in `p` the ports the frame now carries (the next hop is looked up with them).
/// `Some(false)`: a DNAT that failed (the packet must not go to the VIP unchanged); `None`
/// without a hand-over.
#[inline(always)]
pub fn nat<C: Nat>(ctx: &C, p: &mut Parsed) -> Option<bool> {
    let h = LB_HANDOVER.get_ptr(0)?;
    // SAFETY: this CPU's slot, written by the stages that tail-called this one.
    let (side, addr, port, backend, client_port) = unsafe {
        let h = &*h;
        (h.side, &h.addr, h.port, h.backend, h.client_port)
    };
    if side != SIDE_SRC {
        let done = ctx.nat(p, Side::Dst, addr, port) && ports::put(ctx, p, Side::Src, client_port);
        p.dport = port;
        if client_port != NO_NAT_PORT {
            p.sport = client_port;
        }
        return Some(done);
    }
    if reply_of_live_flow(p, addr, port, backend, client_port) {
        ctx.nat(p, Side::Src, addr, port);
        ports::put(ctx, p, Side::Dst, client_port);
        p.sport = port;
        if client_port != NO_NAT_PORT {
            p.dport = client_port;
        }
    }
    // A reply that cannot be rewritten passes as it is (fail open).
    Some(true)
}

/// Whether a backend's reply belongs to the balanced flow its reverse entry names: the
/// forward entry is there, live, on this backend, and a SYN-ACK does not answer a flow that
/// already closed (a new handshake between the same endpoints is not the balanced flow). A
/// FIN or RST from the backend closes the flow, as one from the client does. `client_port`:
/// the client's own port (`NO_NAT_PORT`: the reply's); the flow must still leave from the
/// reply's port.
#[inline(always)]
fn reply_of_live_flow(
    p: &Parsed,
    vip: &[u8; ADDR_LEN],
    vip_port: u16,
    backend: u32,
    client_port: u16,
) -> bool {
    let key = FlowKey {
        client: p.dst,
        backend: *vip,
        client_port: if client_port == NO_NAT_PORT {
            p.dport
        } else {
            client_port
        },
        backend_port: vip_port,
        proto: p.proto,
        _pad: [0; 3],
    };
    let Some(c) = LB_CONNS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a helper with no arguments; a live map value for this run.
    let (now, c) = unsafe { (bpf_ktime_get_coarse_ns(), &mut *c) };
    let tcp = p.proto == PROTO_TCP;
    let moved_on = c.nat_port != NO_NAT_PORT && c.nat_port != p.dport;
    if c.backend != backend || moved_on || conn_expired(c, tcp, now) {
        return false;
    }
    if tcp {
        let closing = c.flags & CONN_F_CLOSING != 0;
        if closing && p.tcp_flags & TCP_SYN != 0 {
            return false;
        }
        if !closing && p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            c.flags |= CONN_F_CLOSING;
            c.last_ns = now;
            connections(backend, false);
        }
    }
    true
}

/// Picks (or finds) the backend of a packet addressed to `service_id`'s VIP.
// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "passed by value, the key is copied into this frame (32 bytes more, measured)"
)]
pub fn forward(service_id: u32, slot: u32, p: &Parsed) -> Forward {
    let Some(svc) = LB_SVC.get(slot) else {
        return Forward::Pass;
    };
    if svc.flags & LB_F_ACTIVE == 0
        || !p.has_ports
        || (p.proto != PROTO_TCP && p.proto != PROTO_UDP)
    {
        return Forward::Pass;
    }
    let key = FlowKey {
        client: p.src,
        backend: p.dst,
        client_port: p.sport,
        backend_port: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    };
    // SAFETY: helper with no arguments. The coarse clock (`LbConn::last_ns` says why).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let tcp = p.proto == PROTO_TCP;
    // The backend, and the flags of the service whose backend it is (the companion's for a
    // new flow sent to the fallback).
    let (backend, flags, client_port) = match LB_CONNS.get_ptr_mut(&key) {
        // SAFETY: a live map value for this run; fields are written whole.
        // A SYN on a closing entry is a new connection reusing the 5-tuple: balanced afresh.
        Some(c) if !conn_expired(unsafe { &*c }, tcp, now) && !reused(unsafe { &*c }, p) => unsafe {
            (*c).last_ns = now;
            let closing = tcp && p.tcp_flags & (TCP_FIN | TCP_RST) != 0;
            if closing && (*c).flags & CONN_F_CLOSING == 0 {
                (*c).flags |= CONN_F_CLOSING;
                connections((*c).backend, false);
            }
            let port = if (*c).nat_port == NO_NAT_PORT {
                p.sport
            } else {
                (*c).nat_port
            };
            ((*c).backend, svc.flags, port)
        },
        _ => {
            if tcp && p.tcp_flags & TCP_SYN == 0 {
                stats::service(service_id, SVC_LB_LOST, 0);
            }
            // Degradation applies to new flows only; the entry `track` writes then keeps the
            // flow where it went.
            let (from, from_id, from_slot) = match degrade::new_flow_mode(service_id, slot) {
                NewFlow::Shed => return Forward::Shed,
                NewFlow::Fallback { id, slot: at } => match LB_SVC.get(at) {
                    Some(f) if f.flags & LB_F_ACTIVE != 0 => (f, id, at),
                    // The companion is not balanced in this generation: fail open.
                    _ => (svc, service_id, slot),
                },
                NewFlow::Normal => (svc, service_id, slot),
            };
            let Some(b) = pick(from, from_id, from_slot, p) else {
                return Forward::NoBackend;
            };
            if from_id != service_id {
                stats::service(service_id, SVC_FALLBACK, 0);
            }
            let client_port = track(&key, b, now, p, service_id);
            (b, from.flags, client_port)
        }
    };
    Forward::To {
        backend,
        panic: flags & LB_F_PANIC != 0,
        client_port,
    }
}

/// A new TCP connection (a SYN without ACK) on the 5-tuple of one that closed.
#[inline(always)]
fn reused(c: &LbConn, p: &Parsed) -> bool {
    c.flags & CONN_F_CLOSING != 0
        && p.proto == PROTO_TCP
        && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The `LB_REVERSE` key of a packet that may be a backend's reply.
#[inline(always)]
fn reply_key(p: &Parsed) -> Option<FlowKey> {
    if !p.has_ports || (p.proto != PROTO_TCP && p.proto != PROTO_UDP) || !may_be_backend(p.sport) {
        return None;
    }
    Some(FlowKey {
        client: p.dst,
        backend: p.src,
        client_port: p.dport,
        backend_port: p.sport,
        proto: p.proto,
        _pad: [0; 3],
    })
}

/// In the main program: a reply to a balanced flow goes to the NAT stage, which gives it the
/// VIP back as its source. Returns if it is not one, or the tail call failed.
#[inline(always)]
pub fn hand_over_reply<C: aya_ebpf::EbpfContext>(ctx: &C, p: &Parsed, stages: &ProgramArray) {
    if let Some(key) = reply_key(p)
        && let Some(rev) = unsafe { LB_REVERSE.get(key) }
    {
        if let Some(h) = LB_HANDOVER.get_ptr_mut(0) {
            // SAFETY: as in `hand_over`.
            unsafe {
                (*h).backend = rev.backend;
                (*h).parsed = *p;
            }
        }
        // The reverse NAT gives the reply the client's own port back.
        hand_over_nat(
            ctx,
            stages,
            SIDE_SRC,
            &rev.vip,
            rev.vip_port,
            rev.client_port,
        );
    }
}

/// The address and port of LB backend `index`.
#[inline(always)]
pub fn backend(index: u32) -> Option<([u8; ADDR_LEN], u16)> {
    LB_BACKENDS.get(index).map(|b| (b.key.addr, b.key.port))
}

/// Counts a packet forwarded to LB backend `index`.
#[inline(always)]
pub fn count(index: u32, len: u64) {
    stats::lb_backend(index, LBSTAT_FORWARDED, len);
}

/// Remembers a new flow both ways and counts it on its backend; returns the client port it
/// leaves with (`ports`), the client's own if it could not be remembered.
// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "passed by value, the values are copied into this frame (8 bytes more, measured)"
)]
fn track(key: &FlowKey, backend: u32, now: u64, p: &Parsed, service_id: u32) -> u16 {
    let Some(b) = LB_BACKENDS.get(backend) else {
        return p.sport;
    };
    let mut rkey = FlowKey {
        client: p.src,
        backend: b.key.addr,
        client_port: p.sport,
        backend_port: b.key.port,
        proto: p.proto,
        _pad: [0; 3],
    };
    ports::choose(&mut rkey, p, now, service_id);
    let conn = LbConn {
        last_ns: now,
        backend,
        flags: 0,
        nat_port: rkey.client_port,
    };
    let rev = LbReverse {
        vip: p.dst,
        vip_port: p.dport,
        client_port: p.sport,
        backend,
    };
    // Reverse first: a reply can only come after the forward packet leaves.
    if LB_REVERSE.insert(&rkey, &rev, 0).is_err() {
        return p.sport;
    }
    // An entry of this 5-tuple may be there, expired or closed: then it is replaced (counted,
    // so the agent can tell evictions from replacements).
    let replaced = if LB_CONNS.insert(key, &conn, u64::from(BPF_NOEXIST)).is_ok() {
        false
    } else if LB_CONNS.insert(key, &conn, 0).is_ok() {
        true
    } else {
        return p.sport;
    };
    connections(backend, true);
    stats::lb_backend(backend, LBSTAT_NEW_FLOWS, 0);
    if replaced {
        stats::service(service_id, SVC_LB_REPLACED, 0);
    }
    rkey.client_port
}

/// Active connections per backend, for `least_conn` and metrics.
#[inline(always)]
fn connections(backend: u32, up: bool) {
    if let Some(n) = LB_ACTIVE_CONNS.get_ptr_mut(backend) {
        // SAFETY: an aligned u64 in a live array value; atomic add/sub from any CPU.
        unsafe {
            if up {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1);
            } else if *n > 0 {
                atomic_xsub::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1);
            }
        }
    }
}

/// Whether the backend's breaker lets a new flow through (open: no; half-open: while quota
/// is left; the breaker stage after DNAT takes the quota).
#[inline(always)]
fn admits(b: &LbBackend) -> bool {
    match BACKENDS.get_ptr(b.key) {
        None => true,
        // SAFETY: a live map value for this run.
        Some(st) => match enforce(unsafe { &*st }, true) {
            Enforce::Pass => true,
            Enforce::Trial => unsafe { (*st).state == STATE_HALF_OPEN && (*st).quota > 0 },
            Enforce::Refuse | Enforce::Cut => false,
        },
    }
}

/// A backend for a new flow: the service's algorithm, skipping backends with weight 0 (not in
/// the table) or whose breaker refuses.
// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
fn pick(svc: &LbService, service_id: u32, slot: u32, p: &Parsed) -> Option<u32> {
    if svc.algorithm == LB_LEAST_CONN {
        return least_conn(svc);
    }
    // One lookup of the service's table: a publish swaps the whole table, and this run keeps
    // the one it found (the kernel frees a replaced table only after running programs end).
    let table = LB_TABLES.get(slot)?;
    let len = table.get(0).map_or(0, |h| h[0]);
    if len == 0 {
        return None;
    }
    let start = if svc.algorithm == LB_WRR {
        let n = LB_RR.get_ptr_mut(service_id)?;
        // SAFETY: this CPU's slot; nothing else runs on this CPU while the program does.
        unsafe {
            let at = *n;
            *n = at.wrapping_add(1);
            at
        }
    } else {
        flow_hash(&p.src, &p.dst, p.sport, p.dport, p.proto)
    };
    let panic = svc.flags & LB_F_PANIC != 0;
    let mut i = 0;
    while i <= LB_RETRIES {
        let at = start.wrapping_add(i.wrapping_mul(0x9e37_79b1)) % len;
        let (element, lane) = lb_table_pos(at);
        if let Some(slot) = table.get(element)
            && let b = if lane == 0 { slot[0] } else { slot[1] }
            && b != LB_NONE
            && let Some(backend) = LB_BACKENDS.get(b)
            && (panic || admits(backend))
        {
            return Some(b);
        }
        i += 1;
    }
    None
}

/// The admitting backend with the fewest active connections per unit of weight.
#[inline(always)]
fn least_conn(svc: &LbService) -> Option<u32> {
    let best = LEAST_CONN_BEST.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, for this run only (see `LeastConnBest`).
    unsafe {
        (*best).backend = LB_NONE;
        (*best).conns = 0;
        (*best).weight = 0;
    }
    let mut i = 0;
    while i < MAX_LEAST_CONN_BACKENDS && i < svc.backend_count {
        let idx = svc.backend_base + i;
        i += 1;
        let Some(b) = LB_BACKENDS.get(idx) else {
            continue;
        };
        if b.weight == 0 || (svc.flags & LB_F_PANIC == 0 && !admits(b)) {
            continue;
        }
        let conns = LB_ACTIVE_CONNS.get(idx).copied().unwrap_or(0);
        let weight = u64::from(b.weight);
        // SAFETY: as above.
        unsafe {
            // conns / weight < best.conns / best.weight, without division.
            if (*best).backend == LB_NONE || conns * (*best).weight < (*best).conns * weight {
                (*best).backend = idx;
                (*best).conns = conns;
                (*best).weight = weight;
            }
        }
    }
    // SAFETY: as above.
    let best = unsafe { (*best).backend };
    (best != LB_NONE).then_some(best)
}
