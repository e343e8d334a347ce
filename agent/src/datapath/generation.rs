//! The policy in the maps is double-buffered. Every packet reads `POLICY_GEN` once and then
//! only the entries of that generation: its classifier entries (the generation byte of the
//! trie key) and its service's entries in `SVC_CFG`, `LB_SVC` and `LB_TABLES`
//! (`generation_slot`). A new policy is written whole under the other generation
//! ([`Datapath::stage`]; the balancer writes its services' entries and tables there too),
//! then the datapath switches to it with one write ([`Datapath::switch`]). A packet therefore
//! meets the old policy or the new one, never half of each.
//!
//! What is not double-buffered is shared by both generations and written so that either may
//! use it: breaker entries (`BACKENDS`, keyed by backend address) of new backends are added
//! before the switch (closed: they refuse nothing) and those of removed backends deleted after
//! it ([`Datapath::retire_backends`]); LB indices of new ranges are written before (no live
//! entry points at them); counters, token buckets and round-robin positions stay per service
//! id, which a reload keeps (`config::ids`).
//!
//! The generation a switch left is not cleared: a packet that read the old generation just
//! before the switch may still be using its entries. The next stage overwrites them, one
//! reload later.

use std::collections::{BTreeMap, BTreeSet};

use agent_common::{
    MatchList, ServiceConfig,
    breaker::{BackendKey, BackendState},
    classify::{
        CLASSIFY_KEY_LEN, GEN_PREFIX_BITS, GENERATIONS, ServiceName, classify_key, generation_slot,
    },
    degrade::MODE_NORMAL,
    lb::{LB_F_ACTIVE, LbBackend, LbService},
    maps::{
        MAP_BACKENDS, MAP_CLASSIFY, MAP_DEGRADE, MAP_LB_BACKENDS, MAP_LB_SVC, MAP_POLICY_GEN,
        MAP_SVC_CFG, MAP_SVC_NAMES,
    },
};
use aya::maps::{
    Array, HashMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use serde::Serialize;

use super::{ApplyReport, Datapath, DatapathError, map_err, typed, typed_mut};
use crate::config::{Compiled, ids::Ids};

type Trie<T> = LpmTrie<T, [u8; CLASSIFY_KEY_LEN], MatchList>;

/// Which generation is live, and which service ids have entries in each.
#[derive(Debug, Clone, Default)]
pub(super) struct Generations {
    pub live: u32,
    /// Per generation: ids whose `SVC_CFG` or `LB_SVC` entry may be set (what a stage of that
    /// generation must clear when the new policy has no such id).
    pub written: [BTreeSet<u32>; GENERATIONS as usize],
}

impl Generations {
    /// Reads the live generation and the ids set in each (a start on adopted maps; empty
    /// maps give generation 0 and nothing written).
    pub(super) fn read(ebpf: &aya::Ebpf, services: u32) -> Result<Generations, DatapathError> {
        let r#gen: Array<&MapData, u32> = typed(ebpf, MAP_POLICY_GEN)?;
        let live = r#gen.get(&0, 0).map_err(map_err(MAP_POLICY_GEN))? & 1;
        let cfg: Array<&MapData, ServiceConfig> = typed(ebpf, MAP_SVC_CFG)?;
        let lb: Array<&MapData, LbService> = typed(ebpf, MAP_LB_SVC)?;
        let mut written: [BTreeSet<u32>; 2] = Default::default();
        for id in 0..services {
            for g in 0..GENERATIONS {
                let slot = generation_slot(id, g);
                let set = cfg.get(&slot, 0).map_err(map_err(MAP_SVC_CFG))?
                    != ServiceConfig::default()
                    || lb.get(&slot, 0).map_err(map_err(MAP_LB_SVC))? != LbService::default();
                if set {
                    written[g as usize].insert(id);
                }
            }
        }
        Ok(Generations { live, written })
    }
}

/// A policy written under the generation the datapath does not read yet.
#[derive(Debug)]
#[must_use = "switch to it, or unstage it"]
pub struct Staged {
    pub generation: u32,
    pub report: ApplyReport,
    /// `BACKENDS` keys this stage added (removed again if the reload is abandoned).
    added_backends: Vec<BackendKey>,
}

impl Datapath {
    /// The policy generation the datapath reads now.
    pub fn generation(&self) -> u32 {
        self.generations.live
    }

    /// Writes `compiled` (ids already assigned by `config::ids`) under the generation the
    /// datapath does not read, changing only what differs from what that generation holds.
    /// Breaker entries of new backends are added (closed). On an error, what was written is
    /// not live; [`Datapath::unstage`] removes the breaker entries it added.
    pub fn stage(&mut self, compiled: &Compiled) -> Result<Staged, DatapathError> {
        let g = self.generations.live ^ 1;
        let mut staged = Staged {
            generation: g,
            report: ApplyReport::default(),
            added_backends: Vec::new(),
        };
        let ids: BTreeSet<u32> = compiled.services.iter().map(|s| s.id).collect();
        // Whatever happens below, these ids may hold entries of generation `g` from now on.
        self.generations.written[g as usize].extend(&ids);
        match self.stage_into(compiled, g, &ids, &mut staged) {
            Ok(()) => {
                let stale: Vec<u32> = self.generations.written[g as usize]
                    .difference(&ids)
                    .copied()
                    .collect();
                for id in stale {
                    self.generations.written[g as usize].remove(&id);
                }
                Ok(staged)
            }
            Err(e) => {
                self.unstage(staged);
                Err(e)
            }
        }
    }

    fn stage_into(
        &mut self,
        compiled: &Compiled,
        g: u32,
        ids: &BTreeSet<u32>,
        staged: &mut Staged,
    ) -> Result<(), DatapathError> {
        let report = &mut staged.report;
        let ebpf = &mut self.ebpf;

        let mut names: Array<&mut MapData, ServiceName> = typed_mut(&mut *ebpf, MAP_SVC_NAMES)?;
        for svc in &compiled.services {
            let name = ServiceName::new(&svc.name).unwrap_or_default();
            if names.get(&svc.id, 0).map_err(map_err(MAP_SVC_NAMES))? != name {
                names.set(svc.id, name, 0).map_err(map_err(MAP_SVC_NAMES))?;
            }
        }

        // An id new to the policy starts normal, whatever a service that held it long ago
        // left (`Ids` never hands out an id the live generation holds).
        let live = &self.generations.written[(g ^ 1) as usize];
        let mut modes: Array<&mut MapData, u32> = typed_mut(&mut *ebpf, MAP_DEGRADE)?;
        for &id in ids.difference(live) {
            modes
                .set(id, MODE_NORMAL, 0)
                .map_err(map_err(MAP_DEGRADE))?;
        }

        let mut cfg: Array<&mut MapData, ServiceConfig> = typed_mut(&mut *ebpf, MAP_SVC_CFG)?;
        for svc in &compiled.services {
            let slot = generation_slot(svc.id, g);
            if cfg.get(&slot, 0).map_err(map_err(MAP_SVC_CFG))? != svc.config {
                cfg.set(slot, svc.config, 0).map_err(map_err(MAP_SVC_CFG))?;
                report.services_written += 1;
            }
        }
        // Ids of generation `g` the new policy does not have: their configuration goes.
        let stale: Vec<u32> = self.generations.written[g as usize]
            .difference(ids)
            .copied()
            .collect();
        for &id in &stale {
            let slot = generation_slot(id, g);
            if cfg.get(&slot, 0).map_err(map_err(MAP_SVC_CFG))? != ServiceConfig::default() {
                cfg.set(slot, ServiceConfig::default(), 0)
                    .map_err(map_err(MAP_SVC_CFG))?;
                report.services_cleared += 1;
            }
        }
        // A service not balanced (or gone) has no `LB_SVC` entry in `g`; the balancer writes
        // the balanced ones' under `g` before the switch.
        let balanced: BTreeSet<u32> = compiled.lb.iter().map(|l| l.id).collect();
        let mut lb: Array<&mut MapData, LbService> = typed_mut(&mut *ebpf, MAP_LB_SVC)?;
        for id in ids.iter().chain(&stale).filter(|id| !balanced.contains(id)) {
            let slot = generation_slot(*id, g);
            if lb.get(&slot, 0).map_err(map_err(MAP_LB_SVC))? != LbService::default() {
                lb.set(slot, LbService::default(), 0)
                    .map_err(map_err(MAP_LB_SVC))?;
            }
        }

        let mut trie: Trie<&mut MapData> = typed_mut(&mut *ebpf, MAP_CLASSIFY)?;
        let mut wanted = BTreeSet::new();
        for entry in &compiled.classify {
            let key = Key::new(
                GEN_PREFIX_BITS + entry.prefix_len,
                classify_key(g, &entry.addr),
            );
            wanted.insert((key.prefix_len(), key.data()));
            if trie.get(&key, 0).ok() != Some(entry.rules) {
                trie.insert(&key, entry.rules, 0)
                    .map_err(map_err(MAP_CLASSIFY))?;
                report.prefixes_written += 1;
            }
        }
        let stale: Vec<Key<[u8; CLASSIFY_KEY_LEN]>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data()[0] == g as u8 && !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for key in stale {
            trie.remove(&key).map_err(map_err(MAP_CLASSIFY))?;
            report.prefixes_removed += 1;
        }

        let (added, ports) = self.add_missing_backends(&compiled.backends)?;
        report.backends_written = added.len();
        staged.added_backends = added;
        self.mark_ports(ports)?;
        Ok(())
    }

    /// Makes the staged generation the live one: one write of `POLICY_GEN`.
    pub fn switch(&mut self, staged: Staged) -> Result<ApplyReport, DatapathError> {
        let mut r#gen: Array<&mut MapData, u32> = typed_mut(&mut self.ebpf, MAP_POLICY_GEN)?;
        if let Err(e) = r#gen.set(0, staged.generation, 0) {
            self.unstage(staged);
            return Err(map_err(MAP_POLICY_GEN)(e));
        }
        self.generations.live = staged.generation;
        Ok(staged.report)
    }

    /// Abandons a stage: removes the breaker entries it added (nothing else it wrote is live).
    pub fn unstage(&mut self, staged: Staged) {
        if staged.added_backends.is_empty() {
            return;
        }
        match typed_mut::<HashMap<&mut MapData, BackendKey, BackendState>>(
            &mut self.ebpf,
            MAP_BACKENDS,
        ) {
            Ok(mut map) => {
                for key in &staged.added_backends {
                    if let Err(e) = map.remove(key) {
                        tracing::warn!("abandoned reload: removing a breaker entry it added: {e}");
                    }
                }
            }
            Err(e) => tracing::warn!("abandoned reload: {e}"),
        }
    }

    /// Writes a compiled policy and switches to it: [`Datapath::stage`] then
    /// [`Datapath::switch`], for callers that balance nothing (the balancer writes its
    /// entries between the two) or write the balancing maps of the live generation after.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<ApplyReport, DatapathError> {
        let staged = self.stage(compiled)?;
        let report = self.switch(staged)?;
        self.retire_backends(compiled)?;
        Ok(report)
    }

    /// After a switch: deletes the breaker entries of backends the live policy no longer has,
    /// and rewrites the flags and id of those whose breaker settings changed (their state
    /// kept). Returns (removed, rewritten). Service ids the switch left have their
    /// degradation mode reset to normal.
    pub fn retire_backends(
        &mut self,
        compiled: &Compiled,
    ) -> Result<(usize, usize), DatapathError> {
        self.retire_modes(compiled)?;
        let mut map: HashMap<&mut MapData, BackendKey, BackendState> =
            typed_mut(&mut self.ebpf, MAP_BACKENDS)?;
        let wanted: BTreeMap<BackendKey, (u32, u32)> = compiled
            .backends
            .iter()
            .flat_map(|b| b.keys.iter().map(move |k| (*k, (b.flags, b.id))))
            .collect();
        let present: Vec<(BackendKey, BackendState)> = map.iter().filter_map(Result::ok).collect();
        let (mut removed, mut rewritten) = (0, 0);
        for (key, state) in present {
            match wanted.get(&key) {
                None => match map.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => removed += 1,
                    Err(e) => return Err(map_err(MAP_BACKENDS)(e)),
                },
                Some(&(flags, id)) if state.flags != flags || state.id != id => {
                    let new = BackendState { flags, id, ..state };
                    map.insert(key, new, 0).map_err(map_err(MAP_BACKENDS))?;
                    rewritten += 1;
                }
                Some(_) => {}
            }
        }
        Ok((removed, rewritten))
    }

    /// Resets `DEGRADE` of the ids the other generation (the policy the switch left) holds
    /// and `compiled` does not: a mode never outlives its service. Done after the switch, so
    /// that a service stays degraded until it is gone (a stage may be abandoned).
    fn retire_modes(&mut self, compiled: &Compiled) -> Result<(), DatapathError> {
        let ids: BTreeSet<u32> = compiled.services.iter().map(|s| s.id).collect();
        let left = &self.generations.written[(self.generations.live ^ 1) as usize];
        let mut modes: Array<&mut MapData, u32> = typed_mut(&mut self.ebpf, MAP_DEGRADE)?;
        for &id in left.difference(&ids) {
            if modes.get(&id, 0).map_err(map_err(MAP_DEGRADE))? != MODE_NORMAL {
                modes
                    .set(id, MODE_NORMAL, 0)
                    .map_err(map_err(MAP_DEGRADE))?;
            }
        }
        Ok(())
    }

    /// The ids the live generation holds: by name for services (`SVC_NAMES`), by key for
    /// breakers, by service id for balanced ranges. What `compiled` does not name is reserved.
    /// Empty maps give empty ids (a fresh start numbers the policy in order).
    pub fn live_ids(&self, compiled: &Compiled) -> Result<Ids, DatapathError> {
        let g = self.generations.live;
        let live = &self.generations.written[g as usize];
        let names: Array<&MapData, ServiceName> = typed(&self.ebpf, MAP_SVC_NAMES)?;
        let cfg: Array<&MapData, ServiceConfig> = typed(&self.ebpf, MAP_SVC_CFG)?;
        let lb: Array<&MapData, LbService> = typed(&self.ebpf, MAP_LB_SVC)?;
        let lb_backends: Array<&MapData, LbBackend> = typed(&self.ebpf, MAP_LB_BACKENDS)?;
        let mut services = Vec::new();
        let mut unnamed = Vec::new();
        let mut ranges = Vec::new();
        for &id in live {
            let slot = generation_slot(id, g);
            let svc = lb.get(&slot, 0).map_err(map_err(MAP_LB_SVC))?;
            if svc.flags & LB_F_ACTIVE != 0 {
                let keys = (svc.backend_base..svc.backend_base + svc.backend_count)
                    .map(|i| lb_backends.get(&i, 0).map(|b| b.key))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(map_err(MAP_LB_BACKENDS))?;
                ranges.push((id, (svc.backend_base, keys)));
            }
            if cfg.get(&slot, 0).map_err(map_err(MAP_SVC_CFG))? == ServiceConfig::default() {
                continue;
            }
            match names.get(&id, 0).map_err(map_err(MAP_SVC_NAMES))?.as_str() {
                Some(name) => services.push((name.to_string(), id)),
                None => unnamed.push(id),
            }
        }
        let map: HashMap<&MapData, BackendKey, BackendState> = typed(&self.ebpf, MAP_BACKENDS)?;
        let present: BTreeMap<BackendKey, u32> = map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, v.id))
            .collect();
        let mut named = BTreeSet::new();
        let mut breakers = Vec::new();
        for b in &compiled.backends {
            if let Some(&id) = b.keys.first().and_then(|k| present.get(k)) {
                named.insert(id);
                breakers.push(((b.address, b.keys.clone()), id));
            }
        }
        let mut ids = Ids::recovered(services, breakers, ranges);
        ids.reserve(
            unnamed,
            present.values().copied().filter(|i| !named.contains(i)),
        );
        Ok(ids)
    }

    /// The live generation as the maps hold it, by service name: what a reloaded agent and a
    /// fresh one on the same policy must agree on (ids may differ, contents may not).
    pub fn live_policy(&self) -> Result<LivePolicy, DatapathError> {
        let g = self.generations.live;
        let names: Array<&MapData, ServiceName> = typed(&self.ebpf, MAP_SVC_NAMES)?;
        let cfg: Array<&MapData, ServiceConfig> = typed(&self.ebpf, MAP_SVC_CFG)?;
        let lb: Array<&MapData, LbService> = typed(&self.ebpf, MAP_LB_SVC)?;
        let lb_backends: Array<&MapData, LbBackend> = typed(&self.ebpf, MAP_LB_BACKENDS)?;
        let name_of = |id: u32| -> Result<String, DatapathError> {
            Ok(names
                .get(&id, 0)
                .map_err(map_err(MAP_SVC_NAMES))?
                .as_str()
                .map_or_else(|| format!("#{id}"), str::to_string))
        };
        let mut out = LivePolicy {
            generation: g,
            ..LivePolicy::default()
        };
        let trie: Trie<&MapData> = typed(&self.ebpf, MAP_CLASSIFY)?;
        let mut reachable = BTreeSet::new();
        for key in trie.keys().filter_map(Result::ok) {
            if key.data()[0] != g as u8 {
                continue;
            }
            let rules = trie.get(&key, 0).map_err(map_err(MAP_CLASSIFY))?;
            let mut named = Vec::new();
            for r in rules.rules.iter().take(rules.count as usize) {
                reachable.insert(r.service_id);
                named.push(format!("{} {}/{}", name_of(r.service_id)?, r.proto, r.port));
            }
            let addr: [u8; 16] = key.data()[1..].try_into().unwrap_or_default();
            out.classify.insert(
                format!(
                    "{}/{}",
                    std::net::Ipv6Addr::from(addr),
                    key.prefix_len() - GEN_PREFIX_BITS
                ),
                named,
            );
        }
        for id in reachable {
            let slot = generation_slot(id, g);
            let c = cfg.get(&slot, 0).map_err(map_err(MAP_SVC_CFG))?;
            let l = lb.get(&slot, 0).map_err(map_err(MAP_LB_SVC))?;
            let balanced = (l.flags & LB_F_ACTIVE != 0)
                .then(|| {
                    (l.backend_base..l.backend_base + l.backend_count)
                        .map(|i| lb_backends.get(&i, 0).map(|b| format!("{:?}", b.key)))
                        .collect::<Result<Vec<_>, _>>()
                        .map(|b| (l.algorithm, b))
                })
                .transpose()
                .map_err(map_err(MAP_LB_BACKENDS))?;
            out.services.insert(
                name_of(id)?,
                LiveService {
                    config: format!("{c:?}"),
                    balanced,
                },
            );
        }
        let map: HashMap<&MapData, BackendKey, BackendState> = typed(&self.ebpf, MAP_BACKENDS)?;
        for (k, v) in map.iter().filter_map(Result::ok) {
            out.breakers.insert(format!("{k:?}"), v.flags);
        }
        Ok(out)
    }
}

/// [`Datapath::live_policy`]: every value as the maps hold it, ids replaced by names.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct LivePolicy {
    pub generation: u32,
    /// Trie prefix -> its rules as "service proto/port", in the datapath's order.
    pub classify: BTreeMap<String, Vec<String>>,
    /// Every service the classifier reaches.
    pub services: BTreeMap<String, LiveService>,
    /// Breaker entries: key -> flags (states are the breakers', not the policy's).
    pub breakers: BTreeMap<String, u32>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct LiveService {
    /// `SVC_CFG` entry.
    pub config: String,
    /// `LB_SVC`: the algorithm and the backends' keys of its range, in order.
    pub balanced: Option<(u32, Vec<String>)>,
}
