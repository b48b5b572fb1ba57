//! Probe registries with kprobe and uprobe semantics, generic over the
//! architecture backend and the text memory they patch.

pub mod arch;
pub mod error;
pub mod text;

pub use error::ProbeError;
