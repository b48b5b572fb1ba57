//! Specification tests of kretprobe instances whose calls never return:
//! a thread that exits inside a kretprobed function gives its instances
//! back to the pools (also those of a kretprobe unregistered meanwhile), and
//! the explicit flushes give back a thread's instances, or the calling
//! thread's below a `longjmp` target, and nothing else.
//!
//! The exit flush runs in the exiting thread's thread-specific-data
//! destructors, after its closure returned: the tests wait with `join`,
//! which waits for the thread to terminate (a scope's end alone only waits
//! for the closures).

mod kprobe_support;

use std::sync::{Arc, Barrier, Mutex};

use kprobe_support::*;
use rcu_registry::probes::arch::{DataMemory, X86Reg};
use rcu_registry::probes::kprobe::{EntryAction, Kretprobe, ThreadKey};
use rcu_registry::probes::outcome::ReturnOutcome;

/// The caller's return address the hijack must preserve.
const CALLER: u64 = 0x4000_5678;

type Seen = Arc<Mutex<Vec<(u64, u64)>>>;

/// A kretprobe on `h` recording (argument, return value) per call.
fn recording(maxactive: usize, seen: &Seen) -> Kretprobe<u64> {
    let s = seen.clone();
    Kretprobe::at(H)
        .data::<u64>()
        .maxactive(maxactive)
        .entry_handler(|arg, regs| {
            *arg = regs[X86Reg::Rdi];
            EntryAction::Track
        })
        .handler(move |arg, _regs, ret| s.lock().unwrap().push((*arg, ret)))
        .build()
        .unwrap()
}

/// A fixture with a registered [`recording`] kretprobe.
fn registered(maxactive: usize) -> (Fixture, Seen, Kretprobe<u64>) {
    let fx = fixture();
    let seen = Seen::default();
    let krp = recording(maxactive, &seen);
    fx.reg.register(&krp).unwrap();
    (fx, seen, krp)
}

/// One call of `h` that completes normally on the calling thread.
fn call_and_return(reg: &Reg, arg: u64, ret: u64) -> ReturnOutcome {
    let mut stack = Stack::new();
    let sp = Stack::top();
    enter(reg, H, sp, CALLER, arg, &mut stack);
    assert_eq!(
        stack.read_u64(sp).unwrap(),
        TRAMPOLINE,
        "the call is tracked"
    );
    leave(reg, sp, ret).0
}

#[test]
fn a_thread_that_exits_inside_a_kretprobed_call_gives_its_instance_back() {
    let (fx, seen, krp) = registered(1);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut stack = Stack::new();
            enter(&fx.reg, H, Stack::top(), CALLER, 1, &mut stack);
            assert_eq!(krp.in_flight(), 1);
            // The thread ends here, inside `h`, without returning.
        })
        .join()
        .unwrap();
    });
    assert_eq!(krp.in_flight(), 0, "the pool is full again");
    assert!(seen.lock().unwrap().is_empty(), "no return handler ran");
    // The one instance serves the next call: nothing is missed.
    assert_eq!(
        call_and_return(&fx.reg, 2, 20),
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(krp.nmissed(), 0);
    assert_eq!(*seen.lock().unwrap(), vec![(2, 20)]);
}

#[test]
fn many_threads_exiting_inside_calls_never_shrink_the_pool() {
    let (fx, seen, krp) = registered(8);
    for round in 0..8u64 {
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..4u64)
                .map(|t| {
                    let reg = &fx.reg;
                    s.spawn(move || {
                        let mut stack = Stack::new();
                        // Nested: the thread abandons its inner call as well.
                        enter(reg, H, Stack::top(), CALLER, round * 10 + t, &mut stack);
                        enter(reg, H, Stack::top() - 0x100, H + 5, 0, &mut stack);
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        });
        assert_eq!(krp.in_flight(), 0, "round {round}");
    }
    assert_eq!(krp.nmissed(), 0, "64 abandoned calls, 8 instances");
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn an_orphaned_pool_is_freed_once_the_thread_holding_its_instance_exits() {
    let fx = fixture();
    let krp = Kretprobe::at(H)
        .data::<Tracked>()
        .maxactive(2)
        .handler(|_, _, _| panic!("no return handler: the call never returns"))
        .build()
        .unwrap();
    fx.reg.register(&krp).unwrap();
    let inside = Barrier::new(2);
    let unregistered = Barrier::new(2);
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            let mut stack = Stack::new();
            enter(&fx.reg, H, Stack::top(), CALLER, 0, &mut stack);
            inside.wait();
            unregistered.wait();
            // Exits inside `h`, after the kretprobe was unregistered.
        });
        inside.wait();
        fx.reg.unregister(&krp).unwrap();
        assert_eq!(fx.reg.orphans(), 1, "the pool waits for the call");
        unregistered.wait();
        t.join().unwrap();
    });
    drop(krp);
    assert_eq!(tracked_drops(), 0, "the orphan holds it");
    assert_eq!(fx.reg.orphans(), 0, "reclaimed: its instance came back");
    assert_eq!(tracked_drops(), 2, "each instance freed once");
}

#[test]
fn flush_thread_gives_back_exactly_that_threads_instances() {
    let (fx, seen, krp) = registered(4);
    // This thread is inside a call that stays live throughout.
    let mut stack = Stack::new();
    enter(&fx.reg, H, Stack::top(), CALLER, 7, &mut stack);
    let (key_tx, key_rx) = std::sync::mpsc::channel();
    let flushed = Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut stack = Stack::new();
            enter(&fx.reg, H, Stack::top(), CALLER, 1, &mut stack);
            enter(&fx.reg, H, Stack::top() - 0x100, H + 5, 2, &mut stack);
            key_tx.send(ThreadKey::current()).unwrap();
            flushed.wait();
            // The exit flush finds nothing left.
        });
        let key = key_rx.recv().unwrap();
        assert_eq!(krp.in_flight(), 3);
        assert_eq!(fx.reg.flush_thread(key), 2);
        assert_eq!(krp.in_flight(), 1, "only this thread's call is left");
        assert_eq!(fx.reg.flush_thread(key), 0, "nothing twice");
        flushed.wait();
    });
    assert_eq!(
        leave(&fx.reg, Stack::top(), 70).0,
        ReturnOutcome::Returned { to: CALLER },
        "the live call on this thread is untouched"
    );
    assert_eq!(*seen.lock().unwrap(), vec![(7, 70)]);
    assert_eq!((krp.in_flight(), krp.nmissed()), (0, 0));
}

#[test]
fn flush_abandoned_frames_gives_back_the_calls_below_a_longjmp_target_only() {
    let (fx, seen, krp) = registered(4);
    let mut stack = Stack::new();
    let outer = Stack::top();
    let inner = outer - 0x100;
    let innermost = inner - 0x100;
    enter(&fx.reg, H, outer, CALLER, 1, &mut stack);
    enter(&fx.reg, H, inner, H + 5, 2, &mut stack);
    enter(&fx.reg, H, innermost, H + 5, 3, &mut stack);
    // `setjmp` ran in the outer call's frame, somewhere below its return
    // slot; `longjmp` brings the thread back there from the innermost call.
    let target_sp = outer - 0x40;
    assert_eq!(fx.reg.flush_abandoned_frames(target_sp), 2);
    assert_eq!(krp.in_flight(), 1);
    assert_eq!(
        leave(&fx.reg, outer, 10).0,
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(1, 10)],
        "no handler for the abandoned calls"
    );
    assert_eq!((krp.in_flight(), krp.nmissed()), (0, 0));
}

#[test]
fn a_flush_with_nothing_filed_changes_nothing() {
    let (fx, seen, krp) = registered(2);
    assert_eq!(fx.reg.flush_thread(ThreadKey::current()), 0);
    assert_eq!(fx.reg.flush_abandoned_frames(u64::MAX), 0);
    assert_eq!((krp.in_flight(), krp.nmissed()), (0, 0));
    assert_eq!(
        call_and_return(&fx.reg, 4, 40),
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(*seen.lock().unwrap(), vec![(4, 40)]);
}

/// The exit stress's per-call data: counts its drops (its own counter, as
/// the tests of a binary run in parallel).
#[derive(Default)]
struct StressData;

static STRESS_DROPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for StressData {
    fn drop(&mut self) {
        STRESS_DROPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn stress_drops() -> usize {
    STRESS_DROPS.load(std::sync::atomic::Ordering::SeqCst)
}

/// How long the exit stress runs: `KRETPROBE_EXIT_STRESS_SECS` (default 1).
fn stress_duration() -> std::time::Duration {
    let secs: f64 = std::env::var("KRETPROBE_EXIT_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    std::time::Duration::from_secs_f64(secs)
}

#[test]
fn threads_exiting_inside_calls_race_unregistration_and_registry_drops_safely() {
    // Each round: a registry with a kretprobe; threads enter `h` and exit
    // without returning, some of them abandoning the call; meanwhile the
    // kretprobe is unregistered (orphaning the instances in flight) and the
    // registry dropped, racing the exit flushes (a scope waits for its
    // threads' closures, not for their thread-exit destructors). Every pool
    // must come back full and be freed exactly once, and no flush may touch
    // a dropped registry (a crash, or a wrong count, otherwise).
    let dur = stress_duration();
    let start = std::time::Instant::now();
    let (mut rounds, mut abandoned) = (0u64, 0u64);
    let before = stress_drops();
    // At least one round, whatever the schedule (the final check wants one).
    while rounds == 0 || start.elapsed() < dur {
        let fx = fixture();
        let krp = Kretprobe::at(H)
            .data::<StressData>()
            .maxactive(8)
            .build()
            .unwrap();
        fx.reg.register(&krp).unwrap();
        let entered = Barrier::new(5);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (reg, entered) = (&fx.reg, &entered);
                s.spawn(move || {
                    let mut stack = Stack::new();
                    enter(reg, H, Stack::top(), CALLER, t, &mut stack);
                    entered.wait();
                    if t % 2 == 0 {
                        // Returns normally (the instance may be orphaned:
                        // it still brings the call back to its caller).
                        assert_eq!(
                            leave(reg, Stack::top(), 0).0,
                            ReturnOutcome::Returned { to: CALLER }
                        );
                    }
                    // Odd threads exit inside `h`.
                });
            }
            entered.wait();
            fx.reg.unregister(&krp).unwrap();
        });
        abandoned += 2;
        rounds += 1;
        drop(krp);
        drop(fx);
    }
    // Threads still running their exit flushes hold pools alive: wait for
    // the last ones, then the count must be exact. The bound only turns a
    // pool that is never freed (a hang) into a failure: it is far above
    // what any load delays an exiting thread by.
    let expected = before + 8 * rounds as usize;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while stress_drops() != expected && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    println!(
        "kretprobe exit stress: {rounds} rounds, {abandoned} calls abandoned by exiting threads, \
         {} instances freed",
        stress_drops() - before
    );
    assert!(rounds > 0);
    assert_eq!(stress_drops(), expected, "every pool freed exactly once");
}
