//! Colocation: the tracer thread and the threads it serves pinned to one
//! CPU ([`RemoteTracer::colocate`](super::RemoteTracer::colocate)), each
//! thread's own CPU affinity saved and written back when it is let go.
//!
//! Why: a remote hit is a stop, a wake-up of the tracer, and a wake-up of
//! the traced thread. On two CPUs each wake-up may be an idle CPU's
//! (measured on this 2-vCPU guest, idle: a bare `int3` stop round trip
//! 15-18 µs; the tracer and the traced thread on one CPU: 6.5-8.5 µs, the
//! wake-up a switch on the same run queue). Pinning the tracer alone
//! changes nothing. Pinning the traced threads is a change to the traced
//! program (its threads share one CPU while traced), so it is the caller's
//! choice, never the default.

use std::collections::HashMap;

use super::ptrace::Tid;

/// A CPU affinity mask (`sched_getaffinity`'s `cpu_set_t`).
#[derive(Clone, Copy)]
pub(super) struct CpuMask(libc::cpu_set_t);

impl CpuMask {
    /// The mask with only `cpu` (None if `cpu` is beyond what a
    /// `cpu_set_t` holds).
    pub(super) fn only(cpu: usize) -> Option<CpuMask> {
        if cpu >= libc::CPU_SETSIZE as usize {
            return None;
        }
        // SAFETY: a `cpu_set_t` is a plain bit array: all zeroes is the
        // empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` < CPU_SETSIZE (checked above), so the bit is inside
        // `set`, which this frame owns.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        Some(CpuMask(set))
    }

    /// Whether `cpu` is in the mask.
    pub(super) fn has(&self, cpu: usize) -> bool {
        // SAFETY: the bit index is checked against CPU_SETSIZE, inside the
        // set this borrows.
        cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, &self.0) }
    }

    /// Thread `tid`'s affinity (0: the calling thread).
    pub(super) fn of(tid: Tid) -> std::io::Result<CpuMask> {
        // SAFETY: as in `only`: all zeroes is a valid (empty) set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes at most `size_of::<cpu_set_t>()` bytes
        // into `set`, which this frame owns.
        let r = unsafe {
            libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
        };
        if r == 0 {
            Ok(CpuMask(set))
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Sets thread `tid`'s affinity (0: the calling thread) to this mask.
    pub(super) fn apply(&self, tid: Tid) -> std::io::Result<()> {
        // SAFETY: the kernel reads `size_of::<cpu_set_t>()` bytes from the
        // set this borrows.
        let r = unsafe {
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &self.0)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// The tracer's colocation: its CPU, its own affinity before it pinned
/// itself, and each pinned traced thread's affinity before it was pinned.
pub(super) struct Colocation {
    cpu: usize,
    tracer_before: CpuMask,
    /// Traced thread -> its affinity before colocation (a thread that
    /// could not be pinned, say of another user without `CAP_SYS_NICE`,
    /// is not here and runs where it ran).
    saved: HashMap<Tid, CpuMask>,
}

impl Colocation {
    /// Pins the calling (tracer) thread to `cpu`, or to the CPU it runs
    /// on now.
    pub(super) fn start(cpu: Option<usize>) -> std::io::Result<Colocation> {
        let tracer_before = CpuMask::of(0)?;
        let mut c = Colocation {
            cpu: 0,
            tracer_before,
            saved: HashMap::new(),
        };
        c.move_to(cpu)?;
        Ok(c)
    }

    /// Moves the tracer thread and every pinned thread to `cpu` (or the
    /// CPU the tracer runs on now). Nothing changes on an error: a CPU the
    /// tracer thread could not use before colocation, or none such.
    pub(super) fn move_to(&mut self, cpu: Option<usize>) -> std::io::Result<()> {
        let cpu = match cpu {
            Some(c) => c,
            // SAFETY: sched_getcpu takes nothing and returns a number.
            None => match unsafe { libc::sched_getcpu() } {
                c if c >= 0 => c as usize,
                _ => return Err(std::io::Error::last_os_error()),
            },
        };
        if !self.tracer_before.has(cpu) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is not one this thread may run on"),
            ));
        }
        let only = CpuMask::only(cpu).expect("an allowed CPU is inside the set");
        only.apply(0)?;
        self.cpu = cpu;
        for &tid in self.saved.keys() {
            let _ = only.apply(tid);
        }
        Ok(())
    }

    /// The CPU everything runs on.
    pub(super) fn cpu(&self) -> usize {
        self.cpu
    }

    /// Pins traced thread `tid` (once: its affinity before the first pin
    /// is the one written back). A thread that cannot be pinned is left
    /// as it is.
    pub(super) fn pin(&mut self, tid: Tid) {
        if self.saved.contains_key(&tid) {
            return;
        }
        let Ok(before) = CpuMask::of(tid) else {
            return;
        };
        let only = CpuMask::only(self.cpu).expect("checked at start");
        if only.apply(tid).is_ok() {
            self.saved.insert(tid, before);
        }
    }

    /// `new` was created (a thread, a `fork` or `vfork` child) by `from`,
    /// pinned: it inherited the pinned mask, and its own affinity to
    /// restore is `from`'s.
    pub(super) fn inherit(&mut self, new: Tid, from: Tid) {
        if let Some(&m) = self.saved.get(&from) {
            self.saved.insert(new, m);
        }
    }

    /// Writes back `tid`'s affinity (before it is let go).
    pub(super) fn restore(&mut self, tid: Tid) {
        if let Some(m) = self.saved.remove(&tid) {
            let _ = m.apply(tid);
        }
    }

    /// Forgets `tid` (it exited).
    pub(super) fn forget(&mut self, tid: Tid) {
        self.saved.remove(&tid);
    }

    /// Forgets every thread (no tracee is left).
    pub(super) fn forget_all(&mut self) {
        self.saved.clear();
    }

    /// Writes back every traced thread's affinity and the tracer's own.
    pub(super) fn end(mut self) {
        for (tid, m) in self.saved.drain() {
            let _ = m.apply(tid);
        }
        let _ = self.tracer_before.apply(0);
    }
}
