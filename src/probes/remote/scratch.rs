//! The scratch page a library load (`load.rs`) maps in the process: one
//! or more pages, read and execute only (mapped with an `mmap` the
//! borrowed thread makes, `inject.rs`; written through `/proc/<pid>/mem`,
//! which may write a read-only private mapping), holding the `int3` every
//! call returns onto and the strings the calls pass. Unmapped, by the same
//! thread, before it is let go: nothing of it stays in the process.

use std::ffi::CString;

use super::inject;
use super::mem::{RemoteMemory, INT3};
use super::ptrace::Tid;
use super::stops::Stops;

/// The strings the calls pass.
pub(super) struct Strings {
    pub(super) path: CString,
    pub(super) symbol: Option<CString>,
    pub(super) argument: Option<CString>,
}

/// The scratch page mapped in the process: the `int3` at its start, the
/// strings after it.
pub(super) struct Scratch {
    /// Its first byte: the `int3` calls return onto.
    pub(super) start: u64,
    len: u64,
    /// Where the library path is.
    pub(super) path: u64,
    /// Where the init symbol is (an empty string without one).
    pub(super) symbol: u64,
    /// Where the init argument is (an empty string without one).
    pub(super) argument: u64,
}

/// Where the strings start in the scratch page (after the `int3`s).
const STRINGS_AT: u64 = 16;

impl Scratch {
    /// Maps the page through stopped thread `tid` and fills it.
    pub(super) fn map(
        stops: &Stops,
        pid: Tid,
        tid: Tid,
        gadget: u64,
        mem: &RemoteMemory,
        s: &Strings,
    ) -> std::io::Result<Scratch> {
        let empty = CString::default();
        let parts = [
            &s.path,
            s.symbol.as_ref().unwrap_or(&empty),
            s.argument.as_ref().unwrap_or(&empty),
        ];
        let mut bytes = vec![INT3; STRINGS_AT as usize];
        let mut at = [0u64; 3];
        for (i, p) in parts.iter().enumerate() {
            at[i] = bytes.len() as u64;
            bytes.extend_from_slice(p.as_bytes_with_nul());
        }
        let len = (bytes.len() as u64).next_multiple_of(4096);
        let prot = libc::PROT_READ | libc::PROT_EXEC;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let start = inject::mmap(stops, pid, tid, gadget, 0, len, prot, flags)?;
        let scratch = Scratch {
            start,
            len,
            path: start + at[0],
            symbol: start + at[1],
            argument: start + at[2],
        };
        if let Err(e) = mem.write_at(start, &bytes) {
            scratch.unmap(stops, pid, tid, gadget);
            return Err(std::io::Error::other(e.to_string()));
        }
        Ok(scratch)
    }

    /// Unmaps the page through stopped thread `tid`.
    pub(super) fn unmap(&self, stops: &Stops, pid: Tid, tid: Tid, gadget: u64) {
        let args = [self.start, self.len, 0, 0, 0, 0];
        let _ = inject::syscall(stops, pid, tid, gadget, libc::SYS_munmap, args);
    }
}
