//! [`HitCounter`]: an exact event counter whose increment is no locked
//! instruction: one slot per CPU, summed on read.
//!
//! # Why
//!
//! A hit on a jump-optimized probe costs a few tens of nanoseconds, and a
//! locked increment of a shared counter was a third of it: a locked
//! read-modify-write waits for every store before it to drain from the
//! store buffer, and the detour's stub has just pushed twenty registers.
//! A plain `add` to memory no other thread writes costs a cycle.
//!
//! # How (x86_64 Linux)
//!
//! glibc (2.35 and later) registers a restartable sequence area (`struct
//! rseq`) for every thread at `__rseq_offset` from the thread pointer; the
//! kernel keeps its `cpu_id` current. The increment is a restartable
//! sequence: it points the area's `rseq_cs` at a descriptor, reads
//! `cpu_id`, and adds one to that CPU's slot with a single `add` (the
//! commit). If the thread is preempted, migrated or interrupted by a
//! signal anywhere between the read and the commit, the kernel moves it to
//! the descriptor's abort address (after clearing `rseq_cs`), which starts
//! over; a sequence that reached the commit has added exactly once. So
//! each slot is written only by the thread running on its CPU, one
//! instruction at a time, and no increment is lost or doubled: the sum of
//! the slots (plus the shared fallback) is exact once the increments it
//! must include have returned. A read while increments run sees each slot
//! at some value it had (aligned 8-byte stores are single-copy atomic), so
//! a reader's sums never go backwards.
//!
//! Slots are 64 bytes apart, so two CPUs counting hits of one probe do not
//! share a cache line: 64 bytes per possible CPU per counter. They exist
//! only where they pay: a counter starts with none (every increment the
//! shared fallback's locked add, which a trap's microseconds hide) and
//! gets them from [`HitCounter::per_cpu`], which the kprobe registry calls
//! when a jump-optimization pass first considers the probe's site (under
//! its writer mutex, never on the hit path). 100,000 probes on a 64-CPU
//! machine that are never optimized cost nothing more; optimized, 4 KiB
//! each. The slots, once there, stay until the counter is dropped (no hit
//! can be running then: the registry frees a probe after a grace period).
//!
//! # Fallback
//!
//! Without a registered area (an older C library, `glibc.pthread.rseq=0`,
//! a kernel without `rseq`), for a CPU number beyond the slots (a CPU
//! brought online after the counter was made, or the area's "not
//! registered" values), on other architectures and under loom, the
//! increment is a relaxed `fetch_add` on a shared word, as
//! before (on arm64 an inline `stadd` where the processor has LSE: module
//! `lse`). loom cannot run a restartable sequence: under `cfg(loom)` every
//! increment takes the fallback, and `loom-tests/tests/percpu.rs` models
//! the protocol itself (each slot written by the thread holding its CPU,
//! summed by concurrent readers) on loom's own atomics.
//!
//! # `fork`
//!
//! The child's only thread keeps its rseq registration (the kernel copies
//! it), and the slots are copied with the memory: the child's counts start
//! from the parent's at the fork and go on in the child alone.

use crate::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// One CPU's slot, on its own cache line.
#[repr(C, align(64))]
struct Slot(AtomicU64);

/// A counter's per-CPU part, made by [`HitCounter::per_cpu`].
struct PerCpu {
    /// Offset of the thread's `struct rseq` from the thread pointer.
    #[cfg(all(target_os = "linux", target_arch = "x86_64", not(loom)))]
    rseq_offset: isize,
    /// One per possible CPU.
    slots: Box<[Slot]>,
}

/// An exact counter incremented without a locked instruction once it has
/// per-CPU slots (module docs).
pub(crate) struct HitCounter {
    /// Increments that could not use a slot (module docs, "Fallback").
    shared: AtomicU64,
    /// The per-CPU slots, null until [`per_cpu`](Self::per_cpu) made them
    /// (never replaced afterwards; freed with the counter).
    per_cpu: AtomicPtr<PerCpu>,
}

impl std::fmt::Debug for HitCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HitCounter")
            .field("value", &self.get())
            .field("slots", &self.slots())
            .finish()
    }
}

impl Default for HitCounter {
    fn default() -> Self {
        HitCounter::new()
    }
}

impl HitCounter {
    /// A counter at 0, without per-CPU slots yet.
    pub(crate) fn new() -> HitCounter {
        #[cfg(all(target_arch = "aarch64", not(target_feature = "lse"), not(loom)))]
        lse::detect();
        HitCounter {
            shared: AtomicU64::new(0),
            per_cpu: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// Gives the counter a slot per possible CPU, if the C library
    /// registered an rseq area and it has none yet (a second call changes
    /// nothing). Allocates: never on the hit path. Returns whether the
    /// counter has slots now.
    pub(crate) fn per_cpu(&self) -> bool {
        // Acquire: pairs with the Release of the exchange below (another
        // caller's slots, seen whole).
        if !self.per_cpu.load(Ordering::Acquire).is_null() {
            return true;
        }
        #[cfg(all(target_os = "linux", target_arch = "x86_64", not(loom)))]
        if let Some((rseq_offset, n)) = rseq::area() {
            let made = Box::into_raw(Box::new(PerCpu {
                rseq_offset,
                slots: (0..n).map(|_| Slot(AtomicU64::new(0))).collect(),
            }));
            // Release: pairs with the Acquire loads in `add_one`, `get`
            // and above: a thread that sees the pointer sees zeroed slots.
            // Relaxed on failure: the winner's slots are used instead.
            if self
                .per_cpu
                .compare_exchange(
                    std::ptr::null_mut(),
                    made,
                    Ordering::Release,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                // SAFETY: `made` came from `Box::into_raw` above and was
                // never published.
                drop(unsafe { Box::from_raw(made) });
            }
            return true;
        }
        false
    }

    /// The per-CPU part, if made.
    #[inline(always)]
    fn part(&self) -> Option<&PerCpu> {
        // Acquire: pairs with the Release in `per_cpu`.
        let p = self.per_cpu.load(Ordering::Acquire);
        // SAFETY: a non-null pointer is a `PerCpu` published by `per_cpu`,
        // never replaced, and freed only by `drop` (no `&self` then).
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// Adds one. No locked instruction once the counter has slots (else
    /// the shared fallback's), no system call, no C-library call, no
    /// allocation: safe in a signal handler and on the jump detours' path.
    #[inline(always)]
    pub(crate) fn add_one(&self) {
        #[cfg(all(target_os = "linux", target_arch = "x86_64", not(loom)))]
        if let Some(pc) = self.part() {
            if rseq::add_one(pc.rseq_offset, &pc.slots) {
                return;
            }
        }
        #[cfg(all(target_arch = "aarch64", not(target_feature = "lse"), not(loom)))]
        if lse::add_one(&self.shared) {
            return;
        }
        // Relaxed: a statistics counter; exactness comes from the RMW.
        self.shared.fetch_add(1, Ordering::Relaxed);
    }

    /// The count: every increment that returned before the call, and
    /// perhaps some that run concurrently.
    pub(crate) fn get(&self) -> u64 {
        // Relaxed: each word is read once at some value it had; the counter
        // orders nothing else.
        let shared = self.shared.load(Ordering::Relaxed);
        self.part()
            .map_or(&[][..], |pc| &pc.slots[..])
            .iter()
            // Relaxed: as above.
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(shared, u64::wrapping_add)
    }

    /// Slots in use (0: every increment takes the shared fallback).
    pub(crate) fn slots(&self) -> usize {
        self.part().map_or(0, |pc| pc.slots.len())
    }
}

impl Drop for HitCounter {
    fn drop(&mut self) {
        // Acquire: pairs with the Release in `per_cpu` (another thread's
        // slots, freed here); `&mut self` orders the rest.
        let p = self.per_cpu.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: published by `per_cpu` from `Box::into_raw`, freed
            // only here, and `&mut self` means no increment runs.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64", not(loom)))]
mod rseq {
    use std::arch::asm;
    use std::sync::OnceLock;

    use super::Slot;

    /// At most this many slots per counter (CPUs numbered above take the
    /// fallback).
    const MAX_SLOTS: usize = 4096;

    /// The signature glibc registers on x86 (`RSEQ_SIG`): the kernel checks
    /// that the four bytes before an abort address hold it.
    const _RSEQ_SIG: u32 = 0x5305_3053;

    /// glibc's rseq area offset from the thread pointer and the number of
    /// possible CPUs, or `None` without a registered area. Looked up once
    /// (`dlsym`: glibc 2.35 and later export `__rseq_offset` and
    /// `__rseq_size`, 0 when registration is off).
    pub(super) fn area() -> Option<(isize, usize)> {
        static AREA: OnceLock<Option<(isize, usize)>> = OnceLock::new();
        *AREA.get_or_init(|| {
            // SAFETY: `dlsym` with the default handle and NUL-terminated
            // names; it only looks the symbols up.
            let (size, off) = unsafe {
                (
                    libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()),
                    libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()),
                )
            };
            if size.is_null() || off.is_null() {
                return None;
            }
            // SAFETY: glibc's `__rseq_size` is a `const unsigned int` and
            // `__rseq_offset` a `const ptrdiff_t`, set before `main`.
            let (size, off) = unsafe { (*size.cast::<u32>(), *off.cast::<isize>()) };
            // `cpu_id` at 4 and `rseq_cs` at 8: the original 32-byte ABI
            // (glibc before 2.40 reports 32, later ones the 20 bytes of
            // the feature set, both cover them).
            if size < 16 {
                return None;
            }
            // SAFETY: sysconf has no preconditions.
            let conf = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
            let cpus = usize::try_from(conf).unwrap_or(1).clamp(1, MAX_SLOTS);
            Some((off, cpus))
        })
    }

    /// Adds one to the slot of the CPU the thread runs on, in a restartable
    /// sequence (module docs). False, and nothing added, when the area's
    /// CPU number is not below `slots.len()`.
    #[inline(always)]
    pub(super) fn add_one(off: isize, slots: &[Slot]) -> bool {
        let added: u32;
        // `off` is glibc's offset of this thread's registered rseq area from
        // the thread pointer (`area`); the sequence writes the area's
        // `rseq_cs` word (what it is for) and one slot of `slots`, index
        // checked against its length. The descriptor (32-byte aligned:
        // version 0, flags 0, start, length, abort) and the abort handler
        // (preceded by glibc's signature, `_RSEQ_SIG`) are emitted with each
        // copy of the sequence; the abort handler only jumps back to the
        // start. The `add` is the commit: the last instruction.
        // SAFETY: writes only this thread's rseq_cs and one checked slot.
        unsafe {
            asm!(
                "lea {cs}, [rip + 3f]",
                "2:",
                "mov qword ptr fs:[{off} + 8], {cs}",
                "4:",
                "mov {cpu:e}, dword ptr fs:[{off} + 4]",
                "cmp {cpu:e}, {n:e}",
                "jae 6f",
                "shl {cpu}, 6",
                "add qword ptr [{base} + {cpu}], 1",
                "5:",
                "mov {added:e}, 1",
                "jmp 8f",
                "6:",
                "xor {added:e}, {added:e}",
                "8:",
                ".pushsection .data.rel.ro.rcu_registry_rseq_cs,\"aw\",@progbits",
                ".balign 32",
                "3:",
                ".long 0, 0",
                ".quad 4b, 5b - 4b, 7f",
                ".popsection",
                ".pushsection .text.rcu_registry_rseq_abort,\"ax\",@progbits",
                ".byte 0x0f, 0xb9, 0x3d",
                ".long 0x53053053",
                "7:",
                "jmp 2b",
                ".popsection",
                off = in(reg) off,
                base = in(reg) slots.as_ptr(),
                n = in(reg) slots.len() as u32,
                cs = out(reg) _,
                cpu = out(reg) _,
                added = out(reg) added,
                options(nostack),
            );
        }
        added != 0
    }
}

/// arm64's shared increment without the call: built without the LSE
/// target feature (the default), a `fetch_add` is a call of the C
/// runtime's outline atomic (`__aarch64_ldadd8_relax`), which tests for
/// LSE and runs `ldadd`: a call and a return around one instruction, on
/// every trap hit (under qemu-user, where there is no rseq and so no
/// per-CPU slot, a return is an indirect-branch lookup). Where the
/// processor has LSE this is the `stadd` inline; an increment of the same
/// word as `fetch_add`'s, atomic either way, so the two mix exactly.
#[cfg(all(target_arch = "aarch64", not(target_feature = "lse"), not(loom)))]
mod lse {
    use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Whether the processor has the LSE atomics, once [`detect`] ran.
    static AVAILABLE: AtomicBool = AtomicBool::new(false);

    /// Looks LSE up (cached by the standard library), off the hit path:
    /// every counter is made by [`HitCounter::new`](super::HitCounter::new)
    /// before it can be incremented.
    pub(super) fn detect() {
        if std::arch::is_aarch64_feature_detected!("lse") {
            // Relaxed: a hint; a thread that reads `false` takes the
            // `fetch_add`, which is as exact.
            AVAILABLE.store(true, Ordering::Relaxed);
        }
    }

    /// Adds one to `word` with `stadd` if the processor has it; false (and
    /// nothing added) if not.
    #[inline(always)]
    pub(super) fn add_one(word: &AtomicU64) -> bool {
        // Relaxed: see `detect`.
        if !AVAILABLE.load(Ordering::Relaxed) {
            return false;
        }
        // No ordering (`stadd`, not `staddl`): a statistics counter, as the
        // relaxed `fetch_add`; exactness comes from the atomic add. The
        // word is valid and aligned (an `AtomicU64`).
        // SAFETY: an atomic add to the counter's own word, with LSE present.
        unsafe {
            std::arch::asm!(
                ".arch_extension lse",
                "stadd {one}, [{word}]",
                one = in(reg) 1u64,
                word = in(reg) word.as_ptr(),
                options(nostack, preserves_flags),
            );
        }
        true
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::HitCounter;

    #[test]
    fn counts_exactly_on_several_threads() {
        let c = HitCounter::new();
        std::thread::scope(|s| {
            // The slots appear while the threads count: the increments
            // before go to the shared word, those after to the slots.
            s.spawn(|| c.per_cpu());
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100_000 {
                        c.add_one();
                    }
                });
            }
        });
        assert_eq!(c.get(), 400_000);
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn uses_per_cpu_slots_where_the_c_library_registered_rseq() {
        let c = HitCounter::new();
        assert_eq!(c.slots(), 0, "no slots before per_cpu");
        c.add_one();
        assert_eq!(c.get(), 1);
        if !c.per_cpu() {
            println!("skipped: no rseq area registered by the C library");
            return;
        }
        assert!(c.slots() > 0);
        // A second call keeps the slots (and what they counted).
        c.add_one();
        assert!(c.per_cpu());
        assert_eq!(c.get(), 2);
        let shared = c.shared.load(crate::sync::atomic::Ordering::Relaxed);
        c.add_one();
        assert_eq!(c.get(), 3);
        // The increments after per_cpu went to a slot, not to the fallback.
        assert_eq!(
            c.shared.load(crate::sync::atomic::Ordering::Relaxed),
            shared,
            "the increment took the fallback"
        );
    }
}
