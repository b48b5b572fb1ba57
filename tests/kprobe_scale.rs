//! Specification tests of the kprobe registry at scale on one address: many
//! probes aggregated on one site cost O(probes) in peak memory to register
//! and to remove (in a batch, and with `unregister_nosync` for each plus one
//! `commit`), and hits during registration churn count exactly and run the
//! handlers in registration order.
//!
//! Removing probes with post handlers one by one (each `unregister` a
//! commit of its own) costs O(probes) in total, counted in bytes allocated:
//! a step-proof copy of the member list per removal would be quadratic.
//!
//! The memory tests count every allocation of this test binary (a global
//! allocator); the tests here take one lock so that no other test allocates
//! during a measurement.

mod kprobe_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kprobe_support::*;
use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::rcu::Rcu;

/// Counts live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Bytes ever allocated (freed or not).
static TOTAL: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System`, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            // Relaxed: a counter; the peak is a max over the values seen.
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
            TOTAL.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        unsafe { System.dealloc(p, layout) };
        // Relaxed: a counter.
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One test at a time: the allocator's counts are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// Probes on one address for the memory tests.
const N: usize = 100_000;

/// Peak bytes allowed per probe above the probes themselves: 20 pointers
/// (a member is a pointer in the list and a handle in the registry). The
/// member list's slot (twice over while a full list and its double coexist,
/// plus retired halves), the registry's handle, the retirement record of
/// the unregistration, the batch's duplicate check: 73 bytes measured.
/// Copy-on-write lists need N/2 slots per probe on average instead (390 MiB
/// for 10,000 probes at `commit`, 3.4 GiB for 30,000).
const BYTES_PER_PROBE: usize = 20 * std::mem::size_of::<Kprobe>();

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `work` and returns its peak live bytes above what was live before.
fn peak_of(work: impl FnOnce()) -> usize {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    work();
    PEAK.load(Ordering::SeqCst) - base
}

fn check_peak(what: &str, peak: usize) {
    let per = peak / N;
    println!("{what}: peak +{peak} bytes for {N} probes ({per} per probe)");
    assert!(
        peak <= BYTES_PER_PROBE * N,
        "{what}: peak +{peak} bytes is more than {BYTES_PER_PROBE} per probe"
    );
}

#[test]
fn registering_and_batch_unregistering_many_probes_on_one_address_takes_linear_memory() {
    let _serial = lock();
    let rcu = Rcu::new();
    let fx = fixture_with(|b| b.rcu(rcu.clone()));
    let probes: Vec<Kprobe> = (0..N).map(|_| Kprobe::at(F_MOV_EAX).build()).collect();
    let refs: Vec<&Kprobe> = probes.iter().collect();
    let peak = peak_of(|| {
        for p in &probes {
            fx.reg.register(p).unwrap();
        }
        fx.reg.unregister_many(&refs).unwrap();
        rcu.barrier();
    });
    check_peak("register + unregister_many", peak);
    assert!(fx.reg.sites().is_empty());
    assert_eq!(fx.reg.text().snapshot(), code());
}

#[test]
fn unregister_nosync_for_each_of_many_probes_on_one_address_then_commit_takes_linear_memory() {
    let _serial = lock();
    let rcu = Rcu::new();
    let fx = fixture_with(|b| b.rcu(rcu.clone()));
    let probes: Vec<Kprobe> = (0..N).map(|_| Kprobe::at(F_MOV_EAX).build()).collect();
    let peak = peak_of(|| {
        for p in &probes {
            fx.reg.register(p).unwrap();
        }
        for p in &probes {
            fx.reg.unregister_nosync(p).unwrap();
        }
        fx.reg.commit();
        rcu.barrier();
    });
    check_peak("register + unregister_nosync x N + commit", peak);
    assert!(fx.reg.sites().is_empty());
    assert!(probes.iter().all(|p| !p.is_registered()));
}

/// Probes with post handlers on one address, removed one by one.
const ONE_BY_ONE: usize = 4_000;

/// Bytes allocated per removal allowed: the retirement records and the
/// commit's bookkeeping of one `unregister`, a few hundred bytes measured.
/// A copy of the member list per removal (what made a commit wait for the
/// post handlers of steps in flight before the post epochs) allocates 16
/// bytes per remaining member each time: 8 * 4,000^2 = 128 MB in total,
/// 32 KB per removal on average.
const BYTES_PER_REMOVAL: usize = 2_048;

#[test]
fn removing_probes_with_post_handlers_one_by_one_allocates_linear_memory() {
    let _serial = lock();
    let rcu = Rcu::new();
    let fx = fixture_with(|b| b.rcu(rcu.clone()));
    let posts = Arc::new(AtomicU64::new(0));
    let probes: Vec<Kprobe> = (0..ONE_BY_ONE)
        .map(|_| {
            let posts = posts.clone();
            Kprobe::at(F_MOV_EAX)
                .post(move |_, _| {
                    posts.fetch_add(1, Ordering::Relaxed);
                })
                .build()
        })
        .collect();
    for p in &probes {
        fx.reg.register(p).unwrap();
    }
    rcu.barrier();
    let before = TOTAL.load(Ordering::SeqCst);
    for p in &probes {
        fx.reg.unregister(p).unwrap();
    }
    rcu.barrier();
    let total = TOTAL.load(Ordering::SeqCst) - before;
    let per = total / ONE_BY_ONE;
    println!(
        "unregister x {ONE_BY_ONE} (post handlers): {total} bytes allocated, {per} per removal"
    );
    assert!(
        per <= BYTES_PER_REMOVAL,
        "{total} bytes allocated removing {ONE_BY_ONE} probes one by one: {per} per removal"
    );
    assert!(fx.reg.sites().is_empty());
    assert!(probes.iter().all(|p| !p.is_registered()));
    assert_eq!(fx.reg.text().snapshot(), code());
}

/// A probe whose pre handler appends `tag` to the hit's log.
fn logging(tag: usize, log: &Arc<Mutex<Vec<usize>>>) -> Kprobe {
    let log = log.clone();
    Kprobe::at(F_MOV_EAX)
        .pre(move |_, _| {
            log.lock().unwrap().push(tag);
            Action::Continue
        })
        .build()
}

#[test]
fn hits_during_churn_on_an_aggregated_site_count_exactly_and_run_in_registration_order() {
    let _serial = lock();
    let fx = fixture();
    let log = Arc::new(Mutex::new(Vec::new()));
    // Tags are registration order: every log of one hit must be increasing.
    let next = AtomicUsize::new(0);
    let tag = || next.fetch_add(1, Ordering::SeqCst);
    let stable: Vec<Kprobe> = (0..3).map(|_| logging(tag(), &log)).collect();
    for p in &stable {
        fx.reg.register(p).unwrap();
    }
    const HITS: u64 = 20_000;
    let hits_done = AtomicU64::new(0);
    let churn_rounds = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut stack = Stack::new();
            for _ in 0..HITS {
                log.lock().unwrap().clear();
                let mut regs = trap_regs(F_MOV_EAX);
                assert_eq!(hit(&fx.reg, F_MOV_EAX, &mut regs, &mut stack), "boosted");
                let seen = log.lock().unwrap().clone();
                assert!(
                    seen.windows(2).all(|w| w[0] < w[1]),
                    "pre handlers out of registration order: {seen:?}"
                );
                for (t, _) in stable.iter().enumerate() {
                    assert!(seen.contains(&t), "stable probe {t} ran: {seen:?}");
                }
                hits_done.fetch_add(1, Ordering::SeqCst);
            }
        });
        // Churn until the hitter is done: probes join (growing and
        // compacting the list) and leave (one by one, in batches, nosync).
        let mut round = 0u64;
        while hits_done.load(Ordering::SeqCst) < HITS || round < 3 {
            let batch: Vec<Kprobe> = (0..12).map(|_| logging(tag(), &log)).collect();
            for p in &batch {
                fx.reg.register(p).unwrap();
            }
            match round % 3 {
                0 => {
                    for p in &batch {
                        fx.reg.unregister(p).unwrap();
                    }
                }
                1 => {
                    let refs: Vec<&Kprobe> = batch.iter().collect();
                    fx.reg.unregister_many(&refs).unwrap();
                }
                _ => {
                    for p in batch.iter().rev() {
                        fx.reg.unregister_nosync(p).unwrap();
                    }
                    fx.reg.commit();
                }
            }
            round += 1;
        }
        churn_rounds.store(round, Ordering::SeqCst);
    });
    for p in &stable {
        assert_eq!(p.hits(), HITS, "each hit runs each stable probe once");
    }
    println!(
        "{HITS} hits during {} churn rounds",
        churn_rounds.load(Ordering::SeqCst)
    );
    let ids: Vec<_> = stable.iter().map(Kprobe::id).collect();
    assert_eq!(fx.reg.sites()[0].probes, ids, "the survivors, in order");
}
