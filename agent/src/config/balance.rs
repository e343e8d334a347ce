//! Compiling the balanced services (`load_balancing.vip`): where each one's backends sit in
//! the datapath's shared arrays, and how long its table is. Weights are not here: they change
//! at run time (health, breakers, slow start) and the balancer writes them.

use std::{net::SocketAddr, time::Duration};

use agent_common::{
    breaker::BackendKey,
    classify::{PROTO_TCP, PROTO_UDP},
    lb::{
        LB_F_ACTIVE, LB_F_PANIC, LB_LEAST_CONN, LB_MAGLEV, LB_WRR, LbService, WRR_MAX_LEN,
        default_maglev_size,
    },
};

use agent_common::policy::{
    model::{Algorithm, Policy, Protocol},
    rules::backend_key,
    units::Percent,
};

/// One balanced service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledLb {
    /// Index of the service in the policy (where the supervisor's `BackendId`s point).
    pub service: usize,
    /// Its service id in the datapath (`LB_SVC`, `LB_TABLES`, counters): the policy index
    /// from `compile`, a stable id after `config::ids::Ids::assign`.
    pub id: u32,
    pub name: String,
    /// The address and port clients connect to (`match`).
    pub vip: SocketAddr,
    pub algorithm: Algorithm,
    pub slow_start: Duration,
    /// `load_balancing.panic_threshold` (0: never).
    pub panic_threshold: Percent,
    /// Entries of its table: the Maglev table size; for weighted round robin the longest
    /// schedule (the sum of configured weights, at most `WRR_MAX_LEN`); 0 for
    /// `least_conn`, which has no table.
    pub capacity: u32,
    /// LB index (in `LB_BACKENDS`) of the first backend; the others follow, in policy order.
    pub backend_base: u32,
    pub backends: Vec<LbBackendPlan>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbBackendPlan {
    pub address: SocketAddr,
    /// Configured weight (0 to 1000).
    pub weight: u32,
    /// The key its breaker has in `BACKENDS` (TCP for services matching `tcp` or `any`).
    pub key: BackendKey,
}

impl CompiledLb {
    /// The service's `LB_SVC` entry; `panic`: health and breakers are ignored.
    pub fn service_entry(&self, panic: bool) -> LbService {
        LbService {
            flags: LB_F_ACTIVE | if panic { LB_F_PANIC } else { 0 },
            algorithm: match self.algorithm {
                Algorithm::Maglev => LB_MAGLEV,
                Algorithm::WeightedRoundRobin => LB_WRR,
                Algorithm::LeastConn => LB_LEAST_CONN,
            },
            backend_base: self.backend_base,
            backend_count: self.backends.len() as u32,
        }
    }

    /// The VIP as the datapath's flow keys hold it (IPv4 as `::ffff:a.b.c.d`).
    pub fn vip_key(&self) -> ([u8; 16], u16) {
        let k = backend_key(self.vip, PROTO_TCP);
        (k.addr, k.port)
    }

    /// LB index of backend `i` of the service.
    pub fn index(&self, i: usize) -> u32 {
        self.backend_base + i as u32
    }
}

/// Every balanced service, in policy order.
pub fn compile_lb(policy: &Policy) -> Vec<CompiledLb> {
    let mut backends = 0u32;
    let mut out = Vec::new();
    for (service, s) in policy.services.iter().enumerate() {
        let lb = s.load_balancing.clone().unwrap_or_default();
        if s.backends.is_empty() || !lb.vip {
            continue;
        }
        let configured: u64 = s.backends.iter().map(|b| u64::from(b.weight)).sum();
        let capacity = match lb.algorithm {
            // Validation refuses a service whose default table would not fit.
            Algorithm::Maglev => (lb.table_size)
                .or_else(|| default_maglev_size(s.backends.len()))
                .unwrap_or_default(),
            Algorithm::WeightedRoundRobin => configured.clamp(1, u64::from(WRR_MAX_LEN)) as u32,
            Algorithm::LeastConn => 0,
        };
        let proto = match s.r#match.protocol {
            Protocol::Udp => PROTO_UDP,
            Protocol::Tcp | Protocol::Any => PROTO_TCP,
        };
        out.push(CompiledLb {
            service,
            id: u32::try_from(service).unwrap_or(u32::MAX),
            name: s.name.clone(),
            vip: SocketAddr::new(s.r#match.address.addr(), s.r#match.port.unwrap_or(0)),
            algorithm: lb.algorithm,
            slow_start: lb.slow_start,
            panic_threshold: lb.panic_threshold,
            capacity,
            backend_base: backends,
            backends: s
                .backends
                .iter()
                .map(|b| LbBackendPlan {
                    address: b.address,
                    weight: u32::from(b.weight),
                    key: backend_key(b.address, proto),
                })
                .collect(),
        });
        backends += s.backends.len() as u32;
    }
    out
}
