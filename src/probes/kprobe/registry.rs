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
use super::kretprobe::{Kretprobe, ReturnProbe};
use super::probe::{AsKprobe, Kprobe, ProbeId, Target};
use super::site::SiteState;
use super::table::{Members, Site, SiteExec, Table, MIN_MEMBER_SLOTS};
use super::unregister::Retired;
use crate::probes::arch::{Arch, InsnClass};
use crate::probes::error::{CodeBytes, ProbeError, ProbeSite};
use crate::probes::resolve::SymbolResolver;
use crate::probes::text::TextMemory;
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
    trampoline: Option<u64>,
}

impl<A: Arch, T: TextMemory> RegistryBuilder<A, T> {
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

    /// The address of the return trampoline kretprobes send returns to.
    /// Required for kretprobes.
    pub fn trampoline(mut self, addr: u64) -> Self {
        self.trampoline = Some(addr);
        self
    }

    /// The registry.
    pub fn build(self) -> KprobeRegistry<A, T> {
        let instances = Box::new(InstanceTable::new(self.instance_stripes));
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
                pending: Vec::new(),
                pending_slots: Vec::new(),
                orphans: Vec::new(),
                dirty: Vec::new(),
            }),
            deferred: DeferredFree::new(),
            reclaim_lock: Mutex::new(()),
            count: CachePadded::new(AtomicUsize::new(0)),
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
            trampoline: None,
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

    /// Number of stripes of the kretprobe instance table.
    pub fn instance_stripes(&self) -> usize {
        self.instances.stripes()
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

    /// Every probed address with its probes, in address order.
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
        w.sites.values().flat_map(|s| s.probes().cloned()).collect()
    }

    /// A handle to the registered probe with id `id` (from
    /// [`Kprobe::id`] or [`sites`](Self::sites)), if it is registered here.
    /// Linear in the number of probes.
    pub fn probe(&self, id: ProbeId) -> Option<Kprobe> {
        let w = self.lock_writer();
        let found = w
            .sites
            .values()
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
    /// - [`ProbeError::NotAtFunctionEntry`], [`ProbeError::NoReturnTrampoline`]
    ///   (kretprobe entry probes);
    /// - errors of the text memory and the XOL allocator.
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
        if let Some(st) = w.sites.get_mut(&addr) {
            // Join the existing site: arm first if this is its first enabled
            // probe (a failure then changes nothing), then publish.
            if probe.is_enabled() && !st.armed {
                self.arm(addr, &st.orig)?;
                st.armed = true;
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
        let (exec, orig) = self.prepare_site(w, addr)?;
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
        if armed {
            if let Err(e) = self.arm(addr, &orig) {
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
        }
        w.sites
            .insert(addr, SiteState::new(node, probe.clone(), exec, orig, armed));
        Ok(())
    }

    /// Validates the first probe on `addr` and prepares how hits complete:
    /// boundary and instruction checks by the arch backend, the XOL slot.
    fn prepare_site(&self, w: &mut Writer, addr: u64) -> Result<(SiteExec, CodeBytes), ProbeError> {
        let func = self
            .resolver
            .function_containing(addr)
            .ok_or(ProbeError::NoFunction { addr })?;
        let align = self.arch.insn_align();
        if align > 1 && addr % align != 0 {
            return Err(ProbeError::Misaligned { addr, align });
        }
        // The function's bytes up to one maximal instruction past `addr`
        // (never past the function's end).
        let end = addr
            .saturating_add(self.arch.max_insn_len() as u64)
            .min(func.end());
        let mut text = vec![0u8; (end - func.start) as usize];
        self.text.read(func.start, &mut text)?;
        // Our own armed breakpoints in the range would derail the decoder:
        // decode the original bytes.
        for (&a, st) in w.sites.range(func.start..end) {
            if st.armed {
                let at = (a - func.start) as usize;
                let orig = st.orig.as_slice();
                let n = orig.len().min(text.len() - at);
                text[at..at + n].copy_from_slice(&orig[..n]);
            }
        }
        self.arch.check_boundary(func.start, &text, addr)?;
        let at = &text[(addr - func.start) as usize..];
        let bp = self.arch.breakpoint();
        if at.starts_with(bp) {
            // Someone else's breakpoint (ours would be in `sites`).
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
        Ok((exec, orig))
    }

    /// Writes the breakpoint over `orig` at `addr`.
    pub(crate) fn arm(&self, addr: u64, orig: &CodeBytes) -> Result<(), ProbeError> {
        let bp = self.arch.breakpoint();
        self.text.write(addr, orig.as_slice(), bp)?;
        if let Err(e) = self.text.sync_icache(addr, bp.len()) {
            // Put the original back so that the failure changes nothing.
            let _ = self.text.write(addr, bp, orig.as_slice());
            return Err(e);
        }
        Ok(())
    }

    /// Restores `orig` over our breakpoint at `addr`.
    pub(crate) fn disarm(&self, addr: u64, orig: &CodeBytes) -> Result<(), ProbeError> {
        let bp = self.arch.breakpoint();
        self.text.write(addr, bp, orig.as_slice())?;
        self.text.sync_icache(addr, bp.len())
    }

    /// Makes hits on `probe` run its handlers again, writing the breakpoint
    /// if it is the site's first enabled probe.
    ///
    /// # Errors
    /// [`ProbeError::UnknownProbe`] if the probe is not registered here;
    /// text errors (nothing changed then).
    pub fn enable(&self, probe: &(impl AsKprobe + ?Sized)) -> Result<(), ProbeError> {
        let probe = probe.as_kprobe();
        let mut w = self.lock_writer();
        let st = Self::site_of(&mut w, self.id, probe)?;
        if probe.is_enabled() {
            return Ok(());
        }
        if !st.armed {
            self.arm(probe.registered_addr(), &st.orig)?;
            st.armed = true;
        }
        probe.set_enabled(true);
        st.enabled_changed(true);
        Ok(())
    }

    /// Stops `probe`'s handlers from running; removes the breakpoint when no
    /// enabled probe is left on the address. A hit already past the enabled
    /// check may still run the handlers once.
    ///
    /// # Errors
    /// [`ProbeError::UnknownProbe`] if the probe is not registered here;
    /// text errors (nothing changed then).
    pub fn disable(&self, probe: &(impl AsKprobe + ?Sized)) -> Result<(), ProbeError> {
        let probe = probe.as_kprobe();
        let mut w = self.lock_writer();
        let st = Self::site_of(&mut w, self.id, probe)?;
        if !probe.is_enabled() {
            return Ok(());
        }
        // `probe` is one of the enabled ones.
        let others = st.enabled() > 1;
        if st.armed && !others {
            self.disarm(probe.registered_addr(), &st.orig)?;
            st.armed = false;
        }
        probe.set_enabled(false);
        st.enabled_changed(false);
        Ok(())
    }

    /// The site of a probe registered here.
    pub(crate) fn site_of<'w>(
        w: &'w mut Writer,
        id: usize,
        probe: &Kprobe,
    ) -> Result<&'w mut SiteState, ProbeError> {
        if !probe.registered_in(id) {
            return Err(Self::unknown(probe));
        }
        w.sites
            .get_mut(&probe.registered_addr())
            .ok_or_else(|| Self::unknown(probe))
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
