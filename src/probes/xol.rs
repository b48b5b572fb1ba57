//! XOL ("execute out of line") slot allocation.
//!
//! A probed instruction that is not emulated runs from a slot: a small piece
//! of executable memory holding a copy of the instruction (rewritten if it is
//! PC-relative) and, when boostable, a jump back. The registry asks an
//! [`XolAllocator`] for a slot near the probed code when the first probe on
//! an address is registered, and gives it back when the last one goes.
//!
//! # When the registry lets go of a slot, and what that proves
//!
//! A thread may still be in a slot after the probe that owns it is gone. The
//! registry lets go of a slot (the last member list of its site is freed)
//! only after
//!
//! - a grace period: the trap handler looks the site up and sends the thread
//!   into the slot inside an `Rcu` read section, so once the breakpoint is
//!   gone and the grace period has passed, every thread that was sent there
//!   has been sent and no trap will send another;
//! - every single-step in flight on the site has completed (the member
//!   list's `inflight` count): a stepping thread is back in the original
//!   code once its step trap has been handled;
//!
//! and then hands it straight to [`XolAllocator::free`] (so a probe
//! registered again at the address as soon as `unregister` or `commit`
//! returns gets the same slot back, parked for it, rather than binding
//! another slot to the address while the first waits).
//!
//! None of this covers a **boosted** run. Once its trap handler has
//! returned, the thread runs the slot's copy of the instruction and the jump
//! back on its own: in no read section, counted nowhere, reporting to no
//! one. It can be preempted (or take a signal) at the slot's first byte and
//! stay there for any length of time, so no grace period, however long,
//! proves that it has left the slot. (The kernel closes this gap for boosted
//! kprobes with RCU Tasks, which waits for every task to pass a voluntary
//! context switch.) The registry therefore calls [`XolAllocator::quiesce`]
//! with the retired boosted slots after the grace period of `unregister` /
//! `commit`, before either returns; the live runtime's area waits there
//! until every thread has been *observed* outside them (its IP read from a
//! signal frame), which is this process's stand-in for RCU Tasks. That wait
//! is bounded (a thread that blocks the signal cannot be observed), so the
//! reuse rule below stays what makes a freed slot safe in every case.
//!
//! # The reuse rule every allocator must follow
//!
//! **A FREED SLOT MAY STILL BE EXECUTED. AN ALLOCATOR MUST HAND IT OUT AGAIN
//! ONLY FOR THE SAME PROBED ADDRESS** (the `near` of the `alloc` it was
//! first handed out for), never for other code. For the same address the
//! registry decodes the same instruction (it checks the original bytes
//! before it patches) and plans it for the same slot address, so it fills
//! the slot with byte for byte what was there: a thread waking up in a stale
//! slot runs exactly the code it was sent to run and jumps back to the
//! instruction after the (restored) original. The cost is one slot per
//! distinct address ever probed. (Code replaced in place by its owner, as a
//! JIT might, is outside this guarantee.)
//!
//! **The one exception: proven quiescence.** An allocator whose
//! [`quiesce`](XolAllocator::quiesce) *proves* that no thread can still be
//! executing a set of slots (every thread observed outside them after the
//! grace period, with nothing that could hide a thread inside: the live
//! [`XolArea`](crate::probes::runtime::XolArea) requires no thread timed
//! out, blocked the signal or sat in a nested signal handler) may return
//! exactly those slots, when they are freed, to its general free list. A
//! slot freed without such a proof still follows the rule above.
//!
//! # Implementations
//!
//! [`XolArena`] is an in-memory allocator over a fixed address range for
//! tests with [`Image`](crate::probes::text::Image) text; nothing executes
//! its slots, but it follows the reuse rule all the same, so that the
//! registry's tests run against the allocator behaviour the live runtime
//! has (and a registry that freed a slot still in use, or depended on
//! reuse across addresses, would show it there). The live runtime's
//! [`XolArea`](crate::probes::runtime::XolArea) provides executable pages
//! within +/-2 GiB of the probed code and parks freed slots by address.

use crate::probes::ProbeError;
use crate::sync::Mutex;

/// Hands out XOL slots and writes their bytes.
///
/// Methods are called by registry writers (never from trap context), and
/// `free` from the RCU callback worker.
///
/// # Reuse rule
///
/// **A FREED SLOT MAY STILL BE EXECUTED: HAND IT OUT AGAIN ONLY FOR THE SAME
/// PROBED ADDRESS** (the `near` it was first allocated for). A thread the
/// registry sent into a slot for a boosted run (no post handler) executes
/// it after its trap handler has returned, in no read section and counted
/// nowhere, so neither the grace periods nor the single-step counts that
/// precede [`free`](Self::free) prove that it has left. For the same address
/// the registry decodes the same instruction and refills the slot with the
/// same bytes, so such a thread runs exactly the code it was sent to run and
/// jumps back after the restored original. The cost is one slot per
/// distinct address ever probed, unless [`quiesce`](Self::quiesce) proved
/// the slots unused (module docs: the one exception).
pub trait XolAllocator: Send + Sync + 'static {
    /// Allocates a slot for the probed address `near`, preferably near it: a
    /// slot freed earlier only if it was allocated for this same `near`,
    /// else one never handed out.
    ///
    /// # Errors
    /// [`ProbeError::XolExhausted`] when no slot is free.
    fn alloc(&self, near: u64) -> Result<u64, ProbeError>;

    /// Writes `bytes` at the start of `slot` (at most one slot's size).
    ///
    /// # Errors
    /// [`ProbeError::TextAccess`] if the slot cannot be written.
    fn fill(&self, slot: u64, bytes: &[u8]) -> Result<(), ProbeError>;

    /// Returns `slot`. No single-step is in it and no trap will send a
    /// thread there any more, but a thread sent there earlier for a boosted
    /// run may still execute it (module docs): keep its bytes, and hand it
    /// out again only for the address it was allocated for, unless this
    /// allocator's own `quiesce` proved it unused since its last `alloc`.
    fn free(&self, slot: u64);

    /// [`free`](Self::free) of every slot of `slots` (an `unregister_many`
    /// or a `dlclose` returns thousands at once: an allocator with a lock
    /// takes it once).
    fn free_many(&self, slots: &[u64]) {
        for &s in slots {
            self.free(s);
        }
    }

    /// Called by the registry after the grace period of an `unregister` or
    /// `commit` that retires the boosted `slots` (before they are freed):
    /// returns once no thread can still be executing them, as far as the
    /// allocator can tell. The live runtime's area waits until every thread
    /// has been seen outside them (bounded; past the bound the reuse rule
    /// above is what keeps a late thread safe). The default does nothing,
    /// which is right for slots nothing executes.
    fn quiesce(&self, slots: &[u64]) {
        let _ = slots;
    }
}

/// An in-memory slot allocator: `slots` slots of `slot_size` bytes from
/// `base`, with their bytes kept for inspection. Follows the
/// [reuse rule](XolAllocator#reuse-rule): a slot is bound to the address of
/// its first allocation and, once freed, *parked* for that address only.
#[derive(Debug)]
pub struct XolArena {
    base: u64,
    slot_size: usize,
    inner: Mutex<Arena>,
}

#[derive(Debug)]
struct Arena {
    /// Slots never handed out, lowest last (popped first).
    fresh: Vec<usize>,
    /// Per slot: the probed address it is bound to (from its first
    /// allocation on), and whether it is allocated now.
    bound: Vec<Option<(u64, bool)>>,
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
                fresh: (0..slots).rev().collect(),
                bound: vec![None; slots],
                bytes: vec![0; slots * slot_size],
                allocs: 0,
                frees: 0,
            }),
        }
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, Arena> {
        // A panic under the lock leaves a consistent arena (every mutation is
        // a single push/pop, flag or copy), so poisoning is ignored.
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
        a.bound
            .iter()
            .filter(|b| matches!(b, Some((_, true))))
            .count()
    }

    /// Freed slots kept for the address they are bound to.
    pub fn parked(&self) -> usize {
        let a = self.lock();
        a.bound
            .iter()
            .filter(|b| matches!(b, Some((_, false))))
            .count()
    }

    /// The probed address `slot` is bound to, if it was ever allocated.
    pub fn bound_to(&self, slot: u64) -> Option<u64> {
        let i = self.index(slot)?;
        let a = self.lock();
        a.bound.get(i).copied().flatten().map(|(near, _)| near)
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
        // A slot parked for this address first, else a fresh one; never a
        // slot parked for another address (the reuse rule).
        let parked = a.bound.iter().position(|b| *b == Some((near, false)));
        let i = match parked {
            Some(i) => i,
            None => a.fresh.pop().ok_or(ProbeError::XolExhausted { near })?,
        };
        a.bound[i] = Some((near, true));
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
        match a.bound.get_mut(i) {
            // Parked: bound to its address for good, bytes kept.
            Some(Some((_, used))) if *used => *used = false,
            _ => {
                debug_assert!(false, "XOL slot {slot:#x} freed but not allocated");
                return;
            }
        }
        a.frees += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_slot_is_handed_out_again_only_for_the_same_address() {
        let arena = XolArena::new(0x9000, 3, 64);
        let (p, q, r) = (0x1000, 0x1002, 0x1004);
        let a = arena.alloc(p).unwrap();
        arena.fill(a, &[0x90, 0xc3]).unwrap();
        let b = arena.alloc(q).unwrap();
        arena.free(a);
        assert_eq!((arena.in_use(), arena.parked()), (1, 1));
        assert_eq!(arena.slot_bytes(a).unwrap()[..2], [0x90, 0xc3], "kept");
        // Another address gets the last fresh slot, never the parked one...
        let c = arena.alloc(r).unwrap();
        assert!(c != a && c != b);
        // ...and with none fresh left, is refused rather than given it.
        arena.free(c);
        assert_eq!(
            arena.alloc(0x1006),
            Err(ProbeError::XolExhausted { near: 0x1006 })
        );
        // Its own address gets it back.
        assert_eq!(arena.alloc(p).unwrap(), a);
        assert_eq!(arena.alloc(r).unwrap(), c);
        assert_eq!(arena.bound_to(a), Some(p));
        assert_eq!((arena.allocs(), arena.frees()), (5, 2));
        assert_eq!((arena.in_use(), arena.parked()), (3, 0));
    }
}
