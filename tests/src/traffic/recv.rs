//! The counting UDP receiver.

use std::collections::HashMap;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::send::payload_byte;
use super::sys::{SockAddr, queued_bytes, setsockopt_int, socket_drops};
use crate::netns::Netns;
use crate::timing::Scaled;

/// Receive buffer asked for with SO_RCVBUFFORCE (root may exceed rmem_max): room for about a
/// million small datagrams, so a scheduling hiccup of the receiver thread never overflows it.
pub const RCVBUF_BYTES: i32 = 256 << 20;

/// What a [`UdpReceiver`] saw.
#[derive(Clone, Debug, Default)]
pub struct RecvReport {
    /// Packets per (source ip, source port).
    pub per_source: HashMap<SocketAddr, u64>,
    pub packets: u64,
    pub bytes: u64,
    /// The socket's own drop counter over its life: must be 0 for counts to be trusted.
    pub socket_drops: u32,
    /// Datagrams whose payload is not [`payload_byte`]s (changed on the way).
    pub malformed: u64,
}

impl RecvReport {
    /// Packets per source address.
    pub fn per_ip(&self) -> HashMap<IpAddr, u64> {
        let mut m = HashMap::new();
        for (k, v) in &self.per_source {
            *m.entry(k.ip()).or_default() += v;
        }
        m
    }

    pub fn from(&self, src: &SocketAddr) -> u64 {
        self.per_source.get(src).copied().unwrap_or(0)
    }
}

/// A UDP socket in some namespace, counted by a thread until [`UdpReceiver::finish`].
pub struct UdpReceiver {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    live: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<RecvReport>>>,
}

/// After the sender stops, the receiver ends once nothing arrived for this long and its
/// queue is empty. Packets still on their way then are in a per-CPU backlog, which drains
/// in microseconds; this is a condition with a wide margin, not a guess at a duration.
pub const RECV_QUIET: Scaled = Scaled::millis(100);
/// Bound on the whole drain.
pub const RECV_DRAIN_DEADLINE: Scaled = Scaled::secs(10);
/// The receiving thread wakes up this often to look at its stop flag (a period, not a bound).
const RECV_WAKE: Duration = Duration::from_millis(20);

impl UdpReceiver {
    /// Binds `bind` inside `ns` and starts counting.
    pub fn start(ns: &Netns, bind: SocketAddr) -> Result<UdpReceiver> {
        let sock = ns.run(move || -> Result<UdpSocket> {
            let s = UdpSocket::bind(bind).with_context(|| format!("binding receiver to {bind}"))?;
            setsockopt_int(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                RCVBUF_BYTES,
            )
            .context("SO_RCVBUFFORCE (needs CAP_NET_ADMIN)")?;
            // Wake up regularly to look at the stop flag.
            s.set_read_timeout(Some(RECV_WAKE))?;
            Ok(s)
        })??;
        let local = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicU64::new(0));
        let handle = {
            let stop = stop.clone();
            let live = live.clone();
            std::thread::Builder::new()
                .name(format!("udp-rx-{}", local.port()))
                .spawn(move || recv_loop(sock, &stop, &live))?
        };
        Ok(UdpReceiver {
            local,
            stop,
            live,
            handle: Some(handle),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Packets counted so far.
    pub fn received(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Waits until the path is drained (see [`RECV_QUIET`]) and returns the counts.
    pub fn finish(mut self) -> Result<RecvReport> {
        self.stop.store(true, Ordering::Relaxed);
        let h = self.handle.take().expect("finish runs once");
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for UdpReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn recv_loop(sock: UdpSocket, stop: &AtomicBool, live: &AtomicU64) -> Result<RecvReport> {
    const BATCH: usize = 64;
    const BUF: usize = 2048;
    let fd = sock.as_raw_fd();
    let mut bufs = vec![[0u8; BUF]; BATCH];
    // SAFETY: all-zero is valid for these C structs; pointers are set below.
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { zeroed() }; BATCH];
    let mut iov: Vec<libc::iovec> = vec![unsafe { zeroed() }; BATCH];
    let mut hdr: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; BATCH];
    let mut report = RecvReport::default();
    let (quiet, drain) = (RECV_QUIET.get(), RECV_DRAIN_DEADLINE.get());
    let mut last_rx = Instant::now();
    let mut stop_at: Option<Instant> = None;
    loop {
        for i in 0..BATCH {
            iov[i] = libc::iovec {
                iov_base: bufs[i].as_mut_ptr() as *mut libc::c_void,
                iov_len: BUF,
            };
            hdr[i].msg_hdr.msg_name = &mut names[i] as *mut _ as *mut libc::c_void;
            hdr[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr[i].msg_hdr.msg_iov = &mut iov[i];
            hdr[i].msg_hdr.msg_iovlen = 1;
            hdr[i].msg_len = 0;
        }
        // SAFETY: BATCH initialised headers pointing at live buffers; blocking call bounded
        // by SO_RCVTIMEO; MSG_WAITFORONE returns as soon as one datagram is there.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                hdr.as_mut_ptr(),
                BATCH as _,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let now = Instant::now();
        if rc > 0 {
            last_rx = now;
            for i in 0..rc as usize {
                if let Some(src) = SockAddr::to_std(&names[i]) {
                    *report.per_source.entry(src).or_default() += 1;
                }
                let len = hdr[i].msg_len as usize;
                report.bytes += len as u64;
                if len > BUF
                    || !bufs[i][..len]
                        .iter()
                        .enumerate()
                        .all(|(k, &b)| b == payload_byte(k))
                {
                    report.malformed += 1;
                }
            }
            report.packets += rc as u64;
            live.store(report.packets, Ordering::Relaxed);
        } else {
            let e = std::io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                return Err(e).context("recvmmsg");
            }
        }
        if stop.load(Ordering::Relaxed) {
            let t = *stop_at.get_or_insert(now);
            let quiet_since = last_rx.max(t);
            if now - quiet_since >= quiet && queued_bytes(fd) == 0 {
                break;
            }
            if now - t > drain {
                bail!(
                    "receiver on {:?} still receiving {RECV_DRAIN_DEADLINE} after stop",
                    sock.local_addr()
                );
            }
        }
    }
    report.socket_drops = socket_drops(fd)?;
    Ok(report)
}
