//! The SIGTRAP handler: installed once, chained to whatever was there.
//!
//! # Installation
//!
//! [`install`] runs once per process: it reads the current SIGTRAP
//! disposition, keeps it as the *previous* one, and installs ours with
//!
//! - `SA_SIGINFO`: we need `si_code` (an `int3`, a probe's or a step
//!   marker's, is `SI_KERNEL`; a trap-flag step is `TRAP_TRACE`) and the
//!   `ucontext_t` to read and change registers;
//! - `SA_NODEFER`: SIGTRAP stays unblocked while our handler runs, so a
//!   probe hit inside a probe handler traps again (and is counted missed by
//!   the registry) instead of killing the process: the kernel treats a
//!   synchronous trap whose signal is blocked as fatal;
//! - a mask of every *asynchronous* signal: nothing but another trap can
//!   interrupt dispatch, so per-thread state needs no further protection.
//!   The synchronous fault signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE) stay
//!   unblocked for the same reason as SIGTRAP;
//! - no `SA_ONSTACK`: the handler runs on the interrupted thread's own stack
//!   (below the red zone). Rust's alternate signal stacks are a few pages,
//!   sized for reporting a stack overflow, not for running probe handlers
//!   and nested traps.
//!
//! # Dispatch
//!
//! - `SI_KERNEL` (an `int3`): if it is the step marker of the innermost
//!   single-step in flight on this thread, that step is completed; otherwise
//!   the attached dispatchers get the trap in turn (see `dispatch.rs`). If
//!   none claims it, the `int3` may be a transient one: a multi-byte patch
//!   in progress at that address, or a breakpoint removed after the thread
//!   trapped on it (the byte is no longer `int3`). Either way the thread is
//!   resumed *at* the address to run whatever is there now.
//! - `TRAP_TRACE` (the trap flag): the innermost single-step in flight on
//!   this thread, if it is a trap-flag step, is completed.
//! - Anything else, or a trap nobody claims: the previous disposition,
//!   after the frame is fixed if the thread trapped at the start of a
//!   displaced instruction's copy in an XOL slot (`faults.rs`, which also
//!   handles SIGSEGV, SIGBUS, SIGFPE and SIGILL the same way).
//!
//! The handler raises the thread's trap flag before anything else
//! (`in_trap.rs`): a trap that finds it up is nested in the runtime's own
//! work and takes the missed path, which calls no C-library function. The
//! outer handler saves and restores `errno` (handlers may change it) and
//! allocates nothing itself.
//!
//! # Chaining
//!
//! A previous handler is called with the same arguments (`SA_SIGINFO`) or
//! the signal number. A previous `SIG_DFL` is reproduced exactly: the
//! default disposition is restored and the signal re-raised, so an unknown
//! `int3` still terminates the process with a core dump. `SIG_IGN` ignores
//! only signals sent by a process (`kill`); for a trap the kernel itself
//! would have overridden the ignore and killed the process, so that is done.
//!
//! # Limitation: threads that block SIGTRAP
//!
//! A thread that blocks SIGTRAP (`pthread_sigmask`) and runs into a probe
//! is killed by the kernel (a blocked synchronous trap is fatal). Linux's
//! own uprobes have no such restriction; ours need SIGTRAP deliverable on
//! every thread that may run probed code.

use crate::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Once;

use super::context::{with_frame_regs, ThreadMemory};
use super::dispatch::dispatch_breakpoint;
#[cfg(target_arch = "x86_64")]
use super::dispatch::dispatch_step;
use super::in_trap::TrapScope;
use super::trap_thread::{self, TrapThread};
use crate::probes::arch::Regs;
use crate::probes::ProbeError;
use crate::rcu::{Rcu, TrapReader};

/// `si_code` of a SIGTRAP raised by `int3` (`SEND_SIG_PRIV`).
#[cfg(target_arch = "x86_64")]
const SI_KERNEL: libc::c_int = 0x80;
/// `si_code` of a SIGTRAP raised by the trap flag.
#[cfg(target_arch = "x86_64")]
const TRAP_TRACE: libc::c_int = 2;
/// `si_code` of a SIGTRAP raised by `brk` (arm64 Linux and qemu-user alike;
/// the PC in the frame is the `brk`'s own address).
#[cfg(target_arch = "aarch64")]
const TRAP_BRKPT: libc::c_int = 1;

static INSTALL: Once = Once::new();

/// The disposition found at installation: a leaked box, written once before
/// our handler is installed.
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// The handler's own address (for refusing it as a probe target).
pub(crate) fn handler_address() -> u64 {
    handle_sigtrap as *const () as usize as u64
}

/// Installs the runtime's SIGTRAP handler, once per process.
pub fn install() {
    INSTALL.call_once(|| {
        // Initialised here so that the handler never initialises them.
        let _ = crate::rcu::Rcu::global();
        // SAFETY: all-zero is a valid (empty) sigaction; sigaction(2) with a
        // null new action only reads the current one into `old`.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        let ok = unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut old) } == 0;
        assert!(ok, "sigaction(SIGTRAP) query failed");
        // Release pairs with the Acquire load in `chain`.
        PREVIOUS.store(Box::into_raw(Box::new(old)), Ordering::Release);

        // SAFETY: as above for `zeroed`; the mask functions only write the
        // mask inside `new`.
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction = handle_sigtrap as *const () as usize;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        // SAFETY: see above.
        unsafe {
            libc::sigfillset(&mut new.sa_mask);
            for sync_sig in [
                libc::SIGTRAP,
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGILL,
                libc::SIGFPE,
            ] {
                libc::sigdelset(&mut new.sa_mask, sync_sig);
            }
        }
        // SAFETY: all-zero is a valid sigaction, filled by the call below.
        let mut replaced: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: `new` is a fully initialised sigaction whose handler has
        // the SA_SIGINFO signature.
        let ok = unsafe { libc::sigaction(libc::SIGTRAP, &new, &mut replaced) } == 0;
        assert!(ok, "sigaction(SIGTRAP) install failed");
        if replaced.sa_sigaction != old.sa_sigaction || replaced.sa_flags != old.sa_flags {
            // Someone changed it between our two calls: chain to theirs.
            // The first box is leaked (a handler may be reading it).
            // Release: as for the first store.
            PREVIOUS.store(Box::into_raw(Box::new(replaced)), Ordering::Release);
        }
        // The synchronous fault signals, for faults in XOL slots (`faults.rs`).
        super::faults::install();
    });
}

/// Whether our handler is the current SIGTRAP disposition.
pub fn is_installed() -> bool {
    // SAFETY: sigaction with a null new action only reads into `cur`.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut cur) };
    cur.sa_sigaction == handler_address() as usize
}

/// The signal-return trampoline (`__restore_rt`) the C library registered
/// with our handler, if it reports one: code that must never be patched.
#[cfg(target_arch = "x86_64")] // arm64 returns through the vDSO's trampoline
pub(crate) fn restorer_address() -> Option<u64> {
    install();
    // SAFETY: as in `is_installed`.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut cur) };
    cur.sa_restorer.map(|f| f as usize as u64)
}

/// The SIGTRAP handler: raises the thread's trap flag first (`in_trap.rs`),
/// before anything else runs. A trap that finds it up already is nested in
/// the runtime's own work and takes the missed path. The thread's trap
/// state (`trap_thread.rs`) is reached here, once, and handed down.
extern "C" fn handle_sigtrap(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uctx: *mut libc::c_void,
) {
    trap_thread::with(|t| match TrapScope::enter_on(t) {
        // The outer handling adopts the scope and lowers the flag last
        // (`TrapScope::adopt`): its call is then this handler's last act,
        // a tail call on arm64 (no frame here and one return fewer per
        // trap; under qemu-user every return is a lookup of translated
        // code).
        Some(scope) => {
            std::mem::forget(scope);
            handle_outer_trap(sig, info, uctx, t)
        }
        None => handle_nested_trap(sig, info, uctx, t),
    });
    // The frame's x87 state marked unused if it is, so that the return
    // leaves XINUSE's x87 bit clear (`x87_state.rs`: the jump stubs' fast
    // path depends on it).
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the ucontext the kernel passed us, ours alone.
    unsafe {
        super::x87_state::settle_x87(uctx.cast())
    };
}

/// A trap on a thread that was not handling one: runs with the trap flag
/// up, so it may call the C library (a probe hit there is a nested trap).
/// The call-graph walk stops here (`callgraph/flag_up.rs`); what it shares
/// with the nested path (`dispatch`) is walked from
/// [`handle_nested_trap`].
///
/// `t` is the calling thread's trap state: a pointer, as the function is
/// `extern "C"` (no unwinding out of it), to the block the caller reached.
/// The caller raised the trap flag there and hands its scope over: this
/// lowers the flag, last.
#[inline(never)]
extern "C" fn handle_outer_trap(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uctx: *mut libc::c_void,
    t: *const TrapThread,
) {
    // The block is a `const` thread-local without a destructor: it lives as
    // long as the thread.
    // SAFETY: the calling thread's own trap state, live (see above).
    let t = unsafe { &*t };
    // The flag the caller raised and handed over: lowered when this
    // returns, after everything below (declared first, dropped last).
    let _scope = TrapScope::adopt(t);
    let errno_at = super::in_trap::record_errno_location(t);
    // SAFETY: this thread's errno, valid for the thread's life.
    let errno = unsafe { *errno_at };
    // The trap path reads without arming the `Rcu` slot's release at
    // thread exit (a C-library call); arm it here, and keep the reader for
    // the dispatch's read section.
    let reader = Rcu::arm_trap_reader();
    // Probe handlers run inside `dispatch`: a panic there must not unwind
    // out of a signal handler.
    let handled = abort_on_panic(HANDLER_PANIC_IN_TRAP, || {
        // SAFETY: the kernel passes a valid siginfo and ucontext for an
        // SA_SIGINFO handler, live for the duration of the call.
        unsafe { dispatch(&*info, &mut *uctx.cast::<libc::ucontext_t>(), t, reader) }
    });
    if !handled {
        // SAFETY: as above; same arguments as we received.
        unsafe { unclaimed(sig, info, uctx) };
    }
    // SAFETY: see above.
    unsafe { *errno_at = errno };
}

/// A trap nested in the runtime's own trap handling (the flag was up): the
/// missed path. The registry's handler flag is forced up, so a hit runs no
/// handler, counts `nmissed` and completes its displaced instruction. This
/// and everything it calls must call no C-library function (the walk
/// proves it): a probe there would trap here again, forever. `errno` is
/// untouched by the raw system calls; it is saved around a chained
/// handler through the location the outer trap recorded.
#[inline(never)]
extern "C" fn handle_nested_trap(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uctx: *mut libc::c_void,
    t: *const TrapThread,
) {
    // SAFETY: as in `handle_outer_trap`.
    let t = unsafe { &*t };
    let missed = super::in_trap::nested();
    // The reader claimed without the C library (it may not be armed yet:
    // a trap nested in the outer one's arming).
    let reader = Rcu::trap_reader();
    // SAFETY: as in `handle_outer_trap`.
    let handled = unsafe { dispatch(&*info, &mut *uctx.cast::<libc::ucontext_t>(), t, reader) };
    drop(missed);
    if !handled {
        let errno_at = super::in_trap::errno_location(t);
        // SAFETY: a location recorded by this thread's outer trap: its errno.
        let errno = errno_at.map(|p| unsafe { *p });
        // SAFETY: as above; same arguments as we received.
        unsafe { unclaimed(sig, info, uctx) };
        if let (Some(p), Some(e)) = (errno_at, errno) {
            // SAFETY: see above.
            unsafe { *p = e };
        }
    }
}

/// A trap no probe claims: raised by a displaced instruction in its slot,
/// it is reported at the probed address (`faults.rs`); then chained.
///
/// # Safety
/// The arguments are the ones the kernel passed to our handler.
#[inline]
unsafe fn unclaimed(sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // SAFETY: the caller's contract: a valid ucontext.
    super::faults::fix_frame(unsafe { &mut *uctx.cast::<libc::ucontext_t>() });
    // SAFETY: the caller's contract.
    unsafe { chain(sig, info, uctx) };
}

/// Handles the trap if it is ours; false to chain. Inlined into both
/// handlers (one call less on every trap); the outer one's copy is covered
/// by its refusal as flag-up code, the nested one's by the walk.
/// `t` and `reader` are the thread's trap state and `Rcu` reader, reached
/// by the caller.
#[inline(always)]
fn dispatch(
    info: &libc::siginfo_t,
    uc: &mut libc::ucontext_t,
    t: &TrapThread,
    reader: TrapReader,
) -> bool {
    // Inlined, though both handlers call it: out of line, it cost every
    // trap a call, a return and the spills around them.
    with_frame_regs(
        uc,
        #[inline(always)]
        |regs| dispatch_regs(info, regs, t, reader),
    )
}

/// [`dispatch`] on the frame's registers: false (the registers unchanged)
/// to chain.
#[inline(always)]
fn dispatch_regs(
    info: &libc::siginfo_t,
    regs: &mut Regs,
    t: &TrapThread,
    reader: TrapReader,
) -> bool {
    // A displaced instruction a dispatcher could not complete aborts the
    // process inside the dispatch (`dispatch.rs`, `failed`).
    let mut mem = ThreadMemory;
    #[cfg(target_arch = "aarch64")]
    match info.si_code {
        // A probe's `brk` or a step marker: arm64 steps only to markers.
        // Unclaimed, it is resumed at the same address (the PC already
        // is) if the `brk` is gone: whatever replaced it runs.
        TRAP_BRKPT => {
            dispatch_breakpoint(regs.ip, regs, &mut mem, t, reader) || transient_breakpoint(regs.ip)
        }
        _ => false,
    }
    #[cfg(target_arch = "x86_64")]
    match info.si_code {
        SI_KERNEL => {
            if dispatch_breakpoint(regs.ip.wrapping_sub(1), regs, &mut mem, t, reader) {
                return true;
            }
            let addr = regs.ip.wrapping_sub(1);
            if !transient_breakpoint(addr) {
                return false;
            }
            regs.ip = addr;
            true
        }
        TRAP_TRACE => dispatch_step(regs, &mut mem, t),
        _ => false,
    }
}

/// Whether an unclaimed `int3` at `addr` is one of ours that is gone or
/// transient (see the module docs).
#[cfg(target_arch = "x86_64")]
#[cold]
fn transient_breakpoint(addr: u64) -> bool {
    crate::probes::runtime::in_process::PATCH_WINDOW.transient_int3_at(addr, || {
        let mut byte = [0u8];
        match crate::probes::runtime::in_process::read_text(addr, &mut byte) {
            Ok(()) => Some(byte[0]),
            Err(e) => {
                // Not dropped (its drop glue can reach `free`; see `dispatch`).
                std::mem::forget(e);
                None
            }
        }
    })
}

/// Whether an unclaimed `brk` at `addr` is gone: the word there is no
/// longer a `brk` (a breakpoint removed after the thread trapped on it).
/// arm64 writes every instruction whole, with one store, so there is no
/// patch in progress to wait out as on x86_64: the word is old or new.
#[cfg(target_arch = "aarch64")]
#[cold]
fn transient_breakpoint(addr: u64) -> bool {
    /// `brk #imm16`: `0xd4200000 | imm16 << 5`.
    const BRK_MASK: u32 = 0xffe0_001f;
    const BRK_BASE: u32 = 0xd420_0000;
    let mut word = [0u8; 4];
    match crate::probes::runtime::in_process::read_text(addr, &mut word) {
        Ok(()) => u32::from_le_bytes(word) & BRK_MASK != BRK_BASE,
        Err(e) => {
            // Not dropped (its drop glue can reach `free`; see `dispatch`).
            std::mem::forget(e);
            false
        }
    }
}

/// Hands the signal to the disposition found at installation.
///
/// # Safety
/// The arguments are the ones the kernel passed to our handler.
#[cold]
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // Acquire pairs with the Release store in `install`.
    let prev = PREVIOUS.load(Ordering::Acquire);
    if prev.is_null() {
        default_action(sig);
        return;
    }
    // SAFETY: PREVIOUS points to a leaked, never-modified sigaction.
    let prev = unsafe { &*prev };
    // SAFETY: `info` is valid for the call (our caller's contract).
    let from_kernel = unsafe { (*info).si_code } > 0;
    match prev.sa_sigaction {
        libc::SIG_DFL => default_action(sig),
        libc::SIG_IGN => {
            if from_kernel {
                default_action(sig);
            }
        }
        h if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the previous owner installed `h` with the SA_SIGINFO
            // signature; we call it as the kernel would have.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(h) };
            f(sig, info, uctx);
        }
        h => {
            // SAFETY: a handler installed without SA_SIGINFO takes the signal
            // number only.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
            f(sig);
        }
    }
}

/// The default action of `sig` (terminate with a core dump for SIGTRAP):
/// restore `SIG_DFL` and re-raise, with raw system calls (the nested trap
/// path calls no C library). SIGTRAP is not blocked here (`SA_NODEFER`),
/// so the re-raised signal is delivered when the handler returns to user
/// space, if not at once.
#[cold]
fn default_action(sig: libc::c_int) {
    crate::sys::set_default_disposition(sig);
    crate::sys::tgkill(crate::sys::getpid(), crate::sys::gettid(), sig);
}

/// A fixed buffer for formatting messages without allocating.
struct StackBuf {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Reports a displaced instruction that could not be completed and aborts
/// (resuming would trap on the same breakpoint forever).
#[cold]
pub(super) fn fatal(ip: u64, e: &ProbeError) -> ! {
    use std::fmt::Write as _;
    let mut out = StackBuf {
        buf: [0; 512],
        len: 0,
    };
    let _ = writeln!(
        out,
        "rcu-registry: probe hit at {ip:#x} could not complete the displaced instruction: {e}"
    );
    write_stderr(&out.buf[..out.len]);
    crate::sys::abort()
}

/// The abort message of a handler that panicked in the SIGTRAP handler.
pub(crate) const HANDLER_PANIC_IN_TRAP: &str =
    "rcu-registry: a probe handler panicked inside the SIGTRAP handler; a panic \
     cannot unwind out of a signal handler, so the process aborts (see the \
     handler contract: rcu_registry::docs::patterns)";

/// Runs `f`, which runs probe handlers where unwinding cannot go on (the
/// SIGTRAP handler, the kretprobe trampoline). If a handler panics, the panic
/// hook has already run (the panic's message is on stderr); this then writes
/// `msg`, naming the cause, and aborts, without dropping the payload and
/// before the unwinder reaches a frame it cannot cross (the signal frame, the
/// trampoline without unwind information). A plain drop guard is not enough:
/// the unwinder's search phase must find a catching frame, or it gives up
/// with "failed to initiate panic" and never runs the guard.
/// Async-signal-safe on the path that aborts (`write` and `abort`).
#[inline(always)]
pub(crate) fn abort_on_panic<R>(msg: &'static str, f: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            // Dropping the payload could run arbitrary code: leak it.
            std::mem::forget(payload);
            fatal_message(msg)
        }
    }
}

/// Writes `msg` to stderr and aborts (`SIGABRT`). Async-signal-safe, and
/// runs no C-library code: a probe on `write` or `abort` must not fire here
/// (raw system calls of `crate::sys`).
#[cold]
pub(crate) fn fatal_message(msg: &str) -> ! {
    write_stderr(msg.as_bytes());
    write_stderr(b"\n");
    crate::sys::abort()
}

/// A short or failed write only loses part of a diagnostic.
fn write_stderr(bytes: &[u8]) {
    crate::sys::write(2, bytes);
}
