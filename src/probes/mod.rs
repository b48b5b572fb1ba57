//! Probe registries with kprobe and uprobe semantics, generic over the
//! architecture backend and the text memory they patch.

pub mod arch;
pub mod error;
#[cfg(not(loom))]
mod exit_key;
pub mod jump_sites;
pub mod kprobe;
pub mod outcome;
// Exact hit counters without a locked instruction (per-CPU slots).
pub(crate) mod percpu;
#[cfg(all(target_os = "linux", not(loom)))]
pub(crate) mod procmaps;
// The quiescence ack protocol: the live runtime's `quiesce` uses it, loom
// models it (the runtime itself is not built under loom).
pub(crate) mod quiesce_ack;
mod reentry;
#[cfg(all(target_os = "linux", target_arch = "x86_64", not(loom)))]
pub mod remote;
pub mod resolve;
#[cfg(all(target_os = "linux", not(loom)))]
pub mod runtime;
pub mod text;
pub mod uprobe;
pub mod xol;

pub use error::ProbeError;
