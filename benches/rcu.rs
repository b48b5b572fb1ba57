//! RCU domains against their peers, measured in the same run.
//!
//! # What is measured
//!
//! - `read_pair/1t`, `read_pair/2t`: one read-side critical section with a
//!   dereference of the protected value (lock + dereference + unlock), on one
//!   thread, and on one thread while a second thread runs the same loop.
//!   Peers: crossbeam-epoch `pin()` + a load, arc-swap `load()`,
//!   `std::sync::RwLock::read()`, and liburcu-memb through the C shim in
//!   `bench-peers/` (skipped when liburcu-dev is not installed).
//! - `synchronize/<n>`: latency of one `synchronize()` while `n` (0, 1, 2)
//!   threads loop over read sections, and (`synchronize/slow_reader`) while
//!   one thread loops over sections that each last [`SLOW_SECTION`].
//! - `call`: `call()` throughput from one thread, in bursts of [`BURST`]
//!   small closures followed by `barrier()`: `call` times the calls only,
//!   `call+barrier` also the barrier (so every callback has run).
//! - `concurrent_synchronize/<N>`: N threads released at once each call
//!   `synchronize()` [`CALLS_PER_ROUND`] times; time per round, and (for
//!   `Rcu`) grace periods used per `synchronize()` call. Without readers a
//!   grace period is far shorter than the callers' arrival spread, so they
//!   rarely overlap; `concurrent_synchronize_slow_reader` repeats it with a
//!   reader whose sections last [`SLOW_SECTION`], which callers pile up
//!   behind and can share grace periods.
//!
//! Read pairs are timed in thread CPU time (see [`thread_cpu_time`]), the
//! rest in wall time (waiting is what they measure).
//!
//! # Ratios
//!
//! Every measurement also records ns/op per criterion sample; at the end a
//! summary prints the median of each and the ratios the design targets
//! (`Rcu` read pair at most 0.15x crossbeam-epoch `pin()` and no slower than
//! liburcu-memb; `Srcu` at most 1.5x `Rcu`; `synchronize()` with one busy
//! reader within 1.5x liburcu-memb; at least 5 million `call()`s a second).
//!
//! Run: `cargo bench --bench rcu` (about two to three minutes).

use bench_peers::{Published, UrcuMemb};
use criterion::{criterion_group, BenchmarkId, Criterion, SamplingMode};
use rcu_registry::rcu::{Rcu, RcuCell, Srcu};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Barrier, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

/// Callbacks per burst in the `call` benchmark: well below the queue's high
/// watermark (262,144), so throttling never kicks in.
const BURST: u64 = 50_000;

// ---------------------------------------------------------------------------
// Per-sample results for the summary.

static SAMPLES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Records one criterion sample (`elapsed` for `iters` operations) under
/// `key` and hands `elapsed` back to criterion.
fn record(key: &str, elapsed: Duration, iters: u64) -> Duration {
    if iters > 0 {
        let ns = elapsed.as_nanos() as f64 / iters as f64;
        SAMPLES
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default()
            .push(ns);
    }
    elapsed
}

fn median(key: &str) -> Option<f64> {
    let samples = SAMPLES.lock().unwrap();
    let mut v = samples.get(key)?.clone();
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// CPU time consumed by the calling thread.
///
/// Read pairs are timed with it rather than with the wall clock: the machine
/// is shared and usually oversubscribed, and wall time would then charge a
/// nanosecond-scale loop for the time slices other processes ran in.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clock id is a constant the
    // kernel supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

// ---------------------------------------------------------------------------
// Read pairs.

/// The read-pair loops of every peer, each timing `iters` read pairs.
struct Readers {
    rcu_cell: RcuCell<u64>,
    srcu: Srcu,
    srcu_cell: RcuCell<u64, Srcu>,
    epoch: crossbeam_epoch::Atomic<u64>,
    arc_swap: arc_swap::ArcSwap<u64>,
    rwlock: RwLock<u64>,
    urcu_value: Published,
}

impl Readers {
    fn new() -> Arc<Readers> {
        let srcu = Srcu::new();
        Arc::new(Readers {
            rcu_cell: RcuCell::new(42),
            srcu_cell: RcuCell::new_in(42, srcu.clone()),
            srcu,
            epoch: crossbeam_epoch::Atomic::new(42),
            arc_swap: arc_swap::ArcSwap::from_pointee(42),
            rwlock: RwLock::new(42),
            urcu_value: Published::new(42),
        })
    }

    /// Runs `iters` read pairs of `peer`, returning the thread CPU time
    /// taken.
    fn run(&self, peer: Peer, iters: u64) -> Duration {
        if let Peer::Urcu(urcu) = peer {
            // liburcu readers register once per thread; the loop runs in C.
            thread_local! {
                static REG: std::cell::OnceCell<bench_peers::Registration> =
                    const { std::cell::OnceCell::new() };
            }
            return REG.with(|r| {
                let reg = r.get_or_init(|| urcu.register());
                let start = thread_cpu_time();
                black_box(urcu.read_pairs(reg, &self.urcu_value, iters));
                thread_cpu_time() - start
            });
        }
        let start = thread_cpu_time();
        match peer {
            Peer::Rcu => {
                let rcu = Rcu::global();
                for _ in 0..iters {
                    let g = rcu.read();
                    black_box(*self.rcu_cell.load(&g).unwrap());
                }
            }
            Peer::Srcu => {
                for _ in 0..iters {
                    let g = self.srcu.read();
                    black_box(*self.srcu_cell.load(&g).unwrap());
                }
            }
            Peer::EpochPin => {
                for _ in 0..iters {
                    let g = crossbeam_epoch::pin();
                    let p = self.epoch.load(Ordering::Acquire, &g);
                    // SAFETY: the pointer is never retired while benchmarks
                    // run (it is dropped with `Readers`), so it is valid.
                    black_box(unsafe { *p.deref() });
                }
            }
            Peer::ArcSwap => {
                for _ in 0..iters {
                    let g = self.arc_swap.load();
                    black_box(**g);
                }
            }
            Peer::RwLock => {
                for _ in 0..iters {
                    let g = self.rwlock.read().unwrap();
                    black_box(*g);
                }
            }
            Peer::Urcu(_) => unreachable!("handled above"),
        }
        thread_cpu_time() - start
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader holds a guard on the pointer.
        unsafe {
            drop(
                self.epoch
                    .swap(
                        crossbeam_epoch::Shared::null(),
                        Ordering::AcqRel,
                        crossbeam_epoch::unprotected(),
                    )
                    .into_owned(),
            )
        };
    }
}

#[derive(Clone, Copy)]
enum Peer {
    Rcu,
    Srcu,
    EpochPin,
    ArcSwap,
    RwLock,
    Urcu(UrcuMemb),
}

fn read_peers() -> Vec<(&'static str, Peer)> {
    let mut v = vec![
        ("rcu", Peer::Rcu),
        ("srcu", Peer::Srcu),
        ("crossbeam_epoch_pin", Peer::EpochPin),
        ("arc_swap_load", Peer::ArcSwap),
        ("rwlock_read", Peer::RwLock),
    ];
    match UrcuMemb::get() {
        Some(u) => v.push(("liburcu_memb", Peer::Urcu(u))),
        None => eprintln!("liburcu-memb peer skipped: bench-peers was built without liburcu-dev"),
    }
    v
}

fn read_pair(c: &mut Criterion) {
    let readers = Readers::new();
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(format!("read_pair/{threads}t"));
        for (name, peer) in read_peers() {
            let key = format!("read_pair/{threads}t/{name}");
            // The second thread runs the same loop for as long as this
            // benchmark is measured.
            let stop = Arc::new(AtomicBool::new(false));
            let other = (threads == 2).then(|| {
                let (r, stop) = (readers.clone(), stop.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        r.run(peer, 10_000);
                    }
                })
            });
            g.bench_function(name, |b| {
                b.iter_custom(|iters| record(&key, readers.run(peer, iters), iters))
            });
            stop.store(true, Ordering::Relaxed);
            if let Some(t) = other {
                t.join().unwrap();
            }
        }
        g.finish();
    }
}

// ---------------------------------------------------------------------------
// synchronize() latency with busy readers.

/// Threads looping over read sections of `peer` until dropped.
struct BusyReaders {
    stop: Arc<AtomicBool>,
    urcu_stop: Arc<AtomicI32>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// How long each section of the slow reader lasts (see
/// `concurrent_synchronize`).
const SLOW_SECTION: Duration = Duration::from_micros(5);

impl BusyReaders {
    /// One thread whose read sections each last [`SLOW_SECTION`].
    fn start_slow(peer: Peer, readers: &Arc<Readers>) -> BusyReaders {
        let stop = Arc::new(AtomicBool::new(false));
        let urcu_stop = Arc::new(AtomicI32::new(0));
        let (r, stop2, urcu_stop2) = (readers.clone(), stop.clone(), urcu_stop.clone());
        let thread = thread::spawn(move || match peer {
            Peer::Urcu(u) => {
                let reg = u.register();
                black_box(u.read_slow_until(&reg, &r.urcu_value, &urcu_stop2, SLOW_SECTION));
            }
            Peer::Rcu => {
                while !stop2.load(Ordering::Relaxed) {
                    let g = Rcu::global().read();
                    black_box(r.rcu_cell.load(&g));
                    let until = Instant::now() + SLOW_SECTION;
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                }
            }
            _ => unreachable!("slow readers exist for Rcu and liburcu only"),
        });
        BusyReaders {
            stop,
            urcu_stop,
            threads: vec![thread],
        }
    }

    fn start(n: usize, peer: Peer, readers: &Arc<Readers>) -> BusyReaders {
        let stop = Arc::new(AtomicBool::new(false));
        let urcu_stop = Arc::new(AtomicI32::new(0));
        let threads = (0..n)
            .map(|_| {
                let (r, stop, urcu_stop) = (readers.clone(), stop.clone(), urcu_stop.clone());
                thread::spawn(move || match peer {
                    Peer::Urcu(u) => {
                        let reg = u.register();
                        black_box(u.read_until(&reg, &r.urcu_value, &urcu_stop));
                    }
                    _ => {
                        while !stop.load(Ordering::Relaxed) {
                            r.run(peer, 1000);
                        }
                    }
                })
            })
            .collect();
        BusyReaders {
            stop,
            urcu_stop,
            threads,
        }
    }
}

impl Drop for BusyReaders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.urcu_stop.store(1, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

/// A peer's `synchronize()`.
type SyncFn = Arc<dyn Fn() + Send + Sync>;

fn synchronize_latency(c: &mut Criterion) {
    let readers = Readers::new();
    let mut peers: Vec<(&str, Peer, SyncFn)> = vec![
        ("rcu", Peer::Rcu, Arc::new(|| Rcu::global().synchronize())),
        (
            "rcu_expedited",
            Peer::Rcu,
            Arc::new(|| Rcu::global().synchronize_expedited()),
        ),
        ("srcu", Peer::Srcu, {
            let r = readers.clone();
            Arc::new(move || r.srcu.synchronize())
        }),
    ];
    if let Some(u) = UrcuMemb::get() {
        peers.push((
            "liburcu_memb",
            Peer::Urcu(u),
            Arc::new(move || u.synchronize()),
        ));
    }
    // (key, busy readers, whether the one reader is slow)
    for (label, busy, slow) in [
        ("0", 0usize, false),
        ("1", 1, false),
        ("2", 2, false),
        ("slow", 1, true),
    ] {
        let mut g = c.benchmark_group(if slow {
            "synchronize/slow_reader".to_string()
        } else {
            format!("synchronize/{busy}_busy_readers")
        });
        g.sample_size(20).sampling_mode(SamplingMode::Flat);
        for (name, peer, sync) in &peers {
            if slow && matches!(peer, Peer::Srcu) {
                continue;
            }
            let key = format!("synchronize/{label}/{name}");
            let _busy = if slow {
                BusyReaders::start_slow(*peer, &readers)
            } else {
                BusyReaders::start(busy, *peer, &readers)
            };
            g.bench_function(*name, |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        sync();
                    }
                    record(&key, start.elapsed(), iters)
                })
            });
        }
        g.finish();
    }
}

// ---------------------------------------------------------------------------
// call() throughput.

fn call_throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("call");
    g.sample_size(20).sampling_mode(SamplingMode::Flat);
    let rcu = Rcu::new();
    g.bench_function("rcu_call", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BURST);
                let start = Instant::now();
                for i in 0..n {
                    rcu.call(move || {
                        black_box(i);
                    });
                }
                timed += start.elapsed();
                rcu.barrier();
                left -= n;
            }
            record("call/rcu_call", timed, iters)
        })
    });
    g.bench_function("rcu_call+barrier", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let mut left = iters;
            while left > 0 {
                let n = left.min(BURST);
                for i in 0..n {
                    rcu.call(move || {
                        black_box(i);
                    });
                }
                rcu.barrier();
                left -= n;
            }
            record("call/rcu_call+barrier", start.elapsed(), iters)
        })
    });
    g.bench_function("crossbeam_epoch_defer", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                let guard = crossbeam_epoch::pin();
                guard.defer(move || {
                    black_box(i);
                });
            }
            let t = start.elapsed();
            crossbeam_epoch::pin().flush();
            record("call/crossbeam_epoch_defer", t, iters)
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------
// N concurrent synchronize() callers.

/// `synchronize()` calls each caller makes per round: back-to-back calls
/// keep the callers overlapping (a single call per thread mostly measures
/// how far apart the barrier wakes the threads).
const CALLS_PER_ROUND: usize = 10;

/// `n` threads that each call `sync` [`CALLS_PER_ROUND`] times per round.
struct Callers {
    start: Arc<Barrier>,
    end: Arc<Barrier>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Callers {
    fn start(n: usize, sync: SyncFn) -> Callers {
        let start = Arc::new(Barrier::new(n + 1));
        let end = Arc::new(Barrier::new(n + 1));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let (start, end, stop, sync) =
                    (start.clone(), end.clone(), stop.clone(), sync.clone());
                thread::spawn(move || loop {
                    start.wait();
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    for _ in 0..CALLS_PER_ROUND {
                        sync();
                    }
                    end.wait();
                })
            })
            .collect();
        Callers {
            start,
            end,
            stop,
            threads,
        }
    }

    fn round(&self) {
        self.start.wait();
        self.end.wait();
    }
}

impl Drop for Callers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.start.wait();
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

fn concurrent_synchronize(c: &mut Criterion) {
    let readers = Readers::new();
    for slow in [false, true] {
        let group = if slow {
            "concurrent_synchronize_slow_reader"
        } else {
            "concurrent_synchronize"
        };
        let mut g = c.benchmark_group(group);
        g.sample_size(20).sampling_mode(SamplingMode::Flat);
        for n in [4usize, 8] {
            let mut peers: Vec<(&str, Peer, SyncFn)> =
                vec![("rcu", Peer::Rcu, Arc::new(|| Rcu::global().synchronize()))];
            if let Some(u) = UrcuMemb::get() {
                peers.push((
                    "liburcu_memb",
                    Peer::Urcu(u),
                    Arc::new(move || u.synchronize()),
                ));
            }
            for (name, peer, sync) in peers {
                let _slow_reader = slow.then(|| BusyReaders::start_slow(peer, &readers));
                let callers = Callers::start(n, sync);
                let key = format!("{group}/{n}/{name}");
                g.bench_function(BenchmarkId::new(name, n), |b| {
                    b.iter_custom(|iters| {
                        let gps = Rcu::global().stats().grace_periods;
                        let start = Instant::now();
                        for _ in 0..iters {
                            callers.round();
                        }
                        let t = start.elapsed();
                        if name == "rcu" {
                            let used = Rcu::global().stats().grace_periods - gps;
                            // Stored as "ns" per synchronize() call, for the
                            // summary's median.
                            record(
                                &format!("{key}/grace_periods"),
                                Duration::from_nanos(used),
                                iters * (n * CALLS_PER_ROUND) as u64,
                            );
                        }
                        record(&key, t, iters)
                    })
                });
            }
        }
        g.finish();
    }
}

// ---------------------------------------------------------------------------
// Summary.

fn ratio_line(what: &str, num: &str, den: &str, target: &str, ok: impl Fn(f64) -> bool) {
    match (median(num), median(den)) {
        (Some(a), Some(b)) => {
            let r = a / b;
            let verdict = if ok(r) { "met" } else { "MISSED" };
            println!("  {what:<62} {r:>7.3}x   target {target:<8} {verdict}");
        }
        _ => println!("  {what:<62}   (not measured in this run)"),
    }
}

fn summary() {
    println!("\n== RCU domains: medians of per-sample ns/op ==");
    let samples: Vec<String> = SAMPLES.lock().unwrap().keys().cloned().collect();
    for key in samples {
        let m = median(&key).unwrap();
        if key.ends_with("/grace_periods") {
            println!("  {key:<58} {m:>10.3} grace periods per synchronize() call");
        } else if key.starts_with("call/") {
            println!("  {key:<58} {m:>10.2} ns   ({:.2} M/s)", 1e3 / m);
        } else {
            println!("  {key:<58} {m:>10.2} ns");
        }
    }
    println!("\n== RCU domains: ratios against the targets ==");
    for t in ["1t", "2t"] {
        ratio_line(
            &format!("read pair {t}: Rcu / crossbeam-epoch pin()"),
            &format!("read_pair/{t}/rcu"),
            &format!("read_pair/{t}/crossbeam_epoch_pin"),
            "<= 0.15",
            |r| r <= 0.15,
        );
        ratio_line(
            &format!("read pair {t}: Rcu / liburcu-memb"),
            &format!("read_pair/{t}/rcu"),
            &format!("read_pair/{t}/liburcu_memb"),
            "<= 1.0",
            |r| r <= 1.0,
        );
        ratio_line(
            &format!("read pair {t}: Srcu / Rcu"),
            &format!("read_pair/{t}/srcu"),
            &format!("read_pair/{t}/rcu"),
            "<= 1.5",
            |r| r <= 1.5,
        );
        ratio_line(
            &format!("read pair {t}: Rcu / arc-swap load()"),
            &format!("read_pair/{t}/rcu"),
            &format!("read_pair/{t}/arc_swap_load"),
            "(info)",
            |_| true,
        );
        ratio_line(
            &format!("read pair {t}: Rcu / RwLock::read()"),
            &format!("read_pair/{t}/rcu"),
            &format!("read_pair/{t}/rwlock_read"),
            "(info)",
            |_| true,
        );
    }
    for busy in 0..=2 {
        let target = if busy == 1 { "<= 1.5" } else { "(info)" };
        ratio_line(
            &format!("synchronize, {busy} busy readers: Rcu / liburcu-memb"),
            &format!("synchronize/{busy}/rcu"),
            &format!("synchronize/{busy}/liburcu_memb"),
            target,
            |r| busy != 1 || r <= 1.5,
        );
    }
    ratio_line(
        "synchronize, one slow reader: Rcu / liburcu-memb",
        "synchronize/slow/rcu",
        "synchronize/slow/liburcu_memb",
        "(info)",
        |_| true,
    );
    for group in [
        "concurrent_synchronize",
        "concurrent_synchronize_slow_reader",
    ] {
        for n in [4, 8] {
            ratio_line(
                &format!("{group} {n}: Rcu / liburcu-memb"),
                &format!("{group}/{n}/rcu"),
                &format!("{group}/{n}/liburcu_memb"),
                "(info)",
                |_| true,
            );
        }
    }
    match median("call/rcu_call") {
        Some(ns) => {
            let rate = 1e3 / ns;
            let verdict = if rate >= 5.0 { "met" } else { "MISSED" };
            println!(
                "  {:<54} {rate:>7.2}M/s target >= 5M/s  {verdict}",
                "call() throughput, one thread"
            );
        }
        None => println!("  call() throughput: (not measured in this run)"),
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    targets = read_pair, synchronize_latency, call_throughput, concurrent_synchronize
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
