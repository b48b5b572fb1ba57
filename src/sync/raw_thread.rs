//! A thread made with `pthread_create` directly, not `std::thread`: what
//! the RCU callback workers run on, because a worker must start in a
//! forked child.
//!
//! # Why not `std::thread`
//!
//! `std::thread::spawn` takes a process-wide mutex of the standard
//! library's (its stack-overflow bookkeeping, `thread_info`) when a thread
//! starts and when it exits. A `fork` while another thread of the parent
//! holds it (it is starting or exiting) leaves the child a copy of the
//! mutex locked by a thread that does not exist there: every thread the
//! child spawns with `std` then blocks at its start, forever. The C library
//! resets its own locks in the child (thread stacks, the dynamic TLS lock),
//! so `pthread_create` works there; the runtime's callback workers, which
//! a child starts afresh (`rcu/callbacks.rs`), use it. Found by
//! `tests/rcu_torture.rs`: a fork child's first `call()` + `barrier()`
//! hung about once in a thousand forks (the torture's churn thread creates
//! and joins threads), its new worker blocked on that mutex in
//! `std::sys::pal::unix::stack_overflow::thread_info::set_current_info`.
//!
//! What such a thread lacks: the standard library's stack-overflow report
//! (an overflow is a plain SIGSEGV) and a name in `std::thread::current()`
//! (the kernel's thread name is set). A panic that escapes the thread's
//! function aborts the process with a message (the thread's callers catch
//! their callbacks' panics themselves).

use std::ffi::CStr;
use std::io;

/// A running (or finished, unjoined) thread.
#[derive(Debug)]
pub(crate) struct RawThread {
    id: libc::pthread_t,
}

type Start = Box<dyn FnOnce() + Send + 'static>;

extern "C" fn start(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `arg` is the `Box<Start>` that `spawn` leaked for this
    // thread, taken back exactly once, here.
    let f = unsafe { Box::from_raw(arg.cast::<Start>()) };
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(*f)).is_err() {
        let msg = b"rcu-registry: a runtime thread panicked; aborting\n";
        // SAFETY: a plain write of a static buffer to stderr (not through
        // std's stderr lock, which a forked child may find held).
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        std::process::abort();
    }
    std::ptr::null_mut()
}

impl RawThread {
    /// Starts `f` on a new thread named `name` (at most 15 bytes: the
    /// kernel's limit; a longer name is left unset).
    pub(crate) fn spawn(name: &CStr, f: impl FnOnce() + Send + 'static) -> io::Result<RawThread> {
        let arg = Box::into_raw(Box::new(Box::new(f) as Start));
        let mut id: libc::pthread_t = 0;
        // SAFETY: a valid out-pointer, default attributes, an `extern "C"`
        // start function and the leaked box it takes back.
        let rc = unsafe { libc::pthread_create(&mut id, std::ptr::null(), start, arg.cast()) };
        if rc != 0 {
            // SAFETY: not handed to any thread: ours to free.
            drop(unsafe { Box::from_raw(arg) });
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: a thread just created and not joined; a NUL-terminated
        // name (an error for a long one changes nothing).
        unsafe { libc::pthread_setname_np(id, name.as_ptr()) };
        Ok(RawThread { id })
    }

    /// Lets the thread finish on its own (its resources are freed when it
    /// does).
    pub(crate) fn detach(self) {
        // SAFETY: a thread of ours, neither joined nor detached before
        // (`self` is consumed).
        unsafe { libc::pthread_detach(self.id) };
    }

    /// Gives up a handle whose thread does not exist in this process (a
    /// forked child's copy of its parent's handle): neither joined nor
    /// detached.
    pub(crate) fn abandon(self) {}

    /// Waits for the thread to finish.
    pub(crate) fn join(self) {
        // SAFETY: a thread of ours, joined once (`self` is consumed), never
        // detached.
        unsafe { libc::pthread_join(self.id, std::ptr::null_mut()) };
    }
}
