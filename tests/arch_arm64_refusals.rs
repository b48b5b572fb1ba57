//! Bad input to the arm64 backend: every refusal is a typed error with a
//! reason, and nothing it was handed changes.

use rcu_registry::probes::arch::arm64::{
    BREAKPOINT, BREAKPOINT_IMM, EXCLUSIVE_SCAN_WINDOW, STEP_MARKER, STEP_MARKER_IMM,
};
use rcu_registry::probes::arch::{
    Arch, Arm64, Arm64Reg, Emulation, InsnClass, NoDataMemory, Regs, XolRun,
};
use rcu_registry::probes::error::{TextFailure, Unsupported};
use rcu_registry::probes::ProbeError;

/// Where the test instructions sit.
const AT: u64 = 0x40_0000;

/// What a refusal must say.
#[derive(Debug)]
enum Expected {
    /// Exactly this reason.
    Is(Unsupported),
    /// An `Unsupported::Other` whose text contains this.
    Mentions(&'static str),
}
use Expected::{Is, Mentions};

/// Real encodings (assembled with `llvm-mc -triple=aarch64`) and hand
/// encodings of groups assemblers do not emit here, with the reason each
/// must be refused for.
const REFUSED: &[(u32, &str, Expected)] = &[
    (0xc85f_7c20, "ldxr x0, [x1]", Is(Unsupported::Exclusive)),
    (0x885f_7c20, "ldxr w0, [x1]", Is(Unsupported::Exclusive)),
    (0x085f_7c62, "ldxrb w2, [x3]", Is(Unsupported::Exclusive)),
    (0x485f_7c62, "ldxrh w2, [x3]", Is(Unsupported::Exclusive)),
    (0xc85f_fca4, "ldaxr x4, [x5]", Is(Unsupported::Exclusive)),
    (0xc806_7d07, "stxr w6, x7, [x8]", Is(Unsupported::Exclusive)),
    (
        0x0806_7d07,
        "stxrb w6, w7, [x8]",
        Is(Unsupported::Exclusive),
    ),
    (
        0x8809_fd6a,
        "stlxr w9, w10, [x11]",
        Is(Unsupported::Exclusive),
    ),
    (0xc87f_0440, "ldxp x0, x1, [x2]", Is(Unsupported::Exclusive)),
    (
        0x887f_90a3,
        "ldaxp w3, w4, [x5]",
        Is(Unsupported::Exclusive),
    ),
    (
        0xc826_2127,
        "stxp w6, x7, x8, [x9]",
        Is(Unsupported::Exclusive),
    ),
    (
        0xc82a_b1ab,
        "stlxp w10, x11, x12, [x13]",
        Is(Unsupported::Exclusive),
    ),
    (0xd400_0001, "svc #0", Is(Unsupported::SystemCall)),
    (0xd400_0022, "hvc #1", Is(Unsupported::Privileged)),
    (0xd400_0043, "smc #2", Is(Unsupported::Privileged)),
    (0xd420_0000, "brk #0", Is(Unsupported::Breakpoint)),
    (0xd420_7d00, "brk #0x3e8", Is(Unsupported::Breakpoint)),
    (0xd42a_4a00, "brk #0x5250", Is(Unsupported::Breakpoint)),
    (0xd42a_4a60, "brk #0x5253", Is(Unsupported::Breakpoint)),
    (0xd440_0000, "hlt #0", Is(Unsupported::Breakpoint)),
    (0xd4a0_0001, "dcps1", Is(Unsupported::Privileged)),
    (0xd4a0_0002, "dcps2", Is(Unsupported::Privileged)),
    (0xd4a0_0003, "dcps3", Is(Unsupported::Privileged)),
    (0xd53b_d040, "mrs x0, tpidr_el0", Is(Unsupported::System)),
    (0xd51b_d041, "msr tpidr_el0, x1", Is(Unsupported::System)),
    (0xd53b_4202, "mrs x2, nzcv", Is(Unsupported::System)),
    (0xd51b_4203, "msr nzcv, x3", Is(Unsupported::System)),
    (0xd53b_e044, "mrs x4, cntvct_el0", Is(Unsupported::System)),
    (0xd503_42df, "msr daifset, #2", Is(Unsupported::System)),
    (0xd500_41bf, "msr spsel, #1", Is(Unsupported::System)),
    (0xd50b_7420, "dc zva, x0", Is(Unsupported::System)),
    (0xd50b_7e21, "dc civac, x1", Is(Unsupported::System)),
    (0xd50b_7522, "ic ivau, x2", Is(Unsupported::System)),
    (
        0xd508_7503,
        "sys #0, c7, c5, #0, x3",
        Is(Unsupported::System),
    ),
    (
        0xd528_1004,
        "sysl x4, #0, c1, c0, #0",
        Is(Unsupported::System),
    ),
    (
        0xd503_207f,
        "wfi",
        Mentions("hint not on the arm64 allow-list"),
    ),
    (
        0xd503_221f,
        "esb",
        Mentions("hint not on the arm64 allow-list"),
    ),
    (
        0xd503_223f,
        "psb csync",
        Mentions("hint not on the arm64 allow-list"),
    ),
    (
        0xd503_225f,
        "tsb csync",
        Mentions("hint not on the arm64 allow-list"),
    ),
    (0xd69f_03e0, "eret", Is(Unsupported::Privileged)),
    (0xd6bf_03e0, "drps", Is(Unsupported::Privileged)),
    (0xd69f_0bff, "eretaa", Is(Unsupported::Privileged)),
    (
        0xd61f_081f,
        "braaz x0",
        Mentions("pointer-authenticated branch"),
    ),
    (
        0xd71f_0c22,
        "brab x1, x2",
        Mentions("pointer-authenticated branch"),
    ),
    (
        0xd63f_087f,
        "blraaz x3",
        Mentions("pointer-authenticated branch"),
    ),
    (
        0xd73f_0c85,
        "blrab x4, x5",
        Mentions("pointer-authenticated branch"),
    ),
    (
        0xd65f_0bff,
        "retaa",
        Mentions("pointer-authenticated branch"),
    ),
    (
        0xd65f_0fff,
        "retab",
        Mentions("pointer-authenticated branch"),
    ),
    (
        0x9c00_0080,
        "ldr q0, .+16",
        Mentions("SIMD&FP literal load"),
    ),
    (
        0x5cff_ff81,
        "ldr d1, .-16",
        Mentions("SIMD&FP literal load"),
    ),
    (
        0x1c00_0802,
        "ldr s2, .+0x100",
        Mentions("SIMD&FP literal load"),
    ),
    (0xd523_3060, "tstart x0", Is(Unsupported::Transactional)),
    (0xd503_307f, "tcommit", Is(Unsupported::Transactional)),
    (0xd460_0020, "tcancel #1", Is(Unsupported::Transactional)),
    (0xd523_3161, "ttest x1", Is(Unsupported::Transactional)),
    (0x0000_0000, "udf #0", Is(Unsupported::ExceptionGenerating)),
    (
        0x0000_1234,
        "udf #0x1234",
        Is(Unsupported::ExceptionGenerating),
    ),
    (
        0x0201_0000,
        "unallocated top-level group 0001",
        Is(Unsupported::Undecodable),
    ),
    (
        0x0420_0000,
        "add z0.b, z0.b, z0.b (SVE)",
        Mentions("SVE/SME"),
    ),
    (0x8000_0000, "SME group", Mentions("SVE/SME")),
    (0x5400_0010, "bc.eq .+0 (FEAT_HBC)", Mentions("BC.cond")),
    (
        0x1901_0440,
        "cpyfp [x0]!, [x1]!, x2! (FEAT_MOPS)",
        Mentions("memory copy/set"),
    ),
    (
        0xd503_213f,
        "hint #9 (unallocated)",
        Mentions("hint not on the arm64 allow-list"),
    ),
    (
        0xdc00_0000,
        "ldr literal opc=11 V=1 (unallocated)",
        Is(Unsupported::Undecodable),
    ),
    (
        0xd41f_ffe4,
        "exception group with op2 != 0",
        Is(Unsupported::Undecodable),
    ),
];

fn refusal(word: u32) -> Result<Unsupported, String> {
    match Arm64.analyze(AT, &word.to_le_bytes()) {
        Err(ProbeError::UnsupportedInstruction { addr, reason }) if addr == AT => Ok(reason),
        other => Err(format!("{other:?}")),
    }
}

#[test]
fn every_refused_instruction_gets_its_documented_reason() {
    let mut wrong = Vec::new();
    for (word, text, expected) in REFUSED {
        let verdict = refusal(*word);
        let ok = match (&verdict, expected) {
            (Ok(reason), Is(want)) => reason == want,
            (Ok(Unsupported::Other(s)), Mentions(part)) => s.contains(part),
            _ => false,
        };
        if !ok {
            wrong.push(format!(
                "`{text}` {word:#010x}: got {verdict:?}, want {expected:?}"
            ));
        }
    }
    println!("{} refused encodings checked", REFUSED.len());
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn refusal_messages_name_the_address_and_the_reason() {
    let e = Arm64
        .analyze(AT, &0xc85f_7c20u32.to_le_bytes())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot probe the instruction at 0x400000: it is an exclusive load/store"
    );
    let e = Arm64
        .analyze(AT, &0x9c00_0080u32.to_le_bytes())
        .unwrap_err();
    assert!(e.to_string().contains("vector register"), "{e}");
}

#[test]
fn breakpoint_and_step_marker_are_distinct_brk_instructions() {
    assert_eq!(BREAKPOINT, 0xd420_0000 | u32::from(BREAKPOINT_IMM) << 5);
    assert_eq!(STEP_MARKER, 0xd420_0000 | u32::from(STEP_MARKER_IMM) << 5);
    assert_ne!(BREAKPOINT_IMM, STEP_MARKER_IMM);
    assert_eq!(Arm64.breakpoint(), BREAKPOINT.to_le_bytes());
    // A probe can never sit on a probe's own breakpoint or step marker.
    assert_eq!(refusal(BREAKPOINT), Ok(Unsupported::Breakpoint));
    assert_eq!(refusal(STEP_MARKER), Ok(Unsupported::Breakpoint));
}

#[test]
fn misaligned_addresses_are_refused_everywhere() {
    let nop = 0xd503_201fu32.to_le_bytes();
    for addr in [AT + 1, AT + 2, AT + 3] {
        let misaligned = ProbeError::Misaligned { addr, align: 4 };
        assert_eq!(Arm64.analyze(addr, &nop), Err(misaligned.clone()));
        assert_eq!(Arm64.classify(addr, 0xd503_201f), Err(misaligned.clone()));
        assert_eq!(
            Arm64.check_boundary(AT, &[0; 16], addr),
            Err(misaligned.clone())
        );
        assert_eq!(
            Arm64.check_boundary(addr, &[0; 16], AT + 4),
            Err(misaligned)
        );
    }
    let add = Arm64.analyze(AT, &0x9100_1020u32.to_le_bytes()).unwrap();
    assert_eq!(
        Arm64.plan_xol(&add, 0x7000_0002),
        Err(ProbeError::Misaligned {
            addr: 0x7000_0002,
            align: 4
        })
    );
    assert_eq!(
        ProbeError::Misaligned {
            addr: AT + 2,
            align: 4
        }
        .to_string(),
        "address 0x400002 is misaligned: instructions are 4-byte aligned"
    );
}

#[test]
fn fewer_than_four_bytes_are_truncated() {
    assert_eq!(
        Arm64.analyze(AT, &[0x1f, 0x20, 0x03]),
        Err(ProbeError::UnsupportedInstruction {
            addr: AT,
            reason: Unsupported::Truncated
        })
    );
}

#[test]
fn probe_address_outside_the_function_text_is_refused() {
    let text = [0u8; 8];
    for addr in [AT - 4, AT + 8, AT + 0x1000] {
        assert_eq!(
            Arm64.check_boundary(AT, &text, addr),
            Err(ProbeError::TextAccess {
                addr,
                len: 4,
                failure: TextFailure::OutOfRange
            })
        );
    }
    assert_eq!(Arm64.check_boundary(AT, &text, AT + 4), Ok(()));
}

fn text(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// `bool cmpxchg(u32 *p, u32 old, u32 new)` as compilers emit it without
/// LSE atomics.
const CMPXCHG: &[(u32, &str)] = &[
    (0xa9bf_7bfd, "stp x29, x30, [sp, #-16]!"),
    (0x9100_03fd, "mov x29, sp"),
    (0x885f_fc08, "ldaxr w8, [x0]"),
    (0x6b01_011f, "cmp w8, w1"),
    (0x5400_0061, "b.ne .+12"),
    (0x8809_fc02, "stlxr w9, w2, [x0]"),
    (0x35ff_ff89, "cbnz w9, .-16"),
    (0x1a9f_17e0, "cset w0, eq"),
    (0xa8c1_7bfd, "ldp x29, x30, [sp], #16"),
    (0xd65f_03c0, "ret"),
];

#[test]
fn sites_between_load_and_store_exclusive_are_refused() {
    let words: Vec<u32> = CMPXCHG.iter().map(|&(w, _)| w).collect();
    let func = text(&words);
    let inside = ["cmp w8, w1", "b.ne .+12", "stlxr w9, w2, [x0]"];
    for (i, &(_, asm)) in CMPXCHG.iter().enumerate() {
        let addr = AT + 4 * i as u64;
        let verdict = Arm64.check_boundary(AT, &func, addr);
        if inside.contains(&asm) {
            assert_eq!(
                verdict,
                Err(ProbeError::UnsupportedInstruction {
                    addr,
                    reason: Unsupported::InsideExclusiveSequence,
                }),
                "`{asm}` is inside the ldaxr/stlxr sequence"
            );
        } else {
            assert_eq!(verdict, Ok(()), "`{asm}` is outside the sequence");
        }
    }
    // The exclusives themselves pass the boundary check but not analysis.
    for at in [2u64, 5] {
        assert_eq!(
            Arm64
                .analyze(AT + 4 * at, &func[4 * at as usize..])
                .map(|i| i.class),
            Err(ProbeError::UnsupportedInstruction {
                addr: AT + 4 * at,
                reason: Unsupported::Exclusive
            })
        );
    }
}

#[test]
fn clrex_ends_an_exclusive_sequence() {
    // ldxp; add; clrex; mov; ret
    let func = text(&[
        0xc87f_0440,
        0x9100_0400,
        0xd503_3f5f,
        0xaa00_03e3,
        0xd65f_03c0,
    ]);
    assert!(Arm64.check_boundary(AT, &func, AT + 4).is_err());
    assert!(Arm64.check_boundary(AT, &func, AT + 8).is_err());
    assert_eq!(Arm64.check_boundary(AT, &func, AT + 12), Ok(()));
}

#[test]
fn exclusive_scan_is_bounded_by_the_function_start_and_the_window() {
    let nop = 0xd503_201f;
    let mut words = vec![0x885f_fc08]; // ldaxr w8, [x0]
    words.extend(std::iter::repeat(nop).take(EXCLUSIVE_SCAN_WINDOW + 1));
    let func = text(&words);
    let window_end = AT + 4 * EXCLUSIVE_SCAN_WINDOW as u64;
    assert!(Arm64.check_boundary(AT, &func, window_end).is_err());
    assert_eq!(Arm64.check_boundary(AT, &func, window_end + 4), Ok(()));
    // A function that starts after the load-exclusive does not see it.
    assert_eq!(Arm64.check_boundary(AT + 4, &func[4..], AT + 8), Ok(()));
}

fn sample_regs() -> Regs {
    let mut regs = Regs {
        sp: 0x7fff_0000,
        ip: AT,
        flags: 0x6000_0c00,
        ..Regs::default()
    };
    for (i, r) in regs.gprs.iter_mut().enumerate() {
        *r = 0x1111_0000 + i as u64;
    }
    regs
}

#[test]
fn faulting_literal_load_changes_no_register() {
    // ldr x2, .-0x40
    let insn = Arm64.analyze(AT, &0x58ff_fe02u32.to_le_bytes()).unwrap();
    let mut regs = sample_regs();
    let before = regs;
    assert_eq!(
        Arm64.emulate(&insn, &mut regs, &mut NoDataMemory),
        Err(ProbeError::MemoryFault {
            addr: AT - 0x40,
            len: 8
        })
    );
    assert_eq!(regs, before);
}

#[test]
fn plans_and_emulations_are_refused_for_the_wrong_kind_of_instruction() {
    let b = Arm64.analyze(AT, &0x1400_0010u32.to_le_bytes()).unwrap();
    let add = Arm64.analyze(AT, &0x9100_1020u32.to_le_bytes()).unwrap();
    assert!(
        matches!(b.class, InsnClass::Emulated(Emulation::Jump { target }) if target == AT + 0x40)
    );
    assert!(matches!(
        Arm64.plan_xol(&b, 0x7000_0000),
        Err(ProbeError::PlanMismatch { .. })
    ));
    let mut regs = sample_regs();
    let before = regs;
    assert!(matches!(
        Arm64.emulate(&add, &mut regs, &mut NoDataMemory),
        Err(ProbeError::PlanMismatch { .. })
    ));
    assert_eq!(regs, before);
}

#[test]
fn a_slot_out_of_reach_of_b_is_stepped_only_the_copy_then_the_step_marker() {
    let add = Arm64.analyze(AT, &0x9100_1020u32.to_le_bytes()).unwrap();
    // 1.8 GiB from AT: beyond `b`'s +/-128 MiB.
    let slot = 0x7000_0100;
    let plan = Arm64.plan_xol(&add, slot).unwrap();
    let mut expected = STEP_MARKER.to_le_bytes().repeat(2);
    expected.extend(0x9100_1020u32.to_le_bytes());
    expected.extend(STEP_MARKER.to_le_bytes());
    assert_eq!(plan.slot_bytes(), &expected[..]);
    assert_eq!(plan.slot_bytes().len(), Arm64.xol_slot_size());
    assert!(!plan.boostable);
    assert_eq!(plan.step_entry, slot + 8);
    assert_eq!(plan.step_marker, Some(slot + 12));

    let mut regs = sample_regs();
    let state = Arm64
        .prepare_step(&plan, XolRun::SingleStep, &mut regs)
        .unwrap();
    assert_eq!(regs.ip, slot + 8);
    assert_eq!(regs.flags & (0b11 << 10), 0, "BTYPE cleared for the slot");
    regs.ip = slot + 12; // the step marker trapped
    Arm64
        .finish_step(&plan, &state, &mut regs, &mut NoDataMemory)
        .unwrap();
    assert_eq!(regs.ip, AT + 4);
}

#[test]
fn a_slot_within_reach_of_b_is_boostable_the_copy_then_b_back() {
    // Far from address 0, so that the reach can be tested on both sides.
    const AT: u64 = 0x1_0000_0000;
    let add = Arm64.analyze(AT, &0x9100_1020u32.to_le_bytes()).unwrap();
    // `b` reaches [pc - 128 MiB, pc + 128 MiB - 4]: the boosted copy's
    // branch sits at slot + 4 and goes to AT + 4, an offset of AT - slot.
    for (slot, boostable) in [
        (AT + 0x1000, true),
        (AT - 0x1000, true),
        (AT + (128 << 20), true),
        (AT + (128 << 20) + 4, false),
        (AT - (128 << 20) + 4, true),
        (AT - (128 << 20), false),
    ] {
        let plan = Arm64.plan_xol(&add, slot).unwrap();
        assert_eq!(plan.boostable, boostable, "slot {slot:#x}");
        if !boostable {
            continue;
        }
        let bytes = plan.slot_bytes();
        assert_eq!(bytes[..4], 0x9100_1020u32.to_le_bytes());
        let b = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        assert_eq!(b & 0xfc00_0000, 0x1400_0000, "a `b`");
        let off = (((b & 0x03ff_ffff) << 6) as i32 >> 6) as i64 * 4;
        assert_eq!(
            (slot + 4).wrapping_add(off as u64),
            AT + 4,
            "b lands after the original"
        );
        assert_eq!(bytes[8..12], 0x9100_1020u32.to_le_bytes());
        assert_eq!(bytes[12..], STEP_MARKER.to_le_bytes());
        // A boosted run starts at the slot; a stepped one at its copy.
        let mut regs = sample_regs();
        Arm64
            .prepare_step(&plan, XolRun::Boosted, &mut regs)
            .unwrap();
        assert_eq!(regs.ip, slot);
        // `boost` (the registries' boosted hit) leaves the same registers.
        let mut boosted = sample_regs();
        Arm64.boost(&plan, &mut boosted).unwrap();
        assert_eq!(boosted, regs);
        let mut regs = sample_regs();
        Arm64
            .prepare_step(&plan, XolRun::SingleStep, &mut regs)
            .unwrap();
        assert_eq!(regs.ip, slot + 8);
    }
}

#[test]
fn boosted_runs_and_stray_step_traps_are_refused_without_changing_registers() {
    let add = Arm64.analyze(AT, &0x9100_1020u32.to_le_bytes()).unwrap();
    let plan = Arm64.plan_xol(&add, 0x7000_0100).unwrap();
    let mut regs = sample_regs();
    let before = regs;
    assert!(matches!(
        Arm64.prepare_step(&plan, XolRun::Boosted, &mut regs),
        Err(ProbeError::PlanMismatch { .. })
    ));
    assert_eq!(regs, before);
    assert!(matches!(
        Arm64.boost(&plan, &mut regs),
        Err(ProbeError::PlanMismatch { .. })
    ));
    assert_eq!(regs, before);
    let state = Arm64
        .prepare_step(&plan, XolRun::SingleStep, &mut regs)
        .unwrap();
    regs.ip = 0x7000_0100; // a trap that is not the step marker
    let stray = regs;
    assert!(matches!(
        Arm64.finish_step(&plan, &state, &mut regs, &mut NoDataMemory),
        Err(ProbeError::PlanMismatch { .. })
    ));
    assert_eq!(regs, stray);
}

#[test]
fn return_hijack_swaps_only_the_link_register() {
    let mut regs = sample_regs();
    let before = regs;
    let original = Arm64
        .hijack_return(&mut regs, &mut NoDataMemory, 0xdead_beef)
        .unwrap();
    assert_eq!(original, before[Arm64Reg::X30]);
    assert_eq!(regs[Arm64Reg::LR], 0xdead_beef);
    regs[Arm64Reg::X30] = original;
    assert_eq!(regs, before, "nothing but x30 changed");
    assert_eq!(Arm64.return_value(&regs), regs[Arm64Reg::X0]);
    assert_eq!(Arm64.stack_pointer_at_return(&regs), regs.sp);
    assert_eq!(regs[Arm64Reg::Sp], regs.sp);
}
