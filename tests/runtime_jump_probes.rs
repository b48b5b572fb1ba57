//! Jump-optimized kprobes (issue 15): the same hits, handlers and counts as
//! the trap path, with a `jmp` to a detour instead of an `int3`; refusals
//! with a typed reason and the bytes untouched; the original bytes back
//! after un-optimization.

#![cfg(target_arch = "x86_64")]

mod runtime_jump_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcu_registry::probes::arch::x86_64::jump::JumpRefusal;
use rcu_registry::probes::arch::X86Reg;
use rcu_registry::probes::kprobe::{Action, Kprobe, Kretprobe};
use rcu_registry::probes::runtime::Live;
use runtime_jump_support::*;

fn live() -> &'static Live {
    Live::global()
}

fn counting(at: u64, count: &Arc<AtomicU64>) -> Kprobe {
    let c = Arc::clone(count);
    Kprobe::at(at)
        .pre(move |_p, _regs| {
            c.fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })
        .build()
}

/// Optimizes and asserts that `p`'s site was optimized by this pass.
fn optimize(p: &Kprobe) {
    let r = live().optimize_now();
    assert!(
        live().is_optimized(p),
        "not optimized: {:?} ({:?})",
        live().jump_optimizer().refusal(p.address().unwrap()),
        r
    );
}

#[test]
fn optimized_hits_are_counted_exactly_as_trap_hits() {
    let _g = serial();
    let reg = live().registry();
    let at = addr(rj_prologue);
    let orig = code(at, 16);
    let count = Arc::new(AtomicU64::new(0));
    let p = counting(at, &count);
    reg.register(&p).unwrap();
    assert_eq!(code(at, 1), [0xcc]);
    for x in 0..1000 {
        assert_eq!(call(rj_prologue, x), x + 5);
    }
    assert_eq!(count.load(Ordering::Relaxed), 1000);
    optimize(&p);
    assert_eq!(code(at, 1), [0xe9], "a jmp where the int3 was");
    assert_eq!(code(at + 5, 11), orig[5..], "bytes past the jmp untouched");
    for x in 0..100_000 {
        assert_eq!(call(rj_prologue, x), x + 5);
    }
    assert_eq!(count.load(Ordering::Relaxed), 101_000);
    assert_eq!(p.hits(), 101_000);
    assert_eq!(p.nmissed(), 0);
    reg.unregister(&p).unwrap();
    assert!(!live().is_optimized(&p));
    assert_eq!(code(at, 16), orig, "every original byte back");
    assert_eq!(call(rj_prologue, 7), 12);
}

#[test]
fn a_pre_handler_changes_registers_and_the_ip_through_the_detour() {
    let _g = serial();
    let reg = live().registry();
    let at = addr(rj_prologue);
    // Changes the argument: the relocated instructions see it.
    let p = Kprobe::at(at)
        .pre(|_p, regs| {
            regs[X86Reg::Rdi] = 100;
            Action::Continue
        })
        .build();
    reg.register(&p).unwrap();
    optimize(&p);
    assert_eq!(call(rj_prologue, 1), 105);
    reg.unregister(&p).unwrap();
    // Skips the displaced instructions: resume at another function.
    let alt = addr(rj_alt);
    let q = Kprobe::at(at)
        .pre(move |_p, regs| {
            regs.ip = alt;
            Action::SkipInstruction
        })
        .build();
    reg.register(&q).unwrap();
    optimize(&q);
    assert_eq!(call(rj_prologue, 1), 777);
    assert_eq!(q.hits(), 1);
    // A changed IP with `Continue` is discarded, as on the trap path.
    reg.unregister(&q).unwrap();
    let r = Kprobe::at(at)
        .pre(move |_p, regs| {
            regs.ip = alt;
            Action::Continue
        })
        .build();
    reg.register(&r).unwrap();
    optimize(&r);
    assert_eq!(call(rj_prologue, 1), 6);
    reg.unregister(&r).unwrap();
}

#[test]
fn a_kretprobe_runs_entry_and_return_through_an_optimized_site() {
    let _g = serial();
    let reg = live().registry();
    let rets = Arc::new(AtomicU64::new(0));
    let r2 = Arc::clone(&rets);
    let krp = Kretprobe::at(addr(rj_double))
        .data::<u64>()
        .entry_handler(|arg, regs| {
            *arg = regs.arg(0).unwrap();
            rcu_registry::probes::kprobe::EntryAction::Track
        })
        .handler(move |arg, regs, ret| {
            assert_eq!(ret, 2 * *arg);
            r2.fetch_add(1, Ordering::Relaxed);
            regs.set_retval(ret + 1);
        })
        .build()
        .unwrap();
    reg.register(&krp).unwrap();
    optimize(krp.probe());
    for x in 0..10_000 {
        assert_eq!(call(rj_double, x), 2 * x + 1);
    }
    assert_eq!(rets.load(Ordering::Relaxed), 10_000);
    assert_eq!(krp.probe().hits(), 10_000);
    reg.unregister(&krp).unwrap();
    assert_eq!(call(rj_double, 4), 8);
}

/// Several threads through one optimized kprobe and one optimized
/// kretprobe: the hit counters (per-CPU slots, no locked instruction) and
/// the return counts are exact, every return value right.
#[test]
fn optimized_hits_and_returns_are_counted_exactly_on_several_threads() {
    let _g = serial();
    let reg = live().registry();
    let count = Arc::new(AtomicU64::new(0));
    let p = counting(addr(rj_prologue), &count);
    reg.register(&p).unwrap();
    optimize(&p);
    let krp = Kretprobe::at(addr(rj_double))
        .maxactive(8)
        .handler(|_, regs, ret| regs.set_retval(ret + 1))
        .build()
        .unwrap();
    reg.register(&krp).unwrap();
    optimize(krp.probe());
    const THREADS: u32 = 4;
    const CALLS: u32 = 50_000;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                for x in 0..CALLS {
                    let x = x + t;
                    assert_eq!(call(rj_prologue, x), x + 5);
                    assert_eq!(call(rj_double, x), 2 * x + 1);
                }
            });
        }
    });
    let n = u64::from(THREADS * CALLS);
    assert_eq!(count.load(Ordering::Relaxed), n);
    assert_eq!(p.hits(), n);
    assert_eq!(p.nmissed(), 0);
    assert_eq!(krp.probe().hits(), n);
    // One call per thread at a time, eight instances: none missed.
    assert_eq!((krp.returns(), krp.nmissed()), (n, 0));
    assert_eq!(krp.in_flight(), 0);
    reg.unregister(&p).unwrap();
    reg.unregister(&krp).unwrap();
}

/// A kretprobe with one instance on an optimized site: while one call holds
/// it (its entry handler waits, forced, until the other call is over), a
/// call on another thread finds the pool empty: `nmissed`, its return not
/// tracked and its value untouched; then the held call returns through its
/// handler, and the instance is back for the next call.
#[test]
fn an_optimized_kretprobe_with_its_instances_out_counts_the_call_missed() {
    let _g = serial();
    let reg = live().registry();
    let entered = Arc::new(AtomicU64::new(0));
    let release = Arc::new(AtomicU64::new(0));
    let (e2, r2) = (Arc::clone(&entered), Arc::clone(&release));
    let krp = Kretprobe::at(addr(rj_double))
        .maxactive(1)
        .entry_handler(move |_, _| {
            // Only the first call waits: it holds the pool's one instance.
            if e2.fetch_add(1, Ordering::SeqCst) == 0 {
                while r2.load(Ordering::SeqCst) == 0 {
                    std::hint::spin_loop();
                }
            }
            rcu_registry::probes::kprobe::EntryAction::Track
        })
        .handler(|_, regs, ret| regs.set_retval(ret + 1))
        .build()
        .unwrap();
    reg.register(&krp).unwrap();
    optimize(krp.probe());
    std::thread::scope(|s| {
        let holder = s.spawn(|| call(rj_double, 10));
        while entered.load(Ordering::SeqCst) == 0 {
            std::hint::spin_loop();
        }
        // The instance is out: this call is not tracked.
        assert_eq!(call(rj_double, 3), 6, "an untracked return is untouched");
        assert_eq!(krp.nmissed(), 1);
        assert_eq!(krp.in_flight(), 1);
        release.store(1, Ordering::SeqCst);
        assert_eq!(holder.join().unwrap(), 21, "the held call's handler ran");
    });
    assert_eq!((krp.returns(), krp.nmissed(), krp.in_flight()), (1, 1, 0));
    assert_eq!(call(rj_double, 4), 9, "the instance is back");
    assert_eq!(krp.probe().hits(), 3);
    reg.unregister(&krp).unwrap();
}

#[test]
fn a_rip_relative_instruction_is_relocated_with_the_same_target() {
    let _g = serial();
    let reg = live().registry();
    let at = rj_riprel as *const () as u64;
    let count = Arc::new(AtomicU64::new(0));
    let p = counting(at, &count);
    reg.register(&p).unwrap();
    optimize(&p);
    // SAFETY: rj_riprel is a complete C-ABI function.
    let v = unsafe { std::hint::black_box(rj_riprel)(std::hint::black_box(3)) };
    assert_eq!(v, 0x5003);
    assert_eq!(count.load(Ordering::Relaxed), 1);
    reg.unregister(&p).unwrap();
}

#[test]
fn flags_and_the_red_zone_survive_a_mid_function_detour() {
    let _g = serial();
    let reg = live().registry();
    let count = Arc::new(AtomicU64::new(0));
    let p = counting(rj_mid_probe as *const () as u64, &count);
    let q = counting(rj_redzone_probe as *const () as u64, &count);
    reg.register(&p).unwrap();
    reg.register(&q).unwrap();
    optimize(&p);
    optimize(&q);
    for x in 0..20 {
        assert_eq!(call(rj_mid, x), u32::from(x < 10), "flags of cmp kept");
    }
    for x in [0u64, 1, u64::MAX, 0xdead_beef_cafe] {
        // SAFETY: rj_redzone is a complete C-ABI function.
        let v = unsafe { std::hint::black_box(rj_redzone)(std::hint::black_box(x)) };
        assert_eq!(v, x, "the red zone below rsp is untouched");
    }
    assert_eq!(count.load(Ordering::Relaxed), 24);
    reg.unregister(&p).unwrap();
    reg.unregister(&q).unwrap();
}

#[test]
fn a_handler_that_clobbers_ymm_does_not_reach_the_probed_code() {
    if !std::arch::is_x86_feature_detected!("avx") {
        eprintln!("no AVX: skipped");
        return;
    }
    let _g = serial();
    let reg = live().registry();
    let p = Kprobe::at(rj_vec_probe as *const () as u64)
        .pre(|_p, _regs| {
            // SAFETY: AVX is present (checked above); the asm only writes
            // ymm0, which it declares.
            unsafe {
                std::arch::asm!("vpcmpeqb ymm0, ymm0, ymm0", out("ymm0") _);
            }
            Action::Continue
        })
        .build();
    reg.register(&p).unwrap();
    optimize(&p);
    let src: [u8; 32] = std::array::from_fn(|i| i as u8 * 3);
    let mut dst = [0u8; 32];
    // SAFETY: 32 readable and 32 writable bytes; AVX present.
    unsafe { rj_vec(src.as_ptr(), dst.as_mut_ptr()) };
    assert_eq!(dst, src, "ymm0 as it was before the probe");
    assert_eq!(p.hits(), 1);
    reg.unregister(&p).unwrap();
}

#[test]
fn unsafe_sites_are_refused_with_a_reason_and_their_bytes_untouched() {
    let _g = serial();
    let reg = live().registry();
    type Case = (Func, fn(u32) -> u32, fn(&JumpRefusal) -> bool);
    let cases: [Case; 3] = [
        (
            rj_loop,
            |n| n.max(1),
            |r| matches!(r, JumpRefusal::BranchIntoDisplaced { .. }),
        ),
        (
            rj_table,
            |x| x + 2,
            |r| matches!(r, JumpRefusal::IndirectJump { .. }),
        ),
        (
            rj_call,
            |x| x + 5,
            |r| matches!(r, JumpRefusal::DisplacedControlFlow { .. }),
        ),
    ];
    for (f, want, reason) in cases {
        let at = addr(f);
        let count = Arc::new(AtomicU64::new(0));
        let p = counting(at, &count);
        reg.register(&p).unwrap();
        let armed = code(at, 24);
        let report = live().optimize_now();
        assert!(!live().is_optimized(&p));
        let why = live().jump_optimizer().refusal(at).expect("a reason");
        assert!(reason(&why), "{why:?}");
        assert!(report.refused.iter().any(|&(a, r)| a == at && r == why));
        assert_eq!(code(at, 24), armed, "nothing written");
        for x in 1..50 {
            assert_eq!(call(f, x), want(x));
        }
        assert_eq!(count.load(Ordering::Relaxed), 49, "the trap path counts");
        reg.unregister(&p).unwrap();
    }
}

#[test]
fn disable_a_post_handler_and_the_opt_outs_put_the_int3_back() {
    let _g = serial();
    let reg = live().registry();
    let at = addr(rj_prologue);
    let orig = code(at, 16);
    let count = Arc::new(AtomicU64::new(0));
    let p = counting(at, &count);
    reg.register(&p).unwrap();
    let armed = code(at, 16);
    optimize(&p);
    // Disable: the breakpoint goes, and with it the jmp.
    reg.disable(&p).unwrap();
    assert!(!live().is_optimized(&p));
    assert_eq!(code(at, 16), orig);
    assert_eq!(call(rj_prologue, 1), 6);
    reg.enable(&p).unwrap();
    assert_eq!(code(at, 16), armed);
    optimize(&p);
    // A post handler joins: back to the int3 first, and it runs.
    let posts = Arc::new(AtomicU64::new(0));
    let p2c = Arc::clone(&posts);
    let with_post = Kprobe::at(at)
        .post(move |_p, _r| {
            p2c.fetch_add(1, Ordering::Relaxed);
        })
        .build();
    reg.register(&with_post).unwrap();
    assert!(!live().is_optimized(&p));
    assert_eq!(code(at, 16), armed);
    assert_eq!(call(rj_prologue, 1), 6);
    assert_eq!(posts.load(Ordering::Relaxed), 1);
    live().optimize_now();
    assert!(
        !live().is_optimized(&p),
        "a post handler keeps the trap path"
    );
    assert_eq!(
        live().jump_optimizer().refusal(at),
        Some(JumpRefusal::NeedsTrapPath)
    );
    reg.unregister(&with_post).unwrap();
    optimize(&p);
    // The per-probe opt-out.
    live().set_jump_opt_out(&p, true);
    assert!(!live().is_optimized(&p));
    assert_eq!(code(at, 16), armed);
    live().optimize_now();
    assert_eq!(
        live().jump_optimizer().refusal(at),
        Some(JumpRefusal::OptedOut)
    );
    live().set_jump_opt_out(&p, false);
    optimize(&p);
    // The global opt-out.
    live().jump_optimizer().set_enabled(false);
    assert!(!live().is_optimized(&p));
    assert_eq!(code(at, 16), armed);
    live().optimize_now();
    assert!(!live().is_optimized(&p));
    live().jump_optimizer().set_enabled(true);
    optimize(&p);
    let before = count.load(Ordering::Relaxed);
    assert_eq!(call(rj_prologue, 2), 7);
    assert_eq!(count.load(Ordering::Relaxed), before + 1);
    reg.unregister(&p).unwrap();
    assert_eq!(code(at, 16), orig);
    // The retired detours are freed by the next pass.
    let (freed, _proven) = live().jump_optimizer().reclaim();
    let _ = freed;
    assert_eq!(live().jump_optimizer().reclaim(), (0, 0));
}

#[test]
fn an_entry_site_keeps_its_vector_arguments_and_the_callers_flags() {
    if !std::arch::is_x86_feature_detected!("avx2") {
        eprintln!("no AVX2: skipped");
        return;
    }
    let _g = serial();
    let reg = live().registry();
    let p = Kprobe::at(rj_vsum as *const () as u64)
        .pre(|_p, _regs| {
            // SAFETY: AVX present (checked above); the asm only writes
            // the registers it declares.
            unsafe {
                std::arch::asm!(
                    "vpcmpeqb ymm0, ymm0, ymm0",
                    "vpcmpeqb ymm1, ymm1, ymm1",
                    "vpcmpeqb ymm7, ymm7, ymm7",
                    out("ymm0") _, out("ymm1") _, out("ymm7") _,
                );
            }
            Action::Continue
        })
        .build();
    let q = Kprobe::at(rj_flags as *const () as u64).build();
    reg.register(&p).unwrap();
    reg.register(&q).unwrap();
    optimize(&p);
    optimize(&q);
    let a: [u32; 8] = std::array::from_fn(|i| i as u32 * 1000 + 1);
    let b: [u32; 8] = std::array::from_fn(|i| i as u32 * 77 + 5);
    let c: [u32; 8] = std::array::from_fn(|i| 0x1000_0000 >> i);
    let mut dst = [0u32; 8];
    // SAFETY: AVX2 present; rj_vsum reads ymm0, ymm1, ymm7 and writes 32
    // bytes at rdi; every register the C ABI lets it clobber is declared.
    unsafe {
        std::arch::asm!(
            "vmovdqu ymm0, ymmword ptr [{a}]",
            "vmovdqu ymm1, ymmword ptr [{b}]",
            "vmovdqu ymm7, ymmword ptr [{c}]",
            "call {f}",
            a = in(reg) a.as_ptr(), b = in(reg) b.as_ptr(), c = in(reg) c.as_ptr(),
            f = sym rj_vsum,
            in("rdi") dst.as_mut_ptr(),
            clobber_abi("C"),
        );
    }
    let want: [u32; 8] = std::array::from_fn(|i| a[i] + b[i] + c[i]);
    assert_eq!(
        dst, want,
        "every lane of the vector arguments, upper halves too"
    );
    assert_eq!(p.hits(), 1);
    for (setup, want) in [(0u32, 0b000), (1, 0b101), (2, 0b010), (3, 0b100)] {
        let got: u32;
        // SAFETY: rj_flags only reads the flags and writes eax, ecx, edx;
        // the ABI's clobbers are declared.
        unsafe {
            std::arch::asm!(
                "cmp {s:e}, 1",
                "jne 2f",
                "stc",
                "jmp 5f",
                "2:",
                "cmp {s:e}, 2",
                "jne 3f",
                "mov al, 0x7f",
                "add al, 1",
                "jmp 5f",
                "3:",
                "cmp {s:e}, 3",
                "jne 4f",
                "xor eax, eax",
                "jmp 5f",
                "4:",
                "mov eax, 1",
                "test eax, eax",
                "5:",
                "call {f}",
                s = in(reg) setup,
                f = sym rj_flags,
                out("eax") got,
                clobber_abi("C"),
            );
        }
        assert_eq!(got, want, "flags set by the caller (case {setup})");
    }
    assert_eq!(q.hits(), 4);
    reg.unregister(&p).unwrap();
    reg.unregister(&q).unwrap();
}

#[test]
fn a_mid_function_site_keeps_every_xmm_register_a_handler_clobbers() {
    let _g = serial();
    let reg = live().registry();
    let p = Kprobe::at(rj_xmm_mid_probe as *const () as u64)
        .pre(|_p, _regs| {
            // SAFETY: SSE2 is baseline on x86_64; the asm only writes the
            // register it declares.
            unsafe { std::arch::asm!("pcmpeqb xmm9, xmm9", out("xmm9") _) };
            Action::Continue
        })
        .build();
    reg.register(&p).unwrap();
    optimize(&p);
    for x in [0u64, 7, 0x1234_5678_9abc_def0] {
        // SAFETY: rj_xmm_mid is a complete C-ABI function.
        let v = unsafe { std::hint::black_box(rj_xmm_mid)(std::hint::black_box(x)) };
        assert_eq!(v, x, "xmm9 as it was before the probe");
    }
    assert_eq!(p.hits(), 3);
    reg.unregister(&p).unwrap();
}

/// Clobbers zmm17 and k1 (AVX-512F and BW present: checked by the caller).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn clobber_zmm17_k1() {
    // SAFETY: the features are enabled; the asm writes only what it declares.
    unsafe {
        std::arch::asm!(
            "vpternlogd zmm17, zmm17, zmm17, 0xff",
            "kxnorq k1, k1, k1",
            out("zmm17") _,
            out("k1") _,
        );
    }
}

#[test]
fn a_mid_function_site_keeps_zmm16_31_and_the_opmasks() {
    if !std::arch::is_x86_feature_detected!("avx512bw") {
        eprintln!("no AVX512BW: skipped");
        return;
    }
    let _g = serial();
    let reg = live().registry();
    let p = Kprobe::at(rj_avx512_mid_probe as *const () as u64)
        .pre(|_p, _regs| {
            // SAFETY: AVX512F and BW checked above.
            unsafe { clobber_zmm17_k1() };
            Action::Continue
        })
        .build();
    reg.register(&p).unwrap();
    optimize(&p);
    let src: [u8; 64] = std::array::from_fn(|i| (i * 7 + 1) as u8);
    let mut dst = [0u8; 64];
    let mask = 0x1234_5678_9abc_def0u64;
    // SAFETY: 64 readable and 64 writable bytes; AVX-512 present.
    let got = unsafe { rj_avx512_mid(src.as_ptr(), dst.as_mut_ptr(), mask) };
    assert_eq!(got, mask, "k1 as it was before the probe");
    assert_eq!(dst, src, "zmm17 as it was before the probe");
    assert_eq!(p.hits(), 1);
    reg.unregister(&p).unwrap();
}

#[test]
fn an_x87_return_value_survives_a_return_handler_that_pops_the_x87_stack() {
    let _g = serial();
    let reg = live().registry();
    let krp = Kretprobe::at(rj_x87 as *const () as u64)
        .handler(|_, _, _| {
            // SAFETY: pops st0 (the function's return value) and declares it.
            unsafe { std::arch::asm!("fstp st(0)", out("st(0)") _) };
        })
        .build()
        .unwrap();
    reg.register(&krp).unwrap();
    optimize(krp.probe());
    for _ in 0..3 {
        let mut out = 0f64;
        // SAFETY: rj_x87 leaves one value on the x87 stack, popped here
        // into `out`; the ABI's clobbers are declared.
        unsafe {
            std::arch::asm!(
                "call {f}",
                "fstp qword ptr [{out}]",
                f = sym rj_x87,
                out = in(reg) &mut out,
                clobber_abi("C"),
            );
        }
        assert_eq!(out, 3.5, "st0 as the function returned it");
    }
    assert_eq!(krp.probe().hits(), 3);
    reg.unregister(&krp).unwrap();
}

/// Not a test of behaviour: prints the per-call cost of an optimized hit
/// for profiling (`cargo test --release --test runtime_jump_probes --
/// --ignored --nocapture per_call_cost`).
#[test]
#[ignore]
fn per_call_cost() {
    let _g = serial();
    let reg = live().registry();
    let at = addr(rj_prologue);
    let p = Kprobe::at(at).pre(|_p, _r| Action::Continue).build();
    reg.register(&p).unwrap();
    optimize(&p);
    for _ in 0..5 {
        let t = std::time::Instant::now();
        for x in 0..10_000_000u32 {
            std::hint::black_box(call(rj_prologue, x));
        }
        println!(
            "{:.1} ns per optimized call",
            t.elapsed().as_nanos() as f64 / 1e7
        );
    }
    reg.unregister(&p).unwrap();
    let k = Kretprobe::at(addr(rj_double))
        .handler(|_, _, ret| {
            std::hint::black_box(ret);
        })
        .build()
        .unwrap();
    reg.register(&k).unwrap();
    optimize(k.probe());
    for _ in 0..3 {
        let t = std::time::Instant::now();
        for x in 0..2_000_000u32 {
            std::hint::black_box(call(rj_double, x));
        }
        println!(
            "{:.1} ns per optimized kretprobe call",
            t.elapsed().as_nanos() as f64 / 2e6
        );
    }
    reg.unregister(&k).unwrap();
    let m = Kprobe::at(rj_mid_probe as *const () as u64)
        .pre(|_p, _r| Action::Continue)
        .build();
    reg.register(&m).unwrap();
    optimize(&m);
    for _ in 0..3 {
        let t = std::time::Instant::now();
        for x in 0..2_000_000u32 {
            std::hint::black_box(call(rj_mid, x));
        }
        println!(
            "{:.1} ns per optimized mid-function call",
            t.elapsed().as_nanos() as f64 / 2e6
        );
    }
    reg.unregister(&m).unwrap();
    let t = std::time::Instant::now();
    for x in 0..10_000_000u32 {
        std::hint::black_box(call(rj_double, x));
    }
    println!(
        "{:.1} ns per plain call",
        t.elapsed().as_nanos() as f64 / 1e7
    );
}

/// Waits for child `pid` at most 20 s (a failure detector: a passing child
/// exits in milliseconds), killing it if it is still running; its exit
/// code, or `Err` with how it ended otherwise.
fn reap(pid: libc::pid_t) -> Result<i32, String> {
    let start = std::time::Instant::now();
    loop {
        let mut st = 0;
        // SAFETY: a child of this process and a live status word.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid {
            return match libc::WIFEXITED(st) {
                true => Ok(libc::WEXITSTATUS(st)),
                false => Err(format!("the child ended with status {st:#x}")),
            };
        }
        if start.elapsed() > std::time::Duration::from_secs(20) {
            // SAFETY: our own child, killed and then reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut st, 0);
            }
            return Err("the child hung".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A `fork` child inherits an optimized site (the `jmp`, its detour, and a
/// copy of the registry): its calls compute right and run the handler,
/// counted by its own copy; it can remove the probe, which puts its bytes
/// back in its text only. The parent's site stays optimized and counts
/// only the parent's calls.
#[test]
fn a_fork_child_runs_an_optimized_site_and_removes_it_from_its_own_text_only() {
    let _g = serial();
    let reg = live().registry();
    let at = addr(rj_prologue);
    let orig = code(at, 16);
    let count = Arc::new(AtomicU64::new(0));
    let p = counting(at, &count);
    reg.register(&p).unwrap();
    optimize(&p);
    for x in 0..10 {
        assert_eq!(call(rj_prologue, x), x + 5);
    }
    assert_eq!(count.load(Ordering::Relaxed), 10);
    // SAFETY: the child only computes, counts, unregisters and leaves with
    // `_exit`; the registry's own fork handlers leave its locks free.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // The first failed check's number, 0 if none failed.
        let mut fail = 0;
        let mut check = |ok: bool, n: i32| {
            if !ok && fail == 0 {
                fail = n;
            }
        };
        check((0..1000).all(|x| call(rj_prologue, x) == x + 5), 10);
        // Its own copy of the counter: the parent's 10 and its 1000; the
        // probe's per-CPU hit counter too.
        check(count.load(Ordering::Relaxed) == 1010, 11);
        check(p.hits() == 1010, 18);
        check(live().is_optimized(&p), 12);
        check(code(at, 1) == [0xe9], 13);
        check(reg.unregister(&p).is_ok(), 14);
        check(code(at, 16) == orig, 15);
        check(call(rj_prologue, 2) == 7, 16);
        check(count.load(Ordering::Relaxed) == 1010, 17);
        // SAFETY: leaves the child without unwinding into the harness.
        unsafe { libc::_exit(fail) }
    }
    assert_eq!(reap(pid), Ok(0), "the child's checks (10-18: which failed)");
    // The parent: still optimized, its bytes the jmp, its count its own.
    assert!(live().is_optimized(&p));
    assert_eq!(code(at, 1), [0xe9]);
    assert_eq!(count.load(Ordering::Relaxed), 10);
    for x in 0..100 {
        assert_eq!(call(rj_prologue, x), x + 5);
    }
    assert_eq!(count.load(Ordering::Relaxed), 110);
    assert_eq!(p.hits(), 110, "the parent's hits only");
    reg.unregister(&p).unwrap();
    assert_eq!(code(at, 16), orig);
}

std::arch::global_asm!(
    ".pushsection .text.rj_upper_functions,\"ax\",@progbits",
    // rj_zstore(out): zmm0-7 stored at out (512 bytes), as the caller
    // passed them: mov eax, 1 (displaced at the entry); the stores; ret.
    ".p2align 4",
    ".globl rj_zstore",
    ".type rj_zstore,@function",
    "rj_zstore:",
    ".byte 0xb8, 0x01, 0x00, 0x00, 0x00",
    "vmovdqu64 zmmword ptr [rdi], zmm0",
    "vmovdqu64 zmmword ptr [rdi + 64], zmm1",
    "vmovdqu64 zmmword ptr [rdi + 128], zmm2",
    "vmovdqu64 zmmword ptr [rdi + 192], zmm3",
    "vmovdqu64 zmmword ptr [rdi + 256], zmm4",
    "vmovdqu64 zmmword ptr [rdi + 320], zmm5",
    "vmovdqu64 zmmword ptr [rdi + 384], zmm6",
    "vmovdqu64 zmmword ptr [rdi + 448], zmm7",
    "vzeroupper",
    "ret",
    ".size rj_zstore, . - rj_zstore",
    // rj_ystore(out): ymm0-7 stored at out (every 64 bytes, 32 each).
    ".p2align 4",
    ".globl rj_ystore",
    ".type rj_ystore,@function",
    "rj_ystore:",
    ".byte 0xb8, 0x01, 0x00, 0x00, 0x00",
    "vmovdqu ymmword ptr [rdi], ymm0",
    "vmovdqu ymmword ptr [rdi + 64], ymm1",
    "vmovdqu ymmword ptr [rdi + 128], ymm2",
    "vmovdqu ymmword ptr [rdi + 192], ymm3",
    "vmovdqu ymmword ptr [rdi + 256], ymm4",
    "vmovdqu ymmword ptr [rdi + 320], ymm5",
    "vmovdqu ymmword ptr [rdi + 384], ymm6",
    "vmovdqu ymmword ptr [rdi + 448], ymm7",
    "vzeroupper",
    "ret",
    ".size rj_ystore, . - rj_ystore",
    ".popsection",
);

extern "C" {
    fn rj_zstore();
    fn rj_ystore();
}

/// Calls `f` (`rj_zstore` or `rj_ystore`) with `zmm0-7` (`ymm0-7`: the
/// first 32 bytes of each 64) loaded from `input`; what it stored.
fn through(f: unsafe extern "C" fn(), wide: bool, input: &[u8; 512]) -> [u8; 512] {
    let mut out = [0u8; 512];
    // SAFETY: the feature of the width was detected; `f` reads the vector
    // registers and writes 512 bytes at rdi; everything the C ABI lets it
    // clobber is declared.
    unsafe {
        if wide {
            std::arch::asm!(
                "vmovdqu64 zmm0, zmmword ptr [{i}]",
                "vmovdqu64 zmm1, zmmword ptr [{i} + 64]",
                "vmovdqu64 zmm2, zmmword ptr [{i} + 128]",
                "vmovdqu64 zmm3, zmmword ptr [{i} + 192]",
                "vmovdqu64 zmm4, zmmword ptr [{i} + 256]",
                "vmovdqu64 zmm5, zmmword ptr [{i} + 320]",
                "vmovdqu64 zmm6, zmmword ptr [{i} + 384]",
                "vmovdqu64 zmm7, zmmword ptr [{i} + 448]",
                "call {f}",
                i = in(reg) input.as_ptr(), f = in(reg) f,
                in("rdi") out.as_mut_ptr(),
                clobber_abi("C"),
            );
        } else {
            std::arch::asm!(
                "vmovdqu ymm0, ymmword ptr [{i}]",
                "vmovdqu ymm1, ymmword ptr [{i} + 64]",
                "vmovdqu ymm2, ymmword ptr [{i} + 128]",
                "vmovdqu ymm3, ymmword ptr [{i} + 192]",
                "vmovdqu ymm4, ymmword ptr [{i} + 256]",
                "vmovdqu ymm5, ymmword ptr [{i} + 320]",
                "vmovdqu ymm6, ymmword ptr [{i} + 384]",
                "vmovdqu ymm7, ymmword ptr [{i} + 448]",
                "call {f}",
                i = in(reg) input.as_ptr(), f = in(reg) f,
                in("rdi") out.as_mut_ptr(),
                clobber_abi("C"),
            );
        }
    }
    out
}

/// The entry stub keeps every lane of every vector argument register in
/// every way this processor can tell whether the upper halves hold
/// anything (`jump/stubs.rs`, "The upper halves"), at its widest vector
/// width and, with AVX-512, narrowed to `ymm` too (the AVX-only paths): one
/// upper lane of one register set at a time (what a check that missed a
/// register or part of one would lose), then none, then all. The pre
/// handler sets every bit of three of the registers, so a lane the stub did
/// not keep comes back changed, and the last restore's `vzeroupper` would
/// zero any upper lane the stub wrongly took for unused.
#[test]
fn every_lane_of_every_vector_argument_survives_an_entry_hit_in_every_check_mode() {
    use rcu_registry::__internals::runtime::{
        set_upper_check, set_vector_width, upper_check, vector_width, UpperCheck,
    };
    if !std::arch::is_x86_feature_detected!("avx2") {
        eprintln!("no AVX2: skipped");
        return;
    }
    let _g = serial();
    let (detected_width, detected_check) = (vector_width(), upper_check());
    let widths: Vec<u32> = (1..=detected_width).rev().collect();
    println!("detected width {detected_width}, {detected_check:?}; testing widths {widths:?}");
    let reg = live().registry();
    let mut calls = 0;
    let mut probes = Vec::new();
    for &width in &widths {
        let (wide, f, lanes) = if width == 2 {
            (true, rj_zstore as unsafe extern "C" fn(), 8)
        } else {
            (false, rj_ystore as unsafe extern "C" fn(), 4)
        };
        let p = Kprobe::at(f as *const () as u64)
            .pre(move |_p, _regs| {
                // SAFETY: the feature was detected; the asm writes only the
                // registers it declares.
                unsafe {
                    if wide {
                        std::arch::asm!(
                            "vpternlogd zmm0, zmm0, zmm0, 0xff",
                            "vpternlogd zmm3, zmm3, zmm3, 0xff",
                            "vpternlogd zmm7, zmm7, zmm7, 0xff",
                            out("zmm0") _, out("zmm3") _, out("zmm7") _,
                        );
                    } else {
                        std::arch::asm!(
                            "vpcmpeqb ymm0, ymm0, ymm0",
                            "vpcmpeqb ymm3, ymm3, ymm3",
                            "vpcmpeqb ymm7, ymm7, ymm7",
                            out("ymm0") _, out("ymm3") _, out("ymm7") _,
                        );
                    }
                }
                Action::Continue
            })
            .build();
        reg.register(&p).unwrap();
        optimize(&p);
        set_vector_width(width).unwrap();
        let modes: Vec<UpperCheck> = [UpperCheck::Values, UpperCheck::Xinuse, UpperCheck::Width]
            .into_iter()
            .filter(|&m| set_upper_check(m).is_ok())
            .collect();
        println!("width {width}: {modes:?}");
        assert!(modes.contains(&UpperCheck::Values) && modes.contains(&UpperCheck::Width));
        let bytes = lanes * 8;
        let before = calls;
        for &mode in &modes {
            set_upper_check(mode).unwrap();
            let mut inputs = Vec::new();
            for reg in 0..8 {
                for lane in 2..lanes {
                    // Low lanes set in every register, one upper lane in one.
                    let mut v = [0u8; 512];
                    for r in 0..8 {
                        v[r * 64..r * 64 + 16].fill(0x11 * (r as u8 + 1));
                    }
                    let at = reg * 64 + lane * 8;
                    v[at..at + 8]
                        .copy_from_slice(&(0x0102_0304_0506_0708u64 << lane).to_le_bytes());
                    inputs.push(v);
                }
            }
            inputs.push([0; 512]);
            inputs.push([0xc3; 512]);
            for input in &inputs {
                let out = through(f, wide, input);
                calls += 1;
                for r in 0..8 {
                    assert_eq!(
                        out[r * 64..r * 64 + bytes],
                        input[r * 64..r * 64 + bytes],
                        "width {width}, {mode:?}: register {r} as the caller passed it"
                    );
                }
            }
        }
        assert_eq!(p.hits(), calls - before);
        probes.push(p);
    }
    set_vector_width(detected_width).unwrap();
    set_upper_check(detected_check).unwrap();
    for p in &probes {
        reg.unregister(p).unwrap();
    }
}
