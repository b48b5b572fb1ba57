//! [`Kprobe`]: one probe, its handlers, counters and registration state.
//!
//! # Handles
//!
//! A `Kprobe` is a cheap, clonable handle (an `Arc`) to the probe's state.
//! The caller keeps one to enable, disable, read the counters and unregister;
//! the registry keeps clones in the member lists readers walk. Handlers
//! receive `&Kprobe`, so they can read the probe's own address and counters.
//!
//! # Registration state
//!
//! A probe belongs to at most one registry at a time: `owner` holds that
//! registry's id (0 = none) and is claimed with a compare-and-swap, so two
//! registries racing to register the same probe cannot both win. Between
//! `unregister_nosync` and the `commit` that finishes it the probe is
//! *pending*: no longer registered (unregistering it again is an error) and
//! not yet free (registering it again is an error too), because readers may
//! still run its handlers.

use std::fmt;
// `std`'s Arc even under loom (see `kretprobe.rs`).
use std::sync::Arc;

use super::kretprobe::ReturnProbe;
use crate::probes::arch::Regs;
use crate::probes::percpu::HitCounter;
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub use crate::probes::outcome::Action;

/// Where a probe goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// An absolute code address.
    Address(u64),
    /// `offset` bytes into the function `name`, resolved by the registry's
    /// [`SymbolResolver`](crate::probes::resolve::SymbolResolver).
    Symbol {
        /// The function's name.
        name: String,
        /// Byte offset from the function's first instruction.
        offset: u64,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Address(a) => write!(f, "{a:#x}"),
            Target::Symbol { name, offset } => write!(f, "{name}+{offset:#x}"),
        }
    }
}

/// A pre handler: runs at the breakpoint, before the displaced instruction.
pub type PreHandler = Box<dyn Fn(&Kprobe, &mut Regs) -> Action + Send + Sync>;

/// A post handler: runs after the displaced instruction completed.
pub type PostHandler = Box<dyn Fn(&Kprobe, &mut Regs) + Send + Sync>;

/// What a hit on the probe runs.
pub(crate) enum Handlers {
    /// A plain kprobe.
    Plain {
        pre: Option<PreHandler>,
        post: Option<PostHandler>,
    },
    /// The entry probe of a kretprobe.
    Return(Arc<dyn ReturnProbe>),
}

/// What the registry's one register/unregister family takes: a [`Kprobe`],
/// or a [`Kretprobe`](super::Kretprobe) (through its entry probe), so
/// [`register`](super::KprobeRegistry::register),
/// [`unregister`](super::KprobeRegistry::unregister),
/// [`unregister_many`](super::KprobeRegistry::unregister_many),
/// [`unregister_nosync`](super::KprobeRegistry::unregister_nosync),
/// [`enable`](super::KprobeRegistry::enable) and
/// [`disable`](super::KprobeRegistry::disable) work on both kinds
/// (`unregister_many(&[&a as &dyn AsKprobe, &b])` mixes them).
pub trait AsKprobe {
    /// The probe the registry keys on.
    fn as_kprobe(&self) -> &Kprobe;
}

impl AsKprobe for Kprobe {
    fn as_kprobe(&self) -> &Kprobe {
        self
    }
}

impl<T: AsKprobe + ?Sized> AsKprobe for &T {
    fn as_kprobe(&self) -> &Kprobe {
        (**self).as_kprobe()
    }
}

impl<T: AsKprobe + ?Sized> AsKprobe for Arc<T> {
    fn as_kprobe(&self) -> &Kprobe {
        (**self).as_kprobe()
    }
}

impl<T: AsKprobe + ?Sized> AsKprobe for Box<T> {
    fn as_kprobe(&self) -> &Kprobe {
        (**self).as_kprobe()
    }
}

/// Identity of a probe, for listings and comparisons (stable while any handle
/// to the probe lives).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeId(usize);

pub(crate) struct ProbeInner {
    target: Target,
    pub(crate) handlers: Handlers,
    enabled: AtomicBool,
    /// Per-CPU slots: the hit paths count without a locked instruction
    /// (`probes/percpu.rs`).
    hits: HitCounter,
    nmissed: AtomicU64,
    /// Id of the registry holding the probe; 0 when none.
    owner: AtomicUsize,
    /// Resolved address, valid while `owner != 0`.
    addr: AtomicU64,
    /// Unregistered without sync; waiting for `commit`.
    pending: AtomicBool,
    /// Index of the probe's slot in its site's current member list, valid
    /// while registered (writer-only bookkeeping: removal in O(1)).
    slot: AtomicUsize,
    /// Never jump-optimize this probe's site (the per-probe opt-out).
    no_jump: AtomicBool,
}

/// A probe on one code address: pre and post handlers plus counters.
///
/// Built with [`Kprobe::at`] or [`Kprobe::symbol`], registered with
/// [`KprobeRegistry::register`](super::KprobeRegistry::register). Clones are
/// handles to the same probe.
///
/// # Handler contract
///
/// The pre and post handlers run **inside the SIGTRAP handler** of the live
/// runtime, on the thread that hit the probe, between two of its
/// instructions. In short: only async-signal-safe work (registers, atomics,
/// memory the handler owns; no allocation unless no probe it serves is on
/// the allocator's locked paths), never a lock the probed code may hold (it
/// deadlocks), no `println!` (on a probe under the program's own printing it
/// panics on stdout's re-borrowed `RefCell`), about 4 KiB of the thread's
/// own stack per hit, and **a panic aborts the process** with a message on
/// stderr. In full, with the reasons:
/// [the handler contract](crate::docs::patterns#the-handler-contract).
///
/// # Ownership: the registry keeps what it registered
///
/// As in the kernel, a registered probe belongs to its registry until it
/// is unregistered: the registry holds its own handle, so **dropping every
/// handle of a registered probe does not unregister it**; the breakpoint
/// stays armed and the handlers keep running. Dropping does not unregister
/// because unregistration waits for a grace period (a `Drop` run in a
/// handler or an RCU read section would deadlock) and can fail (text that
/// cannot be written back), which `Drop` could not report. Nothing is lost
/// either: [`KprobeRegistry::probes`](super::KprobeRegistry::probes) and
/// [`KprobeRegistry::probe`](super::KprobeRegistry::probe) (by
/// [`ProbeId`]) hand back a handle to unregister it with, and
/// [`KprobeRegistry::unregister_all`](super::KprobeRegistry::unregister_all)
/// removes everything at shutdown.
///
/// ```
/// use rcu_registry::probes::kprobe::{Action, Kprobe};
///
/// let probe = Kprobe::symbol("parse", 0)
///     .pre(|_probe, regs| {
///         let _ = regs.ip;
///         Action::Continue
///     })
///     .build();
/// assert_eq!(probe.hits(), 0);
/// assert!(probe.is_enabled());
/// ```
#[derive(Clone)]
pub struct Kprobe {
    pub(crate) inner: Arc<ProbeInner>,
}

impl Kprobe {
    /// A builder for a probe at the absolute address `addr`.
    pub fn at(addr: u64) -> KprobeBuilder {
        KprobeBuilder::new(Target::Address(addr))
    }

    /// A builder for a probe at `offset` bytes into the function `name`.
    pub fn symbol(name: impl Into<String>, offset: u64) -> KprobeBuilder {
        KprobeBuilder::new(Target::Symbol {
            name: name.into(),
            offset,
        })
    }

    pub(crate) fn from_parts(target: Target, handlers: Handlers, enabled: bool) -> Kprobe {
        Kprobe {
            inner: Arc::new(ProbeInner {
                target,
                handlers,
                enabled: AtomicBool::new(enabled),
                hits: HitCounter::new(),
                nmissed: AtomicU64::new(0),
                owner: AtomicUsize::new(0),
                addr: AtomicU64::new(0),
                pending: AtomicBool::new(false),
                slot: AtomicUsize::new(0),
                no_jump: AtomicBool::new(false),
            }),
        }
    }

    /// Where the probe was asked to go.
    pub fn target(&self) -> &Target {
        &self.inner.target
    }

    /// The probe's identity.
    pub fn id(&self) -> ProbeId {
        ProbeId(Arc::as_ptr(&self.inner) as usize)
    }

    /// The resolved address while the probe is registered (or pending
    /// commit), `None` otherwise.
    pub fn address(&self) -> Option<u64> {
        // Relaxed: `owner` and `addr` are written by the owning registry's
        // writer before the probe is published to readers (the publication's
        // Release orders them for handlers); other callers get a snapshot.
        (self.inner.owner.load(Ordering::Relaxed) != 0)
            .then(|| self.inner.addr.load(Ordering::Relaxed))
    }

    /// Times the probe's handlers ran (for a kretprobe's entry probe: entries
    /// seen, whether or not an instance was free).
    ///
    /// Exact: every hit whose handlers returned before the call is counted
    /// (the count is a sum of per-CPU slots, `probes/percpu.rs`).
    pub fn hits(&self) -> u64 {
        self.inner.hits.get()
    }

    /// Hits that could not run the handlers: the probe was hit again on a
    /// thread already running a probe handler.
    pub fn nmissed(&self) -> u64 {
        // Relaxed: a statistics counter.
        self.inner.nmissed.load(Ordering::Relaxed)
    }

    /// Whether hits run the handlers.
    pub fn is_enabled(&self) -> bool {
        // Relaxed: a snapshot; the writer's arm/disarm decisions read it under
        // the registry mutex, readers treat it as a hint (see `hit.rs`).
        self.inner.enabled.load(Ordering::Relaxed)
    }

    /// Whether the probe is registered in a registry (and not pending commit).
    pub fn is_registered(&self) -> bool {
        // Relaxed: a snapshot for the caller.
        self.inner.owner.load(Ordering::Relaxed) != 0 && !self.inner.pending.load(Ordering::Relaxed)
    }

    /// The probe's address as a member list stores it (no reference taken).
    pub(crate) fn as_raw(&self) -> *mut ProbeInner {
        Arc::as_ptr(&self.inner).cast_mut()
    }

    /// A handle on the probe at `p` that takes no reference (and must never
    /// drop one: it is `ManuallyDrop`).
    ///
    /// # Safety
    /// `p` came from [`as_raw`](Self::as_raw) and the probe is alive for as
    /// long as the handle is used.
    pub(crate) unsafe fn borrow_raw(p: *mut ProbeInner) -> std::mem::ManuallyDrop<Kprobe> {
        std::mem::ManuallyDrop::new(Kprobe {
            // SAFETY: `p` is `Arc::as_ptr` of a live `Arc<ProbeInner>`
            // (caller's contract); the count is neither taken nor given back
            // (`ManuallyDrop`).
            inner: unsafe { Arc::from_raw(p) },
        })
    }

    /// The probe's slot in its site's current member list (writer only).
    pub(crate) fn slot(&self) -> usize {
        // Relaxed: written and read under the owning registry's mutex.
        self.inner.slot.load(Ordering::Relaxed)
    }

    /// Records the probe's slot (writer only).
    pub(crate) fn set_slot(&self, i: usize) {
        // Relaxed: written and read under the owning registry's mutex.
        self.inner.slot.store(i, Ordering::Relaxed);
    }

    pub(crate) fn ptr_eq(&self, other: &Kprobe) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether this probe opted out of jump optimization.
    pub fn jump_opt_out(&self) -> bool {
        // Relaxed: read by the optimizer under the registry's writer mutex;
        // the opt-out takes effect at its next pass (or at once through the
        // live runtime's `Live::set_jump_opt_out`, which un-optimizes).
        self.inner.no_jump.load(Ordering::Relaxed)
    }

    /// Sets the per-probe opt-out of jump optimization (see
    /// [`jump_opt_out`](Self::jump_opt_out)).
    pub fn set_jump_opt_out(&self, out: bool) {
        // Relaxed: see `jump_opt_out`.
        self.inner.no_jump.store(out, Ordering::Relaxed);
    }

    pub(crate) fn has_post(&self) -> bool {
        matches!(self.inner.handlers, Handlers::Plain { post: Some(_), .. })
    }

    pub(crate) fn return_probe(&self) -> Option<&Arc<dyn ReturnProbe>> {
        match &self.inner.handlers {
            Handlers::Return(r) => Some(r),
            Handlers::Plain { .. } => None,
        }
    }

    pub(crate) fn set_enabled(&self, on: bool) {
        // Relaxed: enabling publishes no data (the handlers were published
        // with the member list); readers may see the change a little late,
        // which is the documented semantics of enable/disable.
        self.inner.enabled.store(on, Ordering::Relaxed);
    }

    /// Gives the probe's counters their per-CPU slots
    /// (`probes/percpu.rs`): called when a jump-optimization pass first
    /// considers its site, where a hit costs nanoseconds and a locked
    /// increment would be a third of it. Allocates; writer mutex held.
    pub(crate) fn count_per_cpu(&self) {
        self.inner.hits.per_cpu();
        if let Handlers::Return(r) = &self.inner.handlers {
            r.count_per_cpu();
        }
    }

    #[inline]
    pub(crate) fn count_hit(&self) {
        self.inner.hits.add_one();
    }

    #[inline]
    pub(crate) fn count_missed(&self) {
        // Relaxed: statistics counter.
        self.inner.nmissed.fetch_add(1, Ordering::Relaxed);
    }

    /// Claims the probe for registry `id`; false if some registry holds it
    /// (registered or pending commit).
    pub(crate) fn claim(&self, id: usize, addr: u64) -> bool {
        // Acquire on success pairs with the Release in `release`: the
        // previous owner's last writes to the probe (pending flag) are seen.
        let won = self
            .inner
            .owner
            .compare_exchange(0, id, Ordering::Acquire, Ordering::Relaxed)
            .is_ok();
        if won {
            // Relaxed: ordered before publication by the registry's Release
            // store of the member list.
            self.inner.addr.store(addr, Ordering::Relaxed);
            self.inner.pending.store(false, Ordering::Relaxed);
        }
        won
    }

    /// Gives the probe up (failed registration, or unregistration finished).
    pub(crate) fn release(&self) {
        // Relaxed: only meaningful together with `owner`, released below.
        self.inner.pending.store(false, Ordering::Relaxed);
        // Release pairs with the Acquire CAS in `claim`.
        self.inner.owner.store(0, Ordering::Release);
    }

    /// Whether registry `id` holds the probe and it is not pending commit.
    pub(crate) fn registered_in(&self, id: usize) -> bool {
        // Relaxed: `owner == id` and `pending` are only changed by registry
        // `id` under its writer mutex, which the caller holds.
        self.inner.owner.load(Ordering::Relaxed) == id
            && !self.inner.pending.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_pending(&self) {
        // Relaxed: written and read under the owning registry's mutex.
        self.inner.pending.store(true, Ordering::Relaxed);
    }

    pub(crate) fn registered_addr(&self) -> u64 {
        // Relaxed: set by `claim` under the same registry mutex the caller
        // holds, or before the publication the caller synchronized with.
        self.inner.addr.load(Ordering::Relaxed)
    }

    /// Runs the pre handler, if any.
    #[inline]
    pub(crate) fn run_pre(&self, regs: &mut Regs) -> Action {
        match &self.inner.handlers {
            Handlers::Plain { pre: Some(pre), .. } => pre(self, regs),
            _ => Action::Continue,
        }
    }

    /// Runs the post handler, if any.
    #[inline]
    pub(crate) fn run_post(&self, regs: &mut Regs) {
        if let Handlers::Plain {
            post: Some(post), ..
        } = &self.inner.handlers
        {
            post(self, regs)
        }
    }
}

impl PartialEq for Kprobe {
    fn eq(&self, other: &Self) -> bool {
        self.ptr_eq(other)
    }
}

impl Eq for Kprobe {}

impl fmt::Debug for Kprobe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kprobe")
            .field("target", &self.inner.target)
            .field("enabled", &self.is_enabled())
            .field("hits", &self.hits())
            .field("nmissed", &self.nmissed())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Kprobe`].
#[must_use = "a builder does nothing until built"]
pub struct KprobeBuilder {
    target: Target,
    pre: Option<PreHandler>,
    post: Option<PostHandler>,
    enabled: bool,
}

impl KprobeBuilder {
    fn new(target: Target) -> Self {
        KprobeBuilder {
            target,
            pre: None,
            post: None,
            enabled: true,
        }
    }

    /// Sets the pre handler.
    pub fn pre(mut self, f: impl Fn(&Kprobe, &mut Regs) -> Action + Send + Sync + 'static) -> Self {
        self.pre = Some(Box::new(f));
        self
    }

    /// Sets the post handler. A probe with a post handler is single-stepped
    /// (two traps per hit); without one the runtime may boost it (one trap).
    pub fn post(mut self, f: impl Fn(&Kprobe, &mut Regs) + Send + Sync + 'static) -> Self {
        self.post = Some(Box::new(f));
        self
    }

    /// Registers the probe disabled: its site is validated and reserved, but
    /// no breakpoint is written until [`enable`](super::KprobeRegistry::enable).
    pub fn disabled(mut self) -> Self {
        self.enabled = false;
        self
    }

    /// The probe. A probe without handlers is allowed: it counts hits.
    pub fn build(self) -> Kprobe {
        Kprobe::from_parts(
            self.target,
            Handlers::Plain {
                pre: self.pre,
                post: self.post,
            },
            self.enabled,
        )
    }
}
