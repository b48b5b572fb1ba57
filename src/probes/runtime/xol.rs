//! [`XolArea`]: executable slots near the probed code.
//!
//! # Chunks near the code
//!
//! Slots live in *chunks* (`xol/chunk.rs`): a `memfd` mapped twice,
//! read-execute where the slots run and read-write for filling them, placed
//! within [`XOL_CHUNK_REACH`] of the probed code where a gap allows, so that the
//! backend's 5-byte `jmp rel32` reaches back. A slot near `addr` comes from
//! a chunk within reach of `addr`, else from a new chunk mapped near it,
//! else from any chunk (the backend then plans an absolute jump back).
//!
//! # When a freed slot may run other code
//!
//! A thread may still run a slot after the probe that owns it is gone: it
//! trapped just before the breakpoint was removed, the handler pointed it at
//! the slot, and the thread was preempted (or took a signal) before it ran
//! the slot's first instruction. A boosted run never reports back, and once
//! the trap handler has returned the thread is in no read-side critical
//! section, so no grace period, however long, proves that it has left the
//! slot. (The registry frees slots through
//! [`Rcu::call`](crate::rcu::Rcu::call) after the single-steps in flight on
//! them, which covers every thread still in its trap handler, but not this
//! one.) The kernel solves the same problem for boosted kprobes with RCU
//! Tasks, which waits for every task to pass a voluntary context switch.
//!
//! The area's [`quiesce`](XolAllocator::quiesce), which the registry calls
//! for retired boosted slots after the grace period of `unregister` /
//! `commit` and before it frees them, is the process's stand-in: it signals
//! every other thread and returns once each has been seen with its IP
//! outside those slots (see `quiesce.rs`), so `commit` returns only when no
//! thread is still in them. The wait is bounded
//! ([`QUIESCE_TIMEOUT`](super::QUIESCE_TIMEOUT)) and cannot observe every
//! thread, so each slot ends in one of two ways.
//!
//! **Recycled**, when the wait *proved* quiescence
//! ([`QuiesceReport::proves_quiescence`](super::QuiesceReport::proves_quiescence)):
//! every other thread was seen, after the grace period, outside the slots
//! and in no other signal handler (empty interrupted mask), or had exited.
//! The argument, step by step:
//!
//! 1. Only a trap on the site's breakpoint sends a thread into a slot, from
//!    inside an `Rcu` read section that looked the site up. The breakpoint
//!    was removed and the site unlinked before the grace period, so once it
//!    has passed no thread will be sent there again, and every thread that
//!    was sent there already existed.
//! 2. The wait lists the threads *after* the grace period, so it asks every
//!    thread that can be in the slot (a thread created later was never sent
//!    there; the slot's instruction cannot be `syscall`, so no thread is
//!    born in it).
//! 3. Each ack is an IP read after the wait's round began (the generation
//!    protocol, loom-checked), i.e. after the grace period. A thread seen
//!    outside, with no handler under way that interrupted it (the mask
//!    test), has left the slot or never entered it, and by 1 it never
//!    enters it again. (A thread still in the SIGTRAP handler that is
//!    sending it into the slot has the signal blocked there, so it is seen
//!    after its return, inside.) A thread that exited runs nothing.
//! 4. Hence when every thread is accounted for so, nothing can execute the
//!    slot after `quiesce` returns: the registry's later
//!    [`free`](XolAllocator::free) puts it back on its chunk's free list
//!    (bytes reset to `int3`), for **any** address, after the grace period
//!    as the registry requires.
//!
//! The area notes which allocation handed out each slot before the wait,
//! marks the slots of a proving wait that are still held by that same
//! allocation afterwards, and recycles exactly those when they are freed
//! ([`XolStats::recycled`]): the proof is about that allocation's retirement
//! only, so a slot freed and handed out again while the wait ran (which the
//! registry never does) would not be covered.
//!
//! **Parked**, in every other case: a thread timed out, blocked the signal,
//! may be inside another handler, or the slot was freed without a proving
//! wait (slots planned for single-stepping, whose threads the registry
//! counts instead, are never passed to `quiesce`). Such a slot is bound to
//! the probed address it was first allocated for, and handed out again only
//! for that same address, where the registry plans the same instruction and
//! fills the same bytes ([`XolStats::parked_frees`]). A thread that wakes up
//! in a stale slot runs exactly the code it was sent to run and jumps back
//! to the instruction after the (restored) original. The cost is one slot
//! per such address, kept for the life of the process. (Code that is itself
//! replaced at the same address, as a JIT might, is outside this guarantee:
//! the stale thread would also jump back into the new code.) A parked slot
//! handed out again for its address and then retired by a proving wait is
//! recycled like any other.
//!
//! This relaxes, for the live area only, the
//! [reuse rule](crate::probes::xol::XolAllocator#reuse-rule) of the
//! allocator trait, which assumes no such proof exists.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::probes::arch::MAX_XOL_SLOT;
use crate::probes::error::TextFailure;
use crate::probes::xol::XolAllocator;
use crate::probes::ProbeError;
use crate::sync::Mutex;

mod chunk;
pub(crate) mod fork;
use chunk::{Chunk, FILL};
pub use chunk::{XOL_CHUNK_BYTES, XOL_CHUNK_REACH};

#[derive(Clone, Copy)]
struct Bound {
    near: u64,
    alloc: u64,
}

struct Areas {
    chunks: Vec<Chunk>,
    /// `(exec address, index in chunks)`, sorted: which chunk holds a slot
    /// (by binary search: an area grown for 100,000 probes has a hundred
    /// chunks).
    by_exec: Vec<(u64, usize)>,
    /// The chunks whose free list is not empty (an allocation does not scan
    /// the full ones).
    open: BTreeSet<usize>,
    /// Slot handed out -> the probed address it is bound to and the
    /// allocation (its sequence number) that handed it out.
    bound: HashMap<u64, Bound>,
    /// Freed slots no wait proved unused, as `(probed address, slot)`: each
    /// stays bound to its address (several when the same address had
    /// several slots at once, e.g. re-registered before the old slot was
    /// freed). One set for all, no allocation per address.
    parked: BTreeSet<(u64, u64)>,
    /// Slots handed out that a proving quiescence wait has retired: free
    /// recycles them.
    proven: HashSet<u64>,
    allocs: u64,
    frees: u64,
    recycled: u64,
    parked_frees: u64,
    far_allocs: u64,
    quiesce_waits: u64,
    quiesce_fallbacks: u64,
}

/// Executable XOL slots for the live runtime, within +/-2 GiB of the
/// probed code where the address space allows.
///
/// A freed slot goes back on the free list, for any address, only if the
/// [`quiesce`](XolAllocator::quiesce) wait that retired it *proved* that no
/// thread can execute it any more
/// ([`QuiesceReport::proves_quiescence`](super::QuiesceReport::proves_quiescence):
/// every thread seen outside after the grace period, in no other signal
/// handler). Otherwise it is parked and handed out again only for the
/// probed address it was allocated for, where it is refilled with the same
/// bytes, so a thread still in it runs what it was sent to run.
/// [`XolStats::recycled`] and [`XolStats::parked_frees`] count the two
/// outcomes. (`xol.rs` spells out the argument.)
pub struct XolArea {
    slot_size: usize,
    inner: Mutex<Areas>,
}

impl std::fmt::Debug for XolArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.stats();
        f.debug_struct("XolArea")
            .field("slot_size", &self.slot_size)
            .field("stats", &s)
            .finish()
    }
}

/// Counters of an [`XolArea`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XolStats {
    /// Chunks mapped.
    pub chunks: usize,
    /// Slots handed out and not yet freed.
    pub in_use: usize,
    /// Freed slots kept for the address they were bound to (now).
    pub parked: usize,
    /// Slots on the chunks' free lists, for any address (now).
    pub free: usize,
    /// Successful allocations so far.
    pub allocs: u64,
    /// Frees so far: [`recycled`](Self::recycled) plus
    /// [`parked_frees`](Self::parked_frees).
    pub frees: u64,
    /// Frees that put the slot back on a free list, for any address: a
    /// quiescence wait had proved no thread can execute it.
    pub recycled: u64,
    /// Frees that parked the slot for its address (no proving wait).
    pub parked_frees: u64,
    /// Allocations that found no chunk within reach (absolute jump back).
    pub far_allocs: u64,
    /// Quiescence waits run for retired boosted slots.
    pub quiesce_waits: u64,
    /// Threads not proven outside the retired slots (they block the
    /// signal, the wait timed out, or they may be inside another signal
    /// handler; summed over all waits): a wait with any parks its slots.
    pub quiesce_fallbacks: u64,
}

impl XolArea {
    /// An area of `slot_size`-byte slots (at most
    /// [`MAX_XOL_SLOT`](crate::probes::arch::MAX_XOL_SLOT), a power of two).
    ///
    /// # Panics
    /// If `slot_size` is not a power of two in `1..=MAX_XOL_SLOT`.
    pub fn new(slot_size: usize) -> XolArea {
        assert!(
            slot_size.is_power_of_two() && slot_size <= MAX_XOL_SLOT,
            "XOL slot size must be a power of two up to {MAX_XOL_SLOT}"
        );
        XolArea {
            slot_size,
            inner: Mutex::new(Areas {
                chunks: Vec::new(),
                by_exec: Vec::new(),
                open: BTreeSet::new(),
                bound: HashMap::new(),
                parked: BTreeSet::new(),
                proven: HashSet::new(),
                allocs: 0,
                frees: 0,
                recycled: 0,
                parked_frees: 0,
                far_allocs: 0,
                quiesce_waits: 0,
                quiesce_fallbacks: 0,
            }),
        }
    }

    /// Frees `slot` (see [`XolAllocator::free`]), the area's lock held.
    fn free_locked(&self, a: &mut Areas, slot: u64) {
        let Some(Bound { near, .. }) = a.bound.remove(&slot) else {
            debug_assert!(false, "XOL slot {slot:#x} freed but not allocated");
            return;
        };
        a.frees += 1;
        if a.proven.remove(&slot) {
            // A proving wait retired it: no thread can execute it (module
            // docs), so it may hold other code.
            self.recycle(a, slot);
        } else {
            // Parked for its address (module docs).
            a.parked.insert((near, slot));
            a.parked_frees += 1;
        }
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, Areas> {
        // Every mutation is a push or pop completed before anything can
        // panic, so a poisoned lock still guards consistent data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether every byte of `[start, start + len)` is within [`XOL_CHUNK_REACH`] of
    /// `near`.
    pub fn is_near(start: u64, len: u64, near: u64) -> bool {
        chunk::is_near(start, len, near)
    }

    /// Counters.
    pub fn stats(&self) -> XolStats {
        let a = self.lock();
        XolStats {
            chunks: a.chunks.len(),
            in_use: a.bound.len(),
            parked: a.parked.len(),
            free: a.chunks.iter().map(|c| c.free.len()).sum(),
            allocs: a.allocs,
            frees: a.frees,
            recycled: a.recycled,
            parked_frees: a.parked_frees,
            far_allocs: a.far_allocs,
            quiesce_waits: a.quiesce_waits,
            quiesce_fallbacks: a.quiesce_fallbacks,
        }
    }

    /// The chunk index and slot index of `slot`.
    fn locate(&self, a: &Areas, slot: u64) -> Option<(usize, usize)> {
        let k = a.by_exec.partition_point(|&(exec, _)| exec <= slot);
        let (exec, ci) = *a.by_exec.get(k.checked_sub(1)?)?;
        let off = slot - exec;
        (off < a.chunks[ci].len as u64 && off % self.slot_size as u64 == 0)
            .then_some((ci, (off / self.slot_size as u64) as usize))
    }

    /// Maps a new chunk, near `near` if `near` is `Some`: the next size
    /// after the `mapped` chunks the area has (`chunk::chunk_bytes`), or a
    /// smaller one when no gap within reach fits it.
    #[cold]
    fn map_chunk(&self, mapped: usize, near: Option<u64>) -> Option<Chunk> {
        let first = chunk::chunk_bytes(mapped);
        std::iter::successors(Some(first), |&len| {
            (len > XOL_CHUNK_BYTES).then_some(len / 2)
        })
        .find_map(|len| Chunk::map(len, self.slot_size, near))
    }
}

impl Default for XolArea {
    /// An area with the native backend's slot size.
    fn default() -> Self {
        use crate::probes::arch::Arch as _;
        XolArea::new(crate::probes::arch::NativeArch::default().xol_slot_size())
    }
}

impl XolAllocator for XolArea {
    fn alloc(&self, near: u64) -> Result<u64, ProbeError> {
        // A registration that runs code out of line: make sure the fault
        // handlers are still on top of any the application installed since
        // (`faults.rs`, "Handlers installed after ours").
        super::faults::claim();
        let mut a = self.lock();
        if let Some(slot) = take_parked(&mut a.parked, near) {
            a.bind(slot, near);
            return Ok(slot);
        }
        let pick = |a: &mut Areas, only_near: bool| {
            let ci = a.open.iter().copied().find(|&ci| {
                let c = &a.chunks[ci];
                !only_near || XolArea::is_near(c.exec, c.len as u64, near)
            })?;
            let c = &mut a.chunks[ci];
            let i = c.free.pop()?;
            let exec = c.exec;
            if c.free.is_empty() {
                a.open.remove(&ci);
            }
            Some((exec, i))
        };
        let mut got = pick(&mut a, true);
        if got.is_none() {
            if let Some(c) = self.map_chunk(a.chunks.len(), Some(near)) {
                a.add_chunk(c);
                got = pick(&mut a, true);
            }
        }
        if got.is_none() {
            a.far_allocs += 1;
            got = pick(&mut a, false);
            if got.is_none() {
                let c = self
                    .map_chunk(a.chunks.len(), None)
                    .ok_or(ProbeError::XolExhausted { near })?;
                a.add_chunk(c);
                got = pick(&mut a, false);
            }
        }
        let (exec, i) = got.ok_or(ProbeError::XolExhausted { near })?;
        let slot = exec + u64::from(i) * self.slot_size as u64;
        a.bind(slot, near);
        Ok(slot)
    }

    fn fill(&self, slot: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        let a = self.lock();
        let bad = || ProbeError::TextAccess {
            addr: slot,
            len: bytes.len(),
            failure: TextFailure::OutOfRange,
        };
        if bytes.len() > self.slot_size {
            return Err(bad());
        }
        let (ci, si) = self.locate(&a, slot).ok_or_else(bad)?;
        let off = si * self.slot_size;
        let c = &a.chunks[ci];
        // (The argument for the write below: the slot is allocated to the caller and is either
        // fresh (no thread was ever sent there), recycled after a wait that proved no thread can
        // execute it, or parked for this same address, which the registry refills with the very
        // bytes it holds, so a thread still in it from a boosted run sees no change; module docs.)
        // SAFETY: `off + slot_size <= c.len` (locate checked the slot index), the write view
        // is ours, and no thread runs bytes that change (the argument above).
        unsafe {
            let dst = c.write.add(off);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len());
            std::ptr::write_bytes(dst.add(bytes.len()), FILL, self.slot_size - bytes.len());
        }
        // arm64: the new bytes reach instruction fetch at the slot's
        // executable address (`arm64/cache.rs`).
        #[cfg(target_arch = "aarch64")]
        super::cache::sync_icache(
            c.write as u64 + off as u64,
            c.exec + off as u64,
            self.slot_size,
        );
        Ok(())
    }

    fn free(&self, slot: u64) {
        self.free_many(&[slot]);
    }

    /// Under one hold of the area's lock.
    fn free_many(&self, slots: &[u64]) {
        let mut a = self.lock();
        for &slot in slots {
            self.free_locked(&mut a, slot);
        }
        // A table grown for 100,000 probes and emptied again would make
        // every later lookup a cache miss in megabytes of empty buckets:
        // shrink it once it is mostly empty (amortized: it has to lose
        // three quarters of its entries since it last grew).
        let cap = a.bound.capacity();
        if cap > 4096 && a.bound.len() * 4 < cap {
            let keep = a.bound.len() * 2;
            a.bound.shrink_to(keep);
        }
    }

    #[cold]
    fn quiesce(&self, slots: &[u64]) {
        if slots.is_empty() {
            return;
        }
        let len = self.slot_size as u64;
        let ranges: Vec<_> = slots.iter().map(|&s| s..s + len).collect();
        let retired = self.retiring(slots);
        // Outside the area's lock: the wait sleeps.
        let report = super::quiesce::quiesce(&ranges, super::quiesce::QUIESCE_TIMEOUT);
        self.record_wait(&retired, &report);
    }
}

/// Pops a slot parked for `near`.
fn take_parked(parked: &mut BTreeSet<(u64, u64)>, near: u64) -> Option<u64> {
    let &(_, slot) = parked.range((near, 0)..=(near, u64::MAX)).next_back()?;
    parked.remove(&(near, slot));
    Some(slot)
}

impl Areas {
    /// Adds a freshly mapped chunk (every slot free).
    fn add_chunk(&mut self, c: Chunk) {
        let ci = self.chunks.len();
        let at = self.by_exec.partition_point(|&(exec, _)| exec < c.exec);
        self.by_exec.insert(at, (c.exec, ci));
        if !c.free.is_empty() {
            self.open.insert(ci);
        }
        self.chunks.push(c);
    }

    fn bind(&mut self, slot: u64, near: u64) {
        self.allocs += 1;
        let alloc = self.allocs;
        self.bound.insert(slot, Bound { near, alloc });
    }
}

/// A slot handed to a quiescence wait, with the allocation that handed it
/// out.
type Retiring = (u64, u64);

impl XolArea {
    /// The slots of `slots` handed out now, each with its allocation, taken
    /// before a wait so that the wait's verdict applies to exactly these
    /// allocations.
    fn retiring(&self, slots: &[u64]) -> Vec<Retiring> {
        let a = self.lock();
        slots
            .iter()
            .filter_map(|s| a.bound.get(s).map(|b| (*s, b.alloc)))
            .collect()
    }

    /// Records a quiescence wait over the `retired` slots: if `report`
    /// proves quiescence, those still handed out by the same allocation are
    /// marked for recycling when freed (a slot freed and handed out again
    /// while the wait ran is not covered by it); otherwise they stay as
    /// they are (parked when freed). A slot proven once stays proven until
    /// it is freed, even if a later wait over it falls back.
    #[cold]
    fn record_wait(&self, retired: &[Retiring], report: &super::QuiesceReport) {
        let mut a = self.lock();
        a.quiesce_waits += 1;
        a.quiesce_fallbacks += report.unproven() as u64;
        if report.proves_quiescence() {
            for &(s, alloc) in retired {
                if a.bound.get(&s).is_some_and(|b| b.alloc == alloc) {
                    a.proven.insert(s);
                }
            }
        }
    }

    /// Puts `slot`, which no thread can execute, back on its chunk's free
    /// list with its bytes reset to the fill (`int3`, or `udf #0` on arm64).
    fn recycle(&self, a: &mut Areas, slot: u64) {
        let Some((ci, si)) = self.locate(a, slot) else {
            debug_assert!(false, "XOL slot {slot:#x} is not in the area");
            return;
        };
        let c = &mut a.chunks[ci];
        // No thread executes the slot (the caller's proof): the reset is seen by nobody before
        // the slot is filled again, and that happens before any trap sends a thread there.
        // SAFETY: `si * slot_size + slot_size <= XOL_CHUNK_BYTES` (locate); the write view is ours.
        unsafe { std::ptr::write_bytes(c.write.add(si * self.slot_size), FILL, self.slot_size) };
        c.free.push(si as u32);
        a.open.insert(ci);
        a.recycled += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::arch::X86_64;
    use crate::probes::runtime::QuiesceReport;

    fn here() -> u64 {
        here as fn() -> u64 as usize as u64
    }

    #[test]
    fn slots_are_placed_within_reach_of_the_probed_code() {
        let area = XolArea::default();
        let slot = area.alloc(here()).unwrap();
        assert!(
            XolArea::is_near(slot, X86_64::XOL_SLOT_SIZE as u64, here()),
            "{slot:#x} vs {:#x}",
            here()
        );
        assert_eq!(area.stats().far_allocs, 0);
        area.free(slot);
    }

    #[test]
    fn a_filled_slot_runs_and_the_rest_of_it_is_int3() {
        let area = XolArea::default();
        let slot = area.alloc(here()).unwrap();
        // mov eax, 42; ret
        area.fill(slot, &[0xb8, 42, 0, 0, 0, 0xc3]).unwrap();
        // SAFETY: the slot now holds a complete function with the C ABI.
        let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(slot as usize) };
        assert_eq!(f(), 42);
        // SAFETY: the exec view is readable.
        let tail = unsafe {
            std::slice::from_raw_parts((slot + 6) as *const u8, X86_64::XOL_SLOT_SIZE - 6)
        };
        assert!(tail.iter().all(|&b| b == FILL));
        area.free(slot);
    }

    #[test]
    fn a_freed_slot_is_handed_out_again_only_for_the_same_address() {
        let area = XolArea::default();
        let (p, q) = (here(), here() + 2);
        let a = area.alloc(p).unwrap();
        let b = area.alloc(q).unwrap();
        assert_ne!(a, b);
        assert_eq!(area.stats().in_use, 2);
        area.free(a);
        assert_eq!((area.stats().in_use, area.stats().parked), (1, 1));
        // Another address never gets the parked slot...
        let c = area.alloc(q + 2).unwrap();
        assert!(c != a && c != b);
        // ...its own address does.
        assert_eq!(area.alloc(p).unwrap(), a);
        let s = area.stats();
        assert_eq!((s.allocs, s.frees, s.in_use, s.parked), (4, 1, 3, 0));
    }

    fn proving() -> QuiesceReport {
        QuiesceReport {
            threads: 3,
            exited: 1,
            ..QuiesceReport::default()
        }
    }

    fn slot_bytes(slot: u64) -> Vec<u8> {
        // SAFETY: the exec view of a live chunk is readable.
        unsafe { std::slice::from_raw_parts(slot as *const u8, X86_64::XOL_SLOT_SIZE) }.to_vec()
    }

    #[test]
    fn a_slot_retired_by_a_proving_wait_is_recycled_for_any_address_and_reset_to_int3() {
        let area = XolArea::default();
        let (p, q) = (here(), here() + 2);
        let a = area.alloc(p).unwrap();
        area.fill(a, &[0x90, 0x90]).unwrap();
        let before = area.stats();
        area.record_wait(&area.retiring(&[a]), &proving());
        area.free(a);
        let s = area.stats();
        assert_eq!((s.recycled, s.parked_frees, s.parked), (1, 0, 0));
        assert_eq!((s.in_use, s.free), (0, before.free + 1));
        assert!(slot_bytes(a).iter().all(|&b| b == FILL));
        // Another address gets it: the area did not grow.
        assert_eq!(area.alloc(q).unwrap(), a);
        assert_eq!(area.stats().free, before.free);
    }

    #[test]
    fn a_wait_that_falls_back_parks_its_slots_for_their_address() {
        for fallback in [
            QuiesceReport {
                blocked: 1,
                ..proving()
            },
            QuiesceReport {
                timed_out: 1,
                ..proving()
            },
            QuiesceReport {
                nested: 1,
                ..proving()
            },
        ] {
            let area = XolArea::default();
            let (p, q) = (here(), here() + 2);
            let a = area.alloc(p).unwrap();
            area.record_wait(&area.retiring(&[a]), &fallback);
            area.free(a);
            let s = area.stats();
            assert_eq!((s.recycled, s.parked_frees, s.parked), (0, 1, 1));
            assert_eq!(s.quiesce_fallbacks, 1, "{fallback:?}");
            assert_ne!(area.alloc(q).unwrap(), a, "{fallback:?}");
            assert_eq!(area.alloc(p).unwrap(), a, "{fallback:?}");
        }
    }

    #[test]
    fn a_proof_covers_only_slots_handed_out_when_it_was_made() {
        let area = XolArea::default();
        let p = here();
        let a = area.alloc(p).unwrap();
        area.free(a); // parked: no wait
        let b = area.alloc(p + 2).unwrap();
        // A proof naming a parked slot and one never handed out changes
        // nothing: they were not retired by it.
        let retired = area.retiring(&[a, b + X86_64::XOL_SLOT_SIZE as u64]);
        assert!(retired.is_empty());
        area.record_wait(&retired, &proving());
        assert_eq!(area.alloc(p).unwrap(), a);
        area.free(a);
        let s = area.stats();
        assert_eq!((s.recycled, s.parked_frees), (0, 2));
    }

    #[test]
    fn a_slot_freed_and_handed_out_again_during_the_wait_is_not_covered_by_it() {
        let area = XolArea::default();
        let p = here();
        let a = area.alloc(p).unwrap();
        let retired = area.retiring(&[a]);
        area.free(a);
        assert_eq!(area.alloc(p).unwrap(), a, "a new allocation of the slot");
        area.record_wait(&retired, &proving());
        area.free(a);
        let s = area.stats();
        assert_eq!((s.recycled, s.parked_frees, s.parked), (0, 2, 1));
    }

    #[test]
    fn several_slots_parked_for_one_address_are_all_kept() {
        let area = XolArea::default();
        let p = here();
        let (a, b) = (area.alloc(p).unwrap(), area.alloc(p).unwrap());
        area.free(a);
        area.free(b);
        assert_eq!(area.stats().parked, 2);
        let mut again = [area.alloc(p).unwrap(), area.alloc(p).unwrap()];
        again.sort_unstable();
        let mut want = [a, b];
        want.sort_unstable();
        assert_eq!(again, want);
    }

    #[test]
    fn filling_a_foreign_address_or_an_oversized_slot_is_refused() {
        let area = XolArea::default();
        let slot = area.alloc(here()).unwrap();
        assert!(area.fill(slot + 1, &[0x90]).is_err());
        assert!(area.fill(here(), &[0x90]).is_err());
        assert!(area.fill(slot, &[0x90; X86_64::XOL_SLOT_SIZE + 1]).is_err());
    }

    #[test]
    fn code_far_from_every_gap_still_gets_a_slot() {
        let area = XolArea::default();
        // An address in the non-canonical hole: nothing can be mapped
        // within reach of it.
        let far = 0x8000_0000_0000_0000;
        let slot = area.alloc(far).unwrap();
        assert!(!XolArea::is_near(slot, X86_64::XOL_SLOT_SIZE as u64, far));
        assert_eq!(area.stats().far_allocs, 1);
    }
}
