//! The writer paths of live probes ("top halves") on the running process:
//! `register`, `unregister_nosync` and `commit` of n kprobes, each on its own
//! function of this binary, with the real [`Live`] runtime (text writes
//! with `mprotect` and core syncs, XOL slots, symbol lookups by address).
//!
//! The functions are 10,000 copies of `mov eax, edi; add eax, 1; ret`
//! (out of line, boosted: each probe takes an XOL slot), 16 bytes apart,
//! each with its own ELF symbol. One cycle registers n probes, removes them
//! with `unregister_nosync` each and one `commit`; the three phases are
//! timed apart and printed per probe (median over samples) at n = 200 and
//! n = 10,000 (`LIVE_TOP_MAX` lowers the top).
//!
//! No peer: the figures are absolute, for before/after comparisons in one
//! session (see BENCHMARKS.md, "Live top halves"). Run:
//! `cargo bench --bench live_top -- --warm-up-time 1 --measurement-time 2`

use std::arch::global_asm;
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "common/samples.rs"]
mod samples;
use samples::{median_ns, record};

use criterion::Criterion;
use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::probes::runtime::Live;

/// Functions in `.text.lt_functions`.
const FUNCS: usize = 10_000;
/// Their spacing (`.p2align 4`).
const STRIDE: u64 = 16;

// `lt_0` .. `lt_9999`, each `mov eax, edi; add eax, 1; ret` with its own
// symbol and size (the registry checks boundaries from a function's start).
global_asm!(
    ".pushsection .text.lt_functions,\"ax\",@progbits",
    ".altmacro",
    ".macro lt_fn n",
    ".p2align 4",
    ".globl lt_\\n",
    ".type lt_\\n,@function",
    "lt_\\n:",
    ".byte 0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3",
    ".size lt_\\n, . - lt_\\n",
    ".endm",
    ".set lt_i, 0",
    ".rept 10000",
    "lt_fn %lt_i",
    ".set lt_i, lt_i + 1",
    ".endr",
    ".noaltmacro",
    ".popsection",
);

extern "C" {
    fn lt_0(x: u32) -> u32;
    fn lt_9999(x: u32) -> u32;
}

fn base() -> u64 {
    lt_0 as *const () as usize as u64
}

/// Probe counts (capped by `LIVE_TOP_MAX`).
fn sizes() -> Vec<usize> {
    let max = std::env::var("LIVE_TOP_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    [200, FUNCS].into_iter().filter(|&n| n <= max).collect()
}

/// One cycle on the first `n` functions: the time of each phase.
fn cycle(live: &Live, n: usize) -> [Duration; 3] {
    let reg = live.registry();
    let probes: Vec<Kprobe> = (0..n)
        .map(|i| {
            Kprobe::at(base() + i as u64 * STRIDE)
                .pre(|_, _| Action::Continue)
                .build()
        })
        .collect();
    let t = Instant::now();
    for p in &probes {
        reg.register(p).unwrap();
    }
    let register = t.elapsed();
    let t = Instant::now();
    for p in &probes {
        reg.unregister_nosync(p).unwrap();
    }
    let nosync = t.elapsed();
    let t = Instant::now();
    reg.commit();
    let commit = t.elapsed();
    assert!(reg.is_empty());
    [register, nosync, commit]
}

const PHASES: [&str; 3] = ["register", "unregister_nosync", "commit"];

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let live = Live::global();
    // The layout the addresses assume.
    assert_eq!(
        lt_9999 as *const () as usize as u64,
        base() + (FUNCS as u64 - 1) * STRIDE
    );
    // SAFETY: a complete C-ABI function (the assertion below checks it runs).
    assert_eq!(unsafe { lt_0(41) }, 42);
    let mut g = c.benchmark_group("live_top");
    g.sample_size(10);
    for n in sizes() {
        g.bench_function(format!("cycle/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut sum = [Duration::ZERO; 3];
                for _ in 0..iters {
                    for (s, t) in sum.iter_mut().zip(cycle(live, n)) {
                        *s += t;
                    }
                }
                for (phase, t) in PHASES.iter().zip(sum) {
                    record(&format!("{phase}/{n}"), t, iters);
                }
                sum.iter().sum()
            })
        });
    }
    g.finish();
    c.final_summary();
    println!("\nlive top halves, distinct functions (median per probe):");
    for n in sizes() {
        let cells: Vec<String> = PHASES
            .iter()
            .filter_map(|phase| {
                median_ns(&format!("{phase}/{n}"))
                    .map(|ns| format!("{phase} {:.2} us", ns / n as f64 / 1e3))
            })
            .collect();
        println!("  n = {n:>5}: {}", cells.join(", "));
    }
}
