//! A traced thread's registers (`user_regs_struct`, what `PTRACE_GETREGS`
//! returns) as the [`Regs`] the registries and their handlers use, and back.

use crate::probes::arch::Regs;

/// Hardware number of `rsp`, which [`Regs`] keeps in [`Regs::sp`].
const RSP: usize = 4;

/// The x86 registers by hardware number (rax, rcx, rdx, rbx, rsp, rbp, rsi,
/// rdi, r8 .. r15) in `u`, as mutable references.
fn by_number(u: &mut libc::user_regs_struct) -> [&mut u64; 16] {
    [
        &mut u.rax, &mut u.rcx, &mut u.rdx, &mut u.rbx, &mut u.rsp, &mut u.rbp, &mut u.rsi,
        &mut u.rdi, &mut u.r8, &mut u.r9, &mut u.r10, &mut u.r11, &mut u.r12, &mut u.r13,
        &mut u.r14, &mut u.r15,
    ]
}

/// `u` as [`Regs`].
pub(super) fn from_user(u: &libc::user_regs_struct) -> Regs {
    let mut copy = *u;
    let mut r = Regs::default();
    for (n, v) in by_number(&mut copy).into_iter().enumerate() {
        if n != RSP {
            r.gprs[n] = *v;
        }
    }
    r.sp = u.rsp;
    r.ip = u.rip;
    r.flags = u.eflags;
    r
}

/// Writes `r` into `u` (segment registers, `orig_rax` and the bases are
/// left as they are).
pub(super) fn to_user(r: &Regs, u: &mut libc::user_regs_struct) {
    for (n, v) in by_number(u).into_iter().enumerate() {
        if n != RSP {
            *v = r.gprs[n];
        }
    }
    u.rsp = r.sp;
    u.rip = r.ip;
    u.eflags = r.flags;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_go_to_their_hardware_numbers_and_back() {
        // SAFETY: plain integers; all zero is a valid value.
        let mut u: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        u.rax = 1;
        u.rdi = 7;
        u.r15 = 15;
        u.rsp = 0x7ffd_0000;
        u.rip = 0x40_1000;
        u.eflags = 0x246;
        u.orig_rax = u64::MAX;
        let r = from_user(&u);
        assert_eq!((r.gprs[0], r.gprs[7], r.gprs[15]), (1, 7, 15));
        assert_eq!(
            (r.gprs[RSP], r.sp, r.ip, r.flags),
            (0, 0x7ffd_0000, 0x40_1000, 0x246)
        );
        let mut back = u;
        back.rax = 0;
        back.rip = 0;
        to_user(&r, &mut back);
        assert_eq!(
            (back.rax, back.rip, back.orig_rax),
            (1, 0x40_1000, u64::MAX)
        );
        let mut changed = r;
        changed.gprs[2] = 9;
        to_user(&changed, &mut back);
        assert_eq!(back.rdx, 9);
    }
}
