//! x86_64 register names over the arch-neutral [`Regs`].

use std::ops::{Index, IndexMut};

use crate::probes::arch::Regs;

/// The trap flag in `rflags`: a debug trap after the next instruction.
pub(crate) const TF: u64 = 1 << 8;
/// Carry flag.
pub(crate) const CF: u64 = 1;
/// Parity flag.
pub(crate) const PF: u64 = 1 << 2;
/// Zero flag.
pub(crate) const ZF: u64 = 1 << 6;
/// Sign flag.
pub(crate) const SF: u64 = 1 << 7;
/// Overflow flag.
pub(crate) const OF: u64 = 1 << 11;

/// x86_64 general registers by hardware number, for indexing [`Regs`].
///
/// `regs[X86Reg::Rsp]` is [`Regs::sp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum X86Reg {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl X86Reg {
    /// All sixteen, in hardware order.
    pub const ALL: [X86Reg; 16] = [
        X86Reg::Rax,
        X86Reg::Rcx,
        X86Reg::Rdx,
        X86Reg::Rbx,
        X86Reg::Rsp,
        X86Reg::Rbp,
        X86Reg::Rsi,
        X86Reg::Rdi,
        X86Reg::R8,
        X86Reg::R9,
        X86Reg::R10,
        X86Reg::R11,
        X86Reg::R12,
        X86Reg::R13,
        X86Reg::R14,
        X86Reg::R15,
    ];

    /// The register with hardware number `n` (0..15).
    pub fn from_number(n: u8) -> Option<X86Reg> {
        Self::ALL.get(usize::from(n)).copied()
    }

    /// Hardware number (0..15).
    pub fn number(self) -> u8 {
        self as u8
    }
}

impl Index<X86Reg> for Regs {
    type Output = u64;
    fn index(&self, r: X86Reg) -> &u64 {
        match r {
            X86Reg::Rsp => &self.sp,
            r => &self.gprs[usize::from(r.number())],
        }
    }
}

impl IndexMut<X86Reg> for Regs {
    fn index_mut(&mut self, r: X86Reg) -> &mut u64 {
        match r {
            X86Reg::Rsp => &mut self.sp,
            r => &mut self.gprs[usize::from(r.number())],
        }
    }
}
