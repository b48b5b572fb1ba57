//! The code of files on disk, for validating a uprobe registered before
//! its file is mapped.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use object::{Object, ObjectSegment, SegmentFlags};

use crate::probes::uprobe::{FileId, FileText, MemFiles};
use crate::probes::ProbeError;

/// Code read from files on disk: each file's executable segment, read once
/// when a registration first names the file, kept in a [`MemFiles`] (the
/// registry's [`FileText`]). A file whose code is not loaded here (never
/// named, or with no single executable segment) defers validation to its
/// first mapping, as the registry documents.
#[derive(Default)]
pub(crate) struct DiskFiles {
    mem: MemFiles,
    known: Mutex<Vec<FileId>>,
}

impl DiskFiles {
    /// Reads the executable segment of `path` (which is `file`) if it was
    /// not read yet. Failures are not errors: validation is deferred.
    pub(crate) fn load(&self, file: FileId, path: &Path) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.contains(&file) {
            return;
        }
        if let Some((start, code)) = exec_segment(path) {
            self.mem.insert(file, start, code);
        }
        known.push(file);
    }
}

/// The file offset and bytes of the only executable `PT_LOAD` segment.
fn exec_segment(path: &Path) -> Option<(u64, Vec<u8>)> {
    let data = std::fs::read(path).ok()?;
    let elf = object::File::parse(&*data).ok()?;
    let mut exec = elf.segments().filter(|s| match s.flags() {
        SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
        _ => false,
    });
    let seg = exec.next()?;
    if exec.next().is_some() {
        return None;
    }
    let (offset, size) = seg.file_range();
    let file = std::fs::File::open(path).ok()?;
    let mut code = vec![0u8; usize::try_from(size).ok()?];
    file.read_exact_at(&mut code, offset).ok()?;
    Some((offset, code))
}

impl FileText for DiskFiles {
    fn code_range(&self, file: FileId) -> Option<std::ops::Range<u64>> {
        self.mem.code_range(file)
    }

    fn read(&self, file: FileId, offset: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        self.mem.read(file, offset, buf)
    }
}
