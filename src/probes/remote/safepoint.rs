//! Safe points: where a stopped thread of another process may be borrowed
//! to call into the dynamic linker (`dlopen`) and the C library (`malloc`,
//! which `dlopen` calls), without being inside code that holds one of
//! their locks.
//!
//! # The danger
//!
//! `dlopen` takes the loader's lock (`dl_load_lock`, recursive) and
//! `malloc`'s arena locks (not recursive). A thread stopped while it holds
//! `malloc`'s lock and made to call `dlopen` waits for itself for ever; one
//! stopped inside the loader would re-enter it half-way through a change
//! of its lists (the recursive lock lets it in). Those locks are taken and
//! released inside the C library and the dynamic linker: a thread whose
//! instruction pointer is elsewhere holds none of them.
//!
//! # The rule
//!
//! A thread is a safe point when its instruction pointer is
//! 1. **outside the C library and the dynamic linker** (their executable
//!    mappings, `libpthread`'s and `libdl`'s, whose code older glibcs kept
//!    apart, and those of the `malloc` replacements shipped as libraries:
//!    jemalloc, tcmalloc, mimalloc): in the program, another library or
//!    the vDSO ([`SafePoint::Outside`]); or
//! 2. **in a blocking wait the program made for itself**: stopped inside a
//!    system call (`orig_rax` >= 0) made from the C library (not the
//!    dynamic linker, whose `read`s of a library being loaded happen under
//!    its lock) whose number is one of the waits in [`WAITS`]: sleeps,
//!    `poll`/`select`/`epoll`, `read`/`write`, `accept`/`recv`/`send`,
//!    `wait4`/`waitid`, `pause`, `sigsuspend`/`sigtimedwait`, and
//!    `restart_syscall` (a timed wait resumed after a stop)
//!    ([`SafePoint::Blocked`]). glibc makes none of them while it holds
//!    `malloc`'s or the loader's lock. `futex` is left out on purpose: a
//!    thread waiting for one lock may hold another (the loader's, while
//!    `malloc`'s is contended).
//!
//! The load (`load.rs`) stops every thread, takes a safe one (the main
//! thread first, then any thread outside the libraries, then one blocked
//! in a wait); if none is, it lets the threads run briefly and looks
//! again, a bounded number of times. The other threads run while the
//! chosen one makes its calls (they may hold the locks it needs: they must
//! be able to let go of them); threads in a group-stop cannot, so each of
//! those must be at a safe point too.
//!
//! # What remains a risk
//!
//! - A signal handler that interrupted `malloc` (or the loader) runs in the
//!   program's code with the interrupted frame's lock held: its thread
//!   looks safe and is not. (Calling `malloc` from a handler is the
//!   program's bug too, but the load would deadlock that thread.)
//! - Callbacks the C library makes with a lock held run outside it:
//!   `dl_iterate_phdr` callbacks (the unwinder's, during a C++ exception)
//!   hold the loader's write lock, constructors and destructors of a
//!   library being loaded or unloaded hold `dl_load_lock`. Both locks are
//!   recursive, so the thread re-enters the loader, as a `dlopen` from a
//!   constructor does (which glibc supports); a `dl_iterate_phdr` walk then
//!   sees the new library.
//! - Locks of the program's own, or the C library's others (`stdio`'s):
//!   `dlopen` needs none, but the library's constructors and its init
//!   function run on the borrowed thread and may (a `printf` to a stream
//!   the borrowed thread holds locked re-enters its recursive lock).
//! - A `malloc` linked into the program itself (a Rust program's
//!   `jemallocator` or `mimalloc` crate) is the program's code: a thread
//!   inside it looks safe, and `dlopen`'s allocations go to it.
//! - An init function (or constructor) that forks: the child is not
//!   traced and returns, in the end, onto the scratch page's `int3`
//!   (`SIGTRAP` kills it).
//! - glibc's `malloc` reads `/proc/sys/vm/overcommit_memory` once, with an
//!   arena's lock held, the first time it shrinks a thread's heap: a
//!   thread stopped in that one `read` looks blocked in a wait.
//! - A thread blocked in a wait of [`WAITS`] made from the program's own
//!   inline system call, outside the C library, is taken by rule 1 anyway.

use std::ops::Range;

use super::ptrace::{self, Tid};
use super::threads::{State, Threads};
use crate::probes::procmaps::Maps;

/// How the thread borrowed for a load was safe to borrow (the rule:
/// [`load`](super::load), "Safe points").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SafePoint {
    /// Its instruction pointer was outside the C library and the dynamic
    /// linker.
    Outside {
        /// Where it was.
        rip: u64,
    },
    /// It was blocked in this system call, made from the C library, one
    /// of the waits that hold none of its locks.
    Blocked {
        /// The system call's number (`orig_rax`).
        syscall: i64,
    },
}

/// The system calls a thread may be borrowed from (module docs, rule 2).
pub(super) const WAITS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_pause,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    // A timed wait interrupted by a stop (a `SIGSTOP`, a tracer's
    // interrupt) goes on as `restart_syscall`: a sleep, a `poll`, or a
    // timed `futex` wait, which glibc's own locks never make.
    libc::SYS_restart_syscall,
];

/// The code of the C library and of the dynamic linker in a process.
#[derive(Debug, Default)]
pub(super) struct Guarded {
    libc: Vec<Range<u64>>,
    loader: Vec<Range<u64>>,
}

/// Whether `path` is a part of the C library whose code may hold its
/// locks (`libc.so.6`; `libpthread` and `libdl` of glibcs before 2.34),
/// or a `malloc` that replaces the C library's (`dlopen`'s allocations go
/// to it: a thread inside it may hold its lock).
fn is_c_library(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    [
        "libc.so",
        "libc-",
        "libpthread.so",
        "libpthread-",
        "libdl.so",
        "libdl-",
        "libjemalloc.so",
        "libtcmalloc",
        "libmimalloc.so",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

impl Guarded {
    /// The C library's and the dynamic linker's executable mappings in
    /// `maps`.
    pub(super) fn of(maps: &Maps) -> Guarded {
        let mut g = Guarded::default();
        for m in maps
            .mappings
            .iter()
            .filter(|m| m.prot & libc::PROT_EXEC != 0)
        {
            if super::tracer::is_dynamic_linker(&m.path) {
                g.loader.push(m.start..m.end);
            } else if is_c_library(&m.path) {
                g.libc.push(m.start..m.end);
            }
        }
        g
    }

    /// Whether a thread with registers `r` is at a safe point, and which.
    pub(super) fn judge(&self, r: &libc::user_regs_struct) -> Option<SafePoint> {
        let in_any = |v: &[Range<u64>]| v.iter().any(|x| x.contains(&r.rip));
        if !in_any(&self.libc) && !in_any(&self.loader) {
            return Some(SafePoint::Outside { rip: r.rip });
        }
        let syscall = r.orig_rax as i64;
        (in_any(&self.libc) && WAITS.contains(&syscall)).then_some(SafePoint::Blocked { syscall })
    }
}

/// The thread to borrow among `threads` (all stopped), if one is at a safe
/// point and every thread that will stay stopped meanwhile (in a
/// group-stop) is at one too. Preferred: outside the libraries, the main
/// thread (`pid`) first; then blocked in a wait. A thread stopped for a
/// signal is not taken (its signal is delivered when it runs on), nor one
/// with an unblocked signal queued for it alone: the kernel reports an interrupt
/// before it takes a queued signal, so a thread that has just faulted or
/// trapped is stopped with its `SIGSEGV` or `SIGTRAP` still queued, which
/// would stop the first call as if the call had raised it.
pub(super) fn choose(pid: Tid, threads: &Threads, guarded: &Guarded) -> Option<(Tid, SafePoint)> {
    let judged: Vec<(Tid, State, Option<SafePoint>)> = threads
        .states()
        .map(|(t, s)| {
            (
                t,
                s,
                ptrace::get_regs(t).ok().and_then(|r| guarded.judge(&r)),
            )
        })
        .collect();
    let group_stopped: Vec<_> = judged
        .iter()
        .filter(|(_, s, _)| *s == State::GroupStopped)
        .collect();
    // A group-stopped thread outside any safe point may hold a lock the
    // call needs, and will not run to release it.
    if group_stopped.iter().any(|(_, _, j)| j.is_none()) {
        return None;
    }
    let takeable = |t: Tid, s: State| {
        (s == State::Stopped { sig: 0 } || s == State::GroupStopped)
            && ptrace::deliverable_for_thread(t) == 0
    };
    let rank = |&(t, s, j): &(Tid, State, Option<SafePoint>)| -> Option<u8> {
        if !takeable(t, s) {
            return None;
        }
        match j? {
            SafePoint::Outside { .. } if t == pid => Some(0),
            SafePoint::Outside { .. } => Some(1),
            SafePoint::Blocked { .. } => Some(2),
        }
    };
    judged
        .iter()
        .filter_map(|j| Some((rank(j)?, j.0, j.2?)))
        .min_by_key(|&(r, t, _)| (r, t))
        .map(|(_, t, p)| (t, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rip: u64, orig_rax: i64) -> libc::user_regs_struct {
        // SAFETY: plain integers; all zero is a valid value.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        r.rip = rip;
        r.orig_rax = orig_rax as u64;
        r
    }

    #[test]
    fn only_code_outside_the_libraries_or_a_wait_made_from_the_c_library_is_safe() {
        let maps = Maps::parse(
            "555555554000-555555556000 r-xp 00001000 08:01 10 /usr/bin/prog\n\
             7ffff7c00000-7ffff7d00000 r-xp 00028000 08:01 20 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
             7ffff7e00000-7ffff7e80000 r-xp 00008000 08:01 40 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n\
             7ffff7fc0000-7ffff7fe0000 r-xp 00001000 08:01 30 /usr/lib64/ld-linux-x86-64.so.2\n",
        );
        let g = Guarded::of(&maps);
        let prog = 0x5555_5555_4100;
        let libc_at = 0x7fff_f7c0_1000;
        let loader_at = 0x7fff_f7fc_1000;
        assert_eq!(
            g.judge(&regs(prog, -1)),
            Some(SafePoint::Outside { rip: prog })
        );
        // Running in the C library (malloc, say): not safe.
        assert_eq!(g.judge(&regs(libc_at, -1)), None);
        // Blocked in clock_nanosleep from the C library: safe.
        assert_eq!(
            g.judge(&regs(libc_at, libc::SYS_clock_nanosleep)),
            Some(SafePoint::Blocked {
                syscall: libc::SYS_clock_nanosleep
            })
        );
        // A futex wait (a lock's) or the loader's read: not safe.
        assert_eq!(g.judge(&regs(libc_at, libc::SYS_futex)), None);
        assert_eq!(g.judge(&regs(loader_at, libc::SYS_read)), None);
        assert_eq!(g.judge(&regs(loader_at, -1)), None);
        // Inside a malloc that replaces the C library's: not safe.
        assert_eq!(g.judge(&regs(0x7fff_f7e0_1000, -1)), None);
    }
}
