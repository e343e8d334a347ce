//! The payment backends: one TCP server per backend address in the server namespace, accepting
//! and closing at once. A completed handshake is all the act needs: it is what the agent's TCP
//! probes and the clients' connects count as success.

use std::{
    io,
    net::{SocketAddrV4, TcpListener},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use crate::demo::{
    netns::Netns,
    traffic::{TrafficError, socket_error},
};

/// How often an idle accept loop looks again (and at `stop`).
const ACCEPT_POLL: Duration = Duration::from_millis(1);

/// Binds every backend address inside `server`; the sockets stay in that namespace.
pub fn bind(server: &Netns, backends: &[SocketAddrV4]) -> Result<Vec<TcpListener>, TrafficError> {
    backends
        .iter()
        .map(|&addr| {
            let listener = server
                .run(|| TcpListener::bind(addr))?
                .map_err(socket_error("bind", addr))?;
            listener
                .set_nonblocking(true)
                .map_err(socket_error("configure", addr))?;
            Ok(listener)
        })
        .collect()
}

/// Accepts and closes connections until `stop`.
pub fn serve(listener: &TcpListener, stop: &AtomicBool) -> Result<(), TrafficError> {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((connection, _)) => drop(connection),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            // A client gone before accept: its failure, not the server's.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                let addr = listener.local_addr().map_or("?".into(), |a| a.to_string());
                return Err(socket_error("accept on", addr)(e));
            }
        }
    }
    Ok(())
}
