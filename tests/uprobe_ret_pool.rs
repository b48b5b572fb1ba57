//! Specification tests of the uretprobe return-stack pools: each space's
//! stacks are preallocated, a thread claims one at its outermost tracked
//! call in the space and gives it back when that call returns, when it
//! exits, or when it flushes; a call that finds no stack (pool or the
//! thread's binding table exhausted) is counted missed and is not hijacked.
//! Calls are simulated as in `uprobe_ret.rs`; threads that must hold a
//! stack while another calls are real threads.

mod uprobe_support;

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use rcu_registry::probes::uprobe::{
    default_return_stacks, Consumer, MAX_SPACES_PER_THREAD, MIN_RETURN_STACKS,
};
use uprobe_support::*;

const A: u64 = 0x40_0000;
const CALLER: u64 = 0x9000_0000;

/// A registry (`stacks` stacks per space) with one space mapping the file
/// at `A`, and a consumer with a return handler at `FN0` and `FN1`.
fn setup(stacks: usize) -> (Arc<Registry>, Arc<MemSpace>, Consumer) {
    let reg = Arc::new(Registry::new(Default::default()).with_return_stacks(stacks));
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let c = Consumer::builder().ret_handler(|_, _| {}).build();
    for f in [FN0, FN1] {
        reg.register_in_function(key(f), f, &c).unwrap();
    }
    (reg, a, c)
}

/// A thread that makes a call to `FN0` and stays inside it until told to
/// return (then it returns and exits, answering where it returned).
struct InCall {
    go: mpsc::Sender<()>,
    done: thread::JoinHandle<Ret>,
}

impl InCall {
    fn start(reg: &Arc<Registry>, space: &Arc<MemSpace>) -> InCall {
        let (reg, space) = (Arc::clone(reg), Arc::clone(space));
        let (inside_tx, inside_rx) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let done = thread::spawn(move || {
            let mut t = SimThread::new();
            let _ = t.call(&reg, &space, A + FN0, CALLER);
            inside_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            t.ret(&reg, &space, 0)
        });
        inside_rx.recv().unwrap();
        InCall { go, done }
    }

    fn finish(self) -> Ret {
        self.go.send(()).unwrap();
        self.done.join().unwrap()
    }
}

/// One call to `FN0` and its return, on a new thread.
fn call_on_new_thread(reg: &Arc<Registry>, space: &Arc<MemSpace>) -> Ret {
    InCall::start(reg, space).finish()
}

#[test]
fn the_default_pool_has_two_stacks_per_cpu_and_at_least_eight() {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(MIN_RETURN_STACKS, 8);
    assert_eq!(default_return_stacks(), (2 * cpus).max(8));
    let reg = Registry::new(Default::default());
    assert_eq!(reg.return_stacks(), default_return_stacks());
}

#[test]
fn a_call_that_finds_every_stack_held_counts_nmissed_and_returns_straight_to_its_caller() {
    let (reg, a, c) = setup(2);
    let (first, second) = (InCall::start(&reg, &a), InCall::start(&reg, &a));
    assert_eq!(reg.return_stacks_in_use(a.id), 2);

    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    assert_eq!(t.return_slot(), CALLER, "not hijacked");
    assert_eq!(reg.nmissed(key(FN0)), 1);
    assert_eq!(reg.return_depth(a.id), 0);
    assert_eq!(t.ret(&reg, &a, 0), Ret::Direct(CALLER));

    assert_eq!(first.finish(), Ret::Trampoline(CALLER));
    assert_eq!(reg.return_stacks_in_use(a.id), 1);
    // A stack is free again: the next call is tracked.
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
    assert_eq!(second.finish(), Ret::Trampoline(CALLER));
    assert_eq!(reg.return_stacks_in_use(a.id), 0);
    assert_eq!((c.ret_hits(), reg.nmissed(key(FN0))), (3, 1));
}

#[test]
fn a_thread_holds_its_stack_from_its_outermost_call_until_that_call_returns() {
    let (reg, a, _c) = setup(1);
    let mut t = SimThread::new();
    assert_eq!(
        reg.return_stacks_in_use(a.id),
        0,
        "nothing claimed up front"
    );
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    let _ = t.call(&reg, &a, A + FN1, A + 1);
    assert_eq!(
        reg.return_stacks_in_use(a.id),
        1,
        "one stack for both calls"
    );
    assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(A + 1));
    assert_eq!(reg.return_stacks_in_use(a.id), 1, "the outer call is live");
    assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(CALLER));
    assert_eq!(reg.return_stacks_in_use(a.id), 0);
    // So another thread can use the only stack now.
    assert_eq!(call_on_new_thread(&reg, &a), Ret::Trampoline(CALLER));
}

#[test]
fn the_stack_of_a_thread_that_exits_inside_a_tracked_call_goes_back_to_the_pool() {
    let (reg, a, c) = setup(1);
    {
        let (reg, a) = (Arc::clone(&reg), Arc::clone(&a));
        thread::spawn(move || {
            let mut t = SimThread::new();
            let _ = t.call(&reg, &a, A + FN0, CALLER);
            assert_eq!(reg.return_depth(a.id), 1);
            // Exits without returning (pthread_exit inside the call).
        })
        .join()
        .unwrap();
    }
    assert_eq!(reg.return_stacks_in_use(a.id), 0, "given back at exit");
    assert_eq!(call_on_new_thread(&reg, &a), Ret::Trampoline(CALLER));
    assert_eq!((c.ret_hits(), reg.nmissed(key(FN0))), (1, 0));
}

#[test]
fn flush_thread_returns_gives_back_a_stack_left_with_abandoned_frames() {
    let (reg, a, c) = setup(1);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    let _ = t.call(&reg, &a, A + FN1, A + 1);
    t.abandon_innermost();
    t.abandon_innermost(); // longjmp out of both, for good
    assert_eq!(reg.return_stacks_in_use(a.id), 1, "the frames keep it");
    assert_eq!(reg.flush_thread_returns(), 2, "both calls dropped");
    assert_eq!(reg.return_stacks_in_use(a.id), 0);
    assert_eq!(reg.return_depth(a.id), 0);
    assert_eq!(reg.flush_thread_returns(), 0, "nothing left");
    assert_eq!(call_on_new_thread(&reg, &a), Ret::Trampoline(CALLER));
    assert_eq!(
        c.ret_hits(),
        1,
        "no return handler ran for the dropped calls"
    );
}

#[test]
fn a_thread_inside_calls_of_more_spaces_than_its_table_holds_misses_the_extra_one() {
    let reg = Registry::new(Default::default());
    let spaces: Vec<Arc<MemSpace>> = (0..=MAX_SPACES_PER_THREAD as u64)
        .map(|i| {
            let s = MemSpace::with_file(10 + i, A + i * 0x1_0000);
            mmap_file(&reg, &s);
            s
        })
        .collect();
    let c = Consumer::builder().ret_handler(|_, _| {}).build();
    reg.register_in_function(key(FN0), FN0, &c).unwrap();
    // One OS thread, one simulated call stack per space, each inside a call.
    let mut threads: Vec<SimThread> = spaces.iter().map(|_| SimThread::new()).collect();
    for (t, s) in threads.iter_mut().zip(&spaces) {
        let _ = t.call(&reg, s, s.base() + FN0, CALLER);
    }
    let (last, rest) = spaces.split_last().unwrap();
    for s in rest {
        assert_eq!(reg.return_depth(s.id), 1);
    }
    assert_eq!(reg.return_depth(last.id), 0, "no table entry left");
    assert_eq!(reg.nmissed(key(FN0)), 1);
    let (last_t, rest_t) = threads.split_last_mut().unwrap();
    assert_eq!(last_t.ret(&reg, last, 0), Ret::Direct(CALLER));
    for (t, s) in rest_t.iter_mut().zip(rest) {
        assert_eq!(t.ret(&reg, s, 0), Ret::Trampoline(CALLER));
        assert_eq!(reg.return_stacks_in_use(s.id), 0);
    }
    // Entries are free again: the last space's calls are tracked now.
    let _ = last_t.call(&reg, last, last.base() + FN0, CALLER);
    assert_eq!(last_t.ret(&reg, last, 0), Ret::Trampoline(CALLER));
}

#[test]
fn a_registry_dropped_while_a_thread_holds_its_stack_confuses_nothing_later() {
    let (reg, a, _c) = setup(1);
    let (inside_tx, inside_rx) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let holder = {
        let (reg, a) = (Arc::clone(&reg), Arc::clone(&a));
        thread::spawn(move || {
            let mut t = SimThread::new();
            let _ = t.call(&reg, &a, A + FN0, CALLER);
            assert_eq!(reg.return_depth(a.id), 1);
            drop(reg);
            inside_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            // The registry is gone, its stack still bound here. A new
            // registry with a space of the same id: the stale binding is
            // not taken for its own.
            let (reg2, b, c2) = setup(1);
            assert_eq!(b.id, a.id);
            let mut t2 = SimThread::new();
            let _ = t2.call(&reg2, &b, A + FN1, CALLER);
            assert_eq!(reg2.return_depth(b.id), 1);
            assert_eq!(t2.ret(&reg2, &b, 5), Ret::Trampoline(CALLER));
            assert_eq!(
                reg2.flush_thread_returns(),
                0,
                "the stale one is not reg2's"
            );
            assert_eq!(c2.ret_hits(), 1);
            // Exits holding the dead registry's stack: the exit gives it
            // back to the torn-down pool, which frees it.
        })
    };
    inside_rx.recv().unwrap();
    assert_eq!(Arc::strong_count(&reg), 1);
    drop(reg);
    drop(a);
    go.send(()).unwrap();
    holder.join().unwrap();
}

#[test]
fn zero_stacks_track_no_call() {
    let (reg, a, c) = setup(0);
    assert_eq!(reg.return_stacks(), 0);
    let mut t = SimThread::new();
    let _ = t.call(&reg, &a, A + FN0, CALLER);
    assert_eq!(t.ret(&reg, &a, 0), Ret::Direct(CALLER));
    assert_eq!((c.ret_hits(), reg.nmissed(key(FN0))), (0, 1));
}
