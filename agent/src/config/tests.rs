//! Whole-policy tests of the compile step: what it makes of equal policies and of the
//! largest ones validation lets through.

use super::*;

const MINIMAL: &str = include_str!("../../../agent-common/src/policy/minimal.yaml");

#[test]
fn equal_policies_compare_equal_wherever_written() {
    let a = load_str(MINIMAL, "a.yaml").unwrap();
    let b = load_str(&format!("# moved\n\n{MINIMAL}"), "b.yaml").unwrap();
    assert_eq!(a, b);
    assert_eq!(compile(&a), compile(&b));
}

/// Three services with a breaker and `per_service` backends each (`any`: two keys apiece),
/// under a limit of 4096 backends.
fn breaker_policy(per_service: u32) -> String {
    let mut src = String::from(
        "version: 1\nagent: {tables: {backends: 4096}}\ninterfaces: [{name: eth0}]\nservices:\n",
    );
    for s in 0..3 {
        src.push_str(&format!(
            "  - name: s{s}\n    match: {{address: 198.18.0.{s}, protocol: any}}\n\
             \x20   load_balancing: {{algorithm: weighted_round_robin, vip: false}}\n\
             \x20   circuit_breaker: {{}}\n    backends:\n"
        ));
        for b in 0..per_service {
            src.push_str(&format!(
                "      - address: 10.{s}.{}.{}:80\n",
                b / 256,
                b % 256
            ));
        }
    }
    src
}

#[test]
fn more_backends_with_breakers_than_the_datapath_holds_is_an_error() {
    let Err(e) = load_str(&breaker_policy(1366), "big.yaml").map_err(|e| e.to_string()) else {
        panic!("4098 backends with breakers accepted");
    };
    assert_eq!(
        e,
        "big.yaml:2750:22: services[2].circuit_breaker: services with circuit_breaker have 4098 \
         backends in all; agent.tables.backends allows 4096 (raise it, up to 1048576)",
        "{e}"
    );
    let fits = load_str(&breaker_policy(1365), "fits.yaml");
    assert!(fits.is_ok(), "4095 backends must fit");
    let compiled = compile(&fits.unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(compiled.backends.len(), 4095);
    assert_eq!(compiled.backends.last().map(|b| b.id), Some(4094));
}

const DEGRADABLE: &str = r#"version: 1
interfaces: [{name: eth0}]
services:
  - name: api
    match: {address: 198.18.0.5, port: 80, protocol: tcp}
    backends: [{address: 198.18.1.1:80}]
  - name: web
    match: {address: 198.18.0.10, port: 80, protocol: tcp}
    rate_limit: {key: service, rate: 1000/s}
    backends: [{address: 198.18.1.10:80}, {address: 198.18.1.11:80}]
    health_check: {interval: 200ms, timeout: 100ms}
    circuit_breaker: {}
    degradation:
      conditions: [{type: latency, threshold: 100ms, window: 1s}]
      fallback:
        backends: [{address: 198.18.1.100:80}]
        rate_limit: {key: service, rate: 10/s, max_keys: 1}
"#;

/// The fallback backends become a companion service after the file's: balanced, probed and
/// guarded like the service's own, with the fallback's rate limit, and never classified into.
#[test]
fn a_fallback_is_a_companion_service_the_classifier_never_names() {
    let policy = load_str(DEGRADABLE, "d.yaml").unwrap();
    let names: Vec<&str> = policy.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["api", "web", "web.fallback"]);
    let companion = &policy.services[2];
    assert_eq!(companion.fallback_of, Some(1));
    assert_eq!(policy.companion_of(1), Some(2));
    assert_eq!(policy.companion_of(0), None);
    assert_eq!(companion.backends.len(), 1);
    assert!(companion.health_check.is_some() && companion.circuit_breaker.is_some());
    assert_eq!(companion.rate_limit.as_ref().map(|r| r.max_keys), Some(1));

    let c = compile(&policy);
    assert_eq!(c.services[1].config.fallback_id(), Some(2));
    assert_eq!(c.services[0].config.fallback_id(), None);
    assert_eq!(c.services[2].config.fallback_id(), None);
    assert!(c.services[2].config.rl_rate == 10, "the fallback's limit");
    let classified: Vec<u32> = (c.classify.iter())
        .flat_map(|e| {
            e.rules.rules[..e.rules.count as usize]
                .iter()
                .map(|r| r.service_id)
        })
        .collect();
    assert!(!classified.contains(&2), "{classified:?}");
    assert!(classified.contains(&1));
    // Balanced and guarded: its own LB entry and breakers.
    assert!(c.lb.iter().any(|l| l.id == 2 && l.backends.len() == 1));
    assert_eq!(c.backends.iter().filter(|b| b.service == 2).count(), 1);
    // The token-bucket table holds the companion's key too.
    assert_eq!(c.max_keys, 1_048_576 + 1);
}

/// Stable ids renumber a service and its companion together: the service keeps naming it.
#[test]
fn a_service_names_its_companion_under_stable_ids() {
    let limits = ids::Limits {
        services: 64,
        backends: 64,
    };
    // A running policy whose ids are not policy order: `web` was added after others left.
    let first = compile(&load_str(DEGRADABLE, "d.yaml").unwrap());
    let (_, running) = ids::Ids::default().assign(&first, limits).unwrap();
    let reordered = DEGRADABLE.replace("  - name: api\n", "  - name: api2\n");
    let c = compile(&load_str(&reordered, "d.yaml").unwrap());
    let (renumbered, _) = running.assign(&c, limits).unwrap();
    let web = renumbered
        .services
        .iter()
        .find(|s| s.name == "web")
        .unwrap();
    let companion = (renumbered.services.iter())
        .find(|s| s.name == "web.fallback")
        .unwrap();
    assert_eq!(web.config.fallback_id(), Some(companion.id));
    let api2 = renumbered
        .services
        .iter()
        .find(|s| s.name == "api2")
        .unwrap();
    assert_ne!(api2.id, 0, "a new service does not take a running one's id");
}
