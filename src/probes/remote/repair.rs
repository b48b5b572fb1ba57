//! [`RemoteTracer::repair`]: the text of a process whose tracer was killed
//! (`SIGKILL` leaves no chance to detach) put back from its files.
//!
//! What such a tracer leaves behind: the kernel detaches its tracees, which
//! run on with every breakpoint in place; the next one a thread executes
//! kills the process with `SIGTRAP` (nobody catches it any more). A call
//! tracked for its return at that moment returns into the trampoline, an
//! `int3`, and dies the same way. The XOL area stays mapped (harmless).
//!
//! The repair seizes every thread (a thread that runs into a stale
//! breakpoint from then on stops in the repairing tracer instead of dying,
//! and is sent back to the instruction), compares each executable file
//! mapping with its file (read through `/proc/<pid>/root`, so a process in
//! another mount namespace is repaired from its own files), writes the
//! file's byte back wherever the process has a breakpoint the file has
//! not, and lets every thread go. A return address already pointing at
//! the dead tracer's trampoline cannot be repaired (the real one was kept
//! by the tracer only). Text the program changed to `int3` itself (a
//! debugger's breakpoint, its own live probes) would be restored too.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;

use super::mem::{RemoteMemory, INT3};
use super::ptrace::{self, Stop, Tid};
use super::tracer::{RemoteError, RemoteTracer};
use crate::probes::procmaps::Maps;

impl RemoteTracer {
    /// Repairs the text of process `pid` (not traced by anyone) after its
    /// tracer was killed: every breakpoint byte the process has where its
    /// mapped file has another byte is written back (module docs: what
    /// cannot be repaired). Returns the addresses restored.
    ///
    /// # Errors
    /// As [`attach`](Self::attach) (no such process, not permitted, traced
    /// already); [`RemoteError::Os`] if its memory or maps cannot be read.
    /// Nothing stays seized after an error.
    pub fn repair(&mut self, pid: Tid) -> Result<Vec<u64>, RemoteError> {
        if self.pids().contains(&pid) {
            return Err(RemoteError::AlreadyTraced(pid));
        }
        let threads = self.seize_all(pid)?;
        let restored = restore_from_files(pid);
        // Stops collected while seizing: a trap on a breakpoint just
        // removed goes back to the instruction; other signals are
        // delivered as the threads go.
        let mut signals = std::collections::HashMap::new();
        let mut keep = std::collections::VecDeque::new();
        for (tid, status) in self.stops_take_all() {
            if !threads.contains(&tid) {
                keep.push_back((tid, status));
                continue;
            }
            match ptrace::decode(status) {
                Stop::Signal(libc::SIGTRAP) => rewind_if_restored(tid, &restored, &mut signals),
                Stop::Signal(sig) => {
                    signals.insert(tid, sig);
                }
                _ => {}
            }
        }
        self.stops_put_back(keep);
        detach_all(&threads, &signals);
        restored.map_err(|error| RemoteError::Os {
            what: format!("restoring the text of process {pid}"),
            error,
        })
    }
}

/// A `SIGTRAP` stop of `tid`: if it follows a breakpoint that is now
/// gone, the thread goes back to the instruction; else the trap is the
/// program's and is delivered.
fn rewind_if_restored(
    tid: Tid,
    restored: &std::io::Result<Vec<u64>>,
    signals: &mut std::collections::HashMap<Tid, libc::c_int>,
) {
    let Ok(mut u) = ptrace::get_regs(tid) else {
        return;
    };
    let at = u.rip.wrapping_sub(1);
    if restored.as_ref().is_ok_and(|r| r.contains(&at)) {
        u.rip = at;
        let _ = ptrace::set_regs(tid, &u);
    } else {
        signals.insert(tid, libc::SIGTRAP);
    }
}

fn detach_all(threads: &BTreeSet<Tid>, signals: &std::collections::HashMap<Tid, libc::c_int>) {
    for &tid in threads {
        let _ = ptrace::detach(tid, signals.get(&tid).copied().unwrap_or(0));
    }
}

/// Writes back, in every executable file mapping of `pid`, the file's
/// byte wherever the process has `int3` and the file has not; the
/// addresses written.
fn restore_from_files(pid: Tid) -> std::io::Result<Vec<u64>> {
    let mem = RemoteMemory::open(pid)?;
    let mut restored = Vec::new();
    for m in Maps::read_pid(pid)?.mappings {
        if m.prot & libc::PROT_EXEC == 0 || !m.path.starts_with('/') {
            continue;
        }
        let Ok(file) = std::fs::File::open(format!("/proc/{pid}/root{}", m.path)) else {
            continue;
        };
        let len = (m.end - m.start) as usize;
        let mut want = vec![0u8; len];
        // The mapping may run past the file's end (zeroes there).
        let got = read_up_to(&file, &mut want, m.offset)?;
        let mut have = vec![0u8; got];
        if mem.read_at(m.start, &mut have).is_err() {
            continue;
        }
        for (i, (&h, &w)) in have.iter().zip(&want[..got]).enumerate() {
            if h == INT3 && w != INT3 {
                let addr = m.start + i as u64;
                if mem.write_at(addr, &[w]).is_ok() {
                    restored.push(addr);
                }
            }
        }
    }
    Ok(restored)
}

/// Reads as much of `buf` as the file has from `offset`.
fn read_up_to(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}
