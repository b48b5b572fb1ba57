//! Bad input to the kprobe registry: every refusal is a typed error, and the
//! registry (its sites, probes, slots) and the text (byte for byte) are
//! exactly as before.

mod kprobe_support;

use std::sync::Arc;

use kprobe_support::*;
use rcu_registry::probes::arch::X86_64;
use rcu_registry::probes::error::{CodeBytes, ProbeSite, TextFailure, Unsupported};
use rcu_registry::probes::kprobe::{Kprobe, KprobeRegistry, Kretprobe, SiteInfo};
use rcu_registry::probes::text::{Image, TextMemory};
use rcu_registry::probes::xol::XolArena;
use rcu_registry::probes::ProbeError;
use rcu_registry::rcu::Rcu;

/// Everything observable about a registry and its text.
#[derive(Debug, PartialEq)]
struct State {
    sites: Vec<SiteInfo>,
    len: usize,
    pending: usize,
    text: Vec<u8>,
}

fn state<T: TextMemory>(reg: &KprobeRegistry<X86_64, T>, text: Vec<u8>) -> State {
    State {
        sites: reg.sites(),
        len: reg.len(),
        pending: reg.pending(),
        text,
    }
}

/// A registry that already holds one probe, so "unchanged" covers a
/// non-empty state.
fn busy() -> (Fixture, Kprobe) {
    let fx = fixture();
    let p = Kprobe::at(F_PUSH).build();
    fx.reg.register(&p).unwrap();
    (fx, p)
}

fn refused(fx: &Fixture, probe: &Kprobe) -> ProbeError {
    let before = state(&fx.reg, fx.reg.text().snapshot());
    let slots = fx.xol.in_use();
    let err = fx.reg.register(probe).unwrap_err();
    assert_eq!(state(&fx.reg, fx.reg.text().snapshot()), before);
    // A slot prepared for a probe whose site was already published goes back
    // after a grace period (a reader may have seen the site).
    fx.reg.commit();
    Rcu::global().barrier();
    assert_eq!(fx.xol.in_use(), slots, "no slot kept");
    err
}

#[test]
fn an_address_inside_an_instruction_is_refused() {
    let (fx, _) = busy();
    let p = Kprobe::at(F_MOV_RBP + 1).build();
    let err = refused(&fx, &p);
    assert!(!p.is_registered());
    assert_eq!(
        err,
        ProbeError::NotOnInstructionBoundary {
            addr: F_MOV_RBP + 1,
            insn_start: F_MOV_RBP
        }
    );
}

#[test]
fn an_unsupported_instruction_is_refused_with_its_reason() {
    let (fx, _) = busy();
    let err = refused(&fx, &Kprobe::at(G_SYSCALL).build());
    assert_eq!(
        err,
        ProbeError::UnsupportedInstruction {
            addr: G_SYSCALL,
            reason: Unsupported::SystemCall
        }
    );
}

#[test]
fn an_address_someone_else_patched_is_refused() {
    let (fx, _) = busy();
    // A debugger's breakpoint, written before we came.
    fx.reg.text().write(F_MOV_EAX, &[0xb8], &[0xcc]).unwrap();
    let err = refused(&fx, &Kprobe::at(F_MOV_EAX).build());
    assert!(
        matches!(err, ProbeError::AlreadyPatched { addr, found, .. }
            if addr == F_MOV_EAX && found.as_slice() == [0xcc]),
        "{err:?}"
    );
}

/// A text memory where someone patches `addr` between our read and our
/// write: the checked write must refuse and leave their byte.
struct RacyText {
    image: Image,
    addr: u64,
}

impl TextMemory for RacyText {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        self.image.read(addr, buf)
    }

    fn write(&self, addr: u64, expected_old: &[u8], new: &[u8]) -> Result<(), ProbeError> {
        let mut b = [0u8; 1];
        self.image.read(self.addr, &mut b)?;
        if b[0] != 0xf4 {
            // The foreign patch (hlt) lands first.
            self.image.write(self.addr, &b, &[0xf4])?;
        }
        self.image.write(addr, expected_old, new)
    }
}

#[test]
fn a_patch_that_lands_between_validation_and_write_is_refused() {
    let rcu = Rcu::new();
    let xol = Arc::new(XolArena::new(XOL_BASE, 4, X86_64::XOL_SLOT_SIZE));
    let reg = KprobeRegistry::builder(
        X86_64,
        RacyText {
            image: Image::new(BASE, code()),
            addr: F_MOV_EAX,
        },
        symbols(),
        xol.clone(),
    )
    .rcu(rcu.clone())
    .build();
    let p = Kprobe::at(F_MOV_EAX).build();
    let err = reg.register(&p).unwrap_err();
    assert_eq!(
        err,
        ProbeError::AlreadyPatched {
            addr: F_MOV_EAX,
            expected: CodeBytes::new(&[0xb8]),
            found: CodeBytes::new(&[0xf4]),
        }
    );
    let mut expected = code();
    expected[(F_MOV_EAX - BASE) as usize] = 0xf4;
    assert_eq!(
        reg.text().image.snapshot(),
        expected,
        "their byte, not ours"
    );
    assert!(reg.sites().is_empty() && reg.is_empty() && !p.is_registered());
    // The slot prepared for the probe goes back after a grace period.
    reg.commit();
    rcu.barrier();
    assert_eq!(xol.in_use(), 0);
}

#[test]
fn the_same_probe_registered_twice_is_refused() {
    let (fx, p) = busy();
    let err = refused(&fx, &p);
    assert_eq!(
        err,
        ProbeError::AlreadyRegistered {
            site: ProbeSite::Address(F_PUSH)
        }
    );
    assert!(p.is_registered(), "the first registration stands");
    // ...and in another registry too.
    let other = fixture();
    let before = other.reg.text().snapshot();
    assert!(matches!(
        other.reg.register(&p),
        Err(ProbeError::AlreadyRegistered { .. })
    ));
    assert_eq!(other.reg.text().snapshot(), before);
    assert!(other.reg.sites().is_empty());
}

#[test]
fn unregistering_an_unknown_probe_is_refused() {
    let (fx, registered) = busy();
    let stranger = Kprobe::at(F_MOV_EAX).build();
    let before = state(&fx.reg, fx.reg.text().snapshot());
    let unknown = ProbeError::UnknownProbe {
        site: ProbeSite::Address(F_MOV_EAX),
    };
    assert_eq!(fx.reg.unregister(&stranger), Err(unknown.clone()));
    assert_eq!(fx.reg.unregister_nosync(&stranger), Err(unknown.clone()));
    assert_eq!(fx.reg.enable(&stranger), Err(unknown.clone()));
    assert_eq!(fx.reg.disable(&stranger), Err(unknown));
    // A batch with one unknown probe unregisters nothing.
    assert!(fx.reg.unregister_many(&[&registered, &stranger]).is_err());
    // ...and so does a batch naming the same probe twice.
    assert!(fx.reg.unregister_many(&[&registered, &registered]).is_err());
    assert_eq!(state(&fx.reg, fx.reg.text().snapshot()), before);
    assert!(registered.is_registered());
    // Unregistering twice: the second time it is unknown.
    fx.reg.unregister(&registered).unwrap();
    assert!(matches!(
        fx.reg.unregister(&registered),
        Err(ProbeError::UnknownProbe { .. })
    ));
}

#[test]
fn an_address_in_no_known_function_is_refused() {
    let (fx, _) = busy();
    let err = refused(&fx, &Kprobe::at(NOWHERE).build());
    assert_eq!(err, ProbeError::NoFunction { addr: NOWHERE });
    let err = refused(&fx, &Kprobe::symbol("missing", 0).build());
    assert_eq!(
        err,
        ProbeError::UnknownSymbol {
            name: "missing".into()
        }
    );
}

#[test]
fn a_kretprobe_not_at_a_function_entry_is_refused() {
    let (fx, _) = busy();
    let krp = Kretprobe::at(F_MOV_RBP).build().unwrap();
    let err = refused(&fx, krp.probe());
    assert_eq!(
        err,
        ProbeError::NotAtFunctionEntry {
            addr: F_MOV_RBP,
            func_start: Some(F)
        }
    );
    let krp = Kretprobe::at(NOWHERE).build().unwrap();
    assert_eq!(
        refused(&fx, krp.probe()),
        ProbeError::NotAtFunctionEntry {
            addr: NOWHERE,
            func_start: None
        }
    );
}

#[test]
fn a_kretprobe_with_maxactive_zero_is_refused() {
    let (fx, _) = busy();
    let before = state(&fx.reg, fx.reg.text().snapshot());
    let err = Kretprobe::at(H)
        .data::<u32>()
        .maxactive(0)
        .build()
        .unwrap_err();
    assert_eq!(err, ProbeError::MaxActiveZero);
    assert_eq!(state(&fx.reg, fx.reg.text().snapshot()), before);
}

#[test]
fn a_kretprobe_needs_a_registry_with_a_trampoline() {
    let xol = Arc::new(XolArena::new(XOL_BASE, 4, X86_64::XOL_SLOT_SIZE));
    let reg = KprobeRegistry::new(X86_64, Image::new(BASE, code()), symbols(), xol);
    let krp = Kretprobe::at(H).build().unwrap();
    assert_eq!(reg.register(&krp), Err(ProbeError::NoReturnTrampoline));
    assert_eq!(reg.text().snapshot(), code());
    assert!(reg.sites().is_empty());
}

#[test]
fn running_out_of_xol_slots_is_refused() {
    let xol = Arc::new(XolArena::new(XOL_BASE, 0, X86_64::XOL_SLOT_SIZE));
    let reg = KprobeRegistry::new(X86_64, Image::new(BASE, code()), symbols(), xol);
    let p = Kprobe::at(F_MOV_EAX).build();
    assert_eq!(
        reg.register(&p),
        Err(ProbeError::XolExhausted { near: F_MOV_EAX })
    );
    assert_eq!(reg.text().snapshot(), code());
    assert!(reg.sites().is_empty());
    // Emulated instructions need no slot.
    reg.register(&Kprobe::at(F_PUSH).build()).unwrap();
}

#[test]
fn a_failing_text_write_leaves_everything_as_before() {
    let (fx, _) = busy();
    fx.reg.text().fail_writes_after(Some(0));
    let err = refused(&fx, &Kprobe::at(F_MOV_EAX).build());
    assert!(matches!(
        err,
        ProbeError::TextAccess {
            failure: TextFailure::Injected,
            ..
        }
    ));
    fx.reg.text().fail_writes_after(None);
}

#[test]
fn a_breakpoint_overwritten_by_someone_else_is_not_unpatched() {
    let (fx, p) = busy();
    // Someone replaced our int3 at F_PUSH with their own byte.
    fx.reg.text().write(F_PUSH, &[0xcc], &[0x90]).unwrap();
    let before = state(&fx.reg, fx.reg.text().snapshot());
    assert!(matches!(
        fx.reg.unregister(&p),
        Err(ProbeError::AlreadyPatched { addr, .. }) if addr == F_PUSH
    ));
    assert_eq!(state(&fx.reg, fx.reg.text().snapshot()), before);
    assert!(p.is_registered(), "still registered: nothing changed");
}

/// The original byte back where our breakpoint was, in the same text (what
/// the same library unloaded and loaded again at the same address looks
/// like to the registry): nothing is left to restore. Unregistering writes
/// nothing and succeeds, the slot goes back; a registration there gets a
/// fresh site while the old probe stays registered (detached) until it is
/// unregistered, and enabling it again is refused with nothing changed.
#[test]
fn a_breakpoint_replaced_by_the_original_bytes_is_retired_without_a_write() {
    let fx = fixture();
    let text = fx.reg.text();
    let orig = text.snapshot();
    let at = (F_MOV_RBP - text.base()) as usize;
    let p = Kprobe::at(F_MOV_RBP).build();
    fx.reg.register(&p).unwrap();
    assert_eq!(fx.xol.in_use(), 1);
    // "Reloaded": the breakpoint is gone, the original byte is back.
    text.write(F_MOV_RBP, &[0xcc], &orig[at..at + 1]).unwrap();
    let writes = text.writes_done();
    fx.reg.unregister(&p).unwrap();
    assert_eq!(text.writes_done(), writes, "nothing written");
    assert_eq!(text.snapshot(), orig);
    assert!(fx.reg.sites().is_empty() && fx.reg.is_empty());
    Rcu::global().barrier();
    assert_eq!(fx.xol.in_use(), 0, "the slot came back");

    // Again, but a new probe registers before the old one goes.
    fx.reg.register(&p).unwrap();
    text.write(F_MOV_RBP, &[0xcc], &orig[at..at + 1]).unwrap();
    let q = Kprobe::at(F_MOV_RBP).build();
    fx.reg.register(&q).unwrap();
    assert_eq!(text.snapshot()[at], 0xcc, "the fresh site is armed");
    let sites = fx.reg.sites();
    assert_eq!(sites.len(), 1);
    assert_eq!(sites[0].probes, vec![q.id()]);
    assert!(p.is_registered() && fx.reg.len() == 2);
    fx.reg.disable(&p).unwrap();
    let before = state(&fx.reg, text.snapshot());
    assert_eq!(
        fx.reg.enable(&p),
        Err(ProbeError::TextGone { addr: F_MOV_RBP })
    );
    assert_eq!(state(&fx.reg, text.snapshot()), before);
    assert!(!p.is_enabled());
    fx.reg.unregister(&p).unwrap();
    assert_eq!(text.snapshot()[at], 0xcc, "the old probe wrote nothing");
    fx.reg.unregister(&q).unwrap();
    assert_eq!(text.snapshot(), orig);
    assert!(fx.reg.sites().is_empty() && fx.reg.is_empty());
    Rcu::global().barrier();
    assert_eq!(fx.xol.in_use(), 0);
}
