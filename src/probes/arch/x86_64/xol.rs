//! XOL plans for x86_64: slot layout, RIP-relative rewriting, step fixups.
//!
//! Invariant (the marker rule): a single-step ends on an `int3` marker after
//! the copy exactly when the instruction always falls through (iced's flow
//! control `Next`); every other instruction keeps the trap flag.
//! [`X86_64::plan_xol_trap_flag`](super::X86_64::plan_xol_trap_flag) builds
//! the trap-flag plan for any instruction, so the differential tests keep that
//! path proven too.
//!
//! Slot layouts, the marker rule and `rep` strings, in full:
//! [`crate::docs::algorithms::instructions`].

use iced_x86::{Encoder, FlowControl, InstructionInfoFactory, Register};

use super::classify::{decode_one, MAX_INSN_LEN};
use super::regs::{X86Reg, TF};
use crate::probes::arch::{
    DataMemory, Fixups, Insn, InsnClass, IpFixup, Regs, ReturnAddressFixup, ScratchFixup,
    StepOutcome, StepState, XolPlan, XolRun, MAX_XOL_SLOT,
};
use crate::probes::error::{ProbeError, Unsupported};

/// Bytes of a slot: a boosted copy of the longest instruction (15) with the
/// longest jump back (the 14-byte absolute form), then a stepped copy (15)
/// and its one-byte marker, is 45; rounded to 64 so slots stay aligned, one
/// per cache line.
pub(crate) const SLOT_SIZE: usize = 64;
const _: () =
    assert!(SLOT_SIZE <= MAX_XOL_SLOT && 2 * MAX_INSN_LEN + ABS_JMP_LEN + MARKER_LEN <= SLOT_SIZE);

/// `jmp rel32`: `e9 rel32`.
const REL_JMP_LEN: usize = 5;
/// `jmp qword [rip+0]; dq target`: `ff 25 00 00 00 00` + 8 bytes.
const ABS_JMP_LEN: usize = 14;
/// The step marker: `int3`.
const MARKER: u8 = 0xcc;
const MARKER_LEN: usize = 1;

/// Scratch candidates for a rewritten RIP-relative operand, in order of
/// preference. Only the eight legacy registers: none of them needs a REX.B
/// bit the original encoding might lack, so the rewritten instruction is
/// never longer than the original. `rsp` is left out: as a base it needs a
/// SIB byte, and the stack pointer is never free anyway.
const SCRATCH_CANDIDATES: [X86Reg; 7] = [
    X86Reg::Rax,
    X86Reg::Rcx,
    X86Reg::Rdx,
    X86Reg::Rbx,
    X86Reg::Rsi,
    X86Reg::Rdi,
    X86Reg::Rbp,
];

/// How a plan's single-step ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StepEnd {
    /// On a step marker where the instruction always falls through (the
    /// module docs' rule), else by the trap flag.
    MarkerWherePossible,
    /// Always by the trap flag.
    TrapFlag,
}

/// [`Arch::plan_xol`](crate::probes::arch::Arch::plan_xol) for x86_64, and
/// with [`StepEnd::TrapFlag`] the trap-flag plan of
/// [`X86_64::plan_xol_trap_flag`](super::X86_64::plan_xol_trap_flag).
pub(super) fn plan(insn: &Insn, slot_addr: u64, end: StepEnd) -> Result<XolPlan, ProbeError> {
    let ins = decode_one(insn.addr, insn.bytes())?;
    if ins.len() != insn.bytes().len() {
        return Err(ProbeError::PlanMismatch {
            what: "the instruction bytes do not decode to one x86_64 instruction",
        });
    }
    let orig_next = insn.next_addr();
    let mut fixups = Fixups::default();
    let indirect_call = ins.flow_control() == FlowControl::IndirectCall;
    let marker = end == StepEnd::MarkerWherePossible && ins.flow_control() == FlowControl::Next;
    let len = insn.bytes().len() as u64;
    // Where the copies go: the boosted (or trap-flag) copy at the slot's
    // start, the stepped copy after it and its jump back when there is a
    // marker. A jump back is at most ABS_JMP_LEN; its exact length depends
    // only on the distance, known here.
    let jump_len = |from: u64| match i32::try_from(
        orig_next.wrapping_sub(from.wrapping_add(REL_JMP_LEN as u64)) as i64,
    ) {
        Ok(_) => REL_JMP_LEN as u64,
        Err(_) => ABS_JMP_LEN as u64,
    };
    let first_copy = slot_addr;
    let marker_copy = slot_addr + len + jump_len(slot_addr + len);
    let mut rewritten = None;
    let mut retargeted = None;
    match insn.class {
        InsnClass::OutOfLine => {}
        InsnClass::PcRelative => {
            // Within +/-2 GiB of the operand the copy keeps `[rip + disp]`
            // with the displacement adjusted to its own address: no scratch
            // register, so the plan stays boostable (one trap a hit, as the
            // kernel's kprobes relocate their displaced instructions).
            let both = retarget_rip_relative(insn, &ins, first_copy).zip(if marker {
                retarget_rip_relative(insn, &ins, marker_copy)
            } else {
                Some([0; MAX_INSN_LEN])
            });
            match both {
                Some(copies) => retargeted = Some(copies),
                None => {
                    let scratch = pick_scratch(&ins).ok_or(ProbeError::UnsupportedInstruction {
                        addr: insn.addr,
                        reason: Unsupported::NoScratchRegister,
                    })?;
                    fixups.scratch = Some(ScratchFixup {
                        reg: scratch.number(),
                        value: orig_next,
                    });
                    // The rewritten operand is `[scratch + disp]`: the same
                    // bytes at any address, so the copy may sit anywhere in
                    // the slot.
                    rewritten = Some(rewrite_rip_relative(insn, &ins, scratch, slot_addr)?);
                }
            }
        }
        InsnClass::Emulated(_) => {
            return Err(ProbeError::PlanMismatch {
                what: "an emulated instruction needs no XOL slot",
            })
        }
    };
    let n = insn.bytes().len();
    let (copy, marker_bytes): (&[u8], &[u8]) = match (&retargeted, &rewritten) {
        (Some((a, b)), _) => (&a[..n], &b[..n]),
        (None, Some(r)) => (r.as_slice(), r.as_slice()),
        (None, None) => (insn.bytes(), insn.bytes()),
    };
    // A boosted run never reaches finish_step, so only the IP fixup (done
    // by the jump back) may be needed.
    let boostable = fixups.scratch.is_none() && !indirect_call;
    let copy_len = copy.len() as u64;

    // On the stack: a registration of thousands of probes plans thousands
    // of slots (no allocation each).
    let mut slot = SlotBytes::default();
    if boostable || !marker {
        // The boosted copy at the slot's start (also the trap-flag step's:
        // under the trap flag the jump back is never reached).
        slot.extend_from_slice(copy);
        append_jump_back(&mut slot, slot_addr.wrapping_add(copy_len), orig_next);
    }
    let step_entry = if marker {
        let entry = slot_addr.wrapping_add(slot.len() as u64);
        // A retargeted copy was made for exactly this address; the other
        // forms are the same bytes anywhere.
        debug_assert!(retargeted.is_none() || entry == marker_copy);
        slot.extend_from_slice(marker_bytes);
        slot.extend_from_slice(&[MARKER]);
        entry
    } else {
        slot_addr
    };
    let step_next = step_entry.wrapping_add(copy_len);
    fixups.ip = Some(IpFixup {
        from: step_next,
        to: orig_next,
    });
    if indirect_call {
        fixups.return_address = Some(ReturnAddressFixup {
            slot_return: step_next,
            orig_return: orig_next,
        });
    }
    if !marker
        && ins.is_string_instruction()
        && (ins.has_rep_prefix() || ins.has_repe_prefix() || ins.has_repne_prefix())
    {
        fixups.restart = Some(step_entry);
    }
    debug_assert!(slot.len() <= SLOT_SIZE);
    Ok(XolPlan::new(
        insn.addr,
        slot_addr,
        &slot,
        boostable,
        marker.then_some(step_next),
        fixups,
    )
    .with_step_entry(step_entry))
}

/// Refuses at analysis time a RIP-relative instruction that `plan` could not
/// rewrite, so that a probe accepted by `analyze` always gets a plan. The
/// rewrite does not depend on the slot address (the operand's base becomes a
/// register), so any address serves for the trial.
pub(super) fn check_rewritable(insn: &Insn, ins: &iced_x86::Instruction) -> Result<(), ProbeError> {
    let scratch = pick_scratch(ins).ok_or(ProbeError::UnsupportedInstruction {
        addr: insn.addr,
        reason: Unsupported::NoScratchRegister,
    })?;
    rewrite_rip_relative(insn, ins, scratch, insn.addr).map(|_| ())
}

/// The instruction's bytes with its RIP-relative displacement adjusted so
/// that, run at `at`, the operand addresses what it addressed in place;
/// `None` if the distance does not fit the 32-bit displacement. Only the
/// displacement field changes: same length, same encoding.
fn retarget_rip_relative(
    insn: &Insn,
    ins: &iced_x86::Instruction,
    at: u64,
) -> Option<[u8; MAX_INSN_LEN]> {
    let bytes = insn.bytes();
    // The offsets are the decoder's for the instruction it decoded last.
    let mut decoder =
        iced_x86::Decoder::with_ip(64, bytes, insn.addr, iced_x86::DecoderOptions::NONE);
    let again = decoder.decode();
    let offsets = decoder.get_constant_offsets(&again);
    if again.code() != ins.code()
        || !offsets.has_displacement()
        || offsets.displacement_size() != 4
        || offsets.displacement_offset() + 4 > bytes.len()
    {
        return None;
    }
    let target = ins.ip_rel_memory_address();
    let disp =
        i32::try_from(target.wrapping_sub(at.wrapping_add(bytes.len() as u64)) as i64).ok()?;
    let mut out = [0u8; MAX_INSN_LEN];
    out[..bytes.len()].copy_from_slice(bytes);
    let d = offsets.displacement_offset();
    out[d..d + 4].copy_from_slice(&disp.to_le_bytes());
    // Self-check: the same operation, on the same address, from `at`.
    let check = decode_one(at, &out[..bytes.len()]).ok()?;
    (check.len() == bytes.len()
        && check.code() == ins.code()
        && check.is_ip_rel_memory_operand()
        && check.ip_rel_memory_address() == target)
        .then_some(out)
}

/// Appends a jump from `from` (the slot byte after the instruction) to
/// `target`. `jmp rel32` when the distance fits in 32 bits (shorter, and
/// predicted like any direct jump); otherwise the absolute
/// `jmp [rip+0]; dq target`, which reaches anywhere without a register, so a
/// slot may be placed at any distance from the code.
/// A slot's bytes as they are planned (at most [`SLOT_SIZE`]; the sizes
/// are checked at compile time above).
struct SlotBytes {
    bytes: [u8; SLOT_SIZE],
    len: usize,
}

impl Default for SlotBytes {
    fn default() -> Self {
        SlotBytes {
            bytes: [0; SLOT_SIZE],
            len: 0,
        }
    }
}

impl SlotBytes {
    fn extend_from_slice(&mut self, b: &[u8]) {
        self.bytes[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl std::ops::Deref for SlotBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn append_jump_back(slot: &mut SlotBytes, from: u64, target: u64) {
    let rel = target.wrapping_sub(from.wrapping_add(REL_JMP_LEN as u64)) as i64;
    if let Ok(rel) = i32::try_from(rel) {
        slot.extend_from_slice(&[0xe9]);
        slot.extend_from_slice(&rel.to_le_bytes());
    } else {
        slot.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
        slot.extend_from_slice(&target.to_le_bytes());
    }
}

/// A register the instruction neither reads nor writes, explicitly or
/// implicitly.
fn pick_scratch(ins: &iced_x86::Instruction) -> Option<X86Reg> {
    let mut factory = InstructionInfoFactory::new();
    let info = factory.info(ins);
    let used: Vec<Register> = info
        .used_registers()
        .iter()
        .map(|u| u.register().full_register())
        .collect();
    // xsave-like instructions do not list every register they touch; they
    // use edx:eax (and ecx for xsetbv-like forms) implicitly.
    let save_restore = ins.is_save_restore_instruction();
    let implicit = |r: X86Reg| save_restore && matches!(r, X86Reg::Rax | X86Reg::Rcx | X86Reg::Rdx);
    SCRATCH_CANDIDATES
        .into_iter()
        .find(|&r| !implicit(r) && !used.contains(&iced_register(r)))
}

fn iced_register(r: X86Reg) -> Register {
    match r {
        X86Reg::Rax => Register::RAX,
        X86Reg::Rcx => Register::RCX,
        X86Reg::Rdx => Register::RDX,
        X86Reg::Rbx => Register::RBX,
        X86Reg::Rsp => Register::RSP,
        X86Reg::Rbp => Register::RBP,
        X86Reg::Rsi => Register::RSI,
        X86Reg::Rdi => Register::RDI,
        X86Reg::R8 => Register::R8,
        X86Reg::R9 => Register::R9,
        X86Reg::R10 => Register::R10,
        X86Reg::R11 => Register::R11,
        X86Reg::R12 => Register::R12,
        X86Reg::R13 => Register::R13,
        X86Reg::R14 => Register::R14,
        X86Reg::R15 => Register::R15,
    }
}

/// Re-encodes `[rip + disp]` as `[scratch + disp]`. With `scratch` holding
/// the original next IP (the pre-step fixup), the operand addresses exactly
/// the bytes it addressed in place, whatever the slot's distance.
fn rewrite_rip_relative(
    insn: &Insn,
    ins: &iced_x86::Instruction,
    scratch: X86Reg,
    slot_addr: u64,
) -> Result<Vec<u8>, ProbeError> {
    let unsupported = |what: &'static str| ProbeError::UnsupportedInstruction {
        addr: insn.addr,
        reason: Unsupported::Other(what),
    };
    // iced stores the absolute target of a RIP-relative operand; the
    // displacement relative to the next IP is what the encoding held.
    let disp = ins.ip_rel_memory_address().wrapping_sub(ins.next_ip());
    let mut rewritten = *ins;
    rewritten.set_memory_base(iced_register(scratch));
    rewritten.set_memory_displacement64(disp);
    // iced's size 8 means "64-bit addressing": a sign-extended disp32 (or
    // disp8 when it fits), never a 64-bit displacement.
    rewritten.set_memory_displ_size(8);
    let mut encoder = Encoder::new(64);
    encoder
        .encode(&rewritten, slot_addr)
        .map_err(|_| unsupported("its RIP-relative form cannot be re-encoded"))?;
    let bytes = encoder.take_buffer();
    // Self-check: the new bytes must be the same operation on the new base.
    let check = decode_one(slot_addr, &bytes)
        .map_err(|_| unsupported("its re-encoded form does not decode"))?;
    if check.len() != bytes.len()
        || check.code() != ins.code()
        || check.memory_base() != iced_register(scratch)
        || check.memory_displacement64() != disp
    {
        return Err(unsupported("its re-encoded form changed meaning"));
    }
    Ok(bytes)
}

/// [`Arch::prepare_step`](crate::probes::arch::Arch::prepare_step).
pub(super) fn prepare_step(
    plan: &XolPlan,
    run: XolRun,
    regs: &mut Regs,
) -> Result<StepState, ProbeError> {
    let mut state = StepState {
        run,
        saved_scratch: 0,
        sp_before: regs.sp,
        flags_before: regs.flags,
    };
    match run {
        XolRun::Boosted => {
            if !plan.boostable {
                return Err(ProbeError::PlanMismatch {
                    what: "a boosted run of a plan that needs post-step fixups",
                });
            }
            regs.ip = plan.slot_addr;
        }
        XolRun::SingleStep => {
            if let Some(s) = plan.fixups.scratch {
                let reg = usize::from(s.reg);
                state.saved_scratch = regs.gprs[reg];
                regs.gprs[reg] = s.value;
            }
            // A marker plan needs nothing armed: the marker is in the slot.
            if plan.step_marker.is_none() {
                regs.flags |= TF;
            }
            regs.ip = plan.step_entry;
        }
    }
    Ok(state)
}

/// [`Arch::finish_step`](crate::probes::arch::Arch::finish_step).
pub(super) fn finish_step(
    plan: &XolPlan,
    state: &StepState,
    regs: &mut Regs,
    mem: &mut dyn DataMemory,
) -> Result<StepOutcome, ProbeError> {
    if state.run != XolRun::SingleStep {
        return Err(ProbeError::PlanMismatch {
            what: "finish_step after a boosted run",
        });
    }
    // The IP after the instruction: for a marker plan, the marker (`int3`
    // reports the byte after itself); under the trap flag, as reported.
    let ip = match plan.step_marker {
        Some(marker) => {
            if regs.ip != marker.wrapping_add(MARKER_LEN as u64) {
                return Err(ProbeError::PlanMismatch {
                    what: "x86_64 step trap away from the plan's step marker",
                });
            }
            marker
        }
        None => {
            if plan.fixups.restart == Some(regs.ip) {
                return Ok(StepOutcome::Repeat);
            }
            regs.ip
        }
    };
    // The only fallible fixup goes first, so an error leaves regs untouched.
    if let Some(fix) = plan.fixups.return_address {
        let pushed_at = state.sp_before.wrapping_sub(8);
        if regs.sp == pushed_at && mem.read_u64(pushed_at)? == fix.slot_return {
            mem.write_u64(pushed_at, fix.orig_return)?;
        }
    }
    if let Some(s) = plan.fixups.scratch {
        regs.gprs[usize::from(s.reg)] = state.saved_scratch;
    }
    regs.ip = match plan.fixups.ip {
        Some(fix) if ip == fix.from => fix.to,
        _ => ip,
    };
    if plan.step_marker.is_none() {
        // Give TF back its value before the step (a debugger's, or clear).
        regs.flags = (regs.flags & !TF) | (state.flags_before & TF);
    }
    Ok(StepOutcome::Done)
}

/// [`Arch::abort_step`](crate::probes::arch::Arch::abort_step): scratch
/// register and IP as the default does, and the trap flag back to its value
/// before a trap-flag step was armed (left set, the application's handler
/// would resume into a stray `TRAP_TRACE`).
pub(super) fn abort_step(plan: &XolPlan, state: &StepState, regs: &mut Regs) {
    if state.run == XolRun::SingleStep {
        if let Some(s) = plan.fixups.scratch {
            regs.gprs[usize::from(s.reg)] = state.saved_scratch;
        }
        if plan.step_marker.is_none() {
            regs.flags = (regs.flags & !TF) | (state.flags_before & TF);
        }
    }
    regs.ip = plan.insn_addr;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::arch::{Arch, X86_64};

    const AT: u64 = 0x40_1000;
    const SLOT: u64 = 0x40_8000;

    #[test]
    fn an_aborted_trap_flag_step_puts_back_the_ip_and_the_trap_flag() {
        // mov rax, [rdi]
        let insn = X86_64.analyze(AT, &[0x48, 0x8b, 0x07]).unwrap();
        let plan = X86_64.plan_xol_trap_flag(&insn, SLOT).unwrap();
        for tf_before in [0, TF] {
            let mut regs = Regs {
                ip: AT + 1,
                flags: 0x202 | tf_before,
                ..Regs::default()
            };
            let state = prepare_step(&plan, XolRun::SingleStep, &mut regs).unwrap();
            assert_eq!((regs.ip, regs.flags & TF), (plan.step_entry, TF));
            // The copy faults: the frame's IP is the step entry.
            X86_64.abort_step(&plan, &state, &mut regs);
            assert_eq!(regs.ip, AT);
            assert_eq!(regs.flags, 0x202 | tf_before);
        }
    }

    #[test]
    fn an_aborted_rip_relative_step_gives_back_the_scratch_register() {
        // mov rcx, [rip + 0x100]
        let insn = X86_64
            .analyze(AT, &[0x48, 0x8b, 0x0d, 0x00, 0x01, 0x00, 0x00])
            .unwrap();
        // From a slot out of the operand's reach (within reach the copy is
        // retargeted and needs no scratch).
        let plan = X86_64.plan_xol(&insn, AT + (1 << 40)).unwrap();
        let scratch = plan
            .fixups
            .scratch
            .expect("an out-of-reach RIP-relative plan has a scratch");
        let reg = usize::from(scratch.reg);
        let mut regs = Regs {
            ip: AT + 1,
            flags: 0x202,
            ..Regs::default()
        };
        regs.gprs[reg] = 0xfeed;
        let state = prepare_step(&plan, XolRun::SingleStep, &mut regs).unwrap();
        assert_eq!(regs.gprs[reg], scratch.value);
        X86_64.abort_step(&plan, &state, &mut regs);
        assert_eq!((regs.ip, regs.gprs[reg], regs.flags), (AT, 0xfeed, 0x202));
    }
}
