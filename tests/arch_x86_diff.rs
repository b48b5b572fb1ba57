//! Proof by execution of the x86_64 backend: every instruction is run in
//! place and through the backend (emulation, or XOL single-step / boosted
//! from a near and a far slot) under the unicorn emulator, and the final
//! registers, flags, XMM registers and memory must be identical.
//!
//! Bounded in time: `ARCH_X86_CASES` (default 400) random instructions, each
//! on one random machine state; the corpus runs `CORPUS_SEEDS` states per
//! instruction.

mod arch_x86_support;

use std::cell::RefCell;

use arch_x86_support::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rcu_registry::probes::arch::{Arch, Insn, InsnClass, X86Reg, X86_64};
use rcu_registry::probes::ProbeError;

const CORPUS_SEEDS: u64 = 6;
/// Address rip-relative corpus operands point to (16-byte aligned, in DATA).
const TARGET: u64 = DATA + 0x100;
/// A code address stored at TARGET and at [rsp], so indirect branches,
/// calls and returns through memory land in mapped code.
const LANDING: u64 = CODE + 0x300;

/// `pre ++ disp32 ++ post`, where disp32 makes the operand address `target`
/// for an instruction at `INSN_AT`.
fn rip(pre: &[u8], post: &[u8], target: u64) -> Vec<u8> {
    let len = (pre.len() + 4 + post.len()) as u64;
    let disp = (target.wrapping_sub(INSN_AT + len) as i64) as i32;
    [pre, &disp.to_le_bytes()[..], post].concat()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Emulated,
    PcRelative,
    OutOfLine,
}

fn kind(insn: &Insn) -> Kind {
    match insn.class {
        InsnClass::Emulated(_) => Kind::Emulated,
        InsnClass::PcRelative => Kind::PcRelative,
        _ => Kind::OutOfLine,
    }
}

/// Real instructions, as compilers emit them, with the class the backend
/// must give them.
fn corpus() -> Vec<(&'static str, Vec<u8>, Kind)> {
    use Kind::*;
    let t = TARGET;
    vec![
        // RIP-relative data access: loads, stores, read-modify-write.
        (
            "mov rax, [rip+d]",
            rip(&[0x48, 0x8b, 0x05], &[], t),
            PcRelative,
        ),
        (
            "mov [rip+d], rcx",
            rip(&[0x48, 0x89, 0x0d], &[], t),
            PcRelative,
        ),
        (
            "lea rdx, [rip+d]",
            rip(&[0x48, 0x8d, 0x15], &[], t),
            PcRelative,
        ),
        ("add [rip+d], eax", rip(&[0x01, 0x05], &[], t), PcRelative),
        (
            "add rax, [rip+d]",
            rip(&[0x48, 0x03, 0x05], &[], t),
            PcRelative,
        ),
        (
            "adc rax, [rip+d]",
            rip(&[0x48, 0x13, 0x05], &[], t),
            PcRelative,
        ),
        (
            "cmp qword [rip+d], 7",
            rip(&[0x48, 0x83, 0x3d], &[7], t),
            PcRelative,
        ),
        (
            "mov r8, [rip+d]",
            rip(&[0x4c, 0x8b, 0x05], &[], t),
            PcRelative,
        ),
        (
            "mov r15d, [rip+d]",
            rip(&[0x44, 0x8b, 0x3d], &[], t),
            PcRelative,
        ),
        (
            "cmovne rax, [rip+d]",
            rip(&[0x48, 0x0f, 0x45, 0x05], &[], t),
            PcRelative,
        ),
        (
            "imul rcx, [rip+d], 0x1234",
            rip(&[0x48, 0x69, 0x0d], &[0x34, 0x12, 0, 0], t),
            PcRelative,
        ),
        (
            "movzx eax, byte [rip+d]",
            rip(&[0x0f, 0xb6, 0x05], &[], t),
            PcRelative,
        ),
        (
            "test byte [rip+d], 1",
            rip(&[0xf6, 0x05], &[1], t),
            PcRelative,
        ),
        ("inc dword [rip+d]", rip(&[0xff, 0x05], &[], t), PcRelative),
        (
            "mov byte [rip+d], 0x5a",
            rip(&[0xc6, 0x05], &[0x5a], t),
            PcRelative,
        ),
        (
            "xchg [rip+d], rbx",
            rip(&[0x48, 0x87, 0x1d], &[], t),
            PcRelative,
        ),
        (
            "setne byte [rip+d]",
            rip(&[0x0f, 0x95, 0x05], &[], t),
            PcRelative,
        ),
        (
            "bt dword [rip+d], 3",
            rip(&[0x0f, 0xba, 0x25], &[3], t),
            PcRelative,
        ),
        (
            "shl qword [rip+d], cl",
            rip(&[0x48, 0xd3, 0x25], &[], t),
            PcRelative,
        ),
        // Implicit register users: the scratch must avoid rax/rdx/rcx.
        (
            "lock xadd [rip+d], eax",
            rip(&[0xf0, 0x0f, 0xc1, 0x05], &[], t),
            PcRelative,
        ),
        (
            "lock cmpxchg [rip+d], rcx",
            rip(&[0xf0, 0x48, 0x0f, 0xb1, 0x0d], &[], t),
            PcRelative,
        ),
        (
            "mul qword [rip+d]",
            rip(&[0x48, 0xf7, 0x25], &[], t),
            PcRelative,
        ),
        // SSE through RIP.
        (
            "movups xmm1, [rip+d]",
            rip(&[0x0f, 0x10, 0x0d], &[], t),
            PcRelative,
        ),
        (
            "movdqa xmm2, [rip+d]",
            rip(&[0x66, 0x0f, 0x6f, 0x15], &[], t),
            PcRelative,
        ),
        (
            "movaps [rip+d], xmm3",
            rip(&[0x0f, 0x29, 0x1d], &[], t),
            PcRelative,
        ),
        (
            "movq xmm4, [rip+d]",
            rip(&[0xf3, 0x0f, 0x7e, 0x25], &[], t),
            PcRelative,
        ),
        (
            "cvtsi2sd xmm0, qword [rip+d]",
            rip(&[0xf2, 0x48, 0x0f, 0x2a, 0x05], &[], t),
            PcRelative,
        ),
        // Stack and control flow through RIP.
        ("push qword [rip+d]", rip(&[0xff, 0x35], &[], t), PcRelative),
        ("pop qword [rip+d]", rip(&[0x8f, 0x05], &[], t), PcRelative),
        ("call [rip+d]", rip(&[0xff, 0x15], &[], t), PcRelative),
        ("jmp [rip+d]", rip(&[0xff, 0x25], &[], t), PcRelative),
        // Emulated: function-entry and branch instructions.
        ("push rbp", vec![0x55], Emulated),
        ("push r12", vec![0x41, 0x54], Emulated),
        ("push rsp", vec![0x54], Emulated),
        ("nop", vec![0x90], Emulated),
        (
            "nop dword [rax+rax]",
            vec![0x0f, 0x1f, 0x44, 0, 0],
            Emulated,
        ),
        ("endbr64", vec![0xf3, 0x0f, 0x1e, 0xfa], Emulated),
        ("call rel32", vec![0xe8, 0x10, 0x02, 0, 0], Emulated),
        (
            "call rel32 backwards",
            vec![0xe8, 0x00, 0xf0, 0xff, 0xff],
            Emulated,
        ),
        ("jmp rel8", vec![0xeb, 0x10], Emulated),
        ("jmp rel8 backwards", vec![0xeb, 0x80], Emulated),
        ("jmp rel32", vec![0xe9, 0x00, 0x01, 0, 0], Emulated),
        ("je rel8", vec![0x74, 0x05], Emulated),
        ("jb rel8", vec![0x72, 0x05], Emulated),
        ("jg rel32", vec![0x0f, 0x8f, 0x40, 0, 0, 0], Emulated),
        ("jp rel32", vec![0x0f, 0x8a, 0x40, 0, 0, 0], Emulated),
        // Out of line, unchanged.
        ("pop rbp", vec![0x5d], OutOfLine),
        ("mov rbp, rsp", vec![0x48, 0x89, 0xe5], OutOfLine),
        ("sub rsp, 0x28", vec![0x48, 0x83, 0xec, 0x28], OutOfLine),
        ("cmp rdi, rsi", vec![0x48, 0x39, 0xf7], OutOfLine),
        ("test eax, eax", vec![0x85, 0xc0], OutOfLine),
        ("xor eax, eax", vec![0x31, 0xc0], OutOfLine),
        ("imul rax, rbx", vec![0x48, 0x0f, 0xaf, 0xc3], OutOfLine),
        ("cmovl rcx, rdx", vec![0x48, 0x0f, 0x4c, 0xca], OutOfLine),
        ("sete al", vec![0x0f, 0x94, 0xc0], OutOfLine),
        (
            "lea rax, [rbx+rcx*4+8]",
            vec![0x48, 0x8d, 0x44, 0x8b, 0x08],
            OutOfLine,
        ),
        ("mov eax, [rsp+8]", vec![0x8b, 0x44, 0x24, 0x08], OutOfLine),
        (
            "mov [rsp-8], rdi (red zone)",
            vec![0x48, 0x89, 0x7c, 0x24, 0xf8],
            OutOfLine,
        ),
        ("movups xmm0, [rsi]", vec![0x0f, 0x10, 0x06], OutOfLine),
        ("xchg r8, rax", vec![0x49, 0x90], OutOfLine),
        ("cqo", vec![0x48, 0x99], OutOfLine),
        ("bswap rax", vec![0x48, 0x0f, 0xc8], OutOfLine),
        ("leave", vec![0xc9], OutOfLine),
        ("ret", vec![0xc3], OutOfLine),
        ("ret 16", vec![0xc2, 0x10, 0x00], OutOfLine),
        ("call rax", vec![0xff, 0xd0], OutOfLine),
        ("call [rsp]", vec![0xff, 0x14, 0x24], OutOfLine),
        ("jmp rax", vec![0xff, 0xe0], OutOfLine),
        ("lock add [rdi], esi", vec![0xf0, 0x01, 0x37], OutOfLine),
        ("rep stosb", vec![0xf3, 0xaa], OutOfLine),
        ("rep movsq", vec![0xf3, 0x48, 0xa5], OutOfLine),
        ("repne scasb", vec![0xf2, 0xae], OutOfLine),
    ]
}

/// A random machine prepared for the corpus: the rip-relative target holds a
/// code address, and so do [rsp] and rax (for `call rax`, `ret`, ...).
fn corpus_machine(seed: u64, bytes: &[u8]) -> Machine {
    let mut rng = Rng(seed);
    let mut m = Machine::random(&mut rng, is_rep_string(bytes));
    let off = (TARGET - DATA) as usize;
    m.data[off..off + 8].copy_from_slice(&LANDING.to_le_bytes());
    let sp = (m.regs[X86Reg::Rsp] - STACK) as usize;
    m.stack[sp..sp + 8].copy_from_slice(&LANDING.to_le_bytes());
    m.regs[X86Reg::Rax] = LANDING;
    if is_rep_string(bytes) {
        // Direction flag clear or set, both fine; rsi/rdi inside DATA.
        m.regs[X86Reg::Rsi] = DATA + 0x400;
        m.regs[X86Reg::Rdi] = DATA + 0x800;
    }
    m
}

#[test]
fn corpus_instructions_behave_the_same_in_place_and_probed() {
    let mut compared = 0;
    for (name, bytes, expected) in corpus() {
        let insn = X86_64
            .analyze(INSN_AT, &bytes)
            .unwrap_or_else(|e| panic!("{name}: refused: {e}"));
        assert_eq!(insn.len as usize, bytes.len(), "{name}: length");
        assert_eq!(kind(&insn), expected, "{name}: class {:?}", insn.class);
        let vias = ways(&insn);
        let mut same = vec![0; vias.len()];
        for seed in 0..CORPUS_SEEDS {
            let m = corpus_machine(seed * 7919 + bytes.len() as u64, &bytes);
            let native = run_in_place(&m, &bytes);
            for (i, &via) in vias.iter().enumerate() {
                match judge(&native, &run_via(&m, &insn, via), &insn, via) {
                    Verdict::Same => same[i] += 1,
                    Verdict::BothFault => {}
                    Verdict::Differs(d) => panic!("{name}: {d}"),
                }
            }
        }
        for (i, via) in vias.iter().enumerate() {
            assert!(
                same[i] > 0,
                "{name} via {via:x?}: every run faulted, nothing was proven"
            );
        }
        compared += same.iter().sum::<usize>();
    }
    println!("corpus: {compared} identical in-place/probed runs");
}

#[test]
fn every_jcc_condition_is_emulated_like_the_cpu_evaluates_it() {
    let mut taken = [0u32; 16];
    let mut not_taken = [0u32; 16];
    for cc in 0..16u8 {
        for form in [
            vec![0x70 + cc, 0x20],
            vec![0x0f, 0x80 + cc, 0x00, 0x02, 0, 0],
        ] {
            let insn = X86_64.analyze(INSN_AT, &form).unwrap();
            assert_eq!(kind(&insn), Kind::Emulated);
            for seed in 0..24 {
                let mut rng = Rng(seed * 31 + u64::from(cc));
                let m = Machine::random(&mut rng, false);
                let native = run_in_place(&m, &form);
                let probed = run_via(&m, &insn, Via::Emulate);
                match judge(&native, &probed, &insn, Via::Emulate) {
                    Verdict::Same => {}
                    v => panic!("jcc {cc:#x}: {v:?}"),
                }
                if let Outcome::Done(after) = native {
                    if after.regs.ip == insn.next_addr() {
                        not_taken[usize::from(cc)] += 1;
                    } else {
                        taken[usize::from(cc)] += 1;
                    }
                }
            }
        }
    }
    for cc in 0..16 {
        assert!(
            taken[cc] > 0 && not_taken[cc] > 0,
            "condition {cc} was not exercised both ways: {} taken, {} not",
            taken[cc],
            not_taken[cc]
        );
    }
}

/// The harness must catch a wrong fixup: a plan with a fixup removed or
/// corrupted produces a different final state.
#[test]
fn a_broken_fixup_is_detected_by_the_differential_harness() {
    type Breakage = Box<dyn Fn(&mut rcu_registry::probes::arch::XolPlan)>;
    let cases: Vec<(&str, Vec<u8>, Breakage)> = vec![
        (
            "scratch register loaded with a value 8 bytes off",
            rip(&[0x48, 0x8b, 0x05], &[], TARGET),
            Box::new(|p| {
                if let Some(s) = p.fixups.scratch.as_mut() {
                    s.value = s.value.wrapping_add(8);
                }
            }),
        ),
        (
            "ip fixup missing",
            vec![0x48, 0x89, 0xe5],
            Box::new(|p| p.fixups.ip = None),
        ),
        (
            "return address not corrected",
            vec![0xff, 0xd0],
            Box::new(|p| p.fixups.return_address = None),
        ),
        (
            "scratch fixup missing",
            rip(&[0x48, 0x8b, 0x05], &[], TARGET),
            Box::new(|p| p.fixups.scratch = None),
        ),
    ];
    // From the far slot: out of the RIP-relative operand's reach, so its
    // plan has the scratch fixup to break.
    for (what, bytes, tamper) in cases {
        let insn = X86_64.analyze(INSN_AT, &bytes).unwrap();
        let m = corpus_machine(1, &bytes);
        let native = run_in_place(&m, &bytes);
        let honest = run_via(&m, &insn, Via::Step(SLOT_FAR));
        assert_eq!(
            judge(&native, &honest, &insn, Via::Step(SLOT_FAR)),
            Verdict::Same,
            "{what}: honest plan"
        );
        let broken = run_via_plan(&m, &insn, Via::Step(SLOT_FAR), |p| tamper(p));
        assert!(
            matches!(
                judge(&native, &broken, &insn, Via::Step(SLOT_FAR)),
                Verdict::Differs(_) | Verdict::BothFault
            ) && broken != native,
            "{what}: the harness did not notice"
        );
    }
}

/// Mnemonics whose results differ between two runs by design.
fn nondeterministic(bytes: &[u8]) -> bool {
    use iced_x86::Mnemonic as M;
    let ins = iced_x86::Decoder::with_ip(64, bytes, INSN_AT, 0).decode();
    matches!(
        ins.mnemonic(),
        M::Rdtsc | M::Rdtscp | M::Rdrand | M::Rdseed | M::Rdpmc | M::Rdpid | M::Rdpru
    )
}

/// Re-encodes the memory operand of `bytes` (if any) as `[rip + d]` aimed at
/// the data pages, so random instructions exercise the RIP-relative path with
/// operands that hit mapped memory.
fn make_rip_relative(bytes: &[u8], offset: u64) -> Option<Vec<u8>> {
    use iced_x86::{Encoder, OpKind, Register};
    let mut ins = iced_x86::Decoder::with_ip(64, bytes, INSN_AT, 0).decode();
    if ins.is_invalid() || !(0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory) {
        return None;
    }
    ins.set_memory_base(Register::RIP);
    ins.set_memory_index(Register::None);
    ins.set_memory_index_scale(1);
    ins.set_memory_displacement64(DATA + 0x400 + (offset % 0x800) * 16);
    ins.set_memory_displ_size(8);
    let mut enc = Encoder::new(64);
    enc.encode(&ins, INSN_AT).ok()?;
    Some(enc.take_buffer())
}

#[derive(Default, Debug)]
struct Stats {
    refused: usize,
    skipped: usize,
    same: usize,
    both_fault: usize,
    emulated: usize,
    pc_relative: usize,
    out_of_line: usize,
    /// Out-of-line or RIP-relative instructions whose plan steps to a marker.
    marker_plans: usize,
}

#[test]
fn random_instructions_behave_the_same_in_place_and_probed() {
    let cases: u32 = std::env::var("ARCH_X86_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let stats = RefCell::new(Stats::default());
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (any::<[u8; 15]>(), any::<u64>(), 0u8..3);
    runner
        .run(&strategy, |(raw, seed, mode)| {
            let mut bytes = raw.to_vec();
            // A third of the cases: make the operand RIP-relative.
            if mode == 0 {
                if let Some(b) = make_rip_relative(&bytes, seed) {
                    bytes = b;
                }
            }
            let insn = match X86_64.analyze(INSN_AT, &bytes) {
                Ok(insn) => insn,
                Err(ProbeError::UnsupportedInstruction { .. }) => {
                    stats.borrow_mut().refused += 1;
                    return Ok(());
                }
                Err(e) => panic!("unexpected error {e}"),
            };
            let len = insn.len as usize;
            if nondeterministic(&bytes[..len]) || reads_own_code(&insn) {
                stats.borrow_mut().skipped += 1;
                return Ok(());
            }
            match kind(&insn) {
                Kind::Emulated => stats.borrow_mut().emulated += 1,
                Kind::PcRelative => stats.borrow_mut().pc_relative += 1,
                Kind::OutOfLine => stats.borrow_mut().out_of_line += 1,
            }
            if kind(&insn) != Kind::Emulated
                && X86_64
                    .plan_xol(&insn, SLOT_NEAR)
                    .is_ok_and(|p| p.step_marker.is_some())
            {
                stats.borrow_mut().marker_plans += 1;
            }
            let mut rng = Rng(seed);
            let m = Machine::random(&mut rng, is_rep_string(&bytes[..len]));
            let native = run_in_place(&m, insn.bytes());
            for via in ways(&insn) {
                match judge(&native, &run_via(&m, &insn, via), &insn, via) {
                    Verdict::Same => stats.borrow_mut().same += 1,
                    Verdict::BothFault => stats.borrow_mut().both_fault += 1,
                    Verdict::Differs(d) => prop_assert!(false, "{}", d),
                }
            }
            Ok(())
        })
        .unwrap();
    let s = stats.into_inner();
    println!("random instructions: {s:?}");
    // The test must prove something: many identical completed runs, on
    // every path.
    assert!(
        s.same >= cases as usize / 4,
        "too few completed comparisons: {s:?}"
    );
    assert!(
        s.emulated > 0 && s.pc_relative > 0 && s.out_of_line > 0 && s.marker_plans > 0,
        "{s:?}"
    );
}

/// Whether a RIP-relative operand points at the probed instruction itself,
/// whose first byte the probe replaced by `int3` (any probe scheme shows the
/// program its patched bytes).
fn reads_own_code(insn: &Insn) -> bool {
    let ins = iced_x86::Decoder::with_ip(64, insn.bytes(), INSN_AT, 0).decode();
    ins.is_ip_rel_memory_operand()
        && (CODE..CODE + CODE_SIZE).contains(&ins.ip_rel_memory_address())
}

#[test]
fn under_the_trap_flag_a_rep_instruction_repeats_until_rcx_runs_out() {
    let bytes = [0xf3, 0xaa]; // rep stosb
    let insn = X86_64.analyze(INSN_AT, &bytes).unwrap();
    let mut m = corpus_machine(3, &bytes);
    m.regs[X86Reg::Rcx] = 5;
    m.regs.flags &= !(1 << 10); // DF clear: forward
    let native = run_in_place(&m, &bytes);
    let via = Via::StepTrapFlag(SLOT_NEAR);
    let probed = run_via(&m, &insn, via);
    assert_eq!(judge(&native, &probed, &insn, via), Verdict::Same);
    // One iteration per step: "not finished" after each of the first four
    // iterations. The emulator stops once more at the instruction with
    // rcx = 0 (hardware leaves it with the last iteration): 4 or 5.
    let repeats = REPEATS.with(|r| r.get());
    assert!((4..=5).contains(&repeats), "{repeats} repeats");
    let Outcome::Done(after) = probed else {
        unreachable!()
    };
    assert_eq!(after.regs[X86Reg::Rcx], 0);
    assert_eq!(after.regs[X86Reg::Rdi], m.regs[X86Reg::Rdi] + 5);
}

#[test]
fn a_marker_stepped_rep_instruction_runs_every_iteration_before_one_step_trap() {
    let bytes = [0xf3, 0xaa]; // rep stosb
    let insn = X86_64.analyze(INSN_AT, &bytes).unwrap();
    let plan = X86_64.plan_xol(&insn, SLOT_NEAR).unwrap();
    assert!(plan.step_marker.is_some(), "rep falls through: marker plan");
    assert_eq!(plan.fixups.restart, None, "nothing to restart at a marker");
    let mut m = corpus_machine(3, &bytes);
    m.regs[X86Reg::Rcx] = 5;
    m.regs.flags &= !(1 << 10);
    let native = run_in_place(&m, &bytes);
    let probed = run_via(&m, &insn, Via::Step(SLOT_NEAR));
    assert_eq!(
        judge(&native, &probed, &insn, Via::Step(SLOT_NEAR)),
        Verdict::Same
    );
    assert_eq!(REPEATS.with(|r| r.get()), 0, "no trap between iterations");
    let Outcome::Done(after) = probed else {
        unreachable!()
    };
    assert_eq!(after.regs[X86Reg::Rcx], 0);
    assert_eq!(after.regs[X86Reg::Rdi], m.regs[X86Reg::Rdi] + 5);
}

/// Corpus instructions that may continue elsewhere than the next
/// instruction: the only ones single-stepped with the trap flag.
const MAY_NOT_FALL_THROUGH: [&str; 7] = [
    "call [rip+d]",
    "jmp [rip+d]",
    "ret",
    "ret 16",
    "call rax",
    "call [rsp]",
    "jmp rax",
];

#[test]
fn instructions_that_fall_through_end_their_step_on_an_int3_marker_and_only_branches_use_the_trap_flag(
) {
    let mut markers = 0;
    for (name, bytes, kind_expected) in corpus() {
        if kind_expected == Kind::Emulated {
            continue;
        }
        let insn = X86_64.analyze(INSN_AT, &bytes).unwrap();
        for slot in [SLOT_NEAR, SLOT_FAR] {
            let plan = X86_64.plan_xol(&insn, slot).unwrap();
            let slot_bytes = plan.slot_bytes();
            assert!(slot_bytes.len() <= X86_64.xol_slot_size(), "{name}");
            if MAY_NOT_FALL_THROUGH.contains(&name) {
                assert_eq!(plan.step_marker, None, "{name}: trap flag");
                assert_eq!(plan.step_entry, slot, "{name}");
                continue;
            }
            markers += 1;
            let marker = plan
                .step_marker
                .unwrap_or_else(|| panic!("{name}: no marker"));
            let entry = (plan.step_entry - slot) as usize;
            let at = (marker - slot) as usize;
            assert_eq!(slot_bytes[at], 0xcc, "{name}: the marker is an int3");
            assert_eq!(at + 1, slot_bytes.len(), "{name}: the marker ends the slot");
            let fix = plan.fixups.ip.expect("ip fixup");
            assert_eq!((fix.from, fix.to), (marker, insn.next_addr()), "{name}");
            if plan.boostable {
                // The boosted copy comes first, with its jump back, and is
                // the same instruction as the stepped copy: the same bytes,
                // or for a RIP-relative operand the same instruction with
                // its displacement adjusted to each copy's address.
                let same = |at: u64, copy: &[u8]| {
                    let moved = iced_x86::Decoder::with_ip(64, copy, at, 0).decode();
                    let orig = iced_x86::Decoder::with_ip(64, &bytes, INSN_AT, 0).decode();
                    match orig.is_ip_rel_memory_operand() {
                        true => {
                            moved.code() == orig.code()
                                && moved.len() == orig.len()
                                && moved.ip_rel_memory_address() == orig.ip_rel_memory_address()
                        }
                        false => copy == &bytes[..],
                    }
                };
                assert!(same(slot, &slot_bytes[..bytes.len()]), "{name}");
                assert!(same(plan.step_entry, &slot_bytes[entry..at]), "{name}");
                assert!(entry > bytes.len(), "{name}: jump back between");
            } else {
                assert_eq!(entry, 0, "{name}: one copy only");
            }
        }
        // The trap-flag plan of the same instruction has no marker.
        let tf = X86_64.plan_xol_trap_flag(&insn, SLOT_NEAR).unwrap();
        assert_eq!((tf.step_marker, tf.step_entry), (None, SLOT_NEAR), "{name}");
    }
    assert!(markers > 0);
}

/// The kretprobe plan: hijack at the first instruction of
/// `f: mov eax, 42; ret`, run the function, and it returns into the
/// trampoline with the return value in place and the stack pointer the
/// backend predicted; the original return address is what was on the stack.
#[test]
fn a_hijacked_return_lands_on_the_trampoline_with_the_return_value() {
    use rcu_registry::probes::arch::Regs;
    let func = [0xb8, 42, 0, 0, 0, 0xc3]; // mov eax, 42; ret
    let trampoline = CODE + 0x700;
    let caller_ret = CODE + 0x200;
    let mut m = Machine::random(&mut Rng(9), false);
    let sp = (m.regs[X86Reg::Rsp] - STACK) as usize;
    m.stack[sp..sp + 8].copy_from_slice(&caller_ret.to_le_bytes());
    let entry: Regs = m.regs;

    let (after, original) = run_hijacked(&m, &func, trampoline);
    assert_eq!(
        original, caller_ret,
        "hijack must hand back the real return address"
    );
    assert_eq!(after.regs.ip, trampoline);
    assert_eq!(X86_64.return_value(&after.regs), 42);
    assert_eq!(after.regs.sp, X86_64.stack_pointer_at_return(&entry));
}
