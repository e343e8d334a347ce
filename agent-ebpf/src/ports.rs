//! The client port a balanced flow shows its backend (`agent_common::ports` says why): chosen
//! when the flow begins (`choose`), put on the client's packets after the DNAT and given back
//! to the replies after the reverse NAT (`put`).

use agent_common::{
    breaker::FlowKey,
    classify::PROTO_TCP,
    lb::{CONN_F_CLOSING, conn_expired},
    ports::{NO_NAT_PORT, nat_port},
};

use crate::{
    maps::{LB_CONNS, LB_REVERSE},
    nat::{Nat, Side},
    parse::Parsed,
};

/// What `choose` did, for the service's counters.
pub enum Choice {
    /// The client's own port (an application bound it outside the ephemeral range).
    Kept,
    /// The client's port moved out of the ephemeral range.
    Moved,
    /// A live balanced flow of another client 4-tuple (another VIP to the same backend) holds
    /// the backend-side tuple: the client's own port, as before translation (fail open).
    Busy,
}

/// Sets `rkey.client_port` (the backend-side key of a new flow from `p`, the client's port on
/// entry) to the port the flow leaves with.
#[inline(always)]
pub fn choose(rkey: &mut FlowKey, p: &Parsed, now: u64) -> Choice {
    rkey.client_port = nat_port(p.sport);
    if held(rkey, p, now) {
        rkey.client_port = p.sport;
        return Choice::Busy;
    }
    if rkey.client_port == p.sport {
        Choice::Kept
    } else {
        Choice::Moved
    }
}

/// Whether a live balanced flow other than `p`'s own 5-tuple holds the backend-side tuple
/// `rkey`.
// A BPF subprogram with its own stack frame (see "Stack" in pipeline.rs).
#[inline(never)]
fn held(rkey: &FlowKey, p: &Parsed, now: u64) -> bool {
    // SAFETY: a map lookup; the value is copied out at once.
    let Some(rev) = (unsafe { LB_REVERSE.get(rkey) }).copied() else {
        return false;
    };
    let client_port = if rev.client_port == NO_NAT_PORT {
        rkey.client_port
    } else {
        rev.client_port
    };
    if rev.vip == p.dst && rev.vip_port == p.dport && client_port == p.sport {
        // This flow's own 5-tuple, reused by a new connection.
        return false;
    }
    let fwd = FlowKey {
        client: rkey.client,
        backend: rev.vip,
        client_port,
        backend_port: rev.vip_port,
        proto: rkey.proto,
        _pad: [0; 3],
    };
    // SAFETY: as above.
    match unsafe { LB_CONNS.get(&fwd) } {
        Some(c) => {
            c.backend == rev.backend
                && (c.nat_port == NO_NAT_PORT || c.nat_port == rkey.client_port)
                && c.flags & CONN_F_CLOSING == 0
                && !conn_expired(c, rkey.proto == PROTO_TCP, now)
        }
        None => false,
    }
}

/// Puts client port `port` on `side` of the packet (the source after a DNAT, the destination
/// of a reply); nothing to do when it is there already or is `NO_NAT_PORT`. `false`: the
/// rewrite failed.
#[inline(always)]
pub fn put<C: Nat>(ctx: &C, p: &Parsed, side: Side, port: u16) -> bool {
    let (addr, now) = match side {
        Side::Src => (&p.src, p.sport),
        Side::Dst => (&p.dst, p.dport),
    };
    port == NO_NAT_PORT || port == now || ctx.nat(p, side, addr, port)
}
