//! The registry's semantics on live arm64 code: post handlers, skipping,
//! aggregation, missed hits in handlers, batched unregistration under load,
//! refusals that change no byte, the quiescence wait reading arm64 signal
//! frames, a fault in an XOL slot (boosted or stepped) reported at the
//! probed address, a fork
//! child with slots of its own, and a churn stress (`#[ignore]`: `CI=true` length under
//! `scripts/test-arm64`). Cross-built for aarch64 and run under
//! qemu-aarch64; on any other architecture each test prints why it is
//! skipped.

#[cfg(not(target_arch = "aarch64"))]
#[test]
fn arm64_live_semantics() {
    println!(
        "skipped: the targets are arm64 machine code; run scripts/test-arm64 \
         (qemu-aarch64) for this suite"
    );
}

#[cfg(target_arch = "aarch64")]
mod arm64 {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use live_arm64::fork_child::run_in_fork_child;
    use live_arm64::targets::*;
    use rcu_registry::__internals::runtime::steps_in_flight;
    use rcu_registry::probes::arch::Arm64Reg;
    use rcu_registry::probes::kprobe::{Action, Kprobe};
    use rcu_registry::probes::runtime::{quiesce, Live};
    use rcu_registry::probes::ProbeError;

    type Func = unsafe extern "C" fn(u32) -> u32;
    type Want = fn(u32) -> u32;

    /// The tests share the SIGTRAP handler, the registry and the targets.
    fn serial() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn call(f: Func, x: u32) -> u32 {
        // SAFETY: the targets are complete C-ABI functions.
        unsafe { std::hint::black_box(f)(std::hint::black_box(x)) }
    }

    fn word_at(a: u64) -> u32 {
        // SAFETY: `a` is code of this binary (readable).
        unsafe { (a as *const u32).read_volatile() }
    }

    fn hammer(threads: u32, per_thread: u32, f: Func, want: Want) {
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || {
                    for i in 0..per_thread {
                        let x = t << 20 | i;
                        assert_eq!(call(f, x), want(x), "f({x:#x})");
                    }
                });
            }
        });
    }

    /// Seconds a stress test runs: `RT_STRESS_SECS`, else `default` (ten
    /// times as long with `CI=true`).
    fn stress_secs(default: f64) -> Duration {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let secs = std::env::var("RT_STRESS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if ci { default * 10.0 } else { default });
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn post_handlers_see_the_state_after_the_stepped_instruction() {
        let _g = serial();
        let reg = Live::global().registry();
        let at = addr(la_add1 as *const ());
        let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (ok2, bad2, bad3) = (ok.clone(), bad.clone(), bad.clone());
        let p = Kprobe::at(at)
            .pre(move |_p, regs| {
                if regs.ip != at {
                    bad2.fetch_add(1, Ordering::Relaxed);
                }
                PRE_X0.with(|c| c.set(regs[Arm64Reg::X0]));
                Action::Continue
            })
            .post(move |_p, regs| {
                // After `add w0, w0, #1`: the PC is the next instruction in
                // the original code (not the slot), and w0 is one more than
                // this thread's pre handler saw.
                let want = (PRE_X0.with(Cell::get) as u32).wrapping_add(1);
                if regs.ip == at + 4 && regs[Arm64Reg::X0] as u32 == want {
                    ok2.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad3.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        reg.register(&p).unwrap();
        hammer(3, 1_000, la_add1, |x| x + 1);
        reg.unregister(&p).unwrap();
        assert_eq!(bad.load(Ordering::Relaxed), 0);
        assert_eq!(ok.load(Ordering::Relaxed), 3_000);
    }

    #[test]
    fn a_pre_handler_that_moves_the_pc_skips_the_instruction() {
        let _g = serial();
        let reg = Live::global().registry();
        let alt = addr(la_alt as *const ());
        let p = Kprobe::at(addr(la_add1 as *const ()))
            .pre(move |_p, regs| {
                regs.ip = alt;
                Action::SkipInstruction
            })
            .build();
        reg.register(&p).unwrap();
        assert_eq!(call(la_add1, 5), 777);
        assert_eq!(call(la_add1, 6), 777);
        reg.unregister(&p).unwrap();
        assert_eq!(call(la_add1, 5), 6);
        assert_eq!(p.hits(), 2);
    }

    #[test]
    fn aggregated_probes_on_one_address_share_one_brk_and_run_in_order() {
        let _g = serial();
        let reg = Live::global().registry();
        let at = addr(la_add1 as *const ());
        let original = word_at(at);
        let order = Arc::new(AtomicU64::new(0));
        let mk = |tag: u64| {
            let o = order.clone();
            Kprobe::at(at)
                .pre(move |_p, _r| {
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
        let brk = word_at(at);
        reg.register(&b).unwrap();
        assert_eq!(word_at(at), brk, "one breakpoint for both");
        assert_eq!(call(la_add1, 1), 2);
        assert_eq!(order.load(Ordering::Relaxed), 12);
        hammer(2, 1_000, la_add1, |x| x + 1);
        assert_eq!((a.hits(), b.hits()), (2_001, 2_001));
        reg.unregister(&a).unwrap();
        assert_eq!(word_at(at), brk, "b still there");
        hammer(2, 500, la_add1, |x| x + 1);
        assert_eq!((a.hits(), b.hits()), (2_001, 3_001));
        reg.unregister(&b).unwrap();
        assert_eq!(word_at(at), original);
    }

    thread_local! {
        static PRE_X0: Cell<u64> = const { Cell::new(0) };
        static DEPTH: Cell<usize> = const { Cell::new(0) };
        static MY_HANDLER_RUNS: Cell<u64> = const { Cell::new(0) };
    }

    #[test]
    fn a_probe_hit_inside_a_handler_is_missed_not_recursed() {
        let _g = serial();
        let reg = Live::global().registry();
        let max_depth = Arc::new(AtomicUsize::new(0));
        let md = max_depth.clone();
        let p = Kprobe::at(addr(la_add1 as *const ()))
            .pre(move |_p, _regs| {
                let now = DEPTH.with(|d| {
                    d.set(d.get() + 1);
                    d.get()
                });
                md.fetch_max(now, Ordering::SeqCst);
                assert_eq!(call(la_add1, 41), 42);
                DEPTH.with(|d| d.set(d.get() - 1));
                Action::Continue
            })
            .build();
        reg.register(&p).unwrap();
        hammer(2, 300, la_add1, |x| x + 1);
        reg.unregister(&p).unwrap();
        assert_eq!(p.hits(), 600);
        assert_eq!(p.nmissed(), 600, "each handler's own call is missed");
        assert_eq!(max_depth.load(Ordering::SeqCst), 1, "never recursed");
    }

    #[test]
    fn batch_unregistration_under_load_loses_no_hit_before_and_runs_no_handler_after_commit() {
        let _g = serial();
        let reg = Live::global().registry();
        const IDLE: u8 = 0;
        const ARMED: u8 = 1;
        const DISARMING: u8 = 2;
        const DONE: u8 = 3;
        let phase = AtomicU8::new(IDLE);
        let stop = AtomicBool::new(false);
        let (lost, late) = (AtomicU64::new(0), AtomicU64::new(0));
        let checked = [AtomicU64::new(0), AtomicU64::new(0)];
        let funcs: [(Func, Want); 3] = [
            (la_add1, |x| x + 1),
            (la_branch, |x| x + 2),
            (la_lit, |x| x + 0x1234),
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
                        if before == DONE && after == DONE && ran != 0 {
                            late.fetch_add(1, Ordering::Relaxed);
                        }
                        if before == after && (before == ARMED || before == DONE) {
                            // SeqCst: the main thread waits for this count
                            // to move before it ends the window.
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
                        Kprobe::at(addr(f as *const ()))
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
                let judged = checked[0].load(Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                while checked[0].load(Ordering::SeqCst) == judged {
                    std::thread::sleep(Duration::from_millis(1));
                }
                phase.store(DISARMING, Ordering::SeqCst);
                for p in &probes {
                    reg.unregister_nosync(p).unwrap();
                }
                reg.commit();
                phase.store(DONE, Ordering::SeqCst);
                let judged = checked[1].load(Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                while checked[1].load(Ordering::SeqCst) == judged {
                    std::thread::sleep(Duration::from_millis(1));
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
    fn bad_targets_are_refused_and_change_no_byte() {
        let _g = serial();
        let reg = Live::global().registry();
        let ldxr = addr(la_ldxr as *const ());
        for (what, at) in [
            ("misaligned", addr(la_add1 as *const ()) + 2),
            ("a load-exclusive", ldxr),
            ("inside an exclusive pair", ldxr + 4),
            ("a store-exclusive", ldxr + 8),
        ] {
            let aligned = at & !3;
            let before = word_at(aligned);
            let p = Kprobe::at(at).pre(|_, _| Action::Continue).build();
            let err = reg.register(&p).expect_err(what);
            assert!(
                matches!(
                    err,
                    ProbeError::Misaligned { .. } | ProbeError::UnsupportedInstruction { .. }
                ),
                "{what}: {err:?}"
            );
            assert_eq!(word_at(aligned), before, "{what}: no byte changed");
        }
        let mut v = 5u32;
        // SAFETY: a complete C-ABI function on a valid pointer.
        assert_eq!(unsafe { la_ldxr(&mut v) }, 6);
        // Unmapped and non-code addresses: an error, not a crash (under
        // qemu-user `process_vm_readv` is not implemented, so text reads
        // take the runtime's direct fallback).
        let data = std::ptr::addr_of!(v) as u64 & !3;
        for (what, at) in [("unmapped", 0x10u64), ("the stack", data)] {
            let p = Kprobe::at(at).pre(|_, _| Action::Continue).build();
            let err = reg.register(&p).expect_err(what);
            println!("{what} {at:#x}: {err}");
        }
    }

    #[test]
    fn quiescence_waits_for_a_thread_inside_the_range_and_sees_it_leave() {
        let _g = serial();
        let range = addr(la_spin as *const ())..addr(la_spin_end as *const ());
        let flag = Arc::new(AtomicU32::new(0));
        let f = Arc::clone(&flag);
        let spinner = std::thread::spawn(move || {
            // SAFETY: a complete C-ABI function; the flag outlives the call.
            unsafe { la_spin(f.as_ptr()) };
        });
        // Let the thread get into the loop.
        std::thread::sleep(Duration::from_millis(50));
        let held = quiesce(std::slice::from_ref(&range), Duration::from_millis(300));
        // Release: pairs with the `ldar` of the spin loop.
        flag.store(1, Ordering::Release);
        spinner.join().unwrap();
        let free = quiesce(std::slice::from_ref(&range), Duration::from_secs(5));
        println!("inside: {held:?}\nafter: {free:?}");
        assert!(held.timed_out >= 1, "the spinning thread was seen inside");
        assert!(!held.proves_quiescence());
        assert_eq!(free.timed_out, 0, "every thread was seen outside");
        assert_eq!(free.nested, 0);
        // Under qemu-user `/proc/self/task` also lists the emulator's own
        // threads, and its RCU thread keeps every signal blocked: it is
        // counted `blocked` in both waits, and no wait can prove quiescence
        // there (docs/limitations, "arm64 under qemu"). Natively nothing is
        // blocked and the second wait proves it.
        if free.blocked > 0 {
            println!(
                "{} thread(s) keep the signal blocked in both waits (qemu-user's own)",
                free.blocked
            );
            assert_eq!(free.blocked, held.blocked, "the same threads, not ours");
        } else {
            assert!(free.proves_quiescence());
        }
    }

    #[test]
    fn a_fork_child_keeps_counting_with_slots_of_its_own_and_can_unregister() {
        let _g = serial();
        let reg = Live::global().registry();
        let count = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&count);
        let p = Kprobe::at(addr(la_add1 as *const ()))
            .pre(move |_p, _r| {
                c.fetch_add(1, Ordering::Relaxed);
                Action::Continue
            })
            .build();
        reg.register(&p).unwrap();
        assert_eq!(call(la_add1, 1), 2);
        run_in_fork_child("the child's checks failed", || {
            let mut ok = (0..100).all(|x| call(la_add1, x) == x + 1);
            ok &= count.load(Ordering::Relaxed) == 101;
            ok &= reg.unregister(&p).is_ok();
            ok && call(la_add1, 5) == 6 && count.load(Ordering::Relaxed) == 101
        });
        // The parent's probe is untouched by the child's unregister.
        hammer(1, 50, la_add1, |x| x + 1);
        reg.unregister(&p).unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 51);
    }

    /// What the application's SIGSEGV handler saw: the PC of the fault.
    static FAULT_PC: AtomicU64 = AtomicU64::new(0);
    /// Where the application's handler points `x0` to recover.
    static GOOD: u32 = 77;

    extern "C" fn app_segv(_s: libc::c_int, _i: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
        // SAFETY: the kernel (through the runtime's fault handler, which
        // chains with the same arguments) passes a valid ucontext.
        let uc = unsafe { &mut *uctx.cast::<libc::ucontext_t>() };
        let pc = uc.uc_mcontext.pc;
        // SeqCst: read by the test thread after the call returns.
        FAULT_PC.store(pc, Ordering::SeqCst);
        if pc == addr(la_load as *const ()) {
            // Recover: retry the load with a good pointer.
            uc.uc_mcontext.regs[0] = std::ptr::addr_of!(GOOD) as u64;
        } else {
            // Not this test's fault: die of it as the default would.
            // SAFETY: restores SIG_DFL; the fault repeats on return.
            unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        }
    }

    #[test]
    fn a_fault_in_an_xol_slot_boosted_or_stepped_is_reported_at_the_probed_address() {
        let _g = serial();
        let reg = Live::global().registry();
        // The application's handler first; registering puts the runtime's
        // fault handler back on top, chained to it.
        // SAFETY: as in `raw_trap::with_raw_trap`.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = app_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        // SAFETY: a valid sigaction.
        assert_eq!(
            unsafe { libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut()) },
            0
        );
        let at = addr(la_load as *const ());
        // Without a post handler the `ldr` runs boosted (the fault is found
        // among this thread's recent boosts); with one it is single-stepped
        // (the step in flight is abandoned).
        for post in [false, true] {
            FAULT_PC.store(0, Ordering::SeqCst);
            let count = Arc::new(AtomicU64::new(0));
            let c = Arc::clone(&count);
            let b = Kprobe::at(at).pre(move |_p, _r| {
                c.fetch_add(1, Ordering::Relaxed);
                Action::Continue
            });
            let p = if post {
                b.post(|_, _| {}).build()
            } else {
                b.build()
            };
            reg.register(&p).unwrap();
            // SAFETY: a complete C-ABI function; the bad pointer's fault is
            // recovered by `app_segv`.
            let v = unsafe { la_load(std::hint::black_box(8 as *const u32)) };
            reg.unregister(&p).unwrap();
            assert_eq!(v, 77, "post {post}: the recovered load");
            assert_eq!(
                FAULT_PC.load(Ordering::SeqCst),
                at,
                "post {post}: the application saw the probed address, not the XOL slot"
            );
            assert_eq!(
                count.load(Ordering::Relaxed),
                2,
                "post {post}: the faulting hit and the retry"
            );
            assert_eq!(steps_in_flight(), 0, "post {post}: nothing left in flight");
        }
    }

    #[test]
    #[ignore = "stress: run by scripts/test-arm64 (CI=true: ten times as long)"]
    fn register_and_unregister_churn_under_four_threads_keeps_every_result_right() {
        let _g = serial();
        let reg = Live::global().registry();
        let stop = AtomicBool::new(false);
        let calls = AtomicU64::new(0);
        let funcs: [(Func, Want); 4] = [
            (la_add1, |x| x + 1),
            (la_branch, |x| x + 2),
            (la_call, |x| x + 2),
            (la_cbz, |x| if x == 0 { 7 } else { x }),
        ];
        let cycles = std::thread::scope(|s| {
            for t in 0..4usize {
                let (stop, calls) = (&stop, &calls);
                s.spawn(move || {
                    let mut i = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let (f, want) = funcs[(t + i as usize) % funcs.len()];
                        assert_eq!(call(f, i), want(i));
                        i = i.wrapping_add(1);
                    }
                    calls.fetch_add(u64::from(i), Ordering::Relaxed);
                });
            }
            let deadline = Instant::now() + stress_secs(2.0);
            let mut cycles = 0u64;
            while Instant::now() < deadline {
                let probes: Vec<Kprobe> = funcs
                    .iter()
                    .map(|&(f, _)| {
                        Kprobe::at(addr(f as *const ()))
                            .pre(|_, _| Action::Continue)
                            .build()
                    })
                    .collect();
                for p in &probes {
                    reg.register(p).unwrap();
                }
                std::thread::sleep(Duration::from_millis(2));
                if cycles % 2 == 0 {
                    for p in &probes {
                        reg.unregister(p).unwrap();
                    }
                } else {
                    let refs: Vec<&Kprobe> = probes.iter().collect();
                    reg.unregister_many(&refs).unwrap();
                }
                cycles += 1;
            }
            stop.store(true, Ordering::Relaxed);
            cycles
        });
        println!(
            "{cycles} register/unregister cycles, {} calls",
            calls.load(Ordering::Relaxed)
        );
        assert!(cycles > 0);
        for (f, _) in funcs {
            assert!(!reg.has_site(addr(f as *const ())));
        }
    }
}
