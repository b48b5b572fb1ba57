//! Specification tests for the RCU domains' public API.

use rcu_registry::__internals::rcu::DomainGauges;
use rcu_registry::rcu::{Flavor, Rcu, RcuCell, Srcu};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// How long a wait may take before the test calls it a hang: a grace
/// period that never completes, not a slow one (no test here has a speed
/// requirement; this is far above any delay a loaded machine causes).
const HANG: Duration = Duration::from_secs(60);

#[test]
fn reader_started_before_synchronize_delays_it_until_the_guard_drops() {
    let rcu = Rcu::new();
    let entered = Arc::new(Barrier::new(2));
    let released = Arc::new(AtomicBool::new(false));
    let reader = {
        let (rcu, entered, released) = (rcu.clone(), entered.clone(), released.clone());
        thread::spawn(move || {
            let _g = rcu.read();
            entered.wait();
            thread::sleep(Duration::from_millis(50));
            released.store(true, Ordering::SeqCst);
        })
    };
    entered.wait();
    rcu.synchronize();
    assert!(
        released.load(Ordering::SeqCst),
        "synchronize returned while a prior reader was inside"
    );
    reader.join().unwrap();
}

#[test]
fn nested_read_sections_keep_the_outer_section_open() {
    let rcu = Rcu::new();
    let outer = rcu.read();
    {
        let _inner = rcu.read();
        assert!(Rcu::in_read_section());
    }
    assert!(
        Rcu::in_read_section(),
        "dropping the inner guard ended the outer section"
    );
    drop(outer);
    assert!(!Rcu::in_read_section());
}

#[test]
#[should_panic(expected = "inside an Rcu read-side critical section")]
fn synchronize_inside_a_read_section_panics_instead_of_deadlocking() {
    let rcu = Rcu::new();
    let _g = rcu.read();
    rcu.synchronize();
}

#[test]
#[should_panic(expected = "inside an Rcu read-side critical section")]
fn barrier_inside_a_read_section_panics_instead_of_deadlocking() {
    let rcu = Rcu::new();
    let _g = rcu.read();
    rcu.barrier();
}

#[test]
#[should_panic(expected = "same Srcu domain")]
fn srcu_synchronize_inside_its_own_section_panics() {
    let d = Srcu::new();
    let _g = d.read();
    d.synchronize();
}

#[test]
fn srcu_synchronize_ignores_sections_of_other_instances() {
    let a = Srcu::new();
    let b = Srcu::new();
    let _long_reader_of_a = a.read();
    // Waiting for `a`'s reader would never end (this thread holds it): the
    // test would hang. The bound only turns that hang into a failure; it is
    // no speed requirement, so it is far above any load's delay.
    let start = Instant::now();
    b.synchronize();
    b.synchronize();
    assert!(start.elapsed() < HANG);
}

#[test]
fn rcu_grace_periods_complete_while_an_srcu_reader_sleeps() {
    let d = Srcu::new();
    let rcu = Rcu::new();
    let g = d.read();
    let before = rcu.stats().grace_periods;
    for _ in 0..3 {
        rcu.synchronize();
    }
    assert!(rcu.stats().grace_periods >= before + 3);
    drop(g);
}

#[test]
fn call_runs_after_a_grace_period_and_barrier_waits_for_it() {
    let rcu = Rcu::new();
    let ran = Arc::new(AtomicUsize::new(0));
    let g = rcu.read();
    for _ in 0..100 {
        let ran = ran.clone();
        rcu.call(move || {
            ran.fetch_add(1, Ordering::SeqCst);
        });
    }
    thread::sleep(Duration::from_millis(20));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "a callback ran while a reader from before it was inside"
    );
    drop(g);
    rcu.barrier();
    assert_eq!(ran.load(Ordering::SeqCst), 100);
    assert!(rcu.stats().callbacks_invoked >= 100);
}

#[test]
fn srcu_token_ends_the_section_on_another_thread() {
    let d = Srcu::new();
    let token = d.read().into_token();
    assert!(
        !d.in_read_section(),
        "a sent-away token still counts as this thread's section"
    );
    let cookie = d.start_poll();
    thread::sleep(Duration::from_millis(20));
    assert!(
        !d.poll(&cookie),
        "grace period completed while a token was outstanding"
    );
    thread::spawn(move || drop(token)).join().unwrap();
    d.cond_synchronize(cookie);
    assert!(d.poll(&cookie));
}

#[test]
fn polled_cookie_completes_without_further_calls() {
    for domain_is_srcu in [false, true] {
        let cookie;
        let done;
        if domain_is_srcu {
            let d = Srcu::new();
            cookie = d.start_poll();
            let t = Instant::now();
            while !d.poll(&cookie) {
                assert!(t.elapsed() < HANG, "polled grace period never completed");
                thread::sleep(Duration::from_millis(1));
            }
            done = d.poll(&cookie);
        } else {
            let d = Rcu::new();
            cookie = d.start_poll();
            let t = Instant::now();
            while !d.poll(&cookie) {
                assert!(t.elapsed() < HANG, "polled grace period never completed");
                thread::sleep(Duration::from_millis(1));
            }
            done = d.poll(&cookie);
        }
        assert!(done);
    }
}

#[test]
fn concurrent_srcu_synchronize_callers_share_grace_periods() {
    // Eight callers all arrive while one reader holds a section: one grace
    // period waits for the reader and at most one more serves all of them.
    let d = Srcu::new();
    const CALLERS: usize = 8;
    let entered = Arc::new(Barrier::new(2));
    let go = Arc::new(Barrier::new(CALLERS + 1));
    let reader = {
        let (d, entered) = (d.clone(), entered.clone());
        thread::spawn(move || {
            let _g = d.read();
            entered.wait();
            // Hold the section until every caller has taken its snapshot
            // (a test hook counts them): they all arrive while it blocks
            // the grace period, whatever the scheduler does.
            while d.sync_waiters() < CALLERS {
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    entered.wait();
    let before = d.stats().grace_periods;
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (d, go) = (d.clone(), go.clone());
            thread::spawn(move || {
                go.wait();
                d.synchronize();
            })
        })
        .collect();
    go.wait();
    for c in callers {
        c.join().unwrap();
    }
    reader.join().unwrap();
    let used = d.stats().grace_periods - before;
    assert!(
        used <= 3,
        "{CALLERS} concurrent synchronize() calls used {used} grace periods"
    );
}

#[test]
fn rcu_cell_replace_defers_the_drop_until_readers_leave() {
    struct Tracked(Arc<AtomicUsize>);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let drops = Arc::new(AtomicUsize::new(0));
    let cell = RcuCell::new(Tracked(drops.clone()));
    let rcu = Rcu::global();
    let g = rcu.read();
    let old = cell.load(&g).unwrap();
    cell.replace(Tracked(drops.clone()));
    thread::sleep(Duration::from_millis(20));
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    assert_eq!(Arc::strong_count(&old.0), 3);
    drop(g);
    rcu.barrier();
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    assert_eq!(
        cell.swap(None).map(|t| Arc::ptr_eq(&t.0, &drops)),
        Some(true)
    );
    assert_eq!(drops.load(Ordering::SeqCst), 2);
    assert!(!cell.take());
}

#[test]
#[should_panic(expected = "another RCU domain")]
fn rcu_cell_refuses_a_guard_of_another_srcu_domain() {
    let a = Srcu::new();
    let b = Srcu::new();
    let cell = RcuCell::new_in(1, a);
    let g = b.read();
    let _ = cell.load(&g);
}

#[test]
fn a_thread_that_exits_inside_a_leaked_section_does_not_wedge_grace_periods() {
    let rcu = Rcu::new();
    let r = rcu.clone();
    thread::spawn(move || std::mem::forget(r.read()))
        .join()
        .unwrap();
    rcu.synchronize();
}

/// The handler contract's `Srcu` clause (`docs::patterns`, "Uprobe
/// consumers"): unlike `Rcu`, an `Srcu` section leaked on a thread that
/// exits stays open for good, and a grace period waits for it. Shown
/// without timing: the section is still counted after its thread is gone
/// and after other threads (which may take over its reader slot) came and
/// went, and a `synchronize` started then is waiting, which it does until
/// that count drops, which nothing can make it do. The waiting thread is
/// left behind (it polls with a sleep) and dies with the test process.
#[test]
fn an_srcu_section_leaked_on_an_exiting_thread_stays_open_and_synchronize_waits_for_it() {
    use rcu_registry::__internals::rcu::SrcuSections;
    let srcu = Srcu::new();
    assert_eq!(srcu.open_sections(), 0);
    let s = srcu.clone();
    thread::spawn(move || std::mem::forget(s.read()))
        .join()
        .unwrap();
    assert_eq!(
        srcu.open_sections(),
        1,
        "the leaked section outlives its thread"
    );
    for _ in 0..8 {
        let s = srcu.clone();
        thread::spawn(move || drop(s.read())).join().unwrap();
    }
    assert_eq!(srcu.open_sections(), 1, "no other thread ends it");
    let s = srcu.clone();
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    thread::spawn(move || {
        s.synchronize();
        d.store(true, Ordering::SeqCst);
    });
    while srcu.sync_waiters() == 0 {
        thread::yield_now();
    }
    assert_eq!(srcu.open_sections(), 1);
    assert!(!done.load(Ordering::SeqCst));
}

#[test]
fn a_thread_panicking_out_of_a_read_section_does_not_wedge_grace_periods() {
    let rcu = Rcu::new();
    let r = rcu.clone();
    let res = thread::spawn(move || {
        let _g = r.read();
        panic!("boom");
    })
    .join();
    assert!(res.is_err());
    rcu.synchronize();
}

#[test]
fn flavor_generic_code_works_with_both_domains() {
    fn roundtrip<F: Flavor>(domain: F) {
        let cell = RcuCell::new_in(41, domain.clone());
        cell.replace(42);
        let g = domain.read();
        assert!(domain.protects(&g));
        assert_eq!(cell.load(&g), Some(&42));
        drop(g);
        domain.synchronize();
        domain.barrier();
    }
    roundtrip(Rcu::new());
    roundtrip(Srcu::new());
}
