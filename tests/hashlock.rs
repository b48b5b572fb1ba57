//! Specification tests for `rcu_registry::hashlock`: construction, which
//! stripes each operation holds, acquisition and release order, layouts, the
//! debug lock-order check, and the stripe data.

// The std locks are stripes only in normal builds; under `--cfg loom` the
// crate's stripes are loom's locks and the loom-tests crate does the testing.
#![cfg(not(loom))]

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, RwLock};

use rcu_registry::hashlock::{
    CompactHashedLocks, HashedLocks, PairMut, SpinLock, StripeCountError, StripeLock, MAX_STRIPES,
};

/// The stripes of `locks` that a `try_lock_stripe` cannot take right now.
fn held_stripes<L: StripeLock, T>(locks: &HashedLocks<u64, L, T>) -> BTreeSet<usize> {
    (0..locks.len())
        .filter(|&s| locks.try_lock_stripe(s).is_none())
        .collect()
}

/// The first key (counting from 0) that hashes to `stripe`.
fn key_on<L: StripeLock, T>(locks: &HashedLocks<u64, L, T>, stripe: usize) -> u64 {
    (0..).find(|k| locks.stripe_of(k) == stripe).unwrap()
}

/// Two different keys on the same stripe.
fn colliding_keys<L: StripeLock, T>(locks: &HashedLocks<u64, L, T>) -> (u64, u64) {
    let a = 0;
    let b = (1..)
        .find(|k| locks.stripe_of(k) == locks.stripe_of(&a))
        .unwrap();
    (a, b)
}

fn new<L: StripeLock>(stripes: usize) -> HashedLocks<u64, L> {
    HashedLocks::new(stripes).unwrap()
}

#[test]
fn stripe_count_is_rounded_up_to_a_power_of_two() {
    for requested in (1..=300).chain([511, 512, 513, 4095, MAX_STRIPES - 1, MAX_STRIPES]) {
        let locks = new::<SpinLock>(requested);
        assert_eq!(
            locks.len(),
            requested.next_power_of_two(),
            "requested {requested}"
        );
    }
}

#[test]
fn zero_stripes_is_a_typed_error_and_builds_nothing() {
    let mut calls = 0;
    let result = HashedLocks::<u64, SpinLock, u8>::with_data(0, |_| {
        calls += 1;
        0
    });
    assert_eq!(result.unwrap_err(), StripeCountError::Zero);
    assert_eq!(calls, 0, "no stripe data may be built for a rejected count");
}

#[test]
fn more_than_max_stripes_is_a_typed_error_and_builds_nothing() {
    for requested in [MAX_STRIPES + 1, usize::MAX / 2 + 2, usize::MAX] {
        let mut calls = 0;
        let result = HashedLocks::<u64, Mutex<()>, u8>::with_data(requested, |_| {
            calls += 1;
            0
        });
        assert_eq!(result.unwrap_err(), StripeCountError::TooMany { requested });
        assert_eq!(calls, 0);
    }
    let message = StripeCountError::TooMany { requested: 1 << 20 }.to_string();
    assert!(message.contains("1048576") && message.contains(&MAX_STRIPES.to_string()));
}

#[test]
fn stripe_of_is_in_range_and_deterministic_across_arrays_and_layouts() {
    for len in [1, 2, 4, 64, 1024] {
        let a = new::<SpinLock>(len);
        let b = new::<Mutex<()>>(len);
        let c: CompactHashedLocks<u64, SpinLock> = HashedLocks::new(len).unwrap();
        for key in 0..2_000u64 {
            let s = a.stripe_of(&key);
            assert!(s < len);
            assert_eq!(s, b.stripe_of(&key));
            assert_eq!(s, c.stripe_of(&key));
        }
    }
}

#[test]
fn a_one_stripe_array_puts_every_key_on_stripe_zero() {
    let locks = new::<SpinLock>(1);
    assert!((0..1000u64).all(|k| locks.stripe_of(&k) == 0));
    let (a, b) = (1, 2);
    let pair = locks.lock_pair(&a, &b);
    assert!(pair.is_single());
}

fn lock_holds_exactly_the_stripe_of_its_key<L: StripeLock>() {
    let locks = new::<L>(16);
    for key in 0..64u64 {
        let guard = locks.lock(&key);
        assert_eq!(guard.stripe(), locks.stripe_of(&key));
        assert_eq!(held_stripes(&locks), BTreeSet::from([guard.stripe()]));
        drop(guard);
        assert!(
            held_stripes(&locks).is_empty(),
            "dropping the guard releases the stripe"
        );
    }
}

#[test]
fn lock_holds_exactly_the_stripe_of_its_key_for_every_lock_kind() {
    lock_holds_exactly_the_stripe_of_its_key::<SpinLock>();
    lock_holds_exactly_the_stripe_of_its_key::<Mutex<()>>();
    lock_holds_exactly_the_stripe_of_its_key::<RwLock<()>>();
}

#[test]
fn try_lock_fails_on_a_held_stripe_and_succeeds_once_it_is_released() {
    let locks = new::<Mutex<()>>(8);
    let guard = locks.lock(&5);
    assert!(locks.try_lock(&5).is_none());
    drop(guard);
    assert!(locks.try_lock(&5).is_some());
}

fn lock_pair_holds_both_stripes_and_nothing_else<L: StripeLock>() {
    let locks = new::<L>(16);
    let a = key_on(&locks, 3);
    let b = key_on(&locks, 11);
    for (x, y) in [(a, b), (b, a)] {
        let pair = locks.lock_pair(&x, &y);
        assert!(!pair.is_single());
        assert!(pair.holds(3) && pair.holds(11) && !pair.holds(4));
        assert_eq!(held_stripes(&locks), BTreeSet::from([3, 11]));
        drop(pair);
        assert!(held_stripes(&locks).is_empty());
    }
}

#[test]
fn lock_pair_holds_both_stripes_and_nothing_else_for_every_lock_kind() {
    lock_pair_holds_both_stripes_and_nothing_else::<SpinLock>();
    lock_pair_holds_both_stripes_and_nothing_else::<Mutex<()>>();
    lock_pair_holds_both_stripes_and_nothing_else::<RwLock<()>>();
}

fn lock_pair_on_keys_sharing_a_stripe_locks_it_once<L: StripeLock>() {
    // Locking a non-reentrant lock twice would hang (or, for std's Mutex,
    // possibly panic): finishing is the proof it is locked once.
    let locks = new::<L>(8);
    let (a, b) = colliding_keys(&locks);
    let pair = locks.lock_pair(&a, &b);
    assert!(pair.is_single());
    assert_eq!(pair.stripes(), (locks.stripe_of(&a), locks.stripe_of(&a)));
    assert_eq!(held_stripes(&locks), BTreeSet::from([locks.stripe_of(&a)]));
    drop(pair);
    assert!(held_stripes(&locks).is_empty());
    // The same key twice is the degenerate collision.
    assert!(locks.lock_pair(&a, &a).is_single());
}

#[test]
fn lock_pair_on_keys_sharing_a_stripe_locks_it_once_for_every_lock_kind() {
    lock_pair_on_keys_sharing_a_stripe_locks_it_once::<SpinLock>();
    lock_pair_on_keys_sharing_a_stripe_locks_it_once::<Mutex<()>>();
    lock_pair_on_keys_sharing_a_stripe_locks_it_once::<RwLock<()>>();
}

#[test]
fn lock_pair_reports_and_exposes_stripes_in_argument_order() {
    let locks: HashedLocks<u64, SpinLock, Vec<u64>> = HashedLocks::new(16).unwrap();
    let a = (0..).find(|k| locks.stripe_of(k) == 9).unwrap();
    let b = (0..).find(|k| locks.stripe_of(k) == 2).unwrap();
    {
        let mut pair = locks.lock_pair(&a, &b);
        assert_eq!(pair.stripes(), (9, 2));
        pair.first_mut().push(a);
        pair.second_mut().push(b);
        match pair.both_mut() {
            PairMut::Distinct(first, second) => {
                first.push(1);
                second.push(2);
            }
            PairMut::Single(_) => panic!("stripes 9 and 2 are distinct"),
        }
        assert_eq!(pair.first(), &[a, 1]);
        assert_eq!(pair.second(), &[b, 2]);
    }
    assert_eq!(*locks.lock(&a), vec![a, 1]);
    assert_eq!(*locks.lock(&b), vec![b, 2]);
    let pair = locks.lock_pair(&b, &a);
    assert_eq!(pair.stripes(), (2, 9));
    assert_eq!(pair.first(), &[b, 2]);
}

#[test]
fn both_mut_on_a_single_stripe_pair_gives_one_reference() {
    let locks: HashedLocks<u64, SpinLock, u32> = HashedLocks::new(4).unwrap();
    let (a, b) = {
        let a = 0u64;
        (
            a,
            (1..)
                .find(|k| locks.stripe_of(k) == locks.stripe_of(&a))
                .unwrap(),
        )
    };
    let mut pair = locks.lock_pair(&a, &b);
    match pair.both_mut() {
        PairMut::Single(x) => *x += 1,
        PairMut::Distinct(..) => panic!("colliding keys share one stripe"),
    }
    assert_eq!((*pair.first(), *pair.second()), (1, 1));
}

fn lock_all_holds_every_stripe<L: StripeLock>() {
    let locks = new::<L>(32);
    let all = locks.lock_all();
    assert_eq!(all.len(), 32);
    assert_eq!(held_stripes(&locks).len(), 32);
    drop(all);
    assert!(held_stripes(&locks).is_empty());
}

#[test]
fn lock_all_holds_every_stripe_for_every_lock_kind() {
    lock_all_holds_every_stripe::<SpinLock>();
    lock_all_holds_every_stripe::<Mutex<()>>();
    lock_all_holds_every_stripe::<RwLock<()>>();
}

#[test]
fn lock_all_exposes_every_stripes_data_in_index_order() {
    let locks: HashedLocks<u64, Mutex<()>, usize> = HashedLocks::with_data(8, |i| i * 10).unwrap();
    let mut all = locks.lock_all();
    assert_eq!(
        all.iter().copied().collect::<Vec<_>>(),
        [0, 10, 20, 30, 40, 50, 60, 70]
    );
    for x in all.iter_mut() {
        *x += 1;
    }
    *all.get_mut(7).unwrap() = 0;
    assert_eq!(all.get(8), None);
    drop(all);
    assert_eq!(*locks.lock_stripe(3), 31);
    assert_eq!(*locks.lock_stripe(7), 0);
}

// A stripe lock that logs every acquisition and release (by lock address,
// which grows with the stripe index) to a per-thread log.
thread_local! {
    static LOG: RefCell<Vec<(char, usize)>> = const { RefCell::new(Vec::new()) };
}

struct LoggingLock(SpinLock);

struct LoggingGuard<'a> {
    lock: &'a LoggingLock,
    _inner: <SpinLock as StripeLock>::Guard<'a>,
}

impl Drop for LoggingGuard<'_> {
    fn drop(&mut self) {
        LOG.with(|log| log.borrow_mut().push(('-', self.lock as *const _ as usize)));
    }
}

// SAFETY: delegates exclusion and synchronization to the inner SpinLock.
unsafe impl StripeLock for LoggingLock {
    type Guard<'a> = LoggingGuard<'a>;

    fn new() -> Self {
        LoggingLock(SpinLock::new())
    }

    fn lock(&self) -> LoggingGuard<'_> {
        let inner = self.0.lock();
        LOG.with(|log| log.borrow_mut().push(('+', self as *const _ as usize)));
        LoggingGuard {
            lock: self,
            _inner: inner,
        }
    }

    fn try_lock(&self) -> Option<LoggingGuard<'_>> {
        let inner = self.0.try_lock()?;
        LOG.with(|log| log.borrow_mut().push(('+', self as *const _ as usize)));
        Some(LoggingGuard {
            lock: self,
            _inner: inner,
        })
    }
}

fn take_log() -> Vec<(char, usize)> {
    LOG.with(|log| std::mem::take(&mut *log.borrow_mut()))
}

#[test]
fn lock_all_acquires_in_index_order_and_releases_in_reverse() {
    let locks = new::<LoggingLock>(16);
    take_log();
    drop(locks.lock_all());
    let log = take_log();
    let (acquired, released): (Vec<_>, Vec<_>) = log.iter().partition(|(e, _)| *e == '+');
    assert_eq!(acquired.len(), 16);
    assert!(
        log[..16].iter().all(|(e, _)| *e == '+'),
        "all acquisitions precede releases"
    );
    let acquired: Vec<usize> = acquired.iter().map(|(_, a)| *a).collect();
    let mut released: Vec<usize> = released.iter().map(|(_, a)| *a).collect();
    assert!(
        acquired.windows(2).all(|w| w[0] < w[1]),
        "ascending: {acquired:x?}"
    );
    released.reverse();
    assert_eq!(released, acquired, "released in exactly the reverse order");
}

#[test]
fn lock_pair_acquires_the_lower_stripe_first_and_releases_it_last() {
    let locks = new::<LoggingLock>(16);
    let a = (0..).find(|k| locks.stripe_of(k) == 12).unwrap();
    let b = (0..).find(|k| locks.stripe_of(k) == 5).unwrap();
    for (x, y) in [(a, b), (b, a)] {
        take_log();
        drop(locks.lock_pair(&x, &y));
        let log = take_log();
        let events: Vec<char> = log.iter().map(|(e, _)| *e).collect();
        assert_eq!(events, ['+', '+', '-', '-']);
        let (low, high) = (log[0].1, log[1].1);
        assert!(low < high, "stripe 5 is locked before stripe 12");
        assert_eq!((log[2].1, log[3].1), (high, low), "released high, then low");
    }
}

#[test]
fn rwlock_readers_share_a_stripe_and_exclude_writers() {
    let locks = new::<RwLock<()>>(8);
    let key = 77u64;
    let stripe = locks.stripe_of(&key);
    let reader = locks.read(&key);
    assert_eq!(reader.stripe(), stripe);
    assert!(
        locks.try_read_stripe(stripe).is_some(),
        "a second reader gets in"
    );
    assert!(locks.try_lock_stripe(stripe).is_none(), "a writer does not");
    assert!(locks.try_lock(&key).is_none());
    drop(reader);
    let writer = locks.lock(&key);
    assert!(locks.try_read(&key).is_none(), "a writer excludes readers");
    drop(writer);
}

#[test]
fn read_pair_and_read_all_hold_their_stripes_shared() {
    let locks = new::<RwLock<()>>(8);
    let a = key_on(&locks, 1);
    let b = key_on(&locks, 6);
    let pair = locks.read_pair(&b, &a);
    assert_eq!(pair.stripes(), (6, 1));
    assert_eq!(held_stripes(&locks), BTreeSet::from([1, 6]));
    assert!((0..8).all(|s| locks.try_read_stripe(s).is_some()));
    drop(pair);
    let all = locks.read_all();
    assert_eq!(held_stripes(&locks).len(), 8);
    assert!((0..8).all(|s| locks.try_read_stripe(s).is_some()));
    drop(all);
    assert!(held_stripes(&locks).is_empty());
}

#[test]
fn data_written_under_a_stripe_is_seen_by_the_next_holder_on_another_thread() {
    let locks: HashedLocks<u64, SpinLock, u64> = HashedLocks::new(4).unwrap();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for k in 0..10_000u64 {
                    *locks.lock(&(k % 8)) += 1;
                }
            });
        }
    });
    let total: u64 = locks.lock_all().iter().sum();
    assert_eq!(total, 20_000);
}

#[test]
fn unsized_keys_are_hashed_by_their_contents() {
    let locks: HashedLocks<str, Mutex<()>> = HashedLocks::new(64).unwrap();
    let owned = String::from("libc.so.6");
    assert_eq!(
        locks.stripe_of("libc.so.6"),
        locks.stripe_of(owned.as_str())
    );
    let guard = locks.lock("libc.so.6");
    assert!(locks.try_lock(&owned).is_none());
    drop(guard);
}

#[test]
fn a_panic_while_holding_a_mutex_stripe_does_not_poison_it() {
    let locks: HashedLocks<u64, Mutex<()>, u32> = HashedLocks::new(4).unwrap();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut guard = locks.lock(&1);
        *guard = 7;
        panic!("holder panics");
    }));
    assert!(result.is_err());
    assert_eq!(
        *locks.lock(&1),
        7,
        "the stripe is usable and keeps its data"
    );
    assert!(locks.try_lock(&1).is_some());
}

#[test]
fn padded_stripes_are_a_cache_padding_apart_and_compact_ones_are_packed() {
    let padding = std::mem::align_of::<crossbeam_utils::CachePadded<u8>>();
    assert!(padding >= 64);
    assert_eq!(HashedLocks::<u64, SpinLock>::stride(), padding);
    assert_eq!(HashedLocks::<u64, Mutex<()>>::stride(), padding);
    assert_eq!(CompactHashedLocks::<u64, SpinLock>::stride(), 1);
    assert_eq!(
        CompactHashedLocks::<u64, Mutex<()>>::stride(),
        std::mem::size_of::<Mutex<()>>()
    );
    assert_eq!(
        CompactHashedLocks::<u64, SpinLock, u64>::stride(),
        std::mem::size_of::<u64>() * 2,
        "compact stripes with data are the lock and data, aligned"
    );
}

#[test]
#[should_panic(expected = "out of range")]
fn lock_stripe_out_of_range_panics() {
    let locks = new::<SpinLock>(4);
    let _guard = locks.lock_stripe(4);
}

#[test]
fn debug_output_names_the_shape_without_locking() {
    let locks: CompactHashedLocks<u64, SpinLock> = HashedLocks::new(3).unwrap();
    let _all = locks.lock_all();
    let text = format!("{locks:?}");
    assert!(
        text.contains("stripes: 4") && text.contains("compact"),
        "{text}"
    );
}

/// The debug-build lock-order check (compiled away in release builds).
#[cfg(debug_assertions)]
mod lock_order {
    use super::*;

    fn order_panic(f: impl FnOnce()) -> String {
        let err = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a lock-order panic");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    }

    #[test]
    fn lock_all_while_holding_a_stripe_panics_before_locking_anything() {
        let locks = new::<Mutex<()>>(8);
        let message = order_panic(|| {
            let _held = locks.lock_stripe(5);
            let _all = locks.lock_all();
        });
        assert!(message.contains("lock-order violation"), "{message}");
        assert!(
            message.contains("stripe 5") && message.contains("stripe 0"),
            "{message}"
        );
        assert!(
            held_stripes(&locks).is_empty(),
            "the panic left every stripe free"
        );
        drop(locks.lock_all()); // and the per-thread record is clean again
    }

    #[test]
    fn locking_the_same_stripe_twice_panics_instead_of_self_deadlocking() {
        let locks = new::<SpinLock>(8);
        let (a, b) = colliding_keys(&locks);
        let message = order_panic(|| {
            let _first = locks.lock(&a);
            let _second = locks.lock(&b);
        });
        assert!(message.contains("lock-order violation"), "{message}");
        assert!(held_stripes(&locks).is_empty());
    }

    #[test]
    fn locking_a_lower_stripe_while_holding_a_higher_one_panics() {
        let locks = new::<SpinLock>(8);
        let message = order_panic(|| {
            let _high = locks.lock_stripe(6);
            let _low = locks.lock_stripe(2);
        });
        assert!(
            message.contains("stripe 6") && message.contains("stripe 2"),
            "{message}"
        );
    }

    #[test]
    fn lock_pair_below_a_held_stripe_panics() {
        let locks = new::<SpinLock>(8);
        let a = key_on(&locks, 1);
        let b = key_on(&locks, 7);
        order_panic(|| {
            let _held = locks.lock_stripe(4);
            let _pair = locks.lock_pair(&a, &b);
        });
        let _held = locks.lock_stripe(0);
        drop(locks.lock_pair(&a, &b)); // above the held stripe: allowed
    }

    #[test]
    fn a_recursive_read_panics_because_a_queued_writer_would_deadlock_it() {
        let locks = new::<RwLock<()>>(8);
        order_panic(|| {
            let _r1 = locks.read(&3);
            let _r2 = locks.read(&3);
        });
    }

    #[test]
    fn ascending_acquisitions_try_locks_and_other_arrays_are_allowed() {
        let locks = new::<Mutex<()>>(8);
        let other = new::<Mutex<()>>(8);
        let _s1 = locks.lock_stripe(1);
        let _s3 = locks.lock_stripe(3);
        let _t0 = locks.try_lock_stripe(0); // try never waits: unchecked
        let _all_other = other.lock_all(); // a different array
        let _s7 = locks.lock_stripe(7);
    }

    #[test]
    fn guards_released_out_of_order_leave_no_stale_record() {
        let locks = new::<SpinLock>(8);
        let s2 = locks.lock_stripe(2);
        let s5 = locks.lock_stripe(5);
        drop(s2);
        drop(s5);
        drop(locks.lock_all());
    }

    #[test]
    fn holding_more_guards_than_the_checker_tracks_never_reports_a_false_violation() {
        let locks = new::<SpinLock>(64);
        let guards: Vec<_> = (0..40).map(|s| locks.lock_stripe(s)).collect();
        drop(guards);
        drop(locks.lock_all());
    }
}
