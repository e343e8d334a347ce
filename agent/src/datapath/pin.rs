//! What the agent pins under `agent.pin_path`, so that the datapath outlives it:
//!
//! ```text
//! <pin_path>/layout              array map, one u32: agent_common::maps::PIN_LAYOUT
//! <pin_path>/maps/<NAME>         every map of agent_common::maps::PINNED_MAPS
//! <pin_path>/links/xdp@<if>      the XDP link of each interface
//! <pin_path>/links/tcx-egress@<if>  the TCX egress link (kernel 6.6 and later)
//! ```
//!
//! Before 6.6 the egress program is a `cls_bpf` filter under `clsact`, which outlives its
//! process by itself. One agent at a time holds a directory: an exclusive `flock` on it.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use agent_common::maps::{PIN_LAYOUT, PINNED_MAPS};
use aya::maps::{Array, Map, MapData};

use super::bpffs;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path} is not on a BPF filesystem (mount one: `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is in use by another agent (one agent per pin_path)")]
    InUse { path: PathBuf },
    #[error(
        "{path} holds pins of layout version {found}; this agent writes version {wanted}. \
         The running datapath is left as it is: run `agent uninstall` (or `agent run --reset`) \
         to replace it"
    )]
    Incompatible {
        path: PathBuf,
        found: String,
        wanted: u32,
    },
    #[error(
        "{path}: pinned map {map} is {found}, this build expects {wanted}; the pins come from \
         an incompatible build. Run `agent uninstall` (or `agent run --reset`) to replace them"
    )]
    MapShape {
        path: PathBuf,
        map: &'static str,
        found: String,
        wanted: String,
    },
}

impl PinError {
    /// Whether the error is about the directory itself (a policy value), not what it holds.
    pub fn is_path_problem(&self) -> bool {
        matches!(self, PinError::NotBpffs { .. } | PinError::Io { .. })
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The kind of a pinned link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Xdp,
    TcxEgress,
}

impl LinkKind {
    fn prefix(self) -> &'static str {
        match self {
            LinkKind::Xdp => "xdp",
            LinkKind::TcxEgress => "tcx-egress",
        }
    }
}

/// An agent's pin directory, locked for as long as this value lives (when it came from
/// [`PinDir::open`]).
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
    /// Holds the `flock`.
    _lock: Option<File>,
}

/// What a start found under the pin directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing: a fresh datapath.
    Nothing,
    /// Pins of this layout: adopt them.
    Compatible,
}

impl PinDir {
    /// Checks that `root` is (or would be created) on bpffs, creates it and its
    /// subdirectories, and locks it. Touches nothing when the path is wrong.
    pub fn open(root: &Path) -> Result<Self, PinError> {
        let mut existing = root;
        while !existing.exists() {
            existing = existing.parent().unwrap_or(Path::new("/"));
        }
        if !bpffs::is_bpffs(existing).map_err(io_err(existing))? {
            return Err(PinError::NotBpffs {
                path: root.to_path_buf(),
            });
        }
        for dir in [root.to_path_buf(), root.join("maps"), root.join("links")] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let lock = File::open(root).map_err(io_err(root))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                PinError::InUse {
                    path: root.to_path_buf(),
                }
            } else {
                io_err(root)(e)
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            _lock: Some(lock),
        })
    }

    /// The paths of `root`, without its lock: for the one who holds it already.
    pub fn paths_of(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            _lock: None,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn link(&self, kind: LinkKind, interface: &str) -> PathBuf {
        self.root
            .join("links")
            .join(format!("{}@{interface}", kind.prefix()))
    }

    fn layout_path(&self) -> PathBuf {
        self.root.join("layout")
    }

    /// The layout version the pins carry, `None` when there is no layout pin.
    fn layout(&self) -> Result<Option<u32>, PinError> {
        let path = self.layout_path();
        if !path.exists() {
            return Ok(None);
        }
        let version = MapData::from_pin(&path)
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|data| {
                Array::<MapData, u32>::try_from(Map::Array(data))
                    .and_then(|a| a.get(&0, 0))
                    .map_err(|e| io::Error::other(e.to_string()))
            })
            .map_err(io_err(&path))?;
        Ok(Some(version))
    }

    /// Whether the layout pin is there.
    pub fn has_layout(&self) -> bool {
        self.layout_path().exists()
    }

    /// Writes this build's layout version (after a fresh datapath's maps are pinned).
    pub fn write_layout(&self) -> Result<(), PinError> {
        let path = self.layout_path();
        let map_err = |e: aya::maps::MapError| io_err(&path)(io::Error::other(e.to_string()));
        let mut array = Array::<MapData, u32>::create(1, 0).map_err(map_err)?;
        array.set(0, PIN_LAYOUT, 0).map_err(map_err)?;
        let _ = std::fs::remove_file(&path);
        array
            .pin(&path)
            .map_err(|e| io_err(&path)(io::Error::other(e.to_string())))
    }

    /// Pinned maps there are now.
    fn pinned_maps(&self) -> Vec<&'static str> {
        PINNED_MAPS
            .into_iter()
            .filter(|name| self.map(name).exists())
            .collect()
    }

    /// Decides what a start does with what it finds: nothing, pins to adopt, or pins of
    /// another layout (an error). `wanted` gives, for each pinned map, the shape this build
    /// and policy expect; the maps whose only difference is their size are returned (the
    /// loader makes new ones, pinned in their place once the load succeeded; their state
    /// starts over, and a warning says so), any other difference is an error. Changes
    /// nothing.
    pub fn survey(
        &self,
        wanted: &HashMap<&'static str, MapShape>,
    ) -> Result<(Found, Vec<&'static str>), PinError> {
        let maps = self.pinned_maps();
        let layout = self.layout()?;
        match layout {
            None if maps.is_empty() => return Ok((Found::Nothing, Vec::new())),
            None => {
                return Err(PinError::Incompatible {
                    path: self.root.clone(),
                    found: "none (maps without a layout pin)".into(),
                    wanted: PIN_LAYOUT,
                });
            }
            Some(v) if v != PIN_LAYOUT => {
                return Err(PinError::Incompatible {
                    path: self.root.clone(),
                    found: v.to_string(),
                    wanted: PIN_LAYOUT,
                });
            }
            Some(_) => {}
        }
        let mut resized = Vec::new();
        for name in maps {
            let Some(want) = wanted.get(name) else {
                continue;
            };
            let path = self.map(name);
            let have = MapShape::of_pin(&path).map_err(io_err(&path))?;
            if have == *want {
                continue;
            }
            let resized_only = MapShape {
                max_entries: want.max_entries,
                ..have
            } == *want;
            if resized_only {
                tracing::warn!(
                    "pinned map {name} has {} entries, the policy sizes it {}: it is replaced \
                     and its state ({}) starts over",
                    have.max_entries,
                    want.max_entries,
                    path.display()
                );
                resized.push(name);
            } else {
                return Err(PinError::MapShape {
                    path: path.clone(),
                    map: name,
                    found: have.to_string(),
                    wanted: want.to_string(),
                });
            }
        }
        Ok((Found::Compatible, resized))
    }

    /// Pins `map` at its name's path in place of the map pinned there (one the policy
    /// resized), once the load that made it succeeded.
    pub fn replace(&self, name: &'static str, map: &Map) -> Result<(), PinError> {
        let path = self.map(name);
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        map.pin(&path)
            .map_err(|e| io_err(&path)(io::Error::other(e.to_string())))
    }

    /// Removes the map pins and the layout (`agent run --reset`): the next load makes new,
    /// empty maps. Links stay, so the new programs replace the old ones on them.
    pub fn clear_maps(&self) -> Result<usize, PinError> {
        let mut removed = 0;
        for name in self.pinned_maps() {
            let path = self.map(name);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
        let layout = self.layout_path();
        if layout.exists() {
            std::fs::remove_file(&layout).map_err(io_err(&layout))?;
        }
        Ok(removed)
    }

    /// Removes the directory and its subdirectories if nothing is pinned there.
    pub fn remove_if_empty(&self) {
        for dir in [
            self.root.join("links"),
            self.root.join("maps"),
            self.root.clone(),
        ] {
            // Fails, as wanted, on a directory that still holds something.
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Removes maps this load pinned that did not exist before it (a load that failed).
    pub fn remove_new(&self, before: &[&'static str]) {
        for name in self.pinned_maps() {
            if !before.contains(&name) {
                let _ = std::fs::remove_file(self.map(name));
            }
        }
    }

    /// Maps pinned now, for [`PinDir::remove_new`].
    pub fn snapshot(&self) -> Vec<&'static str> {
        self.pinned_maps()
    }

    /// Link pins there are now, with their kind and interface.
    pub fn links(&self) -> Vec<(PathBuf, LinkKind, String)> {
        let Ok(entries) = std::fs::read_dir(self.root.join("links")) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let (kind, interface) = name.split_once('@')?;
                let kind = [LinkKind::Xdp, LinkKind::TcxEgress]
                    .into_iter()
                    .find(|k| k.prefix() == kind)?;
                Some((e.path(), kind, interface.to_owned()))
            })
            .collect()
    }

    /// Removes everything under the directory and the directory (`agent uninstall`,
    /// `--detach-on-exit`). Removing a link's pin, with no process holding the link, detaches
    /// its program. Says what it removed.
    pub fn remove_all(&self) -> Result<Vec<String>, PinError> {
        let mut removed = Vec::new();
        for (path, _, _) in self.links() {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            removed.push(path.display().to_string());
        }
        for name in self.pinned_maps() {
            let path = self.map(name);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            removed.push(path.display().to_string());
        }
        let layout = self.layout_path();
        if layout.exists() {
            std::fs::remove_file(&layout).map_err(io_err(&layout))?;
            removed.push(layout.display().to_string());
        }
        for dir in [
            self.root.join("links"),
            self.root.join("maps"),
            self.root.clone(),
        ] {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&dir)(e)),
            }
        }
        Ok(removed)
    }
}

/// What identifies a map's layout: type, key and value sizes, flags, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub map_flags: u32,
    pub max_entries: u32,
}

impl MapShape {
    fn of_pin(path: &Path) -> io::Result<Self> {
        let info = MapData::from_pin(path)
            .and_then(|m| m.info())
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self {
            map_type: info
                .map_type()
                .map_err(|e| io::Error::other(e.to_string()))? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            map_flags: info.map_flags(),
            max_entries: info.max_entries(),
        })
    }

    /// The shape of the object's map, with `max_entries` as the loader will set it.
    pub fn of_object(map: &aya_obj::Map, max_entries: Option<u32>) -> Self {
        Self {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            map_flags: map.map_flags(),
            max_entries: max_entries.unwrap_or(map.max_entries()),
        }
    }
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, flags {:#x}, {} entries",
            self.map_type, self.key_size, self.value_size, self.map_flags, self.max_entries
        )
    }
}
