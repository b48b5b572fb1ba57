//! What the live runtime takes from the platform, checked where the suite
//! runs (natively, or under qemu-aarch64): a breakpoint arrives as SIGTRAP
//! with an editable frame, threads run, and the RCU domains work.

use live_arm64::raw_trap::{trap_once, with_raw_trap};
use live_arm64::rcu_checks;
use rcu_registry::__internals::rcu::{force_membarrier_fallback, membarrier_in_use};
use rcu_registry::rcu::{Rcu, Srcu};

/// The tests that trap share the process's SIGTRAP disposition.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_breakpoint_traps_once_and_resumes_after_itself() {
    let _g = serial();
    let ((), traps) = with_raw_trap(|| {
        for _ in 0..100 {
            trap_once();
        }
    });
    assert_eq!(traps, 100);
}

// The RCU checks (`live_arm64::rcu_checks`) with `membarrier` as the
// kernel offers it; `tests/rcu_fallback.rs` runs them without.

#[test]
fn a_grace_period_waits_for_a_reader_that_began_before_it() {
    rcu_checks::a_grace_period_waits_for_a_reader_that_began_before_it(Rcu::global());
    rcu_checks::a_grace_period_waits_for_a_reader_that_began_before_it(&Srcu::new());
}

#[test]
fn readers_on_other_threads_and_an_updater_run_every_callback() {
    rcu_checks::readers_on_other_threads_and_an_updater_run_every_callback(Rcu::global());
    rcu_checks::readers_on_other_threads_and_an_updater_run_every_callback(&Srcu::new());
}

#[test]
fn the_domains_use_membarrier_where_the_kernel_has_it() {
    Rcu::global().synchronize();
    // Under qemu-user the host kernel answers (see docs/limitations, "arm64
    // under qemu"): this is what makes `rcu_fallback.rs` necessary.
    let has_it = {
        // SAFETY: membarrier(QUERY, 0, 0) reads nothing from memory.
        let mask = unsafe { libc::syscall(libc::SYS_membarrier, 0, 0, 0) };
        mask > 0 && mask & (1 << 3) != 0
    };
    assert_eq!(membarrier_in_use(), has_it);
    if has_it {
        // Too late for the test-only fallback (`rcu_fallback.rs` forces it
        // first thing): refused, nothing changed.
        assert!(!force_membarrier_fallback());
        assert!(membarrier_in_use());
        Rcu::global().synchronize();
        assert!(membarrier_in_use());
    }
}

/// The FP/SIMD record of an arm64 signal frame, as the runtime reads it
/// (`rcu_registry::probes::runtime::fpsimd`): a raw SIGTRAP handler finds
/// the value a `brk` left in `v0`, with the record's magic and size.
#[cfg(target_arch = "aarch64")]
#[test]
fn the_fpsimd_record_of_a_trap_frame_holds_the_vector_registers() {
    use rcu_registry::probes::runtime::{fpsimd, FpSimd};
    use std::sync::Mutex;

    let _g = serial();
    static SEEN: Mutex<Option<FpSimd>> = Mutex::new(None);
    extern "C" fn handler(_s: libc::c_int, _i: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
        let uc = unsafe { &mut *uctx.cast::<libc::ucontext_t>() };
        // try_lock: never blocks in a signal handler (the test holds no lock
        // while it traps).
        if let Ok(mut s) = SEEN.try_lock() {
            *s = fpsimd(uc);
        }
        uc.uc_mcontext.pc += 4;
    }
    // SAFETY: as in `raw_trap::with_raw_trap`.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = handler as *const () as usize;
    new.sa_flags = libc::SA_SIGINFO;
    // SAFETY: see above.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    assert_eq!(unsafe { libc::sigaction(libc::SIGTRAP, &new, &mut old) }, 0);
    let lo: u64 = 0x0123_4567_89ab_cdef;
    let hi: u64 = 0xfedc_ba98_7654_3210;
    // SAFETY: sets v0 and v7 (declared clobbered) and traps; the handler
    // steps over the `brk`.
    unsafe {
        std::arch::asm!(
            "fmov d0, {lo}",
            "mov v0.d[1], {hi}",
            "fmov d7, {hi}",
            "brk #0x7",
            lo = in(reg) lo,
            hi = in(reg) hi,
            out("v0") _,
            out("v7") _,
        );
    }
    // SAFETY: puts back the disposition read above.
    assert_eq!(
        unsafe { libc::sigaction(libc::SIGTRAP, &old, std::ptr::null_mut()) },
        0
    );
    let seen = SEEN
        .lock()
        .unwrap()
        .expect("the frame has an FP/SIMD record");
    assert_eq!(seen.v[0], u128::from(hi) << 64 | u128::from(lo));
    assert_eq!(seen.v[7] as u64, hi);
}
