use super::*;
use crate::lb::backend_key;
use agent_common::lb::min_maglev_size as min_table_size;

const M: u32 = 65537;

/// Backend keys as the agent makes them: hashes of addresses 10.0.x.y:8080.
fn keys(n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let addr = format!("10.0.{}.{}:8080", i / 250, i % 250 + 1);
            backend_key(&addr.parse().unwrap())
        })
        .collect()
}

fn with_weights(keys: &[u64], weights: &[u32]) -> Vec<(u64, u32)> {
    keys.iter().copied().zip(weights.iter().copied()).collect()
}

/// Weights 1 to 1000 from a fixed seed.
fn mixed_weights(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.u32(1..=1000)).collect()
}

fn counts(table: &[u32], backends: usize) -> Vec<u64> {
    let mut c = vec![0u64; backends];
    for &e in table {
        c[e as usize] += 1;
    }
    c
}

fn moved(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

/// Every backend's share of the table is its share of the total weight, within 1% of the table
/// (the bound) and in fact within a few entries (one turn per entry).
fn assert_shares(backends: &[(u64, u32)], size: u32) {
    let table = build(backends, size);
    assert_eq!(table.len(), size as usize);
    assert!(
        table.iter().all(|&e| e != NO_BACKEND),
        "a full table when some weight > 0"
    );
    let total: u64 = backends.iter().map(|b| u64::from(b.1)).sum();
    let c = counts(&table, backends.len());
    for (i, &(_, w)) in backends.iter().enumerate() {
        let want = f64::from(size) * f64::from(w) / total as f64;
        let off = (c[i] as f64 - want).abs();
        assert!(
            off <= f64::from(size) * 0.01,
            "{} backends, table {size}: backend {i} (weight {w}) has {} entries, want {want:.1} \
             +-1% of the table",
            backends.len(),
            c[i]
        );
        assert!(
            off <= 3.0,
            "{} backends, table {size}: backend {i} (weight {w}) has {} entries, want {want:.1} \
             within 3 entries",
            backends.len(),
            c[i]
        );
    }
}

#[test]
fn shares_follow_weights() {
    for n in [1, 3, 10, 100] {
        let k = keys(n);
        assert_shares(&with_weights(&k, &vec![100; n]), M);
        assert_shares(&with_weights(&k, &mixed_weights(n, n as u64)), M);
        let smallest = min_table_size(n).unwrap();
        assert_shares(&with_weights(&k, &mixed_weights(n, 7)), smallest);
    }
    // Extremes of the weight range side by side.
    let k = keys(3);
    assert_shares(&with_weights(&k, &[1, 1000, 500]), M);
    assert_shares(&with_weights(&k, &[u32::MAX, 1, u32::MAX / 3]), M);
}

/// Entries that move when backend `changed` goes from `weights[changed]` to `new`, beyond the
/// change of its own share (for `new` 0: entries of other backends that move), as a fraction
/// of the table.
fn extra_moved(keys: &[u64], weights: &[u32], changed: usize, new: u32, size: u32) -> f64 {
    let n = keys.len();
    let before = build(&with_weights(keys, weights), size);
    let mut after_w = weights.to_vec();
    after_w[changed] = new;
    let after = build(&with_weights(keys, &after_w), size);
    if new == 0 {
        assert!(
            !after.contains(&(changed as u32)),
            "a drained backend has no entries"
        );
    }
    let own = counts(&before, n)[changed].abs_diff(counts(&after, n)[changed]) as usize;
    (moved(&before, &after) - own) as f64 / f64::from(size)
}

/// Changes of one backend's weight, drains among them, for `n` backends.
fn changes(n: usize, seed: u64) -> Vec<(Vec<u32>, usize, u32)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = vec![(vec![100; n], n / 3, 0), (vec![100; n], 0, 1000)];
    for _ in 0..4 {
        let weights = mixed_weights(n, rng.u64(..));
        let changed = rng.usize(..n);
        out.push((weights.clone(), changed, rng.u32(1..=1000)));
        out.push((weights, changed, 0));
    }
    out
}

#[test]
fn one_change_or_drain_moves_little_beyond_its_share() {
    // Changing one backend's weight moves its share change plus at most 2% of the table;
    // draining one (weight 0) moves its entries plus at most 2% (about 1% at most, measured).
    for n in [3, 10, 100] {
        let k = keys(n);
        for (weights, changed, new) in changes(n, n as u64) {
            let extra = extra_moved(&k, &weights, changed, new, M);
            assert!(
                extra <= 0.02,
                "{n} backends, table {M}: backend {changed} {} -> {new} moved {:.2}% of the \
                 table beyond its own share, want <= 2%",
                weights[changed],
                extra * 100.0
            );
        }
    }
}

#[test]
fn smallest_tables_disrupt_a_little_more() {
    // At 100 x backends (the least the validator accepts) Maglev itself moves up to about 3.5%
    // of the table beyond the change's share, with equal weights as with unequal ones: the
    // price of a small table.
    for n in [3, 10, 100] {
        let k = keys(n);
        let size = min_table_size(n).unwrap();
        for (weights, changed, new) in changes(n, n as u64) {
            let extra = extra_moved(&k, &weights, changed, new, size);
            assert!(
                extra <= 0.05,
                "{n} backends, table {size}: backend {changed} {} -> {new} moved {:.2}% of the \
                 table beyond its own share, want <= 5%",
                weights[changed],
                extra * 100.0
            );
        }
    }
}

#[test]
fn weight_zero_gets_nothing() {
    let k = keys(10);
    let weights = [0, 100, 0, 1, 1000, 0, 5, 0, 0, 100];
    let table = build(&with_weights(&k, &weights), M);
    let c = counts(&table, 10);
    for (i, &w) in weights.iter().enumerate() {
        assert_eq!(
            c[i] == 0,
            w == 0,
            "backend {i} of weight {w} has {} entries",
            c[i]
        );
    }
}

#[test]
fn no_weight_no_backend() {
    let k = keys(5);
    let table = build(&with_weights(&k, &[0; 5]), M);
    assert!(
        table.iter().all(|&e| e == NO_BACKEND),
        "all weights 0: every entry NO_BACKEND"
    );
    assert_eq!(table.len(), M as usize);
    assert_eq!(build(&[], 13), vec![NO_BACKEND; 13], "no backends");
    assert!(
        build(&with_weights(&k, &[1; 5]), 0).is_empty(),
        "table_size 0"
    );
}

#[test]
fn deterministic_and_frozen() {
    let k = keys(100);
    let b = with_weights(&k, &mixed_weights(100, 5));
    assert_eq!(build(&b, M), build(&b, M), "same input, same table");
    // A small table pinned down: a change here moves flows on every node at upgrade.
    let small = build(&[(1, 1), (2, 2), (3, 3)], 13);
    assert_eq!(
        small, FROZEN_SMALL,
        "the table of keys 1,2,3 weights 1,2,3, size 13"
    );
}

const FROZEN_SMALL: [u32; 13] = [2, 1, 0, 2, 1, 2, 1, 2, 2, 1, 2, 2, 0];

#[test]
fn order_of_backends_does_not_matter() {
    let k = keys(20);
    let b = with_weights(&k, &mixed_weights(20, 9));
    let by_key = |table: &[u32], b: &[(u64, u32)]| -> Vec<u64> {
        table.iter().map(|&e| b[e as usize].0).collect()
    };
    let mut reversed = b.clone();
    reversed.reverse();
    assert_eq!(
        by_key(&build(&b, M), &b),
        by_key(&build(&reversed, M), &reversed)
    );
    // Removing a backend from the list is the same as draining it.
    let mut drained = b.clone();
    drained[4].1 = 0;
    let mut removed = b.clone();
    removed.remove(4);
    assert_eq!(
        by_key(&build(&drained, M), &drained),
        by_key(&build(&removed, M), &removed)
    );
}

/// The paper's pseudocode 1 (`Populate`), literally: one turn each per round, here in the
/// order of keys.
fn paper(keys: &[u64], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| keys[i]);
    let perms: Vec<(u64, u64)> = keys.iter().map(|&k| permutation(k, m)).collect();
    let mut next = vec![0u64; keys.len()];
    let mut entry = vec![NO_BACKEND; size as usize];
    let mut n = 0;
    loop {
        for &i in &order {
            let mut c = (perms[i].0 + next[i] * perms[i].1) % m;
            while entry[c as usize] != NO_BACKEND {
                next[i] += 1;
                c = (perms[i].0 + next[i] * perms[i].1) % m;
            }
            entry[c as usize] = i as u32;
            next[i] += 1;
            n += 1;
            if n == size {
                return entry;
            }
        }
    }
}

#[test]
fn equal_weights_are_the_papers_algorithm() {
    for (n, size) in [(3, 13), (10, 1009), (100, M)] {
        let k = keys(n);
        for w in [1, 100, 1000] {
            assert_eq!(build(&with_weights(&k, &vec![w; n]), size), paper(&k, size));
        }
    }
}

#[test]
fn sizes_that_are_not_prime_still_fill() {
    let k = keys(3);
    for size in [1, 2, 4, 100, 1000, 65536] {
        let table = build(&with_weights(&k, &[1, 2, 3]), size);
        assert!(table.iter().all(|&e| e < 3), "table {size} is full");
    }
}

/// The turn order without the shortcut of its period: the earliest due turn by a scan of every
/// backend, each turn; the same walk of preference lists.
fn unrolled(backends: &[(u64, u32)], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    let mut state: Vec<(usize, u64, u64, u64)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.1 > 0)
        .map(|(i, b)| {
            let (offset, skip) = permutation(b.0, m);
            (i, offset, skip, 0)
        })
        .collect();
    let mut table = vec![NO_BACKEND; size as usize];
    for _ in 0..size {
        let due = |&(i, _, _, taken): &(usize, u64, u64, u64)| {
            (u128::from(2 * taken + 1), backends[i].1, backends[i].0, i)
        };
        let first = (0..state.len())
            .min_by(|&a, &b| {
                let (ta, wa, ka, ia) = due(&state[a]);
                let (tb, wb, kb, ib) = due(&state[b]);
                (ta * u128::from(wb))
                    .cmp(&(tb * u128::from(wa)))
                    .then(ka.cmp(&kb))
                    .then(ia.cmp(&ib))
            })
            .unwrap();
        let (i, next, skip, taken) = &mut state[first];
        while table[*next as usize] != NO_BACKEND {
            *next = (*next + *skip) % m;
        }
        table[*next as usize] = *i as u32;
        *next = (*next + *skip) % m;
        *taken += 1;
    }
    table
}

#[test]
fn the_period_shortcut_changes_nothing() {
    let k = keys(30);
    let cases: [(&[u32], u32); 5] = [
        (&[100, 100, 37], 1009),           // period 237, repeated
        (&[300, 600, 900, 0, 1200], 1009), // period 10
        (&[1, 1000, 999], 1009),           // period 2000, cut at the table
        (&[7; 30], 10_007),
        (&[1000, 999, 998, 997, 996, 995, 1, 2, 3], 10_007),
    ];
    for (weights, size) in cases {
        let b = with_weights(&k, weights);
        assert_eq!(
            build(&b, size),
            unrolled(&b, size),
            "weights {weights:?}, size {size}"
        );
    }
    let b = with_weights(&k, &mixed_weights(30, 4));
    assert_eq!(build(&b, 10_007), unrolled(&b, 10_007), "mixed weights");
}
