//! Stress test of the uretprobe return-stack pool: more threads than the
//! space has stacks make nested tracked calls, sometimes leave them with a
//! `longjmp`, and exit; new threads take their place.
//!
//! Checked: every call that returns goes back to its own caller, through
//! the trampoline exactly when its entry hijacked it; the return handlers
//! ran once per tracked call that returned (none for abandoned ones); every
//! call whose entry was not hijacked was counted in `nmissed` (the pool was
//! exhausted: no other reason exists here); at the end no stack is held
//! (threads that exited holding abandoned frames gave theirs back).
//!
//! Duration: `URETPOOL_STRESS_SECS` (default 1; at least 5 when `CI=true`).
//! Run: `cargo test --release --test uprobe_ret_pool_stress -- --ignored --nocapture`.

mod stress_time;
mod uprobe_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rcu_registry::probes::uprobe::Consumer;
use uprobe_support::*;

const A: u64 = 0x40_0000;
const CALLER: u64 = 0x9000_0000;
/// Threads calling at once: more than the pool's stacks.
const CALLERS: usize = 5;
const STACKS: usize = 2;
/// Calls a thread makes before it exits and a new one takes its place.
const CALLS_PER_THREAD: u64 = 200;

fn duration() -> Duration {
    stress_time::stress_duration("URETPOOL_STRESS_SECS", 1.0, 5.0)
}

#[derive(Default)]
struct Counts {
    /// Returns through the trampoline.
    tracked: AtomicU64,
    /// Entries not hijacked.
    missed: AtomicU64,
    /// Tracked calls left with a `longjmp`.
    abandoned: AtomicU64,
    threads: AtomicU64,
}

/// Whether the innermost call's entry hijacked its return address.
fn hijacked(t: &SimThread, space: &MemSpace) -> bool {
    Some(t.return_slot()) == space.trampoline
}

/// One thread's life: `CALLS_PER_THREAD` outer calls, each with a nested
/// one; every seventh is left with a `longjmp` out of both.
fn life(reg: &Registry, a: &MemSpace, n: &Counts, seed: u64) {
    let mut t = SimThread::new();
    let count = |tracked: bool| {
        let c = if tracked { &n.tracked } else { &n.missed };
        c.fetch_add(1, Ordering::Relaxed);
    };
    for i in 0..CALLS_PER_THREAD {
        let _ = t.call(reg, a, A + FN0, CALLER);
        let outer = hijacked(&t, a);
        let _ = t.call(reg, a, A + FN1, A + 1);
        let inner = hijacked(&t, a);
        if (i + seed) % 7 == 6 {
            for h in [inner, outer] {
                t.abandon_innermost();
                if h {
                    n.abandoned.fetch_add(1, Ordering::Relaxed);
                } else {
                    count(false);
                }
            }
            continue;
        }
        for (h, to) in [(inner, A + 1), (outer, CALLER)] {
            let want = if h {
                Ret::Trampoline(to)
            } else {
                Ret::Direct(to)
            };
            assert_eq!(t.ret(reg, a, 0), want);
            count(h);
        }
    }
    // Exits; its last abandoned frames (if any) go back with it.
}

#[test]
#[ignore = "stress: run with --ignored (see the file's docs)"]
fn threads_outnumbering_the_stacks_share_them_and_give_them_back() {
    let reg = Arc::new(Registry::new(Default::default()).with_return_stacks(STACKS));
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let c = Consumer::builder().ret_handler(|_, _| {}).build();
    for f in [FN0, FN1] {
        reg.register_in_function(key(f), f, &c).unwrap();
    }
    let n = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CALLERS as u64)
        .map(|w| {
            let (reg, a, n, stop) = (reg.clone(), a.clone(), n.clone(), stop.clone());
            thread::spawn(move || {
                let mut seed = w;
                // At least two lives each before looking at `stop`, so the
                // final check (more threads than callers) holds on any
                // schedule.
                let mut lives = 0;
                while lives < 2 || !stop.load(Ordering::Relaxed) {
                    lives += 1;
                    let (r, s, c) = (reg.clone(), a.clone(), n.clone());
                    thread::spawn(move || life(&r, &s, &c, seed))
                        .join()
                        .unwrap();
                    n.threads.fetch_add(1, Ordering::Relaxed);
                    seed += 1;
                }
            })
        })
        .collect();
    let start = Instant::now();
    while start.elapsed() < duration() {
        thread::sleep(Duration::from_millis(20));
        assert!(reg.return_stacks_in_use(a.id) <= STACKS);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let (tracked, missed, abandoned, threads) = (
        n.tracked.load(Ordering::Relaxed),
        n.missed.load(Ordering::Relaxed),
        n.abandoned.load(Ordering::Relaxed),
        n.threads.load(Ordering::Relaxed),
    );
    let nmissed = reg.nmissed(key(FN0)) + reg.nmissed(key(FN1));
    println!(
        "uretpool stress: {threads} threads, {tracked} tracked returns, \
         {missed} missed calls, {abandoned} abandoned tracked calls"
    );
    assert_eq!(
        c.ret_hits(),
        tracked,
        "one return handler per tracked return"
    );
    assert_eq!(nmissed, missed, "every call not hijacked was counted");
    assert_eq!(reg.return_stacks_in_use(a.id), 0, "every stack given back");
    assert!(tracked > 0 && threads > CALLERS as u64);
}
