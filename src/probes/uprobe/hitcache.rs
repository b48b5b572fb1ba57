//! The hit cache: a direct-mapped table from a uprobe's key to the uprobe,
//! in front of the uprobe tree, for the hit path only.
//!
//! Invariant: only writers, holding the uprobe's file stripe, fill a slot (when
//! the uprobe enters the tree) and clear it with a CAS *before* the uprobe is
//! unlinked, so a pointer read inside a read section points to a live node; it
//! is compared with the key before use, so a collision is a miss, never a wrong
//! uprobe. Fixed size ([`DEFAULT_HIT_CACHE_SLOTS`], or
//! [`UprobeRegistry::with_hit_cache_slots`](super::UprobeRegistry::with_hit_cache_slots)).
//!
//! Why, the two-way sets and the safety argument, in full:
//! [`crate::docs::algorithms::uprobes`].

use super::registry::{Uprobe, UprobeRegistry};
use super::space::{AddressSpace, UprobeKey};
use crate::probes::arch::Arch;
use crate::rcu::Flavor;
use crate::sync::atomic::{AtomicPtr, Ordering};

/// Default slots of the hit cache. 4,096 pointers are 32 KiB per registry
/// and keep collisions rare up to about a thousand uprobes (the benchmark's
/// size: 3% of a thousand random offsets lose their slot); registries with
/// many more uprobes can ask for more slots.
/// Under loom, 4: the model's registries hold a handful of uprobes and
/// every slot is an object loom tracks.
#[cfg(not(loom))]
pub const DEFAULT_HIT_CACHE_SLOTS: usize = 4096;
/// Default slots of the hit cache (loom build: see the normal build's
/// docs).
#[cfg(loom)]
pub const DEFAULT_HIT_CACHE_SLOTS: usize = 4;

/// The table. See the module docs.
pub(crate) struct HitCache<F: Flavor> {
    /// `2 * sets` slots; set `i` is slots `2i` and `2i + 1`.
    slots: Box<[AtomicPtr<Uprobe<F>>]>,
    sets: u64,
}

impl<F: Flavor> HitCache<F> {
    /// A table of `slots` rounded up to an even number; 0 disables the
    /// cache (every hit walks the tree).
    pub(crate) fn new(slots: usize) -> Self {
        let sets = slots.div_ceil(2);
        HitCache {
            slots: (0..2 * sets)
                .map(|_| AtomicPtr::new(core::ptr::null_mut()))
                .collect(),
            sets: sets as u64,
        }
    }

    /// The pair of slots for `key` (empty if the cache is off).
    #[inline(always)]
    fn set(&self, key: &UprobeKey) -> &[AtomicPtr<Uprobe<F>>] {
        // Fibonacci hashing: the fields folded by addition (offsets a fixed
        // stride apart stay an arithmetic sequence), multiplied by 2^64 / φ,
        // and the product's high bits taken (multiply-high by the set
        // count): consecutive multiples of most strides land in different
        // sets, which a mix that scrambles the low bits would not promise
        // (it behaves as random: about a tenth of 1,000 keys lose their
        // slot in a 4,096-slot direct-mapped table, none here for strides
        // of 1, 2, 4, 16 or 64 with two ways).
        const PHI: u64 = 0x9e37_79b9_7f4a_7c15;
        let h = key
            .offset
            .wrapping_add(key.file.inode.rotate_left(32))
            .wrapping_add(key.file.dev.rotate_left(16))
            .wrapping_mul(PHI);
        let set = ((u128::from(h) * u128::from(self.sets)) >> 64) as usize;
        self.slots.get(2 * set..2 * set + 2).unwrap_or(&[])
    }

    /// Publishes `up` (just linked in the tree under `key`). The caller
    /// holds `key`'s file stripe.
    pub(crate) fn publish(&self, key: &UprobeKey, up: &Uprobe<F>) {
        let me = up as *const Uprobe<F> as *mut Uprobe<F>;
        let set = self.set(key);
        // Release (here and in the fallback store): pairs with the Acquire
        // load in `get`; a reader that reaches the uprobe through the slot
        // sees it fully initialised (as the tree's own release store does
        // for readers that reach it through the tree). The failure order
        // is Relaxed: a failed exchange publishes nothing.
        let took = set.iter().any(|s| {
            s.compare_exchange(
                core::ptr::null_mut(),
                me,
                Ordering::Release,
                Ordering::Relaxed,
            )
            .is_ok()
        });
        if !took {
            if let Some(s) = set.last() {
                s.store(me, Ordering::Release);
            }
        }
    }

    /// Clears `key`'s slot if it holds `up`. The caller holds `key`'s file
    /// stripe and is about to unlink `up` from the tree.
    pub(crate) fn retract(&self, key: &UprobeKey, up: &Uprobe<F>) {
        let me = up as *const Uprobe<F> as *mut Uprobe<F>;
        for s in self.set(key) {
            // Relaxed: what keeps a reader from using the pointer after
            // the node is freed is the grace period between the unlink
            // (which follows this in program order) and the free, which
            // orders every write made before it before any read section
            // begun after it (module docs). A failed exchange (another
            // uprobe took the slot) publishes nothing.
            let _ = s.compare_exchange(
                me,
                core::ptr::null_mut(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// The uprobe cached for `key`, if the slot holds exactly that one.
    /// The caller is in a read section of the domain that frees the
    /// uprobe tree's nodes (the registry's domain), which `'g` is tied to.
    #[inline(always)]
    pub(crate) fn get<'g>(
        &self,
        _guard: &'g F::Guard<'_>,
        key: &UprobeKey,
    ) -> Option<&'g Uprobe<F>> {
        self.set(key).iter().find_map(|s| {
            // Acquire: pairs with the Release stores in `publish`.
            let p = s.load(Ordering::Acquire);
            if p.is_null() {
                return None;
            }
            // A non-null slot points to a uprobe inside a tree node that was
            // linked when it was published and is freed only a grace period
            // after its retraction; the caller's read section (`_guard`, of
            // the registry's domain) began before that grace period ended
            // or it would have seen the slot cleared (module docs).
            // SAFETY: so the node lives at least as long as `'g`.
            let up = unsafe { &*p };
            (up.key == *key).then_some(up)
        })
    }
}

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// Takes `up` out of the hit cache, then out of the tree. The caller
    /// holds its file stripe.
    pub(super) fn remove_uprobe(&self, up: &Uprobe<F>) {
        // Retract first: see `hitcache.rs` for why the order matters.
        self.hot.retract(&up.key, up);
        self.uprobes.remove(&up.key);
    }

    /// The uprobe at `key`, inside `guard`: through the hit cache, else the
    /// tree. `guard` is a read section of the registry's domain.
    #[inline(always)]
    pub(crate) fn uprobe_at<'g>(
        &self,
        guard: &'g F::Guard<'_>,
        key: &UprobeKey,
    ) -> Option<&'g Uprobe<F>> {
        match self.hot.get(guard, key) {
            Some(u) => Some(u),
            None => self.uprobes.get(guard, key),
        }
    }

    /// Sets the number of hit-cache slots (rounded up to an even number;
    /// default [`DEFAULT_HIT_CACHE_SLOTS`]; 0 turns the cache off). Uprobes
    /// that find no slot of their own are looked up in the uprobe tree on
    /// each hit, so more slots than uprobes keeps every hit on the
    /// one-load path. Call on a new registry: the uprobes registered before
    /// are found through the tree.
    pub fn with_hit_cache_slots(mut self, slots: usize) -> Self {
        self.hot = HitCache::new(slots);
        self
    }
}
