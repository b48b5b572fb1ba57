//! XOL ("execute out of line") slot allocation.
//!
//! A probed instruction that is not emulated runs from a slot: a small piece
//! of executable memory holding a copy of the instruction (rewritten if it is
//! PC-relative) and, when boostable, a jump back. The registry asks an
//! [`XolAllocator`] for a slot near the probed code when the first probe on
//! an address is registered, and gives it back when the last one goes.
//!
//! # Reuse only after a grace period
//!
//! A thread may be running in a slot after the probe that owns it is gone:
//! it trapped on the breakpoint just before the breakpoint was removed, and
//! is still single-stepping (or running a boosted slot). The registry waits
//! for every single-step in flight before it lets go of a slot, and then
//! frees it through [`Rcu::call`](crate::rcu::Rcu::call), so the allocator
//! sees [`XolAllocator::free`] only after one more grace period. That extra
//! grace period is what covers boosted runs, which never report back.
//!
//! # Implementations
//!
//! [`XolArena`] is an in-memory allocator over a fixed address range for
//! tests with [`Image`](crate::probes::text::Image) text. The live runtime
//! provides executable pages within +/-2 GiB of the probed code.

use crate::probes::ProbeError;
use crate::sync::Mutex;

/// Hands out XOL slots and writes their bytes.
///
/// Methods are called by registry writers (never from trap context), and
/// `free` from the RCU callback worker.
pub trait XolAllocator: Send + Sync + 'static {
    /// Allocates a slot, preferably near `near` (the probed address).
    ///
    /// # Errors
    /// [`ProbeError::XolExhausted`] when no slot is free.
    fn alloc(&self, near: u64) -> Result<u64, ProbeError>;

    /// Writes `bytes` at the start of `slot` (at most one slot's size).
    ///
    /// # Errors
    /// [`ProbeError::TextAccess`] if the slot cannot be written.
    fn fill(&self, slot: u64, bytes: &[u8]) -> Result<(), ProbeError>;

    /// Returns `slot`: no thread executes it any more.
    fn free(&self, slot: u64);
}

/// An in-memory slot allocator: `slots` slots of `slot_size` bytes from
/// `base`, with their bytes kept for inspection.
#[derive(Debug)]
pub struct XolArena {
    base: u64,
    slot_size: usize,
    inner: Mutex<Arena>,
}

#[derive(Debug)]
struct Arena {
    free: Vec<usize>,
    bytes: Vec<u8>,
    allocs: u64,
    frees: u64,
}

impl XolArena {
    /// `slots` slots of `slot_size` bytes starting at `base`, all free.
    pub fn new(base: u64, slots: usize, slot_size: usize) -> Self {
        XolArena {
            base,
            slot_size,
            inner: Mutex::new(Arena {
                // Popped from the end: lowest address first.
                free: (0..slots).rev().collect(),
                bytes: vec![0; slots * slot_size],
                allocs: 0,
                frees: 0,
            }),
        }
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, Arena> {
        // A panic under the lock leaves a consistent arena (every mutation is
        // a single push/pop or copy), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn index(&self, slot: u64) -> Option<usize> {
        let off = usize::try_from(slot.checked_sub(self.base)?).ok()?;
        (off % self.slot_size == 0).then_some(off / self.slot_size)
    }

    /// The bytes of `slot` (a whole slot), if it is one of the arena's.
    pub fn slot_bytes(&self, slot: u64) -> Option<Vec<u8>> {
        let i = self.index(slot)?;
        let a = self.lock();
        a.bytes
            .get(i * self.slot_size..(i + 1) * self.slot_size)
            .map(<[u8]>::to_vec)
    }

    /// Slots currently allocated.
    pub fn in_use(&self) -> usize {
        let a = self.lock();
        a.bytes.len() / self.slot_size - a.free.len()
    }

    /// Total `free` calls so far.
    pub fn frees(&self) -> u64 {
        self.lock().frees
    }

    /// Total successful `alloc` calls so far.
    pub fn allocs(&self) -> u64 {
        self.lock().allocs
    }
}

impl XolAllocator for XolArena {
    fn alloc(&self, near: u64) -> Result<u64, ProbeError> {
        let mut a = self.lock();
        let i = a.free.pop().ok_or(ProbeError::XolExhausted { near })?;
        a.allocs += 1;
        Ok(self.base + (i * self.slot_size) as u64)
    }

    fn fill(&self, slot: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        let fail = || ProbeError::TextAccess {
            addr: slot,
            len: bytes.len(),
            failure: crate::probes::error::TextFailure::OutOfRange,
        };
        let i = self.index(slot).ok_or_else(fail)?;
        if bytes.len() > self.slot_size {
            return Err(fail());
        }
        let mut a = self.lock();
        let start = i * self.slot_size;
        a.bytes
            .get_mut(start..start + bytes.len())
            .ok_or_else(fail)?
            .copy_from_slice(bytes);
        Ok(())
    }

    fn free(&self, slot: u64) {
        let Some(i) = self.index(slot) else {
            return;
        };
        let mut a = self.lock();
        debug_assert!(!a.free.contains(&i), "XOL slot {slot:#x} freed twice");
        a.free.push(i);
        a.frees += 1;
    }
}
