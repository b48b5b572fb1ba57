//! Function extents from an object file's `.eh_frame`: every frame
//! description entry (FDE) gives the start and length of the code it
//! describes, which is how an IFUNC's implementation in a stripped library
//! (`__strlen_avx2`, no symbol) gets a size.
//!
//! Read from the file's bytes (the `object` crate already has them), not
//! from memory. Only what GNU toolchains emit is read: 32-bit records
//! (a 64-bit length ends the walk), CIE versions 1 and 3, augmentation
//! `z` with `R`, `P`, `L`, `S`, and pointer encodings `absptr`, `udata*`,
//! `sdata*` applied as absolute or `pcrel`. An entry in another encoding
//! is skipped: its function has no extent, and an IFUNC resolved into it
//! stays unknown (refused, never guessed). The `gimli` crate parses all of
//! DWARF; this needs a hundredth of it, with the same rules as the
//! `.eh_frame_hdr` reader of the call-graph walk, so no dependency.

use std::collections::HashMap;

/// `DW_EH_PE_omit`.
const OMIT: u8 = 0xff;

/// A cursor over the section bytes; `addr` is the run-time-independent
/// (file) address of `data[0]`.
struct Cursor<'a> {
    data: &'a [u8],
    addr: u64,
    at: usize,
}

impl Cursor<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let b = self.data.get(self.at..self.at.checked_add(N)?)?;
        self.at += N;
        b.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }

    fn uleb(&mut self) -> Option<u64> {
        let (mut v, mut shift) = (0u64, 0u32);
        loop {
            let b = self.u8()?;
            if shift < 64 {
                v |= u64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
    }

    fn sleb(&mut self) -> Option<i64> {
        let (mut v, mut shift) = (0i64, 0u32);
        loop {
            let b = self.u8()?;
            if shift < 64 {
                v |= i64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    v |= -1i64 << shift;
                }
                return Some(v);
            }
        }
    }

    /// A pointer in encoding `enc` (`None` for encodings not read).
    fn pointer(&mut self, enc: u8) -> Option<u64> {
        let field = self.addr.wrapping_add(self.at as u64);
        let raw = match enc & 0x0f {
            0x00 | 0x04 => u64::from_le_bytes(self.bytes::<8>()?),
            0x02 => u64::from(u16::from_le_bytes(self.bytes::<2>()?)),
            0x03 => u64::from(self.u32()?),
            0x0a => i64::from(i16::from_le_bytes(self.bytes::<2>()?)) as u64,
            0x0b => i64::from(i32::from_le_bytes(self.bytes::<4>()?)) as u64,
            0x0c => u64::from_le_bytes(self.bytes::<8>()?),
            0x01 => self.uleb()?,
            0x09 => self.sleb()? as u64,
            _ => return None,
        };
        match enc & 0x70 {
            0x00 => Some(raw),
            0x10 => Some(field.wrapping_add(raw)),
            _ => None,
        }
    }
}

/// The FDE pointer encoding of the CIE at `offset`, if readable.
fn cie_encoding(data: &[u8], addr: u64, offset: usize) -> Option<u8> {
    let mut c = Cursor {
        data,
        addr,
        at: offset,
    };
    let len = c.u32()?;
    if len == 0 || len == u32::MAX || c.u32()? != 0 {
        return None;
    }
    let version = c.u8()?;
    if version != 1 && version != 3 {
        return None;
    }
    let aug_start = c.at;
    while c.u8()? != 0 {}
    let aug = &data[aug_start..c.at - 1];
    c.uleb()?; // code alignment
    c.sleb()?; // data alignment
    if version == 1 {
        c.u8()?;
    } else {
        c.uleb()?;
    }
    let mut enc = 0; // absptr without an `R`
    if aug.first() == Some(&b'z') {
        c.uleb()?;
        for &a in &aug[1..] {
            match a {
                b'R' => enc = c.u8()?,
                b'P' => {
                    let penc = c.u8()?;
                    // The personality pointer may be indirect (0x80): only
                    // its bytes matter here.
                    c.pointer(penc & 0x7f)?;
                }
                b'L' => {
                    c.u8()?;
                }
                b'S' => {}
                _ => return None,
            }
        }
    } else if !aug.is_empty() {
        return None;
    }
    Some(enc)
}

/// `(start, length)` of the code every FDE of `.eh_frame` describes, in
/// file addresses, sorted by start. `data` is the section, mapped at file
/// address `addr`.
pub(super) fn fde_extents(data: &[u8], addr: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut encodings: HashMap<usize, Option<u8>> = HashMap::new();
    let mut at = 0usize;
    while let Some(len) = data
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    {
        if len == 0 || len == u32::MAX {
            break;
        }
        let Some(next) = at
            .checked_add(4 + len as usize)
            .filter(|&n| n <= data.len())
        else {
            break;
        };
        let mut c = Cursor {
            data: &data[..next],
            addr,
            at: at + 4,
        };
        let id_at = c.at;
        match c.u32() {
            Some(0) | None => {} // a CIE
            Some(id) => {
                let enc = id_at.checked_sub(id as usize).and_then(|cie| {
                    *encodings
                        .entry(cie)
                        .or_insert_with(|| cie_encoding(data, addr, cie))
                });
                if let Some(enc) = enc.filter(|&e| e != OMIT) {
                    if let (Some(start), Some(range)) = (c.pointer(enc), c.pointer(enc & 0x0f)) {
                        if range > 0 {
                            out.push((start, range));
                        }
                    }
                }
            }
        }
        at = next;
    }
    out.sort_unstable();
    out
}

/// The extent in `extents` (sorted) that contains `addr`.
pub(super) fn containing(extents: &[(u64, u64)], addr: u64) -> Option<(u64, u64)> {
    let at = extents.partition_point(|&(s, _)| s <= addr);
    let &(s, n) = extents.get(at.checked_sub(1)?)?;
    (addr - s < n).then_some((s, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::{Object, ObjectSection};

    #[test]
    fn the_c_library_unwind_table_gives_getpid_its_symbol_size() {
        let path = "/lib/x86_64-linux-gnu/libc.so.6";
        let Ok(data) = std::fs::read(path) else {
            return; // another layout: nothing to compare with
        };
        let file = object::File::parse(&*data).unwrap();
        let eh = file.section_by_name(".eh_frame").unwrap();
        let extents = fde_extents(eh.data().unwrap(), eh.address());
        assert!(extents.len() > 1000, "{}", extents.len());
        let getpid = file
            .dynamic_symbols()
            .find(|s| object::ObjectSymbol::name(s) == Ok("getpid"))
            .unwrap();
        let (start, len) = containing(&extents, object::ObjectSymbol::address(&getpid)).unwrap();
        assert_eq!(start, object::ObjectSymbol::address(&getpid));
        assert_eq!(len, object::ObjectSymbol::size(&getpid));
    }
}
