//! The paced UDP sender.

use std::collections::HashMap;
use std::mem::zeroed;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::sys::{SockAddr, raise_nofile, setsockopt_int};
use crate::netns::Netns;
use crate::timing;

/// How the sender puts packets on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendMethod {
    /// One connected UDP socket per flow, one `send` per packet; the kernel picks source
    /// ports. Needs one descriptor per flow. A connected socket reports an ICMP error of an
    /// earlier packet (nobody listening) on its next send: that send counts as failed.
    Sockets,
    /// One raw socket per source address; the sender writes the UDP header itself (source
    /// port `base_port + flow index`) and hands the kernel up to [`RAW_BATCH`] packets per
    /// `sendmmsg`. Fewer syscalls when the schedule is behind.
    Raw,
    /// IPv4 only: one raw socket with `IP_HDRINCL`; the sender writes the IP header too, so
    /// a source needs no local address (as `hping3 --rand-source`, for tens of thousands of
    /// sources) and batches are not split by source. Flow `i` uses source port `base_port` +
    /// its index among its source's flows. Nothing can answer such a source: for UDP
    /// toward a listening socket, nothing needs to. Packets leave [`RAW_BATCH`] at a time,
    /// once the last of them is due, and the sender sleeps in between instead of spinning:
    /// its CPU time is its sends (for benchmarks that count it), and a flow's pacing is even
    /// to within one batch's time (`RAW_BATCH` / the aggregate rate).
    Spoofed,
}

/// Most packets one `sendmmsg` carries. Only packets already due are batched, so on
/// schedule a batch holds one packet and pacing stays even.
pub const RAW_BATCH: usize = 64;

/// What to send.
#[derive(Clone, Debug)]
pub struct UdpFlood {
    pub dst: SocketAddr,
    /// Source addresses; flows are split into contiguous blocks, one block per source.
    pub sources: Vec<IpAddr>,
    pub flows: usize,
    /// Packets per second of each flow.
    pub rate_per_flow: f64,
    pub duration: Duration,
    /// UDP payload bytes.
    pub payload: usize,
    pub method: SendMethod,
    /// [`SendMethod::Raw`]: flow `i` uses source port `base_port + i`;
    /// [`SendMethod::Spoofed`]: `base_port` + its index among its source's flows.
    pub base_port: u16,
}

impl UdpFlood {
    /// `flows` flows from one source, 64-byte payloads, raw sockets, ports from 20000.
    pub fn new(
        dst: SocketAddr,
        src: IpAddr,
        flows: usize,
        rate_per_flow: f64,
        duration: Duration,
    ) -> UdpFlood {
        UdpFlood {
            dst,
            sources: vec![src],
            flows,
            rate_per_flow,
            duration,
            payload: 64,
            method: SendMethod::Raw,
            base_port: 20000,
        }
    }

    /// Packets each flow sends: `rate * duration`, rounded.
    pub fn packets_per_flow(&self) -> u64 {
        (self.rate_per_flow * self.duration.as_secs_f64()).round() as u64
    }

    pub fn offered_pps(&self) -> f64 {
        self.rate_per_flow * self.flows as f64
    }

    fn source_of(&self, flow: usize) -> usize {
        flow * self.sources.len() / self.flows
    }

    /// The first flow of source `s` (the smallest `f` with `source_of(f) == s`).
    fn first_flow_of(&self, s: usize) -> usize {
        (s * self.flows).div_ceil(self.sources.len())
    }

    /// The socket that carries `flow`'s packets: one per source, or the only one.
    fn socket_of(&self, flow: usize) -> usize {
        match self.method {
            SendMethod::Spoofed => 0,
            SendMethod::Sockets | SendMethod::Raw => self.source_of(flow),
        }
    }
}

/// What one flow sent.
#[derive(Clone, Debug)]
pub struct FlowSent {
    pub src: SocketAddr,
    pub sent: u64,
    /// Send errors (the packet was not handed to the kernel).
    pub failed: u64,
    /// Just before the syscall that carried the flow's first packet.
    pub first: Option<Instant>,
    /// Just before the syscall that carried the flow's last packet.
    pub last: Option<Instant>,
}

impl FlowSent {
    /// Time from the first to the last packet; zero when fewer than two were sent.
    pub fn span(&self) -> Duration {
        match (self.first, self.last) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }
}

/// What a [`UdpSender`] run did.
#[derive(Clone, Debug)]
pub struct SendReport {
    pub flows: Vec<FlowSent>,
    pub sent: u64,
    pub failed: u64,
    /// From the first packet's send to the last one's.
    pub elapsed: Duration,
    /// Packets per second the run asked for.
    pub offered_pps: f64,
    /// Packets per second it achieved: `(sent - 1) / elapsed`.
    pub achieved_pps: f64,
    /// Largest delay of a send behind its scheduled time.
    pub max_lag: Duration,
    /// Sends that were more than 1 ms behind schedule.
    pub late: u64,
}

impl SendReport {
    /// Sent packets per source address.
    pub fn sent_per_ip(&self) -> HashMap<IpAddr, u64> {
        let mut m = HashMap::new();
        for f in &self.flows {
            *m.entry(f.src.ip()).or_default() += f.sent;
        }
        m
    }

    /// Per source address, the span from its earliest first packet to its latest last one.
    pub fn span_per_ip(&self) -> HashMap<IpAddr, Duration> {
        let mut m: HashMap<IpAddr, (Instant, Instant)> = HashMap::new();
        for f in &self.flows {
            if let (Some(a), Some(b)) = (f.first, f.last) {
                let e = m.entry(f.src.ip()).or_insert((a, b));
                e.0 = e.0.min(a);
                e.1 = e.1.max(b);
            }
        }
        m.into_iter()
            .map(|(ip, (a, b))| (ip, b.saturating_duration_since(a)))
            .collect()
    }

    /// Fails when the run fell short of its schedule: a limiter test at an offered rate the
    /// sender did not reach would test something else than it says. A precondition, not a
    /// bound: the offered rate is what is tested and does not scale with the machine, so the
    /// message says so ([`timing::unmet`]).
    pub fn ensure_on_schedule(&self, min_fraction: f64) -> Result<()> {
        ensure!(
            self.failed == 0,
            "sender: {} sends failed (of {})",
            self.failed,
            self.sent + self.failed
        );
        ensure!(
            self.achieved_pps >= self.offered_pps * min_fraction,
            "{}",
            timing::unmet(&format!(
                "the sender reached {:.0} pps of the {:.0} pps asked for (< {:.0}%), max lag \
                 {:?}, {} sends > 1 ms late: this machine cannot offer that load",
                self.achieved_pps,
                self.offered_pps,
                min_fraction * 100.0,
                self.max_lag,
                self.late
            ))
        );
        Ok(())
    }
}

enum Wire {
    /// One connected socket per flow.
    Sockets(Vec<UdpSocket>),
    /// One raw socket per source (or one for every source, [`SendMethod::Spoofed`]), the
    /// ready datagram of each flow (UDP, or IP for `Spoofed`), and the destination.
    Raw {
        socks: Vec<OwnedFd>,
        packets: Vec<Vec<u8>>,
        dst: SockAddr,
    },
}

/// A paced UDP sender whose sockets live in the client namespace.
pub struct UdpSender {
    spec: UdpFlood,
    wire: Wire,
    srcs: Vec<SocketAddr>,
    progress: SendProgress,
}

/// A running sender seen from another thread: packets sent so far, and a way to end the
/// schedule early (for a live display, or Ctrl-C).
#[derive(Clone, Default)]
pub struct SendProgress {
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl SendProgress {
    /// Packets sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Ends the schedule at the next packet; the report counts what was sent.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl UdpSender {
    /// Opens the sockets inside `ns` (they stay there; the run itself can happen on any
    /// thread).
    pub fn new(ns: &Netns, spec: UdpFlood) -> Result<UdpSender> {
        ensure!(spec.flows > 0, "a flood needs at least one flow");
        ensure!(!spec.sources.is_empty(), "a flood needs a source address");
        ensure!(spec.rate_per_flow > 0.0, "rate must be positive");
        if spec.method == SendMethod::Sockets {
            raise_nofile(spec.flows as u64 + 1024)?;
        }
        let spec2 = spec.clone();
        let (wire, srcs) = ns.run(move || open_wire(&spec2))??;
        Ok(UdpSender {
            spec,
            wire,
            srcs,
            progress: SendProgress::default(),
        })
    }

    pub fn spec(&self) -> &UdpFlood {
        &self.spec
    }

    /// The live count and stop switch of this sender's run.
    pub fn progress(&self) -> SendProgress {
        self.progress.clone()
    }

    /// Source address of every flow, in flow order.
    pub fn sources(&self) -> &[SocketAddr] {
        &self.srcs
    }

    /// Sends the whole schedule on this thread. Packet `j` (flow `j % flows`) is due at
    /// `start + j / (flows * rate)`: every flow is paced at exactly its rate and the flows'
    /// packets interleave evenly. A packet is sent once due, never before; waiting sleeps
    /// until shortly before the deadline and spins the rest, because a plain sleep
    /// overshoots by tens of microseconds, which at 100k pps is several packets.
    pub fn run(self) -> Result<SendReport> {
        let spec = &self.spec;
        let n = spec.flows;
        let per_flow = spec.packets_per_flow();
        let total = per_flow * n as u64;
        let agg = spec.offered_pps();
        let mut flows: Vec<FlowSent> = self
            .srcs
            .iter()
            .map(|&src| FlowSent {
                src,
                sent: 0,
                failed: 0,
                first: None,
                last: None,
            })
            .collect();
        let payload: Vec<u8> = (0..spec.payload).map(payload_byte).collect();
        let sched = |j: u64| Duration::from_secs_f64(j as f64 / agg);
        let mut max_lag = Duration::ZERO;
        let mut late = 0u64;
        // Start a little ahead so the first deadline is not already in the past.
        let t0 = Instant::now() + Duration::from_millis(1);
        let mut j: u64 = 0;
        let mut mm = MmsgBuf::new();
        let live = &self.progress;
        while j < total && !live.stop.load(Ordering::Relaxed) {
            // A spoofed flood waits for a whole batch to be due and sleeps instead of
            // spinning: its CPU time is then its sends, which a benchmark of the path counts.
            let spoofed = spec.method == SendMethod::Spoofed;
            let batch_end = if spoofed {
                (j + RAW_BATCH as u64 - 1).min(total - 1)
            } else {
                j
            };
            let due_at = t0 + sched(batch_end);
            let now = Instant::now();
            if now < due_at {
                if spoofed {
                    std::thread::sleep(due_at - now);
                } else {
                    wait_until(due_at);
                }
                continue;
            }
            let lag = now - due_at;
            max_lag = max_lag.max(lag);
            if lag > Duration::from_millis(1) {
                late += 1;
            }
            match &self.wire {
                Wire::Sockets(socks) => {
                    let flow = (j % n as u64) as usize;
                    let f = &mut flows[flow];
                    match socks[flow].send(&payload) {
                        Ok(_) => {
                            live.sent.fetch_add(1, Ordering::Relaxed);
                            f.sent += 1;
                            f.first.get_or_insert(now);
                            f.last = Some(now);
                        }
                        Err(_) => f.failed += 1,
                    }
                    j += 1;
                }
                Wire::Raw {
                    socks,
                    packets,
                    dst,
                } => {
                    // A batch: the consecutive packets due by now (index < due) whose flows
                    // share one socket. `due` includes j itself, which is due (checked
                    // above) even when float rounding says otherwise.
                    let due = (((now - t0).as_secs_f64() * agg) as u64 + 1).clamp(j + 1, total);
                    let first_flow = (j % n as u64) as usize;
                    let src = spec.socket_of(first_flow);
                    let mut batch = 0;
                    mm.clear();
                    while batch < RAW_BATCH && j + (batch as u64) < due {
                        let flow = ((j + batch as u64) % n as u64) as usize;
                        if spec.socket_of(flow) != src {
                            break;
                        }
                        mm.push(&packets[flow], dst);
                        batch += 1;
                    }
                    let sent = mm.send(socks[src].as_raw_fd());
                    // sendmmsg sends a prefix; when it sent nothing, the first packet counts
                    // as failed and the schedule moves on (progress is guaranteed).
                    let (ok, failed) = match sent {
                        Ok(k) if k > 0 => (k, 0),
                        _ => (0, 1),
                    };
                    live.sent.fetch_add(ok as u64, Ordering::Relaxed);
                    for i in 0..ok + failed {
                        let flow = ((j + i as u64) % n as u64) as usize;
                        let f = &mut flows[flow];
                        if i < ok {
                            f.sent += 1;
                            f.first.get_or_insert(now);
                            f.last = Some(now);
                        } else {
                            f.failed += 1;
                        }
                    }
                    j += (ok + failed) as u64;
                }
            }
        }
        let sent: u64 = flows.iter().map(|f| f.sent).sum();
        let failed: u64 = flows.iter().map(|f| f.failed).sum();
        let first = flows.iter().filter_map(|f| f.first).min();
        let last = flows.iter().filter_map(|f| f.last).max();
        let elapsed = match (first, last) {
            (Some(a), Some(b)) => b - a,
            _ => Duration::ZERO,
        };
        let achieved_pps = if elapsed.is_zero() {
            0.0
        } else {
            (sent.saturating_sub(1)) as f64 / elapsed.as_secs_f64()
        };
        Ok(SendReport {
            flows,
            sent,
            failed,
            elapsed,
            offered_pps: agg,
            achieved_pps,
            max_lag,
            late,
        })
    }

    /// Runs the schedule on a new thread.
    pub fn spawn(self) -> JoinHandle<Result<SendReport>> {
        std::thread::spawn(move || self.run())
    }
}

/// Byte `i` of every UDP payload the sender writes; the receiver checks it.
pub fn payload_byte(i: usize) -> u8 {
    i as u8
}

/// Sleeps until shortly before `t`, then spins.
fn wait_until(t: Instant) {
    const SPIN: Duration = Duration::from_micros(150);
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > SPIN + Duration::from_micros(50) {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

fn open_wire(spec: &UdpFlood) -> Result<(Wire, Vec<SocketAddr>)> {
    let mut srcs = Vec::with_capacity(spec.flows);
    match spec.method {
        SendMethod::Sockets => {
            let mut socks = Vec::with_capacity(spec.flows);
            for i in 0..spec.flows {
                let ip = spec.sources[spec.source_of(i)];
                let s = UdpSocket::bind(SocketAddr::new(ip, 0))
                    .with_context(|| format!("binding UDP socket {i} to {ip}"))?;
                s.connect(spec.dst)
                    .with_context(|| format!("connecting UDP socket to {}", spec.dst))?;
                srcs.push(s.local_addr()?);
                socks.push(s);
            }
            Ok((Wire::Sockets(socks), srcs))
        }
        SendMethod::Raw => {
            ensure!(
                spec.base_port as usize + spec.flows <= 65536,
                "base_port {} + {} flows exceeds the port space",
                spec.base_port,
                spec.flows
            );
            let mut socks = Vec::new();
            for &ip in &spec.sources {
                ensure!(
                    ip.is_ipv4() == spec.dst.is_ipv4(),
                    "source {ip} and destination {} differ in family",
                    spec.dst
                );
                socks.push(raw_udp_socket(ip)?);
            }
            let mut packets = Vec::with_capacity(spec.flows);
            for i in 0..spec.flows {
                let ip = spec.sources[spec.source_of(i)];
                let src = SocketAddr::new(ip, spec.base_port + i as u16);
                packets.push(udp_datagram(src, spec.dst, spec.payload));
                srcs.push(src);
            }
            let dst = SockAddr::from(SocketAddr::new(spec.dst.ip(), 0));
            Ok((
                Wire::Raw {
                    socks,
                    packets,
                    dst,
                },
                srcs,
            ))
        }
        SendMethod::Spoofed => {
            let IpAddr::V4(dst_ip) = spec.dst.ip() else {
                bail!("spoofed sources are IPv4 only, not {}", spec.dst);
            };
            let per_source = spec.flows.div_ceil(spec.sources.len());
            ensure!(
                spec.base_port as usize + per_source <= 65536,
                "base_port {} + {per_source} flows per source exceeds the port space",
                spec.base_port
            );
            let mut packets = Vec::with_capacity(spec.flows);
            for i in 0..spec.flows {
                let s = spec.source_of(i);
                let IpAddr::V4(ip) = spec.sources[s] else {
                    bail!("spoofed sources are IPv4 only, not {}", spec.sources[s]);
                };
                let port = spec.base_port + (i - spec.first_flow_of(s)) as u16;
                let src = SocketAddr::new(ip.into(), port);
                packets.push(ipv4_packet(
                    ip,
                    dst_ip,
                    &udp_datagram(src, spec.dst, spec.payload),
                ));
                srcs.push(src);
            }
            let dst = SockAddr::from(SocketAddr::new(spec.dst.ip(), 0));
            Ok((
                Wire::Raw {
                    socks: vec![header_included_socket()?],
                    packets,
                    dst,
                },
                srcs,
            ))
        }
    }
}

/// A raw IPv4 socket whose packets carry their own IP header (`IPPROTO_RAW` implies
/// `IP_HDRINCL`): any source address, local or not.
fn header_included_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(SOCK_RAW, IPPROTO_RAW)");
    }
    // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An IPv4 header (no options, TTL 64, protocol UDP) in front of `udp`. The kernel fills in
/// the header checksum and, as the ID is 0, the ID (raw(7), `IP_HDRINCL`).
fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> Vec<u8> {
    const IHL_BYTES: usize = 20;
    const TTL: u8 = 64;
    let len = IHL_BYTES + udp.len();
    let mut p = vec![0u8; len];
    p[0] = 0x45; // version 4, 5 words of header
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = TTL;
    p[9] = libc::IPPROTO_UDP as u8;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[IHL_BYTES..].copy_from_slice(udp);
    p
}

/// A raw IPPROTO_UDP socket bound to `ip`: the kernel writes the IP header, we write UDP.
fn raw_udp_socket(ip: IpAddr) -> Result<OwnedFd> {
    let family = if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_UDP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(SOCK_RAW, IPPROTO_UDP)");
    }
    // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if ip.is_ipv6() {
        // The IPv6 UDP checksum is mandatory; let the kernel fill it (offset 6 in the header).
        setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, 6)
            .context("IPV6_CHECKSUM")?;
    }
    let sa = SockAddr::from(SocketAddr::new(ip, 0));
    // SAFETY: sa holds a valid sockaddr of the stated length.
    if unsafe { libc::bind(fd.as_raw_fd(), sa.as_ptr(), sa.len) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding raw socket to {ip}"));
    }
    Ok(fd)
}

/// UDP header + payload for a raw socket. IPv4 gets its checksum here (an IPv4 raw socket
/// has no option for it); IPv6 leaves it 0 for the kernel (`IPV6_CHECKSUM`).
fn udp_datagram(src: SocketAddr, dst: SocketAddr, payload: usize) -> Vec<u8> {
    let len = 8 + payload;
    let mut p = vec![0u8; len];
    p[0..2].copy_from_slice(&src.port().to_be_bytes());
    p[2..4].copy_from_slice(&dst.port().to_be_bytes());
    p[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    for (i, b) in p[8..].iter_mut().enumerate() {
        *b = payload_byte(i);
    }
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) {
        let mut sum: u32 = 0;
        let mut add = |bytes: &[u8]| {
            for c in bytes.chunks(2) {
                let w = if c.len() == 2 {
                    u16::from_be_bytes([c[0], c[1]])
                } else {
                    u16::from_be_bytes([c[0], 0])
                };
                sum += w as u32;
            }
        };
        add(&s.octets());
        add(&d.octets());
        add(&[0, libc::IPPROTO_UDP as u8]);
        add(&(len as u16).to_be_bytes());
        add(&p);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let mut c = !(sum as u16);
        if c == 0 {
            // 0 means "no checksum" in UDP over IPv4.
            c = 0xffff;
        }
        p[6..8].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// Scratch space for one `sendmmsg`.
struct MmsgBuf {
    iov: Vec<libc::iovec>,
    hdr: Vec<libc::mmsghdr>,
}

impl MmsgBuf {
    fn new() -> MmsgBuf {
        MmsgBuf {
            iov: Vec::with_capacity(RAW_BATCH),
            hdr: Vec::with_capacity(RAW_BATCH),
        }
    }

    fn clear(&mut self) {
        self.iov.clear();
        self.hdr.clear();
    }

    fn push(&mut self, pkt: &[u8], dst: &SockAddr) {
        self.iov.push(libc::iovec {
            iov_base: pkt.as_ptr() as *mut libc::c_void,
            iov_len: pkt.len(),
        });
        // SAFETY: all-zero is a valid mmsghdr; pointers are filled in `send`.
        let mut h: libc::mmsghdr = unsafe { zeroed() };
        h.msg_hdr.msg_name = dst.as_ptr() as *mut libc::c_void;
        h.msg_hdr.msg_namelen = dst.len;
        h.msg_hdr.msg_iovlen = 1;
        self.hdr.push(h);
    }

    /// Sends the batch; Ok(number sent).
    fn send(&mut self, fd: RawFd) -> std::io::Result<usize> {
        // iov does not move between push and here (capacity reserved), but set the
        // pointers now so they are right whatever happened to the vector.
        for (h, iov) in self.hdr.iter_mut().zip(self.iov.iter_mut()) {
            h.msg_hdr.msg_iov = iov;
        }
        // SAFETY: hdr holds `len` initialised mmsghdrs whose pointers (name, iov, packet
        // bytes) are alive for the duration of the call.
        let rc = unsafe { libc::sendmmsg(fd, self.hdr.as_mut_ptr(), self.hdr.len() as _, 0) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }
}
