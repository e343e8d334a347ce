//! Whole-file tests: the invalid fixtures with their exact messages, the example policies,
//! defaults, and robustness against mangled input.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// The workspace root: fixture paths in messages are relative to it.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// `config/invalid/NAME.yaml` must fail with exactly the lines of `NAME.expected`.
/// `BLESS=1` rewrites the expected files (review the diff before committing).
#[test]
fn invalid_fixtures_report_exactly_the_expected_errors() {
    let dir = root().join("config/invalid");
    let files = yaml_files(&dir);
    assert!(
        files.len() >= 17,
        "expected the fixture set, found {files:?}"
    );
    let bless = std::env::var_os("BLESS").is_some();
    let mut failures = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let shown = format!("config/invalid/{name}");
        let src = fs::read_to_string(&file).unwrap();
        let got = match load_str(&src, &shown) {
            Ok(_) => "(valid)".to_owned(),
            Err(e) => e.to_string(),
        };
        let expected_path = file.with_extension("expected");
        if bless {
            fs::write(&expected_path, format!("{got}\n")).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        if expected.trim_end() != got {
            failures.push(format!(
                "{shown}\n--- expected\n{}\n--- got\n{got}",
                expected.trim_end()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

#[test]
fn example_policies_are_valid() {
    let files = yaml_files(&root().join("config"));
    assert!(files.len() >= 3, "expected the examples, found {files:?}");
    for file in files {
        if let Err(e) = load_file(&file) {
            panic!("{} should be valid:\n{e}", file.display());
        }
    }
}

#[test]
fn the_demo_policy_is_what_the_demo_expects() {
    let p = load_file(&root().join("config/demo.yaml")).unwrap();
    assert_eq!(p.interfaces[0].name, "veth-agent");
    let udp = &p.services[0];
    assert_eq!(udp.name, "demo-udp");
    assert_eq!(udp.r#match.address.to_string(), "198.18.0.2/32");
    assert_eq!(udp.r#match.port, Some(5000));
    assert_eq!(udp.r#match.protocol, Protocol::Udp);
    let rl = udp.rate_limit.as_ref().unwrap();
    assert_eq!(
        (rl.key, rl.rate, rl.burst),
        (KeyBy::Flow, Rate::Packets(1000), 200)
    );
    assert!(p.services[1].rate_limit.is_none());
    assert_eq!(
        p.services[2].rate_limit.as_ref().map(|r| r.key),
        Some(KeyBy::SourceIp)
    );
}

/// Every section present, every field defaulted (also the compile tests' policy).
const MINIMAL: &str = include_str!("minimal.yaml");

#[test]
fn defaults_are_those_of_policy_md() {
    let p = load_str(MINIMAL, "minimal.yaml").unwrap();
    assert_eq!(p.agent, AgentSettings::default());
    assert_eq!(p.agent.listen.to_string(), "127.0.0.1:9090");
    assert_eq!(p.agent.pin_path, Path::new("/sys/fs/bpf/agent"));
    assert_eq!(p.agent.log_level, LogLevel::Info);
    assert_eq!(p.interfaces[0].xdp_mode, XdpMode::Auto);
    assert_eq!(p.interfaces[0].direction, Direction::Both);
    let s = &p.services[0];
    assert_eq!(s.r#match.port, None);
    assert_eq!(s.r#match.protocol, Protocol::Tcp);
    assert_eq!(s.priority, Priority::Core);
    let rl = s.rate_limit.as_ref().unwrap();
    assert_eq!(rl.key, KeyBy::SourceIp);
    assert_eq!(rl.rate, Rate::Bytes(12_500_000));
    assert_eq!(rl.burst, 12_500_000, "one second of rate");
    assert_eq!(rl.max_keys, 1_048_576);
    assert_eq!(s.backends[0].weight, 100);
    let lb = s.load_balancing.as_ref().unwrap();
    assert_eq!(
        (lb.algorithm, lb.vip, lb.slow_start, lb.table_size),
        (Algorithm::Maglev, true, Duration::ZERO, None)
    );
    let hc = s.health_check.as_ref().unwrap();
    assert_eq!(*hc, HealthCheck::default());
    assert_eq!(hc.r#type, CheckType::Tcp);
    assert_eq!((hc.path.as_str(), hc.host.as_str()), ("/", ""));
    assert_eq!(hc.expected_status, StatusRange { min: 200, max: 399 });
    assert_eq!(hc.interval, Duration::from_secs(1));
    assert_eq!(hc.unhealthy_interval, Duration::from_secs(1));
    assert_eq!(hc.timeout, Duration::from_millis(500));
    assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (2, 3));
    assert_eq!(hc.jitter, Percent::whole(10));
    assert_eq!(hc.retry.max_attempts, 1);
    assert_eq!(hc.retry.initial_backoff, Duration::from_millis(50));
    assert_eq!(hc.retry.max_backoff, Duration::from_millis(500));
    assert!(hc.passive);
    let cb = s.circuit_breaker.as_ref().unwrap();
    assert_eq!(*cb, CircuitBreaker::default());
    assert_eq!(cb.failure_threshold, 5);
    assert!(cb.error_rate.is_zero());
    assert_eq!(cb.min_requests, 20);
    assert_eq!(cb.window, Duration::from_secs(10));
    assert_eq!(cb.reset_timeout, Duration::from_secs(30));
    assert_eq!(cb.max_reset_timeout, Duration::from_secs(300));
    assert_eq!((cb.half_open_max_flows, cb.success_threshold), (3, 2));
    assert_eq!(cb.on_open, OnOpen::Reject);
    assert!(!cb.close_existing);
    assert_eq!(cb.max_ejection_percent, Percent::whole(50));
    let d = s.degradation.as_ref().unwrap();
    let kinds: Vec<_> = d.conditions.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [
            ConditionKind::Latency {
                threshold: Duration::from_millis(500)
            },
            ConditionKind::ErrorRate {
                threshold: Percent::whole(50)
            },
            ConditionKind::Availability {
                threshold: Percent::whole(80)
            },
        ]
    );
    assert!(
        d.conditions
            .iter()
            .all(|c| c.window == Duration::from_secs(30))
    );
    assert_eq!(d.fallback.strategy, FallbackStrategy::StaticResponse);
    assert_eq!(d.recover_after, Duration::from_secs(60));
    let sh = s.shaping.as_ref().unwrap();
    assert_eq!(sh.max_keys, 65_536, "extension: shaping.max_keys");
    assert_eq!(
        (sh.rate, sh.key, sh.horizon),
        (
            Rate::Bytes(125_000_000),
            KeyBy::Flow,
            Duration::from_secs(2)
        )
    );
}

#[test]
fn an_empty_section_is_the_section_with_its_defaults() {
    let src = "\
version: 1
interfaces: [{name: eth0}]
services:
  - name: web
    match: {address: 198.18.0.1}
    backends: [{address: '198.18.1.1:80'}]
    health_check:
    circuit_breaker: ~
    rate_limit:
";
    let e = load_str(src, "s.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "s.yaml:9:5: services[0].rate_limit.rate: required field is missing"
    );
    let p = load_str(&src.replace("    rate_limit:\n", ""), "s.yaml").unwrap();
    assert_eq!(p.services[0].health_check, Some(HealthCheck::default()));
    assert_eq!(
        p.services[0].circuit_breaker,
        Some(CircuitBreaker::default())
    );
    let d = p.error_at("services[0].health_check.interval", "x");
    assert_eq!(
        (d.line, d.column),
        (7, 5),
        "points at the empty section's key"
    );
}

#[test]
fn error_at_points_into_the_loaded_file() {
    let p = load_str(MINIMAL, "minimal.yaml").unwrap();
    assert_eq!(p.file_name(), "minimal.yaml");
    let d = p.error_at("interfaces[0].name", "interface \"eth0\" does not exist");
    assert_eq!(
        d.to_string(),
        "minimal.yaml:3:11: interfaces[0].name: interface \"eth0\" does not exist"
    );
    // A defaulted field points at its section.
    let d = p.error_at("services[0].health_check.timeout", "x");
    assert_eq!((d.line, d.column), (13, 19));
    let d = p.error_at("", "whole file");
    assert_eq!(d.to_string(), "minimal.yaml:1:1: (root): whole file");
}

#[test]
fn unreadable_files_are_one_diagnostic() {
    let e = load_file(Path::new("/nonexistent/policy.yaml")).unwrap_err();
    assert_eq!(e.0.len(), 1);
    let d = &e.0[0];
    assert_eq!((d.line, d.column, d.path.as_str()), (1, 1, "(file)"));
    assert!(
        d.to_string()
            .starts_with("/nonexistent/policy.yaml:1:1: (file): cannot read")
    );
}

/// `n` services of `backends` backends each (balanced, with breakers), under `agent`.
fn catalog(agent: &str, n: u32, backends: u32) -> String {
    let mut src = format!("version: 1\n{agent}interfaces: [{{name: eth0}}]\nservices:\n");
    for i in 0..n {
        let (a, b) = (i / 250, i % 250 + 1);
        src.push_str(&format!(
            "  - {{name: s{i}, match: {{address: 10.{a}.{b}.1, port: 80}}"
        ));
        if backends > 0 {
            src.push_str(", circuit_breaker: {}, backends: [");
            for k in 0..backends {
                src.push_str(&format!("{{address: '10.{a}.{b}.{}:80'}}, ", k + 2));
            }
            src.push(']');
        }
        src.push_str("}\n");
    }
    src
}

#[test]
fn more_services_than_agent_tables_allows_is_an_error_with_the_numbers() {
    let src = catalog("agent: {tables: {services: 100}}\n", 101, 0);
    let e = load_str(&src, "big.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "big.yaml:105:5: services[100]: 101 services; agent.tables.services allows 100 \
         (raise it, up to 1048576)"
    );
    assert!(
        load_str(
            &catalog("agent: {tables: {services: 101}}\n", 101, 0),
            "ok.yaml"
        )
        .is_ok()
    );
}

#[test]
fn more_backends_than_agent_tables_allows_is_an_error_with_the_numbers() {
    let src = catalog("agent: {tables: {backends: 10}}\n", 3, 4);
    let e = load_str(&src, "big.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "big.yaml:7:71: services[2].circuit_breaker: services with circuit_breaker have 12 \
         backends in all; agent.tables.backends allows 10 (raise it, up to 1048576)\n\
         big.yaml:7:85: services[2].backends: balanced services (load_balancing.vip) have 12 \
         backends in all; agent.tables.backends allows 10 (raise it, up to 1048576)"
    );
    assert!(
        load_str(
            &catalog("agent: {tables: {backends: 12}}\n", 3, 4),
            "ok.yaml"
        )
        .is_ok()
    );
}

#[test]
fn a_large_cluster_catalog_is_accepted_at_the_default_limits() {
    let p = load_str(&catalog("", 10_000, 6), "big.yaml").unwrap();
    assert_eq!(p.services.len(), 10_000);
}

#[test]
fn table_sizes_read_auto_or_numbers_and_refuse_the_rest() {
    let p = |agent: &str| load_str(&catalog(agent, 1, 0), "t.yaml");
    let t = p("agent: {tables: {connections: auto}}\n")
        .unwrap()
        .agent
        .tables;
    assert_eq!(t.connections, None);
    let t = p("agent: {tables: {connections: 1000}}\n")
        .unwrap()
        .agent
        .tables;
    assert_eq!(t.connections, Some(1000));
    let e = p("agent: {tables: {connections: lots}}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("agent.tables.connections: expected `auto` or a number of entries"),
        "{e}"
    );
    let e = p("agent: {tables: {services: 0}}\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "t.yaml:2:28: agent.tables.services: must be between 1 and 1048576"
    );
    let e = p("agent: {tables: {backends: 2000000}}\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "t.yaml:2:28: agent.tables.backends: must be between 1 and 1048576"
    );
}

#[test]
fn max_connections_is_refused_where_it_is_written() {
    let src = "version: 1\ninterfaces: [{name: eth0}]\nservices:\n  - name: web\n    match: {address: 10.0.0.1, port: 80}\n    backends: [{address: '10.0.0.2:80'}]\n    load_balancing: {max_connections: 100}\n";
    let e = load_str(src, "m.yaml").unwrap_err().to_string();
    assert_eq!(
        e,
        "m.yaml:7:39: services[0].load_balancing.max_connections: no longer a setting: \
         balanced flows are tracked in one node-wide table, sized by agent.tables.connections; \
         remove it"
    );
}

/// Variants of a valid file: truncations, dropped and duplicated lines, shifted indentation,
/// replaced characters, and hostile documents.
fn mangled_variants() -> Vec<String> {
    let base = fs::read_to_string(root().join("config/flash-sale.yaml")).unwrap();
    let lines: Vec<&str> = base.lines().collect();
    let mut variants: Vec<String> = Vec::new();
    for cut in [1, 7, 50, 333, base.len() / 2, base.len() - 3] {
        let cut = (0..=cut.min(base.len()))
            .rev()
            .find(|i| base.is_char_boundary(*i))
            .unwrap_or(0);
        variants.push(base[..cut].to_owned());
    }
    for (i, _) in lines.iter().enumerate().step_by(9) {
        let mut dropped = lines.clone();
        dropped.remove(i);
        variants.push(dropped.join("\n"));
        let mut doubled = lines.clone();
        doubled.insert(i, lines[i]);
        variants.push(doubled.join("\n"));
        let mut shifted: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        shifted[i] = format!("   {}", shifted[i]);
        variants.push(shifted.join("\n"));
    }
    for (from, to) in [
        (":", ""),
        ("-", ""),
        ("s", "\u{0}"),
        ("1", "-1"),
        ("1", "99999999999999999999999"),
        ("/", "//"),
        ("  ", "\t"),
        ("%", ""),
        ("address", "<<"),
        ("e", "é"),
    ] {
        variants.push(base.replacen(from, to, 3));
        variants.push(base.replace(from, to));
    }
    variants.extend(
        [
            "",
            "~",
            "[]",
            "42",
            "- - -",
            "{",
            "version: 1\nservices: *nothing",
            "a: &a [*a]",
            "version: !!binary aGVsbG8=",
            "? [complex, key]\n: value",
            "version: 1\n---\nversion: 1",
            "\u{feff}version: 1",
            "version: 1\ninterfaces: [{name: eth0}]\nservices: [{name: a, match: {address: '::ffff:1.2.3.4'}}]",
        ]
        .map(String::from),
    );
    variants.push("[".repeat(100_000));
    variants.push(format!("a: {}", "{b: ".repeat(5_000)));
    variants
}

/// None of the mangled variants may panic.
#[test]
fn mangled_input_never_panics() {
    let variants = mangled_variants();
    assert!(variants.len() >= 36, "only {} variants", variants.len());
    for (i, v) in variants.iter().enumerate() {
        let result = std::panic::catch_unwind(|| load_str(v, "mangled.yaml"));
        let Ok(result) = result else {
            panic!("variant {i} panicked:\n{v}");
        };
        if let Err(e) = result {
            for d in &e.0 {
                assert!(d.line >= 1 && d.column >= 1, "variant {i}: {d}");
            }
        }
    }
}

#[test]
fn key_tables_hold_at_least_the_services_totals() {
    let policy = |tables: &str| {
        format!(
            "version: 1\nagent: {{tables: {{{tables}}}}}\ninterfaces: [{{name: eth0}}]\n\
             services:\n  - name: a\n    match: {{address: 10.0.0.1}}\n    \
             rate_limit: {{rate: 100/s, max_keys: 600}}\n  - name: b\n    \
             match: {{address: 10.0.0.2}}\n    rate_limit: {{rate: 100/s, max_keys: 600}}\n"
        )
    };
    let ok = load_str(&policy("keys: 5000"), "t.yaml").unwrap();
    assert_eq!(ok.agent.tables.keys, Some(5000));
    assert_eq!(
        load_str(&policy(""), "t.yaml").unwrap().agent.tables.keys,
        None
    );
    let e = load_str(&policy("keys: 1000"), "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "t.yaml:2:24: agent.tables.keys: 1000 entries, fewer than the services' total of \
             rate_limit.max_keys (1200)"
        ),
        "{e}"
    );
    let e = load_str(&policy("departures: 0"), "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("agent.tables.departures"), "{e}");
}

/// The one-pass reader (tree.rs) against the reference reader (read.rs): where it reads a
/// file at all, it reads what the reference reader reads from it, with the same index, and
/// `load_str` answers as the reference reader alone would.
fn agrees_with_the_reference_reader(src: &str) -> bool {
    let reference = load_str_reference(src, "f.yaml");
    let got = load_str(src, "f.yaml");
    match (&got, &reference) {
        (Ok(p), Ok(r)) => {
            assert_eq!(p, r, "{src}");
            assert_eq!(p.source.spans, r.source.spans, "{src}");
            assert_eq!(p.source.file, r.source.file);
        }
        _ => assert_eq!(got, reference, "{src}"),
    }
    let Some((policy, index)) = tree::read(src) else {
        return false;
    };
    let Ok(Some(reference_index)) = read::index(src) else {
        panic!("read in one pass, refused by the reference reader:\n{src}");
    };
    assert_eq!(index, reference_index, "{src}");
    assert!(index.duplicates.is_empty(), "{src}");
    let read = read::read_policy(src, &reference_index);
    assert_eq!(read.wrong, [], "{src}");
    assert_eq!(read.stopped, None, "{src}");
    assert_eq!(Some(policy), read.policy, "{src}");
    true
}

#[test]
fn valid_files_are_read_in_one_pass_as_the_reference_reader_reads_them() {
    let mut files: Vec<String> = yaml_files(&root().join("config"))
        .iter()
        .map(|f| fs::read_to_string(f).unwrap())
        .collect();
    files.push(MINIMAL.to_owned());
    let reference = include_str!("../../../POLICY.md");
    let start = reference.find("```yaml\n").unwrap() + 8;
    let len = reference[start..].find("```").unwrap();
    files.push(reference[start..start + len].to_owned());
    files.push(bench::services(300, false));
    files.push(bench::services(300, true));
    files.push(catalog("agent: {tables: {services: 500}}\n", 400, 3));
    for src in &files {
        assert!(load_str(src, "f.yaml").is_ok(), "{src}");
        assert!(
            agrees_with_the_reference_reader(src),
            "a valid file left to the reference reader:\n{src}"
        );
    }
}

#[test]
fn files_with_errors_are_reported_as_the_reference_reader_reports_them() {
    let fixtures: Vec<String> = yaml_files(&root().join("config/invalid"))
        .iter()
        .map(|f| fs::read_to_string(f).unwrap())
        .collect();
    // Files whose only errors are validation's are read in one pass and validated there.
    let read = fixtures
        .iter()
        .filter(|src| agrees_with_the_reference_reader(src))
        .count();
    assert!(
        (1..fixtures.len() / 2).contains(&read),
        "{read} of {} fixtures read in one pass",
        fixtures.len()
    );
    let variants = mangled_variants();
    let read = variants
        .iter()
        .filter(|src| agrees_with_the_reference_reader(src))
        .count();
    // Some variants are valid still (a comment cut, a line doubled inside a list).
    assert!(
        read < variants.len() / 2,
        "{read} of {} variants read in one pass",
        variants.len()
    );
}

/// Scalars whose reading depends on how YAML resolves them, in fields where that matters: a
/// number, a boolean, a string, a section, a list.
#[test]
fn tricky_scalars_read_as_the_reference_reader_reads_them() {
    let base = "\
version: 1
interfaces: [{name: eth0}]
services:
  - name: NAME
    match: {address: 10.0.0.1, port: PORT}
    rate_limit: {rate: 100/s, burst: BURST}
    backends: [{address: '10.0.1.1:80'}]
    load_balancing: {vip: VIP}
    health_check: {type: http, host: HOST, interval: INTERVAL}
    circuit_breaker: BREAKER
";
    let valid = [
        ("NAME", "web"),
        ("PORT", "80"),
        ("BURST", "10"),
        ("VIP", "true"),
        ("HOST", "example.org"),
        ("INTERVAL", "2s"),
        ("BREAKER", "{}"),
    ];
    let scalars = [
        "80",
        "+80",
        "-80",
        "-0",
        "+0",
        "0",
        "080",
        "-080",
        "0x50",
        "0o120",
        "0b1010000",
        "0X50",
        "8_0",
        "80.0",
        "8e1",
        "8E1",
        ".5",
        "-.5",
        "5.",
        "1e999",
        "-1e999",
        "99999999999999999999999",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775809",
        ".inf",
        "-.inf",
        "+.inf",
        ".Inf",
        ".nan",
        "+.nan",
        ".NaN",
        "inf",
        "-inf",
        "nan",
        "infinity",
        "NaN",
        "true",
        "True",
        "TRUE",
        "tRuE",
        "false",
        "yes",
        "Yes",
        "y",
        "Y",
        "n",
        "on",
        "off",
        "no",
        "null",
        "Null",
        "NULL",
        "nUll",
        "~",
        "",
        "''",
        "'80'",
        "\"80\"",
        "'true'",
        "\"\"",
        "!!str 80",
        "!!int 80",
        "! 80",
        "!!bool true",
        "&a 80",
        "*a",
        "[80]",
        "[]",
        "{}",
        "{a: 1}",
        "80 # comment",
        "8 0",
        "web",
        "/x",
        "\"a\\tb\"",
        "example.org",
        "10.0.0.1",
        "2s",
        "0s",
        "-1s",
        "1_000",
        "+",
        "-",
        ".",
        "..",
        "0.",
        "-.",
        "e1",
        "1e",
        "1e+",
        "0x",
        "0xg",
        "1.2.3",
        ":",
        "?",
        "\"\\u00e9\"",
        "é",
    ];
    let mut read = 0;
    for (field, _) in valid {
        for scalar in scalars {
            let mut src = base.replace(field, scalar);
            for (other, value) in valid {
                src = src.replace(other, value);
            }
            if agrees_with_the_reference_reader(&src) {
                read += 1;
            }
        }
    }
    assert!(read > 100, "only {read} read in one pass");
}

/// A companion's backends count where the service's do: one breaker per backend address,
/// and the balanced-backend limit, reported at the fallback.
#[test]
fn fallback_backends_take_breakers_and_table_room_like_backends() {
    let policy = |agent: &str, fallback: &str| {
        format!(
            r#"version: 1
agent: {{{agent}}}
interfaces: [{{name: eth0}}]
services:
  - name: a
    match: {{address: 10.0.0.1, port: 80, protocol: tcp}}
    backends: [{{address: 10.1.0.1:80}}]
    circuit_breaker: {{}}
  - name: b
    match: {{address: 10.0.0.2, port: 80, protocol: tcp}}
    backends: [{{address: 10.1.0.2:80}}]
    circuit_breaker: {{}}
    degradation:
      conditions: [{{type: availability}}]
      fallback:
        backends: [{{address: {fallback}}}]
"#
        )
    };
    let ok = load_str(&policy("", "10.1.0.3:80"), "t.yaml").unwrap();
    assert_eq!(ok.services.len(), 3);
    assert_eq!(ok.file_services().count(), 2);
    let e = load_str(&policy("", "10.1.0.1:80"), "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "services[1].degradation.fallback.backends[0].address: backend 10.1.0.1:80 already \
             has a circuit breaker for tcp in services[0] (`a`)"
        ),
        "{e}"
    );
    let e = load_str(&policy("tables: {backends: 2}", "10.1.0.3:80"), "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("services[1].degradation.fallback.backends: balanced services"),
        "{e}"
    );
}
