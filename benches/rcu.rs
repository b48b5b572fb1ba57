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
//!   one thread loops over sections that each last [`peers::SLOW_SECTION`].
//! - `call`: `call()` throughput from one thread, in bursts of [`BURST`]
//!   small closures followed by `barrier()`: `call` times the calls only,
//!   `call+barrier` also the barrier (so every callback has run).
//! - `concurrent_synchronize/<N>`: N threads released at once each call
//!   `synchronize()` [`peers::CALLS_PER_ROUND`] times; time per round, and (for
//!   `Rcu`) grace periods used per `synchronize()` call. Without readers a
//!   grace period is far shorter than the callers' arrival spread, so they
//!   rarely overlap; `concurrent_synchronize_slow_reader` repeats it with a
//!   reader whose sections last [`peers::SLOW_SECTION`], which callers pile up
//!   behind and can share grace periods.
//!
//! Read pairs are timed in thread CPU time (see [`peers::thread_cpu_time`]), the
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

#[path = "rcu/peers.rs"]
mod peers;
#[path = "rcu/summary.rs"]
mod summary;

use bench_peers::UrcuMemb;
use criterion::{criterion_group, BenchmarkId, Criterion, SamplingMode};
use peers::{read_peers, BusyReaders, Callers, Peer, Readers, SyncFn, CALLS_PER_ROUND};
use rcu_registry::rcu::Rcu;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use summary::{record, summary};

/// Callbacks per burst in the `call` benchmark: well below the queue's high
/// watermark (262,144), so throttling never kicks in.
const BURST: u64 = 50_000;

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
