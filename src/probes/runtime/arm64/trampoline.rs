//! The kretprobe return trampoline on arm64: where a hijacked return lands.
//!
//! # Without a trap
//!
//! At a kretprobe's entry the registry replaces `x30` (the return address)
//! with [`trampoline_address`]. When the function returns, `ret` branches
//! here with the stack pointer exactly as the caller will see it (arm64
//! keeps return addresses in `x30`, not on the stack). The trampoline:
//!
//! 1. reserves a 384-byte frame below the caller's stack pointer (16-byte
//!    aligned, as the ABI requires at every call);
//! 2. stores `x0..x30` in [`Regs`] order (`x0` first in memory), so the
//!    frame *is* an array the Rust side indexes by register number, and a
//!    slot for the real return address;
//! 3. stores `q0..q7`: the FP/SIMD argument and return registers (a
//!    function returns `f64`, `f32` and vectors in `v0..v3`, and the
//!    return handlers, Rust code, may use any caller-saved vector
//!    register). The callee-saved `d8..d15` and `x19..x29` are preserved by
//!    the Rust code itself (AAPCS64);
//! 4. calls `trampoline_return(frame)`, which builds a [`Regs`] (stack
//!    pointer = the caller's, PC = the trampoline), offers it to the
//!    attached dispatchers (the registry finds this thread's instance for
//!    this stack pointer, runs the return handlers, and answers the real
//!    return address in `regs.ip`), and writes the registers and the return
//!    address back into the frame;
//! 5. reloads everything, `x30` from the return-address slot, releases the
//!    frame and returns there.
//!
//! Return handlers run on the thread's ordinary stack, outside any signal
//! handler. Changes a handler makes to `x0..x29` (the return value in `x0`)
//! take effect; a changed stack pointer is ignored. NZCV is not preserved
//! (the ABI does not preserve it across a return either).
//!
//! # Limitations
//!
//! - Only `q0..q7` of the vector state are saved: SVE state beyond the low
//!   128 bits of `z0..z7` is not (a function returning an SVE vector would
//!   see its upper bits clobbered by a handler that uses SVE).
//! - The trampoline has no unwind information: a panic unwinding through a
//!   function whose return was hijacked cannot find the caller and aborts.
//! - If no instance claims a return, the real return address is unknown:
//!   the process is aborted with a message.

use std::arch::global_asm;

use super::dispatch::dispatch_return;
use super::in_trap::TrapScope;
use crate::probes::arch::Regs;

/// Words of general registers and return address in the frame.
const FRAME_WORDS: usize = 32;
/// Index of the real return address in the frame.
const RET_SLOT: usize = 31;
/// Bytes of the whole frame: 32 words, then `q0..q7` (8 x 16 bytes).
const FRAME_BYTES: u64 = (FRAME_WORDS * 8 + 8 * 16) as u64;

global_asm!(
    ".pushsection .text.rcu_registry_kretprobe_trampoline,\"ax\",@progbits",
    ".p2align 4",
    ".globl __rcu_registry_kretprobe_trampoline",
    ".hidden __rcu_registry_kretprobe_trampoline",
    ".type __rcu_registry_kretprobe_trampoline,@function",
    "__rcu_registry_kretprobe_trampoline:",
    "sub sp, sp, #384",
    "stp x0, x1, [sp, #0]",
    "stp x2, x3, [sp, #16]",
    "stp x4, x5, [sp, #32]",
    "stp x6, x7, [sp, #48]",
    "stp x8, x9, [sp, #64]",
    "stp x10, x11, [sp, #80]",
    "stp x12, x13, [sp, #96]",
    "stp x14, x15, [sp, #112]",
    "stp x16, x17, [sp, #128]",
    "stp x18, x19, [sp, #144]",
    "stp x20, x21, [sp, #160]",
    "stp x22, x23, [sp, #176]",
    "stp x24, x25, [sp, #192]",
    "stp x26, x27, [sp, #208]",
    "stp x28, x29, [sp, #224]",
    // x30 (the trampoline's own address, as `ret` left it) and the
    // return-address slot, filled by the Rust half.
    "stp x30, xzr, [sp, #240]",
    "stp q0, q1, [sp, #256]",
    "stp q2, q3, [sp, #288]",
    "stp q4, q5, [sp, #320]",
    "stp q6, q7, [sp, #352]",
    "mov x0, sp",
    "bl {handler}",
    "ldp q0, q1, [sp, #256]",
    "ldp q2, q3, [sp, #288]",
    "ldp q4, q5, [sp, #320]",
    "ldp q6, q7, [sp, #352]",
    "ldp x0, x1, [sp, #0]",
    "ldp x2, x3, [sp, #16]",
    "ldp x4, x5, [sp, #32]",
    "ldp x6, x7, [sp, #48]",
    "ldp x8, x9, [sp, #64]",
    "ldp x10, x11, [sp, #80]",
    "ldp x12, x13, [sp, #96]",
    "ldp x14, x15, [sp, #112]",
    "ldp x16, x17, [sp, #128]",
    "ldp x18, x19, [sp, #144]",
    "ldp x20, x21, [sp, #160]",
    "ldp x22, x23, [sp, #176]",
    "ldp x24, x25, [sp, #192]",
    "ldp x26, x27, [sp, #208]",
    "ldp x28, x29, [sp, #224]",
    // The real return address.
    "ldr x30, [sp, #248]",
    "add sp, sp, #384",
    "ret",
    ".globl __rcu_registry_kretprobe_trampoline_end",
    ".hidden __rcu_registry_kretprobe_trampoline_end",
    "__rcu_registry_kretprobe_trampoline_end:",
    ".size __rcu_registry_kretprobe_trampoline, . - __rcu_registry_kretprobe_trampoline",
    ".popsection",
    handler = sym trampoline_return,
);

extern "C" {
    fn __rcu_registry_kretprobe_trampoline();
    fn __rcu_registry_kretprobe_trampoline_end();
}

/// The address kretprobe entries write into `x30`.
pub fn trampoline_address() -> u64 {
    __rcu_registry_kretprobe_trampoline as *const () as usize as u64
}

/// `[start, end)` of the trampoline's code (refused as a probe target).
pub(crate) fn trampoline_range() -> (u64, u64) {
    (
        trampoline_address(),
        __rcu_registry_kretprobe_trampoline_end as *const () as usize as u64,
    )
}

/// The trampoline's Rust half (see the module docs). `frame` points to the
/// trampoline's frame: `x0..x30` by register number, then the slot for the
/// real return address; the caller's stack pointer is [`FRAME_BYTES`]
/// above it.
///
/// It raises the thread's trap flag first (`in_trap.rs`); a return that
/// finds it up is nested in the runtime's own work and runs no handler.
extern "C" fn trampoline_return(frame: *mut [u64; FRAME_WORDS]) {
    let scope = TrapScope::enter();
    let missed = scope.is_none().then(super::in_trap::nested);
    returning(frame);
    drop(missed);
    drop(scope);
}

/// [`trampoline_return`] with the trap flag up: may call the C library (a
/// probe hit there is a nested trap).
#[inline(never)]
extern "C" fn returning(frame: *mut [u64; FRAME_WORDS]) {
    // SAFETY: the assembly passes its own stack frame, 32 initialised,
    // aligned words that nothing else references during the call.
    let f = unsafe { &mut *frame };
    let mut regs = Regs::default();
    regs.gprs.copy_from_slice(&f[..31]);
    regs.sp = frame as u64 + FRAME_BYTES;
    regs.ip = trampoline_address();
    // Return handlers run inside `dispatch_return`: a panic there must not
    // unwind into the assembly (it has no unwind information).
    let claimed = super::signal::abort_on_panic(
        "rcu-registry: a probe handler panicked in the kretprobe return trampoline; \
         a panic cannot unwind through it, so the process aborts (see the handler \
         contract: rcu_registry::docs::patterns)",
        || dispatch_return(&mut regs),
    );
    if !claimed {
        super::signal::fatal_message(
            "rcu-registry: a return reached the kretprobe trampoline but no kretprobe \
             instance claimed it; the real return address is lost",
        );
    }
    f[..31].copy_from_slice(&regs.gprs);
    f[RET_SLOT] = regs.ip;
}
