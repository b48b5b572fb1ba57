//! [`AckTable`]: the shared state of a quiescence round and its ack
//! protocol. It lives in the probes core, below the live runtime whose
//! `quiesce` wait uses one in a static, so that loom builds it and its model
//! (`loom-tests/tests/quiesce.rs`) can build a fresh table per execution.
//!
//! Invariant: a handler acks with a CAS that expects the pending value of the
//! generation it read, so after [`AckTable::publish`] returns generation `g`
//! every entry holds a value tagged `g`, written by the waiter or by a handler
//! that read `g` and its ranges: an *outside* ack is a proof for this round.
//! (`AckTable::ack_with_plain_store`, built only under loom, shows a plain
//! store failing.)
//!
//! Rounds, generations and the poll, in full:
//! [`crate::docs::algorithms::quiescence`].

use std::ops::Range;

use crate::sync::atomic::{fence, AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// Ack states, in the low two bits of an entry (the generation is above).
const PENDING: u64 = 0;
const OUTSIDE: u64 = 1;
const INSIDE: u64 = 2;
const OUTSIDE_NESTED: u64 = 3;
const STATE_BITS: u32 = 2;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;

/// What a thread's entry says, for the round being polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    /// No answer yet.
    Pending,
    /// Seen with its IP outside the ranges.
    Outside,
    /// Seen outside the ranges, but interrupted with a non-empty signal
    /// mask: it may be running another signal's handler, whose interrupted
    /// IP (not inspected) could be inside them.
    OutsideNested,
    /// Seen with its IP inside the ranges.
    Inside,
}

/// A published round (its generation), as returned by
/// [`AckTable::publish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Round(u64);

/// The ranges and per-thread ack entries of one quiescence round at a time:
/// at most `THREADS` entries and `RANGES` ranges (see the module docs of
/// `probes/quiesce_ack.rs`).
pub struct AckTable<const THREADS: usize, const RANGES: usize> {
    /// Even when stable, odd while the waiter rewrites the table.
    generation: AtomicU64,
    range_count: AtomicUsize,
    /// `[lo, hi)` of each range.
    lo: [AtomicU64; RANGES],
    hi: [AtomicU64; RANGES],
    entry_count: AtomicUsize,
    tids: [AtomicI32; THREADS],
    /// `generation << 2 | state`.
    acks: [AtomicU64; THREADS],
}

/// How a handler writes its verdict: the protocol's CAS, or (loom only)
/// the broken plain store the model must catch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Write {
    Checked,
    #[cfg(loom)]
    PlainStore,
}

impl<const THREADS: usize, const RANGES: usize> AckTable<THREADS, RANGES> {
    /// An empty table: generation 0, no ranges, no entries.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        AckTable {
            generation: AtomicU64::new(0),
            range_count: AtomicUsize::new(0),
            lo: [const { AtomicU64::new(0) }; RANGES],
            hi: [const { AtomicU64::new(0) }; RANGES],
            entry_count: AtomicUsize::new(0),
            tids: [const { AtomicI32::new(0) }; THREADS],
            acks: [const { AtomicU64::new(0) }; THREADS],
        }
    }

    /// An empty table: generation 0, no ranges, no entries.
    #[cfg(loom)]
    pub fn new() -> Self {
        AckTable {
            generation: AtomicU64::new(0),
            range_count: AtomicUsize::new(0),
            lo: std::array::from_fn(|_| AtomicU64::new(0)),
            hi: std::array::from_fn(|_| AtomicU64::new(0)),
            entry_count: AtomicUsize::new(0),
            tids: std::array::from_fn(|_| AtomicI32::new(0)),
            acks: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Starts a new round over `ranges` with one pending entry per thread
    /// of `tids` (entry `i` is `tids[i]`). Waiter side: **one caller at a
    /// time** (the live wait holds its mutex), and a round is polled only
    /// until the next one is published.
    ///
    /// # Panics
    /// If there are more than `RANGES` ranges or `THREADS` threads.
    pub fn publish(&self, ranges: &[Range<u64>], tids: &[i32]) -> Round {
        assert!(ranges.len() <= RANGES && tids.len() <= THREADS);
        // Relaxed: only publishers store it, and they are serialized.
        let old = self.generation.load(Ordering::Relaxed);
        let gen = old + 2;
        // Odd while rewriting, so that a handler can skip a table it would
        // read torn. SeqCst (store and fence): no rewrite below may become
        // visible before the odd value. This is an optimization only: a
        // handler that still acts on a torn read writes nothing that
        // survives the entry resets below (module docs).
        self.generation.store(old + 1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // Relaxed (all below): published by the Release store of `gen`.
        self.range_count.store(ranges.len(), Ordering::Relaxed);
        for (i, r) in ranges.iter().enumerate() {
            self.lo[i].store(r.start, Ordering::Relaxed);
            self.hi[i].store(r.end, Ordering::Relaxed);
        }
        self.entry_count.store(tids.len(), Ordering::Relaxed);
        for (i, &tid) in tids.iter().enumerate() {
            // The reset that makes every older generation's expected value
            // fail from here on (module docs).
            self.acks[i].store(gen << STATE_BITS | PENDING, Ordering::Relaxed);
            self.tids[i].store(tid, Ordering::Relaxed);
        }
        // Release pairs with the handler's Acquire load of the generation:
        // a handler that reads `gen` sees all of the above.
        self.generation.store(gen, Ordering::Release);
        Round(gen)
    }

    /// Signal-handler side: records that thread `tid` was interrupted at
    /// `ip`, `nested` if its interrupted signal mask was not empty (it may
    /// be inside another handler), for the generation current at the call.
    /// Async-signal-safe: atomics only. Returns whether the verdict was
    /// recorded (false: no round, `tid` not in it, the table being
    /// rewritten, or the entry already answered or from another round).
    pub fn ack(&self, tid: i32, ip: u64, nested: bool) -> bool {
        self.ack_as(tid, ip, nested, Write::Checked)
    }

    /// The broken variant the loom model must catch: the verdict is
    /// *stored* (tagged with the generation the handler read) instead of
    /// CASed onto this generation's pending value, so a late handler of an
    /// older round can overwrite the new round's entry.
    #[cfg(loom)]
    pub fn ack_with_plain_store(&self, tid: i32, ip: u64, nested: bool) -> bool {
        self.ack_as(tid, ip, nested, Write::PlainStore)
    }

    #[inline]
    fn ack_as(&self, tid: i32, ip: u64, nested: bool, how: Write) -> bool {
        // Acquire pairs with the Release store of the stable generation in
        // `publish`: that round's ranges and entries are visible. Relaxed
        // would let us pair an old generation with its ranges unseen.
        let gen = self.generation.load(Ordering::Acquire);
        if gen & 1 != 0 || gen == 0 {
            return false; // being rewritten (signalled again after), or no round yet
        }
        // Relaxed (all loads below): ordered after the Acquire above; a
        // value from a newer, concurrent publish only makes the CAS fail or
        // be overwritten by that publish's reset.
        let ranges = self.range_count.load(Ordering::Relaxed).min(RANGES);
        let inside = (0..ranges).any(|i| {
            let lo = self.lo[i].load(Ordering::Relaxed);
            let hi = self.hi[i].load(Ordering::Relaxed);
            (lo..hi).contains(&ip)
        });
        let state = match (inside, nested) {
            (true, _) => INSIDE,
            (false, false) => OUTSIDE,
            (false, true) => OUTSIDE_NESTED,
        };
        let n = self.entry_count.load(Ordering::Relaxed).min(THREADS);
        let Some(i) = (0..n).find(|&i| self.tids[i].load(Ordering::Relaxed) == tid) else {
            return false;
        };
        match how {
            // Release pairs with the waiter's Acquire poll: the verdict is
            // not seen before the reads it rests on. Expecting *this*
            // generation's PENDING is the protocol (module docs).
            Write::Checked => self.acks[i]
                .compare_exchange(
                    gen << STATE_BITS | PENDING,
                    gen << STATE_BITS | state,
                    Ordering::Release,
                    Ordering::Relaxed,
                )
                .is_ok(),
            #[cfg(loom)]
            Write::PlainStore => {
                self.acks[i].store(gen << STATE_BITS | state, Ordering::Release);
                true
            }
        }
    }

    /// Waiter side: what entry `i` of `round` says now.
    pub fn poll(&self, round: Round, i: usize) -> Ack {
        // Acquire pairs with the handler's Release CAS. The generation bits
        // are not what the verdict rests on: after `publish`, the CAS
        // guarantees every value is this round's (module docs), which the
        // loom model checks by mutating the CAS (so the check below is left
        // out of model builds, where it would hide the mutation).
        let v = self.acks[i].load(Ordering::Acquire);
        #[cfg(not(loom))]
        debug_assert_eq!(v >> STATE_BITS, round.0, "an ack from another round");
        #[cfg(loom)]
        let _ = round;
        match v & STATE_MASK {
            PENDING => Ack::Pending,
            OUTSIDE => Ack::Outside,
            INSIDE => Ack::Inside,
            _ => Ack::OutsideNested,
        }
    }

    /// Waiter side: sets entry `i`, seen [`Ack::Inside`], back to pending
    /// for `round`, before the thread is signalled again.
    pub fn rearm(&self, round: Round, i: usize) {
        // A store: a handler never overwrites an answered entry (its CAS
        // expects pending), so nothing else can be lost here. Relaxed: the
        // signal sent afterwards is what the handler answers, and its
        // delivery (a system call on our side, the handler's entry on the
        // other) orders the two.
        self.acks[i].store(round.0 << STATE_BITS | PENDING, Ordering::Relaxed);
    }
}

impl<const THREADS: usize, const RANGES: usize> Default for AckTable<THREADS, RANGES> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Range<u64> = 100..200;

    #[test]
    fn before_any_round_and_for_threads_not_in_it_acks_are_ignored() {
        let t = AckTable::<2, 1>::new();
        assert!(!t.ack(5, 0, false), "no round yet");
        let round = t.publish(&[R], &[5]);
        assert!(!t.ack(6, 0, false), "not in the round");
        assert_eq!(t.poll(round, 0), Ack::Pending);
    }

    #[test]
    fn each_thread_answers_once_per_round_with_its_side_of_the_ranges() {
        let t = AckTable::<3, 1>::new();
        let round = t.publish(&[R], &[1, 2, 3]);
        assert!(t.ack(1, 150, false));
        assert!(t.ack(2, 50, false));
        assert!(t.ack(3, 50, true));
        assert_eq!(
            [t.poll(round, 0), t.poll(round, 1), t.poll(round, 2)],
            [Ack::Inside, Ack::Outside, Ack::OutsideNested]
        );
        // A second answer in the same round changes nothing.
        assert!(!t.ack(2, 150, false));
        assert_eq!(t.poll(round, 1), Ack::Outside);
    }

    #[test]
    fn a_rearmed_entry_takes_the_next_answer() {
        let t = AckTable::<1, 1>::new();
        let round = t.publish(&[R], &[1]);
        assert!(t.ack(1, 150, false));
        t.rearm(round, 0);
        assert_eq!(t.poll(round, 0), Ack::Pending);
        assert!(t.ack(1, 250, false));
        assert_eq!(t.poll(round, 0), Ack::Outside);
    }

    #[test]
    fn a_new_round_starts_every_entry_pending_under_its_own_ranges() {
        let t = AckTable::<2, 2>::new();
        let first = t.publish(&[R], &[1, 2]);
        assert!(t.ack(1, 50, false));
        let second = t.publish(&[0..10, 40..60], &[2, 1]);
        assert_ne!(first, second);
        assert_eq!([t.poll(second, 0), t.poll(second, 1)], [Ack::Pending; 2]);
        assert!(t.ack(1, 50, false));
        assert_eq!(t.poll(second, 1), Ack::Inside, "checked against 40..60");
    }
}
