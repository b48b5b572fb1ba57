//! The uretprobe hit and return paths allocate nothing: warm, on a
//! thread's first tracked call in a space (its return stack is claimed from
//! the space's preallocated pool), and when the pool is exhausted (the call
//! is counted missed). A counting global allocator (per thread, so other
//! tests' threads do not interfere) proves it.
//!
//! The `Srcu` domain allocates a thread's read counters in chunks of 64
//! threads, on the first read section of a thread whose chunk does not
//! exist yet (documented in `rcu::Srcu`): the tests warm the domain on the
//! main thread first, so the new threads' counters (their slot indices are
//! small: few threads are alive) are already there.

mod uprobe_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcu_registry::probes::uprobe::{Consumer, ConsumerAction};
use uprobe_support::*;

struct Counting;

std::thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter is a const
// thread-local `Cell` (no allocation, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

const A: u64 = 0x40_0000;
const CALLER: u64 = 0x9000_0000;

#[test]
fn warm_entries_and_returns_allocate_nothing() {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let (hits, rets) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let c = {
        let (h, r) = (Arc::clone(&hits), Arc::clone(&rets));
        Consumer::builder()
            .handler(move |_, _| {
                h.fetch_add(1, Ordering::Relaxed);
                ConsumerAction::Continue
            })
            .ret_handler(move |ret, _| {
                r.fetch_add(ret.retval, Ordering::Relaxed);
            })
            .build()
    };
    for f in [FN0, FN1] {
        reg.register_in_function(key(f), f, &c).unwrap();
    }
    let mut t = SimThread::new();
    // Warm-up: the reader slot and the domain's counters.
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    assert_eq!(t.ret(&reg, &a, 1), Ret::Trampoline(CALLER));
    let boxed = allocs();
    drop(std::hint::black_box(Box::new(1u64)));
    assert_eq!(
        allocs(),
        boxed + 1,
        "the counter sees this thread's allocations"
    );

    let before = allocs();
    for _ in 0..100 {
        let _ = t.call(&reg, &a, A + FN0, CALLER);
        let _ = t.call(&reg, &a, A + FN1, A + 1);
        let _ = t.tail_call(&reg, &a, A + FN0);
        let _ = t.ret(&reg, &a, 1);
        let _ = t.ret(&reg, &a, 1);
    }
    let after = allocs();
    assert_eq!(
        after - before,
        0,
        "allocations on the warm hit/return paths"
    );
    assert_eq!(hits.load(Ordering::Relaxed), 301);
    assert_eq!(rets.load(Ordering::Relaxed), 1 + 300);
    assert_eq!(reg.return_depth(a.id), 0);
}

/// A registry with one space mapping the file, `FN0` probed by a consumer
/// with a return handler, and its domain warm on the calling thread.
fn warm_registry(reg: Registry) -> (Arc<Registry>, Arc<MemSpace>) {
    let reg = Arc::new(reg);
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let c = Consumer::builder().ret_handler(|_, _| {}).build();
    reg.register_in_function(key(FN0), FN0, &c).unwrap();
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
    (reg, a)
}

#[test]
fn a_new_threads_first_tracked_call_in_a_space_allocates_nothing() {
    let (reg, a) = warm_registry(Registry::new(Default::default()));
    let (r, s) = (Arc::clone(&reg), Arc::clone(&a));
    let counted = std::thread::spawn(move || {
        let mut t = SimThread::new(); // its stack memory: before counting
        let before = allocs();
        let _ = t.call(&r, &s, A + FN0, CALLER);
        let depth = r.return_depth(s.id);
        let ret = t.ret(&r, &s, 7);
        (allocs() - before, depth, ret)
    })
    .join()
    .unwrap();
    assert_eq!(
        counted,
        (0, 1, Ret::Trampoline(CALLER)),
        "(allocations, depth inside the call, where it returned)"
    );
    assert_eq!(reg.nmissed(key(FN0)), 0);
}

#[test]
fn a_call_that_finds_the_pool_exhausted_allocates_nothing() {
    let (reg, a) = warm_registry(Registry::new(Default::default()).with_return_stacks(1));
    // The main thread holds the only stack (inside a tracked call).
    let mut held = SimThread::new();
    let _ = held.call(&reg, &a, A + FN0, CALLER);
    assert_eq!(reg.return_stacks_in_use(a.id), 1);
    let (r, s) = (Arc::clone(&reg), Arc::clone(&a));
    let counted = std::thread::spawn(move || {
        let mut t = SimThread::new();
        let before = allocs();
        let _ = t.call(&r, &s, A + FN0, CALLER);
        let ret = t.ret(&r, &s, 7);
        (allocs() - before, ret)
    })
    .join()
    .unwrap();
    assert_eq!(
        counted,
        (0, Ret::Direct(CALLER)),
        "(allocations, where the missed call returned: not hijacked)"
    );
    assert_eq!(reg.nmissed(key(FN0)), 1);
    assert_eq!(held.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
    assert_eq!(reg.return_stacks_in_use(a.id), 0);
}
