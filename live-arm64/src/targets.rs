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
    // la_alt(x) = 777: where a pre handler may send a probed call.
    ".globl la_alt",
    ".type la_alt,@function",
    "la_alt:",
    "mov w0, #777",
    "ret",
    ".size la_alt, . - la_alt",
    // la_spin(flag): returns once the u32 at `flag` is non-zero (a thread
    // held inside a known range of code, for the quiescence wait).
    ".globl la_spin",
    ".type la_spin,@function",
    "la_spin:",
    "ldar w1, [x0]",
    "cbz w1, la_spin",
    "ret",
    ".globl la_spin_end",
    "la_spin_end:",
    ".size la_spin, . - la_spin",
    // la_wait(flag): la_spin with its loop after its first instruction: one
    // execution of the entry per call (la_spin's `cbz` branches back to its
    // own entry, which a probe there counts as a call at each iteration).
    ".globl la_wait",
    ".type la_wait,@function",
    "la_wait:",
    "mov x2, x0",
    "1:",
    "ldar w1, [x2]",
    "cbz w1, 1b",
    "ret",
    ".size la_wait, . - la_wait",
    // la_ldxr(p) = *p + 1 with an exclusive pair: a probe on the store or
    // between the pair is refused (the trap clears the monitor).
    ".globl la_ldxr",
    ".type la_ldxr,@function",
    "la_ldxr:",
    "ldxr w1, [x0]",
    "add w1, w1, #1",
    "stxr w2, w1, [x0]",
    "cbnz w2, la_ldxr",
    "mov w0, w1",
    "ret",
    ".size la_ldxr, . - la_ldxr",
    // la_adr(x) = x + 0x10: `adr` is simulated.
    ".globl la_adr",
    ".type la_adr,@function",
    "la_adr:",
    "adr x1, 1f",
    "ldr w1, [x1]",
    "add w0, w0, w1",
    "ret",
    ".p2align 2",
    "1:",
    ".word 0x10",
    ".size la_adr, . - la_adr",
    // la_adrp(x) = x + 0x20 (a word in another section): `adrp` is
    // simulated.
    ".globl la_adrp",
    ".type la_adrp,@function",
    "la_adrp:",
    "adrp x1, la_adrp_word",
    "add x1, x1, :lo12:la_adrp_word",
    "ldr w1, [x1]",
    "add w0, w0, w1",
    "ret",
    ".size la_adrp, . - la_adrp",
    // la_bcond(x) = x < 10 ? x + 3 : 0: `b.lo` (offset 4) is simulated.
    ".globl la_bcond",
    ".type la_bcond,@function",
    "la_bcond:",
    "cmp w0, #10",
    "b.lo 1f",
    "mov w0, #0",
    "ret",
    "1:",
    "add w0, w0, #3",
    "ret",
    ".size la_bcond, . - la_bcond",
    // la_tbz(x) = x even ? x : x + 1: `tbz` is simulated.
    ".globl la_tbz",
    ".type la_tbz,@function",
    "la_tbz:",
    "tbz w0, #0, 1f",
    "add w0, w0, #1",
    "1:",
    "ret",
    ".size la_tbz, . - la_tbz",
    // la_ret(x) = x + 4: the `ret` (offset 4) is simulated.
    ".globl la_ret",
    ".type la_ret,@function",
    "la_ret:",
    "add w0, w0, #4",
    "ret",
    ".size la_ret, . - la_ret",
    // la_blr(x) = la_add1(x): `blr` (offset 16) is simulated.
    ".globl la_blr",
    ".type la_blr,@function",
    "la_blr:",
    "stp x29, x30, [sp, #-16]!",
    "mov x29, sp",
    "adrp x2, la_add1",
    "add x2, x2, :lo12:la_add1",
    "blr x2",
    "ldp x29, x30, [sp], #16",
    "ret",
    ".size la_blr, . - la_blr",
    // la_load(p) = *p (u32): `ldr` steps out of line, and faults there
    // for a bad pointer.
    ".globl la_load",
    ".type la_load,@function",
    "la_load:",
    "ldr w0, [x0]",
    "ret",
    ".size la_load, . - la_load",
    ".popsection",
    ".pushsection .rodata.live_arm64_targets,\"a\",@progbits",
    ".p2align 2",
    "la_adrp_word:",
    ".word 0x20",
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
    /// `777`.
    pub fn la_alt(x: u32) -> u32;
    /// Spins until `*flag != 0`.
    pub fn la_spin(flag: *const u32);
    /// Spins until `*flag != 0`, its loop past its first instruction (so a
    /// probe on its entry is hit once per call).
    pub fn la_wait(flag: *const u32);
    /// One past [`la_spin`]'s last instruction.
    pub fn la_spin_end();
    /// Atomically increments `*p` with `ldxr`/`stxr`; returns the new value.
    pub fn la_ldxr(p: *mut u32) -> u32;
    /// `x + 0x10`; its first instruction is a simulated `adr`.
    pub fn la_adr(x: u32) -> u32;
    /// `x + 0x20`; its first instruction is a simulated `adrp`.
    pub fn la_adrp(x: u32) -> u32;
    /// `x < 10 ? x + 3 : 0`; its `b.lo` (offset 4) is simulated.
    pub fn la_bcond(x: u32) -> u32;
    /// `x` rounded up to even; its first instruction is a simulated `tbz`.
    pub fn la_tbz(x: u32) -> u32;
    /// `x + 4`; its `ret` (offset 4) is simulated.
    pub fn la_ret(x: u32) -> u32;
    /// `x + 1` through `blr` (offset 16, simulated) to [`la_add1`].
    pub fn la_blr(x: u32) -> u32;
    /// `*p`; its `ldr` steps out of line.
    pub fn la_load(p: *const u32) -> u32;
}

/// The address of a target function.
pub fn addr(f: *const ()) -> u64 {
    f as usize as u64
}

#[cfg(target_arch = "aarch64")]
/// Calls `f` `per_thread` times on each of `threads` threads, checking
/// every result.
pub fn hammer(
    threads: u32,
    per_thread: u32,
    f: unsafe extern "C" fn(u32) -> u32,
    want: fn(u32) -> u32,
) {
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..per_thread {
                    // Small values too (both ways of `b.lo`, `cbz`).
                    let x = if i % 2 == 0 { i % 16 } else { t << 20 | i };
                    // SAFETY: the targets are complete C-ABI functions.
                    let got = unsafe { f(std::hint::black_box(x)) };
                    assert_eq!(got, want(x), "f({x:#x})");
                }
            });
        }
    });
}
