//! Hashed lock arrays: stripes of locks, each on its own cache line, picked
//! by a fast hash of a strictly typed key.
//!
//! # The idea
//!
//! One lock for a whole table serializes every user of the table; a lock per
//! entry costs memory per entry and cannot guard an entry that does not exist
//! yet. A [`HashedLocks`] array sits between: a fixed, power-of-two number of
//! *stripes*, and a key is guarded by the stripe its hash picks. Two keys on
//! different stripes never wait for each other; two keys on the same stripe
//! share a lock, which is always *correct* (a stripe guards a superset of the
//! key) and only costs contention. The kernel uses this for kretprobe
//! instance tables (per-hash-bucket locks keyed by task) and for uprobe
//! per-file serialization (a hash of mutexes keyed by inode).
//!
//! A stripe can also carry data (`T`, default `()`): the natural home for a
//! per-bucket structure such as a hash chain, which then can only be reached
//! through the stripe's guard.
//!
//! # Typed keys
//!
//! The key type is a type parameter of the array. A table keyed by thread
//! cannot be locked with a file id by mistake, and no caller ever casts a
//! pointer or id to an integer to pick a stripe:
//!
//! ```compile_fail,E0308
//! use rcu_registry::hashlock::HashedLocks;
//!
//! #[derive(Hash)]
//! struct ThreadKey(u32);
//! #[derive(Hash)]
//! struct FileId(u64);
//!
//! let kretprobe_locks: HashedLocks<ThreadKey, std::sync::Mutex<()>> =
//!     HashedLocks::new(64).unwrap();
//! let _guard = kretprobe_locks.lock(&FileId(3)); // error: expected `&ThreadKey`
//! ```
//!
//! The same lock with the array's own key type compiles:
//!
//! ```
//! use rcu_registry::hashlock::HashedLocks;
//!
//! #[derive(Hash)]
//! struct ThreadKey(u32);
//! #[derive(Hash)]
//! struct FileId(u64);
//!
//! let kretprobe_locks: HashedLocks<ThreadKey, std::sync::Mutex<()>> =
//!     HashedLocks::new(64).unwrap();
//! let _guard = kretprobe_locks.lock(&ThreadKey(3));
//! # let _ = FileId(3).0;
//! ```
//!
//! # Lock order and deadlock freedom
//!
//! Stripes are ordered by index. [`lock_pair`](HashedLocks::lock_pair) takes
//! its (at most two) stripes in increasing index order, whatever the order of
//! its arguments, and locks once when both keys share a stripe;
//! [`lock_all`](HashedLocks::lock_all) takes every stripe from 0 upwards and
//! releases from the top down. Since every multi-stripe acquisition climbs the
//! same order, no two of them can wait for each other in a cycle.
//!
//! The caller's half of the bargain: **a thread that holds a stripe must not
//! block on a stripe of the same array at or below it.** In particular, do
//! not call `lock_all` while holding any stripe, and do not call `lock(b)`
//! while holding `lock(a)`: use `lock_pair(a, b)`. Debug builds check this
//! per thread and panic, before touching the lock, with a message naming
//! both stripes; `try_*` methods never wait and are not checked. Locks of
//! *different* arrays are ordered by the caller, as with any two locks.
//!
//! # Padded or compact
//!
//! By default ([`Padded`]) every stripe sits in its own
//! [`CachePadded`](crossbeam_utils::CachePadded) slot, so two cores working
//! on different stripes do not pull one cache line back and forth (false
//! sharing). [`Compact`] packs the stripes back to back: right for
//! single-CPU machines, where nothing runs in parallel and the smaller array
//! caches better, or where memory matters more than the last nanoseconds.
//!
//! Padding pays when two or more threads run at the same time on different
//! cores and take different stripes often. Measured on a shared 2-core
//! x86_64 VM (`BENCHMARKS.md`, "Hashed locks"), two threads pinned to the two
//! cores, each locking and unlocking its own one of two neighbouring stripes:
//! compact took a median 1.7x to 4.7x as long per lock/unlock as padded
//! with spin-lock stripes, and 1.6x to 5.4x with `Mutex<()>` stripes (four
//! runs; the spread is the machine's load: false sharing costs only while
//! both threads are actually on a core). Single-threaded, the layouts cost
//! the same.
//!
//! # The hash
//!
//! Keys are hashed by their [`Hash`] impl into a fast multiplicative hasher
//! with a xorshift-multiply finalizer; the stripe is the top bits of the
//! result. It is not SipHash on purpose: a lock array has no chains to
//! attack (the worst case is every key on one stripe: the single lock the
//! array replaces), and SipHash measured 6x slower, close to the cost of an
//! uncontended spin-lock lock/unlock by itself. The spread is that of a
//! random function: on 65,536 sequential integer keys the fullest of 64
//! stripes gets 1.07x its fair share and the fullest of 1,024 stripes 1.41x
//! (`tests/hashlock_distribution.rs` checks at most 2x for 1 to 1,024
//! stripes on sequential, page-strided, cache-line-strided, high-bits-only,
//! tuple and string keys).
//!
//! # Choosing a lock
//!
//! Any [`StripeLock`]: `std::sync::Mutex<()>` (sleeps when contended; the
//! safe default), `std::sync::RwLock<()>` (a [`SharedStripeLock`]: adds
//! [`read`](HashedLocks::read), [`read_pair`](HashedLocks::read_pair) and
//! [`read_all`](HashedLocks::read_all)), or [`SpinLock`] (one byte, never
//! sleeps; for short critical sections with no more threads than cores).
//! Poisoning is ignored, as in `parking_lot`.
//!
//! # Example: a kretprobe-style instance table
//!
//! ```
//! use rcu_registry::hashlock::{HashedLocks, SpinLock};
//!
//! #[derive(Hash, PartialEq, Debug, Clone, Copy)]
//! struct ThreadKey(u32);
//!
//! // 64 stripes, each carrying the chain of return instances for its threads.
//! let table: HashedLocks<ThreadKey, SpinLock, Vec<(ThreadKey, u64)>> =
//!     HashedLocks::new(64).unwrap();
//!
//! let me = ThreadKey(4242);
//! table.lock(&me).push((me, 0xdead_beef)); // probe entry: remember the return address
//! let ret = {
//!     let mut chain = table.lock(&me); // trampoline: find and remove ours
//!     let at = chain.iter().position(|(t, _)| *t == me).unwrap();
//!     chain.swap_remove(at).1
//! };
//! assert_eq!(ret, 0xdead_beef);
//!
//! // Unregistering walks every chain with everything locked at once.
//! let all = table.lock_all();
//! assert!(all.iter().all(Vec::is_empty));
//! ```
//!
//! # Example: uprobe-style per-file serialization
//!
//! ```
//! use std::sync::Mutex;
//!
//! use rcu_registry::hashlock::HashedLocks;
//!
//! #[derive(Hash)]
//! struct FileId {
//!     dev: u64,
//!     ino: u64,
//! }
//!
//! // Breakpoint insertion and removal for one file must not interleave;
//! // different files should not wait for each other.
//! let per_file: HashedLocks<FileId, Mutex<()>> = HashedLocks::new(32).unwrap();
//! let libc = FileId { dev: 8, ino: 1_234 };
//! {
//!     let _serialized = per_file.lock(&libc);
//!     // ... walk the mappings of `libc` and write the breakpoints ...
//! }
//! ```

mod guard;
mod hash;
mod layout;
mod lock;
mod order;

use core::fmt;
use core::hash::Hash;
use core::marker::PhantomData;

pub use guard::{
    AllGuard, AllReadGuard, PairGuard, PairMut, PairReadGuard, StripeGuard, StripeReadGuard,
};
pub use layout::{Compact, Padded, StripeLayout};
pub use lock::{Access, Exclusive, Shared, SharedStripeLock, SpinGuard, SpinLock, StripeLock};

use crate::sync::UnsafeCell;

/// The most stripes an array may have: 65,536. Contention falls with the
/// number of stripes only while stripes outnumber contending threads; far
/// beyond that, a bigger array only spreads lock traffic over more cache
/// misses (65,536 padded stripes already take 8 MiB).
pub const MAX_STRIPES: usize = 1 << 16;

/// Why an array could not be built with the requested number of stripes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StripeCountError {
    /// Zero stripes were requested; an array needs at least one.
    Zero,
    /// More than [`MAX_STRIPES`] stripes, after rounding up to a power of
    /// two, were requested.
    TooMany {
        /// The count asked for.
        requested: usize,
    },
}

impl fmt::Display for StripeCountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StripeCountError::Zero => f.write_str("a hashed lock array needs at least one stripe"),
            StripeCountError::TooMany { requested } => write!(
                f,
                "{requested} stripes requested; a hashed lock array has at most {MAX_STRIPES}"
            ),
        }
    }
}

impl std::error::Error for StripeCountError {}

/// One stripe: its lock and the data it protects, side by side (so a padded
/// stripe brings both into cache with one line).
struct Stripe<L, T> {
    lock: L,
    data: UnsafeCell<T>,
}

/// A power-of-two array of lock stripes indexed by a hash of a `K`.
///
/// - `K`: the key type; only `&K` can pick a stripe.
/// - `L`: the lock of each stripe ([`StripeLock`]).
/// - `T`: data each stripe protects (default `()`: the stripes guard
///   something outside the array).
/// - `P`: [`Padded`] (default) or [`Compact`]; see the [module docs](self).
///
/// See the [module docs](self) for the lock order callers must follow.
pub struct HashedLocks<K: ?Sized, L, T = (), P: StripeLayout = Padded> {
    stripes: Box<[P::Cell<Stripe<L, T>>]>,
    /// `fn(&K)`: the array neither owns nor shares a `K`, so `K` affects no
    /// auto trait and may be unsized (`str`, `[u8]`, `Path`).
    _key: PhantomData<fn(&K)>,
}

/// [`HashedLocks`] with the [`Compact`] (unpadded) layout.
pub type CompactHashedLocks<K, L, T = ()> = HashedLocks<K, L, T, Compact>;

// SAFETY: sending the array sends its locks (`L: Send`) and data (`T: Send`);
// the layout wrapper adds nothing that is not `Send`.
unsafe impl<K: ?Sized, L: Send, T: Send, P: StripeLayout> Send for HashedLocks<K, L, T, P> {}

// SAFETY: `T` is reached only through a stripe guard. Exclusive guards hand
// `&mut T` to one thread at a time (needs `T: Send`); shared guards hand
// `&T` to several threads at once (needs `T: Sync`).
unsafe impl<K: ?Sized, L: Sync, T: Send + Sync, P: StripeLayout> Sync for HashedLocks<K, L, T, P> {}

impl<K: ?Sized + Hash, L: StripeLock, T: Default, P: StripeLayout> HashedLocks<K, L, T, P> {
    /// An array of `stripes` stripes rounded up to a power of two, each with
    /// `T::default()` as its data.
    ///
    /// # Errors
    ///
    /// [`StripeCountError::Zero`] for 0, [`StripeCountError::TooMany`] when
    /// the rounded count exceeds [`MAX_STRIPES`].
    ///
    /// ```
    /// use rcu_registry::hashlock::{HashedLocks, StripeCountError};
    ///
    /// let locks: HashedLocks<u64, std::sync::Mutex<()>> = HashedLocks::new(48).unwrap();
    /// assert_eq!(locks.len(), 64);
    /// assert_eq!(
    ///     HashedLocks::<u64, std::sync::Mutex<()>>::new(0).unwrap_err(),
    ///     StripeCountError::Zero
    /// );
    /// ```
    pub fn new(stripes: usize) -> Result<Self, StripeCountError> {
        Self::with_data(stripes, |_| T::default())
    }
}

impl<K: ?Sized + Hash, L: StripeLock, T, P: StripeLayout> HashedLocks<K, L, T, P> {
    /// An array of `stripes` stripes rounded up to a power of two; stripe `i`
    /// starts with `init(i)` as its data.
    ///
    /// # Errors
    ///
    /// As for [`new`](Self::new); `init` is not called on error.
    pub fn with_data(
        stripes: usize,
        mut init: impl FnMut(usize) -> T,
    ) -> Result<Self, StripeCountError> {
        if stripes == 0 {
            return Err(StripeCountError::Zero);
        }
        let len = match stripes.checked_next_power_of_two() {
            Some(len) if len <= MAX_STRIPES => len,
            _ => return Err(StripeCountError::TooMany { requested: stripes }),
        };
        let stripes = (0..len)
            .map(|i| {
                P::wrap(Stripe {
                    lock: L::new(),
                    data: UnsafeCell::new(init(i)),
                })
            })
            .collect();
        Ok(HashedLocks {
            stripes,
            _key: PhantomData,
        })
    }

    /// The number of stripes (a power of two, at least 1).
    #[inline]
    #[allow(clippy::len_without_is_empty)] // an array has at least one stripe
    pub fn len(&self) -> usize {
        self.stripes.len()
    }

    /// Bytes from one stripe to the next: the cache-padding size for
    /// [`Padded`], the size of a lock plus its data for [`Compact`].
    pub const fn stride() -> usize {
        core::mem::size_of::<P::Cell<Stripe<L, T>>>()
    }

    /// The stripe that guards `key`: deterministic for a given build, in
    /// `0..self.len()`.
    #[inline]
    pub fn stripe_of(&self, key: &K) -> usize {
        hash::stripe_index(hash::hash_key(key), self.stripes.len())
    }

    /// Locks the stripe of `key` exclusively.
    ///
    /// Must not be called while this thread holds a stripe of this array at
    /// or above `stripe_of(key)` (checked in debug builds; see the
    /// [module docs](self)).
    #[inline]
    pub fn lock(&self, key: &K) -> StripeGuard<'_, L, T, Exclusive> {
        self.acquire(self.stripe_of(key))
    }

    /// Locks the stripe of `key` exclusively if that needs no waiting.
    ///
    /// It never waits, so the lock order does not apply to it: it is the way
    /// in from a context that may have interrupted a holder of the same
    /// stripe on this thread (a signal handler), where it returns `None`
    /// instead of deadlocking. With [`SpinLock`] stripes it is a hash and one
    /// compare-and-swap: no allocation, no system call.
    #[inline]
    pub fn try_lock(&self, key: &K) -> Option<StripeGuard<'_, L, T, Exclusive>> {
        self.try_acquire(self.stripe_of(key))
    }

    /// Locks the stripes of `a` and `b` exclusively: in increasing index
    /// order, once if they coincide.
    ///
    /// ```
    /// use rcu_registry::hashlock::{HashedLocks, PairMut, SpinLock};
    ///
    /// let balances: HashedLocks<&str, SpinLock, i64> = HashedLocks::with_data(8, |_| 0).unwrap();
    /// let mut pair = balances.lock_pair(&"alice", &"bob");
    /// match pair.both_mut() {
    ///     PairMut::Distinct(a, b) => { *a -= 5; *b += 5; }
    ///     PairMut::Single(_) => {} // same stripe: the transfer changes no stripe total
    /// }
    /// ```
    #[inline]
    pub fn lock_pair(&self, a: &K, b: &K) -> PairGuard<'_, L, T, Exclusive> {
        self.acquire_pair(self.stripe_of(a), self.stripe_of(b))
    }

    /// Locks every stripe exclusively, from stripe 0 upwards; the guard
    /// releases them from the top down. Allocates one guard per stripe.
    ///
    /// Must not be called while this thread holds any stripe of this array.
    pub fn lock_all(&self) -> AllGuard<'_, L, T, Exclusive> {
        self.acquire_all()
    }

    /// Locks stripe `stripe` exclusively: for walking the stripes one at a
    /// time (e.g. a cleanup scan that should not stop the whole array).
    ///
    /// # Panics
    ///
    /// If `stripe >= self.len()`.
    #[inline]
    pub fn lock_stripe(&self, stripe: usize) -> StripeGuard<'_, L, T, Exclusive> {
        self.check_index(stripe);
        self.acquire(stripe)
    }

    /// Locks stripe `stripe` exclusively if that needs no waiting.
    ///
    /// # Panics
    ///
    /// If `stripe >= self.len()`.
    #[inline]
    pub fn try_lock_stripe(&self, stripe: usize) -> Option<StripeGuard<'_, L, T, Exclusive>> {
        self.check_index(stripe);
        self.try_acquire(stripe)
    }

    /// The address identifying this array in the debug lock-order table.
    #[inline(always)]
    fn id(&self) -> usize {
        self.stripes.as_ptr() as usize
    }

    #[inline(always)]
    fn stripe(&self, index: usize) -> &Stripe<L, T> {
        P::get(&self.stripes[index])
    }

    #[inline]
    fn check_index(&self, stripe: usize) {
        if stripe >= self.len() {
            index_out_of_range(stripe, self.len());
        }
    }

    #[inline]
    fn acquire<M: Access<L>>(&self, index: usize) -> StripeGuard<'_, L, T, M> {
        order::check(self.id(), index);
        let stripe = self.stripe(index);
        let lock = M::acquire(&stripe.lock);
        StripeGuard::new(lock, &stripe.data, index, order::record(self.id(), index))
    }

    #[inline]
    fn try_acquire<M: Access<L>>(&self, index: usize) -> Option<StripeGuard<'_, L, T, M>> {
        let stripe = self.stripe(index);
        let lock = M::try_acquire(&stripe.lock)?;
        Some(StripeGuard::new(
            lock,
            &stripe.data,
            index,
            order::record(self.id(), index),
        ))
    }

    #[inline]
    fn acquire_pair<M: Access<L>>(&self, first: usize, second: usize) -> PairGuard<'_, L, T, M> {
        let (low, high) = (first.min(second), first.max(second));
        order::check(self.id(), low);
        let low_lock = M::acquire(&self.stripe(low).lock);
        let high_lock = (high != low).then(|| M::acquire(&self.stripe(high).lock));
        PairGuard::new(
            low_lock,
            high_lock,
            &self.stripe(first).data,
            &self.stripe(second).data,
            (first, second),
            order::record(self.id(), high),
        )
    }

    fn acquire_all<M: Access<L>>(&self) -> AllGuard<'_, L, T, M> {
        order::check(self.id(), 0);
        let locks = (0..self.len())
            .map(|i| M::acquire(&self.stripe(i).lock))
            .collect();
        let data = (0..self.len()).map(|i| &self.stripe(i).data).collect();
        AllGuard::new(locks, data, order::record(self.id(), self.len() - 1))
    }
}

impl<K: ?Sized + Hash, L: SharedStripeLock, T, P: StripeLayout> HashedLocks<K, L, T, P> {
    /// Locks the stripe of `key` shared. The same order rule as
    /// [`lock`](Self::lock) applies: a waiting writer can block new readers.
    #[inline]
    pub fn read(&self, key: &K) -> StripeReadGuard<'_, L, T> {
        self.acquire(self.stripe_of(key))
    }

    /// Locks the stripe of `key` shared if that needs no waiting.
    #[inline]
    pub fn try_read(&self, key: &K) -> Option<StripeReadGuard<'_, L, T>> {
        self.try_acquire(self.stripe_of(key))
    }

    /// Locks the stripes of `a` and `b` shared, in increasing index order,
    /// once if they coincide.
    #[inline]
    pub fn read_pair(&self, a: &K, b: &K) -> PairReadGuard<'_, L, T> {
        self.acquire_pair(self.stripe_of(a), self.stripe_of(b))
    }

    /// Locks every stripe shared, from stripe 0 upwards.
    pub fn read_all(&self) -> AllReadGuard<'_, L, T> {
        self.acquire_all()
    }

    /// Locks stripe `stripe` shared.
    ///
    /// # Panics
    ///
    /// If `stripe >= self.len()`.
    #[inline]
    pub fn read_stripe(&self, stripe: usize) -> StripeReadGuard<'_, L, T> {
        self.check_index(stripe);
        self.acquire(stripe)
    }

    /// Locks stripe `stripe` shared if that needs no waiting.
    ///
    /// # Panics
    ///
    /// If `stripe >= self.len()`.
    #[inline]
    pub fn try_read_stripe(&self, stripe: usize) -> Option<StripeReadGuard<'_, L, T>> {
        self.check_index(stripe);
        self.try_acquire(stripe)
    }
}

#[cold]
#[inline(never)]
fn index_out_of_range(stripe: usize, len: usize) -> ! {
    panic!("stripe {stripe} out of range for a hashed lock array of {len} stripes");
}

impl<K: ?Sized, L, T, P: StripeLayout> fmt::Debug for HashedLocks<K, L, T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashedLocks")
            .field("stripes", &self.stripes.len())
            .field("layout", &P::NAME)
            .finish_non_exhaustive()
    }
}
