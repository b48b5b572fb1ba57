//! The process's memory map, as `/proc/self/maps` reports it.
//!
//! # What it is for
//!
//! Three users need to know what is mapped where:
//!
//! - [`InProcess`](crate::probes::runtime::InProcess) restores the *exact*
//!   protection a code page had before a patch made it writable; the kernel
//!   reports it only through this file (there is no "get protection" system
//!   call), either as text or, since Linux 6.11, one mapping at a time
//!   through the file's `PROCMAP_QUERY` ioctl ([`MapsQuery`]);
//! - the XOL area looks for free address space within +/-2 GiB of probed
//!   code, i.e. for gaps between mappings;
//! - the symbol resolver finds the file behind an address range.
//!
//! # Snapshot semantics
//!
//! [`Maps::read`] takes one snapshot. Mappings may change afterwards (another
//! thread calls `mmap`); callers either hold the process-wide text lock that
//! every protection change of this crate goes through, or retry (the XOL
//! area maps with `MAP_FIXED_NOREPLACE`, which fails rather than clobbers).
//! Reading the file allocates: never call this from trap context.
//!
//! # One mapping at a time: `PROCMAP_QUERY`
//!
//! A text write needs the protection of one or two pages, but reading the
//! whole file makes the kernel print every mapping (paths included) and us
//! parse them back: measured on the live top halves, 55% of the CPU time
//! of registering a probe (`BENCHMARKS.md`, "Live top halves"). Since
//! Linux 6.11 the file answers an ioctl, `PROCMAP_QUERY`, with the one
//! mapping that contains an address: its bounds, `rwx` and whether it is
//! shared, the same `vm_flags` the text prints, read under the same mmap
//! lock, so exactly what a fresh read of the file would say at that moment,
//! for any mapping (file-backed, anonymous, a JIT's). [`MapsQuery`] keeps
//! the file open for it (reopened after a `fork`, whose child must not ask
//! about its parent) and falls back to reading the whole file when the
//! kernel does not know the ioctl. Nothing is cached across calls: a
//! mapping changed by anyone in between is seen as it is now.

use std::io;
use std::os::fd::AsRawFd;

pub(crate) use crate::probes::procmaps::{Mapping, Maps};
use crate::probes::text::TextIdentity;

/// The protection of the pages of a range: runs of equal protection, and
/// whether any of them is a shared mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RangeProtection {
    /// `(run_start, run_end, prot)`, covering the range in address order.
    pub(crate) runs: Vec<(u64, u64, i32)>,
    /// Some page of the range belongs to a shared mapping.
    pub(crate) shared: bool,
}

impl Maps {
    /// [`protections`](Self::protections) of `[start, end)` with the
    /// shared flag.
    pub(crate) fn range_protection(&self, start: u64, end: u64) -> Option<RangeProtection> {
        let runs = self.protections(start, end)?;
        let shared = runs
            .iter()
            .any(|&(s, _, _)| self.find(s).is_some_and(|m| m.shared));
        Some(RangeProtection { runs, shared })
    }
}

// `include/uapi/linux/fs.h` (Linux 6.11), stable ABI.
/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<ProcmapQuery>() as libc::c_ulong) << 16)
    | ((b'f' as libc::c_ulong) << 8)
    | 17;
const PROCMAP_QUERY_VMA_READABLE: u64 = 0x01;
const PROCMAP_QUERY_VMA_WRITABLE: u64 = 0x02;
const PROCMAP_QUERY_VMA_EXECUTABLE: u64 = 0x04;
const PROCMAP_QUERY_VMA_SHARED: u64 = 0x08;

/// `struct procmap_query`: in, `size`, `query_flags`, `query_addr` (and
/// name / build-id buffers, unused here); out, the mapping.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// Forces [`MapsQuery`] to read the whole file (tests of the fallback).
static FORCE_FULL_READ: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every `MapsQuery` read the whole file, as on kernels without
/// `PROCMAP_QUERY` (`true`), or use the ioctl where it works (`false`).
/// For tests (`__internals::runtime::force_maps_full_read`).
pub fn force_maps_full_read(on: bool) {
    // Relaxed: a mode switch read by the next query; orders nothing else.
    FORCE_FULL_READ.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Which way the last `MapsQuery::range_protection` answered, for
/// tests and diagnostics: `"ioctl"` or `"full read"`.
pub fn maps_query_method() -> &'static str {
    // Relaxed: a diagnostic.
    if LAST_FULL_READ.load(std::sync::atomic::Ordering::Relaxed) {
        "full read"
    } else {
        "ioctl"
    }
}

static LAST_FULL_READ: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks `/proc/self/maps` about single addresses (`PROCMAP_QUERY`), see
/// the module docs. Owned by whoever serializes its users (the text lock).
#[derive(Debug, Default)]
pub(crate) struct MapsQuery {
    /// The open file and the pid it was opened by.
    file: Option<(libc::pid_t, std::fs::File)>,
    /// The kernel refused the ioctl as unknown: read the whole file.
    unsupported: bool,
}

/// What one `PROCMAP_QUERY` answered.
enum Vma {
    /// The mapping containing the address: `(end, prot, shared)` and what
    /// it maps.
    Mapped(u64, i32, bool, TextIdentity),
    /// Nothing is mapped there.
    Unmapped,
}

impl MapsQuery {
    /// No file open yet.
    pub(crate) const fn new() -> MapsQuery {
        MapsQuery {
            file: None,
            unsupported: false,
        }
    }

    /// The protection of every page of `[start, end)` as it is now, as
    /// runs put in `runs` (cleared first: a buffer the caller reuses, so a
    /// query allocates nothing once it is large enough, which matters to a
    /// write batch after its first breakpoint, when the allocator itself
    /// may be probed); `Ok(Some(shared))`, or `Ok(None)` if any byte is
    /// unmapped.
    ///
    /// # Errors
    /// The file cannot be opened or read.
    pub(crate) fn range_protection(
        &mut self,
        start: u64,
        end: u64,
        runs: &mut Vec<(u64, u64, i32)>,
    ) -> io::Result<Option<bool>> {
        runs.clear();
        // Relaxed: see `force_maps_full_read`.
        let forced = FORCE_FULL_READ.load(std::sync::atomic::Ordering::Relaxed);
        if !self.unsupported && !forced {
            match self.by_ioctl(start, end, runs) {
                Ok(r) => {
                    // Relaxed: a diagnostic.
                    LAST_FULL_READ.store(false, std::sync::atomic::Ordering::Relaxed);
                    return Ok(r);
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
                    // A kernel before 6.11 (or a filter that hides the
                    // ioctl): from now on, the text.
                    self.unsupported = true;
                }
                // Anything else (a transient failure, a seccomp EPERM):
                // the text, this time.
                Err(_) => {}
            }
        }
        // Relaxed: a diagnostic.
        LAST_FULL_READ.store(true, std::sync::atomic::Ordering::Relaxed);
        runs.clear();
        Ok(Maps::read()?.range_protection(start, end).map(|r| {
            runs.extend_from_slice(&r.runs);
            r.shared
        }))
    }

    /// What is mapped at `addr` now (`None`: nothing), as
    /// [`Mapping::identity`] would say.
    ///
    /// # Errors
    /// The file cannot be opened or read.
    pub(crate) fn identity(&mut self, addr: u64) -> io::Result<Option<TextIdentity>> {
        // Relaxed: see `force_maps_full_read`.
        let forced = FORCE_FULL_READ.load(std::sync::atomic::Ordering::Relaxed);
        if !self.unsupported && !forced {
            match self.query(addr) {
                Ok(Vma::Mapped(.., id)) => return Ok(Some(id)),
                Ok(Vma::Unmapped) => return Ok(None),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
                    self.unsupported = true;
                }
                Err(_) => {}
            }
        }
        Ok(Maps::read()?.find(addr).map(Mapping::identity))
    }

    fn by_ioctl(
        &mut self,
        start: u64,
        end: u64,
        runs: &mut Vec<(u64, u64, i32)>,
    ) -> io::Result<Option<bool>> {
        let mut shared = false;
        let mut at = start;
        while at < end {
            let Vma::Mapped(vend, prot, s, _) = self.query(at)? else {
                return Ok(None);
            };
            shared |= s;
            let run_end = vend.min(end);
            match runs.last_mut() {
                Some(last) if last.2 == prot && last.1 == at => last.1 = run_end,
                _ => runs.push((at, run_end, prot)),
            }
            at = run_end;
        }
        Ok(Some(shared))
    }

    /// The file, opened by this process (a child of a `fork` reopens: the
    /// inherited descriptor describes the parent).
    fn file(&mut self) -> io::Result<libc::c_int> {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        if !matches!(&self.file, Some((p, _)) if *p == pid) {
            // Closes the parent's descriptor, if any (ours to close: the
            // child got its own copy).
            self.file = None;
            let f = std::fs::File::open("/proc/self/maps")?;
            self.file = Some((pid, f));
        }
        Ok(self
            .file
            .as_ref()
            .map(|(_, f)| f.as_raw_fd())
            .expect("opened above"))
    }

    fn query(&mut self, addr: u64) -> io::Result<Vma> {
        let fd = self.file()?;
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_addr: addr,
            ..ProcmapQuery::default()
        };
        // SAFETY: `q` is a `struct procmap_query` of the size it declares,
        // with no name or build-id buffer (sizes 0); the kernel writes only
        // into it. `fd` is our open maps file.
        let r = unsafe { libc::ioctl(fd, PROCMAP_QUERY as _, &mut q as *mut ProcmapQuery) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(Vma::Unmapped),
                _ => Err(e),
            };
        }
        let f = q.vma_flags;
        let mut prot = libc::PROT_NONE;
        if f & PROCMAP_QUERY_VMA_READABLE != 0 {
            prot |= libc::PROT_READ;
        }
        if f & PROCMAP_QUERY_VMA_WRITABLE != 0 {
            prot |= libc::PROT_WRITE;
        }
        if f & PROCMAP_QUERY_VMA_EXECUTABLE != 0 {
            prot |= libc::PROT_EXEC;
        }
        if !(q.vma_start <= addr && addr < q.vma_end) {
            // Not the contract of the ioctl without COVERING_OR_NEXT: treat
            // as unknown rather than guess.
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(Vma::Mapped(
            q.vma_end,
            prot,
            f & PROCMAP_QUERY_VMA_SHARED != 0,
            TextIdentity {
                device: libc::makedev(q.dev_major, q.dev_minor),
                inode: q.inode,
                bias: q.vma_start.wrapping_sub(q.vma_offset),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctl and the text agree on every mapping of this process (its
    /// start, a middle page, its last byte, and the byte past it).
    #[test]
    fn the_ioctl_answers_what_the_text_says_for_every_mapping() {
        let maps = Maps::read().unwrap();
        let mut q = MapsQuery::new();
        let mut checked = 0;
        for m in &maps.mappings {
            if m.path == "[vsyscall]" {
                // Outside the process's mm: the ioctl does not see it.
                continue;
            }
            for at in [m.start, m.start + (m.end - m.start) / 2, m.end - 1] {
                // Other test threads change this process's mappings while
                // it runs (a thread's stack and guard page come and go): a
                // disagreement is checked again against a fresh read of the
                // text, and only one that persists fails.
                let mut text = m.clone();
                let mut agreed = None;
                for _ in 0..5 {
                    let mut runs = Vec::new();
                    let Ok(Some(shared)) = q.by_ioctl(at, at + 1, &mut runs) else {
                        // A kernel without the ioctl: nothing to compare. A
                        // mapping gone since the read is skipped as well.
                        agreed = Some(false);
                        break;
                    };
                    if runs == vec![(at, at + 1, text.prot)] && shared == text.shared {
                        agreed = Some(true);
                        break;
                    }
                    let again = Maps::read().unwrap();
                    match again
                        .mappings
                        .into_iter()
                        .find(|n| n.start <= at && at < n.end)
                    {
                        Some(n) => text = n,
                        None => {
                            agreed = Some(false);
                            break;
                        }
                    }
                }
                match agreed {
                    Some(true) => checked += 1,
                    Some(false) => {}
                    None => panic!("the ioctl and the text disagree at {at:#x}: {text:?}"),
                }
            }
        }
        let gap = maps.gaps(0x10000, 0x7fff_0000_0000)[0].0;
        assert!(matches!(
            q.by_ioctl(gap, gap + 1, &mut Vec::new()),
            Ok(None) | Err(_)
        ));
        eprintln!("{checked} addresses agreed");
    }

    #[test]
    fn the_live_map_contains_this_function() {
        let maps = Maps::read().unwrap();
        let here = the_live_map_contains_this_function as fn() as usize as u64;
        let m = maps.find(here).expect("our own code is mapped");
        assert_ne!(m.prot & libc::PROT_EXEC, 0);
    }
}
