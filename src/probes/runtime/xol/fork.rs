//! Private XOL chunks for a `fork()` child.
//!
//! A chunk is a `memfd` mapped `MAP_SHARED` twice (`chunk.rs`), so a child
//! process would share it with its parent: a slot the parent recycles or
//! refills would change under the child's threads, and the other way round.
//! The runtime's fork handlers (`fork.rs` of the runtime) therefore give the
//! child its own copy of every chunk:
//!
//! 1. **prepare** (in the parent, before `fork`, holding every live area's
//!    mutex, so no slot byte changes until the fork is done): for each
//!    chunk ever mapped, a new memfd holding a copy of its bytes
//!    ([`Copies::prepare`]);
//! 2. **child**: each copy is mapped `MAP_FIXED` over both views of its chunk
//!    and its descriptor closed ([`Copies::install_in_child`]): two `mmap`s
//!    and a `close` per chunk, raw system calls, no allocation, no lock;
//! 3. **parent**: the copies' descriptors are closed ([`Copies::discard`]).
//!
//! The child's chunks are then private files at the same addresses with the
//! same bytes: a thread that was interrupted inside a slot (the forking
//! thread, if `fork` was called from a signal handler that interrupted a
//! slot) resumes into identical code. The parent's mappings are untouched.
//!
//! Chunks are found through a process-wide, append-only list of their two
//! views ([`record`]), filled when a chunk is mapped and read lock-free
//! here, for every [`XolArea`] of the process (chunks are
//! never unmapped, so every entry stays valid).

use std::os::fd::{AsRawFd, OwnedFd};

use super::{Areas, XolArea};
use crate::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use crate::sync::MutexGuard;

/// An area's mutex, held across a `fork` (see the runtime's `fork.rs`).
pub(crate) struct AreaHold<'a> {
    _guard: MutexGuard<'a, Areas>,
}

impl XolArea {
    /// Takes the area's mutex for the fork handlers: while it is held no
    /// slot is handed out, filled or reset and no chunk is mapped, so the
    /// chunks can be copied and the child inherits consistent state.
    pub(crate) fn hold_for_fork(&self) -> AreaHold<'_> {
        AreaHold {
            _guard: self.lock(),
        }
    }
}

/// Most chunks a process maps (256 GiB of slots at the largest size).
pub(super) const MAX_CHUNKS: usize = 1 << 16;

/// One mapped chunk: its exec view (0 until published), write view and
/// length.
struct Mapped {
    exec: AtomicU64,
    write: AtomicU64,
    len: AtomicU64,
}

static MAPPED: [Mapped; MAX_CHUNKS] = [const {
    Mapped {
        exec: AtomicU64::new(0),
        write: AtomicU64::new(0),
        len: AtomicU64::new(0),
    }
}; MAX_CHUNKS];
/// Entries reserved so far (may exceed [`MAX_CHUNKS`] after refusals).
static RESERVED: AtomicUsize = AtomicUsize::new(0);

/// Lists a newly mapped chunk, before any of its slots is handed out.
/// Returns false if the list is full (the caller unmaps the chunk).
pub(super) fn record(exec: u64, write: *mut u8, len: usize) -> bool {
    // Relaxed: the index only needs to be unique.
    let i = RESERVED.fetch_add(1, Ordering::Relaxed);
    let Some(m) = MAPPED.get(i) else {
        return false;
    };
    // Relaxed: published by the Release store of `exec` below.
    m.write.store(write as u64, Ordering::Relaxed);
    m.len.store(len as u64, Ordering::Relaxed);
    // Release pairs with the Acquire load in `Copies::prepare`: an entry
    // seen with its exec view has its write view and length too.
    m.exec.store(exec, Ordering::Release);
    true
}

/// A private copy of one chunk, made in the parent before `fork`.
struct Copy {
    exec: u64,
    write: u64,
    len: usize,
    fd: OwnedFd,
}

/// Private copies of every chunk, made before a `fork`.
pub(crate) struct Copies {
    copies: Vec<Copy>,
    /// A chunk could not be copied (out of memory or descriptors).
    failed: bool,
}

impl Copies {
    /// Copies every chunk mapped so far into a new memfd. The caller holds
    /// every live area's mutex, so no slot is being filled or reset.
    pub(crate) fn prepare() -> Copies {
        let n = RESERVED.load(Ordering::Relaxed).min(MAX_CHUNKS);
        let mut copies = Vec::with_capacity(n);
        let mut failed = false;
        for m in &MAPPED[..n] {
            // Acquire pairs with the Release store in `record`.
            let exec = m.exec.load(Ordering::Acquire);
            if exec == 0 {
                // Reserved by a thread still mapping it: none of its slots
                // is handed out yet (the area's mutex, held by our caller,
                // is taken before the chunk joins an area).
                continue;
            }
            // Relaxed: ordered by the Acquire load of `exec` above.
            let write = m.write.load(Ordering::Relaxed);
            let len = m.len.load(Ordering::Relaxed) as usize;
            match copy_of(write as *const u8, len) {
                Some(fd) => copies.push(Copy {
                    exec,
                    write,
                    len,
                    fd,
                }),
                None => failed = true,
            }
        }
        Copies { copies, failed }
    }

    /// In the child: maps each copy over both views of its chunk, so the
    /// child owns every slot. Raw system calls only (no allocation, no
    /// lock); aborts with a message if a chunk cannot be made private,
    /// rather than let two processes share slots.
    pub(crate) fn install_in_child(self) {
        if self.failed {
            die(b"rcu-registry: fork: could not copy the XOL slots for the child\n");
        }
        for c in &self.copies {
            let fd = c.fd.as_raw_fd();
            let exec = map_fixed(c.exec, c.len, libc::PROT_READ | libc::PROT_EXEC, fd);
            let write = map_fixed(c.write, c.len, libc::PROT_READ | libc::PROT_WRITE, fd);
            if !(exec && write) {
                die(b"rcu-registry: fork: could not map the child's XOL slots\n");
            }
        }
        // Dropping closes the descriptors (the mappings keep the files) and
        // frees the vector: the C library's allocator is usable in a child.
        drop(self);
    }

    /// In the parent: the copies are not needed.
    pub(crate) fn discard(self) {
        drop(self);
    }
}

/// A new memfd holding the `len` bytes at `src`.
fn copy_of(src: *const u8, len: usize) -> Option<OwnedFd> {
    let fd = super::chunk::memfd()?;
    // SAFETY: ftruncate on a memfd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return None;
    }
    let mut done = 0usize;
    while done < len {
        // SAFETY: `src` is the write view of a chunk, `len` readable bytes
        // for the life of the process; `done < len`.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                src.add(done).cast(),
                len - done,
                done as libc::off_t,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return None;
        }
        if n == 0 {
            return None;
        }
        done += n as usize;
    }
    Some(fd)
}

/// Maps `fd` (a whole chunk of `len` bytes) at exactly `at`, replacing
/// what is there.
fn map_fixed(at: u64, len: usize, prot: libc::c_int, fd: libc::c_int) -> bool {
    // The new mapping has the same size, protection and bytes as the view it
    // replaces (MAP_FIXED swaps it atomically), so every pointer into the old
    // view sees the same memory.
    // SAFETY: `at` is one whole view of a chunk, mapped for the process's life.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    p as u64 == at
}

/// Writes `msg` to standard error and aborts (a child that would share
/// slots with its parent must not run on).
fn die(msg: &[u8]) -> ! {
    // SAFETY: writing a static buffer to fd 2; the result does not matter.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    std::process::abort()
}
