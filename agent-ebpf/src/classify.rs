//! Which service a packet belongs to: one longest-prefix lookup on the destination, under the
//! policy generation the agent switched to last, then the first rule of that prefix's list
//! that accepts the protocol and port (`agent_common::MatchList::find`, where the order is
//! documented and tested).

use agent_common::{
    MatchList,
    classify::{ADDR_LEN, GEN_PREFIX_BITS, classify_key, generation_slot},
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{
    maps::{CLASSIFY, POLICY_GEN},
    parse::Parsed,
};

/// Full key length in bits: the generation byte and the packet's whole address.
const KEY_BITS: u32 = GEN_PREFIX_BITS + (ADDR_LEN as u32) * 8;

/// A packet's service under one policy generation.
#[derive(Clone, Copy)]
pub struct Service {
    /// Its counters, token buckets and round-robin position.
    pub id: u32,
    /// Its entries of this generation (`SVC_CFG`, `LB_SVC`, `LB_TABLES`).
    pub slot: u32,
}

#[inline(always)]
pub fn classify(p: &Parsed) -> Option<Service> {
    // One read of the generation per packet: every later lookup of this packet (here and in
    // the stages it tail-calls, through the hand-over) is of the same policy.
    let generation = generation();
    let id = rules(generation, &p.dst)?.find(p.proto, p.dport())?;
    Some(Service {
        id,
        slot: generation_slot(id, generation),
    })
}

/// The policy generation the datapath reads. No entry (the map cannot be empty, an array)
/// reads as generation 0.
#[inline(always)]
pub fn generation() -> u32 {
    POLICY_GEN.get(0).copied().unwrap_or(0) & 1
}

/// The rules of destination `addr` under `generation`, most specific first.
#[inline(always)]
pub fn rules(generation: u32, addr: &[u8; ADDR_LEN]) -> Option<&'static MatchList> {
    let key = Key::new(KEY_BITS, classify_key(generation, addr));
    CLASSIFY.get(&key)
}
