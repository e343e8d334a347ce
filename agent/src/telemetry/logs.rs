//! Logs: `tracing` for the agent; aya-log records from the datapath arrive through the `log`
//! facade, which `tracing-subscriber` (its `tracing-log` bridge) turns into tracing events.

use std::io::IsTerminal as _;

use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tracing_subscriber::EnvFilter;

/// Installs the subscriber. `RUST_LOG` overrides `level` (the policy's `agent.log_level`).
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Forwards datapath log records until the task is dropped. The logger owns the ring buffer
/// the programs write to, so it must outlive them (TOOLCHAIN.md).
pub async fn forward_ebpf_logs(logger: EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd for its whole life and never swaps it;
    // the AsyncFd owns the logger, so the fd stays open as long as it is registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("datapath logs unavailable: {e}");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!("datapath logs stopped: {e}");
                return;
            }
        }
    }
}
