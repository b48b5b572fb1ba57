//! Uretprobes: return handlers through a return-address hijack at a
//! function's entry, and the per-thread stacks of return instances.
//!
//! # Entry
//!
//! A uprobe with a consumer that has a return handler sits on a function's
//! first instruction (checked at registration: the consumer must be
//! registered with [`register_in_function`](UprobeRegistry::register_in_function)
//! naming the uprobe's own offset as the function's). When a hit's
//! consumers ran and one of them wants the return (it has a return handler,
//! its filter wants the space, it did not ask for removal, no handler asked
//! to skip the instruction), the registry replaces the return address with
//! the space's trampoline ([`AddressSpace::return_trampoline`]) through the
//! arch backend ([`Arch::hijack_return`]: the stack slot on x86_64, `x30` on
//! arm64) and pushes a *return instance* on the calling thread's stack for
//! that space: the uprobe's key, the function's address, the stack pointer
//! the call returns with, the real return address, and the largest consumer
//! sequence number the entry saw.
//!
//! # Return
//!
//! The function returns into the trampoline, which traps; the runtime calls
//! [`UprobeRegistry::on_return`]. The thread's top instance for the space
//! must have the stack pointer the thread now has: it is popped, the return
//! handlers run, and `regs.ip` becomes the real return address. Instances
//! are per thread and per space, kept in LIFO order, so nested calls and
//! recursion return in the order they were made.
//!
//! # Chained returns
//!
//! A probed function that tail-calls another (or itself) jumps to it with the
//! return address already hijacked: the second entry finds the trampoline
//! where the return address should be. Its instance is *chained*: it takes
//! the real return address from the instance below it (same stack pointer),
//! and the trampoline, which is hit once for both, pops every instance with
//! that stack pointer (newest first) and runs each one's return handlers.
//!
//! # Abandoned frames
//!
//! A call left without returning (`longjmp`, unwinding) leaves its instance
//! behind. An entry drops the instances whose stack pointer is below its own
//! (their frames are gone) and, unless chained, those at its own (a frame
//! at the same depth that never returned); a return drops those below the
//! returning one. Only the stack pointer tells a live instance from an
//! abandoned one, as in the kernel, so two cases are approximate: an
//! abandoned instance whose frame was reused by a call that is not tracked
//! stays (and counts toward the depth) until an entry or return at or above
//! its level drops it; and a probed call made on an alternate signal stack
//! above the thread's stack would wrongly drop live instances (not
//! supported).
//!
//! # Depth
//!
//! Each stack holds at most [`max_return_depth`](UprobeRegistry::max_return_depth)
//! instances ([`DEFAULT_MAX_RETURN_DEPTH`], the kernel's
//! `MAX_URETPROBE_DEPTH`): a deeper call counts `nmissed` on the uprobe and
//! its return address is left alone (so unbounded recursion costs a bounded
//! amount of memory, and the return handlers of the outer calls still run).
//!
//! # Consumers removed in flight
//!
//! An instance names its uprobe by key and holds no pointer into the
//! registry: the return looks the uprobe up again, in a read section of the
//! domain, and runs the return handlers of its current consumers whose
//! sequence number the entry saw. So a consumer unregistered while calls are
//! in flight is not called once `unregister` returned (its grace period
//! waited for every return that could still see it in the list); a consumer
//! registered after the entry is not called for that call; a uprobe removed
//! altogether runs nothing; and the instance, plain data on the thread's
//! own stack, still brings the call back to its real return address. Nothing
//! waits for in-flight calls and nothing can dangle.
//!
//! # Allocation and locks
//!
//! The stacks live in a thread-local list (one stack per registry and space
//! the thread has made tracked calls in), so the return path takes no lock:
//! only the thread itself ever touches its instances. A stack is allocated
//! with its full depth at the thread's first tracked call in that space (a
//! cold path, which also drops the stacks of registries that are gone);
//! after that, entries and returns allocate nothing. The first use is
//! therefore not async-signal-safe, as the `Srcu` domain's first read
//! section on a thread is not. A thread's stacks are freed when it exits;
//! until then a stack stays allocated (empty) after its calls returned,
//! also for a space that is gone, so a thread holds at most one stack per
//! registry and space it ever made tracked calls in.
//!
//! The list is reached only with the thread's re-entrancy flag up
//! (`reentry.rs`): a signal handler that interrupts an entry or a return and
//! hits a uprobe finds the flag up and does not touch it.

use std::cell::RefCell;
// `std`'s Arc and Weak even under loom: the token is an identity, not a
// synchronization device (its count is read only on the cold path).
use std::sync::{Arc as StdArc, Weak};

use super::consumer::UprobeReturn;
use super::reentry::{in_uprobe_handler, HandlerScope};
use super::registry::{slice, SpaceState, Target, Uprobe, UprobeRegistry};
use super::space::{AddressSpace, SpaceId, UprobeKey};
use crate::probes::arch::{Arch, DataMemory, Regs};
use crate::probes::kprobe::ReturnOutcome;
use crate::probes::ProbeError;
use crate::rcu::Flavor;

/// Default limit of tracked calls per thread and space: the kernel's
/// `MAX_URETPROBE_DEPTH`. Deep enough for ordinary recursion through probed
/// functions, small enough that a runaway recursion costs 64 instances
/// (56 bytes each, 3.5 KiB) per thread and space.
pub const DEFAULT_MAX_RETURN_DEPTH: usize = 64;

/// A tracked call: what its return needs.
#[derive(Clone, Copy, Debug)]
struct ReturnInstance {
    key: UprobeKey,
    /// The function's entry address in the space.
    func: u64,
    /// The stack pointer the call returns with.
    ret_sp: u64,
    /// The caller's return address.
    real_ret: u64,
    /// The largest consumer sequence number the entry saw.
    last_seq: u64,
}

/// One thread's instances for one registry and space, oldest first.
struct ThreadStack {
    /// The registry's token: identifies it (the allocation stays while this
    /// weak reference does, so its address is not reused) and says whether
    /// it is still alive.
    owner: Weak<()>,
    space: SpaceId,
    /// Capacity `max_depth`, allocated at creation: pushes never allocate.
    frames: Vec<ReturnInstance>,
}

// `std::cell::RefCell`, not a shim type: the list is only ever touched by
// its own thread, never shared, so there is nothing for loom to check; the
// thread-local itself comes from the shim.
crate::sync::const_thread_local! {
    /// The calling thread's return-instance stacks.
    static STACKS: RefCell<Vec<ThreadStack>> = RefCell::new(Vec::new());
}

/// A registry's return-tracking settings and identity.
pub(crate) struct Returns {
    max_depth: usize,
    token: StdArc<()>,
}

impl Returns {
    pub(crate) fn new(max_depth: usize) -> Self {
        Returns {
            max_depth,
            token: StdArc::new(()),
        }
    }

    pub(crate) fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// Runs `f` on the calling thread's stack for `space` (created if
    /// `create`). `None` if there is none, if the thread is exiting (its
    /// thread-locals are being destroyed), or if the list is already in use
    /// on this thread (cannot happen: it is reached only with the
    /// re-entrancy flag up, see the module docs; refused rather than
    /// trusted).
    #[inline]
    fn with_stack<R>(
        &self,
        space: SpaceId,
        create: bool,
        f: impl FnOnce(&mut Vec<ReturnInstance>) -> R,
    ) -> Option<R> {
        debug_assert!(
            in_uprobe_handler(),
            "return stacks reached before the re-entrancy flag"
        );
        let found = STACKS.try_with(|s| {
            let mut s = s.try_borrow_mut().ok()?;
            let me = StdArc::as_ptr(&self.token);
            let i = match s
                .iter()
                .position(|t| t.space == space && t.owner.as_ptr() == me)
            {
                Some(i) => i,
                None if create => self.new_stack(&mut s, space),
                None => return None,
            };
            Some(f(&mut s[i].frames))
        });
        found.ok().flatten()
    }

    /// Adds the thread's stack for `space`, dropping stacks of registries
    /// that are gone. Returns its index.
    #[cold]
    fn new_stack(&self, stacks: &mut Vec<ThreadStack>, space: SpaceId) -> usize {
        stacks.retain(|t| t.owner.strong_count() > 0);
        stacks.push(ThreadStack {
            owner: StdArc::downgrade(&self.token),
            space,
            frames: Vec::with_capacity(self.max_depth),
        });
        stacks.len() - 1
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
    /// in one space at once (default [`DEFAULT_MAX_RETURN_DEPTH`](DEFAULT_MAX_RETURN_DEPTH)).
    /// A hit beyond it counts `nmissed` and leaves the return address alone.
    /// Each thread's stack for a space is allocated with this many frames
    /// at its first tracked call; 0 tracks nothing.
    pub fn with_max_return_depth(mut self, depth: usize) -> Self {
        self.returns = Returns::new(depth);
        self
    }

    /// The per-thread, per-space limit of tracked calls.
    pub fn max_return_depth(&self) -> usize {
        self.returns.max_depth()
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
    /// hit's handler scope (the re-entrancy flag is up).
    #[allow(clippy::too_many_arguments)]
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
        let max_depth = self.returns.max_depth;
        let tracked = self.returns.with_stack(st.space.id(), true, |frames| {
            // Deeper frames than this call's are gone.
            while frames.last().is_some_and(|f| f.ret_sp < ret_sp) {
                frames.pop();
            }
            let found = self.arch.hijack_return(regs, mem, trampoline).ok()?;
            let chained = found == trampoline;
            let real_ret = if chained {
                // A tail call from a tracked call: the return address is
                // already ours; the real one is in the instance below.
                // None (no such instance): nothing we can restore, and the
                // hijack changed nothing (it wrote the trampoline over
                // itself).
                frames.last().filter(|f| f.ret_sp == ret_sp)?.real_ret
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
            frames.push(ReturnInstance {
                key,
                func,
                ret_sp,
                real_ret,
                last_seq,
            });
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
    /// same. Takes no lock and, once the thread's stack exists, allocates
    /// nothing.
    ///
    /// Returns [`ReturnOutcome::NotOurs`] (nothing changed) when no instance
    /// of this thread in `space` returns with this stack pointer.
    pub fn on_return(&self, space: SpaceId, regs: &mut Regs) -> ReturnOutcome {
        // Before the stack: see `reentry.rs`.
        let scope = HandlerScope::enter();
        let sp = regs.sp;
        let retval = self.arch.return_value(regs);
        let mut real = None;
        while let Some(inst) = self
            .returns
            .with_stack(space, false, |f| pop_returning(f, sp))
            .flatten()
        {
            self.run_ret_handlers(space, &inst, regs, retval, scope.is_some());
            // Newest first: the last one popped is the chain's first call,
            // and every instance of a chain holds its real return address.
            real = Some(inst.real_ret);
        }
        match real {
            Some(to) => {
                regs.ip = to;
                ReturnOutcome::Returned { to }
            }
            None => ReturnOutcome::NotOurs,
        }
    }

    /// The return handlers of `inst`'s call (or its miss count when `run`
    /// is false), in a read section of the domain.
    fn run_ret_handlers(
        &self,
        space: SpaceId,
        inst: &ReturnInstance,
        regs: &mut Regs,
        retval: u64,
        run: bool,
    ) {
        let guard = self.domain.read();
        // Removed since the entry: every consumer is gone, nothing to run.
        let Some(up) = self.uprobe_at(&guard, &inst.key) else {
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
        let Some(_scope) = HandlerScope::enter() else {
            return 0;
        };
        self.returns
            .with_stack(space, false, |f| f.len())
            .unwrap_or(0)
    }
}
