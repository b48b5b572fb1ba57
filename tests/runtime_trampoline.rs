//! The kretprobe trampoline preserves the whole vector state a function can
//! return in: a return handler that clobbers `ymm0`/`zmm0` (as any vector
//! code may) does not change the 256- or 512-bit value the probed function
//! returns. Skipped (with a message) on processors without AVX2 / AVX-512F.

mod runtime_support;

use std::arch::global_asm;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcu_registry::__internals::runtime::xsave_plan;
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
    ".popsection",
);

extern "C" {
    fn rtt_ones256();
    fn rtt_ones512();
    fn rtt_call256(f: unsafe extern "C" fn(), out: *mut [u8; 64]);
    fn rtt_call512(f: unsafe extern "C" fn(), out: *mut [u8; 64]);
    fn rtt_clobber_avx();
    fn rtt_clobber_avx512();
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
    let returns = Arc::new(AtomicU64::new(0));
    let r = returns.clone();
    let krp = Kretprobe::at(f as *const () as usize as u64)
        .handler(move |_, _, _| {
            r.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a C-ABI function that only writes vector registers,
            // run only after its feature was detected.
            unsafe { clobber() };
        })
        .build()
        .unwrap();
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
