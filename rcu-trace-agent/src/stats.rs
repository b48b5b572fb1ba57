//! Counting without allocating: per-probe counters, a log-linear latency
//! histogram of atomics, and the table that pairs a uretprobe's entry with
//! its return.
//!
//! # The histogram
//!
//! Values (nanoseconds) below 8 have a bucket each; above, each power of
//! two `[2^e, 2^(e+1))` is cut into 8 equal buckets, so a bucket is at most
//! 12.5% of its values wide: 496 buckets cover every `u64`. Recording is one
//! `fetch_add` on the bucket and one `fetch_max`; percentiles are read from
//! the bucket counts (the bucket's upper end, never above the maximum).
//!
//! # Pairing an entry with its return
//!
//! On x86_64 a function's first instruction runs with the stack pointer at
//! the return address, and the return lands with it 8 bytes higher, so
//! `(address space, stack pointer at entry)` names one call in flight: no
//! two calls in flight in one space share it (each thread has its own
//! stack, and a nested or recursive call is deeper), and it needs no
//! thread id. A tail call (`jmp`) reuses its caller's frame, hence one
//! table per probe. Each table is a fixed array of 8-way buckets: an entry
//! takes a free way of its bucket (or the way that already holds its key:
//! a call whose return never came, `longjmp` or thread exit, left it), a
//! return frees it. A full bucket drops the entry's timestamp (counted in
//! [`Pending::lost`]), never blocks and never allocates.
//!
//! # A probe's counters
//!
//! [`Counters`] is one probe's calls, returns, latencies and calls in
//! flight: what the tracer's recorder keeps per row when it serves hits
//! itself (the ptrace engine), and what the agent keeps per probe inside
//! the target (the in-process engine), whose [`Summary`] the tracer then
//! [`absorb`](Counters::absorb)s into its own rows.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-buckets per power of two (as a shift).
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets: 8 exact ones, then 8 per power of two from 2^3 to 2^63.
pub const BUCKETS: usize = (SUB + (64 - SUB_BITS as u64) * SUB) as usize;

/// The bucket of `v`.
pub fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
    (SUB + (u64::from(e - SUB_BITS)) * SUB + sub) as usize
}

/// The values bucket `i` holds, as `(low, high)` inclusive.
pub fn bucket_range(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, i);
    }
    let e = (i - SUB) / SUB + u64::from(SUB_BITS);
    let sub = (i - SUB) % SUB;
    let shift = e - u64::from(SUB_BITS);
    let low = (SUB + sub) << shift;
    (low, low + ((1u64 << shift) - 1))
}

/// A log-linear histogram of atomics (see the module docs).
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }
}

/// What a histogram holds at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Count per bucket.
    pub counts: Vec<u64>,
    /// The largest value recorded.
    pub max: u64,
}

impl Histogram {
    /// Records `v`. No allocation, no lock.
    pub fn record(&self, v: u64) {
        // Relaxed: a statistic; readers want eventually-right counts and
        // order nothing by them.
        self.buckets[bucket_of(v)].fetch_add(1, Ordering::Relaxed);
        // Relaxed: a statistic, as the count.
        self.max.fetch_max(v, Ordering::Relaxed);
    }

    /// Makes the counts those of `s` (a histogram kept elsewhere, in an
    /// agent, mirrored here). `s.counts` shorter than [`BUCKETS`] leaves
    /// the rest 0.
    pub fn store(&self, s: &Snapshot) {
        for (i, b) in self.buckets.iter().enumerate() {
            // Relaxed: a statistic, read by `snapshot` as any other count.
            b.store(s.counts.get(i).copied().unwrap_or(0), Ordering::Relaxed);
        }
        // Relaxed: a statistic.
        self.max.store(s.max, Ordering::Relaxed);
    }

    /// The count of bucket `i` now (0 past the last).
    pub fn bucket(&self, i: usize) -> u64 {
        // Relaxed: a statistic.
        self.buckets.get(i).map_or(0, |b| b.load(Ordering::Relaxed))
    }

    /// The largest value recorded.
    pub fn max(&self) -> u64 {
        // Relaxed: a statistic.
        self.max.load(Ordering::Relaxed)
    }

    /// The counts now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            // Relaxed: a statistic (a snapshot taken while hits run may
            // be a few values behind, never torn per bucket).
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            // Relaxed: a statistic.
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

impl Snapshot {
    /// Values recorded.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `p`-th percentile (`0.0..=1.0`): the upper end of the bucket
    /// holding that rank, never above the maximum; `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((p * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_range(i).1.min(self.max));
            }
        }
        Some(self.max)
    }

    /// Counts per power of two, from `2^lo` to `2^hi` (`lo <= hi`); the
    /// values below `2^lo` go to the first, above `2^hi` to the last.
    pub fn per_power(&self, lo: u32, hi: u32) -> Vec<u64> {
        let mut out = vec![0u64; (hi - lo + 1) as usize];
        for (i, &c) in self.counts.iter().enumerate() {
            let (low, _) = bucket_range(i);
            let e = if low == 0 {
                0
            } else {
                63 - low.leading_zeros()
            };
            out[(e.clamp(lo, hi) - lo) as usize] += c;
        }
        out
    }
}

/// Ways per bucket of a [`Pending`] table.
const WAYS: usize = 8;

/// One way: the call's key (0: free) and its entry time.
#[derive(Default)]
struct Way {
    key: AtomicU64,
    start: AtomicU64,
}

/// Calls in flight of one uretprobe, keyed by address space and stack
/// pointer (see the module docs).
pub struct Pending {
    ways: Box<[Way]>,
    lost: AtomicU64,
}

/// A call's key: the space and the stack pointer at the function's entry
/// (a user stack pointer is below 2^47 on x86_64; the space goes above).
pub fn call_key(space: u64, entry_sp: u64) -> u64 {
    // Never 0 (a free way): a real stack pointer is not 0.
    (space << 47) ^ entry_sp
}

impl Pending {
    /// A table of `buckets` 8-way buckets (rounded up to a power of two).
    pub fn new(buckets: usize) -> Pending {
        let n = buckets.next_power_of_two() * WAYS;
        Pending {
            ways: (0..n).map(|_| Way::default()).collect(),
            lost: AtomicU64::new(0),
        }
    }

    fn bucket(&self, key: u64) -> &[Way] {
        // Fibonacci hashing: the stack pointers of one thread differ in
        // their low bits, those of threads in their middle bits.
        let nb = self.ways.len() / WAYS;
        let h = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        let b = (h as usize) & (nb - 1);
        &self.ways[b * WAYS..(b + 1) * WAYS]
    }

    /// A call entered at time `now` (ns).
    pub fn enter(&self, key: u64, now: u64) {
        let bucket = self.bucket(key);
        // A stale way with this key first (its call never returned).
        // Relaxed: a key names one call of one thread (its stack pointer),
        // and only that thread (or, under ptrace, the one tracer thread
        // serving its process) writes it, so a match is a value this
        // thread stored itself.
        let way = match bucket.iter().find(|w| w.key.load(Ordering::Relaxed) == key) {
            Some(w) => Some(w),
            // Acquire on success: pairs with the Release that freed the
            // way in `leave`, so its old `start` read happened before our
            // store below. Relaxed on failure: the way is someone else's,
            // nothing of it is read.
            None => bucket.iter().find(|w| {
                w.key
                    .compare_exchange(0, key, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            }),
        };
        match way {
            // Release: pairs with the Acquire load in `leave`.
            Some(w) => w.start.store(now, Ordering::Release),
            // Relaxed: a statistic.
            None => drop(self.lost.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// The call with `key` returned: its entry time, its way freed.
    pub fn leave(&self, key: u64) -> Option<u64> {
        // Relaxed: as in `enter`, the key looked for is one only this
        // thread (or its serving thread) stores.
        let w = self
            .bucket(key)
            .iter()
            .find(|w| w.key.load(Ordering::Relaxed) == key)?;
        // Acquire: pairs with the Release store of `enter`.
        let start = w.start.load(Ordering::Acquire);
        // Release: pairs with the Acquire of the next `enter` that takes
        // the way (our read of `start` comes first).
        w.key.store(0, Ordering::Release);
        Some(start)
    }

    /// Entries whose time was dropped (their bucket was full).
    pub fn lost(&self) -> u64 {
        // Relaxed: a statistic.
        self.lost.load(Ordering::Relaxed)
    }
}

/// One probe's counters (see the module docs).
pub struct Counters {
    calls: AtomicU64,
    returns: AtomicU64,
    /// Returns whose entry time was not found (dropped, or the entry came
    /// before the probe was in place).
    unmatched: AtomicU64,
    /// Entries dropped by a [`Pending`] kept elsewhere (absorbed).
    lost_elsewhere: AtomicU64,
    latency: Option<Histogram>,
    pending: Option<Pending>,
}

/// What [`Counters`] hold at one moment (sent by the agent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Calls seen.
    pub calls: u64,
    /// Returns seen.
    pub returns: u64,
    /// Returns without a timed entry.
    pub unmatched: u64,
    /// Entry times dropped (a full bucket).
    pub lost: u64,
    /// The latencies (uretprobes).
    pub latency: Option<Snapshot>,
}

impl Summary {
    /// `self` plus `o` (counts of two images of one process, before and
    /// after an `exec`).
    pub fn plus(&self, o: &Summary) -> Summary {
        let latency = match (&self.latency, &o.latency) {
            (Some(a), Some(b)) => Some(Snapshot {
                counts: (0..a.counts.len().max(b.counts.len()))
                    .map(|i| a.counts.get(i).unwrap_or(&0) + b.counts.get(i).unwrap_or(&0))
                    .collect(),
                max: a.max.max(b.max),
            }),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        Summary {
            calls: self.calls + o.calls,
            returns: self.returns + o.returns,
            unmatched: self.unmatched + o.unmatched,
            lost: self.lost + o.lost,
            latency,
        }
    }
}

impl Counters {
    /// Counters of an entry probe (`ret` false) or of a uretprobe, whose
    /// calls in flight are paired in a table of `pending_buckets` buckets.
    pub fn new(ret: bool, pending_buckets: usize) -> Counters {
        Counters {
            calls: AtomicU64::new(0),
            returns: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
            lost_elsewhere: AtomicU64::new(0),
            latency: ret.then(Histogram::default),
            pending: ret.then(|| Pending::new(pending_buckets)),
        }
    }

    /// Whether entries are timed (a uretprobe): the caller reads the clock
    /// for [`entry`](Self::entry) only then.
    pub fn timed(&self) -> bool {
        self.pending.is_some()
    }

    /// A call entered in `space` with the stack pointer `sp` at the
    /// function's first instruction, at `now` (ns). No allocation, no lock.
    pub fn entry(&self, space: u64, sp: u64, now: u64) {
        // Relaxed: a statistic.
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &self.pending {
            p.enter(call_key(space, sp), now);
        }
    }

    /// A call returned in `space`, the stack pointer `sp` after the return,
    /// at `now` (ns). No allocation, no lock.
    pub fn ret(&self, space: u64, sp: u64, now: u64) {
        // Relaxed: a statistic.
        self.returns.fetch_add(1, Ordering::Relaxed);
        let started = self
            .pending
            .as_ref()
            .and_then(|p| p.leave(call_key(space, sp.wrapping_sub(8))));
        match (started, &self.latency) {
            (Some(t0), Some(h)) => h.record(now.saturating_sub(t0)),
            // Relaxed: a statistic.
            _ => drop(self.unmatched.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Calls seen.
    pub fn calls(&self) -> u64 {
        // Relaxed: a statistic.
        self.calls.load(Ordering::Relaxed)
    }

    /// Returns seen.
    pub fn returns(&self) -> u64 {
        // Relaxed: a statistic.
        self.returns.load(Ordering::Relaxed)
    }

    /// Returns without a latency: their entry time was dropped or not seen.
    pub fn unmatched(&self) -> u64 {
        // Relaxed: a statistic.
        self.unmatched.load(Ordering::Relaxed)
    }

    /// Entry-to-return times (uretprobes).
    pub fn latency(&self) -> Option<&Histogram> {
        self.latency.as_ref()
    }

    /// Entries whose time was dropped (a full bucket).
    pub fn lost(&self) -> u64 {
        // Relaxed: a statistic.
        self.pending.as_ref().map_or(0, Pending::lost) + self.lost_elsewhere.load(Ordering::Relaxed)
    }

    /// Everything now.
    pub fn summary(&self) -> Summary {
        Summary {
            calls: self.calls(),
            returns: self.returns(),
            unmatched: self.unmatched(),
            lost: self.lost(),
            latency: self.latency.as_ref().map(Histogram::snapshot),
        }
    }

    /// Makes these counters `s` (counters kept elsewhere, mirrored here).
    pub fn absorb(&self, s: &Summary) {
        // Relaxed (all four): statistics, read as any other count.
        self.calls.store(s.calls, Ordering::Relaxed);
        self.returns.store(s.returns, Ordering::Relaxed);
        self.unmatched.store(s.unmatched, Ordering::Relaxed);
        self.lost_elsewhere.store(s.lost, Ordering::Relaxed);
        if let (Some(h), Some(snap)) = (&self.latency, &s.latency) {
            h.store(snap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order_and_within_an_eighth() {
        let mut last = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_range(i);
            assert!(lo <= hi);
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi), i);
            if i > 0 {
                assert_eq!(lo, last + 1, "bucket {i}");
            }
            if lo >= 8 {
                assert!((hi - lo + 1) * 8 <= lo, "bucket {i} [{lo}, {hi}]");
            }
            last = hi;
        }
        assert_eq!(last, u64::MAX);
    }

    #[test]
    fn percentiles_come_from_the_bucket_holding_the_rank() {
        let h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let s = h.snapshot();
        assert_eq!(s.total(), 1000);
        assert_eq!(s.max, 1_000_000);
        for (p, want) in [(0.5, 500_000.0), (0.9, 900_000.0), (0.99, 990_000.0)] {
            let got = s.percentile(p).unwrap() as f64;
            assert!(got >= want && got <= want * 1.125, "p{p}: {got}");
        }
        assert_eq!(s.percentile(1.0), Some(1_000_000));
        assert_eq!(Histogram::default().snapshot().percentile(0.5), None);
    }

    #[test]
    fn entries_pair_with_their_returns_by_space_and_stack_pointer() {
        let p = Pending::new(4);
        let sp = 0x7ffd_0000_1000;
        p.enter(call_key(1, sp), 10);
        p.enter(call_key(2, sp), 20);
        p.enter(call_key(1, sp - 64), 30);
        assert_eq!(p.leave(call_key(1, sp - 64)), Some(30));
        assert_eq!(p.leave(call_key(1, sp)), Some(10));
        assert_eq!(p.leave(call_key(1, sp)), None);
        assert_eq!(p.leave(call_key(2, sp)), Some(20));
        // A call that never returned is replaced by the next at its key.
        p.enter(call_key(3, sp), 1);
        p.enter(call_key(3, sp), 2);
        assert_eq!(p.leave(call_key(3, sp)), Some(2));
        assert_eq!(p.leave(call_key(3, sp)), None);
        assert_eq!(p.lost(), 0);
    }

    #[test]
    fn a_full_bucket_drops_the_entry_and_counts_it() {
        let p = Pending::new(1);
        for i in 0..(WAYS as u64 + 3) {
            p.enter(call_key(1, 0x1000 + 16 * i), i);
        }
        assert_eq!(p.lost(), 3);
        assert_eq!(p.leave(call_key(1, 0x1000)), Some(0));
    }
}
