//! Installing and removing one uprobe's breakpoint in one address space,
//! alone or in batches.
//!
//! Invariant: the install record is published (in the space's install tree and
//! the uprobe's install list) *before* the breakpoint is written, so a thread
//! that traps on it always finds it; on removal, the bytes are restored
//! *before* the record is dropped, and the install's owner of its XOL slot is
//! dropped only after a grace period (shared on re-install, `xolshare.rs`).
//! Callers hold the uprobe's file stripe (`registry.rs`).
//!
//! An install is *prepared* (checked, analysed, slot planned, record
//! published) and then *written*: alone, or with the other installs of a
//! batch (a multi-attach, the pending uprobes of a `dlopen`) in one
//! [`TextMemory::write_many`] per space, so a batch pays one protection
//! change per run of pages and one core sync instead of one each. A
//! prepared install whose write fails is unpublished again (`unprepare`).
//! Removals batch the same way (`Removals`).
//!
//! Install and uninstall, in full: [`crate::docs::algorithms::uprobes`].

use std::ops::Range;

use super::registry::{Install, Placed, SpaceState, Uprobe, UprobeRegistry};
use super::space::{AddressSpace, FileMapping, UprobeKey};
use super::xolshare::{SlotKey, XolShares};
use crate::probes::arch::{Arch, Insn, InsnClass, XolPlan, MAX_INSN_BYTES};
use crate::probes::error::CodeBytes;
use crate::probes::jump_sites::JumpHold;
use crate::probes::text::{TextMemory, TextWrite};
use crate::probes::ProbeError;
use crate::rcu::{Flavor, Retirements};
use crate::seqtree::EntryHandle;
use crate::sync::Arc;

/// An install whose record is published and whose breakpoint is not
/// written yet.
pub(super) struct Prepared<S: AddressSpace, F: Flavor> {
    pub(super) st: Arc<SpaceState<S, F>>,
    pub(super) vaddr: u64,
    /// The instruction's original bytes (the breakpoint replaces the first
    /// ones).
    orig: CodeBytes,
    /// A byte is to be written (`false`: our breakpoint is there already).
    pub(super) write: bool,
    /// This install taught the uprobe its original bytes (forgotten again
    /// if it is unprepared).
    learned: bool,
}

/// A uprobe, as a writer holds it.
pub(super) type UprobeHandle<F> = EntryHandle<UprobeKey, Uprobe<F>, F>;

/// An install queued for removal: small (a batch queues one per uprobe,
/// 100,000 of them for a large library, and each byte of it is moved when
/// the batch is sorted).
struct Queued<F: Flavor> {
    /// Index of its space in [`Removals::spaces`].
    space: usize,
    vaddr: u64,
    /// The uprobe, when it stays (its install list loses this install);
    /// none when it leaves (the list goes with it, see `finish_removals`).
    up: Option<UprobeHandle<F>>,
    /// Its slot's key in the space's `XolShares`, read from the uprobe's
    /// install list when queued.
    slot: Option<SlotKey>,
    /// The bytes to put back, read when queued (while the uprobe is in
    /// cache; stable: the caller holds the file's stripe); none for an
    /// unmapping.
    orig: Option<CodeBytes>,
}

/// Removals of a batch: every install's bytes are restored first (one
/// `write_many` per space), then the records dropped (in bulk), then the
/// uprobes left without consumers removed (in bulk).
pub(super) struct Removals<S: AddressSpace, F: Flavor> {
    /// The spaces of the queued installs, each once.
    spaces: Vec<Arc<SpaceState<S, F>>>,
    /// In the order queued; an install queued twice (two consumers of one
    /// uprobe removed in one batch) is merged when the batch finishes.
    installs: Vec<Queued<F>>,
    /// The uprobes left without consumers. Keys, not handles: the caller
    /// holds their files' stripes, so nobody else unlinks them, and the
    /// tree's own reference keeps each alive until `finish_removals`
    /// unlinks it (a handle each would be two atomic updates and a cache
    /// miss more per uprobe).
    emptied: Vec<UprobeKey>,
    /// The text is gone (an unmapping): nothing to restore.
    unmapped: bool,
}

impl<S: AddressSpace, F: Flavor> Removals<S, F> {
    /// Room for `n` installs and `n` uprobes queued without growing (a
    /// batch of `n` removals; growing copies every queued entry).
    pub(super) fn with_capacity(n: usize) -> Self {
        Removals {
            spaces: Vec::new(),
            installs: Vec::with_capacity(n),
            emptied: Vec::with_capacity(n),
            unmapped: false,
        }
    }

    /// Removals of installs whose text was unmapped: their records go, no
    /// byte is written.
    pub(super) fn unmapped(n: usize) -> Self {
        Removals {
            unmapped: true,
            ..Removals::with_capacity(n)
        }
    }

    /// Queues the install of `up` at `vaddr` in `st`, whose slot plan is
    /// `plan`. `stays`: the uprobe's handle when it stays (its install list
    /// loses this install); `None` when it is queued with
    /// [`push_emptied`](Self::push_emptied) too.
    pub(super) fn push(
        &mut self,
        st: &Arc<SpaceState<S, F>>,
        vaddr: u64,
        plan: Option<&XolPlan>,
        up: &Uprobe<F>,
        stays: Option<&UprobeHandle<F>>,
    ) {
        let orig = match self.unmapped {
            true => None,
            false => *up.orig.lock().unwrap_or_else(|e| e.into_inner()),
        };
        // Usually one space, or the last one queued.
        let space = match self.spaces.iter().rposition(|s| Arc::ptr_eq(s, st)) {
            Some(i) => i,
            None => {
                self.spaces.push(Arc::clone(st));
                self.spaces.len() - 1
            }
        };
        self.installs.push(Queued {
            space,
            vaddr,
            up: stays.cloned(),
            slot: plan.map(XolShares::key),
            orig,
        });
    }

    /// Queues the uprobe at `key` itself (its last consumer left).
    pub(super) fn push_emptied(&mut self, key: UprobeKey) {
        self.emptied.push(key);
    }

    /// Sorts the installs by space and address and merges the duplicates
    /// (leaving if any of them was: then no install list is updated).
    fn merge(&mut self) {
        self.installs.sort_unstable_by_key(|q| (q.space, q.vaddr));
        self.installs.dedup_by(|later, kept| {
            let same = later.space == kept.space && later.vaddr == kept.vaddr;
            if same && later.up.is_none() {
                kept.up = None;
            }
            same
        });
    }
}

/// Removes `keys` (distinct) from `tree`, calling `gone` on each entry
/// just before it is unlinked: one by one when they are few beside the
/// tree's size, else in one pass (`retain`: one write section, one
/// reclamation batch; it visits the entries in key order, so the sorted
/// keys are matched by a cursor, and `gone` finds each entry in cache).
fn remove_all<K: Ord + Copy + Send + 'static, V: Send + Sync + 'static, F: Flavor>(
    tree: &crate::seqtree::SeqTree<K, V, F>,
    keys: &mut [K],
    mut gone: impl FnMut(&K, &V),
) {
    if keys.len() * 8 < tree.len() {
        for k in keys.iter() {
            {
                let g = tree.domain().read();
                if let Some(v) = tree.get(&g, k) {
                    gone(k, v);
                }
            }
            tree.remove(k);
        }
    } else {
        keys.sort_unstable();
        let mut next = keys.iter().peekable();
        tree.retain(|k, v| {
            while next.next_if(|&g| g < k).is_some() {}
            let goes = next.next_if(|&g| g == k).is_some();
            if goes {
                gone(k, v);
            }
            !goes
        });
    }
}

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// The first half of an install of `key`'s breakpoint at `vaddr` in
    /// `st`: checks the text there against what the uprobe knows, analyses
    /// the instruction, plans its slot and publishes the record. `None`:
    /// already installed there. Our breakpoint already in the text counts as
    /// installed (nothing to write): the space inherited the patched text,
    /// e.g. a forked copy or a re-mapping of text still holding it, and the
    /// uprobe must still be found when it traps.
    pub(super) fn prepare(
        &self,
        up: &Uprobe<F>,
        st: &Arc<SpaceState<S, F>>,
        key: UprobeKey,
        vaddr: u64,
        map: &FileMapping,
        read: Option<&[u8]>,
    ) -> Result<Option<Prepared<S, F>>, ProbeError> {
        if st.installs.contains_key_expecting_miss(&vaddr) {
            return Ok(None);
        }
        let text = st.space.text();
        let bp = self.arch.breakpoint();
        let n = self.insn_window(map, vaddr);
        let mut buf = [0u8; MAX_INSN_BYTES];
        match read.filter(|r| r.len() == n) {
            // Read already, with the batch's other instructions.
            Some(r) => buf[..n].copy_from_slice(r),
            None => text.read(vaddr, &mut buf[..n])?,
        }
        let mut known = up.orig.lock().unwrap_or_else(|p| p.into_inner());
        let ours_there = n >= bp.len() && &buf[..bp.len()] == bp;
        if ours_there {
            // Another registry's breakpoint is never taken for ours.
            if let Some(holder) = text.holder_at(vaddr) {
                return Err(ProbeError::HeldBy {
                    addr: vaddr,
                    holder,
                });
            }
        }
        let code: [u8; MAX_INSN_BYTES] = match &*known {
            Some(o) => {
                let o = o.as_slice();
                if !ours_there && buf[..o.len().min(n)] != o[..o.len().min(n)] {
                    return Err(ProbeError::AlreadyPatched {
                        addr: vaddr,
                        expected: CodeBytes::new(&o[..o.len().min(n)]),
                        found: CodeBytes::new(&buf[..n]),
                    });
                }
                let mut c = [0u8; MAX_INSN_BYTES];
                c[..o.len()].copy_from_slice(o);
                c
            }
            None if ours_there => {
                // First sight of this offset and a breakpoint already there:
                // nobody we know put it; the original is unknowable.
                return Err(ProbeError::AlreadyPatched {
                    addr: vaddr,
                    expected: CodeBytes::new(&[]),
                    found: CodeBytes::new(&buf[..n]),
                });
            }
            None => buf,
        };
        // (A function's first instruction is a boundary by definition.)
        if let (None, Some(f)) = (&*known, up.func_offset.filter(|&f| f != key.offset)) {
            self.check_boundary(st, key, map, f, vaddr)?;
        }
        let insn = self.arch.analyze(vaddr, &code[..n])?;
        let plan = self.plan(st, &insn)?;
        let rec = Install { key, insn, plan };
        // Publish the record; the breakpoint is written after it, so a
        // thread that traps on it always finds the record.
        st.installs.insert(vaddr, rec);
        up.update_placed(
            Some(Placed {
                space: st.space.id(),
                vaddr,
                install: rec,
            }),
            None,
        );
        let orig = CodeBytes::new(&code[..insn.len as usize]);
        // Known from here on, so a second install of the batch (another
        // space) is checked against it; forgotten again if unprepared.
        let learned = known.is_none();
        if learned {
            *known = Some(orig);
        }
        Ok(Some(Prepared {
            st: Arc::clone(st),
            vaddr,
            orig,
            write: !ours_there,
            learned,
        }))
    }

    /// Before a registration prepares an install of `up` at `vaddr`: an
    /// optimized site whose displaced bytes hold `vaddr` (or, for the
    /// boundary check, are in the function before it) goes back to the
    /// trap path before a breakpoint is read or written there, under the
    /// registration's `hold` of the optimizer (taken by
    /// [`jump_hold`](Self::jump_hold) before it read anything, dropped once
    /// its breakpoints are written): no pass writes in between, so a pass
    /// that collected its candidates before cannot put its `jmp`'s
    /// displacement where the install reads the original instruction.
    /// Returns whether text there may have changed (bytes read before are
    /// stale). Not before an `on_mmap` install: nothing was optimized in
    /// text just mapped, and the loader's thread calls it inside a read
    /// section, where the hook's wait for a pass could deadlock (`jump.rs`).
    pub(super) fn jump_before_install(
        &self,
        hold: &mut Option<JumpHold<'_>>,
        up: &Uprobe<F>,
        map: &FileMapping,
        vaddr: u64,
    ) -> bool {
        let Some(hold) = hold else {
            return false;
        };
        let end = (vaddr + self.arch.max_insn_len() as u64).min(map.vaddr.end);
        let from = up
            .func_offset
            .and_then(|f| map.vaddr_of(f))
            .filter(|&f| f <= vaddr)
            .unwrap_or(vaddr);
        hold.to_trap_path(from..end)
    }

    /// How many bytes at `vaddr` an install reads (an instruction's longest,
    /// within the mapping).
    pub(super) fn insn_window(&self, map: &FileMapping, vaddr: u64) -> usize {
        let avail = (map.vaddr.end - vaddr) as usize;
        self.arch.max_insn_len().min(avail).min(MAX_INSN_BYTES)
    }

    /// Writes the breakpoints of `prepared` (one `write_many` per space),
    /// returning each one's result (`Ok` for those with nothing to write).
    /// The writes are visible to instruction fetch when it returns.
    pub(super) fn write_prepared(
        &self,
        prepared: &[Prepared<S, F>],
    ) -> Vec<Result<(), ProbeError>> {
        let bp = self.arch.breakpoint();
        let mut out: Vec<Result<(), ProbeError>> = vec![Ok(()); prepared.len()];
        let mut idx: Vec<usize> = (0..prepared.len()).filter(|&i| prepared[i].write).collect();
        idx.sort_by_key(|&i| prepared[i].st.space.id());
        for group in idx.chunk_by(|&a, &b| prepared[a].st.space.id() == prepared[b].st.space.id()) {
            let writes: Vec<TextWrite<'_>> = group
                .iter()
                .map(|&i| TextWrite {
                    addr: prepared[i].vaddr,
                    old: &prepared[i].orig.as_slice()[..bp.len()],
                    new: bp,
                })
                .collect();
            let text = prepared[group[0]].st.space.text();
            for (&i, r) in group.iter().zip(text.write_many(&writes)) {
                out[i] = r;
            }
        }
        out
    }

    /// Undoes a prepared install: its breakpoint taken out again if
    /// `written`, its record dropped, its slot given back after a grace
    /// period, the original bytes it taught the uprobe forgotten.
    pub(super) fn unprepare(&self, up: &Uprobe<F>, p: &Prepared<S, F>, written: bool) {
        if written {
            // An optimizer may have rewritten the site since it was written;
            // none writes there again before the bytes are back.
            let site = p.vaddr..p.vaddr + 1;
            let _hold = self.jump_to_trap_held(std::slice::from_ref(&site));
            let bp = self.arch.breakpoint();
            let text = p.st.space.text();
            if text
                .write(p.vaddr, bp, &p.orig.as_slice()[..bp.len()])
                .is_ok()
            {
                let _ = text.sync_icache(p.vaddr, bp.len());
            }
        }
        self.drop_record(up, &p.st, p.vaddr);
        if p.learned {
            *up.orig.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Decodes from the function start to `vaddr` in `st`'s text.
    #[cold]
    fn check_boundary(
        &self,
        st: &SpaceState<S, F>,
        key: UprobeKey,
        map: &FileMapping,
        func_offset: u64,
        vaddr: u64,
    ) -> Result<(), ProbeError> {
        let Some(func) = map.vaddr_of(func_offset).filter(|&f| f <= vaddr) else {
            return Err(ProbeError::OffsetOutsideMapping {
                offset: func_offset,
                start: map.file_range().start,
                end: map.file_range().end,
            });
        };
        let end = (vaddr + self.arch.max_insn_len() as u64).min(map.vaddr.end);
        let mut bytes = vec![0u8; (end - func) as usize];
        st.space.text().read(func, &mut bytes)?;
        // Our breakpoints on the way decode as the bytes they replaced.
        let g = self.domain.read();
        let lo = UprobeKey {
            file: key.file,
            offset: func_offset,
        };
        for (k, u) in self.uprobes.range(&g, lo..key) {
            let o = u.orig.lock().unwrap_or_else(|p| p.into_inner());
            if let (Some(o), Some(at)) = (&*o, map.vaddr_of(k.offset)) {
                let i = (at - func) as usize;
                let o = o.as_slice();
                let m = o.len().min(bytes.len() - i);
                bytes[i..i + m].copy_from_slice(&o[..m]);
            }
        }
        self.arch.check_boundary(func, &bytes, vaddr)
    }

    /// An XOL slot and plan for `insn` unless it is emulated: the slot of
    /// an earlier install at this address that is still waiting for its
    /// grace period when the plan for it is byte for byte what it holds
    /// (`xolshare.rs`), else a fresh one.
    fn plan(&self, st: &SpaceState<S, F>, insn: &Insn) -> Result<Option<XolPlan>, ProbeError> {
        if matches!(insn.class, InsnClass::Emulated(_)) {
            return Ok(None);
        }
        if let Some(p) = st
            .xol_shares
            .share(insn.addr, |slot| self.arch.plan_xol(insn, slot))
        {
            return Ok(Some(p));
        }
        let xol = st.space.xol();
        let slot = match xol.alloc(insn.addr) {
            Ok(s) => s,
            Err(ProbeError::XolExhausted { .. }) => {
                // Slots of removed installs come back through domain
                // callbacks after a grace period: wait for those queued.
                self.reclaim_slots();
                xol.alloc(insn.addr)?
            }
            Err(e) => return Err(e),
        };
        match self
            .arch
            .plan_xol(insn, slot)
            .and_then(|p| xol.fill(slot, p.slot_bytes()).map(|()| p))
        {
            Ok(p) => {
                st.xol_shares.adopt(&p);
                Ok(Some(p))
            }
            Err(e) => {
                xol.free(slot);
                Err(e)
            }
        }
    }

    /// Runs the queued slot frees (waits for a grace period).
    #[cold]
    fn reclaim_slots(&self) {
        self.domain.barrier();
    }

    /// Gives up the install's owner of its plan's slot after a grace
    /// period: a hit that found the record may still be about to step
    /// through it. The slot is freed when no other install shares it.
    fn free_slot_later(&self, st: &SpaceState<S, F>, plan: Option<XolPlan>) {
        if let Some(p) = plan {
            st.xol_shares.release_later(&self.domain, &st.space, &p);
        }
    }

    /// Drops the record at `vaddr` without writing (the memory is gone,
    /// or the bytes were restored already).
    pub(super) fn drop_record(&self, up: &Uprobe<F>, st: &SpaceState<S, F>, vaddr: u64) {
        let Some(rec) = st.installs.get_cloned(&vaddr) else {
            return;
        };
        up.update_placed(None, Some((st.space.id(), vaddr)));
        st.installs.remove(&vaddr);
        self.free_slot_later(st, rec.plan);
    }

    /// Finishes a batch of removals: restores the original bytes of every
    /// queued install (one `write_many` per space; a breakpoint someone
    /// else already replaced is left alone), then drops the records, then
    /// removes the uprobes left without consumers (in bulk for a large
    /// batch; their XOL slots go back after one grace period per space).
    /// The caller holds the stripes of every file concerned.
    pub(super) fn finish_removals(&self, mut r: Removals<S, F>) {
        r.merge();
        // Optimized sites back on the trap path before their breakpoints
        // go, and no optimizer write until they are gone (a pass that
        // collected these sites before could otherwise write its `jmp`
        // between the two). Not for text that is gone (an unmapping, run by
        // the loader's thread inside a read section: the optimizer's next
        // pass forgets those sites, writing nothing).
        let hold = if self.jump_hook.is_some() && !r.unmapped {
            let ranges: Vec<Range<u64>> = r.installs.iter().map(|q| q.vaddr..q.vaddr + 1).collect();
            self.jump_to_trap_held(&ranges)
        } else {
            None
        };
        let bp = self.arch.breakpoint();
        // The installs of one space are next to each other (merged above).
        let same_space = |a: &Queued<F>, b: &Queued<F>| a.space == b.space;
        for group in r.installs.chunk_by(same_space).filter(|_| !r.unmapped) {
            let writes: Vec<TextWrite<'_>> = group
                .iter()
                .filter_map(|q| {
                    q.orig.as_ref().map(|o| TextWrite {
                        addr: q.vaddr,
                        old: bp,
                        new: &o.as_slice()[..bp.len()],
                    })
                })
                .collect();
            let _ = r.spaces[group[0].space].space.text().write_many(&writes);
        }
        drop(hold);
        // The records. A uprobe that leaves the tree below keeps its install
        // list as it is: a thread that trapped before its bytes came back
        // still finds the install (its slot stays for a grace period), and
        // the list goes with the uprobe.
        let mut retired = Retirements::new();
        for q in &r.installs {
            if let Some(up) = &q.up {
                let space = r.spaces[q.space].space.id();
                up.update_placed_batched(None, Some((space, q.vaddr)), &mut retired);
            }
        }
        retired.retire(&self.domain);
        for group in r.installs.chunk_by(same_space) {
            let st = &r.spaces[group[0].space];
            // Sorted and distinct (merged above).
            let mut vaddrs: Vec<u64> = group.iter().map(|q| q.vaddr).collect();
            let slots: Vec<SlotKey> = group.iter().filter_map(|q| q.slot).collect();
            remove_all(&st.installs, &mut vaddrs, |_, _| {});
            st.xol_shares
                .release_many_later(&self.domain, &st.space, slots);
        }
        // The uprobes, each out of the hit cache just before it is
        // unlinked (see `hitcache.rs`).
        let mut keys = std::mem::take(&mut r.emptied);
        drop(r);
        remove_all(&self.uprobes, &mut keys, |k, up| self.hot.retract(k, up));
    }
}
