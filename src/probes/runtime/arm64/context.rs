//! The trap's machine context on arm64: `ucontext_t` to and from [`Regs`],
//! the FP/SIMD record of the signal frame, and the thread's memory as
//! [`DataMemory`]. The x86_64 twin is `runtime/context.rs`; both give the
//! rest of the runtime the same functions.
//!
//! # Registers
//!
//! The kernel (and qemu-user, which builds the same frame) saves the
//! interrupted thread's registers in `uc_mcontext` (the kernel's `struct
//! sigcontext`): `regs[0..31]` are `x0..x30`, then `sp`, `pc` and
//! `pstate`, and reloads them from there at `rt_sigreturn`. [`Regs`] holds
//! them by register number (`gprs[n]` is `xn`), the stack pointer in
//! [`Regs::sp`], the PC in [`Regs::ip`] and `pstate` in [`Regs::flags`]
//! (the backend's `b.cond` simulation reads NZCV there, the step
//! preparation clears BTYPE). `rt_sigreturn` refuses a `pstate` that would
//! change the exception level or mask interrupts (the thread dies with
//! SIGSEGV), so a handler must change only NZCV; the runtime itself never
//! sets any other bit.
//!
//! # The FP/SIMD record
//!
//! `uc_mcontext.__reserved` holds a chain of records, each an `_aarch64_ctx`
//! header (`magic`, `size`); the first is the FP/SIMD one
//! ([`FPSIMD_MAGIC`]): `fpsr`, `fpcr` and `v0..v31`, restored at
//! `rt_sigreturn`. [`Regs`] does not carry vector registers, so a probe
//! handler's own vector code (Rust uses `q` registers for copies) changes
//! nothing the interrupted code sees. [`fpsimd`] finds the record, for
//! tests and tools that want the vector state at the trap.
//!
//! # Memory
//!
//! [`ThreadMemory`]: plain loads and stores on the trapping thread's own
//! address space, as on x86_64 (see `runtime/context.rs`): every address
//! is one the displaced instruction itself would touch.

use crate::probes::arch::{DataMemory, Regs};
use crate::probes::ProbeError;

/// `magic` of the FP/SIMD record (`FPSIMD_MAGIC`, asm/sigcontext.h).
pub const FPSIMD_MAGIC: u32 = 0x4650_8001;

/// Bytes of the FP/SIMD record: header (8), `fpsr`, `fpcr` (4 each),
/// `v0..v31` (16 each).
const FPSIMD_BYTES: u32 = 8 + 8 + 32 * 16;

/// The FP/SIMD state saved in a signal frame (a copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FpSimd {
    /// Floating-point status register.
    pub fpsr: u32,
    /// Floating-point control register.
    pub fpcr: u32,
    /// `v0..v31`, each as the 128-bit value of the register.
    pub v: [u128; 32],
}

/// The start of `uc_mcontext.__reserved`: past `pstate`, 16-byte aligned
/// (the kernel's `struct sigcontext`; libc keeps the field private).
fn reserved(uc: &libc::ucontext_t) -> *const u8 {
    let off = std::mem::offset_of!(libc::mcontext_t, pstate) + 8;
    let off = (off + 15) & !15;
    (&uc.uc_mcontext as *const libc::mcontext_t)
        .cast::<u8>()
        .wrapping_add(off)
}

/// The FP/SIMD record of the signal frame `uc`, if the frame has one where
/// the kernel puts it (first in `__reserved`, with its magic and size).
pub fn fpsimd(uc: &libc::ucontext_t) -> Option<FpSimd> {
    let p = reserved(uc);
    // SAFETY: `__reserved` is 4096 bytes inside `uc`; the record's header
    // and body (8 + 520 bytes) lie within it; unaligned reads of plain
    // integers.
    unsafe {
        let magic = p.cast::<u32>().read_unaligned();
        let size = p.add(4).cast::<u32>().read_unaligned();
        if magic != FPSIMD_MAGIC || size < FPSIMD_BYTES {
            return None;
        }
        let mut v = [0u128; 32];
        for (i, r) in v.iter_mut().enumerate() {
            *r = p.add(16 + 16 * i).cast::<u128>().read_unaligned();
        }
        Some(FpSimd {
            fpsr: p.add(8).cast::<u32>().read_unaligned(),
            fpcr: p.add(12).cast::<u32>().read_unaligned(),
            v,
        })
    }
}

/// The registers saved in a signal frame (a copy).
#[cfg(test)]
pub(crate) fn regs_from_ucontext(uc: &libc::ucontext_t) -> Regs {
    let m = &uc.uc_mcontext;
    Regs {
        gprs: m.regs,
        sp: m.sp,
        ip: m.pc,
        flags: m.pstate,
    }
}

// `Regs` is laid out as the frame's `regs[31]`, `sp`, `pc`, `pstate`
// (`struct sigcontext` after `fault_address`): checked here, relied on by
// `with_frame_regs`.
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    let base = offset_of!(libc::mcontext_t, regs);
    assert!(offset_of!(Regs, gprs) == 0);
    assert!(offset_of!(libc::mcontext_t, sp) - base == offset_of!(Regs, sp));
    assert!(offset_of!(libc::mcontext_t, pc) - base == offset_of!(Regs, ip));
    assert!(offset_of!(libc::mcontext_t, pstate) - base == offset_of!(Regs, flags));
    assert!(size_of::<Regs>() == 34 * 8);
    assert!(base % align_of::<Regs>() == 0);
};

/// Runs `f` on the registers of the signal frame `uc` as [`Regs`]: on
/// arm64 the frame itself, viewed in place (the layouts match, checked at
/// compile time above), so the trap path copies nothing in or out: under
/// qemu-user every guest instruction of a hit counts against the raw
/// `brk` round trip (BENCHMARKS.md, "arm64 live probes, emulated"). `f`
/// returns whether the frame is to resume with its changes; it must leave
/// the registers unchanged when it returns false (x86_64 discards a copy
/// then; here nothing is discarded). Returns what `f` returned.
#[inline]
pub(crate) fn with_frame_regs(
    uc: &mut libc::ucontext_t,
    f: impl FnOnce(&mut Regs) -> bool,
) -> bool {
    // `regs`, `sp`, `pc` and `pstate` are consecutive `u64`s of the frame
    // with `Regs`'s layout and alignment (the assertions above); the view
    // borrows `uc` mutably for the call, so nothing else touches the frame.
    // SAFETY: a valid, exclusive, layout-checked view (see above).
    let regs = unsafe { &mut *std::ptr::addr_of_mut!(uc.uc_mcontext.regs).cast::<Regs>() };
    f(regs)
}

/// The PC saved in a signal frame.
#[inline]
pub(crate) fn frame_ip(uc: &libc::ucontext_t) -> u64 {
    uc.uc_mcontext.pc
}

/// Sets the PC a signal frame resumes at.
#[inline]
pub(crate) fn set_frame_ip(uc: &mut libc::ucontext_t, ip: u64) {
    uc.uc_mcontext.pc = ip;
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
        // SAFETY: as in `read`; one load (unaligned is allowed for normal
        // memory at EL0), in assembly so that a debug build makes no
        // `memcpy` call for it.
        unsafe {
            core::arch::asm!("ldr {v}, [{a}]", v = out(reg) v, a = in(reg) addr,
                options(nostack, readonly, preserves_flags));
        }
        Ok(v)
    }

    fn write_u64(&mut self, addr: u64, value: u64) -> Result<(), ProbeError> {
        if addr == 0 {
            return Err(ProbeError::MemoryFault { addr, len: 8 });
        }
        // SAFETY: as in `read_u64`.
        unsafe {
            core::arch::asm!("str {v}, [{a}]", v = in(reg) value, a = in(reg) addr,
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
        // SAFETY: as in `read`.
        unsafe { crate::sys::copy_bytes(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }
}
