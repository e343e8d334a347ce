//! Smooth weighted round robin (nginx's, 2012), unrolled into a schedule: the datapath keeps
//! one atomic counter per service and sends new flow `c` to `schedule[c % len]`.
//!
//! Each pick adds every backend's weight to its `current`, takes the backend with the largest
//! `current` (the first on a tie) and takes the total weight off it. Over one cycle of
//! `sum(weights)` picks every backend is picked exactly `weight` times, spread out rather
//! than in runs: weights 5, 1, 1 give `a a b a c a a`, equal weights a plain rotation.

use thiserror::Error;

pub use agent_common::lb::WRR_MAX_LEN as DEFAULT_MAX_LEN;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WrrError {
    #[error(
        "{backends} backends of non-zero weight do not fit a schedule of {max_len} entries: \
         each needs at least one"
    )]
    TooManyBackends { backends: usize, max_len: u32 },
}

/// The schedule of one cycle over backends of the given (effective) weights; entries are
/// indices into `weights`.
///
/// The cycle is as short as exact proportions allow: weights are divided by their greatest
/// common divisor, so the length is the sum of the reduced weights. When that exceeds `max_len`
/// the weights are scaled down to fit: each backend of non-zero weight keeps at least one
/// entry, and its share of the schedule is off its weight share by less than about
/// `backends / max_len` (0.15% for 100 backends in [`DEFAULT_MAX_LEN`]).
///
/// A backend of weight 0 never appears. When every weight is 0 (or there are no backends)
/// the schedule is **empty**: no backend may take new flows, and the datapath passes or
/// refuses them.
///
/// Cost: `len x backends` steps (at most `max_len x backends`).
pub fn build(weights: &[u32], max_len: u32) -> Result<Vec<u32>, WrrError> {
    let live = weights.iter().filter(|&&w| w > 0).count();
    if live == 0 {
        return Ok(Vec::new());
    }
    if live > max_len as usize {
        return Err(WrrError::TooManyBackends {
            backends: live,
            max_len,
        });
    }
    let weights = fit(weights, max_len);
    let total: u64 = weights.iter().sum();
    let total_signed = i64::try_from(total).expect("total <= max_len");
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total_signed;
        schedule.push(best as u32);
    }
    Ok(schedule)
}

/// Weights reduced by their greatest common divisor, scaled down to sum to at most `max_len`
/// if they still do not: `1 + floor(w x (max_len - live) / total)` for each non-zero `w`.
/// Needs `1 <= live <= max_len`.
fn fit(weights: &[u32], max_len: u32) -> Vec<u64> {
    let g = weights.iter().fold(0u64, |g, &w| gcd(g, u64::from(w)));
    let mut fitted: Vec<u64> = weights.iter().map(|&w| u64::from(w) / g).collect();
    let total: u64 = fitted.iter().sum();
    if total > u64::from(max_len) {
        let live = fitted.iter().filter(|&&w| w > 0).count() as u128;
        let room = u128::from(max_len) - live;
        for w in fitted.iter_mut().filter(|w| **w > 0) {
            *w = 1 + u64::try_from(u128::from(*w) * room / u128::from(total)).expect("<= room");
        }
        let g = fitted.iter().fold(0, |g, &w| gcd(g, w));
        fitted.iter_mut().for_each(|w| *w /= g);
    }
    fitted
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(schedule: &[u32], backends: usize) -> Vec<u64> {
        let mut c = vec![0u64; backends];
        for &e in schedule {
            c[e as usize] += 1;
        }
        c
    }

    /// Longest run of one backend, counted around the cycle (the counter wraps).
    fn longest_run(schedule: &[u32]) -> usize {
        let twice: Vec<u32> = schedule.iter().chain(schedule).copied().collect();
        twice
            .chunk_by(|a, b| a == b)
            .map(<[u32]>::len)
            .max()
            .unwrap_or(0)
            .min(schedule.len())
    }

    #[test]
    fn nginx_example() {
        let s = build(&[5, 1, 1], DEFAULT_MAX_LEN).unwrap();
        assert_eq!(
            s,
            [0, 0, 1, 0, 2, 0, 0],
            "nginx's {{a:5, b:1, c:1}} -> a a b a c a a"
        );
    }

    #[test]
    fn exact_proportions_over_one_cycle() {
        let mut rng = fastrand::Rng::with_seed(1);
        for n in [1, 2, 3, 10, 50] {
            for _ in 0..20 {
                let weights: Vec<u32> = (0..n).map(|_| rng.u32(0..=1000)).collect();
                let s = build(&weights, 1 << 20).unwrap();
                let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
                let g = weights.iter().fold(0, |g, &w| gcd(g, u64::from(w)));
                assert_eq!(s.len() as u64, total.checked_div(g).unwrap_or(0));
                let c = counts(&s, n);
                for (i, &w) in weights.iter().enumerate() {
                    assert_eq!(
                        c[i],
                        u64::from(w).checked_div(g).unwrap_or(0),
                        "weights {weights:?}: backend {i} has {} of {} entries",
                        c[i],
                        s.len()
                    );
                }
            }
        }
    }

    #[test]
    fn reduced_by_common_divisor() {
        assert_eq!(build(&[100, 200, 300], DEFAULT_MAX_LEN).unwrap().len(), 6);
        assert_eq!(build(&[1000; 4], DEFAULT_MAX_LEN).unwrap(), [0, 1, 2, 3]);
    }

    #[test]
    fn equal_weights_interleave() {
        for n in [2, 3, 7, 100] {
            let s = build(&vec![250; n], DEFAULT_MAX_LEN).unwrap();
            assert_eq!(s, (0..n as u32).collect::<Vec<_>>(), "a plain rotation");
            assert_eq!(longest_run(&s), 1);
        }
    }

    #[test]
    fn unequal_weights_are_spread() {
        // Around the cycle (the counter wraps): no backend waits twice its ideal interval
        // (cycle / its entries) for its next pick; only the heaviest ever comes twice in a row,
        // and then at most twice as many times as an even spread needs (its entries over the
        // others', rounded up).
        let mut rng = fastrand::Rng::with_seed(2);
        for _ in 0..300 {
            let n = rng.usize(2..12);
            let weights: Vec<u32> = (0..n).map(|_| rng.u32(1..=1000)).collect();
            let s = build(&weights, DEFAULT_MAX_LEN).unwrap();
            let twice: Vec<u32> = s.iter().chain(&s).copied().collect();
            let c = counts(&s, n);
            let heaviest = (0..n).max_by_key(|&i| c[i]).unwrap();
            let others = s.len() as u64 - c[heaviest];
            for (i, &entries) in c.iter().enumerate() {
                let at: Vec<usize> = (0..twice.len()).filter(|&k| twice[k] == i as u32).collect();
                let worst_gap = at.windows(2).map(|w| w[1] - w[0]).max().unwrap();
                let ideal = s.len() as f64 / entries as f64;
                assert!(
                    (worst_gap as f64) < 2.0 * ideal,
                    "weights {weights:?}: backend {i} waits {worst_gap} picks, ideal {ideal:.1}"
                );
                let run = twice
                    .chunk_by(|a, b| a == b)
                    .filter(|r| r[0] == i as u32)
                    .map(<[u32]>::len)
                    .max()
                    .unwrap() as u64;
                let allowed = if i == heaviest {
                    2 * entries.div_ceil(others)
                } else {
                    1
                };
                assert!(
                    run <= allowed,
                    "weights {weights:?}: backend {i} runs {run} in a row, want <= {allowed}"
                );
            }
        }
    }

    #[test]
    fn weight_zero_is_absent() {
        let s = build(&[0, 3, 0, 1, 0], DEFAULT_MAX_LEN).unwrap();
        assert_eq!(s, [1, 1, 3, 1]);
        assert!(
            build(&[0, 0, 0], DEFAULT_MAX_LEN).unwrap().is_empty(),
            "all 0: empty"
        );
        assert!(
            build(&[], DEFAULT_MAX_LEN).unwrap().is_empty(),
            "no backends: empty"
        );
    }

    #[test]
    fn capped_schedules_stay_close() {
        let mut rng = fastrand::Rng::with_seed(3);
        let weights: Vec<u32> = (0..500).map(|_| rng.u32(0..=1000)).collect();
        let max_len = 4096;
        let s = build(&weights, max_len).unwrap();
        assert!(
            s.len() <= max_len as usize,
            "{} entries, cap {max_len}",
            s.len()
        );
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let live = weights.iter().filter(|&&w| w > 0).count() as f64;
        let bound = live / f64::from(max_len) + 1.0 / (f64::from(max_len) - live);
        let c = counts(&s, weights.len());
        for (i, &w) in weights.iter().enumerate() {
            assert_eq!(
                c[i] == 0,
                w == 0,
                "backend {i} of weight {w}: {} entries",
                c[i]
            );
            let off = c[i] as f64 / s.len() as f64 - f64::from(w) / total as f64;
            assert!(
                off.abs() <= bound,
                "backend {i} of weight {w}: {} of {} entries, share off by {off:.5}, want <= \
                 {bound:.5}",
                c[i],
                s.len()
            );
        }
        assert_eq!(
            build(&[1; 10], 9),
            Err(WrrError::TooManyBackends {
                backends: 10,
                max_len: 9
            })
        );
        assert_eq!(
            build(&[1, 0, 1000], 2).unwrap(),
            [0, 2],
            "capped to one entry each"
        );
    }
}
