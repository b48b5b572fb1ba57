//! Thin wrappers over the Linux system calls the RCU domains rely on:
//! `membarrier` (the updater's heavy barrier), `futex` (sleeping until the
//! last reader leaves) and `mmap` (reader-slot memory that can be obtained
//! from a signal handler). Every function here is async-signal-safe.
//!
//! How the domains use them: [`crate::docs::algorithms::rcu`].

#![cfg_attr(loom, allow(dead_code))]

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

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

// The command numbers are stable kernel ABI (include/uapi/linux/membarrier.h).
pub(crate) const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
pub(crate) const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
pub(crate) const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

pub(crate) fn sys_membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes (cmd, flags, cpu_id) integers and touches no
    // user memory; any failure is reported through the return value.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_uint,
            0 as libc::c_int,
        )
    }
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
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            std::ptr::null::<libc::timespec>(),
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
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every thread sleeping on `word`.
pub(crate) fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key; it does not access
    // memory through it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

/// Anonymous, zero-filled, read-write pages; `None` if the kernel refuses.
/// Async-signal-safe (unlike `malloc`).
pub(crate) fn map_zeroed(len: usize) -> Option<std::ptr::NonNull<u8>> {
    // SAFETY: an anonymous private mapping with no fixed address cannot alias
    // existing memory; the result is checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        None
    } else {
        std::ptr::NonNull::new(p.cast())
    }
}
