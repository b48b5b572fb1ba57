//! Stress (issue 15): worker threads call 128 probed functions while the
//! test thread optimizes, un-optimizes (opt-outs), re-optimizes and churns
//! registrations of other functions, round after round. Every call is
//! counted exactly once on whichever path it took, every result is right,
//! and every byte is original after unregistration.
//!
//! Two tests: one round (every build; debug assertions on in `cargo test`),
//! and the timed run, `RUNTIME_JUMP_STRESS_SECS` (default 3 s; at least 10 s
//! when `CI=true`), ignored unless asked for:
//! `cargo test --release --test runtime_jump_stress -- --ignored`
//! (`scripts/test-all` runs every ignored test in release).
//!
//! Overlap is forced, not hoped for: each round's changes start only once
//! every worker has called every function, and workers keep calling until
//! the changes are done.

#![cfg(target_arch = "x86_64")]

mod runtime_jump_support;
mod stress_time;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::probes::runtime::Live;
use runtime_jump_support::*;

const WORKERS: usize = 3;
const FUNCS: usize = 128;
/// Functions whose probes come and go during a round (results checked,
/// counts not: a call may run before or after the registration).
const CHURN: usize = 32;
/// Wall time of the timed run.
fn duration() -> Duration {
    stress_time::stress_duration("RUNTIME_JUMP_STRESS_SECS", 3.0, 10.0)
}

#[test]
fn one_round_counts_every_call_exactly_while_sites_are_optimized_and_restored() {
    stress(None);
}

#[test]
#[ignore = "stress: run with --release -- --ignored"]
fn calls_are_counted_exactly_while_sites_are_optimized_and_restored() {
    stress(Some(duration()));
}

/// Rounds until `duration` has passed (`None`: one round).
fn stress(duration: Option<Duration>) {
    let _g = serial();
    let live = Live::global();
    let reg = live.registry();
    let funcs = many();
    let counted = &funcs[..FUNCS - CHURN];
    let churned = &funcs[FUNCS - CHURN..];
    let originals: Vec<Vec<u8>> = funcs.iter().map(|&f| code(addr(f), 9)).collect();
    let start = Instant::now();
    let mut rounds = 0;
    let mut optimized_total = 0;
    loop {
        rounds += 1;
        let probes: Vec<Kprobe> = counted
            .iter()
            .map(|&f| Kprobe::at(addr(f)).pre(|_, _| Action::Continue).build())
            .collect();
        for p in &probes {
            reg.register(p).unwrap();
        }
        let stop = AtomicBool::new(false);
        let warmed = AtomicU64::new(0);
        let calls: Vec<Vec<u64>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..WORKERS)
                .map(|t| {
                    let (stop, warmed) = (&stop, &warmed);
                    s.spawn(move || {
                        let mut n = vec![0u64; FUNCS];
                        let mut pass = 0u32;
                        loop {
                            for (k, &f) in funcs.iter().enumerate() {
                                let x = (t as u32) << 24 | pass;
                                assert_eq!(call(f, x), x + k as u32, "rj_many_{k}");
                                n[k] += 1;
                            }
                            pass += 1;
                            if pass == 1 {
                                warmed.fetch_add(1, Ordering::AcqRel);
                            }
                            if stop.load(Ordering::Acquire) {
                                return n;
                            }
                        }
                    })
                })
                .collect();
            // Every worker is calling before anything changes.
            while warmed.load(Ordering::Acquire) < WORKERS as u64 {
                std::thread::yield_now();
            }
            let r = live.optimize_now();
            optimized_total += r.optimized;
            assert!(
                counted
                    .iter()
                    .all(|&f| live.jump_optimizer().is_optimized(addr(f))),
                "every counted site optimized: {r:?}"
            );
            // Un-optimize every other one, then churn registrations.
            for p in probes.iter().step_by(2) {
                live.set_jump_opt_out(p, true);
            }
            let extra: Vec<Kprobe> = churned
                .iter()
                .map(|&f| Kprobe::at(addr(f)).build())
                .collect();
            for p in &extra {
                reg.register(p).unwrap();
            }
            let r = live.optimize_now();
            optimized_total += r.optimized;
            for p in probes.iter().step_by(2) {
                live.set_jump_opt_out(p, false);
            }
            for p in extra.iter().step_by(2) {
                reg.unregister(p).unwrap();
            }
            let r = live.optimize_now();
            optimized_total += r.optimized;
            for p in extra.iter().skip(1).step_by(2) {
                reg.unregister(p).unwrap();
            }
            stop.store(true, Ordering::Release);
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        for (k, p) in probes.iter().enumerate() {
            let want: u64 = calls.iter().map(|n| n[k]).sum();
            assert_eq!(p.hits(), want, "rj_many_{k}: hits vs calls");
            assert_eq!(p.nmissed(), 0);
        }
        for p in &probes {
            reg.unregister(p).unwrap();
        }
        for (k, &f) in funcs.iter().enumerate() {
            assert_eq!(code(addr(f), 9), originals[k], "rj_many_{k} restored");
        }
        if duration.map_or(true, |d| start.elapsed() >= d) {
            break;
        }
    }
    let stats = live.jump_optimizer().detour_stats();
    println!(
        "{rounds} rounds, {optimized_total} optimizations, detours: {} allocs, {} recycled, {} parked",
        stats.allocs, stats.recycled, stats.parked_frees
    );
    assert!(rounds >= 1 && optimized_total >= rounds * (FUNCS - CHURN));
}
