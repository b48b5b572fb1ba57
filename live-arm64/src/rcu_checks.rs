//! The RCU domains' guarantees, checked where the suite runs (natively, or
//! under qemu-aarch64) for either flavor, and shared by two test binaries:
//! `tests/platform.rs` runs them with `membarrier` as the kernel offers it
//! (under qemu-user, the host kernel's: the expedited paths), and
//! `tests/rcu_fallback.rs` with the domains forced onto their fallback for
//! a kernel without it (readers' real fences, updaters' `SeqCst` fence).
//!
//! # Forced, not timed
//!
//! A reader enters its section and the check learns it through a channel;
//! an updater then calls `synchronize` on another thread, and the check
//! waits for the domain's gauge to show a caller that took its snapshot
//! (`DomainGauges::sync_waiters`). From there until the reader is told to
//! leave, `synchronize` cannot have returned and no callback queued after
//! the reader entered can have run, whatever the scheduler did: those are
//! the assertions. No sleep decides anything.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use rcu_registry::__internals::rcu::DomainGauges;
use rcu_registry::rcu::Flavor;

/// A reader that entered before `synchronize` holds it off until it
/// leaves; a callback queued with `call` while the reader is inside has not
/// run by then, and `barrier` waits for it. `domain` must be one no other
/// thread synchronizes on meanwhile (its gauge is the check's signal; a
/// stranger's caller would only make the check weaker, never hang it).
pub fn a_grace_period_waits_for_a_reader_that_began_before_it<F: Flavor + DomainGauges>(
    domain: &F,
) {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (leave_tx, leave_rx) = mpsc::channel::<()>();
    let synced = AtomicBool::new(false);
    let freed = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        let d = domain.clone();
        s.spawn(move || {
            let guard = d.read();
            entered_tx.send(()).unwrap();
            leave_rx.recv().unwrap();
            drop(guard);
        });
        entered_rx.recv().unwrap();
        let f = Arc::clone(&freed);
        domain.call(move || {
            // SeqCst: read by the checking thread while the reader is
            // inside (must be 0) and after `barrier`, which orders it.
            f.fetch_add(1, Ordering::SeqCst);
        });
        let updater = s.spawn(|| {
            domain.synchronize();
            // SeqCst: read by the checking thread; a store after
            // `synchronize` returned, so seeing it means it returned.
            synced.store(true, Ordering::SeqCst);
        });
        // The updater has taken its snapshot (or another caller has, which
        // leaves the assertions true and only weaker).
        while domain.sync_waiters() == 0 {
            std::thread::yield_now();
        }
        assert!(
            !synced.load(Ordering::SeqCst),
            "synchronize returned while a reader that began before it was inside"
        );
        assert_eq!(
            freed.load(Ordering::SeqCst),
            0,
            "a callback ran while a reader that began before it was inside"
        );
        leave_tx.send(()).unwrap();
        updater.join().unwrap();
    });
    assert!(synced.load(Ordering::SeqCst));
    domain.barrier();
    assert_eq!(freed.load(Ordering::SeqCst), 1, "barrier ran the callback");
}

/// Readers on three threads enter and leave their sections 1,000 times
/// each while the updater queues 20 callbacks, synchronizing after each;
/// `barrier` then has run all 20. (The reader fast path and grace periods
/// under contention: the fences a reader issues, or the `membarrier` that
/// stands in for them.)
pub fn readers_on_other_threads_and_an_updater_run_every_callback<F: Flavor>(domain: &F) {
    let freed = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..3 {
            let d = domain.clone();
            s.spawn(move || {
                for _ in 0..1000 {
                    let _g = d.read();
                    std::hint::spin_loop();
                }
            });
        }
        for _ in 0..20 {
            let f = Arc::clone(&freed);
            domain.call(move || {
                // Relaxed: read after `barrier`, which orders the callbacks.
                f.fetch_add(1, Ordering::Relaxed);
            });
            domain.synchronize();
        }
    });
    domain.barrier();
    assert_eq!(freed.load(Ordering::Relaxed), 20);
}
