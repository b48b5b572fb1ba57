//! `InProcess` text memory on the test binary's own code: checked writes,
//! exact protection restore, refusals that change nothing, and the
//! int3-first protocol under threads that keep calling the patched code.

mod runtime_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use rcu_registry::__internals::runtime::{
    core_sync_method, force_maps_full_read, maps_query_method,
};
use rcu_registry::probes::error::TextFailure;
use rcu_registry::probes::runtime::{InProcess, RefusedRange};
use rcu_registry::probes::text::TextMemory;
use rcu_registry::probes::ProbeError;
use runtime_support::*;

fn answer_addr() -> u64 {
    rtp_answer as *const () as usize as u64
}

const MOV_EAX_1: [u8; 5] = [0xb8, 0x01, 0x00, 0x00, 0x00];
const MOV_EAX_2: [u8; 5] = [0xb8, 0x02, 0x00, 0x00, 0x00];

fn answer() -> u32 {
    let f = std::hint::black_box(rtp_answer as unsafe extern "C" fn() -> u32);
    // SAFETY: rtp_answer is a complete C-ABI function.
    unsafe { f() }
}

#[test]
fn a_patch_changes_exactly_the_bytes_asked_and_restores_the_protection() {
    let _g = serial();
    let text = InProcess::new();
    let at = answer_addr();
    let before = code(at - 16, 48);
    let perms = perms_at(at);
    assert_eq!(perms, "r-xp", "test code is mapped read-execute");
    assert_eq!(answer(), 1);

    text.write(at, &MOV_EAX_1, &MOV_EAX_2).unwrap();
    let mut expected = before.clone();
    expected[16..21].copy_from_slice(&MOV_EAX_2);
    assert_eq!(code(at - 16, 48), expected, "only the five bytes changed");
    assert_eq!(perms_at(at), perms, "protection restored exactly");
    assert_eq!(answer(), 2);

    text.write(at, &MOV_EAX_2, &MOV_EAX_1).unwrap();
    assert_eq!(code(at - 16, 48), before);
    assert_eq!(perms_at(at), perms);
    assert_eq!(answer(), 1);
}

#[test]
fn a_write_whose_expected_old_bytes_differ_writes_nothing() {
    let _g = serial();
    let text = InProcess::new();
    let at = answer_addr();
    let before = code(at, 16);
    let err = text.write(at, &MOV_EAX_2, &[0xcc; 5]).unwrap_err();
    match err {
        ProbeError::AlreadyPatched {
            addr,
            expected,
            found,
        } => {
            assert_eq!(addr, at);
            assert_eq!(expected.as_slice(), MOV_EAX_2);
            assert_eq!(found.as_slice(), MOV_EAX_1);
        }
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(code(at, 16), before);
    assert_eq!(perms_at(at), "r-xp");
}

#[test]
fn a_write_into_a_refused_range_is_refused_and_writes_nothing() {
    let _g = serial();
    let at = answer_addr();
    let text = InProcess::new().refuse(RefusedRange {
        start: at + 2,
        end: at + 3,
        what: "a range a test forbids",
    });
    let before = code(at, 16);
    assert_eq!(
        text.write(at, &MOV_EAX_1, &MOV_EAX_2),
        Err(ProbeError::RefusedTarget {
            addr: at + 2,
            what: "a range a test forbids"
        })
    );
    assert_eq!(code(at, 16), before);
    // A write next to (not overlapping) the range is allowed.
    text.write(at + 5, &[0xc3], &[0xc3]).unwrap();
}

#[test]
fn malformed_writes_are_refused_with_typed_errors_and_write_nothing() {
    let _g = serial();
    let text = InProcess::new();
    let at = answer_addr();
    let before = code(at, 16);
    assert_eq!(
        text.write(at, &MOV_EAX_1, &MOV_EAX_2[..4]),
        Err(ProbeError::PatchLengthMismatch {
            expected: 5,
            new: 4
        })
    );
    let mut buf = [0u8; 4];
    assert!(matches!(
        text.read(8, &mut buf),
        Err(ProbeError::TextAccess {
            failure: TextFailure::OutOfRange,
            ..
        })
    ));
    assert!(matches!(
        text.write(8, &[0], &[1]),
        Err(ProbeError::TextAccess { .. })
    ));
    assert_eq!(code(at, 16), before);
}

#[test]
fn reads_return_the_code_byte_for_byte() {
    let _g = serial();
    let text = InProcess::new();
    let at = rtp_add1 as *const () as usize as u64;
    let mut buf = [0u8; 6];
    text.read(at, &mut buf).unwrap();
    assert_eq!(buf, [0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3]);
    assert_eq!(code(at, 6), buf);
}

const WORD_A: [u8; 5] = [0xb8, 0x11, 0x11, 0x11, 0x11];
const WORD_B: [u8; 5] = [0xb8, 0x22, 0x22, 0x22, 0x22];

fn word() -> u32 {
    let f = std::hint::black_box(rtp_word as unsafe extern "C" fn() -> u32);
    // SAFETY: rtp_word is a complete C-ABI function.
    unsafe { f() }
}

#[test]
fn multi_byte_patches_under_concurrent_calls_never_run_a_torn_instruction() {
    let _g = serial();
    let text = InProcess::new();
    let at = rtp_word as *const () as usize as u64;
    let stop = AtomicBool::new(false);
    let torn = AtomicU64::new(0);
    let calls = AtomicU64::new(0);
    let seen_b = AtomicU64::new(0);
    let patches = std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let mut n = 0u64;
                // One call at least before looking at `stop`.
                while n == 0 || !stop.load(Ordering::Relaxed) {
                    match word() {
                        0x1111_1111 => {}
                        0x2222_2222 => {
                            seen_b.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        let deadline = Instant::now() + stress_secs(1.0);
        let mut patches = 0u64;
        // Until some thread ran the new code too: when one first does is
        // the scheduler's business, so the patching goes on rather than the
        // test failing.
        while Instant::now() < deadline || seen_b.load(Ordering::Relaxed) == 0 {
            text.write(at, &WORD_A, &WORD_B).unwrap();
            text.write(at, &WORD_B, &WORD_A).unwrap();
            patches += 2;
        }
        stop.store(true, Ordering::Relaxed);
        patches
    });
    println!(
        "{patches} patches ({}), {} calls, {} saw the new code, {} torn",
        core_sync_method(),
        calls.load(Ordering::Relaxed),
        seen_b.load(Ordering::Relaxed),
        torn.load(Ordering::Relaxed)
    );
    assert_eq!(torn.load(Ordering::Relaxed), 0);
    assert!(patches >= 2 && calls.load(Ordering::Relaxed) > 0);
    assert!(
        seen_b.load(Ordering::Relaxed) > 0,
        "threads ran the new code"
    );
    assert_eq!(code(at, 6), [0xb8, 0x11, 0x11, 0x11, 0x11, 0xc3]);
    assert_eq!(perms_at(at), "r-xp");
}

/// Two anonymous pages of "JIT" code, the first `prot0`, the second
/// `prot1` (shared when `shared`), each starting with `mov eax, 1; ret`;
/// unmapped when dropped.
struct Jit {
    base: *mut u8,
    page: usize,
}

impl Jit {
    fn new(prot0: i32, prot1: i32, shared: bool) -> Jit {
        // SAFETY: sysconf only reads a value.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let flags = libc::MAP_ANONYMOUS
            | if shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base.cast::<u8>();
        for p in 0..2 {
            let code = [0xb8, 0x01, 0x00, 0x00, 0x00, 0xc3];
            // SAFETY: inside the mapping just made writable.
            unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), base.add(p * page), 6) };
        }
        for (p, prot) in [prot0, prot1].into_iter().enumerate() {
            // SAFETY: a page of our own mapping.
            let r = unsafe { libc::mprotect(base.add(p * page).cast(), page, prot) };
            assert_eq!(r, 0);
        }
        Jit { base, page }
    }

    fn addr(&self, page: usize) -> u64 {
        self.base as u64 + (page * self.page) as u64
    }

    fn call(&self, page: usize) -> u32 {
        // SAFETY: the page holds a complete `mov eax, imm32; ret`.
        let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(self.addr(page) as usize) };
        std::hint::black_box(f)()
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used.
        unsafe { libc::munmap(self.base.cast(), 2 * self.page) };
    }
}

const RX: i32 = libc::PROT_READ | libc::PROT_EXEC;
const RWX: i32 = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;

/// Runs `f` with page protections looked up each way the text memory can:
/// the `PROCMAP_QUERY` ioctl (where the kernel has it) and a read of the
/// whole maps file.
fn each_lookup(f: impl Fn()) {
    for full in [false, true] {
        force_maps_full_read(full);
        f();
        if full {
            assert_eq!(maps_query_method(), "full read");
        }
    }
    force_maps_full_read(false);
}

/// Code in no loaded object (a JIT's): patched and put back with the
/// protection it had, `r-x`, whichever way the protection was looked up.
#[test]
fn anonymous_jit_code_is_patched_and_its_protection_restored() {
    let _g = serial();
    let text = InProcess::new();
    each_lookup(|| {
        let jit = Jit::new(RX, RX, false);
        let at = jit.addr(0);
        assert_eq!(jit.call(0), 1);
        text.write(at, &MOV_EAX_1, &MOV_EAX_2).unwrap();
        assert_eq!(jit.call(0), 2);
        assert_eq!(perms_at(at), "r-xp");
        text.write(at, &MOV_EAX_2, &MOV_EAX_1).unwrap();
        assert_eq!(jit.call(0), 1);
        assert_eq!(perms_at(at), "r-xp");
    });
}

/// A patch across two pages of different protections (`r-x`, then
/// `rwx`) restores each page's own.
#[test]
fn a_patch_across_pages_of_different_protections_restores_each() {
    let _g = serial();
    let text = InProcess::new();
    each_lookup(|| {
        let jit = Jit::new(RX, RWX, false);
        let at = jit.addr(1) - 2;
        let before = code(at, 4);
        text.write(at, &before, &[0x90; 4]).unwrap();
        assert_eq!(code(at, 4), [0x90; 4]);
        assert_eq!(perms_at(jit.addr(0)), "r-xp");
        assert_eq!(perms_at(jit.addr(1)), "rwxp");
        text.write(at, &[0x90; 4], &before).unwrap();
        assert_eq!(code(at, 4), before);
        assert_eq!(jit.call(1), 1);
    });
}

/// Shared executable memory (writes would reach other processes) is
/// refused with a typed error and left exactly as it was.
#[test]
fn shared_executable_memory_is_refused_and_left_unchanged() {
    let _g = serial();
    let text = InProcess::new();
    each_lookup(|| {
        let jit = Jit::new(RX, RX, true);
        let at = jit.addr(0);
        let before = code(at, 8);
        let err = text.write(at, &MOV_EAX_1, &MOV_EAX_2).unwrap_err();
        assert!(
            matches!(
                err,
                ProbeError::TextAccess {
                    failure: TextFailure::Os {
                        op: "patch a shared file mapping",
                        ..
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(code(at, 8), before);
        assert_eq!(perms_at(at), "r-xs");
    });
}

/// A batch (`write_many`): each good write is done, each bad one is
/// refused alone with its typed error and its bytes left as they were; the
/// pages get their protections back; one-byte and multi-byte writes alike.
#[test]
fn a_batch_does_each_good_write_and_refuses_each_bad_one_alone() {
    use rcu_registry::probes::text::TextWrite;
    let _g = serial();
    let text = InProcess::new();
    each_lookup(|| {
        let jit = Jit::new(RX, RX, false);
        let (p0, p1) = (jit.addr(0), jit.addr(1));
        let before0 = code(p0, 8);
        let before1 = code(p1, 8);
        let writes = [
            // Page 1, one byte (the immediate): `mov eax, 3`.
            TextWrite {
                addr: p1 + 1,
                old: &[0x01],
                new: &[0x03],
            },
            // Page 0, the whole instruction: `mov eax, 2`.
            TextWrite {
                addr: p0,
                old: &MOV_EAX_1,
                new: &MOV_EAX_2,
            },
            // Wrong old bytes (the `ret` is there).
            TextWrite {
                addr: p0 + 5,
                old: &[0x00],
                new: &[0x90],
            },
            // Nothing mapped there.
            TextWrite {
                addr: 8,
                old: &[0x00],
                new: &[0xcc],
            },
            // Lengths that differ.
            TextWrite {
                addr: p1 + 2,
                old: &[0x00, 0x00],
                new: &[0x90],
            },
        ];
        let results = text.write_many(&writes);
        assert_eq!(results.len(), writes.len());
        assert_eq!(results[0], Ok(()));
        assert_eq!(results[1], Ok(()));
        assert!(
            matches!(results[2], Err(ProbeError::AlreadyPatched { addr, .. }) if addr == p0 + 5),
            "{:?}",
            results[2]
        );
        assert!(
            matches!(results[3], Err(ProbeError::TextAccess { addr: 8, .. })),
            "{:?}",
            results[3]
        );
        assert!(
            matches!(results[4], Err(ProbeError::PatchLengthMismatch { .. })),
            "{:?}",
            results[4]
        );
        assert_eq!(jit.call(0), 2);
        assert_eq!(jit.call(1), 3);
        // Only the asked bytes changed; both pages are `r-x` again.
        let mut want0 = before0.clone();
        want0[..MOV_EAX_2.len()].copy_from_slice(&MOV_EAX_2);
        assert_eq!(code(p0, 8), want0);
        let mut want1 = before1.clone();
        want1[1] = 0x03;
        assert_eq!(code(p1, 8), want1);
        assert_eq!(perms_at(p0), "r-xp");
        assert_eq!(perms_at(p1), "r-xp");
        // And back, in one batch.
        let back = [
            TextWrite {
                addr: p0,
                old: &MOV_EAX_2,
                new: &MOV_EAX_1,
            },
            TextWrite {
                addr: p1 + 1,
                old: &[0x03],
                new: &[0x01],
            },
        ];
        assert_eq!(text.write_many(&back), vec![Ok(()), Ok(())]);
        assert_eq!(code(p0, 8), before0);
        assert_eq!(code(p1, 8), before1);
    });
}

/// The refused-range lookup (a binary search over ranges sorted by start,
/// with the largest end so far) agrees with a plain scan on overlapping,
/// nested and adjacent ranges added in any order.
#[test]
fn refused_ranges_are_found_exactly_as_a_scan_finds_them() {
    let ranges = [
        (100, 200),
        (150, 160),
        (10, 20),
        (20, 30),
        (300, 1000),
        (400, 410),
        (5, 6),
    ];
    let text = InProcess::new().refuse_all(ranges.iter().map(|&(start, end)| RefusedRange {
        start,
        end,
        what: "test",
    }));
    for addr in 0..1100u64 {
        for len in [0usize, 1, 3, 17, 200] {
            let end = addr + len.max(1) as u64;
            let scan = ranges.iter().any(|&(s, e)| s < end && addr < e);
            let found = text.refused_at(addr, len);
            assert_eq!(found.is_some(), scan, "[{addr}, {end})");
            if let Some(r) = found {
                assert!(r.start < end && addr < r.end, "[{addr}, {end}): {r:?}");
            }
        }
    }
}
