//! Trap dispatch: who gets a trap, and the per-thread single-steps in flight.
//!
//! # Dispatchers
//!
//! A [`TrapDispatcher`] is whatever owns breakpoints in this process (a
//! [`KprobeRegistry`](crate::probes::kprobe::KprobeRegistry) over
//! [`InProcess`](crate::probes::runtime::InProcess) text, or a test's own).
//! [`attach`] files a `&'static` dispatcher in a small fixed table; the
//! SIGTRAP handler offers each breakpoint trap to the attached dispatchers in
//! turn until one claims it. The table is read under an
//! [`Rcu`] read guard with one relaxed load per entry (and an acquire fence
//! for an entry found): no lock, no
//! allocation. [`Attachment::detach`] clears the entry and waits for a grace
//! period, so when it returns no handler is still inside that dispatcher's
//! breakpoint path (a single-step it started may still complete later
//! through [`TrapDispatcher::on_step`]; the dispatcher is `'static`).
//!
//! # Single-steps in flight
//!
//! A single-stepped hit spans two traps: the breakpoint trap prepares the
//! step and the dispatcher leaves whatever it needs for the step trap (the
//! registry's step token) in a [`StepStash`]; the runtime pushes the stash
//! and the dispatcher on a per-thread stack, pops them at the step trap and
//! calls [`TrapDispatcher::on_step`]. The step trap is one of two kinds, as
//! the dispatcher said ([`Verdict`]):
//!
//! - **a step marker** ([`Verdict::StepToMarker`]): the XOL slot ends the
//!   step on an `int3` at a known address, recorded in the stack entry. An
//!   `int3` trap is checked against the innermost step's marker *before* it
//!   is offered to the dispatchers as a probe hit: a match is that step's
//!   end, one compare on the hot path;
//! - **the trap flag** ([`Verdict::Step`]): the step trap is `TRAP_TRACE`,
//!   and completes the innermost step only if that one is a trap-flag step.
//!
//! Why a stack: a signal arriving between the two traps runs its handler
//! before the outer step ends (the kernel clears the trap flag for the
//! handler and `rt_sigreturn` re-arms it; a marker simply waits in the
//! slot). If that handler hits a probe that is stepped too, its step
//! completes before the handler returns. Steps therefore complete in
//! last-in, first-out order, and only the innermost one can be the one that
//! trapped.
//!
//! The stack is a field of the thread's trap state (`trap_thread.rs`: the
//! handler reaches it once per trap), a `const` thread-local without a
//! destructor (a destructor
//! would be registered on first use, which allocates: not allowed in a
//! signal handler). It is touched only by the SIGTRAP handler and the fault
//! handlers (`faults.rs`, which pop a step whose instruction faulted in its
//! slot), which run with every asynchronous signal blocked; a nested trap
//! or fault (in a probe handler) completes its own push and pop before the
//! outer handler continues, so each push and pop runs uninterrupted.

use std::any::TypeId;
use std::mem::MaybeUninit;

use super::live::LiveRegistry;
use super::trap_thread::{self, TrapThread};
use crate::probes::arch::{DataMemory, Regs};
use crate::probes::outcome::ReturnOutcome;
use crate::probes::ProbeError;
use crate::rcu::{Rcu, TrapReader};
use crate::sync::atomic::{fence, AtomicPtr, AtomicUsize, Ordering};
use crate::sync::Mutex;

/// What a dispatcher did with a trap.
#[derive(Debug)]
#[must_use = "the verdict says how to resume the thread"]
pub enum Verdict {
    /// Not this dispatcher's trap; `regs` are unchanged.
    NotOurs,
    /// Handled: resume with `regs` as they are now.
    Resume,
    /// Handled, and a single-step is armed (the trap flag is set in `regs`):
    /// the dispatcher put its state in the stash and must be called with it
    /// at the step trap, `TRAP_TRACE` ([`TrapDispatcher::on_step`]).
    Step,
    /// Handled, and a single-step is under way that ends on a step marker:
    /// `regs.ip` is in an XOL slot whose instruction falls through to an
    /// `int3` at `marker`. The dispatcher put its state in the stash and must
    /// be called with it ([`TrapDispatcher::on_step`]) when this thread traps
    /// on the `int3` at `marker`.
    StepToMarker {
        /// Address of the marker's `int3`.
        marker: u64,
    },
    /// The displaced instruction could not be completed (for example an
    /// unwritable stack for an emulated `push`). The runtime reports the
    /// error and aborts the process: resuming would loop on the breakpoint.
    Failed(ProbeError),
}

/// Whatever owns breakpoints: the runtime's SIGTRAP handler calls it.
///
/// Every method runs in a signal handler with all asynchronous signals
/// blocked (except [`on_return`](Self::on_return), which runs on the
/// ordinary stack from the return trampoline): implementations must not
/// allocate, take a lock another context of the same thread may hold, or
/// block.
pub trait TrapDispatcher: Send + Sync + 'static {
    /// A breakpoint trap. `regs` are the registers at the trap (the IP is
    /// just past the breakpoint); `mem` is the thread's memory. On
    /// [`Verdict::Step`] or [`Verdict::StepToMarker`] the dispatcher must
    /// have put its step state in `stash`.
    fn on_breakpoint(
        &'static self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        stash: &mut StepStash,
    ) -> Verdict;

    /// The step trap after a [`Verdict::Step`] or [`Verdict::StepToMarker`]
    /// of this dispatcher on this thread (the trap-flag trap, or the `int3`
    /// on the marker with `regs` as it reports them), with the stash it
    /// filled. Returning [`Verdict::Step`] or [`Verdict::StepToMarker`] again
    /// (the stash refilled) keeps the step under way (x86 `rep` iterations
    /// under the trap flag).
    fn on_step(
        &'static self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        stash: &mut StepStash,
    ) -> Verdict;

    /// A return into the return trampoline (kretprobes, and x86_64's live
    /// uretprobes): `regs` as the function returned. Takes this
    /// dispatcher's instances for the stack pointer (running their return
    /// handlers) and returns true, with `regs.ip` set to the real return
    /// address, if one of them saved it. Every attached dispatcher is asked
    /// (`dispatch.rs`, `dispatch_return`): a miss must change nothing and
    /// be cheap.
    fn on_return(&'static self, regs: &mut Regs) -> bool;

    /// A synchronous fault (SIGSEGV, SIGBUS, SIGFPE, SIGILL, or a SIGTRAP
    /// nobody claimed) on this thread while its innermost single-step in
    /// flight is this dispatcher's, with the stash it filled; `regs` as the
    /// fault reports them. If the fault is the stepped instruction's own
    /// (the IP at the start of its copy in the slot: it did not complete),
    /// the dispatcher abandons the step, as Linux's `arch_uprobe_abort_xol`
    /// does: takes its state out of the stash (no post handler, nothing
    /// left counted in flight), undoes the pre-step fixups, sets `regs.ip`
    /// to the probed address, and returns true; the runtime then pops the
    /// step and delivers the fault with those registers. False leaves
    /// everything as it was. The default claims nothing.
    fn on_fault(&'static self, regs: &mut Regs, stash: &mut StepStash) -> bool {
        let _ = (regs, stash);
        false
    }

    /// Whether the breakpoint at `addr` is one this dispatcher placed, as a
    /// lock-free lookup sees it (no text read; `true` when the lookup
    /// cannot tell). The runtime first offers a breakpoint trap to the
    /// first dispatcher that claims it, so one registry's traps do not pay
    /// the others' misses (a miss reads the text to tell a breakpoint
    /// removed since the trap from someone else's); when that one answers
    /// [`Verdict::NotOurs`], or nobody claims the trap, every dispatcher is
    /// offered it in turn. On the trap path: no C library, no lock. The
    /// default claims nothing.
    fn claims(&'static self, addr: u64) -> bool {
        let _ = addr;
        false
    }
}

/// Words of storage in a [`StepStash`]: the registry's step token is 7.
const STASH_WORDS: usize = 16;
/// Bytes a stashed value may take.
pub(crate) const STASH_BYTES: usize = STASH_WORDS * 8;

/// Per-thread storage for one dispatcher's single-step state between the
/// breakpoint trap and the step trap. Holds one value of any `'static` type
/// of at most 128 bytes and 8-byte alignment (checked at compile time).
///
/// The stash has no destructor: a value left in it when its thread exits is
/// leaked, never dropped (a thread cannot exit between the two traps of a
/// step, which are one instruction apart).
pub struct StepStash {
    ty: Option<TypeId>,
    buf: MaybeUninit<[u64; STASH_WORDS]>,
}

impl StepStash {
    /// An empty stash.
    pub const fn new() -> StepStash {
        StepStash {
            ty: None,
            buf: MaybeUninit::uninit(),
        }
    }

    /// Whether a value is stored.
    pub fn is_empty(&self) -> bool {
        self.ty.is_none()
    }

    /// Stores `value`, giving back the value stored before (if it had type
    /// `T`; a value of another type is leaked).
    pub fn put<T: 'static>(&mut self, value: T) -> Option<T> {
        const {
            assert!(std::mem::size_of::<T>() <= STASH_WORDS * 8);
            assert!(std::mem::align_of::<T>() <= 8);
        };
        let old = self.take::<T>();
        // SAFETY: size and alignment are checked above; the buffer holds no
        // live value (taken just now or never filled, or leaked on purpose).
        unsafe { self.buf.as_mut_ptr().cast::<T>().write(value) };
        self.ty = Some(TypeId::of::<T>());
        old
    }

    /// The stored value, if it has type `T`, left in place.
    pub fn peek<T: 'static>(&self) -> Option<&T> {
        if self.ty != Some(TypeId::of::<T>()) {
            return None;
        }
        // SAFETY: `ty` says a `T` was written by `put` and not taken since;
        // the reference borrows the stash, so it cannot be taken meanwhile.
        Some(unsafe { &*self.buf.as_ptr().cast::<T>() })
    }

    /// Takes the stored value if it has type `T`.
    pub fn take<T: 'static>(&mut self) -> Option<T> {
        if self.ty != Some(TypeId::of::<T>()) {
            return None;
        }
        self.ty = None;
        // SAFETY: `ty` says a `T` was written by `put` and not taken since.
        Some(unsafe { self.buf.as_ptr().cast::<T>().read() })
    }
}

impl Default for StepStash {
    fn default() -> Self {
        StepStash::new()
    }
}

impl std::fmt::Debug for StepStash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepStash")
            .field("occupied", &!self.is_empty())
            .finish()
    }
}

/// Dispatchers attachable at once. A process normally has one (its live
/// registry); tests and benchmarks add a few.
pub const MAX_DISPATCHERS: usize = 16;

/// A table entry: a thin pointer to the fat `&'static dyn`, and the same
/// dispatcher as the live registry it is when attached with
/// [`try_attach_live`] (the trap path then calls it directly).
pub(crate) struct Entry {
    d: &'static dyn TrapDispatcher,
    live: Option<&'static LiveRegistry>,
}

/// The attached dispatchers. Entries are leaked boxes, never freed (an
/// attach/detach cycle leaks one 16-byte box), so a handler holding an
/// entry pointer can never see it dangle.
static TABLE: [AtomicPtr<Entry>; MAX_DISPATCHERS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_DISPATCHERS];

/// Slots of [`TABLE`] ever filed: one past the highest index an attach has
/// used (changed under `TABLE_LOCK`, never lowered). Scans stop there: a
/// process normally has one dispatcher, and a scan of all
/// [`MAX_DISPATCHERS`] slots was a hundred instructions on every return
/// into the trampoline.
static USED: AtomicUsize = AtomicUsize::new(0);

/// The slots a scan visits: those up to [`USED`].
#[inline(always)]
fn used_slots() -> &'static [AtomicPtr<Entry>] {
    // Relaxed: `USED` is raised before the attach that filed the slot
    // returns, so a thread whose trap or return follows the attach (what
    // makes the dispatcher's probes reachable from it at all) sees it, as
    // it sees the slot's pointer; a stale value can only be that of a scan
    // racing the attach itself, which may miss the new entry either way.
    let n = USED.load(Ordering::Relaxed);
    &TABLE[..n.min(MAX_DISPATCHERS)]
}

/// Serializes attach and detach.
static TABLE_LOCK: Mutex<()> = Mutex::new(());

/// Dispatchers attached now (changed under `TABLE_LOCK`). With one, the
/// trap path skips the [`TrapDispatcher::claims`] lookup: that dispatcher
/// is offered the trap exactly once either way, and asking first would be a
/// second lookup of the same site per hit (about a tenth of an emulated
/// arm64 hit's own instructions).
static ATTACHED: AtomicUsize = AtomicUsize::new(0);

/// Takes the attach lock for the fork handlers (the child's lock is free).
pub(crate) fn hold_for_fork() -> crate::sync::MutexGuard<'static, ()> {
    TABLE_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A dispatcher's place in the table; [`detach`](Attachment::detach) gives
/// it up. Dropping an `Attachment` leaves the dispatcher attached for the
/// life of the process.
#[derive(Debug)]
#[must_use = "drop leaves the dispatcher attached forever; call detach() to remove it"]
pub struct Attachment {
    index: usize,
}

/// Files `d` in the dispatcher table and installs the SIGTRAP handler
/// (once). From now on breakpoint traps are offered to `d`.
///
/// # Panics
/// If [`MAX_DISPATCHERS`] dispatchers are attached already (see
/// [`try_attach`]).
pub fn attach(d: &'static dyn TrapDispatcher) -> Attachment {
    try_attach(d)
        .unwrap_or_else(|| panic!("at most {MAX_DISPATCHERS} trap dispatchers can be attached"))
}

/// As [`attach`], but `None` (and nothing attached) if [`MAX_DISPATCHERS`]
/// dispatchers are attached already. The SIGTRAP handler is installed
/// either way.
pub fn try_attach(d: &'static dyn TrapDispatcher) -> Option<Attachment> {
    attach_entry(Entry { d, live: None })
}

/// As [`try_attach`] for a live registry ([`Live`](super::Live)): the
/// SIGTRAP handler calls its hit path directly (inlined, inside the
/// handler's read section: [`LiveRegistry::trap_in_section`]), not
/// through the trait object. Everything else reaches it as any
/// dispatcher.
pub(crate) fn try_attach_live(r: &'static LiveRegistry) -> Option<Attachment> {
    attach_entry(Entry {
        d: r,
        live: Some(r),
    })
}

/// Files `entry` in a free slot of the table (see [`try_attach`]).
fn attach_entry(entry: Entry) -> Option<Attachment> {
    super::signal::install();
    let _g = TABLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Relaxed: entries only change under TABLE_LOCK, which we hold.
    let index = TABLE
        .iter()
        .position(|e| e.load(Ordering::Relaxed).is_null())?;
    let entry = Box::into_raw(Box::new(entry));
    // Release pairs with the acquire fence in `entry`: a handler
    // that sees the pointer sees the entry's contents.
    TABLE[index].store(entry, Ordering::Release);
    // Relaxed: see `used_slots`.
    USED.fetch_max(index + 1, Ordering::Relaxed);
    // Relaxed: a hint; any value leads the trap path to a correct answer
    // (with a stale 1 it offers every dispatcher in turn, without asking).
    ATTACHED.fetch_add(1, Ordering::Relaxed);
    Some(Attachment { index })
}

impl Attachment {
    /// Removes the dispatcher and waits until no trap handler is still in
    /// its breakpoint path.
    ///
    /// # Panics
    /// If called inside an `Rcu` read section (it waits for a grace period).
    pub fn detach(self) {
        {
            let _g = TABLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            // Relaxed: handlers that still see the old pointer are covered by
            // the grace period below; the entry itself is never freed.
            TABLE[self.index].store(std::ptr::null_mut(), Ordering::Relaxed);
            // Relaxed: as in `try_attach`.
            ATTACHED.fetch_sub(1, Ordering::Relaxed);
        }
        Rcu::global().synchronize();
    }
}

/// Calls `f` on each attached dispatcher's entry until it returns `Some`.
/// Must run inside an `Rcu` read section (the caller's guard is what
/// `detach` waits for).
#[inline]
fn find_dispatcher<R>(mut f: impl FnMut(&'static Entry) -> Option<R>) -> Option<R> {
    for slot in used_slots() {
        let Some(e) = entry(slot) else { continue };
        if let Some(r) = f(e) {
            return Some(r);
        }
    }
    None
}

/// The entry filed in `slot`, if any.
#[inline(always)]
fn entry(slot: &AtomicPtr<Entry>) -> Option<&'static Entry> {
    // Relaxed, then an acquire fence for an entry found: the fence pairs
    // with the Release store in `attach_entry` (the entry's contents). A
    // fence, not an acquire load: under qemu-user an acquire load (`ldar`)
    // is a locked host instruction on every trap, the fence's load
    // ordering (`dmb ishld`) costs an x86 host nothing; on arm64 hardware
    // both order the entry's reads after the pointer's.
    let e = slot.load(Ordering::Relaxed);
    if e.is_null() {
        return None;
    }
    fence(Ordering::Acquire);
    // SAFETY: entries are never freed (see TABLE).
    Some(unsafe { &*e })
}

/// Nested single-steps one thread can have in flight: one per signal
/// handler nested between a step's two traps, plus one.
pub const MAX_NESTED_STEPS: usize = 8;

/// One single-step in flight.
struct Pending {
    d: Option<&'static dyn TrapDispatcher>,
    /// The step marker's address for a step that ends on one; `None` for a
    /// trap-flag step.
    marker: Option<u64>,
    stash: StepStash,
}

/// The kind of trap that may end the innermost single-step.
#[derive(Clone, Copy)]
enum StepTrap {
    /// `TRAP_TRACE`: ends a trap-flag step (x86_64: arm64 steps end on
    /// markers only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    TrapFlag,
    /// An `int3` at this address: ends a step whose marker is there.
    Breakpoint(u64),
}

/// The per-thread stack of single-steps in flight (a field of the
/// thread's trap state, `trap_thread.rs`: module docs, why a stack and why
/// no destructor).
pub(super) struct PendingStack {
    depth: usize,
    entries: [Pending; MAX_NESTED_STEPS],
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_PENDING: Pending = Pending {
    d: None,
    marker: None,
    stash: StepStash::new(),
};

impl PendingStack {
    /// No step in flight.
    pub(super) const fn new() -> PendingStack {
        PendingStack {
            depth: 0,
            entries: [EMPTY_PENDING; MAX_NESTED_STEPS],
        }
    }
}

/// The step stack of the thread whose trap state is `t`, as a raw
/// pointer: callers create references to single fields or entries only,
/// never to the whole stack across a dispatcher call (a nested SIGTRAP in a
/// probe handler uses the next entry while the outer call still borrows
/// its own).
#[inline(always)]
fn pending_in(t: &TrapThread) -> *mut PendingStack {
    t.steps.with_mut(|p| p)
}

/// The calling thread's step stack (see [`pending_in`]).
#[inline]
fn pending() -> *mut PendingStack {
    trap_thread::with(pending_in)
}

/// Handles a breakpoint trap at `addr` (the `int3`'s own address): the end
/// of the innermost single-step if `addr` is its marker, else a probe hit
/// offered to the attached dispatchers. Returns false if nobody claimed
/// it; `regs` are then unchanged. A dispatcher's [`Verdict::Failed`]
/// aborts the process here ([`failed`]). Inlined into the SIGTRAP
/// handler: one call less on every trap. `t` is the calling thread's trap
/// state, which the handler reached on entry, and `reader` its `Rcu`
/// reader, armed or claimed there.
#[inline(always)]
pub(crate) fn dispatch_breakpoint(
    addr: u64,
    regs: &mut Regs,
    mem: &mut dyn DataMemory,
    t: &TrapThread,
    reader: TrapReader,
) -> bool {
    let stack = pending_in(t);
    if complete_step(stack, StepTrap::Breakpoint(addr), regs, mem) {
        return true;
    }
    // The one read section of the hit: the dispatcher table's, and the
    // live registry's lookups (`LiveRegistry::trap_in_section`).
    let guard = Rcu::read_in_trap_on(reader);
    // SAFETY (every block below): `stack` is this thread's own stack, only the trap and fault
    // handlers touch it, and each access is a short-lived reference to one field or one entry. The entry
    // at `depth` is reserved (depth raised) before the dispatcher runs, so a nested trap in a
    // handler works one entry further up and never aliases it.
    // (SAFETY argument: the comment above.)
    let depth = unsafe { (*stack).depth };
    if depth == MAX_NESTED_STEPS {
        super::signal::fatal_message("rcu-registry: too many nested single-steps on one thread");
    }
    // SAFETY: see above; reserve the entry.
    unsafe {
        (*stack).entries[depth].d = None;
        (*stack).depth = depth + 1;
    }
    // First the dispatcher that claims the address (one lookup each, no
    // text read), then, if it declines or nobody claims it, every one in
    // turn (each miss checks the text for a breakpoint removed since). With
    // a single dispatcher attached, asking is skipped: it is offered the
    // trap once either way (`ATTACHED`). Relaxed: see `try_attach`.
    let claimant = if ATTACHED.load(Ordering::Relaxed) > 1 {
        find_dispatcher(|e| e.d.claims(addr).then_some(e))
    } else {
        None
    };
    // A labelled block, and `find_dispatcher`'s loop written out: its
    // closure, which holds the live registry's hit path, was compiled out
    // of line (a call and a return on every trap).
    // Each trap taken is settled where it was taken ([`settle`], inlined
    // at each place): one result joined from the three places first went
    // through memory (a 32-byte copy and a second decoding per hit).
    if let Some(e) = claimant {
        // SAFETY: see above; the entry is reserved for this call.
        let stash = unsafe { &mut (*stack).entries[depth].stash };
        // Through the trait object, a live registry too: its hit path
        // is inlined once, for the first entry below (the one a
        // process with a single dispatcher, its live registry, takes).
        if let Some(t) = offer_to(e, regs, mem, stash) {
            return settle(stack, depth, t);
        }
    }
    // The first entry on its own, then the others in a loop: the first
    // is where a process's live registry sits (`Live::global` attaches
    // it before anything else), and its hit path, inlined here, is
    // outside any loop. Inlined in the loop, the compiler hoisted its
    // constants and addresses into the loop's preheader, onto every
    // trap: about twenty instructions of an emulated arm64 hit.
    let first = &TABLE[0];
    if let Some(e) = entry(first).filter(|e| !claimant.is_some_and(|c| std::ptr::eq(c, *e))) {
        // SAFETY: see above; the entry is reserved for this call.
        let stash = unsafe { &mut (*stack).entries[depth].stash };
        // A live registry directly, inside this trap's read section;
        // any other dispatcher through its trait object.
        let taken = match e.live {
            Some(live) => live.trap_in_section(regs, mem, stash, &guard, t),
            None => offer_to(e, regs, mem, stash),
        };
        if let Some(t) = taken {
            return settle(stack, depth, t);
        }
    }
    for slot in used_slots().get(1..).unwrap_or_default() {
        let Some(e) = entry(slot) else { continue };
        if claimant.is_some_and(|c| std::ptr::eq(c, e)) {
            continue;
        }
        // SAFETY: see above; the entry is reserved for this call.
        let stash = unsafe { &mut (*stack).entries[depth].stash };
        // As for the first entry, a live registry out of line.
        let taken = match e.live {
            Some(live) => live_offer(live, regs, mem, stash, &guard, t),
            None => offer_to(e, regs, mem, stash),
        };
        if let Some(t) = taken {
            return settle(stack, depth, t);
        }
    }
    give_back(stack, depth, false)
}

/// Settles a breakpoint trap taken at `depth` of `stack` (reserved by
/// [`dispatch_breakpoint`]): a resumed trap gives its entry back, a step
/// under way keeps it until its step trap. Returns true (handled).
#[inline(always)]
fn settle(stack: *mut PendingStack, depth: usize, taken: Taken) -> bool {
    match taken {
        Taken::Resume => give_back(stack, depth, true),
        Taken::Step { d, marker } => {
            // The entry stays pushed until its step trap; nested traps have
            // popped what they pushed.
            // SAFETY: as in `dispatch_breakpoint`.
            unsafe {
                (*stack).entries[depth].marker = marker;
                (*stack).entries[depth].d = Some(d);
            }
            true
        }
    }
}

/// A breakpoint trap a dispatcher took: what is left for the trap path to
/// do (a failure never gets here: [`offer`]).
pub(crate) enum Taken {
    /// Resume with the registers as they are.
    Resume,
    /// A single-step under way: push it, with how it ends.
    Step {
        /// Whose step: called at its step trap.
        d: &'static dyn TrapDispatcher,
        /// Where it ends ([`Verdict::StepToMarker`]), or on the trap flag.
        marker: Option<u64>,
    },
}

/// Offers a breakpoint trap to `e`'s dispatcher through its trait object:
/// what is left to do, unless the trap is not its. Out of line: inlined in
/// the dispatch loop, its setup (the verdict's room, the trait object's
/// arguments) was hoisted onto every trap, a live registry's hits (which
/// do not come here) included: a score of instructions per emulated arm64
/// hit.
#[inline(never)]
fn offer_to(
    e: &'static Entry,
    regs: &mut Regs,
    mem: &mut dyn DataMemory,
    stash: &mut StepStash,
) -> Option<Taken> {
    offer(e.d.on_breakpoint(regs, mem, stash), e.d, regs.ip)
}

/// [`LiveRegistry::trap_in_section`] out of line: for a live registry
/// that is not in the dispatcher table's first entry (see
/// `dispatch_breakpoint`).
#[inline(never)]
fn live_offer(
    live: &'static LiveRegistry,
    regs: &mut Regs,
    mem: &mut dyn DataMemory,
    stash: &mut StepStash,
    guard: &crate::rcu::RcuGuard<'_>,
    t: &TrapThread,
) -> Option<Taken> {
    live.trap_in_section(regs, mem, stash, guard, t)
}

/// What is left to do after `d`'s `verdict` on a breakpoint trap at `ip`,
/// unless the trap is not `d`'s. A [`Verdict::Failed`] aborts the process
/// here ([`failed`]): the trap path's own results then carry no
/// `ProbeError` (a large payload, copied through every layer of an
/// emulated hit's return path before).
#[inline(always)]
fn offer(verdict: Verdict, d: &'static dyn TrapDispatcher, ip: u64) -> Option<Taken> {
    // Every arm moves the verdict's parts out: nothing is left to drop
    // (`ProbeError`'s drop glue can reach `free`, and the trap path calls no
    // C-library function).
    match verdict {
        // Forgotten, not dropped: `NotOurs` owns nothing, but the drop of a
        // `Verdict` is drop glue that can reach `free`.
        v @ Verdict::NotOurs => {
            std::mem::forget(v);
            None
        }
        Verdict::Resume => Some(Taken::Resume),
        Verdict::Step => Some(Taken::Step { d, marker: None }),
        Verdict::StepToMarker { marker } => Some(Taken::Step {
            d,
            marker: Some(marker),
        }),
        Verdict::Failed(e) => failed(ip, e),
    }
}

/// A displaced instruction a dispatcher could not complete: reported, and
/// the process aborts (resuming would trap on the same breakpoint
/// forever). `ip` as the registers say after the failed attempt.
#[cold]
#[inline(never)]
pub(crate) fn failed(ip: u64, e: ProbeError) -> ! {
    // Never dropped: `ProbeError`'s drop glue can reach `free`, and the
    // trap path calls no C-library function.
    let e = std::mem::ManuallyDrop::new(e);
    super::signal::fatal(ip, &e)
}

/// Gives back the entry reserved at `depth` and returns `handled`.
#[inline]
fn give_back(stack: *mut PendingStack, depth: usize, handled: bool) -> bool {
    // SAFETY: as in `dispatch_breakpoint`; the reservation is ours.
    unsafe { (*stack).depth = depth };
    handled
}

/// Completes the innermost single-step in flight on this thread at a
/// `TRAP_TRACE`. `None` if there is none, or it ends on a step marker (the
/// trace trap is not ours).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn dispatch_step(regs: &mut Regs, mem: &mut dyn DataMemory, t: &TrapThread) -> bool {
    complete_step(pending_in(t), StepTrap::TrapFlag, regs, mem)
}

/// Completes the innermost single-step in flight if `trap` is the trap that
/// ends it. False (and `regs` unchanged) if it is not. A dispatcher's
/// [`Verdict::Failed`] aborts the process ([`failed`]).
#[inline]
fn complete_step(
    stack: *mut PendingStack,
    trap: StepTrap,
    regs: &mut Regs,
    mem: &mut dyn DataMemory,
) -> bool {
    // SAFETY (every block below): as in `dispatch_breakpoint`. A top entry
    // without a dispatcher is a reservation of a breakpoint trap still being
    // handled: no step of ours ends at this trap then.
    let Some(depth) = unsafe { (*stack).depth }.checked_sub(1) else {
        return false;
    };
    // SAFETY: see above; `depth` is below the stack's depth.
    let (d, marker) = unsafe { ((*stack).entries[depth].d, (*stack).entries[depth].marker) };
    let Some(d) = d else {
        return false;
    };
    match (trap, marker) {
        (StepTrap::TrapFlag, None) => {}
        (StepTrap::Breakpoint(at), Some(m)) if at == m => {}
        _ => return false,
    }
    // SAFETY: see above; the entry is this step's.
    let stash = unsafe { &mut (*stack).entries[depth].stash };
    match d.on_step(regs, mem, stash) {
        // The dispatcher did not recognise its own stash: leave it, the trap
        // goes on (to the dispatchers, or to the previous handler).
        Verdict::NotOurs => return false,
        // Still stepping (rep iteration): keep the entry, with how it ends.
        Verdict::Step => {
            // SAFETY: see above.
            unsafe { (*stack).entries[depth].marker = None };
            return true;
        }
        Verdict::StepToMarker { marker } => {
            // SAFETY: see above.
            unsafe { (*stack).entries[depth].marker = Some(marker) };
            return true;
        }
        Verdict::Resume => {}
        Verdict::Failed(e) => failed(regs.ip, e),
    }
    // SAFETY: see above; pop the completed step.
    unsafe {
        (*stack).entries[depth].d = None;
        (*stack).depth = depth;
    }
    true
}

/// Abandons the innermost single-step in flight on this thread if the fault
/// with registers `regs` is its instruction's own (see
/// [`TrapDispatcher::on_fault`]): `regs` then report the fault at the probed
/// address and the step is popped, so nothing leaks and the nesting depth is
/// back to what it was before the hit. Called from the fault handlers
/// (`signal.rs`) with every asynchronous signal blocked.
pub(crate) fn abort_step_on_fault(regs: &mut Regs) -> bool {
    let stack = pending();
    // SAFETY (every block below): as in `dispatch_breakpoint`; the fault
    // handler, like the SIGTRAP handler, runs with asynchronous signals
    // blocked, and a trap nested in it pops what it pushes.
    let Some(depth) = unsafe { (*stack).depth }.checked_sub(1) else {
        return false;
    };
    // SAFETY: see above. A reservation (no dispatcher yet) is a breakpoint
    // trap still being handled: the fault is in its handler, not in a slot.
    let Some(d) = (unsafe { (*stack).entries[depth].d }) else {
        return false;
    };
    // SAFETY: see above; the entry is this step's.
    let stash = unsafe { &mut (*stack).entries[depth].stash };
    if !d.on_fault(regs, stash) {
        return false;
    }
    // SAFETY: see above; pop the abandoned step.
    unsafe {
        (*stack).entries[depth].d = None;
        (*stack).entries[depth].marker = None;
        (*stack).depth = depth;
    }
    true
}

/// Boosted runs remembered per thread: one per signal handler nested
/// between a boosted hit and the slot's first instruction, plus one.
const BOOSTS: usize = 8;

/// The most recent boosted runs of one thread: `(slot, probed address)`,
/// a ring written by the SIGTRAP handler (a field of the thread's trap
/// state, `trap_thread.rs`; no destructor, as the step stack).
pub(super) struct BoostRing {
    next: usize,
    entries: [(u64, u64); BOOSTS],
}

impl BoostRing {
    /// No boosted run remembered.
    pub(super) const fn new() -> BoostRing {
        BoostRing {
            next: 0,
            entries: [(0, 0); BOOSTS],
        }
    }
}

/// Remembers that this thread was just sent into `slot` for a boosted run
/// of the instruction at `addr`: a fault at the slot's start is then
/// reported at `addr` ([`translate_boosted_fault`]). Two stores, no system
/// call; called from the SIGTRAP handler.
#[inline]
pub(crate) fn note_boost(slot: u64, addr: u64) {
    trap_thread::with(|t| note_boost_in(t, slot, addr));
}

/// [`note_boost`] in the calling thread's trap state `t`, already reached
/// (the SIGTRAP handler's).
#[inline(always)]
pub(crate) fn note_boost_in(t: &TrapThread, slot: u64, addr: u64) {
    t.boosts.with_mut(|b| {
        // This thread's own ring is touched only by this thread's trap and
        // fault handlers, which run with asynchronous signals blocked and
        // complete any nested use before they go on.
        // SAFETY: this thread's own ring, not aliased (see above).
        let b = unsafe { &mut *b };
        // Masked, though always in range: no bounds check on the hit path.
        let i = b.next % BOOSTS;
        b.entries[i] = (slot, addr);
        b.next = (i + 1) % BOOSTS;
    });
}

/// If `regs.ip` is the start of a slot this thread was recently sent into
/// for a boosted run (the copied instruction faulted: it has no fixups, so
/// nothing else changed), sets it to the probed address and returns true.
/// The newest run of that slot wins: it is the one the thread is in (a slot
/// is rebound to another address only after a wait proved no thread is in
/// it).
pub(crate) fn translate_boosted_fault(regs: &mut Regs) -> bool {
    trap_thread::with(|t| {
        t.boosts.with_mut(|b| {
            // SAFETY: as in `note_boost_in`.
            let b = unsafe { &mut *b };
            for k in 1..=BOOSTS {
                let i = (b.next + BOOSTS - k) % BOOSTS;
                let (slot, addr) = b.entries[i];
                if slot != 0 && slot == regs.ip {
                    regs.ip = addr;
                    // The thread leaves the slot: forget the run.
                    b.entries[i] = (0, 0);
                    return true;
                }
            }
            false
        })
    })
}

/// Single-steps in flight on the calling thread (for tests).
pub fn steps_in_flight() -> usize {
    // SAFETY: a plain read of this thread's own counter.
    unsafe { (*pending()).depth }
}

/// Offers a return into the return trampoline to every attached
/// dispatcher, in table order; true if one of them claimed it (`regs.ip` is
/// then the real return address).
///
/// Every dispatcher is asked, not only up to the first claim: the kprobe
/// registries and the live uprobes (x86_64) share the trampoline, and a
/// tail call from a function one of them tracks into a function another
/// tracks hijacks the same return twice (the second hijack saves the
/// trampoline's own address). Each dispatcher takes its own instances for
/// this stack pointer and runs their return handlers; the one whose
/// instance saved the caller's address claims the return. Stopping at the
/// first claim would leave the other's instance filed (its handler never
/// run) whenever the claimant comes first in the table. The first claim's
/// address stands: a later claimant (an abandoned frame at the same stack
/// pointer, which only one of two can be) runs its handlers but does not
/// move the return. A miss costs each dispatcher a lookup of this thread's
/// instances (the live uprobes: one thread-local load when the thread
/// holds no uprobe return stack, about 6 ns where the old immediate
/// answer took 2; the kprobe registry: two thread-local loads for a
/// thread with nothing filed there, about 7 ns, where a stripe lock cost
/// 16-22 ns before own stripes: `benches/live_uprobe.rs`,
/// `return_miss_*`).
///
/// A live registry ([`try_attach_live`]) is called directly, inside this
/// function's read section (`LiveRegistry::on_return_in_section`): no
/// trait-object call and no second section on every return.
#[inline]
pub(crate) fn dispatch_return(regs: &mut Regs) -> bool {
    let guard = Rcu::global().read();
    let mut to = None;
    for slot in used_slots() {
        let Some(e) = entry(slot) else { continue };
        let claimed = match e.live {
            Some(live) => matches!(
                live.on_return_in_section(regs, &guard),
                ReturnOutcome::Returned { .. }
            ),
            None => e.d.on_return(regs),
        };
        if claimed && to.is_none() {
            to = Some(regs.ip);
        }
        if let Some(t) = to {
            regs.ip = t;
        }
    }
    to.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stash_gives_back_only_the_type_it_holds() {
        let mut s = StepStash::new();
        assert!(s.is_empty());
        assert_eq!(s.put((7u64, 9u32)), None);
        assert_eq!(s.take::<u64>(), None);
        assert!(!s.is_empty());
        assert_eq!(s.take::<(u64, u32)>(), Some((7, 9)));
        assert!(s.is_empty());
        assert_eq!(s.take::<(u64, u32)>(), None);
    }

    #[test]
    fn a_stash_drops_nothing_it_does_not_own() {
        use std::sync::Arc;
        let v = Arc::new(5);
        let mut s = StepStash::new();
        assert!(s.put(Arc::clone(&v)).is_none());
        assert_eq!(Arc::strong_count(&v), 2);
        let back = s.put(Arc::clone(&v)).expect("the first value comes back");
        assert_eq!(Arc::strong_count(&v), 3);
        drop(back);
        drop(s.take::<Arc<i32>>());
        assert_eq!(Arc::strong_count(&v), 1);
    }
}
