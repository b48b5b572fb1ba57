//! The SIGTRAP handlers' own cost, without the signal: calls the
//! runtime's handler (and the raw one `brk_ratio` compares against)
//! directly, as a function, on a made-up frame that says a `brk` trapped
//! at a probed address, in a loop. Under qemu-user the signal delivery
//! costs both sides of `brk_ratio` the same and varies with the host's
//! load; this times only the guest code that differs, so a change to the
//! trap path shows at a few nanoseconds even on a noisy host (a
//! development tool: the figure is `brk_ratio`'s).
//!
//! Usage: `handler_cost [CALLS]` (default 200,000 per round, 7 rounds;
//! prints the median ns per call of each).

#[cfg(target_arch = "aarch64")]
fn main() {
    use live_arm64::raw_trap::with_raw_trap;
    use live_arm64::targets::{addr, la_add1, la_branch};
    use rcu_registry::probes::kprobe::{Action, Kprobe};
    use rcu_registry::probes::runtime::Live;
    use std::time::Instant;

    type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);
    /// `si_code` of a `brk` trap.
    const TRAP_BRKPT: libc::c_int = 1;
    const ROUNDS: usize = 7;

    let calls: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("CALLS: a number"))
        .unwrap_or(200_000);
    // The SIGTRAP disposition's handler.
    let current = || {
        // A null new action only reads the current one.
        // SAFETY: all-zero is a valid sigaction.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: see above; a valid out pointer.
        let r = unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut sa) };
        assert_eq!(r, 0);
        // SAFETY: both handlers are installed with the SA_SIGINFO signature.
        unsafe { std::mem::transmute::<usize, Handler>(sa.sa_sigaction) }
    };
    let reg = Live::global().registry();
    let ours = current();
    let (raw, _) = with_raw_trap(current);

    // ns per call of `h` on a frame trapped at `pc`; the PC is put back
    // before each call (the handler moves it on).
    let time = |h: Handler, pc: u64| {
        // No FP/SIMD record in the frame: the handlers read none for
        // these instructions.
        // SAFETY: all-zero is a valid siginfo and ucontext.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        let mut uc: libc::ucontext_t = unsafe { std::mem::zeroed() };
        info.si_signo = libc::SIGTRAP;
        info.si_code = TRAP_BRKPT;
        uc.uc_mcontext.sp = &uc as *const _ as u64 - 4096;
        let t = Instant::now();
        for _ in 0..calls {
            uc.uc_mcontext.pc = pc;
            h(
                libc::SIGTRAP,
                std::hint::black_box(&mut info),
                std::hint::black_box(&mut uc as *mut libc::ucontext_t).cast(),
            );
        }
        assert_ne!(uc.uc_mcontext.pc, pc, "the handler resumed elsewhere");
        t.elapsed().as_nanos() as f64 / f64::from(calls)
    };
    let mut rows = Vec::new();
    for _ in 0..ROUNDS {
        let r = time(raw, 0x1000);
        let mut row = vec![r];
        for f in [
            la_branch as unsafe extern "C" fn(u32) -> u32,
            la_add1 as unsafe extern "C" fn(u32) -> u32,
        ] {
            let at = addr(f as *const ());
            let p = Kprobe::at(at).pre(|_, _| Action::Continue).build();
            reg.register(&p).expect("register");
            row.push(time(ours, at));
            reg.unregister(&p).expect("unregister");
            assert_eq!(p.hits(), u64::from(calls));
        }
        rows.push(row);
    }
    let median = |k: usize| {
        let mut v: Vec<f64> = rows.iter().map(|r| r[k]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "ns per handler call, median of {ROUNDS} rounds of {calls}: raw {:.1}, simulated b {:.1}, boosted add {:.1}",
        median(0),
        median(1),
        median(2)
    );
}

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    println!("skipped: handler_cost measures arm64 code; run it cross-built under qemu-aarch64");
}
