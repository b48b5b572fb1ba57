//! `LatchTree` lookups from a signal handler that interrupted the tree's
//! writer on the same thread: they must neither wait (which would deadlock:
//! the interrupted writer cannot finish until the handler returns) nor miss
//! a present key.
//!
//! A writer thread inserts and removes keys in a loop; the main thread sends
//! it `SIGUSR2` thousands of times; the handler (on the writer's own thread)
//! looks up keys that are present throughout and counts wrong answers. A
//! watchdog fails the test if the handler stops making progress (no handler
//! run for a minute after a signal: a hang, not slowness under load).
//!
//! Whether a given signal lands inside a write is up to the scheduler, so
//! the main thread keeps sending past `SIGNALS` until at least one has
//! (the writer spends nearly all its time inside writes, so that is soon),
//! rather than failing a run in which the first thousands all missed.
//!
//! ```text
//! cargo test --release --test seqtree_signal -- --ignored --nocapture
//! ```

#![cfg(target_os = "linux")]

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rcu_registry::__internals::seqtree::CheckInvariants;
use rcu_registry::rcu::Rcu;
use rcu_registry::seqtree::LatchTree;

const KEYS: u64 = 512;
const SIGNALS: u64 = 3_000;

static TREE: OnceLock<LatchTree<u64, u64>> = OnceLock::new();
static HANDLED: AtomicU64 = AtomicU64::new(0);
static WRONG: AtomicU64 = AtomicU64::new(0);
static IN_WRITE: AtomicBool = AtomicBool::new(false);
static INTERRUPTED_WRITES: AtomicU64 = AtomicU64::new(0);

fn stable(k: u64) -> bool {
    k % 2 == 0
}

/// The handler: async-signal-safe operations only (atomics, an `Rcu` read
/// section, a `LatchTree` lookup; no allocation, no lock, no panic).
extern "C" fn on_signal(_sig: libc::c_int) {
    let Some(tree) = TREE.get() else { return };
    // Relaxed: the flag and counters are this thread's own or statistics.
    if IN_WRITE.load(Ordering::Relaxed) {
        INTERRUPTED_WRITES.fetch_add(1, Ordering::Relaxed);
    }
    let n = HANDLED.load(Ordering::Relaxed);
    let guard = Rcu::global().read();
    for i in 0..8 {
        let k = ((n * 8 + i) * 2) % KEYS;
        if tree.get(&guard, &k) != Some(&(k * 10)) {
            WRONG.fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(guard);
    HANDLED.fetch_add(1, Ordering::Release);
}

#[test]
#[ignore = "torture test: thousands of signals; run in release with --ignored (scripts/test-all does)"]
fn latch_lookups_in_a_handler_that_interrupted_the_writer_never_wait_or_miss() {
    let tree = TREE.get_or_init(LatchTree::new);
    for k in (0..KEYS).filter(|&k| stable(k)) {
        tree.insert(k, k * 10);
    }
    let _ = Rcu::global();
    // SAFETY: installing a handler for SIGUSR2, which nothing else in this
    // test binary uses; the handler is async-signal-safe (see above).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let writer = std::thread::spawn(move || {
        let tree = TREE.get().unwrap();
        let mut i = 0u64;
        while !s.load(Ordering::Relaxed) {
            let k = (i * 7 % (KEYS / 2)) * 2 + 1;
            IN_WRITE.store(true, Ordering::Relaxed);
            if !tree.remove(&k) {
                tree.insert(k, k * 10);
            }
            IN_WRITE.store(false, Ordering::Relaxed);
            i += 1;
        }
        i
    });
    let thread = writer.as_pthread_t();
    let mut sent = 0;
    while sent < SIGNALS || INTERRUPTED_WRITES.load(Ordering::Relaxed) == 0 {
        sent += 1;
        // SAFETY: the writer thread is alive until `stop` is set below.
        assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR2) }, 0);
        // Wait for the handler to run before sending the next one (pending
        // signals would coalesce); the watchdog catches a stuck handler.
        let start = Instant::now();
        while HANDLED.load(Ordering::Acquire) < sent {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "signal handler made no progress after {} of {sent} signals: a lookup waited for the writer it interrupted",
                HANDLED.load(Ordering::Relaxed)
            );
            std::thread::yield_now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    let interrupted = INTERRUPTED_WRITES.load(Ordering::Relaxed);
    let wrong = WRONG.load(Ordering::Relaxed);
    println!(
        "{sent} handler runs ({interrupted} inside a write), {writes} writer ops, {wrong} wrong answers"
    );
    assert_eq!(wrong, 0, "a handler lookup missed a present key");
    assert!(
        interrupted > 0,
        "no signal landed inside a write: the test proved nothing"
    );
    tree.check_invariants().unwrap();
}
