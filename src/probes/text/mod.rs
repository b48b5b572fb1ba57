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
//! # Text that goes away
//!
//! Code can be unmapped while probes are armed in it (`dlclose`, `munmap`)
//! and something else, or the same file again, mapped at the same address.
//! A [`TextIdentity`] names what is mapped at an address (the file and where
//! it is mapped); a registry records it when it prepares a site and writes
//! the site's text only through [`TextMemory::write_in`], which refuses
//! ([`ProbeError::TextGone`]) when the text at the address is no longer that
//! identity. See the kprobe registry's "Text that goes away" for how sites
//! are retired.
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

/// What is mapped at an address, as far as a text memory can tell: the
/// file (device and inode; zero for anonymous memory) and its *bias*, the
/// address minus the file offset, which is the same for every address of
/// one mapping of the file (and stays the same when the kernel splits or
/// merges the mapping). Equal identities at an address mean the same byte of
/// the same file is mapped there.
///
/// It cannot tell a file unmapped and mapped again at the same bias (the
/// same library `dlopen`ed again at the same address) from one that stayed,
/// nor two anonymous mappings at the same address: a registry tells those
/// apart by its breakpoint (the new mapping does not have it; see the
/// kprobe registry's "Text that goes away").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TextIdentity {
    /// The file's device number (0: anonymous memory, or a text memory that
    /// is never remapped, like [`Image`]).
    pub device: u64,
    /// The file's inode number (0 as above).
    pub inode: u64,
    /// Address minus file offset of the mapping.
    pub bias: u64,
}

/// One write of a [`TextMemory::write_many`] batch: `old` replaced by
/// `new` at `addr` (as [`TextMemory::write`]'s arguments).
#[derive(Clone, Copy, Debug)]
pub struct TextWrite<'a> {
    /// Where.
    pub addr: u64,
    /// The bytes expected there.
    pub old: &'a [u8],
    /// The bytes written over them.
    pub new: &'a [u8],
}

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

    /// Reads each `(addr, buf)` as [`read`](Self::read) does; one result
    /// each, in order. An implementation reading live memory makes it
    /// cheaper than one `read` each (the live one: a few vectored system
    /// calls); the default calls `read` for each.
    ///
    /// # Errors
    /// Per read, as `read`.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), ProbeError>> {
        reads
            .iter_mut()
            .map(|(addr, buf)| self.read(*addr, buf))
            .collect()
    }

    /// Who else holds a breakpoint at `addr`, if this memory knows (another
    /// probe registry writing the same text): registries report
    /// [`ProbeError::HeldBy`] with it instead of a bare
    /// [`ProbeError::AlreadyPatched`]. The default knows nobody.
    fn holder_at(&self, addr: u64) -> Option<String> {
        let _ = addr;
        None
    }

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

    /// What is mapped at `addr`; `None` when nothing is.
    ///
    /// The default suits a text memory that is never remapped: the default
    /// identity wherever a byte can be read, `None` where it cannot.
    ///
    /// # Errors
    /// [`ProbeError::TextAccess`] if the memory map cannot be read (never
    /// for an address that is merely unmapped).
    fn identity(&self, addr: u64) -> Result<Option<TextIdentity>, ProbeError> {
        match self.read(addr, &mut [0u8]) {
            Ok(()) => Ok(Some(TextIdentity::default())),
            Err(ProbeError::TextAccess {
                failure: crate::probes::error::TextFailure::OutOfRange,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`write`](Self::write), if the text at `addr` is still `identity`
    /// (checked together with the old bytes, under the same serialization as
    /// the write where the implementation can).
    ///
    /// # Errors
    /// [`ProbeError::TextGone`] if nothing, or another identity, is mapped
    /// at `addr` (checked before the bytes); otherwise as `write`. On every
    /// error the text is exactly as before.
    fn write_in(
        &self,
        identity: &TextIdentity,
        addr: u64,
        expected_old: &[u8],
        new: &[u8],
    ) -> Result<(), ProbeError> {
        match self.identity(addr)? {
            Some(id) if id == *identity => self.write(addr, expected_old, new),
            _ => Err(ProbeError::TextGone { addr }),
        }
    }

    /// [`write`](Self::write), returning the identity of the text written
    /// (found under the same serialization as the write where the
    /// implementation can: a registry records it for the site it arms).
    ///
    /// # Errors
    /// [`ProbeError::TextGone`] if nothing is mapped at `addr`; otherwise
    /// as `write`. On every error the text is exactly as before.
    fn write_identified(
        &self,
        addr: u64,
        expected_old: &[u8],
        new: &[u8],
    ) -> Result<TextIdentity, ProbeError> {
        let id = self.identity(addr)?.ok_or(ProbeError::TextGone { addr })?;
        self.write(addr, expected_old, new)?;
        Ok(id)
    }

    /// Does every write of `writes`, each as [`write`](Self::write) does it,
    /// and returns each one's result in the same order. Writes are done in
    /// address order; ranges should not overlap. An implementation that
    /// patches live code makes it cheaper than one `write` each (one
    /// protection change per run of pages, one core sync for the batch);
    /// the default calls `write` for each.
    ///
    /// # Errors
    /// Per write, as `write`: one failing leaves the others done, and its
    /// own range exactly as before.
    fn write_many(&self, writes: &[TextWrite<'_>]) -> Vec<Result<(), ProbeError>> {
        writes
            .iter()
            .map(|w| self.write(w.addr, w.old, w.new))
            .collect()
    }

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
