//! Live uprobes in this process on arm64: the C library probed by
//! `libc.so.6:SYMBOL` (found through the loader's list and the file on
//! disk), every call counted from several threads, return values seen by
//! return handlers (the return hijacked to a `brk` in an XOL slot).
//!
//! Live uprobes need the dynamic linker's rendezvous (the loader watch), so
//! these tests run in the dynamically linked build (`scripts/test-arm64
//! --dynamic`, `qemu-aarch64 -L /`); in the static one each prints why it
//! is skipped. Natively (x86_64) they run as well.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rcu_registry::probes::runtime::LiveUprobes;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeTarget};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The live uprobes, or `None` (with the reason printed) in a statically
/// linked binary, which has no dynamic linker to watch.
fn live() -> Option<&'static LiveUprobes> {
    let linked_statically = cfg!(target_feature = "crt-static");
    match LiveUprobes::global() {
        Ok(l) => Some(l),
        Err(e) if linked_statically => {
            println!(
                "skipped: statically linked ({e}); run scripts/test-arm64 --dynamic for live uprobes"
            );
            None
        }
        Err(e) => panic!("live uprobes in a dynamically linked binary: {e}"),
    }
}

/// `getppid` through the C library's exported function (what a probe on
/// `libc.so.6:getppid` sees), never inlined into a raw system call.
fn getppid() -> libc::pid_t {
    // SAFETY: getppid has no preconditions.
    unsafe { std::hint::black_box(libc::getppid as unsafe extern "C" fn() -> libc::pid_t)() }
}

#[test]
fn every_call_of_a_c_library_function_is_counted_from_two_threads() {
    let _g = serial();
    let Some(live) = live() else { return };
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    let c = Consumer::builder()
        .handler(move |_hit, _regs| {
            // SeqCst: read after the threads are joined; no pairing needed.
            h.fetch_add(1, Ordering::SeqCst);
            ConsumerAction::Continue
        })
        .build();
    let target = UprobeTarget::parse("libc.so.6:getppid").unwrap();
    let resolved = live.register(&target, &c).unwrap();
    let parent = getppid();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..1_000 {
                    assert_eq!(getppid(), parent);
                }
            });
        }
    });
    live.unregister(resolved.key(), &c).unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 2_001);
    for _ in 0..10 {
        getppid();
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2_001,
        "no hit after unregister"
    );
}

#[test]
fn a_return_handler_sees_each_return_value() {
    let _g = serial();
    let Some(live) = live() else { return };
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let s = Arc::clone(&seen);
    let c = Consumer::builder()
        .handler(|_, _| ConsumerAction::Continue)
        .ret_handler(move |_ret, regs| s.lock().unwrap().push(regs.retval()))
        .build();
    let target = UprobeTarget::parse("libc.so.6:getppid").unwrap();
    let resolved = live.register(&target, &c).unwrap();
    let parent = getppid() as u64;
    for _ in 0..4 {
        assert_eq!(getppid() as u64, parent);
    }
    live.unregister(resolved.key(), &c).unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![parent; 5]);
}
