//! A sequence counter: lets lock-free readers detect that a writer changed
//! the data they were reading.
//!
//! # Protocol
//!
//! The count is even while no change is in progress and odd during one.
//! A writer makes it odd, changes the data, and makes it even again (one
//! higher than before the change). A reader takes a snapshot with
//! [`read_begin`](SeqCount::read_begin), reads, and asks
//! [`read_retry`](SeqCount::read_retry): if the snapshot was odd, or the count
//! moved since, a writer may have overlapped the read and what was read must
//! not be trusted.
//!
//! The counter does not make racy reads safe by itself: the protected data
//! must be read with atomics (as the RCU trees do) or otherwise be tolerant
//! of torn values that are then thrown away.
//!
//! # Orderings
//!
//! This is the standard fence-based seqlock (Boehm, "Can seqlocks get along
//! with programming language memory models?", MSPC 2012):
//!
//! - writer: `count = odd` (relaxed); **release fence**; data stores;
//!   `count = even` (**release** store).
//! - reader: `s = count` (**acquire** load); data loads; **acquire fence**;
//!   `count` again (relaxed); valid iff `s` is even and unchanged.
//!
//! The release store of the even count pairs with the reader's acquire load:
//! a reader that sees the new even value sees every data store of the change
//! it ends. The writer's release fence pairs with the reader's acquire fence:
//! a reader whose data loads saw *any* store of a change is guaranteed to see
//! the odd (or a later) count on its second load, so it retries.
//!
//! # Latch mode
//!
//! [`latch_write`](SeqCount::latch_write) drives the *latch* variant used by
//! [`LatchTree`](super::LatchTree): two copies of the data, the count's low bit
//! says which copy readers should use, and the writer updates the copy that
//! readers have just been told to leave. A reader therefore never has to wait
//! for an even count, which is what makes latch lookups safe in a signal
//! handler that interrupted the writer on the same thread.

use core::fmt;

use crate::sync::atomic::{fence, AtomicUsize, Ordering};

/// A sequence counter (see the [module documentation](self)).
///
/// Writers must be serialized by the caller (the trees use their writer
/// lock); a second concurrent writer is detected and refused with
/// [`WriteInProgress`] rather than silently corrupting the count's parity.
pub struct SeqCount {
    /// Even: stable; odd: a write section is open. `usize` so that wrapping
    /// back to a reader's snapshot needs 2^63 writes during one read.
    seq: AtomicUsize,
}

/// The error of [`SeqCount::try_write`]: another write section is open.
///
/// Write sections must be serialized by the caller; this reports a caller
/// bug. The count is left exactly as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteInProgress;

impl fmt::Display for WriteInProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("another SeqCount write section is already open; serialize writers with a lock")
    }
}

impl std::error::Error for WriteInProgress {}

/// An open write section of a [`SeqCount`]; closing it (drop) makes the
/// count even again and publishes the change to readers.
#[must_use = "the write section closes as soon as the guard is dropped"]
pub struct SeqWriteGuard<'a> {
    count: &'a SeqCount,
    /// The odd value this section stored.
    odd: usize,
}

impl SeqCount {
    /// A counter at zero (even: no write in progress).
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        SeqCount {
            seq: AtomicUsize::new(0),
        }
    }

    /// A counter at zero (even: no write in progress).
    #[cfg(loom)]
    pub fn new() -> Self {
        SeqCount {
            seq: AtomicUsize::new(0),
        }
    }

    /// Takes a snapshot for a read section, without waiting.
    ///
    /// The snapshot may be odd (a writer is active); [`read_retry`] then
    /// always answers `true`. Readers that would rather wait for the writer
    /// use [`read_begin_wait`]; readers that must never wait (because they may
    /// have interrupted the writer on their own thread) use this and give up
    /// or fall back after a few retries.
    ///
    /// [`read_retry`]: SeqCount::read_retry
    /// [`read_begin_wait`]: SeqCount::read_begin_wait
    #[inline(always)]
    pub fn read_begin(&self) -> usize {
        // Acquire pairs with the release store that closed the last write
        // section: data loads after this see every store of that section.
        // Relaxed would let them see data older than the snapshot claims.
        self.seq.load(Ordering::Acquire)
    }

    /// Takes a snapshot for a read section, spinning while a writer is
    /// active, so the returned value is always even.
    ///
    /// Never call this where the caller may have interrupted the writer on
    /// the same thread (a signal handler): it would spin forever.
    #[inline]
    pub fn read_begin_wait(&self) -> usize {
        loop {
            let s = self.read_begin();
            if s & 1 == 0 {
                return s;
            }
            crate::sync::spin_loop();
        }
    }

    /// Whether the read section started at `start` must be discarded: true if
    /// `start` was odd or a write section opened since.
    #[inline(always)]
    pub fn read_retry(&self, start: usize) -> bool {
        // The acquire fence pairs with the writer's release fence after it
        // made the count odd: if any load of the read section saw a store of
        // a later write section, the load below sees that section's odd count
        // (or later). Without the fence the load below could be satisfied
        // before the data loads and miss the change.
        fence(Ordering::Acquire);
        // Relaxed: ordering comes from the fence above.
        start & 1 == 1 || self.seq.load(Ordering::Relaxed) != start
    }

    /// Opens a write section: the count becomes odd until the guard drops.
    ///
    /// # Panics
    ///
    /// If another write section is open (writers were not serialized).
    #[inline]
    pub fn write(&self) -> SeqWriteGuard<'_> {
        match self.try_write() {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        }
    }

    /// Opens a write section, or reports that one is already open (then the
    /// count is untouched).
    #[inline]
    pub fn try_write(&self) -> Result<SeqWriteGuard<'_>, WriteInProgress> {
        // Relaxed: writers are serialized by the caller's lock, whose
        // acquire already orders this load after the previous section.
        let even = self.seq.load(Ordering::Relaxed);
        if even & 1 == 1 {
            return Err(WriteInProgress);
        }
        // A CAS rather than a store so that an overlapping writer cannot slip
        // in between the check and the store undetected. Relaxed: the fence
        // below provides the ordering readers need.
        if self
            .seq
            .compare_exchange(even, even + 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return Err(WriteInProgress);
        }
        // Pairs with the reader's acquire fence in `read_retry`: every data
        // store after this fence is ordered after the odd count, so a reader
        // that observed such a store sees the odd count when it re-checks.
        // A release *store* would not do: it orders earlier stores, not later.
        fence(Ordering::Release);
        Ok(SeqWriteGuard {
            count: self,
            odd: even + 1,
        })
    }

    /// Runs one latch update: `update(0)` while readers are steered to copy
    /// 1, then `update(1)` while they are steered to copy 0.
    ///
    /// Readers pick the copy with [`latch_copy`](SeqCount::latch_copy) and
    /// validate with [`read_retry`](SeqCount::read_retry) *ignoring parity*
    /// (see [`latch_retry`](SeqCount::latch_retry)). Writers must be
    /// serialized by the caller.
    pub fn latch_write(&self, mut update: impl FnMut(usize)) {
        self.latch_bump();
        update(0);
        self.latch_bump();
        update(1);
    }

    /// One latch step: count + 1, published so that readers see all earlier
    /// stores, and ordered before all later stores.
    #[inline]
    fn latch_bump(&self) {
        // Relaxed load: only the (serialized) writer stores the count.
        let s = self.seq.load(Ordering::Relaxed);
        // Release pairs with the reader's acquire load in `read_begin`: a
        // reader steered to a copy by this value sees that copy's completed
        // update. Relaxed would let it read the copy half-updated as "stable".
        self.seq.store(s.wrapping_add(1), Ordering::Release);
        // Pairs with the reader's acquire fence in `latch_retry`: stores to
        // the copy updated next are ordered after the new count, so a reader
        // that saw one of them re-checks and sees the count moved.
        fence(Ordering::Release);
    }

    /// For latch readers: the copy (0 or 1) to read for snapshot `start`.
    #[inline(always)]
    pub fn latch_copy(start: usize) -> usize {
        start & 1
    }

    /// For latch readers: whether the read of copy `latch_copy(start)` must be
    /// discarded because the count moved (parity is *not* a reason: an odd
    /// count just selects copy 1).
    #[inline(always)]
    pub fn latch_retry(&self, start: usize) -> bool {
        // Same pairing as in `read_retry`, with the fence in `latch_bump`.
        fence(Ordering::Acquire);
        self.seq.load(Ordering::Relaxed) != start
    }
}

impl Default for SeqCount {
    fn default() -> Self {
        SeqCount::new()
    }
}

impl fmt::Debug for SeqCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeqCount")
            .field("seq", &self.seq.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for SeqWriteGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release pairs with the acquire load in `read_begin`: a reader whose
        // snapshot is this even value sees every store of the section.
        self.count.seq.store(self.odd + 1, Ordering::Release);
    }
}

impl fmt::Debug for SeqWriteGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeqWriteGuard")
            .field("odd", &self.odd)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn snapshot_taken_before_a_write_must_retry_and_one_after_need_not() {
        let c = SeqCount::new();
        let before = c.read_begin();
        assert!(!c.read_retry(before));
        {
            let _w = c.write();
            let during = c.read_begin();
            assert_eq!(during & 1, 1, "count is odd inside a write section");
            assert!(c.read_retry(during), "an odd snapshot is never valid");
        }
        assert!(c.read_retry(before));
        let after = c.read_begin_wait();
        assert!(!c.read_retry(after));
    }

    #[test]
    fn overlapping_writer_is_refused_and_count_is_unchanged() {
        let c = SeqCount::new();
        let w = c.write();
        let seen = c.read_begin();
        assert_eq!(c.try_write().err(), Some(WriteInProgress));
        assert_eq!(
            c.read_begin(),
            seen,
            "refused writer left the count as it was"
        );
        drop(w);
        assert!(c.try_write().is_ok());
    }

    #[test]
    fn latch_steers_readers_away_from_the_copy_being_written() {
        let c = SeqCount::new();
        let mut seen = Vec::new();
        c.latch_write(|copy| {
            let s = c.read_begin();
            seen.push((copy, SeqCount::latch_copy(s)));
        });
        assert_eq!(seen, vec![(0, 1), (1, 0)]);
        assert_eq!(c.read_begin() & 1, 0);
    }
}
