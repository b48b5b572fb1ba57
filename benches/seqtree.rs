//! SeqTree / LatchTree lookups against the maps people would otherwise use.
//!
//! Groups (each structure measured in the same run, ratios printed at the
//! end from criterion's own estimates):
//!
//! - `lookup_{1000,100000}`: single-thread lookups of present keys in random
//!   order, against unsynchronized `BTreeMap::get`, `RwLock<BTreeMap>`,
//!   crossbeam-skiplist `SkipMap` and `scc::TreeIndex`.
//! - `with_writer_{1000,100000}`: the same lookups on the measuring thread
//!   while one other thread inserts and removes keys continuously in the
//!   same structure (keys interleaved with the looked-up ones, so rotations
//!   happen all over the tree). Time per lookup, so throughput ratios are
//!   the inverse ratios of these times. `seqtree_writer_elsewhere` is a
//!   control: the writer mutates a separate tree, so the reader shares
//!   nothing with it but the machine (at 1,000 keys, where both trees fit
//!   in the caches, it bounds what any reader design could do).
//!
//! Run:
//!
//! ```text
//! cargo bench --bench seqtree -- --warm-up-time 1 --measurement-time 3
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use criterion::{black_box, criterion_group, Criterion};
use crossbeam_skiplist::SkipMap;
use rcu_registry::rcu::Rcu;
use rcu_registry::seqtree::{LatchTree, SeqTree};

const SIZES: [u64; 2] = [1_000, 100_000];
/// Probe sequence length (a power of two, so indexing is a mask).
const PROBES: usize = 1 << 16;

/// Present keys are even; the writer toggles odd keys between them.
fn present_key(i: u64) -> u64 {
    i * 2
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// Random present keys to look up, and the insertion order (shuffled, so
/// that node addresses are not in key order).
fn workload(n: u64) -> (Vec<u64>, Vec<u64>) {
    let probes = (0..PROBES as u64)
        .map(|i| present_key(mix(i + 1) % n))
        .collect();
    let mut order: Vec<u64> = (0..n).map(present_key).collect();
    for i in (1..order.len()).rev() {
        let j = (mix(i as u64 + 7) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    (probes, order)
}

/// A thread that applies `step(i)` in a loop until dropped.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
    started: Instant,
}

impl Writer {
    fn start(n: u64, mut toggle: impl FnMut(u64, bool) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                // Odd keys spread over the whole key range; insert on the
                // first visit, remove on the second.
                let k = present_key(mix(i / 2 + 0x5151) % n) + 1;
                toggle(k, i % 2 == 0);
                i += 1;
            }
            i
        });
        Writer {
            stop,
            thread: Some(thread),
            started: Instant::now(),
        }
    }
}

impl Writer {
    /// Stops the writer; returns how many operations it made.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap())
    }

    /// Stops the writer and prints its rate: a reader figure means little
    /// unless the writer really ran alongside (on a loaded two-core machine
    /// it may mostly wait for a core, which flatters lock-based peers).
    fn stop_and_report(self, what: &str) -> u64 {
        let elapsed = self.started.elapsed();
        let ops = self.stop();
        println!(
            "{what}: writer {ops} ops in {:.1} s ({:.2} M ops/s)",
            elapsed.as_secs_f64(),
            ops as f64 / elapsed.as_secs_f64() / 1e6
        );
        ops
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            black_box(t.join().unwrap());
        }
    }
}

/// Prints how hard the writer drove the RCU domain during one benchmark.
/// (`gp0`, `batches0`: the domain's counts before the benchmark.)
fn report_domain(what: &str, ops: u64, (gp0, batches0): (u64, u64)) {
    let after = Rcu::global().stats();
    println!(
        "{what}: {ops} writer ops, {} grace periods, {} callback batches",
        after.grace_periods - gp0,
        after.callback_batches - batches0
    );
}

fn domain_counts() -> (u64, u64) {
    let s = Rcu::global().stats();
    (s.grace_periods, s.callback_batches)
}

/// Builds every structure with the same `n` keys.
struct Maps {
    btree: BTreeMap<u64, u64>,
    rwlock: Arc<RwLock<BTreeMap<u64, u64>>>,
    seqtree: Arc<SeqTree<u64, u64>>,
    latch: Arc<LatchTree<u64, u64>>,
    skipmap: Arc<SkipMap<u64, u64>>,
    scc: Arc<scc::TreeIndex<u64, u64>>,
}

impl Maps {
    fn new(order: &[u64]) -> Maps {
        let m = Maps {
            btree: BTreeMap::new(),
            rwlock: Arc::new(RwLock::new(BTreeMap::new())),
            seqtree: Arc::new(SeqTree::new()),
            latch: Arc::new(LatchTree::new()),
            skipmap: Arc::new(SkipMap::new()),
            scc: Arc::new(scc::TreeIndex::new()),
        };
        // One structure at a time, so that each one's nodes sit together in
        // the heap as they would in a program that builds one registry
        // (interleaved building would spread each structure's nodes over
        // about six times as many pages).
        let mut m = m;
        for &k in order {
            let _ = m.btree.insert(k, k);
        }
        let mut w = m.rwlock.write().unwrap();
        for &k in order {
            let _ = w.insert(k, k);
        }
        drop(w);
        for &k in order {
            let _ = m.seqtree.insert(k, k);
        }
        for &k in order {
            let _ = m.latch.insert(k, k);
        }
        for &k in order {
            let _ = m.skipmap.insert(k, k);
        }
        for &k in order {
            let _ = m.scc.insert(k, k);
        }
        m
    }
}

/// Benchmarks one lookup per iteration, cycling through `probes`.
macro_rules! lookup_bench {
    ($g:expr, $id:expr, $probes:expr, |$k:ident| $body:expr) => {{
        let probes = $probes;
        let mut i = 0usize;
        $g.bench_function($id, |b| {
            b.iter(|| {
                i = (i + 1) & (PROBES - 1);
                let $k = probes[i];
                black_box($body)
            })
        });
    }};
}

fn lookups(c: &mut Criterion) {
    for n in SIZES {
        let (probes, order) = workload(n);
        let m = Maps::new(&order);
        let rcu = Rcu::global();
        let mut g = c.benchmark_group(format!("lookup_{n}"));
        lookup_bench!(g, "btreemap", &probes, |k| m.btree.get(&k).copied());
        // One read section per lookup (the worst case for SeqTree), then
        // many lookups in one long section (the guard's cost amortised).
        lookup_bench!(g, "seqtree_guard_per_lookup", &probes, |k| {
            let guard = rcu.read();
            m.seqtree.get(&guard, &k).copied()
        });
        {
            let guard = rcu.read();
            lookup_bench!(g, "seqtree_in_section", &probes, |k| m
                .seqtree
                .get(&guard, &k)
                .copied());
        }
        lookup_bench!(g, "latchtree", &probes, |k| {
            let guard = rcu.read();
            m.latch.get(&guard, &k).copied()
        });
        {
            let guard = rcu.read();
            lookup_bench!(g, "latchtree_in_section", &probes, |k| m
                .latch
                .get(&guard, &k)
                .copied());
        }
        lookup_bench!(g, "rwlock_btreemap", &probes, |k| m
            .rwlock
            .read()
            .unwrap()
            .get(&k)
            .copied());
        lookup_bench!(g, "skipmap", &probes, |k| m
            .skipmap
            .get(&k)
            .map(|e| *e.value()));
        lookup_bench!(g, "scc_treeindex", &probes, |k| {
            let guard = scc::ebr::Guard::new();
            m.scc.peek(&k, &guard).copied()
        });
        g.finish();
    }
}

/// A writer toggling odd keys in `tree` (see [`Writer::start`]).
fn seqtree_writer(n: u64, tree: Arc<SeqTree<u64, u64>>) -> Writer {
    Writer::start(n, move |k, ins| {
        if ins {
            tree.insert(k, k);
        } else {
            tree.remove(&k);
        }
    })
}

fn with_writer(c: &mut Criterion) {
    for n in SIZES {
        let (probes, order) = workload(n);
        let m = Maps::new(&order);
        let rcu = Rcu::global();
        let mut g = c.benchmark_group(format!("with_writer_{n}"));
        {
            let before = domain_counts();
            let w = seqtree_writer(n, m.seqtree.clone());
            lookup_bench!(g, "seqtree", &probes, |k| {
                let guard = rcu.read();
                m.seqtree.get(&guard, &k).copied()
            });
            let ops = w.stop_and_report(&format!("with_writer_{n}/seqtree"));
            report_domain(&format!("with_writer_{n}/seqtree"), ops, before);
            let st = m.seqtree.stats();
            println!(
                "with_writer_{n}/seqtree: {} reader retries, {} lock fallbacks",
                st.retries, st.fallbacks
            );
        }
        {
            // The control: the same SeqTree reader while the writer mutates
            // a *separate* SeqTree of the same size. Nothing is shared but
            // the machine (cores, memory, the RCU worker). Where both trees
            // fit in the caches (1,000 keys) this bounds what any reader
            // design could do beside this writer; at 100,000 keys the second
            // tree also competes for cache, so it is no bound there.
            let other: Arc<SeqTree<u64, u64>> = Arc::new(SeqTree::new());
            for &k in &order {
                let _ = other.insert(k, k);
            }
            let w = seqtree_writer(n, other);
            lookup_bench!(g, "seqtree_writer_elsewhere", &probes, |k| {
                let guard = rcu.read();
                m.seqtree.get(&guard, &k).copied()
            });
            w.stop_and_report(&format!("with_writer_{n}/seqtree_writer_elsewhere"));
        }
        {
            let before = domain_counts();
            let t = m.latch.clone();
            let w = Writer::start(n, move |k, ins| {
                if ins {
                    t.insert(k, k);
                } else {
                    t.remove(&k);
                }
            });
            lookup_bench!(g, "latchtree", &probes, |k| {
                let guard = rcu.read();
                m.latch.get(&guard, &k).copied()
            });
            let ops = w.stop_and_report(&format!("with_writer_{n}/latchtree"));
            report_domain(&format!("with_writer_{n}/latchtree"), ops, before);
        }
        {
            let t = m.rwlock.clone();
            let w = Writer::start(n, move |k, ins| {
                let mut map = t.write().unwrap();
                if ins {
                    map.insert(k, k);
                } else {
                    map.remove(&k);
                }
            });
            lookup_bench!(g, "rwlock_btreemap", &probes, |k| m
                .rwlock
                .read()
                .unwrap()
                .get(&k)
                .copied());
            w.stop_and_report(&format!("with_writer_{n}/rwlock_btreemap"));
        }
        {
            let t = m.skipmap.clone();
            let w = Writer::start(n, move |k, ins| {
                if ins {
                    t.insert(k, k);
                } else {
                    t.remove(&k);
                }
            });
            lookup_bench!(g, "skipmap", &probes, |k| m
                .skipmap
                .get(&k)
                .map(|e| *e.value()));
            w.stop_and_report(&format!("with_writer_{n}/skipmap"));
        }
        {
            let t = m.scc.clone();
            let w = Writer::start(n, move |k, ins| {
                if ins {
                    let _ = t.insert(k, k);
                } else {
                    t.remove(&k);
                }
            });
            lookup_bench!(g, "scc_treeindex", &probes, |k| {
                let guard = scc::ebr::Guard::new();
                m.scc.peek(&k, &guard).copied()
            });
            w.stop_and_report(&format!("with_writer_{n}/scc_treeindex"));
        }
        g.finish();
        // Drain deferred frees before the next size.
        Rcu::global().barrier();
    }
}

/// Criterion's median estimate (ns) for `group/id` (robust to the outliers
/// a shared machine produces), read back from the JSON it wrote in this run.
fn median_ns(group: &str, id: &str) -> Option<f64> {
    let base = std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
            PathBuf::from(target).join("criterion")
        });
    let text =
        std::fs::read_to_string(base.join(group).join(id).join("new/estimates.json")).ok()?;
    let median = &text[text.find("\"median\"")?..];
    let pe = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = pe.find([',', '}'])?;
    pe[..end].trim().parse().ok()
}

fn print_ratios() {
    println!("\n==== seqtree ratios (this run; < 1.0 means SeqTree is faster) ====");
    for n in SIZES {
        let g = format!("lookup_{n}");
        let base = median_ns(&g, "btreemap");
        for id in [
            "seqtree_guard_per_lookup",
            "seqtree_in_section",
            "latchtree",
            "latchtree_in_section",
        ] {
            if let (Some(b), Some(x)) = (base, median_ns(&g, id)) {
                println!(
                    "{g}: {id} / btreemap = {:.2} ({x:.1} ns vs {b:.1} ns)",
                    x / b
                );
            }
        }
        let g = format!("with_writer_{n}");
        if let (Some(c), Some(p)) = (
            median_ns(&g, "seqtree_writer_elsewhere"),
            median_ns(&g, "rwlock_btreemap"),
        ) {
            println!(
                "{g}: control (writer on a separate tree) / rwlock_btreemap = {:.2}x ({c:.1} ns vs {p:.1} ns per lookup)",
                p / c
            );
        }
        if let Some(s) = median_ns(&g, "seqtree") {
            for peer in ["rwlock_btreemap", "skipmap", "scc_treeindex", "latchtree"] {
                if let Some(p) = median_ns(&g, peer) {
                    println!(
                        "{g}: reader throughput seqtree / {peer} = {:.2}x ({s:.1} ns vs {p:.1} ns per lookup)",
                        p / s
                    );
                }
            }
        }
    }
}

criterion_group!(benches, lookups, with_writer);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    print_ratios();
}
