//! loom models of the kprobe registry's hit path against writers.
//!
//! 1. A hit racing `unregister_nosync` + `commit`: the hit either finds the
//!    probe and its handler's accesses happen-before `commit` returns (the
//!    model poisons the handler's data right after `commit`; a handler not
//!    ordered before that is a loom data race), or it finds the breakpoint
//!    gone (`Vanished`) and runs nothing. Never `NotOurs`.
//! 2. A hit racing `register`: a thread that traps on the new breakpoint
//!    always finds the site (published before the breakpoint is written).
//! 3. A kretprobe's pool against unregistration: a call entered before the
//!    unregistration returns to its caller through the orphaned instance;
//!    the pool (and each instance's data) is freed only after every
//!    instance came back, ordered after the handlers' and the trampoline's
//!    accesses (data poisoned on drop), and exactly once.
//!
//! 4. A thread that abandons a tracked call (it exits: the exit hook calls
//!    the explicit flush, which the model calls directly) while its
//!    kretprobe is unregistered: the instance goes back to the orphaned
//!    pool, which is freed once, ordered after the entry handler's accesses.
//! 5. A member list retired by a *registration* (freed by its own
//!    `Rcu::call` callback, on the domain's worker thread) while a
//!    single-step started on it is in flight: the callback never frees it
//!    under the step (it parks it), and an unregistration of the probe
//!    returns only after the step's post handler ran (the model poisons the
//!    handler's data right after). Two variants: the hit racing everything,
//!    and the step pinned in flight across the callback.
//!
//! 6. A trap racing the removal of the probe at an address *and* a new
//!    registration there: the hit's lookup can miss (between the two) and
//!    then find the new probe's breakpoint in the text; it must look the
//!    address up again rather than call the trap foreign (`NotOurs`, which
//!    the live runtime would hand to the default SIGTRAP action). Found by
//!    the stress test (1 `NotOurs` in 24 M traps) before this model.
//!
//! 7. Two threads entering a kretprobe with one instance at once (its pool
//!    is a lock-free set of free flags): at most one call is tracked at a
//!    time, so a thread that finds the instance taken counts `nmissed`;
//!    the instance's data passes from one user to the next ordered (the
//!    entry handler touches it), and afterwards `hits == 2`,
//!    `returns + nmissed == 2` (the per-CPU counters exact) and nothing
//!    is out.
//!
//! The models are known to bite: with `commit` skipping its grace period,
//! model 1 reports a race; with the pool's give-back store `Relaxed`
//! instead of `Release`, models 3 and 7 do (a race on the instance's
//! data; model 4, which frees the pool from the flushing thread itself,
//! does not); with commit not
//! taking the lists a callback parked, model 5 (racing variant) reports a
//! race on the handler's data; with the callback freeing a list without
//! looking at its steps, model 5 (pinned variant) fails its "parked, not
//! freed" check.
//!
//! 8. A thread's own instance-table stripe, which its entries and returns
//!    use without a lock, against an explicit flush of that thread from
//!    another (the busy/remote handshake, `kprobe/instances.rs`), racing
//!    the return: the instance is taken exactly once, by the return or by
//!    the flush, and the chain is never touched by both at once (a loom
//!    race otherwise). Known to bite: without the remote side's wait for
//!    `busy`, or without the owner's barrier, loom reports the race.
//!
//! What these models do NOT cover:
//! - single-steps in flight on lists retired by unregistrations (model 5
//!   covers lists retired by registrations; tests/kprobe.rs covers a commit
//!   waiting for a step in flight, and the stress test runs single-steps
//!   against commits on real threads); models 1 to 4 use an emulated
//!   instruction (`nop`), so no XOL slot and no callback worker;
//! - the thread-exit hook itself (a pthread key destructor; loom has no
//!   thread exit of its own): tests/kretprobe_thread_exit.rs runs it on real
//!   threads;
//! - several probes aggregated on one address beyond model 5's join,
//!   enable/disable, more than one hit thread, nested (re-entered) hits,
//!   signal delivery;
//! - `membarrier`: under loom the RCU barriers are `SeqCst` fences (see the
//!   rcu models);
//! - executions beyond the preemption bound (3; 2 for model 5, whose
//!   callback worker is a third thread: about 171,000 and 27,000 executions,
//!   some 20 s together in release).

#![cfg(loom)]

mod probe_common;

use std::sync::atomic::{AtomicBool as StdBool, Ordering as StdOrd};
use std::sync::Arc;

use loom::thread;
use probe_common::{model, model_with, Stack, Val, SP};
use rcu_registry::__internals::kprobe::RetiredListCounts;
use rcu_registry::probes::arch::{Regs, X86_64};
use rcu_registry::probes::kprobe::{
    Action, EntryAction, HitOutcome, Kprobe, KprobeRegistry, Kretprobe, StepResult, ThreadKey,
};
use rcu_registry::probes::outcome::ReturnOutcome;
use rcu_registry::probes::resolve::SymbolTable;
use rcu_registry::probes::text::{Image, TextMemory};
use rcu_registry::probes::xol::XolArena;
use rcu_registry::rcu::Rcu;

/// `f`: nop; ret
const F: u64 = 0x100;
const TRAMPOLINE: u64 = 0x1f0;
const CALLER: u64 = 0x4444;

/// Poisons on drop: the pool's data is freed after every use of it.
#[derive(Default)]
struct Data(Val);

std::thread_local! {
    /// Drops of `Data` in this test's model. A thread-local of the test's
    /// OS thread (loom runs every model thread of one test on it): the
    /// test harness runs the models in parallel, and a shared counter let
    /// one model's pool frees reach another's assertion.
    static DATA_DROPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Drop for Data {
    fn drop(&mut self) {
        self.0.poison();
        DATA_DROPS.with(|d| d.set(d.get() + 1));
    }
}

type Reg = KprobeRegistry<X86_64, Image>;

fn registry() -> Reg {
    let mut code = vec![0xccu8; 0x100];
    code[0] = 0x90;
    code[1] = 0xc3;
    let mut syms = SymbolTable::new();
    syms.insert("f", F, 2);
    KprobeRegistry::builder(
        X86_64,
        Image::new(F, code),
        syms,
        Arc::new(XolArena::new(0x10_0000, 1, X86_64::XOL_SLOT_SIZE)),
    )
    .rcu(Rcu::new())
    .buckets(2)
    .instance_stripes(1)
    .trampoline(TRAMPOLINE)
    .build()
}

/// The thread "executes" `f`: it traps only if the breakpoint is there.
fn run_f(reg: &Reg, stack: &mut Stack) -> Option<(HitOutcome<'static>, Regs)> {
    let mut b = [0u8; 1];
    reg.text().read(F, &mut b).unwrap();
    if b[0] != 0xcc {
        return None;
    }
    let mut regs = Regs {
        ip: F + 1,
        sp: SP,
        ..Regs::default()
    };
    let out = match reg.on_breakpoint(&mut regs, stack) {
        HitOutcome::NotOurs => HitOutcome::NotOurs,
        HitOutcome::Vanished => HitOutcome::Vanished,
        HitOutcome::Emulated => HitOutcome::Emulated,
        other => panic!("unexpected outcome for a nop: {other:?}"),
    };
    Some((out, regs))
}

#[test]
fn a_hit_racing_commit_runs_its_handler_before_commit_returns_or_not_at_all() {
    model(|| {
        let reg = Arc::new(registry());
        let data = Arc::new(Val::default());
        let ran = Arc::new(StdBool::new(false));
        let p = {
            let (data, ran) = (data.clone(), ran.clone());
            Kprobe::at(F)
                .pre(move |_, _| {
                    data.touch();
                    ran.store(true, StdOrd::SeqCst);
                    Action::Continue
                })
                .build()
        };
        reg.register(&p).unwrap();
        let hitter = {
            let (reg, ran) = (reg.clone(), ran.clone());
            thread::spawn(move || {
                let mut stack = Stack(0);
                match run_f(&reg, &mut stack) {
                    None => {}
                    Some((HitOutcome::Emulated, regs)) => {
                        assert!(ran.load(StdOrd::SeqCst), "found the probe: ran it");
                        assert_eq!(regs.ip, F + 1);
                    }
                    Some((HitOutcome::Vanished, regs)) => {
                        assert!(!ran.load(StdOrd::SeqCst));
                        assert_eq!(regs.ip, F, "resumes at the restored instruction");
                    }
                    Some((other, _)) => panic!("a trap on our breakpoint was {other:?}"),
                }
            })
        };
        reg.unregister_nosync(&p).unwrap();
        reg.commit();
        // Any handler not finished before commit returned races with this.
        data.poison();
        hitter.join().unwrap();
    });
}

#[test]
fn a_thread_that_traps_on_a_new_breakpoint_always_finds_its_site() {
    model(|| {
        let reg = Arc::new(registry());
        let ran = Arc::new(StdBool::new(false));
        let p = {
            let ran = ran.clone();
            Kprobe::at(F)
                .pre(move |_, _| {
                    ran.store(true, StdOrd::SeqCst);
                    Action::Continue
                })
                .build()
        };
        let hitter = {
            let (reg, ran) = (reg.clone(), ran.clone());
            thread::spawn(move || {
                if let Some((out, _)) = run_f(&reg, &mut Stack(0)) {
                    assert!(matches!(out, HitOutcome::Emulated), "got {out:?}");
                    assert!(ran.load(StdOrd::SeqCst));
                }
            })
        };
        reg.register(&p).unwrap();
        hitter.join().unwrap();
    });
}

#[test]
fn a_trap_racing_removal_and_a_new_registration_at_the_address_is_never_foreign() {
    model(|| {
        let reg = Arc::new(registry());
        let p = Kprobe::at(F).build();
        let q = Kprobe::at(F).build();
        reg.register(&p).unwrap();
        let hitter = {
            let reg = reg.clone();
            thread::spawn(move || {
                if let Some((out, _)) = run_f(&reg, &mut Stack(0)) {
                    // The trap was on p's or q's breakpoint: ours either
                    // way, whichever probe the lookup finds (or neither, if
                    // the byte is back to the original when it looks).
                    assert!(
                        matches!(out, HitOutcome::Emulated | HitOutcome::Vanished),
                        "a trap on our breakpoint was {out:?}"
                    );
                }
            })
        };
        reg.unregister_nosync(&p).unwrap();
        reg.commit();
        reg.register(&q).unwrap();
        hitter.join().unwrap();
        reg.unregister(&q).unwrap();
    });
}

/// A kretprobe on `f` with one instance whose entry handler touches the
/// instance's data (poisoned when the pool is freed), and `handler` as its
/// return handler.
fn data_kretprobe(handler: impl Fn(&mut Data) + Send + Sync + 'static) -> Kretprobe<Data> {
    Kretprobe::at(F)
        .data::<Data>()
        .maxactive(1)
        .entry_handler(|d, _| {
            d.0.touch();
            EntryAction::Track
        })
        .handler(move |d, _, _| handler(d))
        .build()
        .unwrap()
}

/// The tracked call of `f` returns into the trampoline: the registry
/// sends it back to its caller.
fn return_to_caller(reg: &Reg) {
    let mut regs = Regs {
        ip: TRAMPOLINE,
        sp: SP + 8,
        ..Regs::default()
    };
    assert_eq!(
        reg.on_return(&mut regs),
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(regs.ip, CALLER);
}

/// Drops the user's handle of an unregistered kretprobe and waits until the
/// registry freed its pool: ordered only by the pool's in-flight count, not
/// by any join. The pool's data is dropped exactly once.
fn wait_until_pool_freed(reg: &Reg, krp: Kretprobe<Data>) {
    drop(krp);
    while reg.orphans() != 0 {
        thread::yield_now();
    }
    assert_eq!(DATA_DROPS.with(|d| d.get()), 1, "freed exactly once");
}

#[test]
fn a_kretprobe_pool_outlives_its_unregistration_until_the_call_returns() {
    model(|| {
        DATA_DROPS.with(|d| d.set(0));
        let reg = Arc::new(registry());
        let krp = data_kretprobe(|d| d.0.touch());
        reg.register(&krp).unwrap();
        let caller = {
            let reg = reg.clone();
            thread::spawn(move || {
                let mut stack = Stack(CALLER);
                let Some((out, _)) = run_f(&reg, &mut stack) else {
                    return;
                };
                if stack.0 == TRAMPOLINE {
                    // Tracked: the function returns into the trampoline.
                    return_to_caller(&reg);
                } else {
                    assert!(
                        matches!(out, HitOutcome::Emulated | HitOutcome::Vanished),
                        "got {out:?}"
                    );
                }
            })
        };
        reg.unregister(&krp).unwrap();
        // The pool is freed (its data poisoned) once the call returned.
        wait_until_pool_freed(&reg, krp);
        caller.join().unwrap();
    });
}

#[test]
fn a_thread_flushed_inside_a_call_frees_the_orphaned_pool_after_giving_its_instance_back() {
    model(|| {
        DATA_DROPS.with(|d| d.set(0));
        let reg = Arc::new(registry());
        let krp = data_kretprobe(|_| panic!("the call never returns"));
        reg.register(&krp).unwrap();
        let caller = {
            let reg = reg.clone();
            thread::spawn(move || {
                let mut stack = Stack(CALLER);
                if run_f(&reg, &mut stack).is_some() && stack.0 == TRAMPOLINE {
                    // The thread abandons the call (exits, in real life:
                    // the exit hook makes the same call; loom has none).
                    assert_eq!(reg.flush_thread(ThreadKey::current()), 1);
                }
                assert_eq!(reg.flush_thread(ThreadKey::current()), 0);
            })
        };
        reg.unregister(&krp).unwrap();
        // Freed once the flush gave the instance back.
        wait_until_pool_freed(&reg, krp);
        caller.join().unwrap();
    });
}

#[test]
fn two_entries_on_one_instance_track_one_call_at_a_time_and_count_the_other_missed() {
    model(|| {
        let reg = Arc::new(registry());
        let krp = data_kretprobe(|d| d.0.touch());
        reg.register(&krp).unwrap();
        let call = |reg: Arc<Reg>| {
            move || {
                let mut stack = Stack(CALLER);
                let (out, _) =
                    run_f(&reg, &mut stack).expect("registered: the breakpoint is there");
                assert!(matches!(out, HitOutcome::Emulated), "got {out:?}");
                if stack.0 == TRAMPOLINE {
                    return_to_caller(&reg);
                }
            }
        };
        let other = thread::spawn(call(reg.clone()));
        call(reg.clone())();
        other.join().unwrap();
        assert_eq!(krp.probe().hits(), 2);
        assert_eq!(krp.returns() + krp.nmissed(), 2);
        assert!(
            krp.returns() >= 1,
            "the first entry always finds the instance"
        );
        assert_eq!(krp.in_flight(), 0);
        reg.unregister(&krp).unwrap();
    });
}

/// Model 8: the thread's own stripe (no lock on its hit path) against an
/// explicit flush of that thread from another thread, racing the return
/// that takes the instance (the flush starts once the entry filed it).
#[test]
fn a_flush_from_another_thread_and_the_owners_call_take_the_instance_exactly_once() {
    model(|| {
        DATA_DROPS.with(|d| d.set(0));
        let reg = Arc::new(registry());
        let krp = data_kretprobe(|d| d.0.touch());
        reg.register(&krp).unwrap();
        let me = ThreadKey::current();
        // Set once the entry filed the instance (and claimed the stripe):
        // the flush then finds the stripe and races the return.
        let entered = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let flusher = {
            let (reg, entered) = (reg.clone(), entered.clone());
            thread::spawn(move || {
                // Acquire pairs with the Release store below.
                while !entered.load(loom::sync::atomic::Ordering::Acquire) {
                    thread::yield_now();
                }
                reg.flush_thread(me)
            })
        };
        let mut stack = Stack(CALLER);
        let (out, _) = run_f(&reg, &mut stack).expect("registered: the breakpoint is there");
        assert!(matches!(out, HitOutcome::Emulated), "got {out:?}");
        assert_eq!(stack.0, TRAMPOLINE, "the one instance is free: tracked");
        entered.store(true, loom::sync::atomic::Ordering::Release);
        let mut regs = Regs {
            ip: TRAMPOLINE,
            sp: SP + 8,
            ..Regs::default()
        };
        let back = reg.on_return(&mut regs);
        let flushed = flusher.join().unwrap();
        match back {
            ReturnOutcome::Returned { to } => {
                assert_eq!((to, flushed), (CALLER, 0));
                assert_eq!(krp.returns(), 1);
            }
            ReturnOutcome::NotOurs => {
                assert_eq!(flushed, 1, "only a flush can have taken it");
                assert_eq!(krp.returns(), 0);
            }
        }
        assert_eq!(krp.in_flight(), 0, "given back exactly once");
        reg.unregister(&krp).unwrap();
    });
}

/// `g`: mov eax, 1; ret (run out of line: single-stepped with a post handler).
const G: u64 = 0x110;

fn xol_registry(rcu: &Rcu) -> Reg {
    let mut code = vec![0xccu8; 0x100];
    code[0] = 0x90;
    code[1] = 0xc3;
    code[0x10..0x16].copy_from_slice(&[0xb8, 0x01, 0, 0, 0, 0xc3]);
    let mut syms = SymbolTable::new();
    syms.insert("f", F, 2).insert("g", G, 6);
    KprobeRegistry::builder(
        X86_64,
        Image::new(F, code),
        syms,
        Arc::new(XolArena::new(0x10_0000, 1, X86_64::XOL_SLOT_SIZE)),
    )
    .rcu(rcu.clone())
    .buckets(2)
    .instance_stripes(1)
    .build()
}

/// A probe with a post handler is hit (single-step) while a registration
/// joins its address, retiring the list the step started on; then the probe
/// is unregistered and its data poisoned. With `pinned`, the step is
/// certain to be in flight when the retired list's RCU callback runs: the
/// hit comes before the registration and completes only after the
/// callback ran (`rcu.barrier()`), so the callback must park the list, not
/// free it, and the commit must take it and wait for the step. Without it,
/// the hit races everything.
fn retired_list_under_a_step(pinned: bool) {
    // The RCU callback worker is a third thread: bound 2 keeps it fast.
    // The pinned stepper yields in a loop while the main thread runs a
    // barrier and a commit (each a grace period of yields): more branches.
    model_with(2, Some(20_000), move || {
        let rcu = Rcu::new();
        let reg = Arc::new(xol_registry(&rcu));
        let data = Arc::new(Val::default());
        let p = {
            let data = data.clone();
            Kprobe::at(G).post(move |_, _| data.touch()).build()
        };
        reg.register(&p).unwrap();
        // Loom atomics: the hand-offs of the pinned variant.
        let hit = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let go = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let stepper = {
            let (reg, hit, go) = (reg.clone(), hit.clone(), go.clone());
            thread::spawn(move || {
                let mut regs = Regs {
                    ip: G + 1,
                    sp: SP,
                    ..Regs::default()
                };
                let mut stack = Stack(0);
                let out = reg.on_breakpoint(&mut regs, &mut stack);
                if pinned {
                    hit.store(true, loom::sync::atomic::Ordering::Release);
                    while !go.load(loom::sync::atomic::Ordering::Acquire) {
                        thread::yield_now();
                    }
                }
                match out {
                    HitOutcome::SingleStep(token) => {
                        // The slot's instruction ran; the step trap comes.
                        regs.ip = token
                            .step_marker()
                            .map_or_else(|| token.plan().fixups.ip.unwrap().from, |m| m + 1);
                        assert!(matches!(
                            reg.on_step_complete(token, &mut regs, &mut stack),
                            StepResult::Done
                        ));
                    }
                    // Found `{q}` alone (no post handler).
                    HitOutcome::Boosted { .. } if !pinned => {}
                    other => panic!("got {other:?}"),
                }
            })
        };
        if pinned {
            while !hit.load(loom::sync::atomic::Ordering::Acquire) {
                thread::yield_now();
            }
        }
        // {p} is retired by a registration: its RCU callback (run by the
        // barrier) must neither free it under a step nor wait for the step.
        let q = Kprobe::at(G).build();
        reg.register(&q).unwrap();
        rcu.barrier();
        let lists = reg.retired_lists();
        assert_eq!(lists.retired, 1);
        assert_eq!(lists.freed + lists.waiting_for_steps as u64, 1);
        if pinned {
            assert_eq!(
                lists.waiting_for_steps, 1,
                "parked, not freed, under the step"
            );
            go.store(true, loom::sync::atomic::Ordering::Release);
        }
        reg.unregister(&p).unwrap();
        // No post handler of `p` may run after this: the commit waited for
        // the step started on the list the registration retired.
        data.poison();
        stepper.join().unwrap();
        assert_eq!(reg.retired_lists().freed, 1);
        drop(reg);
        rcu.barrier();
    });
}

#[test]
fn a_list_a_registration_retired_is_not_freed_under_a_step_and_commit_waits_for_the_step() {
    retired_list_under_a_step(false);
}

#[test]
fn a_retired_list_under_a_step_in_flight_is_parked_by_its_callback_and_finished_by_commit() {
    retired_list_under_a_step(true);
}
