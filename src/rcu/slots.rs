//! Per-thread reader slots, claimable from a signal handler.
//!
//! Slots live in `mmap`ed, append-only chunks and are claimed with one CAS on
//! `in_use`, so the first `read()` on a thread is async-signal-safe; a
//! pthread-key destructor releases a slot at thread exit, and after `fork()`
//! every slot of a thread that did not survive is marked dead (never reused)
//! and [`fork_generation`] is bumped.
//!
//! Claiming calls no C-library function (a raw `mmap` system call for a new
//! chunk); arming the release at thread exit does (`pthread_setspecific`).
//! The live probe runtime's trap path must call no C-library function, so
//! it claims with [`current_unarmed`] and arms with [`arm_current`] past its
//! trap flag, where a probe hit in the C library is a nested trap (see
//! `probes/runtime/in_trap.rs`). An ordinary first read claims and arms at
//! once. The reader's `armed` is set before the C-library call, so a trap
//! nested in it does not arm again.
//!
//! Registration, release, the glibc key limit and fork handling, in full:
//! [`crate::docs::algorithms::rcu`].

use crate::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use crossbeam_utils::CachePadded;
use std::cell::Cell;
use std::ptr;

/// One reader slot. Cache-padded so that readers on different cores never
/// share a line.
#[derive(Debug)]
pub(crate) struct Slot {
    /// [`Rcu`](super::Rcu) reader state: nesting count in the low bits plus the
    /// grace-period phase bit. Written by the owner thread only (and by the
    /// release/fork paths once the owner is gone).
    pub(crate) ctr: AtomicUsize,
    /// Claimed by a live thread.
    in_use: AtomicBool,
    /// Its owner did not survive a `fork()`: never reused, skipped by SRCU.
    dead: AtomicBool,
    /// Dense index of the slot, used by SRCU's per-thread counter arrays.
    index: usize,
}

impl Slot {
    /// Dense index: slots are numbered 0, 1, 2, ... in chunk order.
    #[inline(always)]
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// Whether the slot's owner died in a `fork()` (child side only).
    pub(crate) fn is_dead(&self) -> bool {
        // Relaxed: set once, by the only thread alive in the child, before any
        // other thread of the child exists.
        self.dead.load(Ordering::Relaxed)
    }
}

/// Slots per chunk: 32 padded slots (128 bytes each on x86_64) fill a page.
#[cfg(not(loom))]
const SLOTS_PER_CHUNK: usize = 32;
/// Under loom every slot load in a scan is a scheduling point: keep it tiny.
#[cfg(loom)]
const SLOTS_PER_CHUNK: usize = 4;

struct Chunk {
    /// Index of `slots[0]`.
    base: usize,
    next: AtomicPtr<Chunk>,
    slots: [CachePadded<Slot>; SLOTS_PER_CHUNK],
}

#[cfg(not(loom))]
static HEAD: AtomicPtr<Chunk> = AtomicPtr::new(ptr::null_mut());

#[cfg(loom)]
crate::sync::lazy_static! {
    static ref HEAD: AtomicPtr<Chunk> = AtomicPtr::new(ptr::null_mut());
}

#[cfg(not(loom))]
static FORK_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many `fork()`s this process image descends from (0 in the original).
/// Leaders and workers record it so the child can tell they did not survive.
#[inline]
pub(crate) fn fork_generation() -> u64 {
    #[cfg(not(loom))]
    {
        // Relaxed: only changed by the child handler while the child has one
        // thread; every later thread of the child is created after it.
        FORK_GENERATION.load(Ordering::Relaxed)
    }
    #[cfg(loom)]
    0
}

/// A thread's reader: its slot and whether the slot is armed. One
/// thread-local, not two: the live runtime's trap path arms and reads on
/// every trap, and each thread-local access cost an emulated arm64 hit
/// about six instructions.
struct Reader {
    /// This thread's slot, or null before its first read section.
    current: Cell<*const Slot>,
    /// Whether the slot is released at the thread's exit (armed). A slot
    /// claimed by [`current_unarmed`] is not, until [`arm_current`].
    armed: Cell<bool>,
}

crate::sync::const_thread_local! {
    /// This thread's reader. `const` initialised and without destructor: a
    /// plain TLS access.
    static READER: Reader = Reader {
        current: Cell::new(ptr::null()),
        armed: Cell::new(false),
    };
}

/// Returns this thread's slot, claiming one on first use.
///
/// Async-signal-safe: atomics, TLS and (rarely) `mmap` only.
#[inline(always)]
pub(crate) fn current() -> &'static Slot {
    let p = READER.with(|r| r.current.get());
    if p.is_null() {
        return claim_for_current_thread();
    }
    // SAFETY: slot memory is never unmapped or freed, and the pointer was
    // stored by this thread from a slot it claimed.
    unsafe { &*p }
}

/// Returns this thread's slot, claiming one on first use *without* arming
/// its release at thread exit: atomics, TLS and (rarely) a raw `mmap`
/// only, no C-library function at all (the live probe runtime's trap path,
/// which must stay off the C library, reads through this). The thread's
/// exit does not give such a slot back until [`arm_current`] runs on the
/// thread (the runtime arms it on its way into a trap, where it may call
/// the C library; an ordinary first read arms at once).
#[inline(always)]
pub(crate) fn current_unarmed() -> &'static Slot {
    let p = READER.with(|r| r.current.get());
    if p.is_null() {
        return claim_unarmed();
    }
    // SAFETY: as in `current`.
    unsafe { &*p }
}

/// Claims this thread's slot if it has none, and arms its release at thread
/// exit if that is not done yet (`pthread_setspecific`: a C-library call),
/// and returns it. One thread-local access when both are done.
#[inline]
pub(crate) fn arm_current() -> &'static Slot {
    let (p, armed) = READER.with(|r| (r.current.get(), r.armed.get()));
    if !armed || p.is_null() {
        return arm_current_slow();
    }
    // SAFETY: as in `current`.
    unsafe { &*p }
}

/// [`arm_current`] for a thread whose slot is not claimed or not armed.
#[cold]
#[inline(never)]
fn arm_current_slow() -> &'static Slot {
    let slot = current_unarmed();
    if !READER.with(|r| r.armed.get()) {
        arm(slot);
    }
    slot
}

/// This thread's slot if it has one (no claiming).
#[inline]
pub(crate) fn current_if_any() -> Option<&'static Slot> {
    let p = READER.with(|r| r.current.get());
    // SAFETY: as in `current`: slots are immortal and this thread's own.
    (!p.is_null()).then(|| unsafe { &*p })
}

#[cold]
#[inline(never)]
fn claim_for_current_thread() -> &'static Slot {
    let slot = claim_unarmed();
    arm(slot);
    slot
}

/// Claims a slot for this thread and makes it current; no C library.
#[cold]
#[inline(never)]
fn claim_unarmed() -> &'static Slot {
    let slot = claim();
    READER.with(|r| r.current.set(slot));
    slot
}

/// Arms the release of `slot` (this thread's) at thread exit.
#[cold]
#[inline(never)]
fn arm(slot: &'static Slot) {
    // Set first: a trap nested in the C library below finds it armed and
    // does not arm again.
    READER.with(|r| r.armed.set(true));
    arm_release_on_exit(slot);
}

fn claim() -> &'static Slot {
    // Acquire pairs with the Release publication of chunks so their `base`
    // and `index` fields are initialised when we see them.
    let mut link: &AtomicPtr<Chunk> = &HEAD;
    let mut prev_base: Option<usize> = None;
    loop {
        let chunk = link.load(Ordering::Acquire);
        if chunk.is_null() {
            let base = prev_base.map_or(0, |b| b + SLOTS_PER_CHUNK);
            let new = new_chunk(base);
            // SAFETY: `new` points to a fully initialised chunk that no other
            // thread can see yet; slot 0 is pre-claimed below.
            let first: &'static Slot = unsafe { &(*new).slots[0] };
            first.in_use.store(true, Ordering::Relaxed);
            // Release publishes the chunk's initialised fields (pairs with the
            // Acquire load above in other claimers and in scanners).
            match link.compare_exchange(ptr::null_mut(), new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return first,
                Err(_) => {
                    // Someone appended first: reuse our chunk's memory later is
                    // not possible (its base would clash), so give it back.
                    free_chunk(new);
                    continue;
                }
            }
        }
        // SAFETY: chunks are never freed once published.
        let c: &'static Chunk = unsafe { &*chunk };
        for s in c.slots.iter() {
            let s: &'static Slot = s;
            // Relaxed pre-check avoids a locked instruction on busy slots.
            if !s.in_use.load(Ordering::Relaxed)
                && !s.dead.load(Ordering::Relaxed)
                // Acquire pairs with the Release in `release`: the previous
                // owner's writes to this slot's SRCU counters happen-before
                // our own plain load/store updates of them.
                && s.in_use.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                return s;
            }
        }
        prev_base = Some(c.base);
        link = &c.next;
    }
}

#[cfg(not(loom))]
fn new_chunk(base: usize) -> *mut Chunk {
    let len = std::mem::size_of::<Chunk>();
    let Some(mem) = crate::sys::map_zeroed(len) else {
        // Out of memory while registering a reader: there is no safe way to
        // run the read section. Abort rather than unwind out of a possible
        // signal handler.
        std::process::abort();
    };
    let chunk = mem.as_ptr().cast::<Chunk>();
    // SAFETY: the mapping is fresh, page-aligned (so aligned for Chunk) and zero-filled; all-zero
    // bytes are a valid Chunk (atomics zero/false/null, integers zero). We only fill in the plain
    // index fields before publication.
    unsafe {
        ptr::addr_of_mut!((*chunk).base).write(base);
        for i in 0..SLOTS_PER_CHUNK {
            let slot: *mut Slot = ptr::addr_of_mut!((*chunk).slots[i]).cast();
            ptr::addr_of_mut!((*slot).index).write(base + i);
        }
    }
    chunk
}

#[cfg(not(loom))]
fn free_chunk(chunk: *mut Chunk) {
    // SAFETY: `chunk` came from `new_chunk` and was never published.
    unsafe {
        crate::sys::unmap(chunk.cast(), std::mem::size_of::<Chunk>());
    }
}

#[cfg(loom)]
fn new_chunk(base: usize) -> *mut Chunk {
    Box::into_raw(Box::new(Chunk {
        base,
        next: AtomicPtr::new(ptr::null_mut()),
        slots: std::array::from_fn(|i| {
            CachePadded::new(Slot {
                ctr: AtomicUsize::new(0),
                in_use: AtomicBool::new(false),
                dead: AtomicBool::new(false),
                index: base + i,
            })
        }),
    }))
}

#[cfg(loom)]
fn free_chunk(chunk: *mut Chunk) {
    // SAFETY: `chunk` came from `new_chunk` (a Box) and was never published.
    drop(unsafe { Box::from_raw(chunk) });
}

/// Calls `f` on every slot ever created (claimed, free or dead).
pub(crate) fn for_each_slot(mut f: impl FnMut(&'static Slot)) {
    // Acquire pairs with the Release publication in `claim`.
    let mut p = HEAD.load(Ordering::Acquire);
    while !p.is_null() {
        // SAFETY: published chunks are immortal.
        let c: &'static Chunk = unsafe { &*p };
        for s in c.slots.iter() {
            f(s);
        }
        p = c.next.load(Ordering::Acquire);
    }
}

/// Gives the slot back: its reader state is cleared (the owner is gone, so no
/// read section can be running on it) and a grace-period waiter is woken.
#[cfg_attr(loom, allow(dead_code))]
fn release(slot: &Slot) {
    // Release: everything the dying thread did in its read sections
    // happens-before a scanner that reads this 0 (paired with the scanner's
    // final heavy barrier and the claimer's Acquire CAS).
    slot.ctr.store(0, Ordering::Release);
    slot.in_use.store(false, Ordering::Release);
    notify_gp_waiter();
}

// ---------------------------------------------------------------------------
// Thread-exit and fork hooks (std only).

#[cfg(not(loom))]
mod hooks {
    use super::*;
    use std::sync::Once;

    static INIT: Once = Once::new();
    /// The pthread key whose destructor releases a thread's slot; valid once
    /// `KEY_READY` is set.
    static KEY: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    static KEY_READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    unsafe extern "C" fn release_on_exit(p: *mut libc::c_void) {
        let slot = p as *const Slot;
        if slot.is_null() {
            return;
        }
        // The thread-local may already be gone this late in thread exit; a
        // failed access just means there is nothing to reset.
        let _ = READER.try_with(|r| {
            r.current.set(ptr::null());
            r.armed.set(false);
        });
        // SAFETY: the key holds the pointer of a claimed, immortal slot.
        release(unsafe { &*slot });
    }

    unsafe extern "C" fn after_fork_in_child() {
        let me = READER.try_with(|r| r.current.get()).unwrap_or(ptr::null());
        for_each_slot(|s| {
            if ptr::eq(s, me) || !s.in_use.load(Ordering::Relaxed) {
                return;
            }
            // Only this thread exists: relaxed stores are enough, every
            // thread created later synchronizes with us through its creation.
            s.dead.store(true, Ordering::Relaxed);
            s.ctr.store(0, Ordering::Relaxed);
        });
        FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
        crate::sys::membarrier_reinit_after_fork();
    }

    /// Creates the thread-exit key and the fork handler, once per process.
    /// Called from domain constructors, never from a signal handler.
    pub(crate) fn init() {
        INIT.call_once(|| {
            let mut key: libc::pthread_key_t = 0;
            // SAFETY: `key` is a valid out-pointer; the destructor has the
            // required signature and tolerates any pointer we store.
            if unsafe { libc::pthread_key_create(&mut key, Some(release_on_exit)) } == 0 {
                KEY.store(key, Ordering::Relaxed);
                // Release: a thread that sees READY also sees KEY.
                KEY_READY.store(true, Ordering::Release);
            }
            // SAFETY: the child handler only touches atomics, TLS and issues a syscall; no
            // prepare/parent handlers are needed because no lock is held across the fork (grace
            // periods and callback queues are lock-free; see the module docs).
            unsafe {
                libc::pthread_atfork(None, None, Some(after_fork_in_child));
            }
            crate::sys::membarrier_init();
        });
    }

    pub(super) fn arm(slot: &'static Slot) {
        // Acquire pairs with the Release in `init`.
        if KEY_READY.load(Ordering::Acquire) {
            // SAFETY: the key is valid; the value is an immortal slot
            // pointer. glibc stores it without allocating for small keys.
            unsafe {
                libc::pthread_setspecific(
                    KEY.load(Ordering::Relaxed),
                    slot as *const Slot as *const _,
                );
            }
        }
        // Registers membarrier if no domain constructor did yet (syscalls
        // only, signal-safe); the reader's light barrier checks the result.
        crate::sys::membarrier_init();
    }
}

#[cfg(not(loom))]
pub(crate) use hooks::init;

#[cfg(loom)]
pub(crate) fn init() {}

fn arm_release_on_exit(slot: &'static Slot) {
    #[cfg(not(loom))]
    hooks::arm(slot);
    // Under loom, slots are not released at thread exit: each model
    // execution starts with a fresh registry, and a thread-local destructor
    // of the model's main thread would run after the execution's objects
    // are gone.
    #[cfg(loom)]
    let _ = slot;
}

// ---------------------------------------------------------------------------
// Waking a grace period that sleeps on readers.

/// Futex word an `Rcu` grace period sleeps on while readers remain:
/// `GP_WAITING` while it sleeps (or is about to), 0 otherwise.
#[cfg(not(loom))]
pub(crate) static GP_FUTEX: AtomicU32 = AtomicU32::new(0);

#[cfg(loom)]
crate::sync::lazy_static! {
    pub(crate) static ref GP_FUTEX: AtomicU32 = AtomicU32::new(0);
}

/// Value of [`GP_FUTEX`] while a grace period sleeps.
pub(crate) const GP_WAITING: u32 = 1;

/// Called after a reader left its outermost section (or its thread died):
/// wakes a sleeping grace period.
///
/// The load is ordered after the caller's counter store by a light barrier
/// (reader) or a Release store followed by this SeqCst-free load; the
/// updater side arms the futex, then issues a heavy barrier, then rescans, so
/// either the updater sees the counter change or we see `GP_WAITING`.
#[inline(always)]
pub(crate) fn notify_gp_waiter() {
    if GP_FUTEX.load(Ordering::Relaxed) == GP_WAITING {
        wake_gp_waiter();
    }
}

#[cold]
#[inline(never)]
fn wake_gp_waiter() {
    GP_FUTEX.store(0, Ordering::Relaxed);
    crate::sync::wake_all(&GP_FUTEX);
}
