//! Specification tests of how the kprobe registry gives memory back without
//! being asked: member lists replaced by registrations (a probe joining an
//! address whose list is full: the list is replaced by one twice the size;
//! a join with room appends in place and retires nothing) and the sites of
//! failed registrations are freed a grace period later through the RCU
//! domain's callbacks, with no unregistration or commit; a list on which a
//! single-step is in flight waits for it.

mod kprobe_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kprobe_support::*;
use rcu_registry::__internals::kprobe::RetiredListCounts;
use rcu_registry::__internals::kprobe::RetiredLists;
use rcu_registry::probes::error::TextFailure;
use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::probes::ProbeError;
use rcu_registry::rcu::Rcu;

/// Counts how many times it is dropped: held by a probe's handler, it shows
/// when the last member list holding the probe is freed.
struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counted_probe(at: u64, drops: &Arc<AtomicUsize>) -> Kprobe {
    let held = DropCount(drops.clone());
    Kprobe::at(at)
        .pre(move |_, _| {
            let _ = &held;
            Action::Continue
        })
        .build()
}

/// A registry on its own domain with `n` probes registered at `addr` (the
/// first makes the site, every further one joins it).
fn joined(n: usize, addr: u64) -> (Rcu, Fixture, Vec<Kprobe>) {
    let rcu = Rcu::new();
    let fx = fixture_with(|b| b.rcu(rcu.clone()));
    let probes: Vec<Kprobe> = (0..n).map(|_| Kprobe::at(addr).build()).collect();
    for p in &probes {
        fx.reg.register(p).unwrap();
    }
    (rcu, fx, probes)
}

/// Registers probes without handlers at `addr` until a join replaces the
/// site's member list (it was full); returns them.
fn join_until_a_list_is_replaced(reg: &Reg, addr: u64) -> Vec<Kprobe> {
    let before = reg.retired_lists().retired;
    let mut joined = Vec::new();
    while reg.retired_lists().retired == before {
        let p = Kprobe::at(addr).build();
        reg.register(&p).unwrap();
        joined.push(p);
        assert!(joined.len() <= 64, "a join must replace a full list");
    }
    assert_eq!(
        reg.retired_lists().retired,
        before + 1,
        "one list per growth"
    );
    joined
}

#[test]
fn lists_replaced_by_joining_probes_are_freed_after_a_grace_period_without_any_unregistration() {
    // A site's first list holds its one probe: the first join replaces it
    // with a list of four slots; the next two joins append in place.
    let (rcu, fx, mut probes) = joined(4, F_MOV_EAX);
    assert_eq!(
        fx.reg.retired_lists().retired,
        1,
        "joins with room copy nothing"
    );
    probes.extend(join_until_a_list_is_replaced(&fx.reg, F_MOV_EAX));
    assert_eq!(probes.len(), 5, "the fifth probe found the list full");
    rcu.barrier();
    assert_eq!(
        fx.reg.retired_lists(),
        RetiredLists {
            retired: 2,
            freed: 2,
            waiting_for_steps: 0
        }
    );
    assert_eq!(fx.reg.pending(), 0, "no unregistration took part");
    assert_eq!(fx.reg.len(), probes.len());
    let ids: Vec<_> = probes.iter().map(Kprobe::id).collect();
    assert_eq!(
        fx.reg.sites()[0].probes,
        ids,
        "the live list is intact, in order"
    );
    // The live list still works.
    let mut regs = trap_regs(F_MOV_EAX);
    assert_eq!(
        hit(&fx.reg, F_MOV_EAX, &mut regs, &mut Stack::new()),
        "boosted"
    );
    assert!(probes.iter().all(|p| p.hits() == 1));
}

#[test]
fn the_site_of_a_failed_registration_is_freed_with_its_slot_without_a_commit() {
    let rcu = Rcu::new();
    let fx = fixture_with(|b| b.rcu(rcu.clone()));
    let drops = Arc::new(AtomicUsize::new(0));
    let p = counted_probe(F_MOV_EAX, &drops);
    // The site is published, then the breakpoint write fails: the site and
    // its list were visible to readers and are retired.
    fx.reg.text().fail_writes_after(Some(0));
    assert!(matches!(
        fx.reg.register(&p),
        Err(ProbeError::TextAccess {
            failure: TextFailure::Injected,
            ..
        })
    ));
    fx.reg.text().fail_writes_after(None);
    assert_eq!(fx.reg.text().snapshot(), code(), "nothing written");
    assert!(!p.is_registered());
    drop(p);
    assert_eq!(drops.load(Ordering::SeqCst), 0, "the retired list holds it");
    assert_eq!(fx.xol.in_use(), 1, "the slot waits for a grace period");
    // The list's callback frees it, and with it the probe's handler and the
    // failed site's slot.
    rcu.barrier();
    assert_eq!(drops.load(Ordering::SeqCst), 1, "freed exactly once");
    assert_eq!((fx.xol.in_use(), fx.xol.frees()), (0, 1));
    assert_eq!(fx.reg.retired_lists().freed, 1);
    assert_eq!(fx.reg.pending(), 0);
}

#[test]
fn a_replaced_list_with_a_step_in_flight_is_kept_until_the_step_completes() {
    let rcu = Rcu::new();
    let fx = fixture_with(|b| b.rcu(rcu.clone()));
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let p = Kprobe::at(F_MOV_EAX)
        .post(move |_, _| l.lock().unwrap().push("post p"))
        .build();
    fx.reg.register(&p).unwrap();
    let (mut regs, mut stack) = (trap_regs(F_MOV_EAX), Stack::new());
    let token = start_step(&fx.reg, F_MOV_EAX, &mut regs, &mut stack);
    // The list the step started on is replaced (it fills, then grows) while
    // the step is in flight.
    let _joined = join_until_a_list_is_replaced(&fx.reg, F_MOV_EAX);
    rcu.barrier();
    assert_eq!(
        fx.reg.retired_lists(),
        RetiredLists {
            retired: 1,
            freed: 0,
            waiting_for_steps: 1
        },
        "the callback does not free a list a step still uses, nor wait for it"
    );
    finish_step(&fx.reg, token, &mut regs, &mut stack);
    assert_eq!(*log.lock().unwrap(), vec!["post p"]);
    // The next retirement's callback retries the parked list.
    let _more = join_until_a_list_is_replaced(&fx.reg, F_MOV_EAX);
    rcu.barrier();
    assert_eq!(
        fx.reg.retired_lists(),
        RetiredLists {
            retired: 2,
            freed: 2,
            waiting_for_steps: 0
        }
    );
}

#[test]
fn a_commit_frees_a_parked_list_once_its_step_completes() {
    let rcu = Rcu::new();
    let fx = fixture_with(|b| b.rcu(rcu.clone()));
    let p = Kprobe::at(F_MOV_EAX).post(|_, _| {}).build();
    fx.reg.register(&p).unwrap();
    let (mut regs, mut stack) = (trap_regs(F_MOV_EAX), Stack::new());
    let token = start_step(&fx.reg, F_MOV_EAX, &mut regs, &mut stack);
    let joined = join_until_a_list_is_replaced(&fx.reg, F_MOV_EAX);
    rcu.barrier();
    assert_eq!(fx.reg.retired_lists().waiting_for_steps, 1);
    finish_step(&fx.reg, token, &mut regs, &mut stack);
    fx.reg.unregister(&joined[0]).unwrap();
    let lists = fx.reg.retired_lists();
    assert_eq!((lists.freed, lists.waiting_for_steps), (1, 0));
}

#[test]
fn many_joins_on_one_address_leave_no_list_behind_after_a_barrier() {
    let (rcu, fx, probes) = joined(200, F_PUSH);
    rcu.barrier();
    let lists = fx.reg.retired_lists();
    println!("retired lists: {lists:?}");
    // Appends in place, a list twice the size when full: one replaced list
    // per growth (1 slot, then 4, 10, 22, 46, 94, 190, 382), not one per
    // join.
    assert_eq!((lists.retired, lists.freed), (7, 7));
    let before = rcu.stats();
    assert!(
        before.callback_batches <= lists.retired,
        "at most one callback batch per replaced list: {} batches",
        before.callback_batches
    );
    let refs: Vec<&Kprobe> = probes.iter().collect();
    fx.reg.unregister_many(&refs).unwrap();
    assert!(fx.reg.sites().is_empty());
}
