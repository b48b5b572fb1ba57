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
//! # Kretprobes
//!
//! A [`Kretprobe`] is an entry probe whose "pre handler" takes an instance
//! from a preallocated pool, runs the entry handler, and hijacks the return
//! address; the instance is filed per thread in a table of hashed spin locks
//! (`instances.rs`, which documents the lock order: the pool lock and the
//! table locks never nest). Unregistering orphans the instances in flight:
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
//! instance-table stripe or one pool lock at a time. The thread-exit flush
//! takes the process-wide list of instance tables, then one stripe, then
//! (after releasing it) pool locks; a registry's drop takes that list alone,
//! before anything else. The live runtime's fork handlers take all of them
//! in this order (`fork.rs`): the list, then per registry `reclaim_lock`,
//! writer, deferred-free mutex, every stripe, every pool.

pub(crate) mod deferred;
#[cfg(not(loom))]
pub(crate) mod fork;
mod hit;
mod instances;
mod kretprobe;
mod probe;
#[cfg(test)]
mod reentry_tests;
mod registry;
mod site;
mod table;
mod thread_exit;
mod unregister;

pub use hit::{HitOutcome, StepResult, StepToken};
#[cfg(test)]
pub(crate) use instances::test_hooks;
pub use instances::ThreadKey;
pub use kretprobe::{
    default_maxactive, EntryAction, EntryHandler, Kretprobe, KretprobeBuilder, ReturnHandler,
};
pub use probe::{
    Action, AsKprobe, Kprobe, KprobeBuilder, PostHandler, PreHandler, ProbeId, Target,
};
pub use registry::{
    KprobeRegistry, RegistryBuilder, SiteInfo, DEFAULT_BUCKETS, DEFAULT_INSTANCE_STRIPES,
};
