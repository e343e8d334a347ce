//! Logs: `tracing` for the agent; aya-log records from the datapath arrive through the `log`
//! facade, which `tracing-subscriber` (its `tracing-log` bridge) turns into tracing events.

use std::io::IsTerminal as _;

use aya_log::EbpfLogger;
use std::sync::OnceLock;
use tokio::io::unix::AsyncFd;

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _,
};

/// The filter's handle, to change the level on reload; `None` when `RUST_LOG` decides.
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the subscriber. `RUST_LOG` overrides `level` (the policy's `agent.log_level`).
pub fn init(level: &str) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let fixed = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .try_init();
    if installed.is_ok() && !fixed {
        let _ = LEVEL.set(handle);
    }
}

/// A reloaded policy's `agent.log_level`, unless `RUST_LOG` set the filter at start.
pub fn set_level(level: &str) {
    match LEVEL.get() {
        Some(handle) => {
            if let Err(e) = handle.modify(|f| *f = EnvFilter::new(level)) {
                tracing::warn!("changing the log level to {level}: {e}");
            }
        }
        None => tracing::info!("agent.log_level {level} not applied: RUST_LOG sets the filter"),
    }
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
