//! The shop's backends: one TCP server per backend address in the server namespace, each on a
//! thread of its own. Every connection gets one HTTP-ish answer naming the backend that served
//! it, then the server closes: the clients, which only ever see the VIP, count who served them.
//! A backend can die (its listener closed: connects to it are refused) and be restarted.

use std::{
    io::{self, Write as _},
    net::{SocketAddrV4, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::demo::{
    netns::Netns,
    traffic::{TrafficError, socket_error},
};

/// How often an idle accept loop looks again (and at its stop flag).
const ACCEPT_POLL: Duration = Duration::from_millis(1);
/// A client that does not take a few bytes within this is given up on.
const WRITE_TIMEOUT: Duration = Duration::from_millis(200);
/// The header that names the backend in every answer.
pub const SERVED_BY: &str = "X-Served-By: ";

/// The answer of backend `name`.
pub fn answer(name: &str) -> String {
    format!("HTTP/1.0 200 OK\r\n{SERVED_BY}{name}\r\nContent-Length: 0\r\n\r\n")
}

/// The backend named in an answer, if any.
pub fn served_by(answer: &str) -> Option<&str> {
    answer
        .lines()
        .find_map(|line| line.strip_prefix(SERVED_BY))
        .map(str::trim)
}

/// A running server: its thread and the flag that stops it.
struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(), TrafficError>>,
}

pub struct Server {
    pub name: String,
    pub addr: SocketAddrV4,
    running: Option<Running>,
}

impl Server {
    /// Binds `addr` inside `server` and serves as `name` until killed or dropped.
    pub fn start(server: &Netns, name: String, addr: SocketAddrV4) -> Result<Self, TrafficError> {
        let mut this = Self {
            name,
            addr,
            running: None,
        };
        this.restart(server)?;
        Ok(this)
    }

    /// Binds and serves again (std sets `SO_REUSEADDR`: the closed connections of the last run
    /// do not hold the port).
    pub fn restart(&mut self, server: &Netns) -> Result<(), TrafficError> {
        let addr = self.addr;
        let listener = server
            .run(|| TcpListener::bind(addr))?
            .map_err(socket_error("bind", addr))?;
        listener
            .set_nonblocking(true)
            .map_err(socket_error("configure", addr))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let answer = answer(&self.name);
        let thread = thread::spawn(move || serve(&listener, answer.as_bytes(), &flag));
        self.running = Some(Running { stop, thread });
        Ok(())
    }

    /// The backend dies: its thread stops and its listener is closed, so the kernel refuses
    /// every new connection to it (a RST: `connect()` fails with ECONNREFUSED).
    pub fn kill(&mut self) -> Result<(), TrafficError> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        running.stop.store(true, Ordering::Relaxed);
        running.thread.join().map_err(|_| TrafficError::Panicked)?
    }

    /// Fails when the server's thread ended by itself (an accept error), with its error.
    pub fn check(&mut self) -> Result<(), TrafficError> {
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.thread.is_finished())
        {
            self.kill()?;
            return Err(TrafficError::Socket {
                action: "serve on",
                addr: self.addr.to_string(),
                source: io::Error::other("the server stopped"),
            });
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Answers every connection with `answer` and closes it, until `stop`.
fn serve(listener: &TcpListener, answer: &[u8], stop: &AtomicBool) -> Result<(), TrafficError> {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut connection, _)) => {
                // A client gone already is its failure, not the server's: it counts it.
                let _ = connection.set_write_timeout(Some(WRITE_TIMEOUT));
                let _ = connection.write_all(answer);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_names_its_backend() {
        assert_eq!(served_by(&answer("web-3")), Some("web-3"));
        assert_eq!(served_by("HTTP/1.0 200 OK\r\n\r\n"), None);
    }
}
