//! One ELF file indexed for target resolution: its loadable segments, its
//! functions by name (with symbol versions) and by address, its `DT_SONAME`.
//!
//! Built once per file (the resolver caches it); lookups allocate only
//! their answer.

use std::collections::HashMap;

use object::elf;
use object::read::elf::{Dyn, ElfFile, FileHeader, ProgramHeader, Sym};
use object::{Endianness, SymbolIndex};

use super::search::ElfKind;
use crate::probes::error::FileFailure;

/// A `PT_LOAD` segment's file part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    /// Link-time virtual address of its first byte.
    pub vaddr: u64,
    /// File offset of its first byte.
    pub offset: u64,
    /// Bytes of the file it maps.
    pub filesz: u64,
    /// `PF_X`.
    pub exec: bool,
}

/// One definition of a function name at one address (all the symbol
/// entries that name it there, merged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Def {
    /// Link-time virtual address.
    pub vaddr: u64,
    /// Size in bytes; 0 when no entry knows it.
    pub size: u64,
    /// `STT_GNU_IFUNC`.
    pub ifunc: bool,
    /// Its versions: name and whether it is the default (`@@`, not hidden).
    versions: Vec<(String, bool)>,
}

impl Def {
    /// What plain `name` (no `@`) means: the default version, or an
    /// unversioned definition.
    fn is_default(&self) -> bool {
        self.versions.is_empty() || self.versions.iter().any(|v| v.1)
    }
}

/// What a name lookup found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lookup<'a> {
    /// One address.
    Found(&'a Def),
    /// Nothing by that name.
    Missing,
    /// Several addresses (ascending).
    Several(Vec<u64>),
}

/// A function by address, for the one containing a file offset.
#[derive(Clone, Debug)]
struct Extent {
    vaddr: u64,
    size: u64,
    name: String,
}

/// An ELF file, indexed.
#[derive(Debug)]
pub(super) struct ElfIndex {
    pub kind: ElfKind,
    pub soname: Option<String>,
    pub segments: Vec<Segment>,
    /// Base names (without `@version`, Rust names also demangled without
    /// their hash) to definitions, one per address.
    by_name: HashMap<String, Vec<Def>>,
    /// Functions with a known size, by address.
    by_addr: Vec<Extent>,
}

/// The class, byte order and machine from an ELF header's first 20 bytes;
/// `None` for anything else.
pub(super) fn elf_kind(head: &[u8]) -> Option<ElfKind> {
    if head.len() < 20 || head[..4] != elf::ELFMAG {
        return None;
    }
    // e_ident[EI_CLASS], e_ident[EI_DATA], then e_machine at 18.
    let class64 = match head[4] {
        elf::ELFCLASS32 => false,
        elf::ELFCLASS64 => true,
        _ => return None,
    };
    let little = match head[5] {
        elf::ELFDATA2LSB => true,
        elf::ELFDATA2MSB => false,
        _ => return None,
    };
    let m = [head[18], head[19]];
    let machine = if little {
        u16::from_le_bytes(m)
    } else {
        u16::from_be_bytes(m)
    };
    Some(ElfKind {
        class64,
        little_endian: little,
        machine,
    })
}

/// One symbol-table entry worth keeping.
struct Entry {
    base: String,
    version: Option<(String, bool)>,
    vaddr: u64,
    size: u64,
    ifunc: bool,
}

impl ElfIndex {
    /// Indexes the ELF file `data`.
    pub fn parse(data: &[u8]) -> Result<ElfIndex, FileFailure> {
        let kind = elf_kind(data).ok_or(FileFailure::NotElf)?;
        if kind.class64 {
            Self::parse_as::<elf::FileHeader64<Endianness>>(data, kind)
        } else {
            Self::parse_as::<elf::FileHeader32<Endianness>>(data, kind)
        }
    }

    fn parse_as<Elf: FileHeader<Endian = Endianness>>(
        data: &[u8],
        kind: ElfKind,
    ) -> Result<ElfIndex, FileFailure> {
        let bad = |e: object::Error| FileFailure::Malformed(e.to_string());
        let file = ElfFile::<Elf, &[u8]>::parse(data).map_err(bad)?;
        let endian = file.endian();
        let segments: Vec<Segment> = file
            .elf_program_headers()
            .iter()
            .filter(|p| p.p_type(endian) == elf::PT_LOAD)
            .map(|p| Segment {
                vaddr: p.p_vaddr(endian).into(),
                offset: p.p_offset(endian).into(),
                filesz: p.p_filesz(endian).into(),
                exec: p.p_flags(endian) & elf::PF_X != 0,
            })
            .collect();
        if segments.is_empty() {
            return Err(FileFailure::NotLoadable);
        }
        let sections = file.elf_section_table();

        let mut entries = Vec::new();
        // `.symtab`: versions only as `name@V` / `name@@V` in the name.
        for sym in file.elf_symbol_table().iter() {
            let Some(mut e) = entry::<Elf>(sym, endian, file.elf_symbol_table().strings()) else {
                continue;
            };
            if let Some(at) = e.base.find('@') {
                let v = &e.base[at..];
                let (default, v) = match v.strip_prefix("@@") {
                    Some(v) => (true, v),
                    None => (false, &v[1..]),
                };
                e.version = Some((v.to_string(), default));
                e.base.truncate(at);
            }
            entries.push(e);
        }
        // `.dynsym`: versions from `.gnu.version` (hidden: not the default).
        let dynsym = file.elf_dynamic_symbol_table();
        let versions = sections.versions(endian, data).map_err(bad)?;
        for (i, sym) in dynsym.iter().enumerate() {
            let Some(mut e) = entry::<Elf>(sym, endian, dynsym.strings()) else {
                continue;
            };
            if let Some(vt) = &versions {
                let vi = vt.version_index(endian, SymbolIndex(i));
                if let Ok(Some(v)) = vt.version(vi) {
                    e.version = Some((
                        String::from_utf8_lossy(v.name()).into_owned(),
                        !vi.is_hidden(),
                    ));
                }
            }
            entries.push(e);
        }

        let soname = sections
            .dynamic(endian, data)
            .ok()
            .flatten()
            .and_then(|(dyns, link)| {
                let strings = sections.strings(endian, data, link).ok()?;
                let d = dyns
                    .iter()
                    .find(|d| d.tag32(endian) == Some(elf::DT_SONAME))?;
                let s = d.string(endian, strings).ok()?;
                Some(String::from_utf8_lossy(s).into_owned())
            });

        let mut by_name: HashMap<String, Vec<Def>> = HashMap::new();
        let mut by_addr: Vec<Extent> = Vec::new();
        for e in entries {
            let mut names = vec![e.base.clone()];
            if let Ok(d) = rustc_demangle::try_demangle(&e.base) {
                let d = format!("{d:#}");
                if d != e.base {
                    names.push(d);
                }
            }
            if e.size > 0 {
                by_addr.push(Extent {
                    vaddr: e.vaddr,
                    size: e.size,
                    name: e.base.clone(),
                });
            }
            for name in names {
                let defs = by_name.entry(name).or_default();
                let def = match defs.iter_mut().find(|d| d.vaddr == e.vaddr) {
                    Some(d) => d,
                    None => {
                        defs.push(Def {
                            vaddr: e.vaddr,
                            size: 0,
                            ifunc: false,
                            versions: Vec::new(),
                        });
                        defs.last_mut().expect("just pushed")
                    }
                };
                def.size = def.size.max(e.size);
                def.ifunc |= e.ifunc;
                if let Some(v) = &e.version {
                    match def.versions.iter_mut().find(|(n, _)| *n == v.0) {
                        // `.symtab` says `@`, `.dynsym` not hidden: default.
                        Some(have) => have.1 |= v.1,
                        None => def.versions.push(v.clone()),
                    }
                }
            }
        }
        // By address; among aliases of one extent the most plain name first
        // (fewest leading underscores, then shortest, then alphabetical).
        let plainness = |n: &str| (n.len() - n.trim_start_matches('_').len(), n.len());
        by_addr.sort_by(|a, b| {
            (a.vaddr, plainness(&a.name), &a.name).cmp(&(b.vaddr, plainness(&b.name), &b.name))
        });
        // `.symtab` and `.dynsym` both list the exported functions.
        by_addr.dedup_by(|a, b| a.vaddr == b.vaddr && a.name == b.name);
        Ok(ElfIndex {
            kind,
            soname,
            segments,
            by_name,
            by_addr,
        })
    }

    /// The definitions `query` names: `base`, `base@V` or `base@@V` (see
    /// the target module docs).
    pub fn lookup(&self, query: &str) -> Lookup<'_> {
        let (base, want) = match query.find('@') {
            Some(at) => {
                let v = &query[at..];
                let want = match v.strip_prefix("@@") {
                    Some(v) => (v, true),
                    None => (&v[1..], false),
                };
                (&query[..at], Some(want))
            }
            None => (query, None),
        };
        let Some(defs) = self.by_name.get(base) else {
            return Lookup::Missing;
        };
        // No allocation unless several definitions match.
        match want {
            Some((v, true)) => pick(
                defs.iter()
                    .filter(move |d| d.versions.iter().any(|(n, dflt)| n == v && *dflt)),
            ),
            Some((v, false)) => pick(
                defs.iter()
                    .filter(move |d| d.versions.iter().any(|(n, _)| n == v)),
            ),
            None if defs.iter().any(Def::is_default) => {
                pick(defs.iter().filter(|d| d.is_default()))
            }
            None => pick(defs.iter()),
        }
    }

    /// Every function definition with each of its base names (a
    /// definition with several names is listed once per name), in no
    /// particular order.
    pub fn definitions(&self) -> impl Iterator<Item = (&str, &Def)> + '_ {
        self.by_name
            .iter()
            .flat_map(|(name, defs)| defs.iter().map(move |d| (name.as_str(), d)))
    }

    /// The file offset of `vaddr`, from the loadable segment whose file
    /// bytes hold it, and whether that segment is executable.
    pub fn offset_of(&self, vaddr: u64) -> Option<(u64, bool)> {
        self.segments
            .iter()
            .filter(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)
            // An executable segment wins if two claim the address.
            .max_by_key(|s| s.exec)
            .map(|s| (s.offset + (vaddr - s.vaddr), s.exec))
    }

    /// The link-time virtual address of file offset `offset`, if an
    /// executable segment maps it.
    pub fn code_vaddr_of(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.exec && offset >= s.offset && offset - s.offset < s.filesz)
            .map(|s| s.vaddr + (offset - s.offset))
    }

    /// The function (with a known size) containing `vaddr`: the innermost
    /// if functions nest, its most plain name if it has several.
    pub fn function_at(&self, vaddr: u64) -> Option<(&str, u64, u64)> {
        let end = self.by_addr.partition_point(|f| f.vaddr <= vaddr);
        let mut best: Option<&Extent> = None;
        // Nested or overlapping extents are rare and short: a bounded walk.
        for f in self.by_addr[..end].iter().rev().take(64) {
            if best.is_some_and(|b| f.vaddr < b.vaddr) {
                break;
            }
            // Walking down, a same-start alias is a plainer name.
            if vaddr - f.vaddr < f.size {
                best = Some(f);
            }
        }
        best.map(|f| (f.name.as_str(), f.vaddr, f.size))
    }
}

/// A defined function entry of a symbol table (`STT_FUNC` or
/// `STT_GNU_IFUNC` in a section), or `None`.
/// The one definition `matching` yields, or which several (their
/// addresses, sorted), or none.
fn pick<'a>(mut matching: impl Iterator<Item = &'a Def> + Clone) -> Lookup<'a> {
    let all = matching.clone();
    match (matching.next(), matching.next()) {
        (None, _) => Lookup::Missing,
        (Some(d), None) => Lookup::Found(d),
        _ => {
            let mut at: Vec<u64> = all.map(|d| d.vaddr).collect();
            at.sort_unstable();
            Lookup::Several(at)
        }
    }
}

fn entry<'data, Elf: FileHeader<Endian = Endianness>>(
    sym: &Elf::Sym,
    endian: Endianness,
    strings: object::read::StringTable<'data, &'data [u8]>,
) -> Option<Entry> {
    let ifunc = match sym.st_type() {
        elf::STT_FUNC => false,
        elf::STT_GNU_IFUNC => true,
        _ => return None,
    };
    let shndx = sym.st_shndx(endian);
    if shndx == elf::SHN_UNDEF || (shndx >= elf::SHN_LORESERVE && shndx != elf::SHN_XINDEX) {
        return None;
    }
    let name = sym.name(endian, strings).ok()?;
    if name.is_empty() {
        return None;
    }
    Some(Entry {
        base: String::from_utf8_lossy(name).into_owned(),
        version: None,
        vaddr: sym.st_value(endian).into(),
        size: sym.st_size(endian).into(),
        ifunc,
    })
}
