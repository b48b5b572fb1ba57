//! Seizing every thread of a running process: `PTRACE_SEIZE` and
//! `PTRACE_INTERRUPT` each thread `/proc/<pid>/task` lists, until a listing
//! shows no new one, then wait for each thread's stop. Shared by
//! [`RemoteTracer::attach`](super::RemoteTracer::attach),
//! [`RemoteTracer::repair`](super::RemoteTracer::repair) and
//! [`load_library`](super::load_library); a refusal is told apart
//! ([`Refusal`]) from what `/proc` says about the process.

use std::collections::BTreeSet;

use super::ptrace::{self, Stop, Tid};
use super::stops::Stops;
use super::tracer::{os, Refusal, RemoteError};

/// Seizes every thread of `pid` with the `PTRACE_O_*` `options` and waits
/// until each is stopped. The stops that are not the seizing interrupt
/// (a group-stop, a signal) are kept in `stops`, the threads left in them.
/// On an error nothing stays seized.
pub(super) fn seize_all(
    stops: &Stops,
    pid: Tid,
    options: libc::c_int,
) -> Result<BTreeSet<Tid>, RemoteError> {
    let mut threads = BTreeSet::new();
    let result = (|| {
        // Threads created while we attach are seized by the kernel
        // (TRACECLONE) once their creator is seized; listing again
        // until nothing new appears catches the rest.
        loop {
            let listed = list_threads(pid).map_err(|_| RemoteError::NoSuchProcess(pid))?;
            let new: Vec<Tid> = listed
                .into_iter()
                .filter(|t| !threads.contains(t))
                .collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                ptrace::seize_with(tid, options)
                    .map_err(|e| refused(if threads.is_empty() { pid } else { tid }, e))?;
                threads.insert(tid);
                ptrace::interrupt(tid).map_err(os(format!("PTRACE_INTERRUPT {tid}")))?;
            }
        }
        for &tid in &threads {
            await_attach_stop(stops, tid)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(threads),
        Err(e) => {
            for &tid in &threads {
                let _ = ptrace::detach(tid, 0);
            }
            Err(e)
        }
    }
}

/// Waits for the interrupt stop of `tid`, just seized. A process seized
/// while it runs `exec` (a parent's `spawn` returns before its child's
/// `exec` has finished) stops at the `exec` event instead, the interrupt
/// consumed: as good a stop, and the tracer then sets the space up for the
/// new image (as [`RemoteTracer::spawn`](super::RemoteTracer::spawn) does
/// at that stop).
fn await_attach_stop(stops: &Stops, tid: Tid) -> Result<(), RemoteError> {
    let status = stops
        .wait_for(tid)
        .map_err(os(format!("waiting for {tid}")))?;
    match ptrace::decode(status) {
        Stop::Event {
            event: libc::PTRACE_EVENT_STOP,
            sig: libc::SIGTRAP,
        }
        | Stop::Event {
            event: libc::PTRACE_EVENT_EXEC,
            ..
        } => {}
        // A group-stop, a signal: kept, and served as such.
        _ => stops.push(tid, status),
    }
    Ok(())
}

/// Why seizing `pid` failed with `e`, as a typed error.
fn refused(pid: Tid, e: std::io::Error) -> RemoteError {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
    // A process that has exited and not been reaped yet (a zombie, or one
    // exiting while it was being seized) is no process to trace.
    let exited = status.as_ref().is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("State:"))
            .is_some_and(|v| matches!(v.trim().chars().next(), Some('Z' | 'X')))
    });
    match (e.raw_os_error(), status) {
        (Some(libc::ESRCH), _) | (_, Err(_)) => RemoteError::NoSuchProcess(pid),
        _ if exited => RemoteError::NoSuchProcess(pid),
        (Some(libc::EPERM), Ok(status)) => {
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u32>().ok())
            };
            // SAFETY: geteuid takes no arguments and cannot fail.
            let me = unsafe { libc::geteuid() };
            let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
                .ok()
                .and_then(|v| v.trim().parse::<u8>().ok());
            let why = match (field("TracerPid:"), field("Uid:"), scope) {
                (Some(t), _, _) if t != 0 => Refusal::OtherTracer(t as Tid),
                (_, Some(uid), _) if uid != me && me != 0 => Refusal::OtherUser(uid),
                (_, _, Some(v)) if v > 0 => Refusal::PtraceScope(v),
                _ => Refusal::Other(libc::EPERM),
            };
            RemoteError::NotPermitted { pid, why }
        }
        _ => os(format!("PTRACE_SEIZE {pid}"))(e),
    }
}

/// The thread ids of `pid` (`/proc/<pid>/task`).
fn list_threads(pid: Tid) -> std::io::Result<Vec<Tid>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(t) = e?.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(t);
        }
    }
    Ok(out)
}
