//! Live kprobes on this process's own code: real `brk` breakpoints in arm64
//! functions whose every instruction is known (`live_arm64::targets`), hit
//! from several threads, counted exactly; the displaced instruction
//! completed out of line or simulated; the code as it was after unregister.
//! Cross-built for aarch64 and run under qemu-aarch64 (`scripts/test-arm64`);
//! on any other architecture each test prints why it is skipped.

#[cfg(not(target_arch = "aarch64"))]
#[test]
fn arm64_live_kprobes() {
    println!(
        "skipped: the targets are arm64 machine code; run scripts/test-arm64 \
         (qemu-aarch64) for this suite"
    );
}

#[cfg(target_arch = "aarch64")]
mod arm64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};

    use live_arm64::targets::*;
    use rcu_registry::__internals::runtime::refuse;
    use rcu_registry::probes::kprobe::{Action, EntryAction, Kprobe, Kretprobe};
    use rcu_registry::probes::runtime::{trampoline_address, Live};
    use rcu_registry::probes::ProbeError;

    /// The tests share the SIGTRAP handler, the registry and the targets.
    fn serial() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn counting(at: u64, count: &Arc<AtomicU64>) -> Kprobe {
        let c = Arc::clone(count);
        Kprobe::at(at)
            .pre(move |_p, _regs| {
                // Relaxed: read after the threads are joined.
                c.fetch_add(1, Ordering::Relaxed);
                Action::Continue
            })
            .build()
    }

    fn word_at(a: u64) -> u32 {
        // SAFETY: `a` is code of this binary (readable).
        unsafe { (a as *const u32).read_volatile() }
    }

    type Target = (
        &'static str,
        unsafe extern "C" fn(u32) -> u32,
        u64,
        fn(u32) -> u32,
    );

    fn targets() -> [Target; 11] {
        [
            ("add (out of line, boosted)", la_add1, 0, |x| x + 1),
            ("b (simulated)", la_branch, 0, |x| x + 2),
            ("bl (simulated)", la_call, 8, |x| x + 2),
            ("cbz (simulated)", la_cbz, 0, |x| if x == 0 { 7 } else { x }),
            ("ldr literal (simulated)", la_lit, 0, |x| x + 0x1234),
            ("adr (simulated)", la_adr, 0, |x| x + 0x10),
            ("adrp (simulated)", la_adrp, 0, |x| x + 0x20),
            ("b.lo (simulated)", la_bcond, 4, |x| {
                if x < 10 {
                    x + 3
                } else {
                    0
                }
            }),
            ("tbz (simulated)", la_tbz, 0, |x| x + (x & 1)),
            ("ret (simulated)", la_ret, 4, |x| x + 4),
            ("blr (simulated)", la_blr, 16, |x| x + 1),
        ]
    }

    #[test]
    fn every_hit_from_four_threads_is_counted_exactly_and_unregister_restores_the_code() {
        let _g = serial();
        let reg = Live::global().registry();
        for (what, f, off, want) in targets() {
            let at = addr(f as *const ()) + off;
            let original = word_at(at);
            let count = Arc::new(AtomicU64::new(0));
            let p = counting(at, &count);
            let waits = Live::global().xol_stats().quiesce_waits;
            reg.register(&p).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                word_at(at) & 0xffe0_001f,
                0xd420_0000,
                "{what}: a brk is in place"
            );
            hammer(4, 2_000, f, want);
            assert_eq!(count.load(Ordering::Relaxed), 8_000, "{what}: hits");
            assert_eq!(p.hits(), 8_000, "{what}: the probe's own count");
            reg.unregister(&p).unwrap();
            // A boosted slot (the stepped class with no post handler: its
            // copy jumps back with `b`) is retired after a quiescence wait.
            let boosted = what.contains("out of line");
            assert_eq!(
                Live::global().xol_stats().quiesce_waits - waits,
                u64::from(boosted),
                "{what}: boosted"
            );
            assert_eq!(word_at(at), original, "{what}: the instruction is back");
            hammer(2, 100, f, want);
            assert_eq!(
                count.load(Ordering::Relaxed),
                8_000,
                "{what}: no hit after unregister"
            );
        }
    }

    #[test]
    fn a_pre_handler_reads_and_changes_argument_registers() {
        let _g = serial();
        let reg = Live::global().registry();
        let seen = Arc::new(AtomicU64::new(0));
        let s = Arc::clone(&seen);
        let p = Kprobe::at(addr(la_add1 as *const ()))
            .pre(move |_p, regs| {
                s.store(regs.arg(0).unwrap(), Ordering::Relaxed);
                assert!(regs.set_arg(0, 100));
                Action::Continue
            })
            .build();
        reg.register(&p).unwrap();
        // SAFETY: a complete C-ABI function.
        let got = unsafe { la_add1(std::hint::black_box(41)) };
        reg.unregister(&p).unwrap();
        assert_eq!(seen.load(Ordering::Relaxed), 41);
        assert_eq!(got, 101, "the stepped `add` ran on the handler's x0");
    }

    #[test]
    fn vector_registers_survive_a_stepped_floating_point_instruction() {
        let _g = serial();
        let reg = Live::global().registry();
        let count = Arc::new(AtomicU64::new(0));
        // The `fadd` (offset 4) runs from an XOL slot with the vector state
        // the trap's frame restored.
        let p = counting(addr(la_fadd as *const ()) + 4, &count);
        reg.register(&p).unwrap();
        for i in 0..100 {
            let x = f64::from(i) * 1.25;
            // SAFETY: a complete C-ABI function.
            assert_eq!(unsafe { la_fadd(std::hint::black_box(x)) }, x + 0.5);
        }
        reg.unregister(&p).unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn kretprobes_see_every_return_and_may_change_the_value() {
        let _g = serial();
        let reg = Live::global().registry();
        let returns = Arc::new(AtomicU64::new(0));
        let wrong = Arc::new(AtomicU64::new(0));
        let (r, w) = (Arc::clone(&returns), Arc::clone(&wrong));
        let krp = Kretprobe::at(addr(la_add1 as *const ()))
            .data::<u64>()
            .maxactive(64)
            .entry_handler(|arg, regs| {
                *arg = regs.arg(0).unwrap() & 0xffff_ffff;
                EntryAction::Track
            })
            .handler(move |arg, regs, ret| {
                r.fetch_add(1, Ordering::Relaxed);
                if ret as u32 != (*arg as u32) + 1 || regs.retval() != ret {
                    w.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build()
            .unwrap();
        reg.register(&krp).unwrap();
        // Called directly and through la_call's `bl` (a caller with a
        // frame of its own).
        hammer(4, 1_000, la_add1, |x| x + 1);
        hammer(2, 500, la_call, |x| x + 2);
        reg.unregister(&krp).unwrap();
        assert_eq!(returns.load(Ordering::Relaxed), 5_000);
        assert_eq!(wrong.load(Ordering::Relaxed), 0);
        assert_eq!(krp.returns(), 5_000);

        let krp = Kretprobe::at(addr(la_add1 as *const ()))
            .handler(|_, regs, ret| regs.set_retval(ret + 1000))
            .build()
            .unwrap();
        reg.register(&krp).unwrap();
        // SAFETY: a complete C-ABI function.
        assert_eq!(unsafe { la_add1(std::hint::black_box(2)) }, 1003);
        reg.unregister(&krp).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { la_add1(std::hint::black_box(2)) }, 3);
    }

    /// Polls `done` (1 ms apart) until it holds, failing after 10 s.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Calls `spin(flag)` on a new thread, which returns 42 once `flag` is
    /// set (`la_spin`, `la_wait`).
    fn spinning(
        spin: unsafe extern "C" fn(*const u32),
    ) -> (
        Arc<std::sync::atomic::AtomicU32>,
        std::thread::JoinHandle<u32>,
    ) {
        let flag = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let f = Arc::clone(&flag);
        let caller = std::thread::spawn(move || {
            // SAFETY: a complete C-ABI function; the flag outlives the call.
            unsafe { spin(f.as_ptr()) };
            std::hint::black_box(42)
        });
        (flag, caller)
    }

    #[test]
    fn a_call_in_flight_when_its_kretprobe_goes_returns_to_its_caller() {
        let _g = serial();
        let reg = Live::global().registry();
        let returns = Arc::new(AtomicU64::new(0));
        let r = Arc::clone(&returns);
        let krp = Kretprobe::at(addr(la_wait as *const ()))
            .handler(move |_, _, _| {
                r.fetch_add(1, Ordering::SeqCst);
            })
            .build()
            .unwrap();
        reg.register(&krp).unwrap();
        // Its return address is the trampoline while it spins.
        let (flag, caller) = spinning(la_wait);
        until("the call entered", || krp.in_flight() != 0);
        assert_eq!(krp.in_flight(), 1);
        // The call keeps its instance (the real return address) until it
        // returns; its return handler no longer runs.
        reg.unregister(&krp).unwrap();
        assert_eq!(krp.in_flight(), 1, "the call in flight, and only it");
        // Release: pairs with the `ldar` of the spin loop.
        flag.store(1, Ordering::Release);
        assert_eq!(caller.join().unwrap(), 42, "returned to its caller");
        assert_eq!(
            returns.load(Ordering::SeqCst),
            0,
            "no handler after unregister"
        );
        assert_eq!(krp.in_flight(), 0, "its instance is back in the pool");
        assert_eq!(krp.nmissed(), 0);
    }

    /// `in_flight` counts entries, not frames: `la_spin`'s loop branches
    /// back to its first instruction, so a kretprobe there sees a new call
    /// at each iteration (its `x30` already the trampoline, hijacked again)
    /// until the pool runs out, and the one real return then unwinds every
    /// tracked entry, each returning into the trampoline again. What the
    /// last session read as "10 in flight for one call" after unregister
    /// was this, with the default pool of 10.
    #[test]
    fn a_probe_on_an_instruction_its_own_loop_branches_to_sees_a_call_at_each_iteration() {
        let _g = serial();
        let reg = Live::global().registry();
        let krp = Kretprobe::at(addr(la_spin as *const ()))
            .maxactive(3)
            .handler(|_, _, _| {})
            .build()
            .unwrap();
        reg.register(&krp).unwrap();
        let (flag, caller) = spinning(la_spin);
        // The pool is empty once an iteration found no instance.
        until("an entry missed for want of an instance", || {
            krp.nmissed() != 0
        });
        assert_eq!(krp.in_flight(), 3, "every instance tracks an iteration");
        // Release: pairs with the `ldar` of the spin loop.
        flag.store(1, Ordering::Release);
        assert_eq!(caller.join().unwrap(), 42, "returned to its caller");
        assert_eq!(krp.returns(), 3, "each tracked entry returned");
        assert_eq!(krp.in_flight(), 0);
        reg.unregister(&krp).unwrap();
    }

    #[test]
    fn the_runtime_refuses_its_own_trap_path() {
        let _g = serial();
        let reg = Live::global().registry();
        for (what, at) in [
            ("the trampoline", trampoline_address()),
            ("an outline atomic", outline_atomic()),
        ] {
            let p = Kprobe::at(at).pre(|_, _| Action::Continue).build();
            match reg.register(&p) {
                Err(ProbeError::RefusedTarget { .. }) => {}
                other => panic!("{what} at {at:#x}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_walk_of_the_trap_path_reaches_no_c_library_function() {
        let _g = serial();
        let live = Live::global();
        let graph = refuse::trap_path(live.symbols());
        let stats = graph.stats();
        println!("{stats:?}");
        let mut foreign = Vec::new();
        for r in graph.reached() {
            let name = r.name.as_deref().unwrap_or("<no symbol>");
            println!(
                "{:#x} {name}{}",
                r.start,
                r.stopped
                    .map(|s| format!(" (stopped: {s})"))
                    .unwrap_or_default()
            );
            let rust = ["rcu_registry::", "core::", "alloc::", "std::", "<"]
                .iter()
                .any(|p| name.starts_with(p));
            // The compiler's outline atomics are part of the Rust code's
            // own instruction selection, not the C library.
            // So are the GNU linker's Cortex-A53 erratum 843419 veneers
            // (`e843419@...`): an `adrp` at a page's last slots has its
            // following load moved into a stub that branches back, placed
            // by the linker wherever the code's layout puts such an `adrp`
            // (a layout change once put one inside the uprobe hit path).
            let ours = name.starts_with("__rcu_registry_") || name.starts_with("e843419@");
            if !rust && !ours && !name.starts_with("__aarch64_") && r.stopped.is_none() {
                let path: Vec<String> = graph
                    .path_to(r.start)
                    .iter()
                    .map(|&(site, start)| {
                        let f = graph.function_at(start).and_then(|f| f.name.clone());
                        format!("{start:#x} {} (via {site:x?})", f.unwrap_or_default())
                    })
                    .collect();
                foreign.push(format!("{name}: {}", path.join(" <- ")));
            }
        }
        assert!(stats.symbols > 10, "the walk went somewhere: {stats:?}");
        assert!(
            graph.reached().iter().any(|r| r
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("__aarch64_"))),
            "the RCU read side's outline atomics are on the path"
        );
        assert!(
            foreign.is_empty(),
            "the trap path reaches C-library code: {foreign:?}"
        );
        // Everything reached is refused.
        let reg = live.registry();
        let core_fn = graph
            .reached()
            .iter()
            .find(|r| {
                r.stopped.is_none() && r.name.as_deref().is_some_and(|n| n.starts_with("core::"))
            })
            .map(|r| r.start);
        if let Some(at) = core_fn {
            let p = Kprobe::at(at).pre(|_, _| Action::Continue).build();
            assert!(matches!(
                reg.register(&p),
                Err(ProbeError::RefusedTarget { .. })
            ));
        }
    }

    /// The address of one of the compiler's outline-atomic helpers the
    /// RCU read side calls (every atomic read-modify-write goes through
    /// them on this target), found by name.
    fn outline_atomic() -> u64 {
        let syms = Live::global().symbols();
        syms.functions()
            .iter()
            .find(|f| f.name.starts_with("__aarch64_ldadd8_"))
            .map(|f| f.start)
            .expect("the binary has outline atomics")
    }
}
