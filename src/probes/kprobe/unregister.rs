//! Unregistration: one probe with its own grace period, many with one, and
//! the two-phase `unregister_nosync` + `commit`.
//!
//! # Two halves
//!
//! Removing a probe has a *top* half, under the registry mutex, that makes
//! it unreachable for new hits: remove the breakpoint if it was the last
//! enabled probe on its address, then unlink the site (last probe) or
//! clear (or mark) its slot in the member list, in O(1) (`table.rs`,
//! "Member lists"). What readers might still hold is *retired*. The bottom
//! half first, under the mutex, visits each site that lost members since
//! the last commit: it bumps the site's post epoch if a removed member had
//! a post handler, and compacts the site once removed slots are half its
//! list (one copy per site per commit, paid for by the removals, retired
//! with the batch). The rest runs after a grace period: it has the XOL
//! allocator wait out threads still in a retired site's boosted slot
//! (`XolAllocator::quiesce`), waits for the steps of the old post epochs,
//! waits for the single-steps in flight on each retired member list, frees
//! the lists and sites (the last list of a site gives its XOL slot back to
//! the allocator), and only then gives the probes back (they may be
//! registered again).
//!
//! `unregister_nosync` runs the top half only and parks the retired objects
//! on the registry's pending list; `commit` runs the bottom half for the
//! whole pending list (every thread's) with one grace period.
//! `unregister` and `unregister_many` are the top half for their probes
//! followed by a `commit`.
//!
//! # Why bottom halves are serialized
//!
//! A probe's handlers can be reached through every member list its site
//! ever published while it was a member, not only the last one: a
//! single-step in flight holds the list it started on, and older lists are
//! retired by whoever replaced them (a registration growing the list, the
//! commit that compacted it after a neighbour left). So "no handler of P runs any more" needs
//! *all* those lists finished, wherever they were retired. Every bottom half
//! therefore takes everything pending and finishes it under one lock
//! (`reclaim_lock`), together with every list a registration retired before
//! it that the domain's callback worker has not freed yet (`deferred.rs`:
//! those are normally freed by their own `Rcu::call` callback a grace period
//! after the registration, with no unregistration needed; the bottom half
//! takes the ones still queued, and the ones a callback left because a
//! single-step was in flight, and waits for their steps). When a `commit`
//! returns, every retirement made before it started has been finished, by
//! it, by a grace-period callback, or by a bottom half that held the lock
//! before it. Concurrent committers thus share the work but not the grace
//! period (they wait for each other); `unregister_nosync` + one `commit` is
//! the way to pay one grace period for many probes.

use std::sync::Arc;

use super::kretprobe::{Kretprobe, ReturnProbe};
use super::probe::{AsKprobe, Kprobe, ProbeId};
use super::registry::{text_gone, KprobeRegistry, SiteKey, Writer};
use super::site::SiteState;
use super::table::{Members, Site, SiteExec};
use super::this_thread::in_kprobe_handler;
use crate::probes::arch::Arch;
use crate::probes::text::TextMemory;
use crate::probes::ProbeError;
use crate::rcu::Rcu;
use crate::sync::atomic::Ordering;
use crate::sync::Backoff;

/// Something unreachable to new readers, to be finished after a grace period.
pub(crate) enum Retired {
    /// A replaced or final member list: freed once its steps in flight end.
    Members(*mut Members),
    /// An unlinked site node.
    Site(*mut Site),
    /// An unregistered probe: given back (unclaimed) last.
    Probe(Kprobe),
    /// A retired member list with a reference on a probe it borrows (member
    /// lists do not own their probes), dropped with it: the list of a
    /// failed registration, whose probe was given back at once.
    MembersWith(*mut Members, Kprobe),
    /// An unregistered kretprobe: its pool lives until its calls return.
    Return(Arc<dyn ReturnProbe>),
}

// SAFETY: the raw pointers are owned by the retirement (unreachable to new
// readers); freeing them on another thread is what the bottom half does.
unsafe impl Send for Retired {}

/// Spins (then yields) until no single-step is in flight on `m`.
fn wait_for_steps(m: &Members) {
    let mut backoff = Backoff::new();
    // Acquire pairs with the Release decrement in `StepToken::drop`.
    while m.inflight.load(Ordering::Acquire) != 0 {
        backoff.snooze();
    }
}

/// Frees what `batch` retired (the caller waited for a grace period that
/// began after the retirement) and returns the kretprobes whose calls
/// are still in flight. Takes no lock.
pub(crate) fn finish(batch: Vec<Retired>) -> Vec<Arc<dyn ReturnProbe>> {
    // Lists and sites first, every probe after: a probe removed from a
    // site whose last probe left later in the same batch is still in that
    // site's final list, whose steps in flight may run its post handler
    // until the list is freed.
    for r in &batch {
        match *r {
            Retired::Members(m) | Retired::MembersWith(m, _) => {
                // SAFETY: retired and past its grace period: no reader
                // holds it; steps in flight hold counts, awaited here; taken
                // from the batch once (the second pass skips it).
                unsafe {
                    wait_for_steps(&*m);
                    drop(Box::from_raw(m));
                }
            }
            // SAFETY: unlinked and past its grace period.
            Retired::Site(s) => drop(unsafe { Box::from_raw(s) }),
            Retired::Probe(_) | Retired::Return(_) => {}
        }
    }
    let mut orphans = Vec::new();
    for r in batch {
        match r {
            Retired::Probe(p) => p.release(),
            // The list is freed above; the reference it borrowed goes now.
            Retired::MembersWith(_, p) => drop(p),
            Retired::Return(r) => {
                if r.instances_out() != 0 {
                    orphans.push(r);
                }
            }
            Retired::Members(_) | Retired::Site(_) => {}
        }
    }
    orphans
}

#[track_caller]
fn assert_not_in_handler(what: &str) {
    assert!(
        !in_kprobe_handler(),
        "KprobeRegistry::{what}() called from a probe handler: it would wait for the \
         handler's own hit to finish"
    );
    assert!(
        !Rcu::in_read_section(),
        "KprobeRegistry::{what}() called inside an Rcu read-side critical section: it \
         waits for a grace period"
    );
}

impl<A: Arch, T: TextMemory> KprobeRegistry<A, T> {
    /// Unregisters `probe` and waits until none of its handlers runs any
    /// more and nothing refers to it (one grace period, plus any
    /// single-step in flight on it).
    ///
    /// # Errors
    /// [`ProbeError::UnknownProbe`] if the probe is not registered here (or
    /// already pending commit); text errors when the breakpoint cannot be
    /// removed (the probe stays registered then).
    ///
    /// # Panics
    /// When called from a probe handler or inside an `Rcu` read section.
    pub fn unregister(&self, probe: &(impl AsKprobe + ?Sized)) -> Result<(), ProbeError> {
        self.unregister_many(&[probe.as_kprobe()])
    }

    /// Unregisters a kretprobe: as [`unregister`](Self::unregister) on its
    /// entry probe. Calls in flight keep their instances until they return
    /// (their return handlers no longer run).
    ///
    /// # Errors
    /// As `unregister`.
    #[deprecated(note = "use `unregister`: it takes both kinds")]
    pub fn unregister_kretprobe<D: Send + 'static>(
        &self,
        krp: &Kretprobe<D>,
    ) -> Result<(), ProbeError> {
        self.unregister(krp.probe())
    }

    /// Unregisters every probe of `probes` with one grace period.
    ///
    /// # Errors
    /// [`ProbeError::UnknownProbe`] if any probe is not registered here or
    /// appears twice: then nothing is unregistered. A text error on one
    /// probe stops the batch there: the probes before it are unregistered
    /// (and finished), that one and the rest stay registered.
    ///
    /// # Panics
    /// When called from a probe handler or inside an `Rcu` read section.
    pub fn unregister_many<P: AsKprobe + ?Sized>(&self, probes: &[&P]) -> Result<(), ProbeError> {
        assert_not_in_handler("unregister_many");
        let probes = probes.iter().map(|p| p.as_kprobe());
        let result = {
            let mut w = self.lock_writer();
            self.check_all_registered(probes.clone())?;
            // At most a probe, a site and its last list, and a kretprobe's
            // pool each: one allocation for the whole batch.
            w.pending.reserve(3 * probes.len());
            self.unregister_tops(&mut w, probes)
        };
        self.finish_pending();
        result
    }

    /// The top halves of a batch, in order, under the writer lock: stops at
    /// the first text error (the probes before it are unregistered, that
    /// one and the rest stay registered). The caller finishes the batch.
    fn unregister_tops<'p>(
        &self,
        w: &mut Writer,
        probes: impl IntoIterator<Item = &'p Kprobe>,
    ) -> Result<(), ProbeError> {
        let mut pending = std::mem::take(&mut w.pending);
        let mut result = Ok(());
        let mut removed = 0;
        for p in probes {
            if let Err(e) = self.unregister_top(w, p, &mut pending) {
                result = Err(e);
                break;
            }
            removed += 1;
        }
        w.pending = pending;
        // Relaxed: a statistics counter read by `len`; once per batch.
        self.count.fetch_sub(removed, Ordering::Relaxed);
        result
    }

    /// Unregisters every probe registered here (kretprobes' entry probes
    /// included) with one grace period, and returns how many. This is the
    /// way to remove probes whose handles were dropped while registered
    /// (the registry keeps them: see [`Kprobe`]'s "Ownership"); a single
    /// one is found again with [`probe`](Self::probe) or
    /// [`probes`](Self::probes).
    ///
    /// # Errors
    /// A text error on one probe stops the batch there, as in
    /// [`unregister_many`](Self::unregister_many).
    ///
    /// # Panics
    /// When called from a probe handler or inside an `Rcu` read section.
    pub fn unregister_all(&self) -> Result<usize, ProbeError> {
        assert_not_in_handler("unregister_all");
        let result = {
            let mut w = self.lock_writer();
            let all: Vec<Kprobe> = w.all_sites().flat_map(|s| s.probes().cloned()).collect();
            self.unregister_tops(&mut w, &all).map(|()| all.len())
        };
        self.finish_pending();
        result
    }

    /// First half of a batched unregistration: `probe`'s breakpoint is
    /// removed (if it was the last enabled probe there) and new hits no
    /// longer find it, **but hits already in progress may still run its
    /// handlers.**
    ///
    /// **THE CALLER MUST CALL [`commit`](Self::commit) AFTERWARDS, AND BEFORE
    /// FREEING OR REUSING ANYTHING THE PROBE'S HANDLERS USE, BEFORE ASSUMING
    /// THE HANDLERS HAVE STOPPED, AND BEFORE REGISTERING THE SAME PROBE
    /// AGAIN.** Until then the probe is *pending*: it counts as neither
    /// registered (unregistering it again fails) nor free (registering it
    /// again fails), and its memory is kept.
    ///
    /// # Errors
    /// As [`unregister`](Self::unregister).
    pub fn unregister_nosync(&self, probe: &(impl AsKprobe + ?Sized)) -> Result<(), ProbeError> {
        let probe = probe.as_kprobe();
        let mut w = self.lock_writer();
        // Moved out and back (no allocation) so the top half can borrow the
        // rest of the writer state mutably beside it.
        let mut pending = std::mem::take(&mut w.pending);
        let result = self.unregister_top(&mut w, probe, &mut pending);
        w.pending = pending;
        drop(w);
        if result.is_ok() {
            // Relaxed: a statistics counter read by `len`.
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        // A list a detach retired (see `KprobeRegistry::detach`).
        self.deferred.queue_callbacks(&self.rcu);
        result
    }

    /// Second half of batched unregistration: waits one grace period and
    /// finishes **every** pending unregistration, this thread's and any
    /// other's. When it returns, no handler of any probe that was pending
    /// when it was called runs any more, no thread is executing their
    /// retired XOL slots (as far as
    /// [`XolAllocator::quiesce`](crate::probes::xol::XolAllocator::quiesce)
    /// can observe;
    /// the live runtime's wait is bounded), the slots are back with the
    /// allocator (parked for their addresses), and the probes can be
    /// registered again. Member lists and failed sites that registrations
    /// retired before the call and that their grace-period callbacks have
    /// not freed yet are freed too (with their slots). With nothing pending
    /// or left to free it returns at once.
    ///
    /// Safe to call from several threads at once: commits are serialized,
    /// and a commit that finds the work taken by another still returns only
    /// after that work is done.
    ///
    /// # Panics
    /// When called from a probe handler or inside an `Rcu` read section.
    pub fn commit(&self) {
        assert_not_in_handler("commit");
        self.finish_pending();
    }

    /// The bottom half of every unregistration. Under `reclaim_lock`: takes
    /// everything pending or retired, waits one grace period, finishes it.
    ///
    /// Taking *everything* under one lock is what makes the guarantee hold:
    /// an older member list holding a probe may have been retired by
    /// another thread (a registration that joined the site, another
    /// probe's unregistration); whoever took it finishes it before
    /// releasing the lock, so once we hold the lock and have finished our
    /// batch, every list that ever held our probes is gone.
    fn finish_pending(&self) {
        let _serial = self.reclaim_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (batch, waits, slots, upto) = {
            let mut w = self.lock_writer();
            // The lists compaction replaces go first (`finish` frees every
            // list before it gives back any probe).
            let mut batch = Vec::new();
            let waits = Self::commit_dirty(&mut w, &mut batch);
            if batch.is_empty() {
                // The common case: no copy of a batch that may be large.
                batch = std::mem::take(&mut w.pending);
            } else {
                batch.append(&mut w.pending);
            }
            Self::reap_orphans(&mut w);
            let slots = std::mem::take(&mut w.pending_slots);
            // Under the writer mutex, so every list a registration retired
            // before our probes left their sites is numbered below it.
            (batch, waits, slots, self.deferred.snapshot())
        };
        if batch.is_empty() && waits.is_empty() && !self.deferred.outstanding_below(upto) {
            // Whoever took our probes (if any) finished them, and the lists
            // that held them, before releasing `reclaim_lock`; what
            // registrations retired is freed already, or being freed by a
            // callback that took it, which we let finish.
            self.deferred.wait_for_callbacks();
            return;
        }
        self.rcu.synchronize();
        // After the grace period no trap sends a thread into these slots;
        // threads sent there earlier for a boosted run are waited out here.
        if !slots.is_empty() {
            self.xol.quiesce(&slots);
        }
        // Steps that may still run the post handler of a member removed
        // from a site that stays (past the grace period, none starts).
        for (exec, parity) in &waits {
            exec.wait_post_steps(*parity);
        }
        // Older member lists that registrations retired (they may hold our
        // probes, with single-steps in flight) that their grace-period
        // callbacks have not freed yet.
        self.deferred.finish_upto(upto);
        self.reap(batch);
    }

    /// For each site that lost members since the last commit: starts a new
    /// post epoch if a removed member had a post handler (returned, to wait
    /// out after the grace period), and compacts it if removed slots are at
    /// least half its list (one copy per site per commit, paid for by the
    /// removals: O(probes) for any number of removals and commits); the
    /// lists compaction replaces go into `out`, to retire.
    fn commit_dirty(w: &mut Writer, out: &mut Vec<Retired>) -> Vec<(Arc<SiteExec>, usize)> {
        let mut waits = Vec::new();
        for addr in std::mem::take(&mut w.dirty) {
            if let Some(st) = w.sites.get_mut(&addr) {
                st.dirty = false;
                waits.extend(st.take_post_wait());
                if st.wants_compaction() {
                    out.push(Retired::Members(st.compact()));
                }
            }
        }
        waits
    }

    /// Checks that every probe is registered here, once (writer mutex
    /// held). O(n log n) in the batch, one allocation: a registered probe's
    /// site is in the writer's map (so it is not looked up), and a probe
    /// twice in the batch shows as two equal ids once they are sorted.
    fn check_all_registered<'p>(
        &self,
        probes: impl ExactSizeIterator<Item = &'p Kprobe> + Clone,
    ) -> Result<(), ProbeError> {
        if let Some(p) = probes.clone().find(|p| !p.registered_in(self.id)) {
            return Err(Self::unknown(p));
        }
        if probes.len() < 2 {
            return Ok(());
        }
        let mut ids: Vec<ProbeId> = probes.clone().map(Kprobe::id).collect();
        ids.sort_unstable();
        let Some(twice) = ids.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]) else {
            return Ok(());
        };
        // Already in this batch: by the time its second turn came it would
        // be pending, i.e. unknown.
        let p = probes
            .into_iter()
            .find(|p| p.id() == twice)
            .expect("the id came from the batch");
        Err(ProbeError::UnknownProbe {
            site: crate::probes::error::ProbeSite::Address(p.registered_addr()),
        })
    }

    /// The top half: makes `probe` unreachable to new hits, retiring into
    /// `out` what readers may still hold (and into `w.pending_slots` the
    /// boosted slot of a site it was the last probe of). On error nothing
    /// changed; on success the caller takes one off `count`.
    pub(crate) fn unregister_top(
        &self,
        w: &mut Writer,
        probe: &Kprobe,
        out: &mut Vec<Retired>,
    ) -> Result<(), ProbeError> {
        let addr = probe.registered_addr();
        let mut key = Self::site_of(w, self.id, probe)?;
        let st = w.site_mut(key);
        // O(1): the site counts its enabled members (`probe` is one of
        // them if it is enabled).
        let others_enabled = st.enabled() > usize::from(probe.is_enabled());
        if st.armed && !others_enabled {
            // First the breakpoint (checked: it must still be ours, in the
            // same text), so a failure changes nothing. Text that went away
            // is not written: the site is detached and retired below.
            match self.disarm(addr, &st.text_id, &st.orig) {
                Ok(()) => st.armed = false,
                Err(e) if text_gone(&e, &st.orig, true) => key = self.detach(w, addr),
                Err(e) => return Err(e),
            }
        }
        let st = w.site_mut(key);
        let last = st.len() == 1;
        // The registry's own handle on the probe, moved into the retirement
        // (no reference-count traffic). O(1): its slot goes null in the
        // published list; the list is compacted (if at all) by the commit.
        let handle = st.remove(probe);
        if last {
            let st = w.take(key);
            if let SiteKey::Live(_) = key {
                // SAFETY: writer mutex held; a live site's node is linked
                // (a detached one was unlinked when it was detached).
                unsafe { self.table.unlink(st.node) };
            }
            // After the grace period no trap sends a thread into the slot;
            // the commit waits out threads sent there before (`quiesce`).
            if let Some(slot) = st.boosted_slot {
                w.pending_slots.push(slot);
            }
            // SAFETY: the node is live (freed only through this retirement).
            out.push(Retired::Members(unsafe { &*st.node }.members_ptr()));
            out.push(Retired::Site(st.node));
        } else if let SiteKey::Detached(_) = key {
            // The commit compacts live sites only: a detached one that
            // needs it is compacted now, its old list retired with the batch.
            if st.wants_compaction() {
                out.push(Retired::Members(st.compact()));
            }
        } else if !st.dirty {
            st.dirty = true;
            w.dirty.push(addr);
        }
        probe.mark_pending();
        if let Some(r) = probe.return_probe() {
            // Before the grace period: once it ends no entry or return
            // handler of the kretprobe can be running.
            r.orphan();
            out.push(Retired::Return(Arc::clone(r)));
        }
        out.push(Retired::Probe(handle));
        Ok(())
    }

    /// The bottom half. The caller waited for a grace period that began
    /// after everything in `batch` was retired.
    pub(crate) fn reap(&self, batch: Vec<Retired>) {
        let mut orphans = finish(batch);
        let mut w = self.lock_writer();
        w.orphans.append(&mut orphans);
        Self::reap_orphans(&mut w);
    }

    /// Slow path of slot allocation: frees the retired member lists that may
    /// hold slots (one grace period, then their steps in flight), then waits
    /// for the list callbacks already queued on the RCU worker (a list
    /// freed there gives its site's slot back). Called with the writer mutex
    /// held (neither wait needs it, and the callbacks never take it).
    #[cold]
    pub(crate) fn reclaim_slots(&self) {
        if Rcu::in_read_section() {
            return;
        }
        let upto = self.deferred.snapshot();
        self.rcu.synchronize();
        self.deferred.finish_upto(upto);
        self.rcu.barrier();
    }

    /// Frees the pools of unregistered kretprobes whose calls all returned.
    pub(crate) fn reap_orphans(w: &mut Writer) {
        w.orphans.retain(|r| r.instances_out() != 0);
    }
}

impl<A: Arch, T: TextMemory> Drop for KprobeRegistry<A, T> {
    /// Removes every breakpoint the registry wrote (best effort: a site
    /// someone else re-patched is left alone), waits a grace period, gives
    /// every probe back and frees everything. Kretprobe calls still in
    /// flight lose their return handler (their instances go back to the
    /// pools); on live code the runtime must not drop a registry while
    /// hijacked calls can still return into its trampoline.
    fn drop(&mut self) {
        // Before anything is freed: a thread-exit flush in progress on our
        // table finishes first, and none starts afterwards.
        super::thread_exit::untrack(&self.instances);
        let (sites, mut batch, orphans) = {
            let mut w = self.lock_writer();
            for (&addr, st) in w.sites.iter() {
                if st.armed {
                    // Text that went away is left alone (`write_in`).
                    let _ = self.disarm(addr, &st.text_id, &st.orig);
                }
            }
            let mut sites: Vec<SiteState> = std::mem::take(&mut w.sites).into_values().collect();
            let detached = std::mem::take(&mut w.detached).into_values();
            let mut batch = std::mem::take(&mut w.pending);
            // Detached sites are in no chain: their nodes are freed with the
            // linked ones' below.
            for st in detached {
                batch.push(Retired::Members(
                    // SAFETY: a kept site's node is live.
                    unsafe { &*st.node }.members_ptr(),
                ));
                batch.push(Retired::Site(st.node));
                sites.push(st);
            }
            (sites, batch, std::mem::take(&mut w.orphans))
        };
        if !Rcu::in_read_section() {
            self.rcu.synchronize();
        }
        // Lists registrations retired whose callbacks have not run: past the
        // grace period above, and no step token outlives the registry.
        self.deferred.finish_upto(u64::MAX);
        // Filed instances point into pools still alive (held by member
        // lists, pending retirements or `orphans`): give them back first.
        for inst in self.instances.take_all() {
            // SAFETY: unlinked under the stripe lock, so ours; the owner is
            // alive (see above).
            unsafe { inst.as_ref().owner().recycle(inst) };
        }
        let linked = self.table.drain();
        for st in sites {
            for p in st.probes() {
                p.release();
            }
        }
        for node in linked {
            // SAFETY: past the grace period and no `StepToken` can exist
            // (tokens borrow the registry), so nothing refers to the node or
            // its list.
            unsafe {
                drop(Box::from_raw((*node).members_ptr()));
                drop(Box::from_raw(node));
            }
        }
        batch.extend(orphans.into_iter().map(Retired::Return));
        for r in batch {
            match r {
                // SAFETY: as for the linked nodes above.
                Retired::Members(m) => drop(unsafe { Box::from_raw(m) }),
                // SAFETY: as above.
                Retired::Site(s) => drop(unsafe { Box::from_raw(s) }),
                Retired::Probe(p) => p.release(),
                Retired::MembersWith(m, p) => {
                    // SAFETY: as above.
                    drop(unsafe { Box::from_raw(m) });
                    drop(p);
                }
                Retired::Return(_) => {}
            }
        }
    }
}
