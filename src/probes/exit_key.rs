//! Running code when a thread exits, armed from a hit path: a POSIX
//! thread-specific key used only for its destructor.
//!
//! A `thread_local!` destructor may allocate when it registers, so a key is
//! created once on a writer path ([`ExitKey::prepare`]) and armed from the hit
//! path with `pthread_setspecific` ([`ExitKey::arm`]); if the key cannot be
//! created, arming does nothing and the destructor never runs. Not under loom:
//! a model thread's destructors would run after its execution's objects are
//! gone.
//!
//! Why a key, and its costs: [`crate::docs::algorithms::kretprobes`].

use std::sync::Once;

use crate::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// A thread-specific key whose destructor runs at the exit of each thread
/// that armed it.
pub(crate) struct ExitKey {
    init: Once,
    /// Valid once `ready` is set.
    key: AtomicU32,
    ready: AtomicBool,
}

impl ExitKey {
    /// A key not created yet.
    pub(crate) const fn new() -> Self {
        ExitKey {
            init: Once::new(),
            key: AtomicU32::new(0),
            ready: AtomicBool::new(false),
        }
    }

    /// Creates the key with `destructor` (once; later calls do nothing).
    /// The destructor receives the marker value, never to be dereferenced.
    #[cold]
    pub(crate) fn prepare(&self, destructor: unsafe extern "C" fn(*mut libc::c_void)) {
        self.init.call_once(|| {
            let mut key: libc::pthread_key_t = 0;
            // SAFETY: `key` is a valid out-pointer; the destructor has the
            // required signature (the caller's function).
            if unsafe { libc::pthread_key_create(&mut key, Some(destructor)) } == 0 {
                // Relaxed: published by the Release store below.
                self.key.store(key, Ordering::Relaxed);
                // Release pairs with the Acquire in `arm`: a thread that
                // sees `ready` also sees `key`.
                self.ready.store(true, Ordering::Release);
            }
        });
    }

    /// Makes the calling thread's exit run the destructor. Returns whether
    /// it will (false before `prepare`, or if the key could not be made).
    #[cold]
    pub(crate) fn arm(&self) -> bool {
        // Acquire pairs with the Release in `prepare`.
        if !self.ready.load(Ordering::Acquire) {
            return false;
        }
        // SAFETY: the key is valid; any non-null value makes the destructor
        // run at thread exit. glibc stores it without allocating for small
        // keys (module docs).
        unsafe {
            // Relaxed: ordered by the Acquire load above.
            libc::pthread_setspecific(self.key.load(Ordering::Relaxed), 1 as *const libc::c_void);
        }
        true
    }
}
