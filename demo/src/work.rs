//! The built-in workload the probe phase attaches to.
//!
//! # The probed functions
//!
//! Four small functions doing real work, each `#[inline(never)]` with a body
//! of its own (so the compiler neither inlines them into their callers nor
//! merges two identical bodies into one symbol) and called with
//! `black_box`ed arguments (so no call is constant-folded or specialized
//! away). Their symbols keep their names in release builds: the demo finds
//! them as `demo::work::parse` and so on in the executable's own symbol
//! table.
//!
//! - [`parse`]: a decimal number from bytes (checked against the number the
//!   caller formatted);
//! - [`checksum`]: Adler-32 of a buffer of 64 to 4096 bytes (checked against
//!   a table computed before any probe went in);
//! - [`sort`]: an insertion sort of 8 to 96 numbers (checked sorted, same
//!   sum);
//! - [`lookup`]: a binary search in a routing table published through an
//!   [`RcuCell`] that another thread keeps replacing with fresh copies, so
//!   probes and RCU grace periods run together (checked against the key's
//!   known value).
//!
//! # Counting calls exactly
//!
//! Each worker thread counts its own calls per function in plain locals and
//! publishes them with a relaxed store into its own cache line after every
//! call: the live table sums them while the threads run, and once the
//! threads are joined the sums are exact. The probe phase compares these
//! sums with the probes' hit counters.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_utils::CachePadded;
use rcu_registry::rcu::{Rcu, RcuCell};

/// The probed functions, by short name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Func {
    /// [`parse`].
    Parse,
    /// [`checksum`].
    Checksum,
    /// [`sort`].
    Sort,
    /// [`lookup`].
    Lookup,
}

/// Number of workload functions.
pub const FUNCS: usize = 4;

impl Func {
    /// Every function, in table order.
    pub const ALL: [Func; FUNCS] = [Func::Parse, Func::Checksum, Func::Sort, Func::Lookup];

    /// The short name used by `--targets`.
    pub fn short(self) -> &'static str {
        match self {
            Func::Parse => "parse",
            Func::Checksum => "checksum",
            Func::Sort => "sort",
            Func::Lookup => "lookup",
        }
    }

    /// The demangled symbol name, as `ProcessSymbols` knows it.
    pub fn symbol(self) -> String {
        format!("{}::{}", module_path!(), self.short())
    }

    /// Index into per-function arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Parses a short name or a full symbol name.
    pub fn from_name(name: &str) -> Option<Func> {
        Func::ALL
            .into_iter()
            .find(|f| f.short() == name || f.symbol() == name)
    }
}

/// Parses an unsigned decimal number: `None` for an empty input, a byte that
/// is not a digit, or a value that overflows `u64`.
#[inline(never)]
pub fn parse(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in text {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(digit))?;
    }
    Some(n)
}

/// Adler-32 of `data`.
#[inline(never)]
pub fn checksum(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    // The largest run of bytes whose sums cannot overflow u32 before the
    // reduction (zlib's NMAX).
    const NMAX: usize = 5_552;
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(NMAX) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// Sorts `v` in place (insertion sort: the inputs are short).
#[inline(never)]
pub fn sort(v: &mut [u32]) {
    for i in 1..v.len() {
        let x = v[i];
        let mut j = i;
        while j > 0 && v[j - 1] > x {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = x;
    }
}

/// A routing table: `(key, value)` sorted by key.
pub type Routes = RcuCell<Vec<(u64, u32)>>;

/// The value routed for `key` in the current table, if any.
#[inline(never)]
pub fn lookup(routes: &Routes, key: u64) -> Option<u32> {
    let guard = Rcu::global().read();
    let table = routes.load(&guard)?;
    let (mut lo, mut hi) = (0, table.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match table[mid].0.cmp(&key) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Some(table[mid].1),
        }
    }
    None
}

/// Entries of the routing table.
const ROUTES: u32 = 4_096;
/// Keys are multiples of this prime, so odd multiples of nothing miss.
const KEY_STEP: u64 = 7_919;
/// How often the republisher replaces the routing table.
const REPUBLISH_EVERY: Duration = Duration::from_millis(1);

/// A fresh copy of the routing table (same content every time).
pub fn route_table() -> Vec<(u64, u32)> {
    (0..ROUTES)
        .map(|i| (u64::from(i) * KEY_STEP, i ^ 0x5a5a))
        .collect()
}

/// Buffers `checksum` is called on, with their checksums computed before
/// any probe is registered.
pub struct Buffers {
    bufs: Vec<Vec<u8>>,
    sums: Vec<u32>,
}

impl Buffers {
    /// 64 buffers of 64 to 4096 pseudo-random bytes.
    pub fn new() -> Buffers {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let bufs: Vec<Vec<u8>> = (0..64)
            .map(|i| {
                let len = 64 << (i % 7);
                (0..len).map(|_| rng.next() as u8).collect()
            })
            .collect();
        let sums = bufs.iter().map(|b| checksum(b)).collect();
        Buffers { bufs, sums }
    }
}

/// A small, fast pseudo-random generator (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes `n` in decimal into `buf`, returning the digits.
fn format(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// What the worker threads share.
pub struct Workload {
    /// Per thread, per function: calls made so far.
    calls: Vec<CachePadded<[AtomicU64; FUNCS]>>,
    /// Calls whose result was wrong.
    errors: AtomicU64,
    /// Routing table replacements published.
    republished: AtomicU64,
    stop: AtomicBool,
    buffers: Buffers,
    routes: Routes,
}

impl Workload {
    /// Shared state for `threads` workers. Computes the checksum table (calls
    /// not counted: they happen before any probe goes in).
    pub fn new(threads: usize) -> Arc<Workload> {
        Arc::new(Workload {
            calls: (0..threads)
                .map(|_| CachePadded::new(Default::default()))
                .collect(),
            errors: AtomicU64::new(0),
            republished: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            buffers: Buffers::new(),
            routes: RcuCell::new(route_table()),
        })
    }

    /// Calls made to each function so far (exact once the threads are
    /// joined).
    pub fn calls(&self) -> [u64; FUNCS] {
        let mut sum = [0; FUNCS];
        for t in &self.calls {
            for (s, c) in sum.iter_mut().zip(t.iter()) {
                // Relaxed: a statistics snapshot; after `join` the thread's
                // last store happens-before this load.
                *s += c.load(Ordering::Relaxed);
            }
        }
        sum
    }

    /// Calls that returned a wrong result.
    pub fn errors(&self) -> u64 {
        // Relaxed: a counter, exact after join.
        self.errors.load(Ordering::Relaxed)
    }

    /// Routing tables published by the republisher.
    pub fn republished(&self) -> u64 {
        // Relaxed: a counter.
        self.republished.load(Ordering::Relaxed)
    }

    /// Starts the worker threads and the routing-table republisher.
    pub fn start(self: &Arc<Self>) -> Vec<thread::JoinHandle<()>> {
        let mut handles: Vec<_> = (0..self.calls.len())
            .map(|t| {
                let w = Arc::clone(self);
                thread::Builder::new()
                    .name(format!("work-{t}"))
                    .spawn(move || w.worker(t))
                    .expect("spawning a worker thread")
            })
            .collect();
        let w = Arc::clone(self);
        handles.push(
            thread::Builder::new()
                .name("republish".into())
                .spawn(move || {
                    // Relaxed: the flag only ends the loop; join orders the rest.
                    while !w.stop.load(Ordering::Relaxed) {
                        w.routes.replace(route_table());
                        w.republished.fetch_add(1, Ordering::Relaxed);
                        thread::sleep(REPUBLISH_EVERY);
                    }
                })
                .expect("spawning the republisher"),
        );
        handles
    }

    /// Asks every thread to stop (join the handles afterwards).
    pub fn stop(&self) {
        // Relaxed: see `start`.
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Calls every function once more, checking the results, without
    /// counting the calls (used after the probes are gone).
    pub fn call_each_uncounted(&self) -> bool {
        let mut buf = [0u8; 20];
        let ok_parse = parse(black_box(format(12_345, &mut buf))) == Some(12_345);
        let ok_sum = checksum(black_box(&self.buffers.bufs[3])) == self.buffers.sums[3];
        let mut v = [5, 3, 9, 1];
        sort(black_box(&mut v));
        let ok_sort = v == [1, 3, 5, 9];
        let ok_lookup = lookup(black_box(&self.routes), 5 * KEY_STEP) == Some(5 ^ 0x5a5a);
        ok_parse && ok_sum && ok_sort && ok_lookup
    }

    /// One worker: calls each function once, then the functions in a fixed
    /// mix (parse 40%, lookup 30%, checksum 20%, sort 10%) until told to
    /// stop. The first round is before the stop flag is looked at, so the
    /// check that every function was called holds on any schedule.
    fn worker(&self, t: usize) {
        let mine = &self.calls[t];
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d ^ (t as u64 + 1) << 32);
        let mut counts = [0u64; FUNCS];
        let mut errors = 0u64;
        let mut digits = [0u8; 20];
        let mut numbers = [0u32; 96];
        let mut round = 0;
        // Relaxed: the flag only ends the loop; join orders the counters.
        while round < FUNCS || !self.stop.load(Ordering::Relaxed) {
            let r = rng.next();
            let f = match r % 10 {
                _ if round < FUNCS => Func::ALL[round],
                0..=3 => Func::Parse,
                4..=6 => Func::Lookup,
                7 | 8 => Func::Checksum,
                _ => Func::Sort,
            };
            round += 1;
            let ok = match f {
                Func::Parse => {
                    let n = r >> (r % 48 + 8);
                    parse(black_box(format(n, &mut digits))) == Some(n)
                }
                Func::Checksum => {
                    let i = (r >> 8) as usize % self.buffers.bufs.len();
                    checksum(black_box(&self.buffers.bufs[i])) == self.buffers.sums[i]
                }
                Func::Sort => {
                    let len = 8 + (r >> 8) as usize % 89;
                    let v = &mut numbers[..len];
                    let mut sum = 0u64;
                    for x in v.iter_mut() {
                        *x = rng.next() as u32;
                        sum += u64::from(*x);
                    }
                    sort(black_box(&mut *v));
                    v.windows(2).all(|w| w[0] <= w[1])
                        && v.iter().map(|&x| u64::from(x)).sum::<u64>() == sum
                }
                Func::Lookup => {
                    let i = (r >> 8) as u32 % ROUTES;
                    // Every other query asks for a key between two routes.
                    let miss = r & (1 << 40) != 0;
                    let key = u64::from(i) * KEY_STEP + u64::from(miss);
                    let want = (!miss).then_some(i ^ 0x5a5a);
                    lookup(black_box(&self.routes), black_box(key)) == want
                }
            };
            errors += u64::from(!ok);
            let k = f.index();
            counts[k] += 1;
            // Relaxed: only this thread writes its counters; readers take
            // snapshots, and join orders the final values.
            mine[k].store(counts[k], Ordering::Relaxed);
        }
        // Relaxed: a counter, read after join.
        self.errors.fetch_add(errors, Ordering::Relaxed);
    }
}
