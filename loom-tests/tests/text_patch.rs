//! loom model of the int3-first patch window (`probes::text::PatchWindow`):
//! a patcher rewrites one instruction twice, back to back, while another
//! thread runs it, traps on whatever `int3` it fetches and asks the window
//! whether that `int3` is transient. Every `int3` in the model is the
//! patcher's, so a "foreign" verdict (which would hand the thread to the
//! default SIGTRAP action and kill the process) is always wrong.
//!
//! The trap handler is modelled as code on the trapping thread, run right
//! after the fetch (a real handler runs later, which only adds
//! interleavings of the same kind). The instruction's first byte is an
//! `AtomicU8` written with relaxed stores: weaker than the real patcher's
//! volatile stores followed by a core-serializing `membarrier`, so the
//! window's own orderings are what the model checks.
//!
//! Checked by mutation, each caught as a foreign verdict (about 5,800
//! executions at the default bound, well under a second):
//! - dropping the second sequence read (deciding on the byte alone once no
//!   patch was seen in progress, as the code did before);
//! - dropping the `SeqCst` fence in `open` (the `int3` store may then become
//!   visible before the odd sequence);
//! - dropping the handler's `Acquire` fence between its byte read and its
//!   second sequence read.
//!
//! The patcher does not re-read the byte before patching: with loom 0.7, a
//! spawned thread whose first operation was that load made the model run a
//! single execution (found while checking the mutations above; kept out so
//! the model explores).
//!
//! What this model does NOT cover:
//! - instruction fetch itself, the tail bytes and `membarrier` core syncs
//!   (the torn-instruction guarantee is tested on real code by
//!   `tests/runtime_text.rs`);
//! - a foreign `int3` (the unit tests in `patch_window.rs` cover the
//!   verdicts on a stable view);
//! - more than one trapping thread, and executions beyond the preemption
//!   bound (`LOOM_MAX_PREEMPTIONS`, default 3 here).

#![cfg(loom)]

mod probe_common;

use loom::sync::atomic::{AtomicU8, Ordering};
use loom::sync::Arc;
use loom::thread;
use probe_common::model;
use rcu_registry::__internals::text::{PatchWindow, INT3};

const AT: u64 = 0x1000;
/// First bytes of the two versions of the instruction (`mov eax, imm32`
/// with different immediates share the opcode; what matters is "not int3").
const OLD: u8 = 0xb8;
const NEW: u8 = 0xb9;

struct Text {
    window: PatchWindow,
    byte0: AtomicU8,
}

/// One int3-first patch of byte 0 to `to`, as `InProcess` does it (the
/// tail bytes are not modelled).
fn patch(t: &Text, to: u8) {
    t.window.open(AT);
    t.byte0.store(INT3, Ordering::Relaxed);
    t.byte0.store(to, Ordering::Relaxed);
    t.window.close();
}

#[test]
fn a_thread_trapping_on_back_to_back_patches_is_never_told_foreign() {
    model(|| {
        let t = Arc::new(Text {
            window: PatchWindow::new(),
            byte0: AtomicU8::new(OLD),
        });
        let patcher = {
            let t = t.clone();
            thread::spawn(move || {
                patch(&t, NEW);
                patch(&t, OLD);
            })
        };
        // The running thread: fetches byte 0 twice (two calls of the
        // function); each fetch of an int3 traps into the handler.
        for _ in 0..2 {
            if t.byte0.load(Ordering::Relaxed) == INT3 {
                let transient = t
                    .window
                    .transient_int3_at(AT, || Some(t.byte0.load(Ordering::Relaxed)));
                assert!(
                    transient,
                    "the patcher's int3 was judged foreign: the process would die of SIGTRAP"
                );
            }
        }
        patcher.join().unwrap();
        assert_eq!(t.byte0.load(Ordering::Relaxed), OLD);
    });
}
