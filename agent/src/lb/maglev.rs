//! Weighted Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI'16, section 3.4).
//!
//! Every backend has a preference list over the table, a permutation given by an `offset` and
//! a `skip` drawn from two hashes of its stable key; backends take turns, and on its turn a
//! backend claims the next still-free entry of its list, until the table is full. The paper
//! gives every backend one turn per round; with weights, a backend's turns come in proportion
//! to its weight: turn `k` (from 0) of a backend of weight `w` falls at virtual time
//! `(2k + 1) / w`, earliest first (the Sainte-Laguë sequence; ties go to the smaller key, then
//! the smaller index). Since every turn claims exactly one entry, a backend's share of the table
//! is its weight share to within a couple of entries, and changing one backend's weight only
//! changes where its own turns fall among the others', whose order stays as it was. With equal
//! weights this is the paper's algorithm, backends taken in the order of their keys.
//!
//! Tables depend only on the set of `(key, weight)` pairs (up to the indices they hold) and on
//! the table size: the same on every node, across restarts and agent upgrades.
//!
//! Measured over 3 to 1,000 backends of weights 1 to 1,000 (see the tests): every backend's
//! entries are within one of its exact share. Changing or draining one backend moves, beyond
//! that backend's own change of share, at most about 1% of a 65,537-entry table, but up to
//! about 3.5% of the smallest table the policy accepts (100 x backends), as unweighted Maglev
//! does at that size.

use std::{cmp::Ordering, collections::BinaryHeap};

use super::{NO_BACKEND, hash::siphash24};

/// Keys of the two hashes of a backend's key: its permutation's start and its stride.
const KEY_OFFSET: [u8; 16] = *b"agent/maglev/off";
const KEY_SKIP: [u8; 16] = *b"agent/maglev/skp";

/// The Maglev lookup table for `backends`, given as `(stable key, weight)` (the key from
/// [`super::backend_key`], the weight from [`super::weight::effective`]).
///
/// Entry `i` is the index in `backends` of the backend that flows hashing to `i` go to. A
/// backend of weight 0 gets no entry. When every weight is 0 (or `backends` is empty) every
/// entry is [`NO_BACKEND`]: no backend may take new flows, and the datapath passes or refuses
/// them. A `table_size` of 0 gives an empty table.
///
/// `table_size` should be a prime at least 100 x the backends (the policy validator insists):
/// a prime makes every `skip` a full-cycle stride; 100 x keeps every backend within about 1% of
/// its share. Any other size still works (a `skip` that shares a factor with it is moved to the
/// next one that does not), with a less even spread.
///
/// Cost: the walks of the preference lists, about `table_size x ln(table_size)` steps in all,
/// plus one heap operation per turn of one period of the turn order (which repeats every
/// `sum(weights) / gcd(weights)` turns: just `backends` turns for equal weights).
///
/// # Panics
/// With `u32::MAX` backends or more: indices must stay below [`NO_BACKEND`].
pub fn build(backends: &[(u64, u32)], table_size: u32) -> Vec<u32> {
    assert!(
        backends.len() < NO_BACKEND as usize,
        "{} backends: indices must stay below NO_BACKEND",
        backends.len()
    );
    let size = u64::from(table_size);
    let mut table = vec![NO_BACKEND; table_size as usize];
    // The backends that take turns, in input order: their index, next entry to try, stride.
    let mut live: Vec<(u32, u64, u64)> = Vec::new();
    let mut weights: Vec<(u64, u32)> = Vec::new();
    for (index, &(key, weight)) in backends.iter().enumerate() {
        if weight > 0 {
            let (offset, skip) = permutation(key, size);
            live.push((index as u32, offset, skip));
            weights.push((key, weight));
        }
    }
    if size == 0 || live.is_empty() {
        return table;
    }
    let order = turn_order(&weights, size);
    for turn in order.iter().cycle().take(table_size as usize) {
        let (index, next, skip) = &mut live[*turn as usize];
        // The permutation visits every entry once per cycle (skip is coprime with the size)
        // and the table has a free entry, so this ends within `table_size` steps.
        loop {
            let at = *next as usize;
            // `next + skip < 2 x size`: a subtraction, not a division, in this hot loop.
            *next += *skip;
            if *next >= size {
                *next -= size;
            }
            if table[at] == NO_BACKEND {
                table[at] = *index;
                break;
            }
        }
    }
    table
}

/// Who takes each turn, as positions in `weights` (all non-zero), for one period of the turn
/// order or `max` turns if fewer.
///
/// Turn `k` of a backend of weight `w` is due at `(2k + 1) / w`. After `w / g` turns of every
/// backend (`g` the weights' greatest common divisor) every due time has moved by `2 / g`, so
/// the order from there on repeats the first `sum(w / g)` turns.
fn turn_order(weights: &[(u64, u32)], max: u64) -> Vec<u32> {
    let g = weights.iter().fold(0, |g, &(_, w)| gcd(g, u64::from(w)));
    let period: u64 = weights.iter().map(|&(_, w)| u64::from(w) / g).sum();
    let turns = period.min(max);
    let mut heap: BinaryHeap<Turn> = weights
        .iter()
        .enumerate()
        .map(|(slot, &(key, weight))| Turn {
            taken: 0,
            weight,
            key,
            slot: slot as u32,
        })
        .collect();
    let mut order = Vec::with_capacity(turns as usize);
    for _ in 0..turns {
        // Updated in place: one sift down when it drops, instead of a pop and a push.
        let mut next = heap.peek_mut().expect("weights is not empty");
        order.push(next.slot);
        next.taken += 1;
    }
    order
}

/// Start and stride of a backend's preference list over a table of `size` entries: the
/// paper's `offset = h1(key) mod M`, `skip = h2(key) mod (M - 1) + 1`, the key hashed as its
/// 8 little-endian bytes.
fn permutation(key: u64, size: u64) -> (u64, u64) {
    if size <= 1 {
        return (0, 1);
    }
    let bytes = key.to_le_bytes();
    let offset = siphash24(&KEY_OFFSET, &bytes) % size;
    let mut skip = siphash24(&KEY_SKIP, &bytes) % (size - 1) + 1;
    // Always true for a prime size; otherwise walk to a stride that still covers the table.
    while gcd(skip, size) != 1 {
        skip = skip % (size - 1) + 1;
    }
    (offset, skip)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A backend waiting for its next turn, in the order turns are taken.
#[derive(Debug)]
struct Turn {
    /// Turns taken so far.
    taken: u64,
    weight: u32,
    key: u64,
    /// Position among the backends that take turns (their order in the input).
    slot: u32,
}

impl Turn {
    /// Virtual time of the next turn is `(2 taken + 1) / weight`; compared by cross-multiplying,
    /// exact (at most 2^33 x 2^32 fits `u128`).
    fn due(&self, other: &Turn) -> Ordering {
        let mine = u128::from(2 * self.taken + 1) * u128::from(other.weight);
        let theirs = u128::from(2 * other.taken + 1) * u128::from(self.weight);
        mine.cmp(&theirs)
            .then(self.key.cmp(&other.key))
            .then(self.slot.cmp(&other.slot))
    }
}

// `BinaryHeap` pops the greatest: the greatest `Turn` is the one due first.
impl Ord for Turn {
    fn cmp(&self, other: &Turn) -> Ordering {
        other.due(self)
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Turn) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Turn) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Turn {}

#[cfg(test)]
mod tests;
