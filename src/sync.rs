//! The sync shim: the one place that decides between `std` and `loom`.
//!
//! Every atomic, cell, lock, thread, `thread_local!` and parking primitive the
//! crate uses is imported from here, so `RUSTFLAGS="--cfg loom"` swaps them all
//! for loom's versions and no other file changes. Under loom the asymmetric
//! barriers ([`light_barrier`], [`heavy_barrier`]) both become `fence(SeqCst)`,
//! and futex waits become a `yield_now` spin so loom explores interleavings.
//!
//! Why, in full: the glossary of [`crate::docs::algorithms`] and
//! [`crate::docs::algorithms::rcu`].

#![allow(unused_imports, dead_code)]

#[cfg(not(loom))]
pub(crate) mod atomic {
    pub(crate) use std::sync::atomic::{
        compiler_fence, fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8,
        AtomicUsize, Ordering,
    };
}

#[cfg(loom)]
pub(crate) mod atomic {
    pub(crate) use loom::sync::atomic::{
        fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize,
        Ordering,
    };

    /// loom has no compiler fence: a full fence is the conservative stand-in.
    pub(crate) fn compiler_fence(order: Ordering) {
        fence(order)
    }
}

#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard};

// Reader-writer locks (hashlock stripes in read and write mode).
#[cfg(not(loom))]
pub(crate) use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(loom)]
pub(crate) use loom::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(not(loom))]
pub(crate) use std::thread;

#[cfg(loom)]
pub(crate) use loom::thread;

#[cfg(not(loom))]
pub(crate) use std::thread_local;

#[cfg(not(loom))]
mod raw_thread;
#[cfg(not(loom))]
pub(crate) use raw_thread::RawThread;

/// [`RawThread`]'s loom twin: a loom thread (loom has no `fork`).
#[cfg(loom)]
pub(crate) struct RawThread(loom::thread::JoinHandle<()>);

#[cfg(loom)]
impl RawThread {
    pub(crate) fn spawn(
        _name: &std::ffi::CStr,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<RawThread> {
        Ok(RawThread(loom::thread::spawn(f)))
    }

    pub(crate) fn detach(self) {}

    pub(crate) fn abandon(self) {}

    pub(crate) fn join(self) {
        let _ = self.0.join();
    }
}

#[cfg(not(loom))]
mod trap_local;
#[cfg(not(loom))]
pub(crate) use trap_local::{
    all_settled, registered, settle_all, thread_pointer, TrapLocal, SETTLES,
};

#[cfg(loom)]
pub(crate) use loom::thread_local;

/// Lazily initialised statics. loom needs its own so that each model
/// execution starts from fresh state.
#[cfg(loom)]
pub(crate) use loom::lazy_static;

/// `UnsafeCell` with loom's closure-based API, so that loom can check
/// concurrent accesses; in normal builds it compiles to a plain `UnsafeCell`.
#[cfg(not(loom))]
#[derive(Debug, Default)]
pub(crate) struct UnsafeCell<T: ?Sized>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(data: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(data))
    }
}

#[cfg(not(loom))]
impl<T: ?Sized> UnsafeCell<T> {
    /// Gives `f` a shared raw pointer to the contents.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Gives `f` an exclusive raw pointer to the contents.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

/// A busy-wait hint. Under loom it yields so the model makes progress.
#[inline(always)]
pub(crate) fn spin_loop() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// Reader-side half of an asymmetric barrier pair.
///
/// When the process-wide expedited membarrier is registered, this is only a
/// compiler fence: the updater's [`heavy_barrier`] supplies the hardware
/// barrier on this thread's behalf. Otherwise (old kernel, seccomp, loom) it
/// is a real `SeqCst` fence that pairs with the updater's `SeqCst` fence.
#[inline(always)]
pub(crate) fn light_barrier() {
    #[cfg(not(loom))]
    {
        if crate::sys::membarrier_available() {
            atomic::compiler_fence(atomic::Ordering::SeqCst);
        } else {
            atomic::fence(atomic::Ordering::SeqCst);
        }
    }
    #[cfg(loom)]
    atomic::fence(atomic::Ordering::SeqCst);
}

/// Whether readers may use compiler fences only (see [`light_barrier`]);
/// for call sites that issue several light barriers in a row.
#[inline(always)]
pub(crate) fn membarrier_mode() -> bool {
    #[cfg(not(loom))]
    return crate::sys::membarrier_available();
    #[cfg(loom)]
    return false;
}

/// [`light_barrier`] with the mode already read by [`membarrier_mode`]. The
/// mode only ever changes from fences to compiler fences, and a reader that
/// still issues a real fence is merely slower.
#[inline(always)]
pub(crate) fn light_barrier_in(asymmetric: bool) {
    if asymmetric {
        atomic::compiler_fence(atomic::Ordering::SeqCst);
    } else {
        atomic::fence(atomic::Ordering::SeqCst);
    }
}

/// Updater-side half of an asymmetric barrier pair: a full memory barrier on
/// every running thread of the process (`membarrier`), or a `SeqCst` fence
/// when readers issue real fences themselves (see [`light_barrier`]).
#[inline]
pub(crate) fn heavy_barrier() {
    #[cfg(not(loom))]
    {
        if !crate::sys::membarrier() {
            atomic::fence(atomic::Ordering::SeqCst);
        }
    }
    #[cfg(loom)]
    atomic::fence(atomic::Ordering::SeqCst);
}

/// Sleeps while `word` holds `expected` (a futex wait), or spins under loom.
/// Spurious returns are allowed: callers re-check their condition.
#[inline]
pub(crate) fn wait_on(word: &atomic::AtomicU32, expected: u32) {
    #[cfg(not(loom))]
    crate::sys::futex_wait(word, expected);
    #[cfg(loom)]
    {
        let _ = (word, expected);
        loom::thread::yield_now();
    }
}

/// Wakes every thread sleeping in [`wait_on`] on `word`.
#[inline]
pub(crate) fn wake_all(word: &atomic::AtomicU32) {
    #[cfg(not(loom))]
    crate::sys::futex_wake_all(word);
    #[cfg(loom)]
    let _ = word;
}

/// Sleeps while `word` holds `expected`, at most `timeout`. Under loom, a
/// yield (timeouts are not modelled).
#[inline]
pub(crate) fn wait_on_timeout(
    word: &atomic::AtomicU32,
    expected: u32,
    timeout: std::time::Duration,
) {
    #[cfg(not(loom))]
    crate::sys::futex_wait_timeout(word, expected, timeout);
    #[cfg(loom)]
    {
        let _ = (word, expected, timeout);
        loom::thread::yield_now();
    }
}

/// Exponential backoff for spin-then-sleep waits: crossbeam's `Backoff` in
/// normal builds; under loom every step yields so the model can progress, and
/// the spin phase is short.
pub(crate) struct Backoff {
    #[cfg(not(loom))]
    inner: crossbeam_utils::Backoff,
    #[cfg(loom)]
    steps: u32,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff {
            #[cfg(not(loom))]
            inner: crossbeam_utils::Backoff::new(),
            #[cfg(loom)]
            steps: 0,
        }
    }

    /// One waiting step: spins, later yields the CPU.
    #[inline]
    pub(crate) fn snooze(&mut self) {
        #[cfg(not(loom))]
        self.inner.snooze();
        #[cfg(loom)]
        {
            self.steps += 1;
            loom::thread::yield_now();
        }
    }

    /// One busy-wait step without yielding (for short critical sections).
    #[inline]
    pub(crate) fn spin(&mut self) {
        #[cfg(not(loom))]
        self.inner.spin();
        #[cfg(loom)]
        {
            self.steps += 1;
            loom::thread::yield_now();
        }
    }

    /// True once spinning no longer pays and the caller should sleep.
    #[inline]
    pub(crate) fn is_completed(&self) -> bool {
        #[cfg(not(loom))]
        return self.inner.is_completed();
        #[cfg(loom)]
        return self.steps >= 1;
    }
}

/// `thread_local!` with a `const` initialiser in normal builds (a plain TLS
/// access: no lazy registration, safe in a signal handler), wrapped in a
/// [`TrapLocal`] so the live runtime's trap path reaches it without the
/// dynamic loader once settled (`sync/trap_local.rs`); loom's lazily
/// initialised version under loom. The type must need no drop (checked at
/// compile time): its accesses never fail. Every one declared must be
/// settled by `probes/runtime/trap_tls.rs` (its test checks the list).
macro_rules! const_thread_local {
    ($(#[$attr:meta])* $vis:vis static $name:ident: $t:ty = $init:expr;) => {
        #[cfg(not(loom))]
        $(#[$attr])*
        $vis static $name: $crate::sync::TrapLocal<$t> = {
            std::thread_local! {
                static KEY: $t = const { $init };
            }
            const _: () = assert!(
                !std::mem::needs_drop::<$t>(),
                "a const_thread_local! value must need no drop"
            );
            $crate::sync::TrapLocal::new(&KEY, || {
                // SAFETY: called only by `settle_all` or `register`, whose
                // contract this is.
                unsafe { $name.settle() }
            })
        };
        // Puts it in the object's list at load (`sync/trap_local.rs`).
        #[cfg(all(
            not(loom),
            any(target_arch = "x86_64", target_arch = "aarch64"),
            target_os = "linux",
            target_env = "gnu"
        ))]
        const _: () = {
            extern "C" fn register() {
                $name.register();
            }
            #[used]
            #[link_section = ".init_array.00110"]
            static REGISTER: extern "C" fn() = register;
        };
        #[cfg(loom)]
        loom::thread_local! {
            $(#[$attr])* $vis static $name: $t = $init;
        }
    };
}
pub(crate) use const_thread_local;

/// A futex word a single waiter sleeps on (with a timeout) until another
/// thread wakes it. Under loom the sleep is a `loom::sync::Notify` wait, so
/// the model blocks the waiter instead of exploring an endless spin.
#[derive(Debug)]
pub(crate) struct Event {
    word: atomic::AtomicU32,
    #[cfg(loom)]
    notify: loom::sync::Notify,
}

impl Event {
    pub(crate) fn new(initial: u32) -> Self {
        Event {
            word: atomic::AtomicU32::new(initial),
            #[cfg(loom)]
            notify: loom::sync::Notify::new(),
        }
    }

    /// The word itself, for the caller's own handshake.
    #[inline(always)]
    pub(crate) fn word(&self) -> &atomic::AtomicU32 {
        &self.word
    }

    /// Sleeps while the word holds `expected`, at most `timeout` (std), or
    /// until the next `wake` (loom). Spurious returns are allowed.
    pub(crate) fn wait(&self, expected: u32, timeout: std::time::Duration) {
        #[cfg(not(loom))]
        crate::sys::futex_wait_timeout(&self.word, expected, timeout);
        #[cfg(loom)]
        {
            let _ = (expected, timeout);
            self.notify.wait();
        }
    }

    /// Wakes the waiter (if any).
    pub(crate) fn wake(&self) {
        #[cfg(not(loom))]
        crate::sys::futex_wake_all(&self.word);
        #[cfg(loom)]
        self.notify.notify();
    }
}
