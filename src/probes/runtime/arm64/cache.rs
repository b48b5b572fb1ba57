//! arm64 cache maintenance for code the runtime writes: what makes a new
//! instruction visible to instruction fetch (the C library's
//! `__clear_cache`, written out so the runtime neither links libgcc's nor
//! calls into the C library).
//!
//! # The sequence
//!
//! arm64 instruction caches are not coherent with data stores. After code
//! is stored (through any virtual address that maps it):
//!
//! 1. `dc cvau` on every data cache line of the range: clean to the point
//!    of unification, where instruction fetch looks;
//! 2. `dsb ish`: the cleans complete;
//! 3. `ic ivau` on every instruction cache line of the range, *at the
//!    address the code executes from* (an instruction cache may be indexed
//!    by virtual address: for the XOL slots, written through a second
//!    view, that is the executable view);
//! 4. `dsb ish`: the invalidations complete, for every core of the inner
//!    shareable domain;
//! 5. `isb`: this thread fetches afresh. Other threads need a context
//!    synchronization event of their own: a trap return (every thread
//!    reaches a fresh XOL slot through one), or the core-sync membarrier
//!    that follows every text write (`in_process.rs`).
//!
//! Line sizes come from `CTR_EL0` (readable at EL0 on Linux: `SCTLR_EL1.UCT`
//! is set, or the kernel emulates the read). Under qemu-user the
//! maintenance instructions are no-ops: qemu notices stores to code by
//! itself and retranslates (docs/limitations, "arm64 under qemu").

/// `CTR_EL0`: the smallest data and instruction cache line sizes, in bytes.
fn line_sizes() -> (u64, u64) {
    let ctr: u64;
    // SAFETY: reads a register Linux lets EL0 read; no memory access.
    unsafe {
        core::arch::asm!("mrs {c}, ctr_el0", c = out(reg) ctr,
            options(nomem, nostack, preserves_flags));
    }
    // DminLine: bits 19:16, IminLine: bits 3:0, log2 of the size in words.
    let d = 4u64 << ((ctr >> 16) & 0xf);
    let i = 4u64 << (ctr & 0xf);
    (d, i)
}

/// Makes `len` bytes of code at `exec` visible to instruction fetch after
/// they were stored through `written` (the same bytes: `written == exec`
/// unless the code was written through another view). Steps 1 to 5 of the
/// module docs.
pub(crate) fn sync_icache(written: u64, exec: u64, len: usize) {
    if len == 0 {
        return;
    }
    let (dline, iline) = line_sizes();
    let mut a = written & !(dline - 1);
    let end = written + len as u64;
    while a < end {
        // SAFETY: a cache clean of a line the caller just wrote (mapped);
        // no architectural effect on memory contents.
        unsafe {
            core::arch::asm!("dc cvau, {a}", a = in(reg) a, options(nostack, preserves_flags))
        };
        a += dline;
    }
    // SAFETY: a barrier.
    unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
    let mut a = exec & !(iline - 1);
    let end = exec + len as u64;
    while a < end {
        // SAFETY: an instruction cache invalidation of a mapped line; no
        // effect on memory.
        unsafe {
            core::arch::asm!("ic ivau, {a}", a = in(reg) a, options(nostack, preserves_flags))
        };
        a += iline;
    }
    // SAFETY: barriers.
    unsafe { core::arch::asm!("dsb ish", "isb", options(nostack, preserves_flags)) };
}

/// Stores `bytes` at `addr` (code, made writable by the caller): each
/// 4-byte aligned word with one single-copy atomic store, bytes at
/// unaligned ends one by one, then the maintenance of [`sync_icache`].
/// The direct twin of `poke.rs`'s stores, for when no fault can be caught.
///
/// # Safety
/// `addr..addr + bytes.len()` is mapped and writable, and is code nobody
/// reads as data.
pub(crate) unsafe fn store_code(addr: u64, bytes: &[u8]) {
    let mut i = 0;
    while i < bytes.len() {
        let at = addr + i as u64;
        match bytes[i..].first_chunk::<4>() {
            Some(w) if at % 4 == 0 => {
                // SAFETY: the caller's contract; `at` is aligned.
                unsafe { (at as *mut u32).write_volatile(u32::from_le_bytes(*w)) };
                i += 4;
            }
            _ => {
                // SAFETY: the caller's contract.
                unsafe { (at as *mut u8).write_volatile(bytes[i]) };
                i += 1;
            }
        }
    }
    sync_icache(addr, addr, bytes.len());
}

/// A context synchronization event on this thread.
#[inline]
pub(crate) fn isb() {
    // SAFETY: a barrier.
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}
