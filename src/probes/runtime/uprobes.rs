//! [`LiveUprobes`]: uprobes on this process's real mappings, by file and
//! offset, libraries loaded later included.
//!
//! # The pieces
//!
//! - The space is [`ThisProcess`] (`uprobes/space.rs`): the live
//!   [`InProcess`] text with the kprobe registry's refusals, the process's
//!   [`XolArea`] (shared with [`Live::global`], so `fork` copies and
//!   quiescence cover uprobe slots too) and a return trampoline: on x86_64
//!   the kretprobes' assembly trampoline (`trampoline.rs`), shared, so a
//!   uretprobe's return runs without a trap; on arm64 a `brk` in an XOL
//!   slot.
//! - Targets are [`UprobeTarget`]s resolved from the ELF file on disk
//!   ([`TargetResolver`]), a bare library name through the objects loaded
//!   now first ([`LoaderWatch`] is the resolver's loaded list).
//! - Mappings come from the [`LoaderWatch`]: at every `dlopen` the new
//!   objects' executable segments go to
//!   [`UprobeRegistry::on_mmap`](crate::probes::uprobe::UprobeRegistry::on_mmap)
//!   inside the dynamic linker, before their constructors run; at every
//!   `dlclose` the unloaded ones go to `on_munmap` before `dlclose`
//!   returns, so the registry forgets them (their XOL slots after the usual
//!   grace period) before anything else can be mapped there.
//! - Hits: [`LiveUprobes`] is a [`TrapDispatcher`] beside the kprobe
//!   registries. A breakpoint it installed runs the consumers in an `Rcu`
//!   read section (not the registry's default `Srcu`, whose first read on a
//!   thread allocates: the trap path calls no C-library function) and completes the displaced instruction (emulated,
//!   boosted, or single-stepped with the step kept in the thread's
//!   [`StepStash`]). A return into the trampoline runs the return
//!   handlers and resumes at the real return address: on x86_64 without a
//!   trap, through [`TrapDispatcher::on_return`] (see "Returns" below); on
//!   arm64 as a trap on the space's own trampoline.
//!
//! # Returns (x86_64)
//!
//! The space's return trampoline is the assembly trampoline of the
//! kretprobes, fixed when the space is made, so every call in flight
//! returns where its entry sent it. The trampoline offers each return to
//! every attached dispatcher (`dispatch.rs`, `dispatch_return`): the
//! kprobe registries look in their instance tables, [`LiveUprobes`] in the
//! returning thread's uprobe return stack, and the one whose frame saved
//! the caller's address claims it; a return nobody claims aborts the
//! process as before. A return of a function both families track (a tail
//! call from a kretprobed function into a uretprobed one, or the other way
//! round: the second hijack finds the trampoline already there) runs both
//! families' handlers, in the dispatcher table's order rather than newest
//! first, and the first hijack's registry restores the address. Abandoned
//! frames (`longjmp`), thread exit and `fork` children work as with the
//! trapping trampoline: the stacks and their reclaim are the registry's
//! (`uprobe/returns.rs`). One more limit: an abandoned frame of one family
//! with exactly the stack pointer of a later tracked call of the other
//! family is taken by that call's return (its handlers run once more, and
//! if its registry comes first in the table its stale address wins); a
//! tracked entry of the same family drops such frames.
//!
//! # Jump optimization (x86_64)
//!
//! [`LiveUprobes::optimize_now`] replaces the `int3` of every install that
//! can be with a `jmp` to a detour that runs the consumers without a trap
//! (the kprobes' optimizer, `runtime/jump.rs`, over this registry:
//! `uprobes/jump.rs`); [`LiveUprobes::is_optimized`] and
//! [`LiveUprobes::jump_refusal`] report per uprobe,
//! [`LiveUprobes::jump_optimizer`] switches it off or starts its background
//! pass. A consumer built with
//! [`jump_opt_out`](crate::probes::uprobe::ConsumerBuilder::jump_opt_out)
//! keeps its uprobe on the trap path. Call `optimize_now` once after a
//! batch of registrations.
//!
//! # Batches
//!
//! [`LiveUprobes::register_many`] resolves every target (each file opened
//! once) and registers them in one batch: the breakpoints are written
//! together (one protection change per run of pages, one core sync), the
//! fault signals claimed once. A `dlopen`'s pending uprobes are one batch
//! the same way. [`LiveUprobes::unregister_many`] and
//! [`LiveUprobes::unregister_nosync`] + [`LiveUprobes::commit`] remove with
//! one grace period for all. Probing the C library in-process has a cost
//! of its own: once its functions are probed, every call the registrar
//! makes into them (`malloc` while it builds records) is a hit.
//!
//! # One writer per byte
//!
//! Kprobes and uprobes patch the same text. Each registry writes a
//! breakpoint only over the original byte it read, and [`InProcess`]
//! refuses a write over a byte that is not what the writer expects. The
//! second registry to probe an instruction finds the first one's `int3`
//! and is refused with [`ProbeError::HeldBy`], which names the holder
//! (each live registry files a lookup of its own breakpoints, `holders.rs`);
//! nothing changes, and the breakpoint is never adopted as the second
//! registry's own. They do not share one breakpoint.
//!
//! # What runs where
//!
//! The hit path (lookup, handlers, completion) runs inside the SIGTRAP
//! handler with the thread's trap flag up, like a kprobe hit: a probe hit
//! inside a handler is counted missed. Installs and removals driven by the
//! loader run inside the loader's rendezvous breakpoint, on the thread
//! calling `dlopen`/`dlclose`, with the loader lock held (see
//! [`LoaderWatch`] for why that may allocate); a failed install there (an
//! unsupported instruction at a registered offset that was never validated
//! against the file) is counted in [`LiveUprobeStats::install_errors`].
//!
//! # `fork()` and `exec`
//!
//! A child inherits the patched text, the registry, the watch and the
//! trap handler, so its hits are handled and counted (the space keeps its
//! id). A registration in the child while another thread of the parent was
//! inside a uprobe registry operation at the fork may wait for good (the
//! uprobe registry's locks are not taken across `fork`). The optimizer's
//! pass lock and state lock are (x86_64, `fork.rs`): a fork waits for a
//! pass under way, and the child can optimize and unregister. `exec`
//! replaces the image: out of scope.

mod disk;
#[cfg(target_arch = "x86_64")]
pub(crate) mod jump;
mod space;

#[cfg(target_arch = "x86_64")]
pub(crate) use self::jump::{hold_for_fork, ForkHold};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use self::disk::DiskFiles;
pub use self::space::ThisProcess;
use super::dispatch::{try_attach, StepStash, TrapDispatcher, Verdict};
use super::loader::{LoaderEvent, LoaderSubscription, LoaderWatch};
use super::{Live, XolArea};
use crate::probes::arch::{Arch, DataMemory, NativeArch, Regs, StepOutcome};
use crate::probes::outcome::ReturnOutcome;
use crate::probes::runtime::in_process::InProcess;
use crate::probes::uprobe::{
    Consumer, ResolvedTarget, SpaceId, TargetFile, TargetResolver, UprobeFinished, UprobeKey,
    UprobeOutcome, UprobeRegistry, UprobeStep, UprobeTarget,
};
use crate::probes::ProbeError;
use crate::rcu::Rcu;

/// How long a registration that met text being unloaded waits for the
/// loader's report of the unload before it gives up with the error.
pub const FORGET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many times a registration that met text being unloaded is tried
/// again (each try follows a change of the loader's list).
const MAX_RETRIES: usize = 1000;

/// How many times a text failure the loader watch cannot explain is tried
/// again (see [`LiveUprobes::register`]).
const BLIND_RETRIES: usize = 3;

/// The uprobe registry over this process.
pub type LiveUprobeRegistry = UprobeRegistry<NativeArch, ThisProcess, Rcu>;

/// A single-step in flight, as the thread's stash keeps it.
type Step = UprobeStep<'static, Rcu>;

/// Counters of the live uprobe runtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveUprobeStats {
    /// Mappings handed to the registry (`on_mmap` calls).
    pub mapped: u64,
    /// Mappings taken away (`on_munmap` calls).
    pub unmapped: u64,
    /// Installs that failed inside the loader (the error cannot be
    /// returned to anyone there).
    pub install_errors: u64,
}

/// Why [`LiveUprobes::global`] failed.
#[derive(Debug, Clone)]
pub struct LiveUprobesError(String);

impl std::fmt::Display for LiveUprobesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "setting up live uprobes: {}", self.0)
    }
}

impl std::error::Error for LiveUprobesError {}

/// Live uprobes on this process: a [`LiveUprobeRegistry`] over
/// [`ThisProcess`], fed by the [`LoaderWatch`] and attached to the SIGTRAP
/// handler. One per process ([`LiveUprobes::global`]). The
/// [module docs](self) say how the pieces fit.
pub struct LiveUprobes {
    registry: LiveUprobeRegistry,
    space: Arc<ThisProcess>,
    resolver: TargetResolver,
    files: Arc<DiskFiles>,
    subscription: OnceLock<LoaderSubscription>,
    mapped: AtomicU64,
    unmapped: AtomicU64,
    install_errors: AtomicU64,
    /// The error of the last install that failed inside the loader
    /// ([`last_install_error`](Self::last_install_error)).
    last_install_error: Mutex<Option<ProbeError>>,
    /// The jump optimizer (`uprobes/jump.rs`).
    #[cfg(target_arch = "x86_64")]
    jump: Arc<super::jump::JumpOptimizer>,
    /// One optimizer pass (or query) at a time (`uprobes/jump.rs`).
    #[cfg(target_arch = "x86_64")]
    jump_pass: Mutex<()>,
}

impl std::fmt::Debug for LiveUprobes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveUprobes")
            .field("space", &self.space)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

static GLOBAL: OnceLock<Result<&'static LiveUprobes, LiveUprobesError>> = OnceLock::new();
static BUILD: Mutex<()> = Mutex::new(());

impl LiveUprobes {
    /// The process's live uprobes, set up on first use: the loader watch,
    /// the space (sharing [`Live::global`]'s XOL area and refusals), the
    /// return trampoline, the dispatcher, and every loaded object's
    /// mappings.
    ///
    /// # Errors
    /// The loader watch cannot be set up (a static program), no trap
    /// dispatcher slot is left, or no XOL slot for the trampoline. The
    /// failure is remembered.
    pub fn global() -> Result<&'static LiveUprobes, LiveUprobesError> {
        if let Some(done) = GLOBAL.get() {
            return done.clone();
        }
        let _build = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(done) = GLOBAL.get() {
            return done.clone();
        }
        let built = Self::build().map_err(LiveUprobesError);
        let _ = GLOBAL.set(built.clone());
        built
    }

    /// The live uprobes if they are built (never builds them).
    #[cfg(target_arch = "x86_64")]
    fn built() -> Option<&'static LiveUprobes> {
        GLOBAL.get()?.as_ref().ok().copied()
    }

    fn build() -> Result<&'static LiveUprobes, String> {
        let watch = LoaderWatch::global().map_err(|e| e.to_string())?;
        let live = Live::global();
        let xol: Arc<XolArea> = live.xol_arc();
        let owner = super::holders::new_owner();
        let text: InProcess = live.registry().text().clone().owned_by(owner);
        let trampoline = return_trampoline(&xol)?;
        let space = Arc::new(ThisProcess {
            id: SpaceId(u64::from(std::process::id())),
            text,
            xol,
            trampoline,
            watch,
        });
        let files = Arc::new(DiskFiles::default());
        // `Rcu`, not the default `Srcu`: its read section claims nothing with
        // the C library on the trap path (`Flavor::read_in_trap`).
        let registry = UprobeRegistry::with_domain(NativeArch::default(), Rcu::global().clone())
            .with_file_text(Arc::clone(&files));
        #[cfg(target_arch = "x86_64")]
        let jump = super::jump::JumpOptimizer::new();
        #[cfg(target_arch = "x86_64")]
        let registry = registry
            .with_jump_hook(Arc::clone(&jump) as Arc<dyn crate::probes::jump_sites::JumpHook>);
        let resolver = TargetResolver::new().with_loaded(watch);
        let this: &'static LiveUprobes = Box::leak(Box::new(LiveUprobes {
            registry,
            space,
            resolver,
            files,
            subscription: OnceLock::new(),
            mapped: AtomicU64::new(0),
            unmapped: AtomicU64::new(0),
            install_errors: AtomicU64::new(0),
            last_install_error: Mutex::new(None),
            #[cfg(target_arch = "x86_64")]
            jump,
            #[cfg(target_arch = "x86_64")]
            jump_pass: Mutex::new(()),
        }));
        #[cfg(target_arch = "x86_64")]
        this.jump.bind(this, live.symbols().clone());
        // Attached for good (leaked, like every live registry).
        drop(try_attach(this).ok_or("no trap dispatcher slot left")?);
        // A breakpoint another registry finds here is named as ours.
        let space = this.space.id;
        super::holders::add(
            owner,
            Box::new(move |addr| {
                this.registry
                    .installed_at(space, addr)
                    .map(|key| format!("the live uprobe registry (file offset {:#x})", key.offset))
            }),
        );
        // The replay maps every object loaded now; later changes follow.
        let sub = watch.subscribe(move |ev| this.on_loader(ev));
        let _ = this.subscription.set(sub);
        Ok(this)
    }

    /// The registry: register consumers by key here (or by target with
    /// [`register`](Self::register)).
    pub fn registry(&self) -> &LiveUprobeRegistry {
        &self.registry
    }

    /// This process's space id (stable across `fork`: the child's copy of
    /// the registry describes the child).
    pub fn space_id(&self) -> SpaceId {
        self.space.id
    }

    /// The space.
    pub fn space(&self) -> &Arc<ThisProcess> {
        &self.space
    }

    /// The resolver targets go through (loaded objects first).
    pub fn resolver(&self) -> &TargetResolver {
        &self.resolver
    }

    /// The runtime's counters.
    pub fn stats(&self) -> LiveUprobeStats {
        // Relaxed: statistics, each read as of some moment.
        LiveUprobeStats {
            mapped: self.mapped.load(Ordering::Relaxed),
            unmapped: self.unmapped.load(Ordering::Relaxed),
            install_errors: self.install_errors.load(Ordering::Relaxed),
        }
    }

    /// The error of the last install that failed inside the loader (what
    /// [`LiveUprobeStats::install_errors`] counts: nobody there can be
    /// handed it), if any.
    pub fn last_install_error(&self) -> Option<ProbeError> {
        self.last_install_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves `target` and registers `consumer` there: at a function's
    /// first instruction or inside one (the offset checked against the
    /// instruction boundaries from the function's start), installed now in
    /// every mapping of the file and in every later one. The file's code is
    /// read from disk first, so bad input is refused even when the file is
    /// not mapped yet.
    ///
    /// # Errors
    /// What resolution reports (no such file, symbol, offset outside the
    /// code, an IFUNC name), and what
    /// [`UprobeRegistry::register_in_function`] reports (an offset inside an
    /// instruction, an unsupported instruction, someone else's breakpoint
    /// there — a kprobe's included —, a return handler away from a function
    /// entry). Nothing changes on error. A registration that meets text a
    /// concurrent `dlclose` has just unmapped (before the loader reported
    /// it) waits for the report (up to [`FORGET_TIMEOUT`]) and tries again.
    pub fn register(
        &self,
        target: &UprobeTarget,
        consumer: &Consumer,
    ) -> Result<ResolvedTarget, ProbeError> {
        let resolved = self.resolver.resolve(target)?;
        self.files.load(resolved.file, &resolved.path);
        let key = resolved.key();
        let register = || match &resolved.function {
            Some(f) => self.registry.register_in_function(key, f.offset, consumer),
            None => self.registry.register(key, consumer),
        };
        let (mut retries, mut blind) = (0, 0);
        loop {
            let before = self.space.watch.settled_changes();
            let e = match register() {
                Ok(()) => return Ok(resolved),
                Err(e) => e,
            };
            // A `dlclose` unmapped the file between its unmapping and the
            // loader's report (which tells the registry, before `dlclose`
            // returns): the install met text that is gone. Nothing changed;
            // try again once the registry caught up. The loader moved during
            // the attempt (the text may even be mapped again already), or
            // the address is unmapped and the report comes soon.
            let gone = match e {
                ProbeError::TextAccess { addr, .. } | ProbeError::TextGone { addr } => Some(addr),
                _ => None,
            };
            // A text failure the watch cannot explain (the same file still
            // mapped there, no change reported) is tried again a few times
            // too: under `dlopen`/`dlclose` churn the stress test still met
            // such transient failures, whose cause is not understood.
            let again = gone.is_some_and(|addr| {
                retries < MAX_RETRIES
                    && (self.await_loader(addr, before) || {
                        blind += 1;
                        blind <= BLIND_RETRIES
                    })
            });
            if !again {
                return Err(e);
            }
            retries += 1;
        }
    }

    /// Resolves every target and registers `consumer` on all of them in one
    /// batch ([`UprobeRegistry::register_many`]: one text batch for all the
    /// breakpoints), the way to attach to every function of a library (a
    /// glob, a multi-attach). Returns each target's uprobe key (what
    /// [`unregister_many`](Self::unregister_many) takes), in order; the
    /// resolver's [`resolve`](TargetResolver::resolve) gives the details of
    /// one (path, function) without registering. Resolution comes first,
    /// for all: a target that does not resolve fails alone. An item that
    /// meets text a concurrent `dlclose` has just unmapped is tried again
    /// alone, as [`register`](Self::register) does.
    ///
    /// # Errors
    /// Per target, as [`register`](Self::register); a failed target
    /// changes nothing, the others are registered.
    pub fn register_many(
        &self,
        targets: &[UprobeTarget],
        consumer: &Consumer,
    ) -> Vec<Result<UprobeKey, ProbeError>> {
        // Each file opened (searched for, indexed) once for the batch; each
        // place found in it without building a `ResolvedTarget` (no
        // allocation per target: in a probed C library each would be hits).
        let mut files: HashMap<&str, Result<TargetFile, ProbeError>> = HashMap::new();
        let found: Vec<Result<(UprobeKey, Option<u64>), ProbeError>> = targets
            .iter()
            .map(|t| {
                files
                    .entry(t.file())
                    .or_insert_with(|| self.resolver.open_file(t.file()))
                    .as_ref()
                    .map_err(Clone::clone)
                    .and_then(|f| f.key_of(t.place()))
            })
            .collect();
        for f in files.values().flatten() {
            self.files.load(f.file(), f.path());
        }
        let _claimed = super::faults::ClaimedBatch::begin();
        let items: Vec<(UprobeKey, Option<u64>)> = found.iter().flatten().copied().collect();
        let mut results = self.registry.register_many(&items, consumer).into_iter();
        found
            .into_iter()
            .zip(targets)
            .map(|(f, t)| {
                let (key, _) = f?;
                match results.next().expect("one result per item") {
                    Ok(()) => Ok(key),
                    // Raced an unload: alone, with `register`'s waiting.
                    Err(ProbeError::TextAccess { .. } | ProbeError::TextGone { .. }) => {
                        self.register(t, consumer).map(|r| r.key())
                    }
                    Err(e) => Err(e),
                }
            })
            .collect()
    }

    /// After an install failed at `addr` in an attempt that began when the
    /// loader watch had handled `before` changes: whether to try again, once
    /// the loader's reports since have been handled. Yes if the loader moved
    /// since (the attempt raced a load or unload), or if the file the
    /// registry maps at `addr` is no longer what is mapped there and the
    /// report of that comes within [`FORGET_TIMEOUT`]. No if the file is
    /// still there and nothing moved (a real failure), or if the change is
    /// never reported (not the loader's doing).
    fn await_loader(&self, addr: u64, before: u64) -> bool {
        let watch = self.space.watch;
        // Counted under the watch's lock, as `before` was: a report that
        // was in progress when the attempt began (its `on_munmap` not yet
        // run) is not taken for the state the attempt saw.
        if watch.settled_changes() != before {
            return true;
        }
        // The file the registry believes is mapped at `addr`, and what is
        // mapped there now: after an unmap anything may take the range
        // (another thread's `malloc` arena, a thread stack) before the
        // loader reports the unload.
        let believed = self
            .registry
            .mappings_of(self.space.id)
            .into_iter()
            .find(|m| m.vaddr.contains(&addr))
            .map(|m| m.file);
        let now = super::maps::Maps::read().ok().and_then(|maps| {
            maps.find(addr).map(|m| crate::probes::uprobe::FileId {
                dev: m.device,
                inode: m.inode,
            })
        });
        if believed.is_none() || now == believed {
            // Nothing changed since the attempt began and the file is still
            // there (or the registry maps nothing there): a real failure.
            return false;
        }
        let start = std::time::Instant::now();
        while watch.stats().changes == before {
            if start.elapsed() > FORGET_TIMEOUT {
                return false;
            }
            std::thread::yield_now();
        }
        // Its subscribers done.
        let _ = watch.settled_changes();
        true
    }

    /// Unregisters `consumer` from `key` (a [`ResolvedTarget::key`]).
    ///
    /// # Errors
    /// As [`UprobeRegistry::unregister`].
    pub fn unregister(&self, key: UprobeKey, consumer: &Consumer) -> Result<(), ProbeError> {
        self.registry.unregister(key, consumer)
    }

    /// Unregisters every `(key, consumer)` pair with one grace period (a
    /// multi-attach taken down at once).
    ///
    /// # Errors
    /// As [`UprobeRegistry::unregister_many`]: a pair not registered (or
    /// named twice) is refused and nothing is removed.
    pub fn unregister_many(&self, pairs: &[(UprobeKey, &Consumer)]) -> Result<usize, ProbeError> {
        self.registry.unregister_many(pairs)
    }

    /// The first half of a batched removal; see
    /// [`UprobeRegistry::unregister_nosync`]. **Call
    /// [`commit`](Self::commit) afterwards.**
    ///
    /// # Errors
    /// As [`UprobeRegistry::unregister`].
    pub fn unregister_nosync(&self, key: UprobeKey, consumer: &Consumer) -> Result<(), ProbeError> {
        self.registry.unregister_nosync(key, consumer)
    }

    /// The second half of a batched removal: one grace period
    /// ([`UprobeRegistry::commit`]).
    pub fn commit(&self) {
        self.registry.commit();
    }

    /// A loader change: map or unmap the object's executable segments.
    fn on_loader(&self, ev: LoaderEvent<'_>) {
        match ev {
            LoaderEvent::Loaded(o) => {
                // The object's pending uprobes are one batch.
                let _claimed = super::faults::ClaimedBatch::begin();
                for m in o.file_mappings() {
                    // Relaxed: statistics.
                    self.mapped.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.registry.on_mmap(&self.space, m) {
                        self.install_errors.fetch_add(1, Ordering::Relaxed);
                        // Kept for `last_install_error` (the loader's
                        // rendezvous may allocate: see `LoaderWatch`).
                        *self
                            .last_install_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                }
            }
            LoaderEvent::Unloaded(o) => {
                for m in o.file_mappings() {
                    // Relaxed: statistics.
                    self.unmapped.fetch_add(1, Ordering::Relaxed);
                    self.registry.on_munmap(self.space.id, m.vaddr);
                }
            }
        }
    }
}

/// The space's return trampoline, fixed for the life of the process (a
/// call in flight returns where its entry sent it).
///
/// x86_64: the kretprobes' assembly trampoline (`trampoline.rs`), which
/// offers the return to every dispatcher on the thread's ordinary stack,
/// without a trap; [`LiveUprobes`] claims it in
/// [`TrapDispatcher::on_return`] when the thread's return stack has the
/// frame.
#[cfg(target_arch = "x86_64")]
fn return_trampoline(_xol: &XolArea) -> Result<u64, String> {
    Ok(super::trampoline::trampoline_address())
}

/// The space's return trampoline, fixed for the life of the process.
///
/// arm64: one breakpoint (`brk`) in an XOL slot of its own; a return traps
/// there and [`LiveUprobes`] handles it in
/// [`TrapDispatcher::on_breakpoint`].
#[cfg(not(target_arch = "x86_64"))]
fn return_trampoline(xol: &XolArea) -> Result<u64, String> {
    use crate::probes::xol::XolAllocator;
    let trampoline = xol
        .alloc(super::trampoline::trampoline_address())
        .map_err(|e| format!("an XOL slot for the return trampoline: {e}"))?;
    xol.fill(trampoline, NativeArch::default().breakpoint())
        .map_err(|e| format!("writing the return trampoline: {e}"))?;
    Ok(trampoline)
}

/// Whether the space's return trampoline is a breakpoint (arm64) rather
/// than the shared assembly trampoline (x86_64).
const TRAPPING_RETURNS: bool = cfg!(not(target_arch = "x86_64"));

/// How a step under way ends: on its marker, or on the trap flag.
fn step_verdict(marker: Option<u64>) -> Verdict {
    match marker {
        Some(marker) => Verdict::StepToMarker { marker },
        None => Verdict::Step,
    }
}

impl TrapDispatcher for LiveUprobes {
    fn on_breakpoint(
        &'static self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        stash: &mut StepStash,
    ) -> Verdict {
        let at = NativeArch::default().trap_address(regs);
        if TRAPPING_RETURNS && at == self.space.trampoline {
            return match self.registry.on_return_in_trap(self.space.id, regs) {
                ReturnOutcome::Returned { .. } => Verdict::Resume,
                ReturnOutcome::NotOurs => Verdict::NotOurs,
            };
        }
        match self
            .registry
            .on_breakpoint_in_trap(self.space.id, regs, mem)
        {
            UprobeOutcome::Done(done) => match done {
                UprobeFinished::NotOurs => Verdict::NotOurs,
                UprobeFinished::Vanished
                | UprobeFinished::Skipped
                | UprobeFinished::Emulated
                | UprobeFinished::Detoured => Verdict::Resume,
                UprobeFinished::Boosted { slot } => {
                    // A fault of the copy in the slot is reported at `at`.
                    super::dispatch::note_boost(slot, at);
                    Verdict::Resume
                }
                UprobeFinished::Failed(e) => Verdict::Failed(e),
            },
            UprobeOutcome::SingleStep(step) => {
                // The marker, not a `Verdict`, is held across the `put`: no
                // landing pad drops a value that can own a `ProbeError`.
                let marker = step.plan().step_marker;
                // The stash is empty: the runtime reserved a fresh entry.
                let _ = stash.put::<Step>(step);
                step_verdict(marker)
            }
        }
    }

    fn on_step(
        &'static self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        stash: &mut StepStash,
    ) -> Verdict {
        let Some(step) = stash.take::<Step>() else {
            return Verdict::NotOurs;
        };
        // Held without drop glue: no landing pad of a call below drops a
        // `ProbeError` (its drop glue can reach `free`, and the trap path
        // calls no C-library function).
        let result = std::mem::ManuallyDrop::new(self.registry.on_step_complete(&step, regs, mem));
        if matches!(*result, Ok(StepOutcome::Repeat)) {
            let marker = step.plan().step_marker;
            let _ = stash.put::<Step>(step);
            return step_verdict(marker);
        }
        drop(step);
        match std::mem::ManuallyDrop::into_inner(result) {
            Ok(_) => Verdict::Resume,
            Err(e) => Verdict::Failed(e),
        }
    }

    fn claims(&'static self, addr: u64) -> bool {
        (TRAPPING_RETURNS && addr == self.space.trampoline)
            || self.registry.installed_in_trap(self.space.id, addr)
    }

    fn on_return(&'static self, regs: &mut Regs) -> bool {
        // x86_64: the space's trampoline is the shared assembly trampoline,
        // which asks every dispatcher (`dispatch_return`). A miss (a
        // kretprobe's return) is one thread-local load while the thread
        // holds no uprobe return stack (`uprobe/bindings.rs`). arm64: uprobe
        // returns trap on the space's own trampoline (`on_breakpoint`).
        !TRAPPING_RETURNS
            && matches!(
                self.registry.on_return_in_trap(self.space.id, regs),
                ReturnOutcome::Returned { .. }
            )
    }

    fn on_fault(&'static self, regs: &mut Regs, stash: &mut StepStash) -> bool {
        // Only a fault of the stepped copy itself is the step's.
        let ours = stash
            .peek::<Step>()
            .is_some_and(|s| s.plan().step_entry == regs.ip);
        if !ours {
            return false;
        }
        // Undone through the stashed step, then taken and dropped: no owned
        // step is alive across a call that could unwind.
        if let Some(step) = stash.peek::<Step>() {
            NativeArch::default().abort_step(step.plan(), step.state(), regs);
        }
        drop(stash.take::<Step>());
        true
    }
}

// A step in flight fits the thread's stash (checked when it is put there).
const _: () = assert!(std::mem::size_of::<Step>() <= super::dispatch::STASH_BYTES);
