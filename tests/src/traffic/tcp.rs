//! A TCP transfer that checks every byte.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::sys::poll_readable;
use crate::netns::Netns;
use crate::timing::Scaled;

/// Byte `i` of the TCP test stream: a position-dependent pseudo-random sequence, so a lost,
/// duplicated or reordered segment shows as a mismatch at a known offset.
pub fn pattern_byte(i: u64) -> u8 {
    (splitmix64(i >> 3) >> ((i & 7) * 8)) as u8
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill_pattern(buf: &mut [u8], offset: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(offset + k as u64);
    }
}

/// Outcome of [`tcp_transfer`].
#[derive(Clone, Debug)]
pub struct TcpTransfer {
    pub sent: u64,
    pub received: u64,
    /// Offset of the first byte that differs from the pattern, if any.
    pub first_mismatch: Option<u64>,
    pub elapsed: Duration,
}

impl TcpTransfer {
    pub fn intact(&self) -> bool {
        self.received == self.sent && self.first_mismatch.is_none()
    }
}

/// Sends `bytes` of [`pattern_byte`] from `client` to a listener on `addr` in `server` and
/// checks what arrived, byte by byte. Both ends give up after `timeout` (scaled).
pub fn tcp_transfer(
    client: &Netns,
    server: &Netns,
    addr: SocketAddr,
    bytes: u64,
    timeout: Scaled,
) -> Result<TcpTransfer> {
    let limit = timeout;
    let timeout = limit.get();
    let listener = server
        .run(move || TcpListener::bind(addr))?
        .with_context(|| format!("listening on {addr} in {}", server.name()))?;
    let deadline = Instant::now() + timeout;
    let srv = std::thread::spawn(move || -> Result<(u64, Option<u64>)> {
        listener.set_nonblocking(true)?;
        let (mut conn, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ensure!(
                        Instant::now() < deadline,
                        "no TCP connection to {addr} in time"
                    );
                    poll_readable(listener.as_raw_fd(), deadline);
                }
                Err(e) => return Err(e).context("accept"),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut expect = vec![0u8; 1 << 16];
        let mut got: u64 = 0;
        let mut mismatch = None;
        loop {
            let n = conn.read(&mut buf).context("reading the TCP stream")?;
            if n == 0 {
                break;
            }
            if mismatch.is_none() {
                fill_pattern(&mut expect[..n], got);
                if let Some(k) = (0..n).find(|&k| buf[k] != expect[k]) {
                    mismatch = Some(got + k as u64);
                }
            }
            got += n as u64;
            ensure!(
                Instant::now() < deadline,
                "TCP transfer slower than {limit}"
            );
        }
        Ok((got, mismatch))
    });
    let started = Instant::now();
    let mut stream = client
        .run(move || TcpStream::connect_timeout(&addr, timeout))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(buf.len() as u64) as usize;
        fill_pattern(&mut buf[..n], off);
        stream
            .write_all(&buf[..n])
            .context("writing the TCP stream")?;
        off += n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let (received, first_mismatch) = match srv.join() {
        Ok(r) => r?,
        Err(p) => std::panic::resume_unwind(p),
    };
    Ok(TcpTransfer {
        sent: off,
        received,
        first_mismatch,
        elapsed: started.elapsed(),
    })
}
