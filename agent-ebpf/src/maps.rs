//! Map definitions. Names come from `agent_common::maps` (the symbol name is the map name);
//! sizes here are defaults the loader overrides (`EbpfLoader::map_max_entries`).

use agent_common::{
    Bucket, BucketKey, Counter, MatchList, ServiceConfig,
    classify::ADDR_LEN,
    maps::{DEFAULT_MAX_KEYS, MAX_PREFIXES, MAX_SERVICES},
    stats::{GSTAT_SLOTS, SVC_STAT_SLOTS},
};
use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray},
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
