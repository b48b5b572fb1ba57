//! The SIGTRAP handler's contract with the rest of the process: installed
//! once, traps that are not ours reach the handler that was there before,
//! an unclaimed `int3` keeps its default (fatal) behaviour, and `errno`
//! survives a trap.
//!
//! A test binary of its own: it installs a handler *before* the runtime's.

mod runtime_support;

use std::arch::asm;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use rcu_registry::probes::runtime;
use runtime_support::serial;

static PREVIOUS_CALLS: AtomicU64 = AtomicU64::new(0);
static PREVIOUS_CODE: AtomicI32 = AtomicI32::new(0);

extern "C" fn previous_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    PREVIOUS_CALLS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the kernel passes a valid siginfo.
    PREVIOUS_CODE.store(unsafe { (*info).si_code }, Ordering::SeqCst);
    // A careless previous handler: clobbers errno. The runtime's handler
    // must still give the interrupted code its errno back.
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() = libc::EIO };
}

/// Installs `previous_handler`, then the runtime's (once per process).
fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with an SA_SIGINFO handler of the right
        // signature.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = previous_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0);
        }
        runtime::install();
    });
}

#[test]
fn installing_twice_keeps_one_handler() {
    let _g = serial();
    setup();
    runtime::install();
    assert!(runtime::is_installed());
}

#[test]
fn a_signal_sent_by_a_process_goes_to_the_previous_handler() {
    let _g = serial();
    setup();
    let before = PREVIOUS_CALLS.load(Ordering::SeqCst);
    // SAFETY: raise is always safe to call.
    unsafe { libc::raise(libc::SIGTRAP) };
    assert_eq!(PREVIOUS_CALLS.load(Ordering::SeqCst), before + 1);
    assert!(
        PREVIOUS_CODE.load(Ordering::SeqCst) <= 0,
        "sent by a process"
    );
}

#[test]
fn an_int3_nobody_owns_goes_to_the_previous_handler() {
    let _g = serial();
    setup();
    let before = PREVIOUS_CALLS.load(Ordering::SeqCst);
    // SAFETY: the trap is handled by `previous_handler`, which returns; the
    // kernel reports the IP after the int3, so execution simply continues.
    unsafe { asm!("int3") };
    assert_eq!(PREVIOUS_CALLS.load(Ordering::SeqCst), before + 1);
    assert_eq!(PREVIOUS_CODE.load(Ordering::SeqCst), 0x80, "SI_KERNEL");
}

#[test]
fn errno_survives_a_trap_through_the_handler() {
    let _g = serial();
    setup();
    // SAFETY: errno is this thread's; the int3 goes to `previous_handler`.
    unsafe {
        *libc::__errno_location() = libc::EDOM;
        asm!("int3");
        assert_eq!(*libc::__errno_location(), libc::EDOM);
    }
}

const CHILD_ENV: &str = "RCU_REGISTRY_UNCLAIMED_INT3_CHILD";

#[test]
fn an_unclaimed_int3_without_a_previous_handler_still_kills_with_sigtrap() {
    if std::env::var_os(CHILD_ENV).is_some() {
        // The child: default disposition, then our handler, then an int3
        // nobody claims. This must terminate the process by SIGTRAP.
        // SAFETY: resets SIGTRAP to the default before installing ours.
        unsafe { libc::signal(libc::SIGTRAP, libc::SIG_DFL) };
        // No core dump file from the test.
        let lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) };
        runtime::install();
        // SAFETY: the point of the test: this kills the process.
        unsafe { asm!("int3") };
        std::process::exit(0);
    }
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_unclaimed_int3_without_a_previous_handler_still_kills_with_sigtrap",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap()
        .status;
    assert_eq!(status.signal(), Some(libc::SIGTRAP), "{status:?}");
}
