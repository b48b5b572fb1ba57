//! The runtime's signal handlers leave a thread's XINUSE x87 bit as the
//! thread had it (`runtime/x87_state.rs`): the kernel marks x87 state in
//! use at every signal return, which sent every mid-function optimized probe
//! of a process the trap path had served through the full `xsave64`. A
//! plain handler's signal is the control: it sets the bit. Then a trap-path
//! hit and the quiescence signal of an optimizer pass each clear it again
//! when the x87 state is unused; a thread whose x87 stack holds a value
//! keeps the bit and the value.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::arch::global_asm;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::probes::runtime::Live;

global_asm!(
    ".pushsection .text.x87_state_functions,\"ax\",@progbits",
    ".p2align 4",
    ".globl xs_trap",
    ".type xs_trap,@function",
    "xs_trap:",
    "mov eax, edi",
    "add eax, 1",
    "ret",
    ".size xs_trap, . - xs_trap",
    ".p2align 4",
    ".globl xs_jump",
    ".type xs_jump,@function",
    "xs_jump:",
    "mov eax, edi",
    "add eax, 2",
    "ret",
    ".size xs_jump, . - xs_jump",
    ".popsection",
);

extern "C" {
    fn xs_trap(x: u32) -> u32;
    fn xs_jump(x: u32) -> u32;
}

/// XINUSE (`xgetbv` with ECX = 1), or `None` where the processor cannot
/// report it.
fn xinuse() -> Option<u64> {
    let leaf1 = core::arch::x86_64::__cpuid(1);
    if leaf1.ecx & (1 << 27) == 0 || core::arch::x86_64::__cpuid_count(0xd, 1).eax & 4 == 0 {
        return None;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: OSXSAVE is set and XGETBV with ECX = 1 is supported (checked
    // above); it only reads a register.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 1, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    Some(u64::from(hi) << 32 | u64::from(lo))
}

fn x87_in_use() -> bool {
    xinuse().expect("checked by the test") & 1 != 0
}

/// Puts this thread's x87 state in its initial configuration and XINUSE's
/// x87 bit to 0: `xrstor64` of the x87 component from a header that says
/// it is in its initial state.
fn init_x87() {
    #[repr(C, align(64))]
    struct Area([u8; 576]);
    let area = Area([0; 576]);
    // SAFETY: a 64-byte aligned standard-format area whose header (bytes
    // 512..576) is all zero: XSTATE_BV = 0, XCOMP_BV = 0, valid; the
    // component mask (EDX:EAX = 1) restores x87 only, to its initial state.
    unsafe {
        core::arch::asm!("xrstor64 [{a}]", a = in(reg) area.0.as_ptr(),
            in("eax") 1, in("edx") 0, options(nostack, readonly));
    }
    assert!(!x87_in_use(), "xrstor of an init header leaves x87 unused");
}

static PLAIN_SIGNALS: AtomicU64 = AtomicU64::new(0);

extern "C" fn plain_handler(_: libc::c_int) {
    PLAIN_SIGNALS.fetch_add(1, Ordering::Relaxed);
}

/// A signal with a plain handler on this thread (the control: the kernel
/// marks x87 in use at its return).
fn plain_signal() {
    // SAFETY: installs a handler that only counts; SIGUSR1 is not used by
    // the runtime; `raise` runs it on this thread before returning.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            plain_handler as *const () as libc::sighandler_t,
        );
        libc::raise(libc::SIGUSR1);
    }
}

fn addr(f: unsafe extern "C" fn(u32) -> u32) -> u64 {
    f as usize as u64
}

#[test]
fn the_runtimes_signals_leave_an_unused_x87_state_unused() {
    if xinuse().is_none() {
        println!("skipped: the processor cannot report XINUSE (xgetbv with ECX = 1)");
        return;
    }
    let live = Live::global();
    let reg = live.registry();

    // The control: a plain signal marks x87 in use (what the runtime undoes).
    init_x87();
    plain_signal();
    assert!(PLAIN_SIGNALS.load(Ordering::Relaxed) >= 1);
    let kernel_sets_it = x87_in_use();
    println!("the kernel marks x87 in use at a plain signal's return: {kernel_sets_it}");

    // A trap-path hit: the SIGTRAP handler's return leaves it unused.
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    let p = Kprobe::at(addr(xs_trap))
        .pre(move |_, _| {
            h.fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })
        .build();
    p.set_jump_opt_out(true);
    reg.register(&p).unwrap();
    plain_signal();
    // SAFETY: a complete C-ABI function.
    assert_eq!(unsafe { xs_trap(41) }, 42);
    assert_eq!(hits.load(Ordering::Relaxed), 1, "the trap path ran");
    assert!(
        !x87_in_use(),
        "x87 marked in use after a trap-path hit on a thread that does not use it"
    );

    // A thread with a value on the x87 stack keeps it, and the bit.
    let kept: f64;
    // SAFETY: pushes 1.0 on the x87 stack, calls the probed function (one
    // trap) and pops the value into `kept`: the stack is balanced, and the
    // called function touches no x87 state. Its scratch registers are
    // declared clobbered.
    unsafe {
        let mut out = 0f64;
        core::arch::asm!(
            "fld1",
            "mov edi, 1",
            "call {f}",
            "fstp qword ptr [r12]",
            f = sym xs_trap,
            // Callee-saved: the call keeps it.
            in("r12") &mut out,
            clobber_abi("C"),
        );
        kept = out;
    }
    assert_eq!(kept, 1.0, "the x87 stack survived the trap");
    assert_eq!(hits.load(Ordering::Relaxed), 2);
    reg.unregister(&p).unwrap();

    // The quiescence signal of an optimizer pass, on another thread whose
    // x87 state is unused but marked in use by a plain signal: the pass
    // signals every thread, and that thread's bit is clear afterwards.
    let (ready_tx, ready_rx) = mpsc::channel::<bool>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        init_x87();
        plain_signal();
        ready_tx.send(x87_in_use()).unwrap();
        go_rx.recv().unwrap();
        x87_in_use()
    });
    let marked_before = ready_rx.recv().unwrap();
    let q = Kprobe::at(addr(xs_jump))
        .pre(|_, _| Action::Continue)
        .build();
    reg.register(&q).unwrap();
    let r = live.optimize_now();
    assert!(live.is_optimized(&q), "xs_jump optimized: {r:?}");
    go_tx.send(()).unwrap();
    let marked_after = other.join().unwrap();
    // SAFETY: a complete C-ABI function.
    assert_eq!(unsafe { xs_jump(1) }, 3);
    reg.unregister(&q).unwrap();
    assert_eq!(marked_before, kernel_sets_it, "the other thread's control");
    assert!(
        !marked_after,
        "x87 marked in use after the quiescence signal on a thread that does not use it"
    );
}
