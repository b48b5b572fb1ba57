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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rcu_registry::__internals::runtime::steps_in_flight;
use rcu_registry::probes::kprobe::Kretprobe;
use rcu_registry::probes::runtime::Live;
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
    let krp = Kretprobe::at(addr(rtp_alt))
        .handler(move |_, _, ret| {
            assert_eq!(ret, 777);
            r2.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .unwrap();
    reg.register(&krp).unwrap();
    // A call takes microseconds; STALL allows for a loaded machine.
    let (calls, sent) = loop_under_signals(
        on_usr1,
        stress_secs(1.0),
        Duration::from_micros(20),
        STALL,
        || SIG_CALLS.load(Ordering::Relaxed) > 0,
        || assert_eq!(call(rtp_alt, 0), 777),
    );
    reg.unregister(&krp).unwrap();

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
    // One meaning of nmissed: the kretprobe's count is every call whose
    // return handler did not run, here exactly the entry's misses.
    assert_eq!(krp.nmissed(), missed);
    assert_eq!(returns.load(Ordering::Relaxed), hits);
    assert_eq!(krp.returns(), hits);
    assert_eq!(krp.in_flight(), 0);
    assert!(sig_calls > 0, "no signal was handled");
    assert_eq!(steps_in_flight(), 0);
}
