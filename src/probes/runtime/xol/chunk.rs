//! Chunks of XOL slots: executable memory near the probed code, written
//! through a second view.
//!
//! # Near the code
//!
//! A slot ends with a jump back to the instruction after the probed one. The
//! x86_64 backend emits the 5-byte `jmp rel32` when the slot is within
//! +/-2 GiB of that instruction and a 14-byte absolute jump otherwise; the
//! short form is predicted like any direct jump (arm64: a `b` back, which
//! reaches +/-128 MiB, or no boosting at all). The area therefore keeps
//! slots in *chunks* placed near the code: for a slot near `addr` it first
//! looks for a chunk whose every byte is within [`XOL_CHUNK_REACH`] of `addr`; if none
//! has a free slot it maps a new chunk in the free gap closest to `addr`
//! (from a `/proc/self/maps` snapshot, with `MAP_FIXED_NOREPLACE`, which
//! fails instead of replacing a mapping that appeared since), and only when
//! no gap within reach exists does it use any chunk, anywhere; the backend
//! then plans the absolute jump by itself (its choice depends only on the
//! distance, which `XolArea::is_near` reports).
//!
//! # Two views, never writable and executable at once
//!
//! Each chunk is a `memfd` mapped twice: read-execute where the slots run,
//! read-write elsewhere for filling them. No page is ever writable and
//! executable, no `mprotect` is needed to fill a slot, and filling one slot
//! never disturbs threads running the chunk's other slots. A thread runs a
//! freshly filled slot only after a trap (an exception return is
//! serializing on x86, and a context synchronization event on arm64, where
//! the area also cleans and invalidates the slot's cache lines after
//! filling it: `arm64/cache.rs`), so it never sees stale bytes. Unused slot
//! bytes trap (`int3` on x86, `udf #0` on arm64), so a stray jump into a
//! slot traps rather than runs garbage.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::super::maps::Maps;

/// Bytes of an area's first chunk: 1024 slots of the x86_64 backend's 64
/// bytes, enough for a typical set of probes in one mapping, small enough
/// to fit in the gaps between mappings. Each later chunk is twice the
/// previous one, up to `XOL_CHUNK_MAX_BYTES` (4 MiB): an area grown for 100,000
/// probes is 7 chunks, not 100, and every reader of `/proc/self/maps` (the
/// loader watch reads it at each `dlopen`) pays per mapping.
pub const XOL_CHUNK_BYTES: usize = 64 * 1024;

/// Bytes of the largest chunk (65,536 slots of 64 bytes).
pub const XOL_CHUNK_MAX_BYTES: usize = 4 << 20;

/// How far every byte of a chunk may be from the probed address for the
/// backend's `jmp rel32` to reach back: 2 GiB, less the largest chunk and a
/// page of margin for the instruction length and rounding.
#[cfg(target_arch = "x86_64")]
pub const XOL_CHUNK_REACH: u64 = (1 << 31) - XOL_CHUNK_MAX_BYTES as u64 - 4096;
/// How far every byte of a chunk may be from the probed address for the
/// arm64 backend's `b` to reach back (a boosted slot): 128 MiB, less the
/// largest chunk and a page of margin.
#[cfg(target_arch = "aarch64")]
pub const XOL_CHUNK_REACH: u64 = (1 << 27) - XOL_CHUNK_MAX_BYTES as u64 - 4096;

/// The size of an area's chunk after `mapped` others: doubling from
/// [`XOL_CHUNK_BYTES`] to [`XOL_CHUNK_MAX_BYTES`].
pub(super) fn chunk_bytes(mapped: usize) -> usize {
    let max_shift = (XOL_CHUNK_MAX_BYTES / XOL_CHUNK_BYTES).trailing_zeros() as usize;
    XOL_CHUNK_BYTES << mapped.min(max_shift)
}

/// Lowest address the area maps at (`vm.mmap_min_addr` is 64 KiB at most
/// on common configurations).
const MIN_ADDR: u64 = 0x10_0000;
/// One past the highest user address on x86_64 with 4-level paging.
const MAX_ADDR: u64 = 0x7fff_ffff_f000;

/// `memfd_create` flag asking for an executable memfd (Linux 6.3+, where
/// `vm.memfd_noexec` may otherwise forbid it). Older kernels reject it.
const MFD_EXEC: libc::c_uint = 0x0010;

/// Written over unused slot bytes, so a stray jump into a slot traps: the
/// x86 breakpoint `int3`.
#[cfg(target_arch = "x86_64")]
pub(super) const FILL: u8 = 0xcc;
/// Written over unused slot bytes: zero words are arm64's permanently
/// undefined `udf #0` (SIGILL).
#[cfg(target_arch = "aarch64")]
pub(super) const FILL: u8 = 0;

/// One memfd mapped twice.
pub(super) struct Chunk {
    /// Where the slots execute (read-execute).
    pub(super) exec: u64,
    /// Where they are written (read-write).
    pub(super) write: *mut u8,
    /// Bytes of each view (a power of two, [`XOL_CHUNK_BYTES`] at least).
    pub(super) len: usize,
    /// Free slot indices, popped from the end: never-used ones lowest
    /// last at first, recycled ones pushed back on top.
    pub(super) free: Vec<u32>,
    _fd: OwnedFd,
}

// SAFETY: `write` points into a mapping the chunk owns for the life of the
// process; every access goes through the area's mutex.
unsafe impl Send for Chunk {}

impl Chunk {
    /// Maps a new chunk of `len` bytes (a power of two) of `slot_size`-byte
    /// slots, all free, near `near` if `near` is `Some` (every byte within
    /// [`XOL_CHUNK_REACH`]), else anywhere.
    #[cold]
    pub(super) fn map(len: usize, slot_size: usize, near: Option<u64>) -> Option<Chunk> {
        let fd = memfd()?;
        // SAFETY: ftruncate on a memfd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return None;
        }
        let exec = match near {
            Some(near) => map_exec_near(&fd, len, near)?,
            None => map_exec(&fd, len, 0, 0)?,
        };
        // SAFETY: a fresh shared mapping of our own memfd at a kernel-chosen
        // address; the result is checked against MAP_FAILED.
        let write = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if write == libc::MAP_FAILED {
            // SAFETY: `exec` is the mapping we just created, unused so far.
            unsafe { libc::munmap(exec as *mut libc::c_void, len) };
            return None;
        }
        let write = write.cast::<u8>();
        // SAFETY: the write view is `len` bytes long and ours alone.
        unsafe { std::ptr::write_bytes(write, FILL, len) };
        // Listed for the fork handlers (`xol/fork.rs`) before any slot of it
        // is handed out.
        if !super::fork::record(exec, write, len) {
            // SAFETY: both views are the mappings we just made, unused.
            unsafe {
                libc::munmap(exec as *mut libc::c_void, len);
                libc::munmap(write.cast(), len);
            }
            return None;
        }
        Some(Chunk {
            exec,
            write,
            len,
            free: (0..(len / slot_size) as u32).rev().collect(),
            _fd: fd,
        })
    }
}

/// Whether every byte of `[start, start + len)` is within [`XOL_CHUNK_REACH`] of
/// `near`.
pub(super) fn is_near(start: u64, len: u64, near: u64) -> bool {
    let end = start.saturating_add(len);
    start.abs_diff(near) <= XOL_CHUNK_REACH && end.abs_diff(near) <= XOL_CHUNK_REACH
}

pub(super) fn memfd() -> Option<OwnedFd> {
    let name = c"rcu-registry-xol";
    for flags in [libc::MFD_CLOEXEC | MFD_EXEC, libc::MFD_CLOEXEC] {
        // SAFETY: `name` is a valid C string; the flags are plain integers.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: a fresh descriptor we own.
            return Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    None
}

/// Maps the chunk (`len` bytes) read-execute at exactly `hint`
/// (`MAP_FIXED_NOREPLACE`), or anywhere when `hint` is 0. `want_flags` adds
/// flags.
fn map_exec(fd: &OwnedFd, len: usize, hint: u64, want_flags: libc::c_int) -> Option<u64> {
    // SAFETY: a shared mapping of our own memfd; with MAP_FIXED_NOREPLACE
    // the kernel fails instead of replacing an existing mapping, and the
    // address is checked below in case an old kernel treated it as a hint.
    let p = unsafe {
        libc::mmap(
            hint as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_SHARED | want_flags,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    if hint != 0 && p as u64 != hint {
        // SAFETY: the mapping we just made, at the wrong place.
        unsafe { libc::munmap(p, len) };
        return None;
    }
    Some(p as u64)
}

/// Maps the chunk (`len` bytes, a power of two) in the free gap closest to
/// `near`, within reach.
fn map_exec_near(fd: &OwnedFd, len: usize, near: u64) -> Option<u64> {
    let maps = Maps::read().ok()?;
    maps.places_near(near, len as u64, XOL_CHUNK_REACH, MIN_ADDR, MAX_ADDR)
        .into_iter()
        .take(16)
        .find_map(|c| map_exec(fd, len, c, libc::MAP_FIXED_NOREPLACE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn here() -> u64 {
        here as fn() -> u64 as usize as u64
    }

    #[test]
    fn a_chunk_mapped_near_code_is_within_reach_all_free_and_all_int3() {
        for len in [XOL_CHUNK_BYTES, XOL_CHUNK_MAX_BYTES] {
            let c = Chunk::map(len, 64, Some(here())).expect("a gap within reach");
            assert!(is_near(c.exec, len as u64, here()), "{:#x}", c.exec);
            assert_eq!(c.exec % len as u64, 0, "aligned to its size");
            assert_eq!((c.len, c.free.len()), (len, len / 64));
            assert_eq!(c.free.last(), Some(&0), "the lowest slot is popped first");
            // SAFETY: the exec view is `len` bytes long and readable.
            let bytes = unsafe { std::slice::from_raw_parts(c.exec as *const u8, len) };
            assert!(bytes.iter().all(|&b| b == FILL));
        }
    }

    #[test]
    fn chunks_double_from_the_smallest_to_the_largest() {
        let sizes: Vec<usize> = (0..9).map(chunk_bytes).collect();
        assert_eq!(sizes[0], XOL_CHUNK_BYTES);
        assert!(sizes
            .windows(2)
            .all(|w| w[1] == (w[0] * 2).min(XOL_CHUNK_MAX_BYTES)));
        assert_eq!(sizes[8], XOL_CHUNK_MAX_BYTES);
        // 100,000 slots of 64 bytes fit in the first seven.
        assert!(sizes[..7].iter().sum::<usize>() >= 100_000 * 64);
    }

    #[test]
    fn no_chunk_is_mapped_near_code_that_no_gap_is_within_reach_of() {
        // The non-canonical hole: nothing can be mapped within reach.
        let far = Some(0x8000_0000_0000_0000);
        assert!(Chunk::map(XOL_CHUNK_BYTES, 64, far).is_none());
        assert!(
            Chunk::map(XOL_CHUNK_BYTES, 64, None).is_some(),
            "anywhere still works"
        );
    }
}
