//! One probe attempt: a TCP connect, or an HTTP GET through hyper's client, on a socket we
//! open ourselves so that the datapath can recognise it (SO_MARK).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, HeaderValue, USER_AGENT};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};

use super::HealthError;
use crate::config::{CheckType, HealthCheck, StatusRange};

/// Settings of the probe sockets, the same for every backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeOptions {
    /// SO_MARK on every probe socket, so the datapath can let probes through an open breaker
    /// (or the backend could never prove it recovered). `None`: no mark. Needs CAP_NET_ADMIN.
    pub mark: Option<u32>,
}

/// Why a probe attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProbeFailure {
    #[error("connection refused")]
    Refused,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection reset")]
    Reset,
    #[error("host or network unreachable")]
    Unreachable,
    #[error("status {0}")]
    Status(u16),
    /// The peer spoke something hyper could not read as HTTP/1, or closed early.
    #[error("http: {0}")]
    Http(String),
    /// Any other socket error (including a failed SO_MARK).
    #[error("socket: {0}")]
    Io(String),
}

impl ProbeFailure {
    /// A bounded label for metrics (the status code itself is not one: it would be unbounded).
    pub fn label(&self) -> &'static str {
        match self {
            ProbeFailure::Refused => "refused",
            ProbeFailure::Timeout(_) => "timeout",
            ProbeFailure::Reset => "reset",
            ProbeFailure::Unreachable => "unreachable",
            ProbeFailure::Status(_) => "status",
            ProbeFailure::Http(_) => "http",
            ProbeFailure::Io(_) => "io",
        }
    }

    fn from_io(e: &io::Error) -> ProbeFailure {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ProbeFailure::Refused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => ProbeFailure::Reset,
            K::HostUnreachable | K::NetworkUnreachable => ProbeFailure::Unreachable,
            K::TimedOut => ProbeFailure::Timeout(Duration::ZERO),
            _ => ProbeFailure::Io(e.to_string()),
        }
    }

    /// hyper wraps socket errors; a reset is a reset whether hyper or the kernel saw it.
    fn from_hyper(e: &hyper::Error) -> ProbeFailure {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<io::Error>() {
                return ProbeFailure::from_io(io);
            }
            source = s.source();
        }
        ProbeFailure::Http(e.to_string())
    }
}

/// Opens a TCP connection from a socket carrying `options`: the hook every probe goes
/// through. Linger 0 closes probe connections with a RST (as HAProxy's checks do): thousands
/// of backends probed every second would otherwise fill the agent's host with TIME_WAIT.
pub async fn connect(addr: SocketAddr, options: &ProbeOptions) -> io::Result<TcpStream> {
    open(addr, options, true).await
}

/// [`connect`], with TCP_NODELAY only when data follows (`nodelay`): a TCP probe sends
/// nothing. Non-blocking from `socket()` on: thousands of probes a second, each syscall
/// counts.
async fn open(addr: SocketAddr, options: &ProbeOptions, nodelay: bool) -> io::Result<TcpStream> {
    let socket = probe_socket(addr, options)?;
    if nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    TcpSocket::from_std_stream(socket.into())
        .connect(addr)
        .await
}

/// A non-blocking TCP socket with the probe's mark and linger 0.
fn probe_socket(addr: SocketAddr, options: &ProbeOptions) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if let Some(mark) = options.mark {
        socket.set_mark(mark)?;
    }
    socket.set_linger(Some(Duration::ZERO))?;
    Ok(socket)
}

/// A TCP probe: a connect, closed at once.
async fn tcp_probe(addr: SocketAddr, options: &ProbeOptions) -> io::Result<()> {
    match begin_connect(addr, options)? {
        None => Ok(()),
        Some(socket) => wait_connected(socket).await,
    }
}

/// Opens a probe socket and connects it without waiting: `None` once connected, the socket
/// while the handshake goes on. To a backend on the same host or across a veth the handshake
/// (or the RST) is usually over before `connect()` returns, so the socket is asked once with
/// `poll(2)` before anything waits on it: a probe that is over then costs neither the two
/// `epoll_ctl` of a registration with the reactor nor a wake-up.
fn begin_connect(addr: SocketAddr, options: &ProbeOptions) -> io::Result<Option<Socket>> {
    let socket = probe_socket(addr, options)?;
    match socket.connect(&addr.into()) {
        Ok(()) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; timeout 0, no blocking.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    if ready == 1 {
        return connect_outcome(socket.take_error()).map(|()| None);
    }
    Ok(Some(socket))
}

/// Waits in the reactor for a connect [`begin_connect`] left in progress.
async fn wait_connected(socket: Socket) -> io::Result<()> {
    let stream = TcpStream::from_std(socket.into())?;
    stream.writable().await?;
    connect_outcome(stream.take_error())
}

/// The start of a TCP probe's single attempt, taken by the scheduler itself
/// ([`Probe::start_tcp`]): most are over at once and need no future at all.
#[derive(Debug)]
pub(crate) enum Started {
    Done(Result<(), ProbeFailure>),
    /// Connecting: finish with [`finish_connect`].
    Connecting(Socket),
}

/// Waits up to `timeout` for a connect [`Probe::start_tcp`] left in progress.
pub(crate) async fn finish_connect(socket: Socket, timeout: Duration) -> Result<(), ProbeFailure> {
    match tokio::time::timeout(timeout, wait_connected(socket)).await {
        Ok(result) => result.map_err(|e| ProbeFailure::from_io(&e)),
        Err(_) => Err(ProbeFailure::Timeout(timeout)),
    }
}

/// What `SO_ERROR` says of a connect that is over: none, connected.
fn connect_outcome(so_error: io::Result<Option<io::Error>>) -> io::Result<()> {
    match so_error {
        Ok(None) => Ok(()),
        Ok(Some(e)) | Err(e) => Err(e),
    }
}

#[derive(Debug, Clone)]
enum Kind {
    Tcp,
    Http {
        path: PathAndQuery,
        host: HeaderValue,
        expected: StatusRange,
    },
}

/// A prepared probe of one backend: everything that can be wrong with the settings is found
/// when it is built, so an attempt can only fail because of the backend.
#[derive(Debug, Clone)]
pub struct Probe {
    address: SocketAddr,
    kind: Kind,
    options: ProbeOptions,
}

impl Probe {
    pub fn new(
        check: &HealthCheck,
        address: SocketAddr,
        options: ProbeOptions,
    ) -> Result<Probe, HealthError> {
        let kind = match check.r#type {
            CheckType::Tcp => Kind::Tcp,
            CheckType::Http => {
                let path = check
                    .path
                    .parse::<PathAndQuery>()
                    .ok()
                    .filter(|p| p.as_str().starts_with('/'))
                    .ok_or_else(|| HealthError::InvalidPath(check.path.clone()))?;
                // SocketAddr's Display is the Host form: `10.0.1.11:8080`, `[::1]:8080`.
                let host = if check.host.is_empty() {
                    address.to_string()
                } else {
                    check.host.clone()
                };
                let host = HeaderValue::from_str(&host)
                    .map_err(|_| HealthError::InvalidHost(host.clone()))?;
                Kind::Http {
                    path,
                    host,
                    expected: check.expected_status,
                }
            }
        };
        Ok(Probe {
            address,
            kind,
            options,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// For a TCP probe, the start of one attempt without the reactor (see
    /// [`begin_connect`]); `None` for an HTTP probe.
    pub(crate) fn start_tcp(&self) -> Option<Started> {
        if !matches!(self.kind, Kind::Tcp) {
            return None;
        }
        Some(match begin_connect(self.address, &self.options) {
            Ok(None) => Started::Done(Ok(())),
            Ok(Some(socket)) => Started::Connecting(socket),
            Err(e) => Started::Done(Err(ProbeFailure::from_io(&e))),
        })
    }

    /// One attempt, bounded by `timeout` from connect to status line.
    pub async fn attempt(&self, timeout: Duration) -> Result<(), ProbeFailure> {
        match tokio::time::timeout(timeout, self.attempt_unbounded()).await {
            Ok(result) => result,
            Err(_) => Err(ProbeFailure::Timeout(timeout)),
        }
    }

    async fn attempt_unbounded(&self) -> Result<(), ProbeFailure> {
        let Kind::Http {
            path,
            host,
            expected,
        } = &self.kind
        else {
            return tcp_probe(self.address, &self.options)
                .await
                .map_err(|e| ProbeFailure::from_io(&e));
        };
        let stream = open(self.address, &self.options, true)
            .await
            .map_err(|e| ProbeFailure::from_io(&e))?;
        let status = http_get(stream, path, host).await?;
        if expected.contains(status) {
            Ok(())
        } else {
            Err(ProbeFailure::Status(status))
        }
    }
}

/// GET `path` on a fresh connection; the status code is all a probe needs, the body is left
/// unread and the connection closed.
async fn http_get(
    stream: TcpStream,
    path: &PathAndQuery,
    host: &HeaderValue,
) -> Result<u16, ProbeFailure> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProbeFailure::from_hyper(&e))?;
    let request = Request::get(Uri::from(path.clone()))
        .header(HOST, host.clone())
        .header(USER_AGENT, "agent-health-check")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeFailure::Http(e.to_string()))?;
    let mut conn = std::pin::pin!(conn);
    let mut response = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        biased;
        response = &mut response => response,
        // With `Connection: close` the connection ends right after handing over the
        // response, possibly in the same poll: the response is then waiting for us (or an
        // error saying there is none).
        closed = &mut conn => match closed {
            Ok(()) => response.await,
            Err(e) => Err(e),
        },
    };
    response
        .map(|r| r.status().as_u16())
        .map_err(|e| ProbeFailure::from_hyper(&e))
}
