//! The calling thread as the kprobe paths see it: its [`ThreadKey`], the
//! kprobe family's handler flag, and its part of every instance table, in
//! one thread-local.
//!
//! A kretprobe entry files an instance under the thread's key, in the own
//! stripe its claim array names (`instances.rs`), and arms its exit flush
//! (`thread_exit.rs`); the return looks the claim up again. Each was a
//! thread-local of its own, as was the handler flag both raise first (the
//! key's anchor, the claims, the shared-stripe count, the exit flag, the
//! handler flag): on x86_64 a settled thread-local access is an offset
//! load, its check and the thread pointer, about six instructions, and a
//! tracked call made seven of them. Here they are the fields of one block,
//! [`ThisThread`], reached once per entry and once per return
//! ([`ThisThread::get`]); the block's address is the thread's key, so the
//! key costs nothing more.
//!
//! The fields keep their owners' rules: the handler flag is
//! `probes/reentry.rs`'s ([`KprobeFlag`]: the invariant there, and why it
//! goes up before anything else), the claims and the shared-stripe count
//! `instances.rs`'s, the exit flag `thread_exit.rs`'s. Every field is a
//! `Cell` touched only by its own thread (and by signal handlers on it,
//! which finish before the thread resumes).

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::probes::reentry::{Flag, HandlerScope};

/// Tables a thread can hold an own stripe in at once (its claims are
/// cached in a fixed array of its [`ThisThread`]; a thread in a fifth live
/// table uses that table's shared stripes, and an entry a dropped table left
/// is taken over: `instances.rs`, "Own stripes").
pub(super) const MAX_CLAIMS: usize = 4;

/// Identifies a thread, cheaply and async-signal-safely: the address of a
/// thread-local block (no system call, no allocation).
///
/// Keys of live threads are distinct; a key may be reused after its thread
/// exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ThreadKey(pub(super) usize);

impl ThreadKey {
    /// The calling thread's key.
    #[inline]
    pub fn current() -> ThreadKey {
        ThisThread::get().key()
    }
}

/// One thread's kprobe state (module docs).
pub(super) struct Block {
    /// The kprobe family's re-entrancy flag ([`KprobeFlag`]): up while this
    /// thread runs kprobe handlers.
    handler: Cell<bool>,
    /// The own stripes this thread claimed: `(table id, index)`, id 0 for
    /// an empty entry (`instances.rs`).
    pub(super) claims: [Cell<(u64, u32)>; MAX_CLAIMS],
    /// Instances this thread may have in some table's shared stripes (a
    /// hint: another thread's flush can take them without lowering it).
    /// While it is not zero the thread claims no own stripe, so that one
    /// call's instances are never split between the two (`instances.rs`).
    pub(super) in_shared: Cell<usize>,
    /// Whether this thread set the exit key (its exit will flush it:
    /// `thread_exit.rs`).
    #[cfg_attr(loom, allow(dead_code))]
    pub(super) exit_armed: Cell<bool>,
}

crate::sync::const_thread_local! {
    /// This thread's block; its address is the thread's key.
    static BLOCK: Block = Block {
        handler: Cell::new(false),
        claims: [const { Cell::new((0, 0)) }; MAX_CLAIMS],
        in_shared: Cell::new(0),
        exit_armed: Cell::new(false),
    };
}

/// The calling thread's [`Block`], reached once ([`get`](Self::get)) and
/// handed down the kretprobe path. Neither `Send` nor `Sync`: it is only
/// ever used on the thread it was taken on.
#[derive(Clone, Copy)]
pub(crate) struct ThisThread {
    block: NonNull<Block>,
    /// Not `Send`, not `Sync` (`NonNull` already is neither; explicit).
    _thread: PhantomData<*const ()>,
}

impl ThisThread {
    /// The calling thread's block: one thread-local access.
    #[inline(always)]
    pub(crate) fn get() -> ThisThread {
        BLOCK.with(|b| ThisThread {
            block: NonNull::from(b),
            _thread: PhantomData,
        })
    }

    /// The thread's key: the block's address.
    #[inline(always)]
    pub(crate) fn key(self) -> ThreadKey {
        ThreadKey(self.block.as_ptr() as usize)
    }

    /// Raises the kprobe family's handler flag ([`KprobeScope::enter`]
    /// without a second thread-local access).
    #[inline(always)]
    pub(crate) fn enter_handlers(self) -> Option<KprobeScope> {
        // SAFETY: the block is the calling thread's (see `block`), and its
        // `handler` field is the flag `KprobeFlag::with` reaches.
        unsafe { KprobeScope::enter_on(&self.block().handler) }
    }

    /// The block's fields. The block is the calling thread's `const`
    /// thread-local, which needs no drop and lives as long as the thread;
    /// a `ThisThread` never leaves the thread it was taken on (neither
    /// `Send` nor `Sync`), so that thread is alive while it is.
    #[inline(always)]
    pub(super) fn block(&self) -> &Block {
        // SAFETY: the calling thread's live thread-local (see above).
        unsafe { self.block.as_ref() }
    }
}

/// The kprobe family's re-entrancy flag (`probes/reentry.rs`): the
/// `handler` field of the calling thread's [`Block`].
pub(crate) enum KprobeFlag {}

impl Flag for KprobeFlag {
    #[inline]
    fn with<R>(f: impl FnOnce(&Cell<bool>) -> R) -> R {
        BLOCK.with(|b| f(&b.handler))
    }
}

/// Marks the thread as running kprobe handlers; cleared on drop.
pub(crate) type KprobeScope = HandlerScope<KprobeFlag>;

/// Whether the calling thread is running kprobe handlers.
pub(crate) fn in_kprobe_handler() -> bool {
    KprobeFlag::is_up()
}
