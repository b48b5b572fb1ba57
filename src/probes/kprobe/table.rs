//! The RCU hash table of probe sites: chains published with release stores,
//! walked lock-free under an `Rcu` read guard; and each site's member list,
//! appended and removed in place.
//!
//! # Shape
//!
//! A fixed power-of-two array of buckets, each the head of a singly linked
//! chain of [`Site`]s (one per probed address). A site points to its current
//! [`Members`]: the probes on that address in registration order, and the
//! [`SiteExec`] that says how to complete a hit (the decoded instruction and
//! its XOL plan).
//!
//! # Member lists
//!
//! Guarantees and costs first. For N probes on one address:
//!
//! - registering them costs O(N) time in total (O(1) amortized each) and
//!   O(N) memory, replaced lists included;
//! - removing them costs O(1) each in the top half (`unregister_nosync`, or
//!   each probe of `unregister_many`), plus at most one O(N) copy per site
//!   per commit, made only when removed slots are at least half the list:
//!   a batch of any size costs O(N) time and O(N) peak memory, and so does
//!   removing them one by one (`unregister` each), post handlers or not;
//! - a hit reads the length once and walks the slots below it with plain
//!   loads: lock-free and wait-free under its `Rcu` read guard, no
//!   allocation, no read-modify-write, in registration order;
//! - a hit sees each member fully (its handlers and state were written
//!   before it became visible) or not at all, and never one that was freed:
//!   a removed member is freed only after a grace period (and, for the post
//!   handlers of single-steps in flight, after those steps: below).
//!
//! The algorithm. A list is an array of slots with spare capacity and a
//! published length. A slot goes from null to a probe exactly once and
//! never takes another probe:
//!
//! - **append** (a probe joins the site): store the probe's pointer in slot
//!   `len`, then store `len + 1` with `Release`; readers load the length
//!   with `Acquire` (pairs with it), so every slot below the length they
//!   read holds its probe. A full list is replaced by a copy twice the live
//!   size (removed slots dropped), published with a `Release` swap of the
//!   site's list pointer; the old list is retired (freed after a grace
//!   period by the domain's callback worker: `deferred.rs`). Copies double,
//!   so they cost O(N) in total, and the retired ones sum to less than the
//!   live one.
//! - **remove**: the probe's slot (its index is kept in the probe, writer
//!   only) is cleared; a probe with a post handler is *marked* instead (its
//!   pointer kept, low bit set): a hit skips both, but a single-step whose
//!   pre handlers ran before the removal still runs the marked probe's post
//!   handler. The writer's handle on the probe goes to the pending
//!   retirement, so the probe outlives the grace period of the commit.
//! - **wait for post handlers** (by the commit, for each site that lost a
//!   member with a post handler): the steps that may still run it are
//!   counted per site in two counters chosen by the parity of the site's
//!   *post epoch* ([`SiteExec`]), as SRCU counts readers. A hit loads the
//!   epoch (`Acquire`) before it reads any slot, and a step that will run
//!   post handlers counts itself under that epoch. The commit bumps the
//!   epoch (`Release`, after the removals' marks), waits for its grace
//!   period, then for the old epoch's counter to drain. A step that ran the
//!   removed probe's pre handler read its slot unmarked, so it read the old
//!   epoch (one that read the new epoch sees the mark) and counted itself
//!   within its read section, which the grace period waits for: the drain
//!   covers it, on whichever list of the site it runs. Steps that start
//!   later skip the marked slot and are not waited for. The commit copies
//!   nothing for it: removing N probes with post handlers one by one costs
//!   O(N), not one O(N) copy each.
//! - **compact** (by the commit, once per site that lost members since the
//!   last commit, when removed slots are at least half of the list, so that
//!   each copy is paid for by as many removals): a copy without the removed
//!   slots is published and the old list retired with the batch. A removed
//!   slot left in place is safe without it: a cleared one (a hit that
//!   still sees the probe is in a read section that the removal's grace
//!   period waits for, and post handlers run inside a read section too,
//!   `hit.rs`), and a marked one whose probe was given back (a post pass
//!   dereferences a marked slot only for a step that ran the probe's pre
//!   handler, i.e. one the commit waited for; `hit.rs`, `run_posts`).
//!
//! Member lists *borrow* their probes (plain pointers, no reference
//! counts): the registry's handle (in the writer's `SiteState`, then in the
//! pending retirement) keeps each probe alive until every list that may
//! still show it to a reader is finished.
//!
//! # Publication
//!
//! Writers (serialized by the registry mutex) never modify anything a reader
//! may be looking at, except these:
//!
//! - **chain links** (`bucket`, `Site::next`): a new site is fully built,
//!   then stored at the head with `Release`; an unlinked site keeps its own
//!   `next`, so a reader standing on it walks on into the live chain;
//! - **a site's member list pointer**: replaced as a whole (growth,
//!   compaction) with a `Release` swap;
//! - **a list's length and slots**: the append and removal above.
//!
//! Readers load the pointers and the length with `Acquire`, which pairs with
//! those stores: whatever a reader reaches was completely written before it
//! was published. What was unlinked or replaced is retired, and freed only
//! after a grace period (and, for member lists, after every single-step in
//! flight on them finished).

use std::sync::Arc;

use std::mem::ManuallyDrop;

use super::probe::{Kprobe, ProbeInner};
use crate::probes::arch::{Insn, XolPlan};
use crate::probes::xol::XolAllocator;
use crate::rcu::RcuGuard;
use crate::sync::atomic::{fence, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// How hits on one address are completed. Shared by every member list the
/// site ever had, so the slot is freed when the last of them is.
pub(crate) struct SiteExec {
    pub(crate) insn: Insn,
    /// `None` for emulated instructions.
    pub(crate) plan: Option<XolPlan>,
    /// Held for its `Drop`, which frees the slot.
    _slot: Option<SlotOwner>,
    /// The site's post epoch: bumped by a commit that must wait for the
    /// post handlers of members removed since the last one (module docs,
    /// "wait for post handlers"). Site-wide, across its member lists.
    epoch: AtomicUsize,
    /// Steps in flight that will run post handlers, by the parity of the
    /// epoch they read.
    post_steps: [AtomicUsize; 2],
    /// Where a trap hit without post handlers resumes instead of completing
    /// the displaced instruction itself: the relocated instructions in the
    /// site's jump detour (0: none). Set by the jump optimizer before it
    /// writes the displaced bytes and cleared after it restored them
    /// (`kprobe/jump.rs`), so that no trap hit resumes inside bytes about
    /// to change.
    pub(crate) detour: AtomicU64,
}

/// Gives an XOL slot back to its allocator when dropped.
struct SlotOwner {
    xol: Arc<dyn XolAllocator>,
    slot: u64,
}

impl Drop for SlotOwner {
    fn drop(&mut self) {
        // Dropped with the last member list of the site, i.e. after the
        // grace period that retired it and after every single-step on the
        // slot finished: no trap handler will send a thread here any more.
        // (A site that was never published has had no thread near it.)
        // A thread it sent here earlier for a *boosted* run may still be
        // about to execute the slot, and no grace period covers it (it is in
        // no read section). `finish_pending` has already run the
        // allocator's `quiesce` on boosted slots, which waits such threads
        // out where it can; what makes freeing safe in every case is the
        // allocator's reuse rule (only for the same address, same bytes,
        // unless its `quiesce` proved the slot unused; see `xol.rs`). So the
        // slot goes back now, not after yet another grace period: a probe
        // registered again at the address as soon as `commit` returns takes
        // this slot back instead of binding a new one to the address.
        self.xol.free(self.slot);
    }
}

impl SiteExec {
    /// An emulated instruction: no slot.
    pub(crate) fn emulated(insn: Insn) -> Self {
        SiteExec {
            insn,
            plan: None,
            _slot: None,
            epoch: AtomicUsize::new(0),
            post_steps: [AtomicUsize::new(0), AtomicUsize::new(0)],
            detour: AtomicU64::new(0),
        }
    }

    /// An instruction run from the slot `plan.slot_addr`, freed when the
    /// last member list referring to it is dropped.
    pub(crate) fn out_of_line(insn: Insn, plan: XolPlan, xol: Arc<dyn XolAllocator>) -> Self {
        SiteExec {
            insn,
            plan: Some(plan),
            _slot: Some(SlotOwner {
                xol,
                slot: plan.slot_addr,
            }),
            epoch: AtomicUsize::new(0),
            post_steps: [AtomicUsize::new(0), AtomicUsize::new(0)],
            detour: AtomicU64::new(0),
        }
    }

    /// The post epoch, for a hit: load it before reading any slot, and
    /// issue an acquire fence between the two (the hit path's one fence
    /// after this load and [`Members::len_relaxed`]).
    #[inline]
    pub(crate) fn epoch_relaxed(&self) -> usize {
        // Relaxed, with the caller's acquire fence after it (before any
        // slot is read): the fence pairs with the Release store in
        // `bump_epoch`, so a hit that reads the new epoch sees every
        // removal marked before the bump and runs no pre handler of those
        // probes. A fence, not an acquire load: one serves this load and
        // the length's, and under qemu-user an acquire load (`ldar`) is a
        // locked host instruction where the fence's load ordering (`dmb
        // ishld`) costs an x86 host nothing; on arm64 hardware a relaxed
        // load followed by `dmb ishld` orders it before every later load
        // and store, as `ldar` would.
        self.epoch.load(Ordering::Relaxed)
    }

    /// Counts a step that will run post handlers under `epoch` (read by
    /// [`epoch_relaxed`](Self::epoch_relaxed) in the same read section); returns the parity
    /// to give back with [`post_step_done`](Self::post_step_done).
    #[inline]
    pub(crate) fn post_step_started(&self, epoch: usize) -> usize {
        let parity = epoch & 1;
        // Relaxed: inside the hit's read section, which the commit's grace
        // period waits for before it reads the counter.
        self.post_steps[parity].fetch_add(1, Ordering::Relaxed);
        parity
    }

    /// A counted step finished its post handlers (or was abandoned).
    #[inline]
    pub(crate) fn post_step_done(&self, parity: usize) {
        // Release pairs with the Acquire load in `wait_post_steps`: the
        // post handlers this step ran happen-before the commit returns.
        self.post_steps[parity].fetch_sub(1, Ordering::Release);
    }

    /// Starts a new post epoch and returns the parity of the old one, whose
    /// steps the caller waits out with [`wait_post_steps`](Self::wait_post_steps)
    /// after a grace period. Writer mutex held (after the removals' marks),
    /// commits serialized: each epoch's counter drained before the epoch
    /// comes round again.
    pub(crate) fn bump_epoch(&self) -> usize {
        // Relaxed: only the writer stores the epoch.
        let e = self.epoch.load(Ordering::Relaxed);
        // Release pairs with the acquire fence after `epoch_relaxed`: the marks stored
        // before it are visible to a hit that reads the new value.
        self.epoch.store(e.wrapping_add(1), Ordering::Release);
        e & 1
    }

    /// Waits until no step counted under the epoch of parity `parity` is in
    /// flight. The caller waited for a grace period after `bump_epoch`.
    pub(crate) fn wait_post_steps(&self, parity: usize) {
        let mut backoff = crate::sync::Backoff::new();
        // Acquire pairs with the Release decrement in `post_step_done`.
        while self.post_steps[parity].load(Ordering::Acquire) != 0 {
            backoff.snooze();
        }
    }
}

/// Capacity of a site's first member list: exactly its one probe. Most
/// addresses never get a second (probes on distinct functions pay no spare
/// slot); the first join copies one pointer into a list of four, and each
/// later copy doubles the room.
pub(crate) const MIN_MEMBER_SLOTS: usize = 1;

/// The probes on one address: a fixed-capacity array of slots, appended in
/// place (see the module docs, "Member lists").
///
/// A slot goes from null to a probe exactly once, before `len` covers it,
/// and from that probe to null at most once (removal); it never takes
/// another probe. A list is replaced only by a compacted copy (growth, or
/// a commit dropping removed slots).
pub(crate) struct Members {
    /// Slots `0..len` are published; readers load it with `Acquire`.
    len: AtomicUsize,
    /// Borrowed pointers (`Arc::as_ptr`) to the probes; the writer's
    /// `SiteState` (`site.rs`) and, once removed, the
    /// pending retirement hold the references that keep them alive. Slot
    /// 0 is inline, the others in `rest`: a site's first list (one slot,
    /// most sites' only one) is one allocation, not two.
    first: AtomicPtr<ProbeInner>,
    /// Slots `1..capacity` (empty, unallocated, for a one-slot list).
    rest: Box<[AtomicPtr<ProbeInner>]>,
    pub(crate) exec: Arc<SiteExec>,
    /// Single-steps started on this list and not yet completed (or
    /// abandoned). A retired list is freed only when this is zero.
    pub(crate) inflight: AtomicUsize,
}

impl Members {
    /// A list of `capacity` slots (at least `probes.len()`) holding
    /// `probes` in order.
    pub(crate) fn new<'a>(
        probes: impl ExactSizeIterator<Item = &'a Kprobe>,
        capacity: usize,
        exec: &Arc<SiteExec>,
    ) -> *mut Members {
        let mut probes = probes;
        let n = probes.len();
        let capacity = capacity.max(n).max(1);
        let first = probes.next().map_or(std::ptr::null_mut(), |p| p.as_raw());
        // One allocation of the exact size, none for a one-slot list (a
        // chained iterator would not tell `collect` its length: measured
        // 570 instructions per site).
        let mut rest = Vec::with_capacity(capacity - 1);
        rest.extend(probes.map(|p| AtomicPtr::new(p.as_raw())));
        rest.resize_with(capacity - 1, || AtomicPtr::new(std::ptr::null_mut()));
        Box::into_raw(Box::new(Members {
            // Plain initialisation: the whole list is published by the
            // Release store of its pointer (`Site::new` + `Table::insert`,
            // or `Site::replace_members`).
            len: AtomicUsize::new(n),
            first: AtomicPtr::new(first),
            rest: rest.into_boxed_slice(),
            exec: Arc::clone(exec),
            inflight: AtomicUsize::new(0),
        }))
    }

    /// The published length: slots below it hold a probe or null (removed).
    #[inline]
    pub(crate) fn len(&self) -> usize {
        let n = self.len_relaxed();
        // Acquire: see `len_relaxed`.
        fence(Ordering::Acquire);
        n
    }

    /// [`len`](Self::len) without its fence: the caller issues an acquire
    /// fence after this load and before it reads any slot (the hit path's
    /// one fence for this load and the epoch's).
    #[inline]
    pub(crate) fn len_relaxed(&self) -> usize {
        // Relaxed, with an acquire fence after it (here in `len`, or the
        // caller's) that pairs with the Release store in `push`: the slot
        // stored there (and the probe it points to, complete since before
        // its registration) is visible for every index below the value
        // read. (Why a fence and not an acquire load: `SiteExec::epoch_relaxed`.)
        self.len.load(Ordering::Relaxed)
    }

    /// The probe in slot `i` (`i` below a value [`len`](Self::len)
    /// returned) for a hit, or `None` if it was removed.
    ///
    /// The handle is borrowed (never dropped, so no reference count
    /// changes): valid while the caller's read section lasts.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<ManuallyDrop<Kprobe>> {
        let p = self.load(i);
        if p.is_null() || p as usize & REMOVED != 0 {
            return None;
        }
        // SAFETY: a live slot points to a probe the writer keeps alive
        // until a grace period after the slot changed, and the caller's
        // read section is one the grace period waits for; never dropped.
        Some(unsafe { Kprobe::borrow_raw(p) })
    }

    /// The probe in slot `i` for the post handlers of a hit whose pre
    /// handler ran on it, also if it was removed since, as long as it kept
    /// its post handler reachable (a probe with a post handler is marked
    /// removed, not cleared). `None` if the slot was cleared.
    ///
    /// # Safety
    /// The caller ran this member's pre handler on this hit, and is in a
    /// read section and holds a count in the site's post epoch (a
    /// single-step) or is still in the read section of the hit: a marked
    /// probe lives until the steps counted in the epochs that could have
    /// run its pre handler are done (the commit waits for them: module
    /// docs), a cleared one until a grace period after the clearing. A
    /// marked slot whose pre handler the caller did not run may point to a
    /// probe given back already.
    #[inline]
    pub(crate) unsafe fn get_for_post(&self, i: usize) -> Option<ManuallyDrop<Kprobe>> {
        let p = self.load(i);
        // The mark off (pointer arithmetic keeps the provenance).
        let p = p
            .cast::<u8>()
            .wrapping_sub(p as usize & REMOVED)
            .cast::<ProbeInner>();
        // SAFETY: see the function's contract; never dropped.
        (!p.is_null()).then(|| unsafe { Kprobe::borrow_raw(p) })
    }

    #[inline]
    fn load(&self, i: usize) -> *mut ProbeInner {
        // Relaxed: the slot's probe was stored before the Release store of
        // `len` (or of the list pointer) that the caller's Acquire load
        // read, so this load sees that probe or a later removal, never the
        // initial null; a removal publishes nothing (readers that still see
        // the probe are covered by the grace period the removal waits for).
        self.slot(i).load(Ordering::Relaxed)
    }

    /// Slot `i` (below the capacity).
    #[inline]
    fn slot(&self, i: usize) -> &AtomicPtr<ProbeInner> {
        match i.checked_sub(1) {
            None => &self.first,
            Some(j) => &self.rest[j],
        }
    }

    /// Capacity (writer only: it never changes).
    pub(crate) fn capacity(&self) -> usize {
        1 + self.rest.len()
    }

    /// Appends `probe` in place. Writer only, with `len < capacity`.
    pub(crate) fn push(&self, probe: &Kprobe) {
        // Relaxed: only the writer (mutex held) stores `len`.
        let n = self.len.load(Ordering::Relaxed);
        assert!(n < self.capacity(), "push into a full member list");
        // Relaxed: the slot is beyond `len`, no reader looks at it; the
        // Release below publishes it.
        self.slot(n).store(probe.as_raw(), Ordering::Relaxed);
        // Release pairs with the Acquire load in `len`: a reader that sees
        // `n + 1` sees the slot (and the probe, built before).
        self.len.store(n + 1, Ordering::Release);
    }

    /// Removes the probe in slot `i`: new hits skip it. With `keep_post`
    /// the pointer stays, marked, for the post handlers of steps already
    /// in flight (the caller then makes the commit wait for those steps);
    /// otherwise the slot is cleared. Writer only.
    pub(crate) fn remove(&self, i: usize, keep_post: bool) {
        // Relaxed: only the writer stores slots.
        let p = self.slot(i).load(Ordering::Relaxed);
        let v = if keep_post {
            p.cast::<u8>().wrapping_add(REMOVED).cast::<ProbeInner>()
        } else {
            std::ptr::null_mut()
        };
        // Relaxed: a reader that still sees the probe is in a read section
        // that the removal's grace period waits for; nothing is published.
        self.slot(i).store(v, Ordering::Relaxed);
    }
}

/// Low bit of a slot: the probe was removed, its pointer kept for the post
/// handlers of steps in flight (`ProbeInner` is aligned to 8).
const REMOVED: usize = 1;

/// One probed address in a chain.
pub(crate) struct Site {
    pub(crate) addr: u64,
    next: AtomicPtr<Site>,
    members: AtomicPtr<Members>,
}

impl Site {
    pub(crate) fn new(addr: u64, members: *mut Members) -> *mut Site {
        Box::into_raw(Box::new(Site {
            addr,
            next: AtomicPtr::new(std::ptr::null_mut()),
            members: AtomicPtr::new(members),
        }))
    }

    /// The current member list.
    #[inline]
    pub(crate) fn members<'g>(&'g self, _guard: &'g RcuGuard<'_>) -> &'g Members {
        // Relaxed, then an acquire fence: the fence pairs with the Release
        // swap in `replace_members` (and the Release publication of the
        // site itself): the list is fully built. (A fence for the load
        // ordering an acquire load gives: `SiteExec::epoch_relaxed`.)
        let p = self.members.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        // SAFETY: a published site always points to a live list; a replaced
        // list is freed only after a grace period, and `_guard` is a read
        // section that the grace period waits for.
        unsafe { &*p }
    }

    /// The current member list, for the writer (which owns it).
    pub(crate) fn members_ptr(&self) -> *mut Members {
        // Relaxed: the writer mutex orders the writer's own stores.
        self.members.load(Ordering::Relaxed)
    }

    /// Publishes `new` and returns the replaced list, which the caller must
    /// retire (free after a grace period and its in-flight steps).
    pub(crate) fn replace_members(&self, new: *mut Members) -> *mut Members {
        // Release: the new list's contents happen-before any reader's
        // Acquire load that sees it. The old value needs no Acquire: only the
        // writer (serialized by the mutex) ever stored it.
        self.members.swap(new, Ordering::Release)
    }
}

/// Multiplier of the address hash (2^64 / golden ratio): spreads nearby and
/// aligned addresses over the buckets.
const HASH_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// The bucket array.
pub(crate) struct Table {
    buckets: Box<[AtomicPtr<Site>]>,
    shift: u32,
}

impl Table {
    /// `buckets` rounded up to a power of two (at least 2).
    pub(crate) fn new(buckets: usize) -> Self {
        let n = buckets.max(2).next_power_of_two();
        Table {
            buckets: (0..n)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            shift: 64 - n.trailing_zeros(),
        }
    }

    #[inline]
    fn bucket(&self, addr: u64) -> &AtomicPtr<Site> {
        &self.buckets[(addr.wrapping_mul(HASH_MUL) >> self.shift) as usize]
    }

    /// The site at `addr`, if any. Lock-free: loads only.
    #[inline]
    pub(crate) fn lookup<'g>(&'g self, addr: u64, _guard: &'g RcuGuard<'_>) -> Option<&'g Site> {
        // Relaxed, then an acquire fence before a site is read: the fence
        // pairs with the Release stores in `insert`/`unlink`, so a site
        // reached is completely initialized. An empty bucket (a miss) pays
        // no fence. (A fence for the load ordering an acquire load gives:
        // `SiteExec::epoch_relaxed`.)
        let mut p = self.bucket(addr).load(Ordering::Relaxed);
        while !p.is_null() {
            fence(Ordering::Acquire);
            // SAFETY: `p` was published to the chain; it is freed only after
            // a grace period that waits for `_guard`'s read section.
            let site = unsafe { &*p };
            if site.addr == addr {
                return Some(site);
            }
            // Relaxed, with the fence at the loop's head: as for the
            // bucket head.
            p = site.next.load(Ordering::Relaxed);
        }
        None
    }

    /// Links `site` at the head of its chain.
    ///
    /// # Safety
    /// Writer only (registry mutex held); `site` is a fresh, unpublished
    /// `Site::new` pointer not in any chain.
    pub(crate) unsafe fn insert(&self, site: *mut Site) {
        // SAFETY: `site` is live and not yet shared (caller's contract).
        let s = unsafe { &*site };
        let bucket = self.bucket(s.addr);
        // Relaxed: the site is not yet reachable; the Release below orders it.
        s.next
            .store(bucket.load(Ordering::Relaxed), Ordering::Relaxed);
        // Release: publishes the site's fields and member list to readers'
        // Acquire loads.
        bucket.store(site, Ordering::Release);
    }

    /// Unlinks `site` from its chain. It stays valid for readers already on
    /// it (its `next` is untouched); the caller retires it.
    ///
    /// # Safety
    /// Writer only (registry mutex held); `site` is in this table.
    pub(crate) unsafe fn unlink(&self, site: *mut Site) {
        // SAFETY: linked sites are live while the writer holds the mutex.
        let s = unsafe { &*site };
        // Relaxed: the writer's own earlier stores (mutex-ordered).
        let next = s.next.load(Ordering::Relaxed);
        let mut link = self.bucket(s.addr);
        loop {
            let p = link.load(Ordering::Relaxed);
            assert!(!p.is_null(), "unlink of a site that is not in its chain");
            if p == site {
                // Release: a reader that follows the new link to `next` sees
                // `next` fully built (it was published earlier anyway; the
                // Release keeps that true if chains are ever spliced).
                link.store(next, Ordering::Release);
                return;
            }
            // SAFETY: chain members are live under the writer mutex.
            link = unsafe { &(*p).next };
        }
    }

    /// Every linked site, for the registry's teardown.
    pub(crate) fn drain(&mut self) -> Vec<*mut Site> {
        let mut out = Vec::new();
        for b in self.buckets.iter() {
            // Relaxed: `&mut self`, no reader or writer remains.
            let mut p = b.swap(std::ptr::null_mut(), Ordering::Relaxed);
            while !p.is_null() {
                out.push(p);
                // SAFETY: linked sites are live until freed by the caller.
                p = unsafe { (*p).next.load(Ordering::Relaxed) };
            }
        }
        out
    }
}
