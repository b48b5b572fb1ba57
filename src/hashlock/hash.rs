//! The stripe hash: a word-at-a-time multiplicative hasher with a
//! xorshift-multiply finalizer, and the map from its output to a stripe.
//!
//! Invariant: the *top* bits of [`StripeHasher::finish`] depend on every bit of
//! every word, and [`stripe_index`] takes exactly those (`(hash * len) >> 64`,
//! in range even for `len = 1`). The hash is unkeyed, so `stripe_of` is
//! deterministic within a build.
//!
//! Folding, finalizing, and why not SipHash (with measurements):
//! [`crate::docs::algorithms::hashed_locks`].

use core::hash::{Hash, Hasher};

/// Multiplier folding each word into the state: ⌊2⁶⁴/φ⌋ rounded to odd
/// (Knuth's Fibonacci-hashing constant). Odd, so the multiply is a bijection;
/// its bits are spread evenly, so consecutive keys land far apart.
const FOLD_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// Rotation of the state before the next word is folded in. The previous
/// multiply pushed that word's entropy towards the top; rotating by a
/// non-multiple of 8 moves it down among bits the next word also touches.
const FOLD_ROTATE: u32 = 26;

/// Finalizer shift: half the word, so the high half (which depends on every
/// input bit) lands on the low half before the last multiply.
const FINAL_SHIFT: u32 = 32;

/// Finalizer multiplier: the second constant of MurmurHash3's 64-bit
/// finalizer (public domain), chosen there for avalanche. Odd.
const FINAL_MUL: u64 = 0xc4ce_b9fe_1a85_ec53;

/// A fast, unkeyed [`Hasher`] for picking lock stripes. See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct StripeHasher {
    state: u64,
}

impl StripeHasher {
    #[inline(always)]
    fn fold(&mut self, word: u64) {
        self.state = (self.state.rotate_left(FOLD_ROTATE) ^ word).wrapping_mul(FOLD_MUL);
    }
}

impl Hasher for StripeHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.fold(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // At most 7 bytes remain, so the top byte is free to carry their
            // count: "ab" and "ab\0" then fold to different words.
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            word[7] = rest.len() as u8;
            self.fold(u64::from_le_bytes(word));
        }
    }

    #[inline(always)]
    fn write_u8(&mut self, n: u8) {
        self.fold(u64::from(n));
    }

    #[inline(always)]
    fn write_u16(&mut self, n: u16) {
        self.fold(u64::from(n));
    }

    #[inline(always)]
    fn write_u32(&mut self, n: u32) {
        self.fold(u64::from(n));
    }

    #[inline(always)]
    fn write_u64(&mut self, n: u64) {
        self.fold(n);
    }

    #[inline(always)]
    fn write_u128(&mut self, n: u128) {
        self.fold(n as u64);
        self.fold((n >> 64) as u64);
    }

    #[inline(always)]
    fn write_usize(&mut self, n: usize) {
        self.fold(n as u64);
    }

    #[inline(always)]
    fn finish(&self) -> u64 {
        let h = self.state;
        (h ^ (h >> FINAL_SHIFT)).wrapping_mul(FINAL_MUL)
    }
}

/// Hashes `key` with [`StripeHasher`].
#[inline]
pub(crate) fn hash_key<K: Hash + ?Sized>(key: &K) -> u64 {
    let mut hasher = StripeHasher::default();
    key.hash(&mut hasher);
    hasher.finish()
}

/// Maps a hash to a stripe in `0..len`: the high bits of `hash * len`, which
/// for a power-of-two `len` are the top `log2(len)` bits of `hash`.
#[inline(always)]
pub(crate) fn stripe_index(hash: u64, len: usize) -> usize {
    ((u128::from(hash) * len as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_index_is_the_top_bits_for_powers_of_two() {
        let hash = 0xdead_beef_0123_4567_u64;
        for bits in 1..=16u32 {
            assert_eq!(
                stripe_index(hash, 1 << bits),
                (hash >> (64 - bits)) as usize
            );
        }
    }

    #[test]
    fn stripe_index_with_one_stripe_is_always_zero() {
        for hash in [0, 1, u64::MAX, 1 << 63] {
            assert_eq!(stripe_index(hash, 1), 0);
        }
    }

    #[test]
    fn tuple_order_changes_the_hash() {
        assert_ne!(hash_key(&(1u64, 2u64)), hash_key(&(2u64, 1u64)));
    }

    #[test]
    fn short_byte_tails_that_differ_only_by_trailing_zeros_hash_differently() {
        let mut a = StripeHasher::default();
        a.write(b"ab");
        let mut b = StripeHasher::default();
        b.write(b"ab\0");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn every_input_bit_reaches_the_top_bits() {
        // Flipping any single bit of a u64 key must be able to change the
        // top 8 bits (the stripe of a 256-stripe array) for most keys.
        for bit in 0..64 {
            let changed = (0..256u64)
                .filter(|&k| {
                    let k = k.wrapping_mul(0x0123_4567_89ab_cdef);
                    hash_key(&k) >> 56 != hash_key(&(k ^ (1 << bit))) >> 56
                })
                .count();
            assert!(
                changed > 200,
                "bit {bit} changed the top byte for only {changed}/256 keys"
            );
        }
    }
}
