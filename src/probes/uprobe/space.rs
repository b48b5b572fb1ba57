//! Address spaces, files and mappings: what a uprobe is keyed by and where
//! it is installed.
//!
//! A uprobe names code by file, not by address: [`FileId`] (device and inode)
//! plus a byte offset in the file. An [`AddressSpace`] maps files at virtual
//! addresses through [`FileMapping`]s; the same offset has a different address
//! in every space that maps the file, and none in a space that maps other
//! parts of it. More: [`crate::docs::algorithms::uprobes`].

use core::ops::Range;

use crate::probes::text::TextMemory;
use crate::probes::xol::XolAllocator;

/// A file, as the kernel names it: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub inode: u64,
}

/// Where a uprobe sits: a file and a byte offset in it. The uprobe tree's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UprobeKey {
    /// The probed file.
    pub file: FileId,
    /// Byte offset of the probed instruction in the file.
    pub offset: u64,
}

/// Identity of an address space (a process's `mm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpaceId(pub u64);

/// One file mapping of an address space: `vaddr` maps the file from
/// `file_offset` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMapping {
    /// Virtual addresses covered (start inclusive, end exclusive).
    pub vaddr: Range<u64>,
    /// The mapped file.
    pub file: FileId,
    /// File offset mapped at `vaddr.start`.
    pub file_offset: u64,
}

impl FileMapping {
    /// The file offsets this mapping covers.
    pub fn file_range(&self) -> Range<u64> {
        self.file_offset..self.file_offset + (self.vaddr.end - self.vaddr.start)
    }

    /// The virtual address of `offset` in this mapping, if it maps it.
    pub fn vaddr_of(&self, offset: u64) -> Option<u64> {
        self.file_range()
            .contains(&offset)
            .then(|| self.vaddr.start + (offset - self.file_offset))
    }

    /// The file offset at `vaddr`, if this mapping covers it.
    pub fn offset_of(&self, vaddr: u64) -> Option<u64> {
        self.vaddr
            .contains(&vaddr)
            .then(|| self.file_offset + (vaddr - self.vaddr.start))
    }
}

/// An address space the uprobe registry patches: its identity, its text
/// memory (where breakpoints are written) and its XOL area (where displaced
/// instructions are stepped).
///
/// The registry learns the space's file mappings through
/// [`UprobeRegistry::on_mmap`](super::UprobeRegistry::on_mmap) and
/// [`on_munmap`](super::UprobeRegistry::on_munmap) and keeps its own
/// lock-free copy for the hit path; [`mappings`](AddressSpace::mappings)
/// is what the space reports of itself (for diagnostics and tests).
pub trait AddressSpace: Send + Sync + 'static {
    /// The text memory type.
    type Text: TextMemory;

    /// This space's identity; stable for its lifetime.
    fn id(&self) -> SpaceId;

    /// The memory breakpoints are written to.
    fn text(&self) -> &Self::Text;

    /// The space's execute-out-of-line slot allocator.
    fn xol(&self) -> &dyn XolAllocator;

    /// The space's current file mappings, as the space itself sees them.
    fn mappings(&self) -> Vec<FileMapping>;

    /// The address of the space's uretprobe trampoline: code at which a
    /// hijacked call returns and traps (an `int3` / `brk` in the space's
    /// XOL area, as the kernel places it), after which the runtime calls
    /// [`UprobeRegistry::on_return`](super::UprobeRegistry::on_return).
    /// `None` (the default): the space cannot track returns; consumers with
    /// a return handler are refused for it at registration and its calls
    /// are counted missed.
    fn return_trampoline(&self) -> Option<u64> {
        None
    }
}
