//! The RCU domains on their fallback for a kernel without `membarrier`
//! (readers issue real `SeqCst` fences, updaters a `SeqCst` fence instead of
//! the process-wide barrier), forced here because the kernel, and qemu-user
//! which passes the call to it, offers `membarrier`
//! (`__internals::rcu::force_membarrier_fallback`, before any domain is
//! used in this binary). The same checks as `platform.rs`
//! (`live_arm64::rcu_checks`), and on arm64 live probes served through the
//! fallback domains: the registry's read sections and grace periods.

use std::sync::Once;

use live_arm64::fork_child::run_in_fork_child;
use live_arm64::rcu_checks;
use rcu_registry::__internals::rcu::{force_membarrier_fallback, membarrier_in_use};
use rcu_registry::rcu::{Rcu, Srcu};

/// Every test starts here: the fallback is in force before the binary's
/// first domain exists, and stays so. Serialized as well: the checks wait
/// on `Rcu`'s process-wide gauge, which the live probe test moves too.
fn fallback() -> std::sync::MutexGuard<'static, ()> {
    static FORCE: Once = Once::new();
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    FORCE.call_once(|| {
        assert!(
            force_membarrier_fallback(),
            "a domain registered membarrier before the first test"
        );
    });
    let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    assert!(!membarrier_in_use(), "the fallback is in force");
    g
}

#[test]
fn a_grace_period_waits_for_a_reader_that_began_before_it() {
    let _g = fallback();
    rcu_checks::a_grace_period_waits_for_a_reader_that_began_before_it(Rcu::global());
    rcu_checks::a_grace_period_waits_for_a_reader_that_began_before_it(&Srcu::new());
    assert!(!membarrier_in_use());
}

#[test]
fn readers_on_other_threads_and_an_updater_run_every_callback() {
    let _g = fallback();
    rcu_checks::readers_on_other_threads_and_an_updater_run_every_callback(Rcu::global());
    rcu_checks::readers_on_other_threads_and_an_updater_run_every_callback(&Srcu::new());
    assert!(!membarrier_in_use());
}

/// A fork child registers `membarrier` afresh (its address space is new
/// to the kernel's bookkeeping): under the switch it stays on the
/// fallback, and its grace periods complete.
#[test]
fn a_fork_child_stays_on_the_fallback() {
    let _g = fallback();
    // The domains' fork handler is installed with the first domain.
    Rcu::global().synchronize();
    run_in_fork_child("the child left the fallback", || {
        let mut ok = !membarrier_in_use();
        Rcu::global().synchronize();
        Srcu::new().synchronize();
        ok &= !membarrier_in_use();
        ok
    });
    assert!(!membarrier_in_use());
}

#[cfg(not(target_arch = "aarch64"))]
#[test]
fn live_probes_on_the_fallback_domains() {
    let _g = fallback();
    println!(
        "skipped: the targets are arm64 machine code; run scripts/test-arm64 \
         (qemu-aarch64) for this test"
    );
}

/// A kprobe stepped out of line (boosted), one simulated and a kretprobe,
/// hit from two threads while the registry's readers fence for themselves;
/// counted exactly, and unregistered (a grace period of the fallback
/// domain each) with the code as it was.
#[cfg(target_arch = "aarch64")]
#[test]
fn live_probes_on_the_fallback_domains() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use live_arm64::targets::*;
    use rcu_registry::probes::kprobe::{Action, Kprobe, Kretprobe};
    use rcu_registry::probes::runtime::Live;

    let _g = fallback();
    let reg = Live::global().registry();
    let word_at = |a: u64| {
        // SAFETY: `a` is code of this binary (readable).
        unsafe { (a as *const u32).read_volatile() }
    };
    let hits = Arc::new(AtomicU64::new(0));
    let sum = Arc::new(AtomicU64::new(0));
    let (h, s) = (Arc::clone(&hits), Arc::clone(&sum));
    let (add1, cbz) = (addr(la_add1 as *const ()), addr(la_cbz as *const ()));
    let before = (word_at(add1), word_at(cbz));
    let probe = Kprobe::at(cbz)
        .pre(move |_p, _regs| {
            // Relaxed: read after the threads are joined.
            h.fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })
        .build();
    let krp = Kretprobe::at(add1)
        .handler(move |_, _, ret| {
            // Relaxed: read after the threads are joined.
            s.fetch_add(ret, Ordering::Relaxed);
        })
        .build()
        .unwrap();
    reg.register(&probe).unwrap();
    reg.register(&krp).unwrap();
    hammer(2, 500, la_cbz, |x| if x == 0 { 7 } else { x });
    hammer(2, 500, la_add1, |x| x + 1);
    assert_eq!(hits.load(Ordering::Relaxed), 1_000);
    assert_eq!(probe.hits(), 1_000);
    assert_eq!(krp.returns(), 1_000);
    // What `hammer` passes: `i % 16` for even i, `t << 20 | i` for odd.
    let want: u64 = (0..2u64)
        .flat_map(|t| (0..500u64).map(move |i| if i % 2 == 0 { i % 16 } else { t << 20 | i }))
        .map(|x| x + 1)
        .sum();
    assert_eq!(sum.load(Ordering::Relaxed), want);
    reg.unregister(&probe).unwrap();
    reg.unregister(&krp).unwrap();
    assert_eq!((word_at(add1), word_at(cbz)), before);
    assert_eq!(krp.in_flight(), 0);
    assert!(!membarrier_in_use());
}
