//! [`XolShares`]: one space's XOL slots as shared owners, so that an address
//! installed and removed faster than grace periods holds one slot, not one
//! per install.
//!
//! Invariant: every count change, lookup and the final free happen under the
//! table's one mutex, and the slot is freed by whoever drops the last owner,
//! exactly once, never while a live install uses it; a re-install shares a
//! slot only if its planned bytes are byte for byte what the slot holds. The
//! allocator's lock is taken inside the table's, never the other way round.
//!
//! The problem, why sharing is safe, and the orderings, in full:
//! [`crate::docs::algorithms::xol_slots`].

use std::collections::BTreeMap;

use crate::probes::arch::XolPlan;
use crate::probes::xol::XolAllocator;
use crate::probes::ProbeError;
use crate::rcu::Flavor;
use crate::sync::{Arc, Mutex};

/// A slot in use at an address: (probed address, slot address).
pub(crate) type SlotKey = (u64, u64);

/// One slot in use at one address.
#[derive(Debug)]
struct Owned {
    /// Live install (0 or 1) plus releases still queued for a grace period.
    owners: usize,
    /// What the slot holds (the plan's slot bytes), for the identity check.
    bytes: Box<[u8]>,
}

/// The XOL slots of one space's installs as shared owners (see the
/// [module docs](self)). Clones share one table.
#[derive(Clone, Debug, Default)]
pub(crate) struct XolShares {
    /// Keyed by (probed address, slot address); an entry exists exactly
    /// while its slot has an owner.
    table: Arc<Mutex<BTreeMap<(u64, u64), Owned>>>,
}

impl XolShares {
    fn lock(&self) -> crate::sync::MutexGuard<'_, BTreeMap<(u64, u64), Owned>> {
        // A panic under the lock leaves a consistent table (each change is
        // one count update or one insert/remove), so poisoning is ignored.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one more owner on a slot already in use at `vaddr` whose bytes
    /// equal what `plan_for(slot)` plans for it, and returns that plan.
    /// `None` when there is no such slot (allocate a fresh one, then
    /// [`adopt`](Self::adopt) it).
    pub(crate) fn share(
        &self,
        vaddr: u64,
        mut plan_for: impl FnMut(u64) -> Result<XolPlan, ProbeError>,
    ) -> Option<XolPlan> {
        let mut t = self.lock();
        t.range_mut((vaddr, 0)..=(vaddr, u64::MAX))
            .find_map(|(&(_, slot), o)| {
                let p = plan_for(slot).ok()?;
                // Byte for byte what the slot holds: a thread still in it
                // from an earlier install runs exactly this.
                (*p.slot_bytes() == *o.bytes).then(|| {
                    o.owners += 1;
                    p
                })
            })
    }

    /// The key of `plan`'s slot in the table.
    pub(crate) fn key(plan: &XolPlan) -> SlotKey {
        (plan.insn_addr, plan.slot_addr)
    }

    /// Records a slot freshly allocated and filled with `plan`'s bytes, its
    /// one owner being the install that planned it.
    pub(crate) fn adopt(&self, plan: &XolPlan) {
        let prev = self.lock().insert(
            Self::key(plan),
            Owned {
                owners: 1,
                bytes: plan.slot_bytes().into(),
            },
        );
        debug_assert!(
            prev.is_none(),
            "the allocator handed out slot {:#x}, which is still in use",
            plan.slot_addr
        );
    }

    /// Drops one owner of `plan`'s slot after a grace period of `domain`
    /// (a hit that found the install may still be about to step through
    /// it); the last owner frees the slot to `space`'s allocator.
    pub(crate) fn release_later<S, F>(&self, domain: &F, space: &std::sync::Arc<S>, plan: &XolPlan)
    where
        S: super::AddressSpace,
        F: Flavor,
    {
        let (shares, space) = (self.clone(), std::sync::Arc::clone(space));
        let key = Self::key(plan);
        domain.call(move || shares.release(space.xol(), &[key]));
    }

    /// [`release_later`](Self::release_later) for the slot of every key of
    /// `keys` (see [`key`](Self::key)), in one callback.
    pub(crate) fn release_many_later<S, F>(
        &self,
        domain: &F,
        space: &std::sync::Arc<S>,
        keys: Vec<SlotKey>,
    ) where
        S: super::AddressSpace,
        F: Flavor,
    {
        if keys.is_empty() {
            return;
        }
        let (shares, space) = (self.clone(), std::sync::Arc::clone(space));
        domain.call(move || shares.release(space.xol(), &keys));
    }

    /// Drops one owner of the slot at each key of `keys`; frees those that
    /// lost their last, in one [`XolAllocator::free_many`]. One hold of the
    /// table's lock for all: the installs of a `dlopen` that follows take
    /// the same lock once or twice each.
    fn release(&self, xol: &dyn XolAllocator, keys: &[(u64, u64)]) {
        let mut t = self.lock();
        let mut freed = Vec::new();
        for key in keys {
            let Some(o) = t.get_mut(key) else {
                debug_assert!(false, "XOL slot {:#x} released with no owner", key.1);
                continue;
            };
            o.owners -= 1;
            if o.owners == 0 {
                t.remove(key);
                freed.push(key.1);
            }
        }
        // Under the table lock: a share either found the entry before this
        // (and the count was not zero) or finds no entry after.
        xol.free_many(&freed);
    }

    /// Owners of the slot at `slot` used at `vaddr` (0: not in use).
    #[cfg(test)]
    fn owners(&self, vaddr: u64, slot: u64) -> usize {
        self.lock().get(&(vaddr, slot)).map_or(0, |o| o.owners)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::arch::{Arch, X86_64};
    use crate::probes::xol::XolArena;

    const AT: u64 = 0x40_1000;

    /// `mov rbp, rsp` at `AT`, planned for `slot`.
    fn plan_mov(slot: u64) -> Result<XolPlan, ProbeError> {
        let insn = X86_64.analyze(AT, &[0x48, 0x89, 0xe5])?;
        X86_64.plan_xol(&insn, slot)
    }

    /// `mov rax, rsp` at `AT` (other bytes, same address).
    fn plan_other(slot: u64) -> Result<XolPlan, ProbeError> {
        let insn = X86_64.analyze(AT, &[0x48, 0x89, 0xe0])?;
        X86_64.plan_xol(&insn, slot)
    }

    fn fresh(arena: &XolArena, shares: &XolShares) -> XolPlan {
        let slot = arena.alloc(AT).unwrap();
        let p = plan_mov(slot).unwrap();
        arena.fill(slot, p.slot_bytes()).unwrap();
        shares.adopt(&p);
        p
    }

    #[test]
    fn a_shared_slot_is_freed_once_by_its_last_owner() {
        let arena = XolArena::new(0x9000, 2, X86_64::XOL_SLOT_SIZE);
        let shares = XolShares::default();
        let p = fresh(&arena, &shares);
        let q = shares.share(AT, plan_mov).expect("same bytes: shared");
        assert_eq!(q.slot_addr, p.slot_addr);
        assert_eq!(shares.owners(AT, p.slot_addr), 2);
        shares.release(&arena, &[(AT, p.slot_addr)]);
        assert_eq!((arena.in_use(), arena.frees()), (1, 0), "one owner left");
        shares.release(&arena, &[(AT, p.slot_addr)]);
        assert_eq!((arena.in_use(), arena.frees()), (0, 1), "freed by the last");
        assert_eq!(shares.owners(AT, p.slot_addr), 0);
        assert!(
            shares.share(AT, plan_mov).is_none(),
            "a freed slot is never shared again"
        );
        assert_eq!(arena.allocs(), 1);
    }

    #[test]
    fn a_slot_is_shared_only_when_the_planned_bytes_are_identical() {
        let arena = XolArena::new(0x9000, 2, X86_64::XOL_SLOT_SIZE);
        let shares = XolShares::default();
        let p = fresh(&arena, &shares);
        assert!(shares.share(AT, plan_other).is_none(), "other bytes");
        assert!(
            shares
                .share(AT + 1, |s| X86_64
                    .analyze(AT + 1, &[0x48, 0x89, 0xe5])
                    .and_then(|i| X86_64.plan_xol(&i, s)))
                .is_none(),
            "another address"
        );
        assert!(shares.share(AT, |_| plan_mov(0)).is_none(), "other slot");
        assert_eq!(shares.owners(AT, p.slot_addr), 1, "nothing taken");
    }
}
