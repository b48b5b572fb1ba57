//! loom models of the uretprobe return-stack pool (`uprobe/retpool.rs`,
//! `uprobe/bindings.rs`): threads claiming a space's preallocated stacks
//! with a compare-and-swap and giving them back.
//!
//! The pool has ONE stack, so the threads compete for it. Each stack's
//! frames live in a loom cell touched only by the stack's holder: two
//! holders at once, or a holder whose accesses are not ordered after the
//! previous holder's give-back, is a loom data race.
//!
//! 1. Two threads each make a tracked call and return: each call is either
//!    tracked (it claimed the stack, went through the trampoline) or
//!    counted missed (it returned straight to its caller); every tracked
//!    return ran its handler; the stack is free afterwards.
//! 2. One thread makes a call and then gives its stack back with
//!    `flush_thread_returns` (what its exit does; loom has no thread-exit
//!    hook), while another makes a call and returns: the same guarantees,
//!    and the stack can be claimed again afterwards.
//!
//! Checked by mutation (each made the models fail, then reverted): the
//! claim's compare-and-swap with `Relaxed` success ordering (loom reports
//! the frames accessed by the next holder without a happens-before edge
//! from the previous holder's give-back), and a claim made of a load of
//! `FREE` followed by a plain store of `BUSY` (two holders at once).
//!
//! What these models do NOT cover:
//! - the pool's teardown while threads still hold stacks (`DEAD`, the
//!   wrapping `remaining` count): specified by the unit tests in
//!   `src/probes/uprobe/retpool.rs`, not modelled;
//! - the real thread-exit hook (a `pthread` key destructor; loom threads
//!   have none): the models call the explicit flush, which runs the same
//!   give-back code;
//! - pools of several stacks (the scan, the per-thread starting point),
//!   several spaces, a full binding table, nested or chained calls, depth
//!   limits: tests/uprobe_ret_pool.rs and tests/uprobe_ret.rs;
//! - signal handlers interrupting a claim (kept out by the re-entrancy
//!   flag, `tests/runtime_reentry.rs` territory);
//! - executions beyond the preemption bound (3).

#![cfg(loom)]

mod probe_common;

use loom::sync::Arc;
use loom::thread;
use probe_common::{
    mapping, model, nop_ret, uret_return, Reg, Space, Stack, BASE, KEY, S1, SP, URET_CALLER,
    URET_TRAMPOLINE,
};
use rcu_registry::__internals::seqtree::model_domain::ModelDomain;
use rcu_registry::probes::arch::{Regs, X86_64};
use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{Consumer, UprobeOutcome};

const TRAMPOLINE: u64 = URET_TRAMPOLINE;
const CALLER: u64 = URET_CALLER;

/// A registry whose space pools hold one stack, one space mapping
/// `nop; ret`, and a consumer with a return handler on the `nop`.
fn setup_one_stack() -> (Arc<Reg>, std::sync::Arc<Space>, Consumer) {
    let reg = Arc::new(Reg::with_domain(X86_64, ModelDomain::new()).with_return_stacks(1));
    let space = std::sync::Arc::new(nop_ret(S1).with_return_trampoline(TRAMPOLINE));
    reg.on_mmap(&space, mapping()).unwrap();
    let c = Consumer::builder().ret_handler(|_, _| {}).build();
    reg.register_in_function(KEY, 0, &c).unwrap();
    (reg, space, c)
}

/// The thread calls the probed function from `CALLER`: the entry trap.
/// Returns its stack (the return address is the trampoline if tracked).
fn enter(reg: &Reg, space: &Space) -> Stack {
    let mut stack = Stack(CALLER);
    let mut regs = Regs {
        ip: BASE + 1,
        sp: SP,
        ..Regs::default()
    };
    match reg.on_breakpoint(space.id, &mut regs, &mut stack) {
        UprobeOutcome::Done(UprobeFinished::Emulated) => {}
        UprobeOutcome::Done(other) => panic!("trapped on our breakpoint, got {other:?}"),
        UprobeOutcome::SingleStep(_) => panic!("a nop is emulated"),
    }
    stack
}

/// After the threads: nothing held, and a call claims the stack again.
fn stack_is_free_again(reg: &Reg, space: &Space) {
    assert_eq!(reg.return_stacks_in_use(space.id), 0);
    let s = enter(reg, space);
    assert!(
        uret_return(reg, space, &s),
        "the stack came back to the pool"
    );
}

#[test]
fn two_threads_never_hold_the_same_stack() {
    model(|| {
        let (reg, space, c) = setup_one_stack();
        let spawn = || {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || {
                let s = enter(&reg, &space);
                uret_return(&reg, &space, &s)
            })
        };
        let (a, b) = (spawn(), spawn());
        let tracked = [a.join().unwrap(), b.join().unwrap()];
        let tracked = tracked.iter().filter(|&&t| t).count() as u64;
        assert!(tracked >= 1, "the first claim finds the stack free");
        assert_eq!(c.ret_hits(), tracked, "every tracked call's handler ran");
        assert_eq!(reg.nmissed(KEY), 2 - tracked, "the others were missed");
        stack_is_free_again(&reg, &space);
    });
}

#[test]
fn a_stack_given_back_by_a_flush_is_safely_claimed_by_another_thread() {
    model(|| {
        let (reg, space, c) = setup_one_stack();
        let leaver = {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || {
                // Leaves the call without returning (its exit, or a
                // `longjmp` for good), then gives the stack back.
                let s = enter(&reg, &space);
                let dropped = reg.flush_thread_returns();
                assert_eq!(dropped, usize::from(s.0 == TRAMPOLINE));
            })
        };
        let caller = {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || {
                let s = enter(&reg, &space);
                uret_return(&reg, &space, &s)
            })
        };
        leaver.join().unwrap();
        let tracked = caller.join().unwrap();
        assert_eq!(c.ret_hits(), u64::from(tracked));
        stack_is_free_again(&reg, &space);
    });
}
