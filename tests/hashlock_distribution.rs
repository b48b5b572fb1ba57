//! Distribution quality of the stripe hash: realistic key patterns spread
//! evenly over the stripes. Prints the worst max/fair and min/fair ratios.

// The std locks are stripes only in normal builds; under `--cfg loom` the
// crate's stripes are loom's locks and the loom-tests crate does the testing.
#![cfg(not(loom))]

use std::hash::Hash;

use rcu_registry::hashlock::{HashedLocks, SpinLock};

/// Keys per pattern: the 64k sequential keys of the specification.
const KEYS: u64 = 65_536;

/// The stripe counts checked: up to 1,024, so every stripe's fair share is at
/// least 64 keys and a 2x bound is a statement about the hash, not about the
/// tail of a small-sample binomial.
const STRIPE_COUNTS: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// Loads per stripe for `keys`, and (max / fair, min / fair).
fn spread<K: Hash>(stripes: usize, keys: impl Iterator<Item = K>) -> (f64, f64) {
    let locks: HashedLocks<K, SpinLock> = HashedLocks::new(stripes).unwrap();
    let mut load = vec![0u64; stripes];
    let mut n = 0u64;
    for key in keys {
        load[locks.stripe_of(&key)] += 1;
        n += 1;
    }
    let fair = n as f64 / stripes as f64;
    let max = *load.iter().max().unwrap() as f64;
    let min = *load.iter().min().unwrap() as f64;
    (max / fair, min / fair)
}

fn check<K: Hash>(pattern: &str, keys: impl Fn() -> Box<dyn Iterator<Item = K>>) {
    let mut worst = (0.0f64, f64::INFINITY);
    let mut at_64 = 0.0;
    for stripes in STRIPE_COUNTS {
        let (max, min) = spread(stripes, keys());
        assert!(
            max <= 2.0,
            "{pattern}: a stripe of {stripes} got {max:.2}x its fair share"
        );
        assert!(
            min >= 0.5,
            "{pattern}: a stripe of {stripes} got only {min:.2}x its fair share"
        );
        worst = (worst.0.max(max), worst.1.min(min));
        if stripes == 64 {
            at_64 = max;
        }
    }
    println!(
        "{pattern:<30} max/fair at 64 stripes {at_64:.3}; worst over 1..=1024: max/fair {:.3}, min/fair {:.3}",
        worst.0, worst.1
    );
}

#[test]
fn sequential_u64_keys_spread_within_twice_the_fair_share() {
    check("sequential u64", || Box::new(0..KEYS));
}

#[test]
fn sequential_u32_thread_ids_spread_within_twice_the_fair_share() {
    #[derive(Hash)]
    struct ThreadKey(u32);
    check("sequential u32 newtype", || {
        Box::new((1000..1000 + KEYS as u32).map(ThreadKey))
    });
}

#[test]
fn page_aligned_addresses_spread_within_twice_the_fair_share() {
    check("4 KiB-strided addresses", || {
        Box::new((0..KEYS).map(|i| 0x7f00_0000_0000u64 + (i << 12)))
    });
}

#[test]
fn cache_line_aligned_pointers_spread_within_twice_the_fair_share() {
    check("64 B-strided usize", || {
        Box::new((0..KEYS as usize).map(|i| 0x5555_0000_0000usize + i * 64))
    });
}

#[test]
fn high_bit_only_keys_spread_within_twice_the_fair_share() {
    // Keys that differ only above bit 40 (e.g. a counter in the top bits).
    check("keys differing above bit 40", || {
        Box::new((0..KEYS).map(|i| i << 40))
    });
}

#[test]
fn file_offset_pairs_spread_within_twice_the_fair_share() {
    // (inode, offset) keys: few files, many probe offsets.
    check("(inode, offset) tuples", || {
        Box::new((0..KEYS).map(|i| (i % 16, (i / 16) * 4)))
    });
}

#[test]
fn path_strings_spread_within_twice_the_fair_share() {
    check("\"/usr/lib/libN.so\" strings", || {
        Box::new((0..KEYS).map(|i| format!("/usr/lib/lib{i}.so")))
    });
}
