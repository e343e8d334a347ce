//! The pacing qdisc: `fq` as the root qdisc of each egress interface while services are
//! shaped. The datapath only writes departure times (`skb->tstamp`); `fq` is what holds each
//! packet until then.
//!
//! Through rtnetlink, with `netlink-packet-route`'s messages over a plain `netlink-sys`
//! socket: the `rtnetlink` crate builds on the same two but adds qdiscs of kind `ingress`
//! only. Synchronous: a handful of requests at start and stop.
//!
//! What is replaced, and what is put back: only a root qdisc the kernel chose by itself
//! (handle `0:`: `noqueue` on veth, `pfifo_fast`, `mq`, or `net.core.default_qdisc` on
//! real NICs) is replaced. Deleting ours later makes the kernel attach its default again,
//! exactly as before. A root qdisc someone configured (any other handle) is refused, with its
//! kind and handle named: the agent never undoes an operator's traffic control. Ours has a
//! handle of its own ([`PACER_HANDLE`]), so a later run recognises one left by a run that
//! was killed, and stop deletes a root qdisc only while it is still that one.

use std::ffi::CString;
use std::io;
use std::thread;
use std::time::Duration;

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Major number of the pacing qdisc's handle, `a6e:` (as the agent's probe mark `0x0a6e0b00`):
/// what tells ours from an operator's.
pub const PACER_HANDLE: u16 = 0x0a6e;

/// `fq`'s own horizon (`TCA_FQ_HORIZON`, default 10 s): packets beyond it are dropped by the
/// qdisc, so it must be at least the policy's longest `shaping.horizon`.
pub const FQ_DEFAULT_HORIZON: Duration = Duration::from_secs(10);
/// Packets `fq` holds per flow (`TCA_FQ_FLOW_PLIMIT`; its default, 100, would drop a
/// flow's packets long before a horizon of seconds is reached) and in all
/// (`TCA_FQ_PLIMIT`, its default 10,000 kept).
pub const FQ_FLOW_LIMIT: u32 = 10_000;
pub const FQ_LIMIT: u32 = 10_000;

const TCA_FQ_PLIMIT: u16 = 1;
const TCA_FQ_FLOW_PLIMIT: u16 = 2;
const TCA_FQ_HORIZON: u16 = 14;
/// `NLMSGERR_ATTR_MSG`: the kernel's own text in an extended ack.
const NLMSGERR_ATTR_MSG: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum QdiscError {
    #[error("interface {0} does not exist")]
    NoInterface(String),
    #[error(
        "interface {interface} has root qdisc `{kind}` (handle {handle}), configured by someone \
         else; shaping needs `fq` as the root qdisc and the agent does not replace another's \
         traffic control: remove it (`tc qdisc del dev {interface} root`) or shape elsewhere"
    )]
    Foreign {
        interface: String,
        kind: String,
        handle: String,
    },
    /// The kernel has no `sch_fq` (adding one says the kind is unknown).
    #[error("adding an `fq` qdisc fails: {0}")]
    FqMissing(String),
    #[error("{what} on interface {interface}: {source}")]
    Netlink {
        what: &'static str,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
}

/// A root qdisc as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootQdisc {
    pub kind: String,
    /// Major and minor, as `tc` shows them (`8001:`).
    pub handle: u32,
}

impl RootQdisc {
    /// Chosen by the kernel itself (handle `0:`): deleting a replacement brings it back.
    pub fn is_default(&self) -> bool {
        self.handle >> 16 == 0
    }

    /// Ours (the pacing qdisc, perhaps left by an agent that was killed).
    pub fn is_ours(&self) -> bool {
        self.handle >> 16 == u32::from(PACER_HANDLE)
    }

    pub fn handle_text(&self) -> String {
        format_handle(self.handle)
    }
}

fn format_handle(h: u32) -> String {
    match h & 0xffff {
        0 => format!("{:x}:", h >> 16),
        minor => format!("{:x}:{minor:x}", h >> 16),
    }
}

/// What the pacing qdisc is: `fq` with its options, or (for tests on kernels without
/// `sch_fq`) another kind without options, to exercise install and restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacerSpec {
    kind: &'static str,
    options: Vec<(u16, Vec<u8>)>,
}

impl PacerSpec {
    /// `fq` whose own horizon covers `horizon` (the policy's longest).
    pub fn fq(horizon: Duration) -> PacerSpec {
        let horizon = fq_horizon(horizon);
        let us = u32::try_from(horizon.as_micros()).unwrap_or(u32::MAX);
        PacerSpec {
            kind: "fq",
            options: vec![
                (TCA_FQ_PLIMIT, FQ_LIMIT.to_ne_bytes().to_vec()),
                (TCA_FQ_FLOW_PLIMIT, FQ_FLOW_LIMIT.to_ne_bytes().to_vec()),
                (TCA_FQ_HORIZON, us.to_ne_bytes().to_vec()),
            ],
        }
    }

    /// A qdisc of `kind` with its default options: only to test install and restore where
    /// `fq` is missing.
    pub fn plain(kind: &'static str) -> PacerSpec {
        PacerSpec {
            kind,
            options: Vec::new(),
        }
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

/// `fq`'s horizon for a policy whose longest `shaping.horizon` is `longest`: never shorter
/// than its default.
pub fn fq_horizon(longest: Duration) -> Duration {
    longest.max(FQ_DEFAULT_HORIZON)
}

fn ifindex(interface: &str) -> Result<u32, QdiscError> {
    let name = CString::new(interface).map_err(|_| QdiscError::NoInterface(interface.into()))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(QdiscError::NoInterface(interface.into())),
        i => Ok(i),
    }
}

/// The egress hook of `clsact` (`TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`).
const CLSACT_EGRESS: u32 = 0xffff_fff3;

/// Whether `interface` has an egress `cls_bpf` filter with this priority and handle: the
/// watchdog's check of the agent's egress program before TCX (6.6).
pub fn has_egress_filter(interface: &str, priority: u16, handle: u32) -> Result<bool, QdiscError> {
    let index = ifindex(interface)?;
    Rtnl::open()?
        .has_egress_filter(index, priority, handle)
        .map_err(|source| QdiscError::Netlink {
            what: "listing egress filters",
            interface: interface.into(),
            source,
        })
}

/// One rtnetlink socket in the calling thread's network namespace.
struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    fn open() -> Result<Rtnl, QdiscError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(QdiscError::Socket)?;
        socket
            .bind(&SocketAddr::new(0, 0))
            .map_err(QdiscError::Socket)?;
        // The kernel's reason in words ("Specified qdisc kind is unknown."), and acks
        // without a copy of the request.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends one request and reads until its ack (or the end of a dump), returning the
    /// messages of a dump.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<TcMessage>> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink message of length 0",
                    ));
                }
                offset += len;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        let errno = e.to_io();
                        return Err(match ext_ack_message(&e.header) {
                            Some(text) => io::Error::new(
                                errno.kind(),
                                KernelSaid {
                                    errno: errno.raw_os_error().unwrap_or(0),
                                    text,
                                },
                            ),
                            None => errno,
                        });
                    }
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewQueueDiscipline(m)
                        | RouteNetlinkMessage::NewTrafficFilter(m),
                    ) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Whether interface `index` has an egress filter (under `clsact`) with this priority and
    /// handle.
    fn has_egress_filter(&mut self, index: u32, priority: u16, handle: u32) -> io::Result<bool> {
        let mut msg = TcMessage::default();
        msg.header.index = index as i32;
        msg.header.parent = CLSACT_EGRESS.into();
        let all = self.request(RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP)?;
        Ok(all.iter().any(|m| {
            u32::from(m.header.handle) == handle && (m.header.info >> 16) as u16 == priority
        }))
    }

    fn root_qdisc(&mut self, index: u32) -> io::Result<Option<RootQdisc>> {
        let mut msg = TcMessage::default();
        msg.header.index = index as i32;
        // The kernel's default qdiscs (`noqueue`, `mq`'s) are invisible to a plain dump, as
        // to `tc qdisc show` without it.
        msg.attributes.push(TcAttribute::DumpInvisible(true));
        let all = self.request(RouteNetlinkMessage::GetQueueDiscipline(msg), NLM_F_DUMP)?;
        Ok(all
            .into_iter()
            .find(|m| m.header.index == index as i32 && m.header.parent == TcHandle::ROOT)
            .map(|m| RootQdisc {
                kind: m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        TcAttribute::Kind(k) => Some(k.clone()),
                        _ => None,
                    })
                    .unwrap_or_default(),
                handle: m.header.handle.into(),
            }))
    }

    /// Adds the pacer as root. `EXCL`: never over a qdisc with our handle; without `REPLACE`
    /// the kernel itself refuses to replace a configured root qdisc (only a default one,
    /// handle `0:`, gives way).
    /// Adds the pacer as root qdisc; with `ours_there`, changes the pacer an earlier agent
    /// left in place instead (`tc qdisc replace` on the same handle and kind: the kernel
    /// changes its options, no packet meets another qdisc meanwhile).
    fn add_root(&mut self, index: u32, spec: &PacerSpec, ours_there: bool) -> io::Result<()> {
        let mut msg = pacer_root(index);
        msg.attributes
            .push(TcAttribute::Kind(spec.kind.to_string()));
        if !spec.options.is_empty() {
            msg.attributes.push(TcAttribute::Options(
                spec.options
                    .iter()
                    .map(|(kind, value)| TcOption::Other(DefaultNla::new(*kind, value.clone())))
                    .collect(),
            ));
        }
        let flags = if ours_there {
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        } else {
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        };
        self.request(RouteNetlinkMessage::NewQueueDiscipline(msg), flags)
            .map(drop)
    }

    /// Deletes the root qdisc if it has our handle (the kernel checks the handle: another
    /// qdisc put there since is left alone, with EINVAL).
    fn delete_ours(&mut self, index: u32) -> io::Result<()> {
        let msg = pacer_root(index);
        self.request(RouteNetlinkMessage::DelQueueDiscipline(msg), NLM_F_ACK)
            .map(drop)
    }
}

/// An error the kernel explained in words (extended ack), with its errno.
#[derive(Debug)]
struct KernelSaid {
    errno: i32,
    text: String,
}

impl std::fmt::Display for KernelSaid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (os error {})",
            self.text.trim_end_matches('.'),
            self.errno
        )
    }
}

impl std::error::Error for KernelSaid {}

/// The errno of a request's error, whether or not the kernel explained it.
fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<KernelSaid>())
            .map(|k| k.errno)
    })
}

/// The text of `NLMSGERR_ATTR_MSG` in an error's payload: the request's header (16 bytes,
/// the ack being capped), then attributes.
fn ext_ack_message(payload: &[u8]) -> Option<String> {
    let mut rest = payload.get(16..)?;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &rest[4..len];
            let text = text.split(|b| *b == 0).next().unwrap_or(text);
            return Some(String::from_utf8_lossy(text).trim().to_string());
        }
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    None
}

/// The root qdisc of `interface` (in this thread's network namespace), if it has one.
pub fn root_qdisc(interface: &str) -> Result<Option<RootQdisc>, QdiscError> {
    let index = ifindex(interface)?;
    Rtnl::open()?
        .root_qdisc(index)
        .map_err(|source| QdiscError::Netlink {
            what: "reading the root qdisc",
            interface: interface.into(),
            source,
        })
}

/// Read-only: whether the pacer may become the root qdisc of `interface` (its root qdisc is
/// the kernel's default, or ours).
pub fn check(interface: &str) -> Result<(), QdiscError> {
    match root_qdisc(interface)? {
        Some(q) if !q.is_default() && !q.is_ours() => Err(QdiscError::Foreign {
            interface: interface.into(),
            handle: q.handle_text(),
            kind: q.kind,
        }),
        _ => Ok(()),
    }
}

/// Whether this kernel has the qdisc `spec` needs.
#[derive(Debug)]
pub enum Support {
    Yes,
    /// The kernel does not know the kind; its words.
    No(String),
    /// The probe itself could not run (no right to make a network namespace): the install
    /// will say.
    Unknown(String),
}

/// Asks the kernel whether it has `spec`'s qdisc, by adding one as the root of the loopback
/// device of a scratch network namespace, made in a thread of its own and gone with it:
/// nothing the host or its traffic sees is touched.
pub fn probe(spec: &PacerSpec) -> Support {
    let spec = spec.clone();
    let probe = thread::spawn(move || {
        // SAFETY: plain syscall; it moves only this thread into a new network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Support::Unknown(format!(
                "making a scratch network namespace: {}",
                io::Error::last_os_error()
            ));
        }
        let mut rtnl = match Rtnl::open() {
            Ok(r) => r,
            Err(e) => return Support::Unknown(e.to_string()),
        };
        // The loopback device is index 1 in every namespace.
        match rtnl.add_root(1, &spec, false) {
            Ok(()) => Support::Yes,
            Err(e) if errno(&e) == Some(libc::ENOENT) => Support::No(e.to_string()),
            Err(e) => Support::Unknown(format!(
                "adding `{}` in a scratch namespace: {e}",
                spec.kind
            )),
        }
    });
    probe
        .join()
        .unwrap_or_else(|_| Support::Unknown("the probe thread panicked".into()))
}

/// The pacer as root qdisc of some interfaces; dropping it puts back what was there.
#[derive(Debug)]
pub struct Pacers {
    /// (interface, ifindex), in install order.
    installed: Vec<(String, u32)>,
    kind: &'static str,
}

impl Pacers {
    /// Installs `spec` as the root qdisc of every interface, or of none: when one fails, those
    /// done before it are restored. Every interface is checked before the first is touched.
    pub fn install(spec: &PacerSpec, interfaces: &[String]) -> Result<Pacers, QdiscError> {
        let mut rtnl = Rtnl::open()?;
        let mut plan = Vec::new();
        for interface in interfaces {
            let index = ifindex(interface)?;
            let current = rtnl
                .root_qdisc(index)
                .map_err(|source| QdiscError::Netlink {
                    what: "reading the root qdisc",
                    interface: interface.clone(),
                    source,
                })?;
            let ours_there = matches!(&current, Some(q) if q.is_ours());
            match current {
                // Left by an earlier agent (the datapath outlives it): changed in place.
                Some(_) if ours_there => {
                    tracing::info!(
                        "{interface}: taking over the pacing qdisc an earlier agent left"
                    );
                }
                Some(q) if !q.is_default() => {
                    return Err(QdiscError::Foreign {
                        interface: interface.clone(),
                        handle: q.handle_text(),
                        kind: q.kind,
                    });
                }
                _ => {}
            }
            plan.push((interface.clone(), index, ours_there));
        }
        let mut pacers = Pacers {
            installed: Vec::new(),
            kind: spec.kind,
        };
        for (interface, index, ours_there) in plan {
            if let Err(source) = rtnl.add_root(index, spec, ours_there) {
                // `pacers` restores what was done when it drops.
                if errno(&source) == Some(libc::ENOENT) {
                    return Err(QdiscError::FqMissing(source.to_string()));
                }
                return Err(QdiscError::Netlink {
                    what: "adding the pacing qdisc",
                    interface,
                    source,
                });
            }
            pacers.installed.push((interface, index));
        }
        Ok(pacers)
    }

    /// Interfaces the pacer is root qdisc of, for logs and status.
    pub fn describe(&self) -> Vec<String> {
        self.installed
            .iter()
            .map(|(i, _)| {
                format!(
                    "{} ({}) on {i}",
                    self.kind,
                    format_handle(u32::from(PACER_HANDLE) << 16)
                )
            })
            .collect()
    }

    /// Deletes every pacer, newest first; the kernel attaches each interface's default qdisc
    /// again. Errors are logged: an interface may be gone, or someone replaced our qdisc.
    pub fn restore(&mut self) {
        let mut rtnl = match Rtnl::open() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!("restoring root qdiscs: {e}");
                None
            }
        };
        while let Some((interface, index)) = self.installed.pop() {
            let Some(rtnl) = rtnl.as_mut() else { continue };
            match rtnl.delete_ours(index) {
                Ok(()) => tracing::info!("{interface}: pacing qdisc removed, default restored"),
                Err(e) => tracing::warn!("{interface}: removing the pacing qdisc: {e}"),
            }
        }
    }
}

impl Pacers {
    /// Lets go of the pacers on `interfaces` without removing them (a reload's new pacers
    /// took them over in place); dropping the rest removes those.
    pub fn release(&mut self, interfaces: &[String]) {
        self.installed.retain(|(i, _)| !interfaces.contains(i));
    }

    /// Lets go of the pacers without removing them: the datapath the agent leaves running
    /// keeps stamping departure times, which only `fq` honours.
    pub fn leave(mut self) {
        self.installed.clear();
    }

    /// Takes charge of the pacers an earlier agent left on `interfaces` (ours only, by
    /// handle), so that dropping the result removes them (`agent uninstall`).
    pub fn left_on(interfaces: &[String]) -> Pacers {
        let installed = interfaces
            .iter()
            .filter(|i| matches!(root_qdisc(i), Ok(Some(q)) if q.is_ours()))
            .filter_map(|i| Some((i.clone(), ifindex(i).ok()?)))
            .collect();
        Pacers {
            installed,
            kind: "fq",
        }
    }
}

impl Drop for Pacers {
    fn drop(&mut self) {
        self.restore();
    }
}

/// A message about the root qdisc of interface `index` with the pacer's handle.
fn pacer_root(index: u32) -> TcMessage {
    let mut msg = TcMessage::default();
    msg.header.index = index as i32;
    msg.header.parent = TcHandle::ROOT;
    msg.header.handle = TcHandle {
        major: PACER_HANDLE,
        minor: 0,
    };
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_tell_default_ours_and_foreign_apart() {
        let q = |kind: &str, handle: u32| RootQdisc {
            kind: kind.into(),
            handle,
        };
        assert!(q("noqueue", 0).is_default());
        assert!(q("mq", 0).is_default());
        assert!(!q("htb", 0x0001_0000).is_default());
        assert!(q("fq", 0x0a6e_0000).is_ours());
        assert_eq!(q("htb", 0x8001_0000).handle_text(), "8001:");
        assert_eq!(q("x", 0x0001_0002).handle_text(), "1:2");
    }

    #[test]
    fn fq_options_cover_the_policy_horizon() {
        assert_eq!(fq_horizon(Duration::from_secs(2)), FQ_DEFAULT_HORIZON);
        assert_eq!(fq_horizon(Duration::from_secs(30)), Duration::from_secs(30));
        let spec = PacerSpec::fq(Duration::from_secs(30));
        let horizon = spec.options.iter().find(|(k, _)| *k == TCA_FQ_HORIZON);
        assert_eq!(
            horizon.map(|(_, v)| v.clone()),
            Some(30_000_000u32.to_ne_bytes().to_vec())
        );
        // Past what fq's u32 of microseconds holds: the most it holds.
        let long = PacerSpec::fq(Duration::from_secs(10_000));
        let h = long.options.iter().find(|(k, _)| *k == TCA_FQ_HORIZON);
        assert_eq!(
            h.map(|(_, v)| v.clone()),
            Some(u32::MAX.to_ne_bytes().to_vec())
        );
    }

    #[test]
    fn the_kernels_words_come_out_of_an_extended_ack() {
        let mut payload = vec![0u8; 16];
        let text = b"Specified qdisc kind is unknown.\0";
        let len = 4 + text.len();
        payload.extend((len as u16).to_ne_bytes());
        payload.extend(NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend(text);
        assert_eq!(
            ext_ack_message(&payload).as_deref(),
            Some("Specified qdisc kind is unknown.")
        );
        assert_eq!(ext_ack_message(&[0; 16]), None);
        assert_eq!(ext_ack_message(&[0; 3]), None);
    }
}
