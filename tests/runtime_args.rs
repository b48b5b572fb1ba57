//! The calling-convention helpers on live registers: a kprobe at a real
//! function's first instruction reads its arguments with `regs.arg(n)` and
//! changes one with `set_arg`; a kretprobe reads the return value with
//! `regs.retval()` and changes what the caller sees with `set_retval`.

mod runtime_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rcu_registry::probes::kprobe::{Action, EntryAction, Kprobe, Kretprobe};
use rcu_registry::probes::runtime::Live;
use runtime_support::*;

fn args3(a: u64, b: u64, c: u64) -> u64 {
    let f = std::hint::black_box(rtp_args3 as unsafe extern "C" fn(u64, u64, u64) -> u64);
    // SAFETY: rtp_args3 is a complete C-ABI function of three integers.
    unsafe { f(a, b, c) }
}

fn args3_addr() -> u64 {
    rtp_args3 as *const () as usize as u64
}

#[test]
fn a_kprobe_reads_and_changes_the_arguments_of_a_real_call() {
    let _g = serial();
    let reg = Live::global().registry();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let p = Kprobe::at(args3_addr())
        .pre(move |_p, regs| {
            let args = [regs.arg(0), regs.arg(1), regs.arg(2), regs.arg(6)];
            // A test-only lock: the probed function takes none.
            s2.lock().unwrap().push(args);
            Action::Continue
        })
        .build();
    reg.register(&p).unwrap();
    assert_eq!(args3(1, 20, 300), 1 + 40 + 1200);
    assert_eq!(args3(7, 8, 9), 7 + 16 + 36);
    reg.unregister(&p).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            [Some(1), Some(20), Some(300), None],
            [Some(7), Some(8), Some(9), None]
        ]
    );

    // set_arg: the function runs with the handler's value.
    let p = Kprobe::at(args3_addr())
        .pre(|_p, regs| {
            assert!(regs.set_arg(1, 1000));
            assert!(!regs.set_arg(6, 1), "argument 6 is on the stack");
            Action::Continue
        })
        .build();
    reg.register(&p).unwrap();
    assert_eq!(args3(1, 2, 3), 1 + 2000 + 12);
    reg.unregister(&p).unwrap();
    assert_eq!(args3(1, 2, 3), 1 + 4 + 12);
    assert_eq!(p.hits(), 1);
}

#[test]
fn a_kretprobe_reads_and_changes_the_return_value() {
    let _g = serial();
    let reg = Live::global().registry();
    let bad = Arc::new(AtomicU64::new(0));
    let b2 = bad.clone();
    let krp = Kretprobe::at(args3_addr())
        .data::<u64>()
        .entry_handler(|first, regs| {
            *first = regs.arg(0).unwrap();
            EntryAction::Track
        })
        .handler(move |first, regs, ret| {
            if regs.retval() != ret {
                b2.fetch_add(1, Ordering::Relaxed);
            }
            regs.set_retval(ret + 1000 * *first);
        })
        .build()
        .unwrap();
    reg.register(&krp).unwrap();
    assert_eq!(args3(1, 2, 3), 17 + 1000);
    assert_eq!(args3(2, 0, 0), 2 + 2000);
    reg.unregister(&krp).unwrap();
    assert_eq!(args3(1, 2, 3), 17);
    assert_eq!(bad.load(Ordering::Relaxed), 0);
    assert_eq!(krp.nmissed(), 0);
}

#[test]
fn a_kprobe_finds_stack_arguments_where_the_convention_puts_them() {
    type Args8 = unsafe extern "C" fn(u64, u64, u64, u64, u64, u64, u64, u64) -> u64;
    let _g = serial();
    let reg = Live::global().registry();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let f = std::hint::black_box(rtp_args8 as Args8);
    let p = Kprobe::at(f as usize as u64)
        .pre(move |_p, regs| {
            let reg5 = regs.arg(5);
            let at = |n| {
                regs.stack_arg_addr(n).map(|a| {
                    // SAFETY: at the function's entry, stack arguments 6 and 7
                    // are words of the interrupted thread's own mapped stack.
                    unsafe { (a as *const u64).read() }
                })
            };
            s2.lock().unwrap().push((reg5, regs.arg(6), at(6), at(7)));
            Action::Continue
        })
        .build();
    reg.register(&p).unwrap();
    // SAFETY: rtp_args8 is a complete C-ABI function of eight integers.
    let r = unsafe { f(1, 2, 3, 4, 5, 6, 70, 800) };
    reg.unregister(&p).unwrap();
    assert_eq!(r, 870);
    assert_eq!(
        *seen.lock().unwrap(),
        [(Some(6), None, Some(70), Some(800))]
    );
}
