//! Stress (issue 15, live uprobes): worker threads call two functions of a
//! fixture library while the test thread, round after round, optimizes,
//! registers an opted-out
//! consumer (back to the trap path), a uprobe inside the displaced bytes
//! (back to the trap path, refused while it stays), switches the optimizer
//! off and on, and registers, optimizes and unregisters a uprobe on the
//! second function. The first function's uprobe stays registered: every
//! call is counted exactly once on whichever path it took; every result is
//! right; the bytes are the file's after the last unregistration.
//!
//! Overlap is forced, not hoped for: each round's changes start only once
//! every worker has called both functions, and workers keep calling until
//! the changes are done.
//!
//! Two tests, one at a time: one round (every build), and the timed run,
//! `RUNTIME_JUMP_STRESS_SECS` (default 3 s; at least 10 s when `CI=true`),
//! ignored unless asked for:
//! `cargo test --release --test runtime_jump_uprobes_stress -- --ignored`
//! (`scripts/test-all` runs every ignored test in release).

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod dl_support;
mod stress_time;

use dl_support::Lib;
use rcu_registry::probes::runtime::LiveUprobes;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeTarget};

const WORKERS: usize = 3;
/// Wall time of the timed run.
fn duration() -> Duration {
    stress_time::stress_duration("RUNTIME_JUMP_STRESS_SECS", 3.0, 10.0)
}

fn counting(n: &'static AtomicU64, opt_out: bool) -> Consumer {
    Consumer::builder()
        .handler(move |_, _| {
            n.fetch_add(1, Ordering::Relaxed);
            ConsumerAction::Continue
        })
        .jump_opt_out(opt_out)
        .build()
}

fn code_at(addr: u64, n: usize) -> Vec<u8> {
    // SAFETY: mapped code of the loaded fixture, readable.
    unsafe { std::slice::from_raw_parts(addr as *const u8, n) }.to_vec()
}

#[test]
fn one_round_counts_every_call_exactly_while_uprobes_are_optimized_and_put_back() {
    stress(None);
}

#[test]
#[ignore = "stress: run with --release -- --ignored"]
fn calls_are_counted_exactly_while_uprobes_are_optimized_and_put_back() {
    stress(Some(duration()));
}

/// Rounds until `duration` has passed (`None`: one round). One run at a
/// time: both register on the same library's functions.
fn stress(duration: Option<Duration>) {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = LiveUprobes::global().expect("live uprobes in a dynamically linked test binary");
    let so = dl_support::build_so(
        "jupstress",
        "libjupstress.so",
        &dl_support::add_k_source(&[("fx_add3", 3), ("fx_add5", 5)]),
        &[],
    );
    let path = so.to_str().unwrap();
    let lib = Lib::open(&so);
    let (f3, f5) = (lib.func(c"fx_add3"), lib.func(c"fx_add5"));
    let (a3, a5) = (f3 as usize as u64, f5 as usize as u64);
    let (orig3, orig5) = (code_at(a3, 6), code_at(a5, 6));
    // This run's counters (the consumers' handlers need `'static`).
    let counter = || &*Box::leak(Box::new(AtomicU64::new(0)));
    let (kept_n, out_n, inside_n, churn_n) = (counter(), counter(), counter(), counter());
    let kept = counting(kept_n, false);
    let key3 = live
        .register(&UprobeTarget::symbol(path, "fx_add3"), &kept)
        .unwrap()
        .key();
    let inside_target = UprobeTarget::symbol(path, "fx_add3").offset(2);
    let start = Instant::now();
    let (mut rounds, mut optimized, mut total) = (0u64, 0usize, 0u64);
    loop {
        rounds += 1;
        let stop = AtomicBool::new(false);
        let warmed = AtomicU64::new(0);
        let calls: u64 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..WORKERS)
                .map(|t| {
                    let (stop, warmed) = (&stop, &warmed);
                    s.spawn(move || {
                        let mut n = 0u64;
                        let mut first = true;
                        loop {
                            let x = (n as i32).wrapping_mul(t as i32 + 1);
                            assert_eq!(f3(x), x.wrapping_add(3));
                            assert_eq!(f5(x), x.wrapping_add(5));
                            n += 1;
                            if first {
                                first = false;
                                warmed.fetch_add(1, Ordering::SeqCst);
                            }
                            if stop.load(Ordering::SeqCst) {
                                return n;
                            }
                        }
                    })
                })
                .collect();
            while warmed.load(Ordering::SeqCst) < WORKERS as u64 {
                std::thread::yield_now();
            }
            // The changes, while every worker calls.
            optimized += live.optimize_now().optimized;
            let out = counting(out_n, true);
            live.registry().register(key3, &out).unwrap();
            assert!(!live.is_optimized(key3));
            live.optimize_now();
            live.unregister(key3, &out).unwrap();
            optimized += live.optimize_now().optimized;
            let inside = counting(inside_n, false);
            let inside_key = live.register(&inside_target, &inside).unwrap().key();
            assert!(
                !live.is_optimized(key3),
                "a uprobe inside the displaced bytes"
            );
            live.optimize_now();
            assert!(!live.is_optimized(key3));
            live.unregister(inside_key, &inside).unwrap();
            live.jump_optimizer().set_enabled(false);
            live.jump_optimizer().set_enabled(true);
            let churn = counting(churn_n, false);
            let key5 = live
                .register(&UprobeTarget::symbol(path, "fx_add5"), &churn)
                .unwrap()
                .key();
            optimized += live.optimize_now().optimized;
            live.unregister(key5, &churn).unwrap();
            optimized += live.optimize_now().optimized;
            stop.store(true, Ordering::SeqCst);
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        total += calls;
        assert_eq!(kept_n.load(Ordering::Relaxed), total, "round {rounds}");
        if duration.map_or(true, |d| start.elapsed() > d) {
            break;
        }
    }
    assert_eq!(live.registry().nmissed(key3), 0);
    live.unregister(key3, &kept).unwrap();
    live.optimize_now();
    assert_eq!(code_at(a3, 6), orig3);
    assert_eq!(code_at(a5, 6), orig5);
    assert!(churn_n.load(Ordering::Relaxed) <= total);
    println!(
        "{rounds} rounds, {total} calls per function, {optimized} sites optimized; \
         opted-out consumer {} hits, inside {} hits, churned {} hits",
        out_n.load(Ordering::Relaxed),
        inside_n.load(Ordering::Relaxed),
        churn_n.load(Ordering::Relaxed)
    );
    lib.close();
}
