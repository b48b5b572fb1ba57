//! The system calls of the runtime's abort path, made directly (the
//! `syscall` instruction), not through the C library.
//!
//! The abort path runs after a probe handler panicked, when the re-entrancy
//! guard that keeps a nested hit from running handlers has already been
//! dropped by the unwinding. A probe may be armed on the C library's
//! `write` (or `abort`, `raise`): calling them there would trap again and
//! run the handler that just panicked, which panics again, and so on until
//! the stack overflows (found: a handler calling `println!` on `write`,
//! hit by the program's own `println!`, died of SIGSEGV after a screenful
//! of panic messages instead of aborting with the runtime's message). No
//! probe can be armed on these instructions: they are this crate's own code.

use std::arch::asm;

/// `syscall` with up to four arguments (x86_64 Linux: number in `rax`,
/// arguments in `rdi`, `rsi`, `rdx`, `r10`; `rcx` and `r11` clobbered).
///
/// # Safety
/// The arguments must be valid for system call `nr` (pointers to memory the
/// call may read or write for its length).
#[inline(always)]
unsafe fn syscall4(nr: libc::c_long, a: u64, b: u64, c: u64, d: u64) -> i64 {
    let ret: i64;
    // SAFETY: the caller passes valid arguments for `nr`; the instruction
    // clobbers only rcx, r11 and rax (declared), and touches no stack.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// `write(fd, bytes)`; returns what the kernel returned (bytes written or a
/// negated errno). Async-signal-safe.
pub(crate) fn write(fd: libc::c_int, bytes: &[u8]) -> i64 {
    // SAFETY: `bytes` is readable for its length.
    unsafe {
        syscall4(
            libc::SYS_write,
            fd as u64,
            bytes.as_ptr() as u64,
            bytes.len() as u64,
            0,
        )
    }
}

/// Ends the process with `SIGABRT`, as `abort()` does once no handler
/// catches the signal: the action is reset to the default and the signal
/// unblocked first, so it kills the process whatever the program installed.
/// Async-signal-safe.
pub(crate) fn abort() -> ! {
    // The kernel's `struct sigaction` on x86_64: handler, flags, restorer,
    // mask (8 bytes); all zero is `SIG_DFL` with no flags.
    let dfl = [0u64; 4];
    let abrt: u64 = 1 << (libc::SIGABRT - 1);
    // SAFETY: `dfl` is a readable kernel sigaction and `abrt` a readable
    // 8-byte signal set (the size passed); the old values are not asked
    // for (null). getpid, gettid and tgkill take integers only.
    unsafe {
        syscall4(
            libc::SYS_rt_sigaction,
            libc::SIGABRT as u64,
            dfl.as_ptr() as u64,
            0,
            8,
        );
        syscall4(
            libc::SYS_rt_sigprocmask,
            libc::SIG_UNBLOCK as u64,
            &abrt as *const u64 as u64,
            0,
            8,
        );
        let pid = syscall4(libc::SYS_getpid, 0, 0, 0, 0);
        let tid = syscall4(libc::SYS_gettid, 0, 0, 0, 0);
        syscall4(
            libc::SYS_tgkill,
            pid as u64,
            tid as u64,
            libc::SIGABRT as u64,
            0,
        );
    }
    // Not reached: the signal is delivered on the way back from tgkill.
    loop {
        // SAFETY: exit_group takes an integer and does not return.
        unsafe { syscall4(libc::SYS_exit_group, 127, 0, 0, 0) };
    }
}
