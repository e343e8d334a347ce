//! From a validated policy to what the agent does with it: the compiled map entries, the
//! attachments, and the descriptions status shows. Also the checks that need the running
//! system (interfaces exist), reported like validation errors, at the field.

use std::net::SocketAddr;

use crate::{
    config::{
        self, Compiled, Diagnostic, PolicyErrors,
        model::{Direction, Policy, Protocol, RateLimit, Service, XdpMode},
    },
    datapath::{AttachSpec, XdpModeSetting},
    telemetry::status::ServiceInfo,
};

#[derive(Debug, Clone)]
pub struct Plan {
    pub listen: SocketAddr,
    pub attach: Vec<AttachSpec>,
    pub services: Vec<ServiceInfo>,
    pub compiled: Compiled,
    /// Backends (without weights), balancing, health checks and breakers as written: the
    /// supervisor and the balancer are built once at start.
    pub backends: String,
}

impl Plan {
    /// Fails, with every problem at its field, when an interface does not exist.
    pub fn new(policy: &Policy) -> Result<Plan, PolicyErrors> {
        let missing: Vec<Diagnostic> = policy
            .interfaces
            .iter()
            .enumerate()
            .filter(|(_, i)| !interface_exists(&i.name))
            .map(|(n, i)| {
                policy.error_at(
                    &format!("interfaces[{n}].name"),
                    format!("interface \"{}\" does not exist", i.name),
                )
            })
            .collect();
        if !missing.is_empty() {
            return Err(PolicyErrors(missing));
        }
        Ok(Plan {
            listen: policy.agent.listen,
            attach: policy
                .interfaces
                .iter()
                .map(|i| AttachSpec {
                    interface: i.name.clone(),
                    xdp_mode: match i.xdp_mode {
                        XdpMode::Auto => XdpModeSetting::Auto,
                        XdpMode::Native => XdpModeSetting::Native,
                        XdpMode::Generic => XdpModeSetting::Generic,
                    },
                    ingress: matches!(i.direction, Direction::Ingress | Direction::Both),
                    egress: matches!(i.direction, Direction::Egress | Direction::Both),
                })
                .collect(),
            services: policy.services.iter().map(describe).collect(),
            compiled: config::compile(policy),
            backends: policy
                .services
                .iter()
                .map(|s| {
                    // Weights may change on reload (the balancer takes them); the rest not.
                    let addresses: Vec<_> = s.backends.iter().map(|b| b.address).collect();
                    format!(
                        "{:?}{:?}{:?}{:?}",
                        addresses, s.health_check, s.circuit_breaker, s.load_balancing
                    )
                })
                .collect(),
        })
    }

    /// A change a reload cannot make in place: the field path and what it is.
    pub fn needs_restart_from(&self, running: &Plan) -> Option<(&'static str, &'static str)> {
        if self.attach != running.attach {
            return Some(("interfaces", "the interface list"));
        }
        if self.compiled.max_keys != running.compiled.max_keys {
            return Some(("services", "the total of rate_limit.max_keys"));
        }
        if self.backends != running.backends {
            return Some((
                "services",
                "backends, load_balancing, health_check or circuit_breaker",
            ));
        }
        if self.listen != running.listen {
            return Some(("agent.listen", "agent.listen"));
        }
        None
    }
}

/// Asks the kernel in this network namespace (sysfs may show another one).
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn describe(s: &Service) -> ServiceInfo {
    let m = &s.r#match;
    let proto = match m.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => "any",
    };
    let matches = match m.port {
        Some(p) => format!("{} {proto}/{p}", m.address),
        None => format!("{} {proto}", m.address),
    };
    ServiceInfo {
        name: s.name.clone(),
        matches,
        rate_limit: s.rate_limit.as_ref().map(describe_limit),
    }
}

fn describe_limit(r: &RateLimit) -> String {
    let unit = if r.rate.is_bytes() { " B" } else { "" };
    format!("{} {} burst {}{unit}", r.key, r.rate, r.burst)
}
