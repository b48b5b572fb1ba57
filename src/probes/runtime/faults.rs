//! Faults of displaced instructions: SIGSEGV, SIGBUS, SIGFPE and SIGILL
//! raised while a thread runs an XOL slot are reported at the probed
//! address, as Linux reports a uprobe's (`arch_uprobe_xol_was_trapped`,
//! `arch_uprobe_abort_xol`).
//!
//! # Why
//!
//! A probed instruction that faults in place faults in its slot too, and an
//! application that recovers from the fault (a JIT, a WebAssembly runtime)
//! reads the faulting IP from the signal frame to know where it was. Without
//! these handlers it would see the slot's address; a single-step would also
//! stay in flight forever (the thread never reaches the step trap), so
//! `unregister` would wait for it and, nine recoveries later, the next hit
//! would find the thread's step stack full.
//!
//! # What the handlers do
//!
//! [`claim`] installs one handler for the four signals, chained to the
//! disposition it replaces. On a signal:
//!
//! 0. A SIGSEGV or SIGBUS raised by the runtime's own text load or store
//!    ([`poke`](super::poke): a write batch's breakpoint, the text unmapped
//!    under it by a `dlclose`) resumes at that instruction's failure exit
//!    and is not delivered anywhere: it is the runtime's error to report.
//! 1. If this thread's innermost single-step in flight is at the start of
//!    its copy in the slot (the instruction did not complete), the step is
//!    abandoned: the dispatcher undoes the pre-step fixups (the scratch
//!    register of a RIP-relative rewrite, the trap flag), the IP becomes the
//!    probed address, the step's token is dropped (nothing counted in flight:
//!    `unregister` does not wait for it) and the step is popped (the nesting
//!    depth is back to what it was before the hit). No post handler runs,
//!    as for the kernel's aborted step.
//! 2. Else, if the IP is the start of a slot this thread was recently sent
//!    into for a boosted run (the SIGTRAP handler remembers its last eight,
//!    `dispatch.rs`), the IP becomes the probed address (a boosted copy has
//!    no fixups, so nothing else changed).
//! 3. The signal goes to the disposition found when the handler was (re)
//!    installed, with the (fixed) frame, as the kernel would deliver it:
//!    - a handler: called with the same `siginfo` and `ucontext`
//!      (`SA_SIGINFO`) or the signal number, under the signal mask the kernel
//!      would have set (interrupted mask, its `sa_mask`, the signal itself
//!      unless `SA_NODEFER`); `SA_RESETHAND` makes the recorded disposition
//!      `SIG_DFL` first. It may return (resume at the probed address, which
//!      runs the probe again, as a uprobe does), change the frame, or
//!      `siglongjmp` out;
//!    - `SIG_DFL`, or `SIG_IGN` for a fault the kernel raised (which the
//!      kernel never ignores): the process dies of the signal with the fixed
//!      frame: the default disposition is restored, the signal is queued to
//!      this thread with the same `siginfo` while blocked, and unblocked in
//!      the frame, so it is delivered as the frame is restored: the core dump
//!      shows the probed address. A handler that restores `SIG_DFL` and
//!      returns to re-fault (Rust's own stack-overflow handler does) gets the
//!      same treatment after a fixed frame, instead of re-running the probe
//!      into a fault in the slot.
//!
//! A fault elsewhere (no slot involved) is chained unchanged. A SIGTRAP that
//! no probe claims gets steps 1 and 2 before the SIGTRAP handler chains it.
//!
//! # Handlers installed after ours
//!
//! An application that installs its own handler for one of these signals
//! after the runtime replaces ours, and would see slot addresses again. The
//! runtime re-checks at every registration that takes an XOL slot (the
//! only probes that run instructions out of line) and whenever the
//! application calls [`claim`] (call it after installing such a handler if
//! probes are already registered): a foreign disposition found there is
//! recorded and ours goes back on top, chaining to it. `sigaction` itself
//! is not interposed (a library cannot do that reliably: the C library, the
//! Rust runtime and other libraries call it internally). The limits:
//!
//! - a handler installed after the last registration and no `claim` sees
//!   slot addresses (and a stepped fault leaks its step) until the next one;
//! - the application's `sigaction` query returns our handler, not its own;
//!   a handler that chains to the `oldact` it got (ours) is detected (same
//!   frame, deeper stack) and that nested call goes to the disposition found
//!   at the first installation, skipping any handler recorded in between;
//! - a thread that blocks the signal when it faults is killed by the kernel
//!   without running any handler (a blocked synchronous fault is fatal);
//! - ours runs on the alternate signal stack exactly when the disposition it
//!   replaced asked for it (`SA_ONSTACK`), so the chained handler runs on the
//!   stack it expects.
//!
//! Async-signal-safe: no allocation, no lock; the system calls are
//! `sigaction`, `sigprocmask` and (to die of the signal) `rt_tgsigqueueinfo`.

use crate::sync::atomic::{AtomicPtr, Ordering};
use crate::sync::UnsafeCell;

use super::context::with_frame_regs;
use super::dispatch::{abort_step_on_fault, translate_boosted_fault};

/// The synchronous fault signals the runtime watches.
pub(crate) const FAULT_SIGNALS: [libc::c_int; 4] =
    [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL];

/// Per signal (index in [`FAULT_SIGNALS`]): the disposition ours replaced
/// at the first installation. Leaked boxes, never freed.
static ORIGINAL: [AtomicPtr<libc::sigaction>; 4] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; 4];
/// Per signal: the latest foreign disposition found over ours by [`claim`]
/// (null: none). Leaked boxes, never freed.
static APP: [AtomicPtr<libc::sigaction>; 4] = [const { AtomicPtr::new(std::ptr::null_mut()) }; 4];
/// A `SIG_DFL` disposition (for `SA_RESETHAND`), leaked at installation.
static DEFAULT: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// A chained call in progress on this thread: the frame it was given and
/// the handler's stack position when it chained.
#[derive(Clone, Copy)]
struct Chaining {
    uctx: usize,
    sp: usize,
}

crate::sync::const_thread_local! {
    /// The innermost chained call in progress on this thread (no destructor).
    static CHAINING: UnsafeCell<Chaining> = UnsafeCell::new(Chaining { uctx: 0, sp: 0 });
}

fn index(sig: libc::c_int) -> Option<usize> {
    FAULT_SIGNALS.iter().position(|&s| s == sig)
}

/// The handler's own address.
pub(crate) fn handler_address() -> u64 {
    handle_fault as *const () as usize as u64
}

fn leak(act: libc::sigaction) -> *mut libc::sigaction {
    Box::into_raw(Box::new(act))
}

/// Puts the runtime's fault handler on top of SIGSEGV, SIGBUS, SIGFPE and
/// SIGILL, chained to what is there: at the first call whatever the process
/// had, later a handler the application installed over ours since (see the
/// module docs). Cheap when nothing changed (four `sigaction` queries).
/// The runtime calls it when it installs its SIGTRAP handler and at every
/// registration that takes an XOL slot; call it after installing a handler
/// for one of these signals while probes are registered.
pub fn claim_fault_signals() {
    super::signal::install();
    claim();
}

/// The first installation, from the SIGTRAP handler's (once per process):
/// what it replaces is the process's original disposition.
pub(crate) fn install() {
    // SAFETY: all-zero is a valid sigaction; SIG_DFL is 0.
    let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    // Release pairs with the Acquire load in `deliver`.
    DEFAULT.store(leak(dfl), Ordering::Release);
    put_on_top(true);
}

std::thread_local! {
    /// This thread is inside a [`ClaimedBatch`]: the claim was made at its
    /// start.
    static IN_BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A batch of registrations on this thread (a multi-attach, the pending
/// uprobes of a `dlopen`) that claims the fault signals once, at its start,
/// instead of once per XOL slot (four `sigaction` calls each). Ends when
/// dropped.
pub(crate) struct ClaimedBatch {
    outer: bool,
}

impl ClaimedBatch {
    /// Claims now; the claims inside the batch are no-ops.
    pub(crate) fn begin() -> ClaimedBatch {
        claim();
        ClaimedBatch {
            outer: IN_BATCH.with(|b| b.replace(true)),
        }
    }
}

impl Drop for ClaimedBatch {
    fn drop(&mut self) {
        IN_BATCH.with(|b| b.set(self.outer));
    }
}

/// [`claim_fault_signals`] without the SIGTRAP installation: a no-op before
/// it (the first installation records the original dispositions), and
/// inside a [`ClaimedBatch`].
pub(crate) fn claim() {
    if IN_BATCH.with(|b| b.get()) {
        return;
    }
    // Acquire pairs with the Release store in `install`.
    if !DEFAULT.load(Ordering::Acquire).is_null() {
        put_on_top(false);
    }
}

/// Installs ours over each fault signal whose handler is not ours,
/// recording what it replaces (as the original at the first installation,
/// else as the application's). Takes no lock (it runs inside registrations
/// and must not add a lock for `fork()` to cover): two concurrent calls
/// record the same foreign disposition, and ours is never recorded.
fn put_on_top(first: bool) {
    for (i, &sig) in FAULT_SIGNALS.iter().enumerate() {
        // SAFETY: all-zero is a valid sigaction; a null new action only
        // reads the current one.
        let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut cur) } != 0 {
            continue;
        }
        if cur.sa_sigaction == handler_address() as usize {
            continue;
        }
        // Recorded before ours is installed: a fault right after finds it.
        // Release pairs with the Acquire loads in `handle_fault` and `deliver`.
        let record = |act: libc::sigaction| {
            if act.sa_sigaction == handler_address() as usize {
                // Installed by a concurrent call: nothing replaced.
            } else if first {
                ORIGINAL[i].store(leak(act), Ordering::Release);
            } else {
                APP[i].store(leak(act), Ordering::Release);
            }
        };
        record(cur);
        // SAFETY: as above for `zeroed`; the mask functions only write the
        // mask inside `new`.
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction = handler_address() as usize;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | (cur.sa_flags & libc::SA_ONSTACK);
        // SAFETY: see above.
        unsafe {
            libc::sigfillset(&mut new.sa_mask);
            for s in FAULT_SIGNALS.iter().chain(&[libc::SIGTRAP]) {
                libc::sigdelset(&mut new.sa_mask, *s);
            }
        }
        // SAFETY: all-zero is a valid sigaction, filled by the call below.
        let mut replaced: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: `new` is a fully initialised sigaction whose handler has
        // the SA_SIGINFO signature.
        if unsafe { libc::sigaction(sig, &new, &mut replaced) } != 0 {
            continue;
        }
        if replaced.sa_sigaction != cur.sa_sigaction || replaced.sa_flags != cur.sa_flags {
            // Changed between the two calls: chain to the newer one (the
            // first box is leaked: a handler may be reading it).
            record(replaced);
        }
    }
}

/// Steps 1 and 2 of the module docs on the frame `uc`: true if the frame
/// was in an XOL slot and now reports the probed address.
pub(crate) fn fix_frame(uc: &mut libc::ucontext_t) -> bool {
    with_frame_regs(uc, |regs| {
        abort_step_on_fault(regs) || translate_boosted_fault(regs)
    })
}

/// The fault handler.
extern "C" fn handle_fault(sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // A store of `poke` into code unmapped under it: ours, handled whole
    // (no system call, errno untouched).
    // SAFETY: the kernel passes a valid ucontext for an SA_SIGINFO handler,
    // live for the call (a chained handler passes the one it got).
    if super::poke::fixup(sig, unsafe { &mut *uctx.cast::<libc::ucontext_t>() }) {
        return;
    }
    // SAFETY: errno is a thread-local int; reading and writing it is
    // async-signal-safe.
    let errno = unsafe { *libc::__errno_location() };
    // This frame's position on the stack: a chained handler that calls us
    // back with its frame runs deeper than the call that chained to it.
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let Some(i) = index(sig) else {
        return;
    };
    let outer = chaining();
    let nested = outer.uctx == uctx as usize && here < outer.sp;
    // SAFETY: the kernel passes a valid ucontext for an SA_SIGINFO handler,
    // live for the call; a nested call gets it from the chained handler,
    // which got it from us.
    let uc = unsafe { &mut *uctx.cast::<libc::ucontext_t>() };
    let fixed = !nested && fix_frame(uc);
    // Acquire pairs with the Release stores in `put_on_top`.
    let app = APP[i].load(Ordering::Acquire);
    let slot = if nested || app.is_null() {
        &ORIGINAL[i]
    } else {
        &APP[i]
    };
    // SAFETY: `info` and `uc` are the kernel's, valid for the call.
    unsafe { deliver(sig, info, uc, slot, here, fixed) };
    // SAFETY: see above.
    unsafe { *libc::__errno_location() = errno };
}

fn chaining() -> Chaining {
    // SAFETY: a plain read of this thread's own record.
    CHAINING.with(|c| c.with_mut(|c| unsafe { *c }))
}

fn set_chaining(v: Chaining) {
    // SAFETY: a plain write of this thread's own record.
    CHAINING.with(|c| c.with_mut(|c| unsafe { *c = v }));
}

/// Delivers `sig` to the disposition in `slot` (module docs, step 3).
///
/// # Safety
/// `info` and `uc` are the frame of the signal being handled.
unsafe fn deliver(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: &mut libc::ucontext_t,
    slot: &AtomicPtr<libc::sigaction>,
    here: usize,
    fixed: bool,
) {
    // SAFETY: `info` is valid (the caller's contract).
    let from_kernel = unsafe { (*info).si_code } > 0;
    // Acquire pairs with the Release stores in `put_on_top` (and `SA_RESETHAND` below).
    let act = slot.load(Ordering::Acquire);
    // SAFETY: dispositions are leaked boxes, never modified.
    let Some(act) = (unsafe { act.as_ref() }) else {
        // SAFETY: forwarded contract.
        unsafe { die(sig, info, uc) };
        return;
    };
    match act.sa_sigaction {
        // SAFETY: forwarded contract.
        libc::SIG_DFL => unsafe { die(sig, info, uc) },
        libc::SIG_IGN => {
            if from_kernel {
                // SAFETY: forwarded contract.
                unsafe { die(sig, info, uc) };
            }
        }
        h => {
            if act.sa_flags & libc::SA_RESETHAND != 0 {
                // Acquire pairs with the Release store in `install`; Release
                // with the Acquire load above (a later fault's).
                slot.store(DEFAULT.load(Ordering::Acquire), Ordering::Release);
            }
            // The mask the kernel would have set for this handler.
            let mut mask = uc.uc_sigmask;
            // SAFETY: sigset functions on local sets; pthread_sigmask is
            // async-signal-safe.
            let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: see above.
            unsafe {
                for s in 1..=64 {
                    if libc::sigismember(&act.sa_mask, s) == 1 {
                        libc::sigaddset(&mut mask, s);
                    }
                }
                if act.sa_flags & libc::SA_NODEFER == 0 {
                    libc::sigaddset(&mut mask, sig);
                }
                libc::pthread_sigmask(libc::SIG_SETMASK, &mask, &mut old);
            }
            let outer = chaining();
            set_chaining(Chaining {
                uctx: uc as *mut libc::ucontext_t as usize,
                sp: here,
            });
            let uctx = (uc as *mut libc::ucontext_t).cast::<libc::c_void>();
            if act.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: installed with the SA_SIGINFO signature; called as
                // the kernel would have.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, uctx);
            } else {
                // SAFETY: a plain handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            set_chaining(outer);
            // SAFETY: restores the mask our handler ran with.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
            if fixed && from_kernel && reset_to_default(sig) {
                // It restored SIG_DFL to die of a re-fault: die here, at the
                // probed address, instead of re-running the probe.
                // SAFETY: forwarded contract.
                unsafe { die(sig, info, uc) };
            }
        }
    }
}

/// Whether the current disposition of `sig` is `SIG_DFL` (a chained handler
/// replaced ours with it).
fn reset_to_default(sig: libc::c_int) -> bool {
    // SAFETY: a null new action only reads the current one.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let ok = unsafe { libc::sigaction(sig, std::ptr::null(), &mut cur) } == 0;
    ok && cur.sa_sigaction == libc::SIG_DFL
}

/// Makes the process die of `sig` when the handler returns, with the
/// registers of `uc`: default disposition, `sig` queued to this thread with
/// `info` while blocked here, and unblocked in the frame `rt_sigreturn`
/// restores (the kernel unblocks a synchronous fault too).
///
/// # Safety
/// `info` and `uc` are the frame of the signal being handled.
unsafe fn die(sig: libc::c_int, info: *mut libc::siginfo_t, uc: &mut libc::ucontext_t) {
    // SAFETY: sigaction, sigprocmask, getpid, gettid and the signal-queueing
    // system calls are async-signal-safe; `info` is valid (the contract).
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let (pid, tid) = (libc::getpid(), libc::gettid());
        let queued = libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, sig, info) == 0;
        if !queued {
            libc::syscall(libc::SYS_tgkill, pid, tid, sig);
        }
        libc::sigdelset(&mut uc.uc_sigmask, sig);
    }
}
