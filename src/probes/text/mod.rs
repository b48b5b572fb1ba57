//! Text memory: where probe breakpoints and XOL slots are read and written.
//!
//! # Checked writes
//!
//! A probe never writes code blindly. [`TextMemory::write`] takes the bytes
//! the caller expects to replace along with the new ones; if the text holds
//! anything else (another tool's breakpoint, a concurrent patch, a stale
//! view) the write is refused with
//! [`ProbeError::AlreadyPatched`]
//! and nothing is written. Any failure leaves the text exactly as before.
//!
//! # Instruction caches
//!
//! On architectures whose instruction cache is not coherent with data writes
//! (arm64), new code is visible to execution only after
//! [`TextMemory::sync_icache`]. On x86_64 the hardware keeps them coherent
//! and the default no-op is correct; an implementation for live code still
//! serializes other threads as its patch protocol requires.
//!
//! # Implementations
//!
//! [`Image`] is an in-memory image (a base address and a byte buffer) used to
//! prove registries without touching real code. Live text memories (the
//! current process: `probes::runtime::InProcess`; another process, later)
//! live with the runtime that traps on them, above this layer.

mod image;
pub(crate) mod patch_window;

pub use image::Image;

use crate::probes::ProbeError;

/// Readable, patchable code memory.
///
/// Methods take `&self`: a text memory is shared by every registry and
/// address space that patches it; implementations serialize writes inside.
pub trait TextMemory: Send + Sync {
    /// Reads `buf.len()` bytes at `addr`.
    ///
    /// # Errors
    /// [`ProbeError::TextAccess`] if the range is not readable.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError>;

    /// Replaces `expected_old` by `new` at `addr`, atomically with respect to
    /// other writes through this text memory: the current bytes are compared
    /// with `expected_old` first.
    ///
    /// # Errors
    /// - [`ProbeError::AlreadyPatched`] (with the bytes found) if the text
    ///   does not hold `expected_old`;
    /// - [`ProbeError::PatchLengthMismatch`] if the slices differ in length;
    /// - [`ProbeError::TextAccess`] if the range is not writable.
    ///
    /// On every error the text is exactly as before.
    fn write(&self, addr: u64, expected_old: &[u8], new: &[u8]) -> Result<(), ProbeError>;

    /// Makes `len` bytes written at `addr` visible to instruction fetch.
    /// The default is a no-op, correct where instruction caches are coherent
    /// (x86_64) and for memories that are never executed ([`Image`]).
    ///
    /// # Errors
    /// [`ProbeError::TextAccess`] if the maintenance operation fails.
    fn sync_icache(&self, addr: u64, len: usize) -> Result<(), ProbeError> {
        let _ = (addr, len);
        Ok(())
    }
}
