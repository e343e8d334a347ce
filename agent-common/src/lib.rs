//! Everything that crosses the kernel/user boundary: map names, `#[repr(C)]` map keys and
//! values (explicit padding, sizes asserted), counter slots, and the pure logic both sides
//! share (classification order, token-bucket and pacing arithmetic), unit-tested on the host.
// `no_std` for the eBPF side; the policy model (feature `policy`) is host-only and uses std.
#![cfg_attr(not(feature = "policy"), no_std)]

pub mod breaker;
pub mod classify;
pub mod degrade;
#[cfg(feature = "user")]
pub mod fdinfo;
pub mod lb;
pub mod limit;
pub mod maps;
#[cfg(feature = "policy")]
pub mod policy;
pub mod ports;
pub mod reply;
pub mod shape;
pub mod stats;
#[cfg(feature = "user")]
pub mod status;
pub mod tables;

/// Nanoseconds in a second: the clock unit of token buckets and pacing alike.
pub const NS_PER_SEC: u64 = 1_000_000_000;

pub use classify::{MatchList, MatchRule};
pub use limit::{Bucket, BucketKey, ServiceConfig};
pub use stats::Counter;

/// Implements `aya::Pod` for boundary types on the userspace side only.
macro_rules! impl_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: `#[repr(C)]`, `Copy`, every byte a named field (no implicit padding),
            // and every bit pattern valid: the requirements of `aya::Pod`.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use impl_pod;
