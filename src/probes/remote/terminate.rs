//! Detach on `SIGINT`, `SIGTERM` or `SIGHUP`
//! ([`RemoteTracer::detach_on_termination`](super::RemoteTracer::detach_on_termination)).
//!
//! A tracer killed by one of these signals' default action would leave its
//! breakpoints in the processes it attached to (their next hit kills them
//! with `SIGTRAP`). Instead a handler records the signal, and each tracer
//! thread that asked for it detaches every process at its next step and
//! returns [`RemoteError::Terminated`](super::RemoteError::Terminated).
//!
//! The signal is process-directed: any thread of the program may run the
//! handler, and a tracer thread blocked in `waitpid` for an idle target
//! would not wake. So a watcher thread, started with the first request,
//! sends the signal again to every registered tracer thread (`tgkill`)
//! every [`KICK_EVERY`] until each has deregistered: its `waitpid` fails
//! with `EINTR` (the handler is installed without `SA_RESTART`). The same
//! resending closes the window between a tracer's check of the flag and
//! its next `waitpid`.
//!
//! The handlers replace the program's dispositions of the three signals
//! for the rest of the process's life (they are process-wide).

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use super::ptrace::Tid;

/// The signals handled.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// How often the watcher wakes the tracer threads once a signal came.
pub(super) const KICK_EVERY: Duration = Duration::from_millis(10);
/// How often the watcher looks for a signal.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// The first signal received (0: none yet).
static REQUESTED: AtomicI32 = AtomicI32::new(0);
/// Tracer threads to wake.
static TRACERS: Mutex<Vec<Tid>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

/// Records the signal. Async-signal-safe: one atomic store.
extern "C" fn on_signal(sig: libc::c_int) {
    // Relaxed: the value is the whole message; the tracer threads read it
    // after their `waitpid` returns, with nothing else published by it.
    let _ = REQUESTED.compare_exchange(0, sig, Ordering::Relaxed, Ordering::Relaxed);
}

/// Installs the handlers and the watcher (once per process) and registers
/// the calling thread as a tracer to wake.
pub(super) fn register() -> io::Result<()> {
    let mut err = None;
    INSTALL.call_once(|| {
        for sig in SIGNALS {
            // No SA_RESTART: a blocked `waitpid` on a thread that takes the
            // signal fails with EINTR.
            // SAFETY: a zeroed sigaction is valid to fill in; the handler is
            // an `extern "C" fn(c_int)` doing one atomic store (signal-safe).
            let r = unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut())
            };
            if r != 0 {
                err = Some(io::Error::last_os_error());
                return;
            }
        }
        let spawned = std::thread::Builder::new()
            .name("rcu-registry-remote-terminate".into())
            .spawn(watch);
        if let Err(e) = spawned {
            err = Some(e);
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    let me = gettid();
    let mut t = TRACERS.lock().unwrap_or_else(|p| p.into_inner());
    if !t.contains(&me) {
        t.push(me);
    }
    Ok(())
}

/// The calling thread no longer needs waking.
pub(super) fn deregister() {
    let me = gettid();
    TRACERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&t| t != me);
}

/// The signal received, if one was.
pub(super) fn requested() -> Option<libc::c_int> {
    // Relaxed: see `on_signal`.
    match REQUESTED.load(Ordering::Relaxed) {
        0 => None,
        sig => Some(sig),
    }
}

/// The watcher: once a signal came, wakes every registered tracer thread
/// until none is left.
fn watch() {
    loop {
        let Some(sig) = requested() else {
            std::thread::sleep(LOOK_EVERY);
            continue;
        };
        let tracers = TRACERS.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // SAFETY: getpid takes no arguments and cannot fail.
        let pid = unsafe { libc::getpid() };
        for tid in tracers {
            // SAFETY: tgkill with plain integers; a thread that has exited
            // makes it fail harmlessly. The handler only records.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
        }
        std::thread::sleep(KICK_EVERY);
    }
}

fn gettid() -> Tid {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}
