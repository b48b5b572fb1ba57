//! [`ThisProcess`]: the running process as a uprobe
//! [`AddressSpace`].

use std::sync::Arc;

use crate::probes::runtime::in_process::InProcess;
use crate::probes::runtime::loader::LoaderWatch;
use crate::probes::runtime::xol::XolArea;
use crate::probes::uprobe::{AddressSpace, FileMapping, SpaceId};
use crate::probes::xol::XolAllocator;

/// The running process as an address space: its text is the live
/// [`InProcess`] text (the same refusals as the kprobe registry's: the trap
/// path is never patched), its XOL slots come from the process's
/// [`XolArea`] (the one [`Live::global`](crate::probes::runtime::Live::global)
/// uses, so slots, quiescence and `fork` copies are shared), its mappings
/// are the executable segments of the objects the loader lists, and its
/// return trampoline is the kretprobes' assembly trampoline on x86_64 (a
/// return without a trap) and a `brk` in an XOL slot of its own on arm64.
pub struct ThisProcess {
    pub(super) id: SpaceId,
    pub(super) text: InProcess,
    pub(super) xol: Arc<XolArea>,
    pub(super) trampoline: u64,
    pub(super) watch: &'static LoaderWatch,
}

impl std::fmt::Debug for ThisProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThisProcess")
            .field("id", &self.id)
            .field("trampoline", &format_args!("{:#x}", self.trampoline))
            .finish_non_exhaustive()
    }
}

impl AddressSpace for ThisProcess {
    type Text = InProcess;

    fn id(&self) -> SpaceId {
        self.id
    }

    fn text(&self) -> &InProcess {
        &self.text
    }

    fn xol(&self) -> &dyn XolAllocator {
        &*self.xol
    }

    fn mappings(&self) -> Vec<FileMapping> {
        let mut maps: Vec<FileMapping> = self
            .watch
            .objects()
            .iter()
            .flat_map(|o| o.file_mappings())
            .collect();
        maps.sort_by_key(|m| m.vaddr.start);
        maps
    }

    fn return_trampoline(&self) -> Option<u64> {
        Some(self.trampoline)
    }
}
