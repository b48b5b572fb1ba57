//! Property tests for `rcu_registry::hashlock`: for random keys and array
//! sizes, the pair and single-key operations hold exactly the stripes their
//! keys hash to, and the debug lock-order check accepts exactly the
//! ascending acquisition sequences.

// The std locks are stripes only in normal builds; under `--cfg loom` the
// crate's stripes are loom's locks and the loom-tests crate does the testing.
#![cfg(not(loom))]

use std::collections::BTreeSet;
use std::sync::{Mutex, RwLock};

use proptest::prelude::*;
use rcu_registry::hashlock::{HashedLocks, SpinLock, StripeLock};

fn held<L: StripeLock, K: std::hash::Hash + ?Sized>(locks: &HashedLocks<K, L>) -> BTreeSet<usize> {
    (0..locks.len())
        .filter(|&s| locks.try_lock_stripe(s).is_none())
        .collect()
}

fn pair_holds_exactly_the_key_stripes<L: StripeLock>(stripes: usize, a: u64, b: u64) {
    let locks: HashedLocks<u64, L> = HashedLocks::new(stripes).unwrap();
    let (sa, sb) = (locks.stripe_of(&a), locks.stripe_of(&b));
    let pair = locks.lock_pair(&a, &b);
    assert_eq!(pair.stripes(), (sa, sb));
    assert_eq!(pair.is_single(), sa == sb);
    assert_eq!(held(&locks), BTreeSet::from([sa, sb]));
    drop(pair);
    assert!(held(&locks).is_empty());
}

proptest! {
    #[test]
    fn lock_pair_locks_exactly_the_stripes_of_its_two_keys(
        bits in 0u32..=8,
        a in any::<u64>(),
        b in any::<u64>(),
    ) {
        pair_holds_exactly_the_key_stripes::<SpinLock>(1 << bits, a, b);
        pair_holds_exactly_the_key_stripes::<Mutex<()>>(1 << bits, a, b);
        pair_holds_exactly_the_key_stripes::<RwLock<()>>(1 << bits, a, b);
    }

    #[test]
    fn lock_pair_locks_exactly_the_stripes_of_two_string_keys(
        bits in 0u32..=6,
        a in ".{0,24}",
        b in ".{0,24}",
    ) {
        let locks: HashedLocks<str, SpinLock> = HashedLocks::new(1 << bits).unwrap();
        let want = BTreeSet::from([locks.stripe_of(&a), locks.stripe_of(&b)]);
        let pair = locks.lock_pair(&a, &b);
        let got: BTreeSet<usize> =
            (0..locks.len()).filter(|&s| locks.try_lock_stripe(s).is_none()).collect();
        prop_assert_eq!(got, want);
        drop(pair);
    }

    #[test]
    fn read_pair_holds_exactly_its_stripes_shared(
        bits in 0u32..=6,
        a in any::<u64>(),
        b in any::<u64>(),
    ) {
        let locks: HashedLocks<u64, RwLock<()>> = HashedLocks::new(1 << bits).unwrap();
        let pair = locks.read_pair(&a, &b);
        prop_assert_eq!(held(&locks), BTreeSet::from([locks.stripe_of(&a), locks.stripe_of(&b)]));
        prop_assert!((0..locks.len()).all(|s| locks.try_read_stripe(s).is_some()));
        drop(pair);
    }

    #[test]
    fn lock_holds_exactly_the_stripe_of_its_key(bits in 0u32..=10, key in any::<u64>()) {
        let locks: HashedLocks<u64, SpinLock> = HashedLocks::new(1 << bits).unwrap();
        let guard = locks.lock(&key);
        prop_assert_eq!(held(&locks), BTreeSet::from([locks.stripe_of(&key)]));
        drop(guard);
    }

    #[test]
    fn requested_counts_round_up_to_the_next_power_of_two(requested in 1usize..=70_000) {
        let result = HashedLocks::<u64, SpinLock>::new(requested);
        if requested.next_power_of_two() <= rcu_registry::hashlock::MAX_STRIPES {
            prop_assert_eq!(result.unwrap().len(), requested.next_power_of_two());
        } else {
            prop_assert!(result.is_err());
        }
    }
}

/// Silences the expected lock-order panics (hundreds of them) while keeping
/// every other panic message.
#[cfg(debug_assertions)]
fn quiet_order_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let expected = info
                .payload()
                .downcast_ref::<String>()
                .is_some_and(|m| m.contains("lock-order violation"));
            if !expected {
                default(info);
            }
        }));
    });
}

#[cfg(debug_assertions)]
proptest! {
    #[test]
    fn the_order_check_accepts_exactly_strictly_ascending_blocking_sequences(
        sequence in proptest::collection::vec(0usize..8, 1..6),
    ) {
        quiet_order_panics();
        let locks: HashedLocks<u64, SpinLock> = HashedLocks::new(8).unwrap();
        let ascending = sequence.windows(2).all(|w| w[0] < w[1]);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guards: Vec<_> = sequence.iter().map(|&s| locks.lock_stripe(s)).collect();
        }));
        prop_assert_eq!(result.is_ok(), ascending, "sequence {:?}", sequence);
        prop_assert!(held(&locks).is_empty(), "a rejected sequence leaves nothing locked");
    }
}
