//! Emulation of x86_64 relative branches, calls, `push reg` and `nop`, and
//! the return-address hijack.

use super::regs::{X86Reg, CF, OF, PF, SF, ZF};
use crate::probes::arch::{DataMemory, Emulation, Insn, InsnClass, Regs};
use crate::probes::error::ProbeError;

/// [`Arch::emulate`](crate::probes::arch::Arch::emulate) for x86_64. Computes
/// the new registers first, performs the one memory write (if any), and only
/// then commits the registers, so an error changes nothing.
pub(super) fn emulate(
    insn: &Insn,
    regs: &mut Regs,
    mem: &mut dyn DataMemory,
) -> Result<(), ProbeError> {
    let InsnClass::Emulated(e) = insn.class else {
        return Err(ProbeError::PlanMismatch {
            what: "emulate() of an instruction that is not emulated",
        });
    };
    let next = insn.next_addr();
    match e {
        Emulation::Nop => regs.ip = next,
        Emulation::Jump { target } => regs.ip = target,
        Emulation::CondJump { cond, target } => {
            regs.ip = if condition_holds(cond, regs.flags) {
                target
            } else {
                next
            };
        }
        Emulation::Call {
            target,
            return_addr,
        } => {
            let sp = regs.sp.wrapping_sub(8);
            mem.write_u64(sp, return_addr)?;
            regs.sp = sp;
            regs.ip = target;
        }
        Emulation::PushReg { reg } => {
            let Some(r) = X86Reg::from_number(reg) else {
                return Err(ProbeError::PlanMismatch {
                    what: "push of a register number above 15",
                });
            };
            // `push rsp` stores the value before the decrement.
            let value = regs[r];
            let sp = regs.sp.wrapping_sub(8);
            mem.write_u64(sp, value)?;
            regs.sp = sp;
            regs.ip = next;
        }
        _ => {
            return Err(ProbeError::PlanMismatch {
                what: "an emulation the x86_64 backend does not produce",
            })
        }
    }
    Ok(())
}

/// Evaluates the `tttn` condition nibble of `jcc`/`setcc`/`cmovcc` on
/// `rflags`: bit 0 negates, bits 3..1 pick the test.
pub(crate) fn condition_holds(cond: u8, flags: u64) -> bool {
    let f = |bit: u64| flags & bit != 0;
    let base = match (cond >> 1) & 7 {
        0 => f(OF),
        1 => f(CF),
        2 => f(ZF),
        3 => f(CF) || f(ZF),
        4 => f(SF),
        5 => f(PF),
        6 => f(SF) != f(OF),
        _ => f(ZF) || (f(SF) != f(OF)),
    };
    base != (cond & 1 != 0)
}

/// [`Arch::hijack_return`](crate::probes::arch::Arch::hijack_return): at the
/// first instruction the return address is the word at `[rsp]`.
#[inline]
pub(super) fn hijack_return(
    regs: &Regs,
    mem: &mut dyn DataMemory,
    trampoline: u64,
) -> Result<u64, ProbeError> {
    let original = mem.read_u64(regs.sp)?;
    mem.write_u64(regs.sp, trampoline)?;
    Ok(original)
}
