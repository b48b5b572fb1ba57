//! [`RemoteXol`]: XOL slots inside a traced process, in chunks the tracer
//! maps there (an `mmap` injected through a stopped thread, `inject.rs`)
//! within +/-2 GiB of the probed code where the address space allows, read
//! and execute only, and filled through `/proc/<pid>/mem`.
//!
//! The reuse rule ([`XolAllocator`]): a freed slot is handed out again only
//! for the address it served (parked per address). A thread of the process
//! that was sent into a slot and has not left it yet therefore always runs
//! the bytes it was sent to run; nothing here proves quiescence, so slots
//! are never recycled across addresses (one slot per address ever probed,
//! bounded by the chunks mapped).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::inject;
use super::mem::{RemoteMemory, INT3};
use super::ptrace::Tid;
use super::stops::Stops;
use crate::probes::error::TextFailure;
use crate::probes::procmaps::Maps;
use crate::probes::xol::XolAllocator;
use crate::probes::ProbeError;

/// Bytes per chunk: 16,384 slots of 64 bytes.
pub const REMOTE_XOL_CHUNK_BYTES: u64 = 1 << 20;

/// How far every byte of a chunk may be from the probed address for the
/// x86_64 backend's `jmp rel32` back to reach: 2 GiB, less a chunk and a
/// page of margin.
const REACH: u64 = (1 << 31) - REMOTE_XOL_CHUNK_BYTES - 4096;
const MIN_ADDR: u64 = 0x10_0000;
const MAX_ADDR: u64 = 0x7fff_ffff_f000;

/// The thread a [`RemoteXol`] may borrow to map a chunk: set by the tracer
/// while it holds one of the process's threads stopped, on the tracer
/// thread (the only one that may make `ptrace` requests to it).
#[derive(Debug, Default)]
pub(super) struct Borrowable {
    now: Mutex<Option<Loan>>,
    /// A `syscall` instruction in the process, once found.
    gadget: Mutex<Option<u64>>,
}

/// A lent thread: the stopped thread, the thread that traces it, and that
/// tracer's collected stops (its waits keep the other threads' stops
/// there).
#[derive(Clone, Debug)]
pub(super) struct Loan {
    tid: Tid,
    tracer: Tid,
    stops: Arc<Stops>,
}

impl Borrowable {
    /// Lends `tid` (stopped, traced by this thread, whose collected stops
    /// are `stops`) until the guard drops.
    pub(super) fn lend(&self, tid: Tid, stops: &Arc<Stops>) -> Lent<'_> {
        let prev = self.set(Some(Loan {
            tid,
            tracer: gettid(),
            stops: Arc::clone(stops),
        }));
        Lent { owner: self, prev }
    }

    fn set(&self, v: Option<Loan>) -> Option<Loan> {
        std::mem::replace(&mut *self.now.lock().unwrap_or_else(|p| p.into_inner()), v)
    }

    /// The stopped thread and its tracer's stops, if one is lent to the
    /// calling thread.
    fn thread(&self) -> Option<(Tid, Arc<Stops>)> {
        let now = self.now.lock().unwrap_or_else(|p| p.into_inner()).clone();
        now.filter(|l| l.tracer == gettid())
            .map(|l| (l.tid, l.stops))
    }
}

/// A thread lent to a [`RemoteXol`]; the previous loan comes back on drop.
pub(super) struct Lent<'a> {
    owner: &'a Borrowable,
    prev: Option<Loan>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        self.owner.set(self.prev.take());
    }
}

fn gettid() -> Tid {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

struct Chunk {
    start: u64,
    /// Free slot indices, lowest popped first.
    free: Vec<u32>,
}

#[derive(Default)]
struct Slots {
    chunks: Vec<Chunk>,
    /// Slot handed out -> the address it serves.
    bound: HashMap<u64, u64>,
    /// Freed slots by the address they served.
    parked: BTreeMap<u64, Vec<u64>>,
}

/// XOL slots in a traced process, in 1 MiB chunks mapped there near the
/// probed code; a freed slot is handed out again only for the address it
/// served (the [reuse rule](crate::probes::xol::XolAllocator#reuse-rule):
/// nothing here proves that no thread is still inside it).
pub struct RemoteXol {
    pid: Tid,
    mem: RemoteMemory,
    slot_size: usize,
    lender: Arc<Borrowable>,
    slots: Mutex<Slots>,
}

impl std::fmt::Debug for RemoteXol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("RemoteXol")
            .field("pid", &self.pid)
            .field("chunks", &s.chunks.len())
            .field("in_use", &s.bound.len())
            .finish()
    }
}

impl RemoteXol {
    pub(super) fn new(
        pid: Tid,
        mem: RemoteMemory,
        slot_size: usize,
        lender: Arc<Borrowable>,
    ) -> RemoteXol {
        RemoteXol {
            pid,
            mem,
            slot_size,
            lender,
            slots: Mutex::new(Slots::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Chunks mapped in the process, and slots handed out.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.chunks.len(), s.bound.len())
    }

    /// The chunks mapped in the process: `(start, length)` each. A
    /// thread whose instruction pointer is in one is running a displaced
    /// instruction (or the return trampoline).
    pub fn chunk_ranges(&self) -> Vec<(u64, u64)> {
        self.lock()
            .chunks
            .iter()
            .map(|c| (c.start, REMOTE_XOL_CHUNK_BYTES))
            .collect()
    }

    /// Unmaps every chunk from the process, through the thread lent to this
    /// one (a detach: no thread is in a slot, no return address points
    /// into one); how many were unmapped. A chunk that cannot be unmapped
    /// is left as it is (harmless `int3`s) and counted out.
    pub(super) fn unmap_all(&self) -> usize {
        let Some((tid, stops)) = self.lender.thread() else {
            return 0;
        };
        let gadget = *self.lender.gadget.lock().unwrap_or_else(|p| p.into_inner());
        let Some(gadget) = gadget.or_else(|| {
            let rip = super::ptrace::get_regs(tid).ok()?.rip;
            inject::find_syscall(&self.mem, rip).ok()
        }) else {
            return 0;
        };
        let mut s = self.lock();
        let mut unmapped = 0;
        s.chunks.retain(|c| {
            let args = [c.start, REMOTE_XOL_CHUNK_BYTES, 0, 0, 0, 0];
            let gone = inject::syscall(&stops, self.pid, tid, gadget, libc::SYS_munmap, args)
                .is_ok_and(|r| r == 0);
            unmapped += usize::from(gone);
            !gone
        });
        unmapped
    }

    /// Maps a chunk near `near` (anywhere if no gap within reach) through
    /// the thread lent to this one, and fills it with `int3`.
    fn map_chunk(&self, near: u64) -> Result<Chunk, ProbeError> {
        let exhausted = ProbeError::XolExhausted { near };
        let (tid, stops) = self.lender.thread().ok_or(exhausted.clone())?;
        let gadget = {
            let mut g = self.lender.gadget.lock().unwrap_or_else(|p| p.into_inner());
            match *g {
                Some(a) => a,
                None => {
                    let rip = super::ptrace::get_regs(tid)
                        .map_err(|_| exhausted.clone())?
                        .rip;
                    let a = inject::find_syscall(&self.mem, rip).map_err(|_| exhausted.clone())?;
                    *g = Some(a);
                    a
                }
            }
        };
        let len = REMOTE_XOL_CHUNK_BYTES;
        let prot = libc::PROT_READ | libc::PROT_EXEC;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let near_places = Maps::read_pid(self.pid)
            .map(|m| m.places_near(near, len, REACH, MIN_ADDR, MAX_ADDR))
            .unwrap_or_default();
        let placed = near_places.into_iter().take(8).find_map(|hint| {
            inject::mmap(
                &stops,
                self.pid,
                tid,
                gadget,
                hint,
                len,
                prot,
                flags | libc::MAP_FIXED_NOREPLACE,
            )
            .ok()
            .filter(|&a| a == hint)
        });
        let start = match placed {
            Some(a) => a,
            None => inject::mmap(&stops, self.pid, tid, gadget, 0, len, prot, flags)
                .map_err(|_| exhausted.clone())?,
        };
        self.mem
            .write_at(start, &vec![INT3; len as usize])
            .map_err(|_| exhausted)?;
        let n = (len / self.slot_size as u64) as u32;
        Ok(Chunk {
            start,
            free: (0..n).rev().collect(),
        })
    }

    fn within_reach(start: u64, near: u64) -> bool {
        let end = start + REMOTE_XOL_CHUNK_BYTES;
        start.abs_diff(near) <= REACH && end.abs_diff(near) <= REACH
    }

    fn take(&self, s: &mut Slots, only_near: bool, near: u64) -> Option<u64> {
        let size = self.slot_size as u64;
        s.chunks
            .iter_mut()
            .filter(|c| !only_near || Self::within_reach(c.start, near))
            .find_map(|c| c.free.pop().map(|i| c.start + u64::from(i) * size))
    }
}

impl XolAllocator for RemoteXol {
    fn alloc(&self, near: u64) -> Result<u64, ProbeError> {
        let mut s = self.lock();
        let parked = s.parked.get_mut(&near).and_then(Vec::pop);
        let slot = match parked {
            Some(slot) => slot,
            None => match self.take(&mut s, true, near) {
                Some(slot) => slot,
                None => {
                    match self.map_chunk(near) {
                        Ok(c) => s.chunks.push(c),
                        // No thread to borrow or no room near: any chunk.
                        Err(e) => return self.take(&mut s, false, near).ok_or(e),
                    }
                    self.take(&mut s, false, near)
                        .ok_or(ProbeError::XolExhausted { near })?
                }
            },
        };
        s.bound.insert(slot, near);
        Ok(slot)
    }

    fn fill(&self, slot: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        if bytes.len() > self.slot_size || !self.lock().bound.contains_key(&slot) {
            return Err(ProbeError::TextAccess {
                addr: slot,
                len: bytes.len(),
                failure: TextFailure::OutOfRange,
            });
        }
        let mut padded = [INT3; crate::probes::arch::MAX_XOL_SLOT];
        padded[..bytes.len()].copy_from_slice(bytes);
        self.mem.write_at(slot, &padded[..self.slot_size])
    }

    fn free(&self, slot: u64) {
        let mut s = self.lock();
        if let Some(near) = s.bound.remove(&slot) {
            s.parked.entry(near).or_default().push(slot);
        }
    }
}
