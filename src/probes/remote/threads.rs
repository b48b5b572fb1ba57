//! [`Threads`]: the threads of a process seized for a short visit (a
//! library load, `load.rs`), each in the state the visit found it in and
//! must leave it in.
//!
//! A visit seizes every thread, keeps them stopped while it looks around,
//! lets the bystanders run again while one borrowed thread makes calls
//! (a bystander that holds a lock the call needs must be able to release
//! it), stops them once more and lets every thread go. Meanwhile their
//! stops are passed through as if nobody traced them: a signal is
//! delivered at once, a group-stop (`SIGSTOP`) is entered and kept
//! (`PTRACE_LISTEN`), a thread created meanwhile (traced by the kernel
//! since its creator was) is let run and, at the end, go. A thread that
//! was in a group-stop when seized stays in it throughout.

use std::collections::BTreeMap;

use super::call::OtherThreads;
use super::ptrace::{self, Stop, Tid};

/// What a thread is doing, as the visit sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Stopped by the visit; `sig` (0: none) is to be delivered when it
    /// goes on (it stopped for that signal).
    Stopped { sig: libc::c_int },
    /// In a group-stop (`SIGSTOP`, `SIGTSTP`, ...): stays there.
    GroupStopped,
    /// In a group-stop that began while the visit let it run, left there
    /// with `PTRACE_LISTEN` (so that a `SIGCONT` wakes it): no request but
    /// `PTRACE_INTERRUPT` reaches a listening thread, so it is interrupted
    /// (into a plain group-stop trap) before it can be let go.
    Listening,
    /// Running (traced).
    Running,
}

/// The process's threads that the visit traces, and their states.
#[derive(Debug, Default)]
pub(super) struct Threads {
    states: BTreeMap<Tid, State>,
}

/// Whether `sig` stops a process (a group-stop's signal).
fn stop_signal(sig: libc::c_int) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

/// A stop as the visit sees it.
enum Seen {
    /// The thread exited or was killed.
    Gone,
    /// It entered a group-stop.
    GroupStop,
    /// It created thread `new` (its own stop: the `CLONE` event).
    Created(Tid),
    /// A signal is about to be delivered to it.
    Signal(libc::c_int),
    /// Any other stop: our interrupt, a new thread's first stop, the end
    /// of a group-stop (`SIGCONT` after `PTRACE_LISTEN`), another event.
    Other,
}

impl Seen {
    fn of(tid: Tid, status: libc::c_int) -> Seen {
        match ptrace::decode(status) {
            Stop::Exited(_) | Stop::Killed(_) => Seen::Gone,
            Stop::Event {
                event: libc::PTRACE_EVENT_STOP,
                sig,
            } if stop_signal(sig) => Seen::GroupStop,
            Stop::Event {
                event: libc::PTRACE_EVENT_CLONE,
                ..
            } => match ptrace::event_msg(tid) {
                Ok(new) => Seen::Created(new as Tid),
                Err(_) => Seen::Other,
            },
            Stop::Signal(sig) => Seen::Signal(sig),
            Stop::Event { .. } => Seen::Other,
        }
    }
}

impl Threads {
    /// The threads just seized (each stopped), with the stops that were
    /// not the seizing interrupt (`seize.rs` keeps those): a group-stop or
    /// a signal about to be delivered.
    pub(super) fn seized(
        threads: impl IntoIterator<Item = Tid>,
        other_stops: impl IntoIterator<Item = (Tid, libc::c_int)>,
    ) -> Threads {
        let mut seized = Threads {
            states: threads
                .into_iter()
                .map(|t| (t, State::Stopped { sig: 0 }))
                .collect(),
        };
        for (tid, status) in other_stops {
            seized.stopped(tid, status);
        }
        seized
    }

    /// Every thread and its state.
    pub(super) fn states(&self) -> impl Iterator<Item = (Tid, State)> + '_ {
        self.states.iter().map(|(&t, &s)| (t, s))
    }

    /// The state of `tid`.
    pub(super) fn state(&self, tid: Tid) -> Option<State> {
        self.states.get(&tid).copied()
    }

    /// Lets every thread stopped by the visit, except `but`, run (with its
    /// signal, if it stopped for one); group-stopped ones stay stopped.
    pub(super) fn resume_all_but(&mut self, but: Option<Tid>) {
        for (&tid, state) in self.states.iter_mut() {
            if Some(tid) == but {
                continue;
            }
            if let State::Stopped { sig } = *state {
                if ptrace::cont(tid, sig).is_ok() {
                    *state = State::Running;
                }
            }
        }
    }

    /// Stops every running (or listening) thread (`PTRACE_INTERRUPT`) and
    /// waits until each is stopped; a stop for a signal keeps the signal
    /// for the thread's release, a listening thread reports its group-stop
    /// again.
    pub(super) fn stop_all(&mut self) {
        let running: Vec<Tid> = self.running().collect();
        for tid in running {
            if ptrace::interrupt(tid).is_err() {
                // Gone already (its exit status comes below, or never).
                self.states.remove(&tid);
            }
        }
        while self.running().next().is_some() {
            let Ok(Some((tid, status))) = ptrace::wait(-1, 0) else {
                // Nothing left to wait for: every thread is gone.
                self.states
                    .retain(|_, s| !matches!(*s, State::Running | State::Listening));
                return;
            };
            self.stopped(tid, status);
        }
    }

    fn running(&self) -> impl Iterator<Item = Tid> + '_ {
        self.states
            .iter()
            .filter(|(_, &s)| matches!(s, State::Running | State::Listening))
            .map(|(&t, _)| t)
    }

    /// A stop that came while the visit is stopping the threads: the
    /// thread stays stopped, in the state it stopped in.
    fn stopped(&mut self, tid: Tid, status: libc::c_int) {
        let state = match Seen::of(tid, status) {
            Seen::Gone => {
                self.states.remove(&tid);
                return;
            }
            Seen::GroupStop => State::GroupStopped,
            // (Our interrupt is still pending: the detach clears it.)
            Seen::Signal(sig) => State::Stopped { sig },
            Seen::Created(new) => {
                // The new thread stops at its start, and is stopped in
                // turn.
                self.created(new);
                State::Stopped { sig: 0 }
            }
            Seen::Other => State::Stopped { sig: 0 },
        };
        self.states.insert(tid, state);
    }

    /// Lets every thread go (`PTRACE_DETACH`) with the signal it stopped
    /// for, except `but` (the borrowed thread, let go by the caller); a
    /// group-stopped thread goes back to its group-stop.
    pub(super) fn detach_all_but(&mut self, but: Option<Tid>) {
        for (&tid, &state) in &self.states {
            if Some(tid) == but {
                continue;
            }
            let sig = match state {
                State::Stopped { sig } => sig,
                _ => 0,
            };
            let _ = ptrace::detach(tid, sig);
        }
        self.states.retain(|&t, _| Some(t) == but);
    }

    /// Puts thread `tid` in `state` (the borrowed thread, whose state its
    /// borrower tracks).
    pub(super) fn set(&mut self, tid: Tid, state: State) {
        self.states.insert(tid, state);
    }
}

impl OtherThreads for Threads {
    /// Passed through as if untraced: a signal delivered, a group-stop
    /// kept, a new thread let run.
    fn stop(&mut self, tid: Tid, status: libc::c_int) {
        let known = self.states.contains_key(&tid);
        let _ = match Seen::of(tid, status) {
            // A thread of the process that exited (or a child of the
            // tracing thread that is none of ours).
            Seen::Gone => {
                self.states.remove(&tid);
                return;
            }
            Seen::GroupStop if known => {
                self.states.insert(tid, State::Listening);
                ptrace::listen(tid)
            }
            Seen::Created(new) => {
                self.created(new);
                ptrace::cont(tid, 0)
            }
            Seen::Signal(sig) => ptrace::cont(tid, sig),
            Seen::GroupStop | Seen::Other => {
                self.states.insert(tid, State::Running);
                ptrace::cont(tid, 0)
            }
        };
    }

    fn created(&mut self, tid: Tid) {
        self.states.entry(tid).or_insert(State::Running);
    }
}
