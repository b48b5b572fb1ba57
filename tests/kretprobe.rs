//! Specification tests of kretprobes on an in-memory x86_64 image: return
//! values and per-call data, declining, the instance pool, recursion,
//! several kretprobes on one function, abandoned frames, threads, and
//! unregistration with calls in flight.

mod kprobe_support;

use std::sync::{Arc, Mutex, OnceLock};

use kprobe_support::*;
use rcu_registry::probes::arch::{DataMemory, X86Reg};
use rcu_registry::probes::kprobe::{default_maxactive, Action, EntryAction, Kprobe, Kretprobe};
use rcu_registry::probes::outcome::ReturnOutcome;

/// The caller's return address the hijack must preserve.
const CALLER: u64 = 0x4000_1234;

type Seen = Arc<Mutex<Vec<(u64, u64)>>>;

fn recording(seen: &Seen) -> Kretprobe<u64> {
    let s = seen.clone();
    Kretprobe::at(H)
        .data::<u64>()
        .maxactive(4)
        .entry_handler(|arg, regs| {
            *arg = regs[X86Reg::Rdi];
            EntryAction::Track
        })
        .handler(move |arg, _regs, ret| s.lock().unwrap().push((*arg, ret)))
        .build()
        .unwrap()
}

#[test]
fn a_kretprobe_sees_its_entry_data_and_the_return_value() {
    let (fx, seen, krp) = registered_recording();
    let mut stack = Stack::new();
    let sp = Stack::top();
    enter(&fx.reg, H, sp, CALLER, 7, &mut stack);
    assert_eq!(
        stack.read_u64(sp).unwrap(),
        TRAMPOLINE,
        "return address hijacked"
    );
    assert_eq!(krp.in_flight(), 1);
    let (out, regs) = leave(&fx.reg, sp, 42);
    assert_eq!(out, ReturnOutcome::Returned { to: CALLER });
    assert_eq!(regs.ip, CALLER);
    assert_eq!(*seen.lock().unwrap(), vec![(7, 42)]);
    assert_eq!(
        (krp.in_flight(), krp.nmissed(), krp.probe().hits()),
        (0, 0, 1)
    );
}

#[test]
fn an_entry_handler_that_declines_leaves_the_call_alone() {
    let fx = fixture();
    let krp = Kretprobe::at(H)
        .entry_handler(|_, _| EntryAction::Decline)
        .handler(|_, _, _| panic!("a declined call has no return handler"))
        .build()
        .unwrap();
    fx.reg.register(&krp).unwrap();
    let mut stack = Stack::new();
    enter(&fx.reg, H, Stack::top(), CALLER, 0, &mut stack);
    assert_eq!(stack.read_u64(Stack::top()).unwrap(), CALLER);
    assert_eq!(krp.in_flight(), 0, "the instance went back to the pool");
    assert_eq!(leave(&fx.reg, Stack::top(), 0).0, ReturnOutcome::NotOurs);
}

#[test]
fn an_empty_pool_counts_nmissed_and_tracks_nothing() {
    let fx = fixture();
    let krp = Kretprobe::at(H).maxactive(2).build().unwrap();
    fx.reg.register(&krp).unwrap();
    let mut stack = Stack::new();
    let top = Stack::top();
    // Three nested calls (recursion): only two instances.
    for depth in 0..3u64 {
        enter(&fx.reg, H, top - 64 * depth, CALLER + depth, 0, &mut stack);
    }
    assert_eq!((krp.in_flight(), krp.nmissed()), (2, 1));
    assert_eq!(
        stack.read_u64(top - 128).unwrap(),
        CALLER + 2,
        "the untracked call keeps its return address"
    );
    // The two tracked calls return innermost first.
    assert_eq!(
        leave(&fx.reg, top - 64, 0).0,
        ReturnOutcome::Returned { to: CALLER + 1 }
    );
    assert_eq!(
        leave(&fx.reg, top, 0).0,
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(krp.in_flight(), 0);
}

fn registered_recording() -> (Fixture, Seen, Kretprobe<u64>) {
    let fx = fixture();
    let seen = Seen::default();
    let krp = recording(&seen);
    fx.reg.register(&krp).unwrap();
    (fx, seen, krp)
}

/// `h` called with argument 1, and from inside it (recursion) with 2;
/// returns the two calls' stack pointers.
fn nested_calls(reg: &Reg) -> (u64, u64) {
    let mut stack = Stack::new();
    let (outer, inner) = (Stack::top(), Stack::top() - 0x100);
    enter(reg, H, outer, CALLER, 1, &mut stack);
    enter(reg, H, inner, H + 5, 2, &mut stack);
    (outer, inner)
}

#[test]
fn recursive_calls_return_to_their_own_callers_with_their_own_data() {
    let (fx, seen, _krp) = registered_recording();
    let (outer, inner) = nested_calls(&fx.reg);
    assert_eq!(
        leave(&fx.reg, inner, 20).0,
        ReturnOutcome::Returned { to: H + 5 }
    );
    assert_eq!(
        leave(&fx.reg, outer, 10).0,
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(*seen.lock().unwrap(), vec![(2, 20), (1, 10)]);
}

#[test]
fn two_kretprobes_on_one_function_both_run_and_the_caller_is_restored() {
    let fx = fixture();
    let order = Arc::new(Mutex::new(Vec::new()));
    let (o1, o2) = (order.clone(), order.clone());
    let first = Kretprobe::at(H)
        .handler(move |_, _, _| o1.lock().unwrap().push("first"))
        .build()
        .unwrap();
    let second = Kretprobe::at(H)
        .handler(move |_, _, _| o2.lock().unwrap().push("second"))
        .build()
        .unwrap();
    fx.reg.register(&first).unwrap();
    fx.reg.register(&second).unwrap();
    let mut stack = Stack::new();
    enter(&fx.reg, H, Stack::top(), CALLER, 0, &mut stack);
    assert_eq!(
        leave(&fx.reg, Stack::top(), 0).0,
        ReturnOutcome::Returned { to: CALLER },
        "one trampoline hit serves both"
    );
    assert_eq!(*order.lock().unwrap(), vec!["second", "first"]);
    assert_eq!((first.in_flight(), second.in_flight()), (0, 0));
}

#[test]
fn a_frame_abandoned_without_returning_is_reclaimed_by_a_return_above_it() {
    let (fx, seen, krp) = registered_recording();
    let (outer, _inner) = nested_calls(&fx.reg);
    // The inner call is left by longjmp: the outer one returns directly.
    assert_eq!(
        leave(&fx.reg, outer, 10).0,
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(*seen.lock().unwrap(), vec![(1, 10)], "no handler for it");
    assert_eq!(krp.in_flight(), 0, "its instance is back in the pool");
}

#[test]
fn calls_on_different_threads_are_matched_per_thread() {
    let (fx, seen, _krp) = registered_recording();
    // Both threads use the same stack address: only the thread tells the
    // instances apart.
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (reg, barrier) = (&fx.reg, &barrier);
            s.spawn(move || {
                let mut stack = Stack::new();
                enter(reg, H, Stack::top(), CALLER + t, t, &mut stack);
                barrier.wait(); // both in flight
                assert_eq!(
                    leave(reg, Stack::top(), 100 + t).0,
                    ReturnOutcome::Returned { to: CALLER + t }
                );
            });
        }
    });
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, vec![(0, 100), (1, 101)]);
}

#[test]
fn unregistering_orphans_calls_in_flight_which_still_return_to_their_callers() {
    let fx = fixture();
    let krp = Kretprobe::at(H)
        .data::<Tracked>()
        .maxactive(3)
        .entry_handler(|d, _| {
            d.0 = 5;
            EntryAction::Track
        })
        .handler(|_, _, _| panic!("no return handler after unregistration"))
        .build()
        .unwrap();
    fx.reg.register(&krp).unwrap();
    let mut stack = Stack::new();
    enter(&fx.reg, H, Stack::top(), CALLER, 0, &mut stack);
    fx.reg.unregister(&krp).unwrap();
    assert_eq!(fx.reg.text().snapshot(), code());
    assert_eq!(fx.reg.orphans(), 1, "the pool waits for the call in flight");
    drop(krp); // the user's handle goes too: only the orphan keeps the pool
    assert_eq!(tracked_drops(), 0);

    assert_eq!(
        leave(&fx.reg, Stack::top(), 0).0,
        ReturnOutcome::Returned { to: CALLER },
        "the trampoline still finds the orphaned instance"
    );
    assert_eq!(fx.reg.orphans(), 0, "reclaimed once the call returned");
    assert_eq!(tracked_drops(), 3, "every instance freed once");
}

#[test]
fn a_return_while_a_handler_runs_restores_the_caller_without_the_handler() {
    static REG: OnceLock<Reg> = OnceLock::new();
    let reg = REG.get_or_init(|| fixture().reg);
    let krp = Kretprobe::at(H)
        .handler(|_, _, _| panic!("re-entered: the handler must not run"))
        .build()
        .unwrap();
    reg.register(&krp).unwrap();
    let mut stack = Stack::new();
    enter(reg, H, Stack::top(), CALLER, 0, &mut stack);
    let returned = Arc::new(Mutex::new(None));
    let r = returned.clone();
    // A handler on the same thread during which the tracked call returns
    // (e.g. a probe handler in a signal that interrupted the function).
    let p = Kprobe::at(F_MOV_EAX)
        .pre(move |_, _| {
            *r.lock().unwrap() = Some(leave(REG.get().unwrap(), Stack::top(), 0).0);
            Action::Continue
        })
        .build();
    reg.register(&p).unwrap();
    let mut regs = trap_regs(F_MOV_EAX);
    hit(reg, F_MOV_EAX, &mut regs, &mut Stack::new());
    assert_eq!(
        *returned.lock().unwrap(),
        Some(ReturnOutcome::Returned { to: CALLER })
    );
    assert_eq!(krp.nmissed(), 1);
    assert_eq!(krp.in_flight(), 0);
    reg.unregister(&p).unwrap();
    reg.unregister(&krp).unwrap();
}

#[test]
fn a_kretprobe_registers_by_symbol_and_aggregates_with_a_kprobe() {
    let fx = fixture();
    let seen = Seen::default();
    let s = seen.clone();
    let krp = Kretprobe::symbol("h", 0)
        .data::<u64>()
        .handler(move |_, _, ret| s.lock().unwrap().push((0, ret)))
        .build()
        .unwrap();
    let kp = Kprobe::at(H).build();
    fx.reg.register(&kp).unwrap();
    fx.reg.register(&krp).unwrap();
    assert_eq!(fx.reg.sites().len(), 1);
    let mut stack = Stack::new();
    enter(&fx.reg, H, Stack::top(), CALLER, 0, &mut stack);
    assert_eq!(
        leave(&fx.reg, Stack::top(), 9).0,
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(kp.hits(), 1);
    assert_eq!(*seen.lock().unwrap(), vec![(0, 9)]);
}

#[test]
fn the_default_pool_holds_max_of_10_and_twice_the_cpus() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(default_maxactive(), (2 * cpus).max(10));
    let krp = Kretprobe::at(H).build().unwrap();
    assert_eq!(krp.maxactive(), default_maxactive());
}

#[test]
fn a_kretprobe_can_be_registered_again_after_unregistration() {
    let (fx, seen, krp) = registered_recording();
    fx.reg.unregister(&krp).unwrap();
    fx.reg.register(&krp).unwrap();
    let mut stack = Stack::new();
    enter(&fx.reg, H, Stack::top(), CALLER, 3, &mut stack);
    assert_eq!(
        leave(&fx.reg, Stack::top(), 4).0,
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(*seen.lock().unwrap(), vec![(3, 4)]);
}

#[test]
fn both_kinds_share_one_placement_and_one_register_family_and_count_returns() {
    use rcu_registry::probes::kprobe::AsKprobe;
    use rcu_registry::probes::ProbeError;
    let fx = fixture();
    // Placed the same way as a kprobe, without a turbofish for "no data";
    // a kretprobe off the entry is refused at registration.
    let off = Kretprobe::symbol("h", 1).build().unwrap();
    assert!(matches!(
        fx.reg.register(&off),
        Err(ProbeError::NotAtFunctionEntry { .. })
    ));
    let krp = Kretprobe::symbol("h", 0).maxactive(1).build().unwrap();
    let kp = Kprobe::symbol("f", 4).build();
    fx.reg.register(&krp).unwrap();
    fx.reg.register(&kp).unwrap();

    let mut stack = Stack::new();
    let top = Stack::top();
    enter(&fx.reg, H, top, CALLER, 0, &mut stack);
    // Recursion past maxactive: the inner call is missed.
    enter(&fx.reg, H, top - 64, CALLER + 1, 0, &mut stack);
    assert_eq!(
        leave(&fx.reg, top, 5).0,
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(krp.probe().hits(), 2);
    assert_eq!((krp.returns(), krp.nmissed()), (1, 1));
    assert_eq!(
        krp.probe().nmissed(),
        0,
        "the entry ran both times: the miss is the pool's"
    );

    // enable/disable and a mixed batch take both kinds.
    fx.reg.disable(&krp).unwrap();
    fx.reg.enable(&krp).unwrap();
    fx.reg
        .unregister_many(&[&krp as &dyn AsKprobe, &kp])
        .unwrap();
    assert!(fx.reg.is_empty());
    assert_eq!(fx.reg.text().snapshot(), code());
}
