//! Which service a packet belongs to: one longest-prefix lookup on the destination, then the
//! first rule of that prefix's list that accepts the protocol and port
//! (`agent_common::MatchList::find`, where the order is documented and tested).

use agent_common::classify::ADDR_LEN;
use aya_ebpf::maps::lpm_trie::Key;

use crate::{maps::CLASSIFY, parse::Parsed};

/// Full address length in bits: the lookup key is the packet's whole address.
const KEY_BITS: u32 = (ADDR_LEN as u32) * 8;

#[inline(always)]
pub fn classify(p: &Parsed) -> Option<u32> {
    let key = Key::new(KEY_BITS, p.dst);
    CLASSIFY.get(&key)?.find(p.proto, p.dport())
}
