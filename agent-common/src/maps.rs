//! Map names and sizes, shared so the loader and the datapath cannot disagree.
//! Kernel map names are at most 15 bytes.

/// LPM trie: address prefix (IPv4 as `::ffff:a.b.c.d`, prefix + 96) -> [`crate::MatchList`].
pub const MAP_CLASSIFY: &str = "CLASSIFY";
/// Array indexed by service id -> [`crate::ServiceConfig`].
pub const MAP_SVC_CFG: &str = "SVC_CFG";
/// LRU hash: [`crate::BucketKey`] -> [`crate::Bucket`]; size set at load time from `max_keys`.
pub const MAP_RL_BUCKETS: &str = "RL_BUCKETS";
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

/// Service ids are indices into `SVC_CFG`; a policy has at most this many services.
pub const MAX_SERVICES: u32 = 1024;
/// Distinct prefixes in the classifier trie.
pub const MAX_PREFIXES: u32 = 4096;
/// Default size of the token-bucket key table when the policy sets none.
pub const DEFAULT_MAX_KEYS: u32 = 1 << 20;

/// Program names in the object, as the loader looks them up.
pub const PROG_XDP: &str = "agent_xdp";
pub const PROG_TC_EGRESS: &str = "agent_tc_egress";
