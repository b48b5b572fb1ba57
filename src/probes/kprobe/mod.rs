//! Address-keyed probes: kprobes and kretprobes over a pluggable arch backend
//! and text memory.
//!
//! # The registry
//!
//! A [`KprobeRegistry<A, T>`](KprobeRegistry) patches code in the text
//! memory `T` (an in-memory [`Image`](crate::probes::text::Image) in tests,
//! the process's own text in the live runtime) with the breakpoints of the
//! arch backend `A`. Probed addresses live in a hash table of chains (see
//! `table.rs`): writers, serialized by one mutex, publish new chain links and
//! member lists with release stores; the hit path walks them with acquire
//! loads under an [`Rcu`](crate::rcu::Rcu) read guard and never waits for a
//! writer. What a writer unlinks is freed only after a grace period.
//!
//! # Validation
//!
//! The first probe on an address is checked before any byte changes: the
//! [`SymbolResolver`](crate::probes::resolve::SymbolResolver) names the function around it, the arch backend decodes
//! from the function's start to prove the address is an instruction boundary
//! ([`Arch::check_boundary`](crate::probes::arch::Arch::check_boundary);
//! our own breakpoints in the way are decoded as the bytes they replaced),
//! someone else's breakpoint there is refused
//! ([`ProbeError::AlreadyPatched`](crate::probes::ProbeError::AlreadyPatched)),
//! and the backend classifies the instruction
//! ([`Arch::analyze`](crate::probes::arch::Arch::analyze)). An instruction
//! that is not emulated gets an XOL slot from the [`XolAllocator`](crate::probes::xol::XolAllocator) and a plan.
//! The site is published, *then* the breakpoint is written (a checked write
//! that compares the original bytes), so a thread that traps always finds
//! it. Any failure undoes what was done: the registry and the text are left
//! exactly as before.
//!
//! # Aggregation
//!
//! All probes on one address share one site: one breakpoint, one slot, and a
//! member list whose pre handlers run in registration order. The breakpoint
//! is written when the first enabled probe arrives and removed when the last
//! one leaves or the last enabled one is disabled. A probe joins the list in
//! place (a slot, then the length, published with a release store) and
//! leaves it in place (its slot cleared, or marked for the post handlers of
//! steps in flight, which the commit waits out through the site's post
//! epoch); a full list is replaced by one twice the size, and the commit
//! compacts a list once removed slots are half of it: registering and
//! removing N probes on one address, in a batch or one by one, costs O(N)
//! time and memory (`table.rs`, "Member lists"). A list replaced by a registration
//! is freed a grace period later through the domain's
//! [`Rcu::call`](crate::rcu::Rcu::call), batched, with no unregistration
//! needed (`deferred.rs`, which counts
//! them for the tests).
//!
//! # The hit path
//!
//! The trap handler calls [`KprobeRegistry::on_breakpoint`] with the
//! registers and the thread's data memory and gets a [`HitOutcome`]: not
//! ours; vanished (the probe went away after the trap: re-execute the
//! original); skipped (a pre handler moved the IP); emulated (done);
//! boosted (resume in the slot, which jumps back); or single-step, with a
//! [`StepToken`] to hand to [`KprobeRegistry::on_step_complete`] at the step
//! trap, which applies the fixups and runs the post handlers. A return into
//! the kretprobe trampoline goes to [`KprobeRegistry::on_return`]. None of
//! these allocate, lock (beyond the kretprobe spin locks) or make a system
//! call, so they can run in a SIGTRAP handler. A hit on a thread that is
//! already running a handler counts `nmissed` and runs no handler.
//!
//! # Unregistration
//!
//! [`unregister`](KprobeRegistry::unregister) waits a grace period per
//! call; [`unregister_many`](KprobeRegistry::unregister_many) one for a
//! whole slice; [`unregister_nosync`](KprobeRegistry::unregister_nosync)
//! plus [`commit`](KprobeRegistry::commit) one for any number of calls from
//! any number of threads. **After `unregister_nosync` THE CALLER MUST CALL
//! `commit` BEFORE FREEING ANYTHING THE HANDLERS USE AND BEFORE ASSUMING THE
//! HANDLERS HAVE STOPPED.** When `commit` or `unregister` returns, no handler
//! of those probes runs any more: the grace period covers hits inside their
//! read sections, and a per-member-list count covers single-steps that left
//! the read section and will run post handlers at the step trap.
//!
//! A thread sent into the probe's XOL slot for a boosted run (no post
//! handler) runs it after its trap handler returned, outside any read
//! section, and may be preempted there for any time: the grace period does
//! not cover it. So when the last probe of an address goes, the registry
//! also calls [`XolAllocator::quiesce`](crate::probes::xol::XolAllocator::quiesce) with the retired boosted slots after
//! the grace period; the live runtime's area returns once every thread of
//! the process has been seen outside them (a real-time signal to each
//! thread; bounded, see `runtime::quiesce`). A thread that could not be
//! observed in time (it blocks the signal) does no harm either: it completes
//! the displaced instruction and jumps back after the restored original, and
//! the slot keeps those bytes because an [`XolAllocator`](crate::probes::xol::XolAllocator) reuses a freed
//! slot only for the same address, where the registry fills it with the
//! same bytes (the [reuse rule](crate::probes::xol::XolAllocator#reuse-rule)), or for any
//! address once its `quiesce` has proved no thread can still be in it.
//!
//! # Text that goes away
//!
//! The code a probe is armed in can be unmapped under it (`dlclose`,
//! `munmap`), and the address reused: by nothing, by another object, or by
//! the same library loaded again. Writing the site's saved original bytes
//! there would corrupt whatever is there now; refusing to unregister would
//! leave the probe registered for good. (The loader hook that retires sites
//! *when* `dlclose` runs is the live uprobes issue's; here the registry
//! notices at its next write.)
//!
//! **What a site records.** When the first probe on an address is armed,
//! the site records the [`TextIdentity`](crate::probes::text::TextIdentity)
//! there: the file's device and inode and its load bias (address minus file
//! offset), as the arming write found it
//! ([`TextMemory::write_identified`](crate::probes::text::TextMemory::write_identified);
//! a site registered disabled looks it up). Every later breakpoint write and
//! removal goes through
//! [`TextMemory::write_in`](crate::probes::text::TextMemory::write_in),
//! which refuses ([`ProbeError::TextGone`](crate::probes::ProbeError::TextGone),
//! nothing written) unless that identity is still mapped at the address,
//! checked in the same memory-map snapshot and under the same lock as the
//! write itself (for the live runtime's text: no `/proc/self/maps` read
//! beyond the one every write already makes).
//!
//! **When a site's text went away.** Disarming finds one of: nothing or
//! another file (or the same file at another bias) mapped there
//! (`TextGone`); or the *original* bytes where our breakpoint was, which
//! in the same file at the same bias means the file was mapped again (a
//! private mapping's written page never reverts by itself) or someone put
//! them back, and either way there is nothing to restore. Joining an armed
//! site checks that the breakpoint byte is still there (one read): if the
//! text is unreadable, holds the original bytes, or is another identity,
//! the site is stale. Such a site is **detached**: unlinked from the hash
//! table (new hits do not find it), marked unarmed, and kept aside with its
//! probes, which stay registered. Unregistering them (every path: one,
//! `unregister_many`, `unregister_nosync` + `commit`, `unregister_all`)
//! succeeds with nothing written, and the last one retires the site as
//! usual (its XOL slot comes back after the grace period and the usual
//! quiescence). A registration at the address prepares a fresh site from
//! the text there now (decoded anew, a new slot), arms it, and only then
//! detaches the stale one, so an error changes nothing. Enabling a probe of
//! a detached site is refused (`TextGone`); disabling one writes nothing.
//! [`sites`](KprobeRegistry::sites) lists live sites only;
//! [`probes`](KprobeRegistry::probes) lists the detached sites' probes too.
//!
//! **Why this is sound, and what it cannot see.** Our breakpoint lives in a
//! private copy of the page made when we wrote it; a mapping made later at
//! the address never contains it unless its own bytes have the breakpoint
//! byte there. So a write through `write_in` never lands in another file's
//! text, and the same file mapped again is told apart by the breakpoint's
//! absence. What is not detected:
//! - a stale site nobody writes or joins: until the next registry operation
//!   on the address it stays linked, and if new text at the address
//!   *executes* an `int3` there, the stale site handles the trap (running
//!   the old instruction out of line). Only a loader hook can close this;
//! - a join on an armed site whose address now holds the breakpoint byte
//!   in another object (checking the identity on every join would cost a
//!   memory-map read per probe): the new probe joins the stale site and
//!   fires only if that `int3` is executed; its unregistration still writes
//!   nothing into the other object (`write_in`);
//! - a site with no enabled probe (no breakpoint written): the same file
//!   mapped again at the same bias is indistinguishable from the old text,
//!   so enabling arms it in the new mapping (same file, same bytes, same
//!   address: the decoded instruction and XOL plan are still right);
//! - anonymous memory (JIT code) has no file identity: a new anonymous
//!   mapping at the address is detected only by the breakpoint's absence;
//! - an unload racing a registry operation on the address (the check and the
//!   write are one step for our writes, not for the loader's `munmap`).
//!
//! # Kretprobes
//!
//! A [`Kretprobe`] is an entry probe whose "pre handler" takes an instance
//! from a preallocated pool, runs the entry handler, and hijacks the return
//! address; the instance is filed per thread in a table of hashed spin locks
//! (`instances.rs`, which documents the lock order; the pool is lock-free).
//! Unregistering orphans the instances in flight:
//! they still bring their calls back to the real return address and are
//! reclaimed when those return. A thread that exits inside a tracked call
//! gives its instances back at its exit (a thread-specific key's
//! destructor), and [`KprobeRegistry::flush_thread`] /
//! [`KprobeRegistry::flush_abandoned_frames`] do it on request for frames
//! a thread abandoned otherwise (`thread_exit.rs`).
//!
//! # Lock order
//!
//! `reclaim_lock` → writer mutex → (text memory's own lock, XOL allocator's
//! own lock, the deferred-free state's mutex, which the RCU callbacks take
//! alone and committers take holding `reclaim_lock` only). The hit path
//! takes none of these. Kretprobe hit paths take one
//! instance-table stripe at a time (their pools are lock-free). The
//! thread-exit flush takes the process-wide list of instance tables, then
//! one stripe; a registry's drop takes that list alone, before anything
//! else. The live runtime's fork handlers take all of them in this order
//! (`fork.rs`): the list, then per registry `reclaim_lock`, writer,
//! deferred-free mutex, every stripe.

pub(crate) mod deferred;
#[cfg(not(loom))]
pub(crate) mod fork;
mod hit;
mod instances;
mod jump;
mod kretprobe;
mod probe;
#[cfg(test)]
mod reentry_tests;
mod registry;
mod site;
mod table;
mod this_thread;
mod thread_exit;
mod unregister;

pub use hit::{HitOutcome, StepResult, StepToken};
#[cfg(test)]
pub(crate) use instances::test_hooks;
pub use jump::{JumpHit, JumpHook};
pub use kretprobe::{
    default_maxactive, EntryAction, EntryHandler, Kretprobe, KretprobeBuilder, ReturnHandler,
};
pub use probe::{
    Action, AsKprobe, Kprobe, KprobeBuilder, PostHandler, PreHandler, ProbeId, Target,
};
#[cfg(all(target_os = "linux", target_arch = "x86_64", not(loom)))]
pub(crate) use registry::Writer as JumpWriter;
pub use registry::{
    KprobeRegistry, RegistryBuilder, SiteInfo, DEFAULT_BUCKETS, DEFAULT_INSTANCE_STRIPES,
    DEFAULT_OWN_STRIPES,
};
// For the live runtime's nested-trap path (`runtime/in_trap.rs`).
#[cfg(all(target_os = "linux", not(loom)))]
pub(crate) use this_thread::KprobeScope;
pub use this_thread::ThreadKey;
