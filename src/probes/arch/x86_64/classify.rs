//! Decoding, instruction boundaries and classification for x86_64.

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic, Register};

use crate::probes::arch::{Emulation, Insn, InsnClass};
use crate::probes::error::{ProbeError, TextFailure, Unsupported};

/// Longest x86 instruction in bytes (architectural limit).
pub(crate) const MAX_INSN_LEN: usize = 15;

/// Decodes the one instruction at `addr` (bytes beyond 15 are ignored).
pub(super) fn decode_one(addr: u64, bytes: &[u8]) -> Result<Instruction, ProbeError> {
    let bytes = &bytes[..bytes.len().min(MAX_INSN_LEN)];
    let mut decoder = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE);
    let ins = decoder.decode();
    if ins.is_invalid() {
        let reason = invalid_reason(bytes, decoder.last_error());
        return Err(ProbeError::UnsupportedInstruction { addr, reason });
    }
    Ok(ins)
}

/// Why `bytes` (starting at an instruction) did not decode. The decoder
/// reports running out of bytes even for an opcode that is invalid anyway
/// (e.g. a lone `06`), so "truncated" is only claimed when more bytes would
/// have made a valid instruction.
fn invalid_reason(bytes: &[u8], error: DecoderError) -> Unsupported {
    if error != DecoderError::NoMoreBytes {
        return Unsupported::Undecodable;
    }
    let mut padded = [0u8; MAX_INSN_LEN];
    let n = bytes.len().min(MAX_INSN_LEN);
    padded[..n].copy_from_slice(&bytes[..n]);
    let ins = Decoder::new(64, &padded, DecoderOptions::NONE).decode();
    if ins.is_invalid() {
        Unsupported::Undecodable
    } else {
        Unsupported::Truncated
    }
}

/// [`Arch::analyze`](crate::probes::arch::Arch::analyze) for x86_64.
pub(super) fn analyze(addr: u64, bytes: &[u8]) -> Result<Insn, ProbeError> {
    let ins = decode_one(addr, bytes)?;
    let raw = &bytes[..ins.len()];
    if let Some(reason) = refusal(&ins, raw) {
        return Err(ProbeError::UnsupportedInstruction { addr, reason });
    }
    let class = if let Some(e) = emulation(&ins) {
        InsnClass::Emulated(e)
    } else if ins.is_ip_rel_memory_operand() {
        InsnClass::PcRelative
    } else {
        InsnClass::OutOfLine
    };
    let insn = Insn::new(addr, raw, class);
    if class == InsnClass::PcRelative {
        super::xol::check_rewritable(&insn, &ins)?;
    }
    Ok(insn)
}

/// [`Arch::check_boundary`](crate::probes::arch::Arch::check_boundary):
/// linear decode from the function start. Linear decoding is what compilers'
/// output supports (no data in text between a function's start and its
/// instructions); a function with embedded data before `addr` may be refused
/// as undecodable, never accepted wrongly past a valid decode.
pub(super) fn check_boundary(func_start: u64, text: &[u8], addr: u64) -> Result<(), ProbeError> {
    let end = func_start.saturating_add(text.len() as u64);
    if addr < func_start || addr >= end {
        return Err(ProbeError::TextAccess {
            addr,
            len: 1,
            failure: TextFailure::OutOfRange,
        });
    }
    let mut decoder = Decoder::with_ip(64, text, func_start, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    while decoder.can_decode() {
        let ip = decoder.ip();
        decoder.decode_out(&mut ins);
        if ins.is_invalid() {
            let at = (ip - func_start) as usize;
            let reason = invalid_reason(&text[at..], decoder.last_error());
            return Err(ProbeError::UnsupportedInstruction { addr: ip, reason });
        }
        if ip == addr {
            return Ok(());
        }
        if addr < ins.next_ip() {
            return Err(ProbeError::NotOnInstructionBoundary {
                addr,
                insn_start: ip,
            });
        }
    }
    // Unreachable for addr inside the text: every byte belongs to a decoded
    // instruction or to an invalid one reported above.
    Err(ProbeError::TextAccess {
        addr,
        len: 1,
        failure: TextFailure::OutOfRange,
    })
}

/// Why `ins` must not be probed, if it must not.
fn refusal(ins: &Instruction, raw: &[u8]) -> Option<Unsupported> {
    use Mnemonic as M;
    let reason = match ins.mnemonic() {
        // Our own trap instruction, and the other debug traps: a probe on
        // them would make the program's trap indistinguishable from ours.
        M::Int3 | M::Int1 | M::Into => Unsupported::Breakpoint,
        M::Int if ins.immediate8() == 3 => Unsupported::Breakpoint,
        // The kernel sees the slot address as the user IP (restart, vsyscall
        // emulation, seccomp reports): it must run in place.
        M::Int | M::Syscall | M::Sysenter => Unsupported::SystemCall,
        M::Sysexit | M::Sysexitq | M::Sysret | M::Sysretq => Unsupported::Privileged,
        M::Vmcall | M::Vmmcall | M::Vmfunc | M::Tdcall => Unsupported::Privileged,
        M::Ud0 | M::Ud1 | M::Ud2 => Unsupported::ExceptionGenerating,
        M::Iret | M::Iretd | M::Iretq | M::Retf | M::Uiret => Unsupported::FarTransfer,
        // Under the trap flag, pushf would store TF=1 in the program's flags
        // image and popf could clear our TF or set a stale one.
        M::Pushf | M::Pushfd | M::Pushfq | M::Popf | M::Popfd | M::Popfq => {
            Unsupported::TouchesTrapFlag
        }
        M::Xbegin => Unsupported::Transactional,
        M::Enclu | M::Encls | M::Enclv => Unsupported::Other("it enters or leaves an SGX enclave"),
        M::Loop | M::Loope | M::Loopne | M::Jrcxz | M::Jecxz | M::Jcxz => {
            Unsupported::RelativeBranchForm
        }
        _ => return other_refusal(ins, raw),
    };
    Some(reason)
}

fn other_refusal(ins: &Instruction, raw: &[u8]) -> Option<Unsupported> {
    if ins.is_privileged() {
        return Some(Unsupported::Privileged);
    }
    if ins.is_call_far()
        || ins.is_jmp_far()
        || ins.is_call_far_indirect()
        || ins.is_jmp_far_indirect()
    {
        return Some(Unsupported::FarTransfer);
    }
    // mov ss / pop ss suppress the debug trap for one more instruction, which
    // would run past the slot's copy before the step trap fires.
    let writes_ss = matches!(
        ins.code(),
        Code::Mov_Sreg_rm16 | Code::Mov_Sreg_r32m16 | Code::Mov_Sreg_r64m16
    ) && ins.op0_register() == Register::SS;
    if writes_ss || ins.code() == Code::Popw_SS || ins.code() == Code::Popd_SS {
        return Some(Unsupported::InhibitsSingleStep);
    }
    // A 0x66 prefix on a near branch, call or return selects a 16-bit IP on
    // AMD and is ignored on Intel: no single emulation or fixup is right.
    if ins.flow_control() != iced_x86::FlowControl::Next && has_operand_size_prefix(raw) {
        return Some(Unsupported::RelativeBranchForm);
    }
    if ins.memory_base() == Register::EIP {
        return Some(Unsupported::Other(
            "its EIP-relative operand (address-size prefix) wraps at 4 GiB",
        ));
    }
    None
}

/// Whether the prefixes of `raw` include the operand-size prefix. A REX
/// byte followed by more prefixes is ignored by the CPU but does not end the
/// prefix run, so it is skipped like the legacy prefixes.
fn has_operand_size_prefix(raw: &[u8]) -> bool {
    for &b in raw {
        match b {
            0x66 => return true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x67 | 0xf0 | 0xf2 | 0xf3 | 0x40..=0x4f => {}
            _ => return false,
        }
    }
    false
}

/// The emulation of `ins`, if it is one the backend emulates.
fn emulation(ins: &Instruction) -> Option<Emulation> {
    match ins.mnemonic() {
        // endbr is a nop unless indirect-branch tracking is on, and emulating
        // it never performs an indirect branch.
        Mnemonic::Nop | Mnemonic::Endbr64 | Mnemonic::Endbr32 => return Some(Emulation::Nop),
        _ => {}
    }
    if ins.is_jmp_short_or_near() {
        return Some(Emulation::Jump {
            target: ins.near_branch_target(),
        });
    }
    if ins.is_jcc_short_or_near() {
        // iced numbers conditions from 1 (o) in tttn order; 0 is "none".
        let cc = ins.condition_code() as u8;
        return Some(Emulation::CondJump {
            cond: cc.checked_sub(1)?,
            target: ins.near_branch_target(),
        });
    }
    if ins.is_call_near() {
        return Some(Emulation::Call {
            target: ins.near_branch_target(),
            return_addr: ins.next_ip(),
        });
    }
    if ins.code() == Code::Push_r64 {
        return Some(Emulation::PushReg {
            reg: ins.op0_register().number() as u8,
        });
    }
    None
}
