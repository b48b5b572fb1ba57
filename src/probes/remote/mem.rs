//! A traced process's memory through `/proc/<pid>/mem`: its text (where
//! breakpoints are written, checked against the bytes expected, as every
//! text memory of the crate does) and its data (what emulation, step fixups
//! and return hijacks read and write on a thread's stack).
//!
//! The tracer may write through the file into read-only, executable private
//! mappings (the kernel forces the write, copying the page for this process
//! only: the file on disk and other processes are untouched), which is how
//! debuggers place breakpoints. x86 needs no instruction-cache maintenance
//! after such a write; the one-byte `int3` store is atomic for the target's
//! other threads, which keep running.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// x86_64's breakpoint, `int3` (the remote tracer's only architecture).
pub(super) const INT3: u8 = 0xcc;

use crate::probes::arch::DataMemory;
use crate::probes::error::{CodeBytes, TextFailure};
use crate::probes::text::TextMemory;
use crate::probes::ProbeError;

/// `/proc/<pid>/mem` of a traced process, open for reading and writing.
/// Clones share the descriptor.
#[derive(Clone, Debug)]
pub struct RemoteMemory {
    file: Arc<File>,
    pid: libc::pid_t,
    /// Every address where a text write put a breakpoint over another
    /// byte, with that byte: a `fork` child's copy of the text may hold a
    /// breakpoint removed from the parent since (the two copies part at
    /// the `fork`, before the tracer hears of it), and is cleaned from
    /// this list. Never shrinks: one entry per address ever probed.
    patched: Arc<Mutex<HashMap<u64, u8>>>,
}

impl RemoteMemory {
    /// Opens `pid`'s memory (the caller traces it, or may otherwise
    /// `ptrace`-attach to it).
    pub(super) fn open(pid: libc::pid_t) -> std::io::Result<RemoteMemory> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        Ok(RemoteMemory {
            file: Arc::new(file),
            pid,
            patched: Arc::default(),
        })
    }

    /// The traced process.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    fn os_error(addr: u64, len: usize, op: &'static str, e: &std::io::Error) -> ProbeError {
        ProbeError::TextAccess {
            addr,
            len,
            failure: match e.raw_os_error() {
                // Unmapped (EIO), or the process is gone (ESRCH).
                Some(libc::EIO) | Some(libc::EFAULT) => TextFailure::OutOfRange,
                errno => TextFailure::Os {
                    op,
                    errno: errno.unwrap_or(0),
                },
            },
        }
    }

    /// Reads `buf.len()` bytes at `addr`.
    pub fn read_at(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        self.file
            .read_exact_at(buf, addr)
            .map_err(|e| Self::os_error(addr, buf.len(), "pread /proc/pid/mem", &e))
    }

    /// Every address where a breakpoint was ever written over another byte,
    /// with that byte.
    pub(super) fn ever_patched(&self) -> Vec<(u64, u8)> {
        let p = self.patched.lock().unwrap_or_else(|p| p.into_inner());
        p.iter().map(|(&a, &b)| (a, b)).collect()
    }

    /// Writes `bytes` at `addr` (no check of what was there).
    pub fn write_at(&self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        self.file
            .write_all_at(bytes, addr)
            .map_err(|e| Self::os_error(addr, bytes.len(), "pwrite /proc/pid/mem", &e))
    }
}

impl TextMemory for RemoteMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        self.read_at(addr, buf)
    }

    fn write(&self, addr: u64, expected_old: &[u8], new: &[u8]) -> Result<(), ProbeError> {
        if expected_old.len() != new.len() {
            return Err(ProbeError::PatchLengthMismatch {
                expected: expected_old.len(),
                new: new.len(),
            });
        }
        let mut now = [0u8; CodeBytes::CAPACITY];
        let now = now.get_mut(..new.len()).ok_or(ProbeError::TextAccess {
            addr,
            len: new.len(),
            failure: TextFailure::OutOfRange,
        })?;
        self.read_at(addr, now)?;
        if now != expected_old {
            return Err(ProbeError::AlreadyPatched {
                addr,
                expected: CodeBytes::new(expected_old),
                found: CodeBytes::new(now),
            });
        }
        if new.first() == Some(&INT3) && expected_old.first() != Some(&INT3) {
            self.patched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(addr, expected_old[0]);
        }
        self.write_at(addr, new)
    }

    fn sync_icache(&self, _addr: u64, _len: usize) -> Result<(), ProbeError> {
        // x86: instruction fetch is coherent with stores, and a thread that
        // runs the new bytes reaches them after a trap or a resume, both
        // serializing.
        Ok(())
    }
}

impl DataMemory for RemoteMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        self.read_at(addr, buf)
            .map_err(|_| ProbeError::MemoryFault {
                addr,
                len: buf.len(),
            })
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        self.write_at(addr, bytes)
            .map_err(|_| ProbeError::MemoryFault {
                addr,
                len: bytes.len(),
            })
    }
}
