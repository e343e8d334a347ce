//! Degradation (POLICY.md `degradation`): the agent measures each service's conditions and
//! writes the service's mode into `DEGRADE` (one `u32` per service id, one write per
//! change); the datapath reads it for new flows only. Established flows stay where they are.
//!
//! - [`MODE_FALLBACK`] (`static_response`, `cache_only`): new flows of a balanced service
//!   go to its fallback backends, balanced as the *companion* service whose id (+ 1) the
//!   service's `ServiceConfig::fallback` names; the companion's rate limit (the
//!   `fallback.rate_limit`, else the service's own) is in force for every packet.
//! - [`MODE_SHED`] (`shed`): new flows of the service are refused (TCP RST, ICMP
//!   unreachable), as an open breaker's are.
//!
//! Fail open: a mode the datapath does not know, or [`MODE_FALLBACK`] on a service without a
//! companion in the live generation, is [`MODE_NORMAL`].

use crate::{
    classify::{PROTO_TCP, PROTO_UDP},
    reply::{TCP_ACK, TCP_SYN},
};

/// Not degraded: the service's own backends and rate limit.
pub const MODE_NORMAL: u32 = 0;
/// Degraded to the fallback backends (and the fallback's rate limit).
pub const MODE_FALLBACK: u32 = 1;
/// Shed: new flows refused.
pub const MODE_SHED: u32 = 2;

/// The mode's name, as logs, metrics and status show it.
pub const fn mode_name(mode: u32) -> &'static str {
    match mode {
        MODE_FALLBACK => "fallback",
        MODE_SHED => "shed",
        _ => "normal",
    }
}

/// Whether a packet opens a flow, for a service the datapath keeps no connection state of
/// (shedding outside the balancer): a TCP SYN without ACK, any UDP datagram. Other protocols
/// are never refused.
#[inline(always)]
pub const fn opens_flow(proto: u8, tcp_flags: u8) -> bool {
    proto == PROTO_UDP || (proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::{TCP_FIN, TCP_RST};

    #[test]
    fn only_syns_and_datagrams_open_flows() {
        assert!(opens_flow(PROTO_TCP, TCP_SYN));
        assert!(
            !opens_flow(PROTO_TCP, TCP_SYN | TCP_ACK),
            "a SYN-ACK answers"
        );
        assert!(!opens_flow(PROTO_TCP, TCP_ACK));
        assert!(!opens_flow(PROTO_TCP, TCP_FIN | TCP_ACK));
        assert!(!opens_flow(PROTO_TCP, TCP_RST));
        assert!(opens_flow(PROTO_UDP, 0));
        assert!(opens_flow(PROTO_UDP, TCP_ACK), "flags mean nothing to UDP");
        assert!(!opens_flow(1, TCP_SYN), "ICMP is never shed");
    }

    #[test]
    fn unknown_modes_are_named_normal() {
        assert_eq!(mode_name(MODE_SHED), "shed");
        assert_eq!(mode_name(MODE_FALLBACK), "fallback");
        assert_eq!(mode_name(7), "normal");
    }
}
