//! Map definitions. Names come from `agent_common::maps` (the symbol name is the map name);
//! sizes here are defaults the loader overrides (`EbpfLoader::map_max_entries`).

use agent_common::{
    Bucket, BucketKey, Counter, MatchList, ServiceConfig,
    breaker::{
        AdmittedFlow, BSTAT_SLOTS, BackendKey, BackendState, FlowKey, MAX_BACKENDS,
        MAX_TRACKED_FLOWS, PORT_BITMAP_WORDS, PendingSyn,
    },
    classify::ADDR_LEN,
    maps::{DEFAULT_MAX_KEYS, MAX_PREFIXES, MAX_SERVICES},
    stats::{GSTAT_SLOTS, SVC_STAT_SLOTS},
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};

#[map]
pub static CLASSIFY: LpmTrie<[u8; ADDR_LEN], MatchList> =
    LpmTrie::with_max_entries(MAX_PREFIXES, 0);

#[map]
pub static SVC_CFG: Array<ServiceConfig> = Array::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static RL_BUCKETS: LruHashMap<BucketKey, Bucket> =
    LruHashMap::with_max_entries(DEFAULT_MAX_KEYS, 0);

#[map]
pub static SVC_STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(MAX_SERVICES * SVC_STAT_SLOTS, 0);

#[map]
pub static GLOBAL_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(GSTAT_SLOTS, 0);

/// Two keys per backend at most (TCP and UDP).
#[map]
pub static BACKENDS: HashMap<BackendKey, BackendState> =
    HashMap::with_max_entries(MAX_BACKENDS * 2, 0);

#[map]
pub static BACKEND_PORTS: Array<u32> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(MAX_BACKENDS * BSTAT_SLOTS, 0);

#[map]
pub static HALF_OPEN_FLOWS: LruHashMap<FlowKey, AdmittedFlow> =
    LruHashMap::with_max_entries(MAX_TRACKED_FLOWS, 0);

#[map]
pub static PENDING_SYNS: LruHashMap<FlowKey, PendingSyn> =
    LruHashMap::with_max_entries(MAX_TRACKED_FLOWS, 0);

/// Per-CPU scratch space where an answer (RST, ICMP unreachable) is built: it does not fit
/// next to everything else on the 512-byte BPF stack.
#[map]
pub static REPLY_SCRATCH: PerCpuArray<[u8; REPLY_SCRATCH_LEN]> =
    PerCpuArray::with_max_entries(1, 0);

/// Bytes of `REPLY_SCRATCH`: the longest answer (an ICMPv6 unreachable).
pub const REPLY_SCRATCH_LEN: usize = agent_common::reply::UNREACH_V6_LEN;
