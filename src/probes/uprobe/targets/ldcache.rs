//! The dynamic linker's cache, `/etc/ld.so.cache`: library names to paths.
//!
//! `ldconfig` writes it; glibc's loader reads it for every bare library
//! name that no `DT_RPATH`, `LD_LIBRARY_PATH` or `DT_RUNPATH` directory
//! holds. The format is glibc's `glibc-ld.so.cache1.1` (`elf/cache.c`,
//! `sysdeps/generic/dl-cache.h`):
//!
//! ```text
//! header (48 bytes)   "glibc-ld.so.cache" "1.1"  nlibs:u32  len_strings:u32
//!                     flags:u8 (2 little-, 3 big-endian)  pad[3]
//!                     extension_offset:u32  unused[3]:u32
//! nlibs entries       flags:i32  key:u32  value:u32  osversion:u32  hwcap:u64
//! strings             key and value are offsets from the header's start
//! ```
//!
//! Older caches put a `ld.so-1.7.0` table first (12-byte entries) and the
//! new header after it, 8-byte aligned; both layouts are read (the old
//! table itself is not: glibc has not written a cache without the new
//! format since 2.0, and not with the old one at all since 2.32).
//!
//! Everything is bounds-checked: a truncated or corrupt cache yields fewer
//! entries or none, never a panic (a property test feeds it random bytes).
//! Entries for `glibc-hwcaps` subdirectories (`hwcap` != 0) are skipped:
//! choosing among them needs the CPU's ISA level, as the loader does; the
//! baseline entry of the same library is used.

/// `glibc-ld.so.cache` followed by the version, `1.1`.
const MAGIC_NEW: &[u8] = b"glibc-ld.so.cache1.1";
/// The old format's magic.
const MAGIC_OLD: &[u8] = b"ld.so-1.7.0";
const HEADER_NEW: usize = 48;
const ENTRY_NEW: usize = 24;
/// Old header: magic (11 bytes, padded to 12) and `nlibs`.
const HEADER_OLD: usize = 16;
const ENTRY_OLD: usize = 12;

/// An entry's type: an ELF library for glibc (libc6).
pub(super) const FLAG_ELF_LIBC6: u32 = 0x0003;
/// The type bits of an entry's flags.
const FLAG_TYPE_MASK: u32 = 0x00ff;
/// x86_64 (64-bit) libraries.
pub(super) const FLAG_X8664_LIB64: u32 = 0x0300;
/// aarch64 libraries.
pub(super) const FLAG_AARCH64_LIB64: u32 = 0x0a00;

/// One library of the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CacheEntry {
    /// Entry flags (type and required architecture bits).
    pub flags: u32,
    /// The library name (its `DT_SONAME`, usually), e.g. `libc.so.6`.
    pub name: Vec<u8>,
    /// Its full path.
    pub path: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize, little: bool) -> Option<u32> {
    let b: [u8; 4] = data.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if little {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    })
}

fn u64_at(data: &[u8], at: usize, little: bool) -> Option<u64> {
    let b: [u8; 8] = data.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(if little {
        u64::from_le_bytes(b)
    } else {
        u64::from_be_bytes(b)
    })
}

/// The NUL-terminated string at `at` in `data`.
fn c_str(data: &[u8], at: usize) -> Option<&[u8]> {
    let tail = data.get(at..)?;
    let end = tail.iter().position(|&b| b == 0)?;
    Some(&tail[..end])
}

/// Where the new-format header starts: 0, or after an old-format table.
fn new_header_start(data: &[u8]) -> Option<usize> {
    if data.starts_with(MAGIC_NEW) {
        return Some(0);
    }
    if !data.starts_with(MAGIC_OLD) {
        return None;
    }
    // The old table's `nlibs` is in the host's byte order.
    let nlibs = u32_at(data, 12, cfg!(target_endian = "little"))? as usize;
    let end = nlibs.checked_mul(ENTRY_OLD)?.checked_add(HEADER_OLD)?;
    // Aligned as `struct cache_file_new` (8: its entries hold a u64).
    let start = end.checked_add(7)? & !7;
    data.get(start..)?.starts_with(MAGIC_NEW).then_some(start)
}

/// The cache's baseline entries (no `glibc-hwcaps` ones), in file order;
/// empty for anything that is not a readable cache of this host's byte
/// order.
pub(super) fn parse(data: &[u8]) -> Vec<CacheEntry> {
    let Some(start) = new_header_start(data) else {
        return Vec::new();
    };
    let cache = &data[start..];
    let host_little = cfg!(target_endian = "little");
    let little = match cache.get(36) {
        Some(2) => true,
        Some(3) => false,
        // 0: written before the field existed, in the host's order.
        Some(0) => host_little,
        _ => return Vec::new(),
    };
    if little != host_little {
        // A cache for another byte order: the loader ignores it too.
        return Vec::new();
    }
    let Some(nlibs) = u32_at(cache, 20, little) else {
        return Vec::new();
    };
    // At most as many entries as fit: a corrupt count allocates nothing.
    let fit = cache.len().saturating_sub(HEADER_NEW) / ENTRY_NEW;
    let mut out = Vec::with_capacity((nlibs as usize).min(fit));
    for i in 0..(nlibs as usize).min(fit) {
        let at = HEADER_NEW + i * ENTRY_NEW;
        let (Some(flags), Some(key), Some(value), Some(hwcap)) = (
            u32_at(cache, at, little),
            u32_at(cache, at + 4, little),
            u32_at(cache, at + 8, little),
            u64_at(cache, at + 16, little),
        ) else {
            break;
        };
        if hwcap != 0 {
            continue;
        }
        let (Some(name), Some(path)) = (c_str(cache, key as usize), c_str(cache, value as usize))
        else {
            continue;
        };
        out.push(CacheEntry {
            flags,
            name: name.to_vec(),
            path: path.to_vec(),
        });
    }
    out
}

/// Whether an entry's flags fit a process whose cache flags are `want`
/// (`None`: only check that it is a glibc ELF library, the ELF header
/// check decides the rest).
pub(super) fn flags_match(flags: u32, want: Option<u32>) -> bool {
    match want {
        Some(w) => flags == w,
        None => flags & FLAG_TYPE_MASK == FLAG_ELF_LIBC6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new-format cache of `entries` (flags, name, path, hwcap).
    fn build(entries: &[(u32, &str, &str, u64)]) -> Vec<u8> {
        let mut strings = Vec::new();
        let strings_at = HEADER_NEW + entries.len() * ENTRY_NEW;
        let mut table = Vec::new();
        for (flags, name, path, hwcap) in entries {
            let key = strings_at + strings.len();
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
            let value = strings_at + strings.len();
            strings.extend_from_slice(path.as_bytes());
            strings.push(0);
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&(key as u32).to_le_bytes());
            table.extend_from_slice(&(value as u32).to_le_bytes());
            table.extend_from_slice(&0u32.to_le_bytes());
            table.extend_from_slice(&hwcap.to_le_bytes());
        }
        let mut out = MAGIC_NEW.to_vec();
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&[2, 0, 0, 0]);
        out.extend_from_slice(&[0; 16]);
        assert_eq!(out.len(), HEADER_NEW);
        out.extend(table);
        out.extend(strings);
        out
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn entries_are_read_in_order_and_hwcaps_ones_skipped() {
        let x = FLAG_ELF_LIBC6 | FLAG_X8664_LIB64;
        let data = build(&[
            (
                x,
                "libz.so.1",
                "/usr/lib/glibc-hwcaps/x86-64-v3/libz.so.1",
                1 << 62,
            ),
            (x, "libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1", 0),
            (
                FLAG_ELF_LIBC6,
                "libc.so.6",
                "/lib/i386-linux-gnu/libc.so.6",
                0,
            ),
        ]);
        let e = parse(&data);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].name, b"libz.so.1");
        assert_eq!(e[0].path, b"/lib/x86_64-linux-gnu/libz.so.1");
        assert!(flags_match(e[0].flags, Some(x)));
        assert!(!flags_match(e[1].flags, Some(x)));
        assert!(flags_match(e[1].flags, None));

        // Behind an old-format table of one entry (28 bytes, padded to 32).
        let mut old = MAGIC_OLD.to_vec();
        old.push(0);
        old.extend_from_slice(&1u32.to_le_bytes());
        old.extend_from_slice(&[0; ENTRY_OLD]);
        while old.len() % 8 != 0 {
            old.push(0);
        }
        old.extend_from_slice(&data);
        assert_eq!(parse(&old), e);
    }

    #[test]
    fn truncated_and_corrupt_caches_give_fewer_entries_without_panicking() {
        let x = FLAG_ELF_LIBC6 | FLAG_X8664_LIB64;
        let data = build(&[
            (x, "liba.so", "/a/liba.so", 0),
            (x, "libb.so", "/b/libb.so", 0),
        ]);
        for len in 0..data.len() {
            assert!(parse(&data[..len]).len() <= 2);
        }
        // A huge count, a string offset past the end, a wrong byte order.
        let mut bad = data.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&bad).len() <= 2);
        let mut bad = data.clone();
        bad[HEADER_NEW + 4..HEADER_NEW + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&bad).len(), 1);
        let mut bad = data;
        bad[36] = if cfg!(target_endian = "little") { 3 } else { 2 };
        assert!(parse(&bad).is_empty());
        assert!(parse(b"not a cache").is_empty());
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(
            mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            magic in 0..3u8,
        ) {
            if magic == 1 && bytes.len() >= MAGIC_NEW.len() {
                bytes[..MAGIC_NEW.len()].copy_from_slice(MAGIC_NEW);
            }
            if magic == 2 && bytes.len() >= 16 {
                bytes[..MAGIC_OLD.len()].copy_from_slice(MAGIC_OLD);
            }
            let _ = parse(&bytes);
        }
    }
}
