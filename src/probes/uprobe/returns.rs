//! Uretprobes: return handlers through a return-address hijack at a
//! function's entry, and the per-thread stacks of return instances.
//!
//! Invariant: an instance names its uprobe by key and holds no pointer into the
//! registry, and only the thread holding a stack touches it, so entries and
//! returns never allocate, take no lock, wait for nothing in flight and cannot
//! dangle. Stacks come from the space's pool (`retpool.rs`) through the
//! thread's table (`bindings.rs`), which is reached only with the re-entrancy
//! flag up (`probes/reentry.rs`).
//!
//! Entry, return, chained returns, abandoned frames, depth
//! ([`DEFAULT_MAX_RETURN_DEPTH`]) and removal in flight, in full:
//! [`crate::docs::algorithms::uretprobes`].

use super::bindings;
use super::consumer::UprobeReturn;
use super::registry::{slice, SpaceState, Target, Uprobe, UprobeRegistry};
use super::retpool::{default_return_stacks, ReturnPool};
use super::space::{AddressSpace, SpaceId, UprobeKey};
use crate::probes::arch::{Arch, DataMemory, Regs};
use crate::probes::outcome::ReturnOutcome;
use crate::probes::reentry::{in_uprobe_handler, UprobeScope};
use crate::probes::ProbeError;
use crate::rcu::Flavor;

/// Default limit of tracked calls per thread and space: the kernel's
/// `MAX_URETPROBE_DEPTH`. Deep enough for ordinary recursion through probed
/// functions, small enough that a pool's stack costs 64 instances (56 bytes
/// each, 3.5 KiB).
pub const DEFAULT_MAX_RETURN_DEPTH: usize = 64;

/// [`ReturnInstance::real_ret`] of a call whose return another registry
/// sharing the trampoline hijacked first: that registry holds the caller's
/// address (0 is never a return address).
pub(super) const FOREIGN_RETURN: u64 = 0;

/// A tracked call: what its return needs.
#[derive(Clone, Copy, Debug)]
pub(super) struct ReturnInstance {
    pub(super) key: UprobeKey,
    /// The function's entry address in the space.
    pub(super) func: u64,
    /// The stack pointer the call returns with.
    pub(super) ret_sp: u64,
    /// The caller's return address ([`FOREIGN_RETURN`]: another
    /// registry's to give).
    pub(super) real_ret: u64,
    /// The largest consumer sequence number the entry saw.
    pub(super) last_seq: u64,
}

/// Source of registry ids (`bindings.rs`). `std`'s atomic even under loom:
/// an id is an identity, published by nothing, and must stay unique across
/// model executions too.
static NEXT_REGISTRY_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A registry's return-tracking settings and identity.
pub(crate) struct Returns {
    max_depth: usize,
    stacks: usize,
    /// Names the registry in the threads' binding tables; never reused.
    pub(super) id: u64,
}

impl Returns {
    pub(crate) fn new() -> Self {
        Returns {
            max_depth: DEFAULT_MAX_RETURN_DEPTH,
            stacks: default_return_stacks(),
            // Relaxed: only uniqueness matters (the counter's modification
            // order gives it); nothing is published with the id.
            id: NEXT_REGISTRY_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The pool of return stacks for a space the registry just learned of
    /// (writer path: allocates every stack now); `None` when it could track
    /// nothing.
    #[cold]
    pub(crate) fn new_pool(&self, space: &impl AddressSpace) -> Option<ReturnPool> {
        let useful = space.return_trampoline().is_some() && self.max_depth > 0 && self.stacks > 0;
        useful.then(|| ReturnPool::new(self.stacks, self.max_depth))
    }
}

/// The top instance for a return with stack pointer `sp`, popped, after
/// dropping the abandoned deeper ones above it; `None` (nothing changed)
/// if no instance has exactly `sp`.
fn pop_returning(frames: &mut Vec<ReturnInstance>, sp: u64) -> Option<ReturnInstance> {
    let at = frames.iter().rposition(|f| f.ret_sp >= sp)?;
    if frames[at].ret_sp != sp {
        return None;
    }
    frames.truncate(at + 1);
    frames.pop()
}

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// Sets how many calls one thread may have tracked for return handlers
    /// in one space at once (default [`DEFAULT_MAX_RETURN_DEPTH`]).
    /// A hit beyond it counts `nmissed` and leaves the return address alone.
    /// Every stack of a space's pool is allocated with this many frames
    /// when the registry learns of the space (so set it before the first
    /// [`on_mmap`](Self::on_mmap): spaces already known keep their pools);
    /// 0 tracks nothing.
    pub fn with_max_return_depth(mut self, depth: usize) -> Self {
        self.returns.max_depth = depth;
        self
    }

    /// The per-thread, per-space limit of tracked calls.
    pub fn max_return_depth(&self) -> usize {
        self.returns.max_depth
    }

    /// Sets how many return stacks each space's pool has (default
    /// [`default_return_stacks`]:
    /// `max(8, 2 x CPUs)`): how many threads can be inside tracked calls of
    /// one space at once. A thread's outermost tracked call in a space
    /// claims a stack and gives it back when it returns; a call that finds
    /// none free counts `nmissed` and is not hijacked. Pools are allocated
    /// when the registry learns of a space (set this before the first
    /// [`on_mmap`](Self::on_mmap)); 0 tracks nothing. Memory per space:
    /// stacks x [`max_return_depth`](Self::max_return_depth) x 56 bytes.
    pub fn with_return_stacks(mut self, stacks: usize) -> Self {
        self.returns.stacks = stacks;
        self
    }

    /// Return stacks per space pool (see
    /// [`with_return_stacks`](Self::with_return_stacks)).
    pub fn return_stacks(&self) -> usize {
        self.returns.stacks
    }

    /// Stacks of `space`'s pool held by threads now (inside tracked calls,
    /// or holding abandoned frames until they exit); 0 for an unknown space
    /// or one without a pool. A snapshot, for diagnostics and tests.
    pub fn return_stacks_in_use(&self, space: SpaceId) -> usize {
        let g = self.domain.read();
        self.spaces
            .get(&g, &space)
            .and_then(|st| st.returns.as_ref())
            .map_or(0, |p| p.held())
    }

    /// Gives back every return stack the calling thread holds in this
    /// registry (every space), dropping its tracked calls without running
    /// their return handlers; returns how many calls were dropped. Threads
    /// that *exit* give theirs back automatically (`bindings.rs`); this is
    /// for a thread that left its tracked calls for good (`longjmp` out of
    /// them, a runtime reusing the thread). Called from a uprobe handler, 0
    /// and nothing changes.
    ///
    /// **CALL IT ONLY WHEN THE THREAD WILL NEVER RETURN THROUGH ANY OF ITS
    /// TRACKED CALLS IN THIS REGISTRY.** Such a return lands in the
    /// trampoline with nothing left to say where it came from
    /// ([`on_return`](Self::on_return) answers `NotOurs`).
    pub fn flush_thread_returns(&self) -> usize {
        if in_uprobe_handler() {
            return 0;
        }
        bindings::release(Some(self.returns.id))
    }

    /// Refuses a consumer with a return handler where returns cannot be
    /// tracked: not at a function entry (the uprobe's offset must be the
    /// function's, as named by `func_offset` and by any earlier
    /// registration on the uprobe), or in a wanted space without a
    /// trampoline. Changes nothing.
    #[cold]
    pub(super) fn check_return_site(
        &self,
        key: UprobeKey,
        func_offset: Option<u64>,
        known: Option<u64>,
        targets: &[Target<S, F>],
        consumer: &super::Consumer,
    ) -> Result<(), ProbeError> {
        // Offsets, not addresses: a uprobe's function is named in the file.
        // The caller must name the function, and name this very offset.
        if func_offset != Some(key.offset) {
            return Err(ProbeError::NotAtFunctionEntry {
                addr: key.offset,
                func_start: func_offset,
            });
        }
        // An earlier registration placed the offset inside another function.
        if let Some(f) = known.filter(|&f| f != key.offset) {
            return Err(ProbeError::NotAtFunctionEntry {
                addr: key.offset,
                func_start: Some(f),
            });
        }
        let lacking = targets.iter().any(|(st, _, _)| {
            consumer.wants(st.space.id()) && st.space.return_trampoline().is_none()
        });
        if lacking {
            return Err(ProbeError::NoReturnTrampoline);
        }
        Ok(())
    }

    /// At a hit whose consumers want the return: hijacks the return address
    /// and pushes the instance, or counts the call missed. Runs inside the
    /// hit's handler scope (the re-entrancy flag is up), never on a trap
    /// nested in the live runtime's trap handling: the live trap-path walk
    /// stops here by name (`runtime/callgraph/flag_up.rs`), so it stays a
    /// function of its own.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    pub(super) fn track_return(
        &self,
        st: &SpaceState<S, F>,
        up: &Uprobe<F>,
        key: UprobeKey,
        func: u64,
        last_seq: u64,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) {
        let Some(trampoline) = st.space.return_trampoline() else {
            return up.count_missed();
        };
        let ret_sp = self.arch.stack_pointer_at_return(regs);
        let pool = st.returns.as_ref();
        let id = self.returns.id;
        let tracked = bindings::with_stack(id, st.space.id(), pool, |frames, max_depth| {
            // Deeper frames than this call's are gone.
            while frames.last().is_some_and(|f| f.ret_sp < ret_sp) {
                frames.pop();
            }
            let found = self.arch.hijack_return(regs, mem, trampoline).ok()?;
            let chained = found == trampoline;
            let real_ret = if chained {
                // A tail call from a tracked call: the return address is
                // already ours; the real one is in the instance below. No
                // such instance: another registry sharing the trampoline
                // (the live runtime's kretprobes, x86_64) hijacked this
                // return first and holds the caller's address. The call is
                // tracked all the same: its return handlers run at the
                // return, whose address is the other registry's to give
                // (`returning`).
                match frames.last().filter(|f| f.ret_sp == ret_sp) {
                    Some(below) => below.real_ret,
                    None => FOREIGN_RETURN,
                }
            } else {
                // Same depth, real return address: those never returned.
                while frames.last().is_some_and(|f| f.ret_sp == ret_sp) {
                    frames.pop();
                }
                found
            };
            if frames.len() >= max_depth {
                if !chained {
                    // Undo: put the real return address back (the slot was
                    // just read and written, so this write succeeds).
                    let _ = self.arch.hijack_return(regs, mem, found);
                }
                return None;
            }
            // Within the capacity reserved when the stack was made
            // (`len < max_depth <= capacity`): a push that can never grow,
            // written so that no allocation is even reachable (the live
            // trap path calls no C-library function).
            if frames.len() >= frames.capacity() {
                return None;
            }
            // SAFETY: `len < capacity` (checked just above): the slot at
            // `len` is allocated and uninitialised; it becomes part of the
            // vector by the `set_len` that follows the write.
            unsafe {
                frames.as_mut_ptr().add(frames.len()).write(ReturnInstance {
                    key,
                    func,
                    ret_sp,
                    real_ret,
                    last_seq,
                });
                frames.set_len(frames.len() + 1);
            }
            Some(())
        });
        if tracked.flatten().is_none() {
            up.count_missed();
        }
    }

    /// Handles a return into `space`'s trampoline: `regs` as the function
    /// returned (stack pointer past the return address on x86_64). Pops the
    /// calling thread's instances for this stack pointer (several for a
    /// chained return, newest first), runs each one's return handlers
    /// (consumers that saw the entry and are still registered, in
    /// registration order, whose filter wants `space`) with the return
    /// value, drops abandoned deeper instances, and sets `regs.ip` to the
    /// real return address.
    ///
    /// On a thread already running uprobe handlers the return handlers do
    /// not run (`nmissed`); the real return address is restored all the
    /// same. Takes no lock and allocates nothing.
    ///
    /// Returns [`ReturnOutcome::NotOurs`] (nothing changed) when no instance
    /// of this thread in `space` returns with this stack pointer. Also
    /// `NotOurs`, after the handlers ran, when the chain's first hijack was
    /// another registry's sharing the trampoline (the live runtime's
    /// kretprobes, x86_64): that registry restores the caller's address.
    pub fn on_return(&self, space: SpaceId, regs: &mut Regs) -> ReturnOutcome {
        // Return handlers read without arming (see `on_breakpoint`).
        self.domain.arm_reader();
        self.returning::<false>(space, regs)
    }

    /// [`on_return`](Self::on_return) calling no C-library function and
    /// never waiting for a writer lock (the live runtime's trap path). A
    /// uprobe whose lookup raced writers and could not be confirmed is
    /// taken as removed: its return handlers do not run this time (the real
    /// return address is restored all the same).
    // Used by the live runtime only, which loom builds leave out.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn on_return_in_trap(&self, space: SpaceId, regs: &mut Regs) -> ReturnOutcome {
        self.returning::<true>(space, regs)
    }

    fn returning<const TRAP: bool>(&self, space: SpaceId, regs: &mut Regs) -> ReturnOutcome {
        // No stack held: not a tracked return of this thread (the live
        // runtime's kretprobe returns ask here too), one thread-local load.
        if !bindings::holds_any() {
            return ReturnOutcome::NotOurs;
        }
        // Before the stack: see `probes/reentry.rs`.
        let scope = UprobeScope::enter();
        let sp = regs.sp;
        let retval = self.arch.return_value(regs);
        let mut real = None;
        while let Some(inst) =
            bindings::with_stack(self.returns.id, space, None, |f, _| pop_returning(f, sp))
                .flatten()
        {
            self.run_ret_handlers::<TRAP>(space, &inst, regs, retval, scope.is_some());
            // Newest first: the last one popped is the chain's first call,
            // and every instance of a chain holds its real return address.
            real = Some(inst.real_ret);
        }
        match real {
            Some(FOREIGN_RETURN) | None => ReturnOutcome::NotOurs,
            Some(to) => {
                regs.ip = to;
                ReturnOutcome::Returned { to }
            }
        }
    }

    /// The return handlers of `inst`'s call (or its miss count when `run`
    /// is false), in a read section of the domain.
    fn run_ret_handlers<const TRAP: bool>(
        &self,
        space: SpaceId,
        inst: &ReturnInstance,
        regs: &mut Regs,
        retval: u64,
        run: bool,
    ) {
        let guard = self.domain.read_in_trap();
        let up = if TRAP {
            match self.hot.get(&guard, &inst.key) {
                Some(u) => Some(u),
                // Busy: taken as removed (see `on_return_in_trap`).
                None => self.uprobes.get_in_trap(&guard, &inst.key).unwrap_or(None),
            }
        } else {
            self.uprobe_at(&guard, &inst.key)
        };
        // Removed since the entry: every consumer is gone, nothing to run.
        let Some(up) = up else {
            return;
        };
        if !run {
            return up.count_missed();
        }
        let ret = UprobeReturn {
            space,
            func: inst.func,
            key: inst.key,
            ret_addr: inst.real_ret,
            retval,
        };
        for m in slice(up.consumers.load(&guard)) {
            // Later members joined after the entry (ascending numbers).
            if m.seq > inst.last_seq {
                break;
            }
            m.run_ret(&ret, regs);
        }
    }

    /// Calls the calling thread has tracked in `space` and not yet returned
    /// from (diagnostics and tests; other threads' stacks are private).
    /// Called from a uprobe handler, 0: the stack is not reached there.
    pub fn return_depth(&self, space: SpaceId) -> usize {
        let Some(_scope) = UprobeScope::enter() else {
            return 0;
        };
        bindings::with_stack(self.returns.id, space, None, |f, _| f.len()).unwrap_or(0)
    }
}
