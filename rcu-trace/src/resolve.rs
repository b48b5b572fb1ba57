//! From specs to probes: every file found, every symbol and glob resolved
//! to file offsets, before any process is started or touched.
//!
//! # Where a file is looked for
//!
//! A `PATH` with a `/` is that file. A bare library name is resolved by the
//! library's [`TargetResolver`] as the dynamic linker would find it: for
//! `-p PID`, among the files that process maps first (read through
//! `/proc/PID/root`, so a process in a container gets its own library),
//! then in `LD_LIBRARY_PATH`, `/etc/ld.so.cache` and the default
//! directories. The library only knows full names (`libc.so.6`); a bare
//! name with no `.so` in it (`libc`, `libpthread`) is first mapped here to
//! the library whose file name (or, for a process's files, `DT_SONAME`)
//! starts with `NAME.so.`: among the process's files for `-p`, else the
//! first such file in the search directories (`libc` -> `libc.so.6`).
//!
//! # Globs
//!
//! A glob is matched against every function of the file
//! ([`TargetFile::functions`]: `.symtab` and `.dynsym`, IFUNC resolvers
//! left out). Aliases (`malloc`, `__libc_malloc`) are one function: one
//! probe per address, named by its plainest matching name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rcu_registry::probes::uprobe::{TargetFile, TargetPlace, TargetResolver, UprobeKey};

use crate::glob;
use crate::spec::{Kind, Place, Spec};

/// One probe: a row of the table, one consumer's share of a spec.
#[derive(Clone, Debug)]
pub struct Probe {
    /// Index of its spec in [`Plan::specs`].
    pub spec: usize,
    /// Entry or return.
    pub kind: Kind,
    /// Its name: the spec with the function spelled out
    /// (`uprobe:libc:strtol` for `uprobe:libc:str*`).
    pub label: String,
    /// The function it is in: the name asked for or matched, or for a
    /// file offset the function around it if the file says.
    pub function: Option<String>,
    /// The file, as found (for `-p`, the path inside the process).
    pub path: PathBuf,
    /// File offset of the probed instruction.
    pub offset: u64,
    /// Its uprobe keys (one per distinct file the targets map under this
    /// name) and the file offset of the enclosing function's entry, if
    /// known (what `register_many` checks the instruction boundary from).
    pub keys: Vec<(UprobeKey, Option<u64>)>,
}

/// Everything to probe.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// The specs, as parsed.
    pub specs: Vec<Spec>,
    /// The probes, in spec order and, within a glob, by file offset.
    pub probes: Vec<Probe>,
}

/// Where files are looked for: as this process would load them (a
/// command to spawn), or as each of these processes sees them.
#[derive(Clone, Debug)]
pub enum Scope {
    /// The system's search (a command to be spawned).
    System,
    /// The processes' own files first (`-p`).
    Processes(Vec<i32>),
}

/// A resolver and what it knows of one process.
struct Context {
    resolver: TargetResolver,
    /// The process's executable file mappings, as paths under
    /// `/proc/PID/root` (empty for the system).
    loaded: Vec<PathBuf>,
    /// `/proc/PID/root`, stripped from paths shown.
    root: Option<String>,
}

impl Context {
    fn system() -> Context {
        Context {
            resolver: TargetResolver::new(),
            loaded: Vec::new(),
            root: None,
        }
    }

    fn process(pid: i32) -> Result<Context, String> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|e| format!("cannot read /proc/{pid}/maps: {e}"))?;
        let root = format!("/proc/{pid}/root");
        let mut loaded: Vec<PathBuf> = Vec::new();
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (perms, path) = (f.nth(1), f.nth(3));
            if let (Some(perms), Some(path)) = (perms, path) {
                let p = PathBuf::from(format!("{root}{path}"));
                if perms.contains('x') && path.starts_with('/') && !loaded.contains(&p) {
                    loaded.push(p);
                }
            }
        }
        Ok(Context {
            resolver: TargetResolver::new().with_loaded(loaded.clone()),
            loaded,
            root: Some(root),
        })
    }

    /// `path` without this context's `/proc/PID/root`.
    fn shown(&self, path: &Path) -> PathBuf {
        match &self.root {
            Some(r) => path
                .strip_prefix(r)
                .map(|p| Path::new("/").join(p))
                .unwrap_or_else(|_| path.to_path_buf()),
            None => path.to_path_buf(),
        }
    }

    /// The file `name` names, opened (a bare name with no `.so` mapped
    /// first: see the module docs).
    fn open(&self, name: &str) -> Result<TargetFile, String> {
        let direct = self.resolver.open_file(name);
        let err = match direct {
            Ok(f) => return Ok(f),
            Err(e) => e.to_string(),
        };
        if name.contains('/') || name.contains(".so") {
            return Err(err);
        }
        match self.by_prefix(name) {
            Some(full) => self.resolver.open_file(&full).map_err(|e| e.to_string()),
            None => Err(format!(
                "{err}; no library named {name}.so.* either (a bare name is a library: \
                 give a path for a program)"
            )),
        }
    }

    /// The full name of the library `NAME.so.*` (see the module docs).
    fn by_prefix(&self, name: &str) -> Option<String> {
        let want = format!("{name}.so.");
        for p in &self.loaded {
            let file_name = p.file_name()?.to_str()?;
            if file_name.starts_with(&want) {
                return Some(file_name.to_string());
            }
            if let Ok(f) = self.resolver.open_file(p.to_str()?) {
                if let Some(so) = f.soname().filter(|s| s.starts_with(&want)) {
                    return Some(so.to_string());
                }
            }
        }
        if self.root.is_some() {
            // Not in the process: where it would be loaded from.
            return Context::system().by_prefix(name);
        }
        let search = self.resolver.search();
        for dir in search
            .directories
            .iter()
            .chain(search.default_directories.iter())
        {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut found: Vec<String> = rd
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| {
                    n.strip_prefix(&want).is_some_and(|v| {
                        !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                    })
                })
                .collect();
            found.sort();
            if let Some(n) = found.pop() {
                return Some(n);
            }
        }
        None
    }
}

/// The contexts of a scope.
fn contexts(scope: &Scope) -> Result<Vec<Context>, String> {
    match scope {
        Scope::System => Ok(vec![Context::system()]),
        Scope::Processes(pids) => pids.iter().map(|&p| Context::process(p)).collect(),
    }
}

/// The plainest of several names: fewest leading underscores, then
/// shortest, then alphabetical.
fn plainest<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    names.min_by_key(|n| (n.len() - n.trim_start_matches('_').len(), n.len(), *n))
}

/// One function a glob matched: its entry's file offset, its chosen name,
/// every matching name, its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matched {
    /// File offset of its entry.
    pub offset: u64,
    /// Its plainest matching name.
    pub name: String,
    /// Every name of it that matched, the chosen one included.
    pub names: Vec<String>,
    /// Its size, if known.
    pub size: Option<u64>,
}

/// The functions of `file` a glob matches, one per address, by offset.
pub fn glob_matches(file: &TargetFile, pattern: &str) -> Vec<Matched> {
    let mut by_offset: BTreeMap<u64, (Vec<String>, Option<u64>)> = BTreeMap::new();
    for f in file.functions() {
        if glob::matches(pattern, &f.name) {
            let e = by_offset.entry(f.offset).or_default();
            if !e.0.contains(&f.name) {
                e.0.push(f.name);
            }
            e.1 = e.1.max(f.size);
        }
    }
    by_offset
        .into_iter()
        .map(|(offset, (names, size))| Matched {
            offset,
            name: plainest(names.iter().map(String::as_str))
                .expect("one name at least")
                .to_string(),
            names,
            size,
        })
        .collect()
}

/// Resolves every spec in every context of `scope`.
///
/// # Errors
/// The first spec whose file cannot be found or read, whose symbol is not
/// there (or is ambiguous, an IFUNC, not code), or whose glob matches
/// nothing: one line naming the spec.
pub fn plan(specs: Vec<Spec>, scope: &Scope) -> Result<Plan, String> {
    let ctxs = contexts(scope)?;
    let mut probes: Vec<Probe> = Vec::new();
    for (si, spec) in specs.iter().enumerate() {
        let fail = |why: String| format!("{}: {why}", spec.text);
        // Rows of this spec by label, across contexts.
        let mut rows: BTreeMap<String, usize> = BTreeMap::new();
        for ctx in &ctxs {
            let file = ctx.open(&spec.file).map_err(fail)?;
            let path = ctx.shown(file.path());
            let prefix = format!("{}:{}", spec.kind.prefix(), spec.file);
            let found: Vec<(String, Option<String>, u64, Option<u64>)> = match &spec.place {
                Place::Symbol { name, offset } => {
                    let place = TargetPlace::Symbol {
                        name: name.clone(),
                        offset: *offset,
                    };
                    let r = file.resolve(&place).map_err(|e| fail(e.to_string()))?;
                    let label = match offset {
                        0 => format!("{prefix}:{name}"),
                        o => format!("{prefix}:{name}+{o:#x}"),
                    };
                    let func = r.function.as_ref().map(|f| f.offset);
                    vec![(label, Some(name.clone()), r.offset, func)]
                }
                Place::FileOffset(o) => {
                    let r = file
                        .resolve(&TargetPlace::FileOffset(*o))
                        .map_err(|e| fail(e.to_string()))?;
                    let func = r.function.as_ref();
                    vec![(
                        format!("{prefix}:{o:#x}"),
                        func.map(|f| f.name.clone()),
                        r.offset,
                        func.map(|f| f.offset),
                    )]
                }
                Place::Glob(g) => {
                    let m = glob_matches(&file, g);
                    if m.is_empty() {
                        return Err(fail(format!(
                            "no function of {} matches `{g}`",
                            path.display()
                        )));
                    }
                    m.into_iter()
                        .map(|m| {
                            (
                                format!("{prefix}:{}", m.name),
                                Some(m.name),
                                m.offset,
                                Some(m.offset),
                            )
                        })
                        .collect()
                }
            };
            for (label, function, offset, func_offset) in found {
                let key = UprobeKey {
                    file: file.file(),
                    offset,
                };
                let row = *rows.entry(label.clone()).or_insert_with(|| {
                    probes.push(Probe {
                        spec: si,
                        kind: spec.kind,
                        label,
                        function,
                        path: path.clone(),
                        offset,
                        keys: Vec::new(),
                    });
                    probes.len() - 1
                });
                if !probes[row].keys.iter().any(|(k, _)| *k == key) {
                    probes[row].keys.push((key, func_offset));
                }
            }
        }
    }
    Ok(Plan { specs, probes })
}

/// What `--list PATH[:GLOB]` shows: the file found and the functions a
/// spec on it would attach to.
///
/// # Errors
/// The file cannot be found or read; one line.
pub fn list(what: &str, scope: &Scope) -> Result<(PathBuf, Vec<Matched>), String> {
    let (file, pattern) = split_list(what);
    let ctxs = contexts(scope)?;
    let ctx = ctxs.first().ok_or("no process to look in")?;
    let f = ctx.open(file).map_err(|e| format!("{what}: {e}"))?;
    if pattern != "*" {
        glob::check(pattern).map_err(|e| format!("{what}: {e}"))?;
    }
    Ok((ctx.shown(f.path()), glob_matches(&f, pattern)))
}

/// `PATH[:GLOB]` split at its last lone `:` (a `::` is part of a Rust
/// path); no `:` lists everything.
fn split_list(what: &str) -> (&str, &str) {
    let b = what.as_bytes();
    let lone = (0..b.len())
        .rev()
        .find(|&i| b[i] == b':' && (i == 0 || b[i - 1] != b':') && b.get(i + 1) != Some(&b':'));
    match lone {
        Some(i) if i > 0 && i + 1 < b.len() => (&what[..i], &what[i + 1..]),
        Some(i) if i > 0 => (&what[..i], "*"),
        _ => (what, "*"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_arguments_split_at_the_last_lone_colon() {
        assert_eq!(split_list("libc"), ("libc", "*"));
        assert_eq!(split_list("libc:str*"), ("libc", "str*"));
        assert_eq!(
            split_list("./app:demo::work::*"),
            ("./app", "demo::work::*")
        );
        assert_eq!(split_list("libc:"), ("libc", "*"));
    }

    #[test]
    fn a_bare_libc_is_the_c_library() {
        let ctx = Context::system();
        let f = ctx.open("libc").unwrap();
        assert!(f.soname().unwrap().starts_with("libc.so."), "{f:?}");
        assert!(ctx.open("surely-no-such-library-here").is_err());
    }

    #[test]
    fn the_plainest_alias_names_a_function() {
        let names = ["__libc_malloc", "malloc", "__malloc"];
        assert_eq!(plainest(names.iter().copied()), Some("malloc"));
    }
}
