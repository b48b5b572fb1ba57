//! [`TargetResolver`]: finds a [`UprobeTarget`]'s file (by [`FileId`]) as
//! the dynamic linker would, with a cache of the files it has indexed.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::elf_index::{elf_kind, ElfIndex};
use super::file::{ResolvedTarget, TargetFile};
use super::ldcache::{self, CacheEntry};
use super::search::{ElfKind, FoundBy, LibrarySearch, LoadedObjects};
use super::UprobeTarget;
use crate::probes::error::FileFailure;
use crate::probes::uprobe::space::FileId;
use crate::probes::ProbeError;
use crate::sync::Mutex;

/// A file opened and indexed.
#[derive(Debug)]
pub(super) struct Indexed {
    pub file: FileId,
    pub index: ElfIndex,
}

/// The linker cache's entries by library name, in file order.
type CacheByName = HashMap<Vec<u8>, Vec<CacheEntry>>;

/// Device, inode, size and modification time: a file as it was read.
type Stamp = (u64, u64, u64, i64, i64);

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())
}

/// Files indexed at most; past it the cache starts over (files replaced on
/// disk would otherwise pile up).
const MAX_CACHED_FILES: usize = 256;

/// Why a file was not taken.
enum OpenError {
    Failure(FileFailure),
    /// Another class, byte order or machine than the search wants.
    WrongKind,
}

fn os(op: &'static str, e: &std::io::Error) -> OpenError {
    OpenError::Failure(FileFailure::Os {
        op,
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    })
}

/// Resolves [`UprobeTarget`]s from ELF files on disk. `Send + Sync`:
/// share one.
///
/// # Finding the file
///
/// A `FILE` with a `/` is a path (relative ones to the current directory).
/// A bare name is looked for the way the dynamic linker finds a library
/// ([`LibrarySearch`]): among the objects already loaded (a list the
/// caller gives, [`LoadedObjects`], matched by file name or `DT_SONAME`),
/// then in extra directories (`LD_LIBRARY_PATH`), in the linker's cache
/// `/etc/ld.so.cache`, and in the default directories, skipping files of
/// another ELF class or machine. The path found and how
/// ([`FoundBy`]) are reported.
///
/// The file is then opened once and named by the [`FileId`] of that open
/// file (`fstat`: device and inode), so a library replaced on disk after
/// resolution is a different file, with different uprobes.
///
/// # From a symbol to a file offset
///
/// The symbol comes from `.symtab` (every function, local ones included)
/// and `.dynsym` (the exported ones, with their versions): a stripped
/// library still resolves its exported functions. Its address is turned into
/// a file offset by the `PT_LOAD` segment whose file bytes hold it, which must
/// be executable: a uprobe is keyed by file offset, as the kernel keys it,
/// so this works before (and without) the file being mapped anywhere.
///
/// - Several names at one address (`malloc`, `__libc_malloc`) are aliases:
///   each resolves to that address.
/// - One name at several addresses in one file (two local `helper`s of
///   different compilation units) is refused with
///   [`ProbeError::DuplicateSymbol`], which lists the file offsets.
/// - `NAME+OFF` with the function's size known must stay inside it
///   ([`ProbeError::OffsetPastEnd`], as for kprobes); a zero-sized symbol
///   (hand-written assembly) only has its segment checked.
/// - **IFUNC symbols** (`STT_GNU_IFUNC`: `strlen`, `memcpy`, ... in the C
///   library) are refused with [`ProbeError::IfuncSymbol`]. The address
///   such a symbol names is a *resolver* that the dynamic linker runs once
///   to choose the implementation every later call reaches; the kernel's
///   uprobes would probe that resolver, which is almost never what "count
///   calls to `strlen`" means, and the choice itself depends on the running
///   CPU and loader, not on the file. Probe an implementation by its own
///   name (`__strlen_avx2`, in files that keep `.symtab`), or the resolver
///   on purpose by the file offset the error carries. (A runtime that
///   knows the process can do better: the live symbols answer an IFUNC
///   name with the implementation the loader chose.)
///
/// It reads files only and knows no process: it does not follow a
/// requesting object's `DT_RPATH`/`DT_RUNPATH`, and of the `glibc-hwcaps`
/// variants in the linker cache it takes the baseline library (which
/// variant the loader picks depends on the CPU). A library already loaded
/// is found as loaded when [`with_loaded`](Self::with_loaded) lists it.
///
/// # Cost
///
/// Each file is read and indexed once while it keeps its device, inode,
/// size and modification time (at most 256 files are kept); resolving
/// another target in it costs the search (a few `open`s and `stat`s: some
/// microseconds; the linker cache is parsed once per change) and a hash
/// lookup. To resolve many places in one file, [`open_file`](Self::open_file)
/// once and resolve them in the [`TargetFile`] (a hash lookup each, about
/// 150 ns for a C-library function on the development machine).
///
/// Example: see [`UprobeTarget`].
pub struct TargetResolver {
    search: LibrarySearch,
    loaded: Option<Box<dyn LoadedObjects>>,
    files: Mutex<HashMap<Stamp, Arc<Indexed>>>,
    ldcache: Mutex<Option<(Stamp, Arc<CacheByName>)>>,
}

impl std::fmt::Debug for TargetResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetResolver")
            .field("search", &self.search)
            .field("loaded", &self.loaded.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for TargetResolver {
    fn default() -> Self {
        TargetResolver::new()
    }
}

impl TargetResolver {
    /// Searches as [`LibrarySearch::system`], with no loaded objects.
    pub fn new() -> TargetResolver {
        TargetResolver::with_search(LibrarySearch::system())
    }

    /// Searches bare names in `search`'s places.
    pub fn with_search(search: LibrarySearch) -> TargetResolver {
        TargetResolver {
            search,
            loaded: None,
            files: Mutex::new(HashMap::new()),
            ldcache: Mutex::new(None),
        }
    }

    /// Looks for bare names among `loaded` first.
    #[must_use]
    pub fn with_loaded(mut self, loaded: impl LoadedObjects + 'static) -> TargetResolver {
        self.loaded = Some(Box::new(loaded));
        self
    }

    /// Searches `dirs` (in order) before the directories already set, as
    /// the loader searches `LD_LIBRARY_PATH`.
    #[must_use]
    pub fn with_directories(mut self, dirs: impl IntoIterator<Item = PathBuf>) -> TargetResolver {
        let mut d: Vec<PathBuf> = dirs.into_iter().collect();
        d.append(&mut self.search.directories);
        self.search.directories = d;
        self
    }

    /// Where bare names are looked for.
    pub fn search(&self) -> &LibrarySearch {
        &self.search
    }

    /// The file and file offset `target` names.
    ///
    /// # Errors
    /// Bad input, with nothing cached for it but the files read:
    /// - [`ProbeError::TargetFile`]: the path does not exist or cannot be
    ///   read ([`FileFailure::Os`]), is not a regular file, is not ELF, is
    ///   malformed or has no loadable segment;
    /// - [`ProbeError::LibraryNotFound`]: a bare name no place holds;
    /// - [`ProbeError::SymbolNotInFile`], [`ProbeError::DuplicateSymbol`],
    ///   [`ProbeError::IfuncSymbol`], [`ProbeError::SymbolNotInCode`]: the
    ///   symbol is not there, is there several times, is an IFUNC, or is
    ///   not code;
    /// - [`ProbeError::OffsetPastEnd`]: `name+off` past the function's end;
    /// - [`ProbeError::NotInCode`]: an offset outside every executable
    ///   segment.
    pub fn resolve(&self, target: &UprobeTarget) -> Result<ResolvedTarget, ProbeError> {
        self.open_file(target.file())?.resolve(target.place())
    }

    /// The file `file` names (a path, or a bare library name searched
    /// for), opened and indexed: resolve many places in it without
    /// searching again.
    ///
    /// # Errors
    /// [`ProbeError::TargetFile`] and [`ProbeError::LibraryNotFound`], as
    /// [`resolve`](Self::resolve).
    pub fn open_file(&self, file: &str) -> Result<TargetFile, ProbeError> {
        let (path, found_by, ix) = self.find(file)?;
        Ok(TargetFile::new(file, path, found_by, ix))
    }

    /// The file `file` names: a path, or a bare name searched for.
    fn find(&self, file: &str) -> Result<(PathBuf, FoundBy, Arc<Indexed>), ProbeError> {
        if file.contains('/') {
            let path = std::path::absolute(file).unwrap_or_else(|_| PathBuf::from(file));
            return match self.open(&path, None) {
                Ok(ix) => Ok((path, FoundBy::Path, ix)),
                Err(e) => Err(ProbeError::TargetFile {
                    path: file.to_string(),
                    failure: match e {
                        OpenError::Failure(f) => f,
                        // (Not asked for: any kind is taken by path.)
                        OpenError::WrongKind => FileFailure::NotElf,
                    },
                }),
            };
        }
        let kind = Some(self.search.kind);
        let mut searched = Vec::new();
        if let Some(loaded) = &self.loaded {
            searched.push("the loaded objects".to_string());
            let paths = loaded.loaded_paths();
            // By file name, then (reading each) by DT_SONAME.
            for by_soname in [false, true] {
                for p in &paths {
                    let named = p.file_name().is_some_and(|n| n == file);
                    if named == by_soname {
                        continue;
                    }
                    if let Ok(ix) = self.open(p, kind) {
                        if !by_soname || ix.index.soname.as_deref() == Some(file) {
                            return Ok((p.clone(), FoundBy::Loaded, ix));
                        }
                    }
                }
            }
        }
        for d in &self.search.directories {
            searched.push(d.display().to_string());
            let p = d.join(file);
            if let Ok(ix) = self.open(&p, kind) {
                return Ok((p, FoundBy::Directory(d.clone()), ix));
            }
        }
        if let Some(cache) = &self.search.cache {
            searched.push(cache.display().to_string());
            let want = self.search.kind.cache_flags();
            let entries = self.cache_entries(cache);
            for e in entries.get(file.as_bytes()).into_iter().flatten() {
                if !ldcache::flags_match(e.flags, want) {
                    continue;
                }
                let p = PathBuf::from(<std::ffi::OsStr as OsStrExt>::from_bytes(&e.path));
                if let Ok(ix) = self.open(&p, kind) {
                    return Ok((p, FoundBy::LdSoCache, ix));
                }
            }
        }
        for d in &self.search.default_directories {
            searched.push(d.display().to_string());
            let p = d.join(file);
            if let Ok(ix) = self.open(&p, kind) {
                return Ok((p, FoundBy::DefaultDirectory(d.clone()), ix));
            }
        }
        Err(ProbeError::LibraryNotFound {
            name: file.to_string(),
            searched,
        })
    }

    /// The linker cache's entries (read again when the file changed; none
    /// if it cannot be read).
    fn cache_entries(&self, path: &Path) -> Arc<CacheByName> {
        let read = || -> Option<(Stamp, Vec<u8>)> {
            let mut f = File::open(path).ok()?;
            let st = stamp(&f.metadata().ok()?);
            let mut data = Vec::new();
            f.read_to_end(&mut data).ok()?;
            Some((st, data))
        };
        let now = std::fs::metadata(path).ok().map(|m| stamp(&m));
        let mut held = self.ldcache.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some((st, entries)), Some(now)) = (held.as_ref(), now) {
            if *st == now {
                return Arc::clone(entries);
            }
        }
        match read() {
            Some((st, data)) => {
                let mut by_name = CacheByName::new();
                for e in ldcache::parse(&data) {
                    by_name.entry(e.name.clone()).or_default().push(e);
                }
                let by_name = Arc::new(by_name);
                *held = Some((st, Arc::clone(&by_name)));
                by_name
            }
            None => Arc::new(CacheByName::new()),
        }
    }

    /// Opens and indexes `path` (or finds it indexed), keyed by the open
    /// file's identity. `want`: refuse another ELF kind without reading the
    /// whole file.
    fn open(&self, path: &Path, want: Option<ElfKind>) -> Result<Arc<Indexed>, OpenError> {
        // Non-blocking: opening a FIFO must not wait for a writer (it is
        // refused just below); reads of a regular file never block anyway.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| os("open", &e))?;
        let meta = f.metadata().map_err(|e| os("fstat", &e))?;
        if !meta.is_file() {
            // A device (`/dev/zero` would be read forever) or a directory.
            return Err(OpenError::Failure(FileFailure::NotRegularFile));
        }
        let st = stamp(&meta);
        let cached = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&st)
            .cloned();
        if let Some(ix) = cached {
            return match want {
                Some(k) if k != ix.index.kind => Err(OpenError::WrongKind),
                _ => Ok(ix),
            };
        }
        if let Some(k) = want {
            let mut head = [0u8; 20];
            let n = f.read_at(&mut head, 0).map_err(|e| os("read", &e))?;
            match elf_kind(&head[..n]) {
                Some(have) if have == k => {}
                Some(_) => return Err(OpenError::WrongKind),
                None => return Err(OpenError::Failure(FileFailure::NotElf)),
            }
        }
        let mut data = Vec::with_capacity(meta.len().min(1 << 30) as usize);
        f.read_to_end(&mut data).map_err(|e| os("read", &e))?;
        let index = ElfIndex::parse(&data).map_err(OpenError::Failure)?;
        let ix = Arc::new(Indexed {
            file: FileId {
                dev: meta.dev(),
                inode: meta.ino(),
            },
            index,
        });
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if files.len() >= MAX_CACHED_FILES {
            files.clear();
        }
        files.insert(st, Arc::clone(&ix));
        Ok(ix)
    }
}
