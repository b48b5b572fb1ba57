//! A breakpoint round trip with no probe runtime: the cost floor a probe
//! hit is measured against, and the proof that the platform (the kernel, or
//! qemu-user) delivers a breakpoint as a SIGTRAP whose frame can be edited.
//!
//! The handler is a raw `sigaction` handler in its own signal, so it must
//! not run while the runtime's SIGTRAP handler is installed: [`with_raw_trap`]
//! swaps the disposition for the length of a closure and puts the old one
//! back.

use std::sync::atomic::{AtomicU64, Ordering};

/// Traps counted by the raw handler.
static TRAPS: AtomicU64 = AtomicU64::new(0);

/// Executes one breakpoint instruction (`brk #0x7` on arm64, `int3` on
/// x86_64): with the raw handler installed it returns after one SIGTRAP.
#[inline(never)]
pub fn trap_once() {
    // SAFETY: a breakpoint instruction; the caller has installed a SIGTRAP
    // handler that resumes after it (`with_raw_trap`).
    unsafe {
        #[cfg(target_arch = "aarch64")]
        std::arch::asm!("brk #0x7");
        #[cfg(target_arch = "x86_64")]
        std::arch::asm!("int3");
    }
}

/// The raw handler: counts the trap and resumes after the breakpoint.
extern "C" fn raw_handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // Relaxed: a counter read after the traps, on the same thread.
    TRAPS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
    let uc = unsafe { &mut *uctx.cast::<libc::ucontext_t>() };
    // arm64 reports the PC of the `brk` itself: step over it. x86_64
    // reports the byte after `int3` already.
    #[cfg(target_arch = "aarch64")]
    {
        uc.uc_mcontext.pc += 4;
    }
    #[cfg(not(target_arch = "aarch64"))]
    let _ = uc;
}

/// Runs `f` with the raw SIGTRAP handler installed, then restores the
/// disposition that was there; returns what `f` returned and the traps the
/// raw handler counted meanwhile. Not for concurrent use with other
/// SIGTRAP users (the disposition is process-wide).
pub fn with_raw_trap<R>(f: impl FnOnce() -> R) -> (R, u64) {
    // SAFETY: all-zero is a valid sigaction; the mask functions only write
    // the mask inside it; sigaction(2) with valid pointers.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = raw_handler as *const () as usize;
    new.sa_flags = libc::SA_SIGINFO;
    // SAFETY: see above.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    // SAFETY: see above.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    assert_eq!(unsafe { libc::sigaction(libc::SIGTRAP, &new, &mut old) }, 0);
    let before = TRAPS.load(Ordering::Relaxed);
    let r = f();
    let traps = TRAPS.load(Ordering::Relaxed) - before;
    // SAFETY: puts back the disposition read above.
    assert_eq!(
        unsafe { libc::sigaction(libc::SIGTRAP, &old, std::ptr::null_mut()) },
        0
    );
    (r, traps)
}
