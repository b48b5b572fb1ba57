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
//!
//! # arm64
//!
//! An instruction is a 4-byte aligned word, and a thread fetching it while
//! it is written byte by byte could run a mix of old and new bytes, so
//! [`poke`] writes each aligned word of a write with one 32-bit `str`
//! (single-copy atomic, so fetched whole, old or new) and bytes only at
//! unaligned ends. Each store is followed, inside the same routine, by the
//! cache maintenance arm64 needs before the new word can be executed:
//! `dc cvau` (clean the data cache line to the point of unification),
//! `dsb ish`, `ic ivau` (invalidate the instruction cache line), `dsb ish`,
//! `isb` (this thread re-fetches). Other threads re-fetch at the core
//! sync that follows every write (`in_process.rs`). Every instruction
//! of the routine lies in the range [`fixup`] recognises: a fault of the
//! store or of the maintenance (the text unmapped between them) takes the
//! failure exit.

#[cfg(target_arch = "x86_64")]
use std::arch::global_asm;

#[cfg(target_arch = "x86_64")]
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

#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.rcu_registry_poke,\"ax\",@progbits",
    ".p2align 4",
    ".globl __rcu_registry_poke_byte",
    ".hidden __rcu_registry_poke_byte",
    ".type __rcu_registry_poke_byte,@function",
    // u32 __rcu_registry_poke_byte(u8 *addr, u8 byte): 0 stored, 1 faulted.
    "__rcu_registry_poke_byte:",
    "strb w1, [x0]",
    "b 1f",
    ".globl __rcu_registry_poke_word",
    ".hidden __rcu_registry_poke_word",
    // u32 __rcu_registry_poke_word(u32 *addr, u32 word): 0 stored, 1
    // faulted. `addr` is 4-byte aligned: one single-copy atomic store.
    "__rcu_registry_poke_word:",
    "str w1, [x0]",
    // The maintenance of the line holding the byte or word just stored.
    "1:",
    "dc cvau, x0",
    "dsb ish",
    "ic ivau, x0",
    "dsb ish",
    "isb",
    "mov w0, #0",
    "ret",
    ".globl __rcu_registry_poke_fixup",
    ".hidden __rcu_registry_poke_fixup",
    "__rcu_registry_poke_fixup:",
    "mov w0, #1",
    "ret",
    // u32 __rcu_registry_peek_byte(const u8 *addr): the byte, or 0x100 if
    // the load faulted.
    ".globl __rcu_registry_peek_byte",
    ".hidden __rcu_registry_peek_byte",
    "__rcu_registry_peek_byte:",
    "ldrb w0, [x0]",
    "ret",
    ".globl __rcu_registry_peek_fixup",
    ".hidden __rcu_registry_peek_fixup",
    "__rcu_registry_peek_fixup:",
    "mov w0, #0x100",
    "ret",
    ".globl __rcu_registry_poke_end",
    ".hidden __rcu_registry_poke_end",
    "__rcu_registry_poke_end:",
    ".size __rcu_registry_poke_byte, . - __rcu_registry_poke_byte",
    ".popsection",
);

extern "C" {
    fn __rcu_registry_poke_byte(addr: *mut u8, byte: u8) -> u32;
    #[cfg(target_arch = "aarch64")]
    fn __rcu_registry_poke_word(addr: *mut u32, word: u32) -> u32;
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
#[cfg(target_arch = "x86_64")]
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

/// Stores `bytes` at `addr`: each 4-byte aligned word whole with one
/// atomic store, bytes at unaligned ends one by one, every store followed
/// by the cache maintenance of its line (module docs, "arm64"). `Err(i)`:
/// byte `i` (the first of its word) could not be stored; bytes `..i` were.
///
/// # Safety
/// As for the x86_64 `poke`.
#[cfg(target_arch = "aarch64")]
pub(crate) unsafe fn poke(_proof: &Catcher, addr: u64, bytes: &[u8]) -> Result<(), usize> {
    let mut i = 0;
    while i < bytes.len() {
        let at = addr + i as u64;
        let failed = match bytes[i..].first_chunk::<4>() {
            Some(word) if at % 4 == 0 => {
                // SAFETY: the caller's contract; `at` is 4-byte aligned; a
                // fault is turned into a return value by `fixup`.
                let r =
                    unsafe { __rcu_registry_poke_word(at as *mut u32, u32::from_le_bytes(*word)) };
                i += 4;
                r
            }
            _ => {
                // SAFETY: as above.
                let r = unsafe { __rcu_registry_poke_byte(at as *mut u8, bytes[i]) };
                i += 1;
                r
            }
        };
        if failed != 0 {
            return Err((at - addr) as usize);
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
    let ip = super::context::frame_ip(uc);
    // (the instructions that may fault, where they then resume): on x86_64
    // the one load or store of each routine; on arm64 every instruction
    // from the store to the end of its cache maintenance (module docs).
    let exits = [
        (
            __rcu_registry_poke_byte as *const () as usize as u64,
            __rcu_registry_poke_fixup as *const () as usize as u64,
        ),
        (
            __rcu_registry_peek_byte as *const () as usize as u64,
            __rcu_registry_peek_fixup as *const () as usize as u64,
        ),
    ];
    for (insn, exit) in exits {
        let ours = if cfg!(target_arch = "aarch64") {
            (insn..exit).contains(&ip)
        } else {
            ip == insn
        };
        if ours {
            super::context::set_frame_ip(uc, exit);
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
