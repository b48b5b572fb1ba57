//! Benchmark peers for `rcu-registry` that are not Rust crates.
//!
//! # liburcu-memb
//!
//! [`UrcuMemb`] drives Debian's liburcu (the `memb` flavor: membarrier-based
//! asymmetric barriers, the same design as `rcu_registry::rcu::Rcu`) through a
//! small C shim compiled by `build.rs`. The shim inlines liburcu's read-side
//! fast path, as a C program built with `_LGPL_SOURCE` would, and runs its
//! measured loops in C so that no FFI call sits inside a read section.
//!
//! When the liburcu-dev header is not installed the shim is not built and
//! [`UrcuMemb::get`] returns `None`: benchmarks skip the peer instead of
//! failing to build.

#![deny(missing_docs)]

use std::sync::atomic::AtomicI32;

/// Handle to liburcu-memb, available only when the shim was built.
#[derive(Clone, Copy, Debug)]
pub struct UrcuMemb {
    _private: (),
}

/// A value published the way liburcu readers expect: a pointer to a `long`.
///
/// Readers dereference `*published`, then load the pointee.
#[derive(Debug)]
pub struct Published {
    value: Box<std::ffi::c_long>,
    ptr: *const std::ffi::c_long,
}

// SAFETY: the pointer targets `value`, owned by the same struct and never
// written after construction, so sharing it across threads is a shared read.
unsafe impl Send for Published {}
// SAFETY: as above: readers only load through it.
unsafe impl Sync for Published {}

impl Published {
    /// Publishes `v`.
    pub fn new(v: std::ffi::c_long) -> Published {
        let value = Box::new(v);
        let ptr: *const std::ffi::c_long = &*value;
        Published { value, ptr }
    }

    /// The published value.
    pub fn value(&self) -> std::ffi::c_long {
        *self.value
    }

    fn as_c(&self) -> *const *const std::ffi::c_long {
        &self.ptr
    }
}

#[cfg(have_liburcu)]
mod ffi {
    use std::ffi::{c_int, c_long, c_ulong};
    extern "C" {
        pub fn bp_urcu_register_thread();
        pub fn bp_urcu_unregister_thread();
        pub fn bp_urcu_synchronize();
        pub fn bp_urcu_read_pairs(published: *const *const c_long, n: c_ulong) -> c_long;
        pub fn bp_urcu_read_until(published: *const *const c_long, stop: *const c_int) -> c_long;
        pub fn bp_urcu_read_slow_until(
            published: *const *const c_long,
            stop: *const c_int,
            hold_ns: c_long,
        ) -> c_long;
    }
}

/// A liburcu reader registration for the current thread; unregisters on drop.
///
/// liburcu-memb requires every reader thread to register before its first
/// read section.
#[derive(Debug)]
pub struct Registration {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        #[cfg(have_liburcu)]
        // SAFETY: this thread registered when the value was created.
        unsafe {
            ffi::bp_urcu_unregister_thread()
        };
    }
}

impl UrcuMemb {
    /// The peer, if the shim was built against an installed liburcu.
    pub fn get() -> Option<UrcuMemb> {
        if cfg!(have_liburcu) {
            Some(UrcuMemb { _private: () })
        } else {
            None
        }
    }

    /// Registers the calling thread as a liburcu reader.
    pub fn register(&self) -> Registration {
        #[cfg(have_liburcu)]
        // SAFETY: registering any thread is allowed; the returned value
        // unregisters it on the same thread (it is !Send).
        unsafe {
            ffi::bp_urcu_register_thread()
        };
        Registration {
            _not_send: std::marker::PhantomData,
        }
    }

    /// Runs `n` read pairs (lock, dereference `published`, unlock) on the
    /// calling thread, which must hold a [`Registration`]. Returns the sum of
    /// the values read, so the loop cannot be optimised away.
    pub fn read_pairs(&self, _reg: &Registration, published: &Published, n: u64) -> i64 {
        #[cfg(have_liburcu)]
        {
            // SAFETY: the thread is registered (witnessed by `_reg`), and
            // `published` points to a live pointer to a live long.
            unsafe { ffi::bp_urcu_read_pairs(published.as_c(), n as std::ffi::c_ulong) as i64 }
        }
        #[cfg(not(have_liburcu))]
        {
            let _ = (published.as_c(), n);
            unreachable!("UrcuMemb exists only when liburcu is available")
        }
    }

    /// Runs read pairs until `stop` becomes non-zero (a busy reader).
    pub fn read_until(&self, _reg: &Registration, published: &Published, stop: &AtomicI32) -> i64 {
        #[cfg(have_liburcu)]
        {
            // SAFETY: as in `read_pairs`; `stop` is a live, aligned int that
            // the C side only loads.
            unsafe { ffi::bp_urcu_read_until(published.as_c(), stop.as_ptr()) as i64 }
        }
        #[cfg(not(have_liburcu))]
        {
            let _ = (published.as_c(), stop);
            unreachable!("UrcuMemb exists only when liburcu is available")
        }
    }

    /// Runs read sections that each last `hold` (spinning inside) until
    /// `stop` becomes non-zero: a slow reader.
    pub fn read_slow_until(
        &self,
        _reg: &Registration,
        published: &Published,
        stop: &AtomicI32,
        hold: std::time::Duration,
    ) -> i64 {
        #[cfg(have_liburcu)]
        {
            let hold_ns = hold.as_nanos().min(std::ffi::c_long::MAX as u128) as std::ffi::c_long;
            // SAFETY: as in `read_until`.
            unsafe { ffi::bp_urcu_read_slow_until(published.as_c(), stop.as_ptr(), hold_ns) as i64 }
        }
        #[cfg(not(have_liburcu))]
        {
            let _ = (published.as_c(), stop, hold);
            unreachable!("UrcuMemb exists only when liburcu is available")
        }
    }

    /// `urcu_memb_synchronize_rcu()`: waits for every pre-existing reader.
    pub fn synchronize(&self) {
        #[cfg(have_liburcu)]
        // SAFETY: may be called from any thread outside a read section; the
        // shim never leaves the caller inside one.
        unsafe {
            ffi::bp_urcu_synchronize()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liburcu_read_pairs_read_the_published_value_and_synchronize_returns() {
        let Some(urcu) = UrcuMemb::get() else {
            eprintln!("liburcu-dev not installed: nothing to test");
            return;
        };
        let reg = urcu.register();
        let published = Published::new(7);
        assert_eq!(urcu.read_pairs(&reg, &published, 1000), 7000);
        drop(reg);
        urcu.synchronize();
    }
}
