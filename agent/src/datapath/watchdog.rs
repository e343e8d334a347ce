//! The watchdog's checks: a link someone detached (`bpftool link detach`, an XDP program
//! replaced by hand) is attached again, a removed pin is pinned again. Each repair is
//! logged and counted (`agent_repairs_total{what}`).

use std::{os::fd::AsFd, path::Path};

use agent_common::maps::{PINNED_MAPS, PROG_TC_EGRESS};
use aya::programs::ProgramError;

use super::{Datapath, DatapathError, attach::Attached, bpffs, pin::LinkKind};

/// One repair: what was broken (the metric's label) and a sentence for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub what: &'static str,
    pub detail: String,
}

impl Datapath {
    /// Checks every attachment and pin once and repairs what is broken. Errors (a repair
    /// that failed) are returned after the other checks ran; the next round tries again.
    pub fn check_and_repair(&mut self) -> (Vec<Repair>, Vec<DatapathError>) {
        let mut repairs = Vec::new();
        let mut errors = Vec::new();
        if self.pins.is_none() {
            return (repairs, errors);
        }
        for i in 0..self.attached.len() {
            match self.check_link(i) {
                Ok(Some(r)) => repairs.push(r),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        match self.check_map_pins() {
            Ok(mut r) => repairs.append(&mut r),
            Err(e) => errors.push(e),
        }
        for r in &repairs {
            *self.repairs.entry(r.what).or_default() += 1;
        }
        (repairs, errors)
    }

    /// Repairs made since start, by what.
    pub fn repairs(&self) -> Vec<(String, u64)> {
        self.repairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect()
    }

    fn check_link(&mut self, i: usize) -> Result<Option<Repair>, DatapathError> {
        let (kind, interface, setting, pin, fd) = match &self.attached[i] {
            Attached::Link {
                kind,
                interface,
                setting,
                pin,
                fd,
                ..
            } => (kind, interface, setting, pin, fd),
            Attached::Filter { interface, .. } => {
                let interface = interface.clone();
                return self.check_filter(i, interface);
            }
        };
        let (kind, interface, setting, pin) = (*kind, interface.clone(), *setting, pin.clone());
        let what = match kind {
            LinkKind::Xdp => "xdp_link",
            LinkKind::TcxEgress => "tc_link",
        };
        if bpffs::link_ifindex(fd.as_fd()) == Some(0) {
            // Detached under us: a new link, pinned where the old one was.
            let _ = std::fs::remove_file(&pin);
            let new_fd = match kind {
                LinkKind::Xdp => self.attach_xdp_pinned(&interface, setting, &pin)?.fd,
                LinkKind::TcxEgress => {
                    let error = |source: ProgramError| DatapathError::Attach {
                        program: PROG_TC_EGRESS,
                        interface: interface.clone(),
                        mode: "tcx egress",
                        source: Box::new(source),
                    };
                    self.attach_tcx_pinned(&interface, &pin, error)?.fd
                }
            };
            if let Attached::Link { fd, .. } = &mut self.attached[i] {
                *fd = new_fd;
            }
            return Ok(Some(Repair {
                what,
                detail: format!(
                    "{} on {interface} was detached; attached again",
                    kind_name(kind)
                ),
            }));
        }
        if !pin.exists() {
            bpffs::obj_pin(fd.as_fd(), &pin).map_err(|source| DatapathError::PinLink {
                program: kind_program(kind),
                interface: interface.clone(),
                pin: pin.clone(),
                source,
            })?;
            return Ok(Some(Repair {
                what: "pin",
                detail: format!(
                    "the pin of {} on {interface} was removed; pinned again at {}",
                    kind_name(kind),
                    pin.display()
                ),
            }));
        }
        Ok(None)
    }

    /// The egress filter (before 6.6): put back when someone deleted it (`tc filter del`).
    fn check_filter(
        &mut self,
        i: usize,
        interface: String,
    ) -> Result<Option<Repair>, DatapathError> {
        let (priority, handle) = super::attach::filter_id();
        let present =
            super::qdisc::has_egress_filter(&interface, priority, handle).map_err(|e| {
                DatapathError::Attach {
                    program: PROG_TC_EGRESS,
                    interface: interface.clone(),
                    mode: "clsact egress",
                    source: Box::new(ProgramError::IOError(std::io::Error::other(e.to_string()))),
                }
            })?;
        if present {
            return Ok(None);
        }
        let (link, _) = self
            .attach_filter(&interface)
            .map_err(|source| DatapathError::Attach {
                program: PROG_TC_EGRESS,
                interface: interface.clone(),
                mode: "clsact egress",
                source: Box::new(source),
            })?;
        if let Attached::Filter { link: old, .. } = &mut self.attached[i] {
            // The old link names a filter that is gone: nothing to detach, nothing to drop.
            *old = std::mem::ManuallyDrop::new(link);
        }
        Ok(Some(Repair {
            what: "tc_link",
            detail: format!("the egress filter on {interface} was deleted; attached again"),
        }))
    }

    fn check_map_pins(&mut self) -> Result<Vec<Repair>, DatapathError> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let mut repairs = Vec::new();
        for name in PINNED_MAPS {
            let path = pins.map(name);
            if path.exists() {
                continue;
            }
            let Some(map) = self.ebpf.map(name) else {
                continue;
            };
            repin_map(map, &path).map_err(|source| {
                DatapathError::Pin(super::pin::PinError::Io {
                    path: path.clone(),
                    source,
                })
            })?;
            repairs.push(Repair {
                what: "pin",
                detail: format!(
                    "the pin of map {name} was removed; pinned again at {}",
                    path.display()
                ),
            });
        }
        if !pins.has_layout() {
            pins.write_layout()?;
            repairs.push(Repair {
                what: "pin",
                detail: format!(
                    "the layout pin under {} was removed; written again",
                    pins.root().display()
                ),
            });
        }
        Ok(repairs)
    }
}

fn repin_map(map: &aya::maps::Map, path: &Path) -> std::io::Result<()> {
    map.pin(path)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

fn kind_name(kind: LinkKind) -> &'static str {
    match kind {
        LinkKind::Xdp => "the XDP link",
        LinkKind::TcxEgress => "the TCX egress link",
    }
}

fn kind_program(kind: LinkKind) -> &'static str {
    match kind {
        LinkKind::Xdp => agent_common::maps::PROG_XDP,
        LinkKind::TcxEgress => PROG_TC_EGRESS,
    }
}
