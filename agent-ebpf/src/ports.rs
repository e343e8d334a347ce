//! The client port a balanced flow shows its backend (`agent_common::ports` says why): chosen
//! when the flow begins (`choose`), put on the client's packets after the DNAT and given back
//! to the replies after the reverse NAT (`put`).

use agent_common::{
    breaker::FlowKey,
    classify::PROTO_TCP,
    lb::{CONN_F_CLOSING, conn_expired},
    ports::{NO_NAT_PORT, nat_port},
    stats::{SVC_LB_NAT_PORT, SVC_LB_NAT_PORT_BUSY},
};

use crate::{
    maps::{LB_CONNS, LB_REVERSE, PORT_HOLDER_KEY},
    nat::{Nat, Side},
    parse::Parsed,
    stats,
};

/// Sets `rkey.client_port` (the backend-side key of a new flow from `p`, the client's port on
/// entry) to the port the flow leaves with, and counts a moved port (`SVC_LB_NAT_PORT`) or
/// one kept because a live flow of another client 4-tuple (another VIP to the same backend)
/// holds the moved one (`SVC_LB_NAT_PORT_BUSY`: the client's own port, as before
/// translation, fail open) on `service_id`.
#[inline(always)]
pub fn choose(rkey: &mut FlowKey, p: &Parsed, now: u64, service_id: u32) {
    rkey.client_port = nat_port(p.sport);
    if held(rkey, p, now) {
        rkey.client_port = p.sport;
        stats::service(service_id, SVC_LB_NAT_PORT_BUSY, 0);
    } else if rkey.client_port != p.sport {
        stats::service(service_id, SVC_LB_NAT_PORT, 0);
    }
}

/// Whether a live balanced flow other than `p`'s own 5-tuple holds the backend-side tuple
/// `rkey`.
// Inlined into `lb::track`: the deepest chain of the balancing stage ends there.
#[inline(always)]
fn held(rkey: &FlowKey, p: &Parsed, now: u64) -> bool {
    // SAFETY: a map lookup; the value stays valid for this run.
    let Some(rev) = (unsafe { LB_REVERSE.get(rkey) }) else {
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
    // The holder's forward key, built in a per-CPU slot: this frame is on top of those of
    // `lb::forward` and `lb::track`.
    let Some(fwd) = PORT_HOLDER_KEY.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot, for this run only; a map value may serve as a lookup key.
    let c = unsafe {
        let fwd = &mut *fwd;
        fwd.client = rkey.client;
        fwd.backend = rev.vip;
        fwd.client_port = client_port;
        fwd.backend_port = rev.vip_port;
        fwd.proto = rkey.proto;
        fwd._pad = [0; 3];
        LB_CONNS.get(fwd)
    };
    match c {
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
