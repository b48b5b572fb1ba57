//! [`InProcess`]: the running process's own code as a [`TextMemory`]. The
//! protocol (protection changes, checked writes, int3-first patches, core
//! syncs, reads) is documented on the type, where rustdoc shows it.

use std::sync::OnceLock;

use crate::probes::error::{CodeBytes, TextFailure};
use crate::probes::runtime::maps::MapsQuery;
use crate::probes::runtime::poke::{catcher, peek, poke, Catcher};
use crate::probes::text::{TextIdentity, TextMemory, TextWrite};
use crate::probes::ProbeError;
use crate::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use crate::sync::Mutex;
use crate::sys::{
    sys_membarrier as membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, MEMBARRIER_CMD_QUERY,
    MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
};

#[cfg(target_arch = "x86_64")]
use crate::probes::text::patch_window::{PatchWindow, INT3};

/// Serializes every code write and protection change of the process (all
/// `InProcess` values share it: page protection is process-wide state),
/// and owns the open maps file the writes ask for page protections.
static TEXT_LOCK: Mutex<MapsQuery> = Mutex::new(MapsQuery::new());

/// The text lock, held.
pub(crate) type TextLockGuard = crate::sync::MutexGuard<'static, MapsQuery>;

/// Takes the text lock for the live runtime's fork handlers, so that no
/// patch is half-done (protection changed, bytes half-written) when the
/// process forks and the child's lock is free.
pub(crate) fn hold_text_lock_for_fork() -> TextLockGuard {
    TEXT_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The in-progress marker of this process's int3-first patches, read by
/// the SIGTRAP handler (see [`PatchWindow`]).
#[cfg(target_arch = "x86_64")]
pub(crate) static PATCH_WINDOW: PatchWindow = PatchWindow::new();

/// A range of code the live runtime must never patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusedRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// What the code is, for the error message.
    pub what: &'static str,
}

/// The running process's code, patched in place.
///
/// # Making code writable, and exactly as it was afterwards
///
/// Code pages are mapped read-execute. A write looks the range up in
/// `/proc/self/maps` (the only place Linux reports a page's protection:
/// one `PROCMAP_QUERY` ioctl per mapping the range touches, or, on kernels
/// before 6.11, a read of the whole file; asked afresh for every write, so
/// any mapping, a JIT's anonymous code included, is seen as it is now),
/// adds `PROT_WRITE` to every page it touches with `mprotect`, writes, and
/// puts back the protection each page had before, run by run, so a page that
/// was `r-x` is `r-x` again and one that was (unusually) `rwx` stays `rwx`.
/// Shared file mappings are refused: writing them would change the file.
/// Every protection change of this crate goes through one process-wide lock
/// (`TEXT_LOCK`), so two writers never interleave their
/// "read protection, change, restore" sequences.
///
/// # Checked writes
///
/// Under that lock the current bytes are compared with the caller's
/// expected old bytes first; on a mismatch nothing is written
/// ([`ProbeError::AlreadyPatched`]). A range that overlaps code the live
/// runtime must never patch (see [`RefusedRange`]) is refused before
/// anything else ([`ProbeError::RefusedTarget`]).
///
/// # Patching code other threads are running: int3 first
///
/// A thread may fetch the instruction being replaced at any moment. On x86
/// a one-byte store is atomic with respect to instruction fetch, so writing
/// or removing a breakpoint (`int3`, one byte) is safe as is. A multi-byte
/// patch is not: a thread could execute the first bytes of the old
/// instruction and the last bytes of the new one. Patches whose bytes other
/// than the first change therefore follow the protocol the kernel's
/// `text_poke_bp` uses:
///
/// 1. write `int3` over byte 0, then *sync all cores*;
/// 2. write bytes `1..n`, sync all cores;
/// 3. write the new byte 0, sync all cores.
///
/// While the `int3` is there, a thread reaching the instruction traps; the
/// runtime's SIGTRAP handler sees that a patch is in progress at that address
/// (or that the `int3` is already gone) and resumes the thread at the same
/// address, where it traps again until step 3 is done and then runs the new
/// instruction whole. The handler reads "in progress" and the code byte
/// inside one [`PatchWindow`] (a sequence count each patch makes odd for
/// its duration), so a patch that ends or begins while it looks (patches at
/// one address can follow each other back to back) never makes it call our
/// `int3` foreign. No thread ever runs a mix of old and new bytes. The
/// protocol assumes what the kernel's assumes: `[addr, addr + n)` is one
/// instruction before and after, so no thread is stopped *inside* it.
///
/// # Syncing cores
///
/// "Sync all cores" is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`:
/// every CPU running a thread of this process executes a core-serializing
/// instruction before it returns to user space, so it drops any stale
/// prefetched copy of the code (Intel SDM vol. 3, 8.1.3, cross-modifying
/// code). It is also what [`TextMemory::sync_icache`] does, so a breakpoint
/// written by a registry is seen by every thread before `register` returns:
/// that is what makes hit counts exact. Where the command is unavailable the
/// fallback is `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (an IPI to every CPU
/// running our threads; the interrupt return is serializing on x86), and
/// without any membarrier the TLB shootdown IPIs of the `mprotect` that
/// removes `PROT_WRITE` again serve the same purpose.
///
/// # Reads
///
/// Reads use `process_vm_readv` on our own pid: an unmapped address gives
/// [`ProbeError::TextAccess`] instead of a crash, with no allocation and no
/// lock, so a trap handler may read too. Where the call is forbidden
/// (seccomp) reads fall back to a plain copy, which trusts the caller's
/// address.
///
/// # Batches
///
/// [`write_many`](TextMemory::write_many) and
/// [`read_many`](TextMemory::read_many) (a registration of thousands of
/// probes, the pending probes of a `dlopen`) move their bytes with plain
/// byte loads and stores whose faults the runtime's fault handler turns
/// into errors (the kernel's exception-table idea: a `dlclose` unmapping
/// the text meanwhile is [`ProbeError::TextGone`], not a crash), where that
/// handler is installed and this thread does not block SIGSEGV or SIGBUS;
/// elsewhere, vectored `process_vm_readv`/`writev` calls. A batch reads
/// every current byte before it writes the first one and allocates nothing
/// while it writes: once a breakpoint is in, the allocator itself may be
/// probed (a batch over the C library) and each allocation would trap.
/// Groups of writes up to 1 MiB apart are made writable as one span when
/// every page between them is code (one protection change for a
/// library's text instead of one per cluster); otherwise group by group,
/// and a group whose pages cannot be made writable write by write, so a
/// bad write fails alone.
///
/// # Example
///
/// ```no_run
/// use rcu_registry::probes::runtime::InProcess;
/// use rcu_registry::probes::text::TextMemory;
///
/// #[inline(never)]
/// extern "C" fn answer() -> u32 { 42 }
///
/// let text = InProcess::new();
/// let mut first = [0u8; 1];
/// text.read(answer as usize as u64, &mut first).unwrap();
/// ```
#[derive(Clone, Debug, Default)]
pub struct InProcess {
    /// Sorted by start (a write looks its range up by binary search: the
    /// trap path's refusals are thousands of ranges).
    refused: Vec<RefusedRange>,
    /// `refused_end[i]`: the largest end among `refused[..=i]` (ranges may
    /// overlap).
    refused_end: Vec<u64>,
    /// The registry writing through this text, as `holders.rs` knows it (0:
    /// none): a breakpoint found here is named by the *other* owners.
    owner: u64,
}

impl InProcess {
    /// The process's text with no refused range. Installs the runtime's
    /// SIGTRAP handler (the int3-first protocol needs it) and registers the
    /// process for core-serializing membarriers.
    pub fn new() -> InProcess {
        crate::probes::runtime::signal::install();
        sync_core_init();
        InProcess {
            refused: Vec::new(),
            refused_end: Vec::new(),
            owner: 0,
        }
    }

    /// The same text, written by the registry `owner` (`holders.rs`).
    pub(crate) fn owned_by(mut self, owner: u64) -> InProcess {
        self.owner = owner;
        self
    }

    /// Adds a range every write must stay out of.
    pub fn refuse(self, range: RefusedRange) -> InProcess {
        self.refuse_all([range])
    }

    /// Adds several refused ranges.
    pub fn refuse_all(mut self, ranges: impl IntoIterator<Item = RefusedRange>) -> InProcess {
        self.refused.extend(ranges);
        self.refused.sort_by_key(|r| (r.start, r.end));
        self.refused_end = self
            .refused
            .iter()
            .scan(0, |max, r| {
                *max = r.end.max(*max);
                Some(*max)
            })
            .collect();
        self
    }

    /// The refused ranges, by start address.
    pub fn refused(&self) -> &[RefusedRange] {
        &self.refused
    }

    /// A refused range overlapping `[addr, addr + len)`, if any.
    pub fn refused_at(&self, addr: u64, len: usize) -> Option<&RefusedRange> {
        let end = addr.saturating_add(len.max(1) as u64);
        // The ranges starting before `end`; one of them overlaps exactly
        // when the largest end among them is past `addr`.
        let below = self.refused.partition_point(|r| r.start < end);
        if below == 0 || self.refused_end[below - 1] <= addr {
            return None;
        }
        // Of the overlapping ranges with the greatest start, the one added
        // first names the refusal (`refuse.rs` adds the broad names first;
        // the sort is stable, so equal ranges keep the order they came in).
        let (i, hit) = self.refused[..below]
            .iter()
            .enumerate()
            .rev()
            .find(|(_, r)| addr < r.end)?;
        let first = self.refused[..i]
            .iter()
            .rev()
            .take_while(|r| r.start == hit.start)
            .filter(|r| addr < r.end)
            .last();
        Some(first.unwrap_or(hit))
    }

    /// Writes `new` over `current` at `addr`: the page must already be
    /// writable, `TEXT_LOCK` held.
    ///
    /// A `dlclose` on another thread may unmap the text between the
    /// protection change and the write (the loader takes none of our
    /// locks), and a plain store would then kill the process with SIGSEGV.
    /// With `catcher` (the runtime's fault handler is there to catch it)
    /// each step is a [`poke`](super::poke): a store whose fault returns an
    /// error. Without, each step is one `process_vm_writev` of our own
    /// memory, which reports the unmapping as `EFAULT`. Either way that is
    /// [`ProbeError::TextGone`] (nothing was written: the mapping is gone).
    /// A one-byte write is one byte store, atomic against instruction fetch
    /// on x86. Where the system call is forbidden (seccomp) and there is no
    /// catcher, the bytes are stored directly, as before.
    #[cfg(target_arch = "x86_64")]
    fn store(
        catcher: Option<&Catcher>,
        addr: u64,
        current: &[u8],
        new: &[u8],
    ) -> Result<(), ProbeError> {
        let put = |addr, bytes: &[u8]| put(catcher, addr, bytes);
        let tail_changes = current[1..] != new[1..];
        if !tail_changes {
            put(addr, &new[..1])?;
            sync_cores();
            return Ok(());
        }
        PATCH_WINDOW.open(addr);
        // Each step is followed by a core sync so that no thread holds a
        // stale copy across steps, and between steps 1 and 3 byte 0 is int3,
        // which parks every thread.
        let steps = (|| {
            put(addr, &[INT3])?;
            sync_cores();
            // Bytes 1..n are not executed while the int3 guards the
            // instruction's start.
            put(addr + 1, &new[1..])?;
            sync_cores();
            // The final one-byte write releases the threads.
            put(addr, &new[..1])?;
            sync_cores();
            Ok(())
        })();
        PATCH_WINDOW.close();
        steps
    }
}

impl InProcess {
    /// Writes `new` over `current` at `addr` (arm64): the page must already
    /// be writable, `TEXT_LOCK` held.
    ///
    /// Every arm64 instruction is one aligned word, and `put` stores each
    /// aligned word with one single-copy atomic store followed by its cache
    /// maintenance, so a thread fetching it runs the old instruction or the
    /// new one, never a mix: no int3-first protocol. Then every core is
    /// synced, so no thread keeps running a stale copy.
    ///
    /// What the architecture promises here is narrower than on x86: the
    /// Arm ARM guarantees concurrent modification and execution only when
    /// both the old and the new instruction are among `b`, `bl`, `brk`,
    /// `nop`, `isb`, `svc`, `hvc`, `smc` (and the compare/test branches);
    /// replacing any other instruction with `brk` while another core runs
    /// it is, architecturally, constrained unpredictable (Linux's own
    /// kprobes patch under `stop_machine`; its uprobes swap the whole page).
    /// Under qemu-user every store to code invalidates the translated
    /// blocks of its page at once, so the emulated runs cannot show the
    /// difference (docs/limitations).
    #[cfg(target_arch = "aarch64")]
    fn store(
        catcher: Option<&Catcher>,
        addr: u64,
        current: &[u8],
        new: &[u8],
    ) -> Result<(), ProbeError> {
        debug_assert_eq!(current.len(), new.len());
        put(catcher, addr, new)?;
        sync_cores();
        Ok(())
    }
}

/// How `put` writes (and whether a batch may use `process_vm_writev`):
/// arm64 never writes code with the system call (see its `put`).
static WRITE_MODE: AtomicU8 = AtomicU8::new(if cfg!(target_arch = "aarch64") {
    WRITE_DIRECT
} else {
    WRITE_VM
});
const WRITE_VM: u8 = 0;
const WRITE_DIRECT: u8 = 1;

/// Writes `bytes` at `addr` of our own (writable) text (arm64): with a
/// catcher, [`poke`] (word stores whose faults return an error, each with
/// its cache maintenance); without one, the same stores made directly
/// (`process_vm_writev` is not used on arm64: the kernel's copy is not
/// single-copy atomic per instruction word, and under qemu-user a write by
/// the host kernel bypasses the emulator's detection of changed code). A
/// `dlclose` unmapping the text meanwhile then kills the process, as the
/// x86_64 fallback for a forbidden system call does.
#[cfg(target_arch = "aarch64")]
fn put(catcher: Option<&Catcher>, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
    if let Some(c) = catcher {
        // SAFETY: the caller made the range writable and holds TEXT_LOCK; a
        // fault (the text unmapped meanwhile) is caught (`c`).
        return unsafe { poke(c, addr, bytes) }.map_err(|_| ProbeError::TextGone { addr });
    }
    // SAFETY: the caller made the range writable and holds TEXT_LOCK.
    unsafe { super::cache::store_code(addr, bytes) };
    Ok(())
}

/// Writes `bytes` at `addr` of our own (writable) text: see
/// `InProcess::store`.
#[cfg(target_arch = "x86_64")]
fn put(catcher: Option<&Catcher>, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
    if let Some(c) = catcher {
        // SAFETY: the caller made the range writable and holds TEXT_LOCK; a
        // fault (the text unmapped meanwhile) is caught (`c`).
        return unsafe { poke(c, addr, bytes) }.map_err(|_| ProbeError::TextGone { addr });
    }
    // Relaxed: a sticky hint; either mode writes the same bytes.
    if WRITE_MODE.load(Ordering::Relaxed) == WRITE_VM {
        // SAFETY: `bytes` is a live slice; the kernel checks `addr`.
        let n = unsafe { crate::sys::process_vm_writev_self(bytes.as_ptr(), addr, bytes.len()) };
        match n {
            n if n == bytes.len() as isize => return Ok(()),
            n if n == -(libc::EFAULT as isize) => return Err(ProbeError::TextGone { addr }),
            n if n == -(libc::EPERM as isize) || n == -(libc::ENOSYS as isize) => {
                // Relaxed: as above.
                WRITE_MODE.store(WRITE_DIRECT, Ordering::Relaxed);
            }
            n => {
                return Err(ProbeError::TextAccess {
                    addr,
                    len: bytes.len(),
                    failure: TextFailure::Os {
                        op: "process_vm_writev",
                        errno: i32::try_from(-n).unwrap_or(0),
                    },
                })
            }
        }
    }
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: the caller made the range writable and holds TEXT_LOCK;
        // only here, where the system call is forbidden, a concurrent unmap
        // would fault.
        unsafe { (addr as *mut u8).add(i).write_volatile(b) };
    }
    Ok(())
}

fn os_error(addr: u64, len: usize, op: &'static str) -> ProbeError {
    ProbeError::TextAccess {
        addr,
        len,
        failure: TextFailure::Os {
            op,
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        },
    }
}

fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    // SAFETY: sysconf only reads a configuration value.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64)
}

/// Changes the protection of `[start, end)` (page aligned).
fn mprotect(start: u64, end: u64, prot: libc::c_int) -> bool {
    // SAFETY: the range covers whole pages of existing mappings (checked
    // against the memory map under TEXT_LOCK); adding PROT_WRITE or
    // restoring the previous protection does not invalidate any reference.
    unsafe { libc::mprotect(start as *mut libc::c_void, (end - start) as usize, prot) == 0 }
}

impl TextMemory for InProcess {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        read_text(addr, buf)
    }

    /// Byte loads that survive an unmapped page (`poke::peek`) where the
    /// runtime's fault handler is installed, else a few vectored
    /// `process_vm_readv` calls; a piece that cannot be read is read again
    /// alone, for its error.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), ProbeError>> {
        let addrs: Vec<u64> = reads.iter().map(|r| r.0).collect();
        let lens: Vec<usize> = reads.iter().map(|r| r.1.len()).collect();
        let mut all = vec![0u8; lens.iter().sum()];
        let catcher = if reads.is_empty() { None } else { catcher() };
        let done = read_pieces(catcher.as_ref(), &mut all, &addrs, &lens);
        let mut off = 0;
        reads
            .iter_mut()
            .zip(done)
            .map(|((addr, buf), ok)| {
                let got = &all[off..off + buf.len()];
                off += buf.len();
                if ok {
                    buf.copy_from_slice(got);
                    Ok(())
                } else {
                    read_text(*addr, buf)
                }
            })
            .collect()
    }

    fn holder_at(&self, addr: u64) -> Option<String> {
        super::holders::holder_at(addr, self.owner)
    }

    fn write(&self, addr: u64, expected_old: &[u8], new: &[u8]) -> Result<(), ProbeError> {
        self.write_checked(Identity::Ignore, addr, expected_old, new)
            .map(drop)
    }

    fn identity(&self, addr: u64) -> Result<Option<TextIdentity>, ProbeError> {
        let mut maps = TEXT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        maps.identity(addr).map_err(|e| maps_error(addr, 1, &e))
    }

    /// The identity is asked under the same lock as the write's protection
    /// lookup, just before it (one more `PROCMAP_QUERY`).
    fn write_in(
        &self,
        identity: &TextIdentity,
        addr: u64,
        expected_old: &[u8],
        new: &[u8],
    ) -> Result<(), ProbeError> {
        self.write_checked(Identity::Check(identity), addr, expected_old, new)
            .map(drop)
    }

    /// The identity comes from the write's own memory-map snapshot.
    fn write_identified(
        &self,
        addr: u64,
        expected_old: &[u8],
        new: &[u8],
    ) -> Result<TextIdentity, ProbeError> {
        match self.write_checked(Identity::Report, addr, expected_old, new)? {
            Some(id) => Ok(id),
            None => Err(ProbeError::TextGone { addr }),
        }
    }

    /// Writes whose pages touch share one protection change; one-byte
    /// writes share one core sync (see `write_batch`).
    fn write_many(&self, writes: &[TextWrite<'_>]) -> Vec<Result<(), ProbeError>> {
        self.write_batch(writes)
    }

    fn sync_icache(&self, _addr: u64, _len: usize) -> Result<(), ProbeError> {
        sync_cores();
        Ok(())
    }
}

/// The error a write at `addr` reports when the memory map cannot be read.
fn maps_error(addr: u64, len: usize, e: &std::io::Error) -> ProbeError {
    ProbeError::TextAccess {
        addr,
        len,
        failure: TextFailure::Os {
            op: "read /proc/self/maps",
            errno: e.raw_os_error().unwrap_or(0),
        },
    }
}

/// What a write does with the identity of the text it writes.
#[derive(Clone, Copy)]
enum Identity<'a> {
    /// Nothing.
    Ignore,
    /// Refuses ([`ProbeError::TextGone`]) unless it is this one (checked
    /// before the bytes).
    Check(&'a TextIdentity),
    /// Returns it (`None`: nothing is mapped at the address).
    Report,
}

impl InProcess {
    /// A checked write, doing with the identity what `identity` says (one
    /// memory-map snapshot for that and the protections).
    fn write_checked(
        &self,
        identity: Identity<'_>,
        addr: u64,
        expected_old: &[u8],
        new: &[u8],
    ) -> Result<Option<TextIdentity>, ProbeError> {
        let len = new.len();
        if len == expected_old.len() && len == 0 && matches!(identity, Identity::Ignore) {
            return Ok(None);
        }
        let end = self.precheck(addr, expected_old, new)?;
        // A poisoned lock guards nothing inconsistent: every write restores
        // the protections before it can panic-free return.
        let mut maps = TEXT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // With an identity to check or report, the mapping is asked first: a
        // replaced or unmapped text is `TextGone`, whatever bytes it holds.
        let mut found = None;
        if !matches!(identity, Identity::Ignore) {
            found = maps.identity(addr).map_err(|e| maps_error(addr, len, &e))?;
            if let Identity::Check(want) = identity {
                if found.as_ref() != Some(want) {
                    return Err(ProbeError::TextGone { addr });
                }
            }
        }
        if len == 0 {
            return Ok(found);
        }
        let mut current = [0u8; CodeBytes::CAPACITY];
        let mut current_vec;
        let current: &mut [u8] = if len <= current.len() {
            &mut current[..len]
        } else {
            current_vec = vec![0u8; len];
            &mut current_vec
        };
        if !holds(addr, expected_old, new, current)? {
            return Ok(found);
        }
        let (pstart, pend) = page_span(addr, end);
        let mut runs = Vec::new();
        make_writable(&mut maps, pstart, pend, addr, len, &mut runs)?;
        // One write: the system call (a catcher would cost more system
        // calls than it saves; batches take one for all their writes).
        let stored = InProcess::store(None, addr, current, new);
        let restore_failed = restore_protection(&runs, addr, len);
        // Unmapped under the write (`TextGone`): the restores failed too, and
        // there is nothing left to undo.
        stored?;
        if let Some(err) = restore_failed {
            // Only reachable when the kernel cannot split the mapping (out of
            // memory or map count): undo the bytes so the error changes
            // nothing readable, and report. The page is left writable.
            let _ = InProcess::store(None, addr, new, current);
            return Err(err);
        }
        Ok(found)
    }
}

impl InProcess {
    /// The checks every write makes before it takes the text lock: equal
    /// lengths, no refused code, no address overflow. Returns the end.
    fn precheck(&self, addr: u64, expected_old: &[u8], new: &[u8]) -> Result<u64, ProbeError> {
        if expected_old.len() != new.len() {
            return Err(ProbeError::PatchLengthMismatch {
                expected: expected_old.len(),
                new: new.len(),
            });
        }
        let len = new.len();
        if let Some(r) = self.refused_at(addr, len) {
            return Err(ProbeError::RefusedTarget {
                addr: addr.max(r.start),
                what: r.what,
            });
        }
        addr.checked_add(len as u64).ok_or(ProbeError::TextAccess {
            addr,
            len,
            failure: TextFailure::OutOfRange,
        })
    }

    /// [`TextMemory::write_many`]: under one hold of the text lock, the
    /// writes whose pages touch go together (one protection lookup and
    /// change for the run of pages), and one-byte changes (breakpoints in
    /// and out) share one core sync at the end instead of one each.
    ///
    /// Everything the writing loop needs is allocated before its first
    /// write (the current bytes of every write are read up front, the
    /// groups planned, the protection buffer reserved): once a breakpoint
    /// is in, the allocator itself may be probed (a batch over the C
    /// library), and each allocation would be a trap.
    fn write_batch(&self, writes: &[TextWrite<'_>]) -> Vec<Result<(), ProbeError>> {
        let mut out: Vec<Result<(), ProbeError>> = Vec::with_capacity(writes.len());
        let mut order: Vec<usize> = Vec::with_capacity(writes.len());
        for (i, w) in writes.iter().enumerate() {
            out.push(self.precheck(w.addr, w.old, w.new).map(drop));
            if out[i].is_ok() && !w.new.is_empty() {
                order.push(i);
            }
        }
        if order.is_empty() {
            return out;
        }
        order.sort_by_key(|&i| writes[i].addr);
        let catcher = catcher();
        let catcher = catcher.as_ref();
        // A poisoned lock guards nothing inconsistent (see `write_checked`).
        let mut maps = TEXT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // The current bytes, read in a few vectored calls (a piece that
        // cannot be read is read again alone, for its error), and which
        // writes are needed.
        let lens: Vec<usize> = order.iter().map(|&i| writes[i].old.len()).collect();
        let addrs: Vec<u64> = order.iter().map(|&i| writes[i].addr).collect();
        let mut current = vec![0u8; lens.iter().sum()];
        let read = read_pieces(catcher, &mut current, &addrs, &lens);
        let mut needed = vec![false; order.len()];
        let mut off = 0;
        for (n, &i) in order.iter().enumerate() {
            let w = &writes[i];
            let cur = &mut current[off..off + w.old.len()];
            off += w.old.len();
            let ok = if read[n] {
                check_holds(w.addr, w.old, w.new, cur)
            } else {
                holds(w.addr, w.old, w.new, cur)
            };
            match ok {
                Ok(true) => needed[n] = true,
                Ok(false) => {}
                Err(e) => out[i] = Err(e),
            }
        }
        // The groups: runs `[first, end)` of `order` whose page spans touch
        // or overlap, with their pages.
        let mut groups: Vec<(usize, usize, u64, u64)> = Vec::new();
        for (n, &i) in order.iter().enumerate() {
            let w = &writes[i];
            let (s, e) = page_span(w.addr, w.addr + w.new.len() as u64);
            match groups.last_mut() {
                Some(g) if s <= g.3 => {
                    g.1 = n + 1;
                    g.3 = g.3.max(e);
                }
                _ => groups.push((n, n + 1, s, e)),
            }
        }
        let mut batch = Batch {
            catcher,
            writes,
            order: &order,
            needed: &needed,
            out: &mut out,
            runs: Vec::with_capacity(8),
            sync: false,
        };
        // Groups close together (a library's functions) are made writable
        // together, with one protection lookup and two `mprotect` calls for
        // all (each call is a mapping split or merge and a TLB shootdown);
        // pages between them that nothing writes are restored as they were.
        // A span that cannot be (not all code: a hole in the memory map, a
        // data page) is done group by group, and a group that cannot be
        // made writable (one of its pages unmapped) write by write, so a
        // bad write fails alone.
        let mut g = 0;
        while g < groups.len() {
            let mut h = g + 1;
            while h < groups.len() && groups[h].2 - groups[h - 1].3 <= MERGE_GAP {
                h += 1;
            }
            let (start, end) = (groups[g].2, groups[h - 1].3);
            let needs = |grp: &(usize, usize, u64, u64)| needed[grp.0..grp.1].contains(&true);
            if h - g > 1
                && groups[g..h].iter().any(needs)
                && make_code_writable(&mut maps, start, end, &mut batch.runs)
            {
                for grp in &groups[g..h] {
                    batch.write_members(grp.0..grp.1);
                }
                batch.restore(start, end, groups[g].0..groups[h - 1].1);
            } else {
                for &(first, last, gstart, gend) in groups[g..h].iter().filter(|grp| needs(grp)) {
                    if let Err(e) = batch.write_span(&mut maps, first..last, gstart, gend) {
                        if last - first == 1 {
                            batch.fail(first..last, &e);
                            continue;
                        }
                        for n in (first..last).filter(|&n| needed[n]) {
                            let w = &writes[order[n]];
                            let (s, e) = page_span(w.addr, w.addr + w.new.len() as u64);
                            if let Err(e) = batch.write_span(&mut maps, n..n + 1, s, e) {
                                batch.fail(n..n + 1, &e);
                            }
                        }
                    }
                }
            }
            g = h;
        }
        let sync = batch.sync;
        drop(maps);
        if sync {
            sync_cores();
        }
        out
    }
}

/// Largest gap between two groups of a write batch that are made writable
/// together (a library's text is one mapping; further apart is usually
/// another library, with a hole between).
const MERGE_GAP: u64 = 1 << 20;

/// [`make_writable`] on a span of several write groups, only if every page
/// of it is mapped executable (code: the pages between the groups are the
/// same library's text, not a stack guard or another mapping's data);
/// false, with nothing changed, otherwise or on any error.
fn make_code_writable(
    maps: &mut MapsQuery,
    start: u64,
    end: u64,
    runs: &mut Vec<(u64, u64, libc::c_int)>,
) -> bool {
    let code = matches!(maps.range_protection(start, end, runs), Ok(Some(false)))
        && runs.iter().all(|r| r.2 & libc::PROT_EXEC != 0);
    code && add_write(runs, start, (end - start) as usize).is_ok()
}

/// The writing half of [`InProcess::write_batch`]: the writes, their order
/// (by address), which are needed, and the results. Allocates nothing once
/// built, unless there is no catcher (then the vectored system calls do).
struct Batch<'a, 'w> {
    catcher: Option<&'a Catcher>,
    writes: &'a [TextWrite<'w>],
    order: &'a [usize],
    needed: &'a [bool],
    out: &'a mut [Result<(), ProbeError>],
    /// The protection runs of the span being written (a reused buffer).
    runs: Vec<(u64, u64, libc::c_int)>,
    /// Some one-byte write was made: the cores are synced at the end.
    sync: bool,
}

impl Batch<'_, '_> {
    fn write(&self, n: usize) -> &TextWrite<'_> {
        &self.writes[self.order[n]]
    }

    fn one_byte(&self, n: usize) -> bool {
        let w = self.write(n);
        w.old[1..] == w.new[1..]
    }

    /// Reports `err` for the needed writes of `members`.
    fn fail(&mut self, members: std::ops::Range<usize>, err: &ProbeError) {
        for n in members.filter(|&n| self.needed[n]) {
            self.out[self.order[n]] = Err(err.clone());
        }
    }

    /// The needed writes of `members` (indices into `order`), on pages
    /// made writable by the caller. One-byte changes (breakpoints in and
    /// out: atomic against fetch, synced together at the end) are stores,
    /// or without a catcher a few vectored calls; the others follow the
    /// int3-first protocol, one by one.
    fn write_members(&mut self, members: std::ops::Range<usize>) {
        if let Some(c) = self.catcher {
            for n in members.clone() {
                if self.needed[n] && self.one_byte(n) {
                    self.sync = true;
                    let (addr, byte) = (self.write(n).addr, self.write(n).new[0]);
                    self.out[self.order[n]] = put(Some(c), addr, &[byte]);
                }
            }
        } else {
            let one: Vec<usize> = members
                .clone()
                .filter(|&n| self.needed[n] && self.one_byte(n))
                .collect();
            let mut bytes: Vec<u8> = one.iter().map(|&n| self.write(n).new[0]).collect();
            let addrs: Vec<u64> = one.iter().map(|&n| self.write(n).addr).collect();
            let written = pieces(false, &mut bytes, &addrs, &vec![1; one.len()]);
            for (k, &n) in one.iter().enumerate() {
                self.sync = true;
                if !written[k] {
                    let (addr, byte) = (self.write(n).addr, self.write(n).new[0]);
                    self.out[self.order[n]] = put(None, addr, &[byte]);
                }
            }
        }
        for n in members {
            if self.needed[n] && !self.one_byte(n) {
                let w = self.writes[self.order[n]];
                self.out[self.order[n]] = InProcess::store(self.catcher, w.addr, w.old, w.new);
            }
        }
    }

    /// Puts back the protections of `[start, end)` (in `runs`). Only when
    /// the kernel cannot split the mapping (out of memory or map count)
    /// does that fail: then, as in `write_checked`, the writes of `members`
    /// that were made are undone and report the error. The pages are left
    /// writable.
    fn restore(&mut self, start: u64, end: u64, members: std::ops::Range<usize>) {
        let Some(err) = restore_protection(&self.runs, start, (end - start) as usize) else {
            return;
        };
        for n in members.filter(|&n| self.needed[n]) {
            let (i, w) = (self.order[n], self.writes[self.order[n]]);
            if self.out[i].is_ok() {
                let _ = InProcess::store(self.catcher, w.addr, w.new, w.old);
                self.out[i] = Err(err.clone());
            }
        }
    }

    /// Makes `[start, end)` writable, writes `members`, restores. `Err`:
    /// the pages could not be made writable; nothing was written.
    fn write_span(
        &mut self,
        maps: &mut MapsQuery,
        members: std::ops::Range<usize>,
        start: u64,
        end: u64,
    ) -> Result<(), ProbeError> {
        make_writable(
            maps,
            start,
            end,
            start,
            (end - start) as usize,
            &mut self.runs,
        )?;
        self.write_members(members.clone());
        self.restore(start, end, members);
        Ok(())
    }
}

/// Reads each piece `addrs[i]`, `lens[i]` bytes long, into `buf` (the
/// pieces back to back); returns which pieces were read. With `catcher`,
/// byte loads ([`peek`]: a few ns a byte, where the kernel's cost is per
/// piece and per page); without, as [`pieces`].
fn read_pieces(
    catcher: Option<&Catcher>,
    buf: &mut [u8],
    addrs: &[u64],
    lens: &[usize],
) -> Vec<bool> {
    let Some(c) = catcher else {
        return pieces(true, buf, addrs, lens);
    };
    let mut off = 0;
    addrs
        .iter()
        .zip(lens)
        .map(|(&addr, &len)| {
            let piece = &mut buf[off..off + len];
            off += len;
            // SAFETY: the pieces are text of this process (the callers read
            // code to patch it), never a device mapping; a fault is caught
            // (`c`).
            unsafe { peek(c, addr, piece) }.is_ok()
        })
        .collect()
}

/// Moves each piece `addrs[i]`, `lens[i]` bytes long, from (`read`) or to
/// our memory, to or from `buf` (the pieces back to back), in vectored
/// calls of up to `IOV_MAX` pieces; returns which pieces were moved. A
/// piece the kernel cannot move (unmapped, or the calls are forbidden:
/// the direct modes) is left for the caller to move alone, which reports
/// its error; the calls go on after it.
fn pieces(read: bool, buf: &mut [u8], addrs: &[u64], lens: &[usize]) -> Vec<bool> {
    if read {
        return read_coalesced(buf, addrs, lens);
    }
    vectored(read, buf, addrs, lens)
}

/// Gap between two pieces below which one read covers both.
const COALESCE_GAP: u64 = 256;
/// Longest read that covers several pieces.
const COALESCE_MAX: u64 = 64 * 1024;

/// Reads the pieces as [`pieces`] does, nearby pieces with one read of the
/// bytes around them (sorted by address, merged while the gap is at most
/// [`COALESCE_GAP`] and the run at most [`COALESCE_MAX`]): the kernel's cost
/// is per piece, not per byte. A run that cannot be read whole (one of its
/// pages unmapped) is read piece by piece.
fn read_coalesced(buf: &mut [u8], addrs: &[u64], lens: &[usize]) -> Vec<bool> {
    let mut done = vec![false; addrs.len()];
    // Where each piece's bytes go in `buf`.
    let mut at = Vec::with_capacity(addrs.len());
    let mut off = 0;
    for &l in lens {
        at.push(off);
        off += l;
    }
    let mut order: Vec<usize> = (0..addrs.len()).collect();
    order.sort_by_key(|&i| addrs[i]);
    // Runs: (start, end, first and one-past-last index into `order`).
    let mut runs: Vec<(u64, u64, usize, usize)> = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let (s, e) = (addrs[i], addrs[i].saturating_add(lens[i] as u64));
        match runs.last_mut() {
            Some(r)
                if s <= r.1.saturating_add(COALESCE_GAP) && e.max(r.1) - r.0 <= COALESCE_MAX =>
            {
                r.1 = r.1.max(e);
                r.3 = k + 1;
            }
            _ => runs.push((s, e, k, k + 1)),
        }
    }
    let run_addrs: Vec<u64> = runs.iter().map(|r| r.0).collect();
    let run_lens: Vec<usize> = runs.iter().map(|r| (r.1 - r.0) as usize).collect();
    let mut whole = vec![0u8; run_lens.iter().sum()];
    let read = vectored(true, &mut whole, &run_addrs, &run_lens);
    let mut base = 0;
    for (r, (run, ok)) in runs.iter().zip(read).enumerate() {
        let members = &order[run.2..run.3];
        if ok {
            for &i in members {
                let from = base + (addrs[i] - run.0) as usize;
                buf[at[i]..at[i] + lens[i]].copy_from_slice(&whole[from..from + lens[i]]);
                done[i] = true;
            }
        } else {
            // Piece by piece; those that fail are left to the caller.
            let a: Vec<u64> = members.iter().map(|&i| addrs[i]).collect();
            let l: Vec<usize> = members.iter().map(|&i| lens[i]).collect();
            let mut tmp = vec![0u8; l.iter().sum()];
            let got = vectored(true, &mut tmp, &a, &l);
            let mut o = 0;
            for (n, &i) in members.iter().enumerate() {
                if got[n] {
                    buf[at[i]..at[i] + lens[i]].copy_from_slice(&tmp[o..o + lens[i]]);
                    done[i] = true;
                }
                o += lens[i];
            }
        }
        base += run_lens[r];
    }
    done
}

/// Moves the pieces in vectored calls of up to `IOV_MAX` pieces (see
/// [`pieces`]).
fn vectored(read: bool, buf: &mut [u8], addrs: &[u64], lens: &[usize]) -> Vec<bool> {
    let mut done = vec![false; addrs.len()];
    // Relaxed: sticky hints, as in `put` and `read_text`.
    let direct = if read {
        READ_MODE.load(Ordering::Relaxed) == READ_DIRECT
    } else {
        WRITE_MODE.load(Ordering::Relaxed) == WRITE_DIRECT
    };
    if direct {
        return done;
    }
    let (mut at, mut off) = (0, 0);
    while at < addrs.len() {
        let end = (at + crate::sys::IOV_MAX).min(addrs.len());
        // SAFETY: `buf[off..]` holds the pieces `at..end` back to back (the
        // caller sized it as the sum of `lens`); the kernel checks `addrs`.
        let n = unsafe {
            crate::sys::process_vm_self_pieces(
                read,
                buf[off..].as_mut_ptr(),
                &addrs[at..end],
                &lens[at..end],
            )
        };
        let mut moved = usize::try_from(n).unwrap_or(0);
        let mut stop = at;
        while stop < end && moved >= lens[stop] {
            moved -= lens[stop];
            done[stop] = true;
            off += lens[stop];
            stop += 1;
        }
        if stop < end {
            // Piece `stop` failed: left to the caller; go on after it.
            off += lens[stop];
            stop += 1;
        }
        at = stop;
    }
    done
}

/// Whether the text at `addr` (read into `current`, as long as `old`)
/// needs the write: `Ok(true)` when it holds `old` and `old != new`,
/// `Ok(false)` when it already holds `new` (and `old == new`).
///
/// # Errors
/// [`ProbeError::AlreadyPatched`] when it holds something else; the read's
/// error.
fn holds(addr: u64, old: &[u8], new: &[u8], current: &mut [u8]) -> Result<bool, ProbeError> {
    read_text(addr, current)?;
    check_holds(addr, old, new, current)
}

/// [`holds`] on bytes already read into `current`.
fn check_holds(addr: u64, old: &[u8], new: &[u8], current: &[u8]) -> Result<bool, ProbeError> {
    if current != old {
        return Err(ProbeError::AlreadyPatched {
            addr,
            expected: CodeBytes::new(old),
            found: CodeBytes::new(current),
        });
    }
    Ok(current != new)
}

/// The whole pages `[addr, end)` touches.
fn page_span(addr: u64, end: u64) -> (u64, u64) {
    let page = page_size();
    (addr & !(page - 1), (end + page - 1) & !(page - 1))
}

/// Adds `PROT_WRITE` to the pages `[pstart, pend)` (text lock held) and
/// puts their runs of previous protection in `runs` (a reused buffer), for
/// [`restore_protection`]. Errors name `addr`/`len`, the caller's write.
///
/// # Errors
/// The pages are not all mapped, a shared file mapping, or `mprotect`
/// fails (the runs changed before are restored).
fn make_writable(
    maps: &mut MapsQuery,
    pstart: u64,
    pend: u64,
    addr: u64,
    len: usize,
    runs: &mut Vec<(u64, u64, libc::c_int)>,
) -> Result<(), ProbeError> {
    let shared = maps
        .range_protection(pstart, pend, runs)
        .map_err(|e| maps_error(addr, len, &e))?
        .ok_or(ProbeError::TextAccess {
            addr,
            len,
            failure: TextFailure::OutOfRange,
        })?;
    if shared {
        return Err(ProbeError::TextAccess {
            addr,
            len,
            failure: TextFailure::Os {
                op: "patch a shared file mapping",
                errno: libc::EACCES,
            },
        });
    }
    add_write(runs, addr, len)
}

/// The `mprotect` half of [`make_writable`]: adds `PROT_WRITE` to every run
/// of `runs` (looked up by the caller); on a failure the runs changed
/// before are restored and the error names `addr`/`len`.
fn add_write(runs: &[(u64, u64, libc::c_int)], addr: u64, len: usize) -> Result<(), ProbeError> {
    for (i, &(s, e, prot)) in runs.iter().enumerate() {
        if !mprotect(s, e, prot | libc::PROT_WRITE) {
            let err = os_error(addr, len, "mprotect");
            for &(s, e, prot) in &runs[..i] {
                mprotect(s, e, prot);
            }
            return Err(err);
        }
    }
    Ok(())
}

/// Puts back the protections `make_writable` changed; the first failure.
fn restore_protection(
    runs: &[(u64, u64, libc::c_int)],
    addr: u64,
    len: usize,
) -> Option<ProbeError> {
    let mut failed = None;
    for &(s, e, prot) in runs {
        if !mprotect(s, e, prot) && failed.is_none() {
            failed = Some(os_error(addr, len, "mprotect (restore)"));
        }
    }
    failed
}

/// How `read_text` reads.
static READ_MODE: AtomicU8 = AtomicU8::new(READ_VM);
const READ_VM: u8 = 0;
const READ_DIRECT: u8 = 1;

/// Reads `buf.len()` bytes of our own memory at `addr`. Async-signal-safe.
pub(crate) fn read_text(addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
    if buf.is_empty() {
        return Ok(());
    }
    let len = buf.len();
    let fail = |failure| ProbeError::TextAccess { addr, len, failure };
    // Relaxed: a sticky hint; either mode is correct for any caller.
    if READ_MODE.load(Ordering::Relaxed) == READ_DIRECT {
        // SAFETY: process_vm_readv is forbidden here (seccomp); the caller's
        // address is trusted, as documented on `InProcess`.
        unsafe { crate::sys::copy_bytes(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        return Ok(());
    }
    // SAFETY: `buf` is ours, valid for `len` bytes; the kernel checks the
    // remote range and fails with EFAULT instead of faulting. A raw system
    // call (the trap path calls no C-library function).
    let n = unsafe { crate::sys::process_vm_readv_self(buf.as_mut_ptr(), addr, len) };
    if n == len as isize {
        return Ok(());
    }
    if crate::sys::failed(n) {
        let errno = -n as libc::c_int;
        if errno == libc::ENOSYS || errno == libc::EPERM {
            // Relaxed: a sticky hint (see the load above).
            READ_MODE.store(READ_DIRECT, Ordering::Relaxed);
            return read_text(addr, buf);
        }
        return Err(fail(TextFailure::OutOfRange));
    }
    // A short read: the range runs into an unmapped page.
    Err(fail(TextFailure::OutOfRange))
}

// The sync-core membarrier commands (include/uapi/linux/membarrier.h,
// stable ABI); the others come from `crate::sys`.
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

/// Which command `sync_cores` issues: 0 none, else the command.
static SYNC_CMD: AtomicU64 = AtomicU64::new(u64::MAX);

/// Registers the process for the strongest core sync available, once.
fn sync_core_init() {
    // Relaxed: idempotent; racing initialisers compute the same answer.
    if SYNC_CMD.load(Ordering::Relaxed) != u64::MAX {
        return;
    }
    let mask = membarrier(MEMBARRIER_CMD_QUERY);
    let has = |c: libc::c_int| mask >= 0 && mask & c as libc::c_long != 0;
    let cmd = if has(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)
        && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) == 0
    {
        MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE
    } else if has(MEMBARRIER_CMD_PRIVATE_EXPEDITED)
        && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
    {
        MEMBARRIER_CMD_PRIVATE_EXPEDITED
    } else {
        0
    };
    // Relaxed: the command number publishes nothing else; the kernel-side
    // registration happened in the syscall above, before any reader could
    // use the command.
    SYNC_CMD.store(cmd as u64, Ordering::Relaxed);
}

/// Makes every thread of the process re-fetch code written before the call
/// (see the module docs for the fallbacks).
pub(crate) fn sync_cores() {
    sync_core_init();
    // Relaxed: written once by `sync_core_init` on this or another thread;
    // a stale MAX cannot be seen after our own init call above.
    let cmd = SYNC_CMD.load(Ordering::Relaxed);
    if cmd != 0 && cmd != u64::MAX {
        membarrier(cmd as libc::c_int);
    }
    // Our own thread: a serializing instruction (cpuid) makes this core
    // re-fetch too; the membarrier spares the caller.
    // SAFETY: cpuid is available on every x86_64 CPU and has no side effect
    // beyond serializing.
    #[cfg(target_arch = "x86_64")]
    let _ = std::arch::x86_64::__cpuid(0);
    // arm64: a context synchronization event (`isb`) does the same.
    #[cfg(target_arch = "aarch64")]
    super::cache::isb();
}

/// Which membarrier command core syncs use, for diagnostics: `"sync-core"`,
/// `"expedited"` or `"none"`.
pub fn core_sync_method() -> &'static str {
    sync_core_init();
    // Relaxed: see `sync_cores`.
    match SYNC_CMD.load(Ordering::Relaxed) as libc::c_int {
        MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE => "sync-core",
        MEMBARRIER_CMD_PRIVATE_EXPEDITED => "expedited",
        _ => "none",
    }
}
