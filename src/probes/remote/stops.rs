//! [`Stops`]: the stops a tracer thread has collected but not served yet,
//! and the one way it waits for a given thread.
//!
//! `waitpid` on one thread id can block for ever: a process's leader that
//! exits while other threads run is reported only once those threads have
//! been reaped, and a wait on the leader alone never reaps them. So the
//! tracer never waits on one thread: [`Stops::wait_for`] waits for any of
//! its tracees and keeps every other thread's stop here, in the order they
//! came, to be served afterwards. The queue is shared (behind a mutex)
//! with the XOL areas' system-call injection, which waits for the thread
//! it borrowed the same way.

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;

use super::ptrace::{self, Tid};

/// Collected stops, oldest first: `(thread, waitpid status)`.
#[derive(Debug, Default)]
pub(super) struct Stops {
    queue: Mutex<VecDeque<(Tid, libc::c_int)>>,
}

impl Stops {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Tid, libc::c_int)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a stop to serve later.
    pub(super) fn push(&self, tid: Tid, status: libc::c_int) {
        self.lock().push_back((tid, status));
    }

    /// The oldest collected stop.
    pub(super) fn pop(&self) -> Option<(Tid, libc::c_int)> {
        self.lock().pop_front()
    }

    /// Whether a stop of `tid` is collected (the thread is stopped).
    pub(super) fn has(&self, tid: Tid) -> bool {
        self.lock().iter().any(|&(t, _)| t == tid)
    }

    /// Every collected stop, oldest first; the queue is left empty.
    pub(super) fn take_all(&self) -> VecDeque<(Tid, libc::c_int)> {
        std::mem::take(&mut *self.lock())
    }

    /// Puts stops back in front of those collected since, in their order.
    pub(super) fn put_back(&self, mut older: VecDeque<(Tid, libc::c_int)>) {
        let mut q = self.lock();
        older.extend(q.drain(..));
        *q = older;
    }

    /// The next stop of `tid`: a collected one first, else waits for any
    /// tracee of this thread, keeping the others' stops. `ECHILD` (nothing
    /// left to wait for) is an error.
    pub(super) fn wait_for(&self, tid: Tid) -> io::Result<libc::c_int> {
        {
            let mut q = self.lock();
            if let Some(i) = q.iter().position(|&(t, _)| t == tid) {
                return Ok(q.remove(i).expect("found above").1);
            }
        }
        loop {
            match ptrace::wait(-1, 0)? {
                Some((t, status)) if t == tid => return Ok(status),
                Some((t, status)) => self.push(t, status),
                None => {}
            }
        }
    }
}
