//! File-keyed probes: uprobes over a pluggable arch backend and any number
//! of address spaces.
//!
//! # Keys and the tree
//!
//! A uprobe is named by [`UprobeKey`]: a file ([`FileId`]: device, inode)
//! and a byte offset in it. Uprobes live in a
//! [`SeqTree`](crate::seqtree::SeqTree) ordered by that key, so every uprobe
//! of a file in an offset range is one range scan (what an mmap needs).
//! Writers own entries through [`EntryHandle`](crate::seqtree::EntryHandle)s
//! taken with increment-unless-zero: a uprobe whose last reference is gone
//! is never brought back (the "refcount resurrection" of the seed), a
//! concurrent registration then creates a fresh one.
//!
//! # Consumers
//!
//! Each uprobe carries the [`Consumer`]s registered on it, in registration
//! order, in an [`RcuCell`](crate::rcu::RcuCell) replaced whole by writers
//! (read-copy-update). A consumer has a handler, a return handler, or both,
//! and an optional filter that says which address spaces it wants (for hits
//! and returns alike); a handler may ask to be removed. The hit path and
//! the handlers run in a read section of the registry's domain,
//! [`Srcu`](crate::rcu::Srcu) by default, so handlers may sleep. A hit on a
//! thread already running uprobe handlers runs none and counts `nmissed`.
//!
//! # Return handlers (uretprobes)
//!
//! A consumer with a return handler must sit on a function's entry. A hit
//! there hijacks the return address to the space's trampoline
//! ([`AddressSpace::return_trampoline`]) and pushes a return instance on the
//! thread's stack for the space (bounded by
//! [`max_return_depth`](UprobeRegistry::max_return_depth)), a stack the
//! thread claimed without allocating from the space's preallocated pool
//! ([`return_stacks`](UprobeRegistry::return_stacks) of them); the return into
//! the trampoline goes to [`UprobeRegistry::on_return`], which runs the
//! return handlers and restores the real return address. Nested, recursive
//! and chained (tail-call) returns come back in LIFO order; a consumer
//! removed while calls are in flight is not called after its `unregister`
//! returned, and the calls still return to the right address. See
//! `returns.rs`.
//!
//! # Address spaces
//!
//! An [`AddressSpace`] has an id, a text memory the breakpoints are written
//! to and an XOL slot allocator. The registry learns its file mappings from
//! [`UprobeRegistry::on_mmap`] and [`UprobeRegistry::on_munmap`]:
//!
//! - `on_mmap` records the mapping and installs every uprobe of the file
//!   in the mapped range. Our breakpoint already at the address counts as
//!   installed: the space can inherit patched text (a forked copy, or text
//!   remapped while still patched), and refusing would leave a breakpoint
//!   that traps with no uprobe to handle it.
//! - Registering a consumer installs into every known space that maps the
//!   offset (and that some consumer's filter wants); removing the last
//!   consumer restores the bytes in every space and removes the uprobe.
//!
//! Each install analyses the displaced instruction at its address in that
//! space (branch targets are absolute) and plans its XOL slot there; the
//! hit path only reads that analysis. A re-install at an address whose
//! previous slot is still waiting for its grace period takes that slot
//! back when the planned bytes are identical (`xolshare.rs`), so fast
//! install/remove churn holds one slot per address. Validation reads the file's bytes
//! through the first mapping it meets: an offset the file's mappings do not
//! cover, someone else's patch, an unsupported instruction, or (with
//! [`register_in_function`](UprobeRegistry::register_in_function)) an offset
//! inside an instruction are refused with nothing changed.
//!
//! # Registering before any mapping
//!
//! When no known space maps the offset yet, a registry given a
//! [`FileText`] ([`UprobeRegistry::with_file_text`]) reads the file's code
//! by [`FileId`] and refuses the same bad input at registration, as the
//! kernel does from the page cache; without one (or for a file it cannot
//! read) registration succeeds and validation waits for the first
//! `on_mmap` of the offset, which reports the error. See `filetext.rs`.
//!
//! Changes concerning one file are serialized by one stripe of a padded
//! [`HashedLocks`](crate::hashlock::HashedLocks) keyed by [`FileId`] (the
//! seed's hashed mmap mutexes, with the padding it asked for).
//!
//! # Targets by file
//!
//! [`UprobeTarget`] names a uprobe as a person does, `libz.so.1:crc32`,
//! `/usr/lib/x86_64-linux-gnu/libc.so.6:qsort+4`, `./app:0x1a2b`, and a
//! [`TargetResolver`] turns it into the [`UprobeKey`] from the ELF file on
//! disk (the library found as the dynamic linker would find it, the symbol
//! turned into a file offset through its segment), before anything maps
//! it. See `targets.rs`.
//!
//! # The hit path
//!
//! [`UprobeRegistry::on_breakpoint`]: `(space, vaddr)` → mapping →
//! `(file, offset)` → uprobe → consumers, lock-free and allocation-free, then
//! the displaced instruction is emulated, run boosted from its slot, or
//! single-stepped ([`UprobeStep`]), reported as [`UprobeOutcome`] values
//! (kprobes' `HitOutcome` without its kprobe-only `StepToken`). The
//! `(file, offset)` → uprobe step goes through a small writer-filled hash
//! table of the tree's uprobes (the *hit cache*, `hitcache.rs`) and walks
//! the tree only when the uprobe has no slot there: a walk of a large tree
//! is about ten dependent cache misses per hit.
//!
//! # Jump optimization
//!
//! A runtime that rewrites installs into jumps to detours (the live one,
//! x86_64) gives the registry a hook ([`UprobeRegistry::with_jump_hook`]),
//! called before the registry touches text it may have rewritten, and calls
//! [`UprobeRegistry::on_jump_hit`] from its detours. See `jump.rs`.

mod bindings;
mod consumer;
mod filetext;
mod hit;
mod hitcache;
mod install;
mod jump;
mod mmap;
mod proxy;
mod registry;
mod retpool;
mod returns;
mod short;
mod space;
// Reads ELF files with `object` (a Linux dependency); the loom build has
// no files to read.
#[cfg(all(target_os = "linux", not(loom)))]
mod targets;
mod unregister;
mod xolshare;

pub use bindings::MAX_SPACES_PER_THREAD;
pub use consumer::{
    Consumer, ConsumerAction, ConsumerBuilder, Filter, Handler, RetHandler, UprobeHit, UprobeReturn,
};
pub use filetext::{FileText, MemFiles};
pub use hit::{UprobeFinished, UprobeOutcome, UprobeRef, UprobeStep};
pub use hitcache::DEFAULT_HIT_CACHE_SLOTS;
pub use proxy::{CallInFlight, ProxyReturns};
pub use registry::{UprobeRegistry, DEFAULT_FILE_STRIPES};
pub use retpool::{default_return_stacks, MIN_RETURN_STACKS};
pub use returns::DEFAULT_MAX_RETURN_DEPTH;
pub use space::{AddressSpace, FileId, FileMapping, SpaceId, UprobeKey};
#[cfg(all(target_os = "linux", not(loom)))]
pub use targets::{
    ElfKind, FoundBy, LibrarySearch, LoadedObjects, ParseTargetError, ParseTargetErrorKind,
    ResolvedTarget, TargetFile, TargetFunction, TargetPlace, TargetResolver, UprobeTarget,
};
