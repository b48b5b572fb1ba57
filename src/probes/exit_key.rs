//! Running code when a thread exits, armed from a hit path: a POSIX
//! thread-specific key used only for its destructor.
//!
//! # Why a key
//!
//! A Rust `thread_local!` with a destructor registers it lazily, at the
//! thread's first access, and registering may allocate (glibc's
//! `__cxa_thread_atexit_impl`): not something a trap handler may do. A
//! `pthread` key is created once, on a writer path ([`ExitKey::prepare`]);
//! a thread then arms it with `pthread_setspecific` and a non-null marker
//! ([`ExitKey::arm`]), which glibc stores without allocating for the
//! process's first 32 keys (the same caveat as the RCU reader slots'). At
//! thread exit the C library calls the destructor on the exiting thread.
//! Should the key not be creatable (the process out of keys), arming does
//! nothing and the destructor never runs; users say what that costs.
//!
//! The callers keep their own "armed" thread-local flag, so a hit path pays
//! one thread-local test per arming point and the system call once per
//! thread. Not under loom: a model thread's destructors would run after its
//! execution's objects are gone.

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
