//! From a validated policy to what the agent does with it: the compiled map entries, the
//! attachments, and the descriptions status shows. Also the checks that need the running
//! system (interfaces exist), reported like validation errors, at the field.

use std::net::SocketAddr;

use crate::{
    config::{
        self, Compiled, Diagnostic, PolicyErrors,
        companion::COMPANION_SUFFIX,
        ids::{Ids, IdsError, Limits},
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
    /// Per service: its name, backends, balancing, health check and breaker as written (a
    /// reload that changes them starts the supervisor again).
    pub backends: Vec<String>,
    /// The pacing qdisc and the interfaces it goes on, when some service is shaped.
    pub pacing: Option<Pacing>,
    /// `agent.pin_path` (cannot change while the datapath runs).
    pub pin_path: std::path::PathBuf,
    /// `agent.log_level` as written.
    pub log_level: String,
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
            services: (policy.services.iter().enumerate())
                .map(|(i, s)| ServiceInfo {
                    id: u32::try_from(i).unwrap_or(u32::MAX),
                    ..describe(s)
                })
                .collect(),
            compiled,
            pacing,
            pin_path: policy.agent.pin_path.clone(),
            log_level: policy.agent.log_level.to_string(),
            backends: policy
                .services
                .iter()
                .map(|s| {
                    format!(
                        "{}{:?}{:?}{:?}{:?}",
                        s.name, s.backends, s.health_check, s.circuit_breaker, s.load_balancing
                    )
                })
                .collect(),
        })
    }

    /// Renumbers the compiled policy so that what `running` (the ids the datapath holds)
    /// has keeps its ids; returns the plan and the ids to keep once it is in force.
    pub fn with_ids(mut self, running: &Ids, limits: Limits) -> Result<(Plan, Ids), IdsError> {
        let (compiled, ids) = running.assign(&self.compiled, limits)?;
        for (info, svc) in self.services.iter_mut().zip(&compiled.services) {
            info.id = svc.id;
        }
        self.compiled = compiled;
        Ok((self, ids))
    }

    /// Whether the backends, their health checks, breakers or balancing differ from
    /// `running`'s (the supervisor is started again for them).
    pub fn backends_differ(&self, running: &Plan) -> bool {
        self.backends != running.backends || self.compiled.backends != running.compiled.backends
    }

    /// Why a reload to this plan cannot be staged while `running` is in force, as (field,
    /// reason): what the kernel cannot change in a live datapath. `capacity` gives a map's
    /// entries as loaded. Everything else changes live.
    pub fn refusal(
        &self,
        policy: &Policy,
        running: &Plan,
        capacity: impl Fn(&'static str) -> Option<u32>,
    ) -> Option<(String, String)> {
        use agent_common::maps::{MAP_RL_BUCKETS, MAP_SHAPE_NEXT};
        let restart = "restart the agent to apply it (the pinned maps it can keep are adopted)";
        if policy.agent.pin_path != running.pin_path {
            return Some((
                "agent.pin_path".into(),
                format!(
                    "the running datapath is pinned at {}; it cannot move while it runs: {restart}",
                    running.pin_path.display()
                ),
            ));
        }
        if self.compiled.tables != running.compiled.tables {
            return Some((
                "agent.tables".into(),
                format!("the kernel cannot resize a map in use: {restart}"),
            ));
        }
        for (total, map, what, knob) in [
            (
                self.compiled.max_keys,
                MAP_RL_BUCKETS,
                "rate_limit.max_keys",
                "agent.tables.keys",
            ),
            (
                self.compiled.shape_keys,
                MAP_SHAPE_NEXT,
                "shaping.max_keys",
                "agent.tables.departures",
            ),
        ] {
            if let Some(cap) = capacity(map)
                && total > cap
            {
                return Some((
                    "services".into(),
                    format!(
                        "the total of {what} is {total}, more than the {cap} entries the \
                         running {map} table was made with (the kernel cannot resize a map in \
                         use): lower it, or {restart} ({knob} set higher at start leaves room \
                         for reloads)"
                    ),
                ));
            }
        }
        for (n, spec) in self.attach.iter().enumerate() {
            if let Some(old) = running
                .attach
                .iter()
                .find(|o| o.interface == spec.interface)
                && old.ingress
                && spec.ingress
                && old.xdp_mode != spec.xdp_mode
            {
                return Some((
                    format!("interfaces[{n}].xdp_mode"),
                    format!(
                        "the kernel cannot change the mode of an attached XDP program; the \
                         program would have to leave {} for a moment: {restart}, or remove \
                         the interface in one reload and add it back in the next",
                        spec.interface
                    ),
                ));
            }
        }
        None
    }

    /// Whether the running datapath already holds exactly this plan (nothing to write).
    pub fn same_as(&self, running: &Plan) -> bool {
        self.compiled == running.compiled
            && self.attach == running.attach
            && self.pacing == running.pacing
            && self.listen == running.listen
            && self.backends == running.backends
            && self.services == running.services
            && self.log_level == running.log_level
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
    // A companion is never classified into: its service's degraded new flows reach it.
    let matches = match s.name.strip_suffix(COMPANION_SUFFIX) {
        Some(parent) if s.is_companion() => format!("fallback of {parent} ({matches})"),
        _ => matches,
    };
    ServiceInfo {
        // Policy order until `Plan::with_ids` gives the stable ids.
        id: 0,
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
