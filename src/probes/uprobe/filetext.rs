//! Validation from the file itself: a registration that no address space
//! maps yet is checked against the file's bytes, read by [`FileId`].
//!
//! With a [`FileText`] configured ([`with_file_text`](super::UprobeRegistry::with_file_text)),
//! a registration that finds no mapping and no known original bytes refuses
//! bad input there, with the typed errors of a mapped registration (carrying
//! file offsets as addresses), and keeps the bytes read as the uprobe's
//! original instruction. Without one, or when [`FileText::code_range`] answers
//! `None` or a read fails, the check waits for the first `on_mmap`.
//!
//! Why and how, in full: [`crate::docs::algorithms::uprobes`].

use core::ops::Range;
use std::collections::HashMap;

use super::registry::UprobeRegistry;
use super::space::{AddressSpace, FileId, UprobeKey};
use crate::probes::arch::{Arch, MAX_INSN_BYTES};
use crate::probes::error::CodeBytes;
use crate::probes::ProbeError;
use crate::rcu::Flavor;
use crate::sync::Mutex;

/// Reads a file's code by [`FileId`], for validation at registration (see
/// [`UprobeRegistry::with_file_text`](super::UprobeRegistry::with_file_text)).
///
/// A runtime implements it over the files it can open (the kernel's page
/// cache, a `pread` of the executable); [`MemFiles`] holds files in memory.
pub trait FileText: Send + Sync + 'static {
    /// The file offsets holding `file`'s code (its executable segment), or
    /// `None` if this source cannot read the file: registration then
    /// defers validation to the first mapping.
    fn code_range(&self, file: FileId) -> Option<Range<u64>>;

    /// Reads `buf.len()` bytes of `file` from `offset`, a range inside
    /// [`code_range`](FileText::code_range).
    ///
    /// # Errors
    /// Any failure to read: registration then defers validation, as for a
    /// file this source cannot read.
    fn read(&self, file: FileId, offset: u64, buf: &mut [u8]) -> Result<(), ProbeError>;
}

impl<T: FileText + ?Sized> FileText for std::sync::Arc<T> {
    fn code_range(&self, file: FileId) -> Option<Range<u64>> {
        (**self).code_range(file)
    }

    fn read(&self, file: FileId, offset: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        (**self).read(file, offset, buf)
    }
}

/// Files held in memory: each one's code and the file offset it starts at.
///
/// ```
/// use rcu_registry::probes::uprobe::{FileId, FileText, MemFiles};
///
/// let files = MemFiles::new();
/// let libc = FileId { dev: 8, inode: 42 };
/// files.insert(libc, 0x1000, vec![0x55, 0x90, 0xc3]); // push rbp; nop; ret
/// assert_eq!(files.code_range(libc), Some(0x1000..0x1003));
/// let mut b = [0; 2];
/// files.read(libc, 0x1001, &mut b).unwrap();
/// assert_eq!(b, [0x90, 0xc3]);
/// ```
#[derive(Debug, Default)]
pub struct MemFiles {
    files: Mutex<HashMap<FileId, (u64, Vec<u8>)>>,
}

impl MemFiles {
    /// No files.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `file`, whose code is `code` from file offset
    /// `start` on.
    pub fn insert(&self, file: FileId, start: u64, code: Vec<u8>) {
        self.lock().insert(file, (start, code));
    }

    /// Forgets `file` (registrations on it are then deferred).
    pub fn remove(&self, file: FileId) {
        self.lock().remove(&file);
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, HashMap<FileId, (u64, Vec<u8>)>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FileText for MemFiles {
    fn code_range(&self, file: FileId) -> Option<Range<u64>> {
        let files = self.lock();
        let (start, code) = files.get(&file)?;
        Some(*start..start + code.len() as u64)
    }

    fn read(&self, file: FileId, offset: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        let files = self.lock();
        let fault = || ProbeError::MemoryFault {
            addr: offset,
            len: buf.len(),
        };
        let (start, code) = files.get(&file).ok_or_else(fault)?;
        let from = offset.checked_sub(*start).ok_or_else(fault)? as usize;
        let bytes = code
            .get(from..from.checked_add(buf.len()).ok_or_else(fault)?)
            .ok_or_else(fault)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// Reads files' code from `code` to validate a registration that no
    /// known space maps (see the [module docs](super)): bad input is then
    /// refused at registration rather than at the first `on_mmap`. Without
    /// a source (the default), or for a file it cannot read, such
    /// registrations succeed and are validated at the first `on_mmap` that
    /// maps the offset.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use rcu_registry::probes::arch::X86_64;
    /// use rcu_registry::probes::error::Unsupported;
    /// use rcu_registry::probes::xol::{XolAllocator, XolArena};
    /// use rcu_registry::probes::text::Image;
    /// use rcu_registry::probes::uprobe::{
    ///     AddressSpace, Consumer, ConsumerAction, FileId, FileMapping, MemFiles, SpaceId,
    ///     UprobeKey, UprobeRegistry,
    /// };
    /// use rcu_registry::probes::ProbeError;
    ///
    /// struct Space(Image, XolArena);
    /// impl AddressSpace for Space {
    ///     type Text = Image;
    ///     fn id(&self) -> SpaceId { SpaceId(1) }
    ///     fn text(&self) -> &Image { &self.0 }
    ///     fn xol(&self) -> &dyn XolAllocator { &self.1 }
    ///     fn mappings(&self) -> Vec<FileMapping> { Vec::new() }
    /// }
    ///
    /// let file = FileId { dev: 8, inode: 42 };
    /// let code = vec![0x90, 0x0f, 0x05, 0xc3]; // nop; syscall; ret
    /// let files = MemFiles::new();
    /// files.insert(file, 0, code.clone());
    /// let reg: UprobeRegistry<X86_64, Space> =
    ///     UprobeRegistry::new(X86_64).with_file_text(files);
    /// let c = Consumer::new(|_, _| ConsumerAction::Continue);
    ///
    /// // Nothing maps the file, yet a `syscall` is refused now.
    /// let at = |offset| UprobeKey { file, offset };
    /// assert!(matches!(
    ///     reg.register(at(1), &c),
    ///     Err(ProbeError::UnsupportedInstruction { reason: Unsupported::SystemCall, .. })
    /// ));
    /// assert_eq!(reg.len(), 0);
    ///
    /// // A `nop` registers, and is installed when the file is mapped.
    /// reg.register(at(0), &c).unwrap();
    /// let space = Arc::new(Space(
    ///     Image::new(0x40_0000, code),
    ///     XolArena::new(0x7fff_0000_0000, 4, X86_64::XOL_SLOT_SIZE),
    /// ));
    /// let map = FileMapping { vaddr: 0x40_0000..0x40_0004, file, file_offset: 0 };
    /// assert_eq!(reg.on_mmap(&space, map), Ok(1));
    /// ```
    pub fn with_file_text(mut self, code: impl FileText) -> Self {
        self.file_text = Some(Box::new(code));
        self
    }

    /// Validates a registration at `key` from the file's code: the bytes
    /// of its instruction, `None` when there is no source or it cannot
    /// read the file (validation deferred). Changes nothing.
    #[cold]
    pub(super) fn validate_from_file(
        &self,
        key: UprobeKey,
        func_offset: Option<u64>,
    ) -> Result<Option<CodeBytes>, ProbeError> {
        let Some(src) = self.file_text.as_deref() else {
            return Ok(None);
        };
        let Some(code) = src.code_range(key.file) else {
            return Ok(None);
        };
        let outside = |offset| ProbeError::OffsetOutsideMapping {
            offset,
            start: code.start,
            end: code.end,
        };
        if !code.contains(&key.offset) {
            return Err(outside(key.offset));
        }
        let n = (code.end - key.offset)
            .min(self.arch.max_insn_len() as u64)
            .min(MAX_INSN_BYTES as u64) as usize;
        let mut insn = [0u8; MAX_INSN_BYTES];
        if src.read(key.file, key.offset, &mut insn[..n]).is_err() {
            return Ok(None);
        }
        if let Some(func) = func_offset {
            if !code.contains(&func) || func > key.offset {
                return Err(outside(func));
            }
            // From the function's start through the probed instruction.
            let mut text = vec![0u8; (key.offset - func) as usize + n];
            if src.read(key.file, func, &mut text).is_err() {
                return Ok(None);
            }
            self.arch.check_boundary(func, &text, key.offset)?;
        }
        let decoded = self.arch.analyze(key.offset, &insn[..n])?;
        Ok(Some(CodeBytes::new(&insn[..decoded.len as usize])))
    }
}
