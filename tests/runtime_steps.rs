//! Single-steps on running code: the two ways a step ends (an `int3` step
//! marker after an instruction that falls through, the trap flag after one
//! that may branch), steps nested inside probe handlers, and signals that
//! arrive between a step's two traps. Every test takes the binary's serial
//! lock (they share the SIGTRAP handler, the registry and the functions).
//!
//! `RT_STRESS_SECS` scales the signal test (default 1 s).

mod runtime_support;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rcu_registry::__internals::runtime::steps_in_flight;
use rcu_registry::probes::arch::{Arch, X86Reg, X86_64};
use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::probes::runtime::Live;
use runtime_support::*;

fn live() -> &'static Live {
    Live::global()
}

/// Whether the registry steps the instruction at `at` to a marker (`true`)
/// or with the trap flag, as its own plan says.
fn steps_to_marker(at: u64) -> bool {
    let insn = X86_64.analyze(at, &code(at, 15)).unwrap();
    X86_64
        .plan_xol(&insn, at + 0x1000)
        .unwrap()
        .step_marker
        .is_some()
}

fn load() -> u64 {
    let f = std::hint::black_box(rtp_load as unsafe extern "C" fn() -> u64);
    // SAFETY: a complete C-ABI function.
    unsafe { f() }
}

const LOADED: u64 = 0x1_2345_6789;

#[test]
fn a_post_handler_on_a_ret_is_stepped_with_the_trap_flag_and_sees_the_caller() {
    let _g = serial();
    let reg = live().registry();
    let at = addr(rtp_add1) + ADD1_RET;
    assert!(!steps_to_marker(at), "a ret may not fall through");
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (ok2, bad2) = (ok.clone(), bad.clone());
    let p = Kprobe::at(at)
        .post(move |_p, regs| {
            // After the ret: the IP is the return address it popped (just
            // below the new stack pointer), in the caller, not in the slot.
            // SAFETY: the word below the stack pointer is the popped return
            // address, still mapped.
            let popped = unsafe { *((regs.sp - 8) as *const u64) };
            let outside = !(addr(rtp_add1)..addr(rtp_add1) + 6).contains(&regs.ip);
            if regs.ip == popped && outside && regs[X86Reg::Rax] as u32 == 8 {
                ok2.fetch_add(1, Ordering::Relaxed);
            } else {
                bad2.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build();
    reg.register(&p).unwrap();
    for _ in 0..500 {
        assert_eq!(call(rtp_add1, 7), 8);
    }
    reg.unregister(&p).unwrap();
    assert_eq!(
        (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed)),
        (500, 0)
    );
    assert_eq!(steps_in_flight(), 0);
}

#[test]
fn a_rep_instruction_runs_all_its_iterations_before_its_one_step_trap() {
    let _g = serial();
    let reg = live().registry();
    let at = addr_of_fill() + FILL_REP_STOSB;
    assert!(steps_to_marker(at), "rep stosb falls through");
    const N: usize = 1 << 16;
    let mut buf = vec![0u8; N];
    let dst = buf.as_mut_ptr() as u64;
    let (posts, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (posts2, bad2) = (posts.clone(), bad.clone());
    let p = Kprobe::at(at)
        .post(move |_p, regs| {
            posts2.fetch_add(1, Ordering::Relaxed);
            // Every iteration done: rcx ran out, rdi moved past the buffer.
            if regs[X86Reg::Rcx] != 0 || regs[X86Reg::Rdi] != dst + N as u64 || regs.ip != at + 2 {
                bad2.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build();
    reg.register(&p).unwrap();
    let t0 = Instant::now();
    let f = std::hint::black_box(rtp_fill as unsafe extern "C" fn(*mut u8, usize));
    // SAFETY: rtp_fill writes exactly N bytes at the buffer's start.
    unsafe { f(buf.as_mut_ptr(), N) };
    let took = t0.elapsed();
    reg.unregister(&p).unwrap();
    println!("rep stosb of {N} bytes, probed with a post handler: {took:?}");
    assert!(buf.iter().all(|&b| b == 0x5a));
    // One step trap for all N iterations (the trap flag would have trapped
    // after each one).
    assert_eq!(
        (
            p.hits(),
            posts.load(Ordering::Relaxed),
            bad.load(Ordering::Relaxed)
        ),
        (1, 1, 0)
    );
}

fn addr_of_fill() -> u64 {
    rtp_fill as *const () as usize as u64
}

#[test]
fn a_step_inside_a_handler_nests_and_ends_on_its_own_marker() {
    let _g = serial();
    let reg = live().registry();
    let outer_at = addr(rtp_add1);
    let inner_at = rtp_load as *const () as usize as u64;
    assert!(steps_to_marker(outer_at) && steps_to_marker(inner_at));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (ok2, bad2, bad3) = (ok.clone(), bad.clone(), bad.clone());
    // The outer probe is stepped (it has a post handler); its pre handler
    // calls a function whose probe is hit re-entrantly: missed, but its
    // RIP-relative instruction is still single-stepped (to its own marker)
    // while the outer breakpoint trap is being handled.
    let outer = Kprobe::at(outer_at)
        .pre(move |_p, _regs| {
            if load() != LOADED {
                bad2.fetch_add(1, Ordering::Relaxed);
            }
            Action::Continue
        })
        .post(move |_p, regs| {
            if regs.ip == outer_at + 2 && regs[X86Reg::Rax] as u32 == regs[X86Reg::Rdi] as u32 {
                ok2.fetch_add(1, Ordering::Relaxed);
            } else {
                bad3.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build();
    let inner_posts = Arc::new(AtomicU64::new(0));
    let ip2 = inner_posts.clone();
    let inner = Kprobe::at(inner_at)
        .post(move |_p, _regs| {
            ip2.fetch_add(1, Ordering::Relaxed);
        })
        .build();
    reg.register(&outer).unwrap();
    reg.register(&inner).unwrap();
    for x in 0..300 {
        assert_eq!(call(rtp_add1, x), x + 1);
    }
    // Outside any handler the inner probe runs normally.
    assert_eq!(load(), LOADED);
    reg.unregister_many(&[&outer, &inner]).unwrap();
    assert_eq!(
        (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed)),
        (300, 0)
    );
    assert_eq!((outer.hits(), outer.nmissed()), (300, 0));
    assert_eq!((inner.hits(), inner.nmissed()), (1, 300));
    assert_eq!(inner_posts.load(Ordering::Relaxed), 1);
    assert_eq!(steps_in_flight(), 0);
}

/// Counts kept by the SIGUSR1 handler of the signal test.
static SIG_RUNS: AtomicU64 = AtomicU64::new(0);
static SIG_BETWEEN_TRAPS: AtomicU64 = AtomicU64::new(0);
static SIG_BAD: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_sig: libc::c_int) {
    // A step of the interrupted code may be between its two traps.
    if steps_in_flight() > 0 {
        SIG_BETWEEN_TRAPS.fetch_add(1, Ordering::Relaxed);
    }
    // Probed, stepped to its marker: a step nested in the outer one.
    if load() != LOADED {
        SIG_BAD.fetch_add(1, Ordering::Relaxed);
    }
    SIG_RUNS.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn signals_between_the_two_traps_of_a_step_complete_their_own_steps_first() {
    let _g = serial();
    let reg = live().registry();
    let posts = Arc::new(AtomicU64::new(0));
    let post_probe = |at: u64| {
        let c = posts.clone();
        Kprobe::at(at)
            .post(move |_p, _regs| {
                c.fetch_add(1, Ordering::Relaxed);
            })
            .build()
    };
    // Marker steps (rtp_add1's mov, rtp_load's RIP-relative load) and a
    // trap-flag step (rtp_mul3's ret).
    let probes = [
        post_probe(addr(rtp_add1)),
        post_probe(addr(rtp_mul3) + MUL3_RET),
        post_probe(rtp_load as *const () as usize as u64),
    ];
    for p in &probes {
        reg.register(p).unwrap();
    }
    SIG_RUNS.store(0, Ordering::Relaxed);
    SIG_BETWEEN_TRAPS.store(0, Ordering::Relaxed);
    let n = AtomicU32::new(0);
    let (calls, sent) = loop_under_signals(
        on_usr1,
        stress_secs(1.0),
        std::time::Duration::from_micros(50),
        std::time::Duration::from_secs(5),
        || SIG_RUNS.load(Ordering::Relaxed) > 0 && SIG_BETWEEN_TRAPS.load(Ordering::Relaxed) > 0,
        || {
            let x = n.fetch_add(1, Ordering::Relaxed) & 0xffff;
            assert_eq!(call(rtp_add1, x), x + 1);
            assert_eq!(call(rtp_mul3, x), 3 * x);
        },
    );
    reg.unregister_many(&probes.iter().collect::<Vec<_>>())
        .unwrap();
    let runs = SIG_RUNS.load(Ordering::Relaxed);
    let between = SIG_BETWEEN_TRAPS.load(Ordering::Relaxed);
    println!(
        "{calls} call pairs, {sent} signals sent, {runs} handled, \
         {between} between a step's two traps"
    );
    assert_eq!(SIG_BAD.load(Ordering::Relaxed), 0);
    assert_eq!(probes[0].hits(), calls);
    assert_eq!(probes[1].hits(), calls);
    assert_eq!(probes[2].hits(), runs);
    assert!(probes.iter().all(|p| p.nmissed() == 0));
    assert_eq!(posts.load(Ordering::Relaxed), 2 * calls + runs);
    assert!(runs > 0, "no signal was handled");
    // The kernel delivers a pending signal when it returns from the first
    // trap, so many land between a step's two traps: the case under test.
    assert!(between > 0, "no signal landed between a step's two traps");
    assert_eq!(steps_in_flight(), 0);
}
