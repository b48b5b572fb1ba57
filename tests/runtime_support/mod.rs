//! Shared by the live-runtime test binaries: functions with known machine
//! code (so every test knows exactly which instruction a probe displaces and
//! how it is completed), and the lock that serializes tests sharing the
//! process's SIGTRAP handler and code.

#![allow(dead_code)]

use std::arch::global_asm;
use std::sync::{Mutex, MutexGuard};

// Every function is spelled in bytes so its encoding is fixed, and typed and
// sized so the ELF symbol table (and with it the registry's boundary check)
// knows its extent.
global_asm!(
    ".pushsection .text.rtp_functions,\"ax\",@progbits",
    // rtp_add1(x) = x + 1: mov eax, edi (boostable, out of line);
    // add eax, 1; ret.
    ".p2align 4",
    ".globl rtp_add1",
    ".type rtp_add1,@function",
    "rtp_add1:",
    ".byte 0x89, 0xf8",
    ".byte 0x83, 0xc0, 0x01",
    ".byte 0xc3",
    ".size rtp_add1, . - rtp_add1",
    // rtp_push(x) = x: push rbx (emulated); mov eax, edi; pop rbx; ret.
    ".p2align 4",
    ".globl rtp_push",
    ".type rtp_push,@function",
    "rtp_push:",
    ".byte 0x53",
    ".byte 0x89, 0xf8",
    ".byte 0x5b",
    ".byte 0xc3",
    ".size rtp_push, . - rtp_push",
    // rtp_mul3(x) = 3x: lea eax, [rdi + rdi*2]; ret.
    ".p2align 4",
    ".globl rtp_mul3",
    ".type rtp_mul3,@function",
    "rtp_mul3:",
    ".byte 0x8d, 0x04, 0x7f",
    ".byte 0xc3",
    ".size rtp_mul3, . - rtp_mul3",
    // rtp_alt(_) = 777: mov eax, 777; ret.
    ".p2align 4",
    ".globl rtp_alt",
    ".type rtp_alt,@function",
    "rtp_alt:",
    ".byte 0xb8, 0x09, 0x03, 0x00, 0x00",
    ".byte 0xc3",
    ".size rtp_alt, . - rtp_alt",
    // rtp_answer() = 1: mov eax, 1; ret. Patched to mov eax, 2 by the
    // text tests.
    ".p2align 4",
    ".globl rtp_answer",
    ".type rtp_answer,@function",
    "rtp_answer:",
    ".byte 0xb8, 0x01, 0x00, 0x00, 0x00",
    ".byte 0xc3",
    ".size rtp_answer, . - rtp_answer",
    // rtp_word() = 0x11111111: mov eax, 0x11111111; ret. The concurrent
    // patch test swaps the immediate for 0x22222222: a torn instruction
    // would return a mix.
    ".p2align 4",
    ".globl rtp_word",
    ".type rtp_word,@function",
    "rtp_word:",
    ".byte 0xb8, 0x11, 0x11, 0x11, 0x11",
    ".byte 0xc3",
    ".size rtp_word, . - rtp_word",
    // rtp_load() = rtp_data: mov rax, [rip + rtp_data] (RIP-relative: always
    // single-stepped with a scratch register); ret.
    ".p2align 4",
    ".globl rtp_load",
    ".type rtp_load,@function",
    "rtp_load:",
    "mov rax, qword ptr [rip + rtp_data]",
    "ret",
    ".size rtp_load, . - rtp_load",
    // rtp_sum3(x) = rtp_add1(x) + 3x via two calls: exercises probes on
    // callees and a kretprobe on a function that calls others.
    ".p2align 4",
    ".globl rtp_twice",
    ".type rtp_twice,@function",
    "rtp_twice:",
    "push rbx",
    "mov ebx, edi",
    "call rtp_add1",
    "mov edi, ebx",
    "mov ebx, eax",
    "call rtp_mul3",
    "add eax, ebx",
    "pop rbx",
    "ret",
    ".size rtp_twice, . - rtp_twice",
    // rtp_fill(dst, n): fills n bytes at dst with 0x5a. mov rcx, rsi;
    // mov al, 0x5a; rep stosb (a string instruction that iterates in
    // place); ret.
    ".p2align 4",
    ".globl rtp_fill",
    ".type rtp_fill,@function",
    "rtp_fill:",
    ".byte 0x48, 0x89, 0xf1",
    ".byte 0xb0, 0x5a",
    ".byte 0xf3, 0xaa",
    ".byte 0xc3",
    ".size rtp_fill, . - rtp_fill",
    // rtp_args3(a, b, c) = a + 2b + 4c: lea rax, [rdi + rsi*2];
    // lea rax, [rax + rdx*4]; ret. Reads its three arguments where the
    // System V convention passes them (rdi, rsi, rdx).
    ".p2align 4",
    ".globl rtp_args3",
    ".type rtp_args3,@function",
    "rtp_args3:",
    "lea rax, [rdi + rsi*2]",
    "lea rax, [rax + rdx*4]",
    "ret",
    ".size rtp_args3, . - rtp_args3",
    // rtp_args8(a, .., h) = g + h: the seventh and eighth arguments are on
    // the stack at entry ([rsp + 8], [rsp + 16]). mov rax, [rsp + 8];
    // add rax, [rsp + 16]; ret.
    ".p2align 4",
    ".globl rtp_args8",
    ".type rtp_args8,@function",
    "rtp_args8:",
    "mov rax, qword ptr [rsp + 8]",
    "add rax, qword ptr [rsp + 16]",
    "ret",
    ".size rtp_args8, . - rtp_args8",
    ".popsection",
    ".pushsection .data.rtp_data,\"aw\",@progbits",
    ".p2align 3",
    ".globl rtp_data",
    "rtp_data:",
    ".quad 0x123456789",
    ".popsection",
);

extern "C" {
    pub fn rtp_add1(x: u32) -> u32;
    pub fn rtp_push(x: u32) -> u32;
    pub fn rtp_mul3(x: u32) -> u32;
    pub fn rtp_alt(x: u32) -> u32;
    pub fn rtp_answer() -> u32;
    pub fn rtp_word() -> u32;
    pub fn rtp_load() -> u64;
    pub fn rtp_twice(x: u32) -> u32;
    pub fn rtp_fill(dst: *mut u8, n: usize);
    pub fn rtp_args3(a: u64, b: u64, c: u64) -> u64;
    #[allow(clippy::too_many_arguments)]
    pub fn rtp_args8(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, g: u64, h: u64) -> u64;
}

/// Offsets of the instructions of `rtp_fill`.
pub const FILL_REP_STOSB: u64 = 5;
/// Offset of `rtp_add1`'s `ret` and `rtp_mul3`'s `ret`.
pub const ADD1_RET: u64 = 5;
pub const MUL3_RET: u64 = 3;

/// A test function taking and returning a `u32`.
pub type Func = unsafe extern "C" fn(u32) -> u32;

/// What a test function should return for an argument.
pub type Want = fn(u32) -> u32;

/// Calls through a black-boxed pointer so the compiler cannot fold the call.
#[inline(never)]
pub fn call(f: Func, x: u32) -> u32 {
    let f = std::hint::black_box(f);
    // SAFETY: every rtp_* function taking a u32 is a complete C-ABI function.
    unsafe { f(std::hint::black_box(x)) }
}

/// Address of a test function.
pub fn addr(f: Func) -> u64 {
    f as usize as u64
}

/// `n` bytes of code at `addr`.
pub fn code(addr: u64, n: usize) -> Vec<u8> {
    // SAFETY: test code addresses are mapped and readable.
    unsafe { std::slice::from_raw_parts(addr as *const u8, n) }.to_vec()
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Serializes the tests of one binary: they share the SIGTRAP handler, the
/// registry and the code they patch.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The protection string (`r-xp`) of the page holding `addr`.
pub fn perms_at(addr: u64) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        let (s, e) = range.split_once('-').unwrap();
        let (s, e) = (
            u64::from_str_radix(s, 16).unwrap(),
            u64::from_str_radix(e, 16).unwrap(),
        );
        if (s..e).contains(&addr) {
            return perms.to_string();
        }
    }
    panic!("{addr:#x} is not mapped");
}

/// Test duration scale from `RT_STRESS_SECS` (default: short).
pub fn stress_secs(default: f64) -> std::time::Duration {
    let secs = std::env::var("RT_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    std::time::Duration::from_secs_f64(secs)
}

/// Calls `iteration` in a loop on a worker thread while this thread sends
/// the worker `SIGUSR1` (handled by `handler`, installed for the run and
/// restored after) every `every`, for `duration` and then until `enough()`
/// (the coverage the caller asserts, such as "a signal landed inside a
/// call": whether one has by a given time is the scheduler's business, so
/// the loop keeps going rather than the test failing). Returns the
/// iterations made and the signals sent. A worker that makes no progress for `stall`
/// is reported as deadlocked and the process aborted: a deadlocked thread
/// cannot be joined, and the test must fail rather than hang.
pub fn loop_under_signals(
    handler: extern "C" fn(libc::c_int),
    duration: std::time::Duration,
    every: std::time::Duration,
    stall: std::time::Duration,
    enough: impl Fn() -> bool,
    iteration: impl Fn() + Sync,
) -> (u64, u64) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;
    // SAFETY: a plain handler for SIGUSR1, which the runtime tests use for
    // nothing else; restored below.
    let old = unsafe { libc::signal(libc::SIGUSR1, handler as *const () as usize) };
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let mut sent = 0u64;
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, done, iteration) = (&stop, &done, &iteration);
        let worker = s.spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() }).unwrap();
            while !stop.load(Ordering::Relaxed) {
                iteration();
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
        let target = rx.recv().unwrap();
        let t0 = Instant::now();
        let (mut last, mut last_change) = (0, Instant::now());
        let mut watchdog = || {
            let now = done.load(Ordering::Relaxed);
            if now != last {
                (last, last_change) = (now, Instant::now());
            } else if last_change.elapsed() > stall {
                eprintln!(
                    "the worker made no progress for {stall:?} after {now} iterations: \
                     deadlocked"
                );
                std::process::abort();
            }
        };
        while t0.elapsed() < duration || !enough() {
            // SAFETY: `target` runs until `stop`; SIGUSR1 has a handler.
            assert_eq!(unsafe { libc::pthread_kill(target, libc::SIGUSR1) }, 0);
            sent += 1;
            std::thread::sleep(every);
            watchdog();
        }
        stop.store(true, Ordering::Relaxed);
        while !worker.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(1));
            watchdog();
        }
        worker.join().unwrap();
    });
    // SAFETY: restores the disposition found above.
    unsafe { libc::signal(libc::SIGUSR1, old) };
    (done.load(Ordering::Relaxed), sent)
}
