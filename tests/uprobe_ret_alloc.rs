//! The uretprobe hit and return paths allocate nothing once the thread is
//! warm (its `Srcu` reader slot and its return stack for the space exist).
//! A counting global allocator (per thread, so other tests' threads do not
//! interfere) proves it.

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
    // Warm-up: the reader slot, the return stack.
    let cold = allocs();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    assert_eq!(t.ret(&reg, &a, 1), Ret::Trampoline(CALLER));
    assert!(allocs() > cold, "the counter sees the first call's stack");

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
