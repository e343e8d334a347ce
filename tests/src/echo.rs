//! Many long-lived TCP connections, each echoing a small message on a fixed period, counting
//! every connection that broke and every echo that came back wrong or late: the load that
//! must not notice the agent restarting or being upgraded (issue 10).
//!
//! Each connection is a thread of its own (a few hundred threads; blocking reads with a
//! timeout are the simplest exact clock per connection). The sockets are connected inside
//! the client namespace and keep it wherever their threads run.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Stack of a connection thread: it holds a 16-byte message.
const THREAD_STACK: usize = 64 << 10;
/// Failures quoted in a report, at most (the counts are exact).
const QUOTED: usize = 10;

/// How one connection ended (or that it did not).
enum End {
    /// Stopped by [`EchoLoad::finish`], healthy.
    Stopped,
    /// Reset, closed by the peer, or a failed write: the connection is gone.
    Broken(String),
    /// An echo came back different, or not within the timeout.
    EchoError(String),
}

/// What the load saw, over all its connections.
#[derive(Debug, Default)]
pub struct EchoReport {
    pub connections: usize,
    pub broken: usize,
    pub echo_errors: usize,
    /// Echoes that came back right.
    pub echoes: u64,
    /// The slowest right echo, send to last byte back.
    pub max_latency: Duration,
    /// The first failures, in words.
    pub failures: Vec<String>,
}

/// `n` connections to one address, echoing every `every`.
pub struct EchoLoad {
    stop: Arc<AtomicBool>,
    echoes: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    max_latency_us: Arc<AtomicU64>,
    threads: Vec<JoinHandle<End>>,
}

impl EchoLoad {
    /// Connects `n` times to `dst` from `ns` (each within `connect_timeout`), then starts
    /// echoing on every connection: a 16-byte message (connection number, sequence) every
    /// `every`, whose echo must come back unchanged within `echo_timeout`. A connection stops
    /// at its first failure.
    pub fn start(
        ns: &Netns,
        dst: SocketAddr,
        n: usize,
        every: Duration,
        connect_timeout: Duration,
        echo_timeout: Duration,
    ) -> Result<EchoLoad> {
        let streams = ns.run(move || -> Result<Vec<TcpStream>> {
            (0..n)
                .map(|i| {
                    let s = TcpStream::connect_timeout(&dst, connect_timeout)
                        .with_context(|| format!("connection {i} of {n} to {dst}"))?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(echo_timeout))?;
                    s.set_write_timeout(Some(echo_timeout))?;
                    Ok(s)
                })
                .collect()
        })??;
        let mut load = EchoLoad {
            stop: Arc::new(AtomicBool::new(false)),
            echoes: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
            max_latency_us: Arc::new(AtomicU64::new(0)),
            threads: Vec::with_capacity(n),
        };
        for (i, s) in streams.into_iter().enumerate() {
            let (stop, echoes, failed, max_us) = (
                load.stop.clone(),
                load.echoes.clone(),
                load.failed.clone(),
                load.max_latency_us.clone(),
            );
            let t = std::thread::Builder::new()
                .name(format!("echo-{i}"))
                .stack_size(THREAD_STACK)
                .spawn(move || {
                    let end = echo_loop(s, i as u64, every, &stop, &echoes, &max_us);
                    if !matches!(end, End::Stopped) {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    end
                })
                .context("spawning an echo thread")?;
            load.threads.push(t);
        }
        Ok(load)
    }

    /// Right echoes so far, over all connections.
    pub fn echoes(&self) -> u64 {
        self.echoes.load(Ordering::SeqCst)
    }

    /// Connections that failed so far (broken or a wrong/late echo).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Stops every connection and reports.
    pub fn finish(mut self) -> EchoReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut r = EchoReport {
            connections: self.threads.len(),
            ..EchoReport::default()
        };
        for (i, t) in self.threads.drain(..).enumerate() {
            let end = t
                .join()
                .unwrap_or_else(|_| End::Broken("its thread panicked".into()));
            let quote = |r: &mut EchoReport, what: String| {
                if r.failures.len() < QUOTED {
                    r.failures.push(format!("connection {i}: {what}"));
                }
            };
            match end {
                End::Stopped => {}
                End::Broken(why) => {
                    r.broken += 1;
                    quote(&mut r, format!("broken: {why}"));
                }
                End::EchoError(why) => {
                    r.echo_errors += 1;
                    quote(&mut r, format!("echo error: {why}"));
                }
            }
        }
        r.echoes = self.echoes.load(Ordering::SeqCst);
        r.max_latency = Duration::from_micros(self.max_latency_us.load(Ordering::SeqCst));
        r
    }
}

impl Drop for EchoLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn echo_loop(
    mut s: TcpStream,
    conn: u64,
    every: Duration,
    stop: &AtomicBool,
    echoes: &AtomicU64,
    max_us: &AtomicU64,
) -> End {
    let mut next = Instant::now();
    for seq in 0u64.. {
        if stop.load(Ordering::SeqCst) {
            return End::Stopped;
        }
        let mut msg = [0u8; 16];
        msg[..8].copy_from_slice(&conn.to_le_bytes());
        msg[8..].copy_from_slice(&seq.to_le_bytes());
        let sent = Instant::now();
        if let Err(e) = s.write_all(&msg) {
            return End::Broken(format!("write of echo {seq}: {e}"));
        }
        let mut back = [0u8; 16];
        match s.read_exact(&mut back) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return End::EchoError(format!(
                    "echo {seq} not back within {:?}",
                    s.read_timeout().ok().flatten().unwrap_or_default()
                ));
            }
            Err(e) => return End::Broken(format!("read of echo {seq}: {e}")),
        }
        if back != msg {
            return End::EchoError(format!("echo {seq} came back as {back:02x?}"));
        }
        let took = sent.elapsed();
        echoes.fetch_add(1, Ordering::SeqCst);
        max_us.fetch_max(took.as_micros() as u64, Ordering::SeqCst);
        // A fixed period from the first send; a late echo does not shift later ones.
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    End::Stopped
}
