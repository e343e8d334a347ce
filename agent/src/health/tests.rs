//! Health checks against real servers on 127.0.0.1. Every wait has a deadline; time bounds
//! have slack for a loaded 2-core machine, on the late side only (timers never fire early).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::servers::{HttpServer, TcpServer, closed_port};
use super::*;
use crate::config::{CheckType, HealthCheck, Retry, StatusRange};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How late a timer or a local round trip may be on a loaded machine.
const SLACK: Duration = Duration::from_millis(400);

fn backend(address: std::net::SocketAddr) -> BackendRef {
    BackendRef {
        service: "svc".into(),
        service_id: 0,
        index: 0,
        address,
    }
}

/// A health check from policy text, so the tests run on what users write.
fn policy_check(body: &str) -> HealthCheck {
    let src = format!(
        "version: 1\ninterfaces:\n  - name: eth0\nservices:\n  - name: svc\n    match:\n      \
         address: 10.96.0.10/32\n    backends:\n      - address: 10.0.1.1:80\n    \
         health_check:\n{body}"
    );
    let policy = crate::config::load_str(&src, "test.yaml")
        .unwrap_or_else(|e| panic!("test policy invalid:\n{e}"));
    policy.services[0].health_check.clone().unwrap()
}

async fn next(rx: &mut mpsc::Receiver<ProbeResult>, within: Duration) -> ProbeResult {
    tokio::time::timeout(within, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no probe result within {within:?}"))
        .expect("the result channel closed")
}

/// Receives until a result satisfies `pred`, returning it; panics at the deadline.
async fn until(
    rx: &mut mpsc::Receiver<ProbeResult>,
    within: Duration,
    pred: impl Fn(&ProbeResult) -> bool,
) -> ProbeResult {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = next(rx, left).await;
        if pred(&r) {
            return r;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_falls_after_the_threshold_and_rises_when_restored() {
    let mut server = TcpServer::start(false).await;
    let check = policy_check(
        "      type: tcp\n      interval: 50ms\n      unhealthy_interval: 80ms\n      \
         timeout: 40ms\n      healthy_threshold: 2\n      unhealthy_threshold: 3\n",
    );
    let (tx, mut rx) = mpsc::channel(64);
    let mut checker = Checker::new(tx, ProbeOptions::default());
    checker.add(backend(server.addr), &check).unwrap();

    let r = until(&mut rx, ms(2000), |r| r.is_success()).await;
    assert_eq!((r.health, r.attempts), (Health::Healthy, 1));
    // The kernel completes the handshake before the server's accept: wait for it.
    let deadline = Instant::now() + ms(2000);
    while server.accepted() == 0 {
        assert!(
            Instant::now() < deadline,
            "the probe never reached the server"
        );
        tokio::time::sleep(ms(5)).await;
    }

    server.kill();
    // Probes in flight at the kill may still succeed; then exactly 3 failures flip it.
    let first = until(&mut rx, ms(2000), |r| !r.is_success()).await;
    let mut falls = vec![first];
    for _ in 0..2 {
        falls.push(next(&mut rx, ms(1000)).await);
    }
    let got: Vec<_> = falls
        .iter()
        .map(|r| (r.outcome.clone(), r.health, r.changed))
        .collect();
    let refused = Err(ProbeFailure::Refused);
    assert_eq!(
        got,
        [
            (refused.clone(), Health::Healthy, false),
            (refused.clone(), Health::Healthy, false),
            (refused.clone(), Health::Unhealthy, true),
        ]
    );

    server.restore().await;
    let first = until(&mut rx, ms(2000), |r| r.is_success()).await;
    assert_eq!((first.health, first.changed), (Health::Unhealthy, false));
    let second = next(&mut rx, ms(1000)).await;
    assert_eq!(
        (second.outcome, second.health, second.changed),
        (Ok(()), Health::Healthy, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_statuses_decide_and_the_host_header_defaults_to_the_address() {
    let server = HttpServer::start(&[200, 302, 404, 500, 204], 200).await;
    let mut check = HealthCheck {
        r#type: CheckType::Http,
        path: "/healthz?deep=1".into(),
        ..HealthCheck::default()
    };
    let probe = Probe::new(&check, server.addr, ProbeOptions::default()).unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(probe.attempt(ms(2000)).await);
    }
    assert_eq!(
        got,
        [
            Ok(()),
            Ok(()),
            Err(ProbeFailure::Status(404)),
            Err(ProbeFailure::Status(500))
        ]
    );
    check.expected_status = StatusRange { min: 204, max: 204 };
    check.host = "checkout.example".into();
    let probe = Probe::new(&check, server.addr, ProbeOptions::default()).unwrap();
    assert_eq!(probe.attempt(ms(2000)).await, Ok(()), "204 expected");
    assert_eq!(
        probe.attempt(ms(2000)).await,
        Err(ProbeFailure::Status(200))
    );
    let hosts = server.seen.lock().unwrap().hosts.clone();
    assert_eq!(hosts[0], server.addr.to_string());
    assert_eq!(hosts[4], "checkout.example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out_and_counts_as_failure() {
    let server = TcpServer::start(true).await;
    let check = HealthCheck {
        r#type: CheckType::Http,
        interval: ms(300),
        unhealthy_interval: ms(300),
        timeout: ms(150),
        unhealthy_threshold: 2,
        ..HealthCheck::default()
    };
    let probe = Probe::new(&check, server.addr, ProbeOptions::default()).unwrap();
    let start = Instant::now();
    assert_eq!(
        probe.attempt(ms(150)).await,
        Err(ProbeFailure::Timeout(ms(150)))
    );
    let took = start.elapsed();
    assert!(
        (ms(150)..ms(150) + SLACK).contains(&took),
        "timeout of 150ms took {took:?}"
    );

    let (tx, mut rx) = mpsc::channel(16);
    let mut checker = Checker::new(tx, ProbeOptions::default());
    checker.add(backend(server.addr), &check).unwrap();
    let r = until(&mut rx, ms(3000), |r| r.changed).await;
    assert_eq!(r.outcome, Err(ProbeFailure::Timeout(ms(150))));
    assert_eq!(r.health, Health::Unhealthy);
    assert!(r.latency >= ms(150), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_exponentially_with_jitter() {
    let server = HttpServer::start(&[503, 503], 200).await;
    let check = HealthCheck {
        r#type: CheckType::Http,
        ..HealthCheck::default()
    };
    let retry = Retry {
        max_attempts: 4,
        initial_backoff: ms(80),
        max_backoff: ms(120),
    };
    let probe = Probe::new(&check, server.addr, ProbeOptions::default()).unwrap();
    let deadline = tokio::time::Instant::now() + ms(5000);
    let mut rng = fastrand::Rng::new();
    let run = run_probe(&probe, ms(1000), &retry, deadline, &mut rng).await;
    assert_eq!((run.outcome.clone(), run.attempts), (Ok(()), 3), "{run:?}");
    let t = server.requests();
    assert_eq!(t.len(), 3);
    // Waits of [40, 80] then [60, 120] ms (equal jitter of 80ms, then of 160ms capped at 120).
    let gaps = [t[1] - t[0], t[2] - t[1]];
    assert!(
        gaps[0] >= ms(40) && gaps[0] <= ms(80) + SLACK,
        "first backoff {:?}",
        gaps[0]
    );
    assert!(
        gaps[1] >= ms(60) && gaps[1] <= ms(120) + SLACK,
        "second backoff {:?}",
        gaps[1]
    );
    assert!(run.elapsed >= gaps[0] + gaps[1], "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_attempts_are_retried_and_counted() {
    let addr = closed_port().await;
    let probe = Probe::new(&HealthCheck::default(), addr, ProbeOptions::default()).unwrap();
    let retry = Retry {
        max_attempts: 3,
        initial_backoff: ms(20),
        max_backoff: ms(40),
    };
    let deadline = tokio::time::Instant::now() + ms(5000);
    let run = run_probe(&probe, ms(500), &retry, deadline, &mut fastrand::Rng::new()).await;
    assert_eq!(
        (run.outcome.clone(), run.attempts),
        (Err(ProbeFailure::Refused), 3)
    );
    // At least half of 20ms, then half of 40ms.
    assert!(run.elapsed >= ms(30), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_end_of_the_interval() {
    let server = TcpServer::start(true).await;
    let check = HealthCheck {
        r#type: CheckType::Http,
        ..HealthCheck::default()
    };
    let probe = Probe::new(&check, server.addr, ProbeOptions::default()).unwrap();
    let retry = Retry {
        max_attempts: 50,
        initial_backoff: ms(10),
        max_backoff: ms(20),
    };
    let start = tokio::time::Instant::now();
    let deadline = start + ms(500);
    let run = run_probe(&probe, ms(200), &retry, deadline, &mut fastrand::Rng::new()).await;
    let ended = tokio::time::Instant::now();
    assert!(
        matches!(run.outcome, Err(ProbeFailure::Timeout(_))),
        "{run:?}"
    );
    assert!((2..=4).contains(&run.attempts), "{run:?}");
    assert!(
        ended <= deadline + SLACK,
        "ran {:?} past the deadline",
        ended - deadline
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_sockets_carry_the_mark() {
    let server = TcpServer::start(false).await;
    let plain = connect(server.addr, &ProbeOptions::default())
        .await
        .unwrap();
    assert_eq!(socket2::SockRef::from(&plain).mark().unwrap(), 0);
    let marked = ProbeOptions { mark: Some(0x4a11) };
    match connect(server.addr, &marked).await {
        Ok(s) => assert_eq!(socket2::SockRef::from(&s).mark().unwrap(), 0x4a11),
        // SO_MARK needs CAP_NET_ADMIN; the agent runs as root, a developer may not.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: SO_MARK needs CAP_NET_ADMIN ({e})")
        }
        Err(e) => panic!("connect with a mark: {e}"),
    }
}

#[test]
fn bad_settings_are_typed_errors() {
    let addr = "127.0.0.1:1".parse().unwrap();
    let http = |path: &str, host: &str| HealthCheck {
        r#type: CheckType::Http,
        path: path.into(),
        host: host.into(),
        ..HealthCheck::default()
    };
    let opts = ProbeOptions::default();
    assert_eq!(
        Probe::new(&http("healthz", ""), addr, opts).unwrap_err(),
        HealthError::InvalidPath("healthz".into())
    );
    assert_eq!(
        Probe::new(&http("/", "a\nb"), addr, opts).unwrap_err(),
        HealthError::InvalidHost("a\nb".into())
    );
    let (tx, _rx) = mpsc::channel(1);
    let mut checker = Checker::new(tx, opts);
    assert_eq!(
        checker.add(backend(addr), &HealthCheck::default()),
        Err(HealthError::NoRuntime)
    );
    assert_eq!(
        HealthError::InvalidPath("healthz".into()).to_string(),
        "health_check.path \"healthz\" is not an HTTP path"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_and_dropping_stop_the_tasks() {
    let server = TcpServer::start(false).await;
    let check = HealthCheck {
        interval: ms(20),
        unhealthy_interval: ms(20),
        timeout: ms(10),
        ..HealthCheck::default()
    };
    let (tx, mut rx) = mpsc::channel(8);
    let mut checker = Checker::new(tx, ProbeOptions::default());
    let a = backend(server.addr);
    let b = BackendRef {
        index: 1,
        ..a.clone()
    };
    checker.add(a.clone(), &check).unwrap();
    checker.add(b.clone(), &check).unwrap();
    assert_eq!(
        checker.add(a.clone(), &check),
        Err(HealthError::Duplicate(a.clone()))
    );
    assert_eq!(checker.len(), 2);
    until(&mut rx, ms(2000), |r| r.backend == b).await;
    assert!(checker.remove(&b));
    assert!(!checker.remove(&b));
    drop(checker);
    // Every sender is gone once the tasks are: the channel closes.
    let closed = tokio::time::timeout(ms(5000), async { while rx.recv().await.is_some() {} }).await;
    assert!(closed.is_ok(), "probe tasks still running after drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_added_unhealthy_rises_only_after_the_threshold() {
    let server = TcpServer::start(false).await;
    let check = policy_check(
        "      type: tcp\n      interval: 30ms\n      unhealthy_interval: 30ms\n      \
         timeout: 20ms\n      healthy_threshold: 3\n      unhealthy_threshold: 1\n",
    );
    let (tx, mut rx) = mpsc::channel(16);
    // The checker's own default is healthy: only this backend starts unhealthy.
    let mut checker = Checker::new(tx, ProbeOptions::default());
    checker
        .add_from(backend(server.addr), &check, Health::Unhealthy)
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let r = next(&mut rx, ms(1000)).await;
        got.push((r.outcome, r.health, r.changed));
    }
    assert_eq!(
        got,
        [
            (Ok(()), Health::Unhealthy, false),
            (Ok(()), Health::Unhealthy, false),
            (Ok(()), Health::Healthy, true),
        ],
        "three successes from unhealthy, healthy_threshold 3"
    );
}
