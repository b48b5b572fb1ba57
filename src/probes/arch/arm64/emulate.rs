//! Simulation of the PC-dependent arm64 instructions on [`Regs`].
//!
//! Invariant: all or nothing; the new state is built in a copy of the
//! registers and written back only once every memory access has succeeded. A
//! literal overlapping the probed instruction reads the original bytes from
//! the [`Insn`], and PSTATE.BTYPE (bits 11..10 of [`Regs::flags`]) is left as
//! on an unguarded page.
//!
//! Why, in full: [`crate::docs::algorithms::instructions`].

use super::super::{DataMemory, Emulation, Insn, InsnClass, Regs};
use super::decode::bits;
use crate::probes::error::ProbeError;

/// PSTATE.BTYPE in [`Regs::flags`].
pub(super) const BTYPE_MASK: u64 = 0b11 << 10;
/// BTYPE after `br` on an unguarded page.
const BTYPE_AFTER_BR: u64 = 0b01 << 10;
/// BTYPE after `blr`.
const BTYPE_AFTER_BLR: u64 = 0b10 << 10;

/// The link register.
const X30: u8 = 30;

/// Whether the A64 condition `cond` (0..15) holds for the NZCV flags in bits
/// 31..28 of `flags`. AL (0b1110) and NV (0b1111) both always hold.
pub(super) fn condition_holds(cond: u8, flags: u64) -> bool {
    let flag = |bit: u32| (flags >> bit) & 1 == 1;
    let (n, z, c, v) = (flag(31), flag(30), flag(29), flag(28));
    let base = match (cond >> 1) & 0b111 {
        0b000 => z,            // EQ / NE
        0b001 => c,            // CS / CC
        0b010 => n,            // MI / PL
        0b011 => v,            // VS / VC
        0b100 => c && !z,      // HI / LS
        0b101 => n == v,       // GE / LT
        0b110 => n == v && !z, // GT / LE
        _ => true,             // AL / NV
    };
    // The low bit inverts the test, except for NV which is a second AL.
    if cond & 1 == 1 && cond & 0b1111 != 0b1111 {
        !base
    } else {
        base
    }
}

/// Reads register `n` as an instruction's `Xn` operand: 31 is `xzr`.
fn read_x(regs: &Regs, n: u8) -> u64 {
    regs.gprs.get(usize::from(n)).copied().unwrap_or(0)
}

/// Writes register `n` as an instruction's `Xd` result: 31 (`xzr`) discards.
fn write_x(regs: &mut Regs, n: u8, value: u64) {
    if let Some(r) = regs.gprs.get_mut(usize::from(n)) {
        *r = value;
    }
}

fn mismatch(what: &'static str) -> ProbeError {
    ProbeError::PlanMismatch { what }
}

/// Applies the effect of the emulated arm64 instruction `insn` to `regs` and
/// `mem`, the PC included. See [`Arch::emulate`](super::super::Arch::emulate).
///
/// `b` and `bl`, the commonest simulated first instructions of a function,
/// are applied here, inline in the hit path (no call, no jump table: under
/// emulation every return is an indirect branch to look up); everything
/// else, and every error, is [`emulate_any`]'s, with the same effect.
#[inline(always)]
pub(super) fn emulate(
    insn: &Insn,
    regs: &mut Regs,
    mem: &mut dyn DataMemory,
) -> Result<(), ProbeError> {
    let (target, link) = match insn.class {
        InsnClass::Emulated(Emulation::Jump { target }) => (target, None),
        InsnClass::Emulated(Emulation::Call {
            target,
            return_addr,
        }) => (target, Some(return_addr)),
        _ => return emulate_any(insn, regs, mem),
    };
    // The length itself, not `bytes().len()`: no slice bounds check on the
    // hit path (the slice's length is `len`, which `emulate_any` checks).
    if insn.len != 4 {
        return emulate_any(insn, regs, mem);
    }
    if let Some(return_addr) = link {
        write_x(regs, X30, return_addr);
    }
    regs.flags &= !BTYPE_MASK;
    regs.ip = target;
    Ok(())
}

/// [`emulate`] of any instruction: the general case, out of line.
#[inline(never)]
fn emulate_any(insn: &Insn, regs: &mut Regs, mem: &mut dyn DataMemory) -> Result<(), ProbeError> {
    let InsnClass::Emulated(effect) = insn.class else {
        return Err(mismatch(
            "arm64 emulate of an instruction that is not emulated",
        ));
    };
    let Ok(word) = <[u8; 4]>::try_from(insn.bytes()).map(u32::from_le_bytes) else {
        return Err(mismatch(
            "arm64 emulate of an instruction that is not 4 bytes long",
        ));
    };
    // The effect is gathered first (at most one register written, the flags,
    // the PC) and applied only once nothing can fail: on error `regs` is
    // unchanged. Not a copy of the whole `Regs`, which at `opt-level = 1`
    // is a `memcpy` call on arm64, and the live trap path runs this code
    // (the call-graph walk of the trap path found it).
    let mut write: Option<(u8, u64)> = None;
    let mut flags = regs.flags & !BTYPE_MASK;
    let fall_through = insn.next_addr();
    let taken = |yes: bool, target: u64| if yes { target } else { fall_through };
    let ip = match effect {
        Emulation::Nop => fall_through,
        Emulation::Jump { target } => target,
        Emulation::Call {
            target,
            return_addr,
        } => {
            write = Some((X30, return_addr));
            target
        }
        Emulation::CondJump { cond, target } => taken(condition_holds(cond, regs.flags), target),
        Emulation::CompareBranch {
            reg,
            wide,
            nonzero,
            target,
        } => {
            let value = read_x(regs, reg);
            let value = if wide { value } else { value & 0xffff_ffff };
            taken((value != 0) == nonzero, target)
        }
        Emulation::TestBitBranch {
            reg,
            bit,
            nonzero,
            target,
        } => {
            let set = read_x(regs, reg).checked_shr(u32::from(bit)).unwrap_or(0) & 1 == 1;
            taken(set == nonzero, target)
        }
        Emulation::PcRelAddress { reg, value } => {
            write = Some((reg, value));
            fall_through
        }
        Emulation::LoadLiteral {
            reg,
            addr,
            size,
            signed,
        } => {
            write = Some((reg, load_literal(insn, addr, size, signed, mem)?));
            fall_through
        }
        Emulation::IndirectBranch {
            reg,
            link,
            return_addr,
        } => {
            // The target is read before the link is written: `blr x30`
            // branches to the old x30.
            let target = read_x(regs, reg);
            if link {
                write = Some((X30, return_addr));
            }
            flags |= match bits(word, 24, 21) {
                0b0000 => BTYPE_AFTER_BR,
                0b0001 => BTYPE_AFTER_BLR,
                _ => 0, // ret
            };
            target
        }
        _ => {
            return Err(mismatch(
                "arm64 emulate of another architecture's emulation",
            ))
        }
    };
    if let Some((reg, value)) = write {
        write_x(regs, reg, value);
    }
    regs.flags = flags;
    regs.ip = ip;
    Ok(())
}

/// Loads the `size`-byte literal at `addr`, zero- or sign-extended to 64 bits.
fn load_literal(
    insn: &Insn,
    addr: u64,
    size: u8,
    signed: bool,
    mem: &mut dyn DataMemory,
) -> Result<u64, ProbeError> {
    let mut raw = [0u8; 8];
    let buf = match size {
        4 | 8 => &mut raw[..usize::from(size)],
        _ => return Err(mismatch("arm64 literal load of a size other than 4 or 8")),
    };
    mem.read(addr, buf)?;
    // The text at the probed instruction holds our breakpoint now: a literal
    // overlapping it must see the instruction's own bytes.
    for (i, byte) in buf.iter_mut().enumerate() {
        let at = addr.wrapping_add(i as u64).wrapping_sub(insn.addr);
        if let Some(original) = usize::try_from(at).ok().and_then(|k| insn.bytes().get(k)) {
            *byte = *original;
        }
    }
    let value = u64::from_le_bytes(raw);
    Ok(match (size, signed) {
        (4, true) => value as u32 as i32 as i64 as u64,
        _ => value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nzcv(n: bool, z: bool, c: bool, v: bool) -> u64 {
        (u64::from(n) << 31) | (u64::from(z) << 30) | (u64::from(c) << 29) | (u64::from(v) << 28)
    }

    #[test]
    fn al_and_nv_always_hold() {
        for f in 0..16u64 {
            assert!(condition_holds(0b1110, f << 28));
            assert!(condition_holds(0b1111, f << 28));
        }
    }

    #[test]
    fn conditions_follow_the_architecture_table() {
        let flags = nzcv(true, false, true, false);
        assert!(!condition_holds(0x0, flags)); // EQ
        assert!(condition_holds(0x1, flags)); // NE
        assert!(condition_holds(0x2, flags)); // CS
        assert!(condition_holds(0x4, flags)); // MI
        assert!(condition_holds(0x8, flags)); // HI: C && !Z
        assert!(condition_holds(0xb, flags)); // LT: N != V
        assert!(condition_holds(0xd, flags)); // LE: Z || N != V
        assert!(!condition_holds(0xc, flags)); // GT
    }
}
