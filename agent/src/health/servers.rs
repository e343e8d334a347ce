//! Real servers on 127.0.0.1 for the health-check tests.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What a server saw: one entry per accepted connection or request.
#[derive(Debug, Default)]
pub struct Seen {
    pub times: Vec<Instant>,
    pub hosts: Vec<String>,
}

type Shared = Arc<Mutex<Seen>>;

/// A listener that accepts and drops (or, `silent`, accepts and holds without a word).
pub struct TcpServer {
    pub addr: SocketAddr,
    pub seen: Shared,
    silent: bool,
    task: Option<JoinHandle<()>>,
}

impl TcpServer {
    pub async fn start(silent: bool) -> TcpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut s = TcpServer {
            addr,
            seen: Shared::default(),
            silent,
            task: None,
        };
        s.serve(listener);
        s
    }

    fn serve(&mut self, listener: TcpListener) {
        let seen = self.seen.clone();
        let silent = self.silent;
        self.task = Some(tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                // Errors (a probe reset before accept) are the probe's business, not ours.
                if let Ok((conn, _)) = listener.accept().await {
                    seen.lock().unwrap().times.push(Instant::now());
                    if silent {
                        held.push(conn);
                    }
                }
            }
        }));
    }

    /// Closes the listener: connects are refused from now on.
    pub fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens on the same port again (the abort above may take a moment to close it).
    pub async fn restore(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => return self.serve(listener),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        }
    }

    pub fn accepted(&self) -> usize {
        self.seen.lock().unwrap().times.len()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A hyper HTTP/1 server answering the scripted statuses in order, then `then` for ever.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub seen: Shared,
    task: JoinHandle<()>,
}

impl HttpServer {
    pub async fn start(script: &[u16], then: u16) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Shared::default();
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen2.clone();
                let script = script.clone();
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let mut s = seen.lock().unwrap();
                    s.times.push(Instant::now());
                    let host = req.headers().get(hyper::header::HOST);
                    s.hosts.push(
                        host.map(|h| h.to_str().unwrap().to_owned())
                            .unwrap_or_default(),
                    );
                    let status = script.lock().unwrap().pop_front().unwrap_or(then);
                    let response = Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from_static(b"ok\n")))
                        .unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), service)
                        .await;
                });
            }
        });
        HttpServer { addr, seen, task }
    }

    pub fn requests(&self) -> Vec<Instant> {
        self.seen.lock().unwrap().times.clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port nothing listens on: bound, then closed when the listener drops here.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}
