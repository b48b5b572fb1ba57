//! Bad input to the x86_64 backend and to a text image is refused with a
//! typed error and changes nothing: not the registers, not the memory, not
//! one byte of text.

use rcu_registry::probes::arch::{
    Arch, InsnClass, NoDataMemory, Regs, StepState, X86Reg, XolRun, X86_64,
};
use rcu_registry::probes::error::{CodeBytes, TextFailure, Unsupported};
use rcu_registry::probes::text::{Image, TextMemory};
use rcu_registry::probes::ProbeError;

const F: u64 = 0x1000;

/// `push rbp; mov rbp, rsp; mov rax, [rip+0x10]; pop rbp; ret`
const FUNC: [u8; 13] = [
    0x55, 0x48, 0x89, 0xe5, 0x48, 0x8b, 0x05, 0x10, 0x00, 0x00, 0x00, 0x5d, 0xc3,
];

#[test]
fn an_address_inside_an_instruction_is_refused_with_the_instruction_start() {
    for (off, start) in [(2u64, 1u64), (3, 1), (5, 4), (10, 4)] {
        assert_eq!(
            X86_64.check_boundary(F, &FUNC, F + off),
            Err(ProbeError::NotOnInstructionBoundary {
                addr: F + off,
                insn_start: F + start,
            }),
            "offset {off}"
        );
    }
    for off in [0u64, 1, 4, 11, 12] {
        assert_eq!(
            X86_64.check_boundary(F, &FUNC, F + off),
            Ok(()),
            "offset {off}"
        );
    }
}

#[test]
fn an_address_outside_the_function_text_is_refused() {
    for addr in [F - 1, F + FUNC.len() as u64, 0, u64::MAX] {
        assert!(
            matches!(
                X86_64.check_boundary(F, &FUNC, addr),
                Err(ProbeError::TextAccess {
                    failure: TextFailure::OutOfRange,
                    ..
                })
            ),
            "{addr:#x}"
        );
    }
}

#[test]
fn undecodable_bytes_before_the_address_are_reported_where_they_are() {
    // `06` (push es) does not exist in 64-bit mode.
    let text = [0x90, 0x06, 0x90, 0xc3];
    assert_eq!(
        X86_64.check_boundary(F, &text, F + 3),
        Err(ProbeError::UnsupportedInstruction {
            addr: F + 1,
            reason: Unsupported::Undecodable,
        })
    );
}

#[test]
fn unsupported_instructions_are_refused_with_their_reason() {
    use Unsupported::*;
    let cases: &[(&str, &[u8], Unsupported)] = &[
        ("int3", &[0xcc], Breakpoint),
        ("int 3", &[0xcd, 0x03], Breakpoint),
        ("int1", &[0xf1], Breakpoint),
        ("int 0x80", &[0xcd, 0x80], SystemCall),
        ("syscall", &[0x0f, 0x05], SystemCall),
        ("sysenter", &[0x0f, 0x34], SystemCall),
        ("hlt", &[0xf4], Privileged),
        ("cli", &[0xfa], Privileged),
        ("sti", &[0xfb], Privileged),
        ("in al, 0x60", &[0xe4, 0x60], Privileged),
        ("out dx, al", &[0xee], Privileged),
        ("mov cr3, rax", &[0x0f, 0x22, 0xd8], Privileged),
        ("mov dr7, rax", &[0x0f, 0x23, 0xf8], Privileged),
        ("lgdt [rax]", &[0x0f, 0x01, 0x10], Privileged),
        ("wrmsr", &[0x0f, 0x30], Privileged),
        ("vmcall", &[0x0f, 0x01, 0xc1], Privileged),
        ("ud2", &[0x0f, 0x0b], ExceptionGenerating),
        ("retf", &[0xcb], FarTransfer),
        ("iretq", &[0x48, 0xcf], FarTransfer),
        ("jmp far [rax]", &[0xff, 0x28], FarTransfer),
        ("call far [rax]", &[0xff, 0x18], FarTransfer),
        ("pushfq", &[0x9c], TouchesTrapFlag),
        ("popfq", &[0x9d], TouchesTrapFlag),
        ("mov ss, ax", &[0x8e, 0xd0], InhibitsSingleStep),
        ("xbegin", &[0xc7, 0xf8, 0, 0, 0, 0], Transactional),
        ("loop", &[0xe2, 0xfe], RelativeBranchForm),
        ("jrcxz", &[0xe3, 0x00], RelativeBranchForm),
        (
            "66 jmp rel32 (jmp rel16 on AMD)",
            &[0x66, 0xe9, 0x10, 0x00, 0x00, 0x00],
            RelativeBranchForm,
        ),
        ("66 ret", &[0x66, 0xc3], RelativeBranchForm),
        // A REX before 0x66 is ignored: still a 16-bit call on AMD.
        (
            "40 66 call rel32",
            &[0x40, 0x66, 0xe8, 0, 0, 0, 0],
            RelativeBranchForm,
        ),
        ("push es (invalid in 64-bit)", &[0x06], Undecodable),
        ("truncated mov", &[0x48, 0x8b], Truncated),
        ("empty", &[], Truncated),
    ];
    for (name, bytes, reason) in cases {
        assert_eq!(
            X86_64.analyze(F, bytes),
            Err(ProbeError::UnsupportedInstruction {
                addr: F,
                reason: *reason,
            }),
            "{name}"
        );
        let msg = X86_64.analyze(F, bytes).unwrap_err().to_string();
        assert!(msg.contains("0x1000"), "{name}: {msg}");
    }
}

#[test]
fn eip_relative_operands_are_refused_rather_than_widened() {
    // `67 8b 05 disp32`: mov eax, [eip+disp] wraps at 4 GiB.
    let r = X86_64.analyze(F, &[0x67, 0x8b, 0x05, 0, 0, 0, 0]);
    assert!(matches!(
        r,
        Err(ProbeError::UnsupportedInstruction {
            reason: Unsupported::Other(_),
            ..
        })
    ));
}

#[test]
fn a_foreign_patch_is_refused_and_the_text_is_unchanged() {
    let image = Image::new(F, FUNC.to_vec());
    // Someone else put a breakpoint on the `mov rbp, rsp`.
    image.write(F + 1, &[0x48], &[0xcc]).unwrap();
    let before = image.snapshot();
    let err = image.write(F + 1, &[0x48, 0x89, 0xe5], &[0xcc, 0x89, 0xe5]);
    assert_eq!(
        err,
        Err(ProbeError::AlreadyPatched {
            addr: F + 1,
            expected: CodeBytes::new(&[0x48, 0x89, 0xe5]),
            found: CodeBytes::new(&[0xcc, 0x89, 0xe5]),
        })
    );
    assert!(err.unwrap_err().to_string().contains("found [cc 89 e5]"));
    assert_eq!(image.snapshot(), before);
}

#[test]
fn out_of_range_and_mismatched_writes_change_no_byte() {
    let image = Image::new(F, FUNC.to_vec());
    let before = image.snapshot();
    let end = F + FUNC.len() as u64;
    let attempts: Vec<(u64, Vec<u8>, Vec<u8>)> = vec![
        (F - 1, vec![0], vec![0xcc]),
        (end - 1, vec![0xc3, 0], vec![0xcc, 0xcc]), // straddles the end
        (end, vec![0], vec![0xcc]),
        (u64::MAX, vec![0], vec![0xcc]),
        (F, vec![0x55], vec![0xcc, 0xcc]), // lengths differ
    ];
    for (addr, old, new) in attempts {
        assert!(image.write(addr, &old, &new).is_err(), "{addr:#x}");
        assert_eq!(image.snapshot(), before, "{addr:#x}");
    }
}

fn some_regs() -> Regs {
    let mut r = Regs::default();
    for (i, reg) in X86Reg::ALL.into_iter().enumerate() {
        r[reg] = 0x1111 * (i as u64 + 1);
    }
    r.sp = 0x7000;
    r.ip = F;
    r.flags = 0x246;
    r
}

#[test]
fn an_emulation_that_cannot_write_the_stack_changes_no_register() {
    for bytes in [&[0x55][..], &[0xe8, 0, 0, 0, 0][..]] {
        let insn = X86_64.analyze(F, bytes).unwrap();
        let mut regs = some_regs();
        let before = regs;
        assert!(matches!(
            X86_64.emulate(&insn, &mut regs, &mut NoDataMemory),
            Err(ProbeError::MemoryFault {
                addr: 0x6ff8,
                len: 8
            })
        ));
        assert_eq!(regs, before);
    }
}

#[test]
fn a_return_address_fixup_that_cannot_read_the_stack_changes_no_register() {
    let insn = X86_64.analyze(F, &[0xff, 0xd0]).unwrap(); // call rax
    let plan = X86_64.plan_xol(&insn, 0x9000).unwrap();
    let mut regs = some_regs();
    let state = X86_64
        .prepare_step(&plan, XolRun::SingleStep, &mut regs)
        .unwrap();
    // As after the step: the call pushed and jumped.
    regs.sp -= 8;
    regs.ip = regs[X86Reg::Rax];
    let before = regs;
    assert!(X86_64
        .finish_step(&plan, &state, &mut regs, &mut NoDataMemory)
        .is_err());
    assert_eq!(regs, before);
}

#[test]
fn a_hijack_that_cannot_reach_the_stack_changes_nothing() {
    let mut regs = some_regs();
    let before = regs;
    assert!(X86_64
        .hijack_return(&mut regs, &mut NoDataMemory, 0x5000)
        .is_err());
    assert_eq!(regs, before);
}

#[test]
fn plans_are_only_run_the_way_they_allow() {
    // An emulated instruction has no XOL plan.
    let push = X86_64.analyze(F, &[0x55]).unwrap();
    assert!(matches!(push.class, InsnClass::Emulated(_)));
    assert!(matches!(
        X86_64.plan_xol(&push, 0x9000),
        Err(ProbeError::PlanMismatch { .. })
    ));
    // A RIP-relative load whose slot is within reach of its operand keeps
    // `[rip + disp]`, retargeted: boostable.
    let load = X86_64.analyze(F + 4, &FUNC[4..11]).unwrap();
    assert_eq!(load.class, InsnClass::PcRelative);
    let near = X86_64.plan_xol(&load, 0x9000).unwrap();
    assert!(near.boostable);
    assert!(near.fixups.scratch.is_none());
    // Out of reach it needs the scratch register's fixup: no boosted run,
    // nothing changed.
    let plan = X86_64.plan_xol(&load, F + (1 << 40)).unwrap();
    assert!(!plan.boostable);
    assert!(plan.fixups.scratch.is_some());
    let mut regs = some_regs();
    let before = regs;
    assert!(matches!(
        X86_64.prepare_step(&plan, XolRun::Boosted, &mut regs),
        Err(ProbeError::PlanMismatch { .. })
    ));
    assert_eq!(regs, before);
    // finish_step is for single-steps only.
    let state = StepState {
        run: XolRun::Boosted,
        ..StepState::default()
    };
    assert!(matches!(
        X86_64.finish_step(&plan, &state, &mut regs, &mut NoDataMemory),
        Err(ProbeError::PlanMismatch { .. })
    ));
    assert_eq!(regs, before);
    // Not an emulated instruction: emulate() refuses.
    assert!(matches!(
        X86_64.emulate(&load, &mut regs, &mut NoDataMemory),
        Err(ProbeError::PlanMismatch { .. })
    ));
    assert_eq!(regs, before);
}

#[test]
fn a_step_trap_away_from_the_plans_marker_is_refused_and_changes_nothing() {
    // mov rax, [rip+0x10]: falls through, so its step ends on a marker; the
    // scratch register is loaded by prepare_step and restored only by a
    // finish_step at the marker.
    let load = X86_64.analyze(F + 4, &FUNC[4..11]).unwrap();
    let plan = X86_64.plan_xol(&load, 0x9000).unwrap();
    let marker = plan.step_marker.expect("a falling-through instruction");
    let mut regs = some_regs();
    let state = X86_64
        .prepare_step(&plan, XolRun::SingleStep, &mut regs)
        .unwrap();
    assert_eq!(regs.flags & (1 << 8), 0, "no trap flag for a marker step");
    // Traps that are not the marker's: on the marker byte itself (not how
    // int3 reports), one past the copy (where a trap-flag step would trap),
    // and in the original code.
    for ip in [marker, plan.step_entry + 3, F + 11] {
        regs.ip = ip;
        let before = regs;
        assert!(
            matches!(
                X86_64.finish_step(&plan, &state, &mut regs, &mut NoDataMemory),
                Err(ProbeError::PlanMismatch { .. })
            ),
            "ip {ip:#x}"
        );
        assert_eq!(regs, before, "ip {ip:#x}");
    }
    // The marker's own trap completes the step.
    regs.ip = marker + 1;
    X86_64
        .finish_step(&plan, &state, &mut regs, &mut NoDataMemory)
        .unwrap();
    assert_eq!(regs.ip, F + 11);
}

#[test]
fn the_x86_constants_are_what_the_runtime_relies_on() {
    assert_eq!(X86_64.breakpoint(), &[0xcc]);
    assert_eq!(X86_64.insn_align(), 1);
    assert_eq!(X86_64.max_insn_len(), 15);
    assert!(X86_64.xol_slot_size() >= 15 + 14);
    let regs = Regs {
        ip: F + 1,
        ..Regs::default()
    };
    assert_eq!(X86_64.trap_address(&regs), F);
}
