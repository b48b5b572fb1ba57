//! In-order scans of a [`SeqTree`]: [`SeqTree::iter`] and [`SeqTree::range`].
//!
//! # Validated by the sequence count, not locked
//!
//! A scan never takes the writer lock for long and never blocks writers.
//! Each step looks for the smallest key after the last one returned with a
//! fresh lock-free descent from the root, and accepts the answer only if the
//! tree's [`SeqCount`](super::SeqCount) shows no writer overlapped that
//! descent (after a few failed attempts that one step is redone under the
//! writer lock). Hence:
//!
//! - keys come out strictly increasing, each at most once;
//! - a key present for the whole scan is returned;
//! - a key inserted or removed during the scan may or may not be;
//! - each `(&K, &V)` is an entry that was in the tree during the scan and
//!   stays readable until the guard drops.
//!
//! The scan is *not* a snapshot: it may show a later insert and miss an
//! earlier removal. Each step costs one descent (`O(log n)`).

use core::borrow::Borrow;
use core::marker::PhantomData;
use core::ops::{Bound, RangeBounds, RangeFull};

use super::tree::SeqTree;
use crate::rcu::Flavor;

/// An in-order scan of a [`SeqTree`] (see the [module docs](self)); created
/// by [`SeqTree::range`] and [`SeqTree::iter`].
pub struct Range<'a, K, V, F, Q: ?Sized, R>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    tree: &'a SeqTree<K, V, F>,
    range: R,
    /// The last key returned: the next step looks strictly after it.
    last: Option<&'a K>,
    done: bool,
    _query: PhantomData<fn(&Q)>,
}

/// A scan of every entry, created by [`SeqTree::iter`].
pub type Iter<'a, K, V, F> = Range<'a, K, V, F, K, RangeFull>;

impl<K, V, F> SeqTree<K, V, F>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    /// The entries whose keys are in `range`, in key order, lock-free and
    /// validated by the sequence count (see [`Range`] for what that
    /// guarantees under concurrent writes). Items live as long as `guard`.
    ///
    /// # Panics
    ///
    /// If `guard` is not a read section of the tree's domain instance.
    pub fn range<'a, Q, R>(&'a self, guard: &'a F::Guard<'_>, range: R) -> Range<'a, K, V, F, Q, R>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
        R: RangeBounds<Q>,
    {
        self.check_guard(guard);
        Range {
            tree: self,
            range,
            last: None,
            done: false,
            _query: PhantomData,
        }
    }

    /// Every entry in key order (as [`range`](SeqTree::range) with `..`).
    pub fn iter<'a>(&'a self, guard: &'a F::Guard<'_>) -> Iter<'a, K, V, F> {
        self.range(guard, ..)
    }
}

impl<'a, K, V, F, Q, R> Iterator for Range<'a, K, V, F, Q, R>
where
    K: Ord + Send + Borrow<Q> + 'static,
    V: Send + 'static,
    F: Flavor,
    Q: Ord + ?Sized,
    R: RangeBounds<Q>,
{
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<(&'a K, &'a V)> {
        if self.done {
            return None;
        }
        let lower = match self.last {
            Some(k) => Bound::Excluded(k.borrow()),
            None => self.range.start_bound(),
        };
        let Some(n) = self.tree.lower_bound(lower) else {
            self.done = true;
            return None;
        };
        // SAFETY: `n` was reached inside the read section of the guard that
        // `range` borrowed for `'a` (checked to be the tree's domain), so it
        // is freed only after `'a`. Keys and values never change in place.
        let node: &'a _ = unsafe { &*n };
        let k: &Q = node.key.borrow();
        let inside = match self.range.end_bound() {
            Bound::Unbounded => true,
            Bound::Included(end) => k <= end,
            Bound::Excluded(end) => k < end,
        };
        if !inside {
            self.done = true;
            return None;
        }
        self.last = Some(&node.key);
        Some((&node.key, &node.value))
    }
}

impl<K, V, F, Q, R> core::iter::FusedIterator for Range<'_, K, V, F, Q, R>
where
    K: Ord + Send + Borrow<Q> + 'static,
    V: Send + 'static,
    F: Flavor,
    Q: Ord + ?Sized,
    R: RangeBounds<Q>,
{
}
