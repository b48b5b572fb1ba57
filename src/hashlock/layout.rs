//! Stripe layouts: [`Padded`] (each stripe on its own cache line) and
//! [`Compact`] (stripes packed back to back).
//!
//! [`Padded`] puts each stripe, its lock and its data, in its own
//! [`CachePadded`] slot (128 bytes on x86_64 and aarch64) against false
//! sharing. Why pad, when not to, and the measured difference:
//! [`crate::docs::algorithms::hashed_locks`].

use core::fmt::Debug;

use crossbeam_utils::CachePadded;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Padded {}
    impl Sealed for super::Compact {}
}

/// How the stripes of an array are laid out in memory. Sealed: the choice is
/// [`Padded`] or [`Compact`].
pub trait StripeLayout: sealed::Sealed + Debug + 'static {
    /// The storage of one stripe.
    #[doc(hidden)]
    type Cell<S>;

    /// A human-readable name, for `Debug` output and benchmark labels.
    const NAME: &'static str;

    #[doc(hidden)]
    fn wrap<S>(stripe: S) -> Self::Cell<S>;

    #[doc(hidden)]
    fn get<S>(cell: &Self::Cell<S>) -> &S;
}

/// Every stripe in its own [`CachePadded`] slot (128 bytes on x86_64 and
/// aarch64, whose prefetchers fetch cache lines in pairs): two cores working
/// on different stripes never pull the same line back and forth. The
/// default layout; see [padded or compact](crate::hashlock#padded-or-compact)
/// for the measured difference.
#[derive(Debug)]
pub enum Padded {}

/// Stripes packed back to back. For single-CPU machines, where nothing runs
/// in parallel so there is no false sharing to avoid and the smaller array
/// caches better, and for memory-tight uses (64 `Mutex<()>` stripes take
/// 512 bytes instead of 8 KiB). See
/// [padded or compact](crate::hashlock#padded-or-compact).
#[derive(Debug)]
pub enum Compact {}

impl StripeLayout for Padded {
    type Cell<S> = CachePadded<S>;

    const NAME: &'static str = "padded";

    #[inline(always)]
    fn wrap<S>(stripe: S) -> CachePadded<S> {
        CachePadded::new(stripe)
    }

    #[inline(always)]
    fn get<S>(cell: &CachePadded<S>) -> &S {
        cell
    }
}

impl StripeLayout for Compact {
    type Cell<S> = S;

    const NAME: &'static str = "compact";

    #[inline(always)]
    fn wrap<S>(stripe: S) -> S {
        stripe
    }

    #[inline(always)]
    fn get<S>(cell: &S) -> &S {
        cell
    }
}
