//! [`LoaderWatch`]: every `dlopen` and `dlclose` of this process, seen
//! from inside the dynamic linker, in time to act before a new library's
//! constructors run and before an unloaded library's addresses can be
//! reused.
//!
//! # The debugger rendezvous
//!
//! The dynamic linker keeps a `struct r_debug` (`_r_debug`, exported by
//! `ld.so`) for debuggers. Its `r_brk` is the address of an empty function
//! (`_dl_debug_state` in glibc) that the loader calls after every change of
//! its link map, on the thread making the change, with the loader lock
//! held: with `r_state = RT_ADD` before it maps new objects and
//! `RT_CONSISTENT` once they are mapped and listed (before relocation and
//! before their constructors), with `RT_DELETE` before it unmaps objects
//! and `RT_CONSISTENT` once they are unmapped and unlisted (before
//! `dlclose` returns, so before anything can be mapped at their addresses
//! again). Dependencies loaded or unloaded with an object come in the same
//! change. gdb puts a breakpoint there; so does this watch, with a kprobe
//! of its own registry (a private [`Live`], not [`Live::global`], so that a
//! user's `unregister_all` cannot remove it).
//!
//! # What a hit does
//!
//! Each hit compares the loader's `(adds, subs)` counters with the last
//! ones seen; when they moved, it reads the list ([`LoadedObject`]s via
//! `dl_iterate_phdr`, files via `/proc/self/maps`), diffs it with the last
//! list by `(bias, name)` and calls every subscriber with
//! [`LoaderEvent::Unloaded`] for each object gone, then
//! [`LoaderEvent::Loaded`] for each new one. Everything runs under the
//! watch's mutex, so subscribers see one change at a time, in order, and
//! [`subscribe`](LoaderWatch::subscribe) replays the current list to a new
//! subscriber under the same mutex: no change is missed or reported twice.
//! A hit with unmoved counters (`RT_ADD`, `RT_DELETE`, a `dlopen` of an
//! object already loaded) costs one `dl_iterate_phdr` call that stops at
//! the first object.
//!
//! # Why a handler may allocate here
//!
//! The handler runs in the SIGTRAP handler, but the trap is synchronous:
//! the loader called `r_brk` from its own code, never from inside `malloc`
//! or with the C library's allocator lock held, and the loader lock it
//! holds is one the handler does not take. `dl_iterate_phdr` takes the
//! loader's list-write lock, which glibc never holds across `r_brk`. So
//! the handler may allocate, read files and run subscribers, which may in
//! turn write text (install probes).
//!
//! # What subscribers must not do
//!
//! A subscriber runs on the thread inside `dlopen`/`dlclose`, with the
//! loader lock held, or (for the replay) on the subscribing thread with the
//! watch's mutex held while another thread may hold the loader lock and
//! wait for that mutex. So it must not call into the loader's locked entry
//! points: no `dlopen`, `dlclose`, `dlsym`, `dladdr`, `dlinfo`; no
//! [`subscribe`](LoaderWatch::subscribe) or dropping a subscription (the
//! watch's mutex is not recursive). `dl_iterate_phdr` is allowed. It runs
//! inside the breakpoint's handler, in an `Rcu` read section: it must not
//! wait for an `Rcu` grace period (no `unregister` of a live kprobe, no
//! `Rcu::synchronize`; `Rcu::call` is fine). A panic aborts the process,
//! as in every probe handler.
//!
//! # Namespaces, races and limits
//!
//! - `dlmopen` namespaces: every namespace's changes call the same
//!   `r_brk` (the hit is counted), but `dl_iterate_phdr` lists only the
//!   caller's namespace, the base one here, so objects loaded into another
//!   namespace are **not reported**. Reading them would mean walking each
//!   namespace's `r_debug` (`r_next`, glibc 2.35+) and finding each
//!   object's program headers from its mapped ELF header: not done.
//! - The initial list and a replay are read on the subscribing thread,
//!   possibly while another thread is between `RT_ADD` and `RT_CONSISTENT`:
//!   an object being loaded may be reported then, mapped but not yet
//!   relocated, and its own `RT_CONSISTENT` hit then finds nothing new. An
//!   object is listed only while its segments are mapped (glibc unmaps and
//!   unlinks under the list lock), so an object being unloaded is either
//!   reported and then reported unloaded, or not reported.
//! - Statically linked programs have no `_r_debug`:
//!   [`LoaderWatch::global`] returns [`LoaderError::NoRendezvous`].
//! - `r_brk` is `_dl_debug_state` in `ld.so`: a kprobe the user registers
//!   on that function through another registry is refused (the text there
//!   already holds this watch's breakpoint).
//! - After `fork()` the child inherits the breakpoint, the registry and
//!   the list; its own `dlopen`s are reported in the child. `exec` ends it.

mod objects;

pub use objects::{LoadSegment, LoadedObject};

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use self::objects::{counters, LoadedObjects};
use crate::probes::kprobe::{Action, Kprobe};
use crate::probes::runtime::{Live, LiveError};
use crate::probes::ProbeError;

/// A change of the loader's list, as a subscriber sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoaderEvent<'a> {
    /// The object is mapped and listed; its constructors have not run (for
    /// an object loaded after the subscription).
    Loaded(&'a LoadedObject),
    /// The object is unmapped and unlisted; `dlclose` has not returned.
    Unloaded(&'a LoadedObject),
}

/// Why the watch could not be set up.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoaderError {
    /// The process has no dynamic linker rendezvous (`_r_debug` not found,
    /// or its `r_brk` is 0): a statically linked program.
    NoRendezvous,
    /// The private registry could not be built.
    Live(LiveError),
    /// An earlier call failed (its message): the watch is not retried.
    Earlier(String),
    /// The breakpoint at `r_brk` was refused.
    Probe {
        /// The `r_brk` address.
        r_brk: u64,
        /// What the registry said.
        error: ProbeError,
    },
}

impl std::fmt::Display for LoaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoaderError::NoRendezvous => {
                f.write_str("no dynamic linker rendezvous (_r_debug) in this process")
            }
            LoaderError::Live(e) => write!(f, "building the loader watch's registry: {e}"),
            LoaderError::Earlier(e) => write!(f, "the loader watch could not be set up: {e}"),
            LoaderError::Probe { r_brk, error } => {
                write!(f, "probing the loader's r_brk at {r_brk:#x}: {error}")
            }
        }
    }
}

impl std::error::Error for LoaderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoaderError::NoRendezvous | LoaderError::Earlier(_) => None,
            LoaderError::Live(e) => Some(e),
            LoaderError::Probe { error, .. } => Some(error),
        }
    }
}

/// glibc's `struct r_debug` (`<link.h>`), the fields read here.
#[repr(C)]
struct RDebug {
    r_version: libc::c_int,
    r_map: *mut libc::c_void,
    r_brk: u64,
    r_state: libc::c_int,
    r_ldbase: u64,
}

/// Where the rendezvous is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    /// Address of the loader's `struct r_debug`.
    pub r_debug: u64,
    /// The function the loader calls after each change (`r_debug.r_brk`).
    pub r_brk: u64,
    /// `r_debug.r_version` (2 with `dlmopen` namespace chaining, glibc 2.35+).
    pub version: i32,
    /// The loader's own load address (`r_debug.r_ldbase`).
    pub ldbase: u64,
}

type Subscriber = Arc<dyn Fn(LoaderEvent<'_>) + Send + Sync>;

#[derive(Clone)]
struct State {
    list: LoadedObjects,
    subscribers: Vec<(u64, Subscriber)>,
    next_id: u64,
}

/// Counters of what the watch has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoaderStats {
    /// `r_brk` hits (every state change the loader announced).
    pub hits: u64,
    /// Hits that found the list changed and read it.
    pub changes: u64,
    /// Objects reported loaded (the initial list included).
    pub loaded: u64,
    /// Objects reported unloaded.
    pub unloaded: u64,
}

/// The loader watch: a breakpoint at the dynamic linker's `r_brk` and the
/// subscribers it tells about every object loaded and unloaded. One per
/// process ([`LoaderWatch::global`]). Module docs: how it works and what a
/// subscriber may do.
pub struct LoaderWatch {
    rendezvous: Rendezvous,
    probe: OnceLock<Kprobe>,
    /// Serializes syncs, replays and (un)subscriptions. Behind a pointer so
    /// that a `fork` child can replace a lock held by a thread it does not
    /// have (`after_fork_in_child`); a replaced lock is leaked.
    lock: AtomicPtr<Mutex<()>>,
    /// The list and the subscribers, replaced whole under `lock` (never
    /// changed in place), so a thread that stops anywhere (it is not in a
    /// `fork` child) leaves a whole state behind.
    state: AtomicPtr<State>,
    hits: AtomicU64,
    changes: AtomicU64,
    loaded: AtomicU64,
    unloaded: AtomicU64,
}

impl std::fmt::Debug for LoaderWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoaderWatch")
            .field("rendezvous", &self.rendezvous)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

static GLOBAL: OnceLock<Result<&'static LoaderWatch, String>> = OnceLock::new();
static BUILD: Mutex<()> = Mutex::new(());

/// The watch, once built: what the `fork` child handler looks at.
static WATCH: AtomicPtr<LoaderWatch> = AtomicPtr::new(std::ptr::null_mut());

/// Finds `_r_debug` (exported by `ld.so`).
fn rendezvous() -> Option<Rendezvous> {
    // SAFETY: a valid C string; RTLD_DEFAULT searches the global scope.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_r_debug".as_ptr()) } as *const RDebug;
    if p.is_null() {
        return None;
    }
    // SAFETY: `_r_debug` is a `struct r_debug` the loader keeps for the life
    // of the process; the fields read are written only under the loader
    // lock, and `r_brk`/`r_ldbase` once at start-up.
    let rd = unsafe { std::ptr::read_volatile(p) };
    (rd.r_brk != 0).then_some(Rendezvous {
        r_debug: p as u64,
        r_brk: rd.r_brk,
        version: rd.r_version,
        ldbase: rd.r_ldbase,
    })
}

impl LoaderWatch {
    /// The process's loader watch, set up on first use: finds the
    /// rendezvous, builds a private [`Live`] registry, arms the breakpoint
    /// at `r_brk` and reads the current list.
    ///
    /// # Errors
    /// [`LoaderError`]: no rendezvous (static program), no registry slot
    /// left, or the breakpoint refused. The error is remembered: later
    /// calls return [`LoaderError::Earlier`] with its message, without
    /// retrying.
    pub fn global() -> Result<&'static LoaderWatch, LoaderError> {
        let earlier = |done: &Result<&'static LoaderWatch, String>| {
            done.clone().map_err(LoaderError::Earlier)
        };
        if let Some(done) = GLOBAL.get() {
            return earlier(done);
        }
        let _build = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(done) = GLOBAL.get() {
            return earlier(done);
        }
        let built = Self::build();
        let _ = GLOBAL.set(built.as_ref().map(|w| *w).map_err(|e| e.to_string()));
        built
    }

    fn build() -> Result<&'static LoaderWatch, LoaderError> {
        let rv = rendezvous().ok_or(LoaderError::NoRendezvous)?;
        let live = Live::new().map_err(LoaderError::Live)?;
        let watch: &'static LoaderWatch = Box::leak(Box::new(LoaderWatch {
            rendezvous: rv,
            probe: OnceLock::new(),
            lock: AtomicPtr::new(Box::into_raw(Box::new(Mutex::new(())))),
            state: AtomicPtr::new(Box::into_raw(Box::new(State {
                list: LoadedObjects::default(),
                subscribers: Vec::new(),
                next_id: 1,
            }))),
            hits: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            unloaded: AtomicU64::new(0),
        }));
        let probe = Kprobe::at(rv.r_brk)
            .pre(move |_p, _regs| {
                watch.on_rendezvous();
                Action::Continue
            })
            .build();
        live.registry()
            .register(&probe)
            .map_err(|error| LoaderError::Probe {
                r_brk: rv.r_brk,
                error,
            })?;
        let _ = watch.probe.set(probe);
        // Armed first, listed second: a change between the two is caught by
        // whichever of this read and its own hit takes the mutex first, and
        // the other finds nothing new.
        watch.sync(&mut watch.lock());
        // Release pairs with the Acquire in `after_fork_in_child`: a child
        // that finds the pointer finds the watch built.
        WATCH.store(
            watch as *const LoaderWatch as *mut LoaderWatch,
            Ordering::Release,
        );
        // SAFETY: the handler is an `extern "C" fn()` that only runs in the
        // child, with one thread, and touches the watch's lock pointer.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
        Ok(watch)
    }

    /// Where the rendezvous is.
    pub fn rendezvous(&self) -> Rendezvous {
        self.rendezvous
    }

    /// What the watch has seen so far.
    pub fn stats(&self) -> LoaderStats {
        // Relaxed: statistics, read as of some moment each; a caller that
        // needs them exact after a `dlopen` returned is ordered after the
        // handler by the loader's lock.
        LoaderStats {
            hits: self.hits.load(Ordering::Relaxed),
            changes: self.changes.load(Ordering::Relaxed),
            // Relaxed: statistics, as above.
            loaded: self.loaded.load(Ordering::Relaxed),
            unloaded: self.unloaded.load(Ordering::Relaxed),
        }
    }

    /// How many changes the watch has handled, read under its lock: a
    /// report in progress (its subscribers running) is waited for, so the
    /// count names a state every subscriber has seen whole.
    pub(crate) fn settled_changes(&self) -> u64 {
        let _held = self.lock();
        // Relaxed: written under the lock just taken.
        self.changes.load(Ordering::Relaxed)
    }

    /// The loader's list as of the last change the watch saw.
    pub fn objects(&self) -> Vec<LoadedObject> {
        self.lock().state().list.objects.clone()
    }

    /// Calls `f` with [`LoaderEvent::Loaded`] for every object loaded now,
    /// then with every later change, until the returned subscription is
    /// dropped. `f` runs on the thread calling `dlopen`/`dlclose`, with
    /// the loader lock held: see the module docs for what it must not do.
    pub fn subscribe(
        &'static self,
        f: impl Fn(LoaderEvent<'_>) + Send + Sync + 'static,
    ) -> LoaderSubscription {
        let f: Subscriber = Arc::new(f);
        let mut held = self.lock();
        // Catch up first, so the replay is the list as of now and every
        // other subscriber has seen the same changes.
        self.sync(&mut held);
        for o in &held.state().list.objects {
            f(LoaderEvent::Loaded(o));
        }
        let mut next = held.state().clone();
        let id = next.next_id;
        next.next_id += 1;
        next.subscribers.push((id, f));
        let old = held.publish(next);
        drop(held);
        drop(old);
        LoaderSubscription { watch: self, id }
    }

    fn lock(&self) -> Held<'_> {
        // Acquire pairs with the Release in `after_fork_in_child` (a child's
        // own thread reads its own store; the ordering is for form).
        // SAFETY: the pointer is always a leaked, never freed `Mutex`.
        let m: &'static Mutex<()> = unsafe { &*self.lock.load(Ordering::Acquire) };
        // A subscriber's panic in a hit aborts the process; one in a replay
        // poisons the lock, but the state is replaced whole, never left
        // half-changed: keep going.
        let guard = m.lock().unwrap_or_else(|e| e.into_inner());
        Held {
            watch: self,
            _guard: guard,
        }
    }

    /// The breakpoint's handler.
    fn on_rendezvous(&self) {
        // Relaxed: a statistic (see `stats`).
        self.hits.fetch_add(1, Ordering::Relaxed);
        let mut held = self.lock();
        let st = held.state();
        if counters() == (st.list.adds, st.list.subs) {
            return;
        }
        self.sync(&mut held);
    }

    /// Reads the list, reports the difference, keeps the new list. The new
    /// list is published after the subscribers ran: a `fork` child of a
    /// thread stopped in between reports the change again (at least once,
    /// never missed).
    fn sync(&self, held: &mut Held<'_>) {
        let now = LoadedObjects::read();
        let st = held.state();
        let (loaded, unloaded) = now.diff(&st.list);
        if !loaded.is_empty() || !unloaded.is_empty() {
            // Relaxed: statistics (see `stats`).
            self.changes.fetch_add(1, Ordering::Relaxed);
            self.loaded
                .fetch_add(loaded.len() as u64, Ordering::Relaxed);
            self.unloaded
                .fetch_add(unloaded.len() as u64, Ordering::Relaxed);
        }
        for o in &unloaded {
            for (_, f) in &st.subscribers {
                f(LoaderEvent::Unloaded(o));
            }
        }
        for o in &loaded {
            for (_, f) in &st.subscribers {
                f(LoaderEvent::Loaded(o));
            }
        }
        let next = State {
            list: now.clone(),
            subscribers: st.subscribers.clone(),
            next_id: st.next_id,
        };
        drop(held.publish(next));
    }
}

/// The watch's list as the loaded objects a
/// [`TargetResolver`](crate::probes::uprobe::TargetResolver) searches first
/// for a bare library name, in load order (the executable by its
/// `/proc/self/exe` path; the vDSO, which has no file, left out).
impl crate::probes::uprobe::LoadedObjects for LoaderWatch {
    fn loaded_paths(&self) -> Vec<std::path::PathBuf> {
        self.objects()
            .into_iter()
            .filter(|o| o.file.is_some())
            .map(|o| {
                if o.name.is_empty() {
                    std::fs::read_link("/proc/self/exe").unwrap_or_default()
                } else {
                    std::path::PathBuf::from(o.name)
                }
            })
            .collect()
    }
}

/// The watch's lock, held: the state may be read and replaced.
struct Held<'a> {
    watch: &'a LoaderWatch,
    _guard: MutexGuard<'static, ()>,
}

impl Held<'_> {
    fn state(&self) -> &State {
        // Acquire pairs with the AcqRel swap in `publish`: the state built
        // before it was published is seen whole.
        // SAFETY: the pointer is a live `Box<State>`; it is freed only by
        // `publish`, which needs `&mut self`, so not while this borrow lives.
        unsafe { &*self.watch.state.load(Ordering::Acquire) }
    }

    /// Replaces the state; returns the old one for the caller to drop
    /// (after releasing the lock, if its subscribers' captures may do
    /// anything when they go).
    fn publish(&mut self, next: State) -> Box<State> {
        // AcqRel: Release publishes `next` to `state`'s Acquire loads; the
        // Acquire side takes the old state whole before it is dropped.
        let old = self
            .watch
            .state
            .swap(Box::into_raw(Box::new(next)), Ordering::AcqRel);
        // SAFETY: `old` came from `Box::into_raw` (here or in `build`) and,
        // swapped out under the lock, is no longer reachable by anyone.
        unsafe { Box::from_raw(old) }
    }
}

/// `fork` child handler. The child has one thread; a lock held at the fork
/// by any other thread (a sync inside another thread's `dlopen`, a replay)
/// would stay held for good, so it is replaced by a fresh one (the old one
/// is leaked). The state is whole whatever that thread was doing (see
/// [`LoaderWatch::sync`]). If this very thread held the lock (it forked
/// inside a subscriber), its guard later unlocks the leaked lock.
extern "C" fn after_fork_in_child() {
    // Acquire pairs with the Release in `build`.
    let watch = WATCH.load(Ordering::Acquire);
    if watch.is_null() {
        return;
    }
    // SAFETY: a leaked watch, never freed.
    let watch = unsafe { &*watch };
    // Acquire: for form, as the store below; only this thread exists.
    let at = watch.lock.load(Ordering::Acquire);
    // SAFETY: the pointer is always a leaked, never freed `Mutex`.
    let m: &Mutex<()> = unsafe { &*at };
    if let Err(std::sync::TryLockError::WouldBlock) = m.try_lock() {
        // Release: for form; only this thread exists.
        watch
            .lock
            .store(Box::into_raw(Box::new(Mutex::new(()))), Ordering::Release);
    }
}

/// A subscription to a [`LoaderWatch`]; dropping it unsubscribes (after
/// any call in progress on another thread has returned).
#[must_use = "dropping the subscription unsubscribes at once"]
pub struct LoaderSubscription {
    watch: &'static LoaderWatch,
    id: u64,
}

impl std::fmt::Debug for LoaderSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoaderSubscription")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for LoaderSubscription {
    fn drop(&mut self) {
        let old = {
            let mut held = self.watch.lock();
            let mut next = held.state().clone();
            next.subscribers.retain(|(id, _)| *id != self.id);
            held.publish(next)
        };
        // The closure is dropped outside the mutex: its captures may do
        // anything when they go.
        drop(old);
    }
}
