//! The kernel side as the agent sees it: load the embedded eBPF object, attach its programs to
//! interfaces, write the compiled policy into its maps, read its counters back.

mod attach;
mod backends;
pub mod bpffs;
mod degrade;
mod generation;
mod kernel;
mod lb;
mod maps;
pub mod pin;
pub mod pressure;
mod privilege;
pub mod qdisc;
mod watchdog;

pub use attach::{AttachSpec, XdpModeSetting, remove_egress_filter};
pub use backends::{BACKEND_ACTIONS, BackendCounters, BackendMaps, expired, ktime_now_ns};
pub use degrade::{DegradeCounters, DegradeMaps};
pub use generation::{LivePolicy, LiveService, Staged};
pub use kernel::{Kernel, MIN_KERNEL};
pub use lb::{LbCounters, LbMaps, LbServiceCounters};
pub use maps::{ApplyReport, KeyCounts, ServiceCounters, ShapeCounters, Snapshot};

use crate::config::Compiled;
use std::{collections::HashMap, path::PathBuf};

use agent_common::limit::{GLOBAL_COARSE_MIN_BURST_NS, coarse_clock_tick_ns, coarse_min_burst_ns};
use agent_common::maps::{
    MAP_RL_BUCKETS, MAP_SHAPE_NEXT, MAP_STAGES_TC, MAP_STAGES_XDP, PINNED_MAPS, PROG_TC_ANSWER,
    PROG_TC_EGRESS, PROG_TC_LB, PROG_TC_NAT, PROG_XDP, PROG_XDP_ANSWER, PROG_XDP_LB, PROG_XDP_NAT,
    STAGE_ANSWER, STAGE_LB, STAGE_NAT,
};
use agent_common::policy::model::Tables;
use agent_common::tables::TableSizes;
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Map, MapData, MapError, ProgramArray},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use pin::PinDir;

/// The eBPF object built by `build.rs`; empty when built with `AYA_BUILD_SKIP=1`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// The baseline program of `cargo xtask bench` (never attached).
pub static EBPF_BENCH_TRIVIAL: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-trivial"));

/// Sources are boxed: aya's errors are large and every `Result` here would carry them.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("this agent was built with AYA_BUILD_SKIP=1 and carries no eBPF object; rebuild it")]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("program `{0}` is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("{0}; nothing was loaded")]
    Kernel(String),
    #[error(transparent)]
    Privilege(#[from] privilege::MissingCapabilities),
    #[error(
        "the verifier of kernel {kernel} refused program `{program}`: {reason} ({errno}; the \
         whole verifier log is logged at log level debug)"
    )]
    Refused {
        program: &'static str,
        kernel: Kernel,
        reason: String,
        errno: std::io::Error,
    },
    #[error("loading program `{program}` into the kernel: {source}")]
    LoadProgram {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching `{program}` to interface {interface} ({mode}): {source}")]
    Attach {
        program: &'static str,
        interface: String,
        mode: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map `{0}` is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map `{0}` is not of the type the agent expects (an eBPF object from another build?)")]
    MapType(&'static str),
    #[error("pinning `{program}` on interface {interface} at {pin}: {source}")]
    PinLink {
        program: &'static str,
        interface: String,
        pin: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tables(String),
    #[error("attaching needs a pin directory (agent.pin_path); this datapath was loaded without")]
    NotPinned,
    #[error("{0}")]
    Pin(#[from] pin::PinError),
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

/// Whether this process has the capabilities loading needs (CAP_BPF, CAP_NET_ADMIN,
/// CAP_PERFMON), for `agent run` to ask before it touches anything; loading asks again.
pub fn check_privileges() -> Result<(), DatapathError> {
    Ok(privilege::check_this_process()?)
}

/// Wraps an error of the map `map`.
fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        map,
        source: Box::new(source),
    }
}

/// A typed, read-only handle on the object's map `name`.
fn typed<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<&'a Map, Error = MapError>,
{
    ebpf.map(name)
        .ok_or(DatapathError::MissingMap(name))?
        .try_into()
        .map_err(map_err(name))
}

/// A typed, writable handle on the object's map `name`.
fn typed_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<&'a mut Map, Error = MapError>,
{
    ebpf.map_mut(name)
        .ok_or(DatapathError::MissingMap(name))?
        .try_into()
        .map_err(map_err(name))
}

/// Every program of the object the agent loads.
const PROGRAMS: [&str; 8] = [
    PROG_XDP,
    PROG_TC_EGRESS,
    PROG_XDP_LB,
    PROG_TC_LB,
    PROG_XDP_NAT,
    PROG_TC_NAT,
    PROG_XDP_ANSWER,
    PROG_TC_ANSWER,
];

/// A program the kernel would not load: the verifier's reason in one line, its whole log at
/// debug level (thousands of lines that would bury the reason).
fn refused(program: &'static str, kernel: Kernel, source: ProgramError) -> DatapathError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            tracing::debug!("verifier log of `{program}` on kernel {kernel}:\n{log}");
            DatapathError::Refused {
                program,
                kernel,
                reason: kernel::refusal_reason(&log).to_owned(),
                errno: io_error,
            }
        }
        source => DatapathError::LoadProgram {
            program,
            source: Box::new(source),
        },
    }
}

/// Puts the stages in the program arrays the main programs tail-call through.
fn link_stages(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    for (array, stages) in [
        (
            MAP_STAGES_XDP,
            [
                (STAGE_LB, PROG_XDP_LB),
                (STAGE_NAT, PROG_XDP_NAT),
                (STAGE_ANSWER, PROG_XDP_ANSWER),
            ],
        ),
        (
            MAP_STAGES_TC,
            [
                (STAGE_LB, PROG_TC_LB),
                (STAGE_NAT, PROG_TC_NAT),
                (STAGE_ANSWER, PROG_TC_ANSWER),
            ],
        ),
    ] {
        link(ebpf, array, stages)?;
    }
    Ok(())
}

fn link(
    ebpf: &mut Ebpf,
    array: &'static str,
    stages: [(u32, &'static str); 3],
) -> Result<(), DatapathError> {
    let mut fds = Vec::new();
    for (index, name) in stages {
        let program = ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        let fd = program
            .fd()
            .and_then(|fd| fd.try_clone().map_err(ProgramError::from))
            .map_err(|source| DatapathError::LoadProgram {
                program: name,
                source: Box::new(source),
            })?;
        fds.push((index, fd));
    }
    let mut slots: ProgramArray<&mut MapData> = typed_mut(ebpf, array)?;
    for (index, fd) in &fds {
        slots.set(*index, fd, 0).map_err(map_err(array))?;
    }
    Ok(())
}

/// A loaded datapath. Loaded with a pin directory ([`Datapath::load_pinned`]) its maps and
/// links are pinned there and outlive it: dropping it leaves the programs running.
pub struct Datapath {
    ebpf: Ebpf,
    attached: Vec<attach::Attached>,
    sizes: TableSizes,
    pins: Option<PinDir>,
    adopted: bool,
    generations: generation::Generations,
    /// Repairs the watchdog made, by what.
    repairs: std::collections::BTreeMap<&'static str, u64>,
}

impl Datapath {
    /// Loads the object and its programs into the kernel; attaches nothing yet.
    /// `max_keys` sizes the token-bucket table (a load-time constant of the map); the
    /// node-wide tables take `agent.tables`' defaults.
    pub fn load(max_keys: u32) -> Result<Self, DatapathError> {
        Self::load_sized(max_keys, None, Tables::default(), None)
    }

    /// As [`Datapath::load`], with every load-time size from the compiled policy: the key
    /// table and the departure table from its services, the node-wide tables from its
    /// `agent.tables`.
    pub fn load_for(compiled: &Compiled) -> Result<Self, DatapathError> {
        Self::load_sized(
            compiled.max_keys,
            Some(compiled.shape_keys),
            compiled.tables,
            None,
        )
    }

    /// As [`Datapath::load_for`], with every map listed in `PINNED_MAPS` pinned under `pins`:
    /// the maps pinned there already (an earlier agent's, same layout) are adopted, with
    /// their state; the others are created and pinned. `reset` drops the pinned maps first.
    /// Pins of another layout are refused before anything is loaded.
    pub fn load_pinned(
        compiled: &Compiled,
        pins: PinDir,
        reset: bool,
    ) -> Result<Self, DatapathError> {
        if reset {
            let removed = pins.clear_maps()?;
            tracing::info!(
                "--reset: removed {removed} pinned maps under {}",
                pins.root().display()
            );
        }
        Self::load_sized(
            compiled.max_keys,
            Some(compiled.shape_keys),
            compiled.tables,
            Some(pins),
        )
    }

    /// `shape_keys`: entries of `SHAPE_NEXT` (the object's default when `None`).
    fn load_sized(
        max_keys: u32,
        shape_keys: Option<u32>,
        tables: Tables,
        pins: Option<PinDir>,
    ) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let kernel = Kernel::current();
        kernel.check().map_err(DatapathError::Kernel)?;
        privilege::check_this_process()?;
        raise_memlock_rlimit();
        raise_nofile_rlimit();
        let sizes = TableSizes::new(
            tables.services,
            tables.backends,
            tables.connections,
            kernel::mem_total,
        );
        let mut entries: HashMap<&'static str, u32> = sizes.maps().into_iter().collect();
        entries.insert(MAP_RL_BUCKETS, max_keys.max(1));
        if let Some(keys) = shape_keys {
            entries.insert(MAP_SHAPE_NEXT, keys.max(1));
        }
        let mut loader = EbpfLoader::new();
        // Without the tick, the datapath's default: every bucket on the precise clock.
        let coarse_min_burst = coarse_clock_tick_ns().map_or(u64::MAX, coarse_min_burst_ns);
        loader.override_global(GLOBAL_COARSE_MIN_BURST_NS, &coarse_min_burst, true);
        for (name, n) in &entries {
            loader.map_max_entries(name, *n);
        }
        let mut adopted = false;
        let mut pinned_before = Vec::new();
        let mut resized = Vec::new();
        let pin_paths: Vec<(&'static str, PathBuf)> = match &pins {
            None => Vec::new(),
            Some(pins) => {
                let found;
                (found, resized) = pins.survey(&wanted_shapes(&entries)?)?;
                adopted = found == pin::Found::Compatible;
                pinned_before = pins.snapshot();
                // A resized map is made unpinned, and pinned over the old one below.
                (PINNED_MAPS.iter())
                    .filter(|n| !resized.contains(n))
                    .map(|&n| (n, pins.map(n)))
                    .collect()
            }
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let loaded = loader
            .load(EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))
            .and_then(|ebpf| load_programs(ebpf, kernel));
        let ebpf = match loaded {
            Ok(ebpf) => ebpf,
            Err(e) => {
                // Nothing of a failed load stays pinned; what was pinned before stays as is.
                if let Some(pins) = &pins {
                    pins.remove_new(&pinned_before);
                }
                return Err(e);
            }
        };
        if let Some(pins) = &pins {
            for name in resized {
                let map = ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
                pins.replace(name, map)?;
            }
            if !adopted {
                pins.write_layout()?;
            }
        }
        let generations = generation::Generations::read(&ebpf, sizes.services)?;
        Ok(Self {
            ebpf,
            attached: Vec::new(),
            sizes,
            pins,
            adopted,
            generations,
            repairs: Default::default(),
        })
    }

    /// Whether this datapath adopted an earlier agent's pinned maps.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The pin directory, when loaded with one.
    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }
}

/// What each pinned map must look like under this build and these sizes.
fn wanted_shapes(
    entries: &HashMap<&'static str, u32>,
) -> Result<HashMap<&'static str, pin::MapShape>, DatapathError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT)
        .map_err(|e| DatapathError::Load(Box::new(EbpfError::ParseError(e))))?;
    Ok(PINNED_MAPS
        .iter()
        .filter_map(|&name| {
            let map = object.maps.get(name)?;
            Some((
                name,
                pin::MapShape::of_object(map, entries.get(name).copied()),
            ))
        })
        .collect())
}

/// Loads every program into the kernel and fills the stage arrays.
fn load_programs(mut ebpf: Ebpf, kernel: Kernel) -> Result<Ebpf, DatapathError> {
    for name in PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        let loaded = match program {
            aya::programs::Program::Xdp(p) => p.load(),
            aya::programs::Program::SchedClassifier(p) => p.load(),
            _ => return Err(DatapathError::MissingProgram(name)),
        };
        loaded.map_err(|source| refused(name, kernel, source))?;
    }
    link_stages(&mut ebpf)?;
    Ok(ebpf)
}

impl Datapath {
    /// The sizes of the node-wide tables this datapath was loaded with.
    pub fn sizes(&self) -> &TableSizes {
        &self.sizes
    }

    /// Instructions the verifier processed for each program (its budget is 1,000,000 per
    /// program): how close each is to being refused.
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        PROGRAMS
            .iter()
            .map(|&name| {
                let count = self
                    .ebpf
                    .program(name)
                    .and_then(|p| p.info().ok())
                    .and_then(|i| i.verified_instruction_count());
                (name, count)
            })
            .collect()
    }

    /// The loaded object, for reading its maps (tests, benchmarks).
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The XDP program, for BPF_PROG_TEST_RUN.
    pub fn xdp_program(&self) -> Result<&Xdp, DatapathError> {
        self.ebpf
            .program(PROG_XDP)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram(PROG_XDP))
    }

    /// The TC egress program, for BPF_PROG_TEST_RUN.
    pub fn tc_program(&self) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(PROG_TC_EGRESS)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram(PROG_TC_EGRESS))
    }
}

/// The agent keeps a descriptor for each balanced service's table (see `LbMaps`): lift the
/// soft limit on open files to the hard one (often 1,024 against 524,288 under systemd), as
/// Go's runtime does for every program.
fn raise_nofile_rlimit() {
    let Some(mut limit) = nofile_rlimit() else {
        return;
    };
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: plain syscall on a valid struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            tracing::debug!(
                "could not lift RLIMIT_NOFILE: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The process's limits on open files (soft and hard).
fn nofile_rlimit() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall on a valid struct.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it so maps of a million keys
/// load there too. Newer kernels use memory cgroups and ignore it.
fn raise_memlock_rlimit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall on a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
