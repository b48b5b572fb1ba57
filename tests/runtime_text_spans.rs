//! `InProcess::write_many` with the runtime's fault handler installed (the
//! way every live registration writes): breakpoints are stored with byte
//! stores whose faults are caught, and write groups close together are
//! made writable as one span only when every page between them is code.
//! Each test lays out anonymous pages, some code (`r-x`), some not
//! (`r--`), some unmapped, and checks the bytes written, every page's
//! protection afterwards, and that holes stay holes.

mod runtime_support;

use rcu_registry::__internals::runtime::poke::store_byte;
use rcu_registry::probes::runtime::{claim_fault_signals, InProcess};
use rcu_registry::probes::text::{TextMemory, TextWrite};
use rcu_registry::probes::ProbeError;
use runtime_support::*;

const RX: i32 = libc::PROT_READ | libc::PROT_EXEC;
const RO: i32 = libc::PROT_READ;

/// Pages laid out from one anonymous mapping: `Some(prot)` a page with
/// that protection, each starting with `mov eax, 1; ret` (`b8 01 00 00 00
/// c3`); `None` a hole (unmapped). Unmapped when dropped.
struct Pages {
    base: u64,
    page: u64,
    layout: Vec<Option<i32>>,
}

impl Pages {
    fn new(layout: &[Option<i32>]) -> Pages {
        // SAFETY: sysconf only reads a value.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = layout.len() * page;
        // SAFETY: a fresh private anonymous mapping of our own; checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as u64;
        for (i, prot) in layout.iter().enumerate() {
            let at = base + (i * page) as u64;
            // SAFETY: pages of the mapping above.
            unsafe {
                match prot {
                    Some(prot) => {
                        let code = [0xb8, 0x01, 0x00, 0x00, 0x00, 0xc3];
                        std::ptr::copy_nonoverlapping(code.as_ptr(), at as *mut u8, 6);
                        assert_eq!(libc::mprotect(at as *mut _, page, *prot), 0);
                    }
                    None => assert_eq!(libc::munmap(at as *mut _, page), 0),
                }
            }
        }
        Pages {
            base,
            page: page as u64,
            layout: layout.to_vec(),
        }
    }

    fn addr(&self, i: usize) -> u64 {
        self.base + i as u64 * self.page
    }

    /// Every page's protection is what the layout says; holes are holes.
    fn assert_as_laid_out(&self) {
        for (i, prot) in self.layout.iter().enumerate() {
            match prot {
                Some(RX) => assert_eq!(perms_at(self.addr(i)), "r-xp", "page {i}"),
                Some(RO) => assert_eq!(perms_at(self.addr(i)), "r--p", "page {i}"),
                Some(_) => unreachable!("layouts use RX and RO"),
                None => assert!(!is_mapped(self.addr(i)), "page {i} is mapped again"),
            }
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        for (i, prot) in self.layout.iter().enumerate() {
            if prot.is_some() {
                // SAFETY: our own page, no longer used.
                unsafe { libc::munmap(self.addr(i) as *mut _, self.page as usize) };
            }
        }
    }
}

fn is_mapped(addr: u64) -> bool {
    std::panic::catch_unwind(|| perms_at(addr)).is_ok()
}

/// The runtime's fault handler on top, so batches store with caught faults
/// (checked: a store into an unmapped page reports).
fn with_stores() {
    claim_fault_signals();
    let probe = Pages::new(&[None]);
    // SAFETY: an unmapped page of our own layout: the store faults.
    assert_eq!(unsafe { store_byte(probe.addr(0), 0) }, Some(false));
}

/// One-byte writes at the start of each page in `pages`: `old` to `new`.
fn writes(
    p: &Pages,
    pages: &[usize],
    old: &'static [u8],
    new: &'static [u8],
) -> Vec<TextWrite<'static>> {
    pages
        .iter()
        .map(|&i| TextWrite {
            addr: p.addr(i),
            old,
            new,
        })
        .collect()
}

/// `int3` over the `mov`'s opcode at the start of each page in `pages`.
fn breakpoints(p: &Pages, pages: &[usize]) -> Vec<TextWrite<'static>> {
    writes(p, pages, &[0xb8], &[0xcc])
}

/// The opcode back.
fn restores(p: &Pages, pages: &[usize]) -> Vec<TextWrite<'static>> {
    writes(p, pages, &[0xcc], &[0xb8])
}

/// Code pages apart (not touching) with code between them: written and
/// restored in one span, every page `r-x` again, bytes exact.
#[test]
fn groups_apart_in_one_code_mapping_are_written_and_every_page_restored() {
    let _g = serial();
    with_stores();
    let p = Pages::new(&[Some(RX), Some(RX), Some(RX), Some(RX), Some(RX)]);
    let text = InProcess::new();
    let at = [0, 2, 4];
    assert_eq!(text.write_many(&breakpoints(&p, &at)), vec![Ok(()); 3]);
    for i in 0..5 {
        let want = if at.contains(&i) { 0xcc } else { 0xb8 };
        assert_eq!(code(p.addr(i), 1), [want], "page {i}");
    }
    p.assert_as_laid_out();
    assert_eq!(text.write_many(&restores(&p, &at)), vec![Ok(()); 3]);
    for i in 0..5 {
        assert_eq!(code(p.addr(i), 6), [0xb8, 1, 0, 0, 0, 0xc3], "page {i}");
    }
    p.assert_as_laid_out();
}

/// A hole, and a page that is not code, between groups: the span is not
/// made writable whole; each group is written alone, the hole stays
/// unmapped and the `r--` page keeps its protection (and its bytes).
#[test]
fn a_hole_or_a_data_page_between_groups_is_left_exactly_as_it_was() {
    let _g = serial();
    with_stores();
    let p = Pages::new(&[Some(RX), None, Some(RX), Some(RO), Some(RX)]);
    let text = InProcess::new();
    let at = [0, 2, 4];
    assert_eq!(text.write_many(&breakpoints(&p, &at)), vec![Ok(()); 3]);
    for &i in &at {
        assert_eq!(code(p.addr(i), 1), [0xcc], "page {i}");
    }
    assert_eq!(code(p.addr(3), 1), [0xb8]);
    p.assert_as_laid_out();
    assert_eq!(text.write_many(&restores(&p, &at)), vec![Ok(()); 3]);
    p.assert_as_laid_out();
}

/// A bad write among good ones in a merged span fails alone: wrong old
/// bytes and an unmapped address are refused with their typed errors and
/// write nothing; the others are written.
#[test]
fn a_bad_write_in_a_span_fails_alone_and_changes_nothing() {
    let _g = serial();
    with_stores();
    let p = Pages::new(&[Some(RX), Some(RX), Some(RX), None]);
    let text = InProcess::new();
    let mut writes = breakpoints(&p, &[0, 2]);
    writes.push(TextWrite {
        addr: p.addr(1),
        old: &[0x90],
        new: &[0xcc],
    });
    writes.push(TextWrite {
        addr: p.addr(3),
        old: &[0xb8],
        new: &[0xcc],
    });
    let results = text.write_many(&writes);
    assert_eq!(results[..2], [Ok(()), Ok(())]);
    assert!(
        matches!(results[2], Err(ProbeError::AlreadyPatched { .. })),
        "{:?}",
        results[2]
    );
    assert!(
        matches!(
            results[3],
            Err(ProbeError::TextAccess { .. } | ProbeError::TextGone { .. })
        ),
        "{:?}",
        results[3]
    );
    assert_eq!(code(p.addr(1), 1), [0xb8]);
    p.assert_as_laid_out();
    assert_eq!(text.write_many(&restores(&p, &[0, 2])), vec![Ok(()); 2]);
    p.assert_as_laid_out();
}
