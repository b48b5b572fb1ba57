//! Live uprobes on this process (issue 12), each figure against a peer in
//! the same run:
//!
//! 1. **Hit cost** (`live_uprobe_hit/*`): one call of a 4-byte function
//!    (`lea eax, [rdi + 1]; ret`, from a fixture library built with `cc`)
//!    unprobed (`plain`); with an `int3` at its entry and an empty SIGTRAP
//!    handler (`raw_int3`, a copy in this binary: the floor of any trap);
//!    with a live kprobe on a second copy (`kprobe`); with a live uprobe by
//!    `FILE:SYMBOL` on a third (`uprobe`). Both probes are boosted (the
//!    `lea` runs from an XOL slot). Target: uprobe <= 1.15x kprobe.
//! 2. **Attach at scale** (`live_uprobe_scale/*`): a uprobe on every function
//!    of the C library (`.dynsym`, one per address, IFUNCs skipped), while
//!    the program runs and calls it. `libc_register/N` times registering all
//!    N by `FILE:SYMBOL` in one batch (`LiveUprobes::register_many`, which
//!    returns their keys; the target list is built before the timing; what
//!    the registry refuses is counted and printed), `libc_unregister/N`
//!    removing them in one batch (`LiveUprobes::unregister_many`, one grace
//!    period; each timed phase starts with the callback worker idle: an
//!    untimed `barrier` after the other phase, so the memory the previous
//!    cycle retired is not freed during it); the same on a generated library of 10,000 tiny functions
//!    (`gen_register/10000`, `gen_unregister/10000`) and of 100,000
//!    (`gen100k_register/100000`, `gen100k_unregister/100000`). Then the uprobe hit of
//!    (1) again with every C-library probe installed
//!    (`live_uprobe_hit/uprobe_with_libc`). Targets: <= 5 us per probe to
//!    register, <= 1 us per probe to unregister in a batch, hit unchanged.
//! 3. **dlopen with pending uprobes** (`live_uprobe_dlopen/*/1000`):
//!    `dlopen` + `dlclose` of a generated library of 1,000 functions, plain
//!    and with a uprobe registered on each function before the `dlopen`
//!    (installed by the loader watch before the constructors run, forgotten
//!    at `dlclose`). Target: <= 2 us per pending uprobe, amortized, on the
//!    `dlopen` (each cycle's `dlopen` and `dlclose` are also timed apart;
//!    the `dlclose` figure is printed beside it, with no target), and paired:
//!    205 rounds each opening and closing a byte-identical unprobed copy
//!    and then the probed library, the median per-round difference of the
//!    two `dlopen`s per pending uprobe. The same paired rounds also run first
//!    of all, in the fresh process (another copy, `ludlf`): after the scale
//!    runs the allocator's heap and the XOL area are those of a process that
//!    registered and removed hundreds of thousands of uprobes.
//!
//! 4. **Jump-optimized uprobe hit** (`live_uprobe_hit/uprobe_jump`, issue
//!    15): a 6-byte `x + 1` (`mov eax, edi; add eax, 1; ret`, which a
//!    `jmp rel32` can displace) unprobed (`plain6`), with a uprobe on the
//!    trap path (`uprobe_trap6`) and with the same uprobe after
//!    `LiveUprobes::optimize_now` (`uprobe_jump`); paired against the
//!    unprobed copy, the cost each adds per call. Runs in section 1.
//!
//! 5. **Uretprobe entry + return** (`live_uprobe_hit/uretprobe_trap6`,
//!    `live_uprobe_hit/uretprobe_jump`): a return handler on the 6-byte
//!    function of (4), its entry on the trap path (a consumer that opts
//!    out of the optimizer) and jump-optimized; the return lands in the
//!    assembly return trampoline in both (x86_64: no trap on return).
//!    Paired against the unprobed copy. Runs in section 1. Beside it
//!    (`return_miss_uprobes`, `return_miss_kprobes`): what a return into
//!    the shared trampoline costs a dispatcher it is not for (each is
//!    asked), the live uprobes' on every kretprobe return and the kprobe
//!    registry's on every uretprobe return.
//!
//! Diagnostics beside them: `raw_int3_before_uprobes` and
//! `kprobe_before_uprobes` (the same two before `LiveUprobes::global()`
//! sets up the loader watch and the uprobe dispatcher),
//! `uprobe_with_errno_location` (only `__errno_location` probed, which the
//! trap handler's outer half calls) and `uprobe_again` (the uprobe alone,
//! after the scale runs: the peer of `uprobe_with_libc`).
//!
//! Two **paired** measurements back the hit ratios (separate criterion runs
//! of one function move by 30% on this machine between its slow and fast
//! phases): 41 rounds, each timing 2,000 calls of one side then 2,000 of
//! the other, the median of the per-round ratios: uprobe / kprobe (both
//! installed), and the uprobe with every C-library function probed / alone
//! (the C library registered and removed in a batch between the halves).
//!
//! Medians per probe and the ratios are printed at the end. Fixture
//! libraries go to `<tmp>/rcu-registry-live_uprobe-<pid>/` (removed at the end).
//! `LIVE_UPROBE_GEN=0` skips the generated 10,000- and 100,000-function
//! libraries; `LIVE_UPROBE_ONLY=dlopen` runs section 3 alone,
//! `LIVE_UPROBE_ONLY=hit` sections 1, 4 and 5 alone. Run:
//! `cargo bench --bench live_uprobe` (its own short criterion times).

#[path = "../tests/dl_support/mod.rs"]
mod dl_support;
#[path = "common/raw_trap.rs"]
mod raw_trap;
use dl_support::Lib;
use std::arch::global_asm;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "common/samples.rs"]
mod samples;
use samples::{median_ns, record};

use criterion::{Criterion, SamplingMode};
use object::{Object, ObjectSymbol, SymbolKind};
use rcu_registry::probes::arch::Regs;
use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::probes::runtime::{Live, LiveUprobes, TrapDispatcher};
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeKey, UprobeTarget};

// The raw-trap peer: an `int3`, then the fixture's body.
global_asm!(
    ".pushsection .text.lu_functions,\"ax\",@progbits",
    ".p2align 4",
    ".globl lu_raw",
    ".type lu_raw,@function",
    "lu_raw:",
    ".byte 0xcc, 0x8d, 0x47, 0x01, 0xc3",
    ".size lu_raw, . - lu_raw",
    ".popsection",
);

extern "C" {
    fn lu_raw(x: u32) -> u32;
}

type Func = unsafe extern "C" fn(u32) -> u32;

/// Functions of the generated libraries.
const DLOPEN_FUNCS: usize = 1_000;
const GEN_FUNCS: usize = 10_000;
const GEN_100K_FUNCS: usize = 100_000;

/// The bench's fixture directory (a temporary one, removed at the end).
const FIXTURES: &str = "live_uprobe";

/// `lib<name>.so` built from `source` (the shared fixture builder of the
/// live tests; no CET landing pads, so each function starts with its body).
fn cc(name: &str, source: &str) -> PathBuf {
    dl_support::build_so(
        FIXTURES,
        &format!("lib{name}.so"),
        source,
        &["-fcf-protection=none"],
    )
}

/// Three copies of `x + 1` (`lea eax, [rdi + 1]; ret`), and two of a
/// 6-byte `x + 1` a `jmp rel32` can displace (`mov eax, edi; add eax, 1;
/// ret`: the 4-byte one would displace its `ret`, which the optimizer
/// refuses): `lu_plain6` unprobed, `lu_upj` for the trap and the
/// jump-optimized uprobe.
fn hit_fixture() -> PathBuf {
    let body = |n: &str| format!("__attribute__((noinline)) int {n}(int x) {{ return x + 1; }}\n");
    let six = |n: &str| {
        format!(
            "__asm__(\".text\\n.p2align 4\\n.globl {n}\\n.type {n},@function\\n{n}:\\n\
             .byte 0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3\\n.size {n}, . - {n}\\n\");\n"
        )
    };
    cc(
        "luhit",
        &[
            body("lu_plain"),
            body("lu_kp"),
            body("lu_up"),
            six("lu_plain6"),
            six("lu_upj"),
        ]
        .concat(),
    )
}

/// The optimized uprobe hit (issue 15) beside the trap uprobe hit, on the
/// 6-byte fixture: `plain6` unprobed, `uprobe_trap6` the uprobe on the
/// trap path (its `mov` completed as the registry decides), `uprobe_jump`
/// the same uprobe after
/// `LiveUprobes::optimize_now`. Returns the paired medians (ns per call)
/// of the unprobed copy, the trap uprobe and the optimized uprobe.
fn jump_hit_benches(c: &mut Criterion, live: &LiveUprobes, so: &Path, lib: &Lib) -> [f64; 3] {
    let (plain6, upj) = (func(lib, "lu_plain6"), func(lib, "lu_upj"));
    // SAFETY: complete `int (int)` functions.
    unsafe { assert_eq!(upj(41), 42) };
    hit_bench(c, "plain6", plain6);
    let up = quiet_consumer();
    let key = live
        .register(&UprobeTarget::symbol(so.to_str().unwrap(), "lu_upj"), &up)
        .unwrap()
        .key();
    hit_bench(c, "uprobe_trap6", upj);
    let trap = paired(
        || call_loop(plain6, PAIRED_CALLS),
        || call_loop(upj, PAIRED_CALLS),
    );
    let r = live.optimize_now();
    assert!(
        live.is_optimized(key),
        "lu_upj not optimized: {:?} ({r:?})",
        live.jump_refusal(key)
    );
    hit_bench(c, "uprobe_jump", upj);
    let jump = paired(
        || call_loop(plain6, PAIRED_CALLS),
        || call_loop(upj, PAIRED_CALLS),
    );
    let hits = up.hits();
    live.unregister(key, &up).unwrap();
    assert!(hits > 0);
    [(trap.0 + jump.0) / 2.0, trap.1, jump.1]
}

/// A uretprobe's entry and return on the 6-byte fixture (section 5): its
/// entry on the trap path (`uretprobe_trap6`: a consumer that opts out of
/// the optimizer) and jump-optimized (`uretprobe_jump`), each return
/// through the return trampoline (the assembly one on x86_64: no trap).
/// Returns the paired medians (ns per call) of the unprobed copy, the
/// trap-entry uretprobe and the optimized one.
fn uretprobe_benches(c: &mut Criterion, live: &LiveUprobes, so: &Path, lib: &Lib) -> [f64; 3] {
    let (plain6, upj) = (func(lib, "lu_plain6"), func(lib, "lu_upj"));
    let target = UprobeTarget::symbol(so.to_str().unwrap(), "lu_upj");
    let mut run = |opt_out: bool, id: &'static str| {
        let ret = Consumer::builder()
            .ret_handler(|r, _| {
                black_box(r.retval);
            })
            .jump_opt_out(opt_out)
            .build();
        let key = live.register(&target, &ret).unwrap().key();
        let r = live.optimize_now();
        assert_eq!(
            live.is_optimized(key),
            !opt_out,
            "lu_upj: {:?} ({r:?})",
            live.jump_refusal(key)
        );
        hit_bench(c, id, upj);
        let p = paired(
            || call_loop(plain6, PAIRED_CALLS),
            || call_loop(upj, PAIRED_CALLS),
        );
        let rets = ret.ret_hits();
        live.unregister(key, &ret).unwrap();
        assert!(rets > 0);
        p
    };
    let trap = run(true, "uretprobe_trap6");
    let jump = run(false, "uretprobe_jump");
    [(trap.0 + jump.0) / 2.0, trap.1, jump.1]
}

/// `lib<name>.so` with `n` functions `gN(x) = x + N` (`lea eax, [rdi +
/// N]; ret`, what `cc -O1` makes of `return x + N`), 16-byte aligned, from
/// generated assembly (100,000 functions assemble in about a second; `cc`
/// took minutes on the C).
fn generated(name: &str, n: usize) -> PathBuf {
    let mut s = String::with_capacity(n * 96 + 64);
    s.push_str(".intel_syntax noprefix\n.text\n");
    for i in 0..n {
        s.push_str(&format!(
            ".globl g{i}\n.type g{i},@function\n.p2align 4\ng{i}:\n\
             lea eax, [rdi + {i}]\nret\n.size g{i}, . - g{i}\n"
        ));
    }
    s.push_str(".section .note.GNU-stack,\"\",@progbits\n");
    dl_support::build_asm_so(FIXTURES, &format!("lib{name}.so"), &s)
}

/// The fixture function `name` of `lib`, typed for the hit loop.
fn func(lib: &Lib, name: &str) -> Func {
    let c = CString::new(name).unwrap();
    // SAFETY: a live handle and a valid C string.
    let p = unsafe { libc::dlsym(lib.0, c.as_ptr()) };
    assert!(!p.is_null(), "dlsym {name}");
    // SAFETY: the fixtures' functions are `int (int)`.
    unsafe { std::mem::transmute::<*mut libc::c_void, Func>(p) }
}

fn call_loop(f: Func, iters: u64) -> Duration {
    let f = black_box(f);
    let t0 = Instant::now();
    for i in 0..iters {
        // SAFETY: every function called here is a complete `int (int)`.
        let r = unsafe { f(black_box(i as u32)) };
        black_box(r);
    }
    t0.elapsed()
}

fn hit_bench(c: &mut Criterion, id: &'static str, f: Func) {
    let mut g = c.benchmark_group("live_uprobe_hit");
    g.bench_function(id, |b| {
        b.iter_custom(|iters| record(&format!("hit/{id}"), call_loop(f, iters), iters))
    });
    g.finish();
}

/// Rounds and calls per round of the paired measurements.
const PAIRED_ROUNDS: usize = 41;
const PAIRED_CALLS: u64 = 2_000;

/// A paired measurement: each round times `PAIRED_CALLS` calls of `a`,
/// then as many of `b`, back to back (the machine's slow and fast phases,
/// which move separate criterion runs of one bench by 30%, fall on both
/// halves of a round alike). Returns the medians of `a`'s and `b`'s ns per
/// call and of the per-round ratio `b / a`.
fn paired(mut a: impl FnMut() -> Duration, mut b: impl FnMut() -> Duration) -> (f64, f64, f64) {
    let (mut ta, mut tb, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..PAIRED_ROUNDS {
        let x = a().as_nanos() as f64 / PAIRED_CALLS as f64;
        let y = b().as_nanos() as f64 / PAIRED_CALLS as f64;
        ta.push(x);
        tb.push(y);
        r.push(y / x);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (med(ta), med(tb), med(r))
}

/// The loaded C library's path, from this process's mappings.
fn libc_path() -> PathBuf {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libc.so.6"))
        .map(PathBuf::from)
        .expect("libc.so.6 mapped")
}

/// One name per function address of `path` (`.symtab` and `.dynsym`
/// functions with a size, defined; IFUNCs skipped), and the number of
/// IFUNC addresses skipped.
fn functions(path: &Path) -> (Vec<String>, usize) {
    let data = std::fs::read(path).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let mut by_addr: BTreeMap<u64, String> = BTreeMap::new();
    let mut ifuncs = std::collections::BTreeSet::new();
    for s in elf.symbols().chain(elf.dynamic_symbols()) {
        if s.is_undefined() || s.size() == 0 {
            continue;
        }
        let ifunc = matches!(
            s.flags(),
            object::SymbolFlags::Elf { st_info, .. } if st_info & 0xf == object::elf::STT_GNU_IFUNC
        );
        if ifunc {
            ifuncs.insert(s.address());
            continue;
        }
        if s.kind() != SymbolKind::Text {
            continue;
        }
        let Ok(name) = s.name() else { continue };
        // Versioned duplicates share the address; keep the first name.
        by_addr
            .entry(s.address())
            .or_insert_with(|| name.to_string());
    }
    for a in &ifuncs {
        by_addr.remove(a);
    }
    (by_addr.into_values().collect(), ifuncs.len())
}

/// `FILE:SYMBOL` targets for every name of `names` in `path` (built before
/// any timing: the list of names is the caller's input, not registration
/// work).
fn targets_of(path: &Path, names: &[String]) -> Vec<UprobeTarget> {
    let file = path.to_str().unwrap();
    names
        .iter()
        .map(|n| UprobeTarget::symbol(file, n.as_str()))
        .collect()
}

/// Registers `consumer` on every target in one batch (`register_many`);
/// returns the keys registered and the refusals by error kind.
fn register_all(
    live: &LiveUprobes,
    targets: &[UprobeTarget],
    consumer: &Consumer,
) -> (Vec<UprobeKey>, BTreeMap<String, usize>) {
    let mut keys = Vec::with_capacity(targets.len());
    let mut refused = BTreeMap::new();
    for r in live.register_many(targets, consumer) {
        match r {
            Ok(key) => keys.push(key),
            Err(e) => {
                let kind = format!("{e:?}");
                let kind = kind
                    .split(|c: char| !c.is_alphanumeric())
                    .next()
                    .unwrap_or("?")
                    .to_string();
                *refused.entry(kind).or_insert(0) += 1;
            }
        }
    }
    (keys, refused)
}

/// Unregisters `consumer` from every key in one batch (one grace period).
fn unregister_all(live: &LiveUprobes, keys: &[UprobeKey], consumer: &Consumer) {
    let pairs: Vec<(UprobeKey, &Consumer)> = keys.iter().map(|k| (*k, consumer)).collect();
    assert_eq!(live.unregister_many(&pairs).unwrap(), keys.len());
}

fn quiet_consumer() -> Consumer {
    Consumer::builder()
        .handler(|_, _| ConsumerAction::Continue)
        .build()
}

/// `register_all` / `unregister_all` cycles over `names` of `path`, each
/// phase its own benchmark (only that phase timed).
/// Returns the two ids (which carry n).
fn scale_benches(
    c: &mut Criterion,
    live: &LiveUprobes,
    label: &str,
    path: &Path,
    names: &[String],
) -> [String; 2] {
    let consumer = quiet_consumer();
    let targets = targets_of(path, names);
    // The count the ids carry: what registers (refusals do not change).
    let (keys, refused) = register_all(live, &targets, &consumer);
    unregister_all(live, &keys, &consumer);
    let n = keys.len();
    println!(
        "{label}: {} functions, {n} registered, refused: {refused:?}",
        names.len()
    );
    let mut g = c.benchmark_group("live_uprobe_scale");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let ids = [
        format!("{label}_register/{n}"),
        format!("{label}_unregister/{n}"),
    ];
    // Each timed phase starts with the callback worker idle (an untimed
    // `barrier` after the other phase): the memory a removal retires is
    // freed on the worker after a grace period, and in these back-to-back
    // cycles that would overlap the next timed phase.
    let quiet = || live.registry().domain().barrier();
    let id = &ids[0];
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let (keys, _) = register_all(live, &targets, &consumer);
                t += start.elapsed();
                assert_eq!(keys.len(), n);
                unregister_all(live, &keys, &consumer);
                quiet();
            }
            record(id, t, iters)
        })
    });
    let id = &ids[1];
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let (keys, _) = register_all(live, &targets, &consumer);
                quiet();
                let start = Instant::now();
                unregister_all(live, &keys, &consumer);
                t += start.elapsed();
                quiet();
            }
            record(id, t, iters)
        })
    });
    g.finish();
    ids
}

/// Paired: a byte-identical copy of `so` with no uprobes (`ludl0`) and
/// `so` (whose uprobes are registered), opened and closed in turns; the
/// median of the per-round differences of the `dlopen`s, per pending
/// uprobe (ns).
fn paired_dlopen(so: &Path) -> f64 {
    let peer = generated("ludl0", DLOPEN_FUNCS);
    let open_close = |path: &Path| {
        let t = Instant::now();
        let lib = Lib::open(path);
        let open = t.elapsed();
        lib.close();
        open
    };
    let mut diffs: Vec<f64> = (0..PAIRED_ROUNDS * 5)
        .map(|_| {
            let p = open_close(&peer).as_nanos() as f64;
            let q = open_close(so).as_nanos() as f64;
            (q - p) / DLOPEN_FUNCS as f64
        })
        .collect();
    diffs.sort_by(f64::total_cmp);
    diffs[diffs.len() / 2]
}

/// The paired `dlopen` rounds alone, before anything else ran in this
/// process (the section 3 figure comes after the scale runs, whose
/// hundreds of thousands of registrations leave the allocator's heap and
/// the XOL area larger): per pending uprobe (ns).
fn fresh_paired_dlopen(live: &LiveUprobes) -> f64 {
    let so = generated("ludlf", DLOPEN_FUNCS);
    let (names, _) = functions(&so);
    let pending = quiet_consumer();
    let (keys, refused) = register_all(live, &targets_of(&so, &names), &pending);
    assert!(refused.is_empty(), "{refused:?}");
    let d = paired_dlopen(&so);
    unregister_all(live, &keys, &pending);
    d
}

/// Section 3, `dlopen` with pending uprobes: the criterion cycles and the
/// paired rounds; returns the paired median per pending uprobe (ns).
fn dlopen_benches(c: &mut Criterion, live: &LiveUprobes) -> f64 {
    let so = generated("ludl", DLOPEN_FUNCS);
    let (names, _) = functions(&so);
    assert_eq!(names.len(), DLOPEN_FUNCS);
    // Each cycle's `dlopen` and `dlclose` are timed apart too (the target
    // is the `dlopen`'s; the `dlclose` forgets the installs).
    let cycle = |iters: u64, tag: &str| {
        let (mut open, mut close) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..iters {
            let t = Instant::now();
            let lib = Lib::open(&so);
            open += t.elapsed();
            let t = Instant::now();
            lib.close();
            close += t.elapsed();
        }
        record(&format!("dlopen/open/{tag}"), open, iters);
        record(&format!("dlopen/close/{tag}"), close, iters);
        open + close
    };
    let mut g = c.benchmark_group("live_uprobe_dlopen");
    g.sample_size(20);
    g.bench_function(format!("plain/{DLOPEN_FUNCS}"), |b| {
        b.iter_custom(|iters| record("dlopen/plain", cycle(iters, "plain"), iters))
    });
    let pending = quiet_consumer();
    let (keys, refused) = register_all(live, &targets_of(&so, &names), &pending);
    assert!(refused.is_empty(), "{refused:?}");
    g.bench_function(format!("pending/{DLOPEN_FUNCS}"), |b| {
        b.iter_custom(|iters| record("dlopen/pending", cycle(iters, "pending"), iters))
    });
    let paired_dlopen = paired_dlopen(&so);
    unregister_all(live, &keys, &pending);
    g.finish();

    paired_dlopen
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    if std::env::var("LIVE_UPROBE_ONLY").is_ok_and(|v| v == "dlopen") {
        // The dlopen section alone, in a fresh process.
        let live = LiveUprobes::global().expect("live uprobes (a dynamically linked bench)");
        let paired = dlopen_benches(&mut c, live);
        c.final_summary();
        let _ = std::fs::remove_dir_all(dl_support::fixture_dir(FIXTURES));
        println!(
            "  paired ({} rounds): dlopen with {DLOPEN_FUNCS} pending uprobes costs {:.2} us \
             per pending uprobe more than an unprobed copy's",
            PAIRED_ROUNDS * 5,
            paired / 1e3
        );
        return;
    }
    let kprobes = Live::global().registry();
    // `LIVE_UPROBE_ONLY=hit`: section 1 alone (with the optimized uprobe).
    let only_hit = std::env::var("LIVE_UPROBE_ONLY").is_ok_and(|v| v == "hit");
    let fresh_dlopen = if only_hit {
        f64::NAN
    } else {
        fresh_paired_dlopen(
            LiveUprobes::global().expect("live uprobes (a dynamically linked bench)"),
        )
    };

    // 1. Hit cost.
    let hit_so = hit_fixture();
    let lib = Lib::open(&hit_so);
    let (plain, kp_f, up_f) = (
        func(&lib, "lu_plain"),
        func(&lib, "lu_kp"),
        func(&lib, "lu_up"),
    );
    // SAFETY: complete `int (int)` functions.
    unsafe { assert_eq!(plain(41), 42) };
    hit_bench(&mut c, "plain", plain);
    let raw_hit = |c: &mut Criterion, id: &'static str| {
        let old = raw_trap::install_empty_handler();
        hit_bench(c, id, lu_raw);
        raw_trap::restore_handler(&old);
    };
    let kprobe_hit = |c: &mut Criterion, id: &'static str| {
        let kp = Kprobe::at(kp_f as usize as u64)
            .pre(|_, _| Action::Continue)
            .build();
        kprobes.register(&kp).unwrap();
        hit_bench(c, id, kp_f);
        kprobes.unregister(&kp).unwrap();
    };
    // The kprobe before and after the live uprobes (their dispatcher and
    // the loader watch) are set up.
    raw_hit(&mut c, "raw_int3_before_uprobes");
    kprobe_hit(&mut c, "kprobe_before_uprobes");
    let live = LiveUprobes::global().expect("live uprobes (a dynamically linked bench)");
    raw_hit(&mut c, "raw_int3");
    kprobe_hit(&mut c, "kprobe");
    let up = quiet_consumer();
    let up_key = live
        .register(
            &UprobeTarget::symbol(hit_so.to_str().unwrap(), "lu_up"),
            &up,
        )
        .unwrap()
        .key();
    hit_bench(&mut c, "uprobe", up_f);
    // Paired: the kprobe and the uprobe installed together, timed in turns.
    let kp = Kprobe::at(kp_f as usize as u64)
        .pre(|_, _| Action::Continue)
        .build();
    kprobes.register(&kp).unwrap();
    let (pk, pu, pr) = paired(
        || call_loop(kp_f, PAIRED_CALLS),
        || call_loop(up_f, PAIRED_CALLS),
    );
    kprobes.unregister(&kp).unwrap();
    // The optimized uprobe beside the trap one.
    let [p6, trap6, jump6] = jump_hit_benches(&mut c, live, &hit_so, &lib);
    let [rp6, rtrap6, rjump6] = uretprobe_benches(&mut c, live, &hit_so, &lib);
    // What the shared return trampoline costs each return in a dispatcher
    // it is not for (every attached one is asked): a miss, no frame of
    // this thread at this stack pointer.
    let miss = |c: &mut Criterion, id: &'static str, d: &'static dyn TrapDispatcher| {
        let mut g = c.benchmark_group("live_uprobe_hit");
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut regs = Regs {
                    sp: 0x1000,
                    ..Regs::default()
                };
                let t0 = Instant::now();
                for _ in 0..iters {
                    black_box(d.on_return(black_box(&mut regs)));
                }
                record(&format!("hit/{id}"), t0.elapsed(), iters)
            })
        });
        g.finish();
    };
    miss(&mut c, "return_miss_uprobes", live);
    miss(&mut c, "return_miss_kprobes", kprobes);
    let m = |id: &str| median_ns(id);
    let jump_summary = || {
        println!(
            "  paired ({PAIRED_ROUNDS} rounds of {PAIRED_CALLS} calls), 6-byte function: \
             unprobed {p6:.1} ns, trap uprobe {trap6:.1} ns (+{:.1} ns per call), \
             jump-optimized uprobe {jump6:.1} ns (+{:.1} ns per call); trap / jump added cost \
             {:.1}x",
            trap6 - p6,
            jump6 - p6,
            (trap6 - p6) / (jump6 - p6)
        );
        if let (Some(p), Some(t), Some(j)) =
            (m("hit/plain6"), m("hit/uprobe_trap6"), m("hit/uprobe_jump"))
        {
            println!(
                "  hit, 6-byte function: plain {p:.1} ns, trap uprobe {t:.1} ns, \
                 jump-optimized uprobe {j:.1} ns (+{:.1} ns per call)",
                j - p
            );
        }
        println!(
            "  paired ({PAIRED_ROUNDS} rounds of {PAIRED_CALLS} calls), uretprobe entry + return, \
             6-byte function: unprobed {rp6:.1} ns, trap entry {rtrap6:.1} ns (+{:.1} ns per \
             call), jump-optimized entry {rjump6:.1} ns (+{:.1} ns per call); returns through \
             the assembly trampoline (no trap) in both",
            rtrap6 - rp6,
            rjump6 - rp6
        );
        if let (Some(t), Some(j)) = (m("hit/uretprobe_trap6"), m("hit/uretprobe_jump")) {
            println!("  uretprobe entry + return: trap entry {t:.1} ns, jump-optimized {j:.1} ns");
        }
        if let (Some(u), Some(k)) = (m("hit/return_miss_uprobes"), m("hit/return_miss_kprobes")) {
            println!(
                "  a return asked of a dispatcher it is not for: live uprobes {u:.1} ns (what \
                 each kretprobe return now adds), kprobe registry {k:.1} ns (each uretprobe \
                 return)"
            );
        }
    };
    if only_hit {
        live.unregister(up_key, &up).unwrap();
        lib.close();
        c.final_summary();
        let _ = std::fs::remove_dir_all(dl_support::fixture_dir(FIXTURES));
        println!("\nlive uprobes, hits only (medians):");
        println!("  paired: kprobe {pk:.1} ns, uprobe {pu:.1} ns; uprobe / kprobe {pr:.3}x");
        jump_summary();
        return;
    }

    // 2. Attach at scale: the C library, then a generated one.
    let libc_so = libc_path();
    let (names, ifuncs) = functions(&libc_so);
    println!(
        "{}: {} functions with a size (one per address), {ifuncs} IFUNC addresses skipped",
        libc_so.display(),
        names.len()
    );
    let mut scale_ids: Vec<String> = scale_benches(&mut c, live, "libc", &libc_so, &names).into();
    // The hit with every C-library probe installed (and the one of (1)).
    let counting = quiet_consumer();
    let libc_targets = targets_of(&libc_so, &names);
    let (keys, _) = register_all(live, &libc_targets, &counting);
    let installed = live.registry().len();
    hit_bench(&mut c, "uprobe_with_libc", up_f);
    unregister_all(live, &keys, &counting);
    println!(
        "uprobe_with_libc: {installed} uprobes in the registry; C-library probe hits while \
         installed: {}",
        counting.hits()
    );
    // Paired: rounds alternate the uprobe alone and with every C-library
    // function probed (registered and removed in a batch between halves).
    let libc_keys = std::cell::RefCell::new(Vec::new());
    let (pa, pw, pwr) = paired(
        || {
            let t = call_loop(up_f, PAIRED_CALLS);
            *libc_keys.borrow_mut() = register_all(live, &libc_targets, &counting).0;
            t
        },
        || {
            let t = call_loop(up_f, PAIRED_CALLS);
            unregister_all(live, &libc_keys.borrow(), &counting);
            t
        },
    );
    // The trap handler's outer half calls `__errno_location` (it saves
    // errno): with that one C-library function probed, each hit nests a
    // second trap.
    let errno_c = quiet_consumer();
    let errno_key = live
        .register(
            &UprobeTarget::symbol(libc_so.to_str().unwrap(), "__errno_location"),
            &errno_c,
        )
        .unwrap()
        .key();
    hit_bench(&mut c, "uprobe_with_errno_location", up_f);
    live.unregister(errno_key, &errno_c).unwrap();
    hit_bench(&mut c, "uprobe_again", up_f);
    live.unregister(up_key, &up).unwrap();
    lib.close();

    let gen = std::env::var("LIVE_UPROBE_GEN").map_or(true, |v| v != "0");
    if gen {
        for (label, n) in [("gen", GEN_FUNCS), ("gen100k", GEN_100K_FUNCS)] {
            let so = generated(&format!("lu{label}"), n);
            let glib = Lib::open(&so);
            let (names, _) = functions(&so);
            assert_eq!(names.len(), n);
            scale_ids.extend(scale_benches(&mut c, live, label, &so, &names));
            glib.close();
        }
    }

    // 3. dlopen with pending uprobes.
    let paired_dlopen = dlopen_benches(&mut c, live);

    c.final_summary();
    let _ = std::fs::remove_dir_all(dl_support::fixture_dir(FIXTURES));

    println!("\nlive uprobes (medians):");
    jump_summary();
    println!(
        "  paired ({PAIRED_ROUNDS} rounds of {PAIRED_CALLS} calls): kprobe {pk:.1} ns, uprobe \
         {pu:.1} ns; uprobe / kprobe {pr:.3}x (target <= 1.15x: {})",
        if pr <= 1.15 { "met" } else { "MISSED" }
    );
    println!(
        "  paired: uprobe alone {pa:.1} ns, with the C library probed {pw:.1} ns; with / alone \
         {pwr:.3}x (target: unchanged within noise, taken as <= 1.15x: {})",
        if pwr <= 1.15 { "met" } else { "MISSED" }
    );
    if let (Some(k), Some(u), Some(r), Some(p)) = (
        m("hit/kprobe"),
        m("hit/uprobe"),
        m("hit/raw_int3"),
        m("hit/plain"),
    ) {
        println!(
            "  hit: plain {p:.1} ns, raw int3 {r:.1} ns, kprobe {k:.1} ns ({:.3}x raw), \
             uprobe {u:.1} ns ({:.3}x raw); uprobe / kprobe {:.3}x (target <= 1.15x: {})",
            k / r,
            u / r,
            u / k,
            if u / k <= 1.15 { "met" } else { "MISSED" }
        );
        if let (Some(w), Some(a)) = (m("hit/uprobe_with_libc"), m("hit/uprobe_again")) {
            println!(
                "  hit with the C library probed: {w:.1} ns, {:.3}x alone before, {:.3}x alone after",
                w / u,
                w / a
            );
        }
        if let (Some(e), Some(a)) = (m("hit/uprobe_with_errno_location"), m("hit/uprobe_again")) {
            println!(
                "  hit with only __errno_location probed: {e:.1} ns, {:.3}x alone after",
                e / a
            );
        }
        if let (Some(rb), Some(kb)) = (
            m("hit/raw_int3_before_uprobes"),
            m("hit/kprobe_before_uprobes"),
        ) {
            println!(
                "  before LiveUprobes::global(): raw int3 {rb:.1} ns, kprobe {kb:.1} ns ({:.3}x raw)",
                kb / rb
            );
        }
    }
    let per = |id: &str| -> Option<(usize, f64)> {
        let n: usize = id.rsplit('/').next()?.parse().ok()?;
        Some((n, m(id)? / n as f64))
    };
    {
        for id in &scale_ids {
            if let Some((n, ns)) = per(id) {
                let (target, what) = if id.contains("_unregister") {
                    (1000.0, "<= 1 us in a batch")
                } else {
                    (5000.0, "<= 5 us")
                };
                println!(
                    "  {id}: {:.2} us per probe (n = {n}; target {what}: {})",
                    ns / 1e3,
                    if ns <= target { "met" } else { "MISSED" }
                );
            }
        }
    }
    for (when, d) in [
        ("first, in a fresh process", fresh_dlopen),
        ("after the scale runs", paired_dlopen),
    ] {
        println!(
            "  paired ({} rounds, {when}): dlopen with {DLOPEN_FUNCS} pending uprobes costs \
             {:.2} us per pending uprobe more than an unprobed copy's (target <= 2 us: {})",
            PAIRED_ROUNDS * 5,
            d / 1e3,
            if d <= 2000.0 { "met" } else { "MISSED" }
        );
    }
    if let (Some(p), Some(q)) = (m("dlopen/open/plain"), m("dlopen/open/pending")) {
        let per = (q - p) / DLOPEN_FUNCS as f64;
        println!(
            "  dlopen: plain {:.1} us, {DLOPEN_FUNCS} pending {:.1} us ({:.1}x): {:.2} us per \
             pending uprobe (target <= 2 us: {})",
            p / 1e3,
            q / 1e3,
            q / p,
            per / 1e3,
            if per <= 2000.0 { "met" } else { "MISSED" }
        );
    }
    if let (Some(p), Some(q)) = (m("dlopen/close/plain"), m("dlopen/close/pending")) {
        println!(
            "  dlclose: plain {:.1} us, {DLOPEN_FUNCS} installs forgotten {:.1} us: {:.2} us per \
             install (no target)",
            p / 1e3,
            q / 1e3,
            (q - p) / DLOPEN_FUNCS as f64 / 1e3
        );
    }
    if let (Some(p), Some(q)) = (m("dlopen/plain"), m("dlopen/pending")) {
        println!(
            "  dlopen+dlclose cycle: plain {:.1} us, pending {:.1} us: {:.2} us per uprobe",
            p / 1e3,
            q / 1e3,
            (q - p) / DLOPEN_FUNCS as f64 / 1e3
        );
    }
}
