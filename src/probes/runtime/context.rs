//! The trap's machine context: `ucontext_t` to and from [`Regs`], and the
//! thread's memory as [`DataMemory`].
//!
//! # Registers
//!
//! The kernel saves the interrupted thread's registers in the signal frame
//! (`uc_mcontext.gregs`, glibc's x86_64 layout, `REG_R8 = 0 .. REG_CR2 = 22`)
//! and reloads them from there at `rt_sigreturn`. Reading them into a
//! [`Regs`] (by x86 hardware number: `rax = 0 .. r15 = 15`, with the stack
//! pointer in [`Regs::sp`]) and writing the handler's result back is how a
//! probe moves the instruction pointer, arms the trap flag or changes a
//! register. `rt_sigreturn` sanitises the flags itself (only user-changeable
//! bits survive), so whatever a handler writes there is safe.
//!
//! Vector, x87 and segment state are not in [`Regs`]; the kernel restores
//! them from the frame untouched.
//!
//! # Memory
//!
//! [`ThreadMemory`] is the data memory emulation, step fixups and return
//! hijacks use at a trap: plain loads and stores on the trapping thread's
//! own address space. Every address they touch is one the displaced
//! instruction itself would touch (the stack slot a `push` or `call` writes,
//! the return address at `[rsp]`), so an address that faults would have
//! faulted in place as well; no check is made, no allocation, no system call.

use crate::probes::arch::{DataMemory, Regs};
use crate::probes::ProbeError;

/// `gregs` index of each x86 register by hardware number (rax, rcx, rdx,
/// rbx, rsp, rbp, rsi, rdi, r8 .. r15).
const GREG_OF: [libc::c_int; 16] = [
    libc::REG_RAX,
    libc::REG_RCX,
    libc::REG_RDX,
    libc::REG_RBX,
    libc::REG_RSP,
    libc::REG_RBP,
    libc::REG_RSI,
    libc::REG_RDI,
    libc::REG_R8,
    libc::REG_R9,
    libc::REG_R10,
    libc::REG_R11,
    libc::REG_R12,
    libc::REG_R13,
    libc::REG_R14,
    libc::REG_R15,
];

/// Hardware number of `rsp`, which [`Regs`] keeps in [`Regs::sp`].
const RSP: usize = 4;

/// The registers saved in a signal frame.
#[cfg(test)]
pub(crate) fn regs_from_ucontext(uc: &libc::ucontext_t) -> Regs {
    let mut slot = std::mem::MaybeUninit::uninit();
    *regs_from_ucontext_in(uc, &mut slot)
}

/// [`regs_from_ucontext`], built in place in `slot`, field by field: a
/// `Regs` is 272 bytes, and zeroing it first (`Regs::default()`) or moving
/// it out of a function is a `memset` or `memcpy` call, which the trap path
/// must not make (a probe there would trap inside the trap handler).
#[inline]
fn regs_from_ucontext_in<'a>(
    uc: &libc::ucontext_t,
    slot: &'a mut std::mem::MaybeUninit<Regs>,
) -> &'a mut Regs {
    let g = &uc.uc_mcontext.gregs;
    let p = slot.as_mut_ptr();
    // SAFETY: every field of `*p` is written exactly once below through raw
    // pointers (no reference to uninitialised memory is made); `Regs` is
    // plain integers, so the value is initialised after the writes.
    unsafe {
        let gprs = std::ptr::addr_of_mut!((*p).gprs).cast::<u64>();
        for (n, &i) in GREG_OF.iter().enumerate() {
            let v = if n == RSP { 0 } else { g[i as usize] as u64 };
            gprs.add(n).write(v);
        }
        for n in GREG_OF.len()..31 {
            gprs.add(n).write(0);
        }
        std::ptr::addr_of_mut!((*p).sp).write(g[libc::REG_RSP as usize] as u64);
        std::ptr::addr_of_mut!((*p).ip).write(g[libc::REG_RIP as usize] as u64);
        std::ptr::addr_of_mut!((*p).flags).write(g[libc::REG_EFL as usize] as u64);
        slot.assume_init_mut()
    }
}

/// Runs `f` on a copy of the registers of the signal frame `uc` as
/// [`Regs`] and writes the copy back when `f` returns true (the frame
/// resumes with the changes); returns what `f` returned. The arm64 twin
/// views its frame in place instead (its layout is `Regs`'s), so `f` must
/// leave the registers unchanged when it returns false.
#[inline]
pub(crate) fn with_frame_regs(
    uc: &mut libc::ucontext_t,
    f: impl FnOnce(&mut Regs) -> bool,
) -> bool {
    let mut slot = std::mem::MaybeUninit::uninit();
    let regs = regs_from_ucontext_in(uc, &mut slot);
    let resume = f(regs);
    if resume {
        regs_to_ucontext(regs, uc);
    }
    resume
}

/// Writes `regs` into the signal frame, for `rt_sigreturn` to resume with.
#[inline]
fn regs_to_ucontext(regs: &Regs, uc: &mut libc::ucontext_t) {
    let g = &mut uc.uc_mcontext.gregs;
    for (n, &i) in GREG_OF.iter().enumerate() {
        if n != RSP {
            g[i as usize] = regs.gprs[n] as i64;
        }
    }
    g[libc::REG_RSP as usize] = regs.sp as i64;
    g[libc::REG_RIP as usize] = regs.ip as i64;
    g[libc::REG_EFL as usize] = regs.flags as i64;
}

/// The IP saved in a signal frame.
#[inline]
pub(crate) fn frame_ip(uc: &libc::ucontext_t) -> u64 {
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64
}

/// Sets the IP a signal frame resumes at.
#[inline]
pub(crate) fn set_frame_ip(uc: &mut libc::ucontext_t, ip: u64) {
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] = ip as i64;
}

/// The trapping thread's memory, accessed directly (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadMemory;

impl DataMemory for ThreadMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        if addr == 0 {
            return Err(ProbeError::MemoryFault {
                addr,
                len: buf.len(),
            });
        }
        // `copy_bytes`, not `copy_nonoverlapping`: no `memcpy` call on the
        // trap path.
        // SAFETY: the address is one the displaced instruction accesses in
        // place (module docs); a bad one faults exactly as it would there.
        unsafe { crate::sys::copy_bytes(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn read_u64(&self, addr: u64) -> Result<u64, ProbeError> {
        if addr == 0 {
            return Err(ProbeError::MemoryFault { addr, len: 8 });
        }
        let v: u64;
        // SAFETY: as in `read`; one (unaligned) load, in assembly so that
        // a debug build makes no `memcpy` call for it.
        unsafe {
            core::arch::asm!("mov {v}, qword ptr [{a}]", v = out(reg) v, a = in(reg) addr,
                options(nostack, readonly, preserves_flags));
        }
        Ok(v)
    }

    fn write_u64(&mut self, addr: u64, value: u64) -> Result<(), ProbeError> {
        if addr == 0 {
            return Err(ProbeError::MemoryFault { addr, len: 8 });
        }
        // SAFETY: as in `write`; one (unaligned) store, in assembly (see
        // `read_u64`).
        unsafe {
            core::arch::asm!("mov qword ptr [{a}], {v}", v = in(reg) value, a = in(reg) addr,
                options(nostack, preserves_flags));
        }
        Ok(())
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        if addr == 0 {
            return Err(ProbeError::MemoryFault {
                addr,
                len: bytes.len(),
            });
        }
        // SAFETY: as in `read`; the stack slots written are below the
        // interrupted code's stack pointer or its return address, which the
        // instruction itself would write.
        unsafe { crate::sys::copy_bytes(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::arch::X86Reg;

    #[test]
    fn a_round_trip_through_the_signal_frame_keeps_every_register() {
        // SAFETY: ucontext_t is plain old data; all-zero is a valid value.
        let mut uc: libc::ucontext_t = unsafe { std::mem::zeroed() };
        let mut regs = Regs::default();
        for r in X86Reg::ALL {
            regs[r] = 0x1000 + u64::from(r.number());
        }
        regs.ip = 0xdead_beef;
        regs.flags = 0x246;
        regs_to_ucontext(&regs, &mut uc);
        assert_eq!(uc.uc_mcontext.gregs[libc::REG_RAX as usize], 0x1000);
        assert_eq!(uc.uc_mcontext.gregs[libc::REG_R15 as usize], 0x100f);
        assert_eq!(uc.uc_mcontext.gregs[libc::REG_RSP as usize], 0x1004);
        assert_eq!(uc.uc_mcontext.gregs[libc::REG_RIP as usize], 0xdead_beef);
        assert_eq!(regs_from_ucontext(&uc), regs);
    }

    #[test]
    fn thread_memory_reads_and_writes_the_stack() {
        let mut slot = [0u64; 2];
        let addr = slot.as_mut_ptr() as u64;
        let mut mem = ThreadMemory;
        mem.write_u64(addr + 8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(mem.read_u64(addr + 8).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(slot[1], 0x1122_3344_5566_7788);
        assert!(mem.read_u64(0).is_err());
    }
}
