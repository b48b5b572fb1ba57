//! The x86_64 backend, on the `iced-x86` decoder and encoder.
//!
//! # Classification
//!
//! Every instruction falls in one of four groups:
//!
//! - **Emulated**: `jmp rel8/rel32`, `jcc rel8/rel32`, `call rel32`,
//!   `push r64`, every `nop` form and `endbr64`/`endbr32`. They are the
//!   common function-entry instructions and the ones whose effect depends on
//!   their own address; emulating them costs no XOL slot and no second trap.
//! - **RIP-relative** (`mov rax, [rip+x]`, `lea`, `movdqa xmm0, [rip+x]`,
//!   `call [rip+x]`, `jmp [rip+x]`...): the slot holds the instruction
//!   re-encoded as `[scratch + disp]`, where `scratch` is one of
//!   `rax, rcx, rdx, rbx, rsi, rdi, rbp` that the instruction does not use
//!   (explicitly or implicitly, per iced's register usage). Before the step
//!   the scratch register is loaded with the original next IP and after it
//!   restored, so the operand hits the same absolute address as in place.
//!   These need the single-step (the scratch must be restored).
//! - **Out of line**: everything else that is allowed runs unchanged from the
//!   slot. Fixups: the IP falls through from the slot back to the original
//!   code; an indirect call (`call rax`, `call [rbx]`) pushed the slot's
//!   return address, which is replaced by the original one; a `rep` string
//!   instruction is resumed until it completes (under the trap flag it traps
//!   after each iteration: [`StepOutcome::Repeat`](crate::probes::arch::StepOutcome)).
//! - **Refused**, with an [`Unsupported`](crate::probes::error::Unsupported)
//!   reason: `int3`/`int1`/`into`/`int 3` (our own trap), `int n`, `syscall`,
//!   `sysenter` (the kernel would see the slot as the user IP), privileged
//!   and IOPL instructions (`hlt`, `cli`, `in`, `mov cr`, `lgdt`...),
//!   hypercalls, `ud0/1/2`, far transfers and `iret`/`retf`, `pushf`/`popf`
//!   (they would expose or lose the trap flag of the single-step),
//!   `mov ss`/`pop ss` (they delay the step trap by one instruction), `xbegin`
//!   (relative abort target, and the trap aborts the transaction anyway),
//!   `loop`/`jrcxz` (relative forms compilers do not emit; refused rather
//!   than relocated), 0x66-prefixed branches (AMD and Intel disagree on
//!   their meaning), EIP-relative operands and SGX enclave entries.
//!
//! `lock`-prefixed instructions are allowed: the read-modify-write is one
//! instruction, and running it from another address keeps its atomicity.
//! `xend`/`xabort` are allowed (they behave the same at any address).
//!
//! # Slot layout and boosting
//!
//! A slot is 64 bytes. A plan is boostable (one trap, no post-step fixup)
//! unless it needs the scratch register (a RIP-relative operand out of the
//! slot's ±2 GiB reach; within reach the copy's displacement is adjusted
//! instead) or the return-address fixup; a
//! boostable plan's slot starts with `[instruction] [jump back to orig +
//! len]`, where a boosted run starts. The jump back is `jmp rel32` when the
//! slot is within +/-2 GiB of the original code, else the absolute
//! `jmp [rip+0]; dq target`: a slot may therefore be anywhere, but the
//! runtime places slots near the code for the shorter, better-predicted form.
//!
//! # Single-step: a step marker where the instruction falls through
//!
//! An instruction that always falls through to the next one (everything but
//! returns, indirect jumps and calls, `xend`/`xabort`) is single-stepped
//! from a second copy in the slot followed by an `int3` *step marker*
//! ([`XolPlan::step_marker`](crate::probes::arch::XolPlan::step_marker)):
//! `[instruction] [jump back] [instruction] [int3]` when boostable,
//! `[rewritten instruction] [int3]` otherwise. The step trap is then an
//! `int3`, which costs what the probe's own breakpoint costs, and the trap
//! handler knows it by its address. The others may continue elsewhere and
//! never reach a marker: for them `prepare_step` sets TF in `rflags`, the
//! debug trap comes after the one instruction wherever it went, and
//! `finish_step` restores TF to its value before the step, so a program
//! traced by a debugger keeps its own TF. (Under a hypervisor the trap
//! flag's debug exception can cost an order of magnitude more than `int3`:
//! that is why the marker is preferred wherever it works.) `xol.rs` has the
//! layouts and the rule in full.

mod classify;
mod emulate;
pub mod jump;
mod regs;
mod xol;

pub use regs::X86Reg;

use crate::probes::arch::{Arch, DataMemory, Insn, Regs, StepOutcome, StepState, XolPlan, XolRun};
use crate::probes::error::ProbeError;

/// The x86_64 backend. Stateless; every method is a pure function of its
/// arguments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct X86_64;

impl X86_64 {
    /// `int3`.
    pub const BREAKPOINT: [u8; 1] = [0xcc];
    /// Instruction alignment: none.
    pub const INSN_ALIGN: u64 = 1;
    /// Architectural maximum instruction length.
    pub const MAX_INSN_LEN: usize = classify::MAX_INSN_LEN;
    /// XOL slot size in bytes.
    pub const XOL_SLOT_SIZE: usize = xol::SLOT_SIZE;

    /// The plan [`Arch::plan_xol`] would make, but with every single-step
    /// ended by the trap flag, none by a step marker: `[instruction] [jump
    /// back]`, stepped from the slot's start. [`Arch::plan_xol`] keeps the
    /// trap flag for the instructions that may not fall through; this makes
    /// the other path available for any instruction, so the two ways of
    /// stepping can be compared on the same one (differential tests,
    /// measurements).
    ///
    /// # Errors
    /// As [`Arch::plan_xol`].
    pub fn plan_xol_trap_flag(&self, insn: &Insn, slot_addr: u64) -> Result<XolPlan, ProbeError> {
        xol::plan(insn, slot_addr, xol::StepEnd::TrapFlag)
    }
}

impl Arch for X86_64 {
    fn name(&self) -> &'static str {
        "x86_64"
    }

    fn breakpoint(&self) -> &'static [u8] {
        &Self::BREAKPOINT
    }

    fn insn_align(&self) -> u64 {
        Self::INSN_ALIGN
    }

    fn max_insn_len(&self) -> usize {
        Self::MAX_INSN_LEN
    }

    fn xol_slot_size(&self) -> usize {
        Self::XOL_SLOT_SIZE
    }

    fn trap_address(&self, regs: &Regs) -> u64 {
        // int3 is a trap: the reported IP is the byte after it.
        regs.ip.wrapping_sub(1)
    }

    fn analyze(&self, addr: u64, bytes: &[u8]) -> Result<Insn, ProbeError> {
        classify::analyze(addr, bytes)
    }

    fn check_boundary(
        &self,
        func_start: u64,
        func_text: &[u8],
        addr: u64,
    ) -> Result<(), ProbeError> {
        classify::check_boundary(func_start, func_text, addr)
    }

    fn plan_xol(&self, insn: &Insn, slot_addr: u64) -> Result<XolPlan, ProbeError> {
        xol::plan(insn, slot_addr, xol::StepEnd::MarkerWherePossible)
    }

    fn prepare_step(
        &self,
        plan: &XolPlan,
        run: XolRun,
        regs: &mut Regs,
    ) -> Result<StepState, ProbeError> {
        xol::prepare_step(plan, run, regs)
    }

    fn finish_step(
        &self,
        plan: &XolPlan,
        state: &StepState,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> Result<StepOutcome, ProbeError> {
        xol::finish_step(plan, state, regs, mem)
    }

    fn abort_step(&self, plan: &XolPlan, state: &StepState, regs: &mut Regs) {
        xol::abort_step(plan, state, regs)
    }

    fn emulate(
        &self,
        insn: &Insn,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> Result<(), ProbeError> {
        emulate::emulate(insn, regs, mem)
    }

    #[inline]
    fn hijack_return(
        &self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        trampoline: u64,
    ) -> Result<u64, ProbeError> {
        emulate::hijack_return(regs, mem, trampoline)
    }

    fn return_value(&self, regs: &Regs) -> u64 {
        regs[X86Reg::Rax]
    }

    fn stack_pointer_at_return(&self, entry: &Regs) -> u64 {
        // `ret` pops the return address that [rsp] held at entry.
        entry.sp.wrapping_add(8)
    }

    fn arg_registers(&self) -> &'static [u8] {
        // System V AMD64: rdi, rsi, rdx, rcx, r8, r9.
        &[7, 6, 2, 1, 8, 9]
    }

    fn return_register(&self) -> u8 {
        X86Reg::Rax.number()
    }

    fn stack_args_offset(&self) -> u64 {
        // [rsp] is the return address `call` pushed.
        8
    }
}
