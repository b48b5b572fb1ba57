//! What the live runtime takes from the platform, checked where the suite
//! runs (natively, or under qemu-aarch64): a breakpoint arrives as SIGTRAP
//! with an editable frame, threads run, and the RCU domains work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use live_arm64::raw_trap::{trap_once, with_raw_trap};
use rcu_registry::rcu::Rcu;

#[test]
fn a_breakpoint_traps_once_and_resumes_after_itself() {
    let ((), traps) = with_raw_trap(|| {
        for _ in 0..100 {
            trap_once();
        }
    });
    assert_eq!(traps, 100);
}

#[test]
fn rcu_readers_on_other_threads_hold_off_reclamation() {
    let rcu = Rcu::global();
    let freed = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    let _g = Rcu::global().read();
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    for _ in 0..20 {
        let f = Arc::clone(&freed);
        rcu.call(move || {
            // Relaxed: read after `barrier`, which orders the callbacks.
            f.fetch_add(1, Ordering::Relaxed);
        });
        rcu.synchronize();
    }
    for r in readers {
        r.join().unwrap();
    }
    rcu.barrier();
    assert_eq!(freed.load(Ordering::Relaxed), 20);
}
