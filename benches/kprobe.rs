//! Benchmarks for `rcu_registry::probes::kprobe`, each against its peer in
//! the same run:
//!
//! - `hit_lookup`: the hit path (`on_breakpoint` on an emulated `nop`: lock-
//!   free chain lookup under an `Rcu` guard, a counting pre handler, the
//!   emulation) against the same work through a `RwLock<HashMap>` registry,
//!   at 1 and 2 threads, 1,000 probed addresses.
//! - `unregister_10k`: removing 10,000 probes while two threads keep hitting
//!   them: `unregister_nosync` for each plus one `commit`, against
//!   `unregister` one by one (a grace period each); the same with one
//!   hitter, and the batch with none (see BENCHMARKS.md for why the ratio
//!   depends on whether hitters get descheduled inside read sections).
//! - `kprobe_scale`: registering n probes, and removing them with
//!   `unregister_many` and with `unregister_nosync` each plus one `commit`,
//!   at n = 1,000, 10,000 and 100,000 (`KPROBE_SCALE_MAX` lowers the top:
//!   run the same file against an older registry to compare), all on one
//!   address (one aggregated site) and each on its own function; printed per
//!   probe against the targets (5 us to register, 1 us to unregister in a
//!   batch) and the 100k/1k growth (1.0 = linear).
//! - `kretprobe`: a kretprobe'd call (entry trap + return through the
//!   trampoline) per iteration, each thread on its own function, with the
//!   instance table's own stripes (each thread files in a stripe it
//!   claimed, without a lock), on 64 hashed stripes only, and on one global
//!   lock (1 stripe, the seed-003 peer), at 1 and 2 threads.
//!
//! The ratios are printed at the end. Run:
//! `cargo bench --bench kprobe -- --warm-up-time 1 --measurement-time 2`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

#[path = "common/samples.rs"]
mod samples;
use samples::{median_ns, on_threads, record};

use criterion::{BenchmarkId, Criterion};
use rcu_registry::probes::arch::{Arch, DataMemory, Insn, Regs, X86_64};
use rcu_registry::probes::kprobe::{
    Action, HitOutcome, Kprobe, KprobeRegistry, Kretprobe, DEFAULT_BUCKETS,
};
use rcu_registry::probes::outcome::ReturnOutcome;
use rcu_registry::probes::resolve::SymbolTable;
use rcu_registry::probes::text::Image;
use rcu_registry::probes::xol::XolArena;
use rcu_registry::probes::ProbeError;

const BASE: u64 = 0x10_0000;
const FUNC_SIZE: u64 = 16;
const TRAMPOLINE: u64 = 0x0f00;
const STACK: u64 = 0x7000_0000;
const CALLER: u64 = 0x4000_0000;

type Reg = KprobeRegistry<X86_64, Image>;

/// `n` functions `nop; ret`, one symbol each.
fn image(n: usize) -> (Image, SymbolTable) {
    let mut code = vec![0xccu8; n * FUNC_SIZE as usize];
    let mut syms = SymbolTable::new();
    for i in 0..n {
        let o = i * FUNC_SIZE as usize;
        code[o] = 0x90;
        code[o + 1] = 0xc3;
        syms.insert(format!("f{i}"), func(i), 2);
    }
    (Image::new(BASE, code), syms)
}

fn func(i: usize) -> u64 {
    BASE + i as u64 * FUNC_SIZE
}

fn registry(n: usize, buckets: usize, stripes: usize) -> Reg {
    let (image, syms) = image(n);
    let xol = Arc::new(XolArena::new(0x8000_0000, 4, X86_64::XOL_SLOT_SIZE));
    KprobeRegistry::builder(X86_64, image, syms, xol)
        .buckets(buckets)
        .instance_stripes(stripes)
        .trampoline(TRAMPOLINE)
        .build()
}

/// One stack word per thread: the return address slot.
struct Word(u64);

impl DataMemory for Word {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        if addr != STACK || buf.len() != 8 {
            return Err(ProbeError::MemoryFault {
                addr,
                len: buf.len(),
            });
        }
        buf.copy_from_slice(&self.0.to_le_bytes());
        Ok(())
    }
    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        if addr != STACK || bytes.len() != 8 {
            return Err(ProbeError::MemoryFault {
                addr,
                len: bytes.len(),
            });
        }
        self.0 = u64::from_le_bytes(bytes.try_into().unwrap());
        Ok(())
    }
}

// ---------------------------------------------------------------- hit path

const HIT_PROBES: usize = 1000;
/// Address stride between consecutive hits: coprime with the probe count,
/// so a thread walks every probe in a scattered order.
const HIT_STRIDE: usize = 389;

/// The peer: what a registry behind one reader-writer lock does per hit.
struct PeerProbe {
    insn: Insn,
    hits: AtomicU64,
    pre: Box<dyn Fn(&mut Regs) -> Action + Send + Sync>,
}

fn peer_registry() -> RwLock<HashMap<u64, Arc<PeerProbe>>> {
    let mut map = HashMap::new();
    for i in 0..HIT_PROBES {
        let addr = func(i);
        let insn = X86_64.analyze(addr, &[0x90, 0xc3]).unwrap();
        map.insert(
            addr,
            Arc::new(PeerProbe {
                insn,
                hits: AtomicU64::new(0),
                pre: Box::new(|regs| {
                    black_box(regs.ip);
                    Action::Continue
                }),
            }),
        );
    }
    RwLock::new(map)
}

fn peer_hit(
    peer: &RwLock<HashMap<u64, Arc<PeerProbe>>>,
    regs: &mut Regs,
    mem: &mut dyn DataMemory,
) -> bool {
    let addr = X86_64.trap_address(regs);
    let map = peer.read().unwrap();
    let Some(p) = map.get(&addr) else {
        return false;
    };
    regs.ip = addr;
    p.hits.fetch_add(1, Ordering::Relaxed);
    if (p.pre)(regs) == Action::Continue {
        X86_64.emulate(&p.insn, regs, mem).unwrap();
    }
    true
}

/// One hit through a registry under test.
type HitFn<'a> = dyn Fn(&mut Regs, &mut Word) + Sync + 'a;

fn bench_hit_lookup(c: &mut Criterion) {
    let reg = registry(HIT_PROBES, 4096, 64);
    for i in 0..HIT_PROBES {
        reg.register(
            &Kprobe::at(func(i))
                .pre(|_, regs| {
                    black_box(regs.ip);
                    Action::Continue
                })
                .build(),
        )
        .unwrap();
    }
    let peer = peer_registry();
    let mut g = c.benchmark_group("kprobe_hit_lookup");
    for threads in [1usize, 2] {
        let contenders: [(&str, &str, &HitFn); 2] = [
            ("rcu_chains", "rcu", &|regs, mem| {
                let out = reg.on_breakpoint(regs, mem);
                assert!(matches!(out, HitOutcome::Emulated));
            }),
            ("rwlock_hashmap", "rwlock", &|regs, mem| {
                assert!(peer_hit(&peer, regs, mem));
            }),
        ];
        for (name, short, hit) in contenders {
            g.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter_custom(|iters| {
                    let elapsed = on_threads(threads, iters, true, |t, n| {
                        let mut mem = Word(0);
                        let mut k = t * 7;
                        for _ in 0..n {
                            k = (k + HIT_STRIDE) % HIT_PROBES;
                            let mut regs = Regs {
                                ip: func(k) + 1,
                                ..Regs::default()
                            };
                            hit(&mut regs, &mut mem);
                            black_box(regs.ip);
                        }
                    });
                    record(&format!("hit/{short}/{threads}"), elapsed, iters)
                })
            });
        }
    }
    g.finish();
}

// ------------------------------------------------------ unregister 10,000

/// Probes removed per measurement: 10,000, or the value of
/// `RCU_REGISTRY_BENCH_UNREG_PROBES` (`scripts/bench-plots` sweeps it to plot
/// unregister time against the probe count).
fn unreg_probes() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("RCU_REGISTRY_BENCH_UNREG_PROBES")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(10_000)
    })
}
const UNREG_HITTERS: usize = 2;

/// Registers [`unreg_probes`] probes, starts `hitters` threads hitting them, times
/// `remove`, stops them.
///
/// A hitter only traps on a probe that is still registered, as a thread
/// running the code only traps where a breakpoint still is (the few that
/// race a removal take the "vanished" path).
fn time_unregister(hitters: usize, remove: impl Fn(&Reg, &[Kprobe])) -> Duration {
    let reg = registry(unreg_probes(), 16_384, 64);
    let probes: Vec<Kprobe> = (0..unreg_probes())
        .map(|i| Kprobe::at(func(i)).build())
        .collect();
    for p in &probes {
        reg.register(p).unwrap();
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..hitters {
            let (reg, stop, probes) = (&reg, &stop, &probes);
            s.spawn(move || {
                let mut mem = Word(0);
                let mut k = t * 5003;
                while !stop.load(Ordering::Relaxed) {
                    k = (k + 7919) % probes.len();
                    if !probes[k].is_registered() {
                        continue;
                    }
                    let mut regs = Regs {
                        ip: func(k) + 1,
                        ..Regs::default()
                    };
                    let out = reg.on_breakpoint(&mut regs, &mut mem);
                    assert!(matches!(out, HitOutcome::Emulated | HitOutcome::Vanished));
                }
            });
        }
        // Let the hitters get going.
        std::thread::sleep(Duration::from_millis(5));
        let start = Instant::now();
        remove(&reg, &probes);
        let t = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        assert!(reg.is_empty());
        t
    })
}

/// Times the batch (`unregister_nosync` each, then one `commit`) with
/// `hitters`, recording the whole under `id` and its two halves under
/// `id/top` and `id/commit`.
fn time_batch(hitters: usize, id: &str, iters: u64) -> Duration {
    let (mut total, mut top, mut commit) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for _ in 0..iters {
        let split = std::cell::Cell::new(Duration::ZERO);
        let t = time_unregister(hitters, |reg, probes| {
            let start = Instant::now();
            for p in probes {
                reg.unregister_nosync(p).unwrap();
            }
            split.set(start.elapsed());
            reg.commit();
        });
        total += t;
        top += split.get();
        commit += t.saturating_sub(split.get());
    }
    record(&format!("{id}/top"), top, iters);
    record(&format!("{id}/commit"), commit, iters);
    record(id, total, iters)
}

/// Times one-by-one `unregister` of every probe with `hitters`.
fn time_one_by_one(hitters: usize, id: &str, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        total += time_unregister(hitters, |reg, probes| {
            for p in probes {
                reg.unregister(p).unwrap();
            }
        });
    }
    record(id, total, iters)
}

fn bench_unregister(c: &mut Criterion) {
    let mut g = c.benchmark_group(match unreg_probes() {
        10_000 => "kprobe_unregister_10k".to_string(),
        n => format!("kprobe_unregister_{n}"),
    });
    g.sample_size(10);
    g.bench_function("nosync_then_commit", |b| {
        b.iter_custom(|iters| time_batch(UNREG_HITTERS, "unregister/batch", iters))
    });
    g.bench_function("one_by_one", |b| {
        b.iter_custom(|iters| time_one_by_one(UNREG_HITTERS, "unregister/one_by_one", iters))
    });
    // One hitter: with the writer, no more threads than this machine's two
    // vCPUs, so a hitter is rarely descheduled inside its read section and
    // grace periods stay short (what a machine with a core per thread
    // would see).
    g.bench_function("nosync_then_commit_1_hitter", |b| {
        b.iter_custom(|iters| time_batch(1, "unregister/batch_1", iters))
    });
    g.bench_function("one_by_one_1_hitter", |b| {
        b.iter_custom(|iters| time_one_by_one(1, "unregister/one_by_one_1", iters))
    });
    // The batch's own cost, with nothing competing for the CPUs: what a
    // grace period must exceed, per probe, for batching to pay a ratio.
    g.bench_function("nosync_then_commit_no_hitters", |b| {
        b.iter_custom(|iters| time_batch(0, "unregister/batch_alone", iters))
    });
    g.finish();
}

/// What the unregister ratio is made of, from the same run's medians.
fn unregister_breakdown() {
    let get = |id: &str| median_ns(id).map(|ns| ns / 1e6);
    let n = unreg_probes() as f64;
    for (hitters, batch, one_by_one) in [
        ("two hitters", "unregister/batch", "unregister/one_by_one"),
        (
            "one hitter",
            "unregister/batch_1",
            "unregister/one_by_one_1",
        ),
    ] {
        let (Some(top), Some(commit), Some(one)) = (
            get(&format!("{batch}/top")),
            get(&format!("{batch}/commit")),
            get(one_by_one),
        ) else {
            continue;
        };
        // The commit is one grace period under the same hitters plus the
        // frees: a batch cannot cost less, however cheap its top halves.
        println!(
            "  {hitters}: batch = top halves {top:.2} ms + commit {commit:.2} ms; \
             one-by-one = {:.1} us per probe (its grace period included); \
             ceiling with free top halves (one-by-one / commit) = {:.1}x",
            one * 1e3 / n,
            one / commit
        );
    }
    if let Some(alone) = get("unregister/batch_alone") {
        println!(
            "  batch without hitters: {alone:.2} ms ({:.0} ns per probe): a 100x ratio needs \
             grace periods of at least {:.1} us",
            alone * 1e6 / n,
            alone * 1e6 / n * 100.0 / 1e3
        );
    }
}

// ------------------------------------------------------------------ scale

/// Probe counts of the scale benchmarks (capped by `KPROBE_SCALE_MAX`).
const SCALE_SIZES: [usize; 3] = [1_000, 10_000, 100_000];

fn scale_sizes() -> Vec<usize> {
    let max = std::env::var("KPROBE_SCALE_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    SCALE_SIZES.into_iter().filter(|&n| n <= max).collect()
}

/// What one scale measurement times.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ScaleOp {
    Register,
    UnregisterMany,
    NosyncCommit,
}

impl ScaleOp {
    const ALL: [ScaleOp; 3] = [
        ScaleOp::Register,
        ScaleOp::UnregisterMany,
        ScaleOp::NosyncCommit,
    ];

    fn name(self) -> &'static str {
        match self {
            ScaleOp::Register => "register",
            ScaleOp::UnregisterMany => "unregister_many",
            ScaleOp::NosyncCommit => "nosync_commit",
        }
    }
}

/// Registers `n` probes (on one address, or each on its own function) and
/// removes them; returns the time of `op` alone.
fn scale_cycle(one_address: bool, n: usize, op: ScaleOp) -> Duration {
    let funcs = if one_address { 1 } else { n };
    let reg = registry(funcs, funcs.max(DEFAULT_BUCKETS), 64);
    let probes: Vec<Kprobe> = (0..n)
        .map(|i| Kprobe::at(func(if one_address { 0 } else { i })).build())
        .collect();
    let start = Instant::now();
    for p in &probes {
        reg.register(p).unwrap();
    }
    let registering = start.elapsed();
    let start = Instant::now();
    match op {
        ScaleOp::Register | ScaleOp::UnregisterMany => {
            let refs: Vec<&Kprobe> = probes.iter().collect();
            reg.unregister_many(&refs).unwrap();
        }
        ScaleOp::NosyncCommit => {
            for p in &probes {
                reg.unregister_nosync(p).unwrap();
            }
            reg.commit();
        }
    }
    let removing = start.elapsed();
    assert!(reg.is_empty());
    if op == ScaleOp::Register {
        registering
    } else {
        removing
    }
}

fn scale_id(one_address: bool, n: usize, op: ScaleOp) -> String {
    let shape = if one_address {
        "one_address"
    } else {
        "distinct"
    };
    format!("scale/{shape}/{}/{n}", op.name())
}

fn bench_scale(c: &mut Criterion) {
    let mut g = c.benchmark_group("kprobe_scale");
    g.sample_size(10);
    for one_address in [true, false] {
        for n in scale_sizes() {
            for op in ScaleOp::ALL {
                let id = scale_id(one_address, n, op);
                g.bench_function(&id, |b| {
                    b.iter_custom(|iters| {
                        let t = (0..iters).map(|_| scale_cycle(one_address, n, op)).sum();
                        record(&id, t, iters)
                    })
                });
            }
        }
    }
    g.finish();
}

/// Per-probe medians of the scale benchmarks, against the targets.
fn scale_report() {
    println!(
        "\nkprobe scale (median per probe; targets: register <= 5 us, batch unregister <= 1 us):"
    );
    for one_address in [true, false] {
        for op in ScaleOp::ALL {
            let per: Vec<(usize, f64)> = scale_sizes()
                .into_iter()
                .filter_map(|n| {
                    median_ns(&scale_id(one_address, n, op)).map(|ns| (n, ns / n as f64))
                })
                .collect();
            let Some(&(_, worst)) = per.iter().max_by(|a, b| a.1.total_cmp(&b.1)) else {
                continue;
            };
            let target = if op == ScaleOp::Register {
                5_000.0
            } else {
                1_000.0
            };
            let cells: Vec<String> = per
                .iter()
                .map(|(n, ns)| format!("{n}: {ns:.0} ns"))
                .collect();
            let growth = match (per.first(), per.last()) {
                (Some(a), Some(b)) if b.0 > a.0 => format!(
                    "; per probe at {} / at {} = {:.2}x (1.0 = linear)",
                    b.0,
                    a.0,
                    b.1 / a.1
                ),
                _ => String::new(),
            };
            println!(
                "  {:<11} {:<15} {}{growth}; target {}",
                if one_address {
                    "one address"
                } else {
                    "distinct"
                },
                op.name(),
                cells.join(", "),
                if worst <= target { "met" } else { "MISSED" }
            );
        }
    }
}

// --------------------------------------------------------------- kretprobe

/// A registry with two kretprobe'd functions and its instance table on
/// `own` own stripes and `stripes` shared ones.
fn kret_registry(own: usize, stripes: usize) -> (Reg, Vec<Kretprobe<u64>>) {
    let (image, syms) = image(2);
    let xol = Arc::new(XolArena::new(0x8000_0000, 4, X86_64::XOL_SLOT_SIZE));
    let reg = KprobeRegistry::builder(X86_64, image, syms, xol)
        .buckets(64)
        .instance_stripes(stripes)
        .own_instance_stripes(own)
        .trampoline(TRAMPOLINE)
        .build();
    let krps = (0..2)
        .map(|i| {
            let k = Kretprobe::at(func(i))
                .data::<u64>()
                .handler(|d, _, ret| *d = d.wrapping_add(ret))
                .build()
                .unwrap();
            reg.register(&k).unwrap();
            k
        })
        .collect();
    (reg, krps)
}

/// `threads` threads, each calling its own kretprobe'd function `iters`
/// times (entry trap, return through the trampoline).
fn kret_calls(reg: &Reg, threads: usize, iters: u64) -> Duration {
    on_threads(threads, iters, true, |t, n| {
        let mut mem = Word(CALLER);
        for _ in 0..n {
            let mut regs = Regs {
                ip: func(t) + 1,
                sp: STACK,
                ..Regs::default()
            };
            let out = reg.on_breakpoint(&mut regs, &mut mem);
            assert!(matches!(out, HitOutcome::Emulated));
            regs.ip = TRAMPOLINE;
            regs.sp = STACK + 8;
            X86_64.set_return_value(&mut regs, 42);
            assert_eq!(
                reg.on_return(&mut regs),
                ReturnOutcome::Returned { to: CALLER }
            );
            mem.0 = CALLER;
        }
    })
}

fn bench_kretprobe(c: &mut Criterion) {
    let mut g = c.benchmark_group("kretprobe_entry_return");
    for (name, own, stripes) in [
        ("own_stripes", 64usize, 64usize),
        ("hashed_64", 0, 64),
        ("global_lock", 0, 1),
    ] {
        let (reg, krps) = kret_registry(own, stripes);
        for threads in [1usize, 2] {
            g.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter_custom(|iters| {
                    let id = format!("kret/{name}/{threads}");
                    record(&id, kret_calls(&reg, threads, iters), iters)
                })
            });
        }
        assert_eq!(krps.iter().map(|k| k.nmissed()).sum::<u64>(), 0);
    }
    g.finish();
}

/// Rounds of the paired measurement.
const PAIRED_ROUNDS: usize = 41;
/// Iterations per thread in one paired run (a few milliseconds).
const PAIRED_ITERS: u64 = 20_000;

/// Runs `slower` and `faster` in alternation (first runner swapped every
/// round) and prints the median and quartiles of the per-round ratios
/// slower/faster: under a load that changes from moment to moment, the two
/// sides of a round ran under the same conditions.
fn paired(label: &str, slower: impl Fn(u64) -> Duration, faster: impl Fn(u64) -> Duration) {
    let mut ratios: Vec<f64> = (0..PAIRED_ROUNDS)
        .map(|round| {
            let (s, f) = if round % 2 == 0 {
                let s = slower(PAIRED_ITERS);
                (s, faster(PAIRED_ITERS))
            } else {
                let f = faster(PAIRED_ITERS);
                (slower(PAIRED_ITERS), f)
            };
            s.as_secs_f64() / f.as_secs_f64()
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let q = |x: f64| ratios[((ratios.len() - 1) as f64 * x) as usize];
    println!(
        "  {label}: paired median {:.2}x (quartiles {:.2}x-{:.2}x, {PAIRED_ROUNDS} rounds)",
        q(0.5),
        q(0.25),
        q(0.75)
    );
}

fn ratio(label: &str, slower: &str, faster: &str) {
    match (median_ns(slower), median_ns(faster)) {
        (Some(s), Some(f)) => println!("  {label}: {:.2}x ({s:.1} ns vs {f:.1} ns)", s / f),
        _ => println!("  {label}: not measured"),
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_hit_lookup(&mut c);
    bench_unregister(&mut c);
    bench_kretprobe(&mut c);
    bench_scale(&mut c);
    c.final_summary();
    scale_report();

    println!("\nkprobe ratios (median time per iteration over all samples; >1 = ours faster):");
    for t in [1, 2] {
        ratio(
            &format!("hit path, rwlock+hashmap / rcu chains, {t} thread(s) (wall per hit on each thread)"),
            &format!("hit/rwlock/{t}"),
            &format!("hit/rcu/{t}"),
        );
    }
    ratio(
        &format!(
            "unregister {} probes under hits, one-by-one / nosync+commit",
            unreg_probes()
        ),
        "unregister/one_by_one",
        "unregister/batch",
    );
    unregister_breakdown();
    ratio(
        &format!(
            "unregister {} probes under ONE hitter, one-by-one / nosync+commit",
            unreg_probes()
        ),
        "unregister/one_by_one_1",
        "unregister/batch_1",
    );
    for t in [1, 2] {
        ratio(
            &format!("kretprobe entry+return, global lock / hashed, {t} thread(s)"),
            &format!("kret/global_lock/{t}"),
            &format!("kret/hashed_64/{t}"),
        );
        ratio(
            &format!("kretprobe entry+return, hashed / own stripes, {t} thread(s)"),
            &format!("kret/hashed_64/{t}"),
            &format!("kret/own_stripes/{t}"),
        );
    }
    let (own, _k0) = kret_registry(64, 64);
    let (hashed, _k1) = kret_registry(0, 64);
    let (global, _k2) = kret_registry(0, 1);
    for t in [1, 2] {
        paired(
            &format!("kretprobe entry+return, global lock / hashed, {t} thread(s)"),
            |n| kret_calls(&global, t, n),
            |n| kret_calls(&hashed, t, n),
        );
        paired(
            &format!("kretprobe entry+return, hashed / own stripes, {t} thread(s)"),
            |n| kret_calls(&hashed, t, n),
            |n| kret_calls(&own, t, n),
        );
    }
}
