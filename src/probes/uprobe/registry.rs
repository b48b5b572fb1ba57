//! [`UprobeRegistry`]: the write side (consumers, mmap, munmap).
//!
//! Every change that concerns one file holds that file's stripe of a padded
//! [`HashedLocks`] keyed by [`FileId`], so a registration and an mmap of the
//! same file never interleave. Lock order: file stripe → a space's `maps_lock`
//! → (the trees' writer locks, the text memory's and the XOL allocator's own
//! locks); a space's XOL share table (`xolshare.rs`) inside the stripe or
//! alone; one file stripe at a time; the hit path takes none.
//!
//! Why, in full: [`crate::docs::algorithms::uprobes`].

use super::consumer::{Consumer, Member};
use super::filetext::FileText;
use super::hitcache::{HitCache, DEFAULT_HIT_CACHE_SLOTS};
use super::install::Prepared;
use super::retpool::ReturnPool;
use super::returns::Returns;
use super::short::Short;
use super::space::{AddressSpace, FileId, FileMapping, SpaceId, UprobeKey};
use super::xolshare::XolShares;
use crate::hashlock::HashedLocks;
use crate::probes::arch::{Arch, Insn, XolPlan, MAX_INSN_BYTES};
use crate::probes::error::{CodeBytes, ProbeSite};
use crate::probes::jump_sites::JumpHold;
use crate::probes::text::TextMemory;
use crate::probes::ProbeError;
use crate::rcu::{Flavor, RcuCell, Retirements, Srcu};
use crate::seqtree::{EntryHandle, SeqTree};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{Arc, Mutex};

/// File stripes of the per-file lock array. The seed's 13 mutexes were one
/// cache line apart at best; 64 padded stripes keep unrelated files off each
/// other's lock for a few KiB.
pub const DEFAULT_FILE_STRIPES: usize = 64;

/// One uprobe: its consumers and the file's bytes at its offset.
pub(crate) struct Uprobe<F: Flavor> {
    /// Its key in the tree, for the hit cache's check (`hitcache.rs`).
    pub(crate) key: UprobeKey,
    /// Registration order (ascending sequence numbers); replaced whole
    /// (read-copy-update) by writers holding the file stripe.
    pub(crate) consumers: RcuCell<Short<Member>, F>,
    /// The original bytes at the offset, learned from the first mapping the
    /// uprobe was validated against, or from the file's code when nothing
    /// mapped it (`filetext.rs`); `None` until then. Written and read only
    /// under the file stripe.
    pub(super) orig: Mutex<Option<CodeBytes>>,
    /// Offset of the enclosing function's first instruction, if the
    /// registration named it (for the instruction-boundary check).
    pub(super) func_offset: Option<u64>,
    /// Hits whose handlers could not run (re-entered) and calls whose
    /// return could not be tracked (see `returns.rs`).
    nmissed: AtomicU64,
    /// Where the breakpoint is installed, for the hit path: a short
    /// array (one entry per space mapping the offset) replaced whole by
    /// writers holding the file stripe. Mirrors the spaces' install trees,
    /// so a hit needs no second tree walk.
    pub(crate) placed: RcuCell<Short<Placed>, F>,
    /// Where trap hits at [`detour_at`](Self::detour_at) resume while a
    /// jump optimizer has a detour there (0: none; `jump.rs`).
    pub(crate) detour: AtomicU64,
    /// The one install address the detour is for.
    pub(crate) detour_at: AtomicU64,
}

/// One install of a uprobe, as the hit path finds it. `repr(C)`: the
/// fields the hit compares come first, on the cache line where the
/// install record it then reads begins.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Placed {
    pub(crate) space: SpaceId,
    pub(crate) vaddr: u64,
    pub(crate) install: Install,
}

impl<F: Flavor> Uprobe<F> {
    /// Counts a missed hit or return.
    #[cold]
    pub(crate) fn count_missed(&self) {
        // Relaxed: a statistic; no memory is published through it.
        self.nmissed.fetch_add(1, Ordering::Relaxed);
    }

    /// Hits and returns missed so far.
    pub(crate) fn nmissed(&self) -> u64 {
        // Relaxed: as in `count_missed`.
        self.nmissed.load(Ordering::Relaxed)
    }

    /// The install at `vaddr` in `space`, inside `guard`.
    #[inline]
    pub(crate) fn placed_at<'g>(
        &'g self,
        guard: &'g F::Guard<'_>,
        space: SpaceId,
        vaddr: u64,
    ) -> Option<&'g Install> {
        slice(self.placed.load(guard))
            .iter()
            .find(|p| p.vaddr == vaddr && p.space == space)
            .map(|p| &p.install)
    }

    /// Publishes the install list with `add` added and `(space, vaddr)`
    /// removed. The caller holds the file stripe.
    pub(super) fn update_placed(&self, add: Option<Placed>, remove: Option<(SpaceId, u64)>) {
        let mut retired = Retirements::new();
        self.update_placed_batched(add, remove, &mut retired);
        retired.retire(self.placed.domain());
    }

    /// [`update_placed`](Self::update_placed), the old list handed to
    /// `retired` (one callback for a batch's lists).
    pub(super) fn update_placed_batched(
        &self,
        add: Option<Placed>,
        remove: Option<(SpaceId, u64)>,
        retired: &mut Retirements<Short<Placed>>,
    ) {
        let g = self.placed.domain().read();
        let now = slice(self.placed.load(&g));
        let kept = || {
            now.iter()
                .filter(|p| remove != Some((p.space, p.vaddr)))
                .copied()
        };
        // The usual lists (one install, or none) are built without a
        // temporary vector: one allocation (the cell's) per change.
        let next = match (kept().count(), add) {
            (0, None) => None,
            (0, Some(a)) => Some(Short::One([a])),
            (1, None) => Some(Short::One([kept().next().expect("counted")])),
            _ => Some(kept().chain(add).collect::<Vec<Placed>>().into()),
        };
        drop(g);
        // Empty: no list (readers see none, as for a new uprobe).
        self.placed.replace_batched(next, retired);
    }
}

/// A breakpoint installed in one space: the displaced instruction analysed
/// at its address there, and its XOL plan (none if emulated).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Install {
    pub(crate) key: UprobeKey,
    pub(crate) insn: Insn,
    pub(crate) plan: Option<XolPlan>,
}

/// What the registry knows of one address space.
pub(crate) struct SpaceState<S: AddressSpace, F: Flavor> {
    /// `std`'s `Arc`, not the shim's: the caller's handle to its space,
    /// part of the public API in loom builds too.
    pub(crate) space: std::sync::Arc<S>,
    /// File mappings sorted by start address; replaced whole under
    /// `maps_lock`.
    pub(crate) maps: RcuCell<Short<FileMapping>, F>,
    pub(super) maps_lock: Mutex<()>,
    /// Installed breakpoints by virtual address.
    pub(crate) installs: SeqTree<u64, Install, F>,
    /// Owners of the XOL slots its installs use (writer side only), so a
    /// re-install takes back a slot still waiting for its grace period
    /// (`xolshare.rs`).
    pub(super) xol_shares: XolShares,
    /// The space's return stacks (`retpool.rs`); `None` when returns
    /// cannot be tracked there.
    pub(crate) returns: Option<ReturnPool>,
}

/// The uprobe registry: uprobes keyed by file and offset, their consumers,
/// and the address spaces they are installed in. See the
/// [module docs](super).
///
/// `F` is the domain hit paths read in and handlers run in: [`Srcu`] by
/// default, so handlers may sleep.
pub struct UprobeRegistry<A: Arch, S: AddressSpace, F: Flavor = Srcu> {
    pub(crate) arch: A,
    pub(crate) domain: F,
    pub(crate) uprobes: SeqTree<UprobeKey, Uprobe<F>, F>,
    /// The hit path's one-load way to the tree's uprobes (`hitcache.rs`, a
    /// two-way set-associative table): filled and cleared by writers under
    /// the file stripe.
    pub(crate) hot: HitCache<F>,
    pub(crate) spaces: SeqTree<SpaceId, Arc<SpaceState<S, F>>, F>,
    pub(super) files: HashedLocks<FileId, Mutex<()>>,
    /// Source of consumer sequence numbers (see [`Member`]).
    next_seq: AtomicU64,
    /// Return tracking: the depth limit, the pool size and this
    /// registry's identity in the threads' binding tables.
    pub(super) returns: Returns,
    /// Where registrations no space maps read the file's code
    /// (`filetext.rs`); `None`: they are validated at the first mmap.
    pub(super) file_text: Option<Box<dyn FileText>>,
    /// A jump optimizer's hook, called before the registry touches text
    /// it may have rewritten (`jump.rs`).
    pub(super) jump_hook: Option<std::sync::Arc<dyn crate::probes::jump_sites::JumpHook>>,
}

/// For each item, whether an earlier item has the same key (the later
/// ones are refused). By sorting, not hashing: a batch of 100,000 keys
/// sorts (already in order, usually) faster than it hashes.
fn repeats(items: &[(UprobeKey, Option<u64>)]) -> Vec<bool> {
    let mut order: Vec<u32> = (0..items.len() as u32).collect();
    // Stable: among equal keys the first item comes first.
    order.sort_by_key(|&i| items[i as usize].0);
    let mut out = vec![false; items.len()];
    for w in order.windows(2) {
        if items[w[0] as usize].0 == items[w[1] as usize].0 {
            out[w[1] as usize] = true;
        }
    }
    out
}

/// The slice in an optional list (empty if absent).
pub(crate) fn slice<T, B: core::ops::Deref<Target = [T]>>(b: Option<&B>) -> &[T] {
    b.map_or(&[], |b| &**b)
}

/// An instruction read ahead for a batch: the bytes and how many of them
/// (`None`: not read). A batch's are one per target, in the order of the
/// items' targets.
type PreRead = Option<([u8; MAX_INSN_BYTES], u8)>;

/// A registration between its two halves (`stage`, `finish_stage`).
struct Staged<F: Flavor> {
    up: EntryHandle<UprobeKey, Uprobe<F>, F>,
    /// The uprobe was created by this registration.
    fresh: bool,
    /// The consumer list to publish (an existing uprobe's, plus ours;
    /// empty for a fresh uprobe, born with its list).
    new: Vec<Member>,
    /// The original bytes read from the file (nothing maps the offset).
    from_file: Option<CodeBytes>,
    /// Its prepared installs, in the batch's list.
    prepared: core::ops::Range<usize>,
}

/// A space that maps a uprobe's offset: its state, the address there, the
/// mapping.
pub(super) type Target<S, F> = (Arc<SpaceState<S, F>>, u64, FileMapping);

/// One file's mappings in every known space.
type FileMaps<S, F> = Vec<(Arc<SpaceState<S, F>>, FileMapping)>;

pub(super) fn site(key: UprobeKey) -> ProbeSite {
    ProbeSite::File {
        dev: key.file.dev,
        inode: key.file.inode,
        offset: key.offset,
    }
}

impl<A: Arch, S: AddressSpace> UprobeRegistry<A, S, Srcu> {
    /// An empty registry over `arch` with its own [`Srcu`] domain.
    pub fn new(arch: A) -> Self {
        Self::with_domain(arch, Srcu::new())
    }
}

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// An empty registry whose hit paths read in `domain`.
    pub fn with_domain(arch: A, domain: F) -> Self {
        UprobeRegistry {
            arch,
            uprobes: SeqTree::with_domain(domain.clone()),
            hot: HitCache::new(DEFAULT_HIT_CACHE_SLOTS),
            spaces: SeqTree::with_domain(domain.clone()),
            domain,
            files: HashedLocks::new(DEFAULT_FILE_STRIPES)
                .expect("DEFAULT_FILE_STRIPES is a valid stripe count"),
            next_seq: AtomicU64::new(0),
            returns: Returns::new(),
            file_text: None,
            jump_hook: None,
        }
    }

    /// Missed hits and returns of the uprobe at `key` (0 if there is none):
    /// hits on a thread already running uprobe handlers, calls not tracked
    /// for return handlers (depth limit, no trampoline, unreadable return
    /// address), returns on a thread already running uprobe handlers.
    pub fn nmissed(&self, key: UprobeKey) -> u64 {
        let g = self.domain.read();
        self.uprobes.get(&g, &key).map_or(0, |u| u.nmissed())
    }

    /// The domain handlers run in.
    pub fn domain(&self) -> &F {
        &self.domain
    }

    /// Number of uprobes (keys with at least one consumer).
    pub fn len(&self) -> usize {
        self.uprobes.len()
    }

    /// Whether no uprobe is registered.
    pub fn is_empty(&self) -> bool {
        self.uprobes.is_empty()
    }

    /// Number of consumers on `key` (0 if there is no such uprobe).
    pub fn consumers(&self, key: UprobeKey) -> usize {
        let g = self.domain.read();
        self.uprobes
            .get(&g, &key)
            .and_then(|u| u.consumers.load(&g).map(|c| c.len()))
            .unwrap_or(0)
    }

    /// The uprobe installed at `vaddr` in `space`, if any.
    pub fn installed_at(&self, space: SpaceId, vaddr: u64) -> Option<UprobeKey> {
        let g = self.domain.read();
        let st = self.spaces.get(&g, &space)?;
        st.installs.get_cloned(&vaddr).map(|i| i.key)
    }

    /// Number of breakpoints installed in `space`.
    pub fn installs_in(&self, space: SpaceId) -> usize {
        let g = self.domain.read();
        self.spaces.get(&g, &space).map_or(0, |s| s.installs.len())
    }

    /// The file mappings the registry knows for `space`, by start address.
    pub fn mappings_of(&self, space: SpaceId) -> Vec<FileMapping> {
        let g = self.domain.read();
        self.spaces
            .get(&g, &space)
            .and_then(|s| s.maps.load(&g))
            .map_or_else(Vec::new, |m| m.to_vec())
    }

    /// Registers `consumer` on the uprobe at `key`, creating the uprobe and
    /// installing its breakpoint in every known space that maps the offset
    /// (and that some consumer's filter wants).
    ///
    /// # Errors
    /// [`ProbeError::NoHandler`]; [`ProbeError::AlreadyRegistered`] for a
    /// consumer already on `key`; [`ProbeError::OffsetOutsideMapping`] when
    /// the file is mapped but no mapping covers `key.offset`;
    /// [`ProbeError::NotAtFunctionEntry`] for a consumer with a return
    /// handler (this form names no function: use
    /// [`register_in_function`](Self::register_in_function)); and what
    /// installing into a space reports (unsupported instruction, someone
    /// else's patch, a text failure). When no known space maps the offset
    /// and the registry reads files ([`with_file_text`](Self::with_file_text)),
    /// the file's code is checked instead: [`ProbeError::OffsetOutsideMapping`]
    /// (the range being the file's code) and
    /// [`ProbeError::UnsupportedInstruction`] (its `addr` a file offset);
    /// without a file source such an offset is checked at the first
    /// [`on_mmap`](Self::on_mmap) that maps it. On error nothing changed: no
    /// breakpoint stays written, the registry is as before.
    pub fn register(&self, key: UprobeKey, consumer: &Consumer) -> Result<(), ProbeError> {
        self.register_inner(key, None, consumer)
    }

    /// As [`register`](Self::register), and checks that `key.offset` is an
    /// instruction boundary by decoding from `func_offset` (the enclosing
    /// function's first instruction) in the first mapping validated against.
    ///
    /// A consumer with a return handler must be registered this way, with
    /// `func_offset == key.offset`: the uprobe is then at the function's
    /// entry, where the return address is where the arch backend hijacks it.
    ///
    /// # Errors
    /// As `register`, plus [`ProbeError::NotOnInstructionBoundary`]
    /// (checked in the file's code, with file offsets as addresses, when
    /// nothing maps the offset and the registry reads files). For a
    /// consumer with a return handler: [`ProbeError::NotAtFunctionEntry`]
    /// (`addr` and `func_start` are *file offsets*) when `func_offset` is
    /// not `key.offset` or an earlier registration placed `key.offset`
    /// inside another function, and [`ProbeError::NoReturnTrampoline`] when
    /// a space the consumer wants that maps the offset has no
    /// [`return_trampoline`](AddressSpace::return_trampoline).
    pub fn register_in_function(
        &self,
        key: UprobeKey,
        func_offset: u64,
        consumer: &Consumer,
    ) -> Result<(), ProbeError> {
        self.register_inner(key, Some(func_offset), consumer)
    }

    /// Registers `consumer` on every `(key, func_offset)` of `items` (as
    /// [`register_in_function`](Self::register_in_function) with
    /// `Some(func_offset)`, [`register`](Self::register) with `None`), in one
    /// batch: the files' stripes are taken once, each uprobe is checked and
    /// its records published, and then the breakpoints of the whole batch
    /// are written together (one text batch per space: one protection change
    /// per run of pages, one core sync), which is what makes attaching to
    /// every function of a large library cheap. Returns one result per
    /// item, in order.
    ///
    /// # Errors
    /// Per item, as `register_in_function` / `register` (a key named twice
    /// in `items` is [`ProbeError::AlreadyRegistered`] the second time); an
    /// item that fails changes nothing, the others are registered.
    pub fn register_many(
        &self,
        items: &[(UprobeKey, Option<u64>)],
        consumer: &Consumer,
    ) -> Vec<Result<(), ProbeError>> {
        if let Err(e) = consumer.check() {
            return vec![Err(e); items.len()];
        }
        let _files = self.lock_files(items.iter().map(|(k, _)| k));
        // Where each item would go (its file's mappings cannot change while
        // the stripes are held), looked up once for the read-ahead and the
        // staging.
        let mut maps: std::collections::HashMap<FileId, FileMaps<S, F>> =
            std::collections::HashMap::new();
        let mut targets: Vec<_> = items
            .iter()
            .map(|(k, _)| {
                let of_file = maps
                    .entry(k.file)
                    .or_insert_with(|| self.file_mappings(k.file));
                Self::targets_in(of_file, *k)
            })
            .collect();
        // The optimizer writes nothing from here until the breakpoints are
        // written: what is read below stays what is there.
        let mut hold = self.jump_hold();
        let pre = self.pre_read(&targets);
        let repeated = repeats(items);
        // Every item's prepared installs, back to back (one allocation for
        // the batch); each staged item knows its range.
        let mut prepared = Vec::with_capacity(items.len());
        let mut next_pre = 0;
        let staged: Vec<Result<Staged<F>, ProbeError>> = items
            .iter()
            .zip(targets.iter_mut())
            .zip(repeated)
            .map(|((&(key, func_offset), at), again)| {
                let at = std::mem::replace(at, Ok(Vec::new()));
                let n = at.as_ref().map_or(0, Vec::len);
                let pre = &pre[next_pre..next_pre + n];
                next_pre += n;
                if again {
                    return Err(ProbeError::AlreadyRegistered { site: site(key) });
                }
                self.stage(
                    key,
                    func_offset,
                    consumer,
                    at,
                    pre,
                    &mut prepared,
                    &mut hold,
                )
            })
            .collect();
        let written = self.write_prepared(&prepared);
        drop(hold);
        staged
            .into_iter()
            .map(|s| {
                let s = s?;
                let r = s.prepared.clone();
                self.finish_stage(s, &prepared[r.clone()], &written[r])
            })
            .collect()
    }

    /// Locks the stripes of every file in `keys`, in ascending order (the
    /// array's deadlock-free order for several stripes).
    pub(super) fn lock_files<'k>(
        &self,
        keys: impl Iterator<Item = &'k UprobeKey>,
    ) -> Vec<crate::hashlock::StripeGuard<'_, Mutex<()>, (), crate::hashlock::Exclusive>> {
        let mut stripes: Vec<usize> = keys.map(|k| self.files.stripe_of(&k.file)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes.iter().map(|&s| self.files.lock_stripe(s)).collect()
    }

    fn register_inner(
        &self,
        key: UprobeKey,
        func_offset: Option<u64>,
        consumer: &Consumer,
    ) -> Result<(), ProbeError> {
        consumer.check()?;
        let _file = self.files.lock(&key.file);
        let mut prepared = Vec::new();
        let at = self.mapped_targets(key);
        let mut hold = self.jump_hold();
        let staged = self.stage(
            key,
            func_offset,
            consumer,
            at,
            &[],
            &mut prepared,
            &mut hold,
        )?;
        let written = self.write_prepared(&prepared);
        drop(hold);
        self.finish_stage(staged, &prepared, &written)
    }

    /// The instructions a batch of registrations will install at, read in
    /// one batch per space ([`TextMemory::read_many`]: a few system calls
    /// for thousands of instructions, where each install would make one):
    /// one entry per target, in order (an item's targets are next to each
    /// other). What cannot be read is left out (the install reads it
    /// again, for its error). The caller holds the files' stripes.
    fn pre_read(&self, targets: &[Result<Vec<Target<S, F>>, ProbeError>]) -> Vec<PreRead> {
        let all: Vec<&Target<S, F>> = targets.iter().flatten().flatten().collect();
        // Read in address order, space by space (a batch's targets usually
        // come sorted already); a target named twice is read twice.
        let mut order: Vec<u32> = (0..all.len() as u32).collect();
        order.sort_unstable_by_key(|&i| (all[i as usize].0.space.id(), all[i as usize].1));
        let mut out: Vec<PreRead> = vec![None; all.len()];
        let space_of = |i: &u32| all[*i as usize].0.space.id();
        for group in order.chunk_by(|a, b| space_of(a) == space_of(b)) {
            let mut bytes = vec![[0u8; MAX_INSN_BYTES]; group.len()];
            let results = {
                let mut reads: Vec<(u64, &mut [u8])> = bytes
                    .iter_mut()
                    .zip(group)
                    .map(|(b, &i)| {
                        let (_, v, map) = all[i as usize];
                        (*v, &mut b[..self.insn_window(map, *v)])
                    })
                    .collect();
                all[group[0] as usize].0.space.text().read_many(&mut reads)
            };
            for ((b, &i), r) in bytes.iter().zip(group).zip(results) {
                if r.is_ok() {
                    let (_, v, map) = all[i as usize];
                    out[i as usize] = Some((*b, self.insn_window(map, *v) as u8));
                }
            }
        }
        out
    }

    /// The first half of a registration (the caller holds the file's
    /// stripe): the checks, the uprobe (created with its first consumer if
    /// new), and the installs prepared in every space that maps the offset
    /// (`targets`: [`mapped_targets`](Self::mapped_targets) of `key`) and
    /// that the consumer brings in (with the bytes `pre` read for them, if
    /// it did). `hold`: the caller's hold of the jump optimizer
    /// ([`jump_hold`](Self::jump_hold)), under which optimized sites go
    /// back to the trap path before an install reads or writes there. On
    /// error nothing changed (but for such sites put back, which the
    /// optimizer's next pass optimizes again).
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        key: UprobeKey,
        func_offset: Option<u64>,
        consumer: &Consumer,
        targets: Result<Vec<Target<S, F>>, ProbeError>,
        pre: &[PreRead],
        prepared: &mut Vec<Prepared<S, F>>,
        hold: &mut Option<JumpHold<'_>>,
    ) -> Result<Staged<F>, ProbeError> {
        // (A batch registers new keys, usually: one walk for a miss.)
        let existing = self.uprobes.get_handle_expecting_miss(&key);
        if let Some(up) = &existing {
            let g = self.domain.read();
            let list = up.consumers.load(&g).map_or(&[][..], |l| &l[..]);
            if list.iter().any(|c| c.same(consumer)) {
                return Err(ProbeError::AlreadyRegistered { site: site(key) });
            }
        }
        // Where the uprobe would go (`targets`, looked up by the caller
        // under the stripe), before anything changes.
        let targets = targets?;
        // Nothing maps the offset: validate from the file if we can.
        let orig_known = existing
            .as_ref()
            .is_some_and(|u| u.orig.lock().unwrap_or_else(|p| p.into_inner()).is_some());
        let from_file = if targets.is_empty() && !orig_known {
            self.validate_from_file(key, func_offset)?
        } else {
            None
        };
        if consumer.has_ret_handler() {
            let known = existing.as_ref().and_then(|u| u.func_offset);
            self.check_return_site(key, func_offset, known, &targets, consumer)?;
        }
        if let (Some(up), true) = (&existing, consumer.jump_opt_out()) {
            // Its handler never runs from a detour: the uprobe's optimized
            // installs go back to the trap path first, and a detour hit
            // that still finds it redirects to the trap (`jump.rs`).
            let at: Vec<u64> = {
                let g = self.domain.read();
                slice(up.placed.load(&g)).iter().map(|p| p.vaddr).collect()
            };
            for v in at {
                if let Some(h) = hold {
                    h.to_trap_path(v..v + 1);
                }
            }
        }
        // Relaxed: the number's uniqueness and order come from the
        // counter's modification order and the file stripe we hold; it is
        // published to readers with the consumer list (a release store).
        let member = Member {
            consumer: consumer.clone(),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        };
        let (up, fresh) = match existing {
            Some(up) => (up, false),
            None => {
                // Born with its first consumer: a uprobe in the tree never
                // has an empty list.
                let u = Uprobe {
                    key,
                    consumers: RcuCell::new_in(Short::One([member.clone()]), self.domain.clone()),
                    orig: Mutex::new(from_file),
                    func_offset,
                    nmissed: AtomicU64::new(0),
                    // Empty until its first install: no allocation, and
                    // nothing to retire when that install publishes the list.
                    placed: RcuCell::empty_in(self.domain.clone()),
                    detour: AtomicU64::new(0),
                    detour_at: AtomicU64::new(0),
                };
                // Absent just above, and no other writer inserts a key
                // of this file (we hold its stripe).
                (self.uprobes.insert_handle_with(key, || u), true)
            }
        };
        let old: Vec<Member> = if fresh {
            Vec::new()
        } else {
            let g = self.domain.read();
            slice(up.consumers.load(&g)).to_vec()
        };
        let first = prepared.len();
        for (i, (st, vaddr, map)) in targets.iter().enumerate() {
            let id = st.space.id();
            let wanted_before = old.iter().any(|c| c.wants(id));
            if wanted_before || !consumer.wants(id) {
                continue;
            }
            let changed = self.jump_before_install(hold, up.value(), map, *vaddr);
            // Bytes read ahead are stale where an optimized site went back.
            let read = pre.get(i).copied().flatten().filter(|_| !changed);
            let read = read.as_ref().map(|(b, n)| &b[..*n as usize]);
            match self.prepare(up.value(), st, key, *vaddr, map, read) {
                Ok(Some(p)) => prepared.push(p),
                Ok(None) => {}
                Err(e) => {
                    for p in prepared.drain(first..).rev() {
                        self.unprepare(up.value(), &p, false);
                    }
                    if fresh {
                        self.remove_uprobe(up.value());
                    }
                    return Err(e);
                }
            }
        }
        // (A fresh uprobe was born with its list.)
        let new = if fresh {
            Vec::new()
        } else {
            let mut new = old;
            new.push(member);
            new
        };
        Ok(Staged {
            up,
            fresh,
            new,
            from_file,
            prepared: first..prepared.len(),
        })
    }

    /// The second half of a registration, once its breakpoints were
    /// written (`prepared`, its installs, and `written`, one result each): publishes the
    /// consumer, or undoes everything if a write failed.
    fn finish_stage(
        &self,
        s: Staged<F>,
        prepared: &[Prepared<S, F>],
        written: &[Result<(), ProbeError>],
    ) -> Result<(), ProbeError> {
        let up = s.up.value();
        if let Some(e) = written.iter().find_map(|r| r.as_ref().err()) {
            for (p, r) in prepared.iter().zip(written).rev() {
                self.unprepare(up, p, p.write && r.is_ok());
            }
            if s.fresh {
                self.remove_uprobe(up);
            }
            return Err(e.clone());
        }
        if s.fresh {
            self.hot.publish(&up.key, up);
        } else {
            if s.from_file.is_some() {
                // No install ran (nothing maps the offset): the bytes the
                // file holds become the uprobe's known original.
                *up.orig.lock().unwrap_or_else(|p| p.into_inner()) = s.from_file;
            }
            up.consumers.replace(s.new.into());
        }
        Ok(())
    }

    /// Every known space's mapping that covers `key.offset`, with the
    /// address there. Refuses an offset the file's mappings do not cover.
    fn mapped_targets(&self, key: UprobeKey) -> Result<Vec<Target<S, F>>, ProbeError>
    where
        S: AddressSpace,
    {
        Self::targets_in(&self.file_mappings(key.file), key)
    }

    /// Every known space's mappings of `file` (one walk over every space's
    /// mappings: a batch asks once per file, not once per target).
    fn file_mappings(&self, file: FileId) -> FileMaps<S, F> {
        let g = self.domain.read();
        let mut out = Vec::new();
        for (_, st) in self.spaces.iter(&g) {
            for m in slice(st.maps.load(&g)).iter().filter(|m| m.file == file) {
                out.push((Arc::clone(st), m.clone()));
            }
        }
        out
    }

    /// [`mapped_targets`](Self::mapped_targets) of `key` among `maps`, the
    /// mappings of its file.
    fn targets_in(maps: &FileMaps<S, F>, key: UprobeKey) -> Result<Vec<Target<S, F>>, ProbeError> {
        let out: Vec<Target<S, F>> = maps
            .iter()
            .filter_map(|(st, m)| {
                m.vaddr_of(key.offset)
                    .map(|v| (Arc::clone(st), v, m.clone()))
            })
            .collect();
        match (out.is_empty(), maps.first().map(|(_, m)| m)) {
            (true, Some(m)) => {
                let r = m.file_range();
                Err(ProbeError::OffsetOutsideMapping {
                    offset: key.offset,
                    start: r.start,
                    end: r.end,
                })
            }
            _ => Ok(out),
        }
    }
}
