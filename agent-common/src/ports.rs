//! Client ports of balanced flows (issue 14, item 5): the port a backend sees.
//!
//! A client's kernel picks the ephemeral port of a connection to a VIP checking uniqueness
//! against (client, VIP) only; after the DNAT the backend sees (client:port, backend), a
//! 4-tuple the same client's direct connections to that backend draw from the same ephemeral
//! range. A backend still holding such a tuple in TIME_WAIT (it closed first) refuses about
//! half of the colliding SYNs (PAWS: the client's TCP timestamp offset is keyed by the 4-tuple
//! it connected, not the one the backend sees), and the client's SYN waits for a
//! retransmission (8-12 ms at HZ=250, or a whole second on a second collision); a direct
//! connection landing on a balanced flow's tuple has its replies taken for the balanced flow's.
//!
//! So a balanced flow whose client port lies in the kernel's ephemeral range leaves with that
//! port moved, one to one, into a range below it ([`nat_port`]): balanced flows and the host's
//! direct connections (the agent's health probes among them) never share a backend 4-tuple.
//! The mapping is a function of the client's port alone, so a given client 4-tuple always
//! shows its backend the same one: when the kernel reuses a client port toward the VIP, the
//! backend's TIME_WAIT of the earlier flow meets the same timestamp clock and takes the new SYN,
//! as it does for a direct connection. A port an application bound outside the ephemeral range
//! is kept. The reverse NAT restores the client's port.

/// Linux's default ephemeral range (`net.ipv4.ip_local_port_range = 32768 60999`): the ports a
/// client kernel picks for its connections, to a VIP and to a backend alike.
pub const EPHEMERAL_FIRST: u16 = 32_768;
pub const EPHEMERAL_LAST: u16 = 60_999;

/// Where the ephemeral range is moved to: `NAT_PORT_FIRST ..= NAT_PORT_LAST`, as many ports,
/// above the privileged ones (some servers treat a source port below 1024 as a privileged
/// client) and below the ephemeral range, which the kernel never picks from by itself.
pub const NAT_PORT_FIRST: u16 = 1_024;
pub const NAT_PORT_LAST: u16 = NAT_PORT_FIRST + (EPHEMERAL_LAST - EPHEMERAL_FIRST);

/// `LbConn::nat_port` / `LbReverse::client_port` of an entry that does not translate (the
/// client's port is kept).
pub const NO_NAT_PORT: u16 = 0;

/// Whether the kernel may pick client port `port` for a direct connection too.
#[inline(always)]
pub const fn needs_nat_port(port: u16) -> bool {
    port >= EPHEMERAL_FIRST && port <= EPHEMERAL_LAST
}

/// The client port the backend sees for a balanced flow from client port `port`.
#[inline(always)]
pub const fn nat_port(port: u16) -> u16 {
    if needs_nat_port(port) {
        port - EPHEMERAL_FIRST + NAT_PORT_FIRST
    } else {
        port
    }
}

/// Whether a kernel whose `net.ipv4.ip_local_port_range` is `first..=last` may pick, for a
/// direct connection, a port a balanced flow shows its backend: one the datapath does not move
/// (outside the default ephemeral range) or one it moves to.
pub const fn range_defeats_nat_port(first: u16, last: u16) -> bool {
    first < EPHEMERAL_FIRST || last > EPHEMERAL_LAST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_ports_move_one_to_one_out_of_the_ephemeral_range() {
        assert_eq!(nat_port(EPHEMERAL_FIRST), NAT_PORT_FIRST);
        assert_eq!(nat_port(EPHEMERAL_LAST), NAT_PORT_LAST);
        assert_eq!(NAT_PORT_LAST, 29_255);
        let moved: std::collections::HashSet<u16> =
            (EPHEMERAL_FIRST..=EPHEMERAL_LAST).map(nat_port).collect();
        assert_eq!(
            moved.len(),
            usize::from(EPHEMERAL_LAST - EPHEMERAL_FIRST) + 1,
            "one to one"
        );
        assert!(moved.iter().all(|p| !needs_nat_port(*p)));
        assert!(!moved.contains(&NO_NAT_PORT));
    }

    #[test]
    fn only_a_range_within_the_default_one_keeps_the_guarantee() {
        assert!(!range_defeats_nat_port(EPHEMERAL_FIRST, EPHEMERAL_LAST));
        assert!(!range_defeats_nat_port(40_000, 50_000));
        assert!(range_defeats_nat_port(1_024, 65_535));
        assert!(range_defeats_nat_port(10_000, 40_000));
        assert!(range_defeats_nat_port(EPHEMERAL_FIRST, 65_000));
    }

    #[test]
    fn ports_an_application_bound_are_kept() {
        for p in [
            80,
            1_023,
            EPHEMERAL_FIRST - 1,
            EPHEMERAL_LAST + 1,
            62_000,
            u16::MAX,
        ] {
            assert!(!needs_nat_port(p));
            assert_eq!(nat_port(p), p);
        }
    }
}
