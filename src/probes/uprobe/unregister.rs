//! Removing consumers: [`UprobeRegistry::unregister`], the batched
//! [`UprobeRegistry::unregister_nosync`] + [`UprobeRegistry::commit`] and
//! [`UprobeRegistry::unregister_many`], and
//! [`UprobeRegistry::reap_removed`].
//!
//! Invariant: a consumer leaves by a new consumer list published without it
//! (under the file's stripe), then a grace period of the domain, so when
//! `unregister` (or the `commit` after `unregister_nosync`) returns no hit
//! and no return (`returns.rs`) can still be running its handlers. The
//! breakpoints a removal takes out are found through the uprobe's own
//! install list, so the cost of a removal does not grow with the number of
//! other uprobes installed. More: [`crate::docs::algorithms::uprobes`].

use super::consumer::{Consumer, Member};
use super::install::{Removals, UprobeHandle};
use super::registry::{site, slice, Uprobe, UprobeRegistry};
use super::space::{AddressSpace, SpaceId, UprobeKey};
use crate::probes::arch::Arch;
use crate::probes::ProbeError;
use crate::rcu::Flavor;

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// Removes `consumer` from the uprobe at `key`. When it was the last
    /// one, the breakpoints come out of every space and the uprobe goes.
    /// Waits for a grace period: when this returns, no handler and no
    /// return handler of `consumer` runs for `key` any more (calls in flight
    /// still return to their callers; see `returns.rs`).
    ///
    /// # Errors
    /// [`ProbeError::UnknownProbe`] if `consumer` is not registered on `key`
    /// (nothing changes).
    ///
    /// # Panics
    /// If called inside a read section of the domain (from a handler).
    pub fn unregister(&self, key: UprobeKey, consumer: &Consumer) -> Result<(), ProbeError> {
        self.unregister_nosync(key, consumer)?;
        self.commit();
        Ok(())
    }

    /// First half of a batched removal: `consumer` leaves the uprobe at
    /// `key` (its breakpoints come out when it was the last consumer that
    /// wanted them) and new hits no longer run it, **but hits already in
    /// progress may still run its handlers** until [`commit`](Self::commit)
    /// returns.
    ///
    /// **CALL [`commit`](Self::commit) AFTERWARDS, BEFORE FREEING ANYTHING
    /// THE CONSUMER'S HANDLERS USE OR ASSUMING THEY HAVE STOPPED.** The
    /// consumer may be registered again at once (a hit then runs it from the
    /// new list or the old one, never both).
    ///
    /// # Errors
    /// As [`unregister`](Self::unregister); nothing changes on error.
    pub fn unregister_nosync(&self, key: UprobeKey, consumer: &Consumer) -> Result<(), ProbeError> {
        let _file = self.files.lock(&key.file);
        let mut removals = Removals::with_capacity(1);
        self.remove_consumer(key, consumer, &mut removals)?;
        self.finish_removals(removals);
        Ok(())
    }

    /// Second half of a batched removal: one grace period. When it returns,
    /// no handler of a consumer removed by an
    /// [`unregister_nosync`](Self::unregister_nosync) that returned before
    /// the call runs any more (on this thread's removals and every other's).
    ///
    /// # Panics
    /// If called inside a read section of the domain (from a handler).
    pub fn commit(&self) {
        self.domain.synchronize();
    }

    /// Removes each `(key, consumer)` pair as
    /// [`unregister_nosync`](Self::unregister_nosync) does, then one
    /// [`commit`](Self::commit) for all: the way to take out thousands of
    /// uprobes (a multi-attach) at the cost of one grace period and one
    /// text batch per space (one protection change per run of pages, one
    /// core sync). Returns how many were removed (all of them).
    ///
    /// # Errors
    /// [`ProbeError::UnknownProbe`] for the first pair whose consumer is not
    /// registered on its key, or that appears twice in `pairs`: then
    /// nothing is removed (every file the batch names is locked while it is
    /// checked and removed, so no concurrent change slips in between).
    ///
    /// # Panics
    /// If called inside a read section of the domain (from a handler).
    pub fn unregister_many(&self, pairs: &[(UprobeKey, &Consumer)]) -> Result<usize, ProbeError> {
        let files = self.lock_files(pairs.iter().map(|(k, _)| k));
        // Checked whole first: a bad pair changes nothing. A pair named
        // twice is refused as unknown (the second removal would be).
        let mut named: Vec<(UprobeKey, usize)> =
            pairs.iter().map(|(k, c)| (*k, c.identity())).collect();
        named.sort_unstable();
        if let Some(w) = named.windows(2).find(|w| w[0] == w[1]) {
            return Err(ProbeError::UnknownProbe { site: site(w[0].0) });
        }
        // Uprobes named with more than one consumer take the general path
        // below (each removal sees the list the previous one left).
        let mut several: Vec<UprobeKey> = named
            .windows(2)
            .filter(|w| w[0].0 == w[1].0)
            .map(|w| w[0].0)
            .collect();
        several.dedup();
        // One pass over the uprobes, under one read section: the check, and
        // for a uprobe whose only consumer goes (the usual batch) its
        // installs queued at once, while its lists are in cache. Queuing
        // changes nothing (a later bad pair drops the queue).
        let mut removals = Removals::with_capacity(pairs.len());
        let mut general = Vec::new();
        {
            let g = self.domain.read();
            for &(key, consumer) in pairs {
                let unknown = ProbeError::UnknownProbe { site: site(key) };
                let Some(up) = self.uprobes.get(&g, &key) else {
                    return Err(unknown);
                };
                let list = slice(up.consumers.load(&g));
                if !list.iter().any(|c| c.same(consumer)) {
                    return Err(unknown);
                }
                if list.len() == 1 && several.binary_search(&key).is_err() {
                    // No handle: the stripes we hold keep it in the tree
                    // until `finish_removals` unlinks it.
                    self.queue_installs(&g, up, None, |_| false, &mut removals);
                    removals.push_emptied(key);
                } else {
                    general.push((key, consumer));
                }
            }
        }
        for (key, consumer) in general {
            self.remove_consumer(key, consumer, &mut removals)
                .expect("checked under the same stripes");
        }
        self.finish_removals(removals);
        drop(files);
        self.commit();
        Ok(pairs.len())
    }

    /// Removes `consumer` from `key`'s list and queues the breakpoints of
    /// the spaces no remaining consumer wants (found through the uprobe's
    /// own install list) on `removals`, with the uprobe itself when it has
    /// no consumer left. The caller holds the file's stripe and finishes
    /// `removals` before releasing it.
    fn remove_consumer(
        &self,
        key: UprobeKey,
        consumer: &Consumer,
        removals: &mut Removals<S, F>,
    ) -> Result<(), ProbeError> {
        let up = self
            .uprobes
            .get_handle(&key)
            .ok_or(ProbeError::UnknownProbe { site: site(key) })?;
        self.remove_from(up, consumer, removals)
    }

    /// [`remove_consumer`](Self::remove_consumer) on the uprobe `up`.
    fn remove_from(
        &self,
        up: UprobeHandle<F>,
        consumer: &Consumer,
        removals: &mut Removals<S, F>,
    ) -> Result<(), ProbeError> {
        let key = up.key;
        let unknown = || ProbeError::UnknownProbe { site: site(key) };
        let g = self.domain.read();
        let old = slice(up.consumers.load(&g));
        let Some(pos) = old.iter().position(|c| c.same(consumer)) else {
            return Err(unknown());
        };
        // The list without it (no allocation when it was the only one: a
        // probed C library traps on every `malloc` the removal makes).
        let remaining = || {
            old.iter()
                .enumerate()
                .filter(|&(i, _)| i != pos)
                .map(|(_, c)| c)
        };
        let leaving = old.len() == 1;
        let kept = |space| remaining().any(|c| c.wants(space));
        let stays = (!leaving).then_some(&up);
        self.queue_installs(&g, up.value(), stays, kept, removals);
        if leaving {
            drop(g);
            // Removed once its breakpoints are out (`finish_removals`): until
            // then a hit still finds it (and its old list; the caller's
            // grace period covers that).
            removals.push_emptied(key);
        } else {
            let new: Vec<Member> = remaining().cloned().collect();
            drop(g);
            up.consumers.replace(new.into());
        }
        Ok(())
    }

    /// Queues on `removals` the installs of `up` in every space `kept`
    /// (some remaining consumer wants it) says no to. `stays`: its handle
    /// when a consumer remains; `None` when it leaves.
    fn queue_installs(
        &self,
        g: &F::Guard<'_>,
        up: &Uprobe<F>,
        stays: Option<&UprobeHandle<F>>,
        kept: impl Fn(SpaceId) -> bool,
        removals: &mut Removals<S, F>,
    ) {
        for p in slice(up.placed.load(g)).iter().filter(|p| !kept(p.space)) {
            if let Some(st) = self.spaces.get(g, &p.space) {
                removals.push(st, p.vaddr, p.install.plan.as_ref(), up, stays);
            }
        }
    }

    /// Unregisters every consumer whose handler asked for removal
    /// ([`ConsumerAction::Remove`](super::ConsumerAction::Remove)); one
    /// grace period for all. Returns how many were removed.
    ///
    /// # Panics
    /// If called inside a read section of the domain.
    #[cold]
    pub fn reap_removed(&self) -> usize {
        let flagged: Vec<(UprobeKey, Consumer)> = {
            let g = self.domain.read();
            self.uprobes
                .iter(&g)
                .flat_map(|(k, u)| {
                    slice(u.consumers.load(&g))
                        .iter()
                        .filter(|c| c.is_removed())
                        .map(move |c| (*k, c.consumer.clone()))
                })
                .collect()
        };
        let n = flagged
            .iter()
            .filter(|(k, c)| self.unregister_nosync(*k, c).is_ok())
            .count();
        if n > 0 {
            self.domain.synchronize();
        }
        n
    }
}
