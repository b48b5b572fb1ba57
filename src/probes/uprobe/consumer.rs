//! Uprobe consumers: the handlers one user attaches to a uprobe.
//!
//! # Identity
//!
//! A [`Consumer`] is a cheap, clonable handle; clones are the same consumer
//! (compared by pointer), so registering a clone twice on one uprobe is
//! refused and unregistering needs the handle that was registered.
//!
//! # Handlers may sleep
//!
//! Handlers run inside a read section of the registry's domain (by default
//! an [`Srcu`](crate::rcu::Srcu) domain, whose readers may block), so a
//! handler may take locks or sleep; unregistration waits for them.
//!
//! # Asking to be removed
//!
//! A handler returning [`ConsumerAction::Remove`] is not called again (the
//! flag is checked on every hit) and is unregistered by the next
//! [`UprobeRegistry::reap_removed`](super::UprobeRegistry::reap_removed):
//! unregistering waits for a grace period, which a handler inside its read
//! section cannot do.

use super::space::{SpaceId, UprobeKey};
use crate::probes::arch::Regs;
use crate::probes::ProbeError;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::Arc;

/// What a consumer's handler asks for after a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumerAction {
    /// Run the displaced instruction and resume.
    Continue,
    /// The handler changed `regs.ip`: skip the displaced instruction and
    /// resume there (later consumers do not run).
    SkipInstruction,
    /// Do not call this consumer again; remove it at the next
    /// [`reap_removed`](super::UprobeRegistry::reap_removed).
    Remove,
}

/// Where a hit happened, as seen by a handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UprobeHit {
    /// The space that hit the breakpoint.
    pub space: SpaceId,
    /// The virtual address of the breakpoint in that space.
    pub vaddr: u64,
    /// The uprobe's file and offset.
    pub key: UprobeKey,
}

/// A handler run at each hit.
pub type Handler = dyn Fn(&UprobeHit, &mut Regs) -> ConsumerAction + Send + Sync;
/// Decides per address space whether the consumer wants hits there.
pub type Filter = dyn Fn(SpaceId) -> bool + Send + Sync;

pub(crate) struct ConsumerInner {
    handler: Option<Box<Handler>>,
    filter: Option<Box<Filter>>,
    removed: AtomicBool,
    hits: AtomicU64,
}

/// A uprobe consumer: a handler and an optional per-space filter.
///
/// - **Identity.** A cheap, clonable handle; clones are the same consumer
///   (compared by pointer): registering a clone on a uprobe it is already
///   on is refused, and unregistering needs the handle that was registered.
/// - **Handlers may sleep.** They run inside a read section of the
///   registry's domain (by default an [`Srcu`](crate::rcu::Srcu) domain,
///   whose readers may block); unregistration waits for them.
/// - **Asking to be removed.** A handler returning
///   [`ConsumerAction::Remove`] is not called again and is unregistered by
///   the next [`reap_removed`](super::UprobeRegistry::reap_removed) (a
///   handler cannot unregister itself: that waits for a grace period its
///   own read section holds up).
#[derive(Clone)]
pub struct Consumer(pub(crate) Arc<ConsumerInner>);

impl Consumer {
    /// A consumer with `handler`.
    pub fn new(
        handler: impl Fn(&UprobeHit, &mut Regs) -> ConsumerAction + Send + Sync + 'static,
    ) -> Self {
        Self::build(Some(Box::new(handler)), None)
    }

    /// A consumer without a handler: registering it fails with
    /// [`ProbeError::NoHandler`]. Exists so callers assembling consumers
    /// from optional parts get a typed error rather than a panic.
    pub fn without_handler() -> Self {
        Self::build(None, None)
    }

    fn build(handler: Option<Box<Handler>>, filter: Option<Box<Filter>>) -> Self {
        Consumer(Arc::new(ConsumerInner {
            handler,
            filter,
            removed: AtomicBool::new(false),
            hits: AtomicU64::new(0),
        }))
    }

    /// A consumer with `handler` that wants hits (and breakpoints) only in
    /// the address spaces where `filter` is true.
    pub fn filtered(
        handler: impl Fn(&UprobeHit, &mut Regs) -> ConsumerAction + Send + Sync + 'static,
        filter: impl Fn(SpaceId) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self::build(Some(Box::new(handler)), Some(Box::new(filter)))
    }

    /// Hits whose handler ran.
    pub fn hits(&self) -> u64 {
        // Relaxed: a statistic; no memory is published through it.
        self.0.hits.load(Ordering::Relaxed)
    }

    /// Whether a handler asked for removal.
    pub fn is_removed(&self) -> bool {
        // Relaxed: a hint; `reap_removed` re-checks under the file lock.
        self.0.removed.load(Ordering::Relaxed)
    }

    pub(crate) fn check(&self) -> Result<(), ProbeError> {
        match self.0.handler {
            Some(_) => Ok(()),
            None => Err(ProbeError::NoHandler),
        }
    }

    pub(crate) fn same(&self, other: &Consumer) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether this consumer wants breakpoints and hits in `space`.
    pub(crate) fn wants(&self, space: SpaceId) -> bool {
        match &self.0.filter {
            Some(f) => f(space),
            None => true,
        }
    }

    /// Runs the handler for a hit (filter, removal flag checked here).
    #[inline]
    pub(crate) fn run(&self, hit: &UprobeHit, regs: &mut Regs) -> ConsumerAction {
        let c = &self.0;
        // Relaxed: the flag only stops future calls; a hit racing the
        // store may still run the handler once, as the docs allow.
        if c.removed.load(Ordering::Relaxed) || !self.wants(hit.space) {
            return ConsumerAction::Continue;
        }
        let Some(h) = c.handler.as_ref() else {
            return ConsumerAction::Continue;
        };
        // Relaxed: statistic.
        c.hits.fetch_add(1, Ordering::Relaxed);
        let action = h(hit, regs);
        if action == ConsumerAction::Remove {
            // Relaxed: see the load above.
            c.removed.store(true, Ordering::Relaxed);
        }
        action
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("hits", &self.hits())
            .field("removed", &self.is_removed())
            .finish_non_exhaustive()
    }
}
