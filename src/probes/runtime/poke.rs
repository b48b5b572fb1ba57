//! Stores into our own code that survive the code being unmapped under
//! them: the kernel's exception-table idea (`copy_to_user` faults return
//! an error instead of oopsing), in user space.
//!
//! # Why
//!
//! A breakpoint is one byte. Writing it with `process_vm_writev` (what
//! [`InProcess`](super::InProcess) did for every byte) costs the kernel a
//! page lookup, a pin and a map per piece: about 0.6 us, the largest single
//! cost of removing a uprobe in a batch and a sixth of installing one. A
//! plain store costs nanoseconds, but a `dlclose` on another thread may
//! unmap the text between the protection change and the store (the loader
//! takes none of our locks), and a store would then kill the process.
//!
//! # How
//!
//! [`poke`] stores with one instruction at a known address
//! (`__rcu_registry_poke_byte`). The runtime's fault handler
//! ([`faults`](super::faults)) asks [`fixup`] first: a SIGSEGV or SIGBUS
//! raised by that instruction resumes at the function's second exit, which
//! returns "failed" instead of the store; nothing else about the fault is
//! delivered (it is ours). The store is made only when that handler is sure
//! to run: [`catcher`] checks, once per batch of writes, that the runtime's
//! handler is installed for both signals and that this thread does not
//! block them (a blocked synchronous fault kills the process without any
//! handler). Otherwise the caller writes with `process_vm_writev`, as before.
//!
//! The store is a one-byte `mov`: atomic with respect to instruction fetch
//! on x86, as the kernel's store for `process_vm_writev` was.

use std::arch::global_asm;

global_asm!(
    ".pushsection .text.rcu_registry_poke,\"ax\",@progbits",
    ".p2align 4",
    ".globl __rcu_registry_poke_byte",
    ".hidden __rcu_registry_poke_byte",
    ".type __rcu_registry_poke_byte,@function",
    // u32 __rcu_registry_poke_byte(u8 *addr, u8 byte): 0 stored, 1 faulted.
    "__rcu_registry_poke_byte:",
    // The one instruction that may fault: `fixup` knows its address.
    "mov byte ptr [rdi], sil",
    "xor eax, eax",
    "ret",
    ".globl __rcu_registry_poke_fixup",
    ".hidden __rcu_registry_poke_fixup",
    "__rcu_registry_poke_fixup:",
    "mov eax, 1",
    "ret",
    // u32 __rcu_registry_peek_byte(const u8 *addr): the byte, or 0x100 if
    // the load faulted.
    ".globl __rcu_registry_peek_byte",
    ".hidden __rcu_registry_peek_byte",
    "__rcu_registry_peek_byte:",
    // The one instruction that may fault.
    "movzx eax, byte ptr [rdi]",
    "ret",
    ".globl __rcu_registry_peek_fixup",
    ".hidden __rcu_registry_peek_fixup",
    "__rcu_registry_peek_fixup:",
    "mov eax, 0x100",
    "ret",
    ".globl __rcu_registry_poke_end",
    ".hidden __rcu_registry_poke_end",
    "__rcu_registry_poke_end:",
    ".size __rcu_registry_poke_byte, . - __rcu_registry_poke_byte",
    ".popsection",
);

extern "C" {
    fn __rcu_registry_poke_byte(addr: *mut u8, byte: u8) -> u32;
    fn __rcu_registry_poke_fixup();
    fn __rcu_registry_peek_byte(addr: *const u8) -> u32;
    fn __rcu_registry_peek_fixup();
    fn __rcu_registry_poke_end();
}

/// The stores' code, `[start, end)`: never to be patched (a breakpoint
/// there would run the store from an XOL slot, where [`fixup`] does not
/// recognise it).
pub(crate) fn range() -> (u64, u64) {
    (
        __rcu_registry_poke_byte as *const () as usize as u64,
        __rcu_registry_poke_end as *const () as usize as u64,
    )
}

/// Proof that a fault of [`poke`] on this thread is caught: the runtime's
/// fault handler is installed for SIGSEGV and SIGBUS and neither is
/// blocked here. Valid until the application changes either (a handler
/// installed after the check, between two stores of one batch, would see a
/// fault of ours as its own: the window is one batch of writes). Neither
/// `Send` nor `Sync`: the signal mask it checked is this thread's.
pub(crate) struct Catcher(std::marker::PhantomData<*const ()>);

/// A [`Catcher`], if the runtime's fault handler would catch a faulting
/// store now (two `sigaction` queries and one `pthread_sigmask`).
pub(crate) fn catcher() -> Option<Catcher> {
    super::faults::claim();
    // SAFETY: all-zero is a valid sigset_t; a null new set only reads.
    let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) } != 0 {
        return None;
    }
    for sig in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: `mask` was filled above.
        if unsafe { libc::sigismember(&mask, sig) } == 1 {
            return None;
        }
        // SAFETY: all-zero is a valid sigaction; a null new action only
        // reads the current one.
        let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut cur) } != 0 {
            return None;
        }
        if cur.sa_sigaction != super::faults::handler_address() as usize {
            return None;
        }
    }
    Some(Catcher(std::marker::PhantomData))
}

/// Stores `bytes` at `addr`, one byte store each, in order. `Err(i)`:
/// byte `i` could not be stored (its page is unmapped or not writable);
/// bytes `..i` were.
///
/// # Safety
/// `addr..addr + bytes.len()` is code of this process made writable by the
/// caller (a store to a mapped writable page succeeds: it must be memory
/// nobody else reads as data); `_proof` is this thread's.
pub(crate) unsafe fn poke(_proof: &Catcher, addr: u64, bytes: &[u8]) -> Result<(), usize> {
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: the caller's contract; a fault is turned into a return
        // value by `fixup` (the catcher proves the handler runs).
        if unsafe { __rcu_registry_poke_byte((addr + i as u64) as *mut u8, b) } != 0 {
            return Err(i);
        }
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `addr` into `buf`, one byte load each.
/// `Err(i)`: byte `i` could not be read (unmapped or unreadable); bytes
/// `..i` were.
///
/// # Safety
/// Reading `addr..addr + buf.len()` has no side effect (it is code or data
/// of this process, not a device mapping); `_proof` is this thread's.
pub(crate) unsafe fn peek(_proof: &Catcher, addr: u64, buf: &mut [u8]) -> Result<(), usize> {
    for (i, b) in buf.iter_mut().enumerate() {
        // SAFETY: the caller's contract; a fault is turned into a return
        // value by `fixup` (the catcher proves the handler runs).
        let v = unsafe { __rcu_registry_peek_byte((addr + i as u64) as *const u8) };
        if v > 0xff {
            return Err(i);
        }
        *b = v as u8;
    }
    Ok(())
}

/// Called first by the fault handler: if `uc` is a fault of the load or the
/// store of [`peek`] or [`poke`], makes it resume at the instruction's
/// failure exit and returns true (the fault is handled). Async-signal-safe.
pub(crate) fn fixup(sig: libc::c_int, uc: &mut libc::ucontext_t) -> bool {
    if sig != libc::SIGSEGV && sig != libc::SIGBUS {
        return false;
    }
    let rip = &mut uc.uc_mcontext.gregs[libc::REG_RIP as usize];
    // (the instruction that may fault, where it then resumes)
    let exits = [
        (
            __rcu_registry_poke_byte as *const () as usize,
            __rcu_registry_poke_fixup as *const () as usize,
        ),
        (
            __rcu_registry_peek_byte as *const () as usize,
            __rcu_registry_peek_fixup as *const () as usize,
        ),
    ];
    for (insn, exit) in exits {
        if *rip as usize == insn {
            *rip = exit as i64;
            return true;
        }
    }
    false
}

/// For tests (`__internals::runtime::poke`): one store of `byte` at `addr`
/// as a write batch makes it. `None`: no fault would be caught here (the
/// runtime's handler is not installed, or this thread blocks SIGSEGV or
/// SIGBUS), nothing done; `Some(false)`: the store faulted.
///
/// # Safety
/// A store at `addr` that succeeds must be harmless (memory the test owns).
pub unsafe fn store_byte(addr: u64, byte: u8) -> Option<bool> {
    let c = catcher()?;
    // SAFETY: the caller's contract.
    Some(unsafe { poke(&c, addr, &[byte]) }.is_ok())
}

/// For tests: one load at `addr` as a write batch makes it. `None` as for
/// [`store_byte`]; `Some(None)`: the load faulted.
///
/// # Safety
/// Reading `addr` has no side effect.
pub unsafe fn load_byte(addr: u64) -> Option<Option<u8>> {
    let c = catcher()?;
    let mut b = [0u8];
    // SAFETY: the caller's contract.
    Some(unsafe { peek(&c, addr, &mut b) }.ok().map(|()| b[0]))
}
