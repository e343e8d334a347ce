//! Circuit-breaker enforcement toward backends (see `agent_common::breaker` for the contract):
//! one hash lookup on the destination of each TCP/UDP packet, an atomic count-down of the
//! half-open quota, and passive tracking of SYNs toward backends until their answer.

use agent_common::{
    breaker::{
        AdmittedFlow, BSTAT_ADMITTED, BSTAT_REFUSED, BSTAT_SYNACK, BSTAT_TRIAL, BackendKey,
        BackendState, Enforce, F_DROP, F_PASSIVE, FlowKey, PendingSyn, enforce, port_bit,
    },
    classify::{PROTO_TCP, PROTO_UDP},
    limit::CAS_ATTEMPTS,
    reply::{TCP_ACK, TCP_RST, TCP_SYN},
};
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::read_volatile,
};

use crate::{
    maps::{BACKEND_PORTS, BACKENDS, HALF_OPEN_FLOWS, PENDING_SYNS},
    parse::Parsed,
    stats,
};

/// What the breaker decided for one packet.
pub enum Verdict {
    /// Not toward a backend, or admitted: go on with the rest of the pipeline.
    Continue,
    /// Refused or cut, and `on_open: drop`.
    Drop { id: u32 },
    /// Refused (a new flow): answer with a RST / ICMP unreachable.
    Refuse { id: u32 },
    /// An established flow cut by `close_existing`: answer with a RST.
    Cut { id: u32 },
}

#[inline(always)]
fn flow_key(p: &Parsed) -> FlowKey {
    FlowKey {
        client: p.src,
        backend: p.dst,
        client_port: p.sport,
        backend_port: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// One array read instead of a hash lookup for the many packets toward ports no backend uses.
#[inline(always)]
pub fn may_be_backend(port: u16) -> bool {
    let (word, mask) = port_bit(port);
    BACKEND_PORTS.get(word).is_some_and(|w| *w & mask != 0)
}

/// `exempt`: the packet is one of the agent's own probes.
// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
pub fn check(p: &Parsed, len: u64, exempt: bool) -> Verdict {
    if !p.has_ports || (p.proto != PROTO_TCP && p.proto != PROTO_UDP) {
        return Verdict::Continue;
    }
    if exempt || !may_be_backend(p.dport) {
        return Verdict::Continue;
    }
    let key = BackendKey {
        addr: p.dst,
        port: p.dport,
        proto: p.proto,
        _pad: 0,
    };
    let Some(state) = BACKENDS.get_ptr_mut(key) else {
        return Verdict::Continue;
    };
    // SAFETY: a live map value for this run (RCU); the agent rewrites it whole on transitions.
    let st = unsafe { *state };
    let new_flow = p.proto == PROTO_UDP || p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let id = st.id;
    match enforce(&st, new_flow) {
        Enforce::Pass => {}
        Enforce::Trial => match admit_trial(p, state, &st) {
            Trial::Again => {}
            Trial::Admitted => stats::backend(id, BSTAT_TRIAL, len),
            Trial::Refused => return refuse(&st),
        },
        Enforce::Refuse => return refuse(&st),
        Enforce::Cut => {
            // Never answer a RST with a RST.
            if st.flags & F_DROP != 0 || p.tcp_flags & TCP_RST != 0 {
                return Verdict::Drop { id };
            }
            return Verdict::Cut { id };
        }
    }
    if new_flow {
        stats::backend(id, BSTAT_ADMITTED, len);
        if p.proto == PROTO_TCP && st.flags & F_PASSIVE != 0 {
            track_syn(p, id);
        }
    }
    Verdict::Continue
}

#[inline(always)]
fn refuse(st: &BackendState) -> Verdict {
    if st.flags & F_DROP != 0 {
        Verdict::Drop { id: st.id }
    } else {
        Verdict::Refuse { id: st.id }
    }
}

enum Trial {
    /// Admitted earlier in this half-open period (a retransmitted SYN, the next datagram of
    /// a UDP flow): passes without spending quota.
    Again,
    /// Took one from the quota.
    Admitted,
    /// No quota left.
    Refused,
}

/// Half-open: a flow already admitted in this epoch passes again; otherwise it takes one
/// from the quota, if any is left.
#[inline(always)]
fn admit_trial(p: &Parsed, state: *mut BackendState, st: &BackendState) -> Trial {
    let key = flow_key(p);
    if let Some(f) = unsafe { HALF_OPEN_FLOWS.get(key) }
        && f.epoch == st.epoch
        && f.id == st.id
    {
        return Trial::Again;
    }
    // SAFETY: `quota` is an aligned u32 inside the live map value; CAS keeps CPUs from
    // admitting more than the quota between them.
    let quota = unsafe { &raw mut (*state).quota };
    let mut attempt = 0;
    while attempt < CAS_ATTEMPTS {
        let left = unsafe { read_volatile(quota) };
        if left == 0 {
            return Trial::Refused;
        }
        let (_, swapped) = unsafe {
            atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                quota,
                left,
                left - 1,
            )
        };
        if swapped {
            let admitted = AdmittedFlow {
                epoch: st.epoch,
                id: st.id,
            };
            // A full table only means a retransmitted SYN may take a second slot.
            let _ = HALF_OPEN_FLOWS.insert(key, admitted, 0);
            return Trial::Admitted;
        }
        attempt += 1;
    }
    // Contended past the bound: refusing never over-admits.
    Trial::Refused
}

/// Remembers an admitted SYN until the backend answers it (or the agent times it out). The
/// first SYN's time is kept: retransmissions do not restart the clock.
#[inline(always)]
fn track_syn(p: &Parsed, id: u32) {
    let pending = PendingSyn {
        // SAFETY: helper with no arguments.
        at_ns: unsafe { bpf_ktime_get_ns() },
        id,
        _pad: 0,
    };
    let _ = PENDING_SYNS.insert(flow_key(p), pending, BPF_NOEXIST.into());
}

/// A SYN-ACK or RST coming from a backend answers a tracked SYN: count it as a success or a
/// refusal for passive detection. Answers to untracked SYNs (probes, our own RSTs, flows
/// that were never refused) find no entry and count nothing.
#[inline(always)]
pub fn observe_answer(p: &Parsed) {
    if p.proto != PROTO_TCP || !p.has_ports || p.tcp_flags & (TCP_RST | TCP_SYN) == 0 {
        return;
    }
    let synack = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    let rst = p.tcp_flags & TCP_RST != 0;
    // Answers come from a backend's port: the bitmap spares every other SYN-ACK and RST
    // (those of all the host's own connections) the hash lookup.
    if (!synack && !rst) || !may_be_backend(p.sport) {
        return;
    }
    let key = FlowKey {
        client: p.dst,
        backend: p.src,
        client_port: p.dport,
        backend_port: p.sport,
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    let Some(pending) = (unsafe { PENDING_SYNS.get(key) }) else {
        return;
    };
    let id = pending.id;
    // Only the CPU whose delete succeeds counts the answer.
    if PENDING_SYNS.remove(key).is_ok() {
        stats::backend(id, if rst { BSTAT_REFUSED } else { BSTAT_SYNACK }, 0);
    }
}
