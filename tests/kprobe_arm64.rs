//! The kprobe registry over the arm64 backend: the same registry code, a
//! different `A: Arch`. Out-of-line steps end on the step marker, branches
//! are simulated, addresses must be 4-byte aligned, and kretprobes hijack
//! `x30` instead of a stack word.

use std::sync::{Arc, Mutex};

use rcu_registry::probes::arch::arm64::BREAKPOINT;
use rcu_registry::probes::arch::{Arch, Arm64, NoDataMemory, Regs};
use rcu_registry::probes::kprobe::{
    Action, HitOutcome, Kprobe, KprobeRegistry, Kretprobe, StepResult,
};
use rcu_registry::probes::outcome::ReturnOutcome;
use rcu_registry::probes::resolve::SymbolTable;
use rcu_registry::probes::text::Image;
use rcu_registry::probes::xol::XolArena;
use rcu_registry::probes::ProbeError;

const A: u64 = 0x1000;
const SUB_SP: u64 = A; // sub sp, sp, #0x10   (out of line)
const ADD_X0: u64 = A + 4; // add x0, x0, #1  (out of line)
const B: u64 = A + 8; // b +8                 (simulated)
const RET: u64 = A + 16; // ret               (simulated)
const TRAMPOLINE: u64 = 0x2000;
const CALLER: u64 = 0x4000_0040;

fn code() -> Vec<u8> {
    [
        0xd10043ffu32,
        0x91000400,
        0x14000002,
        0xd503201f,
        0xd65f03c0,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .collect()
}

fn registry() -> KprobeRegistry<Arm64, Image> {
    let mut syms = SymbolTable::new();
    syms.insert("a", A, 20);
    let xol = Arc::new(XolArena::new(0x8000_0000, 8, Arm64.xol_slot_size()));
    KprobeRegistry::builder(Arm64, Image::new(A, code()), syms, xol)
        .trampoline(TRAMPOLINE)
        .build()
}

/// Traps at `addr` (arm64 reports the `brk` address itself) and completes
/// the hit, with `effect` standing in for the instruction in the slot.
fn hit(
    reg: &KprobeRegistry<Arm64, Image>,
    addr: u64,
    regs: &mut Regs,
    effect: impl FnOnce(&mut Regs),
) -> &'static str {
    regs.ip = addr;
    match reg.on_breakpoint(regs, &mut NoDataMemory) {
        HitOutcome::Emulated => "emulated",
        HitOutcome::SingleStep(token) => {
            effect(regs);
            regs.ip = token
                .plan()
                .step_marker
                .expect("arm64 steps end on the marker");
            match reg.on_step_complete(token, regs, &mut NoDataMemory) {
                StepResult::Done => "single-step",
                other => panic!("step: {other:?}"),
            }
        }
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[test]
fn an_arm64_probe_steps_out_of_line_and_ends_on_the_step_marker() {
    let reg = registry();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s1, s2) = (seen.clone(), seen.clone());
    let p = Kprobe::at(ADD_X0)
        .pre(move |_, r| {
            s1.lock().unwrap().push((r.ip, r.gprs[0]));
            Action::Continue
        })
        .post(move |_, r| s2.lock().unwrap().push((r.ip, r.gprs[0])))
        .build();
    reg.register(&p).unwrap();
    let at = (ADD_X0 - A) as usize;
    assert_eq!(
        &reg.text().snapshot()[at..at + 4],
        &BREAKPOINT.to_le_bytes(),
        "brk #0x5250 written"
    );
    let mut regs = Regs::default();
    assert_eq!(
        hit(&reg, ADD_X0, &mut regs, |r| r.gprs[0] += 1),
        "single-step"
    );
    assert_eq!(*seen.lock().unwrap(), vec![(ADD_X0, 0), (B, 1)]);
    reg.unregister(&p).unwrap();
    assert_eq!(reg.text().snapshot(), code());
}

#[test]
fn an_arm64_branch_is_simulated() {
    let reg = registry();
    let p = Kprobe::at(B).build();
    reg.register(&p).unwrap();
    let mut regs = Regs::default();
    assert_eq!(hit(&reg, B, &mut regs, |_| {}), "emulated");
    assert_eq!(regs.ip, RET);
    assert_eq!(p.hits(), 1);
}

#[test]
fn a_misaligned_arm64_address_is_refused_and_nothing_changes() {
    let reg = registry();
    let err = reg.register(&Kprobe::at(ADD_X0 + 2).build()).unwrap_err();
    assert_eq!(
        err,
        ProbeError::Misaligned {
            addr: ADD_X0 + 2,
            align: 4
        }
    );
    assert_eq!(reg.text().snapshot(), code());
    assert!(reg.sites().is_empty());
}

#[test]
fn an_arm64_kretprobe_hijacks_the_link_register() {
    let reg = registry();
    let rets = Arc::new(Mutex::new(Vec::new()));
    let r = rets.clone();
    let krp = Kretprobe::symbol("a", 0)
        .handler(move |_, _, ret| r.lock().unwrap().push(ret))
        .build()
        .unwrap();
    reg.register(&krp).unwrap();
    let mut regs = Regs {
        sp: 0x7000_0000,
        ..Regs::default()
    };
    regs.gprs[30] = CALLER;
    assert_eq!(
        hit(&reg, SUB_SP, &mut regs, |r| r.sp -= 0x10),
        "single-step"
    );
    assert_eq!(regs.gprs[30], TRAMPOLINE, "x30 hijacked");
    // The function restores sp and returns (x0 = 5) into the trampoline.
    let mut at_ret = Regs {
        sp: 0x7000_0000,
        ip: TRAMPOLINE,
        ..Regs::default()
    };
    at_ret.gprs[0] = 5;
    assert_eq!(
        reg.on_return(&mut at_ret),
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(*rets.lock().unwrap(), vec![5]);
}
