//! Property test of uprobe return tracking: random programs of calls,
//! returns, tail calls and `longjmp`s on one simulated thread, against a
//! reference model of what each return must do.
//!
//! The model applies the documented rules (`uprobe/returns.rs`) to the
//! simulated stack: an entry drops instances below its stack pointer (and
//! at it unless chained), counts `nmissed` at the depth limit, chains onto
//! a hijacked frame; a return drops those below and pops those at its stack
//! pointer. Checked after every step: a return goes to its frame's real
//! return address, through the trampoline exactly when the frame was
//! hijacked, running the return handlers of exactly the model's popped
//! instances, newest first, with the real return address and the return
//! value; the registry holds exactly the model's instances (abandoned ones
//! included, until cleaned) and counts the same misses; after a final call
//! at the outermost level nothing is left.

mod uprobe_support;

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction};
use uprobe_support::*;

const A: u64 = 0x40_0000;

/// Probed functions with a return handler.
const RET_FNS: [u64; 3] = [FN0, FN1, FN2];
/// A probed function whose only consumer has no return handler.
const PLAIN_FN: u64 = FN3;

#[derive(Clone, Debug)]
enum Op {
    /// Calls function `f` (index into `RET_FNS`, or `PLAIN_FN` for 3).
    Call(usize),
    /// The innermost call returns this value.
    Ret(u64),
    /// The innermost call tail-calls function `f`.
    TailCall(usize),
    /// The innermost call is left by `longjmp`.
    Longjmp,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize).prop_map(Op::Call),
        3 => (0..1000u64).prop_map(Op::Ret),
        1 => (0..4usize).prop_map(Op::TailCall),
        1 => Just(Op::Longjmp),
    ]
}

fn func(i: usize) -> u64 {
    RET_FNS.get(i).copied().unwrap_or(PLAIN_FN)
}

/// One call of the model: where it entered, where it returns, whether its
/// return address now holds the trampoline.
struct Frame {
    entry_sp: u64,
    real_ret: u64,
    hijacked: bool,
}

/// An instance the registry must hold: (stack pointer at return, function,
/// real return address).
type Inst = (u64, u64, u64);

/// The documented rules (`uprobe/returns.rs`) over the simulated stack.
struct Model {
    sp: u64,
    frames: Vec<Frame>,
    insts: Vec<Inst>,
    max_depth: usize,
    missed: u64,
}

impl Model {
    /// An entry of `f` into the innermost frame (a new call or a tail call).
    fn enter(&mut self, f: u64) {
        let frame = self.frames.last_mut().unwrap();
        let ret_sp = frame.entry_sp + 8;
        // The body's prologue: `push rbp` at FN0, nothing at the `nop`s.
        self.sp = frame.entry_sp - if f == A + FN0 { 8 } else { 0 };
        if f == A + PLAIN_FN {
            return;
        }
        // Deeper instances than this call's are abandoned.
        self.insts.retain(|i| i.0 >= ret_sp);
        let real_ret = if frame.hijacked {
            // Chained: the real address is in the instance below.
            match self.insts.last() {
                Some(i) if i.0 == ret_sp => i.2,
                _ => unreachable!("a hijacked frame has its instance"),
            }
        } else {
            // Same depth, real return address: abandoned too.
            self.insts.retain(|i| i.0 != ret_sp);
            frame.real_ret
        };
        if self.insts.len() >= self.max_depth {
            self.missed += 1;
            return;
        }
        frame.hijacked = true;
        self.insts.push((ret_sp, f, real_ret));
    }

    /// The innermost call returns: where to, and the instances whose
    /// handlers run (newest first).
    fn ret(&mut self) -> (Ret, Vec<Inst>) {
        let frame = self.frames.pop().unwrap();
        let sp = frame.entry_sp + 8;
        self.sp = sp;
        if !frame.hijacked {
            return (Ret::Direct(frame.real_ret), Vec::new());
        }
        self.insts.retain(|i| i.0 >= sp);
        let mut ran = Vec::new();
        while self.insts.last().is_some_and(|i| i.0 == sp) {
            ran.push(self.insts.pop().unwrap());
        }
        (Ret::Trampoline(frame.real_ret), ran)
    }
}

type Log = Arc<Mutex<Vec<(u64, u64, u64)>>>;

fn run(ops: &[Op], max_depth: usize) -> Result<(), TestCaseError> {
    let reg = Registry::new(Default::default()).with_max_return_depth(max_depth);
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    for f in RET_FNS {
        let log = Arc::clone(&log);
        let c = Consumer::builder()
            .ret_handler(move |r, _| log.lock().unwrap().push((r.func, r.ret_addr, r.retval)))
            .build();
        reg.register_in_function(key(f), f, &c).unwrap();
    }
    reg.register_in_function(
        key(PLAIN_FN),
        PLAIN_FN,
        &Consumer::new(|_, _| ConsumerAction::Continue),
    )
    .unwrap();

    let mut t = SimThread::new();
    let mut m = Model {
        sp: t.sp,
        frames: Vec::new(),
        insts: Vec::new(),
        max_depth,
        missed: 0,
    };
    let mut next_caller = 0x9000_0000u64;
    for op in ops {
        match *op {
            Op::Call(i) => {
                let f = A + func(i);
                next_caller += 4;
                let _ = t.call(&reg, &a, f, next_caller);
                m.sp -= 8;
                m.frames.push(Frame {
                    entry_sp: m.sp,
                    real_ret: next_caller,
                    hijacked: false,
                });
                m.enter(f);
            }
            Op::TailCall(i) if !m.frames.is_empty() => {
                let f = A + func(i);
                let _ = t.tail_call(&reg, &a, f);
                m.enter(f);
            }
            Op::Ret(v) if !m.frames.is_empty() => {
                let (want, insts) = m.ret();
                prop_assert_eq!(t.ret(&reg, &a, v), want);
                let ran: Vec<_> = std::mem::take(&mut *log.lock().unwrap());
                let expected: Vec<_> = insts.iter().map(|i| (i.1, i.2, v)).collect();
                prop_assert_eq!(ran, expected, "return handlers, newest first");
            }
            Op::Longjmp if !m.frames.is_empty() => {
                t.abandon_innermost();
                let f = m.frames.pop().unwrap();
                m.sp = f.entry_sp + 8;
            }
            _ => {}
        }
        prop_assert_eq!(t.sp, m.sp, "the simulation and the model agree");
        prop_assert_eq!(reg.return_depth(a.id), m.insts.len(), "tracked calls");
        let missed: u64 = RET_FNS.iter().map(|&f| reg.nmissed(key(f))).sum();
        prop_assert_eq!(missed, m.missed, "calls beyond the depth limit");
        prop_assert!(
            log.lock().unwrap().is_empty(),
            "a handler ran outside a return"
        );
    }
    // Unwind, then one call at the outermost level cleans what lingers.
    while !m.frames.is_empty() {
        let (want, _) = m.ret();
        prop_assert_eq!(t.ret(&reg, &a, 0), want);
    }
    if max_depth > 0 {
        let _ = t.call(&reg, &a, A + FN0, 0x1234);
        prop_assert_eq!(t.ret(&reg, &a, 0), Ret::Trampoline(0x1234));
        prop_assert_eq!(reg.return_depth(a.id), 0, "nothing lingers");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_return_goes_to_its_caller_through_the_handlers_of_its_tracked_calls(
        ops in prop::collection::vec(op(), 0..60),
        max_depth in 0usize..6,
    ) {
        run(&ops, max_depth)?;
    }
}
