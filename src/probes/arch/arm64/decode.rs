//! The arm64 classifier: one 32-bit word in, an [`InsnClass`] or a refusal
//! reason out.
//!
//! Only what a probe needs is decoded: whatever neither reads nor writes the
//! PC is [`InsnClass::OutOfLine`]; the PC-dependent instructions become an
//! [`Emulation`], with targets and literal addresses computed here from the
//! instruction's own address; reserved groups and SVE/SME are refused.
//!
//! What is decoded and which instructions are simulated:
//! [`crate::docs::algorithms::instructions`].

use super::super::{Emulation, InsnClass};
use crate::probes::error::Unsupported;

/// Refusal reason: SVE and SME encodings are not classified.
const SCALABLE_VECTOR: Unsupported =
    Unsupported::Other("SVE/SME instructions are not classified by the arm64 backend");
/// Refusal reason: literal loads into SIMD&FP registers.
const SIMD_LITERAL: Unsupported = Unsupported::Other(
    "SIMD&FP literal load: it reads PC-relative memory into a vector register, which Regs \
     does not carry, so it can be neither simulated nor stepped out of line",
);
/// Refusal reason: pointer-authenticated register branches.
const AUTHENTICATED_BRANCH: Unsupported = Unsupported::Other(
    "pointer-authenticated branch (BRA*/BLRA*/RETA*): simulating it needs the PAC keys, and \
     as a branch it cannot run out of line",
);
/// Refusal reason: BC.cond.
const CONSISTENT_BRANCH: Unsupported =
    Unsupported::Other("BC.cond (FEAT_HBC) is not simulated by the arm64 backend");
/// Refusal reason: FEAT_MOPS memory copy/set.
const MEMORY_COPY_SET: Unsupported = Unsupported::Other(
    "memory copy/set (CPY*/SET*, FEAT_MOPS): prologue, main and epilogue must run back to \
     back in place",
);
/// Refusal reason: hints outside the allow-list.
const UNLISTED_HINT: Unsupported = Unsupported::Other(
    "hint not on the arm64 allow-list (WFI, ESB, PSB, TSB, GCSB, CHKFEAT or unallocated): its \
     effect from an XOL slot is unknown",
);

/// Classifies the instruction `word` located at `addr`.
///
/// # Errors
/// The reason the instruction cannot be probed.
pub(super) fn classify(addr: u64, word: u32) -> Result<InsnClass, Unsupported> {
    match bits(word, 28, 25) {
        0b0000 => Err(if word >> 31 == 1 {
            SCALABLE_VECTOR
        } else if word >> 16 == 0 {
            // UDF #imm16: permanently undefined, raises an exception by design.
            Unsupported::ExceptionGenerating
        } else {
            Unsupported::Undecodable
        }),
        0b0010 => Err(SCALABLE_VECTOR),
        0b0001 | 0b0011 => Err(Unsupported::Undecodable),
        0b1000 | 0b1001 => Ok(data_processing_immediate(addr, word)),
        0b1010 | 0b1011 => branch_exception_system(addr, word),
        0b0100 | 0b0110 | 0b1100 | 0b1110 => load_store(addr, word),
        // x101: data processing (register); x111: SIMD&FP data processing.
        // Neither group can name the PC.
        _ => Ok(InsnClass::OutOfLine),
    }
}

/// Bits `hi..=lo` of `word`, right-aligned.
pub(super) fn bits(word: u32, hi: u32, lo: u32) -> u32 {
    (word >> lo) & ((1u32 << (hi - lo + 1)) - 1)
}

/// `field` (of width `width`) sign-extended to 64 bits.
fn sign_extend(field: u32, width: u32) -> i64 {
    let shift = 64 - width;
    ((u64::from(field) << shift) as i64) >> shift
}

/// `addr + offset`, wrapping like the hardware's 64-bit address arithmetic.
fn relative(addr: u64, offset: i64) -> u64 {
    addr.wrapping_add(offset as u64)
}

/// Register field at bits `lo + 4 ..= lo`.
fn reg(word: u32, lo: u32) -> u8 {
    bits(word, lo + 4, lo) as u8
}

/// `imm19` at bits 23..5, scaled by 4 and sign-extended: the branch and
/// literal offset of B.cond, CBZ/CBNZ and LDR (literal).
fn imm19_offset(word: u32) -> i64 {
    sign_extend(bits(word, 23, 5), 19) * 4
}

fn emulated(e: Emulation) -> InsnClass {
    InsnClass::Emulated(e)
}

/// Bits 28..25 = 100x.
fn data_processing_immediate(addr: u64, word: u32) -> InsnClass {
    // ADR / ADRP: op immlo 10000 immhi Rd.
    if bits(word, 28, 24) != 0b10000 {
        return InsnClass::OutOfLine;
    }
    let imm = sign_extend((bits(word, 23, 5) << 2) | bits(word, 30, 29), 21);
    let value = if word >> 31 == 0 {
        relative(addr, imm)
    } else {
        relative(addr & !0xfff, imm << 12)
    };
    emulated(Emulation::PcRelAddress {
        reg: reg(word, 0),
        value,
    })
}

/// Bits 28..25 = 101x.
fn branch_exception_system(addr: u64, word: u32) -> Result<InsnClass, Unsupported> {
    match bits(word, 31, 29) {
        // B / BL: op 00101 imm26.
        0b000 | 0b100 => {
            let target = relative(addr, sign_extend(bits(word, 25, 0), 26) * 4);
            Ok(emulated(if word >> 31 == 0 {
                Emulation::Jump { target }
            } else {
                Emulation::Call {
                    target,
                    return_addr: addr.wrapping_add(4),
                }
            }))
        }
        0b001 | 0b101 => Ok(emulated(if bits(word, 25, 25) == 0 {
            // CBZ / CBNZ: sf 011010 op imm19 Rt.
            Emulation::CompareBranch {
                reg: reg(word, 0),
                wide: word >> 31 == 1,
                nonzero: bits(word, 24, 24) == 1,
                target: relative(addr, imm19_offset(word)),
            }
        } else {
            // TBZ / TBNZ: b5 011011 op b40 imm14 Rt.
            Emulation::TestBitBranch {
                reg: reg(word, 0),
                bit: ((word >> 31) << 5 | bits(word, 23, 19)) as u8,
                nonzero: bits(word, 24, 24) == 1,
                target: relative(addr, sign_extend(bits(word, 18, 5), 14) * 4),
            }
        })),
        0b010 => match (bits(word, 25, 24), bits(word, 4, 4)) {
            // B.cond: 0101010 0 imm19 0 cond.
            (0b00, 0) => Ok(emulated(Emulation::CondJump {
                cond: bits(word, 3, 0) as u8,
                target: relative(addr, imm19_offset(word)),
            })),
            (0b00, 1) => Err(CONSISTENT_BRANCH),
            _ => Err(Unsupported::Undecodable),
        },
        0b110 => match bits(word, 25, 24) {
            0b00 => Err(exception_generating(word)),
            0b01 => system(word),
            _ => branch_register(addr, word),
        },
        _ => Err(Unsupported::Undecodable),
    }
}

/// `11010100 opc imm16 op2 LL`: every member is refused; the reason depends
/// on which exception it raises.
fn exception_generating(word: u32) -> Unsupported {
    if bits(word, 4, 2) != 0 {
        return Unsupported::Undecodable;
    }
    match (bits(word, 23, 21), bits(word, 1, 0)) {
        (0b000, 0b01) => Unsupported::SystemCall,        // SVC
        (0b000, 0b10 | 0b11) => Unsupported::Privileged, // HVC, SMC
        (0b001, 0b00) | (0b010, 0b00) => Unsupported::Breakpoint, // BRK, HLT
        (0b011, 0b00) => Unsupported::Transactional,     // TCANCEL
        (0b101, 0b01..=0b11) => Unsupported::Privileged, // DCPS1..3
        _ => Unsupported::Undecodable,
    }
}

/// `1101010100 L op0 op1 CRn CRm op2 Rt`: hints and barriers are sorted out,
/// every other system instruction (MSR/MRS, SYS/SYSL, MSR immediate to
/// PSTATE, WFET/WFIT, TSTART...) is refused.
fn system(word: u32) -> Result<InsnClass, Unsupported> {
    let rt_is_zr = bits(word, 4, 0) == 0b11111;
    if bits(word, 31, 12) == 0xd5032 && rt_is_zr {
        return hint(bits(word, 11, 5));
    }
    if bits(word, 31, 12) == 0xd5033 && rt_is_zr {
        return match (bits(word, 7, 5), bits(word, 11, 8)) {
            // CLREX, DSB, DMB, ISB, SB: they order or synchronise this PE's
            // own accesses and context; none depends on where it runs.
            (0b010 | 0b100 | 0b101 | 0b110 | 0b111, _) => Ok(InsnClass::OutOfLine),
            (0b011, 0b0000) => Err(Unsupported::Transactional), // TCOMMIT
            _ => Err(Unsupported::System),
        };
    }
    // TSTART / TTEST: transactional memory, like TCOMMIT and TCANCEL.
    if word & 0xffff_fee0 == 0xd523_3060 {
        return Err(Unsupported::Transactional);
    }
    Err(Unsupported::System)
}

/// The hint space, `CRm:op2` = `h`.
fn hint(h: u32) -> Result<InsnClass, Unsupported> {
    match h {
        // NOP: nothing to do but advance the PC.
        0 => Ok(emulated(Emulation::Nop)),
        // BTI c/j/jc: a no-op when executed. The landing-pad check it stands
        // for happens on arrival, where our BRK (exempt from the check) sits.
        32 | 34 | 36 | 38 => Ok(emulated(Emulation::Nop)),
        // YIELD, WFE, SEV, SEVL, DGH, XPACLRI, PAC*/AUT*1716, CSDB, CLRBHB,
        // PAC*/AUT*Z and *SP: they act on timing, events or general
        // registers (x16, x17, x30, sp), never on the PC.
        1 | 2 | 4..=8 | 10 | 12 | 14 | 20 | 22 | 24..=31 => Ok(InsnClass::OutOfLine),
        _ => Err(UNLISTED_HINT),
    }
}

/// `1101011 opc op2 op3 Rn op4`.
fn branch_register(addr: u64, word: u32) -> Result<InsnClass, Unsupported> {
    let opc = bits(word, 24, 21);
    let op3 = bits(word, 15, 10);
    if bits(word, 20, 16) != 0b11111 {
        return Err(Unsupported::Undecodable);
    }
    match opc {
        // BR, BLR, RET (plain forms: op3 = op4 = 0).
        0b0000..=0b0010 if op3 == 0 && bits(word, 4, 0) == 0 => {
            Ok(emulated(Emulation::IndirectBranch {
                reg: reg(word, 5),
                link: opc == 0b0001,
                return_addr: addr.wrapping_add(4),
            }))
        }
        // ERET, ERETAA/AB, DRPS: exception returns, EL1 and above only.
        0b0100 | 0b0101 => Err(Unsupported::Privileged),
        // BRA*, BLRA*, RETA*: op3 = 00001M.
        _ if op3 >> 1 == 1 => Err(AUTHENTICATED_BRANCH),
        _ => Err(Unsupported::Undecodable),
    }
}

/// Bits 28..25 = x1x0.
fn load_store(addr: u64, word: u32) -> Result<InsnClass, Unsupported> {
    // LDR (literal): opc 011 V 00 imm19 Rt.
    if word & 0x3b00_0000 == 0x1800_0000 {
        return load_literal(addr, word);
    }
    // Load/store exclusive, ordered, compare-and-swap: size 001000 o2 L o1 ...
    if bits(word, 29, 24) == 0b00_1000 {
        let ordered_or_cas = bits(word, 23, 23) == 1;
        let casp = bits(word, 21, 21) == 1 && word >> 31 == 0;
        return if ordered_or_cas || casp {
            // LDAR/STLR/LDLAR/STLLR and CAS/CASP: single instructions with
            // no monitor state left behind, and no PC operand.
            Ok(InsnClass::OutOfLine)
        } else {
            Err(Unsupported::Exclusive)
        };
    }
    // FEAT_MOPS: sz 011 o0 01 op1 0 Rs op2 01 Rn Rd.
    if word & 0x3b20_0c00 == 0x1900_0400 {
        return Err(MEMORY_COPY_SET);
    }
    Ok(InsnClass::OutOfLine)
}

/// `opc 011 V 00 imm19 Rt`.
fn load_literal(addr: u64, word: u32) -> Result<InsnClass, Unsupported> {
    let literal = relative(addr, imm19_offset(word));
    let load = |size, signed| {
        emulated(Emulation::LoadLiteral {
            reg: reg(word, 0),
            addr: literal,
            size,
            signed,
        })
    };
    match (bits(word, 26, 26), bits(word, 31, 30)) {
        (0, 0b00) => Ok(load(4, false)), // LDR Wt
        (0, 0b01) => Ok(load(8, false)), // LDR Xt
        (0, 0b10) => Ok(load(4, true)),  // LDRSW
        // PRFM (literal): a prefetch hint, architecturally no effect.
        (0, _) => Ok(emulated(Emulation::Nop)),
        (1, 0b11) => Err(Unsupported::Undecodable),
        _ => Err(SIMD_LITERAL),
    }
}
