//! `fork()`: the child owns its slots and finds every lock free.
//!
//! The first [`Live`] registers three `pthread_atfork` handlers, which
//! cover every `Live` of the process (they are listed here as they are
//! built). `fork` may be called by any thread of a multithreaded program,
//! while other threads register, unregister, commit or hit probes.
//!
//! # Prepare (parent, before the fork)
//!
//! The handler takes, in this fixed order (the registry's documented lock
//! order extended; nothing in the crate holds a later lock while it takes
//! an earlier one):
//!
//! 0. x86_64, once the live uprobes are built: their optimizer's pass lock
//!    (a pass under way is waited for, as a writer is below), then its
//!    state lock, which the uprobe registry's hook takes alone
//!    (`uprobes/jump.rs`); a pass holds the pass lock while it takes any
//!    lock below, so it comes first;
//! 1. the list of instance tables the thread-exit flush walks (it holds
//!    the list while it takes a stripe, so the list comes first);
//! 2. for each `Live`, in the order they were built: its registry's
//!    `reclaim_lock`, writer mutex and deferred-free mutex, then (with the
//!    thread's re-entrancy flag up) every stripe of its kretprobe instance
//!    table (`kprobe/fork.rs`; the kretprobe pools are lock-free), then its
//!    [`XolArea`](super::XolArea)'s mutex;
//! 3. the process-wide text lock (`InProcess` patches);
//! 4. the quiescence waiters' lock (so no quiescence round is under way);
//! 5. the dispatcher table's attach lock;
//!
//! and then, with no slot able to change, copies every XOL chunk into a new
//! memfd (`xol/fork.rs`). Taking a lock may wait for a writer under way,
//! including its grace period and quiescence round; the forking thread
//! answers the quiescence signal while it waits (if it blocks that signal,
//! the round times out and parks its slots instead: bounded), and it is in
//! no `Rcu` read section (see below), so that writer finishes. Registry
//! operations never call `fork` themselves, so the forking thread holds none
//! of these locks. The one way user code runs on a thread that holds one is
//! a probe handler (say a probe on `malloc`, hit inside `register`); a
//! handler runs in an `Rcu` read section, so a `fork` from it takes no lock
//! (below) instead of deadlocking on its own thread's.
//!
//! # Child
//!
//! Only the forking thread exists, and it is in this handler, not in an XOL
//! slot: slots run one displaced instruction and jump back, `fork` is only
//! reached through a call, and a call is never run out of line with its
//! return address unfixed (relative calls are emulated, indirect ones are
//! single-stepped and fixed up before the callee runs). (Were the thread
//! inside a slot, interrupted by a signal whose handler forks, it would
//! resume in identical bytes: the copies are exact.) The handler maps each
//! copy `MAP_FIXED` over both views of its chunk (two `mmap`s and a `close`
//! per chunk), so from then on every slot is the child's alone, resets the
//! deferred-free count of callbacks that ran on threads now gone, and
//! releases the locks. The child can go on hitting, registering,
//! unregistering and committing.
//!
//! # Parent
//!
//! The handler closes the copies and releases the locks; nothing else
//! changes.
//!
//! # What survives, what does not
//!
//! - Survives in the child: every probe (armed breakpoints are in its copy
//!   of the text), every slot (a private copy), the registry's state as it
//!   was between two writer operations, the RCU domains (`rcu/slots.rs`).
//! - Lost with the threads that do not exist in the child: their kretprobe
//!   instances in flight (never returned to their pools: fewer free
//!   instances, counted as `nmissed` when a pool runs dry) and their
//!   single-steps in flight (a site whose step was in flight on another
//!   thread at the fork cannot be unregistered in the child, nor can a
//!   probe with a post handler be removed from it: the commit waits for
//!   that step).
//! - While the locks are held (from the prepare handler until the parent
//!   handler), other threads' registry operations wait, and their kretprobe
//!   hits spin on the stripes: for the length of one `fork`.
//! - `fork` from inside an `Rcu` read section (a probe handler runs in one)
//!   or a probe handler takes none of the locks: waiting for a writer there
//!   could deadlock with a grace period that waits for this very section,
//!   and the thread may already hold a stripe. The child still
//!   gets private slots (copied without the areas' mutexes), but a lock
//!   another thread held at the fork stays held in the child.
//! - A `Live` still being built by another thread at the fork (its
//!   handlers are not listed yet, or `Live::global`'s one-time
//!   initialisation is under way) is not covered: `Live::global` in such a
//!   child would wait for an initialisation that never finishes.
//! - Registries the program builds itself (not through `Live`) and
//!   stand-alone [`XolArea`](super::XolArea)s are not covered, except that
//!   their chunks are copied too (without their areas' mutexes).
//! - `exec` replaces the image: outside this module's scope (the memfds
//!   are close-on-exec). `vfork` and `posix_spawn` run no `atfork`
//!   handler: their child must only `exec` or `_exit`.

use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

use super::dispatch::MAX_DISPATCHERS;
use super::live::Live;
use super::xol::fork::{AreaHold, Copies};
use crate::probes::kprobe::fork::{
    hold_tables_for_fork, in_probe_handler, RegistryHold, TablesHold,
};
use crate::rcu::Rcu;
use crate::sync::MutexGuard;

/// Every `Live` of the process, in the order they were built (at most one
/// per dispatcher: each is attached for the life of the process).
static LIVES: [AtomicPtr<Live>; MAX_DISPATCHERS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_DISPATCHERS];
static LIVE_COUNT: AtomicUsize = AtomicUsize::new(0);
static INIT: Once = Once::new();

/// Lists `live` for the fork handlers and registers them (once).
pub(crate) fn track(live: &'static Live) {
    INIT.call_once(|| {
        // SAFETY: the handlers have the required signature; they run on the
        // forking thread around `fork` (see the module docs).
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        assert_eq!(rc, 0, "pthread_atfork failed");
    });
    // Relaxed: the index only needs to be unique.
    let i = LIVE_COUNT.fetch_add(1, Ordering::Relaxed);
    if let Some(slot) = LIVES.get(i) {
        // Release pairs with the Acquire load in `lives`: the handler sees
        // the `Live` complete.
        slot.store(live as *const Live as *mut Live, Ordering::Release);
    }
}

/// The `Live`s listed so far.
fn lives() -> impl Iterator<Item = &'static Live> {
    LIVES.iter().filter_map(|p| {
        // Acquire pairs with the Release store in `track`.
        let p = p.load(Ordering::Acquire);
        // SAFETY: every listed `Live` is leaked (lives for the process).
        (!p.is_null()).then(|| unsafe { &*p })
    })
}

/// The locks and chunk copies held across one fork.
struct Held {
    locks: Option<Locks>,
    copies: Copies,
}

/// The locks, in acquisition order (released in reverse).
struct Locks {
    /// The live uprobes' optimizer pass lock and state lock (x86_64).
    #[cfg(target_arch = "x86_64")]
    uprobe_pass: Option<super::uprobes::ForkHold>,
    tables: TablesHold,
    lives: Vec<(RegistryHold<'static>, AreaHold<'static>)>,
    text: crate::probes::runtime::in_process::TextLockGuard,
    waiter: MutexGuard<'static, ()>,
    attach: MutexGuard<'static, ()>,
}

impl Locks {
    /// Takes every lock in the documented order.
    fn take() -> Locks {
        #[cfg(target_arch = "x86_64")]
        let uprobe_pass = super::uprobes::hold_for_fork();
        let tables = hold_tables_for_fork();
        let lives = lives()
            .map(|l| (l.registry().hold_for_fork(), l.xol_area().hold_for_fork()))
            .collect();
        let text = crate::probes::runtime::in_process::hold_text_lock_for_fork();
        let waiter = super::quiesce::hold_for_fork();
        let attach = super::dispatch::hold_for_fork();
        Locks {
            #[cfg(target_arch = "x86_64")]
            uprobe_pass,
            tables,
            lives,
            text,
            waiter,
            attach,
        }
    }

    /// Releases them in reverse order; in the child, each registry first
    /// fixes what the vanished threads left.
    fn release(self, in_child: bool) {
        let Locks {
            #[cfg(target_arch = "x86_64")]
            uprobe_pass,
            tables,
            mut lives,
            text,
            waiter,
            attach,
        } = self;
        drop(attach);
        drop(waiter);
        drop(text);
        while let Some((registry, area)) = lives.pop() {
            drop(area);
            registry.release(in_child);
        }
        drop(tables);
        #[cfg(target_arch = "x86_64")]
        drop(uprobe_pass);
    }
}

// `std::cell::Cell`: set and taken by the forking thread only.
crate::sync::const_thread_local! {
    /// What this thread's prepare handler took, for its parent or child
    /// handler (a leaked box, or null).
    static HELD: Cell<*mut Held> = Cell::new(std::ptr::null_mut());
}

fn take_held() -> Option<Box<Held>> {
    let p = HELD.with(|h| h.replace(std::ptr::null_mut()));
    // SAFETY: a non-null pointer was leaked by this thread's `prepare` and
    // is taken once.
    (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
}

extern "C" fn prepare() {
    // Inside an `Rcu` read section (a probe handler, say) waiting for a
    // writer could deadlock with its grace period: take no lock then.
    let locks = (!Rcu::in_read_section() && !in_probe_handler()).then(Locks::take);
    let copies = Copies::prepare();
    let held = Box::into_raw(Box::new(Held { locks, copies }));
    HELD.with(|h| h.set(held));
}

extern "C" fn parent() {
    if let Some(held) = take_held() {
        let Held { locks, copies } = *held;
        copies.discard();
        if let Some(l) = locks {
            l.release(false);
        }
    }
}

extern "C" fn child() {
    if let Some(held) = take_held() {
        let Held { locks, copies } = *held;
        // First: from here on no slot is shared with the parent.
        copies.install_in_child();
        if let Some(l) = locks {
            l.release(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::arch::global_asm;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::{Duration, Instant};

    use super::Live;
    use crate::probes::kprobe::{test_hooks, Kretprobe, ThreadKey};

    // fork_test_mul3(x) = 3x: lea eax, [rdi + rdi*2]; ret.
    global_asm!(
        ".pushsection .text.rcu_registry_fork_test,\"ax\",@progbits",
        ".p2align 4",
        ".globl rcu_registry_fork_test_mul3",
        ".type rcu_registry_fork_test_mul3,@function",
        "rcu_registry_fork_test_mul3:",
        ".byte 0x8d, 0x04, 0x7f",
        ".byte 0xc3",
        ".size rcu_registry_fork_test_mul3, . - rcu_registry_fork_test_mul3",
        ".popsection",
    );
    extern "C" {
        fn rcu_registry_fork_test_mul3(x: u32) -> u32;
    }

    fn mul3(x: u32) -> u32 {
        // SAFETY: a complete C-ABI function (above).
        unsafe { rcu_registry_fork_test_mul3(std::hint::black_box(x)) }
    }

    /// CPU time (user + system, clock ticks) thread `tid` has used.
    fn cpu_ticks(tid: libc::pid_t) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Fields after the command name (which is in parentheses): state is
        // the first, utime the 12th, stime the 13th.
        let rest = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// Set by this test's own `atfork` prepare handler, which runs before
    /// the runtime's (registered later, so run first).
    static IN_FORK: AtomicBool = AtomicBool::new(false);

    extern "C" fn note_fork() {
        IN_FORK.store(true, Ordering::Release);
    }

    /// A thread parked inside a kretprobe return, in the instance table
    /// (its own stripe's lock-free section; before own stripes, the shared
    /// stripe the forking thread's returns use, found by trying threads
    /// until one hashes there), while this thread forks: the fork does not
    /// wait for it, and the child returns through the table within a
    /// bounded wait. (Before the fork handlers held the stripes, the child
    /// spun forever.)
    #[test]
    fn a_fork_while_a_kretprobe_return_holds_the_childs_stripe_leaves_it_free() {
        let live = Live::global();
        let reg = live.registry();
        let returns = Arc::new(AtomicU64::new(0));
        let r = Arc::clone(&returns);
        let at = rcu_registry_fork_test_mul3 as unsafe extern "C" fn(u32) -> u32 as usize;
        let krp = Kretprobe::at(at as u64)
            .handler(move |_d, _regs, _ret| {
                r.fetch_add(1, Ordering::Relaxed);
            })
            .build()
            .unwrap();
        reg.register(&krp).unwrap();
        assert_eq!(mul3(5), 15);
        assert_eq!(returns.load(Ordering::Relaxed), 1);

        // A thread whose returns take this thread's stripe.
        let want = reg.instances.stripe_of(ThreadKey::current());
        let parked = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        let mut idle = Vec::new();
        let mut helper = None;
        // Threads on other stripes wait here until the end, so that each new
        // thread gets a new thread-local area (and key).
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let done_rx = Arc::new(std::sync::Mutex::new(done_rx));
        for _ in 0..4096 {
            let (tx, rx) = mpsc::channel::<bool>();
            let (parked2, release2) = (Arc::clone(&parked), Arc::clone(&release));
            let done_rx = Arc::clone(&done_rx);
            let h = std::thread::spawn(move || {
                let mine = Live::global()
                    .registry()
                    .instances
                    .stripe_of(ThreadKey::current());
                tx.send(mine == want).unwrap();
                if mine != want {
                    // Until `done_tx` is dropped.
                    let _ = done_rx.lock().unwrap().recv();
                    return;
                }
                test_hooks::set_while_locked(move || {
                    parked2.store(true, Ordering::Release);
                    while !release2.load(Ordering::Acquire) {
                        std::thread::yield_now();
                    }
                });
                assert_eq!(mul3(7), 21);
            });
            if rx.recv().unwrap() {
                helper = Some(h);
                break;
            }
            idle.push(h);
        }
        let helper = helper.expect("a thread on the forking thread's stripe");
        static NOTE: std::sync::Once = std::sync::Once::new();
        // SAFETY: a handler that only stores an atomic.
        NOTE.call_once(|| unsafe {
            libc::pthread_atfork(Some(note_fork), None, None);
        });
        IN_FORK.store(false, Ordering::Release);
        while !parked.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        // SAFETY: gettid has no arguments.
        let me = unsafe { libc::gettid() };
        let forked = Arc::new(AtomicBool::new(false));
        let releaser = {
            let (forked, release) = (Arc::clone(&forked), Arc::clone(&release));
            std::thread::spawn(move || {
                // Released once `fork` returned (before the fix: the child
                // inherited the stripe held), or once the forking thread,
                // inside `fork`, has spun for 100 ms of CPU (the runtime's
                // prepare handler waiting for the stripe; an unhindered
                // fork returns long before).
                let mut since = None;
                loop {
                    if forked.load(Ordering::Acquire) {
                        release.store(true, Ordering::Release);
                        return false;
                    }
                    if IN_FORK.load(Ordering::Acquire) {
                        let start = *since.get_or_insert_with(|| cpu_ticks(me));
                        if cpu_ticks(me) >= start + 10 {
                            release.store(true, Ordering::Release);
                            return true;
                        }
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        // SAFETY: fork; the child only calls the probed function and
        // leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let before = returns.load(Ordering::Relaxed);
            let ok = mul3(9) == 27 && returns.load(Ordering::Relaxed) == before + 1;
            // SAFETY: leaves the child without unwinding into the harness.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        forked.store(true, Ordering::Release);
        let held_at_fork = releaser.join().unwrap();
        helper.join().unwrap();
        drop(done_tx);
        for h in idle {
            h.join().unwrap();
        }
        let start = Instant::now();
        let mut status = 0;
        let done = loop {
            // SAFETY: waiting for our own child.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                break true;
            }
            if start.elapsed() > Duration::from_secs(20) {
                // SAFETY: killing and reaping our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        reg.unregister(&krp).unwrap();
        assert!(done, "the child hung on the instance-table stripe");
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
        eprintln!("the fork waited for the held stripe: {held_at_fork}");
    }
}
