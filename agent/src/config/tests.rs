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
