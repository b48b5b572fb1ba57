//! A lock-free latency histogram a return handler can fill from a signal
//! handler or the kretprobe trampoline.
//!
//! # Buckets
//!
//! Log-linear, as HdrHistogram does it with two bits of precision: every
//! power of two is split into four buckets, so a bucket is at most 25% wide
//! and percentiles read from bucket bounds are within 25% of the truth.
//! Values below 4 ns get a bucket each; values past 2^40 ns (18 minutes)
//! share the last one.
//!
//! # Recording
//!
//! One relaxed `fetch_add` on the bucket and one relaxed `fetch_max` on the
//! maximum: no allocation, no lock, nothing a trap-time handler must avoid.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-buckets per power of two (two bits of precision).
const SUB_BITS: u32 = 2;
const SUB: u64 = 1 << SUB_BITS;
/// Powers of two covered: up to 2^40 ns.
const OCTAVES: usize = 40;
const BUCKETS: usize = OCTAVES * SUB as usize;

fn index(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let msb = 63 - ns.leading_zeros();
    let sub = (ns >> (msb - SUB_BITS)) & (SUB - 1);
    let i = (msb - SUB_BITS + 1) as usize * SUB as usize + sub as usize;
    i.min(BUCKETS - 1)
}

/// The largest value bucket `i` holds.
fn upper_bound(i: usize) -> u64 {
    if i < SUB as usize {
        return i as u64;
    }
    let msb = (i / SUB as usize) as u32 + SUB_BITS - 1;
    let sub = (i % SUB as usize) as u64;
    ((SUB + sub + 1) << (msb - SUB_BITS)) - 1
}

/// Return latencies of one probed function, in nanoseconds.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }

    /// Records one latency.
    pub fn record(&self, ns: u64) {
        // Relaxed: statistics; readers take snapshots and the final one is
        // ordered by the commit that ends all handlers.
        self.buckets[index(ns)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(ns, Ordering::Relaxed);
    }

    /// A copy of the counts.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            // Relaxed: see `record`.
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

/// The counts of a [`Histogram`] at one moment.
pub struct Snapshot {
    counts: Vec<u64>,
    max: u64,
}

/// Octaves the sparkline shows: 2^FIRST_OCTAVE ns up to 2^(FIRST + COLS) ns,
/// 128 ns to 0.5 ms: a probed call returns through the trampoline a few
/// hundred nanoseconds after its entry handler at best, and anything past
/// half a millisecond is a preempted thread (it goes in the last column).
const FIRST_OCTAVE: u32 = 7;
/// Characters of the sparkline.
pub const SPARK_COLS: usize = 12;
/// What the sparkline's columns span, for headers.
pub const SPARK_LABEL: &str = "128ns..0.5ms";
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

impl Snapshot {
    /// Values recorded.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The largest value recorded.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The upper bound of the bucket holding the `q`-quantile (`0 < q <= 1`),
    /// never above the maximum; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper_bound(i).min(self.max));
            }
        }
        Some(self.max)
    }

    /// One character per power of two from 128 ns to 0.5 ms (values outside
    /// fall in the end columns), its height proportional to the count; a
    /// `·` for none.
    pub fn sparkline(&self) -> String {
        let mut cols = [0u64; SPARK_COLS];
        for (i, &c) in self.counts.iter().enumerate() {
            let octave = 63 - upper_bound(i).max(1).leading_zeros();
            let col = octave.saturating_sub(FIRST_OCTAVE) as usize;
            cols[col.min(SPARK_COLS - 1)] += c;
        }
        let top = cols.iter().copied().max().unwrap_or(0).max(1);
        cols.iter()
            .map(|&c| {
                if c == 0 {
                    '·'
                } else {
                    BARS[((c * 8 - 1) / top) as usize]
                }
            })
            .collect()
    }
}

/// `ns` for humans: `840ns`, `12.3µs`, `4.56ms`, `1.20s`.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns}ns"),
        1_000..=999_999 => format!("{:.1}µs", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}
