//! Architecture backends: decode, classify, plan out-of-line execution,
//! emulate, and hijack returns.
//!
//! A probe replaces the first bytes of an instruction with a breakpoint. When
//! the breakpoint traps, the displaced instruction must still take effect,
//! exactly as if it had run in place. The [`Arch`] trait is everything the
//! registries and the trap runtime need to know about one instruction set to
//! make that happen; they never decode a byte themselves.
//!
//! # Analysis
//!
//! [`Arch::check_boundary`] decodes linearly from the start of the enclosing
//! function up to the probe address and refuses an address that falls inside
//! an instruction (or, on arm64, inside an exclusive sequence).
//! [`Arch::analyze`] decodes the one instruction at the address and returns an
//! [`Insn`]: its length and its [`InsnClass`]:
//!
//! - [`InsnClass::OutOfLine`]: runs unchanged from an XOL ("execute out of
//!   line") slot;
//! - [`InsnClass::PcRelative`]: reads the program counter (x86 RIP-relative
//!   operand), so the slot holds a rewritten copy and fixups run around it;
//! - [`InsnClass::Emulated`]: never executed; the backend applies its effect
//!   to the registers and memory ([`Arch::emulate`]), e.g. relative branches,
//!   calls, `push reg`, `nop`.
//!
//! Anything else is refused with [`ProbeError::UnsupportedInstruction`] and an
//! [`Unsupported`](crate::probes::error::Unsupported) reason.
//!
//! # Out-of-line execution
//!
//! [`Arch::plan_xol`] turns an instruction and a slot address into an
//! [`XolPlan`]: the slot bytes plus the [`Fixups`] that make the run from the
//! slot equivalent to the run in place. A plan is run in one of two ways
//! ([`XolRun`]):
//!
//! - **Boosted** (only when [`XolPlan::boostable`]): the slot ends with a jump
//!   back to the instruction after the original, so one trap suffices and no
//!   fixup runs afterwards.
//! - **Single-step**: [`Arch::prepare_step`] points the IP at the slot's step
//!   entry ([`XolPlan::step_entry`]), applies the pre-step fixups (e.g. loads
//!   the scratch register of a rewritten RIP-relative operand) and arms the
//!   step. At the step trap, [`Arch::finish_step`] undoes the slot's traces:
//!   IP back into the original code, scratch register restored, return
//!   address pushed by an indirect call corrected, step flag cleared.
//!
//! # Two ways to end a single-step
//!
//! - **Step marker** ([`XolPlan::step_marker`] is `Some`): the slot holds the
//!   instruction followed by a breakpoint, the *marker*. An instruction that
//!   falls through to the next one runs into it, so the step trap is a
//!   breakpoint trap at a known address: the trap handler recognises it as
//!   "step complete" by that address alone. arm64 steps every slot this way
//!   (a signal handler cannot arm its hardware single-step); x86_64 steps
//!   every instruction that always falls through this way (its `int3` costs
//!   the same as the probe's own trap, where the trap flag's debug exception
//!   can cost an order of magnitude more under a hypervisor).
//! - **Hardware single-step** (`step_marker` is `None`, x86_64 only): the
//!   trap flag is set, the CPU traps after one instruction wherever it went.
//!   Needed for an instruction that may not fall through (an indirect jump or
//!   call, a return): a marker after it would never be reached.
//!
//! # Return hijack
//!
//! At a function's first instruction the return address is in a known place
//! (x86: `[rsp]`, arm64: `x30`). [`Arch::hijack_return`] swaps it for a
//! trampoline address and hands back the original; [`Arch::return_value`]
//! reads the return value once the trampoline is reached.
//!
//! # Register view
//!
//! [`Regs`] is one arch-neutral register file: `ip`, `sp`, `flags` and 31
//! general registers. Each backend adds typed accessors by indexing with its
//! own register enum (e.g. `regs[X86Reg::Rax]`); the stack pointer always
//! lives in [`Regs::sp`], whichever index the hardware gives it.
//!
//! # Signal safety
//!
//! `analyze`, `check_boundary` and `plan_xol` run at registration time and may
//! allocate. `prepare_step`, `finish_step`, `emulate`, `hijack_return`,
//! `return_value` and `trap_address` run in trap context: implementations
//! must not allocate, lock or block.

pub mod arm64;
pub mod x86_64;

use crate::probes::error::ProbeError;

pub use arm64::{Arm64, Arm64Reg};
pub use x86_64::{X86Reg, X86_64};

/// Longest instruction any backend decodes (x86: 15 bytes), rounded up.
pub const MAX_INSN_BYTES: usize = 16;

/// Largest XOL slot any backend plans. x86_64: a boosted copy of a 15-byte
/// instruction with a 14-byte absolute jump back (`jmp [rip+0]; dq target`),
/// then a stepped copy with its 1-byte step marker, is 45 bytes; 64 keeps
/// slots naturally aligned, one per cache line.
pub const MAX_XOL_SLOT: usize = 64;

/// An instruction set backend. See the [module docs](self) for the protocol.
///
/// The trait is object safe (every constant is a method) so that callers may
/// pick the backend at run time; the registries take it as a type parameter.
pub trait Arch: Send + Sync + 'static {
    /// Short name, e.g. `"x86_64"`.
    fn name(&self) -> &'static str;

    /// The breakpoint instruction written over a probed instruction
    /// (x86: `int3` = `[0xcc]`; arm64: a `brk` with the probe immediate).
    fn breakpoint(&self) -> &'static [u8];

    /// Required alignment of instruction addresses in bytes (x86: 1, arm64: 4).
    fn insn_align(&self) -> u64;

    /// Longest instruction in bytes (x86: 15, arm64: 4). `analyze` needs at
    /// most this many bytes.
    fn max_insn_len(&self) -> usize;

    /// Size in bytes of one XOL slot, at most [`MAX_XOL_SLOT`].
    fn xol_slot_size(&self) -> usize;

    /// The address of the breakpoint that trapped, given the registers at the
    /// trap (x86: `ip - 1`, as `int3` reports the following byte; arm64: `ip`).
    fn trap_address(&self, regs: &Regs) -> u64;

    /// Decodes and classifies the instruction at `addr`. `bytes` starts at
    /// `addr` and may be longer than the instruction (give
    /// [`max_insn_len`](Arch::max_insn_len) bytes where the text allows).
    ///
    /// # Errors
    /// [`ProbeError::UnsupportedInstruction`] with the reason, or
    /// [`ProbeError::Misaligned`].
    fn analyze(&self, addr: u64, bytes: &[u8]) -> Result<Insn, ProbeError>;

    /// Checks that `addr` is the start of an instruction reached by decoding
    /// linearly from `func_start`, where `func_text` holds the function's
    /// bytes (from `func_start`, at least up to and including the instruction
    /// at `addr`). Backends may refuse further sites here (arm64: inside an
    /// exclusive sequence).
    ///
    /// # Errors
    /// [`ProbeError::NotOnInstructionBoundary`], [`ProbeError::Misaligned`],
    /// or [`ProbeError::UnsupportedInstruction`] for undecodable bytes on the
    /// way.
    fn check_boundary(
        &self,
        func_start: u64,
        func_text: &[u8],
        addr: u64,
    ) -> Result<(), ProbeError>;

    /// Plans running `insn` from the XOL slot at `slot_addr` (the slot is
    /// [`xol_slot_size`](Arch::xol_slot_size) bytes; the caller writes
    /// [`XolPlan::slot_bytes`] there).
    ///
    /// # Errors
    /// [`ProbeError::PlanMismatch`] for an emulated instruction (it needs no
    /// slot) or one another backend analysed;
    /// [`ProbeError::UnsupportedInstruction`] if the slot cannot express it.
    fn plan_xol(&self, insn: &Insn, slot_addr: u64) -> Result<XolPlan, ProbeError>;

    /// Prepares `regs` (the registers at the breakpoint trap, IP already
    /// meaning "the probed instruction is next") to run `plan` from its slot:
    /// sets the IP to the slot ([`XolPlan::slot_addr`] for a boosted run,
    /// [`XolPlan::step_entry`] for a single-step) and, for
    /// [`XolRun::SingleStep`], applies the pre-step fixups and arms the step
    /// (nothing to arm for a step-marker plan: the marker is in the slot). The
    /// returned state must be handed to [`finish_step`](Arch::finish_step) at
    /// the step trap.
    ///
    /// # Errors
    /// [`ProbeError::PlanMismatch`] for a boosted run of a plan that is not
    /// boostable. `regs` is unchanged on error.
    fn prepare_step(
        &self,
        plan: &XolPlan,
        run: XolRun,
        regs: &mut Regs,
    ) -> Result<StepState, ProbeError>;

    /// [`prepare_step`](Arch::prepare_step) for a [`XolRun::Boosted`] run
    /// of a plan this backend made ([`plan_xol`](Arch::plan_xol): the
    /// registries' own plans), on every boosted hit: sets the IP to
    /// [`XolPlan::slot_addr`] and nothing is left for a step trap. A
    /// backend whose `prepare_step` re-checks on every call that a plan is
    /// its own may skip that here (arm64: its slot layout; a registry's
    /// plan was made by its own backend at registration).
    ///
    /// # Errors
    /// [`ProbeError::PlanMismatch`] for a plan that is not boostable.
    /// `regs` is unchanged on error.
    #[inline]
    fn boost(&self, plan: &XolPlan, regs: &mut Regs) -> Result<(), ProbeError> {
        self.prepare_step(plan, XolRun::Boosted, regs).map(drop)
    }

    /// At the step trap after a single-stepped slot, applies the post-step
    /// fixups so that `regs` and memory look as if the instruction had run in
    /// place. `regs` are as the trap reports them: for a step-marker plan,
    /// the registers at the breakpoint trap on [`XolPlan::step_marker`]
    /// ([`trap_address`](Arch::trap_address) is the marker). Returns
    /// [`StepOutcome::Repeat`] when the instruction has not finished (an x86
    /// `rep` string instruction under the trap flag traps after each
    /// iteration): resume with the step still armed and call again at the
    /// next trap.
    ///
    /// # Errors
    /// [`ProbeError::MemoryFault`] if a fixup cannot access the stack;
    /// [`ProbeError::PlanMismatch`] for a step-marker plan whose trap is not
    /// at its marker. `regs` are then unchanged.
    fn finish_step(
        &self,
        plan: &XolPlan,
        state: &StepState,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> Result<StepOutcome, ProbeError>;

    /// Abandons a single-step whose instruction faulted in the slot before
    /// completing (the signal's IP is [`XolPlan::step_entry`]), as Linux's
    /// `arch_uprobe_abort_xol` does: undoes the pre-step fixups (scratch
    /// register back) and puts the IP on the original instruction, so the
    /// fault is reported where it would have happened in place. Trap context:
    /// no allocation, no lock. Backends with more step state (x86: the trap
    /// flag) extend it.
    fn abort_step(&self, plan: &XolPlan, state: &StepState, regs: &mut Regs) {
        if state.run == XolRun::SingleStep {
            if let Some(s) = plan.fixups.scratch {
                regs.gprs[usize::from(s.reg)] = state.saved_scratch;
            }
        }
        regs.ip = plan.insn_addr;
    }

    /// Applies the effect of an [`InsnClass::Emulated`] instruction to `regs`
    /// and `mem`, IP included.
    ///
    /// # Errors
    /// [`ProbeError::PlanMismatch`] for an instruction that is not emulated
    /// (or not this backend's); [`ProbeError::MemoryFault`]. On error neither
    /// `regs` nor memory is changed.
    fn emulate(
        &self,
        insn: &Insn,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> Result<(), ProbeError>;

    /// At a function's first instruction (before it runs), replaces the
    /// return address with `trampoline` and returns the original.
    ///
    /// # Errors
    /// [`ProbeError::MemoryFault`]; nothing is changed then.
    fn hijack_return(
        &self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        trampoline: u64,
    ) -> Result<u64, ProbeError>;

    /// The integer return value, read at the return trampoline (x86: `rax`,
    /// arm64: `x0`).
    fn return_value(&self, regs: &Regs) -> u64;

    /// The stack pointer the function's caller will see after the return,
    /// computed from the registers at entry (x86: `sp + 8`, arm64: `sp`).
    /// Kretprobe instances are matched to returns by it.
    fn stack_pointer_at_return(&self, entry: &Regs) -> u64;

    /// The general registers that carry the integer and pointer arguments,
    /// in order, as indices into [`Regs::gprs`] (x86_64 System V: `rdi`,
    /// `rsi`, `rdx`, `rcx`, `r8`, `r9`; arm64 AAPCS64: `x0`..`x7`).
    fn arg_registers(&self) -> &'static [u8];

    /// The register that carries the integer return value, as an index into
    /// [`Regs::gprs`] (x86: `rax`; arm64: `x0`).
    fn return_register(&self) -> u8;

    /// Where the first stack-passed argument lives at a function's first
    /// instruction, as an offset from the stack pointer (x86: 8, past the
    /// return address `call` pushed; arm64: 0, the return address is in
    /// `x30`).
    fn stack_args_offset(&self) -> u64;

    /// Integer or pointer argument `n` (0-based) of the calling convention,
    /// or `None` if it is not passed in a register (`n >=
    /// arg_registers().len()`: use [`stack_arg`](Arch::stack_arg)).
    ///
    /// Meaningful only at a function's first instruction (a kprobe at offset
    /// 0, a kretprobe's entry handler): later the function may have
    /// overwritten the register. Arguments wider than a register, floating
    /// point arguments and structures passed in pieces are not counted.
    fn arg(&self, regs: &Regs, n: usize) -> Option<u64> {
        let r = *self.arg_registers().get(n)?;
        Some(regs.gprs[usize::from(r)])
    }

    /// Sets register argument `n` (see [`arg`](Arch::arg)), so the function
    /// runs with `value` when the handler returns. Returns `false` (and
    /// changes nothing) if argument `n` is not passed in a register.
    #[must_use = "an argument passed on the stack is not set: check the result"]
    fn set_arg(&self, regs: &mut Regs, n: usize, value: u64) -> bool {
        match self.arg_registers().get(n) {
            Some(&r) => {
                regs.gprs[usize::from(r)] = value;
                true
            }
            None => false,
        }
    }

    /// The address of stack-passed argument `n` (0-based over all arguments,
    /// so the first stack argument is `n == arg_registers().len()`) at a
    /// function's first instruction; `None` for a register argument. Each
    /// stack argument takes one 8-byte slot.
    fn stack_arg_addr(&self, regs: &Regs, n: usize) -> Option<u64> {
        let k = n.checked_sub(self.arg_registers().len())?;
        Some(
            regs.sp
                .wrapping_add(self.stack_args_offset())
                .wrapping_add(8 * k as u64),
        )
    }

    /// Argument `n` wherever the convention passes it: a register, or the
    /// stack read through `mem` (at a function's first instruction only,
    /// as [`arg`](Arch::arg)).
    ///
    /// # Errors
    /// [`ProbeError::MemoryFault`] if the stack slot cannot be read.
    fn stack_arg(&self, regs: &Regs, n: usize, mem: &dyn DataMemory) -> Result<u64, ProbeError> {
        match self.stack_arg_addr(regs, n) {
            None => Ok(self.arg(regs, n).unwrap_or_default()),
            Some(a) => mem.read_u64(a),
        }
    }

    /// Replaces the integer return value (at the return trampoline: a
    /// kretprobe's return handler), so the caller sees `value`.
    fn set_return_value(&self, regs: &mut Regs, value: u64) {
        regs.gprs[usize::from(self.return_register())] = value;
    }
}

/// The backend of the architecture this crate is compiled for: the one whose
/// calling convention the [`Regs`] shorthands ([`Regs::arg`],
/// [`Regs::retval`], ...) apply.
#[cfg(target_arch = "x86_64")]
pub type NativeArch = X86_64;
/// The backend of the architecture this crate is compiled for: the one whose
/// calling convention the [`Regs`] shorthands ([`Regs::arg`],
/// [`Regs::retval`], ...) apply.
#[cfg(target_arch = "aarch64")]
pub type NativeArch = Arm64;

/// Calling-convention shorthands for the native architecture
/// ([`NativeArch`]).
///
/// A live handler's registers are always the native architecture's, so these
/// are what a handler should use: `regs.arg(0)` instead of `regs.gprs[7] //
/// rdi`, which silently reads the wrong register on another architecture.
/// Registers of another architecture (an emulated arm64 run on an x86_64
/// host) go through that backend's [`Arch`] methods instead
/// (`Arm64.arg(&regs, 0)`): [`Regs`] does not record its architecture, so
/// the shorthand cannot check it, and a test on foreign registers must name
/// the backend.
///
/// The argument helpers mean something only at a function's first
/// instruction (a kprobe at offset 0, a kretprobe's entry handler); the
/// return-value helpers only in a kretprobe's return handler.
///
/// ```
/// use rcu_registry::probes::arch::Regs;
///
/// let mut regs = Regs::default();
/// assert!(regs.set_arg(0, 42));
/// assert_eq!(regs.arg(0), Some(42));
/// assert_eq!(regs.arg(100), None); // not a register argument
/// regs.set_retval(7);
/// assert_eq!(regs.retval(), 7);
/// ```
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl Regs {
    /// Integer or pointer argument `n` (x86_64: `rdi`, `rsi`, `rdx`, `rcx`,
    /// `r8`, `r9`; arm64: `x0`..`x7`), `None` past the register arguments
    /// (those are on the stack: [`Regs::stack_arg`]). See [`Arch::arg`].
    pub fn arg(&self, n: usize) -> Option<u64> {
        NativeArch::default().arg(self, n)
    }

    /// Sets register argument `n`; `false` (nothing changed) for a stack
    /// argument. See [`Arch::set_arg`].
    #[must_use = "an argument passed on the stack is not set: check the result"]
    pub fn set_arg(&mut self, n: usize, value: u64) -> bool {
        NativeArch::default().set_arg(self, n, value)
    }

    /// The address of stack argument `n` at a function's first instruction
    /// (x86_64: `sp + 8 + 8 * (n - 6)`; arm64: `sp + 8 * (n - 8)`), `None`
    /// for a register argument. A live handler runs on the probed thread, so
    /// it may read the word there itself (the interrupted stack is mapped);
    /// see [`Arch::stack_arg_addr`].
    pub fn stack_arg_addr(&self, n: usize) -> Option<u64> {
        NativeArch::default().stack_arg_addr(self, n)
    }

    /// Argument `n` from a register or the stack, read through `mem`. See
    /// [`Arch::stack_arg`].
    ///
    /// # Errors
    /// [`ProbeError::MemoryFault`] if the stack slot cannot be read.
    pub fn stack_arg(&self, n: usize, mem: &dyn DataMemory) -> Result<u64, ProbeError> {
        NativeArch::default().stack_arg(self, n, mem)
    }

    /// The integer return value (x86_64: `rax`; arm64: `x0`), in a
    /// kretprobe's return handler. See [`Arch::return_value`].
    pub fn retval(&self) -> u64 {
        NativeArch::default().return_value(self)
    }

    /// Replaces the return value the caller will see, in a kretprobe's
    /// return handler. See [`Arch::set_return_value`].
    pub fn set_retval(&mut self, value: u64) {
        NativeArch::default().set_return_value(self, value)
    }
}

/// The arch-neutral register file seen by probe handlers.
///
/// `gprs` holds the general registers by hardware number; the stack pointer
/// is always [`Regs::sp`] (on x86 `gprs[4]` is unused and `regs[X86Reg::Rsp]`
/// is `sp`). Backends provide typed indexing (`regs[X86Reg::Rax]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Regs {
    /// General registers by hardware number (x86: rax=0 .. r15=15; arm64:
    /// x0 .. x30).
    pub gprs: [u64; 31],
    /// Stack pointer.
    pub sp: u64,
    /// Instruction pointer (x86 `rip`, arm64 `pc`).
    pub ip: u64,
    /// Flags (x86 `rflags`; arm64 `pstate`, NZCV in bits 31..28).
    pub flags: u64,
}

/// One decoded instruction and how a probe on it is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Insn {
    /// Address of the instruction.
    pub addr: u64,
    /// Length in bytes.
    pub len: u8,
    /// How a hit on it is completed.
    pub class: InsnClass,
    bytes: [u8; MAX_INSN_BYTES],
}

impl Insn {
    /// An instruction at `addr` whose bytes are `bytes` (at most
    /// [`MAX_INSN_BYTES`]; a backend guarantees that).
    pub(crate) fn new(addr: u64, bytes: &[u8], class: InsnClass) -> Self {
        let mut b = [0u8; MAX_INSN_BYTES];
        b[..bytes.len()].copy_from_slice(bytes);
        Insn {
            addr,
            len: bytes.len() as u8,
            class,
            bytes: b,
        }
    }

    /// The instruction's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Address of the next instruction in place (`addr + len`).
    pub fn next_addr(&self) -> u64 {
        self.addr.wrapping_add(u64::from(self.len))
    }
}

/// How a hit on an instruction is completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InsnClass {
    /// Runs unchanged from an XOL slot (fixups only for the IP and, for an
    /// indirect call, the pushed return address).
    OutOfLine,
    /// Reads the program counter (x86 RIP-relative memory operand): the slot
    /// holds a rewritten copy that addresses through a scratch register,
    /// loaded before and restored after the step.
    PcRelative,
    /// Never executed: [`Arch::emulate`] applies the effect.
    Emulated(Emulation),
}

/// The effect of an emulated instruction. Targets and return addresses are
/// absolute, computed at analysis time from the instruction's own address.
///
/// x86_64 produces `Nop`, `Jump`, `Call`, `CondJump` and `PushReg`; the
/// arm64-only variants are listed for the arm64 backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Emulation {
    /// No effect but advancing the IP.
    Nop,
    /// Unconditional direct branch.
    Jump {
        /// Branch target.
        target: u64,
    },
    /// Direct call: x86 pushes `return_addr`; arm64 (`bl`) sets `x30`.
    Call {
        /// Call target.
        target: u64,
        /// Address of the instruction after the call.
        return_addr: u64,
    },
    /// Conditional direct branch on the flags.
    CondJump {
        /// The arch's own condition encoding (x86: the `tttn` nibble of
        /// `jcc`, 0 = `jo` .. 15 = `jg`; arm64: `cond` of `b.cond`).
        cond: u8,
        /// Target when the condition holds.
        target: u64,
    },
    /// x86 `push r64`: `sp -= 8; [sp] = reg` (for `rsp`, its old value).
    PushReg {
        /// Hardware register number (0..15).
        reg: u8,
    },
    /// arm64 `cbz`/`cbnz`: branch if the register is (non)zero.
    CompareBranch {
        /// Register number (0..30).
        reg: u8,
        /// 64-bit (`x`) rather than 32-bit (`w`) compare.
        wide: bool,
        /// `cbnz` rather than `cbz`.
        nonzero: bool,
        /// Branch target.
        target: u64,
    },
    /// arm64 `tbz`/`tbnz`: branch on one bit of a register.
    TestBitBranch {
        /// Register number (0..30).
        reg: u8,
        /// Bit number (0..63).
        bit: u8,
        /// `tbnz` rather than `tbz`.
        nonzero: bool,
        /// Branch target.
        target: u64,
    },
    /// arm64 `adr`/`adrp`: write a PC-relative address to a register.
    PcRelAddress {
        /// Destination register (0..30; 31 = xzr discards).
        reg: u8,
        /// The computed address.
        value: u64,
    },
    /// arm64 `ldr` (literal) into a general register.
    LoadLiteral {
        /// Destination register (0..30).
        reg: u8,
        /// Absolute address of the literal.
        addr: u64,
        /// Bytes loaded (4 or 8).
        size: u8,
        /// Sign-extend a 4-byte load (`ldrsw`).
        signed: bool,
    },
    /// arm64 `br`/`blr`/`ret`: branch to a register; `link` sets `x30` to
    /// `return_addr` (after reading the target register).
    IndirectBranch {
        /// Register holding the target (0..30).
        reg: u8,
        /// `blr`: set the link register.
        link: bool,
        /// Address of the instruction after this one.
        return_addr: u64,
    },
}

/// How a plan is run from its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XolRun {
    /// One trap: the slot jumps back by itself (no post handler can run).
    Boosted,
    /// Step trap after the instruction, then [`Arch::finish_step`].
    #[default]
    SingleStep,
}

/// Result of [`Arch::finish_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// The instruction completed; `regs` now describe the state after it in
    /// the original code.
    Done,
    /// The instruction has not completed (x86 `rep` string instruction
    /// interrupted by the trap-flag step trap after one iteration): resume as
    /// is, the step is still armed, and call `finish_step` again at the next
    /// trap. Never answered for a step-marker plan: the instruction runs to
    /// completion (every iteration) before it reaches the marker.
    Repeat,
}

/// What [`Arch::prepare_step`] saved for [`Arch::finish_step`]. Kept per
/// thread by the runtime between the two traps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepState {
    /// How the plan was started.
    pub run: XolRun,
    /// Value of the scratch register before the pre-step fixup loaded it.
    pub saved_scratch: u64,
    /// Stack pointer before the step.
    pub sp_before: u64,
    /// Flags before the step was armed.
    pub flags_before: u64,
}

/// Out-of-line execution plan for one instruction and one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct XolPlan {
    /// Address of the original instruction.
    pub insn_addr: u64,
    /// Address of the slot the plan is for.
    pub slot_addr: u64,
    /// The slot ends with a jump back to the instruction after the original
    /// and needs no post-step fixup: a [`XolRun::Boosted`] run is allowed.
    pub boostable: bool,
    /// Where a [`XolRun::SingleStep`] starts: the instruction's copy that a
    /// step runs. [`slot_addr`](Self::slot_addr) unless the slot holds two
    /// copies (x86_64: a boosted copy with a jump back first, then a stepped
    /// copy ending on the step marker).
    pub step_entry: u64,
    /// Address of the step-marker breakpoint right after the stepped copy of
    /// the instruction in the slot (see the [module docs](self): "Two ways to
    /// end a single-step"); `None` when the step is a hardware single-step
    /// (x86 trap flag).
    pub step_marker: Option<u64>,
    /// Register and memory fixups around a single-step.
    pub fixups: Fixups,
    slot: [u8; MAX_XOL_SLOT],
    slot_len: u8,
}

impl XolPlan {
    /// A plan whose slot holds `slot` (at most [`MAX_XOL_SLOT`] bytes; a
    /// backend guarantees that).
    pub(crate) fn new(
        insn_addr: u64,
        slot_addr: u64,
        slot: &[u8],
        boostable: bool,
        step_marker: Option<u64>,
        fixups: Fixups,
    ) -> Self {
        let mut s = [0u8; MAX_XOL_SLOT];
        s[..slot.len()].copy_from_slice(slot);
        XolPlan {
            insn_addr,
            slot_addr,
            step_entry: slot_addr,
            boostable,
            step_marker,
            fixups,
            slot: s,
            slot_len: slot.len() as u8,
        }
    }

    /// The same plan with single-steps starting at `entry` (inside the slot).
    pub(crate) fn with_step_entry(mut self, entry: u64) -> Self {
        self.step_entry = entry;
        self
    }

    /// The bytes to write at [`XolPlan::slot_addr`].
    pub fn slot_bytes(&self) -> &[u8] {
        &self.slot[..self.slot_len as usize]
    }
}

/// Fixups that make a single-step from the slot equal to a run in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fixups {
    /// Translate the IP after the step from the slot back to the original code.
    pub ip: Option<IpFixup>,
    /// Scratch register loaded before the step and restored after it.
    pub scratch: Option<ScratchFixup>,
    /// Return address pushed by a call executed in the slot, to be corrected.
    pub return_address: Option<ReturnAddressFixup>,
    /// If the IP after the step is this address (the slot's instruction
    /// itself), the instruction was interrupted before completing (an x86
    /// `rep` string instruction traps after each iteration under the trap
    /// flag): [`Arch::finish_step`] answers [`StepOutcome::Repeat`]. Only
    /// trap-flag plans have it.
    pub restart: Option<u64>,
}

/// After the step, if the IP is `from`, set it to `to` (an IP elsewhere means
/// the instruction branched and is left alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpFixup {
    /// The IP that means "fell through in the slot": the address after the
    /// stepped copy (for a step-marker plan, the marker itself).
    pub from: u64,
    /// The corresponding IP in the original code.
    pub to: u64,
}

/// Before the step, `gprs[reg] = value` (saving the old value in
/// [`StepState::saved_scratch`]); after the step, restore it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchFixup {
    /// Index into [`Regs::gprs`].
    pub reg: u8,
    /// The value the rewritten instruction needs (x86: the original next IP).
    pub value: u64,
}

/// After the step, if the word at the new stack pointer is `slot_return`,
/// overwrite it with `orig_return`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReturnAddressFixup {
    /// The return address a call in the slot pushes.
    pub slot_return: u64,
    /// The return address the call pushes in place.
    pub orig_return: u64,
}

/// Data memory an emulation or fixup reads and writes (the stack, literals).
/// Little-endian on both supported architectures.
///
/// Implementations used in trap context must not allocate or block.
pub trait DataMemory {
    /// Reads `buf.len()` bytes at `addr`.
    ///
    /// # Errors
    /// [`ProbeError::MemoryFault`] if any byte is inaccessible.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError>;

    /// Writes `bytes` at `addr`, all or nothing.
    ///
    /// # Errors
    /// [`ProbeError::MemoryFault`] if any byte is inaccessible; nothing is
    /// written then.
    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError>;

    /// Reads a little-endian `u64` at `addr`.
    ///
    /// # Errors
    /// As [`DataMemory::read`].
    fn read_u64(&self, addr: u64) -> Result<u64, ProbeError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian `u64` at `addr`.
    ///
    /// # Errors
    /// As [`DataMemory::write`].
    fn write_u64(&mut self, addr: u64, value: u64) -> Result<(), ProbeError> {
        self.write(addr, &value.to_le_bytes())
    }
}

/// Data memory with nothing in it: every access faults with
/// [`ProbeError::MemoryFault`]. For hit paths whose displaced instructions
/// touch no data, and for tests that must show an instruction's handling
/// reads or writes none.
///
/// ```
/// use rcu_registry::probes::arch::{DataMemory, NoDataMemory};
///
/// assert!(NoDataMemory.read_u64(0x1000).is_err());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDataMemory;

impl DataMemory for NoDataMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        Err(ProbeError::MemoryFault {
            addr,
            len: buf.len(),
        })
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        Err(ProbeError::MemoryFault {
            addr,
            len: bytes.len(),
        })
    }
}

#[cfg(test)]
mod calling_convention_tests {
    use super::*;

    /// Stack memory for `stack_arg`: 8-byte words from `base`.
    struct Words {
        base: u64,
        words: Vec<u64>,
    }

    impl DataMemory for Words {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
            let fault = ProbeError::MemoryFault {
                addr,
                len: buf.len(),
            };
            let off = addr.checked_sub(self.base).ok_or(fault.clone())?;
            if off % 8 != 0 || buf.len() != 8 {
                return Err(fault);
            }
            let w = self.words.get((off / 8) as usize).ok_or(fault)?;
            buf.copy_from_slice(&w.to_le_bytes());
            Ok(())
        }

        fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
            Err(ProbeError::MemoryFault {
                addr,
                len: bytes.len(),
            })
        }
    }

    /// Registers whose general register `i` holds `100 + i`.
    fn numbered() -> Regs {
        let mut r = Regs::default();
        for (i, g) in r.gprs.iter_mut().enumerate() {
            *g = 100 + i as u64;
        }
        r
    }

    #[test]
    fn x86_64_sysv_arguments_are_rdi_rsi_rdx_rcx_r8_r9_then_the_stack() {
        let a = X86_64;
        let mut r = numbered();
        let want = [
            X86Reg::Rdi,
            X86Reg::Rsi,
            X86Reg::Rdx,
            X86Reg::Rcx,
            X86Reg::R8,
            X86Reg::R9,
        ];
        for (n, reg) in want.into_iter().enumerate() {
            assert_eq!(a.arg(&r, n), Some(r[reg]), "arg {n}");
        }
        assert_eq!(a.arg(&r, 6), None);
        assert!(a.set_arg(&mut r, 2, 0xdead));
        assert_eq!(r[X86Reg::Rdx], 0xdead);
        let before = r;
        assert!(!a.set_arg(&mut r, 6, 1));
        assert_eq!(r, before, "a stack argument is not set");
        // At entry [sp] is the return address; argument 6 is at sp + 8.
        r.sp = 0x1000;
        let mem = Words {
            base: 0x1000,
            words: vec![0x4000_0000, 66, 77],
        };
        assert_eq!(a.stack_arg_addr(&r, 5), None);
        assert_eq!(a.stack_arg_addr(&r, 6), Some(0x1008));
        assert_eq!(a.stack_arg(&r, 6, &mem).unwrap(), 66);
        assert_eq!(a.stack_arg(&r, 7, &mem).unwrap(), 77);
        assert_eq!(a.stack_arg(&r, 0, &mem).unwrap(), r[X86Reg::Rdi]);
        assert!(a.stack_arg(&r, 8, &mem).is_err());
        assert_eq!(a.return_value(&r), r[X86Reg::Rax]);
        a.set_return_value(&mut r, 5);
        assert_eq!(r[X86Reg::Rax], 5);
    }

    #[test]
    fn arm64_aapcs64_arguments_are_x0_to_x7_then_the_stack() {
        let a = Arm64;
        let mut r = numbered();
        for n in 0..8 {
            assert_eq!(a.arg(&r, n), Some(r[Arm64Reg::ALL[n]]), "arg {n}");
        }
        assert_eq!(a.arg(&r, 8), None);
        assert!(a.set_arg(&mut r, 7, 0xbeef));
        assert_eq!(r[Arm64Reg::X7], 0xbeef);
        assert!(!a.set_arg(&mut r, 8, 1));
        // The return address is in x30: argument 8 is at [sp].
        r.sp = 0x2000;
        let mem = Words {
            base: 0x2000,
            words: vec![88, 99],
        };
        assert_eq!(a.stack_arg_addr(&r, 8), Some(0x2000));
        assert_eq!(a.stack_arg(&r, 8, &mem).unwrap(), 88);
        assert_eq!(a.stack_arg(&r, 9, &mem).unwrap(), 99);
        assert_eq!(a.return_value(&r), r[Arm64Reg::X0]);
        a.set_return_value(&mut r, 9);
        assert_eq!(r[Arm64Reg::X0], 9);
        assert_eq!(
            a.arg(&r, 0),
            Some(9),
            "x0 is argument 0 and the return value"
        );
    }

    #[test]
    fn the_regs_shorthands_use_the_native_convention() {
        let n = NativeArch::default();
        let mut r = numbered();
        for i in 0..n.arg_registers().len() + 2 {
            assert_eq!(r.arg(i), n.arg(&r, i));
        }
        r.sp = 0x1000;
        assert_eq!(r.stack_arg_addr(0), None);
        let first_stack = n.arg_registers().len();
        assert_eq!(
            r.stack_arg_addr(first_stack),
            n.stack_arg_addr(&r, first_stack)
        );
        assert!(r.set_arg(1, 11));
        assert_eq!(n.arg(&r, 1), Some(11));
        r.set_retval(12);
        assert_eq!(n.return_value(&r), 12);
        assert_eq!(r.retval(), 12);
    }
}
