//! loom models of uprobe return handlers: a call's entry and return racing
//! the unregistration of a consumer with a return handler.
//!
//! 1. Another consumer stays: the call is always tracked (the breakpoint
//!    stays) and always returns to its caller; the removed consumer's
//!    return handler either ran ordered before `unregister` returned (the
//!    model poisons its data right after; an unordered access is a loom
//!    data race) or did not run; the remaining consumer's always runs.
//! 2. The last consumer goes (the uprobe leaves the tree): a call that was
//!    tracked still returns to its caller through the trampoline, with its
//!    instance freed, and the return handler obeys the same ordering.
//!
//! 3. A consumer registered while a call is in flight: its return handler
//!    runs exactly when its handler saw the call's entry (sequence numbers:
//!    a consumer that joined after the entry is not called at the return).
//!
//! What these models do NOT cover:
//! - the real `Srcu` domain: the registry runs on the reader-counting
//!   `ModelDomain` (same grace-period contract; `Srcu` has its own models).
//!   `ModelDomain::call` waits for readers inline, so the list replacement
//!   alone may already order the handler before `unregister` returns: a
//!   missing `synchronize` in `unregister` is NOT caught here (checked:
//!   removing it still passes); tests/uprobe_ret.rs
//!   `unregister_waits_for_a_ret_handler_that_is_running` catches it on
//!   `Srcu` (checked);
//! - the per-thread return stacks themselves: they are thread-private
//!   (a thread-local touched only by its thread), so there is no race in
//!   them to model; their LIFO, chaining, depth and abandoned-frame rules
//!   are specified by tests/uprobe_ret.rs;
//! - filters, several hitting threads,
//!   nested or re-entered hits, mmap/munmap racing the call, arm64;
//! - executions beyond the preemption bound (3).

#![cfg(loom)]

mod probe_common;

use std::sync::atomic::{AtomicBool as StdBool, AtomicU64 as StdU64, Ordering as StdOrd};

use loom::sync::Arc;
use loom::thread;
use probe_common::{
    model, nop_ret, setup, uret_return, Reg, Space, Stack, Val, BASE, KEY, S1, SP, URET_CALLER,
    URET_TRAMPOLINE,
};
use rcu_registry::probes::arch::Regs;
use rcu_registry::probes::text::TextMemory;
use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{Consumer, UprobeOutcome};

const TRAMPOLINE: u64 = URET_TRAMPOLINE;
const CALLER: u64 = URET_CALLER;

/// A registry with one space mapping the file `nop; ret`, with a return
/// trampoline.
fn setup_ret() -> (Arc<Reg>, std::sync::Arc<Space>) {
    setup(nop_ret(S1).with_return_trampoline(TRAMPOLINE))
}

/// The thread calls the probed function from `CALLER` and it returns.
/// Returns whether the call was tracked (went through the trampoline);
/// either way it ends at `CALLER`.
fn call_and_return(reg: &Reg, space: &Space) -> bool {
    let mut stack = Stack(CALLER);
    let mut b = [0u8; 1];
    space.text.read(BASE, &mut b).unwrap();
    if b[0] == 0xcc {
        let mut regs = Regs {
            ip: BASE + 1,
            sp: SP,
            ..Regs::default()
        };
        match reg.on_breakpoint(space.id, &mut regs, &mut stack) {
            UprobeOutcome::Done(UprobeFinished::Emulated | UprobeFinished::Vanished) => {}
            UprobeOutcome::Done(other) => panic!("trapped on our breakpoint, got {other:?}"),
            UprobeOutcome::SingleStep(_) => panic!("a nop is emulated"),
        }
    }
    let tracked = uret_return(reg, space, &stack);
    if tracked {
        assert_eq!(reg.return_depth(space.id), 0, "the instance is freed");
    }
    tracked
}

/// A consumer whose return handler touches `data`.
fn touching(data: &Arc<Val>) -> Consumer {
    let data = data.clone();
    Consumer::builder()
        .ret_handler(move |r, _| {
            assert_eq!((r.func, r.ret_addr), (BASE, CALLER));
            data.touch();
        })
        .build()
}

#[test]
fn a_return_racing_the_removal_of_a_consumer_never_runs_it_late() {
    model(|| {
        let (reg, space) = setup_ret();
        let data = Arc::new(Val::default());
        let gone = touching(&data);
        let kept_runs = std::sync::Arc::new(StdU64::new(0));
        let kept = {
            let n = kept_runs.clone();
            Consumer::builder()
                .ret_handler(move |_, _| {
                    n.fetch_add(1, StdOrd::SeqCst);
                })
                .build()
        };
        reg.register_in_function(KEY, 0, &gone).unwrap();
        reg.register_in_function(KEY, 0, &kept).unwrap();
        let caller = {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || {
                assert!(call_and_return(&reg, &space), "a consumer stays: tracked");
            })
        };
        reg.unregister(KEY, &gone).unwrap();
        data.poison();
        caller.join().unwrap();
        assert_eq!(kept_runs.load(StdOrd::SeqCst), 1);
        assert_eq!(reg.consumers(KEY), 1);
    });
}

#[test]
fn a_call_in_flight_when_its_uprobe_goes_still_returns_to_its_caller() {
    model(|| {
        let (reg, space) = setup_ret();
        let data = Arc::new(Val::default());
        let ran = std::sync::Arc::new(StdBool::new(false));
        let c = {
            let (data, ran) = (data.clone(), ran.clone());
            Consumer::builder()
                .ret_handler(move |_, _| {
                    data.touch();
                    ran.store(true, StdOrd::SeqCst);
                })
                .build()
        };
        reg.register_in_function(KEY, 0, &c).unwrap();
        let caller = {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || {
                call_and_return(&reg, &space);
            })
        };
        reg.unregister(KEY, &c).unwrap();
        data.poison();
        caller.join().unwrap();
        assert!(reg.is_empty());
        assert_eq!(space.text.snapshot(), vec![0x90, 0xc3]);
    });
}

#[test]
fn a_consumer_registered_during_a_call_sees_both_its_entry_and_return_or_neither() {
    model(|| {
        let (reg, space) = setup_ret();
        let first = Consumer::builder().ret_handler(|_, _| {}).build();
        reg.register_in_function(KEY, 0, &first).unwrap();
        let late = Consumer::builder()
            .handler(|_, _| rcu_registry::probes::uprobe::ConsumerAction::Continue)
            .ret_handler(|_, _| {})
            .build();
        let caller = {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || {
                assert!(call_and_return(&reg, &space), "`first` stays: tracked");
            })
        };
        reg.register_in_function(KEY, 0, &late).unwrap();
        caller.join().unwrap();
        assert_eq!(first.ret_hits(), 1);
        assert_eq!(
            late.hits(),
            late.ret_hits(),
            "a return handler runs exactly for the calls whose entry it saw"
        );
    });
}
