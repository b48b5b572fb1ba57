//! The agent's event ring: a fixed array of slots, filled by the probe
//! handlers (many threads, inside the SIGTRAP handler) and drained by the
//! agent's thread. No allocation and no lock on the hit path; a full ring
//! drops the event and counts it.
//!
//! Each slot carries a sequence number (D. Vyukov's bounded queue): slot
//! `i` is free for the event at position `p` (`p % len == i`) when its
//! sequence is `p`, holds that event when it is `p + 1`, and is free again
//! for position `p + len` once read. Producers claim a position with a
//! compare-and-swap on the tail; the one consumer (callers serialize
//! [`Ring::pop`]) follows the head. Every field of a slot is an atomic, so
//! nothing here is `unsafe`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::wire::ARGS;

/// One event: an entry (with its arguments) or a return (with its value
/// in `vals[0]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// A return (else an entry).
    pub ret: bool,
    /// The probe's row.
    pub row: usize,
    /// The thread.
    pub tid: i32,
    /// `CLOCK_MONOTONIC`, ns.
    pub ts: u64,
    /// The arguments, or the return value first.
    pub vals: [u64; ARGS],
}

#[derive(Default)]
struct Slot {
    seq: AtomicUsize,
    /// `row << 1 | ret`.
    what: AtomicU64,
    tid: AtomicU64,
    ts: AtomicU64,
    vals: [AtomicU64; ARGS],
}

/// The ring (see the module docs).
pub struct Ring {
    slots: Box<[Slot]>,
    tail: AtomicUsize,
    head: AtomicUsize,
    dropped: AtomicU64,
}

impl Ring {
    /// A ring of `len` slots (rounded up to a power of two), allocated now.
    pub fn new(len: usize) -> Ring {
        let len = len.max(2).next_power_of_two();
        let slots: Box<[Slot]> = (0..len)
            .map(|i| {
                let s = Slot::default();
                // Relaxed: not shared yet.
                s.seq.store(i, Ordering::Relaxed);
                s
            })
            .collect();
        Ring {
            slots,
            tail: AtomicUsize::new(0),
            head: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// How many events it holds at most.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Adds `e`, or drops it (counted) when the ring is full. No
    /// allocation, no lock, async-signal-safe.
    pub fn push(&self, e: &Event) {
        let mask = self.slots.len() - 1;
        // Relaxed: only a guess, checked against the slot's sequence and
        // claimed by the compare-and-swap below.
        let mut pos = self.tail.load(Ordering::Relaxed);
        loop {
            let slot = &self.slots[pos & mask];
            // Acquire: pairs with the Release in `pop` that freed the slot,
            // so the consumer's reads of its old event come before our
            // writes.
            let seq = slot.seq.load(Ordering::Acquire);
            if seq == pos {
                // Relaxed: the claim orders nothing; the slot's contents
                // are published by the Release store of `seq` below.
                match self.tail.compare_exchange_weak(
                    pos,
                    pos + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // Relaxed (these five): published by the Release
                        // store of `seq` just after.
                        slot.what
                            .store((e.row as u64) << 1 | u64::from(e.ret), Ordering::Relaxed);
                        slot.tid.store(e.tid as u32 as u64, Ordering::Relaxed);
                        slot.ts.store(e.ts, Ordering::Relaxed);
                        for (v, x) in slot.vals.iter().zip(e.vals) {
                            v.store(x, Ordering::Relaxed);
                        }
                        // Release: pairs with the Acquire load in `pop`.
                        slot.seq.store(pos + 1, Ordering::Release);
                        return;
                    }
                    Err(now) => pos = now,
                }
            } else if seq < pos {
                // The slot still holds the event from one lap ago: full.
                // Relaxed: a statistic.
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            } else {
                // Another producer took `pos`: try the tail as it is now.
                // Relaxed: as above, a guess.
                pos = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// The oldest event, if one is complete. Callers serialize `pop`
    /// (one consumer at a time).
    pub fn pop(&self) -> Option<Event> {
        let mask = self.slots.len() - 1;
        // Relaxed: only the (serialized) consumer writes the head.
        let pos = self.head.load(Ordering::Relaxed);
        let slot = &self.slots[pos & mask];
        // Acquire: pairs with the Release store of `seq` in `push`, so the
        // event's fields read below are the ones written before it.
        if slot.seq.load(Ordering::Acquire) != pos + 1 {
            return None;
        }
        // Relaxed (these five): ordered after the Acquire above.
        let what = slot.what.load(Ordering::Relaxed);
        let mut vals = [0u64; ARGS];
        for (x, v) in vals.iter_mut().zip(&slot.vals) {
            *x = v.load(Ordering::Relaxed);
        }
        let e = Event {
            ret: what & 1 == 1,
            row: (what >> 1) as usize,
            // Relaxed (both): ordered after the Acquire load of `seq`.
            tid: slot.tid.load(Ordering::Relaxed) as u32 as i32,
            ts: slot.ts.load(Ordering::Relaxed),
            vals,
        };
        // Release: pairs with the Acquire load of `seq` in `push` (our
        // reads come before the slot is written again).
        slot.seq.store(pos + self.slots.len(), Ordering::Release);
        // Relaxed: only the consumer reads the head.
        self.head.store(pos + 1, Ordering::Relaxed);
        Some(e)
    }

    /// Events dropped so far (the ring was full).
    pub fn dropped(&self) -> u64 {
        // Relaxed: a statistic.
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_in_order_and_a_full_ring_drops_and_counts() {
        let r = Ring::new(4);
        for i in 0..6u64 {
            r.push(&Event {
                row: i as usize,
                ts: i,
                ..Event::default()
            });
        }
        assert_eq!(r.dropped(), 2);
        for i in 0..4u64 {
            assert_eq!(r.pop().map(|e| e.ts), Some(i));
        }
        assert_eq!(r.pop(), None);
        r.push(&Event {
            ret: true,
            row: 9,
            tid: -1,
            ts: 7,
            vals: [1, 2, 3, 4, 5, 6],
        });
        let e = r.pop().unwrap();
        assert!(e.ret);
        assert_eq!((e.row, e.tid, e.ts, e.vals[5]), (9, -1, 7, 6));
    }

    #[test]
    fn four_producers_lose_nothing_in_a_big_enough_ring() {
        let r = std::sync::Arc::new(Ring::new(1 << 14));
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        r.push(&Event {
                            row: t,
                            ts: i,
                            ..Event::default()
                        });
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let mut last = [None::<u64>; 4];
        let mut n = 0;
        while let Some(e) = r.pop() {
            assert!(last[e.row].map_or(true, |l| l < e.ts));
            last[e.row] = Some(e.ts);
            n += 1;
        }
        assert_eq!((n, r.dropped()), (8000, 0));
    }
}
