//! A minimal HTTP/1.0 GET: enough for /metrics and /health/ready, no client library needed.
//! HTTP/1.0 keeps servers from answering with chunked encoding; the connection ends the body.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("GET http://{addr}{path}: {source}")]
    Io {
        addr: SocketAddr,
        path: String,
        source: io::Error,
    },
    #[error("GET http://{addr}{path}: malformed response")]
    Malformed { addr: SocketAddr, path: String },
}

pub struct Response {
    pub status: u16,
    pub body: String,
}

pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, HttpError> {
    let io_error = |source| HttpError::Io {
        addr,
        path: path.to_owned(),
        source,
    };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io_error)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_error)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .map_err(io_error)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io_error)?;
    let raw = String::from_utf8_lossy(&raw);
    let malformed = || HttpError::Malformed {
        addr,
        path: path.to_owned(),
    };
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(malformed)?;
    // "HTTP/1.1 200 OK"
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(malformed)?;
    Ok(Response {
        status,
        body: body.to_owned(),
    })
}
