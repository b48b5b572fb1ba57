//! The kretprobe trampoline preserves the whole vector state a function can
//! return in: a return handler that clobbers `ymm0`/`zmm0` (as any vector
//! code may) does not change the 256- or 512-bit value the probed function
//! returns. Skipped (with a message) on processors without AVX2 / AVX-512F.
//!
//! Whether a return value's upper halves need saving is told by their
//! values on some processors and by XINUSE on others (`jump/stubs.rs`, "The
//! upper halves"): the lane-by-lane test runs every way this processor
//! allows, switched with the test hook.

mod runtime_support;

use std::arch::global_asm;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcu_registry::__internals::runtime::{set_upper_check, upper_check, xsave_plan, UpperCheck};
use rcu_registry::probes::kprobe::Kretprobe;
use rcu_registry::probes::runtime::Live;
use runtime_support::serial;

global_asm!(
    ".pushsection .text.rtt_functions,\"ax\",@progbits",
    // rtt_ones256() -> __m256 of all ones: push rbp (emulated at the
    // probe); vpcmpeqd ymm0, ymm0, ymm0; pop rbp; ret.
    ".p2align 4",
    ".globl rtt_ones256",
    ".type rtt_ones256,@function",
    "rtt_ones256:",
    "push rbp",
    "vpcmpeqd ymm0, ymm0, ymm0",
    "pop rbp",
    "ret",
    ".size rtt_ones256, . - rtt_ones256",
    // rtt_ones512() -> __m512 of all ones: push rbp; vpternlogd zmm0,
    // zmm0, zmm0, 0xff; pop rbp; ret.
    ".p2align 4",
    ".globl rtt_ones512",
    ".type rtt_ones512,@function",
    "rtt_ones512:",
    "push rbp",
    "vpternlogd zmm0, zmm0, zmm0, 0xff",
    "pop rbp",
    "ret",
    ".size rtt_ones512, . - rtt_ones512",
    // rtt_call(f, out): calls f and stores zmm0 (64 bytes) at out; the
    // caller of a 256-bit function reads the first 32.
    ".p2align 4",
    ".globl rtt_call256",
    ".type rtt_call256,@function",
    "rtt_call256:",
    "push rbx",
    "mov rbx, rsi",
    "call rdi",
    "vmovdqu ymmword ptr [rbx], ymm0",
    "vzeroupper",
    "pop rbx",
    "ret",
    ".size rtt_call256, . - rtt_call256",
    ".p2align 4",
    ".globl rtt_call512",
    ".type rtt_call512,@function",
    "rtt_call512:",
    "push rbx",
    "mov rbx, rsi",
    "call rdi",
    "vmovdqu64 zmmword ptr [rbx], zmm0",
    "vzeroupper",
    "pop rbx",
    "ret",
    ".size rtt_call512, . - rtt_call512",
    // What a return handler's vector code might do: zero every vector
    // register a return value can live in, upper halves included.
    ".p2align 4",
    ".globl rtt_clobber_avx",
    ".type rtt_clobber_avx,@function",
    "rtt_clobber_avx:",
    "vpxor ymm0, ymm0, ymm0",
    "vpxor ymm1, ymm1, ymm1",
    "ret",
    ".size rtt_clobber_avx, . - rtt_clobber_avx",
    ".p2align 4",
    ".globl rtt_clobber_avx512",
    ".type rtt_clobber_avx512,@function",
    "rtt_clobber_avx512:",
    "vpxord zmm0, zmm0, zmm0",
    "vpxord zmm1, zmm1, zmm1",
    "vzeroupper",
    "vpxord zmm0, zmm0, zmm0",
    "ret",
    ".size rtt_clobber_avx512, . - rtt_clobber_avx512",
    // rtt_load512(p) -> __m512 loaded from p (a return value with any
    // lanes set): push rbp; vmovdqu64 zmm0, [rdi]; pop rbp; ret.
    ".p2align 4",
    ".globl rtt_load512",
    ".type rtt_load512,@function",
    "rtt_load512:",
    "push rbp",
    "vmovdqu64 zmm0, zmmword ptr [rdi]",
    "pop rbp",
    "ret",
    ".size rtt_load512, . - rtt_load512",
    // rtt_load256(p) -> __m256 loaded from p.
    ".p2align 4",
    ".globl rtt_load256",
    ".type rtt_load256,@function",
    "rtt_load256:",
    "push rbp",
    "vmovdqu ymm0, ymmword ptr [rdi]",
    "pop rbp",
    "ret",
    ".size rtt_load256, . - rtt_load256",
    // rtt_call_load(f, in, out): f(in), then zmm0 (ymm0 with `256` in the
    // name) stored at out.
    ".p2align 4",
    ".globl rtt_call_load512",
    ".type rtt_call_load512,@function",
    "rtt_call_load512:",
    "push rbx",
    "mov rbx, rdx",
    "mov rax, rdi",
    "mov rdi, rsi",
    "call rax",
    "vmovdqu64 zmmword ptr [rbx], zmm0",
    "vzeroupper",
    "pop rbx",
    "ret",
    ".size rtt_call_load512, . - rtt_call_load512",
    ".p2align 4",
    ".globl rtt_call_load256",
    ".type rtt_call_load256,@function",
    "rtt_call_load256:",
    "push rbx",
    "mov rbx, rdx",
    "mov rax, rdi",
    "mov rdi, rsi",
    "call rax",
    "vmovdqu ymmword ptr [rbx], ymm0",
    "vzeroupper",
    "pop rbx",
    "ret",
    ".size rtt_call_load256, . - rtt_call_load256",
    ".popsection",
);

extern "C" {
    fn rtt_ones256();
    fn rtt_ones512();
    fn rtt_call256(f: unsafe extern "C" fn(), out: *mut [u8; 64]);
    fn rtt_call512(f: unsafe extern "C" fn(), out: *mut [u8; 64]);
    fn rtt_clobber_avx();
    fn rtt_clobber_avx512();
    fn rtt_load512();
    fn rtt_load256();
    fn rtt_call_load512(f: unsafe extern "C" fn(), input: *const [u8; 64], out: *mut [u8; 64]);
    fn rtt_call_load256(f: unsafe extern "C" fn(), input: *const [u8; 64], out: *mut [u8; 64]);
}

/// Calls `f` through `caller` and returns the bytes of the vector it
/// returned (`n` of them).
fn returned(
    caller: unsafe extern "C" fn(unsafe extern "C" fn(), *mut [u8; 64]),
    f: unsafe extern "C" fn(),
    n: usize,
) -> Vec<u8> {
    let mut out = [0x5au8; 64];
    // SAFETY: the callers and callees above follow the C ABI; the caller is
    // only used after the processor feature it needs was detected.
    unsafe { caller(f, &mut out) };
    out[..n].to_vec()
}

/// A kretprobe on `f` whose return handler runs `clobber`, and the count
/// of its handler's runs.
fn clobbering_kretprobe(
    f: unsafe extern "C" fn(),
    clobber: unsafe extern "C" fn(),
) -> (Kretprobe, Arc<AtomicU64>) {
    let returns = Arc::new(AtomicU64::new(0));
    let r = returns.clone();
    let krp = Kretprobe::at(f as *const () as usize as u64)
        .handler(move |_, _, _| {
            r.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a C-ABI function that only writes vector registers,
            // run only after its feature was detected (the callers' checks).
            unsafe { clobber() };
        })
        .build()
        .unwrap();
    (krp, returns)
}

/// Registers a kretprobe on `f` whose return handler runs `clobber`, calls
/// `f` a few times through `caller`, and returns what the calls returned.
fn with_clobbering_kretprobe(
    f: unsafe extern "C" fn(),
    caller: unsafe extern "C" fn(unsafe extern "C" fn(), *mut [u8; 64]),
    clobber: unsafe extern "C" fn(),
    n: usize,
) -> Vec<Vec<u8>> {
    let _g = serial();
    let reg = Live::global().registry();
    let (krp, returns) = clobbering_kretprobe(f, clobber);
    reg.register(&krp).unwrap();
    let got = (0..3).map(|_| returned(caller, f, n)).collect();
    reg.unregister(&krp).unwrap();
    assert_eq!(
        returns.load(Ordering::Relaxed),
        3,
        "every return ran the handler"
    );
    got
}

#[test]
fn a_256_bit_return_value_survives_a_handler_that_clobbers_ymm0() {
    if !std::is_x86_feature_detected!("avx2") {
        println!("skipped: no AVX2");
        return;
    }
    println!("trampoline saves {:?}", xsave_plan());
    assert_eq!(returned(rtt_call256, rtt_ones256, 32), vec![0xff; 32]);
    for got in with_clobbering_kretprobe(rtt_ones256, rtt_call256, rtt_clobber_avx, 32) {
        assert_eq!(got, vec![0xff; 32], "ymm0 returned through the trampoline");
    }
}

#[test]
fn a_512_bit_return_value_survives_a_handler_that_clobbers_zmm0() {
    if !std::is_x86_feature_detected!("avx512f") {
        println!("skipped: no AVX-512F");
        return;
    }
    assert_eq!(returned(rtt_call512, rtt_ones512, 64), vec![0xff; 64]);
    for got in with_clobbering_kretprobe(rtt_ones512, rtt_call512, rtt_clobber_avx512, 64) {
        assert_eq!(got, vec![0xff; 64], "zmm0 returned through the trampoline");
    }
}

#[test]
fn the_trampoline_saves_every_vector_component_the_os_enabled() {
    let plan = xsave_plan();
    if !std::is_x86_feature_detected!("xsave") {
        assert_eq!(plan.mask, 0);
        return;
    }
    // x87 and SSE always; AVX when the processor reports it usable (which
    // requires the OS to have enabled its state in XCR0).
    assert_eq!(plan.mask & 0b11, 0b11, "{plan:?}");
    assert_eq!(
        std::is_x86_feature_detected!("avx"),
        plan.mask & 0b100 != 0,
        "{plan:?}"
    );
    assert_eq!(
        std::is_x86_feature_detected!("avx512f"),
        plan.mask & 0b1110_0000 == 0b1110_0000,
        "{plan:?}"
    );
    assert!(plan.bytes >= 576, "{plan:?}");
}

/// Every lane of a vector return value comes back through the trampoline
/// in every way this processor can tell whether the upper halves hold
/// anything (`jump/stubs.rs`, "The upper halves"), at its widest width and,
/// with AVX-512, narrowed to `ymm` too (the AVX-only paths): one lane set at
/// a time (an upper one alone is what a check that missed part of a
/// register would lose), then none, then all, with a return handler that
/// zeroes the return registers.
#[test]
fn every_lane_of_a_vector_return_value_survives_in_every_check_mode() {
    use rcu_registry::__internals::runtime::{set_vector_width, vector_width};
    type Caller = unsafe extern "C" fn(unsafe extern "C" fn(), *const [u8; 64], *mut [u8; 64]);
    if !std::is_x86_feature_detected!("avx2") {
        println!("skipped: no AVX2");
        return;
    }
    let _g = serial();
    let (detected_width, detected_check) = (vector_width(), upper_check());
    let reg = Live::global().registry();
    for width in (1..=detected_width).rev() {
        let (wide, load, call, lanes): (bool, unsafe extern "C" fn(), Caller, usize) = if width == 2
        {
            (true, rtt_load512, rtt_call_load512, 8)
        } else {
            (false, rtt_load256, rtt_call_load256, 4)
        };
        set_vector_width(width).unwrap();
        let modes: Vec<UpperCheck> = [UpperCheck::Values, UpperCheck::Xinuse, UpperCheck::Width]
            .into_iter()
            .filter(|&m| set_upper_check(m).is_ok())
            .collect();
        println!("detected width {detected_width}, {detected_check:?}; width {width}: {modes:?}");
        assert!(modes.contains(&UpperCheck::Values) && modes.contains(&UpperCheck::Width));
        let clobber: unsafe extern "C" fn() = if wide {
            rtt_clobber_avx512
        } else {
            rtt_clobber_avx
        };
        let (krp, returns) = clobbering_kretprobe(load, clobber);
        reg.register(&krp).unwrap();
        let mut calls = 0;
        for &mode in &modes {
            set_upper_check(mode).unwrap();
            let mut patterns: Vec<[u8; 64]> = (0..lanes)
                .map(|lane| {
                    let mut v = [0u8; 64];
                    v[lane * 8..lane * 8 + 8]
                        .copy_from_slice(&(0x1122_3344_5566_7788u64 + lane as u64).to_le_bytes());
                    v
                })
                .collect();
            patterns.push([0; 64]);
            patterns.push([0xa5; 64]);
            for input in &patterns {
                let mut out = [0x5au8; 64];
                // SAFETY: C-ABI callers and callees above, their feature detected.
                unsafe { call(load, input, &mut out) };
                calls += 1;
                let n = lanes * 8;
                assert_eq!(
                    out[..n],
                    input[..n],
                    "width {width}, {mode:?}: the value returned through the trampoline"
                );
            }
        }
        reg.unregister(&krp).unwrap();
        assert_eq!(
            returns.load(Ordering::Relaxed),
            calls,
            "every return ran the handler"
        );
    }
    set_vector_width(detected_width).unwrap();
    set_upper_check(detected_check).unwrap();
}
