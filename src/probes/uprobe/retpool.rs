//! Preallocated uretprobe return stacks: one pool per address space, whose
//! stacks threads claim and give back without a lock or an allocation.
//!
//! A stack's state word is `FREE`, `BUSY` or `DEAD`: claimed with one CAS
//! (`Acquire`) at a thread's outermost tracked call in the space, given back
//! with a `Release` store when it is empty again. A pool lives until its
//! registry is dropped and is freed by whoever brings its `remaining` count to
//! zero; hit paths give back with a plain store, the exit and flush path with
//! a CAS.
//!
//! Should a way to forget one space be added, its pool would be torn down with
//! the registry alive, and two things here would have to change: a binding is
//! found by registry id and *space id* (`bindings.rs`), so a binding into a
//! torn-down pool would have to be skipped (its stack `DEAD`) when a new space
//! reuses the id; and the return path, which pops outside any read section,
//! would have to pop inside one (so the teardown, after a grace period, never
//! overlaps it) or give back with a compare-and-swap.
//!
//! Why a pool ([`default_return_stacks`]), claiming, teardown and limits, in
//! full: [`crate::docs::algorithms::uretprobes`].

use std::ptr::NonNull;

use crossbeam_utils::CachePadded;

use super::returns::ReturnInstance;
use crate::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use crate::sync::UnsafeCell;

/// The fewest stacks [`default_return_stacks`] gives a space: on a small
/// machine, threads blocked inside tracked calls (a probed `read`, say)
/// would otherwise exhaust the pool at a handful of threads.
pub const MIN_RETURN_STACKS: usize = 8;

/// The default number of return stacks per space: `max(8, 2 x CPUs)`.
pub fn default_return_stacks() -> usize {
    // `std`'s `OnceLock` even under loom: a process-wide constant, computed
    // once (reading the CPU count may take system calls), part of no model.
    static STACKS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *STACKS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (2 * cpus).max(MIN_RETURN_STACKS)
    })
}

/// Claimable.
const FREE: u8 = 0;
/// Held by one thread.
const BUSY: u8 = 1;
/// The pool's owner is gone (teardown ran); never claimed again.
const DEAD: u8 = 2;

/// One stack of return instances.
struct PoolStack {
    state: AtomicU8,
    /// Capacity: the pool's depth, allocated with the pool; pushes never
    /// allocate. Touched only by the thread that holds the stack.
    frames: UnsafeCell<Vec<ReturnInstance>>,
}

struct PoolInner {
    depth: usize,
    /// Padded: two threads holding neighbouring stacks never share a line.
    stacks: Box<[CachePadded<PoolStack>]>,
    /// Teardown's count of stacks still held, minus the give-backs that
    /// found them `DEAD` (module docs, "Teardown"). Wraps.
    remaining: AtomicUsize,
    /// Set when the pool is freed (tests of the teardown).
    #[cfg(test)]
    freed: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// A space's pool of return stacks, owned by the space's state in the
/// registry. Dropping it tears the pool down (module docs).
pub(crate) struct ReturnPool(NonNull<PoolInner>);

// SAFETY: the pool is shared through atomics; a stack's frames are touched
// only by the one thread whose claim succeeded (ownership passes through the
// state word's Acquire/Release pairs).
unsafe impl Send for ReturnPool {}
// SAFETY: as above.
unsafe impl Sync for ReturnPool {}

impl ReturnPool {
    /// `stacks` stacks of `depth` frames each, all allocated now (writer
    /// path). `stacks` and `depth` are at least 1.
    #[cold]
    pub(super) fn new(stacks: usize, depth: usize) -> Self {
        debug_assert!(stacks > 0 && depth > 0);
        super::bindings::prepare_exit_hook();
        let stacks = (0..stacks)
            .map(|_| {
                CachePadded::new(PoolStack {
                    state: AtomicU8::new(FREE),
                    frames: UnsafeCell::new(Vec::with_capacity(depth)),
                })
            })
            .collect();
        let inner = Box::new(PoolInner {
            depth,
            stacks,
            remaining: AtomicUsize::new(0),
            #[cfg(test)]
            freed: None,
        });
        ReturnPool(NonNull::from(Box::leak(inner)))
    }

    fn inner(&self) -> &PoolInner {
        // SAFETY: the owner's handle keeps the pool alive (teardown runs in
        // its drop, after every use through it).
        unsafe { self.0.as_ref() }
    }

    /// Claims a free stack, scanning from `start`; `None` if every stack is
    /// held. The caller holds the returned stack until it gives it back.
    #[inline]
    pub(super) fn claim(&self, start: usize) -> Option<Held> {
        let stacks = &self.inner().stacks;
        let n = stacks.len();
        let mut i = start % n;
        for _ in 0..n {
            let s = &stacks[i];
            // Relaxed: only skips held stacks cheaply; the CAS decides.
            if s.state.load(Ordering::Relaxed) == FREE
                // Acquire pairs with the Release of the previous holder's
                // give-back (`release` or `release_anywhere`): its frame
                // accesses happen before ours (Relaxed would let two
                // holders' accesses race). Relaxed on failure: nothing is
                // touched then.
                && s
                    .state
                    .compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(Held {
                    pool: self.0,
                    index: i,
                });
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
        None
    }

    /// Stacks currently held (diagnostics and tests).
    pub(super) fn held(&self) -> usize {
        self.inner()
            .stacks
            .iter()
            // Relaxed: a snapshot for diagnostics, nothing is read through it.
            .filter(|s| s.state.load(Ordering::Relaxed) == BUSY)
            .count()
    }

    /// Makes the pool report its freeing through `flag`.
    #[cfg(test)]
    pub(super) fn notify_freed(&mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        // SAFETY: `&mut self`: no thread holds a stack of a pool whose
        // owner is being configured (tests call this right after `new`).
        unsafe { self.0.as_mut().freed = Some(flag) };
    }
}

impl Drop for ReturnPool {
    fn drop(&mut self) {
        let held = self.mark_dead();
        // SAFETY: the handle is being dropped: after this nothing reaches
        // the pool through it.
        unsafe { count_held(self.0, held) };
    }
}

impl ReturnPool {
    /// Teardown, first half: every stack becomes `DEAD`; returns how many
    /// were held.
    fn mark_dead(&self) -> usize {
        let mut held = 0usize;
        for s in self.inner().stacks.iter() {
            // AcqRel: Acquire pairs with the Release of the last give-back
            // of the stack (its holder's frame accesses happen before a
            // free here); Release pairs with the Acquire of a late
            // give-back that finds `DEAD`.
            if s.state.swap(DEAD, Ordering::AcqRel) == BUSY {
                held += 1;
            }
        }
        held
    }
}

/// Teardown, second half: adds the `held` stacks to the pool's count and
/// frees the pool if none is held any more.
///
/// # Safety
/// `mark_dead` ran on the pool, and the caller's handle is not used again.
unsafe fn count_held(pool: NonNull<PoolInner>, held: usize) {
    // SAFETY: the pool is alive: the caller's handle has not given up its
    // share yet (the add below does).
    let inner = unsafe { pool.as_ref() };
    // AcqRel pairs with the late give-backs' `fetch_sub`: whoever brings
    // the count to zero frees after every other holder's last access.
    let before = inner.remaining.fetch_add(held, Ordering::AcqRel);
    if before.wrapping_add(held) == 0 {
        // SAFETY: no stack is held any more and the handle is done.
        unsafe { free(pool) };
    }
}

/// Frees the pool.
///
/// # Safety
/// Nothing reaches `pool` any more: its owner's handle is gone or going and
/// no thread holds one of its stacks.
#[cold]
unsafe fn free(pool: NonNull<PoolInner>) {
    // SAFETY: allocated by `Box` in `ReturnPool::new`, freed once (caller's
    // contract).
    let inner = unsafe { Box::from_raw(pool.as_ptr()) };
    #[cfg(test)]
    if let Some(f) = &inner.freed {
        f.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    drop(inner);
}

/// A stack one thread holds: its pool and index. Plain data, kept in the
/// thread's binding table; the pool stays allocated while it is held.
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    pool: NonNull<PoolInner>,
    index: usize,
}

impl Held {
    /// The stack's index in its pool.
    pub(super) fn index(&self) -> usize {
        self.index
    }

    fn stack(&self) -> &PoolStack {
        // SAFETY: a held stack keeps its pool allocated (teardown counts it
        // and frees only after its give-back); callers hold it.
        unsafe { &self.pool.as_ref().stacks[self.index] }
    }

    /// Frames per stack of its pool.
    pub(super) fn depth(&self) -> usize {
        // SAFETY: as in `stack`.
        unsafe { self.pool.as_ref().depth }
    }

    /// Runs `f` on the stack's frames.
    ///
    /// # Safety
    /// The calling thread holds the stack (claimed, not given back), and
    /// `f` does not reach the stack again.
    #[inline]
    pub(super) unsafe fn with_frames<R>(&self, f: impl FnOnce(&mut Vec<ReturnInstance>) -> R) -> R {
        // SAFETY: only the holder touches the frames (caller's contract),
        // and `f` cannot reach them a second time.
        self.stack().frames.with_mut(|p| f(unsafe { &mut *p }))
    }

    /// Gives the (empty) stack back from a hit path.
    ///
    /// # Safety
    /// The calling thread holds the stack and drops every copy of this
    /// `Held`; the registry owning the pool is alive (so teardown is not
    /// running and has not run).
    #[inline]
    pub(super) unsafe fn release(self) {
        let s = self.stack();
        // SAFETY: we hold it (caller's contract).
        s.frames.with_mut(|p| unsafe { (*p).clear() });
        debug_assert_eq!(s.state.load(Ordering::Relaxed), BUSY);
        // Release pairs with the Acquire of the next claim's CAS: our frame
        // accesses happen before the next holder's.
        s.state.store(FREE, Ordering::Release);
    }

    /// Gives the stack back from anywhere (thread exit, flush), dropping
    /// its instances; frees the pool if its owner is gone and this was the
    /// last stack held. Returns how many instances were dropped.
    ///
    /// # Safety
    /// The calling thread holds the stack and drops every copy of this
    /// `Held`.
    #[cold]
    pub(super) unsafe fn release_anywhere(self) -> usize {
        let s = self.stack();
        // SAFETY: we hold it (caller's contract).
        let dropped = s.frames.with_mut(|p| unsafe {
            let n = (*p).len();
            (*p).clear();
            n
        });
        // Release (success) pairs with the next claim's Acquire, as in
        // `release`. Acquire (failure: `DEAD`) pairs with the teardown's
        // swap, so the count below sees its add or wraps (module docs).
        match s
            .state
            .compare_exchange(BUSY, FREE, Ordering::Release, Ordering::Acquire)
        {
            Ok(_) => {}
            Err(found) => {
                debug_assert_eq!(found, DEAD, "a held stack is BUSY or torn down");
                // SAFETY: as in `stack`: our hold is still counted.
                let inner = unsafe { self.pool.as_ref() };
                // AcqRel pairs with the teardown's add and the other late
                // give-backs: the last one frees after every access.
                if inner.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    // SAFETY: the owner is gone (DEAD) and this was the last
                    // hold; `inner` is not used after this.
                    unsafe { free(self.pool) };
                }
            }
        }
        dropped
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::probes::uprobe::space::{FileId, UprobeKey};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn frame(sp: u64) -> ReturnInstance {
        ReturnInstance {
            key: UprobeKey {
                file: FileId { dev: 1, inode: 1 },
                offset: 0,
            },
            func: 0,
            ret_sp: sp,
            real_ret: 0x1234,
            last_seq: 0,
        }
    }

    fn watched(stacks: usize) -> (ReturnPool, Arc<AtomicBool>) {
        let mut p = ReturnPool::new(stacks, 4);
        let f = Arc::new(AtomicBool::new(false));
        p.notify_freed(f.clone());
        (p, f)
    }

    #[test]
    fn each_stack_is_claimed_once_until_given_back() {
        let (p, _) = watched(2);
        let a = p.claim(0).unwrap();
        let b = p.claim(0).unwrap();
        assert_ne!(a.index, b.index);
        assert!(p.claim(1).is_none(), "both held: exhausted");
        // SAFETY: held by this thread, not used again.
        unsafe { a.release() };
        assert_eq!(p.claim(1).unwrap().index, a.index);
        assert_eq!(p.held(), 2);
    }

    #[test]
    fn a_pool_with_no_stack_held_is_freed_at_teardown() {
        let (p, freed) = watched(3);
        let a = p.claim(0).unwrap();
        // SAFETY: held, owner alive.
        unsafe { a.release() };
        drop(p);
        assert!(freed.load(Ordering::SeqCst));
    }

    #[test]
    fn a_pool_torn_down_while_held_is_freed_by_the_last_give_back() {
        let (p, freed) = watched(3);
        let a = p.claim(0).unwrap();
        let b = p.claim(0).unwrap();
        // SAFETY: held by this thread.
        unsafe { a.with_frames(|f| f.push(frame(8))) };
        drop(p);
        assert!(!freed.load(Ordering::SeqCst), "two stacks still held");
        // SAFETY: held; not used again.
        assert_eq!(unsafe { a.release_anywhere() }, 1);
        assert!(!freed.load(Ordering::SeqCst), "one stack still held");
        // SAFETY: as above.
        assert_eq!(unsafe { b.release_anywhere() }, 0);
        assert!(freed.load(Ordering::SeqCst), "the last give-back frees");
    }

    #[test]
    fn a_give_back_between_the_teardown_halves_is_not_lost() {
        // The give-back sees DEAD before the teardown adds its count: the
        // counter wraps below zero and the add brings it back, freeing.
        let (p, freed) = watched(2);
        let a = p.claim(0).unwrap();
        let held = p.mark_dead();
        assert_eq!(held, 1);
        // SAFETY: held by this thread; not used again.
        assert_eq!(unsafe { a.release_anywhere() }, 0);
        assert!(!freed.load(Ordering::SeqCst), "the teardown still counts");
        let pool = p.0;
        std::mem::forget(p);
        // SAFETY: `mark_dead` ran; the handle is forgotten.
        unsafe { count_held(pool, held) };
        assert!(freed.load(Ordering::SeqCst), "the add brought it to zero");
    }

    #[test]
    fn threads_exhausting_a_pool_each_hold_a_distinct_stack() {
        let (p, _) = watched(4);
        let p = Arc::new(p);
        let got: Vec<Option<usize>> = (0..6)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || p.claim(t).map(|h| h.index))
            })
            .map(|h| h.join().unwrap())
            .collect();
        let mut won: Vec<usize> = got.iter().flatten().copied().collect();
        won.sort();
        assert_eq!(won, vec![0, 1, 2, 3], "four stacks, each to one thread");
    }
}
