//! The arm64 (AArch64) backend, with its own decoder for what probes need.
//!
//! # Breakpoints and the step marker
//!
//! A probe replaces its instruction with `brk #`[`BREAKPOINT_IMM`]. A
//! single-step from an XOL slot ends on a second `brk`, the *step marker*,
//! `brk #`[`STEP_MARKER_IMM`]. The two immediates differ so that a trap
//! handler can tell "a probe was hit" from "a step finished" by reading the
//! instruction at the trap address, without any per-thread state.
//!
//! The immediates are `0x5250` ("RP", registry probe) and `0x5253` ("RS",
//! registry step). They avoid every value with a known owner: 0 (GDB and
//! LLDB breakpoints), 0x001 (LLVM's trap: Clang `__builtin_trap`, Rust's
//! abort; Swift), 0x3e8 (GCC `__builtin_trap`), 0xf000 (MSVC
//! `__debugbreak`), 0x5500..0x55ff (UBSan traps), 0x8000.. (kCFI), and the
//! values Linux claims for itself (0x004..0x006 for kprobes and uprobes,
//! 0x100, 0x400, 0x800, 0x900.. for faults, KGDB, `BUG()` and KASAN). Linux
//! hands a user-space `brk` it does not own to the process as `SIGTRAP`, so
//! ours reach our handler.
//!
//! Hardware single-step is not reachable from a signal handler (only a
//! debugger can set `MDSCR_EL1.SS` through ptrace), hence the marker.
//!
//! # Alignment
//!
//! Every instruction is 4 bytes, 4-byte aligned; any other address is refused
//! with [`ProbeError::Misaligned`]. On arm64 every aligned address is an
//! instruction boundary, so [`Arch::check_boundary`] needs no linear decode.
//!
//! # Classification
//!
//! [`Arch::analyze`] sorts an instruction into one of three kinds:
//!
//! - **simulated** ([`InsnClass::Emulated`]): B, BL, B.cond (all sixteen
//!   conditions), CBZ/CBNZ and TBZ/TBNZ, ADR and ADRP, LDR/LDRSW (literal)
//!   into W or X registers, PRFM (literal), BR, BLR, RET (any register), NOP
//!   and BTI. All of them read the PC, so they never run out of line; the
//!   backend computes their effect on [`Regs`] ([`Arch::emulate`]);
//! - **stepped out of line** ([`InsnClass::OutOfLine`]): everything in the
//!   data-processing, SIMD&FP and load/store groups that does not name the PC,
//!   plus barriers (`dmb`, `dsb`, `isb`, `sb`, `clrex`) and the hints that act
//!   only on registers or events (`yield`, `wfe`, `sev`, `sevl`, pointer
//!   authentication `pac*`/`aut*`/`xpaclri`, `csdb`, `clrbhb`, `dgh`);
//! - **refused**, with an [`Unsupported`] reason:
//!   exclusives (`ldxr`/`stxr`/`ldaxr`/`stlxr`/`ldxp`/`stxp` and their
//!   acquire/release pair forms: the breakpoint trap clears the exclusive
//!   monitor, so the store-exclusive would fail on every retry); exception-generating
//!   instructions (`svc`, `hvc`, `smc`, `brk`, `hlt`, `dcps*`, `udf`,
//!   `tcancel`); every system instruction (`msr`, `mrs`, `sys`, `sysl`, MSR
//!   to PSTATE fields, `wfet`/`wfit`) and the hints not listed above (`wfi`
//!   traps to the kernel at EL0; `esb`, `psb`, `tsb`, `gcsb` and unallocated
//!   hints have effects a slot cannot be trusted with); exception returns
//!   (`eret`, `drps`); pointer-authenticated branches; BC.cond; SIMD&FP
//!   literal loads ([`Regs`] has no vector registers); memory copy/set
//!   (FEAT_MOPS); SVE and SME; reserved encoding groups.
//!
//! Compare-and-swap (`cas`, `casp`) and the ordered `ldar`/`stlr` are *not*
//! exclusives: each is one instruction that leaves no monitor state behind,
//! so they step out of line like any other load or store.
//!
//! # Sites inside an exclusive sequence
//!
//! A probe between a load-exclusive and its store-exclusive would clear the
//! monitor on every pass. [`Arch::check_boundary`] scans back from the probe
//! address, within the function and at most
//! [`EXCLUSIVE_SCAN_WINDOW`] instructions, for a load-exclusive not yet closed
//! by a store-exclusive or `clrex`, and refuses the site with
//! [`Unsupported::InsideExclusiveSequence`].
//!
//! # Out-of-line slot
//!
//! The slot is 16 bytes, two copies of the instruction:
//!
//! ```text
//! slot + 0   insn        boosted copy: runs, then
//! slot + 4   b next      jumps back to the instruction after the original
//! slot + 8   insn        stepped copy (XolPlan::step_entry)
//! slot + 12  brk #0x5253 step marker
//! ```
//!
//! A **single-step** points the PC at the stepped copy
//! ([`Arch::prepare_step`]); the instruction runs, the marker traps with the
//! PC at the marker, and [`Arch::finish_step`] sets the PC to the original
//! address + 4. Nothing stepped out of line can branch, so that is the only
//! fixup. A **boosted** run (no post handler) points the PC at the slot
//! itself: the copy runs and `b` returns to the original code, one trap per
//! hit instead of two. `b` reaches ±128 MiB, and nothing else is free to
//! jump through, so a slot farther than that from the probed code is not
//! boostable: its first eight bytes are `brk` markers that are never
//! reached, and every hit is single-stepped.
//!
//! # Return hijack
//!
//! At a function's first instruction `x30` holds the return address: the
//! hijack swaps it for the trampoline. With pointer authentication the entry
//! `paciasp` signs whatever `x30` holds when it runs, i.e. the trampoline,
//! and the matching `autiasp` verifies it, so hijacked returns authenticate.
//! `sp` is unchanged by a return, so it identifies the frame at both ends.

mod decode;
mod emulate;
mod exclusive;

use std::ops::{Index, IndexMut};

use super::{
    Arch, DataMemory, Fixups, Insn, InsnClass, IpFixup, Regs, StepOutcome, StepState, XolPlan,
    XolRun,
};
use crate::probes::error::{ProbeError, TextFailure, Unsupported};

pub use exclusive::EXCLUSIVE_SCAN_WINDOW;

/// Immediate of the probe breakpoint, `brk #0x5250` ("RP").
pub const BREAKPOINT_IMM: u16 = 0x5250;

/// Immediate of the step marker that ends an out-of-line step,
/// `brk #0x5253` ("RS").
pub const STEP_MARKER_IMM: u16 = 0x5253;

/// Encoding of `brk #imm`.
pub const fn brk(imm: u16) -> u32 {
    0xd420_0000 | ((imm as u32) << 5)
}

/// The probe breakpoint instruction word.
pub const BREAKPOINT: u32 = brk(BREAKPOINT_IMM);

/// The step-marker instruction word.
pub const STEP_MARKER: u32 = brk(STEP_MARKER_IMM);

/// Instruction size and alignment.
const INSN_BYTES: u64 = 4;

/// Bytes of an XOL slot: the boosted copy and its `b` back, then the
/// stepped copy and its marker (module docs, "Out-of-line slot").
const SLOT_BYTES: usize = 16;

/// Offset of the stepped copy in a slot.
const STEP_OFFSET: u64 = 8;

/// `b` from `from` to `to`, if the offset fits the 26-bit immediate
/// (±128 MiB).
fn branch(from: u64, to: u64) -> Option<u32> {
    let off = to.wrapping_sub(from) as i64;
    let reach = 1i64 << 27;
    (off % 4 == 0 && (-reach..reach).contains(&off))
        .then_some(0x1400_0000 | ((off >> 2) as u32 & 0x03ff_ffff))
}

/// Bytes of the breakpoint, little-endian as in memory.
static BREAKPOINT_BYTES: [u8; 4] = BREAKPOINT.to_le_bytes();

/// The arm64 backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Arm64;

/// arm64 general registers, for indexing [`Regs`]. `regs[Arm64Reg::Sp]` is
/// [`Regs::sp`]; `x30` is the link register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Arm64Reg {
    X0 = 0,
    X1,
    X2,
    X3,
    X4,
    X5,
    X6,
    X7,
    X8,
    X9,
    X10,
    X11,
    X12,
    X13,
    X14,
    X15,
    X16,
    X17,
    X18,
    X19,
    X20,
    X21,
    X22,
    X23,
    X24,
    X25,
    X26,
    X27,
    X28,
    X29,
    X30,
    Sp,
}

impl Arm64Reg {
    /// The link register, `x30`.
    pub const LR: Arm64Reg = Arm64Reg::X30;

    /// All 32 (x0..x30, then sp), in hardware order.
    pub const ALL: [Arm64Reg; 32] = {
        use Arm64Reg::*;
        [
            X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, X10, X11, X12, X13, X14, X15, X16, X17, X18,
            X19, X20, X21, X22, X23, X24, X25, X26, X27, X28, X29, X30, Sp,
        ]
    };

    /// The register with number `n`: 0..=30 are x0..x30, 31 is sp (as in a
    /// base-register field; where 31 means `xzr` there is no register).
    pub fn from_number(n: u8) -> Option<Arm64Reg> {
        Self::ALL.get(usize::from(n)).copied()
    }

    /// Hardware number (sp = 31).
    pub fn number(self) -> u8 {
        self as u8
    }
}

impl Index<Arm64Reg> for Regs {
    type Output = u64;
    fn index(&self, r: Arm64Reg) -> &u64 {
        match r {
            Arm64Reg::Sp => &self.sp,
            r => &self.gprs[usize::from(r.number())],
        }
    }
}

impl IndexMut<Arm64Reg> for Regs {
    fn index_mut(&mut self, r: Arm64Reg) -> &mut u64 {
        match r {
            Arm64Reg::Sp => &mut self.sp,
            r => &mut self.gprs[usize::from(r.number())],
        }
    }
}

impl Arm64 {
    /// Classifies the instruction word `word` as if it sat at `addr` (which
    /// must be 4-byte aligned), without building an [`Insn`].
    ///
    /// # Errors
    /// [`ProbeError::Misaligned`] or [`ProbeError::UnsupportedInstruction`].
    pub fn classify(&self, addr: u64, word: u32) -> Result<InsnClass, ProbeError> {
        check_aligned(addr)?;
        decode::classify(addr, word)
            .map_err(|reason| ProbeError::UnsupportedInstruction { addr, reason })
    }

    /// Checks a plan was made by this backend for a single-step.
    #[inline]
    fn step_marker_of(plan: &XolPlan) -> Result<u64, ProbeError> {
        match (plan.step_marker, plan.fixups.ip) {
            (Some(marker), Some(_))
                if plan.slot_bytes().len() == SLOT_BYTES
                    && plan.step_entry == plan.slot_addr.wrapping_add(STEP_OFFSET)
                    && marker == plan.step_entry.wrapping_add(INSN_BYTES) =>
            {
                Ok(marker)
            }
            _ => Err(ProbeError::PlanMismatch {
                what: "arm64 single-step of a plan without a step marker",
            }),
        }
    }
}

fn check_aligned(addr: u64) -> Result<(), ProbeError> {
    if addr % INSN_BYTES == 0 {
        Ok(())
    } else {
        Err(ProbeError::Misaligned {
            addr,
            align: INSN_BYTES,
        })
    }
}

impl Arch for Arm64 {
    fn name(&self) -> &'static str {
        "arm64"
    }

    fn breakpoint(&self) -> &'static [u8] {
        &BREAKPOINT_BYTES
    }

    fn insn_align(&self) -> u64 {
        INSN_BYTES
    }

    fn max_insn_len(&self) -> usize {
        INSN_BYTES as usize
    }

    fn xol_slot_size(&self) -> usize {
        SLOT_BYTES
    }

    /// `brk` reports the address of the `brk` itself.
    fn trap_address(&self, regs: &Regs) -> u64 {
        regs.ip
    }

    fn analyze(&self, addr: u64, bytes: &[u8]) -> Result<Insn, ProbeError> {
        check_aligned(addr)?;
        let Some(word_bytes) = bytes.first_chunk::<4>() else {
            return Err(ProbeError::UnsupportedInstruction {
                addr,
                reason: Unsupported::Truncated,
            });
        };
        let class = self.classify(addr, u32::from_le_bytes(*word_bytes))?;
        Ok(Insn::new(addr, word_bytes, class))
    }

    fn check_boundary(
        &self,
        func_start: u64,
        func_text: &[u8],
        addr: u64,
    ) -> Result<(), ProbeError> {
        check_aligned(func_start)?;
        check_aligned(addr)?;
        let text_end = func_start.saturating_add(func_text.len() as u64);
        if addr < func_start || addr.saturating_add(INSN_BYTES) > text_end {
            return Err(ProbeError::TextAccess {
                addr,
                len: INSN_BYTES as usize,
                failure: TextFailure::OutOfRange,
            });
        }
        match exclusive::open_load_exclusive(func_start, func_text, addr) {
            Some(_) => Err(ProbeError::UnsupportedInstruction {
                addr,
                reason: Unsupported::InsideExclusiveSequence,
            }),
            None => Ok(()),
        }
    }

    fn plan_xol(&self, insn: &Insn, slot_addr: u64) -> Result<XolPlan, ProbeError> {
        check_aligned(slot_addr)?;
        let word = <[u8; 4]>::try_from(insn.bytes())
            .map(u32::from_le_bytes)
            .map_err(|_| ProbeError::PlanMismatch {
                what: "arm64 plan for an instruction that is not 4 bytes long",
            })?;
        // Re-classify rather than trust the class: an `Insn` made by another
        // backend may carry any bytes.
        match self.classify(insn.addr, word)? {
            InsnClass::OutOfLine if insn.class == InsnClass::OutOfLine => {}
            _ => {
                return Err(ProbeError::PlanMismatch {
                    what: "arm64 XOL plan for an instruction that is simulated, not stepped",
                })
            }
        }
        let step_entry = slot_addr.wrapping_add(STEP_OFFSET);
        let marker = step_entry.wrapping_add(INSN_BYTES);
        let back = branch(slot_addr.wrapping_add(INSN_BYTES), insn.next_addr());
        let mut slot = [0u8; SLOT_BYTES];
        // The boosted copy and its way back, or (out of `b`'s reach) two
        // markers nothing runs into.
        match back {
            Some(b) => {
                slot[..4].copy_from_slice(insn.bytes());
                slot[4..8].copy_from_slice(&b.to_le_bytes());
            }
            None => {
                slot[..4].copy_from_slice(&STEP_MARKER.to_le_bytes());
                slot[4..8].copy_from_slice(&STEP_MARKER.to_le_bytes());
            }
        }
        slot[8..12].copy_from_slice(insn.bytes());
        slot[12..].copy_from_slice(&STEP_MARKER.to_le_bytes());
        let fixups = Fixups {
            ip: Some(IpFixup {
                from: marker,
                to: insn.next_addr(),
            }),
            ..Fixups::default()
        };
        Ok(XolPlan::new(
            insn.addr,
            slot_addr,
            &slot,
            back.is_some(),
            Some(marker),
            fixups,
        )
        .with_step_entry(step_entry))
    }

    #[inline]
    fn prepare_step(
        &self,
        plan: &XolPlan,
        run: XolRun,
        regs: &mut Regs,
    ) -> Result<StepState, ProbeError> {
        Self::step_marker_of(plan)?;
        if run == XolRun::Boosted && !plan.boostable {
            return Err(ProbeError::PlanMismatch {
                what: "boosted run of an arm64 plan whose slot is out of reach of `b`",
            });
        }
        let state = StepState {
            run,
            saved_scratch: 0,
            sp_before: regs.sp,
            flags_before: regs.flags,
        };
        regs.ip = match run {
            XolRun::Boosted => plan.slot_addr,
            XolRun::SingleStep => plan.step_entry,
        };
        // The branch that reached the breakpoint left its BTYPE; it applied
        // to the probed address (where `brk` is exempt from the check), not
        // to the slot.
        regs.flags &= !emulate::BTYPE_MASK;
        Ok(state)
    }

    /// Without [`prepare_step`](Arch::prepare_step)'s check of the slot's
    /// layout (`step_marker_of`: a dozen instructions of every boosted hit
    /// under qemu-user): the plan is this backend's own, made at
    /// registration, and its `boostable` says the slot starts with the
    /// copy and its `b` back.
    #[inline]
    fn boost(&self, plan: &XolPlan, regs: &mut Regs) -> Result<(), ProbeError> {
        if !plan.boostable {
            return Err(ProbeError::PlanMismatch {
                what: "boosted run of an arm64 plan whose slot is out of reach of `b`",
            });
        }
        regs.ip = plan.slot_addr;
        // As in `prepare_step`: the BTYPE applied to the probed address.
        regs.flags &= !emulate::BTYPE_MASK;
        Ok(())
    }

    fn finish_step(
        &self,
        plan: &XolPlan,
        _state: &StepState,
        regs: &mut Regs,
        _mem: &mut dyn DataMemory,
    ) -> Result<StepOutcome, ProbeError> {
        let marker = Self::step_marker_of(plan)?;
        match plan.fixups.ip {
            Some(IpFixup { from, to }) if regs.ip == from && from == marker => {
                regs.ip = to;
                Ok(StepOutcome::Done)
            }
            _ => Err(ProbeError::PlanMismatch {
                what: "arm64 step trap away from the plan's step marker",
            }),
        }
    }

    #[inline]
    fn emulate(
        &self,
        insn: &Insn,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> Result<(), ProbeError> {
        emulate::emulate(insn, regs, mem)
    }

    /// Swaps `x30` for `trampoline`; touches no memory.
    fn hijack_return(
        &self,
        regs: &mut Regs,
        _mem: &mut dyn DataMemory,
        trampoline: u64,
    ) -> Result<u64, ProbeError> {
        Ok(std::mem::replace(&mut regs[Arm64Reg::LR], trampoline))
    }

    fn return_value(&self, regs: &Regs) -> u64 {
        regs[Arm64Reg::X0]
    }

    fn stack_pointer_at_return(&self, entry: &Regs) -> u64 {
        entry.sp
    }

    fn arg_registers(&self) -> &'static [u8] {
        // AAPCS64: x0..x7.
        &[0, 1, 2, 3, 4, 5, 6, 7]
    }

    fn return_register(&self) -> u8 {
        0
    }

    fn stack_args_offset(&self) -> u64 {
        // The return address is in x30; [sp] is the first stack argument.
        0
    }
}
