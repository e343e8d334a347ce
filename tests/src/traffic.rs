//! Traffic tools: a paced UDP sender, a counting UDP receiver that proves it lost nothing
//! itself, a TCP transfer that checks every byte, and short request/response TCP exchanges.

pub mod exchange;
mod recv;
mod send;
mod sys;
mod tcp;

pub use recv::{RCVBUF_BYTES, RECV_DRAIN_DEADLINE, RECV_QUIET, RecvReport, UdpReceiver};
pub use send::{
    FlowSent, RAW_BATCH, SendMethod, SendProgress, SendReport, UdpFlood, UdpSender, payload_byte,
};
pub use sys::{raise_nofile, socket_drops};
pub use tcp::{TcpTransfer, pattern_byte, tcp_transfer};
