//! [`RemoteSpace`]: a traced process as a uprobe [`AddressSpace`]. Its
//! mappings are the executable file mappings `/proc/<pid>/maps` lists, its
//! text and data are [`RemoteMemory`], its XOL slots a [`RemoteXol`] and
//! its return trampoline an `int3` in an XOL slot of its own.

use std::sync::Arc;

use super::mem::RemoteMemory;
use super::ptrace::Tid;
use super::stops::Stops;
use super::xol::{Borrowable, RemoteXol};
use crate::probes::arch::X86_64;
use crate::probes::procmaps::Maps;
use crate::probes::uprobe::{AddressSpace, FileId, FileMapping, SpaceId};
use crate::probes::xol::XolAllocator;
use crate::probes::ProbeError;

/// A traced process's address space (one `exec` of it: a process that runs
/// `exec` gets a new space).
#[derive(Debug)]
pub struct RemoteSpace {
    id: SpaceId,
    pid: Tid,
    mem: RemoteMemory,
    xol: RemoteXol,
    trampoline: u64,
    pub(super) lender: Arc<Borrowable>,
}

impl RemoteSpace {
    /// The space of `pid` (traced by this thread; `tid`, one of its
    /// threads, is stopped and lent to map the first XOL chunk, near
    /// `near`).
    pub(super) fn new(
        id: SpaceId,
        pid: Tid,
        tid: Tid,
        near: u64,
        stops: &Arc<Stops>,
    ) -> Result<RemoteSpace, ProbeError> {
        let mem = RemoteMemory::open(pid).map_err(|e| ProbeError::TextAccess {
            addr: 0,
            len: 0,
            failure: crate::probes::error::TextFailure::Os {
                op: "open /proc/pid/mem",
                errno: e.raw_os_error().unwrap_or(0),
            },
        })?;
        let lender = Arc::new(Borrowable::default());
        let xol = RemoteXol::new(pid, mem.clone(), X86_64::XOL_SLOT_SIZE, Arc::clone(&lender));
        // The trampoline: a slot of `int3`s (a fresh chunk holds nothing
        // else), never freed.
        let trampoline = {
            let _lent = lender.lend(tid, stops);
            xol.alloc(near)?
        };
        Ok(RemoteSpace {
            id,
            pid,
            mem,
            xol,
            trampoline,
            lender,
        })
    }

    /// The traced process.
    pub fn pid(&self) -> Tid {
        self.pid
    }

    /// Its memory.
    pub fn memory(&self) -> &RemoteMemory {
        &self.mem
    }

    /// Its XOL slots.
    pub fn xol_slots(&self) -> &RemoteXol {
        &self.xol
    }
}

/// The executable file mappings of `maps`, as the registry keys them.
pub(super) fn file_mappings(maps: &Maps) -> Vec<FileMapping> {
    maps.mappings
        .iter()
        .filter(|m| m.prot & libc::PROT_EXEC != 0 && m.inode != 0)
        .map(|m| FileMapping {
            vaddr: m.start..m.end,
            file: FileId {
                dev: m.device,
                inode: m.inode,
            },
            file_offset: m.offset,
        })
        .collect()
}

impl AddressSpace for RemoteSpace {
    type Text = RemoteMemory;

    fn id(&self) -> SpaceId {
        self.id
    }

    fn text(&self) -> &RemoteMemory {
        &self.mem
    }

    fn xol(&self) -> &dyn XolAllocator {
        &self.xol
    }

    fn mappings(&self) -> Vec<FileMapping> {
        Maps::read_pid(self.pid)
            .map(|m| file_mappings(&m))
            .unwrap_or_default()
    }

    fn return_trampoline(&self) -> Option<u64> {
        Some(self.trampoline)
    }
}
