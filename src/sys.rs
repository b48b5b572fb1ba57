//! Thin wrappers over the Linux system calls the RCU domains rely on:
//! `membarrier` (the updater's heavy barrier), `futex` (sleeping until the
//! last reader leaves) and `mmap` (reader-slot memory that can be obtained
//! from a signal handler), and the few the live probe runtime's trap path
//! makes. Every function here is async-signal-safe.
//!
//! # No C library
//!
//! Every call here is a `syscall` instruction in inline assembly
//! ([`raw`]), not the C library's wrapper (`libc::syscall`, `libc::mmap`
//! are C functions): the probe runtime's trap path runs these, and a
//! function it calls cannot be probed (a breakpoint there would trap inside
//! the trap handler). So `syscall`, `mmap` or `getpid` stay probeable. The
//! raw calls return the kernel's result (`-errno` on failure) and never
//! touch `errno`. [`copy_bytes`] is the same idea for memory: a copy the
//! compiler cannot turn into a `memcpy` call.
//!
//! How the domains use them: [`crate::docs::algorithms::rcu`].

#![cfg_attr(loom, allow(dead_code))]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

const MB_UNKNOWN: u8 = 0;
const MB_AVAILABLE: u8 = 1;
const MB_UNAVAILABLE: u8 = 2;

/// Whether `MEMBARRIER_CMD_PRIVATE_EXPEDITED` is registered for this process.
///
/// Starts `MB_UNKNOWN`, which readers treat like `MB_UNAVAILABLE` (they issue
/// real fences), so a reader can never rely on a membarrier that an updater
/// will not issue. Once `MB_AVAILABLE` it stays so for the life of the
/// process image.
static MEMBARRIER_STATE: AtomicU8 = AtomicU8::new(MB_UNKNOWN);

/// Set by [`refuse_membarrier`] (tests only): [`membarrier_init`] then
/// reports `membarrier` unavailable, as on a kernel without it, and the
/// domains take their fallback (readers' real fences, updaters' `SeqCst`
/// fence), in this process and its fork children.
static MEMBARRIER_REFUSED: AtomicBool = AtomicBool::new(false);

// The command numbers are stable kernel ABI (include/uapi/linux/membarrier.h).
pub(crate) const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
pub(crate) const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
pub(crate) const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

pub(crate) fn sys_membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes (cmd, flags, cpu_id) integers and touches no
    // user memory; any failure is reported through the return value.
    unsafe { raw::syscall3(libc::SYS_membarrier, cmd as usize, 0, 0) as libc::c_long }
}

/// True when readers may rely on [`membarrier`] and use compiler fences only.
///
/// A relaxed load is enough: the flag only ever goes from "use fences" to "do
/// not", and the registration it reports was completed in the kernel before
/// the flag was stored, so any updater that later issues the command reaches
/// every thread whatever that updater's view of the flag.
#[inline(always)]
pub(crate) fn membarrier_available() -> bool {
    MEMBARRIER_STATE.load(Ordering::Relaxed) == MB_AVAILABLE
}

/// Registers the process for private expedited membarrier, once. Safe to call
/// from a signal handler (a syscall and atomics only). Returns availability.
pub(crate) fn membarrier_init() -> bool {
    match MEMBARRIER_STATE.load(Ordering::Relaxed) {
        MB_AVAILABLE => return true,
        MB_UNAVAILABLE => return false,
        _ => {}
    }
    // Relaxed: `refuse_membarrier` runs before any domain is used (its
    // contract), so program order and thread creation order it before
    // every call here.
    if MEMBARRIER_REFUSED.load(Ordering::Relaxed) {
        MEMBARRIER_STATE.store(MB_UNAVAILABLE, Ordering::Relaxed);
        return false;
    }
    let mask = sys_membarrier(MEMBARRIER_CMD_QUERY);
    let ok = mask >= 0
        && (mask & MEMBARRIER_CMD_PRIVATE_EXPEDITED as libc::c_long) != 0
        && sys_membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
    // Registration is idempotent, so racing initialisers agree on the result.
    MEMBARRIER_STATE.store(
        if ok { MB_AVAILABLE } else { MB_UNAVAILABLE },
        Ordering::Relaxed,
    );
    ok
}

/// Makes [`membarrier_init`] report `membarrier` unavailable from now on,
/// as on a kernel without it, so that tests run the domains' fallback where
/// the kernel has the call (`__internals::rcu::force_membarrier_fallback`).
/// Returns whether the fallback is in force: false when the registration
/// already happened (readers may rely on it; it is never taken back). MUST
/// be called before any RCU domain is created or used.
pub(crate) fn refuse_membarrier() -> bool {
    // Relaxed (all three): ordered before every later `membarrier_init` by
    // the caller's contract (see there); the exchange only tells a call
    // made too late, which changes nothing (not even what fork children
    // register), as its docs promise.
    let in_force = match MEMBARRIER_STATE.compare_exchange(
        MB_UNKNOWN,
        MB_UNAVAILABLE,
        Ordering::Relaxed,
        Ordering::Relaxed,
    ) {
        Ok(_) => true,
        Err(state) => state == MB_UNAVAILABLE,
    };
    if in_force {
        MEMBARRIER_REFUSED.store(true, Ordering::Relaxed);
    }
    in_force
}

/// Re-registers after `fork()`: the child's address space is new to the
/// kernel's membarrier bookkeeping.
pub(crate) fn membarrier_reinit_after_fork() {
    MEMBARRIER_STATE.store(MB_UNKNOWN, Ordering::Relaxed);
    membarrier_init();
}

/// Issues a full memory barrier on every running thread of this process.
/// Returns false when that is not possible (the caller must then rely on
/// readers issuing their own fences, which they do while the state is not
/// `MB_AVAILABLE`).
#[inline]
pub(crate) fn membarrier() -> bool {
    if MEMBARRIER_STATE.load(Ordering::Relaxed) == MB_UNAVAILABLE {
        return false;
    }
    // Issued even while the state is still unknown: if some reader has already
    // seen `MB_AVAILABLE`, registration is done and this succeeds.
    sys_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0
}

/// Sleeps while `*word == expected`; may return spuriously.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32) {
    // SAFETY: `word` is a live, aligned u32 for the duration of the call; the
    // kernel only reads it. A null timeout means "no timeout".
    unsafe {
        raw::syscall4(
            libc::SYS_futex,
            word.as_ptr() as usize,
            (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as usize,
            expected as usize,
            0,
        );
    }
}

/// Sleeps while `*word == expected`, at most `timeout`; may return spuriously.
pub(crate) fn futex_wait_timeout(word: &AtomicU32, expected: u32, timeout: std::time::Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned u32 and `ts` a valid timespec for the
    // duration of the call; the kernel only reads them.
    unsafe {
        raw::syscall4(
            libc::SYS_futex,
            word.as_ptr() as usize,
            (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as usize,
            expected as usize,
            &ts as *const libc::timespec as usize,
        );
    }
}

/// Wakes every thread sleeping on `word`.
pub(crate) fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key; it does not access
    // memory through it.
    unsafe {
        raw::syscall3(
            libc::SYS_futex,
            word.as_ptr() as usize,
            (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as usize,
            i32::MAX as usize,
        );
    }
}

/// Anonymous, zero-filled, read-write pages; `None` if the kernel refuses.
/// Async-signal-safe (unlike `malloc`).
pub(crate) fn map_zeroed(len: usize) -> Option<std::ptr::NonNull<u8>> {
    // SAFETY: an anonymous private mapping with no fixed address cannot alias
    // existing memory; the result is checked against MAP_FAILED.
    let r = unsafe {
        raw::syscall6(
            libc::SYS_mmap,
            0,
            len,
            (libc::PROT_READ | libc::PROT_WRITE) as usize,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as usize,
            usize::MAX, // fd -1
            0,
        )
    };
    if failed(r) {
        None
    } else {
        std::ptr::NonNull::new(r as *mut u8)
    }
}

/// Unmaps `len` bytes at `addr` (a mapping of [`map_zeroed`]).
///
/// # Safety
/// Nothing may use the range afterwards.
pub(crate) unsafe fn unmap(addr: *mut u8, len: usize) {
    // SAFETY: the caller gives up the range.
    unsafe { raw::syscall2(libc::SYS_munmap, addr as usize, len) };
}

/// Whether a raw system call's result is an error (`-4095..=-1`).
#[inline(always)]
pub(crate) fn failed(r: isize) -> bool {
    (-4095..0).contains(&r)
}

/// The calling process's id (`getpid(2)`, no C library).
#[inline]
pub(crate) fn getpid() -> libc::pid_t {
    // SAFETY: getpid takes no arguments and touches no memory.
    unsafe { raw::syscall0(libc::SYS_getpid) as libc::pid_t }
}

/// The calling thread's id (`gettid(2)`, no C library).
#[inline]
pub(crate) fn gettid() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and touches no memory.
    unsafe { raw::syscall0(libc::SYS_gettid) as libc::pid_t }
}

/// Sends `sig` to thread `tid` of process `pid` (`tgkill(2)`); the raw
/// result.
#[inline]
pub(crate) fn tgkill(pid: libc::pid_t, tid: libc::pid_t, sig: libc::c_int) -> isize {
    // SAFETY: tgkill takes integers only.
    unsafe { raw::syscall3(libc::SYS_tgkill, pid as usize, tid as usize, sig as usize) }
}

/// Writes `bytes` to `fd` once (`write(2)`); a short or failed write is not
/// retried. For diagnostics on the way to abort.
pub(crate) fn write(fd: libc::c_int, bytes: &[u8]) {
    // SAFETY: the buffer is valid for `len` bytes; the kernel only reads it.
    unsafe {
        raw::syscall3(
            libc::SYS_write,
            fd as usize,
            bytes.as_ptr() as usize,
            bytes.len(),
        )
    };
}

/// Ends the process with `SIGABRT`, as `abort(3)` does, without the C
/// library: the signal is unblocked and sent to this thread (a `SIGABRT`
/// handler runs, as with `abort`); if that returns, the default disposition
/// is restored and the signal sent again; should the process still live,
/// `exit_group(127)`.
pub(crate) fn abort() -> ! {
    let mask: u64 = 1 << (libc::SIGABRT - 1);
    // SAFETY: rt_sigprocmask reads the 8-byte kernel sigset at `&mask`.
    unsafe {
        raw::syscall4(
            libc::SYS_rt_sigprocmask,
            libc::SIG_UNBLOCK as usize,
            &mask as *const u64 as usize,
            0,
            8,
        )
    };
    tgkill(getpid(), gettid(), libc::SIGABRT);
    set_default_disposition(libc::SIGABRT);
    tgkill(getpid(), gettid(), libc::SIGABRT);
    loop {
        // SAFETY: exit_group takes an integer and does not return.
        unsafe { raw::syscall1(libc::SYS_exit_group, 127) };
    }
}

/// The kernel's `struct sigaction` for `rt_sigaction(2)` (not the C
/// library's, which is larger).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Restores `SIG_DFL` for `sig` (`rt_sigaction(2)`, no C library).
pub(crate) fn set_default_disposition(sig: libc::c_int) {
    let dfl = KernelSigaction {
        handler: 0,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: `dfl` is a valid kernel sigaction (SIG_DFL needs no restorer);
    // no old action is asked for; the sigset is 8 bytes.
    unsafe {
        raw::syscall4(
            libc::SYS_rt_sigaction,
            sig as usize,
            &dfl as *const KernelSigaction as usize,
            0,
            8,
        )
    };
}

/// Reads `len` bytes at `remote` of this process into `local` with
/// `process_vm_readv(2)`; the raw result (bytes read, or `-errno`).
///
/// # Safety
/// `local` must be valid for writes of `len` bytes. `remote` may be any
/// address: the kernel checks it.
pub(crate) unsafe fn process_vm_readv_self(local: *mut u8, remote: u64, len: usize) -> isize {
    // SAFETY: the caller's contract (the kernel writes `local`).
    unsafe { process_vm_self(libc::SYS_process_vm_readv, local, remote, len) }
}

/// Writes `len` bytes from `local` to `remote` of this process with
/// `process_vm_writev(2)`: memory that is not mapped (or not writable) is
/// `-EFAULT`, never a fault of the caller. The raw result (bytes written,
/// or `-errno`).
///
/// # Safety
/// `local` must be valid for reads of `len` bytes. `remote` may be any
/// address: the kernel checks it.
#[cfg(not(target_arch = "aarch64"))] // arm64 writes code with stores only (in_process.rs)
pub(crate) unsafe fn process_vm_writev_self(local: *const u8, remote: u64, len: usize) -> isize {
    // SAFETY: the caller's contract (the kernel only reads `local`).
    unsafe { process_vm_self(libc::SYS_process_vm_writev, local.cast_mut(), remote, len) }
}

/// `process_vm_readv`/`process_vm_writev` (`nr`) on this process, one
/// iovec each side.
///
/// # Safety
/// `local` valid for the access `nr` makes (written by a read, read by a
/// write) of `len` bytes.
unsafe fn process_vm_self(nr: libc::c_long, local: *mut u8, remote: u64, len: usize) -> isize {
    let l = libc::iovec {
        iov_base: local.cast(),
        iov_len: len,
    };
    let r = libc::iovec {
        iov_base: remote as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: the iovecs are valid for the call; the local one describes
    // memory the caller lets the kernel access as `nr` does.
    unsafe {
        raw::syscall6(
            nr,
            getpid() as usize,
            &l as *const libc::iovec as usize,
            1,
            &r as *const libc::iovec as usize,
            1,
            0,
        )
    }
}

/// Most iovecs one `process_vm_readv`/`process_vm_writev` takes on each
/// side (`IOV_MAX`).
pub(crate) const IOV_MAX: usize = 1024;

/// Where each of `n` pieces of this process's memory go or come from: the
/// local buffer `local` (the pieces back to back, `lens[i]` bytes each)
/// and the remote addresses `addrs`. Reads (`read == true`) fill `local`,
/// writes copy it out. At most [`IOV_MAX`] pieces. The raw result: the
/// bytes transferred before the first piece that could not be (a partial
/// transfer stops there), or `-errno`.
///
/// # Safety
/// `local` must be valid for the access (written by a read, read by a
/// write) of the sum of `lens`; `addrs` may be anything: the kernel checks
/// them.
pub(crate) unsafe fn process_vm_self_pieces(
    read: bool,
    local: *mut u8,
    addrs: &[u64],
    lens: &[usize],
) -> isize {
    debug_assert!(addrs.len() == lens.len() && addrs.len() <= IOV_MAX);
    let total: usize = lens.iter().sum();
    let l = libc::iovec {
        iov_base: local.cast(),
        iov_len: total,
    };
    let r: Vec<libc::iovec> = addrs
        .iter()
        .zip(lens)
        .map(|(&a, &n)| libc::iovec {
            iov_base: a as *mut libc::c_void,
            iov_len: n,
        })
        .collect();
    let nr = if read {
        libc::SYS_process_vm_readv
    } else {
        libc::SYS_process_vm_writev
    };
    // SAFETY: the iovecs are valid for the call; the local one describes
    // memory the caller lets the kernel access as `nr` does.
    unsafe {
        raw::syscall6(
            nr,
            getpid() as usize,
            &l as *const libc::iovec as usize,
            1,
            r.as_ptr() as usize,
            r.len(),
            0,
        )
    }
}

/// Copies `len` bytes from `src` to `dst` with `rep movsb`: a copy the
/// compiler cannot replace with a call to the C library's `memcpy` (which a
/// user may probe). Ranges must not overlap.
///
/// # Safety
/// As `core::ptr::copy_nonoverlapping`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn copy_bytes(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract; `rep movsb` with the direction flag
    // clear (the ABI guarantees it at function boundaries) copies forwards.
    unsafe {
        core::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags)
        );
    }
}

/// Copies `len` bytes from `src` to `dst` one byte at a time in assembly:
/// the arm64 twin of the `rep movsb` copy (no `memcpy` call the compiler
/// could substitute, so the trap path stays off the C library). Ranges
/// must not overlap.
///
/// # Safety
/// As `core::ptr::copy_nonoverlapping`.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) unsafe fn copy_bytes(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract; the loop reads `len` bytes from `src`
    // and writes them to `dst`, nothing else.
    unsafe {
        core::arch::asm!(
            "cbz {n}, 2f",
            "1:",
            "ldrb {t:w}, [{s}], #1",
            "strb {t:w}, [{d}], #1",
            "subs {n}, {n}, #1",
            "b.ne 1b",
            "2:",
            n = inout(reg) len => _,
            s = inout(reg) src => _,
            d = inout(reg) dst => _,
            t = out(reg) _,
            options(nostack)
        );
    }
}

/// Elsewhere (no live probe runtime there): a plain copy.
///
/// # Safety
/// As `core::ptr::copy_nonoverlapping`.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[inline(always)]
pub(crate) unsafe fn copy_bytes(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, len) }
}

/// The `svc #0` instruction, with 0 to 6 arguments (the arm64 Linux
/// convention: number in `x8`, arguments in `x0..x5`, the result in `x0`,
/// `-errno` on failure; nothing else clobbered). Raw, as on x86_64: the
/// live runtime's trap path calls no C-library function.
#[cfg(target_arch = "aarch64")]
pub(crate) mod raw {
    use core::arch::asm;

    /// # Safety
    /// As the system call `nr` with no arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall0(nr: libc::c_long) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe { asm!("svc #0", in("x8") nr, lateout("x0") r, options(nostack)) };
        r
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall1(nr: libc::c_long, a: usize) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe { asm!("svc #0", in("x8") nr, inlateout("x0") a as isize => r, options(nostack)) };
        r
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall2(nr: libc::c_long, a: usize, b: usize) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe {
            asm!("svc #0", in("x8") nr, inlateout("x0") a as isize => r, in("x1") b,
                options(nostack));
        }
        r
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall3(nr: libc::c_long, a: usize, b: usize, c: usize) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe {
            asm!("svc #0", in("x8") nr, inlateout("x0") a as isize => r, in("x1") b,
                in("x2") c, options(nostack));
        }
        r
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall4(
        nr: libc::c_long,
        a: usize,
        b: usize,
        c: usize,
        d: usize,
    ) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe {
            asm!("svc #0", in("x8") nr, inlateout("x0") a as isize => r, in("x1") b,
                in("x2") c, in("x3") d, options(nostack));
        }
        r
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall6(
        nr: libc::c_long,
        a: usize,
        b: usize,
        c: usize,
        d: usize,
        e: usize,
        f: usize,
    ) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe {
            asm!("svc #0", in("x8") nr, inlateout("x0") a as isize => r, in("x1") b,
                in("x2") c, in("x3") d, in("x4") e, in("x5") f, options(nostack));
        }
        r
    }
}

/// Elsewhere (no live probe runtime there, so no need to stay off the C
/// library): the C library's `syscall`, its `-1`/`errno` turned into the
/// kernel's `-errno`.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) mod raw {
    fn result(r: libc::c_long) -> isize {
        if r == -1 {
            -(std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as isize)
        } else {
            r as isize
        }
    }

    /// # Safety
    /// As the system call `nr` with no arguments.
    pub(crate) unsafe fn syscall0(nr: libc::c_long) -> isize {
        // SAFETY: the caller's contract.
        result(unsafe { libc::syscall(nr) })
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    pub(crate) unsafe fn syscall1(nr: libc::c_long, a: usize) -> isize {
        // SAFETY: the caller's contract.
        result(unsafe { libc::syscall(nr, a) })
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    pub(crate) unsafe fn syscall2(nr: libc::c_long, a: usize, b: usize) -> isize {
        // SAFETY: the caller's contract.
        result(unsafe { libc::syscall(nr, a, b) })
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    pub(crate) unsafe fn syscall3(nr: libc::c_long, a: usize, b: usize, c: usize) -> isize {
        // SAFETY: the caller's contract.
        result(unsafe { libc::syscall(nr, a, b, c) })
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    pub(crate) unsafe fn syscall4(
        nr: libc::c_long,
        a: usize,
        b: usize,
        c: usize,
        d: usize,
    ) -> isize {
        // SAFETY: the caller's contract.
        result(unsafe { libc::syscall(nr, a, b, c, d) })
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    pub(crate) unsafe fn syscall6(
        nr: libc::c_long,
        a: usize,
        b: usize,
        c: usize,
        d: usize,
        e: usize,
        f: usize,
    ) -> isize {
        // SAFETY: the caller's contract.
        result(unsafe { libc::syscall(nr, a, b, c, d, e, f) })
    }
}

/// The `syscall` instruction, with 0 to 6 arguments (the x86_64 Linux
/// convention: number in `rax`, arguments in `rdi, rsi, rdx, r10, r8, r9`;
/// `rcx` and `r11` clobbered; the result in `rax`, `-errno` on failure).
#[cfg(target_arch = "x86_64")]
pub(crate) mod raw {
    use core::arch::asm;

    /// # Safety
    /// As the system call `nr` with no arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall0(nr: libc::c_long) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe {
            asm!("syscall", inlateout("rax") nr as isize => r,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        r
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall1(nr: libc::c_long, a: usize) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe {
            asm!("syscall", inlateout("rax") nr as isize => r, in("rdi") a,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        r
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall2(nr: libc::c_long, a: usize, b: usize) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe {
            asm!("syscall", inlateout("rax") nr as isize => r, in("rdi") a, in("rsi") b,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        r
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall3(nr: libc::c_long, a: usize, b: usize, c: usize) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe {
            asm!("syscall", inlateout("rax") nr as isize => r, in("rdi") a, in("rsi") b,
                 in("rdx") c, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        r
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall4(
        nr: libc::c_long,
        a: usize,
        b: usize,
        c: usize,
        d: usize,
    ) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe {
            asm!("syscall", inlateout("rax") nr as isize => r, in("rdi") a, in("rsi") b,
                 in("rdx") c, in("r10") d, lateout("rcx") _, lateout("r11") _,
                 options(nostack));
        }
        r
    }

    /// # Safety
    /// As the system call `nr` with these arguments.
    #[inline(always)]
    pub(crate) unsafe fn syscall6(
        nr: libc::c_long,
        a: usize,
        b: usize,
        c: usize,
        d: usize,
        e: usize,
        f: usize,
    ) -> isize {
        let r: isize;
        // SAFETY: the caller's contract.
        unsafe {
            asm!("syscall", inlateout("rax") nr as isize => r, in("rdi") a, in("rsi") b,
                 in("rdx") c, in("r10") d, in("r8") e, in("r9") f,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_system_calls_agree_with_the_c_library() {
        // SAFETY: getpid and gettid have no preconditions.
        let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
        assert_eq!(getpid(), pid);
        assert_eq!(gettid(), tid);
        // Signal 0 checks the target exists and sends nothing.
        assert_eq!(tgkill(pid, tid, 0), 0);
        assert!(failed(tgkill(pid, -1, 0)), "a bad tid is -EINVAL");
        assert!(!failed(0) && !failed(12) && failed(-(libc::EFAULT as isize)));
    }

    #[test]
    fn raw_mappings_and_reads_work_and_fail_as_the_kernel_says() {
        let page = map_zeroed(4096).expect("an anonymous page");
        let src = [7u8, 1, 2, 3, 4, 5, 6, 9];
        // SAFETY: the page is ours, 4096 bytes; `src` is 8 bytes.
        unsafe { copy_bytes(src.as_ptr(), page.as_ptr(), 8) };
        let mut back = [0u8; 8];
        // SAFETY: `back` is ours; the kernel checks the remote range.
        let n = unsafe { process_vm_readv_self(back.as_mut_ptr(), page.as_ptr() as u64, 8) };
        assert_eq!((n, back), (8, src));
        // SAFETY: the page is not used afterwards.
        unsafe { unmap(page.as_ptr(), 4096) };
        // SAFETY: as above; the page is gone now.
        let n = unsafe { process_vm_readv_self(back.as_mut_ptr(), page.as_ptr() as u64, 8) };
        assert_eq!(n, -(libc::EFAULT as isize));
    }
}
