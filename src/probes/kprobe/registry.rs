//! [`KprobeRegistry`]: registration, validation, aggregation, enable/disable.
//!
//! The hit path is in `hit.rs`, unregistration and commit in
//! `unregister.rs`; this file holds the registry's state and the writer
//! paths that add probes or change whether they are armed.

use std::collections::BTreeMap;
use std::fmt;
// `std`'s Arc even under loom (see `kretprobe.rs`).
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use super::deferred::{DeferredFree, RetiredLists};
use super::instances::InstanceTable;
pub use super::instances::DEFAULT_OWN_STRIPES;
use super::jump::JumpHook;
use super::kretprobe::{Kretprobe, ReturnProbe};
use super::probe::{AsKprobe, Kprobe, ProbeId, Target};
use super::site::SiteState;
use super::table::{Members, Site, SiteExec, Table, MIN_MEMBER_SLOTS};
use super::unregister::Retired;
use crate::probes::arch::{Arch, InsnClass};
use crate::probes::error::{CodeBytes, ProbeError, ProbeSite, TextFailure};
use crate::probes::resolve::SymbolResolver;
use crate::probes::text::{TextIdentity, TextMemory};
use crate::probes::xol::XolAllocator;
use crate::rcu::Rcu;
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{Mutex, MutexGuard};

/// Default number of hash buckets: chains stay short up to thousands of
/// probed addresses, for 32 KiB of bucket heads.
pub const DEFAULT_BUCKETS: usize = 4096;

/// Default number of stripes of the kretprobe instance table: enough that
/// threads on a few dozen cores rarely share one.
pub const DEFAULT_INSTANCE_STRIPES: usize = 64;

/// Source of registry ids (0 means "no registry" in a probe's owner field).
/// `std`'s atomic on purpose, not the shim's: a process-wide id counter that
/// is part of no algorithm a model checks (loom atomics cannot be statics).
static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// Everything writers share, behind the registry mutex.
pub(crate) struct Writer {
    pub(crate) sites: BTreeMap<u64, SiteState>,
    /// Sites whose text went away (see "Text that goes away" in the module
    /// docs), unlinked from the hash table and kept, by address and node,
    /// until their last probe is unregistered.
    pub(crate) detached: BTreeMap<(u64, usize), SiteState>,
    /// Unregistered without sync: finished by the next `commit`.
    pub(crate) pending: Vec<Retired>,
    /// The boosted XOL slots of the sites `pending` retires: the commit has
    /// the allocator wait out threads still running them (`quiesce`).
    pub(crate) pending_slots: Vec<u64>,
    /// Unregistered kretprobes with calls still in flight.
    pub(crate) orphans: Vec<Arc<dyn ReturnProbe>>,
    /// Sites that lost members since the last commit (each once): the
    /// commit compacts those that need it (`SiteState::wants_compaction`).
    pub(crate) dirty: Vec<u64>,
}

// SAFETY: the raw site pointers are owned by the writer state (readers only
// borrow them under RCU); everything else is `Send`.
unsafe impl Send for Writer {}

/// Where the site of a registered probe is kept.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SiteKey {
    /// In `Writer::sites` (and the hash table), by address.
    Live(u64),
    /// In `Writer::detached`.
    Detached((u64, usize)),
}

impl Writer {
    /// Every site, live ones first.
    pub(crate) fn all_sites(&self) -> impl Iterator<Item = &SiteState> {
        self.sites.values().chain(self.detached.values())
    }

    /// The site `probe` (registered here) is a member of.
    pub(crate) fn find(&self, probe: &Kprobe) -> Option<SiteKey> {
        let addr = probe.registered_addr();
        if self.sites.get(&addr).is_some_and(|s| s.holds(probe)) {
            return Some(SiteKey::Live(addr));
        }
        self.detached
            .range((addr, 0)..=(addr, usize::MAX))
            .find(|(_, s)| s.holds(probe))
            .map(|(&k, _)| SiteKey::Detached(k))
    }

    /// The site under `key` (from [`find`](Self::find), or a detach).
    pub(crate) fn site_mut(&mut self, key: SiteKey) -> &mut SiteState {
        match key {
            SiteKey::Live(a) => self.sites.get_mut(&a),
            SiteKey::Detached(k) => self.detached.get_mut(&k),
        }
        .expect("a site key names a kept site")
    }

    /// Takes the site under `key` out of the writer's maps.
    pub(crate) fn take(&mut self, key: SiteKey) -> SiteState {
        match key {
            SiteKey::Live(a) => self.sites.remove(&a),
            SiteKey::Detached(k) => self.detached.remove(&k),
        }
        .expect("a site key names a kept site")
    }
}

/// Whether `e`, from writing a site's text, means that text went away (see
/// "Text that goes away" in the module docs): another mapping or nothing
/// is at the address ([`ProbeError::TextGone`]), or, when disarming, the
/// original bytes are back where our breakpoint was (the same file mapped
/// again at the same address: there is nothing to restore).
pub(crate) fn text_gone(e: &ProbeError, orig: &CodeBytes, disarming: bool) -> bool {
    match e {
        ProbeError::TextGone { .. } => true,
        ProbeError::AlreadyPatched { found, .. } => disarming && found == orig,
        _ => false,
    }
}

/// A registry of address-keyed probes (kprobes and kretprobes) over the arch
/// backend `A` and the text memory `T`.
///
/// See the [module docs](super) for the algorithm and the hit-path protocol.
pub struct KprobeRegistry<A: Arch, T: TextMemory> {
    pub(crate) id: usize,
    pub(crate) arch: A,
    pub(crate) text: T,
    pub(crate) xol: Arc<dyn XolAllocator>,
    pub(crate) resolver: Box<dyn SymbolResolver>,
    pub(crate) rcu: Rcu,
    pub(crate) table: Table,
    /// Boxed: the thread-exit flush finds it by address (`thread_exit.rs`).
    pub(crate) instances: Box<InstanceTable>,
    pub(crate) trampoline: Option<u64>,
    pub(crate) writer: Mutex<Writer>,
    /// Member lists and sites retired by registrations, freed through
    /// `rcu.call` (see `deferred.rs`).
    pub(crate) deferred: Arc<DeferredFree>,
    /// Serializes the bottom halves of unregistration (see `unregister.rs`):
    /// a commit returns only after every retirement made before it started
    /// is finished, even one another commit took.
    pub(crate) reclaim_lock: Mutex<()>,
    /// Probes registered (for cheap `len`). On its own cache line: every
    /// registration and unregistration writes it, and sharing a line with
    /// the fields every hit reads (the bucket array, say) made each of those
    /// writes pull the line from the hitting cores (measured: the top halves
    /// of 10,000 `unregister_nosync` under one hitter took 4.5-4.6 ms,
    /// 2.45-3.1 ms padded, 2.0 ms with no hitter).
    pub(crate) count: CachePadded<AtomicUsize>,
    /// The jump optimizer's hook, called before the registry touches text
    /// it may have rewritten (`jump.rs`).
    pub(crate) jump_hook: Option<Arc<dyn JumpHook>>,
}

/// Builds a [`KprobeRegistry`].
#[must_use = "a builder does nothing until built"]
pub struct RegistryBuilder<A: Arch, T: TextMemory> {
    arch: A,
    text: T,
    resolver: Box<dyn SymbolResolver>,
    xol: Arc<dyn XolAllocator>,
    rcu: Option<Rcu>,
    buckets: usize,
    instance_stripes: usize,
    own_stripes: usize,
    trampoline: Option<u64>,
    jump_hook: Option<Arc<dyn JumpHook>>,
}

impl<A: Arch, T: TextMemory> RegistryBuilder<A, T> {
    /// A jump optimizer's hook (see `kprobe/jump.rs`): called with the
    /// writer mutex held before the registry writes or decodes text an
    /// optimized site may have rewritten.
    pub fn jump_hook(mut self, hook: Arc<dyn JumpHook>) -> Self {
        self.jump_hook = Some(hook);
        self
    }

    /// The RCU domain handle (default: [`Rcu::global`]). Readers are
    /// process-wide whichever handle is used; the handle picks the callback
    /// queue that frees the member lists registrations replace.
    pub fn rcu(mut self, rcu: Rcu) -> Self {
        self.rcu = Some(rcu);
        self
    }

    /// Hash buckets, rounded up to a power of two (default
    /// [`DEFAULT_BUCKETS`]).
    pub fn buckets(mut self, n: usize) -> Self {
        self.buckets = n;
        self
    }

    /// Stripes of the kretprobe instance table (default
    /// [`DEFAULT_INSTANCE_STRIPES`]; 1 makes it one global lock).
    pub fn instance_stripes(mut self, n: usize) -> Self {
        self.instance_stripes = n;
        self
    }

    /// Own stripes of the kretprobe instance table (default
    /// [`DEFAULT_OWN_STRIPES`]): a thread's first tracked call claims one,
    /// and its instances are then filed and taken there without a locked
    /// instruction; threads beyond this many use the shared stripes. 0
    /// sends every thread to the shared stripes (the benchmark's peer).
    pub fn own_instance_stripes(mut self, n: usize) -> Self {
        self.own_stripes = n;
        self
    }

    /// The address of the return trampoline kretprobes send returns to.
    /// Required for kretprobes.
    pub fn trampoline(mut self, addr: u64) -> Self {
        self.trampoline = Some(addr);
        self
    }

    /// The registry.
    pub fn build(self) -> KprobeRegistry<A, T> {
        let instances = Box::new(InstanceTable::new(self.own_stripes, self.instance_stripes));
        // Threads that exit inside kretprobed calls give their instances
        // back to this table's pools (untracked first thing in `drop`).
        super::thread_exit::track(&instances);
        KprobeRegistry {
            // Relaxed: ids only need to be unique.
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            arch: self.arch,
            text: self.text,
            xol: self.xol,
            resolver: self.resolver,
            rcu: self.rcu.unwrap_or_default(),
            table: Table::new(self.buckets),
            instances,
            trampoline: self.trampoline,
            writer: Mutex::new(Writer {
                sites: BTreeMap::new(),
                detached: BTreeMap::new(),
                pending: Vec::new(),
                pending_slots: Vec::new(),
                orphans: Vec::new(),
                dirty: Vec::new(),
            }),
            deferred: DeferredFree::new(),
            reclaim_lock: Mutex::new(()),
            count: CachePadded::new(AtomicUsize::new(0)),
            jump_hook: self.jump_hook,
        }
    }
}

/// One probed address as [`KprobeRegistry::sites`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteInfo {
    /// The probed address.
    pub addr: u64,
    /// Whether the breakpoint is written.
    pub armed: bool,
    /// The probes there, in registration order.
    pub probes: Vec<ProbeId>,
    /// The XOL slot, for instructions run out of line.
    pub slot: Option<u64>,
}

impl<A: Arch, T: TextMemory> KprobeRegistry<A, T> {
    /// A registry with default settings: probes validated against
    /// `resolver`'s functions, slots from `xol`.
    pub fn new(
        arch: A,
        text: T,
        resolver: impl SymbolResolver + 'static,
        xol: Arc<dyn XolAllocator>,
    ) -> Self {
        Self::builder(arch, text, resolver, xol).build()
    }

    /// A builder, for the trampoline and the sizes.
    pub fn builder(
        arch: A,
        text: T,
        resolver: impl SymbolResolver + 'static,
        xol: Arc<dyn XolAllocator>,
    ) -> RegistryBuilder<A, T> {
        RegistryBuilder {
            arch,
            text,
            resolver: Box::new(resolver),
            xol,
            rcu: None,
            buckets: DEFAULT_BUCKETS,
            instance_stripes: DEFAULT_INSTANCE_STRIPES,
            own_stripes: DEFAULT_OWN_STRIPES,
            trampoline: None,
            jump_hook: None,
        }
    }

    /// The arch backend.
    pub fn arch(&self) -> &A {
        &self.arch
    }

    /// The text memory the registry patches.
    pub fn text(&self) -> &T {
        &self.text
    }

    /// The return trampoline address, if configured.
    pub fn trampoline(&self) -> Option<u64> {
        self.trampoline
    }

    /// Number of shared stripes of the kretprobe instance table.
    pub fn instance_stripes(&self) -> usize {
        self.instances.stripes()
    }

    /// Number of own stripes of the kretprobe instance table (see
    /// [`RegistryBuilder::own_instance_stripes`]).
    pub fn own_instance_stripes(&self) -> usize {
        self.instances.own_stripes()
    }

    /// Probes registered (pending ones excluded).
    pub fn len(&self) -> usize {
        // Relaxed: a snapshot.
        self.count.load(Ordering::Relaxed)
    }

    /// Whether no probe is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this registry has a site at `addr` (lock-free: one read
    /// section; for a holder check from another registry, which may run
    /// while this one's writer lock is held).
    pub fn has_site(&self, addr: u64) -> bool {
        let guard = self.rcu.read();
        self.table.lookup(addr, &guard).is_some()
    }

    /// [`has_site`](Self::has_site) calling no C-library function (the
    /// live runtime's trap path).
    // Used by the live runtime only, which loom builds leave out.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn has_site_in_trap(&self, addr: u64) -> bool {
        let guard = self.rcu.read_in_trap();
        self.table.lookup(addr, &guard).is_some()
    }

    /// Every probed address with its probes, in address order. Sites whose
    /// text went away (unloaded: see "Text that goes away" in the
    /// [module docs](super)) are not listed; their probes are still in
    /// [`probes`](Self::probes) until unregistered.
    pub fn sites(&self) -> Vec<SiteInfo> {
        let w = self.lock_writer();
        w.sites
            .iter()
            .map(|(&addr, s)| SiteInfo {
                addr,
                armed: s.armed,
                probes: s.probes().map(Kprobe::id).collect(),
                slot: s.exec.plan.map(|p| p.slot_addr),
            })
            .collect()
    }

    /// Handles to every probe registered here (pending ones excluded;
    /// kretprobes' entry probes included), in address order, then in
    /// registration order at one address. The registry owns what it
    /// registered: a probe whose handle was dropped is still here.
    pub fn probes(&self) -> Vec<Kprobe> {
        let w = self.lock_writer();
        w.all_sites().flat_map(|s| s.probes().cloned()).collect()
    }

    /// A handle to the registered probe with id `id` (from
    /// [`Kprobe::id`] or [`sites`](Self::sites)), if it is registered here.
    /// Linear in the number of probes.
    pub fn probe(&self, id: ProbeId) -> Option<Kprobe> {
        let w = self.lock_writer();
        let found = w
            .all_sites()
            .flat_map(|s| s.probes())
            .find(|p| p.id() == id)
            .cloned();
        found
    }

    /// Probes unregistered with [`unregister_nosync`](Self::unregister_nosync)
    /// and not yet committed.
    pub fn pending(&self) -> usize {
        let w = self.lock_writer();
        w.pending
            .iter()
            .filter(|r| matches!(r, Retired::Probe(_)))
            .count()
    }

    /// Unregistered kretprobes whose pools wait for calls still in flight.
    pub fn orphans(&self) -> usize {
        let mut w = self.lock_writer();
        Self::reap_orphans(&mut w);
        w.orphans.len()
    }

    /// Member lists replaced by registrations (a probe joining an address
    /// whose list is full: it is replaced by one twice the size; a join with
    /// room appends in place and replaces nothing) or left by a failed
    /// registration: how many were retired, how many
    /// freed. They are freed a grace period after their retirement by the
    /// RCU domain's callback worker, with no unregistration or commit needed
    /// (a list on which a single-step is still in flight waits for it; see
    /// [`RetiredLists::waiting_for_steps`]). After
    /// [`Rcu::barrier`](crate::rcu::Rcu::barrier) on the registry's domain,
    /// every list retired before it whose steps completed is freed.
    /// (Tests read them through `__internals::kprobe::RetiredListCounts`.)
    pub(crate) fn retired_list_counts(&self) -> RetiredLists {
        self.deferred.stats()
    }

    pub(crate) fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        // Every writer path validates before it mutates and leaves the state
        // consistent at each step, so a panic (in a resolver, say) leaves
        // nothing half-done: poisoning is ignored.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves a probe's target to an address.
    fn resolve(&self, target: &Target) -> Result<u64, ProbeError> {
        match target {
            Target::Address(a) => Ok(*a),
            Target::Symbol { name, offset } => {
                // Checked: an offset past the function's end is refused,
                // never wrapped or let into the next function.
                self.resolver.resolve(name)?.offset_address(name, *offset)
            }
        }
    }

    /// Registers `probe`: validates its address (first probe there), writes
    /// the breakpoint if the probe is enabled, and publishes it to the hit
    /// path. A further probe on an address already probed joins that site:
    /// one breakpoint, handlers in registration order.
    ///
    /// # Errors
    /// - [`ProbeError::AlreadyRegistered`]: the probe is registered (here or
    ///   elsewhere) or pending commit;
    /// - [`ProbeError::UnknownSymbol`], [`ProbeError::NoFunction`]: the
    ///   target cannot be resolved or lies in no known function;
    /// - [`ProbeError::OffsetPastEnd`]: a `name + offset` target's offset is
    ///   not inside the function (checked, never wrapped);
    /// - [`ProbeError::AmbiguousSymbol`]: the name is defined in several
    ///   loaded objects (say which: `object:name`);
    /// - [`ProbeError::NotOnInstructionBoundary`], [`ProbeError::Misaligned`],
    ///   [`ProbeError::UnsupportedInstruction`]: the arch backend refuses it;
    /// - [`ProbeError::AlreadyPatched`]: someone else's breakpoint is there,
    ///   or the text changed under the write;
    /// - [`ProbeError::TextGone`]: the text was unmapped or replaced while
    ///   the probe was being armed;
    /// - [`ProbeError::NotAtFunctionEntry`], [`ProbeError::NoReturnTrampoline`]
    ///   (kretprobe entry probes);
    /// - errors of the text memory and the XOL allocator.
    ///
    /// A site already at the address whose text went away (its object was
    /// unloaded and something, possibly the same object, mapped there
    /// again) is detached and a fresh site is prepared from the text there
    /// now: see "Text that goes away" in the [module docs](super).
    ///
    /// On every error the registry and the text are exactly as before (an
    /// XOL slot prepared for a site that was already visible to readers when
    /// the breakpoint write failed returns to the allocator after the next
    /// grace period the registry waits for, e.g. at the next `commit`).
    pub fn register(&self, probe: &(impl AsKprobe + ?Sized)) -> Result<(), ProbeError> {
        let probe = probe.as_kprobe();
        let addr = self.resolve(probe.target())?;
        let kret = probe.return_probe().is_some();
        if kret && self.trampoline.is_none() {
            return Err(ProbeError::NoReturnTrampoline);
        }
        let mut w = self.lock_writer();
        if !probe.claim(self.id, addr) {
            return Err(ProbeError::AlreadyRegistered {
                site: ProbeSite::Address(addr),
            });
        }
        let result = match self.register_locked(&mut w, probe, addr, kret) {
            Ok(()) => {
                // Relaxed: a statistics counter read by `len`.
                self.count.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                probe.release();
                Err(e)
            }
        };
        drop(w);
        // The callbacks of what this registration retired, queued outside
        // the writer mutex: `Rcu::call` may wait for the domain's worker
        // (flood throttling), which runs other users' callbacks.
        self.deferred.queue_callbacks(&self.rcu);
        result
    }

    /// Registers a kretprobe (its entry probe): as [`register`](Self::register),
    /// and the address must be a function's first instruction.
    ///
    /// # Errors
    /// As `register`; [`ProbeError::NotAtFunctionEntry`] when the address is
    /// not where a function starts, [`ProbeError::NoReturnTrampoline`] when
    /// the registry was built without [`RegistryBuilder::trampoline`].
    #[deprecated(note = "use `register`: it takes both kinds")]
    pub fn register_kretprobe<D: Send + 'static>(
        &self,
        krp: &Kretprobe<D>,
    ) -> Result<(), ProbeError> {
        self.register(krp.probe())
    }

    fn register_locked(
        &self,
        w: &mut Writer,
        probe: &Kprobe,
        addr: u64,
        kret: bool,
    ) -> Result<(), ProbeError> {
        if kret {
            let func = self.resolver.function_containing(addr);
            if func.map(|f| f.start) != Some(addr) {
                return Err(ProbeError::NotAtFunctionEntry {
                    addr,
                    func_start: func.map(|f| f.start),
                });
            }
        }
        // A site there whose text went away is replaced (after the fresh
        // one is armed, so that an error changes nothing).
        let mut stale = false;
        if let Some(st) = w.sites.get_mut(&addr) {
            stale = st.armed && !self.breakpoint_intact(addr, st)?;
            // Join the existing site: arm first if this is its first enabled
            // probe (a failure then changes nothing), then publish.
            if !stale && probe.is_enabled() && !st.armed {
                match self.arm(addr, &st.text_id, &st.orig) {
                    Ok(()) => st.armed = true,
                    Err(e) if text_gone(&e, &st.orig, false) => stale = true,
                    Err(e) => return Err(e),
                }
            }
        }
        if let Some(st) = w.sites.get_mut(&addr).filter(|_| !stale) {
            if probe.has_post() || probe.jump_opt_out() {
                // The detour runs no post handler: back to the trap path
                // before the member is visible (`jump.rs`).
                if let Some(h) = &self.jump_hook {
                    h.to_trap_path(addr..addr + 1, true);
                }
            }
            if let Some(r) = probe.return_probe() {
                r.adopt();
            }
            // In place (a Release store of the length) unless the list is
            // full; a full one is replaced by one twice the size.
            if let Some(old) = st.push(probe.clone()) {
                // Freed a grace period from now by the domain's callback
                // worker (or by a commit that gets there first): see
                // `deferred.rs`.
                self.deferred.retire(vec![Retired::Members(old)]);
            }
            return Ok(());
        }
        let (exec, orig, text_id) = self.prepare_site(w, addr)?;
        let exec = Arc::new(exec);
        if let Some(r) = probe.return_probe() {
            r.adopt();
        }
        let node = Site::new(
            addr,
            Members::new(std::iter::once(probe), MIN_MEMBER_SLOTS, &exec),
        );
        // Publish before arming: a thread that traps on the breakpoint must
        // find the site.
        // SAFETY: writer mutex held; `node` is fresh.
        unsafe { self.table.insert(node) };
        let armed = probe.is_enabled();
        let identified = if armed {
            // The arming write reports (or checks) the identity.
            self.arm_fresh(addr, text_id.as_ref(), &orig)
        } else {
            text_id.map_or_else(
                || {
                    self.text
                        .identity(addr)?
                        .ok_or(ProbeError::TextGone { addr })
                },
                Ok,
            )
        };
        let text_id = match identified {
            Ok(id) => id,
            Err(e) => {
                // SAFETY: writer mutex held; `node` was linked just above.
                unsafe { self.table.unlink(node) };
                // Readers may have reached the node: free it (and its list,
                // and with it the slot) only after a grace period.
                // SAFETY: the node is unlinked and ours.
                let list = unsafe { &*node }.members_ptr();
                // The list borrows the probe: keep it alive as long.
                self.deferred.retire(vec![
                    Retired::MembersWith(list, probe.clone()),
                    Retired::Site(node),
                ]);
                return Err(e);
            }
        };
        if stale {
            // The fresh node shadows it in the hash table already (linked at
            // the head of the chain): now it goes.
            self.detach(w, addr);
        }
        w.sites.insert(
            addr,
            SiteState::new(node, probe.clone(), exec, orig, armed, text_id),
        );
        Ok(())
    }

    /// Whether the breakpoint of the armed site `st` at `addr` is still
    /// there. `false` when the text went away: it is unmapped, another
    /// mapping is there, or it holds the site's original bytes (the same
    /// file mapped again at the same address). Someone else's bytes over
    /// our breakpoint in the same mapping count as intact (as before: the
    /// site is not ours to replace, and unregistering reports them).
    fn breakpoint_intact(&self, addr: u64, st: &SiteState) -> Result<bool, ProbeError> {
        let bp = self.arch.breakpoint();
        let mut buf = [0u8; CodeBytes::CAPACITY];
        let now = &mut buf[..bp.len()];
        match self.text.read(addr, now) {
            Ok(()) => {}
            Err(ProbeError::TextAccess {
                failure: TextFailure::OutOfRange,
                ..
            }) => return Ok(false),
            Err(e) => return Err(e),
        }
        if now == bp {
            return Ok(true);
        }
        if now == st.orig.as_slice() {
            return Ok(false);
        }
        Ok(self.text.identity(addr)? == Some(st.text_id))
    }

    /// Moves the live site at `addr`, whose text went away, out of the hash
    /// table and into `Writer::detached`, unarmed: no hit finds it any more
    /// (after the grace period of its eventual retirement), and nothing is
    /// written to its address on its behalf again. Its probes stay
    /// registered until unregistered. A compaction its removals were
    /// waiting for (the next commit would have made it) is made now, the
    /// replaced list retired like a registration's. Returns its key.
    pub(crate) fn detach(&self, w: &mut Writer, addr: u64) -> SiteKey {
        let mut st = w.sites.remove(&addr).expect("detaching a live site");
        // SAFETY: writer mutex held; a live site's node is linked.
        unsafe { self.table.unlink(st.node) };
        st.armed = false;
        if std::mem::take(&mut st.dirty) && st.wants_compaction() {
            self.deferred.retire(vec![Retired::Members(st.compact())]);
        }
        let key = (addr, st.node as usize);
        w.detached.insert(key, st);
        SiteKey::Detached(key)
    }

    /// Validates the first probe on `addr` and prepares how hits complete:
    /// boundary and instruction checks by the arch backend, the XOL slot.
    /// Also returns the text's identity if it had to look it up.
    fn prepare_site(
        &self,
        w: &mut Writer,
        addr: u64,
    ) -> Result<(SiteExec, CodeBytes, Option<TextIdentity>), ProbeError> {
        let func = self
            .resolver
            .function_containing(addr)
            .ok_or(ProbeError::NoFunction { addr })?;
        let align = self.arch.insn_align();
        if align > 1 && addr % align != 0 {
            return Err(ProbeError::Misaligned { addr, align });
        }
        // The boundary decode below reads the function: no optimized
        // site's `jmp` may be in it (`jump.rs`).
        if let Some(h) = &self.jump_hook {
            h.to_trap_path(func.start..func.end(), false);
        }
        // The function's bytes up to one maximal instruction past `addr`
        // (never past the function's end).
        let end = addr
            .saturating_add(self.arch.max_insn_len() as u64)
            .min(func.end());
        let mut text = vec![0u8; (end - func.start) as usize];
        self.text.read(func.start, &mut text)?;
        let bp = self.arch.breakpoint();
        // What is mapped here: looked up only when a neighbour needs it (a
        // memory-map read); otherwise the arming write reports it.
        let mut text_id = None;
        // Our own armed breakpoints in the range would derail the decoder:
        // decode the original bytes (only where the breakpoint is still
        // there, in the same mapping: a site whose text went away has no
        // say over what is there now).
        for (&a, st) in w.sites.range(func.start..end) {
            let at = (a - func.start) as usize;
            if !st.armed || !text[at..].starts_with(bp) {
                continue;
            }
            if text_id.is_none() {
                text_id = Some(
                    self.text
                        .identity(addr)?
                        .ok_or(ProbeError::TextGone { addr })?,
                );
            }
            if text_id == Some(st.text_id) {
                let orig = st.orig.as_slice();
                let n = orig.len().min(text.len() - at);
                text[at..at + n].copy_from_slice(&orig[..n]);
            }
        }
        self.arch.check_boundary(func.start, &text, addr)?;
        let at = &text[(addr - func.start) as usize..];
        if at.starts_with(bp) {
            // Someone else's breakpoint (ours would be in `sites`).
            if let Some(holder) = self.text.holder_at(addr) {
                return Err(ProbeError::HeldBy { addr, holder });
            }
            return Err(ProbeError::AlreadyPatched {
                addr,
                expected: CodeBytes::default(),
                found: CodeBytes::new(&at[..bp.len()]),
            });
        }
        let insn = self.arch.analyze(addr, at)?;
        if insn.bytes().len() < bp.len() {
            return Err(ProbeError::UnsupportedInstruction {
                addr,
                reason: crate::probes::error::Unsupported::Other(
                    "the instruction is shorter than the breakpoint",
                ),
            });
        }
        let orig = CodeBytes::new(&insn.bytes()[..bp.len()]);
        let exec = match insn.class {
            InsnClass::Emulated(_) => SiteExec::emulated(insn),
            _ => {
                let slot = match self.xol.alloc(addr) {
                    Err(ProbeError::XolExhausted { .. }) => {
                        // Freed slots may be waiting for a grace period:
                        // wait for them once, then retry.
                        self.reclaim_slots();
                        self.xol.alloc(addr)?
                    }
                    other => other?,
                };
                let planned = self
                    .arch
                    .plan_xol(&insn, slot)
                    .and_then(|p| self.xol.fill(slot, p.slot_bytes()).map(|()| p));
                match planned {
                    Ok(plan) => SiteExec::out_of_line(insn, plan, Arc::clone(&self.xol)),
                    Err(e) => {
                        // Never published: no thread can be using it.
                        self.xol.free(slot);
                        return Err(e);
                    }
                }
            }
        };
        Ok((exec, orig, text_id))
    }

    /// Writes the breakpoint over `orig` at `addr`, if the text there is
    /// still `id`.
    pub(crate) fn arm(
        &self,
        addr: u64,
        id: &TextIdentity,
        orig: &CodeBytes,
    ) -> Result<(), ProbeError> {
        let bp = self.arch.breakpoint();
        self.text.write_in(id, addr, orig.as_slice(), bp)?;
        if let Err(e) = self.text.sync_icache(addr, bp.len()) {
            // Put the original back so that the failure changes nothing.
            let _ = self.text.write_in(id, addr, bp, orig.as_slice());
            return Err(e);
        }
        Ok(())
    }

    /// Arms a fresh site: as [`arm`](Self::arm) when the identity is known
    /// (checked), else a write that reports it. Returns the identity.
    fn arm_fresh(
        &self,
        addr: u64,
        known: Option<&TextIdentity>,
        orig: &CodeBytes,
    ) -> Result<TextIdentity, ProbeError> {
        if let Some(id) = known {
            return self.arm(addr, id, orig).map(|()| *id);
        }
        let bp = self.arch.breakpoint();
        let id = self.text.write_identified(addr, orig.as_slice(), bp)?;
        if let Err(e) = self.text.sync_icache(addr, bp.len()) {
            // Put the original back so that the failure changes nothing.
            let _ = self.text.write_in(&id, addr, bp, orig.as_slice());
            return Err(e);
        }
        Ok(id)
    }

    /// Restores `orig` over our breakpoint at `addr`, if the text there is
    /// still `id` (never into text that replaced it).
    pub(crate) fn disarm(
        &self,
        addr: u64,
        id: &TextIdentity,
        orig: &CodeBytes,
    ) -> Result<(), ProbeError> {
        // An optimized site has its `jmp` where the breakpoint was: the
        // optimizer puts the breakpoint and the displaced bytes back first.
        if let Some(h) = &self.jump_hook {
            h.to_trap_path(addr..addr + 1, false);
        }
        let bp = self.arch.breakpoint();
        self.text.write_in(id, addr, bp, orig.as_slice())?;
        self.text.sync_icache(addr, bp.len())
    }

    /// Makes hits on `probe` run its handlers again, writing the breakpoint
    /// if it is the site's first enabled probe.
    ///
    /// # Errors
    /// [`ProbeError::UnknownProbe`] if the probe is not registered here;
    /// [`ProbeError::TextGone`] if the text it was registered in went away
    /// (it can only be unregistered); text errors (nothing changed then).
    pub fn enable(&self, probe: &(impl AsKprobe + ?Sized)) -> Result<(), ProbeError> {
        let probe = probe.as_kprobe();
        let mut w = self.lock_writer();
        let key = Self::site_of(&w, self.id, probe)?;
        if probe.is_enabled() {
            return Ok(());
        }
        let addr = probe.registered_addr();
        if let SiteKey::Detached(_) = key {
            return Err(ProbeError::TextGone { addr });
        }
        let st = w.site_mut(key);
        if !st.armed {
            self.arm(addr, &st.text_id, &st.orig)?;
            st.armed = true;
        }
        probe.set_enabled(true);
        st.enabled_changed(true);
        Ok(())
    }

    /// Stops `probe`'s handlers from running; removes the breakpoint when no
    /// enabled probe is left on the address. A hit already past the enabled
    /// check may still run the handlers once. If the text went away (see
    /// "Text that goes away" in the [module docs](super)) nothing is written
    /// and the site is detached.
    ///
    /// # Errors
    /// [`ProbeError::UnknownProbe`] if the probe is not registered here;
    /// text errors (nothing changed then).
    pub fn disable(&self, probe: &(impl AsKprobe + ?Sized)) -> Result<(), ProbeError> {
        let probe = probe.as_kprobe();
        let mut w = self.lock_writer();
        let mut key = Self::site_of(&w, self.id, probe)?;
        if !probe.is_enabled() {
            return Ok(());
        }
        let addr = probe.registered_addr();
        let st = w.site_mut(key);
        // `probe` is one of the enabled ones.
        let others = st.enabled() > 1;
        if st.armed && !others {
            match self.disarm(addr, &st.text_id, &st.orig) {
                Ok(()) => st.armed = false,
                Err(e) if text_gone(&e, &st.orig, true) => key = self.detach(&mut w, addr),
                Err(e) => return Err(e),
            }
        }
        probe.set_enabled(false);
        w.site_mut(key).enabled_changed(false);
        drop(w);
        // A list the detach retired.
        self.deferred.queue_callbacks(&self.rcu);
        Ok(())
    }

    /// Where the site of a probe registered here is.
    pub(crate) fn site_of(w: &Writer, id: usize, probe: &Kprobe) -> Result<SiteKey, ProbeError> {
        if !probe.registered_in(id) {
            return Err(Self::unknown(probe));
        }
        w.find(probe).ok_or_else(|| Self::unknown(probe))
    }

    /// The error for a probe not registered here.
    #[cold]
    pub(crate) fn unknown(probe: &Kprobe) -> ProbeError {
        ProbeError::UnknownProbe {
            site: match probe.target() {
                Target::Address(a) => ProbeSite::Address(*a),
                Target::Symbol { .. } => ProbeSite::Address(probe.address().unwrap_or(0)),
            },
        }
    }
}

impl<A: Arch, T: TextMemory> fmt::Debug for KprobeRegistry<A, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KprobeRegistry")
            .field("arch", &self.arch.name())
            .field("probes", &self.len())
            .field("trampoline", &self.trampoline)
            .finish_non_exhaustive()
    }
}
