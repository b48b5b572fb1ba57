//! Helpers shared by the probe benchmarks (`#[path]`-included: each bench is
//! its own crate): per-sample timings with medians, and releasing worker
//! threads together.

use std::collections::BTreeMap;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

/// Nanoseconds per iteration of every sample, per benchmark (medians are
/// reported: on a shared 2-core machine a sample where another process took
/// a core is an outlier, not the typical case).
static SAMPLES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Records one criterion sample of `iters` iterations; returns `elapsed`.
pub fn record(id: &str, elapsed: Duration, iters: u64) -> Duration {
    let per_iter = elapsed.as_nanos() as f64 / iters.max(1) as f64;
    SAMPLES
        .lock()
        .unwrap()
        .entry(id.to_string())
        .or_default()
        .push(per_iter);
    elapsed
}

/// The median ns per iteration recorded for `id`.
pub fn median_ns(id: &str) -> Option<f64> {
    let mut s = SAMPLES.lock().unwrap().get(id)?.clone();
    s.sort_by(f64::total_cmp);
    Some(s[s.len() / 2])
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: `set` is a plain bitmask owned by this frame; CPU_ZERO/CPU_SET
    // write only inside it, and sched_setaffinity(0, ..) reads it for the
    // calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Runs `work(thread, iters)` on `threads` threads released together (each
/// pinned to CPU `thread` when `pin`); returns the wall time.
pub fn on_threads(
    threads: usize,
    iters: u64,
    pin: bool,
    work: impl Fn(usize, u64) + Sync,
) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (barrier, work) = (&barrier, &work);
            s.spawn(move || {
                if pin {
                    pin_to_cpu(t);
                }
                barrier.wait();
                work(t, iters);
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        start.elapsed()
    })
}
