//! [`TrapLocal`]: a thread-local the live runtime's trap path can reach
//! without calling the dynamic loader.
//!
//! # Why
//!
//! In an executable, a thread-local is an access relative to the thread
//! pointer (`fs:` on x86_64, `tpidr_el0` on aarch64; the linker resolves
//! its offset). In a shared
//! library (the `rcu-trace` agent, a cdylib) the compiler cannot know the
//! offset and calls the dynamic loader's `__tls_get_addr` (the
//! general-dynamic model; stable Rust offers no initial-exec model). That
//! function has slow paths: when another library with thread-locals was
//! loaded since the thread's last update it takes the loader's lock and
//! may grow the thread's module table (`realloc`), and for a library
//! loaded with `dlopen` it allocates the thread's block on first use
//! (`malloc`), reporting a failure through `strerror` and `gettext`
//! (`getenv`). Called from the SIGTRAP handler, that is a trap inside the
//! trap handler for a probe on `malloc`, and an allocation inside a signal
//! handler whatever is probed. The call-graph walk finds it and refuses
//! the whole chain: `malloc`, `free`, `realloc`, `calloc`, `getenv`,
//! `read`, `strdup`, `clock_gettime` among others.
//!
//! # How
//!
//! A library loaded with the program (`LD_PRELOAD`, a `DT_NEEDED`
//! dependency, the executable itself) has its thread-locals in the *static*
//! TLS area: for every thread at the same offset from the thread pointer.
//! Once the runtime has proven that of the object holding this crate
//! (`probes/runtime/trap_tls.rs`), it records each [`TrapLocal`]'s offset
//! ([`TrapLocal::settle`]); from then on [`TrapLocal::with`] is the thread
//! pointer plus that offset: one load, no call. Before that, and for good
//! when it cannot be proven (a library loaded with `dlopen`, whose blocks
//! are allocated per thread on demand), `with` goes through the standard
//! thread-local ([`TrapLocal::dynamic_address`]). That access calls the
//! loader through the `LocalKey`'s accessor, an indirect call the walk
//! cannot follow, so in a shared object the runtime then walks from the
//! loader's `__tls_get_addr` itself (`probes/runtime/refuse.rs`) and
//! refuses what it reaches: that hazard is real then.
//!
//! # Registration
//!
//! Which thread-locals there are is not listed by hand: each one
//! `const_thread_local!` declares also gets a constructor in the object's
//! `.init_array` (priority 110: before any constructor of the program
//! or of a preloaded library without a priority, which is where the
//! `rcu-trace` agent starts the runtime) that puts it in the object's list
//! ([`TrapLocal::register`]). [`settle_all`] settles the whole list, and a
//! thread-local registered after it (an object's constructors run in
//! order, so only if the runtime started from a constructor of higher
//! priority) settles itself. Each object holding a copy of this crate
//! (the executable, the agent library) has its own list.
//!
//! The storage is the standard library's `thread_local!` with a `const`
//! initialiser (its layout and initial value are the compiler's), of a
//! type that needs no drop (asserted at compile time by
//! `const_thread_local!`), so every access succeeds for the thread's whole
//! life. On targets other than x86_64 and aarch64 Linux with glibc
//! ([`SETTLES`]), `with` is the standard access only.

use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicPtr, AtomicUsize, Ordering};
use std::thread::{AccessError, LocalKey};

/// A thread-local reached by an offset from the thread pointer once
/// settled (module docs). Declared with `crate::sync::const_thread_local!`.
pub(crate) struct TrapLocal<T: 'static> {
    key: &'static LocalKey<T>,
    /// This one in the list of every `TrapLocal` of the object
    /// ([`register`](Self::register)).
    link: Link,
    /// The value's address minus the thread pointer, the same on every
    /// thread; 0 until [`settle`](Self::settle)d (a static block lies
    /// below the thread pointer on x86_64, above the thread control block
    /// it points to on aarch64: never at offset 0).
    offset: AtomicIsize,
}

impl<T: 'static> TrapLocal<T> {
    /// Over the standard thread-local `key`, not settled; `settle` calls
    /// [`settle`](Self::settle) on the static being built (made by
    /// `const_thread_local!`).
    pub(crate) const fn new(key: &'static LocalKey<T>, settle: unsafe fn()) -> TrapLocal<T> {
        TrapLocal {
            key,
            link: Link {
                next: AtomicPtr::new(std::ptr::null_mut()),
                settle,
            },
            offset: AtomicIsize::new(0),
        }
    }

    /// Puts this thread-local in the object's list, to be settled with the
    /// others ([`settle_all`]), or at once if that was done already. Called
    /// once, by the constructor `const_thread_local!` adds to the object
    /// (module docs: registration).
    pub(crate) fn register(&'static self) {
        let link = &self.link as *const Link as *mut Link;
        // Relaxed: the CAS below publishes.
        let mut head = LIST.load(Ordering::Relaxed);
        loop {
            // Relaxed: published by the CAS.
            self.link.next.store(head, Ordering::Relaxed);
            // SeqCst: a total order with `settle_all`'s store of SETTLED
            // and its SeqCst load of the head: either it sees this link,
            // or this thread's load of SETTLED below sees its store.
            match LIST.compare_exchange_weak(head, link, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => {
                    // Relaxed: a count for a test.
                    REGISTERED.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(now) => head = now,
            }
        }
        // SeqCst: see above.
        if SETTLED.load(Ordering::SeqCst) {
            // SAFETY: SETTLED is stored only once static TLS is proven
            // (`settle_all`'s contract).
            unsafe { (self.link.settle)() };
        }
    }

    /// Runs `f` on the calling thread's value: the thread pointer plus the
    /// settled offset, else the standard access.
    #[inline(always)]
    pub(crate) fn with<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
        // Relaxed: pairs with nothing. The offset is the only thing
        // `settle` publishes (the value it leads to is this thread's own,
        // live since the thread started), and either value read is correct:
        // 0 only takes the standard access. An acquire load here would be a
        // barrier on every trap-path access (under qemu-user each `ldar`
        // is a locked host instruction).
        let offset = self.offset.load(Ordering::Relaxed);
        let p = if offset != 0 {
            thread_pointer().wrapping_offset(offset) as *const T
        } else {
            self.dynamic_address()
        };
        // `p` is this thread's instance of the value: the standard access's
        // address, or the thread pointer plus the offset that address had
        // on every thread (static TLS, proven before `settle`). It lives as
        // long as the thread, and `f` gets it only for this call.
        // SAFETY: this thread's live instance, borrowed for the call only.
        f(unsafe { &*p })
    }

    /// As [`with`](Self::with): the value needs no drop, so it is never
    /// destroyed while its thread runs and the access cannot fail.
    #[inline(always)]
    pub(crate) fn try_with<R>(&'static self, f: impl FnOnce(&T) -> R) -> Result<R, AccessError> {
        Ok(self.with(f))
    }

    /// The calling thread's instance through the standard thread-local:
    /// in a shared library, a call of the loader's `__tls_get_addr`. Out of
    /// line and by this name, so the trap path's walk can tell it apart
    /// (`callgraph/settled_tls.rs`). Cold: once settled it is never taken,
    /// and the settled access then falls straight through (a branch over
    /// this call ended a translated block at each of the nine accesses of
    /// an emulated arm64 hit).
    #[cold]
    #[inline(never)]
    pub(crate) fn dynamic_address(&'static self) -> *const T {
        self.key.with(|v| v as *const T)
    }

    /// Records the offset of the calling thread's instance from its thread
    /// pointer, for every later access on every thread.
    ///
    /// # Safety
    /// The object holding this crate must have its thread-locals in static
    /// TLS (at one offset from the thread pointer on every thread), as
    /// `probes/runtime/trap_tls.rs` proves before calling this.
    // SAFETY: an unsafe fn: its callers keep the contract above.
    pub(crate) unsafe fn settle(&'static self) {
        let offset = (self.dynamic_address() as isize).wrapping_sub(thread_pointer() as isize);
        if SETTLES && offset != 0 {
            // Relaxed: publishes nothing but the offset itself (see the
            // load in `with`).
            self.offset.store(offset, Ordering::Relaxed);
        }
    }

    /// Whether [`settle`](Self::settle) recorded an offset.
    pub(crate) fn is_settled(&self) -> bool {
        // Relaxed: a report; orders nothing.
        self.offset.load(Ordering::Relaxed) != 0
    }
}

/// One [`TrapLocal`] in the object's list.
struct Link {
    next: AtomicPtr<Link>,
    /// Settles the `TrapLocal` holding this link.
    settle: unsafe fn(),
}

/// Every registered [`TrapLocal`] of this object (a stack of links).
static LIST: AtomicPtr<Link> = AtomicPtr::new(std::ptr::null_mut());

/// Set by [`settle_all`]: every registered [`TrapLocal`] is settled, and
/// any registered later settles itself.
static SETTLED: AtomicBool = AtomicBool::new(false);

/// [`TrapLocal`]s registered (for the test that none was left out).
static REGISTERED: AtomicUsize = AtomicUsize::new(0);

/// Settles every [`TrapLocal`] of this object, now and to come.
///
/// # Safety
/// As [`TrapLocal::settle`]: the object's thread-locals are proven to be in
/// static TLS.
// SAFETY: an unsafe fn: its callers keep the contract above.
pub(crate) unsafe fn settle_all() {
    // SeqCst: see `TrapLocal::register`.
    SETTLED.store(true, Ordering::SeqCst);
    // SeqCst: see `TrapLocal::register`.
    let mut at = LIST.load(Ordering::SeqCst);
    while !at.is_null() {
        // SAFETY: links are fields of `'static` `TrapLocal`s, never freed.
        let link = unsafe { &*at };
        // SAFETY: the caller's contract.
        unsafe { (link.settle)() };
        // Relaxed: stored before the CAS that published the link, which
        // our SeqCst load of LIST (or of an earlier link's successor's
        // publisher) synchronised with.
        at = link.next.load(Ordering::Relaxed);
    }
}

/// Whether [`settle_all`] ran: every [`TrapLocal`] of this object reaches
/// its value without the dynamic loader (the walk's rule,
/// `callgraph/settled_tls.rs`).
pub(crate) fn all_settled() -> bool {
    // Acquire: pairs with the SeqCst (so also Release) store in
    // `settle_all`: whoever sees it set sees the offsets settled before.
    SETTLED.load(Ordering::Acquire)
}

/// How many [`TrapLocal`]s this object registered.
pub(crate) fn registered() -> usize {
    // Relaxed: a count for a test.
    REGISTERED.load(Ordering::Relaxed)
}

/// Whether this target settles thread-locals: Linux with glibc on x86_64
/// or aarch64, where an object loaded with the program has its block in
/// static TLS at a fixed offset from the thread pointer (`fs:0` on x86_64,
/// `tpidr_el0` on aarch64). Elsewhere `with` is the standard access only.
pub(crate) const SETTLES: bool = cfg!(all(
    any(target_arch = "x86_64", target_arch = "aarch64"),
    target_os = "linux",
    target_env = "gnu"
));

/// The calling thread's thread pointer (x86_64: the TCB's self-pointer at
/// `fs:0`; aarch64: `tpidr_el0`), read without a call; null where not
/// implemented (nothing is ever settled there).
#[inline(always)]
pub(crate) fn thread_pointer() -> *mut u8 {
    #[cfg(target_arch = "x86_64")]
    {
        let tp: *mut u8;
        // SAFETY: reads the TCB's self-pointer at %fs:0 (the x86_64 TLS
        // ABI); touches no other memory or register.
        unsafe {
            std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags));
        }
        tp
    }
    #[cfg(target_arch = "aarch64")]
    {
        let tp: *mut u8;
        // `pure`: the register holds the same value for the whole life of
        // the thread (signal handlers on it included), so the compiler
        // may reuse one read for every access in a function (the trap
        // path's thread-locals read it once each, an `mrs` per access).
        // SAFETY: reads the thread pointer register (the aarch64 TLS ABI:
        // the thread's control block, static TLS blocks above it); touches
        // no memory and no other register.
        unsafe {
            std::arch::asm!("mrs {}, tpidr_el0", out(reg) tp, options(pure, nomem, nostack, preserves_flags));
        }
        tp
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        std::ptr::null_mut()
    }
}
