//! Uprobe targets by file: [`UprobeTarget`] (`libz.so.1:crc32`,
//! `/usr/lib/libc.so.6:qsort+4`, `./app:0x1a2b`) and its text form;
//! [`TargetResolver`] turns one into a [`UprobeKey`](super::UprobeKey) from the ELF file on
//! disk (`targets/`: the ELF index, the linker cache reader, the library
//! search, the resolver).
//!
//! Resolution reads files only; it knows no process. Wiring a resolved
//! target into a live address space is the runtime's job.

use core::fmt;
use core::str::FromStr;

mod elf_index;
mod file;
mod ldcache;
mod parse;
mod resolver;
mod search;

pub use file::{ResolvedTarget, TargetFile, TargetFunction};
pub use parse::{ParseTargetError, ParseTargetErrorKind};
pub use resolver::TargetResolver;
pub use search::{ElfKind, FoundBy, LibrarySearch, LoadedObjects};

/// Where in its file a [`UprobeTarget`] points.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TargetPlace {
    /// `offset` bytes into the function `name`.
    Symbol {
        /// The symbol, possibly with a version (`memcpy@@GLIBC_2.14`).
        name: String,
        /// Bytes from the function's first instruction.
        offset: u64,
    },
    /// A byte offset in the file.
    FileOffset(u64),
}

/// A uprobe target named by file: a library or executable, and a symbol
/// (plus an offset into it) or a file offset; [`TargetResolver`] resolves it.
///
/// # The text form
///
/// `FILE:PLACE`, split at the last lone `:` (one not part of a `::`, so a
/// Rust path like `app:demo::work::parse` keeps its separators):
///
/// - `FILE:0xHEX`: a **file offset** (hex, with its `0x`);
/// - `FILE:NAME` and `FILE:NAME+OFF`: `OFF` bytes into the function `NAME`
///   (`OFF` decimal, or hex with `0x`). `NAME` may carry a symbol version:
///   `memcpy@@GLIBC_2.14` (the default version), `memcpy@GLIBC_2.2.5` (that
///   version), plain `memcpy` (the default version, or the only one).
///
/// [`UprobeTarget::parse`] (also [`FromStr`]) reads it, with a typed
/// [`ParseTargetError`]; [`Display`](fmt::Display) writes it back
/// (offsets in hex), and parsing that gives back an equal target. The
/// constructors ([`UprobeTarget::symbol`], [`UprobeTarget::file_offset`],
/// [`UprobeTarget::offset`]) take any name; one the text form cannot carry
/// (empty, with whitespace, `+`, a lone `:`, or starting like a number) is
/// still resolved, but its text does not parse back.
///
/// # Examples
///
/// ```
/// use rcu_registry::probes::uprobe::{TargetPlace, UprobeTarget};
///
/// let t: UprobeTarget = "/usr/lib/x86_64-linux-gnu/libc.so.6:qsort+4".parse().unwrap();
/// assert_eq!(t.file(), "/usr/lib/x86_64-linux-gnu/libc.so.6");
/// assert_eq!(t.place(), &TargetPlace::Symbol { name: "qsort".into(), offset: 4 });
/// assert_eq!(t, UprobeTarget::symbol("/usr/lib/x86_64-linux-gnu/libc.so.6", "qsort").offset(4));
/// assert_eq!(t.to_string(), "/usr/lib/x86_64-linux-gnu/libc.so.6:qsort+0x4");
///
/// let t = UprobeTarget::parse("./app:0x1a2b").unwrap();
/// assert_eq!(t, UprobeTarget::file_offset("./app", 0x1a2b));
/// assert!(UprobeTarget::parse("libz.so.1").is_err()); // no `:PLACE`
/// ```
///
/// Resolving one (a test library built from C, found through a directory
/// as the dynamic linker would search it):
///
/// ```
/// # use std::process::Command;
/// use rcu_registry::probes::uprobe::{FoundBy, TargetResolver, UprobeTarget};
///
/// # let dir = std::env::temp_dir().join(format!("uprobe-target-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// # let src = dir.join("f.c");
/// # std::fs::write(&src, "int doc_fn(int x) { return x * 3 + 1; }\n").unwrap();
/// # let ok = Command::new("cc")
/// #     .args(["-shared", "-fPIC", "-O1", "-Wl,-soname,libdocfix.so.1", "-o"])
/// #     .arg(dir.join("libdocfix.so.1")).arg(&src).status().unwrap().success();
/// # assert!(ok);
/// // `dir` holds libdocfix.so.1, which defines `doc_fn`.
/// let resolver = TargetResolver::new().with_directories([dir.clone()]);
/// let at = resolver.resolve(&"libdocfix.so.1:doc_fn".parse().unwrap()).unwrap();
/// assert_eq!(at.path, dir.join("libdocfix.so.1"));
/// assert_eq!(at.found_by, FoundBy::Directory(dir.clone()));
/// let f = at.function.as_ref().unwrap();
/// assert_eq!((f.name.as_str(), f.offset), ("doc_fn", at.offset));
/// let key = at.key(); // the registry's (FileId, file offset)
/// assert_eq!(key.offset, at.offset);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UprobeTarget {
    file: String,
    place: TargetPlace,
}

impl UprobeTarget {
    /// Reads the text form `FILE:NAME`, `FILE:NAME+OFF` or `FILE:0xHEX`
    /// (see [`UprobeTarget`]).
    ///
    /// # Errors
    /// [`ParseTargetError`], whose [`kind`](ParseTargetError::kind) says
    /// what is wrong.
    pub fn parse(text: &str) -> Result<UprobeTarget, ParseTargetError> {
        let (file, place) = parse::parse(text)?;
        Ok(UprobeTarget {
            file: file.to_string(),
            place,
        })
    }

    /// The function `name`'s first instruction in `file` (`file:name`).
    pub fn symbol(file: impl Into<String>, name: impl Into<String>) -> UprobeTarget {
        UprobeTarget {
            file: file.into(),
            place: TargetPlace::Symbol {
                name: name.into(),
                offset: 0,
            },
        }
    }

    /// The byte at `offset` in `file` (`file:0x…`).
    pub fn file_offset(file: impl Into<String>, offset: u64) -> UprobeTarget {
        UprobeTarget {
            file: file.into(),
            place: TargetPlace::FileOffset(offset),
        }
    }

    /// This target moved `by` bytes further: `name+off` becomes
    /// `name+(off+by)`, a file offset `o` becomes `o+by` (saturating).
    #[must_use]
    pub fn offset(mut self, by: u64) -> UprobeTarget {
        match &mut self.place {
            TargetPlace::Symbol { offset, .. } | TargetPlace::FileOffset(offset) => {
                *offset = offset.saturating_add(by);
            }
        }
        self
    }

    /// The file: a path (with a `/`) or a bare library name.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Where in the file.
    pub fn place(&self) -> &TargetPlace {
        &self.place
    }

    /// Whether [`file`](Self::file) is a bare library name, looked for as
    /// the dynamic linker would (no `/` in it).
    pub fn is_bare_name(&self) -> bool {
        !self.file.contains('/')
    }
}

impl FromStr for UprobeTarget {
    type Err = ParseTargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UprobeTarget::parse(s)
    }
}

impl fmt::Display for UprobeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.place {
            TargetPlace::Symbol { name, offset: 0 } => write!(f, "{}:{name}", self.file),
            TargetPlace::Symbol { name, offset } => {
                write!(f, "{}:{name}+{offset:#x}", self.file)
            }
            TargetPlace::FileOffset(o) => write!(f, "{}:{o:#x}", self.file),
        }
    }
}
