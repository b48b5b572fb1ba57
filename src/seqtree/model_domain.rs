//! A deliberately simple RCU domain for loom models and unit tests.
//!
//! # How it works
//!
//! Readers increment a shared counter on entry and decrement it on exit. A
//! grace period is "wait until the counter is zero". Callbacks queued with
//! [`call`](Flavor::call) from outside a read section run inline after such a
//! wait; from inside a read section they are parked and run by the next
//! `call`/`synchronize`/`barrier` made outside one.
//!
//! # Why not the real domains
//!
//! The real [`Rcu`](crate::rcu::Rcu) and [`Srcu`](crate::rcu::Srcu) have
//! callback workers and sleeping waits whose state spaces would swamp a loom
//! model of the *tree*. This domain has the same contract (a grace period
//! outlasts every read section that overlaps its start) with a handful of
//! atomics, which is all the tree models need.
//!
//! # Costs (why it is test-only)
//!
//! Every reader touches one shared counter, and `synchronize` can starve
//! while overlapping readers keep the counter above zero. `call` waits for a
//! grace period instead of deferring to a worker.

use std::cell::Cell;

use crate::rcu::{Flavor, GpCookie, ReadSection};
use crate::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use crate::sync::{Arc, Mutex};

type Callback = Box<dyn FnOnce() + Send>;

struct Inner {
    readers: AtomicUsize,
    /// Grace periods completed (for the polling API).
    completed: AtomicU64,
    /// Callbacks queued from inside a read section.
    parked: Mutex<Vec<Callback>>,
}

/// A reader-counting RCU domain for models and tests (see the
/// [module docs](self)). Clones share one domain.
#[derive(Clone)]
pub struct ModelDomain {
    inner: Arc<Inner>,
}

/// A read section of a [`ModelDomain`].
pub struct ModelGuard<'a> {
    domain: &'a ModelDomain,
    /// Guards are tied to their thread, as real read sections are.
    _not_send: core::marker::PhantomData<*const ()>,
}

impl ReadSection for ModelGuard<'_> {}

crate::sync::const_thread_local! {
    /// Read sections of any `ModelDomain` open on this thread.
    static NESTING: Cell<usize> = Cell::new(0);
}

impl Default for ModelDomain {
    fn default() -> Self {
        ModelDomain {
            inner: Arc::new(Inner {
                readers: AtomicUsize::new(0),
                completed: AtomicU64::new(0),
                parked: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl ModelDomain {
    /// A new, independent domain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until no reader is inside a read section.
    fn wait_for_readers(&self) {
        // SeqCst fence: pairs with the fence in `read`. Either this fence
        // comes first, and the reader's loads after its fence see everything
        // the updater unlinked before this one, or the reader's fence comes
        // first, and the load below sees its increment. Weaker orderings allow
        // both to miss each other (store buffering).
        fence(Ordering::SeqCst);
        // Acquire pairs with the release decrement in `ModelGuard::drop`:
        // the reader's accesses happen before whatever the updater does next.
        while self.inner.readers.load(Ordering::Acquire) != 0 {
            crate::sync::spin_loop();
        }
        // Relaxed: a statistic for `poll`, ordered by the fence above.
        self.inner.completed.fetch_add(1, Ordering::Relaxed);
    }

    fn in_read_section() -> bool {
        NESTING.with(|n| n.get() > 0)
    }

    fn take_parked(&self) -> Vec<Callback> {
        let mut parked = self
            .inner
            .parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        core::mem::take(&mut *parked)
    }
}

impl Drop for ModelGuard<'_> {
    fn drop(&mut self) {
        NESTING.with(|n| n.set(n.get() - 1));
        // Release: the read section's accesses happen before an updater's
        // acquire load that sees the counter drop.
        self.domain.inner.readers.fetch_sub(1, Ordering::Release);
    }
}

impl Flavor for ModelDomain {
    type Guard<'a> = ModelGuard<'a>;

    fn read(&self) -> ModelGuard<'_> {
        // Relaxed increment, then the SeqCst fence that pairs with the one
        // in `wait_for_readers` (see there).
        self.inner.readers.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        NESTING.with(|n| n.set(n.get() + 1));
        ModelGuard {
            domain: self,
            _not_send: core::marker::PhantomData,
        }
    }

    fn protects(&self, guard: &ModelGuard<'_>) -> bool {
        Arc::ptr_eq(&self.inner, &guard.domain.inner)
    }

    fn synchronize(&self) {
        assert!(
            !Self::in_read_section(),
            "synchronize inside a read section would deadlock"
        );
        let parked = self.take_parked();
        self.wait_for_readers();
        parked.into_iter().for_each(|f| f());
    }

    fn call<C: FnOnce() + Send + 'static>(&self, f: C) {
        if Self::in_read_section() {
            self.inner
                .parked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(Box::new(f));
            return;
        }
        let parked = self.take_parked();
        self.wait_for_readers();
        parked.into_iter().for_each(|g| g());
        f();
    }

    fn barrier(&self) {
        self.synchronize();
    }

    fn start_poll(&self) -> GpCookie {
        // Relaxed: a counter compared by `poll` on this domain only.
        GpCookie {
            seq: self.inner.completed.load(Ordering::Relaxed) + 1,
        }
    }

    fn poll(&self, cookie: &GpCookie) -> bool {
        // Relaxed: see `start_poll`.
        if self.inner.completed.load(Ordering::Relaxed) >= cookie.seq {
            return true;
        }
        // SeqCst fence and acquire load: as in `wait_for_readers`, but
        // without waiting.
        fence(Ordering::SeqCst);
        if self.inner.readers.load(Ordering::Acquire) == 0 {
            self.inner.completed.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }
}
