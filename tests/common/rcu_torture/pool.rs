//! Versioned objects, the checks readers run on them, and their tallies.
//!
//! # Objects
//!
//! As in rcutorture, objects come from a fixed pool that lives for the whole
//! run (type-stable memory) and every field is an atomic, so a reader that a
//! broken grace period failed to protect reads stale or poisoned values
//! instead of freed memory: the checks below report it, nothing is undefined.
//! One object at a time is *current*; writers publish a fresh one and
//! *retire* the old one.
//!
//! # Life cycle
//!
//! `LIVE` (published, payload = `pattern(version, i)`) -> `RETIRED`
//! (unpublished; `retired_gp` records the domain's completed grace-period
//! count read after the unlink) -> after a grace period, `POISONED` (payload
//! overwritten with [`POISON`]) -> quarantine (a FIFO, so poisoned objects
//! stay poisoned for a while) -> free list -> reused with a new version.
//!
//! # What readers check
//!
//! Inside one read section a reader loads the current object and checks,
//! before and after an optional delay:
//! - the state is not `POISONED` and no payload word is [`POISON`];
//! - the payload matches the version (no torn or recycled contents);
//! - the version did not change (the object was not reused under it);
//! - its *age*: `completed_gps() - retired_gp` if the object is retired.
//!
//! The age bound: let the writer unlink the object at time U and then read
//! the completed count g (after a SeqCst fence). Grace period g+2 cannot have
//! started before that read, so it started after U; a reader that still sees
//! the object began before that grace period, which therefore cannot complete
//! while the reader is inside. So every count the reader reads inside its
//! section is at most g+1: an age above one grace period is an error, the
//! analogue of rcutorture's "pipe count > 1".
//!
//! Callbacks and `synchronize()` check the converse: when an object is
//! poisoned, at least one grace period has completed since it was retired.

use super::domain::TortureDomain;
use super::rng::Rng;
use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Payload words per object: enough for a torn or recycled object to show.
const PAYLOAD_WORDS: usize = 8;
/// The poison written into retired objects (the kernel slab's free byte).
pub const POISON: u64 = 0x6b6b_6b6b_6b6b_6b6b;
/// `retired_gp` of an object that has not been retired.
const NOT_RETIRED: u64 = u64::MAX;
/// Poisoned objects stay in quarantine until this many more are queued
/// behind them, so a reader that outlives its grace period sees the poison
/// rather than a recycled object.
const QUARANTINE_LEN: usize = 512;

const LIVE: u32 = 1;
const RETIRED: u32 = 2;
const POISONED: u32 = 3;

/// Age histogram buckets: 0, 1, 2 and "3 or more" grace periods.
pub const AGE_BUCKETS: usize = 4;

/// One versioned object.
struct Obj {
    version: AtomicU64,
    retired_gp: AtomicU64,
    state: AtomicU32,
    payload: [AtomicU64; PAYLOAD_WORDS],
}

fn pattern(version: u64, word: usize) -> u64 {
    let p = version
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(word as u32 * 7)
        ^ (word as u64 + 1);
    // Never equal to the poison, so a poison hit is unambiguous.
    if p == POISON {
        !p
    } else {
        p
    }
}

/// Errors found, by kind. All must stay zero for a correct domain.
#[derive(Debug, Default)]
pub struct Errors {
    /// A reader saw a poisoned object.
    pub poison_seen: AtomicU64,
    /// A reader saw a payload that does not match the version.
    pub corrupt: AtomicU64,
    /// The object's version changed while a reader was inside its section.
    pub recycled_under_reader: AtomicU64,
    /// A reader saw an object more than one grace period after retirement.
    pub too_old: AtomicU64,
    /// An object was poisoned before a grace period had completed since its
    /// retirement (a callback or `synchronize()` returned too early).
    pub early_reclaim: AtomicU64,
    /// An object was poisoned twice (a callback ran twice).
    pub double_reclaim: AtomicU64,
}

impl Errors {
    /// Total number of errors.
    pub fn total(&self) -> u64 {
        [
            &self.poison_seen,
            &self.corrupt,
            &self.recycled_under_reader,
            &self.too_old,
            &self.early_reclaim,
            &self.double_reclaim,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Reader-side tallies, merged into the pool's at the end of a reader's run.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Read sections run.
    pub reads: u64,
    /// Nested sections run.
    pub nested: u64,
    /// Sections in which the reader slept or yielded.
    pub delayed: u64,
    /// Age checks on an object that was still current (not retired).
    pub current: u64,
    /// Age histogram of retired objects seen.
    pub ages: [u64; AGE_BUCKETS],
    /// Oldest age seen.
    pub max_age: u64,
}

impl Tally {
    fn record_age(&mut self, age: u64) {
        self.ages[(age as usize).min(AGE_BUCKETS - 1)] += 1;
        self.max_age = self.max_age.max(age);
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Tally) {
        self.reads += other.reads;
        self.nested += other.nested;
        self.delayed += other.delayed;
        self.current += other.current;
        for (a, b) in self.ages.iter_mut().zip(other.ages.iter()) {
            *a += b;
        }
        self.max_age = self.max_age.max(other.max_age);
    }
}

/// A pool of versioned objects protected by domain `D`.
pub struct Pool<D: TortureDomain> {
    domain: D,
    objs: Box<[Obj]>,
    current: AtomicUsize,
    next_version: AtomicU64,
    free: Mutex<Vec<usize>>,
    quarantine: Mutex<VecDeque<usize>>,
    /// Errors found so far.
    pub errors: Errors,
    /// Merged reader tallies.
    pub tally: Mutex<Tally>,
    /// Objects retired through `synchronize()`.
    pub retired_sync: AtomicU64,
    /// Objects retired through `call()`.
    pub retired_call: AtomicU64,
    /// Times a writer found no free object and waited with `barrier()`.
    pub alloc_stalls: AtomicU64,
}

impl<D: TortureDomain> Pool<D> {
    /// A pool of `size` objects with one of them published.
    pub fn new(domain: D, size: usize) -> Arc<Self> {
        assert!(
            size > QUARANTINE_LEN + 16,
            "pool too small for the quarantine"
        );
        let objs: Box<[Obj]> = (0..size)
            .map(|_| Obj {
                version: AtomicU64::new(0),
                retired_gp: AtomicU64::new(NOT_RETIRED),
                state: AtomicU32::new(POISONED),
                payload: std::array::from_fn(|_| AtomicU64::new(POISON)),
            })
            .collect();
        let pool = Pool {
            domain,
            objs,
            current: AtomicUsize::new(0),
            next_version: AtomicU64::new(1),
            free: Mutex::new((1..size).collect()),
            quarantine: Mutex::new(VecDeque::new()),
            errors: Errors::default(),
            tally: Mutex::new(Tally::default()),
            retired_sync: AtomicU64::new(0),
            retired_call: AtomicU64::new(0),
            alloc_stalls: AtomicU64::new(0),
        };
        pool.fill(0);
        Arc::new(pool)
    }

    /// The domain protecting the pool.
    pub fn domain(&self) -> &D {
        &self.domain
    }

    fn fill(&self, idx: usize) {
        let obj = &self.objs[idx];
        // Relaxed: only the writer that took `idx` off the free list touches
        // it until the Release swap in `publish` makes it visible.
        let v = self.next_version.fetch_add(1, Ordering::Relaxed);
        obj.retired_gp.store(NOT_RETIRED, Ordering::Relaxed);
        for (i, w) in obj.payload.iter().enumerate() {
            w.store(pattern(v, i), Ordering::Relaxed);
        }
        obj.version.store(v, Ordering::Relaxed);
        obj.state.store(LIVE, Ordering::Relaxed);
    }

    fn alloc(&self) -> usize {
        loop {
            if let Some(i) = self.free.lock().unwrap().pop() {
                return i;
            }
            // Free list empty: recycle quarantined objects early (they are
            // poisoned and past their grace period), else wait for the
            // callbacks that will poison more.
            {
                let mut q = self.quarantine.lock().unwrap();
                let take = q.len() / 2;
                if take > 0 {
                    let mut free = self.free.lock().unwrap();
                    free.extend(q.drain(..take));
                    continue;
                }
            }
            self.alloc_stalls.fetch_add(1, Ordering::Relaxed);
            self.domain.barrier();
        }
    }

    /// Publishes a fresh object and retires the old one; returns the old
    /// one's index, which the caller must hand to [`Self::reclaim`] after a
    /// grace period.
    fn publish_and_retire(&self) -> usize {
        let idx = self.alloc();
        self.fill(idx);
        // AcqRel: Release publishes `fill`'s stores to readers' Acquire load
        // of `current`; Acquire gives us the old object's fields.
        let old = self.current.swap(idx, Ordering::AcqRel);
        // The unlink before the completed-count read (see the module docs:
        // pairs with the grace-period leader's fence after its start CAS).
        fence(Ordering::SeqCst);
        let g = self.domain.completed_gps();
        let obj = &self.objs[old];
        obj.state.store(RETIRED, Ordering::Relaxed);
        // Release: a reader that sees `g` also sees RETIRED.
        obj.retired_gp.store(g, Ordering::Release);
        old
    }

    /// Poisons the retired object `idx` and quarantines it. Called after a
    /// grace period (from a callback or after `synchronize()`).
    fn reclaim(&self, idx: usize) {
        let obj = &self.objs[idx];
        let retired = obj.retired_gp.load(Ordering::Acquire);
        let now = self.domain.completed_gps();
        if retired == NOT_RETIRED || now < retired + 1 {
            self.errors.early_reclaim.fetch_add(1, Ordering::Relaxed);
        }
        if obj
            .state
            .compare_exchange(RETIRED, POISONED, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            self.errors.double_reclaim.fetch_add(1, Ordering::Relaxed);
            return;
        }
        for w in obj.payload.iter() {
            w.store(POISON, Ordering::Relaxed);
        }
        let mut q = self.quarantine.lock().unwrap();
        q.push_back(idx);
        if q.len() > QUARANTINE_LEN {
            let out = q.pop_front().expect("non-empty quarantine");
            drop(q);
            self.free.lock().unwrap().push(out);
        }
    }

    /// Writer step: retire through `synchronize()`.
    pub fn retire_with_synchronize(&self) {
        let old = self.publish_and_retire();
        self.domain.synchronize();
        self.reclaim(old);
        self.retired_sync.fetch_add(1, Ordering::Relaxed);
    }

    /// Writer step: retire through `call()`.
    pub fn retire_with_call(self: &Arc<Self>) {
        let old = self.publish_and_retire();
        let pool = Arc::clone(self);
        self.domain.call(move || pool.reclaim(old));
        self.retired_call.fetch_add(1, Ordering::Relaxed);
    }

    /// Checks the contents of `obj` against `version`; true if clean.
    fn check_contents(&self, obj: &Obj, version: u64) -> bool {
        let mut poisoned = obj.state.load(Ordering::Relaxed) == POISONED;
        let mut corrupt = false;
        for (i, w) in obj.payload.iter().enumerate() {
            let v = w.load(Ordering::Relaxed);
            if v == POISON {
                poisoned = true;
            } else if v != pattern(version, i) {
                corrupt = true;
            }
        }
        if poisoned {
            self.errors.poison_seen.fetch_add(1, Ordering::Relaxed);
        } else if corrupt {
            self.errors.corrupt.fetch_add(1, Ordering::Relaxed);
        }
        !poisoned && !corrupt
    }

    fn check_age(&self, obj: &Obj, tally: &mut Tally) {
        // Acquire: the completed-count load below is not hoisted above this
        // one (an earlier count only makes the age smaller, never a false
        // error, but keep the check as strong as it can be).
        let retired = obj.retired_gp.load(Ordering::Acquire);
        if retired == NOT_RETIRED {
            tally.current += 1;
            return;
        }
        let age = self.domain.completed_gps().saturating_sub(retired);
        tally.record_age(age);
        if age > 1 {
            self.errors.too_old.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One read section with all checks, delayed inside as `rng` decides.
    pub fn read_and_check(&self, rng: &mut Rng, tally: &mut Tally) {
        let nested = rng.one_in(16);
        self.read_around(tally, nested, || delay_inside_section::<D>(rng));
    }

    /// One read section with all checks, running `inside` where
    /// [`Self::read_and_check`] may delay (it returns whether it counts as
    /// a delay): a test forces an overlap with a writer through it.
    pub fn read_around(&self, tally: &mut Tally, nested: bool, inside: impl FnOnce() -> bool) {
        let guard = self.domain.read();
        // Acquire pairs with the writer's Release swap: the object's
        // contents as filled are visible.
        let idx = self.current.load(Ordering::Acquire);
        let obj = &self.objs[idx];
        let version = obj.version.load(Ordering::Relaxed);
        let mut clean = self.check_contents(obj, version);
        self.check_age(obj, tally);
        if nested {
            // A nested section must not end the outer one.
            let inner = self.domain.read();
            clean &= self.check_contents(obj, version);
            drop(inner);
            tally.nested += 1;
        }
        if inside() {
            tally.delayed += 1;
        }
        self.check_age(obj, tally);
        if obj.version.load(Ordering::Relaxed) != version {
            self.errors
                .recycled_under_reader
                .fetch_add(1, Ordering::Relaxed);
        } else if clean {
            self.check_contents(obj, version);
        }
        drop(guard);
        tally.reads += 1;
    }

    /// A read section inside which this thread retires the object the
    /// section is reading (it is reclaimed through `call()` after the
    /// section): the reader checks a retired object's age and contents on
    /// every run, not only when the scheduler happens to interleave a
    /// reader and a writer that way. Call it while the free list is not
    /// empty (early in a run): an empty one would make `alloc` wait for a
    /// grace period inside the section.
    pub fn read_across_retire(self: &Arc<Self>, tally: &mut Tally) {
        let mut old = None;
        self.read_around(tally, false, || {
            old = Some(self.publish_and_retire());
            true
        });
        let old = old.expect("the section ran its inside");
        let pool = Arc::clone(self);
        self.domain.call(move || pool.reclaim(old));
        self.retired_call.fetch_add(1, Ordering::Relaxed);
    }

    /// Merges a reader's tally.
    pub fn merge(&self, t: &Tally) {
        self.tally.lock().unwrap().merge(t);
    }

    /// After every writer stopped and `barrier()`: every object is either
    /// current or poisoned and back in the free list or quarantine.
    pub fn audit(&self) -> Result<(), String> {
        let cur = self.current.load(Ordering::Acquire);
        let free = self.free.lock().unwrap().clone();
        let q: Vec<usize> = self.quarantine.lock().unwrap().iter().copied().collect();
        let mut seen = vec![false; self.objs.len()];
        seen[cur] = true;
        for &i in free.iter().chain(q.iter()) {
            if std::mem::replace(&mut seen[i], true) {
                return Err(format!("{}: object {i} reclaimed twice", D::NAME));
            }
            if self.objs[i].state.load(Ordering::Relaxed) != POISONED {
                return Err(format!("{}: object {i} reclaimed unpoisoned", D::NAME));
            }
        }
        if let Some(lost) = seen.iter().position(|s| !s) {
            return Err(format!(
                "{}: object {lost} was retired but never reclaimed (a callback did not run)",
                D::NAME
            ));
        }
        Ok(())
    }
}

/// Maybe spends time inside a read section: a spin of a few microseconds,
/// a yield, or (sleepable domains) a short sleep. Returns whether it did.
pub fn delay_inside_section<D: TortureDomain>(rng: &mut Rng) -> bool {
    if rng.one_in(128) {
        let until = Instant::now() + Duration::from_micros(rng.below(20) + 1);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        true
    } else if rng.one_in(1024) {
        std::thread::yield_now();
        true
    } else if D::MAY_SLEEP && rng.one_in(512) {
        std::thread::sleep(Duration::from_micros(rng.below(400) + 50));
        true
    } else {
        false
    }
}
