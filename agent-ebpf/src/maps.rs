//! Map definitions. Names come from `agent_common::maps` (the symbol name is the map name).
//! Sizes here are defaults: the loader sets the node-wide tables from the policy's
//! `agent.tables` (`agent_common::tables::TableSizes`), and the key and departure tables from
//! the services' `max_keys` (`EbpfLoader::map_max_entries`).

use crate::parse::Parsed;
use agent_common::lb::{
    LB_TABLE_FLAGS, LBSTAT_SLOTS, LbBackend, LbConn, LbReverse, LbService, LbTableSlot,
};
use agent_common::{
    Bucket, BucketKey, Counter, MatchList, ServiceConfig,
    breaker::{
        AdmittedFlow, BSTAT_SLOTS, BackendKey, BackendState, FlowKey, MAX_TRACKED_FLOWS,
        PORT_BITMAP_WORDS, PendingSyn,
    },
    classify::{ADDR_LEN, CLASSIFY_KEY_LEN, GENERATIONS, ServiceName},
    maps::{
        DEFAULT_BACKENDS as MAX_BACKENDS, DEFAULT_CONNECTIONS, DEFAULT_MAX_KEYS,
        DEFAULT_SERVICES as MAX_SERVICES, classify_entries,
    },
    shape::{DEFAULT_SHAPE_KEYS, Departure, ShapeDelay},
    stats::{GSTAT_SLOTS, SVC_STAT_SLOTS},
};
use aya_ebpf::{
    btf_maps::{self, ArrayOfMaps},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};

/// The generation of the policy the datapath reads (`agent_common::classify::GENERATIONS`).
#[map]
pub static POLICY_GEN: Array<u32> = Array::with_max_entries(1, 0);

#[map]
pub static CLASSIFY: LpmTrie<[u8; CLASSIFY_KEY_LEN], MatchList> =
    LpmTrie::with_max_entries(classify_entries(MAX_SERVICES), 0);

#[map]
pub static SVC_CFG: Array<ServiceConfig> = Array::with_max_entries(MAX_SERVICES * GENERATIONS, 0);

/// Degradation mode per service id (`agent_common::degrade`).
#[map]
pub static DEGRADE: Array<u32> = Array::with_max_entries(MAX_SERVICES, 0);

/// Which service holds each id; for the agent only (`agent_common::classify::ServiceName`).
#[map]
pub static SVC_NAMES: Array<ServiceName> = Array::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static RL_BUCKETS: LruHashMap<BucketKey, Bucket> =
    LruHashMap::with_max_entries(DEFAULT_MAX_KEYS, 0);

/// Next departure time per shaping key; the loader sizes it from `shaping.max_keys`.
#[map]
pub static SHAPE_NEXT: LruHashMap<BucketKey, Departure> =
    LruHashMap::with_max_entries(DEFAULT_SHAPE_KEYS, 0);

#[map]
pub static SHAPE_DELAY: PerCpuArray<ShapeDelay> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

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
pub static REPLY_SCRATCH: PerCpuArray<[u8; 12 + REPLY_SCRATCH_LEN]> =
    PerCpuArray::with_max_entries(1, 0);

/// Bytes of `REPLY_SCRATCH`: the longest answer (an ICMPv6 unreachable).
pub const REPLY_SCRATCH_LEN: usize = agent_common::reply::UNREACH_V6_LEN;

#[map]
pub static LB_SVC: Array<LbService> = Array::with_max_entries(MAX_SERVICES * GENERATIONS, 0);

/// The lookup table of one balanced service (Maglev table or round-robin schedule), laid out
/// as `agent_common::lb::LbTableSlot` says. The agent creates one of the exact size per
/// publish (`BPF_F_INNER_MAP`: sizes may differ) and swaps it in `LB_TABLES` with one write,
/// so the datapath reads a whole table, old or new, never a mix.
pub type LbTable = btf_maps::Array<LbTableSlot, 1, { LB_TABLE_FLAGS as usize }>;

/// Indexed by `generation_slot(service id, generation)`: each balanced service's [`LbTable`]
/// (empty for `least_conn`).
#[btf_map]
pub static LB_TABLES: ArrayOfMaps<LbTable, { (MAX_SERVICES * GENERATIONS) as usize }> =
    ArrayOfMaps::new();

#[map]
pub static LB_BACKENDS: Array<LbBackend> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static LB_ACTIVE_CONNS: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static LB_STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(MAX_BACKENDS * LBSTAT_SLOTS, 0);

/// Each CPU's position in each weighted-round-robin schedule: per CPU, so no atomics; each
/// CPU walks the whole schedule, so the shares stay exact to within a cycle per CPU.
#[map]
pub static LB_RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static LB_CONNS: LruHashMap<FlowKey, LbConn> =
    LruHashMap::with_max_entries(DEFAULT_CONNECTIONS, 0);

#[map]
pub static LB_REVERSE: LruHashMap<FlowKey, LbReverse> =
    LruHashMap::with_max_entries(DEFAULT_CONNECTIONS, 0);

/// The balancing and reverse-NAT stages of XDP, and of TC (`STAGE_*` slots).
#[map]
pub static STAGES_XDP: ProgramArray = ProgramArray::with_max_entries(3, 0);
#[map]
pub static STAGES_TC: ProgramArray = ProgramArray::with_max_entries(3, 0);

/// What one stage hands the next one it tail-calls (same CPU, no preemption in between): the
/// main program to the balancing stage, the service and the parsed frame; the balancing stage
/// or the main program to the NAT stage, the rewrite (and the main program the parsed frame,
/// which no stage changes before the NAT stage rewrites it).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Handover {
    /// The frame as the main program parsed it: the stages do not parse it again.
    pub parsed: Parsed,
    pub service_id: u32,
    /// `generation_slot(service_id, generation)` of the generation the main program read:
    /// the stage reads the same policy.
    pub slot: u32,
    /// `nat::Side` as `SIDE_*`.
    pub side: u32,
    pub addr: [u8; ADDR_LEN],
    pub port: u16,
    /// The client port the NAT stage puts on the packet's client side
    /// (`agent_common::ports`): the backend's view for a DNAT, the client's own for a reply;
    /// the packet's own port or `NO_NAT_PORT` leave it as it is.
    pub client_port: u16,
    /// For the answer stage: the backend whose counters count the answer (`NO_BACKEND_ID`:
    /// none, the service had no backend for the flow) and the `BSTAT_*` slot.
    pub answer_id: u32,
    pub answer_slot: u32,
    /// For reverse NAT: the LB index of the backend the reply comes from.
    pub backend: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<Handover>() == 64 + 48);

/// `Handover::answer_id` when no backend's counters apply.
pub const NO_BACKEND_ID: u32 = u32::MAX;

pub const SIDE_DST: u32 = 0;
pub const SIDE_SRC: u32 = 1;

/// Scratch space of `ports::held` (the forward key of a flow holding a backend 4-tuple): its
/// frame is the last of the balancing stage's deepest call chain.
#[map]
pub static PORT_HOLDER_KEY: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static LB_HANDOVER: PerCpuArray<Handover> = PerCpuArray::with_max_entries(1, 0);

/// The best backend so far while `least_conn` scans a service's backends. Kept in memory,
/// not registers: the verifier does not track memory contents, so the scan's paths merge at
/// every step instead of multiplying (in registers, 16 backends exceeded its 1M-instruction
/// budget).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct LeastConnBest {
    pub backend: u32,
    pub _pad: u32,
    pub conns: u64,
    pub weight: u64,
}

#[map]
pub static LEAST_CONN_BEST: PerCpuArray<LeastConnBest> = PerCpuArray::with_max_entries(1, 0);
