//! Many backends on few threads: the scheduler keeps every backend's interval.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::servers::TcpServer;
use super::*;
use crate::config::HealthCheck;

/// Starts `n` listeners, probes each every `interval` for `measure` after a warm-up, and
/// returns the probe count of every backend in the measured span and the expected count.
async fn probe_counts(n: usize, interval: Duration, measure: Duration) -> (Vec<usize>, usize) {
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        servers.push(TcpServer::start(false).await);
    }
    let check = HealthCheck {
        interval,
        unhealthy_interval: interval,
        timeout: interval / 2,
        ..HealthCheck::default()
    };
    let (tx, mut rx) = mpsc::channel(4096);
    let mut checker = Checker::new(tx, ProbeOptions::default());
    for (index, s) in servers.iter().enumerate() {
        let backend = BackendRef {
            service: "scale".into(),
            service_id: 0,
            index,
            address: s.addr,
        };
        checker.add(backend, &check).unwrap();
    }
    // First probes spread over the first interval; measure from the second one on.
    let from = Instant::now() + interval * 3 / 2;
    let to = from + measure;
    let mut counts = vec![0usize; n];
    let mut failures = Vec::new();
    while let Ok(Some(r)) = tokio::time::timeout_at((to + interval).into(), rx.recv()).await {
        if (from..to).contains(&r.at) {
            counts[r.backend.index] += 1;
        }
        if !r.is_success() {
            failures.push(r);
        }
    }
    assert!(
        failures.is_empty(),
        "{} probes failed, first {:?}",
        failures.len(),
        failures.first()
    );
    let expected = (measure.as_nanos() / interval.as_nanos()) as usize;
    (counts, expected)
}

fn summary(counts: &[usize]) -> (usize, usize, f64) {
    let min = *counts.iter().min().unwrap();
    let max = *counts.iter().max().unwrap();
    let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
    (min, max, mean)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_backends_at_100ms_keep_their_interval() {
    let (counts, expected) =
        probe_counts(500, Duration::from_millis(100), Duration::from_secs(2)).await;
    let (min, max, mean) = summary(&counts);
    eprintln!("500 backends, expected {expected} probes each: min {min} max {max} mean {mean:.2}");
    // The grid never fires more than one probe per interval (plus one at the edges); a
    // loaded host may delay some, never by much on average.
    assert!(
        max <= expected + 1,
        "a backend probed {max} times, expected {expected}"
    );
    assert!(
        min + 4 >= expected,
        "a backend probed only {min} times, expected {expected}"
    );
    assert!(
        mean >= expected as f64 * 0.9,
        "mean {mean:.2} probes per backend, expected {expected}"
    );
}

/// The 2,000-backend measurement (`cargo test -p agent --lib two_thousand -- --ignored
/// --nocapture`); heavier than the suite should carry on a shared 2-core machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "2,000 listeners: a measurement, run by hand"]
async fn two_thousand_backends_at_1s_keep_their_interval() {
    let (counts, expected) =
        probe_counts(2000, Duration::from_secs(1), Duration::from_secs(5)).await;
    let (min, max, mean) = summary(&counts);
    eprintln!("2000 backends, expected {expected} probes each: min {min} max {max} mean {mean:.2}");
    assert!(
        max <= expected + 1 && min + 1 >= expected,
        "min {min} max {max}"
    );
}
