//! Validation at registration from the file itself (`with_file_text`),
//! while no address space maps the file: bad input is refused at once with
//! the typed error, the registry unchanged, and a later mapping of the file
//! unpatched; good input registers and is installed by the mmap. Without a
//! source, or for a file it cannot read, validation waits for the mapping.

mod uprobe_support;

use std::sync::Arc;

use rcu_registry::probes::error::Unsupported;
use rcu_registry::probes::text::TextMemory;
use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, MemFiles, UprobeOutcome};
use rcu_registry::probes::ProbeError;
use uprobe_support::*;

const A: u64 = 0x40_0000;

fn noop() -> Consumer {
    Consumer::new(|_, _| ConsumerAction::Continue)
}

/// A registry that reads [`FILE`]'s code (the test file's bytes from file
/// offset 0) from memory, and the source, to change later.
fn reading_registry() -> (Registry, Arc<MemFiles>) {
    let files = Arc::new(MemFiles::new());
    files.insert(FILE, 0, file_bytes());
    let reg = Registry::new(Default::default()).with_file_text(Arc::clone(&files));
    (reg, files)
}

/// Registers `bad` on a registry nothing maps, expects `err`, and checks
/// that nothing changed, then or when the file is mapped afterwards.
fn refused_before_any_mapping(bad: impl Fn(&Registry) -> Result<(), ProbeError>, err: ProbeError) {
    let (reg, _) = reading_registry();
    let before = snapshot(&reg, &[]);
    assert_eq!(bad(&reg), Err(err));
    assert_eq!(snapshot(&reg, &[]), before, "the registry is unchanged");
    assert!(reg.is_empty());
    let a = MemSpace::with_file(1, A);
    assert_eq!(mmap_file(&reg, &a), 0, "the later mmap installs nothing");
    assert_eq!(a.text.snapshot(), file_bytes(), "and writes nothing");
    assert_eq!(reg.installs_in(a.id), 0);
}

#[test]
fn an_offset_inside_an_instruction_is_refused_before_any_mapping() {
    // 0x02 is inside `mov rbp, rsp` (0x01..0x04); the addresses are file
    // offsets, as no space maps the file.
    refused_before_any_mapping(
        |reg| reg.register_in_function(key(0x02), OFF_PUSH, &noop()),
        ProbeError::NotOnInstructionBoundary {
            addr: 0x02,
            insn_start: 0x01,
        },
    );
}

#[test]
fn an_unsupported_instruction_is_refused_before_any_mapping() {
    refused_before_any_mapping(
        |reg| reg.register(key(OFF_SYSCALL), &noop()),
        ProbeError::UnsupportedInstruction {
            addr: OFF_SYSCALL,
            reason: Unsupported::SystemCall,
        },
    );
}

#[test]
fn an_offset_past_the_file_s_code_is_refused_before_any_mapping() {
    let past = FILE_LEN as u64 + 0x10;
    refused_before_any_mapping(
        |reg| reg.register(key(past), &noop()),
        ProbeError::OffsetOutsideMapping {
            offset: past,
            start: 0,
            end: FILE_LEN as u64,
        },
    );
}

#[test]
fn a_function_start_after_the_offset_is_refused_before_any_mapping() {
    refused_before_any_mapping(
        |reg| reg.register_in_function(key(OFF_PUSH), OFF_NOP, &noop()),
        ProbeError::OffsetOutsideMapping {
            offset: OFF_NOP,
            start: 0,
            end: FILE_LEN as u64,
        },
    );
}

#[test]
fn a_second_consumer_on_a_uprobe_refused_by_the_file_is_refused_too() {
    let (reg, files) = reading_registry();
    // Registered while the source could not read the file: deferred.
    files.remove(FILE);
    let first = noop();
    reg.register(key(OFF_SYSCALL), &first).unwrap();
    // Now readable: the next consumer is validated, and refused.
    files.insert(FILE, 0, file_bytes());
    let before = snapshot(&reg, &[]);
    assert_eq!(
        reg.register(key(OFF_SYSCALL), &noop()),
        Err(ProbeError::UnsupportedInstruction {
            addr: OFF_SYSCALL,
            reason: Unsupported::SystemCall,
        })
    );
    assert_eq!(snapshot(&reg, &[]), before);
    assert_eq!(reg.consumers(key(OFF_SYSCALL)), 1);
}

#[test]
fn a_valid_offset_registers_before_any_mapping_and_is_installed_by_the_mmap() {
    let (reg, _) = reading_registry();
    let c = noop();
    reg.register_in_function(key(OFF_NOP), OFF_PUSH, &c)
        .unwrap();
    reg.register(key(OFF_MOV), &c).unwrap();
    assert_eq!(reg.len(), 2);
    let a = MemSpace::with_file(1, A);
    assert_eq!(mmap_file(&reg, &a), 2);
    assert_eq!(a.byte(A + OFF_NOP), 0xcc);
    assert_eq!(a.byte(A + OFF_MOV), 0xcc);
    // The hit finds it and runs the consumer.
    let mut regs = trap_regs(A + OFF_NOP);
    let out = reg.on_breakpoint(a.id, &mut regs, &mut Stack::new());
    assert!(matches!(out, UprobeOutcome::Done(UprobeFinished::Emulated)));
    assert_eq!(c.hits(), 1);
    // The bytes come back when it goes.
    reg.unregister(key(OFF_NOP), &c).unwrap();
    reg.unregister(key(OFF_MOV), &c).unwrap();
    assert_eq!(a.text.snapshot(), file_bytes());
}

#[test]
fn a_mapping_whose_text_differs_from_the_file_is_refused_as_someone_else_s_patch() {
    let (reg, _) = reading_registry();
    reg.register(key(OFF_MOV), &noop()).unwrap();
    // This space's copy was patched by someone else (a jump written over
    // `mov rbp, rsp`). (Our own breakpoint byte there would count as
    // installed: a space may inherit patched text, see `on_mmap`.)
    let a = MemSpace::with_file(1, A);
    a.text
        .write(A + OFF_MOV, &[0x48, 0x89], &[0xeb, 0xfe])
        .unwrap();
    let patched = a.text.snapshot();
    let err = mmap(&reg, &a, a.whole(FILE)).unwrap_err();
    assert!(
        matches!(err, ProbeError::AlreadyPatched { addr, .. } if addr == A + OFF_MOV),
        "{err:?}"
    );
    assert_eq!(
        a.text.snapshot(),
        patched,
        "the foreign patch is left alone"
    );
    assert_eq!(reg.installs_in(a.id), 0);
}

#[test]
fn without_a_source_validation_waits_for_the_first_mapping() {
    let reg = Registry::new(Default::default());
    // Accepted: nothing can read the instruction yet.
    reg.register(key(OFF_SYSCALL), &noop()).unwrap();
    let a = MemSpace::with_file(1, A);
    assert!(matches!(
        mmap(&reg, &a, a.whole(FILE)),
        Err(ProbeError::UnsupportedInstruction { .. })
    ));
    assert_eq!(a.text.snapshot(), file_bytes());
}

#[test]
fn a_file_the_source_cannot_read_waits_for_the_first_mapping() {
    let (reg, files) = reading_registry();
    files.remove(FILE);
    reg.register(key(OFF_SYSCALL), &noop()).unwrap();
    assert_eq!(reg.len(), 1);
    let a = MemSpace::with_file(1, A);
    assert!(matches!(
        mmap(&reg, &a, a.whole(FILE)),
        Err(ProbeError::UnsupportedInstruction { .. })
    ));
    assert_eq!(a.text.snapshot(), file_bytes());
}
