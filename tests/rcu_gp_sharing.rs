//! `Rcu` grace periods are process-wide, so this test has a binary (a
//! process) of its own: no other test's grace periods are counted.

use rcu_registry::__internals::rcu::DomainGauges;
use rcu_registry::rcu::Rcu;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

#[test]
fn concurrent_rcu_synchronize_callers_share_grace_periods() {
    const CALLERS: usize = 8;
    let rcu = Rcu::new();
    let entered = Arc::new(Barrier::new(2));
    let go = Arc::new(Barrier::new(CALLERS + 1));
    let reader = {
        let (rcu, entered) = (rcu.clone(), entered.clone());
        thread::spawn(move || {
            let _g = rcu.read();
            entered.wait();
            // Hold the section until every caller has taken its snapshot
            // (a test hook counts them): they all arrive while it blocks
            // the grace period, whatever the scheduler does.
            while rcu.sync_waiters() < CALLERS {
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    entered.wait();
    let before = rcu.stats().grace_periods;
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (rcu, go) = (rcu.clone(), go.clone());
            thread::spawn(move || {
                go.wait();
                rcu.synchronize();
            })
        })
        .collect();
    go.wait();
    for c in callers {
        c.join().unwrap();
    }
    reader.join().unwrap();
    let used = rcu.stats().grace_periods - before;
    assert!(
        used <= 3,
        "{CALLERS} concurrent synchronize() calls used {used} grace periods, not shared"
    );
}
