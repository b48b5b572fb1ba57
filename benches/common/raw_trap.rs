//! The raw-`int3` peer of the live hit benches: an empty SIGTRAP handler
//! installed with the runtime's flags and mask, so a trap costs what the
//! kernel's delivery and `rt_sigreturn` cost and nothing else.

extern "C" fn empty_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Swaps the SIGTRAP disposition for an empty handler with the runtime's
/// flags and mask; returns the one to restore.
pub fn install_empty_handler() -> libc::sigaction {
    // SAFETY: zeroed sigactions are valid; the handler has the SA_SIGINFO
    // signature; the mask calls only write inside `sa`.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = empty_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigfillset(&mut sa.sa_mask);
        for s in [
            libc::SIGTRAP,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
        ] {
            libc::sigdelset(&mut sa.sa_mask, s);
        }
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, &mut old), 0);
        old
    }
}

/// Puts back the disposition [`install_empty_handler`] returned.
pub fn restore_handler(old: &libc::sigaction) {
    // SAFETY: restores a disposition sigaction returned.
    unsafe { assert_eq!(libc::sigaction(libc::SIGTRAP, old, std::ptr::null_mut()), 0) };
}
