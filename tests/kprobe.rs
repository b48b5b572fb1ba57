//! Specification tests of the kprobe registry on an in-memory x86_64 image:
//! hits, aggregation, enable/disable, re-entrancy, unregistration and
//! commit. Bad input is in `kprobe_bad_input.rs`, kretprobes in
//! `kretprobe.rs`.

mod kprobe_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kprobe_support::*;
use rcu_registry::probes::arch::{X86Reg, X86_64};
use rcu_registry::probes::kprobe::{Action, HitOutcome, Kprobe, KprobeRegistry, StepResult};
use rcu_registry::probes::text::Image;
use rcu_registry::probes::xol::XolArena;
use rcu_registry::probes::ProbeError;
use rcu_registry::rcu::Rcu;

type Log = Arc<Mutex<Vec<String>>>;

fn log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

fn logging_probe(at: u64, name: &'static str, log: &Log) -> Kprobe {
    let (l1, l2) = (log.clone(), log.clone());
    Kprobe::at(at)
        .pre(move |_, _| {
            l1.lock().unwrap().push(format!("pre {name}"));
            Action::Continue
        })
        .post(move |_, _| l2.lock().unwrap().push(format!("post {name}")))
        .build()
}

#[test]
fn a_hit_runs_pre_then_the_displaced_instruction_then_post() {
    let fx = fixture();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s1, s2) = (seen.clone(), seen.clone());
    let p = Kprobe::at(F_MOV_EAX)
        .pre(move |probe, regs| {
            s1.lock()
                .unwrap()
                .push(("pre", regs.ip, regs[X86Reg::Rax], probe.address()));
            Action::Continue
        })
        .post(move |probe, regs| {
            s2.lock()
                .unwrap()
                .push(("post", regs.ip, regs[X86Reg::Rax], probe.address()))
        })
        .build();
    fx.reg.register(&p).unwrap();
    assert_eq!(byte_at(&fx.reg, F_MOV_EAX), 0xcc, "breakpoint written");

    let mut stack = Stack::new();
    let mut regs = trap_regs(F_MOV_EAX);
    let kind = hit_with(&fx.reg, F_MOV_EAX, &mut regs, &mut stack, |r| {
        r[X86Reg::Rax] = 1
    });
    assert_eq!(kind, "single-step");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            ("pre", F_MOV_EAX, 0, Some(F_MOV_EAX)),
            ("post", F_POP, 1, Some(F_MOV_EAX)),
        ],
        "pre sees the probed address, post the state after the instruction"
    );
    assert_eq!(regs.ip, F_POP);
    assert_eq!(regs.flags, 0, "the step flag is cleared after the step");
    assert_eq!((p.hits(), p.nmissed()), (1, 0));

    fx.reg.unregister(&p).unwrap();
    assert_eq!(fx.reg.text().snapshot(), code(), "original bytes restored");
    assert!(!p.is_registered());
}

#[test]
fn a_probe_without_post_handler_is_boosted_through_its_slot() {
    let fx = fixture();
    let p = Kprobe::at(F_MOV_EAX).build();
    fx.reg.register(&p).unwrap();
    let slot = fx.reg.sites()[0]
        .slot
        .expect("out-of-line instruction has a slot");
    let bytes = fx.xol.slot_bytes(slot).unwrap();
    assert_eq!(
        &bytes[..5],
        &[0xb8, 0x01, 0, 0, 0],
        "the instruction is copied"
    );
    assert_eq!(bytes[5], 0xe9, "followed by a jump back");

    let mut regs = trap_regs(F_MOV_EAX);
    assert_eq!(
        hit(&fx.reg, F_MOV_EAX, &mut regs, &mut Stack::new()),
        "boosted"
    );
    assert_eq!(regs.ip, slot);
    assert_eq!(p.hits(), 1);
}

#[test]
fn a_post_handler_steps_a_falling_through_instruction_to_an_int3_marker_not_the_trap_flag() {
    let fx = fixture();
    let post_ip = Arc::new(AtomicU64::new(0));
    let seen = post_ip.clone();
    let p = Kprobe::at(F_MOV_EAX)
        .post(move |_, regs| seen.store(regs.ip, Ordering::SeqCst))
        .build();
    fx.reg.register(&p).unwrap();
    let slot = fx.reg.sites()[0].slot.unwrap();
    let mov = [0xb8, 0x01, 0, 0, 0];
    let bytes = fx.xol.slot_bytes(slot).unwrap();
    assert_eq!(&bytes[..5], &mov, "the boosted copy");
    assert_eq!(bytes[5], 0xe9, "its jump back");
    assert_eq!(&bytes[10..15], &mov, "the stepped copy");
    assert_eq!(bytes[15], 0xcc, "the step marker");

    let mut stack = Stack::new();
    let mut regs = trap_regs(F_MOV_EAX);
    let HitOutcome::SingleStep(token) = fx.reg.on_breakpoint(&mut regs, &mut stack) else {
        panic!("a post handler needs a single-step")
    };
    assert_eq!(token.step_marker(), Some(slot + 15));
    assert_eq!(regs.ip, slot + 10, "the step runs the second copy");
    assert_eq!(regs.flags, 0, "no trap flag");
    // A trap-flag-style report (IP after the copy) is not this step's end:
    // refused, registers unchanged, no post handler.
    regs.ip = slot + 15;
    let before = regs;
    assert!(matches!(
        fx.reg.on_step_complete(token, &mut regs, &mut stack),
        StepResult::Failed(ProbeError::PlanMismatch { .. })
    ));
    assert_eq!(regs, before);
    assert_eq!(post_ip.load(Ordering::SeqCst), 0);

    // The marker's trap completes it.
    let mut regs = trap_regs(F_MOV_EAX);
    assert_eq!(
        hit(&fx.reg, F_MOV_EAX, &mut regs, &mut stack),
        "single-step"
    );
    assert_eq!(regs.ip, F_POP);
    assert_eq!(post_ip.load(Ordering::SeqCst), F_POP);
    fx.reg.unregister(&p).unwrap();
}

/// A RIP-relative instruction whose slot is within ±2 GiB of its operand
/// runs from the slot with its displacement adjusted: boosted, no scratch
/// register, the slot's jump back ends it (the fixture's slots are within
/// reach of its code).
#[test]
fn a_rip_relative_instruction_within_reach_of_its_slot_is_boosted() {
    let fx = fixture();
    let p = Kprobe::at(G_RIPREL).build();
    fx.reg.register(&p).unwrap();
    let mut regs = trap_regs(G_RIPREL);
    regs[X86Reg::Rax] = 5;
    let before = regs;
    let mut stack = Stack::new();
    match fx.reg.on_breakpoint(&mut regs, &mut stack) {
        HitOutcome::Boosted { slot } => {
            assert_eq!(regs.ip, slot);
            assert_eq!(regs.gprs, before.gprs, "no scratch register loaded");
        }
        other => panic!("expected a boosted run, got {other:?}"),
    };
}

#[test]
fn an_emulated_instruction_completes_in_the_trap_with_post_handlers() {
    let fx = fixture();
    let l = log();
    let p = logging_probe(F_PUSH, "p", &l);
    fx.reg.register(&p).unwrap();
    assert_eq!(fx.reg.sites()[0].slot, None, "emulated: no slot");
    let mut regs = trap_regs(F_PUSH);
    regs[X86Reg::Rbp] = 0x1234_5678;
    let mut stack = Stack::new();
    assert_eq!(hit(&fx.reg, F_PUSH, &mut regs, &mut stack), "emulated");
    assert_eq!(regs.ip, F_MOV_RBP);
    assert_eq!(regs.sp, Stack::top() - 8);
    let o = (regs.sp - STACK_BASE) as usize;
    assert_eq!(&stack.bytes[o..o + 8], &0x1234_5678u64.to_le_bytes());
    assert_eq!(*l.lock().unwrap(), vec!["pre p", "post p"]);
}

#[test]
fn aggregated_probes_share_one_breakpoint_and_run_in_registration_order() {
    let fx = fixture();
    let l = log();
    let (a, b, c) = (
        logging_probe(F_MOV_EAX, "a", &l),
        logging_probe(F_MOV_EAX, "b", &l),
        logging_probe(F_MOV_EAX, "c", &l),
    );
    for p in [&a, &b, &c] {
        fx.reg.register(p).unwrap();
    }
    assert_eq!(
        fx.reg.text().writes_done(),
        1,
        "one breakpoint for three probes"
    );
    assert_eq!(fx.xol.in_use(), 1, "one slot for three probes");
    let sites = fx.reg.sites();
    assert_eq!(sites.len(), 1);
    assert_eq!(sites[0].probes, vec![a.id(), b.id(), c.id()]);

    let mut regs = trap_regs(F_MOV_EAX);
    hit(&fx.reg, F_MOV_EAX, &mut regs, &mut Stack::new());
    assert_eq!(
        *l.lock().unwrap(),
        vec!["pre a", "pre b", "pre c", "post a", "post b", "post c"]
    );

    fx.reg.unregister(&b).unwrap();
    assert_eq!(byte_at(&fx.reg, F_MOV_EAX), 0xcc, "still armed for a and c");
    fx.reg.unregister(&a).unwrap();
    assert_eq!(byte_at(&fx.reg, F_MOV_EAX), 0xcc, "still armed for c");
    fx.reg.unregister(&c).unwrap();
    assert_eq!(
        fx.reg.text().snapshot(),
        code(),
        "removed with the last probe"
    );
    assert!(fx.reg.sites().is_empty());
    assert!(fx.reg.is_empty());
}

#[test]
fn disabling_every_probe_removes_the_breakpoint_and_enabling_one_rearms_it() {
    let fx = fixture();
    let (a, b) = (Kprobe::at(F_MOV_EAX).build(), Kprobe::at(F_MOV_EAX).build());
    fx.reg.register(&a).unwrap();
    fx.reg.register(&b).unwrap();
    fx.reg.disable(&a).unwrap();
    assert_eq!(byte_at(&fx.reg, F_MOV_EAX), 0xcc, "b still enabled");

    let mut regs = trap_regs(F_MOV_EAX);
    hit(&fx.reg, F_MOV_EAX, &mut regs, &mut Stack::new());
    assert_eq!(
        (a.hits(), b.hits()),
        (0, 1),
        "a disabled probe runs nothing"
    );

    fx.reg.disable(&b).unwrap();
    assert_eq!(fx.reg.text().snapshot(), code(), "all disabled: disarmed");
    assert!(!fx.reg.sites()[0].armed);
    fx.reg.disable(&b).unwrap(); // idempotent

    fx.reg.enable(&b).unwrap();
    assert_eq!(byte_at(&fx.reg, F_MOV_EAX), 0xcc, "re-armed");
    assert!(fx.reg.sites()[0].armed);
}

#[test]
fn a_probe_registered_disabled_writes_no_breakpoint_until_enabled() {
    let fx = fixture();
    let p = Kprobe::at(F_MOV_EAX).disabled().build();
    fx.reg.register(&p).unwrap();
    assert_eq!(fx.reg.text().snapshot(), code());
    assert_eq!(fx.reg.sites().len(), 1);
    fx.reg.enable(&p).unwrap();
    assert_eq!(byte_at(&fx.reg, F_MOV_EAX), 0xcc);
}

#[test]
fn a_trap_that_raced_a_disable_still_completes_the_displaced_instruction() {
    let fx = fixture();
    let p = Kprobe::at(F_MOV_EAX).build();
    fx.reg.register(&p).unwrap();
    fx.reg.disable(&p).unwrap();
    // A thread that hit the breakpoint just before it was removed.
    let mut regs = trap_regs(F_MOV_EAX);
    assert_eq!(
        hit(&fx.reg, F_MOV_EAX, &mut regs, &mut Stack::new()),
        "boosted"
    );
    assert_eq!(p.hits(), 0);
}

#[test]
fn a_pre_handler_that_moves_the_ip_skips_the_instruction_and_later_handlers() {
    let fx = fixture();
    let l = log();
    let skipper = Kprobe::at(F_MOV_EAX)
        .pre(|_, regs| {
            regs.ip = F_RET;
            Action::SkipInstruction
        })
        .post(|_, _| panic!("no post handler after a skip"))
        .build();
    let after = logging_probe(F_MOV_EAX, "after", &l);
    fx.reg.register(&skipper).unwrap();
    fx.reg.register(&after).unwrap();
    let mut regs = trap_regs(F_MOV_EAX);
    assert_eq!(
        hit(&fx.reg, F_MOV_EAX, &mut regs, &mut Stack::new()),
        "skipped"
    );
    assert_eq!(regs.ip, F_RET);
    assert!(l.lock().unwrap().is_empty());
}

#[test]
fn a_hit_from_inside_a_handler_counts_nmissed_and_runs_no_handler() {
    static REG: OnceLock<Reg> = OnceLock::new();
    let reg = REG.get_or_init(|| fixture().reg);
    let inner_ran = Arc::new(AtomicBool::new(false));
    let ir = inner_ran.clone();
    let inner = Kprobe::at(F_PUSH)
        .pre(move |_, _| {
            ir.store(true, Ordering::SeqCst);
            Action::Continue
        })
        .build();
    let nested = Arc::new(Mutex::new(None));
    let n = nested.clone();
    let outer = Kprobe::at(F_MOV_EAX)
        .pre(move |_, _| {
            // The handler calls probed code: the nested trap.
            let mut regs = trap_regs(F_PUSH);
            let mut stack = Stack::new();
            let out = REG.get().unwrap().on_breakpoint(&mut regs, &mut stack);
            *n.lock().unwrap() = Some((format!("{out:?}"), regs.ip));
            Action::Continue
        })
        .build();
    reg.register(&inner).unwrap();
    reg.register(&outer).unwrap();
    let mut regs = trap_regs(F_MOV_EAX);
    hit(reg, F_MOV_EAX, &mut regs, &mut Stack::new());
    assert_eq!(
        *nested.lock().unwrap(),
        Some(("Emulated".to_string(), F_MOV_RBP)),
        "the nested hit still completes its instruction"
    );
    assert!(!inner_ran.load(Ordering::SeqCst), "but runs no handler");
    assert_eq!((inner.hits(), inner.nmissed()), (0, 1));
    assert_eq!((outer.hits(), outer.nmissed()), (1, 0));

    // Outside a handler the same probe runs normally.
    let mut regs = trap_regs(F_PUSH);
    hit(reg, F_PUSH, &mut regs, &mut Stack::new());
    assert_eq!(inner.hits(), 1);
    reg.unregister(&inner).unwrap();
    reg.unregister(&outer).unwrap();
}

#[test]
fn a_breakpoint_the_registry_did_not_write_is_not_ours() {
    let fx = fixture();
    let mut regs = trap_regs(TRAMPOLINE); // the image holds int3 filler there
    let before = regs;
    assert!(matches!(
        fx.reg.on_breakpoint(&mut regs, &mut Stack::new()),
        HitOutcome::NotOurs
    ));
    assert_eq!(regs, before, "registers untouched");
}

#[test]
fn a_trap_on_a_probe_removed_after_the_trap_resumes_at_the_original_instruction() {
    let fx = fixture();
    let p = Kprobe::at(F_MOV_EAX).build();
    fx.reg.register(&p).unwrap();
    fx.reg.unregister(&p).unwrap();
    let mut regs = trap_regs(F_MOV_EAX);
    assert!(matches!(
        fx.reg.on_breakpoint(&mut regs, &mut Stack::new()),
        HitOutcome::Vanished
    ));
    assert_eq!(regs.ip, F_MOV_EAX);
}

#[test]
fn probes_register_by_symbol_and_offset() {
    let fx = fixture();
    let p = Kprobe::symbol("f", 4).build();
    fx.reg.register(&p).unwrap();
    assert_eq!(p.address(), Some(F_MOV_EAX));
    assert_eq!(byte_at(&fx.reg, F_MOV_EAX), 0xcc);
    fx.reg.unregister(&p).unwrap();
    assert_eq!(p.address(), None);
}

#[test]
fn an_address_with_our_own_breakpoint_before_it_still_validates() {
    // The boundary check decodes from the function start through our int3 at
    // F_PUSH; it must see `push rbp`, not a one-byte int3 followed by junk.
    let fx = fixture();
    let a = Kprobe::at(F_PUSH).build();
    let b = Kprobe::at(F_MOV_EAX).build();
    fx.reg.register(&a).unwrap();
    fx.reg.register(&b).unwrap();
    assert_eq!(fx.reg.sites().len(), 2);
    assert!(matches!(
        fx.reg.register(&Kprobe::at(F_MOV_EAX + 1).build()),
        Err(ProbeError::NotOnInstructionBoundary { insn_start, .. }) if insn_start == F_MOV_EAX
    ));
}

#[test]
fn a_probe_unregistered_without_sync_is_pending_until_commit() {
    let fx = fixture();
    let p = Kprobe::at(F_MOV_EAX).build();
    fx.reg.register(&p).unwrap();
    fx.reg.unregister_nosync(&p).unwrap();
    assert_eq!(
        fx.reg.text().snapshot(),
        code(),
        "breakpoint removed at once"
    );
    assert_eq!(fx.reg.pending(), 1);
    assert!(!p.is_registered());
    assert!(matches!(
        fx.reg.unregister_nosync(&p),
        Err(ProbeError::UnknownProbe { .. })
    ));
    assert!(matches!(
        fx.reg.register(&p),
        Err(ProbeError::AlreadyRegistered { .. })
    ));
    fx.reg.commit();
    assert_eq!(fx.reg.pending(), 0);
    fx.reg.register(&p).expect("free again after commit");
    fx.reg.commit(); // nothing pending: returns at once
}

#[test]
fn a_commit_finishes_probes_another_thread_left_pending() {
    let fx = fixture();
    let (a, b) = (Kprobe::at(F_MOV_EAX).build(), Kprobe::at(G_NOP).build());
    fx.reg.register(&a).unwrap();
    fx.reg.register(&b).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| fx.reg.unregister_nosync(&a).unwrap())
            .join()
            .unwrap();
        s.spawn(|| {
            fx.reg.unregister_nosync(&b).unwrap();
            fx.reg.commit();
        })
        .join()
        .unwrap();
    });
    assert_eq!(fx.reg.pending(), 0);
    fx.reg
        .register(&a)
        .expect("a was finished by the other thread's commit");
}

/// A registered probe on `mov eax` whose post handler sets the flag.
fn probe_with_post_flag(fx: &Fixture) -> (Kprobe, Arc<AtomicBool>) {
    let post_ran = Arc::new(AtomicBool::new(false));
    let pr = post_ran.clone();
    let p = Kprobe::at(F_MOV_EAX)
        .post(move |_, _| pr.store(true, Ordering::SeqCst))
        .build();
    fx.reg.register(&p).unwrap();
    (p, post_ran)
}

#[test]
fn commit_waits_for_a_single_step_in_flight_and_its_post_handler() {
    let fx = fixture();
    let (p, post_ran) = probe_with_post_flag(&fx);
    let mut regs = trap_regs(F_MOV_EAX);
    let mut stack = Stack::new();
    let HitOutcome::SingleStep(token) = fx.reg.on_breakpoint(&mut regs, &mut stack) else {
        panic!("expected a single-step")
    };
    let committed = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            fx.reg.unregister_nosync(&p).unwrap();
            fx.reg.commit();
            assert!(
                post_ran.load(Ordering::SeqCst),
                "commit returned before the post handler of a step in flight"
            );
            committed.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !committed.load(Ordering::SeqCst),
            "commit must wait for the step"
        );
        execute_slot(&token, &mut regs, |_| {});
        assert!(matches!(
            fx.reg.on_step_complete(token, &mut regs, &mut stack),
            StepResult::Done
        ));
    });
    assert!(committed.load(Ordering::SeqCst));
}

#[test]
fn an_abandoned_step_token_does_not_block_unregistration() {
    let fx = fixture();
    let p = Kprobe::at(F_MOV_EAX).post(|_, _| {}).build();
    fx.reg.register(&p).unwrap();
    let mut regs = trap_regs(F_MOV_EAX);
    let out = fx.reg.on_breakpoint(&mut regs, &mut Stack::new());
    assert!(matches!(out, HitOutcome::SingleStep(_)));
    drop(out);
    fx.reg.unregister(&p).unwrap();
}

#[test]
fn a_site_slot_is_back_when_the_unregistration_of_its_last_probe_returns() {
    let rcu = Rcu::new();
    let fx = fixture_with(|b| b.rcu(rcu.clone()));
    let (a, b) = (Kprobe::at(F_MOV_EAX).build(), Kprobe::at(F_MOV_EAX).build());
    fx.reg.register(&a).unwrap();
    fx.reg.register(&b).unwrap();
    assert_eq!(fx.xol.in_use(), 1);
    fx.reg.unregister(&a).unwrap();
    rcu.barrier();
    assert_eq!(fx.xol.in_use(), 1, "b still uses the slot");
    // No barrier: the grace period `unregister` waited for is the one the
    // slot needs.
    fx.reg.unregister(&b).unwrap();
    assert_eq!((fx.xol.in_use(), fx.xol.frees()), (0, 1));
}

#[test]
fn churn_at_one_address_keeps_one_slot_and_leaves_the_others_for_other_addresses() {
    // An address registered again as soon as `commit` returns, over and
    // over, on a two-slot area: the slot comes back parked for the address
    // each time, so the address never holds the second slot.
    let xol = Arc::new(XolArena::new(XOL_BASE, 2, X86_64::XOL_SLOT_SIZE));
    let reg =
        KprobeRegistry::builder(X86_64, Image::new(BASE, code()), symbols(), xol.clone()).build();
    for round in 0..200 {
        let p = Kprobe::at(F_MOV_EAX).build();
        reg.register(&p).unwrap();
        if round % 2 == 0 {
            reg.unregister_nosync(&p).unwrap();
            reg.commit();
        } else {
            reg.unregister(&p).unwrap();
        }
        assert_eq!((xol.in_use(), xol.parked()), (0, 1), "round {round}");
    }
    assert_eq!(xol.allocs() - xol.frees(), 0);
    // The other slot is still there for another out-of-line address, at
    // once (no grace period to wait for).
    let (a, b) = (Kprobe::at(F_MOV_EAX).build(), Kprobe::at(H + 4).build());
    reg.register(&a).unwrap();
    reg.register(&b).unwrap();
    assert_eq!(xol.in_use(), 2);
    reg.unregister_many(&[&a, &b]).unwrap();
}

#[test]
fn a_freed_slot_goes_back_only_to_its_own_address_with_the_same_bytes() {
    // A thread sent into a slot for a boosted run may still execute it after
    // unregistration: the slot must never hold other code.
    let rcu = Rcu::new();
    let fx = fixture_with(|b| b.rcu(rcu.clone()));
    let p = Kprobe::at(F_MOV_EAX).build();
    fx.reg.register(&p).unwrap();
    let slot = fx.reg.sites()[0].slot.unwrap();
    let bytes = fx.xol.slot_bytes(slot).unwrap();
    fx.reg.unregister(&p).unwrap();
    rcu.barrier();
    assert_eq!((fx.xol.in_use(), fx.xol.parked()), (0, 1));
    assert_eq!(fx.xol.slot_bytes(slot).unwrap(), bytes, "bytes kept");

    // Another out-of-line address gets another slot.
    let q = Kprobe::at(F_MOV_RBP).build();
    fx.reg.register(&q).unwrap();
    let other = fx.reg.sites()[0].slot.unwrap();
    assert_ne!(other, slot);
    assert_eq!(fx.xol.bound_to(slot), Some(F_MOV_EAX));

    // The same address gets its slot back, refilled byte for byte.
    let p2 = Kprobe::at(F_MOV_EAX).post(|_, _| {}).build();
    fx.reg.register(&p2).unwrap();
    let sites = fx.reg.sites();
    let again = sites.iter().find(|s| s.addr == F_MOV_EAX).unwrap();
    assert_eq!(again.slot, Some(slot));
    assert_eq!(fx.xol.slot_bytes(slot).unwrap(), bytes);
    fx.reg.unregister_many(&[&q, &p2]).unwrap();
}

#[test]
fn unregister_many_removes_every_probe_with_one_call() {
    let fx = fixture();
    let probes: Vec<Kprobe> = [F_PUSH, F_MOV_EAX, G_NOP, G_RIPREL, H]
        .iter()
        .map(|&a| Kprobe::at(a).build())
        .collect();
    for p in &probes {
        fx.reg.register(p).unwrap();
    }
    let refs: Vec<&Kprobe> = probes.iter().collect();
    fx.reg.unregister_many(&refs).unwrap();
    assert!(fx.reg.sites().is_empty());
    assert_eq!(fx.reg.text().snapshot(), code());
    assert!(probes.iter().all(|p| !p.is_registered()));
}

#[test]
fn dropping_the_registry_removes_its_breakpoints_and_frees_its_probes() {
    let fx = fixture();
    let p = Kprobe::at(F_MOV_EAX).build();
    fx.reg.register(&p).unwrap();
    let q = Kprobe::at(G_NOP).build();
    fx.reg.register(&q).unwrap();
    fx.reg.unregister_nosync(&q).unwrap();
    drop(fx.reg);
    assert!(!p.is_registered() && !q.is_registered());
    let again = fixture();
    again
        .reg
        .register(&p)
        .expect("the probe is free for another registry");
}

#[test]
fn hits_on_several_threads_are_each_counted_once() {
    let fx = fixture();
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let p = Kprobe::at(F_MOV_EAX)
        .pre(move |_, _| {
            c.fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })
        .post(|_, _| {})
        .build();
    fx.reg.register(&p).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let mut stack = Stack::new();
                for _ in 0..1000 {
                    let mut regs = trap_regs(F_MOV_EAX);
                    assert_eq!(
                        hit(&fx.reg, F_MOV_EAX, &mut regs, &mut stack),
                        "single-step"
                    );
                }
            });
        }
    });
    assert_eq!(p.hits(), 4000);
    assert_eq!(calls.load(Ordering::Relaxed), 4000);
}

#[test]
fn unregister_waits_for_a_step_on_an_older_member_list_another_commit_is_finishing() {
    // P's post handler is pending on member list M1 = {P}. Q joins (M1 is
    // retired), Q is unregistered and committed on thread X, whose commit
    // takes M1 and waits for the step. Thread Y's unregister(P) must not
    // return before that step's post handler ran, although its own batch
    // does not hold M1.
    let fx = fixture();
    let (p, post_ran) = probe_with_post_flag(&fx);
    let mut regs = trap_regs(F_MOV_EAX);
    let mut stack = Stack::new();
    let HitOutcome::SingleStep(token) = fx.reg.on_breakpoint(&mut regs, &mut stack) else {
        panic!("expected a single-step")
    };
    let q = Kprobe::at(F_MOV_EAX).build();
    fx.reg.register(&q).unwrap();
    let y_done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            fx.reg.unregister_nosync(&q).unwrap();
            fx.reg.commit();
        });
        std::thread::sleep(Duration::from_millis(50));
        s.spawn(|| {
            fx.reg.unregister(&p).unwrap();
            assert!(
                post_ran.load(Ordering::SeqCst),
                "unregister(P) returned while P's post handler was still to run"
            );
            y_done.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!y_done.load(Ordering::SeqCst));
        execute_slot(&token, &mut regs, |_| {});
        assert!(matches!(
            fx.reg.on_step_complete(token, &mut regs, &mut stack),
            StepResult::Done
        ));
    });
    assert!(y_done.load(Ordering::SeqCst));
}

#[test]
fn a_probe_whose_handles_were_dropped_stays_registered_and_is_removed_through_the_registry() {
    let fx = fixture();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let p = Kprobe::at(F_MOV_EAX)
        .pre(move |_, _| {
            c.fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })
        .build();
    let id = p.id();
    fx.reg.register(&p).unwrap();
    fx.reg.register(&Kprobe::at(F_PUSH).build()).unwrap();
    drop(p);

    // The registry owns what it registered: still armed, still running.
    assert_eq!(byte_at(&fx.reg, F_MOV_EAX), 0xcc);
    let mut regs = trap_regs(F_MOV_EAX);
    hit(&fx.reg, F_MOV_EAX, &mut regs, &mut Stack::new());
    assert_eq!(count.load(Ordering::Relaxed), 1);
    assert_eq!(fx.reg.probes().len(), 2);

    // Found again by id and unregistered the ordinary way...
    let again = fx.reg.probe(id).expect("the registry kept the probe");
    assert_eq!(again.id(), id);
    assert_eq!(again.hits(), 1);
    fx.reg.unregister(&again).unwrap();
    assert!(fx.reg.probe(id).is_none());
    assert_eq!(
        byte_at(&fx.reg, F_MOV_EAX),
        code()[(F_MOV_EAX - BASE) as usize]
    );

    // ...and the rest, never named, in one call.
    assert_eq!(byte_at(&fx.reg, F_PUSH), 0xcc);
    assert_eq!(fx.reg.unregister_all().unwrap(), 1);
    assert_eq!(fx.reg.text().snapshot(), code(), "every byte restored");
    assert!(fx.reg.is_empty());
    assert!(fx.reg.probes().is_empty());
    assert_eq!(fx.reg.unregister_all().unwrap(), 0);
}
