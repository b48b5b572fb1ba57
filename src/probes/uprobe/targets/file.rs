//! [`TargetFile`]: a target's file found and indexed, and what resolving
//! a place in it gives: [`ResolvedTarget`], [`TargetFunction`].

use core::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::elf_index::Lookup;
use super::resolver::Indexed;
use super::search::{ElfKind, FoundBy};
use super::{TargetPlace, UprobeTarget};
use crate::probes::uprobe::space::{FileId, UprobeKey};
use crate::probes::ProbeError;

/// The function a resolved target is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetFunction {
    /// Its name: the one the target gave, or for a file-offset target the
    /// plainest of the names the file has for the function around it.
    pub name: String,
    /// File offset of its first instruction.
    pub offset: u64,
    /// Link-time virtual address of its first instruction.
    pub vaddr: u64,
    /// Its size in bytes, when the symbol states one.
    pub size: Option<u64>,
}

impl TargetFunction {
    /// The file offsets of its bytes, when its size is known.
    pub fn extent(&self) -> Option<Range<u64>> {
        self.size
            .map(|n| self.offset..self.offset.saturating_add(n))
    }
}

/// A [`UprobeTarget`] resolved: the file and the offset a uprobe is keyed by,
/// and what was found on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedTarget {
    /// What was asked.
    pub target: UprobeTarget,
    /// The file opened: the target's path made absolute, a loaded object's
    /// path, or where the search found the library.
    pub path: PathBuf,
    /// How [`path`](Self::path) was found.
    pub found_by: FoundBy,
    /// The opened file's device and inode.
    pub file: FileId,
    /// Its ELF class, byte order and machine.
    pub kind: ElfKind,
    /// File offset of the probed instruction.
    pub offset: u64,
    /// Link-time virtual address of the probed instruction (add a mapping's
    /// load bias for its run-time address).
    pub vaddr: u64,
    /// The function the offset is in: always known for a symbol target; for
    /// a file-offset target, the sized function containing it, if any.
    pub function: Option<TargetFunction>,
}

impl ResolvedTarget {
    /// The uprobe key: this file, this offset.
    pub fn key(&self) -> UprobeKey {
        UprobeKey {
            file: self.file,
            offset: self.offset,
        }
    }
}

/// A target's file, found and indexed ([`TargetResolver::open_file`](super::TargetResolver::open_file)):
/// places in it resolve without searching or opening it again. Cheap to
/// clone (shared).
#[derive(Clone, Debug)]
pub struct TargetFile {
    /// The file as the target named it (a path or a bare name).
    asked: Arc<str>,
    path: PathBuf,
    found_by: FoundBy,
    ix: Arc<Indexed>,
}

impl TargetFile {
    pub(super) fn new(asked: &str, path: PathBuf, found_by: FoundBy, ix: Arc<Indexed>) -> Self {
        TargetFile {
            asked: Arc::from(asked),
            path,
            found_by,
            ix,
        }
    }

    /// The file opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How it was found.
    pub fn found_by(&self) -> &FoundBy {
        &self.found_by
    }

    /// Its device and inode, from the open file.
    pub fn file(&self) -> FileId {
        self.ix.file
    }

    /// Its ELF class, byte order and machine.
    pub fn kind(&self) -> ElfKind {
        self.ix.index.kind
    }

    /// Its `DT_SONAME`, if it has one.
    pub fn soname(&self) -> Option<&str> {
        self.ix.index.soname.as_deref()
    }

    /// Every function this file's symbol tables (`.symtab` and `.dynsym`)
    /// define in an executable segment: what a tracer lists, or matches a
    /// glob against, before resolving.
    ///
    /// One entry per name and address: aliases (`malloc`,
    /// `__libc_malloc`) are entries of their own at one offset; a name
    /// defined at several addresses (two local `helper`s of different
    /// compilation units, or two versions of one symbol) has one entry
    /// for each; a Rust function is listed under its symbol and its
    /// demangled path. Names carry no `@version`. IFUNC symbols are left
    /// out (their resolvers are not the function: [`resolve`](Self::resolve)
    /// refuses them by name, see [`TargetResolver`](super::TargetResolver)),
    /// and so is a symbol outside every executable segment. Each entry
    /// resolves by its offset ([`TargetPlace::FileOffset`]), and by its
    /// name unless the name has several addresses. Sorted by file offset,
    /// then name. Allocates the list (one pass over the file's index).
    pub fn functions(&self) -> Vec<TargetFunction> {
        let index = &self.ix.index;
        let mut out: Vec<TargetFunction> = index
            .definitions()
            .filter(|(_, d)| !d.ifunc)
            .filter_map(|(name, d)| match index.offset_of(d.vaddr) {
                Some((offset, true)) => Some(TargetFunction {
                    name: name.to_string(),
                    offset,
                    vaddr: d.vaddr,
                    size: (d.size > 0).then_some(d.size),
                }),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| (a.offset, &a.name).cmp(&(b.offset, &b.name)));
        out
    }

    /// The file offset `place` names in this file.
    ///
    /// # Errors
    /// As [`TargetResolver::resolve`](super::TargetResolver::resolve), for
    /// the symbol and the offset.
    pub fn resolve(&self, place: &TargetPlace) -> Result<ResolvedTarget, ProbeError> {
        let at = self.locate(place)?;
        Ok(ResolvedTarget {
            target: UprobeTarget {
                file: self.asked.to_string(),
                place: place.clone(),
            },
            kind: self.ix.index.kind,
            file: self.ix.file,
            path: self.path.clone(),
            found_by: self.found_by.clone(),
            offset: at.offset,
            vaddr: at.vaddr,
            function: at.function.map(|f| TargetFunction {
                name: f.name.to_string(),
                offset: f.offset,
                vaddr: f.vaddr,
                size: f.size,
            }),
        })
    }

    /// What [`resolve`](Self::resolve) finds, without building a
    /// [`ResolvedTarget`] (no allocation when it succeeds): the key, and the
    /// file offset of the enclosing function's first instruction, if known.
    /// What a batch registration needs of each of thousands of targets.
    ///
    /// # Errors
    /// As `resolve`.
    pub fn key_of(&self, place: &TargetPlace) -> Result<(UprobeKey, Option<u64>), ProbeError> {
        let at = self.locate(place)?;
        let key = UprobeKey {
            file: self.ix.file,
            offset: at.offset,
        };
        Ok((key, at.function.map(|f| f.offset)))
    }

    /// The place found in the file (the names borrowed).
    fn locate<'a>(&'a self, place: &'a TargetPlace) -> Result<Located<'a>, ProbeError> {
        let shown = || self.path.display().to_string();
        let index = &self.ix.index;
        match place {
            TargetPlace::Symbol { name, offset } => {
                let def = match index.lookup(name) {
                    Lookup::Found(d) => d,
                    Lookup::Missing => {
                        return Err(ProbeError::SymbolNotInFile {
                            path: shown(),
                            name: name.clone(),
                        })
                    }
                    Lookup::Several(at) => {
                        return Err(ProbeError::DuplicateSymbol {
                            path: shown(),
                            name: name.clone(),
                            offsets: at
                                .iter()
                                .map(|&v| index.offset_of(v).map_or(v, |o| o.0))
                                .collect(),
                        })
                    }
                };
                let start = match index.offset_of(def.vaddr) {
                    Some((o, true)) => o,
                    _ => {
                        return Err(ProbeError::SymbolNotInCode {
                            path: shown(),
                            name: name.clone(),
                            vaddr: def.vaddr,
                        })
                    }
                };
                if def.ifunc {
                    return Err(ProbeError::IfuncSymbol {
                        path: shown(),
                        name: name.clone(),
                        resolver_offset: start,
                    });
                }
                if def.size > 0 && *offset >= def.size {
                    return Err(ProbeError::OffsetPastEnd {
                        name: name.clone(),
                        size: def.size,
                        offset: *offset,
                    });
                }
                let not_code = |o| ProbeError::NotInCode {
                    path: shown(),
                    offset: o,
                };
                let at = start
                    .checked_add(*offset)
                    .ok_or_else(|| not_code(u64::MAX))?;
                let vaddr = def.vaddr.wrapping_add(*offset);
                // The same executable segment must hold the whole way there.
                if index.code_vaddr_of(at) != Some(vaddr) {
                    return Err(not_code(at));
                }
                Ok(Located {
                    offset: at,
                    vaddr,
                    function: Some(FunctionAt {
                        name,
                        offset: start,
                        vaddr: def.vaddr,
                        size: (def.size > 0).then_some(def.size),
                    }),
                })
            }
            TargetPlace::FileOffset(o) => {
                let vaddr = index.code_vaddr_of(*o).ok_or(ProbeError::NotInCode {
                    path: shown(),
                    offset: *o,
                })?;
                let function = index.function_at(vaddr).and_then(|(name, v, size)| {
                    Some(FunctionAt {
                        name,
                        offset: index.offset_of(v)?.0,
                        vaddr: v,
                        size: Some(size),
                    })
                });
                Ok(Located {
                    offset: *o,
                    vaddr,
                    function,
                })
            }
        }
    }
}

/// A place found in a file: its offset and link-time address, and the
/// function around it.
struct Located<'a> {
    offset: u64,
    vaddr: u64,
    function: Option<FunctionAt<'a>>,
}

/// [`TargetFunction`] with its name borrowed.
struct FunctionAt<'a> {
    name: &'a str,
    offset: u64,
    vaddr: u64,
    size: Option<u64>,
}
