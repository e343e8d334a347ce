//! The sizes of the datapath's node-wide tables (`agent.tables`): every map whose size
//! follows them, in one place, so the loader sets them all and the limits the policy is
//! checked against are the sizes the maps have.

use crate::{
    breaker::BSTAT_SLOTS,
    classify::GENERATIONS,
    lb::LBSTAT_SLOTS,
    maps::{
        MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CLASSIFY, MAP_DEGRADE, MAP_LB_ACTIVE_CONNS,
        MAP_LB_BACKENDS, MAP_LB_CONNS, MAP_LB_REVERSE, MAP_LB_RR, MAP_LB_STATS, MAP_LB_SVC,
        MAP_LB_TABLES, MAP_SHAPE_DELAY, MAP_SVC_CFG, MAP_SVC_NAMES, MAP_SVC_STATS,
        MIN_AUTO_CONNECTIONS, auto_connections, classify_entries,
    },
    stats::SVC_STAT_SLOTS,
};

/// `agent.tables` resolved for this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct TableSizes {
    /// Most services (service ids are below this).
    pub services: u32,
    /// Most backends with a breaker, and most balanced backends (each, over all services).
    pub backends: u32,
    /// Entries of `LB_CONNS` and of `LB_REVERSE`, each.
    pub connections: u32,
    /// Whether `connections` came from the node's memory (`auto`).
    pub connections_auto: bool,
}

impl TableSizes {
    /// `connections`: `None` for `auto`, which reads the node's memory (`mem_total`, bytes;
    /// the floor when it cannot be read).
    pub fn new(
        services: u32,
        backends: u32,
        connections: Option<u32>,
        mem_total: impl FnOnce() -> Option<u64>,
    ) -> TableSizes {
        let (connections, connections_auto) = match connections {
            Some(n) => (n, false),
            None => (
                mem_total().map_or(MIN_AUTO_CONNECTIONS, auto_connections),
                true,
            ),
        };
        TableSizes {
            services: services.max(1),
            backends: backends.max(1),
            connections: connections.max(1),
            connections_auto,
        }
    }

    /// Every map sized by these numbers, and its entries.
    pub fn maps(&self) -> [(&'static str, u32); 16] {
        let (s, b, c) = (self.services, self.backends, self.connections);
        [
            (MAP_CLASSIFY, classify_entries(s)),
            // Double-buffered: one entry per service and generation.
            (MAP_SVC_CFG, s.saturating_mul(GENERATIONS)),
            (MAP_SVC_NAMES, s),
            (MAP_DEGRADE, s),
            (MAP_SHAPE_DELAY, s),
            (MAP_SVC_STATS, s.saturating_mul(SVC_STAT_SLOTS)),
            (MAP_LB_SVC, s.saturating_mul(GENERATIONS)),
            (MAP_LB_TABLES, s.saturating_mul(GENERATIONS)),
            (MAP_LB_RR, s),
            // Two keys per backend at most: TCP and UDP.
            (MAP_BACKENDS, b.saturating_mul(2)),
            (MAP_BACKEND_STATS, b.saturating_mul(BSTAT_SLOTS)),
            (MAP_LB_BACKENDS, b),
            (MAP_LB_ACTIVE_CONNS, b),
            (MAP_LB_STATS, b.saturating_mul(LBSTAT_SLOTS)),
            (MAP_LB_CONNS, c),
            (MAP_LB_REVERSE, c),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{DEFAULT_BACKENDS, DEFAULT_SERVICES, MAX_CONNECTIONS};

    #[test]
    fn connections_follow_the_node_with_a_floor_and_a_ceiling() {
        let gib = 1u64 << 30;
        let auto = |mem| TableSizes::new(1, 1, None, || mem).connections;
        // 0.25% of 24 GiB for the two tables at 128 bytes an entry.
        assert_eq!(auto(Some(24 * gib)), 251_650);
        assert_eq!(auto(Some(8 * gib)), MIN_AUTO_CONNECTIONS);
        assert_eq!(auto(None), MIN_AUTO_CONNECTIONS);
        assert_eq!(auto(Some(1 << 50)), MAX_CONNECTIONS);
        let set = TableSizes::new(1, 1, Some(100), || panic!("auto only"));
        assert_eq!((set.connections, set.connections_auto), (100, false));
    }

    #[test]
    fn every_node_wide_map_is_sized_and_none_twice() {
        let sizes = TableSizes::new(DEFAULT_SERVICES, DEFAULT_BACKENDS, Some(7), || None);
        let maps = sizes.maps();
        for (i, (name, n)) in maps.iter().enumerate() {
            assert!(*n >= 1, "{name}");
            assert!(maps[..i].iter().all(|(m, _)| m != name), "{name} twice");
        }
        assert!(maps.contains(&(MAP_LB_CONNS, 7)));
        assert!(maps.contains(&(MAP_SVC_CFG, 2 * DEFAULT_SERVICES)));
        assert!(maps.contains(&(MAP_LB_BACKENDS, DEFAULT_BACKENDS)));
    }
}
