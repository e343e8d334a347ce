//! Attaching programs to interfaces. All or nothing: when one attachment fails, the ones made
//! before it in the same call are detached again, and the error names the interface and mode.

use std::{
    mem::ManuallyDrop,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use agent_common::maps::{PROG_TC_EGRESS, PROG_XDP};
use aya::programs::{
    Link as _, ProgramError, SchedClassifier, TcAttachType, TcError, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    xdp::{XdpLink, XdpLinkId},
};

use super::{
    Datapath, DatapathError, Kernel, bpffs,
    pin::{LinkKind, PinDir},
};

/// How to attach XDP (POLICY.md `xdp_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeSetting {
    /// Native (driver) mode where the driver supports it, else generic.
    Auto,
    Native,
    Generic,
}

/// One interface of the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachSpec {
    pub interface: String,
    pub xdp_mode: XdpModeSetting,
    pub ingress: bool,
    pub egress: bool,
}

/// One attachment. Links are pinned and cls_bpf filters stay on their own: nothing here
/// detaches when the agent exits; [`Datapath::detach_all`] does, on request.
pub(super) enum Attached {
    /// A pinned bpf_link (XDP, or TCX egress); `fd` is the agent's own reference to it.
    Link {
        kind: LinkKind,
        interface: String,
        mode: &'static str,
        /// How to attach it again when someone detached it (XDP).
        setting: XdpModeSetting,
        pin: PathBuf,
        fd: OwnedFd,
        /// Made by this start (not an earlier agent's, which took the new program).
        created: bool,
    },
    /// A `cls_bpf` egress filter under `clsact` (kernels before 6.6). aya's link detaches the
    /// filter when dropped, so it is kept from dropping.
    Filter {
        interface: String,
        link: ManuallyDrop<SchedClassifierLink>,
        /// Made by this start (not an earlier agent's, replaced in place).
        created: bool,
    },
}

/// A program on a pinned link: how it got there, the agent's descriptor of the link, and
/// whether this start made the link.
pub(super) struct OnLink {
    pub mode: &'static str,
    pub fd: OwnedFd,
    pub created: bool,
}

impl OnLink {
    /// An earlier agent's link, which took the new program.
    fn taken_over(fd: OwnedFd) -> Self {
        Self {
            mode: "pinned link, program replaced",
            fd,
            created: false,
        }
    }
}

/// Priority and handle of the agent's egress filter (before 6.6): fixed, so that a new agent
/// replaces the old one's filter in place instead of adding a second.
const TC_PRIORITY: u16 = 0xa6e;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0xa6e);

/// Deletes the agent's egress filter (before 6.6) on `interface`, found by its priority and
/// handle (another agent's filters stay); `false` when there was none (`agent uninstall`).
pub fn remove_egress_filter(interface: &str) -> bool {
    SchedClassifierLink::attached(
        interface,
        TcAttachType::Egress,
        TC_PRIORITY,
        TC_HANDLE,
        None,
    )
    .is_ok_and(|link| link.detach().is_ok())
}

/// The egress filter's priority and handle (as a u32), for the watchdog's check.
pub(super) fn filter_id() -> (u16, u32) {
    (TC_PRIORITY, TC_HANDLE.into())
}

/// How TC programs attach on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TcMode {
    /// A TCX link (kernel 6.6 and later).
    Tcx,
    /// A `cls_bpf` filter under a `clsact` qdisc, through netlink (before 6.6).
    Clsact,
}

impl TcMode {
    fn describe(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx egress",
            TcMode::Clsact => "clsact egress",
        }
    }
}

/// TCX came with 6.6; before it a TC program hangs under a `clsact` qdisc. aya's `attach`
/// takes the same rule.
fn tc_mode() -> TcMode {
    if Kernel::current().has_tcx() {
        TcMode::Tcx
    } else {
        TcMode::Clsact
    }
}

/// Adds the `clsact` qdisc a netlink TC attach needs; one already there (ours from an
/// earlier run, or another tool's) is used as it is. It stays after the agent stops, as
/// Cilium's does: an empty `clsact` changes no packet.
fn add_clsact(interface: &str) -> Result<(), TcError> {
    match tc::qdisc_add_clsact(interface) {
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

impl Attached {
    pub fn describe(&self) -> String {
        match self {
            Attached::Link {
                kind: LinkKind::Xdp,
                interface,
                mode,
                ..
            } => format!("xdp ({mode}) on {interface}"),
            Attached::Link {
                kind: LinkKind::TcxEgress,
                interface,
                ..
            } => format!("{} on {interface}", TcMode::Tcx.describe()),
            Attached::Filter { interface, .. } => {
                format!("{} on {interface}", TcMode::Clsact.describe())
            }
        }
    }
}

impl Datapath {
    /// Attaches the programs each spec asks for, on the pinned links: a link already pinned
    /// (an earlier agent's) gets the new program atomically (`bpf_link_update`, no moment
    /// without a program); a missing one is created and pinned. On error, links this call
    /// created are removed again; links it updated keep the new program.
    pub fn attach(&mut self, specs: &[AttachSpec]) -> Result<(), DatapathError> {
        let before = self.attached.len();
        for spec in specs {
            if let Err(e) = self.attach_one(spec) {
                while self.attached.len() > before {
                    if let Some(a) = self.attached.pop() {
                        if a.created() {
                            self.detach(a);
                        } else {
                            a.leave();
                        }
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// On a reload: attaches the hooks `new` names that `old` does not (all or none: on an
    /// error those attached here are detached again), and returns the ones it attached.
    pub fn attach_added(
        &mut self,
        old: &[AttachSpec],
        new: &[AttachSpec],
    ) -> Result<Vec<String>, DatapathError> {
        let added: Vec<AttachSpec> = new
            .iter()
            .filter_map(|n| {
                let o = old.iter().find(|o| o.interface == n.interface);
                let spec = AttachSpec {
                    ingress: n.ingress && !o.is_some_and(|o| o.ingress),
                    egress: n.egress && !o.is_some_and(|o| o.egress),
                    ..n.clone()
                };
                (spec.ingress || spec.egress).then_some(spec)
            })
            .collect();
        let before = self.attached.len();
        self.attach(&added)?;
        Ok(self.attached[before..]
            .iter()
            .map(Attached::describe)
            .collect())
    }

    /// On a reload, after the switch: detaches the hooks `new` no longer names, and says
    /// which.
    pub fn detach_removed(&mut self, new: &[AttachSpec]) -> Vec<String> {
        let wanted = |a: &Attached| {
            let (interface, ingress) = match a {
                Attached::Link {
                    kind, interface, ..
                } => (interface, *kind == LinkKind::Xdp),
                Attached::Filter { interface, .. } => (interface, false),
            };
            new.iter()
                .any(|s| s.interface == *interface && if ingress { s.ingress } else { s.egress })
        };
        let (keep, gone): (Vec<Attached>, Vec<Attached>) = std::mem::take(&mut self.attached)
            .into_iter()
            .partition(wanted);
        self.attached = keep;
        let mut detached = Vec::new();
        for a in gone {
            detached.push(a.describe());
            self.detach(a);
        }
        detached
    }

    /// Detaches the links an earlier agent pinned on interfaces (or hooks) this policy no
    /// longer names, and says which.
    pub fn detach_stale_links(&mut self) -> Vec<String> {
        let Some(pins) = &self.pins else {
            return Vec::new();
        };
        let ours: Vec<&Path> = self
            .attached
            .iter()
            .filter_map(|a| match a {
                Attached::Link { pin, .. } => Some(pin.as_path()),
                Attached::Filter { .. } => None,
            })
            .collect();
        let mut stale = Vec::new();
        for (path, _, interface) in pins.links() {
            if ours.contains(&path.as_path()) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => stale.push(format!(
                    "{} (the policy no longer attaches it on {interface})",
                    path.display()
                )),
                Err(e) => tracing::warn!("removing stale link pin {}: {e}", path.display()),
            }
        }
        stale
    }

    /// What is attached, for logs and status.
    pub fn attachments(&self) -> Vec<String> {
        self.attached.iter().map(Attached::describe).collect()
    }

    /// Detaches everything, newest first, and removes the link pins.
    pub fn detach_all(&mut self) {
        while let Some(a) = self.attached.pop() {
            self.detach(a);
        }
    }

    /// Lets go of every attachment without detaching it: the programs keep running on their
    /// pinned links (and filters) after the agent is gone.
    pub fn leave_attached(&mut self) {
        for a in self.attached.drain(..) {
            a.leave();
        }
    }

    fn pins(&self) -> Result<&PinDir, DatapathError> {
        self.pins.as_ref().ok_or(DatapathError::NotPinned)
    }

    fn attach_one(&mut self, spec: &AttachSpec) -> Result<(), DatapathError> {
        if spec.ingress {
            let pin = self.pins()?.link(LinkKind::Xdp, &spec.interface);
            let OnLink { mode, fd, created } =
                self.attach_xdp_pinned(&spec.interface, spec.xdp_mode, &pin)?;
            self.attached.push(Attached::Link {
                kind: LinkKind::Xdp,
                interface: spec.interface.clone(),
                mode,
                setting: spec.xdp_mode,
                pin,
                fd,
                created,
            });
        }
        if spec.egress {
            let mode = tc_mode();
            let error = |source: ProgramError| DatapathError::Attach {
                program: PROG_TC_EGRESS,
                interface: spec.interface.clone(),
                mode: mode.describe(),
                source: Box::new(source),
            };
            match mode {
                TcMode::Tcx => {
                    let pin = self.pins()?.link(LinkKind::TcxEgress, &spec.interface);
                    let OnLink { mode, fd, created } =
                        self.attach_tcx_pinned(&spec.interface, &pin, error)?;
                    self.attached.push(Attached::Link {
                        kind: LinkKind::TcxEgress,
                        interface: spec.interface.clone(),
                        mode,
                        setting: spec.xdp_mode,
                        pin,
                        fd,
                        created,
                    });
                }
                TcMode::Clsact => {
                    tracing::info!(
                        "kernel {} has no TCX (6.6 and later): tc egress on {} attaches as a \
                         cls_bpf filter under a clsact qdisc",
                        Kernel::current(),
                        spec.interface
                    );
                    add_clsact(&spec.interface).map_err(|e| error(e.into()))?;
                    let (link, created) = self.attach_filter(&spec.interface).map_err(error)?;
                    self.attached.push(Attached::Filter {
                        interface: spec.interface.clone(),
                        link: ManuallyDrop::new(link),
                        created,
                    });
                }
            }
        }
        Ok(())
    }

    /// The XDP program on the link pinned at `pin`: the pinned link updated, or a new link
    /// attached and pinned.
    pub(super) fn attach_xdp_pinned(
        &mut self,
        interface: &str,
        setting: XdpModeSetting,
        pin: &Path,
    ) -> Result<OnLink, DatapathError> {
        let pin_error = pin_error(PROG_XDP, interface, pin);
        if let Some(old) = pinned_link(pin) {
            let prog: &mut Xdp = self.program_mut(PROG_XDP)?;
            let updated = XdpLink::try_from(old)
                .map_err(|e| e.to_string())
                .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()))
                .and_then(|id| prog.take_link(id).map(drop).map_err(|e| e.to_string()));
            if let Some(fd) = took_over(updated, "XDP", pin, &pin_error)? {
                return Ok(OnLink::taken_over(fd));
            }
        }
        let (mode, id) = self.attach_xdp(interface, setting)?;
        let prog: &mut Xdp = self.program_mut(PROG_XDP)?;
        let link = prog
            .take_link(id)
            .map_err(|e| attach_error(PROG_XDP, interface, mode, e))?;
        let fd_link = FdLink::try_from(link).map_err(|e| pin_error(std::io::Error::other(e)))?;
        pin_link(fd_link, pin).map_err(&pin_error)?;
        Ok(OnLink {
            mode,
            fd: bpffs::obj_get(pin).map_err(&pin_error)?,
            created: true,
        })
    }

    pub(super) fn attach_tcx_pinned(
        &mut self,
        interface: &str,
        pin: &Path,
        error: impl Fn(ProgramError) -> DatapathError,
    ) -> Result<OnLink, DatapathError> {
        let pin_error = pin_error(PROG_TC_EGRESS, interface, pin);
        let prog: &mut SchedClassifier = self.program_mut(PROG_TC_EGRESS)?;
        if let Some(old) = pinned_link(pin) {
            let updated = SchedClassifierLink::try_from(old)
                .map_err(|e| e.to_string())
                .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()))
                .and_then(|id| prog.take_link(id).map(drop).map_err(|e| e.to_string()));
            if let Some(fd) = took_over(updated, "TCX", pin, &pin_error)? {
                return Ok(OnLink::taken_over(fd));
            }
        }
        let id = prog
            .attach(interface, TcAttachType::Egress)
            .map_err(&error)?;
        let link = prog.take_link(id).map_err(&error)?;
        let fd_link = FdLink::try_from(link).map_err(|e| pin_error(std::io::Error::other(e)))?;
        pin_link(fd_link, pin).map_err(&pin_error)?;
        Ok(OnLink {
            mode: "new link",
            fd: bpffs::obj_get(pin).map_err(&pin_error)?,
            created: true,
        })
    }

    /// The egress filter (before 6.6) at the agent's fixed priority and handle: an earlier
    /// agent's replaced in place, or a new one (then `true`).
    pub(super) fn attach_filter(
        &mut self,
        interface: &str,
    ) -> Result<(SchedClassifierLink, bool), ProgramError> {
        let prog: &mut SchedClassifier = self
            .program_mut(PROG_TC_EGRESS)
            .map_err(|_| ProgramError::UnexpectedProgramType)?;
        let existing = SchedClassifierLink::attached(
            interface,
            TcAttachType::Egress,
            TC_PRIORITY,
            TC_HANDLE,
            None,
        )
        .map_err(|e| ProgramError::from(TcError::IoError(e)))?;
        let (id, created) = match prog.attach_to_link(existing) {
            Ok(id) => (id, false),
            // No filter of ours there yet.
            Err(_) => (
                prog.attach_with_options(
                    interface,
                    TcAttachType::Egress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: TC_PRIORITY,
                        handle: TC_HANDLE,
                        ..Default::default()
                    }),
                )?,
                true,
            ),
        };
        Ok((prog.take_link(id)?, created))
    }

    fn attach_xdp(
        &mut self,
        interface: &str,
        setting: XdpModeSetting,
    ) -> Result<(&'static str, XdpLinkId), DatapathError> {
        let prog: &mut Xdp = self.program_mut(PROG_XDP)?;
        let attempt = |prog: &mut Xdp, mode: XdpMode, name: &'static str| {
            prog.attach(interface, mode)
                .map(|link| (name, link))
                .map_err(|source| attach_error(PROG_XDP, interface, name, source))
        };
        match setting {
            XdpModeSetting::Native => attempt(prog, XdpMode::Driver, "native"),
            XdpModeSetting::Generic => attempt(prog, XdpMode::Skb, "generic"),
            XdpModeSetting::Auto => match attempt(prog, XdpMode::Driver, "native") {
                Ok(ok) => Ok(ok),
                Err(e) => {
                    tracing::info!("{e}; falling back to generic XDP");
                    attempt(prog, XdpMode::Skb, "generic")
                }
            },
        }
    }

    fn detach(&mut self, attached: Attached) {
        let what = attached.describe();
        let result = match attached {
            // The pin is the link's last reference but ours: removing it and closing ours
            // releases the link, which detaches the program.
            Attached::Link { pin, fd, .. } => {
                let removed = std::fs::remove_file(&pin);
                drop(fd);
                removed.map_err(|e| format!("{}: {e}", pin.display()))
            }
            Attached::Filter { link, .. } => ManuallyDrop::into_inner(link)
                .detach()
                .map_err(|e| e.to_string()),
        };
        match result {
            Ok(()) => tracing::info!("detached {what}"),
            Err(e) => tracing::warn!("detaching {what}: {e}"),
        }
    }

    pub(super) fn program_mut<'a, P>(
        &'a mut self,
        name: &'static str,
    ) -> Result<&'a mut P, DatapathError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program>,
    {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram(name))
    }
}

impl Attached {
    /// Whether this start created the attachment (rather than taking over an earlier
    /// agent's).
    fn created(&self) -> bool {
        match self {
            Attached::Link { created, .. } | Attached::Filter { created, .. } => *created,
        }
    }

    /// Lets go without detaching.
    fn leave(self) {
        // A filter's link is in a `ManuallyDrop`: never dropped, as aya's drop would delete
        // the filter. Links are pinned: closing the agent's descriptor leaves them.
        drop(self);
    }
}

/// After putting the new program on the link pinned at `pin` (`updated`): the agent's own
/// descriptor of the link when that worked (aya's handle, dropped, only closed a descriptor:
/// the pin keeps the link); when not, the pin is removed, for a new link to take its place.
fn took_over(
    updated: Result<(), String>,
    what: &str,
    pin: &Path,
    pin_error: &impl Fn(std::io::Error) -> DatapathError,
) -> Result<Option<OwnedFd>, DatapathError> {
    match updated {
        Ok(()) => Ok(Some(bpffs::obj_get(pin).map_err(pin_error)?)),
        Err(e) => {
            tracing::warn!(
                "the {what} link pinned at {} could not take the new program ({e}); attaching \
                 a new one",
                pin.display()
            );
            std::fs::remove_file(pin).map_err(pin_error)?;
            Ok(None)
        }
    }
}

/// The link pinned at `path`, if there is one.
fn pinned_link(path: &Path) -> Option<FdLink> {
    PinnedLink::from_pin(path).ok().map(FdLink::from)
}

/// Pins a link; the pin then holds it (aya's handle only closes a descriptor when dropped).
fn pin_link(link: FdLink, path: &Path) -> std::io::Result<()> {
    link.pin(path)
        .map(drop)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

fn attach_error(
    program: &'static str,
    interface: &str,
    mode: &'static str,
    source: ProgramError,
) -> DatapathError {
    DatapathError::Attach {
        program,
        interface: interface.to_string(),
        mode,
        source: Box::new(source),
    }
}

fn pin_error<'a>(
    program: &'static str,
    interface: &'a str,
    pin: &'a Path,
) -> impl Fn(std::io::Error) -> DatapathError + 'a {
    move |source| DatapathError::PinLink {
        program,
        interface: interface.to_string(),
        pin: pin.to_path_buf(),
        source,
    }
}
