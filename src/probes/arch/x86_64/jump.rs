//! Jump-optimization safety: may a 5-byte `jmp rel32` replace the
//! instructions at a probe, and what do those instructions become when they
//! run from a detour?
//!
//! # The question
//!
//! An optimized probe writes `e9 rel32` over the first five bytes at the
//! probed address. The instructions those bytes belonged to (the
//! *displaced* instructions: whole instructions from the probe up to the
//! first boundary at or past five bytes) run instead from the site's detour
//! and the detour jumps back to the first byte after them. That is
//! equivalent to running them in place only if
//!
//! 1. **whole instructions, one function**: the displaced bytes end on an
//!    instruction boundary inside the function that contains the probe
//!    (decoded linearly from its symbol's start);
//! 2. **nothing lands inside**: no direct branch anywhere in the function
//!    (`jmp`, `jcc`, `call`, `loop`, `jrcxz`, `xbegin`) targets a byte
//!    strictly inside the displaced range: it would execute the middle of
//!    the `jmp`'s displacement. The whole function is decoded, not just the
//!    bytes after the probe;
//! 3. **no jump tables**: the function has no indirect `jmp` (its targets
//!    are not known, a `switch` table could point inside), and no byte of
//!    it fails to decode (data in text could hide anything);
//! 4. **relocatable**: every displaced instruction falls through (iced's
//!    flow control `Next`: no call, return, branch, `int3`, `syscall`...),
//!    is one the XOL machinery accepts (`Arch::analyze`'s refusals apply),
//!    and reads the IP only through a RIP-relative memory operand, which is
//!    re-encoded for the detour's address with the same absolute target.
//!
//! What this file cannot see, the runtime checks: the refused ranges, other
//! probes inside the displaced bytes, and that no thread is inside them.
//!
//! # What it does not prove
//!
//! Indirect transfers from *outside* the function (an exception landing
//! pad, a `longjmp` target, a computed `goto` address taken elsewhere) into
//! the displaced bytes are not looked for: compilers place landing pads
//! after calls, and a call inside the displaced bytes is refused, but a
//! landing pad right after a call that precedes the probe by less than five
//! bytes is not. `docs::limitations` says so.

use iced_x86::{Decoder, DecoderOptions, Encoder, FlowControl, Instruction};

use super::classify;
use crate::probes::arch::{Emulation, InsnClass};

/// Bytes of the `jmp rel32` an optimized probe writes.
pub const JUMP_LEN: usize = 5;

/// Most bytes the displaced instructions can span: an instruction starting
/// at the probe's fifth byte may be 15 bytes long.
pub const MAX_DISPLACED: usize = JUMP_LEN - 1 + 15;

/// Why a probe site cannot be jump-optimized. The probe keeps its `int3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JumpRefusal {
    /// The displaced instructions would run past the function's end.
    PastFunctionEnd {
        /// First byte after the function.
        func_end: u64,
    },
    /// The probe is not on an instruction boundary of the linear decode.
    NotOnBoundary,
    /// Bytes of the function do not decode (data in text?).
    Undecodable {
        /// Where decoding failed.
        at: u64,
    },
    /// A direct branch of the function lands strictly inside the displaced
    /// bytes.
    BranchIntoDisplaced {
        /// The branch.
        from: u64,
        /// Its target.
        target: u64,
    },
    /// The function has an indirect jump (a jump table could point inside).
    IndirectJump {
        /// The jump.
        at: u64,
    },
    /// A displaced instruction changes the flow (call, return, branch, trap,
    /// system call): it cannot run from the detour.
    DisplacedControlFlow {
        /// The instruction.
        at: u64,
    },
    /// A displaced instruction is refused by the XOL analysis, or cannot be
    /// re-encoded at the detour (a RIP-relative target out of reach).
    NotRelocatable {
        /// The instruction.
        at: u64,
    },
    /// Another probe sits strictly inside the displaced bytes.
    OtherProbeInside {
        /// That probe's address.
        at: u64,
    },
    /// The displaced bytes overlap code the runtime never patches.
    RefusedRange,
    /// The site has a post handler (run only on the trap path, as in the
    /// kernel) or is a kind the detour does not serve.
    NeedsTrapPath,
    /// Optimization is switched off, for this probe or for the registry.
    OptedOut,
    /// The site's function is unknown (no symbol covers it).
    NoFunction,
    /// No detour slot within reach of a `jmp rel32`.
    NoDetourSlot,
    /// The quiescence wait could not prove that no thread was inside the
    /// displaced bytes (or in the site's XOL slot, on its way back into
    /// them).
    NotQuiescent,
    /// The text could not be read or written.
    TextAccess,
    /// The uprobe is also installed at `with` (its file mapped twice) and
    /// that install is optimized or being optimized: a uprobe's trap hits
    /// can resume in one detour only.
    SharedUprobe {
        /// The other install's address.
        with: u64,
    },
}

impl std::fmt::Display for JumpRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JumpRefusal::PastFunctionEnd { func_end } => {
                write!(
                    f,
                    "the displaced bytes run past the function's end {func_end:#x}"
                )
            }
            JumpRefusal::NotOnBoundary => write!(f, "not on an instruction boundary"),
            JumpRefusal::Undecodable { at } => write!(f, "undecodable bytes at {at:#x}"),
            JumpRefusal::BranchIntoDisplaced { from, target } => write!(
                f,
                "the branch at {from:#x} lands at {target:#x}, inside the displaced bytes"
            ),
            JumpRefusal::IndirectJump { at } => {
                write!(
                    f,
                    "indirect jump at {at:#x} (a jump table could land inside)"
                )
            }
            JumpRefusal::DisplacedControlFlow { at } => {
                write!(f, "the displaced instruction at {at:#x} changes the flow")
            }
            JumpRefusal::NotRelocatable { at } => {
                write!(
                    f,
                    "the displaced instruction at {at:#x} cannot be relocated"
                )
            }
            JumpRefusal::OtherProbeInside { at } => {
                write!(f, "another probe at {at:#x} is inside the displaced bytes")
            }
            JumpRefusal::RefusedRange => write!(f, "the displaced bytes are in a refused range"),
            JumpRefusal::NeedsTrapPath => write!(f, "a member needs the trap path (post handler)"),
            JumpRefusal::OptedOut => write!(f, "optimization is switched off"),
            JumpRefusal::NoFunction => write!(f, "no function symbol covers the probe"),
            JumpRefusal::NoDetourSlot => write!(f, "no detour slot within reach"),
            JumpRefusal::NotQuiescent => {
                write!(
                    f,
                    "no proof that every thread is outside the displaced bytes"
                )
            }
            JumpRefusal::TextAccess => write!(f, "the text could not be read or written"),
            JumpRefusal::SharedUprobe { with } => write!(
                f,
                "the uprobe's install at {with:#x} is optimized (one detour per uprobe)"
            ),
        }
    }
}

/// A site found safe to optimize: the displaced instructions' original
/// bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JumpSite {
    /// The probed address.
    pub addr: u64,
    /// Bytes displaced (at least [`JUMP_LEN`]).
    pub len: u8,
    bytes: [u8; MAX_DISPLACED],
}

impl JumpSite {
    /// The displaced instructions' original bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The first byte after the displaced instructions (where the detour
    /// jumps back to).
    pub fn resume_addr(&self) -> u64 {
        self.addr + u64::from(self.len)
    }

    /// The displaced instructions re-encoded to run at `at` (a detour):
    /// byte for byte the originals except RIP-relative operands, whose
    /// displacement is recomputed for the same absolute target.
    ///
    /// # Errors
    /// [`JumpRefusal::NotRelocatable`] if a target is out of `rel32` reach
    /// from `at`.
    pub fn relocate(&self, at: u64) -> Result<Vec<u8>, JumpRefusal> {
        let mut out = Vec::with_capacity(usize::from(self.len) + 4);
        let mut dec = Decoder::with_ip(64, self.bytes(), self.addr, DecoderOptions::NONE);
        let mut ins = Instruction::default();
        while dec.can_decode() {
            let ip = dec.ip();
            dec.decode_out(&mut ins);
            let off = (ip - self.addr) as usize;
            let raw = &self.bytes[off..off + ins.len()];
            if ins.is_ip_rel_memory_operand() {
                let here = at + out.len() as u64;
                let mut enc = Encoder::new(64);
                enc.encode(&ins, here)
                    .map_err(|_| JumpRefusal::NotRelocatable { at: ip })?;
                out.extend_from_slice(&enc.take_buffer());
            } else {
                out.extend_from_slice(raw);
            }
        }
        Ok(out)
    }
}

/// Decides whether the probe at `addr` may be jump-optimized. `func_text`
/// holds the whole function from `func_start` (its symbol's extent), with
/// the original bytes wherever a breakpoint or jump of ours is written.
///
/// # Errors
/// The first [`JumpRefusal`] found.
pub fn analyze_jump_site(
    func_start: u64,
    func_text: &[u8],
    addr: u64,
) -> Result<JumpSite, JumpRefusal> {
    let func_end = func_start + func_text.len() as u64;
    if addr < func_start || addr >= func_end {
        return Err(JumpRefusal::NotOnBoundary);
    }
    // Pass 1: the displaced range, on the linear decode's boundaries.
    let mut dec = Decoder::with_ip(64, func_text, func_start, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    let mut end = None;
    let mut insns: Vec<(u64, usize)> = Vec::new();
    while dec.can_decode() {
        let ip = dec.ip();
        dec.decode_out(&mut ins);
        if ins.is_invalid() {
            return Err(JumpRefusal::Undecodable { at: ip });
        }
        if ip < addr && ins.next_ip() > addr {
            return Err(JumpRefusal::NotOnBoundary);
        }
        if ip >= addr && end.is_none() {
            insns.push((ip, ins.len()));
            if ins.next_ip() >= addr + JUMP_LEN as u64 {
                end = Some(ins.next_ip());
            }
        }
    }
    let Some(end) = end else {
        return Err(JumpRefusal::PastFunctionEnd { func_end });
    };
    // Pass 2: branches and indirect jumps anywhere in the function.
    let mut dec = Decoder::with_ip(64, func_text, func_start, DecoderOptions::NONE);
    while dec.can_decode() {
        let ip = dec.ip();
        dec.decode_out(&mut ins);
        match ins.flow_control() {
            FlowControl::IndirectBranch => return Err(JumpRefusal::IndirectJump { at: ip }),
            FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch
            | FlowControl::Call
            | FlowControl::XbeginXabortXend
                if has_near_target(&ins) =>
            {
                let t = ins.near_branch_target();
                if t > addr && t < end {
                    return Err(JumpRefusal::BranchIntoDisplaced {
                        from: ip,
                        target: t,
                    });
                }
            }
            _ => {}
        }
    }
    // Pass 3: each displaced instruction runs from anywhere.
    for &(ip, len) in &insns {
        let off = (ip - func_start) as usize;
        let raw = &func_text[off..off + len];
        let one = Decoder::with_ip(64, raw, ip, DecoderOptions::NONE).decode();
        if one.flow_control() != FlowControl::Next {
            return Err(JumpRefusal::DisplacedControlFlow { at: ip });
        }
        match classify::analyze(ip, raw) {
            Ok(insn) => match insn.class {
                InsnClass::OutOfLine | InsnClass::PcRelative => {}
                InsnClass::Emulated(Emulation::Nop | Emulation::PushReg { .. }) => {}
                InsnClass::Emulated(_) => return Err(JumpRefusal::DisplacedControlFlow { at: ip }),
            },
            Err(_) => return Err(JumpRefusal::NotRelocatable { at: ip }),
        }
    }
    let len = (end - addr) as usize;
    let off = (addr - func_start) as usize;
    let mut bytes = [0u8; MAX_DISPLACED];
    bytes[..len].copy_from_slice(&func_text[off..off + len]);
    Ok(JumpSite {
        addr,
        len: len as u8,
        bytes,
    })
}

/// Whether `ins` has a direct (immediate) branch target.
fn has_near_target(ins: &Instruction) -> bool {
    use iced_x86::OpKind;
    (0..ins.op_count()).any(|i| {
        matches!(
            ins.op_kind(i),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x40_0000;

    #[test]
    fn a_plain_prologue_is_accepted_and_displaces_whole_instructions() {
        // push rbp; mov rbp,rsp; push rbx; sub rsp,8; ... ret
        let f = [
            0x55, 0x48, 0x89, 0xe5, 0x53, 0x48, 0x83, 0xec, 0x08, 0x31, 0xc0, 0xc3,
        ];
        let s = analyze_jump_site(BASE, &f, BASE).unwrap();
        assert_eq!(s.len, 5);
        assert_eq!(s.bytes(), &f[..5]);
        assert_eq!(s.relocate(0x1000).unwrap(), f[..5].to_vec());
    }

    #[test]
    fn a_branch_into_the_displaced_bytes_is_refused() {
        // 0: push rbp; 1: mov rbp,rsp; 4: nop; 5: nop; 6: jmp 1
        let f = [0x55, 0x48, 0x89, 0xe5, 0x90, 0x90, 0xeb, 0xf9, 0xc3];
        assert_eq!(
            analyze_jump_site(BASE, &f, BASE),
            Err(JumpRefusal::BranchIntoDisplaced {
                from: BASE + 6,
                target: BASE + 1
            })
        );
    }

    #[test]
    fn a_branch_to_the_probe_itself_is_fine() {
        let f = [0x55, 0x48, 0x89, 0xe5, 0x90, 0x90, 0xeb, 0xf8, 0xc3];
        assert!(analyze_jump_site(BASE, &f, BASE).is_ok());
    }

    #[test]
    fn an_indirect_jump_anywhere_is_refused() {
        // push rbp; mov rbp,rsp; nop; nop; jmp rax
        let f = [0x55, 0x48, 0x89, 0xe5, 0x90, 0x90, 0xff, 0xe0];
        assert_eq!(
            analyze_jump_site(BASE, &f, BASE),
            Err(JumpRefusal::IndirectJump { at: BASE + 6 })
        );
    }

    #[test]
    fn a_call_among_the_displaced_instructions_is_refused() {
        // push rbp; call +0; ret
        let f = [0x55, 0xe8, 0, 0, 0, 0, 0xc3];
        assert_eq!(
            analyze_jump_site(BASE, &f, BASE),
            Err(JumpRefusal::DisplacedControlFlow { at: BASE + 1 })
        );
    }

    #[test]
    fn a_rip_relative_operand_keeps_its_absolute_target_in_the_detour() {
        // mov rax,[rip+0x100]; ret
        let f = [0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0xc3];
        let s = analyze_jump_site(BASE, &f, BASE).unwrap();
        assert_eq!(s.len, 7);
        let at = BASE + 0x1000_0000;
        let moved = s.relocate(at).unwrap();
        let ins = Decoder::with_ip(64, &moved, at, DecoderOptions::NONE).decode();
        assert_eq!(ins.memory_displacement64(), BASE + 7 + 0x100);
        // Out of reach: refused, not wrapped.
        assert!(s.relocate(BASE + (3 << 31)).is_err());
    }

    #[test]
    fn too_few_bytes_before_the_end_are_refused() {
        let f = [0x55, 0xc3];
        assert!(matches!(
            analyze_jump_site(BASE, &f, BASE),
            Err(JumpRefusal::PastFunctionEnd { .. })
        ));
    }
}
