//! Re-entry through signals on running code: a signal handler calls a
//! kretprobed function while the interrupted thread is anywhere in calls to
//! the same function, including inside the return path that holds the
//! kretprobe instance table's spin lock. The re-entrancy flag is raised
//! before that lock, so a nested entry that lands there is counted missed
//! and takes no lock; raised after it (the old order), such a landing spins
//! forever on the lock its own thread holds, which the watchdog reports.
//!
//! `RT_STRESS_SECS` sets the duration (default 1 s). Prints its counts.

mod runtime_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcu_registry::probes::kprobe::Kretprobe;
use rcu_registry::probes::runtime::{steps_in_flight, Live};
use runtime_support::*;

/// How long the worker may make no progress before the test calls it a
/// deadlock (a call takes microseconds; a loaded 2-core machine may
/// deschedule a thread for a few hundred milliseconds).
const STALL: Duration = Duration::from_secs(5);

static SIG_CALLS: AtomicU64 = AtomicU64::new(0);
static SIG_BAD: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_sig: libc::c_int) {
    if call(rtp_alt, 1) != 777 {
        SIG_BAD.fetch_add(1, Ordering::Relaxed);
    }
    SIG_CALLS.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn a_signal_handler_calling_a_kretprobed_function_inside_its_return_path_never_deadlocks() {
    let _g = serial();
    let reg = Live::global().registry();
    let returns = Arc::new(AtomicU64::new(0));
    let r2 = returns.clone();
    let krp = Kretprobe::<()>::at(addr(rtp_alt))
        .handler(move |_, _, ret| {
            assert_eq!(ret, 777);
            r2.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .unwrap();
    reg.register_kretprobe(&krp).unwrap();
    // SAFETY: a plain handler for SIGUSR1, which nothing else in this test
    // binary uses; restored below.
    let old = unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as usize) };
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let duration = stress_secs(1.0);
    let mut sent = 0u64;
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, calls) = (&stop, &calls);
        let worker = s.spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() }).unwrap();
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(call(rtp_alt, 0), 777);
                calls.fetch_add(1, Ordering::Relaxed);
            }
        });
        let target = rx.recv().unwrap();
        let t0 = Instant::now();
        let (mut last, mut last_change) = (0, Instant::now());
        // A deadlocked worker cannot be joined: report it and abort instead
        // of hanging the test run.
        let mut watchdog = || {
            let now = calls.load(Ordering::Relaxed);
            if now != last {
                (last, last_change) = (now, Instant::now());
            } else if last_change.elapsed() > STALL {
                eprintln!(
                    "the worker made no progress for {STALL:?} after {now} calls: \
                     deadlocked on the kretprobe instance lock its own thread holds"
                );
                std::process::abort();
            }
        };
        while t0.elapsed() < duration {
            // SAFETY: `target` runs until `stop`; SIGUSR1 has a handler.
            assert_eq!(unsafe { libc::pthread_kill(target, libc::SIGUSR1) }, 0);
            sent += 1;
            std::thread::sleep(Duration::from_micros(20));
            watchdog();
        }
        stop.store(true, Ordering::Relaxed);
        while !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
            watchdog();
        }
        worker.join().unwrap();
    });
    // SAFETY: restores the disposition found above.
    unsafe { libc::signal(libc::SIGUSR1, old) };
    reg.unregister_kretprobe(&krp).unwrap();

    let calls = calls.load(Ordering::Relaxed);
    let sig_calls = SIG_CALLS.load(Ordering::Relaxed);
    let (hits, missed) = (krp.probe().hits(), krp.probe().nmissed());
    println!(
        "{calls} calls, {sent} signals sent, {sig_calls} calls from the handler, \
         {missed} of them inside a return path (missed), {} returns handled",
        returns.load(Ordering::Relaxed)
    );
    assert_eq!(SIG_BAD.load(Ordering::Relaxed), 0);
    // Every entry either ran the kretprobe or was missed, and every tracked
    // call ran its return handler (none was skipped: no return came while a
    // handler ran, and the pool never ran dry at two nested calls).
    assert_eq!(hits + missed, calls + sig_calls);
    assert_eq!(krp.nmissed(), 0);
    assert_eq!(returns.load(Ordering::Relaxed), hits);
    assert_eq!(krp.in_flight(), 0);
    assert!(sig_calls > 0, "no signal was handled");
    assert_eq!(steps_in_flight(), 0);
}
