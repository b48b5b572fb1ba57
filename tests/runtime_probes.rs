//! Proof of live probes on running code (issue 5): real breakpoints in this
//! test binary's own functions, hit by many threads, while probes come and
//! go. Every test takes the binary's serial lock (they share the SIGTRAP
//! handler, the registry and the functions they probe).

mod runtime_support;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rcu_registry::__internals::runtime::{refuse, steps_in_flight};
use rcu_registry::probes::arch::X86Reg;
use rcu_registry::probes::kprobe::{Action, EntryAction, Kprobe, Kretprobe};
use rcu_registry::probes::runtime::{trampoline_address, Live};
use rcu_registry::probes::ProbeError;
use runtime_support::*;

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

/// Runs `per_thread` calls of `f` on `threads` threads, checking each
/// result against `want`.
fn hammer(
    threads: usize,
    per_thread: u64,
    f: unsafe extern "C" fn(u32) -> u32,
    want: fn(u32) -> u32,
) {
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..per_thread {
                    let x = (t as u32) << 20 | i as u32;
                    assert_eq!(call(f, x), want(x), "f({x})");
                }
            });
        }
    });
}

#[test]
fn hits_are_counted_exactly_from_many_threads() {
    let _g = serial();
    let reg = live().registry();
    for (f, want, what) in [
        (
            rtp_add1 as unsafe extern "C" fn(u32) -> u32,
            (|x| x + 1) as fn(u32) -> u32,
            "boosted",
        ),
        (rtp_push, |x| x, "emulated"),
    ] {
        let count = Arc::new(AtomicU64::new(0));
        let p = counting(addr(f), &count);
        let waits = live().xol_stats().quiesce_waits;
        reg.register(&p).unwrap();
        hammer(4, 5_000, f, want);
        reg.unregister(&p).unwrap();
        // Retiring a boosted slot waits for every thread to leave it.
        let stats = live().xol_stats();
        assert_eq!(
            stats.quiesce_waits - waits,
            u64::from(what == "boosted"),
            "{what}"
        );
        println!(
            "{what}: {} hits, quiescence fallbacks so far {}",
            p.hits(),
            stats.quiesce_fallbacks
        );
        assert_eq!(p.hits(), 20_000, "{what}");
        assert_eq!(count.load(Ordering::Relaxed), 20_000, "{what}");
        assert_eq!(p.nmissed(), 0);
        // Unregistered: no more hits, and the code is as before.
        hammer(1, 100, f, want);
        assert_eq!(count.load(Ordering::Relaxed), 20_000);
    }
    assert_eq!(
        code(addr(rtp_add1), 6),
        [0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3]
    );
    assert_eq!(code(addr(rtp_push), 5), [0x53, 0x89, 0xf8, 0x5b, 0xc3]);
}

#[test]
fn post_handlers_see_the_state_after_the_displaced_instruction() {
    let _g = serial();
    let reg = live().registry();
    let at = addr(rtp_add1);
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let (ok2, bad2, bad3) = (ok.clone(), bad.clone(), bad.clone());
    let p = Kprobe::at(at)
        .pre(move |_p, regs| {
            // Before `mov eax, edi`: the IP is the probed address.
            if regs.ip != at {
                bad2.fetch_add(1, Ordering::Relaxed);
            }
            Action::Continue
        })
        .post(move |_p, regs| {
            // After it: eax == edi and the IP is the next instruction in
            // the original code (not the XOL slot).
            if regs.ip == at + 2 && regs[X86Reg::Rax] as u32 == regs[X86Reg::Rdi] as u32 {
                ok2.fetch_add(1, Ordering::Relaxed);
            } else {
                bad3.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build();
    reg.register(&p).unwrap();
    hammer(3, 2_000, rtp_add1, |x| x + 1);
    reg.unregister(&p).unwrap();
    assert_eq!(bad.load(Ordering::Relaxed), 0);
    assert_eq!(ok.load(Ordering::Relaxed), 6_000);
    assert_eq!(steps_in_flight(), 0);

    // A RIP-relative load is always single-stepped with a scratch register:
    // the post handler sees the loaded value and the scratch restored.
    let at = rtp_load as *const () as usize as u64;
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    let p = Kprobe::at(at)
        .post(move |_p, regs| {
            assert_eq!(regs.ip, at + 7);
            s2.store(regs[X86Reg::Rax], Ordering::Relaxed);
        })
        .build();
    reg.register(&p).unwrap();
    let f = std::hint::black_box(rtp_load as unsafe extern "C" fn() -> u64);
    // SAFETY: a complete C-ABI function.
    let v = unsafe { f() };
    reg.unregister(&p).unwrap();
    assert_eq!(v, 0x1_2345_6789);
    assert_eq!(seen.load(Ordering::Relaxed), 0x1_2345_6789);
    assert_eq!(p.hits(), 1);
}

#[test]
fn a_pre_handler_that_moves_the_ip_skips_the_instruction() {
    let _g = serial();
    let reg = live().registry();
    let alt = addr(rtp_alt);
    let p = Kprobe::at(addr(rtp_add1))
        .pre(move |_p, regs| {
            regs.ip = alt;
            Action::SkipInstruction
        })
        .build();
    reg.register(&p).unwrap();
    assert_eq!(call(rtp_add1, 5), 777);
    assert_eq!(call(rtp_add1, 6), 777);
    reg.unregister(&p).unwrap();
    assert_eq!(call(rtp_add1, 5), 6);
    assert_eq!(p.hits(), 2);
}

#[test]
fn kretprobes_see_return_values_and_their_own_per_call_data() {
    let _g = serial();
    let reg = live().registry();
    let mismatches = Arc::new(AtomicU64::new(0));
    let returns = Arc::new(AtomicU64::new(0));
    let (m, r) = (mismatches.clone(), returns.clone());
    let krp = Kretprobe::at(addr(rtp_mul3))
        .data::<u64>()
        .maxactive(64)
        .entry_handler(|arg, regs| {
            *arg = regs.arg(0).unwrap() & 0xffff_ffff;
            EntryAction::Track
        })
        .handler(move |arg, regs, ret| {
            r.fetch_add(1, Ordering::Relaxed);
            if ret as u32 != (*arg as u32).wrapping_mul(3) || regs.retval() != ret {
                m.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build()
        .unwrap();
    reg.register(&krp).unwrap();
    hammer(4, 3_000, rtp_mul3, |x| x.wrapping_mul(3));
    // Called from another function: the hijacked return lands in the middle
    // of `rtp_twice`, which goes on correctly.
    for x in 0..100u32 {
        assert_eq!(call(rtp_twice, x), x + 1 + 3 * x);
    }
    reg.unregister(&krp).unwrap();
    println!(
        "kretprobe: {} returns, {} missed",
        returns.load(Ordering::Relaxed),
        krp.nmissed()
    );
    assert_eq!(mismatches.load(Ordering::Relaxed), 0);
    assert_eq!(returns.load(Ordering::Relaxed) + krp.nmissed(), 12_100);
    assert_eq!(krp.nmissed(), 0, "64 instances suffice for 4 threads");
    assert_eq!(krp.in_flight(), 0);
}

#[test]
fn a_kretprobe_handler_can_change_the_return_value() {
    let _g = serial();
    let reg = live().registry();
    let krp = Kretprobe::at(addr(rtp_mul3))
        .handler(|_, regs, ret| regs.set_retval(ret + 1000))
        .build()
        .unwrap();
    reg.register(&krp).unwrap();
    assert_eq!(call(rtp_mul3, 2), 1006);
    reg.unregister(&krp).unwrap();
    assert_eq!(call(rtp_mul3, 2), 6);
}

#[test]
fn aggregated_probes_on_one_address_all_run_in_order() {
    let _g = serial();
    let reg = live().registry();
    let at = addr(rtp_add1);
    let order = Arc::new(AtomicU64::new(0));
    let mk = |tag: u64| {
        let o = order.clone();
        Kprobe::at(at)
            .pre(move |_p, _r| {
                // Shift in the tag: the value records the order of the
                // first call's handlers (later calls leave it alone).
                let v = o.load(Ordering::Relaxed);
                if v < 10 {
                    o.store(v * 10 + tag, Ordering::Relaxed);
                }
                Action::Continue
            })
            .build()
    };
    let (a, b) = (mk(1), mk(2));
    reg.register(&a).unwrap();
    reg.register(&b).unwrap();
    assert_eq!(code(at, 1), [0xcc], "one breakpoint for both");
    assert_eq!(call(rtp_add1, 1), 2);
    assert_eq!(order.load(Ordering::Relaxed), 12);
    hammer(2, 1_000, rtp_add1, |x| x + 1);
    assert_eq!((a.hits(), b.hits()), (2_001, 2_001));
    reg.unregister(&a).unwrap();
    assert_eq!(code(at, 1), [0xcc], "b still there");
    hammer(2, 500, rtp_add1, |x| x + 1);
    assert_eq!((a.hits(), b.hits()), (2_001, 3_001));
    reg.unregister(&b).unwrap();
    assert_eq!(code(at, 2), [0x89, 0xf8]);
}

thread_local! {
    /// Handlers of the re-entrancy test running on this thread right now.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

#[test]
fn a_probe_hit_inside_a_handler_is_missed_not_recursed() {
    let _g = serial();
    let reg = live().registry();
    let max_depth = Arc::new(AtomicUsize::new(0));
    let md = max_depth.clone();
    let p = Kprobe::at(addr(rtp_add1))
        .pre(move |_p, _regs| {
            let now = DEPTH.with(|d| {
                d.set(d.get() + 1);
                d.get()
            });
            md.fetch_max(now, Ordering::SeqCst);
            // The handler calls the probed function itself.
            assert_eq!(call(rtp_add1, 41), 42);
            DEPTH.with(|d| d.set(d.get() - 1));
            Action::Continue
        })
        .build();
    reg.register(&p).unwrap();
    hammer(2, 500, rtp_add1, |x| x + 1);
    reg.unregister(&p).unwrap();
    assert_eq!(p.hits(), 1_000);
    assert_eq!(p.nmissed(), 1_000, "each handler's own call is missed");
    assert_eq!(max_depth.load(Ordering::SeqCst), 1, "never recursed");
}

thread_local! {
    static MY_HANDLER_RUNS: Cell<u64> = const { Cell::new(0) };
}

#[test]
fn batch_unregistration_under_load_loses_no_hit_before_and_runs_no_handler_after_commit() {
    let _g = serial();
    let reg = live().registry();
    const IDLE: u8 = 0;
    const ARMED: u8 = 1;
    const DISARMING: u8 = 2;
    const DONE: u8 = 3;
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(IDLE));
    let stop = AtomicBool::new(false);
    let lost = AtomicU64::new(0);
    let late = AtomicU64::new(0);
    // Calls judged inside an ARMED window and inside a DONE window.
    let checked = [AtomicU64::new(0), AtomicU64::new(0)];
    let funcs: [(Func, Want); 3] = [
        (rtp_add1, |x| x + 1),
        (rtp_push, |x| x),
        (rtp_mul3, |x| x.wrapping_mul(3)),
    ];
    let rounds = std::thread::scope(|s| {
        for t in 0..3usize {
            let (phase, stop, lost, late, checked) = (&phase, &stop, &lost, &late, &checked);
            s.spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let (f, want) = funcs[(t + i as usize) % 3];
                    let before = phase.load(Ordering::SeqCst);
                    let runs = MY_HANDLER_RUNS.with(Cell::get);
                    assert_eq!(call(f, i), want(i));
                    let ran = MY_HANDLER_RUNS.with(Cell::get) - runs;
                    let after = phase.load(Ordering::SeqCst);
                    if before == ARMED && after == ARMED && ran != 1 {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                    // Only calls entirely inside a window are judged: one that
                    // straddles a phase change may or may not be hit.
                    if before == DONE && after == DONE && ran != 0 {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                    if before == after && (before == ARMED || before == DONE) {
                        // SeqCst: the main thread waits for this count to
                        // move before it ends the window.
                        checked[(before == DONE) as usize].fetch_add(1, Ordering::SeqCst);
                    }
                    i = i.wrapping_add(1);
                }
            });
        }
        let deadline = Instant::now() + stress_secs(1.0);
        let mut rounds = 0;
        while rounds == 0 || Instant::now() < deadline {
            let probes: Vec<Kprobe> = funcs
                .iter()
                .map(|&(f, _)| {
                    Kprobe::at(addr(f))
                        .pre(|_p, _r| {
                            MY_HANDLER_RUNS.with(|c| c.set(c.get() + 1));
                            Action::Continue
                        })
                        .build()
                })
                .collect();
            for p in &probes {
                reg.register(p).unwrap();
            }
            phase.store(ARMED, Ordering::SeqCst);
            // Each window lasts until a worker call has been judged inside
            // it, so every round checks something on any schedule.
            let judged = checked[0].load(Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            while checked[0].load(Ordering::SeqCst) == judged {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            phase.store(DISARMING, Ordering::SeqCst);
            for p in &probes {
                reg.unregister_nosync(p).unwrap();
            }
            reg.commit();
            phase.store(DONE, Ordering::SeqCst);
            let judged = checked[1].load(Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            while checked[1].load(Ordering::SeqCst) == judged {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            phase.store(IDLE, Ordering::SeqCst);
            rounds += 1;
        }
        stop.store(true, Ordering::Relaxed);
        rounds
    });
    println!(
        "{rounds} rounds, {} + {} calls checked (armed + done), {} lost, {} late",
        checked[0].load(Ordering::Relaxed),
        checked[1].load(Ordering::Relaxed),
        lost.load(Ordering::Relaxed),
        late.load(Ordering::Relaxed)
    );
    assert_eq!(
        lost.load(Ordering::Relaxed),
        0,
        "a call while armed missed its hit"
    );
    assert_eq!(
        late.load(Ordering::Relaxed),
        0,
        "a handler ran after commit()"
    );
    assert!(rounds > 0 && checked.iter().all(|c| c.load(Ordering::Relaxed) > 0));
}

#[test]
fn bad_targets_on_real_code_are_refused_and_change_no_byte() {
    let _g = serial();
    let live = live();
    let reg = live.registry();
    let at = addr(rtp_add1);
    let snapshot = |a: u64| code(a, 32);
    let before = snapshot(at);

    // Inside `mov eax, edi`.
    let p = Kprobe::at(at + 1).build();
    assert_eq!(
        reg.register(&p),
        Err(ProbeError::NotOnInstructionBoundary {
            addr: at + 1,
            insn_start: at
        })
    );
    assert_eq!(snapshot(at), before);

    // Inside `add eax, 1`.
    let p = Kprobe::at(at + 3).build();
    assert!(matches!(
        reg.register(&p),
        Err(ProbeError::NotOnInstructionBoundary { insn_start, .. }) if insn_start == at + 2
    ));
    assert_eq!(snapshot(at), before);

    // Unknown symbol.
    let p = Kprobe::symbol("no_such_function_in_this_process", 0).build();
    assert!(matches!(
        reg.register(&p),
        Err(ProbeError::UnknownSymbol { .. })
    ));

    // The runtime's own trap path, by symbol: Rcu::read is in it.
    let rcu_read = live
        .symbols()
        .functions()
        .iter()
        .find(|f| f.name.starts_with("rcu_registry::rcu::") && f.size > 4)
        .expect("some rcu function is in the symbol table");
    let before_rcu = snapshot(rcu_read.start);
    let p = Kprobe::at(rcu_read.start).build();
    match reg.register(&p) {
        Err(ProbeError::RefusedTarget { what, .. }) => assert_eq!(what, refuse::RUNTIME_CODE),
        // Refused earlier by the backend (e.g. an endbr/jump the registry
        // emulates would still be written): only a refusal is acceptable.
        other => panic!("probing {} gave {other:?}", rcu_read.name),
    }
    assert_eq!(snapshot(rcu_read.start), before_rcu);

    // The kretprobe trampoline.
    let t = trampoline_address();
    let before_t = snapshot(t);
    let p = Kprobe::at(t).build();
    assert!(
        matches!(
            reg.register(&p),
            Err(ProbeError::RefusedTarget { .. }) | Err(ProbeError::NoFunction { .. })
        ),
        "the trampoline must not be probed"
    );
    assert_eq!(snapshot(t), before_t);

    // Someone else's breakpoint already there.
    let text = rcu_registry::probes::runtime::InProcess::new();
    use rcu_registry::probes::text::TextMemory;
    let push_at = addr(rtp_push);
    text.write(push_at, &[0x53], &[0xcc]).unwrap();
    let before_push = snapshot(push_at);
    let p = Kprobe::at(push_at).build();
    assert!(matches!(
        reg.register(&p),
        Err(ProbeError::AlreadyPatched { .. })
    ));
    assert_eq!(snapshot(push_at), before_push);
    text.write(push_at, &[0xcc], &[0x53]).unwrap();

    assert!(reg.is_empty());
    assert_eq!(snapshot(at), before);
}

#[test]
fn a_probed_function_returns_right_results_after_a_million_hits_and_after_unregistration() {
    let _g = serial();
    let reg = live().registry();
    let at = addr(rtp_add1);
    let p = Kprobe::at(at).build();
    reg.register(&p).unwrap();
    let n: u64 = std::env::var("RT_MILLION")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let t0 = Instant::now();
    hammer(2, n / 2, rtp_add1, |x| x + 1);
    let took = t0.elapsed();
    assert_eq!(p.hits(), n);
    reg.unregister(&p).unwrap();
    println!(
        "{n} hits in {took:?} ({:.0} ns per hit, 2 threads)",
        took.as_nanos() as f64 / n as f64 * 2.0
    );
    assert_eq!(code(at, 6), [0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3]);
    hammer(2, 10_000, rtp_add1, |x| x + 1);
    assert_eq!(p.hits(), n);
}
