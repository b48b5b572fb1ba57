//! Probe registries with kprobe and uprobe semantics, generic over the
//! architecture backend and the text memory they patch.

pub mod arch;
pub mod error;
#[cfg(not(loom))]
mod exit_key;
pub mod kprobe;
pub mod outcome;
/// The live runtime's quiescence ack protocol alone (`runtime` is not built
/// under loom), for its loom model.
#[cfg(loom)]
#[doc(hidden)]
#[path = "runtime/quiesce/ack.rs"]
pub mod quiesce_ack;
mod reentry;
pub mod resolve;
#[cfg(all(target_os = "linux", not(loom)))]
pub mod runtime;
pub mod text;
pub mod uprobe;
pub mod xol;

pub use error::ProbeError;
