//! Uprobe consumers: the handlers one user attaches to a uprobe.
//!
//! A [`Consumer`] is a cheap, clonable handle (clones are the same consumer,
//! compared by pointer) with a handler, a return handler, or both (neither is
//! [`ProbeError::NoHandler`]). Handlers run inside a read section of the
//! registry's domain ([`Srcu`](crate::rcu::Srcu) by default), so they may
//! sleep; one returning [`ConsumerAction::Remove`] is reaped by
//! [`UprobeRegistry::reap_removed`](super::UprobeRegistry::reap_removed).
//!
//! Identity, filters and removal, in full: [`crate::docs::algorithms::uprobes`].

use super::space::{SpaceId, UprobeKey};
use crate::probes::arch::Regs;
use crate::probes::outcome::Action;
use crate::probes::ProbeError;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::Arc;

/// What a consumer's handler asks for after a hit: the shared
/// [`Action`]'s two answers, with the same meaning, plus `Remove`, which
/// only uprobe consumers have (see [`Action`] for why the answers are not
/// one enum). A handler body written for kprobes returns `Action::...
/// .into()`.
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

impl From<Action> for ConsumerAction {
    fn from(a: Action) -> Self {
        match a {
            Action::Continue => ConsumerAction::Continue,
            Action::SkipInstruction => ConsumerAction::SkipInstruction,
        }
    }
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

/// A return seen by a return handler: the call of the probed function that
/// now returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UprobeReturn {
    /// The space the call was made in.
    pub space: SpaceId,
    /// The function's entry address in that space (the uprobe's address).
    pub func: u64,
    /// The uprobe's file and offset.
    pub key: UprobeKey,
    /// Where the function returns to (the caller's real return address);
    /// 0 when another registry sharing the return trampoline hijacked the
    /// return first and holds it (a tail call from a kretprobed function
    /// into this one, live uprobes on x86_64).
    pub ret_addr: u64,
    /// The integer return value ([`Arch::return_value`](crate::probes::arch::Arch::return_value)
    /// of the registers at the return, before any return handler ran).
    pub retval: u64,
}

/// A handler run at each hit.
pub type Handler = dyn Fn(&UprobeHit, &mut Regs) -> ConsumerAction + Send + Sync;
/// A handler run when a probed call returns; `regs` are the registers at
/// the return (its changes to them are kept, except the IP, which the
/// registry sets to the real return address).
pub type RetHandler = dyn Fn(&UprobeReturn, &mut Regs) + Send + Sync;
/// Decides per address space whether the consumer wants hits there.
pub type Filter = dyn Fn(SpaceId) -> bool + Send + Sync;

pub(crate) struct ConsumerInner {
    handler: Option<Box<Handler>>,
    ret_handler: Option<Box<RetHandler>>,
    filter: Option<Box<Filter>>,
    removed: AtomicBool,
    /// Keeps its uprobes on the trap path (`ConsumerBuilder::jump_opt_out`).
    jump_opt_out: bool,
    hits: AtomicU64,
    ret_hits: AtomicU64,
}

/// What running a consumer at a hit decided.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ran {
    /// The handler's answer (`Continue` when it did not run).
    pub(crate) action: ConsumerAction,
    /// The consumer wants this call's return: it has a return handler,
    /// its filter wants the space, and it is not asking to be removed.
    pub(crate) wants_return: bool,
}

/// A consumer as a uprobe lists it: the consumer and the sequence number
/// of its registration on that uprobe.
///
/// Sequence numbers come from one registry-wide counter, taken under the
/// file's lock when the consumer joins the list, so along one key they
/// only grow: a consumer that joined after a call's entry has a larger
/// number than every consumer the entry saw, and the return runs only
/// consumers up to the largest number the entry saw (`returns.rs`).
#[derive(Clone)]
pub(crate) struct Member {
    pub(crate) consumer: Consumer,
    pub(crate) seq: u64,
}

impl core::ops::Deref for Member {
    type Target = Consumer;
    fn deref(&self) -> &Consumer {
        &self.consumer
    }
}

/// A uprobe consumer: a handler, a return handler, or both, and an
/// optional per-space filter (see [`Consumer::builder`]).
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
/// - **Handler contract.** Handlers may block and take locks, but never one
///   the probed code may hold (the interrupted thread cannot release it: a
///   deadlock); when called from a trap they are held to the kprobe
///   handlers' async-signal-safety rules. A thread that exits inside a
///   handler (or leaks any `Srcu` guard and exits) never ends its read
///   section: every later `synchronize` of the domain, unregistration
///   included, hangs forever. In full:
///   [the handler contract](crate::docs::patterns#the-handler-contract).
#[derive(Clone)]
pub struct Consumer(pub(crate) Arc<ConsumerInner>);

impl Consumer {
    /// A consumer with `handler`.
    pub fn new(
        handler: impl Fn(&UprobeHit, &mut Regs) -> ConsumerAction + Send + Sync + 'static,
    ) -> Self {
        Self::build(Some(Box::new(handler)), None, None, false)
    }

    /// A builder for a consumer with any of a handler, a return handler and
    /// a filter.
    ///
    /// ```
    /// use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, SpaceId};
    ///
    /// // Count calls in space 7 and print what they return.
    /// let c = Consumer::builder()
    ///     .handler(|_hit, _regs| ConsumerAction::Continue)
    ///     .ret_handler(|ret, _regs| println!("{:#x} returned {}", ret.func, ret.retval))
    ///     .filter(|space| space == SpaceId(7))
    ///     .build();
    /// assert!(c.has_ret_handler());
    /// ```
    pub fn builder() -> ConsumerBuilder {
        ConsumerBuilder {
            handler: None,
            ret_handler: None,
            filter: None,
            jump_opt_out: false,
        }
    }

    /// A consumer without a handler: registering it fails with
    /// [`ProbeError::NoHandler`]. Exists so callers assembling consumers
    /// from optional parts get a typed error rather than a panic.
    pub fn without_handler() -> Self {
        Self::build(None, None, None, false)
    }

    fn build(
        handler: Option<Box<Handler>>,
        ret_handler: Option<Box<RetHandler>>,
        filter: Option<Box<Filter>>,
        jump_opt_out: bool,
    ) -> Self {
        Consumer(Arc::new(ConsumerInner {
            handler,
            ret_handler,
            filter,
            removed: AtomicBool::new(false),
            jump_opt_out,
            hits: AtomicU64::new(0),
            ret_hits: AtomicU64::new(0),
        }))
    }

    /// A consumer with `handler` that wants hits (and breakpoints) only in
    /// the address spaces where `filter` is true.
    pub fn filtered(
        handler: impl Fn(&UprobeHit, &mut Regs) -> ConsumerAction + Send + Sync + 'static,
        filter: impl Fn(SpaceId) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self::build(Some(Box::new(handler)), None, Some(Box::new(filter)), false)
    }

    /// Hits whose handler ran.
    pub fn hits(&self) -> u64 {
        // Relaxed: a statistic; no memory is published through it.
        self.0.hits.load(Ordering::Relaxed)
    }

    /// Returns whose return handler ran.
    pub fn ret_hits(&self) -> u64 {
        // Relaxed: a statistic; no memory is published through it.
        self.0.ret_hits.load(Ordering::Relaxed)
    }

    /// Whether the consumer has a return handler (its uprobe must then be
    /// at a function entry).
    pub fn has_ret_handler(&self) -> bool {
        self.0.ret_handler.is_some()
    }

    /// Whether the consumer opted out of jump optimization
    /// ([`ConsumerBuilder::jump_opt_out`]).
    pub fn jump_opt_out(&self) -> bool {
        self.0.jump_opt_out
    }

    /// Whether a handler asked for removal.
    pub fn is_removed(&self) -> bool {
        // Relaxed: a hint; `reap_removed` re-checks under the file lock.
        self.0.removed.load(Ordering::Relaxed)
    }

    pub(crate) fn check(&self) -> Result<(), ProbeError> {
        match (&self.0.handler, &self.0.ret_handler) {
            (None, None) => Err(ProbeError::NoHandler),
            _ => Ok(()),
        }
    }

    pub(crate) fn same(&self, other: &Consumer) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// What `same` compares, as a number (for sets of consumers).
    pub(crate) fn identity(&self) -> usize {
        &*self.0 as *const ConsumerInner as usize
    }

    /// Whether this consumer wants breakpoints and hits in `space`.
    pub(crate) fn wants(&self, space: SpaceId) -> bool {
        match &self.0.filter {
            Some(f) => f(space),
            None => true,
        }
    }

    /// Runs the handler for a hit (filter, removal flag checked here) and
    /// says whether the consumer wants the call's return.
    #[inline]
    pub(crate) fn run(&self, hit: &UprobeHit, regs: &mut Regs) -> Ran {
        let c = &self.0;
        let skip = Ran {
            action: ConsumerAction::Continue,
            wants_return: false,
        };
        // Relaxed: the flag only stops future calls; a hit racing the
        // store may still run the handler once, as the docs allow.
        if c.removed.load(Ordering::Relaxed) || !self.wants(hit.space) {
            return skip;
        }
        let wants_return = c.ret_handler.is_some();
        let Some(h) = c.handler.as_ref() else {
            return Ran {
                wants_return,
                ..skip
            };
        };
        // Relaxed: statistic.
        c.hits.fetch_add(1, Ordering::Relaxed);
        let action = h(hit, regs);
        if action == ConsumerAction::Remove {
            // Relaxed: see the load above.
            c.removed.store(true, Ordering::Relaxed);
        }
        Ran {
            action,
            wants_return: wants_return && action != ConsumerAction::Remove,
        }
    }

    /// Runs the return handler for a return (filter, removal flag checked
    /// here, as at the hit).
    #[inline]
    pub(crate) fn run_ret(&self, ret: &UprobeReturn, regs: &mut Regs) {
        let c = &self.0;
        // Relaxed: as in `run`.
        if c.removed.load(Ordering::Relaxed) || !self.wants(ret.space) {
            return;
        }
        if let Some(h) = c.ret_handler.as_ref() {
            // Relaxed: statistic.
            c.ret_hits.fetch_add(1, Ordering::Relaxed);
            h(ret, regs);
        }
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("hits", &self.hits())
            .field("ret_hits", &self.ret_hits())
            .field("removed", &self.is_removed())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Consumer`]; see [`Consumer::builder`].
#[must_use = "a builder does nothing until built"]
pub struct ConsumerBuilder {
    handler: Option<Box<Handler>>,
    ret_handler: Option<Box<RetHandler>>,
    filter: Option<Box<Filter>>,
    jump_opt_out: bool,
}

impl ConsumerBuilder {
    /// Sets the handler run at each hit.
    pub fn handler(
        mut self,
        f: impl Fn(&UprobeHit, &mut Regs) -> ConsumerAction + Send + Sync + 'static,
    ) -> Self {
        self.handler = Some(Box::new(f));
        self
    }

    /// Sets the return handler, run when a probed call returns. The uprobe
    /// must then be registered at a function entry
    /// ([`register_in_function`](super::UprobeRegistry::register_in_function)
    /// with the function's own offset).
    pub fn ret_handler(
        mut self,
        f: impl Fn(&UprobeReturn, &mut Regs) + Send + Sync + 'static,
    ) -> Self {
        self.ret_handler = Some(Box::new(f));
        self
    }

    /// Sets the filter: the consumer wants hits, returns and breakpoints
    /// only in the spaces where it is true.
    pub fn filter(mut self, f: impl Fn(SpaceId) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(Box::new(f));
        self
    }

    /// Opts the consumer out of jump optimization: while it is on a
    /// uprobe, the uprobe's hits take the trap path (a live runtime that
    /// jump-optimizes uprobes puts an optimized one back on it before the
    /// consumer joins, and its handler never runs from a jump detour).
    pub fn jump_opt_out(mut self, out: bool) -> Self {
        self.jump_opt_out = out;
        self
    }

    /// The consumer. One with neither handler is refused at registration
    /// ([`ProbeError::NoHandler`]).
    pub fn build(self) -> Consumer {
        Consumer::build(
            self.handler,
            self.ret_handler,
            self.filter,
            self.jump_opt_out,
        )
    }
}

impl std::fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("handler", &self.handler.is_some())
            .field("ret_handler", &self.ret_handler.is_some())
            .field("filter", &self.filter.is_some())
            .field("jump_opt_out", &self.jump_opt_out)
            .finish()
    }
}
