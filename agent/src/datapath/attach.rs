//! Attaching programs to interfaces. All or nothing: when one attachment fails, the ones made
//! before it in the same call are detached again, and the error names the interface and mode.

use agent_common::maps::{PROG_TC_EGRESS, PROG_XDP};
use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType, TcError, Xdp, XdpMode, tc,
    tc::SchedClassifierLinkId, xdp::XdpLinkId,
};

use super::{Datapath, DatapathError, Kernel};

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

pub(super) enum Attached {
    Xdp {
        interface: String,
        mode: &'static str,
        link: XdpLinkId,
    },
    TcEgress {
        interface: String,
        mode: TcMode,
        link: SchedClassifierLinkId,
    },
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
            Attached::Xdp {
                interface, mode, ..
            } => format!("xdp ({mode}) on {interface}"),
            Attached::TcEgress {
                interface, mode, ..
            } => format!("{} on {interface}", mode.describe()),
        }
    }
}

impl Datapath {
    /// Attaches the programs each spec asks for. On error nothing of this call stays attached.
    pub fn attach(&mut self, specs: &[AttachSpec]) -> Result<(), DatapathError> {
        let before = self.attached.len();
        for spec in specs {
            if let Err(e) = self.attach_one(spec) {
                while self.attached.len() > before {
                    if let Some(a) = self.attached.pop() {
                        self.detach(a);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// What is attached, for logs and status.
    pub fn attachments(&self) -> Vec<String> {
        self.attached.iter().map(Attached::describe).collect()
    }

    /// Detaches everything, newest first.
    pub fn detach_all(&mut self) {
        while let Some(a) = self.attached.pop() {
            self.detach(a);
        }
    }

    fn attach_one(&mut self, spec: &AttachSpec) -> Result<(), DatapathError> {
        if spec.ingress {
            let (mode, link) = self.attach_xdp(&spec.interface, spec.xdp_mode)?;
            self.attached.push(Attached::Xdp {
                interface: spec.interface.clone(),
                mode,
                link,
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
            if mode == TcMode::Clsact {
                tracing::info!(
                    "kernel {} has no TCX (6.6 and later): tc egress on {} attaches as a \
                     cls_bpf filter under a clsact qdisc",
                    Kernel::current(),
                    spec.interface
                );
                add_clsact(&spec.interface).map_err(|e| error(e.into()))?;
            }
            let prog: &mut SchedClassifier = self.program_mut(PROG_TC_EGRESS)?;
            let link = prog
                .attach(&spec.interface, TcAttachType::Egress)
                .map_err(error)?;
            self.attached.push(Attached::TcEgress {
                interface: spec.interface.clone(),
                mode,
                link,
            });
        }
        Ok(())
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
                .map_err(|source| DatapathError::Attach {
                    program: PROG_XDP,
                    interface: interface.to_string(),
                    mode: name,
                    source: Box::new(source),
                })
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
            Attached::Xdp { link, .. } => self
                .program_mut::<Xdp>(PROG_XDP)
                .map(|p| p.detach(link).map_err(|e| e.to_string())),
            Attached::TcEgress { link, .. } => self
                .program_mut::<SchedClassifier>(PROG_TC_EGRESS)
                .map(|p| p.detach(link).map_err(|e| e.to_string())),
        };
        match result {
            Ok(Ok(())) => tracing::info!("detached {what}"),
            Ok(Err(e)) => tracing::warn!("detaching {what}: {e}"),
            Err(e) => tracing::warn!("detaching {what}: {e}"),
        }
    }

    fn program_mut<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, DatapathError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program>,
    {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram(name))
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}
