//! Re-entry at the worst moment: a "signal handler" (run by a test hook on
//! the same thread) calls a kretprobed function while the thread's return
//! path holds the instance-table stripe. With the re-entrancy flag raised
//! only after that lock, the nested entry would take the same stripe and
//! spin forever; raised before it, the nested hit is counted missed and
//! takes no lock.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use super::instances::test_hooks;
use super::this_thread::in_kprobe_handler;
use super::{HitOutcome, KprobeRegistry, Kretprobe};
use crate::probes::arch::{DataMemory, Regs, X86Reg, X86_64};
use crate::probes::outcome::ReturnOutcome;
use crate::probes::resolve::SymbolTable;
use crate::probes::text::Image;
use crate::probes::xol::XolArena;
use crate::probes::ProbeError;

/// `k`: mov eax, 7; ret.
const K: u64 = 0x1000;
const TRAMPOLINE: u64 = 0x1f00;
const SP: u64 = 0x7000_0800;
const CALLER: u64 = 0x4000_1234;

/// One page of stack at `SP`'s page.
struct Stack([u8; 0x1000]);

impl Stack {
    fn offset(addr: u64, len: usize) -> Result<usize, ProbeError> {
        let base = SP & !0xfff;
        addr.checked_sub(base)
            .map(|o| o as usize)
            .filter(|&o| o + len <= 0x1000)
            .ok_or(ProbeError::MemoryFault { addr, len })
    }
}

impl DataMemory for Stack {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        let o = Self::offset(addr, buf.len())?;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        let o = Self::offset(addr, bytes.len())?;
        self.0[o..o + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

type Reg = KprobeRegistry<X86_64, Image>;

fn registry() -> Reg {
    let mut code = vec![0xcc; 0x100];
    code[..6].copy_from_slice(&[0xb8, 7, 0, 0, 0, 0xc3]);
    let mut symbols = SymbolTable::new();
    symbols.insert("k", K, 6);
    KprobeRegistry::builder(
        X86_64,
        Image::new(K, code),
        symbols,
        Arc::new(XolArena::new(0x8000_0000, 4, X86_64::XOL_SLOT_SIZE)),
    )
    .trampoline(TRAMPOLINE)
    .build()
}

/// The entry trap of `k` called with the return address at `[sp]`.
fn enter(reg: &Reg, sp: u64, stack: &mut Stack) -> bool {
    let mut regs = Regs {
        ip: K + 1,
        sp,
        ..Regs::default()
    };
    matches!(
        reg.on_breakpoint(&mut regs, stack),
        HitOutcome::Boosted { .. }
    )
}

#[test]
fn a_kretprobe_entered_while_its_return_path_holds_the_stripe_is_missed_not_deadlocked() {
    let reg: &'static Reg = Box::leak(Box::new(registry()));
    let returns = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let r2 = Arc::clone(&returns);
    let krp = Kretprobe::at(K)
        .maxactive(4)
        .handler(move |_, _, ret| {
            assert_eq!(ret, 7);
            r2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .build()
        .unwrap();
    reg.register(&krp).unwrap();

    let mut stack = Stack([0; 0x1000]);
    stack.write_u64(SP, CALLER).unwrap();
    assert!(enter(reg, SP, &mut stack));
    assert_eq!(stack.read_u64(SP).unwrap(), TRAMPOLINE, "hijacked");
    assert_eq!(krp.in_flight(), 1);
    assert!(
        reg.instances.holds_own_stripe(),
        "filed in this thread's own stripe"
    );

    // The "signal": lands while `on_return` is inside the thread's stripe
    // (its lock-free section), and calls `k`
    // again on the same thread, one frame deeper.
    let flag_up = Rc::new(Cell::new(None));
    let nested_boosted = Rc::new(Cell::new(false));
    let (f2, n2) = (Rc::clone(&flag_up), Rc::clone(&nested_boosted));
    test_hooks::set_while_locked(move || {
        f2.set(Some(in_kprobe_handler()));
        if in_kprobe_handler() {
            let mut inner = Stack([0; 0x1000]);
            inner.write_u64(SP - 0x100, CALLER + 1).unwrap();
            n2.set(enter(reg, SP - 0x100, &mut inner));
            // Missed: its return address is left alone.
            assert_eq!(inner.read_u64(SP - 0x100).unwrap(), CALLER + 1);
        }
        // Else the old order: the nested entry would take the stripe this
        // frame holds and spin forever; the assertions below report it.
    });
    let mut regs = Regs {
        ip: TRAMPOLINE,
        sp: SP + 8,
        ..Regs::default()
    };
    regs[X86Reg::Rax] = 7;
    assert_eq!(
        reg.on_return(&mut regs),
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(
        flag_up.get(),
        Some(true),
        "the return path held the stripe before raising the re-entrancy flag"
    );
    assert!(nested_boosted.get(), "the nested call completed its entry");
    assert_eq!(regs.ip, CALLER);
    assert_eq!(returns.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(krp.probe().hits(), 1);
    assert_eq!(krp.probe().nmissed(), 1, "the nested entry is missed");
    assert_eq!(krp.in_flight(), 0, "no instance left behind");
    reg.unregister(&krp).unwrap();
}
