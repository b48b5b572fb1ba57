//! Specification tests of uprobe return handlers (uretprobes) and of the
//! uprobe re-entrancy guard. Calls are simulated on an in-memory stack:
//! `SimThread` pushes return addresses, traps on entry breakpoints and
//! returns through the space's trampoline the way the CPU would.

mod uprobe_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use rcu_registry::probes::arch::{Arm64, Arm64Reg, DataMemory, Regs, StepOutcome};
use rcu_registry::probes::outcome::ReturnOutcome;
use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{
    Consumer, ConsumerAction, SpaceId, UprobeOutcome, UprobeRegistry, UprobeReturn,
    DEFAULT_MAX_RETURN_DEPTH,
};
use rcu_registry::probes::ProbeError;
use uprobe_support::*;

const A: u64 = 0x40_0000;
const B: u64 = 0x55_5555_0000;
/// Where the simulated callers call from.
const CALLER: u64 = 0x9000_0000;

type Log = Arc<Mutex<Vec<UprobeReturn>>>;

/// A consumer with only a return handler, logging every return.
fn ret_logger(log: &Log) -> Consumer {
    let log = Arc::clone(log);
    Consumer::builder()
        .ret_handler(move |r, _| log.lock().unwrap().push(*r))
        .build()
}

/// As [`ret_logger`], with a filter that wants only `space`.
fn ret_logger_in(log: &Log, space: SpaceId) -> Consumer {
    let log = Arc::clone(log);
    Consumer::builder()
        .ret_handler(move |r, _| log.lock().unwrap().push(*r))
        .filter(move |s| s == space)
        .build()
}

fn log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

/// `f` of every logged return, in order.
fn logged<T>(log: &Log, f: impl Fn(&UprobeReturn) -> T) -> Vec<T> {
    log.lock().unwrap().iter().map(f).collect()
}

/// A registry with spaces mapping the file at `A` and at `B`.
fn two_spaces() -> (Registry, Arc<MemSpace>, Arc<MemSpace>) {
    let (reg, a) = setup();
    let b = MemSpace::with_file(2, B);
    mmap_file(&reg, &b);
    (reg, a, b)
}

/// A registry with one space mapping the file at `A`.
fn setup() -> (Registry, Arc<MemSpace>) {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    (reg, a)
}

/// [`setup`], with one logging return consumer at each of `funcs`' entries
/// (all logging to the returned log).
fn logging_at(funcs: &[u64]) -> (Registry, Arc<MemSpace>, Log) {
    let (reg, a) = setup();
    let seen = log();
    for &f in funcs {
        at_entry(&reg, f, &ret_logger(&seen));
    }
    (reg, a, seen)
}

/// Registers `c` at the entry of the function at `func`.
fn at_entry(reg: &Registry, func: u64, c: &Consumer) {
    reg.register_in_function(key(func), func, c).unwrap();
}

#[test]
fn a_ret_handler_sees_the_return_value_and_the_call_returns_to_its_caller() {
    let (reg, a) = setup();
    let seen = log();
    let c = ret_logger(&seen);
    at_entry(&reg, FN0, &c);
    let mut t = SimThread::new();
    assert!(matches!(
        t.call(&reg, &a, A + FN0, CALLER),
        UprobeFinished::Emulated
    ));
    assert_eq!(
        Some(t.return_slot()),
        a.trampoline,
        "the entry hijacked the return address"
    );
    assert_eq!(reg.return_depth(a.id), 1);
    assert_eq!(t.ret(&reg, &a, 42), Ret::Trampoline(CALLER));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![UprobeReturn {
            space: a.id,
            func: A + FN0,
            key: key(FN0),
            ret_addr: CALLER,
            retval: 42,
        }]
    );
    assert_eq!(
        reg.return_depth(a.id),
        0,
        "the instance is freed at the return"
    );
    assert_eq!((c.hits(), c.ret_hits()), (0, 1));
    assert_eq!(reg.nmissed(key(FN0)), 0);
}

#[test]
fn a_consumer_with_both_handlers_runs_one_at_entry_and_the_other_at_return() {
    let (reg, a) = setup();
    let events = Arc::new(Mutex::new(Vec::new()));
    let (e1, e2) = (Arc::clone(&events), Arc::clone(&events));
    let c = Consumer::builder()
        .handler(move |h, _| {
            e1.lock().unwrap().push(format!("entry {:#x}", h.vaddr));
            ConsumerAction::Continue
        })
        .ret_handler(move |r, _| e2.lock().unwrap().push(format!("return {}", r.retval)))
        .build();
    at_entry(&reg, FN1, &c);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN1, CALLER);
    assert_eq!(t.ret(&reg, &a, 7), Ret::Trampoline(CALLER));
    assert_eq!(
        *events.lock().unwrap(),
        vec![format!("entry {:#x}", A + FN1), "return 7".to_string()]
    );
}

#[test]
fn without_a_ret_handler_the_return_address_is_left_alone() {
    let (reg, a) = setup();
    let c = Consumer::new(|_, _| ConsumerAction::Continue);
    at_entry(&reg, FN0, &c);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    assert_eq!(t.return_slot(), CALLER);
    assert_eq!(reg.return_depth(a.id), 0);
    assert_eq!(t.ret(&reg, &a, 0), Ret::Direct(CALLER));
}

#[test]
fn nested_calls_return_in_lifo_order_each_to_its_own_caller() {
    let (reg, a, seen) = logging_at(&[FN0, FN1, FN2]);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    let _ = t.call(&reg, &a, A + FN1, A + FN0 + 1);
    let _ = t.call(&reg, &a, A + FN2, A + FN1 + 1);
    assert_eq!(reg.return_depth(a.id), 3);
    assert_eq!(t.ret(&reg, &a, 2), Ret::Trampoline(A + FN1 + 1));
    assert_eq!(t.ret(&reg, &a, 1), Ret::Trampoline(A + FN0 + 1));
    assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
    assert_eq!(
        logged(&seen, |r| (r.func, r.retval, r.ret_addr)),
        vec![
            (A + FN2, 2, A + FN1 + 1),
            (A + FN1, 1, A + FN0 + 1),
            (A + FN0, 0, CALLER)
        ]
    );
    assert_eq!(reg.return_depth(a.id), 0);
}

#[test]
fn recursion_tracks_every_level_and_unwinds_innermost_first() {
    let (reg, a) = setup();
    let seen = log();
    at_entry(&reg, FN1, &ret_logger(&seen));
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN1, CALLER);
    for _ in 1..10 {
        let _ = t.call(&reg, &a, A + FN1, A + FN1 + 1);
    }
    assert_eq!(reg.return_depth(a.id), 10);
    for level in (0..10).rev() {
        let want = if level == 0 { CALLER } else { A + FN1 + 1 };
        assert_eq!(t.ret(&reg, &a, level), Ret::Trampoline(want));
    }
    assert_eq!(
        logged(&seen, |r| r.retval),
        (0..10).rev().collect::<Vec<_>>()
    );
    assert_eq!(reg.return_depth(a.id), 0);
}

#[test]
fn calls_beyond_the_depth_limit_count_nmissed_and_keep_their_return_address() {
    let reg = Registry::new(Default::default()).with_max_return_depth(4);
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let seen = log();
    let c = ret_logger(&seen);
    at_entry(&reg, FN1, &c);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN1, CALLER);
    for level in 1..6 {
        let _ = t.call(&reg, &a, A + FN1, A + FN1 + 1);
        let hijacked = Some(t.return_slot()) == a.trampoline;
        assert_eq!(hijacked, level < 4, "level {level}");
    }
    assert_eq!(reg.return_depth(a.id), 4);
    assert_eq!(reg.nmissed(key(FN1)), 2);
    assert_eq!(t.ret(&reg, &a, 5), Ret::Direct(A + FN1 + 1));
    assert_eq!(t.ret(&reg, &a, 4), Ret::Direct(A + FN1 + 1));
    for level in (0..4).rev() {
        let want = if level == 0 { CALLER } else { A + FN1 + 1 };
        assert_eq!(t.ret(&reg, &a, level), Ret::Trampoline(want));
    }
    assert_eq!(c.ret_hits(), 4);
    assert_eq!(reg.return_depth(a.id), 0);
}

#[test]
fn the_default_depth_limit_is_the_kernel_s_64() {
    let (reg, a) = setup();
    assert_eq!(reg.max_return_depth(), DEFAULT_MAX_RETURN_DEPTH);
    assert_eq!(DEFAULT_MAX_RETURN_DEPTH, 64);
    let c = ret_logger(&log());
    at_entry(&reg, FN0, &c);
    let mut t = SimThread::new();
    for _ in 0..70 {
        let _ = t.call(&reg, &a, A + FN0, CALLER);
    }
    assert_eq!(reg.return_depth(a.id), 64);
    assert_eq!(reg.nmissed(key(FN0)), 6);
    while t.depth() > 0 {
        let _ = t.ret(&reg, &a, 0);
    }
    assert_eq!(c.ret_hits(), 64);
    assert_eq!(reg.return_depth(a.id), 0);
}

#[test]
fn a_tail_call_between_probed_functions_returns_once_through_both_ret_handlers() {
    let (reg, a, seen) = logging_at(&[FN0, FN1]);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    // f0 ends in `jmp f1`: f1 finds the trampoline as its return address.
    let _ = t.tail_call(&reg, &a, A + FN1);
    assert_eq!(Some(t.return_slot()), a.trampoline);
    assert_eq!(reg.return_depth(a.id), 2, "the chained call is tracked");
    assert_eq!(t.ret(&reg, &a, 9), Ret::Trampoline(CALLER));
    assert_eq!(
        logged(&seen, |r| (r.func, r.ret_addr)),
        vec![(A + FN1, CALLER), (A + FN0, CALLER)],
        "newest first, both with the real return address"
    );
    assert_eq!(reg.return_depth(a.id), 0);
}

#[test]
fn a_frame_left_by_longjmp_is_dropped_when_an_outer_call_returns() {
    let (reg, a, seen) = logging_at(&[FN0, FN1]);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    let _ = t.call(&reg, &a, A + FN1, A + FN0 + 1);
    t.abandon_innermost(); // f1 longjmps back into f0
    assert_eq!(reg.return_depth(a.id), 2);
    assert_eq!(t.ret(&reg, &a, 3), Ret::Trampoline(CALLER));
    assert_eq!(
        logged(&seen, |r| r.func),
        vec![A + FN0],
        "the abandoned call runs no handler"
    );
    assert_eq!(reg.return_depth(a.id), 0);
}

#[test]
fn a_call_at_the_depth_of_an_abandoned_one_replaces_it() {
    let (reg, a) = setup();
    let seen = log();
    at_entry(&reg, FN1, &ret_logger(&seen));
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN1, CALLER);
    t.abandon_innermost();
    let _ = t.call(&reg, &a, A + FN1, CALLER + 4);
    assert_eq!(reg.return_depth(a.id), 1);
    assert_eq!(t.ret(&reg, &a, 1), Ret::Trampoline(CALLER + 4));
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[test]
fn removing_a_consumer_while_calls_are_in_flight_skips_its_ret_handler_only() {
    let (reg, a) = setup();
    let (gone_log, kept_log) = (log(), log());
    let (gone, kept) = (ret_logger(&gone_log), ret_logger(&kept_log));
    at_entry(&reg, FN0, &gone);
    at_entry(&reg, FN0, &kept);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    reg.unregister(key(FN0), &gone).unwrap();
    assert_eq!(t.ret(&reg, &a, 5), Ret::Trampoline(CALLER));
    assert!(gone_log.lock().unwrap().is_empty());
    assert_eq!(kept_log.lock().unwrap().len(), 1);
    assert_eq!(reg.return_depth(a.id), 0);
}

#[test]
fn removing_the_last_consumer_mid_call_still_returns_to_the_caller() {
    let (reg, a) = setup();
    let seen = log();
    let c = ret_logger(&seen);
    at_entry(&reg, FN0, &c);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    let _ = t.call(&reg, &a, A + FN0, A + 1);
    reg.unregister(key(FN0), &c).unwrap();
    assert_eq!(reg.len(), 0);
    assert_eq!(a.byte(A + FN0), file_bytes()[FN0 as usize]);
    assert_eq!(t.ret(&reg, &a, 1), Ret::Trampoline(A + 1));
    assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(reg.return_depth(a.id), 0, "no instance outlives its call");
}

#[test]
fn a_consumer_registered_after_the_entry_is_not_called_for_that_return() {
    let (reg, a) = setup();
    let (early_log, late_log) = (log(), log());
    let early = ret_logger(&early_log);
    at_entry(&reg, FN0, &early);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    at_entry(&reg, FN0, &ret_logger(&late_log));
    // The only consumer that saw the entry leaves and comes back: a new
    // registration, not the one that saw the call.
    reg.unregister(key(FN0), &early).unwrap();
    at_entry(&reg, FN0, &early);
    assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
    assert!(late_log.lock().unwrap().is_empty());
    assert!(early_log.lock().unwrap().is_empty());
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    let _ = t.ret(&reg, &a, 0);
    assert_eq!(late_log.lock().unwrap().len(), 1);
    assert_eq!(early_log.lock().unwrap().len(), 1);
}

#[test]
fn the_filter_decides_for_ret_handlers_too() {
    let (reg, a, b) = two_spaces();
    let seen = log();
    at_entry(&reg, FN0, &ret_logger_in(&seen, a.id));
    // A plain consumer everywhere keeps the breakpoint in B too.
    at_entry(&reg, FN0, &Consumer::new(|_, _| ConsumerAction::Continue));
    let mut t = SimThread::new();
    let _ = t.call(&reg, &b, B + FN0, CALLER);
    assert_eq!(t.return_slot(), CALLER, "nobody wants returns in B");
    assert_eq!(t.ret(&reg, &b, 1), Ret::Direct(CALLER));
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    assert_eq!(t.ret(&reg, &a, 2), Ret::Trampoline(CALLER));
    assert_eq!(logged(&seen, |r| r.space), vec![a.id]);
}

#[test]
fn a_ret_handler_of_a_consumer_filtered_out_does_not_run_for_a_tracked_call() {
    let (reg, a, b) = two_spaces();
    let (a_log, all_log) = (log(), log());
    at_entry(&reg, FN0, &ret_logger_in(&a_log, a.id));
    at_entry(&reg, FN0, &ret_logger(&all_log));
    let mut t = SimThread::new();
    let _ = t.call(&reg, &b, B + FN0, CALLER);
    assert_eq!(t.ret(&reg, &b, 1), Ret::Trampoline(CALLER));
    assert!(a_log.lock().unwrap().is_empty());
    assert_eq!(all_log.lock().unwrap().len(), 1);
}

#[test]
fn returns_are_tracked_per_space() {
    let (reg, a, b) = two_spaces();
    at_entry(&reg, FN0, &ret_logger(&log()));
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    // What A's call returns with, presented in B.
    let mut regs = Regs {
        ip: b.trampoline.unwrap(),
        sp: Stack::top(),
        ..Regs::default()
    };
    assert_eq!(reg.on_return(b.id, &mut regs), ReturnOutcome::NotOurs);
    assert_eq!((reg.return_depth(a.id), reg.return_depth(b.id)), (1, 0));
    assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
}

#[test]
fn a_return_with_no_matching_instance_is_not_ours_and_changes_nothing() {
    let (reg, a) = setup();
    at_entry(&reg, FN0, &ret_logger(&log()));
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    let mut regs = Regs {
        ip: a.trampoline.unwrap(),
        sp: Stack::top() + 64,
        ..Regs::default()
    };
    assert_eq!(reg.on_return(a.id, &mut regs), ReturnOutcome::NotOurs);
    assert_eq!(regs.ip, a.trampoline.unwrap());
    assert_eq!(reg.return_depth(a.id), 1);
    assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
}

#[test]
fn returns_are_tracked_per_thread() {
    let (reg, a) = setup();
    let seen = log();
    at_entry(&reg, FN0, &ret_logger(&seen));
    let reg = Arc::new(reg);
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let (reg, a) = (Arc::clone(&reg), Arc::clone(&a));
            std::thread::spawn(move || {
                let mut t = SimThread::new();
                for n in 0..50 {
                    let _ = t.call(&reg, &a, A + FN0, CALLER + i);
                    let _ = t.call(&reg, &a, A + FN0, A + 1);
                    assert_eq!(reg.return_depth(a.id), 2);
                    assert_eq!(t.ret(&reg, &a, n), Ret::Trampoline(A + 1));
                    assert_eq!(t.ret(&reg, &a, n), Ret::Trampoline(CALLER + i));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(seen.lock().unwrap().len(), 200);
    assert_eq!(reg.return_depth(a.id), 0, "this thread made no call");
}

/// A registry the consumers' handlers can reach (they are owned by it).
fn shared_registry() -> (Arc<Registry>, Arc<MemSpace>, Arc<OnceLock<Weak<Registry>>>) {
    let (reg, a) = setup();
    let reg = Arc::new(reg);
    let cell = Arc::new(OnceLock::new());
    cell.set(Arc::downgrade(&reg)).unwrap();
    (reg, a, cell)
}

#[test]
fn a_uprobe_hit_from_inside_a_handler_counts_nmissed_and_does_not_recurse() {
    let (reg, a, cell) = shared_registry();
    let inner_calls = Arc::new(AtomicU64::new(0));
    let inner = {
        let n = Arc::clone(&inner_calls);
        Consumer::new(move |_, _| {
            n.fetch_add(1, Ordering::Relaxed);
            ConsumerAction::Continue
        })
    };
    reg.register(key(OFF_NOP), &inner).unwrap();
    let nested = Arc::new(Mutex::new(Vec::new()));
    let outer = {
        let (cell, a, nested) = (Arc::clone(&cell), Arc::clone(&a), Arc::clone(&nested));
        Consumer::new(move |_, _| {
            // The handler calls probed code: both the other uprobe and its
            // own.
            let reg = cell.get().unwrap().upgrade().unwrap();
            for at in [A + OFF_NOP, A + OFF_PUSH] {
                let mut regs = trap_regs(at);
                let mut stack = Stack::new();
                match reg.on_breakpoint(a.id, &mut regs, &mut stack) {
                    UprobeOutcome::Done(o) => nested.lock().unwrap().push(format!("{o:?}")),
                    UprobeOutcome::SingleStep(_) => panic!("emulated instructions"),
                }
            }
            ConsumerAction::Continue
        })
    };
    reg.register(key(OFF_PUSH), &outer).unwrap();
    let mut t = SimThread::new();
    assert!(matches!(
        t.call(&reg, &a, A + OFF_PUSH, CALLER),
        UprobeFinished::Emulated
    ));
    assert_eq!(outer.hits(), 1, "the outer handler ran once, no recursion");
    assert_eq!(inner_calls.load(Ordering::Relaxed), 0);
    assert_eq!(
        *nested.lock().unwrap(),
        vec!["Emulated", "Emulated"],
        "nested hits still complete the displaced instruction"
    );
    assert_eq!(reg.nmissed(key(OFF_NOP)), 1);
    assert_eq!(reg.nmissed(key(OFF_PUSH)), 1);
    // Outside a handler the inner uprobe runs again.
    let mut regs = trap_regs(A + OFF_NOP);
    let _ = reg.on_breakpoint(a.id, &mut regs, &mut Stack::new());
    assert_eq!(inner_calls.load(Ordering::Relaxed), 1);
}

#[test]
fn a_call_made_from_a_ret_handler_is_missed_not_tracked() {
    let (reg, a, cell) = shared_registry();
    let seen = log();
    let inner = ret_logger(&seen);
    at_entry(&reg, FN1, &inner);
    let inner_depth = Arc::new(AtomicU64::new(u64::MAX));
    let outer = {
        let (cell, a, d) = (Arc::clone(&cell), Arc::clone(&a), Arc::clone(&inner_depth));
        Consumer::builder()
            .ret_handler(move |_, _| {
                let reg = cell.get().unwrap().upgrade().unwrap();
                let mut t = SimThread::new();
                let _ = t.call(&reg, &a, A + FN1, CALLER);
                // The nested call was not hijacked.
                d.store(t.return_slot(), Ordering::Relaxed);
                assert_eq!(t.ret(&reg, &a, 0), Ret::Direct(CALLER));
            })
            .build()
    };
    at_entry(&reg, FN0, &outer);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
    assert_eq!(inner_depth.load(Ordering::Relaxed), CALLER);
    assert_eq!(outer.ret_hits(), 1);
    assert_eq!(inner.ret_hits(), 0);
    assert_eq!(reg.nmissed(key(FN1)), 1);
    assert_eq!(reg.return_depth(a.id), 0);
}

#[test]
fn a_ret_handler_consumer_not_at_a_function_entry_is_refused_and_changes_nothing() {
    let (reg, a) = setup();
    // A plain consumer says OFF_NOP lies inside the function at FN0.
    reg.register_in_function(
        key(OFF_NOP),
        FN0,
        &Consumer::new(|_, _| ConsumerAction::Continue),
    )
    .unwrap();
    let before = snapshot(&reg, &[&a]);
    let c = ret_logger(&log());
    assert_eq!(
        reg.register(key(FN1), &c),
        Err(ProbeError::NotAtFunctionEntry {
            addr: FN1,
            func_start: None
        }),
        "the function is not named"
    );
    assert_eq!(
        reg.register_in_function(key(OFF_MOV), FN0, &c),
        Err(ProbeError::NotAtFunctionEntry {
            addr: OFF_MOV,
            func_start: Some(FN0)
        }),
        "inside the function, not at its entry"
    );
    assert_eq!(
        reg.register_in_function(key(OFF_NOP), OFF_NOP, &c),
        Err(ProbeError::NotAtFunctionEntry {
            addr: OFF_NOP,
            func_start: Some(FN0)
        }),
        "an earlier registration placed the offset inside FN0"
    );
    assert_eq!(snapshot(&reg, &[&a]), before);
    assert_eq!(reg.consumers(key(OFF_NOP)), 1);
    assert_eq!(reg.consumers(key(FN1)), 0);
}

#[test]
fn a_ret_handler_consumer_is_refused_for_a_space_without_a_trampoline() {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    let b = MemSpace::with_file_no_trampoline(2, B);
    mmap_file(&reg, &a);
    mmap_file(&reg, &b);
    let before = snapshot(&reg, &[&a, &b]);
    assert_eq!(
        reg.register_in_function(key(FN0), FN0, &ret_logger(&log())),
        Err(ProbeError::NoReturnTrampoline)
    );
    assert_eq!(snapshot(&reg, &[&a, &b]), before);
    // Filtered to the space that has one: accepted.
    reg.register_in_function(key(FN0), FN0, &ret_logger_in(&log(), a.id))
        .unwrap();
}

#[test]
fn a_space_mapped_later_without_a_trampoline_counts_its_calls_missed() {
    let (reg, _a) = setup();
    let c = ret_logger(&log());
    at_entry(&reg, FN0, &c);
    let b = MemSpace::with_file_no_trampoline(2, B);
    mmap_file(&reg, &b);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &b, B + FN0, CALLER);
    assert_eq!(t.return_slot(), CALLER);
    assert_eq!(reg.nmissed(key(FN0)), 1);
    assert_eq!(t.ret(&reg, &b, 0), Ret::Direct(CALLER));
}

#[test]
fn a_consumer_with_neither_handler_is_refused_and_changes_nothing() {
    let (reg, a) = setup();
    let before = snapshot(&reg, &[&a]);
    let c = Consumer::builder().filter(|_| true).build();
    assert_eq!(
        reg.register_in_function(key(FN0), FN0, &c),
        Err(ProbeError::NoHandler)
    );
    assert_eq!(snapshot(&reg, &[&a]), before);
}

#[test]
fn a_handler_that_skips_the_instruction_leaves_the_return_address_alone() {
    let (reg, a) = setup();
    let c = Consumer::builder()
        .handler(|_, regs| {
            regs.ip = CALLER; // emulates an immediate return
            ConsumerAction::SkipInstruction
        })
        .ret_handler(|_, _| panic!("no return was tracked"))
        .build();
    at_entry(&reg, FN0, &c);
    let mut t = SimThread::new();
    assert!(matches!(
        t.call(&reg, &a, A + FN0, CALLER),
        UprobeFinished::Skipped
    ));
    assert_eq!(t.return_slot(), CALLER);
    assert_eq!(reg.return_depth(a.id), 0);
}

#[test]
fn arm64_hijacks_x30_and_restores_it_at_the_return() {
    const NOP: [u8; 4] = 0xd503_201f_u32.to_le_bytes();
    const TRAMP: u64 = 0x7000_0000;
    let reg: UprobeRegistry<Arm64, MemSpace> = UprobeRegistry::new(Arm64);
    let mut text = Vec::new();
    for _ in 0..16 {
        text.extend_from_slice(&NOP);
    }
    let a = Arc::new(MemSpace {
        trampoline: Some(TRAMP),
        ..Arc::into_inner(MemSpace::new(1, A, text)).unwrap()
    });
    let m = a.whole(FILE);
    a.maps.lock().unwrap().push(m.clone());
    reg.on_mmap(&a, m).unwrap();
    let seen = log();
    reg.register_in_function(key(0x10), 0x10, &ret_logger(&seen))
        .unwrap();
    let mut regs = Regs {
        ip: A + 0x10,
        sp: 0x8000,
        ..Regs::default()
    };
    regs[Arm64Reg::LR] = CALLER;
    let out = reg.on_breakpoint(a.id, &mut regs, &mut Stack::new());
    assert!(matches!(out, UprobeOutcome::Done(UprobeFinished::Emulated)));
    assert_eq!(regs[Arm64Reg::LR], TRAMP);
    // The function returns (`ret` = branch to x30) with x0 = 77.
    let mut at_ret = Regs {
        ip: TRAMP,
        sp: 0x8000,
        ..Regs::default()
    };
    at_ret[Arm64Reg::X0] = 77;
    assert_eq!(
        reg.on_return(a.id, &mut at_ret),
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(at_ret.ip, CALLER);
    let got = seen.lock().unwrap()[0];
    assert_eq!((got.func, got.retval, got.ret_addr), (A + 0x10, 77, CALLER));
}

#[test]
fn unregister_waits_for_a_ret_handler_that_is_running() {
    let (reg, a) = setup();
    let reg = Arc::new(reg);
    let (started, finished) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let c = {
        let (s, f) = (Arc::clone(&started), Arc::clone(&finished));
        Consumer::builder()
            .ret_handler(move |_, _| {
                s.store(1, Ordering::SeqCst);
                // Return handlers may sleep (the default domain is `Srcu`).
                std::thread::sleep(std::time::Duration::from_millis(100));
                f.store(1, Ordering::SeqCst);
            })
            .build()
    };
    at_entry(&reg, FN0, &c);
    let caller = {
        let (reg, a) = (Arc::clone(&reg), Arc::clone(&a));
        std::thread::spawn(move || {
            let mut t = SimThread::new();
            let _ = t.call(&reg, &a, A + FN0, CALLER);
            assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
        })
    };
    while started.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    reg.unregister(key(FN0), &c).unwrap();
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "unregister returned while the return handler ran"
    );
    caller.join().unwrap();
}

#[test]
fn a_function_whose_first_instruction_runs_out_of_line_is_tracked_too() {
    let (reg, a) = setup();
    let seen = log();
    // `mov rbp, rsp` (boosted from its slot), `mov eax, [rip+0x10]`
    // (RIP-relative, stepped): the hijack happens before either runs.
    let entries = [(OFF_MOV, 3), (OFF_RIPREL, 6)];
    for (f, _) in entries {
        at_entry(&reg, f, &ret_logger(&seen));
    }
    for (f, len) in entries {
        let mut stack = Stack::new();
        stack.write(Stack::top(), &CALLER.to_le_bytes()).unwrap();
        let mut regs = trap_regs(A + f);
        match reg.on_breakpoint(a.id, &mut regs, &mut stack) {
            UprobeOutcome::Done(UprobeFinished::Boosted { .. }) => {}
            UprobeOutcome::SingleStep(step) => {
                regs.ip = step_trap_ip(step.plan(), len);
                let done = reg.on_step_complete(&step, &mut regs, &mut stack);
                assert_eq!(done, Ok(StepOutcome::Done));
                assert_eq!(regs.ip, A + f + len);
            }
            UprobeOutcome::Done(other) => panic!("offset {f:#x}: {other:?}"),
        }
        let mut slot = [0u8; 8];
        stack.read(Stack::top(), &mut slot).unwrap();
        assert_eq!(Some(u64::from_le_bytes(slot)), a.trampoline);
        let mut at_ret = Regs {
            ip: a.trampoline.unwrap(),
            sp: Stack::top() + 8,
            ..Regs::default()
        };
        at_ret.gprs[0] = f;
        assert_eq!(
            reg.on_return(a.id, &mut at_ret),
            ReturnOutcome::Returned { to: CALLER }
        );
    }
    assert_eq!(
        logged(&seen, |r| (r.func, r.retval)),
        vec![(A + OFF_MOV, OFF_MOV), (A + OFF_RIPREL, OFF_RIPREL)]
    );
}
