//! UDP load across the sandbox: a paced sender on a thread inside the client namespace, a
//! counting receiver on a thread inside the server namespace (std sockets, no tools).

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    ops::ControlFlow,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, ScopedJoinHandle},
    time::{Duration, Instant},
};

use super::netns::{Netns, NetnsError};
use crate::sys;

/// 64 bytes of payload: a small packet, as in a packet-rate flood.
const PAYLOAD: &[u8] = &[0x61; 64];
const RECV_TIMEOUT: Duration = Duration::from_millis(100);
const SENDER_TICK: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{action} {addr}: {source}")]
    Socket {
        action: &'static str,
        addr: String,
        source: io::Error,
    },
    #[error("a traffic thread panicked")]
    Panicked,
    #[error("interrupted")]
    Interrupted,
}

/// One flow (one 5-tuple): every packet shares the source port, so a per-flow limit applies.
pub struct Flow {
    pub from: Ipv4Addr,
    pub to: SocketAddrV4,
    pub pps: u64,
}

/// Packets in one second of the run.
pub struct Second {
    pub index: u64,
    pub offered: u64,
    pub received: u64,
}

#[derive(Default)]
pub struct Totals {
    pub seconds: u64,
    pub sent: u64,
    pub received: u64,
}

/// Sends `flow` for `seconds`, calling `each_second` once a second; it may stop the run early.
pub fn run(
    client: &Netns,
    server: &Netns,
    flow: &Flow,
    seconds: u64,
    mut each_second: impl FnMut(&Second) -> ControlFlow<()>,
) -> Result<Totals, TrafficError> {
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    thread::scope(|scope| {
        // Whatever happens below, the threads must end or the scope never returns.
        let _stop = StopOnDrop(&stop);
        let (bound_tx, bound_rx) = mpsc::channel();
        let receiver = scope.spawn(|| receive(server, flow.to, &stop, &received, bound_tx));
        if bound_rx.recv().is_err() {
            // The receiver ended before binding: its result says why.
            return join(receiver).and(Err(TrafficError::Panicked));
        }
        let sender = scope.spawn(|| send(client, flow, &stop, &sent));

        let start = Instant::now();
        let mut totals = Totals::default();
        for index in 1..=seconds {
            let due = start + Duration::from_secs(index);
            while let Some(left) = due.checked_duration_since(Instant::now()) {
                if sys::interrupted() {
                    return Err(TrafficError::Interrupted);
                }
                if sender.is_finished() || receiver.is_finished() {
                    break;
                }
                thread::sleep(left.min(RECV_TIMEOUT));
            }
            if sender.is_finished() || receiver.is_finished() {
                break; // failed; the joins below report why
            }
            let (now_sent, now_received) = (
                sent.load(Ordering::Relaxed),
                received.load(Ordering::Relaxed),
            );
            let second = Second {
                index,
                offered: now_sent - totals.sent,
                received: now_received - totals.received,
            };
            totals = Totals {
                seconds: index,
                sent: now_sent,
                received: now_received,
            };
            if each_second(&second).is_break() {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        join(sender)?;
        join(receiver)?;
        Ok(totals)
    })
}

/// Sets the flag when dropped: threads watching it end whatever way their scope is left.
pub(super) struct StopOnDrop<'a>(pub(super) &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub(super) fn join(
    handle: ScopedJoinHandle<'_, Result<(), TrafficError>>,
) -> Result<(), TrafficError> {
    handle.join().map_err(|_| TrafficError::Panicked)?
}

pub(super) fn socket_error(
    action: &'static str,
    addr: impl ToString,
) -> impl FnOnce(io::Error) -> TrafficError {
    let addr = addr.to_string();
    move |source| TrafficError::Socket {
        action,
        addr,
        source,
    }
}

fn receive(
    server: &Netns,
    addr: SocketAddrV4,
    stop: &AtomicBool,
    received: &AtomicU64,
    bound: mpsc::Sender<()>,
) -> Result<(), TrafficError> {
    server.enter_this_thread()?;
    let socket = UdpSocket::bind(addr).map_err(socket_error("bind", addr))?;
    socket
        .set_read_timeout(Some(RECV_TIMEOUT))
        .map_err(socket_error("configure", addr))?;
    let _ = bound.send(());
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok(_) => {
                received.fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(socket_error("receive on", addr)(e)),
        }
    }
    Ok(())
}

fn send(
    client: &Netns,
    flow: &Flow,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<(), TrafficError> {
    client.enter_this_thread()?;
    let from = SocketAddrV4::new(flow.from, 0);
    let socket = UdpSocket::bind(from).map_err(socket_error("bind", from))?;
    // After a stall, catch up at most 10 ms of traffic rather than sending a burst.
    let max_backlog = (flow.pps / 100).max(1);
    let start = Instant::now();
    let mut scheduled: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = u64::try_from(start.elapsed().as_nanos() * u128::from(flow.pps) / 1_000_000_000)
            .unwrap_or(u64::MAX);
        scheduled = scheduled.max(due.saturating_sub(max_backlog));
        while scheduled < due {
            match socket.send_to(PAYLOAD, flow.to) {
                Ok(_) => {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                // A full queue: this packet is lost, as on a real sender.
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOBUFS)
                        || e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(socket_error("send to", flow.to)(e)),
            }
            scheduled += 1;
        }
        thread::sleep(SENDER_TICK);
    }
    Ok(())
}
