//! Node-wide shedding by priority. The shed group is the services whose strategy is `shed`;
//! the pressure is that any of them is degraded. Under pressure the first level is shed at
//! once, then one more every `shed_step` while the pressure lasts; without it, one level
//! comes back every `shed_step`, `core` first. Levels no service of the group has are
//! skipped both ways. A service of the group is shed iff its priority is at or below the
//! level: `low` goes first, `core` only once nothing else is left.

use std::time::{Duration, Instant};

use crate::config::model::Priority;

/// The highest priority shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Level {
    #[default]
    None,
    Low,
    Normal,
    Core,
}

impl Level {
    const ALL: [Level; 4] = [Level::None, Level::Low, Level::Normal, Level::Core];

    /// The level at which a service of priority `p` is shed.
    pub fn of(p: Priority) -> Level {
        match p {
            Priority::Low => Level::Low,
            Priority::Normal => Level::Normal,
            Priority::Core => Level::Core,
        }
    }

    /// 0 to 3, as `agent_shed_level` shows it.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::Low => "low",
            Level::Normal => "normal",
            Level::Core => "core",
        }
    }

    /// Whether a service of priority `p` is shed at this level.
    pub fn sheds(self, p: Priority) -> bool {
        Level::of(p) <= self
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which levels have a service of the shed group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Present([bool; 4]);

impl Present {
    pub fn of(priorities: impl IntoIterator<Item = Priority>) -> Present {
        let mut p = [false; 4];
        for priority in priorities {
            p[Level::of(priority) as usize] = true;
        }
        Present(p)
    }

    fn has(self, l: Level) -> bool {
        self.0[l as usize]
    }
}

/// The shed level and when it last changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shedder {
    level: Level,
    since: Instant,
}

impl Shedder {
    /// At `level` since `now` (`Level::None` on a fresh start; the level adopted modes
    /// imply otherwise).
    pub fn new(level: Level, now: Instant) -> Shedder {
        Shedder { level, since: now }
    }

    pub fn level(&self) -> Level {
        self.level
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    /// One evaluation at `now`; returns the change (from, to) when the level moved.
    pub fn update(
        &mut self,
        now: Instant,
        pressure: bool,
        present: Present,
        step: Duration,
    ) -> Option<(Level, Level)> {
        let due = now.saturating_duration_since(self.since) >= step;
        let next = if pressure {
            if self.level != Level::None && !due {
                return None;
            }
            Level::ALL
                .into_iter()
                .find(|l| *l > self.level && present.has(*l))?
        } else {
            if self.level == Level::None || !due {
                return None;
            }
            Level::ALL
                .into_iter()
                .rev()
                .find(|l| *l < self.level && (present.has(*l) || *l == Level::None))?
        };
        let from = self.level;
        self.level = next;
        self.since = now;
        Some((from, next))
    }
}
