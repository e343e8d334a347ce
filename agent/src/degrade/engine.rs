//! The evaluator's pure core: every service's windows, hysteresis and mode, and the shed
//! level, advanced by [`Engine::tick`] with the time passed in; modes go to a [`ModeSink`].

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{
    degrade::{MODE_FALLBACK, MODE_NORMAL, MODE_SHED, mode_name},
    status::{DegradationStatus, PassiveCounts, SheddingStatus},
};

use super::{
    Config, ModeSink, ProbeSample, ServiceSpec,
    condition::{self, Measure},
    hysteresis::{Change, Hysteresis},
    shed::{Level, Present, Shedder},
    view::TransitionCount,
    window::Windows,
};
use crate::{
    breaker::State,
    health::Health,
    supervisor::{Backend, Backends},
};

/// Something the evaluator did that is worth a log line (see its `Display`).
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// A service's mode changed.
    Mode {
        service: Arc<str>,
        from: u32,
        to: u32,
        why: String,
    },
    /// A service of the shed group became degraded or recovered (its mode follows the shed
    /// level, so this is not a mode change).
    Pressure {
        service: Arc<str>,
        change: Change,
        why: String,
    },
    /// The shed level moved.
    Level { from: Level, to: Level, why: String },
    /// Reading a service's mode at start failed: it starts normal.
    ReadFailed {
        service: Arc<str>,
        id: u32,
        error: String,
    },
    /// Writing a mode failed (noted once until a write succeeds); retried every tick.
    WriteFailed {
        service: Arc<str>,
        id: u32,
        mode: u32,
        error: String,
    },
}

impl Note {
    /// Whether it is logged as a warning rather than information.
    pub fn is_warning(&self) -> bool {
        matches!(self, Note::WriteFailed { .. } | Note::ReadFailed { .. })
    }
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Note::Mode {
                service,
                from,
                to,
                why,
            } => write!(
                f,
                "service {service}: {} -> {} ({why})",
                mode_name(*from),
                mode_name(*to)
            ),
            Note::Pressure {
                service,
                change: Change::Degraded,
                why,
            } => write!(f, "{service} degraded ({why}): shedding pressure"),
            Note::Pressure { service, why, .. } => write!(f, "{service} {why}"),
            Note::Level { from, to, why } => write!(f, "shed level: {from} -> {to} ({why})"),
            Note::ReadFailed { service, id, error } => write!(
                f,
                "reading the mode of {service} (id {id}) from the datapath: {error}; it starts normal"
            ),
            Note::WriteFailed {
                service,
                id,
                mode,
                error,
            } => write!(
                f,
                "writing mode {} of {service} (id {id}) to the datapath: {error}; retrying every tick",
                mode_name(*mode)
            ),
        }
    }
}

/// One degradable service.
#[derive(Debug, Clone)]
struct Tracked {
    spec: ServiceSpec,
    windows: Windows,
    hyst: Hysteresis,
    /// The mode decided (and written, unless `written` differs).
    mode: u32,
    /// What the map holds as far as the evaluator knows; `None`: to be written.
    written: Option<u32>,
    /// The last write failed (noted once).
    failing: bool,
    /// Mode transitions by (from, to).
    transitions: BTreeMap<(u32, u32), u64>,
    /// Per condition, as last measured.
    measures: Vec<Measure>,
}

impl Tracked {
    fn new(spec: ServiceSpec, hyst: Hysteresis, mode: u32) -> Tracked {
        Tracked {
            windows: Windows::new(spec.span()),
            measures: vec![Measure::default(); spec.degradation.conditions.len()],
            spec,
            hyst,
            mode,
            written: None,
            failing: false,
            transitions: BTreeMap::new(),
        }
    }
}

/// An id whose service is no longer degradable: its mode goes back to normal.
#[derive(Debug, Clone)]
struct Restore {
    id: u32,
    service: Arc<str>,
    failing: bool,
}

/// The evaluator's state.
#[derive(Debug, Clone)]
pub struct Engine {
    services: Vec<Tracked>,
    by_name: HashMap<Arc<str>, usize>,
    shed: Shedder,
    pressure: bool,
    shed_step: Duration,
    companions: Vec<(String, String)>,
    restore: Vec<Restore>,
}

/// Whether a published backend takes flows: healthy or unchecked, breaker not open.
fn available(b: &Backend) -> bool {
    b.health.is_none_or(|h| h == Health::Healthy) && b.breaker != Some(State::Open)
}

impl Engine {
    /// Starts from what the datapath holds: a service whose mode there is not normal (an
    /// earlier agent's, on adoption) starts degraded, and the shed level starts where the
    /// shed services found shed put it. Then every service's mode is written.
    pub fn start(config: Config, now: Instant, sink: &mut dyn ModeSink) -> (Engine, Vec<Note>) {
        let mut notes = Vec::new();
        let mut level = Level::None;
        let mut services = Vec::with_capacity(config.services.len());
        for spec in config.services {
            let mode = match sink.read(spec.id) {
                Ok(m @ (MODE_FALLBACK | MODE_SHED)) => m,
                Ok(_) => MODE_NORMAL,
                Err(e) => {
                    notes.push(Note::ReadFailed {
                        service: spec.name.clone(),
                        id: spec.id,
                        error: e.to_string(),
                    });
                    MODE_NORMAL
                }
            };
            let hyst = if mode == MODE_NORMAL {
                Hysteresis::new(now, None)
            } else {
                Hysteresis::adopted(now, mode_name(mode))
            };
            if mode == MODE_SHED && spec.sheds() {
                level = level.max(Level::of(spec.priority));
            }
            services.push(Tracked::new(spec, hyst, mode));
        }
        let mut engine = Engine {
            by_name: HashMap::new(),
            services,
            shed: Shedder::new(level, now),
            pressure: false,
            shed_step: config.shed_step,
            companions: config.companions,
            restore: Vec::new(),
        };
        engine.index();
        engine.pressure = engine.pressure_now();
        engine.decide(&mut notes);
        engine.sync(sink, &mut notes);
        (engine, notes)
    }

    fn index(&mut self) {
        self.by_name = (self.services.iter().enumerate())
            .map(|(i, t)| (t.spec.name.clone(), i))
            .collect();
    }

    /// Takes up a reloaded policy: a service of the same name whose `degradation` is
    /// unchanged keeps its state and windows; one whose `degradation` changed starts over
    /// (not degraded) from the mode it had; the id of a service no longer degradable (or an
    /// id a service left for another) gets its mode back to normal, unless a degradable
    /// service holds it now. The shed level stays.
    /// Every mode is written again.
    pub fn reconfigure(
        &mut self,
        config: Config,
        now: Instant,
        sink: &mut dyn ModeSink,
    ) -> Vec<Note> {
        let mut notes = Vec::new();
        let mut old: HashMap<Arc<str>, Tracked> = (self.services.drain(..))
            .map(|t| (t.spec.name.clone(), t))
            .collect();
        let ids: HashSet<u32> = config.services.iter().map(|s| s.id).collect();
        // Ids the new policy's degradable services no longer hold.
        let mut left = Vec::new();
        for spec in config.services {
            let t = match old.remove(&spec.name) {
                Some(mut t) if t.spec.degradation == spec.degradation => {
                    if t.spec.id != spec.id {
                        left.push((t.spec.id, t.spec.name.clone()));
                    }
                    t.spec = spec;
                    t.written = None;
                    t
                }
                Some(t) => {
                    if t.spec.id != spec.id {
                        left.push((t.spec.id, t.spec.name.clone()));
                    }
                    let hyst = Hysteresis::new(
                        now,
                        Some("policy reloaded: its degradation changed".to_string()),
                    );
                    let mut fresh = Tracked::new(spec, hyst, t.mode);
                    fresh.transitions = t.transitions;
                    fresh
                }
                None => Tracked::new(spec, Hysteresis::new(now, None), MODE_NORMAL),
            };
            self.services.push(t);
        }
        self.restore.retain(|r| !ids.contains(&r.id));
        left.extend(old.into_values().map(|t| (t.spec.id, t.spec.name)));
        for (id, service) in left {
            if !ids.contains(&id) {
                self.restore.push(Restore {
                    id,
                    service,
                    failing: false,
                });
            }
        }
        self.shed_step = config.shed_step;
        self.companions = config.companions;
        self.index();
        self.pressure = self.pressure_now();
        self.decide(&mut notes);
        self.sync(sink, &mut notes);
        notes
    }

    /// One evaluation at `now`: takes the probe samples and a reading of the backends,
    /// measures every condition, moves hysteresis and shed level, decides the modes and
    /// writes those that changed (and those whose write failed before).
    pub fn tick(
        &mut self,
        now: Instant,
        samples: &[ProbeSample],
        backends: Option<&Backends>,
        sink: &mut dyn ModeSink,
    ) -> Vec<Note> {
        let mut notes = Vec::new();
        for s in samples {
            if let Some(&i) = self.by_name.get(&*s.service) {
                self.services[i].windows.probe(s.at, s.latency, s.ok);
            }
        }
        if let Some(backends) = backends {
            self.read_backends(now, backends);
        }
        for t in &mut self.services {
            t.windows.prune(now);
            let conditions = &t.spec.degradation.conditions;
            for (m, c) in t.measures.iter_mut().zip(conditions) {
                *m = condition::measure(c, &t.windows, now);
            }
            let first = t.measures.iter().position(|m| m.met);
            let change = t.hyst.update(
                now,
                first.is_some(),
                || {
                    let i = first.unwrap_or(0);
                    condition::describe(&conditions[i], &t.measures[i])
                },
                t.spec.degradation.recover_after,
            );
            if let Some(change) = change
                && t.spec.sheds()
            {
                notes.push(Note::Pressure {
                    service: t.spec.name.clone(),
                    change,
                    why: t.hyst.cause().unwrap_or_default().to_string(),
                });
            }
        }
        self.pressure = self.pressure_now();
        let present = Present::of(
            (self.services.iter())
                .filter(|t| t.spec.sheds())
                .map(|t| t.spec.priority),
        );
        if let Some((from, to)) = self
            .shed
            .update(now, self.pressure, present, self.shed_step)
        {
            let why = if self.pressure {
                format!("degraded: {}", self.degraded_shed_group().join(", "))
            } else {
                "no shed service degraded".to_string()
            };
            notes.push(Note::Level { from, to, why });
        }
        self.decide(&mut notes);
        self.sync(sink, &mut notes);
        notes
    }

    /// Each service's availability now and the passive attempts since the last reading.
    fn read_backends(&mut self, now: Instant, backends: &Backends) {
        let n = self.services.len();
        let mut counts = vec![(0u32, 0u32); n];
        let mut passive: Vec<Vec<(SocketAddr, PassiveCounts)>> = vec![Vec::new(); n];
        for b in backends {
            let Some(&i) = self.by_name.get(&*b.service) else {
                continue;
            };
            counts[i].1 += 1;
            counts[i].0 += u32::from(available(b));
            if let Some(p) = b.passive {
                passive[i].push((b.address, p));
            }
        }
        for ((t, (up, total)), seen) in self.services.iter_mut().zip(counts).zip(passive) {
            t.windows.passive(now, &seen);
            let share = (total > 0).then(|| f64::from(up) / f64::from(total));
            t.windows.availability(now, share);
        }
    }

    fn pressure_now(&self) -> bool {
        (self.services.iter()).any(|t| t.spec.sheds() && t.hyst.degraded())
    }

    fn degraded_shed_group(&self) -> Vec<&str> {
        (self.services.iter())
            .filter(|t| t.spec.sheds() && t.hyst.degraded())
            .map(|t| &*t.spec.name)
            .collect()
    }

    /// Every service's mode from its state: fallback while degraded, or shed when the shed
    /// level reaches its priority.
    fn decide(&mut self, notes: &mut Vec<Note>) {
        let level = self.shed.level();
        for t in &mut self.services {
            let want = if t.spec.sheds() {
                if level.sheds(t.spec.priority) {
                    MODE_SHED
                } else {
                    MODE_NORMAL
                }
            } else if t.hyst.degraded() {
                MODE_FALLBACK
            } else {
                MODE_NORMAL
            };
            if want == t.mode {
                continue;
            }
            *t.transitions.entry((t.mode, want)).or_default() += 1;
            let why = if t.spec.sheds() {
                format!("shed level {level}")
            } else {
                t.hyst.cause().unwrap_or("not degraded").to_string()
            };
            notes.push(Note::Mode {
                service: t.spec.name.clone(),
                from: t.mode,
                to: want,
                why,
            });
            t.mode = want;
        }
    }

    /// Writes every mode the map may not hold; a failure is noted once and retried next
    /// time.
    fn sync(&mut self, sink: &mut dyn ModeSink, notes: &mut Vec<Note>) {
        for t in &mut self.services {
            if t.written == Some(t.mode) {
                continue;
            }
            match sink.write(t.spec.id, t.mode) {
                Ok(()) => {
                    t.written = Some(t.mode);
                    t.failing = false;
                }
                Err(e) => {
                    t.written = None;
                    if !std::mem::replace(&mut t.failing, true) {
                        notes.push(Note::WriteFailed {
                            service: t.spec.name.clone(),
                            id: t.spec.id,
                            mode: t.mode,
                            error: e.to_string(),
                        });
                    }
                }
            }
        }
        self.restore
            .retain_mut(|r| match sink.write(r.id, MODE_NORMAL) {
                Ok(()) => false,
                Err(e) => {
                    if !std::mem::replace(&mut r.failing, true) {
                        notes.push(Note::WriteFailed {
                            service: r.service.clone(),
                            id: r.id,
                            mode: MODE_NORMAL,
                            error: e.to_string(),
                        });
                    }
                    true
                }
            });
    }

    /// The shed level now.
    pub fn level(&self) -> Level {
        self.shed.level()
    }

    /// Service `name`'s mode, `None` when it is not degradable.
    pub fn mode(&self, name: &str) -> Option<u32> {
        let &i = self.by_name.get(name)?;
        Some(self.services[i].mode)
    }

    /// Whether service `name` is degraded.
    pub fn degraded(&self, name: &str) -> Option<bool> {
        let &i = self.by_name.get(name)?;
        Some(self.services[i].hyst.degraded())
    }

    /// Each degradable service's id, name and status as of `now` (its flow counters are the
    /// caller's to fill in), and the node's shedding.
    pub fn status(
        &self,
        now: Instant,
    ) -> (Vec<(u32, Arc<str>, DegradationStatus)>, SheddingStatus) {
        let services = (self.services.iter())
            .map(|t| {
                let status = DegradationStatus {
                    mode: mode_name(t.mode).to_string(),
                    degraded: t.hyst.degraded(),
                    cause: t.hyst.cause().map(str::to_string),
                    in_state_seconds: now.saturating_duration_since(t.hyst.since()).as_secs_f64(),
                    clear_for_seconds: t.hyst.clear_for(now).as_secs_f64(),
                    transitions: t.transitions.values().sum(),
                    conditions: (t.spec.degradation.conditions.iter())
                        .zip(&t.measures)
                        .map(|(c, m)| condition::status(c, m))
                        .collect(),
                    fallback_flows: 0,
                    shed_flows: 0,
                };
                (t.spec.id, t.spec.name.clone(), status)
            })
            .collect();
        let shedding = SheddingStatus {
            level: self.shed.level().as_str().to_string(),
            pressure: self.pressure,
            shed: (self.services.iter())
                .filter(|t| t.mode == MODE_SHED)
                .map(|t| t.spec.name.to_string())
                .collect(),
            level_for_seconds: now
                .saturating_duration_since(self.shed.since())
                .as_secs_f64(),
        };
        (services, shedding)
    }

    /// Companion services by name, and whose fallback each balances.
    pub fn companions(&self) -> &[(String, String)] {
        &self.companions
    }

    /// Mode transitions since start by service, from and to.
    pub fn transitions(&self) -> Vec<TransitionCount> {
        (self.services.iter())
            .flat_map(|t| {
                t.transitions
                    .iter()
                    .map(|(&(from, to), &count)| TransitionCount {
                        service: t.spec.name.to_string(),
                        from: mode_name(from),
                        to: mode_name(to),
                        count,
                    })
            })
            .collect()
    }
}
