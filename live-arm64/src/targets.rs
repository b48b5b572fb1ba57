//! Probe targets in arm64 assembly, so each test knows exactly which
//! instruction its probe displaces and how the runtime completes it:
//! stepped out of line from an XOL slot, or simulated (a branch, `bl`,
//! `cbz`, a literal load, `adr`).

#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.live_arm64_targets,\"ax\",@progbits",
    ".p2align 4",
    // la_add1(x) = x + 1: `add` steps out of line.
    ".globl la_add1",
    ".type la_add1,@function",
    "la_add1:",
    "add w0, w0, #1",
    "ret",
    ".size la_add1, . - la_add1",
    // la_branch(x) = x + 2: `b` is simulated.
    ".globl la_branch",
    ".type la_branch,@function",
    "la_branch:",
    "b 1f",
    "udf #0",
    "1:",
    "add w0, w0, #2",
    "ret",
    ".size la_branch, . - la_branch",
    // la_call(x) = la_add1(x) + 1 = x + 2: a frame, then `bl` (simulated,
    // at offset 8), whose return comes back through x30.
    ".globl la_call",
    ".type la_call,@function",
    "la_call:",
    "stp x29, x30, [sp, #-16]!",
    "mov x29, sp",
    "bl la_add1",
    "add w0, w0, #1",
    "ldp x29, x30, [sp], #16",
    "ret",
    ".size la_call, . - la_call",
    // la_cbz(x) = x == 0 ? 7 : x: `cbz` is simulated.
    ".globl la_cbz",
    ".type la_cbz,@function",
    "la_cbz:",
    "cbz w0, 1f",
    "ret",
    "1:",
    "mov w0, #7",
    "ret",
    ".size la_cbz, . - la_cbz",
    // la_lit(x) = x + 0x1234: `ldr` (literal) is simulated.
    ".globl la_lit",
    ".type la_lit,@function",
    "la_lit:",
    "ldr w1, 1f",
    "add w0, w0, w1",
    "ret",
    ".p2align 2",
    "1:",
    ".word 0x1234",
    ".size la_lit, . - la_lit",
    // la_fadd(x) = x + 0.5 (f64): `fadd` steps out of line; the vector
    // state must survive the trap.
    ".globl la_fadd",
    ".type la_fadd,@function",
    "la_fadd:",
    "fmov d1, #0.5",
    "fadd d0, d0, d1",
    "ret",
    ".size la_fadd, . - la_fadd",
    ".popsection",
);

#[cfg(target_arch = "aarch64")]
extern "C" {
    /// `x + 1`; its first instruction steps out of line.
    pub fn la_add1(x: u32) -> u32;
    /// `x + 2`; its first instruction is a simulated `b`.
    pub fn la_branch(x: u32) -> u32;
    /// `x + 2` through a call to [`la_add1`] (`bl` at offset 8).
    pub fn la_call(x: u32) -> u32;
    /// `7` for 0, else `x`; its first instruction is a simulated `cbz`.
    pub fn la_cbz(x: u32) -> u32;
    /// `x + 0x1234`; its first instruction is a simulated literal load.
    pub fn la_lit(x: u32) -> u32;
    /// `x + 0.5`; its second instruction (`fadd`) steps out of line.
    pub fn la_fadd(x: f64) -> f64;
}

/// The address of a target function.
pub fn addr(f: *const ()) -> u64 {
    f as usize as u64
}
