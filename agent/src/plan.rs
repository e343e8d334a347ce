//! From a validated policy to what the agent does with it: the compiled map entries, the
//! attachments, and the descriptions status shows. Also the checks that need the running
//! system (interfaces exist), reported like validation errors, at the field.

use std::net::SocketAddr;

use crate::{
    config::{
        self, Compiled, Diagnostic, PolicyErrors,
        model::{Direction, Policy, Protocol, RateLimit, Service, Shaping, XdpMode},
    },
    datapath::{
        AttachSpec, Kernel, XdpModeSetting,
        qdisc::{self, PacerSpec, QdiscError, Support},
    },
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
    /// The pacing qdisc and the interfaces it goes on, when some service is shaped.
    pub pacing: Option<Pacing>,
}

/// `fq` as root qdisc of every egress interface: a shaped service's packets may leave by any
/// of them (routes decide, not the policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pacing {
    pub spec: PacerSpec,
    pub interfaces: Vec<String>,
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
        let compiled = config::compile(policy);
        let pacing = compiled.shape_horizon.map(|horizon| Pacing {
            spec: PacerSpec::fq(horizon),
            interfaces: policy
                .interfaces
                .iter()
                .filter(|i| matches!(i.direction, Direction::Egress | Direction::Both))
                .map(|i| i.name.clone())
                .collect(),
        });
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
            compiled,
            pacing,
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
        if self.compiled.shape_keys != running.compiled.shape_keys {
            return Some(("services", "the total of shaping.max_keys"));
        }
        if self.pacing != running.pacing {
            // The fq qdiscs are installed at start, when some service is shaped, with a
            // horizon covering the longest of the policy.
            return Some((
                "services",
                "whether any service is shaped, or fq's horizon (the longest shaping.horizon \
                 above 10s)",
            ));
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
        if self.compiled.tables != running.compiled.tables {
            return Some((
                "agent.tables",
                "agent.tables (every table is sized at start)",
            ));
        }
        None
    }
}

impl Plan {
    /// What shaping needs of the running system, asked before anything is touched: `sch_fq`
    /// (refused at every `shaping` section when missing), and egress interfaces whose root
    /// qdisc is the kernel's default or ours (refused at the interface otherwise).
    pub fn check_pacing(&self, policy: &Policy) -> Result<(), PolicyErrors> {
        let Some(pacing) = &self.pacing else {
            return Ok(());
        };
        match qdisc::probe(&pacing.spec) {
            Support::Yes => {}
            Support::No(why) => return Err(PolicyErrors(fq_missing(policy, &why))),
            Support::Unknown(why) => tracing::warn!(
                "could not ask the kernel whether it has sch_fq ({why}); installing fq will tell"
            ),
        }
        let mut errors = Vec::new();
        for (n, interface) in policy.interfaces.iter().enumerate() {
            if !pacing.interfaces.contains(&interface.name) {
                continue;
            }
            match qdisc::check(&interface.name) {
                Ok(()) => {}
                Err(e @ QdiscError::Foreign { .. }) => {
                    errors.push(policy.error_at(&format!("interfaces[{n}].name"), e.to_string()))
                }
                // Reading failed: the install will fail too, and say why.
                Err(e) => tracing::warn!("{e}"),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PolicyErrors(errors))
        }
    }
}

/// One error at every `shaping` section: this kernel cannot pace. `why`: the kernel's words
/// when an `fq` qdisc was asked for.
pub fn fq_missing(policy: &Policy, why: &str) -> Vec<Diagnostic> {
    // The release as `uname -r` prints it (a distribution's suffix says which build lacks
    // the module); aya's parsed version where it cannot be read.
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| Kernel::current().to_string());
    policy
        .services
        .iter()
        .enumerate()
        .filter(|(_, s)| s.shaping.is_some())
        .map(|(i, _)| {
            policy.error_at(
                &format!("services[{i}].shaping"),
                format!(
                    "kernel {kernel} has no sch_fq, the fq qdisc that holds paced packets until \
                     their departure time (adding one fails: {why}); run on a kernel with \
                     sch_fq (CONFIG_NET_SCH_FQ) or remove shaping"
                ),
            )
        })
        .collect()
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
        shaping: s.shaping.as_ref().map(describe_shaping),
    }
}

fn describe_shaping(s: &Shaping) -> String {
    format!("{} {} horizon {:?}", s.key, s.rate, s.horizon)
}

fn describe_limit(r: &RateLimit) -> String {
    let unit = if r.rate.is_bytes() { " B" } else { "" };
    format!("{} {} burst {}{unit}", r.key, r.rate, r.burst)
}
