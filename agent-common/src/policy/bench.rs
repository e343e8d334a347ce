//! How long reading and validating a large policy takes (a live reload's budget is mostly
//! this). Ignored by default; in release mode:
//!
//! ```text
//! cargo test --release -p agent-common --features policy --lib -- --ignored --nocapture load_file_of_1000_services
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use super::load_file;

/// `n` services in block style, as a generator or a person writes them: a match and a rate
/// limit each, and with `full` three backends, a health check and a circuit breaker.
pub(crate) fn services(n: u32, full: bool) -> String {
    let mut src = String::from("version: 1\ninterfaces:\n  - name: eth0\nservices:\n");
    for i in 0..n {
        let (x, y) = (i / 250, i % 250 + 1);
        src.push_str(&format!(
            "  - name: svc-{i}\n    match: {{address: 10.{x}.{y}.1, port: 80, protocol: tcp}}\n    \
             rate_limit: {{key: source_ip, rate: 1000/s, max_keys: 1000}}\n"
        ));
        if full {
            src.push_str("    backends:\n");
            for k in 2..5 {
                src.push_str(&format!("      - address: 10.{x}.{y}.{k}:8080\n"));
            }
            src.push_str(
                "    health_check:\n      type: http\n      path: /healthz\n      interval: 2s\n      \
                 timeout: 500ms\n    circuit_breaker:\n      failure_threshold: 5\n      \
                 reset_timeout: 10s\n      on_open: reject\n",
            );
        }
    }
    src
}

fn median_of_20(path: &Path) -> Duration {
    // One untimed run warms the allocator and the page cache.
    load_file(path).unwrap_or_else(|e| panic!("{e}"));
    let mut times: Vec<Duration> = (0..20)
        .map(|_| {
            let start = Instant::now();
            let p = load_file(path).unwrap_or_else(|e| panic!("{e}"));
            let took = start.elapsed();
            assert_eq!(p.services.len(), 1000);
            took
        })
        .collect();
    times.sort();
    (times[9] + times[10]) / 2
}

#[test]
#[ignore = "a benchmark: run it in release mode (see the module docs)"]
fn load_file_of_1000_services() {
    let dir = std::env::temp_dir().join(format!("policy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, full) in [("plain", false), ("full", true)] {
        let path = dir.join(format!("{name}.yaml"));
        let src = services(1000, full);
        std::fs::write(&path, &src).unwrap();
        let median = median_of_20(&path);
        println!(
            "load_file, 1000 services, {name} ({} KiB): median of 20 {:.2} ms",
            src.len() / 1024,
            median.as_secs_f64() * 1e3
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
