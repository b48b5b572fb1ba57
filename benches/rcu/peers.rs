//! The peers of `benches/rcu.rs` and the helper threads the benchmarks run
//! beside the measured one: busy and slow readers, synchronize() callers.

use bench_peers::{Published, UrcuMemb};
use rcu_registry::rcu::{Rcu, RcuCell, Srcu};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Barrier, RwLock};
use std::thread;
use std::time::{Duration, Instant};

/// CPU time consumed by the calling thread.
///
/// Read pairs are timed with it rather than with the wall clock: the machine
/// is shared and usually oversubscribed, and wall time would then charge a
/// nanosecond-scale loop for the time slices other processes ran in.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clock id is a constant the
    // kernel supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

// ---------------------------------------------------------------------------
// Read pairs.

/// The read-pair loops of every peer, each timing `iters` read pairs.
pub struct Readers {
    rcu_cell: RcuCell<u64>,
    pub srcu: Srcu,
    srcu_cell: RcuCell<u64, Srcu>,
    epoch: crossbeam_epoch::Atomic<u64>,
    arc_swap: arc_swap::ArcSwap<u64>,
    rwlock: RwLock<u64>,
    urcu_value: Published,
}

impl Readers {
    pub fn new() -> Arc<Readers> {
        let srcu = Srcu::new();
        Arc::new(Readers {
            rcu_cell: RcuCell::new(42),
            srcu_cell: RcuCell::new_in(42, srcu.clone()),
            srcu,
            epoch: crossbeam_epoch::Atomic::new(42),
            arc_swap: arc_swap::ArcSwap::from_pointee(42),
            rwlock: RwLock::new(42),
            urcu_value: Published::new(42),
        })
    }

    /// Runs `iters` read pairs of `peer`, returning the thread CPU time
    /// taken.
    pub fn run(&self, peer: Peer, iters: u64) -> Duration {
        if let Peer::Urcu(urcu) = peer {
            // liburcu readers register once per thread; the loop runs in C.
            thread_local! {
                static REG: std::cell::OnceCell<bench_peers::Registration> =
                    const { std::cell::OnceCell::new() };
            }
            return REG.with(|r| {
                let reg = r.get_or_init(|| urcu.register());
                let start = thread_cpu_time();
                black_box(urcu.read_pairs(reg, &self.urcu_value, iters));
                thread_cpu_time() - start
            });
        }
        let start = thread_cpu_time();
        match peer {
            Peer::Rcu => {
                let rcu = Rcu::global();
                for _ in 0..iters {
                    let g = rcu.read();
                    black_box(*self.rcu_cell.load(&g).unwrap());
                }
            }
            Peer::Srcu => {
                for _ in 0..iters {
                    let g = self.srcu.read();
                    black_box(*self.srcu_cell.load(&g).unwrap());
                }
            }
            Peer::EpochPin => {
                for _ in 0..iters {
                    let g = crossbeam_epoch::pin();
                    let p = self.epoch.load(Ordering::Acquire, &g);
                    // SAFETY: the pointer is never retired while benchmarks
                    // run (it is dropped with `Readers`), so it is valid.
                    black_box(unsafe { *p.deref() });
                }
            }
            Peer::ArcSwap => {
                for _ in 0..iters {
                    let g = self.arc_swap.load();
                    black_box(**g);
                }
            }
            Peer::RwLock => {
                for _ in 0..iters {
                    let g = self.rwlock.read().unwrap();
                    black_box(*g);
                }
            }
            Peer::Urcu(_) => unreachable!("handled above"),
        }
        thread_cpu_time() - start
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader holds a guard on the pointer.
        unsafe {
            drop(
                self.epoch
                    .swap(
                        crossbeam_epoch::Shared::null(),
                        Ordering::AcqRel,
                        crossbeam_epoch::unprotected(),
                    )
                    .into_owned(),
            )
        };
    }
}

#[derive(Clone, Copy)]
pub enum Peer {
    Rcu,
    Srcu,
    EpochPin,
    ArcSwap,
    RwLock,
    Urcu(UrcuMemb),
}

pub fn read_peers() -> Vec<(&'static str, Peer)> {
    let mut v = vec![
        ("rcu", Peer::Rcu),
        ("srcu", Peer::Srcu),
        ("crossbeam_epoch_pin", Peer::EpochPin),
        ("arc_swap_load", Peer::ArcSwap),
        ("rwlock_read", Peer::RwLock),
    ];
    match UrcuMemb::get() {
        Some(u) => v.push(("liburcu_memb", Peer::Urcu(u))),
        None => eprintln!("liburcu-memb peer skipped: bench-peers was built without liburcu-dev"),
    }
    v
}

/// Threads looping over read sections of `peer` until dropped.
pub struct BusyReaders {
    stop: Arc<AtomicBool>,
    urcu_stop: Arc<AtomicI32>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// How long each section of the slow reader lasts (see
/// `concurrent_synchronize`).
pub const SLOW_SECTION: Duration = Duration::from_micros(5);

impl BusyReaders {
    /// One thread whose read sections each last [`SLOW_SECTION`].
    pub fn start_slow(peer: Peer, readers: &Arc<Readers>) -> BusyReaders {
        let stop = Arc::new(AtomicBool::new(false));
        let urcu_stop = Arc::new(AtomicI32::new(0));
        let (r, stop2, urcu_stop2) = (readers.clone(), stop.clone(), urcu_stop.clone());
        let thread = thread::spawn(move || match peer {
            Peer::Urcu(u) => {
                let reg = u.register();
                black_box(u.read_slow_until(&reg, &r.urcu_value, &urcu_stop2, SLOW_SECTION));
            }
            Peer::Rcu => {
                while !stop2.load(Ordering::Relaxed) {
                    let g = Rcu::global().read();
                    black_box(r.rcu_cell.load(&g));
                    let until = Instant::now() + SLOW_SECTION;
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                }
            }
            _ => unreachable!("slow readers exist for Rcu and liburcu only"),
        });
        BusyReaders {
            stop,
            urcu_stop,
            threads: vec![thread],
        }
    }

    pub fn start(n: usize, peer: Peer, readers: &Arc<Readers>) -> BusyReaders {
        let stop = Arc::new(AtomicBool::new(false));
        let urcu_stop = Arc::new(AtomicI32::new(0));
        let threads = (0..n)
            .map(|_| {
                let (r, stop, urcu_stop) = (readers.clone(), stop.clone(), urcu_stop.clone());
                thread::spawn(move || match peer {
                    Peer::Urcu(u) => {
                        let reg = u.register();
                        black_box(u.read_until(&reg, &r.urcu_value, &urcu_stop));
                    }
                    _ => {
                        while !stop.load(Ordering::Relaxed) {
                            r.run(peer, 1000);
                        }
                    }
                })
            })
            .collect();
        BusyReaders {
            stop,
            urcu_stop,
            threads,
        }
    }
}

impl Drop for BusyReaders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.urcu_stop.store(1, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

/// A peer's `synchronize()`.
pub type SyncFn = Arc<dyn Fn() + Send + Sync>;

/// `synchronize()` calls each caller makes per round: back-to-back calls
/// keep the callers overlapping (a single call per thread mostly measures
/// how far apart the barrier wakes the threads).
pub const CALLS_PER_ROUND: usize = 10;

/// `n` threads that each call `sync` [`CALLS_PER_ROUND`] times per round.
pub struct Callers {
    start: Arc<Barrier>,
    end: Arc<Barrier>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Callers {
    pub fn start(n: usize, sync: SyncFn) -> Callers {
        let start = Arc::new(Barrier::new(n + 1));
        let end = Arc::new(Barrier::new(n + 1));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let (start, end, stop, sync) =
                    (start.clone(), end.clone(), stop.clone(), sync.clone());
                thread::spawn(move || loop {
                    start.wait();
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    for _ in 0..CALLS_PER_ROUND {
                        sync();
                    }
                    end.wait();
                })
            })
            .collect();
        Callers {
            start,
            end,
            stop,
            threads,
        }
    }

    pub fn round(&self) {
        self.start.wait();
        self.end.wait();
    }
}

impl Drop for Callers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.start.wait();
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}
