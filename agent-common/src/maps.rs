//! Map names and sizes, shared so the loader and the datapath cannot disagree.
//! Kernel map names are at most 15 bytes.

/// One-entry array: the policy generation (0 or 1) the datapath reads. The agent stages a new
/// policy under the other generation and switches with one write of this entry
/// (`crate::classify::GENERATIONS`).
pub const MAP_POLICY_GEN: &str = "POLICY_GEN";
/// LPM trie: generation byte, then address prefix (IPv4 as `::ffff:a.b.c.d`, prefix + 96)
/// -> [`crate::MatchList`] (`crate::classify::classify_key`).
pub const MAP_CLASSIFY: &str = "CLASSIFY";
/// Array indexed by `generation_slot(service id, generation)` -> [`crate::ServiceConfig`].
pub const MAP_SVC_CFG: &str = "SVC_CFG";
/// LRU hash: [`crate::BucketKey`] -> [`crate::Bucket`]; size set at load time from `max_keys`.
pub const MAP_RL_BUCKETS: &str = "RL_BUCKETS";
/// LRU hash: [`crate::BucketKey`] -> [`crate::shape::Departure`], the next departure time of
/// each shaping key; size set at load time from `shaping.max_keys`.
pub const MAP_SHAPE_NEXT: &str = "SHAPE_NEXT";
/// Array indexed by service id -> [`crate::classify::ServiceName`]: which service holds the
/// id (for an adopting agent; the datapath does not read it).
pub const MAP_SVC_NAMES: &str = "SVC_NAMES";
/// Array indexed by service id -> u32, the service's degradation mode
/// (`crate::degrade::MODE_*`), written by the agent: not per generation, a state like a
/// breaker's.
pub const MAP_DEGRADE: &str = "DEGRADE";
/// Per-CPU array indexed by service id -> [`crate::shape::ShapeDelay`].
pub const MAP_SHAPE_DELAY: &str = "SHAPE_DELAY";
/// Per-CPU array indexed by `service_id * SVC_STAT_SLOTS + slot` -> [`crate::Counter`].
pub const MAP_SVC_STATS: &str = "SVC_STATS";
/// Per-CPU array indexed by a `GSTAT_*` slot -> [`crate::Counter`].
pub const MAP_GLOBAL_STATS: &str = "GLOBAL_STATS";

/// Hash: [`crate::breaker::BackendKey`] -> [`crate::breaker::BackendState`], written by the
/// agent on every breaker transition.
pub const MAP_BACKENDS: &str = "BACKENDS";
/// Array of `PORT_BITMAP_WORDS` u32: bit `port % 32` of word `port / 32` is set when some
/// backend listens on that port, so most packets skip the `BACKENDS` hash lookup.
pub const MAP_BACKEND_PORTS: &str = "BACKEND_PORTS";
/// Per-CPU array indexed by `backend_slot(id, slot)` -> [`crate::Counter`].
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
/// LRU hash: [`crate::breaker::FlowKey`] -> [`crate::breaker::AdmittedFlow`].
pub const MAP_HALF_OPEN_FLOWS: &str = "HALF_OPEN_FLOWS";
/// LRU hash: [`crate::breaker::FlowKey`] -> [`crate::breaker::PendingSyn`]; the agent sweeps
/// entries past the timeout as failures.
pub const MAP_PENDING_SYNS: &str = "PENDING_SYNS";

/// Array indexed by `generation_slot(service id, generation)` -> [`crate::lb::LbService`].
pub const MAP_LB_SVC: &str = "LB_SVC";
/// Array of maps indexed by `generation_slot(service id, generation)` -> the service's table (`lb::LB_TABLE_FLAGS`): entry 0
/// its length, then u32 LB backend indices (`LB_NONE` for none).
pub const MAP_LB_TABLES: &str = "LB_TABLES";
/// Array indexed by LB index -> [`crate::lb::LbBackend`].
pub const MAP_LB_BACKENDS: &str = "LB_BACKENDS";
/// Array indexed by LB index -> u64: active connections (atomic in the datapath).
pub const MAP_LB_ACTIVE_CONNS: &str = "LB_ACTIVE_CONNS";
/// Per-CPU array of `Counter`, `lb::lb_slot(index, LBSTAT_*)`: per LB backend counters.
pub const MAP_LB_STATS: &str = "LB_STATS";
/// Per-CPU array indexed by service id -> u32: each CPU's weighted round-robin position.
pub const MAP_LB_RR: &str = "LB_RR";
/// LRU hash: [`crate::breaker::FlowKey`] (client -> VIP) -> [`crate::lb::LbConn`].
pub const MAP_LB_CONNS: &str = "LB_CONNS";
/// LRU hash: [`crate::breaker::FlowKey`] (client -> backend) -> [`crate::lb::LbReverse`].
pub const MAP_LB_REVERSE: &str = "LB_REVERSE";
/// Per-CPU hand-over from a main program to the stage it tail-calls (service, NAT side, answer).
pub const MAP_LB_HANDOVER: &str = "LB_HANDOVER";
/// Per service, the least-connection backend the balancer picked for new flows.
pub const MAP_LEAST_CONN_BEST: &str = "LEAST_CONN_BEST";

/// Version of what the agent pins under `agent.pin_path`: the set of pinned maps, their keys,
/// values and meaning, and the contract between main programs and stages (an old main
/// program tail-calls the new stages while an agent adopts the pins). Bump it with any such
/// change: an agent refuses pins of another version instead of mixing layouts. 2: `BACKENDS`
/// values carry when their state began and the open period (so an adopting agent resumes
/// the breakers). 3: the policy is double-buffered (`POLICY_GEN`, the generation byte in
/// `CLASSIFY` keys, two entries per service in `SVC_CFG`, `LB_SVC` and `LB_TABLES`; service
/// ids stable across reloads, their names in `SVC_NAMES`). 4: degradation (`DEGRADE`, the
/// companion id in `ServiceConfig::fallback`, two more service counters, 80-byte names). 5:
/// balanced flows' client ports (`crate::ports`: `LbConn::nat_port`, `LbReverse::client_port`,
/// the NAT stage's hand-over of both ports, two more service counters). 6: the main programs
/// hand the stages the frame they parsed (`LB_HANDOVER` values carry it; the stages no longer
/// parse), and `LB_CONNS` entries are stamped on the coarse clock.
pub const PIN_LAYOUT: u32 = 6;

/// The maps pinned under `<agent.pin_path>/maps/`: every map holding policy, state or
/// counters, and the stage arrays (a program array empties when its last user reference
/// goes, which would cut the stages off the running programs when the agent dies). Per-CPU
/// scratch space and the log ring are not pinned; a map left out would start empty under an
/// adopting agent.
pub const PINNED_MAPS: [&str; 27] = [
    MAP_POLICY_GEN,
    MAP_CLASSIFY,
    MAP_SVC_CFG,
    MAP_SVC_NAMES,
    MAP_DEGRADE,
    MAP_RL_BUCKETS,
    MAP_SHAPE_NEXT,
    MAP_SHAPE_DELAY,
    MAP_SVC_STATS,
    MAP_GLOBAL_STATS,
    MAP_BACKENDS,
    MAP_BACKEND_PORTS,
    MAP_BACKEND_STATS,
    MAP_HALF_OPEN_FLOWS,
    MAP_PENDING_SYNS,
    MAP_LB_SVC,
    MAP_LB_TABLES,
    MAP_LB_BACKENDS,
    MAP_LB_ACTIVE_CONNS,
    MAP_LB_STATS,
    MAP_LB_RR,
    MAP_LB_CONNS,
    MAP_LB_REVERSE,
    MAP_LB_HANDOVER,
    MAP_LEAST_CONN_BEST,
    MAP_STAGES_XDP,
    MAP_STAGES_TC,
];

/// Default size of the token-bucket key table when the policy sets none.
pub const DEFAULT_MAX_KEYS: u32 = 1 << 20;

/// `agent.tables.services`: service ids are indices into `SVC_CFG` and the other per-service
/// arrays, so a policy has at most this many services.
pub const DEFAULT_SERVICES: u32 = 16_384;
/// `agent.tables.backends`: backends with a breaker (ids into `BACKEND_STATS`; `BACKENDS`
/// holds two keys for each, TCP and UDP) and balanced backends (indices into `LB_BACKENDS`),
/// each counted over all services.
pub const DEFAULT_BACKENDS: u32 = 65_536;
/// The most `agent.tables.services` and `agent.tables.backends` may be.
pub const MAX_TABLE_LIMIT: u32 = 1 << 20;
/// `agent.tables.connections: auto`: entries of `LB_CONNS` and of `LB_REVERSE` (each) take
/// this share of the node's memory, in millionths (Cilium's
/// `bpf-map-dynamic-size-ratio` default, 0.25%, for the two tables together) ...
pub const CONNECTIONS_MEMORY_PPM: u64 = 2_500;
/// ... at [`CONNECTION_ENTRY_BYTES`] per entry of each, and never fewer than this (Cilium's
/// floor) ...
pub const MIN_AUTO_CONNECTIONS: u32 = 131_072;
/// ... nor more than this.
pub const MAX_CONNECTIONS: u32 = 1 << 24;
/// Kernel memory of one LRU hash entry of `LB_CONNS` or `LB_REVERSE` (40-byte key, 16-byte
/// value, the kernel's element header), as `memlock` reports it.
pub const CONNECTION_ENTRY_BYTES: u64 = 128;
/// The object's size of the connection tables (the loader always sets the real one).
pub const DEFAULT_CONNECTIONS: u32 = MIN_AUTO_CONNECTIONS;

/// `agent.tables.connections: auto` on a node of `mem_total` bytes: entries of each of the
/// two connection tables.
pub const fn auto_connections(mem_total: u64) -> u32 {
    let n = mem_total / 1_000_000 * CONNECTIONS_MEMORY_PPM / (2 * CONNECTION_ENTRY_BYTES);
    if n < MIN_AUTO_CONNECTIONS as u64 {
        MIN_AUTO_CONNECTIONS
    } else if n > MAX_CONNECTIONS as u64 {
        MAX_CONNECTIONS
    } else {
        n as u32
    }
}

/// Entries of the classifier trie for `services` services: a service matches one prefix, so
/// twice that leaves room to spare (the trie allocates per entry, not up front); times the
/// two generations, which hold entries at once while a reload is staged.
pub const fn classify_entries(services: u32) -> u32 {
    services
        .saturating_mul(2)
        .saturating_mul(crate::classify::GENERATIONS)
}

/// Program names in the object, as the loader looks them up.
pub const PROG_XDP: &str = "agent_xdp";
pub const PROG_TC_EGRESS: &str = "agent_tc_egress";
/// The balancing stage of each hook, entered by tail call from the programs above (a program
/// of its own, so the verifier checks it apart from the main pipeline).
pub const PROG_XDP_LB: &str = "agent_xdp_lb";
pub const PROG_TC_LB: &str = "agent_tc_lb";
/// The rewriting stage of each hook: DNAT toward the backend the balancing stage chose, or
/// reverse NAT of a backend's reply (the main program found it in `LB_REVERSE`).
pub const PROG_XDP_NAT: &str = "agent_xdp_nat";
pub const PROG_TC_NAT: &str = "agent_tc_nat";
/// Program arrays of the stages, one per hook: the kernel lets a program array hold programs
/// of one type only, and refuses to load a program of another type that uses it (EINVAL,
/// with no verifier message).
pub const MAP_STAGES_XDP: &str = "STAGES_XDP";
pub const MAP_STAGES_TC: &str = "STAGES_TC";
/// Slots in each stage array.
pub const STAGE_LB: u32 = 0;
pub const STAGE_NAT: u32 = 1;
pub const STAGE_ANSWER: u32 = 2;
/// The answer stage of each hook: a RST / ICMP unreachable for a balanced flow that no backend
/// takes or whose backend's breaker refuses it (from the VIP the client addressed).
pub const PROG_XDP_ANSWER: &str = "agent_xdp_answer";
pub const PROG_TC_ANSWER: &str = "agent_tc_answer";
