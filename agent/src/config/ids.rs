//! Stable datapath ids across reloads. `compile` numbers services, breakers and balanced
//! backends by their position in the policy; a reload that inserts a service would shift
//! every later one's id, and with it its token buckets, counters, breaker counters and the
//! backend indices its established flows hold. [`Ids::assign`] renumbers a compiled policy so
//! that what the running policy already has keeps its id:
//! - a service keeps its id by name;
//! - a breaker keeps its id (`BACKEND_STATS`) by backend address and keys;
//! - a balanced service keeps its range of LB indices while its backend addresses are the same
//!   list; otherwise it gets a new contiguous range (the datapath walks `base..base + count`).
//!
//! New ids never take one the running policy holds (its entries stay live until the switch),
//! and are handed out round robin from where the last allocation ended, so an id a reload
//! freed is not given to another service or backend soon: a flow established toward a removed
//! backend keeps its LB index until it ends, and what the LRU tables hold under a removed
//! service's id ages out before that id is used again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use agent_common::breaker::BackendKey;

use super::Compiled;

/// What a policy cannot take because a table is full: the reload is refused with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdsError {
    #[error(
        "no free service id: the running and the new policy together need more than \
         agent.tables.services ({0}) ids while the new one is staged"
    )]
    Services(u32),
    #[error(
        "no free breaker id: the running and the new policy together need more than \
         agent.tables.backends ({0}) ids while the new one is staged"
    )]
    Breakers(u32),
    #[error(
        "no free run of {need} LB indices for service \"{service}\": the running and the new \
         policy together need more than agent.tables.backends ({limit}) while the new one is \
         staged"
    )]
    Balanced {
        service: String,
        need: u32,
        limit: u32,
    },
}

/// The ids a policy in the datapath holds, by what they identify.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ids {
    /// Service name -> service id.
    services: BTreeMap<String, u32>,
    /// (backend address, its `BACKENDS` keys) -> breaker id.
    breakers: BTreeMap<(SocketAddr, Vec<BackendKey>), u32>,
    /// Service id -> (first LB index, its backends' keys in order).
    ranges: BTreeMap<u32, (u32, Vec<BackendKey>)>,
    /// Ids held in the datapath by entries this agent cannot name (found at start in adopted
    /// maps): never handed out while they are live.
    reserved_services: BTreeSet<u32>,
    reserved_breakers: BTreeSet<u32>,
    /// Where the next search for a free id starts.
    cursor: Cursors,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Cursors {
    service: u32,
    breaker: u32,
    lb: u32,
}

/// Table sizes ids must stay below (`agent.tables` as loaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub services: u32,
    pub backends: u32,
}

impl Ids {
    /// The ids of `compiled` as they are (a fresh start on empty maps: policy order).
    pub fn of(compiled: &Compiled) -> Ids {
        let mut ids = Ids::default();
        for s in &compiled.services {
            ids.services.insert(s.name.clone(), s.id);
            ids.cursor.service = ids.cursor.service.max(s.id + 1);
        }
        for b in &compiled.backends {
            ids.breakers.insert((b.address, b.keys.clone()), b.id);
            ids.cursor.breaker = ids.cursor.breaker.max(b.id + 1);
        }
        for l in &compiled.lb {
            let keys = l.backends.iter().map(|b| b.key).collect();
            ids.ranges.insert(l.id, (l.backend_base, keys));
            ids.cursor.lb = ids.cursor.lb.max(l.backend_base + l.backends.len() as u32);
        }
        ids
    }

    /// Adds ids the datapath holds for entries no compiled policy names (adopted maps).
    /// Balanced ranges need none: every live one is recovered by its service id.
    pub fn reserve(
        &mut self,
        services: impl IntoIterator<Item = u32>,
        breakers: impl IntoIterator<Item = u32>,
    ) {
        let named: BTreeSet<u32> = self.services.values().copied().collect();
        self.reserved_services
            .extend(services.into_iter().filter(|i| !named.contains(i)));
        let named: BTreeSet<u32> = self.breakers.values().copied().collect();
        self.reserved_breakers
            .extend(breakers.into_iter().filter(|i| !named.contains(i)));
        for &i in &self.reserved_services {
            self.cursor.service = self.cursor.service.max(i + 1);
        }
        for &i in &self.reserved_breakers {
            self.cursor.breaker = self.cursor.breaker.max(i + 1);
        }
    }

    /// Ids recovered from adopted maps: services by name (`SVC_NAMES`), breakers by their
    /// keys (`BACKENDS`), balanced ranges by service id (`LB_SVC`, `LB_BACKENDS`).
    pub fn recovered(
        services: impl IntoIterator<Item = (String, u32)>,
        breakers: impl IntoIterator<Item = ((SocketAddr, Vec<BackendKey>), u32)>,
        ranges: impl IntoIterator<Item = (u32, (u32, Vec<BackendKey>))>,
    ) -> Ids {
        let mut ids = Ids {
            services: services.into_iter().collect(),
            breakers: breakers.into_iter().collect(),
            ranges: ranges.into_iter().collect(),
            ..Ids::default()
        };
        ids.cursor = Cursors {
            service: ids.services.values().map(|i| i + 1).max().unwrap_or(0),
            breaker: ids.breakers.values().map(|i| i + 1).max().unwrap_or(0),
            lb: (ids.ranges.values())
                .map(|(b, k)| b + k.len() as u32)
                .max()
                .unwrap_or(0),
        };
        ids
    }

    /// The service id `name` has, if any.
    pub fn service(&self, name: &str) -> Option<u32> {
        self.services.get(name).copied()
    }

    /// Renumbers `compiled` (numbered by position) to keep the ids this policy holds, and
    /// returns the ids of the result: what to keep once it is switched to.
    pub fn assign(&self, compiled: &Compiled, limits: Limits) -> Result<(Compiled, Ids), IdsError> {
        let mut out = compiled.clone();
        let mut next = Ids {
            cursor: self.cursor,
            ..Ids::default()
        };

        // Services: positional id -> stable id.
        let mut taken: BTreeSet<u32> = self.services.values().copied().collect();
        taken.extend(&self.reserved_services);
        let mut by_position = Vec::with_capacity(out.services.len());
        // Kept ids first, so a new service never takes an id a kept one is about to claim.
        for s in &out.services {
            if let Some(&id) = self.services.get(&s.name) {
                next.services.insert(s.name.clone(), id);
            }
        }
        for s in &mut out.services {
            let id = match next.services.get(&s.name) {
                Some(&id) => id,
                None => {
                    let id = allocate(&mut next.cursor.service, limits.services, |i| {
                        taken.contains(&i)
                    })
                    .ok_or(IdsError::Services(limits.services))?;
                    taken.insert(id);
                    next.services.insert(s.name.clone(), id);
                    id
                }
            };
            by_position.push(id);
            s.id = id;
        }
        let stable = |position: u32| by_position.get(position as usize).copied();
        for s in &mut out.services {
            if let Some(companion) = s.config.fallback_id() {
                s.config.fallback = stable(companion).map_or(0, |id| id + 1);
            }
        }
        for e in &mut out.classify {
            let count = e.rules.count as usize;
            for r in e.rules.rules.iter_mut().take(count) {
                r.service_id = stable(r.service_id).unwrap_or(u32::MAX);
            }
        }

        // Breakers.
        let mut taken: BTreeSet<u32> = self.breakers.values().copied().collect();
        taken.extend(&self.reserved_breakers);
        for b in &out.backends {
            if let Some(&id) = self.breakers.get(&(b.address, b.keys.clone())) {
                next.breakers.insert((b.address, b.keys.clone()), id);
            }
        }
        for b in &mut out.backends {
            let identity = (b.address, b.keys.clone());
            b.id = match next.breakers.get(&identity) {
                Some(&id) => id,
                None => {
                    let id = allocate(&mut next.cursor.breaker, limits.backends, |i| {
                        taken.contains(&i)
                    })
                    .ok_or(IdsError::Breakers(limits.backends))?;
                    taken.insert(id);
                    next.breakers.insert(identity, id);
                    id
                }
            };
        }

        // Balanced services: the datapath id, and a range kept or new.
        let mut used: Vec<(u32, u32)> = self
            .ranges
            .values()
            .map(|(b, a)| (*b, a.len() as u32))
            .collect();
        for l in &mut out.lb {
            l.id = stable(l.id).unwrap_or(u32::MAX);
            let keys: Vec<BackendKey> = l.backends.iter().map(|b| b.key).collect();
            if let Some((base, old)) = self.ranges.get(&l.id)
                && *old == keys
            {
                l.backend_base = *base;
                next.ranges.insert(l.id, (*base, keys));
            }
        }
        used.extend(next.ranges.values().map(|(b, a)| (*b, a.len() as u32)));
        for l in &mut out.lb {
            if next.ranges.contains_key(&l.id) {
                continue;
            }
            let need = l.backends.len() as u32;
            let base = allocate_run(&mut next.cursor.lb, need, limits.backends, &used).ok_or_else(
                || IdsError::Balanced {
                    service: l.name.clone(),
                    need,
                    limit: limits.backends,
                },
            )?;
            used.push((base, need));
            l.backend_base = base;
            next.ranges
                .insert(l.id, (base, l.backends.iter().map(|b| b.key).collect()));
        }
        Ok((out, next))
    }
}

/// The first id from `cursor` on (wrapping below `limit`) that is not taken; moves the cursor
/// past it.
fn allocate(cursor: &mut u32, limit: u32, taken: impl Fn(u32) -> bool) -> Option<u32> {
    let start = if *cursor >= limit { 0 } else { *cursor };
    for k in 0..limit {
        let id = (start + k) % limit;
        if !taken(id) {
            *cursor = id + 1;
            return Some(id);
        }
    }
    None
}

/// The first run of `need` indices from `cursor` on (wrapping below `limit`) that overlaps no
/// range of `used`; moves the cursor past it.
fn allocate_run(cursor: &mut u32, need: u32, limit: u32, used: &[(u32, u32)]) -> Option<u32> {
    if need == 0 {
        return Some(*cursor % limit.max(1));
    }
    if need > limit {
        return None;
    }
    let overlaps = |base: u32| {
        used.iter()
            .any(|&(b, n)| n > 0 && base < b + n && b < base + need)
    };
    let start = if *cursor >= limit { 0 } else { *cursor };
    // Candidates: the cursor, 0, and the end of every used range; in the cursor's order.
    let mut candidates: Vec<u32> = std::iter::once(start)
        .chain(std::iter::once(0))
        .chain(used.iter().map(|&(b, n)| b + n))
        .filter(|&b| b + need <= limit)
        .collect();
    candidates.sort_by_key(|&b| (b < start, b));
    candidates.dedup();
    let base = candidates.into_iter().find(|&b| !overlaps(b))?;
    *cursor = base + need;
    Some(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, load_str};

    const LIMITS: Limits = Limits {
        services: 16,
        backends: 16,
    };

    fn compiled(services: &[(&str, &str, &[u16])]) -> Compiled {
        let mut src = String::from("version: 1\ninterfaces:\n  - name: eth0\nservices:\n");
        for (name, vip, ports) in services {
            src += &format!(
                "  - name: {name}\n    match: {{address: {vip}, port: 80, protocol: tcp}}\n"
            );
            if !ports.is_empty() {
                src += "    load_balancing: {vip: true, algorithm: least_conn}\n";
                src += "    circuit_breaker: {failure_threshold: 5}\n    backends:\n";
                for p in *ports {
                    src += &format!("      - address: 10.1.0.1:{p}\n");
                }
            }
        }
        match load_str(&src, "t.yaml") {
            Ok(p) => compile(&p),
            Err(e) => panic!("{e}\n{src}"),
        }
    }

    fn id_of(c: &Compiled, name: &str) -> u32 {
        c.services.iter().find(|s| s.name == name).unwrap().id
    }

    #[test]
    fn a_service_inserted_first_shifts_no_other_id() {
        let a = compiled(&[("a", "10.0.0.1", &[]), ("b", "10.0.0.2", &[])]);
        let ids = Ids::of(&a);
        let b = compiled(&[
            ("new", "10.0.0.3", &[]),
            ("a", "10.0.0.1", &[]),
            ("b", "10.0.0.2", &[]),
        ]);
        let (b, next) = ids.assign(&b, LIMITS).unwrap();
        assert_eq!(
            (id_of(&b, "a"), id_of(&b, "b"), id_of(&b, "new")),
            (0, 1, 2)
        );
        // The classifier names the stable ids.
        let named: BTreeSet<u32> = b
            .classify
            .iter()
            .flat_map(|e| e.rules.rules[..e.rules.count as usize].iter())
            .map(|r| r.service_id)
            .collect();
        assert_eq!(named, BTreeSet::from([0, 1, 2]));
        assert_eq!(next.service("new"), Some(2));
    }

    #[test]
    fn a_removed_service_id_is_not_reused_at_once() {
        let a = compiled(&[("a", "10.0.0.1", &[]), ("b", "10.0.0.2", &[])]);
        let ids = Ids::of(&a);
        // b removed and c added in one reload: c must not take b's id (still live).
        let (c1, ids) = ids
            .assign(
                &compiled(&[("a", "10.0.0.1", &[]), ("c", "10.0.0.3", &[])]),
                LIMITS,
            )
            .unwrap();
        assert_eq!(id_of(&c1, "c"), 2);
        // Nor in the next: round robin moves on.
        let (c2, _) = ids
            .assign(
                &compiled(&[
                    ("a", "10.0.0.1", &[]),
                    ("c", "10.0.0.3", &[]),
                    ("d", "10.0.0.4", &[]),
                ]),
                LIMITS,
            )
            .unwrap();
        assert_eq!(id_of(&c2, "d"), 3);
    }

    #[test]
    fn ids_run_out_with_a_clear_error_and_wrap_otherwise() {
        let limits = Limits {
            services: 2,
            backends: 16,
        };
        let a = compiled(&[("a", "10.0.0.1", &[]), ("b", "10.0.0.2", &[])]);
        let ids = Ids::of(&a);
        let err = ids
            .assign(
                &compiled(&[("a", "10.0.0.1", &[]), ("c", "10.0.0.3", &[])]),
                limits,
            )
            .unwrap_err();
        assert_eq!(err, IdsError::Services(2));
        // Once b is gone from the live policy, its id is free again (wrapping).
        let (_, ids) = ids
            .assign(&compiled(&[("a", "10.0.0.1", &[])]), limits)
            .unwrap();
        let (c, _) = ids
            .assign(
                &compiled(&[("a", "10.0.0.1", &[]), ("c", "10.0.0.3", &[])]),
                limits,
            )
            .unwrap();
        assert_eq!(id_of(&c, "c"), 1);
    }

    #[test]
    fn balanced_ranges_stay_while_the_backends_do() {
        let a = compiled(&[("x", "10.0.0.1", &[1, 2]), ("y", "10.0.0.2", &[3, 4])]);
        let ids = Ids::of(&a);
        assert_eq!((a.lb[0].backend_base, a.lb[1].backend_base), (0, 2));
        // x gains a backend: a new range after everything live; y keeps its range.
        let b = compiled(&[("x", "10.0.0.1", &[1, 2, 5]), ("y", "10.0.0.2", &[3, 4])]);
        let (b, ids) = ids.assign(&b, LIMITS).unwrap();
        assert_eq!((b.lb[0].backend_base, b.lb[1].backend_base), (4, 2));
        // Breakers keep their ids by address; the new one takes a fresh id.
        let by_port = |c: &Compiled, p: u16| {
            c.backends
                .iter()
                .find(|x| x.address.port() == p)
                .unwrap()
                .id
        };
        assert_eq!((by_port(&b, 1), by_port(&b, 4), by_port(&b, 5)), (0, 3, 4));
        let too_many: Vec<u16> = (1..=13).collect();
        let d = compiled(&[("z", "10.0.0.3", &too_many)]);
        assert!(matches!(
            ids.assign(&d, LIMITS),
            Err(IdsError::Balanced { need: 13, .. })
        ));
    }

    #[test]
    fn a_run_that_does_not_fit_before_the_end_wraps_to_a_free_one() {
        let mut cursor = 7;
        assert_eq!(allocate_run(&mut cursor, 3, 8, &[(3, 4)]), Some(0));
        assert_eq!(cursor, 3);
        let mut cursor = 7;
        assert_eq!(allocate_run(&mut cursor, 4, 8, &[(3, 4)]), None);
        let mut cursor = 0;
        assert_eq!(allocate_run(&mut cursor, 2, 8, &[(0, 2), (4, 1)]), Some(2));
    }

    #[test]
    fn reserved_ids_are_never_handed_out() {
        let a = compiled(&[("a", "10.0.0.1", &[])]);
        let mut ids = Ids::of(&a);
        ids.reserve([1, 2], []);
        let (b, _) = ids
            .assign(
                &compiled(&[("a", "10.0.0.1", &[]), ("b", "10.0.0.2", &[])]),
                LIMITS,
            )
            .unwrap();
        assert_eq!(id_of(&b, "b"), 3);
    }

    #[test]
    fn the_same_policy_gets_the_same_ids() {
        let a = compiled(&[("x", "10.0.0.1", &[1, 2]), ("y", "10.0.0.2", &[])]);
        let ids = Ids::of(&a);
        let (again, next) = ids.assign(&a, LIMITS).unwrap();
        assert_eq!(again, a);
        assert_eq!(next.services, ids.services);
    }
}
