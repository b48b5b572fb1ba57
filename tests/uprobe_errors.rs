//! Bad input to the uprobe registry: each refusal is a typed error, and the
//! registry and every space's text are exactly as before, byte for byte.

mod uprobe_support;

use rcu_registry::probes::error::{ProbeSite, Unsupported};
use rcu_registry::probes::text::TextMemory;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, FileMapping};
use rcu_registry::probes::ProbeError;
use uprobe_support::*;

const A: u64 = 0x40_0000;
const B: u64 = 0x55_5555_0000;

fn noop() -> Consumer {
    Consumer::new(|_, _| ConsumerAction::Continue)
}

fn site(offset: u64) -> ProbeSite {
    ProbeSite::File {
        dev: FILE.dev,
        inode: FILE.inode,
        offset,
    }
}

/// Two spaces mapping the file, one uprobe (on `nop`) already registered.
fn setup() -> (
    Registry,
    std::sync::Arc<MemSpace>,
    std::sync::Arc<MemSpace>,
    Consumer,
) {
    let reg = Registry::new(Default::default());
    let (a, b) = (MemSpace::with_file(1, A), MemSpace::with_file(2, B));
    mmap_file(&reg, &a);
    mmap_file(&reg, &b);
    let c = noop();
    reg.register(key(OFF_NOP), &c).unwrap();
    (reg, a, b, c)
}

#[test]
fn an_offset_outside_the_file_s_mappings_is_refused() {
    let (reg, a, b, _) = setup();
    let before = snapshot(&reg, &[&a, &b]);
    let far = FILE_LEN as u64 + 0x100;
    assert_eq!(
        reg.register(key(far), &noop()),
        Err(ProbeError::OffsetOutsideMapping {
            offset: far,
            start: 0,
            end: FILE_LEN as u64
        })
    );
    assert_eq!(snapshot(&reg, &[&a, &b]), before);
}

#[test]
fn a_consumer_without_a_handler_is_refused() {
    let (reg, a, b, _) = setup();
    let before = snapshot(&reg, &[&a, &b]);
    assert_eq!(
        reg.register(key(OFF_PUSH), &Consumer::without_handler()),
        Err(ProbeError::NoHandler)
    );
    assert_eq!(
        reg.register(key(OFF_NOP), &Consumer::without_handler()),
        Err(ProbeError::NoHandler)
    );
    assert_eq!(snapshot(&reg, &[&a, &b]), before);
}

#[test]
fn the_same_consumer_registered_twice_is_refused() {
    let (reg, a, b, c) = setup();
    let before = snapshot(&reg, &[&a, &b]);
    assert_eq!(
        reg.register(key(OFF_NOP), &c.clone()),
        Err(ProbeError::AlreadyRegistered {
            site: site(OFF_NOP)
        })
    );
    assert_eq!(snapshot(&reg, &[&a, &b]), before);
    // On another offset the same consumer is welcome.
    reg.register(key(OFF_PUSH), &c).unwrap();
}

#[test]
fn unregistering_an_unknown_consumer_is_refused() {
    let (reg, a, b, _) = setup();
    let before = snapshot(&reg, &[&a, &b]);
    assert_eq!(
        reg.unregister(key(OFF_NOP), &noop()),
        Err(ProbeError::UnknownProbe {
            site: site(OFF_NOP)
        })
    );
    assert_eq!(
        reg.unregister(key(OFF_PUSH), &noop()),
        Err(ProbeError::UnknownProbe {
            site: site(OFF_PUSH)
        })
    );
    assert_eq!(snapshot(&reg, &[&a, &b]), before);
}

#[test]
fn an_offset_inside_an_instruction_is_refused() {
    let (reg, a, b, _) = setup();
    let before = snapshot(&reg, &[&a, &b]);
    // 0x02 is the second byte of `mov rbp, rsp` (0x01..0x04); decoding
    // from the function start at 0 (through our own breakpoint at 0x04,
    // which must decode as the `nop` it replaced) proves it.
    assert_eq!(
        reg.register_in_function(key(0x02), 0, &noop()),
        Err(ProbeError::NotOnInstructionBoundary {
            addr: A + 0x02,
            insn_start: A + 0x01
        })
    );
    assert_eq!(snapshot(&reg, &[&a, &b]), before);
    // The boundary next to it is accepted, past our breakpoint on `nop`.
    reg.register_in_function(key(OFF_RIPREL), 0, &noop())
        .unwrap();
}

#[test]
fn an_unsupported_instruction_is_refused() {
    let (reg, a, b, _) = setup();
    let before = snapshot(&reg, &[&a, &b]);
    assert_eq!(
        reg.register(key(OFF_SYSCALL), &noop()),
        Err(ProbeError::UnsupportedInstruction {
            addr: A + OFF_SYSCALL,
            reason: Unsupported::SystemCall
        })
    );
    assert_eq!(snapshot(&reg, &[&a, &b]), before);
}

#[test]
fn an_address_patched_by_someone_else_is_refused_in_every_space() {
    let (reg, a, b, _) = setup();
    // Someone else put a breakpoint at `push rbp` in A only.
    a.text.write(A + OFF_PUSH, &[0x55], &[0xcc]).unwrap();
    let before = snapshot(&reg, &[&a, &b]);
    let err = reg.register(key(OFF_PUSH), &noop()).unwrap_err();
    assert!(
        matches!(err, ProbeError::AlreadyPatched { addr, .. } if addr == A + OFF_PUSH),
        "{err:?}"
    );
    assert_eq!(snapshot(&reg, &[&a, &b]), before);
}

#[test]
fn a_foreign_patch_in_the_second_space_undoes_the_first_space_s_breakpoint() {
    let (reg, a, b, _) = setup();
    // B's copy was patched differently (a jump written over `mov rbp, rsp`).
    b.text
        .write(B + OFF_MOV, &[0x48, 0x89], &[0xeb, 0xfe])
        .unwrap();
    let before = snapshot(&reg, &[&a, &b]);
    let err = reg.register(key(OFF_MOV), &noop()).unwrap_err();
    assert!(
        matches!(err, ProbeError::AlreadyPatched { addr, .. } if addr == B + OFF_MOV),
        "{err:?}"
    );
    assert_eq!(
        snapshot(&reg, &[&a, &b]),
        before,
        "A's breakpoint was rolled back"
    );
    reg.domain().barrier();
    assert_eq!(a.xol.in_use(), 0, "A's XOL slot was given back");
}

#[test]
fn a_failed_text_write_changes_nothing() {
    let (reg, a, b, _) = setup();
    b.text.fail_writes_after(Some(0));
    let before = snapshot(&reg, &[&a, &b]);
    assert!(matches!(
        reg.register(key(OFF_PUSH), &noop()),
        Err(ProbeError::TextAccess { .. })
    ));
    b.text.fail_writes_after(None);
    assert_eq!(snapshot(&reg, &[&a, &b]), before);
}

#[test]
fn an_mmap_covering_a_refused_offset_reports_it_and_installs_nothing_there() {
    let reg = Registry::new(Default::default());
    // No space maps the file yet: the registration cannot validate.
    reg.register(key(OFF_SYSCALL), &noop()).unwrap();
    let a = MemSpace::with_file(1, A);
    let m = FileMapping {
        vaddr: A..A + FILE_LEN as u64,
        file: FILE,
        file_offset: 0,
    };
    assert!(matches!(
        mmap(&reg, &a, m),
        Err(ProbeError::UnsupportedInstruction { .. })
    ));
    assert_eq!(a.text.snapshot(), file_bytes());
    assert_eq!(reg.installs_in(a.id), 0);
}
