//! Uprobe targets by file: the text form, and resolution to (FileId, file
//! offset) against fixture libraries built here with `cc` and against the
//! C library this process has loaded.
#![cfg(target_os = "linux")]

use std::ffi::CStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use proptest::prelude::*;
use rcu_registry::probes::error::FileFailure;
use rcu_registry::probes::uprobe::{
    FileId, FoundBy, LibrarySearch, ParseTargetErrorKind, TargetPlace, TargetResolver, UprobeTarget,
};
use rcu_registry::probes::ProbeError;

// ---------------------------------------------------------------- the text form

#[test]
fn the_three_forms_parse_to_their_constructors() {
    let t = UprobeTarget::parse("libz.so.1:crc32").unwrap();
    assert_eq!(t, UprobeTarget::symbol("libz.so.1", "crc32"));
    assert!(t.is_bare_name());
    let t: UprobeTarget = "/usr/lib/x86_64-linux-gnu/libc.so.6:qsort+4"
        .parse()
        .unwrap();
    assert_eq!(
        t,
        UprobeTarget::symbol("/usr/lib/x86_64-linux-gnu/libc.so.6", "qsort").offset(4)
    );
    assert!(!t.is_bare_name());
    assert_eq!(
        UprobeTarget::parse("./app:0x1a2b").unwrap(),
        UprobeTarget::file_offset("./app", 0x1a2b)
    );
    // `+0x10` is hex, `+16` decimal; `.offset` adds.
    assert_eq!(
        UprobeTarget::parse("a.so:f+0x10").unwrap(),
        UprobeTarget::parse("a.so:f+16").unwrap()
    );
    assert_eq!(
        UprobeTarget::file_offset("a", 0x10).offset(2),
        UprobeTarget::file_offset("a", 0x12)
    );
    // Rust paths keep their `::`; the file is split at the last lone `:`.
    let t = UprobeTarget::parse("app:demo::work::parse+2").unwrap();
    assert_eq!(t.file(), "app");
    assert_eq!(
        t.place(),
        &TargetPlace::Symbol {
            name: "demo::work::parse".into(),
            offset: 2
        }
    );
    assert_eq!(UprobeTarget::parse("a:b:f").unwrap().file(), "a:b");
    // Versions stay in the name.
    assert_eq!(
        UprobeTarget::parse("libc.so.6:memcpy@@GLIBC_2.14").unwrap(),
        UprobeTarget::symbol("libc.so.6", "memcpy@@GLIBC_2.14")
    );
    assert_eq!(t.to_string(), "app:demo::work::parse+0x2");
    assert_eq!(
        UprobeTarget::file_offset("./app", 0x1a2b).to_string(),
        "./app:0x1a2b"
    );
    assert_eq!(UprobeTarget::symbol("l", "f").to_string(), "l:f");
}

#[test]
fn bad_texts_are_typed_errors() {
    use ParseTargetErrorKind::*;
    let cases: &[(&str, ParseTargetErrorKind)] = &[
        ("libz.so.1", MissingColon),
        ("a::b", MissingColon),
        (":crc32", EmptyFile),
        ("libz.so.1:", EmptySymbol),
        ("libz.so.1:+4", EmptySymbol),
        ("libz.so.1:crc32+", BadOffset),
        ("libz.so.1:crc32+x", BadOffset),
        ("libz.so.1:crc32+-1", BadOffset),
        ("libz.so.1:crc32+99999999999999999999", BadOffset),
        ("libz.so.1:crc32+0x", BadOffset),
        ("app:0x", BadFileOffset),
        ("app:0xg1", BadFileOffset),
        ("app:0x10000000000000000", BadFileOffset),
        ("app:0x+1", BadFileOffset),
        ("app:1234", DecimalFileOffset),
        ("app:crc 32", Whitespace),
        ("app:f++0", PlusInSymbol),
        ("app:f+g+1", PlusInSymbol),
        ("app\0:f", Nul),
    ];
    for (text, kind) in cases {
        let e = UprobeTarget::parse(text).unwrap_err();
        assert_eq!(e.kind(), *kind, "{text:?}: {e}");
        assert_eq!(e.text(), *text);
        assert!(e.to_string().contains("is not a uprobe target"), "{e}");
        assert_eq!(text.parse::<UprobeTarget>().unwrap_err(), e);
    }
}

fn arb_target() -> impl Strategy<Value = UprobeTarget> {
    let file = "[A-Za-z0-9_./-]{1,12}(:[A-Za-z0-9_./-]{1,12})?";
    let name =
        "[A-Za-z_][A-Za-z0-9_.$]{0,15}(::[A-Za-z_][A-Za-z0-9_]{0,8}){0,2}(@@?[A-Z0-9_.]{1,8})?";
    prop_oneof![
        (file, name, any::<u64>()).prop_map(|(f, n, off)| UprobeTarget::symbol(f, n).offset(off)),
        (file, name).prop_map(|(f, n)| UprobeTarget::symbol(f, n)),
        (file, any::<u64>()).prop_map(|(f, off)| UprobeTarget::file_offset(f, off)),
    ]
}

proptest! {
    #[test]
    fn display_parses_back_to_the_same_target(t in arb_target()) {
        let text = t.to_string();
        prop_assert_eq!(UprobeTarget::parse(&text), Ok(t), "{}", text);
    }

    #[test]
    fn any_text_parses_or_errs_without_panicking(
        s in prop_oneof![
            "\\PC{0,40}",
            "[a-f0-9xX:+@. _/-]{0,24}",
            // Shaped like a target, with noise where each part goes.
            "[a-c./:]{1,4}:[a-c0-9+:@ x]{0,5}(\\+[0-9x]{0,3})?",
        ]
    ) {
        if let Ok(t) = UprobeTarget::parse(&s) {
            // Whatever parses prints as something that parses to it again.
            prop_assert_eq!(UprobeTarget::parse(&t.to_string()), Ok(t));
        }
    }
}

// ---------------------------------------------------------------- fixtures

const A_C: &str = r#"
int fixture_add(int a, int b) { return a * 3 + b + 1; }
int fixture_alias(int, int) __attribute__((alias("fixture_add")));
static int dup_helper(int x) { return x * 7 + 3; }
int call_a(int x) { return dup_helper(x) + 1; }
static int ifn_impl(void) { return 42; }
static int (*ifn_resolver(void))(void) { return ifn_impl; }
int fixture_ifunc(void) __attribute__((ifunc("ifn_resolver")));
int vfn_old(int x) { return x + 100; }
int vfn_new(int x) { return x + 200; }
__asm__(".symver vfn_old, vfn@VER_1");
__asm__(".symver vfn_new, vfn@@VER_2");
__asm__(".data\n.globl data_func\n.type data_func, @function\n"
        "data_func: .byte 0xc3\n.size data_func, 1\n.text");
__asm__(".text\n.globl sizeless\n.type sizeless, @function\nsizeless: ret\n");
int fixture_data = 5;
"#;

/// A second compilation unit with its own local `dup_helper`.
const B_C: &str = r#"
static int dup_helper(int x) { return x * 11 - 2; }
int call_b(int x) { return dup_helper(x) - 1; }
"#;

const VERSIONS: &str = "VER_1 { global: *; };\nVER_2 { } VER_1;\n";

struct Fixture {
    dir: PathBuf,
    /// `dir/lib/libutfix.so.1` (soname `libutfix.so.1`, with `.symtab`).
    full: PathBuf,
    /// `dir/stripped/libutfix.so.1`: the same, `-s` (`.dynsym` only).
    stripped: PathBuf,
    /// `dir/real/libutfix-real.so`: soname `libutfix.so.1`, another name.
    renamed: PathBuf,
    /// `dir/a.o`: relocatable, no segments.
    object: PathBuf,
}

fn cc(args: &[&str], cwd: &Path) {
    let out = Command::new("cc")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("cc runs");
    assert!(
        out.status.success(),
        "cc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("uprobe_target-{}", std::process::id()));
        for sub in ["lib", "stripped", "real"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("a.c"), A_C).unwrap();
        std::fs::write(dir.join("b.c"), B_C).unwrap();
        std::fs::write(dir.join("vers.map"), VERSIONS).unwrap();
        let so = |out: &str, strip: bool| {
            // Linked at 0x10000: every virtual address differs from its
            // file offset, so mixing the two up cannot pass.
            let mut args = vec!["-shared", "-fPIC", "-O0", "-Wl,-Ttext-segment=0x10000"];
            if strip {
                args.push("-s");
            }
            args.extend([
                "-Wl,-soname,libutfix.so.1",
                "-Wl,--version-script=vers.map",
                "-o",
                out,
                "a.c",
                "b.c",
            ]);
            cc(&args, &dir);
        };
        so("lib/libutfix.so.1", false);
        so("stripped/libutfix.so.1", true);
        so("real/libutfix-real.so", false);
        cc(&["-c", "-fPIC", "-o", "a.o", "a.c"], &dir);
        Fixture {
            full: dir.join("lib/libutfix.so.1"),
            stripped: dir.join("stripped/libutfix.so.1"),
            renamed: dir.join("real/libutfix-real.so"),
            object: dir.join("a.o"),
            dir,
        }
    })
}

fn file_id(p: &Path) -> FileId {
    let m = std::fs::metadata(p).unwrap();
    FileId {
        dev: m.dev(),
        inode: m.ino(),
    }
}

fn by_path(p: &Path, place: &str) -> UprobeTarget {
    UprobeTarget::parse(&format!("{}:{place}", p.display())).unwrap()
}

/// Only explicit paths and the given directories: nothing of the machine.
fn isolated() -> TargetResolver {
    TargetResolver::with_search(LibrarySearch::nowhere())
}

// ---------------------------------------------------------------- resolution

#[test]
fn a_symbol_resolves_to_its_file_offset_in_the_executable_segment() {
    let f = fixture();
    let r = isolated();
    for lib in [&f.full, &f.stripped] {
        let at = r.resolve(&by_path(lib, "fixture_add")).unwrap();
        assert_eq!(at.found_by, FoundBy::Path);
        assert_eq!(at.path, *lib);
        assert_eq!(at.file, file_id(lib));
        let func = at.function.clone().unwrap();
        assert_eq!(func.name, "fixture_add");
        assert_eq!((func.offset, func.vaddr), (at.offset, at.vaddr));
        let size = func.size.expect("a C function has a size");
        assert_eq!(func.extent(), Some(at.offset..at.offset + size));
        // The bytes there are the function's: the same in both builds.
        let bytes = std::fs::read(lib).unwrap();
        let code = &bytes[at.offset as usize..(at.offset + size) as usize];
        let other = if *lib == f.full { &f.stripped } else { &f.full };
        let o = r.resolve(&by_path(other, "fixture_add")).unwrap();
        let obytes = std::fs::read(other).unwrap();
        assert_eq!(code, &obytes[o.offset as usize..(o.offset + size) as usize]);

        // An alias is the same place; `+off` moves inside the function.
        let alias = r.resolve(&by_path(lib, "fixture_alias")).unwrap();
        assert_eq!((alias.offset, alias.vaddr), (at.offset, at.vaddr));
        let inside = r
            .resolve(&by_path(lib, &format!("fixture_add+{}", size - 1)))
            .unwrap();
        assert_eq!(inside.offset, at.offset + size - 1);
        assert_eq!(inside.vaddr, at.vaddr + size - 1);
        assert_eq!(inside.function.unwrap().offset, at.offset);
        assert_eq!(
            r.resolve(&by_path(lib, &format!("fixture_add+{size}"))),
            Err(ProbeError::OffsetPastEnd {
                name: "fixture_add".into(),
                size,
                offset: size
            })
        );

        // The file offset form lands at the same key and finds the function.
        let same = r
            .resolve(&by_path(lib, &format!("{:#x}", at.offset + 2)))
            .unwrap();
        assert_eq!(same.key().file, at.key().file);
        assert_eq!(same.offset, at.offset + 2);
        assert_eq!(same.vaddr, at.vaddr + 2);
        let sf = same.function.unwrap();
        assert_eq!((sf.offset, sf.size), (at.offset, Some(size)));
        assert!(
            sf.name == "fixture_add" || sf.name == "fixture_alias",
            "{}",
            sf.name
        );
    }
}

#[test]
fn the_loader_maps_the_resolved_offsets_where_its_symbols_are() {
    let f = fixture();
    let r = isolated();
    let path = std::ffi::CString::new(f.full.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; the fixture has no constructors.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null());
    let check = |place: &str, addr: *mut libc::c_void| {
        assert!(!addr.is_null(), "{place}");
        let at = r.resolve(&by_path(&f.full, place)).unwrap();
        assert_ne!(at.vaddr, at.offset, "the fixture is linked at 0x10000");
        let (offset, inode) = mapped_offset(addr as u64);
        assert_eq!((offset, inode), (at.offset, at.file.inode), "{place}");
    };
    // SAFETY: a live handle and NUL-terminated names.
    unsafe {
        check("fixture_add", libc::dlsym(handle, c"fixture_add".as_ptr()));
        check("vfn", libc::dlsym(handle, c"vfn".as_ptr()));
        check(
            "vfn@VER_1",
            libc::dlvsym(handle, c"vfn".as_ptr(), c"VER_1".as_ptr()),
        );
        check(
            "vfn@@VER_2",
            libc::dlvsym(handle, c"vfn".as_ptr(), c"VER_2".as_ptr()),
        );
    }
    // SAFETY: the reference taken above, given back once.
    unsafe { libc::dlclose(handle) };
}

#[test]
fn symbol_versions_pick_the_default_or_the_named_one() {
    let f = fixture();
    let r = isolated();
    for lib in [&f.full, &f.stripped] {
        let off = |place: &str| r.resolve(&by_path(lib, place)).map(|a| a.offset);
        let new = off("vfn_new").unwrap();
        let old = off("vfn_old").unwrap();
        assert_ne!(new, old);
        assert_eq!(off("vfn"), Ok(new), "plain: the default version");
        assert_eq!(off("vfn@@VER_2"), Ok(new));
        assert_eq!(off("vfn@VER_2"), Ok(new));
        assert_eq!(off("vfn@VER_1"), Ok(old));
        assert_eq!(
            off("vfn@@VER_1"),
            Err(ProbeError::SymbolNotInFile {
                path: lib.display().to_string(),
                name: "vfn@@VER_1".into()
            })
        );
    }
}

#[test]
fn one_name_at_two_addresses_is_ambiguous_with_both_offsets() {
    let f = fixture();
    let r = isolated();
    let e = r.resolve(&by_path(&f.full, "dup_helper")).unwrap_err();
    let ProbeError::DuplicateSymbol {
        path,
        name,
        offsets,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(
        (path.as_str(), name.as_str()),
        (f.full.to_str().unwrap(), "dup_helper")
    );
    assert_eq!(offsets.len(), 2);
    assert!(offsets[0] < offsets[1]);
    // Each is reachable by its offset, and named there.
    for o in offsets {
        let at = r.resolve(&by_path(&f.full, &format!("{o:#x}"))).unwrap();
        assert_eq!(at.function.unwrap().name, "dup_helper");
    }
    // Stripped, the local functions are gone.
    assert!(matches!(
        r.resolve(&by_path(&f.stripped, "dup_helper")),
        Err(ProbeError::SymbolNotInFile { .. })
    ));
}

#[test]
fn an_ifunc_is_refused_with_its_resolver_offset() {
    let f = fixture();
    let r = isolated();
    for lib in [&f.full, &f.stripped] {
        let e = r.resolve(&by_path(lib, "fixture_ifunc")).unwrap_err();
        let ProbeError::IfuncSymbol {
            resolver_offset, ..
        } = e
        else {
            panic!("{e:?}")
        };
        assert!(e.to_string().contains("IFUNC"), "{e}");
        // The resolver is probeable on purpose, by that offset.
        let at = r
            .resolve(&by_path(lib, &format!("{resolver_offset:#x}")))
            .unwrap();
        assert_eq!(at.offset, resolver_offset);
        if *lib == f.full {
            assert_eq!(at.function.unwrap().name, "ifn_resolver");
        }
    }
}

#[test]
fn a_sizeless_symbol_only_has_its_segment_checked() {
    let f = fixture();
    let r = isolated();
    let at = r.resolve(&by_path(&f.full, "sizeless")).unwrap();
    let func = at.function.unwrap();
    assert_eq!(func.size, None);
    assert_eq!(func.extent(), None);
    let beyond = r.resolve(&by_path(&f.full, "sizeless+1")).unwrap();
    assert_eq!(beyond.offset, at.offset + 1);
    assert!(matches!(
        r.resolve(&by_path(&f.full, "sizeless+0x100000")),
        Err(ProbeError::NotInCode { .. })
    ));
}

#[test]
fn a_files_functions_list_every_name_and_address_that_resolves_and_no_ifunc() {
    let f = fixture();
    let r = isolated();
    for lib in [&f.full, &f.stripped] {
        let file = r.open_file(lib.to_str().unwrap()).unwrap();
        let funcs = file.functions();
        let offsets = |name: &str| -> Vec<u64> {
            funcs
                .iter()
                .filter(|g| g.name == name)
                .map(|g| g.offset)
                .collect()
        };
        // Aliases are entries of their own at one offset.
        let add = offsets("fixture_add");
        assert_eq!(add.len(), 1, "{funcs:?}");
        assert_eq!(offsets("fixture_alias"), add);
        // IFUNCs and functions outside executable segments are left out.
        assert!(offsets("fixture_ifunc").is_empty());
        assert!(offsets("data_func").is_empty());
        // Sorted by offset, then name.
        assert!(funcs
            .windows(2)
            .all(|w| (w[0].offset, &w[0].name) <= (w[1].offset, &w[1].name)));
        for g in &funcs {
            // Each resolves by its offset, and by its name when the name
            // has one address.
            let at = r
                .resolve(&by_path(lib, &format!("{:#x}", g.offset)))
                .unwrap();
            assert_eq!(at.offset, g.offset);
            if offsets(&g.name).len() == 1 {
                let by_name = r.resolve(&by_path(lib, &g.name)).unwrap();
                assert_eq!(
                    (by_name.offset, by_name.vaddr),
                    (g.offset, g.vaddr),
                    "{g:?}"
                );
                assert_eq!(by_name.function.unwrap().size, g.size);
            }
        }
        // The local duplicates only with `.symtab`: one entry per address.
        let dups = offsets("dup_helper");
        match *lib == f.full {
            true => assert_eq!(dups.len(), 2),
            false => assert!(dups.is_empty()),
        }
        assert_eq!(offsets("sizeless").len(), 1);
    }
}

#[test]
fn bare_names_are_found_as_the_dynamic_linker_finds_them() {
    let f = fixture();
    let t = UprobeTarget::parse("libutfix.so.1:fixture_add").unwrap();
    let lib_dir = f.dir.join("lib");

    // In a directory of the search.
    let r = isolated().with_directories([lib_dir.clone()]);
    let at = r.resolve(&t).unwrap();
    assert_eq!(at.path, f.full);
    assert_eq!(at.found_by, FoundBy::Directory(lib_dir.clone()));
    assert_eq!(at.file, file_id(&f.full));

    // Loaded objects come first: by DT_SONAME (another file name) ...
    let r = isolated()
        .with_directories([lib_dir.clone()])
        .with_loaded(vec![
            PathBuf::from("/nonexistent/libx.so"),
            f.renamed.clone(),
        ]);
    let at = r.resolve(&t).unwrap();
    assert_eq!(
        (at.path.clone(), at.found_by),
        (f.renamed.clone(), FoundBy::Loaded)
    );
    assert_eq!(at.file, file_id(&f.renamed));
    // ... and by file name before any DT_SONAME match.
    let r = isolated().with_loaded(vec![f.renamed.clone(), f.stripped.clone()]);
    assert_eq!(r.resolve(&t).unwrap().path, f.stripped);

    // A file of another machine in an earlier directory is skipped.
    let wrong = f.dir.join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    let mut bytes = std::fs::read(&f.full).unwrap();
    let other: u16 = if cfg!(target_arch = "aarch64") {
        62
    } else {
        183
    };
    bytes[18..20].copy_from_slice(&other.to_le_bytes());
    std::fs::write(wrong.join("libutfix.so.1"), &bytes).unwrap();
    let r = isolated().with_directories([wrong.clone(), lib_dir.clone()]);
    let at = r.resolve(&t).unwrap();
    assert_eq!(at.found_by, FoundBy::Directory(lib_dir.clone()));
    // By path, any machine is taken (the registry checks the arch) ...
    let r = isolated().with_directories([wrong.clone(), lib_dir.clone()]);
    let at = r
        .resolve(&by_path(&wrong.join("libutfix.so.1"), "fixture_add"))
        .unwrap();
    assert_eq!(at.kind.machine, other);
    // ... and once indexed, still skipped by the search.
    assert_eq!(r.resolve(&t).unwrap().path, f.full);

    // Nowhere: a typed error listing where it looked.
    let r = isolated()
        .with_directories([wrong.clone()])
        .with_loaded(Vec::<PathBuf>::new());
    assert_eq!(
        r.resolve(&t),
        Err(ProbeError::LibraryNotFound {
            name: "libutfix.so.1".into(),
            searched: vec!["the loaded objects".into(), wrong.display().to_string()],
        })
    );
}

#[test]
fn a_file_replaced_on_disk_is_a_different_file() {
    let f = fixture();
    let dir = f.dir.join("replaced");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("libutfix.so.1");
    std::fs::copy(&f.full, &p).unwrap();
    let r = isolated();
    let before = r.resolve(&by_path(&p, "fixture_add")).unwrap();
    // Replaced the way installers do: a new file renamed over the old.
    let tmp = dir.join("new.so");
    std::fs::copy(&f.stripped, &tmp).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    let after = r.resolve(&by_path(&p, "fixture_add")).unwrap();
    assert_ne!(before.file, after.file);
    assert_eq!(after.file, file_id(&p));
    assert!(
        matches!(
            r.resolve(&by_path(&p, "dup_helper")),
            Err(ProbeError::SymbolNotInFile { .. })
        ),
        "the stripped file's symbols, not the cached ones"
    );
}

#[test]
fn bad_files_symbols_and_offsets_are_typed_errors() {
    let f = fixture();
    let r = isolated();
    let path_err = |p: &Path| match r.resolve(&by_path(p, "f")) {
        Err(ProbeError::TargetFile { path, failure }) => {
            assert_eq!(path, p.display().to_string());
            failure
        }
        other => panic!("{p:?}: {other:?}"),
    };
    assert_eq!(
        path_err(&f.dir.join("no-such-file.so")),
        FileFailure::Os {
            op: "open",
            errno: libc::ENOENT
        }
    );
    // A directory, a device read forever, a FIFO nobody writes to.
    assert_eq!(path_err(&f.dir.join("lib")), FileFailure::NotRegularFile);
    assert_eq!(
        path_err(Path::new("/dev/zero")),
        FileFailure::NotRegularFile
    );
    let fifo = f.dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; a failure (already there) is checked below.
    unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert_eq!(path_err(&fifo), FileFailure::NotRegularFile);
    let text = f.dir.join("a.c");
    assert_eq!(path_err(&text), FileFailure::NotElf);
    assert_eq!(path_err(&f.object), FileFailure::NotLoadable);
    let short = f.dir.join("truncated.so");
    std::fs::write(&short, &std::fs::read(&f.full).unwrap()[..100]).unwrap();
    assert!(matches!(path_err(&short), FileFailure::Malformed(_)));

    let shown = f.full.display().to_string();
    assert_eq!(
        r.resolve(&by_path(&f.full, "no_such_function")),
        Err(ProbeError::SymbolNotInFile {
            path: shown.clone(),
            name: "no_such_function".into()
        })
    );
    // Data is not a function; a function symbol in `.data` is not code.
    assert!(matches!(
        r.resolve(&by_path(&f.full, "fixture_data")),
        Err(ProbeError::SymbolNotInFile { .. })
    ));
    assert!(matches!(
        r.resolve(&by_path(&f.full, "data_func")),
        Err(ProbeError::SymbolNotInCode { ref name, .. }) if name == "data_func"
    ));
    let len = std::fs::metadata(&f.full).unwrap().len();
    for offset in [0, len + 0x1000, u64::MAX] {
        assert_eq!(
            r.resolve(&by_path(&f.full, &format!("{offset:#x}"))),
            Err(ProbeError::NotInCode {
                path: shown.clone(),
                offset
            }),
            "offset {offset:#x} (0: the ELF header, in a read-only segment)"
        );
    }
    // Errors change nothing: the same file still resolves.
    assert!(r.resolve(&by_path(&f.full, "fixture_add")).is_ok());
}

// ---------------------------------------------------------------- the C library

/// An object the loader mapped: path and load bias.
fn loaded_objects() -> Vec<(PathBuf, u64)> {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the Vec passed below, exclusively ours during the
        // iteration; `info` is valid for this call.
        let (out, info) = unsafe { (&mut *data.cast::<Vec<(PathBuf, u64)>>(), &*info) };
        if !info.dlpi_name.is_null() {
            // SAFETY: the loader gives a NUL-terminated name.
            let name = unsafe { CStr::from_ptr(info.dlpi_name) };
            out.push((PathBuf::from(name.to_str().unwrap()), info.dlpi_addr));
        }
        0
    }
    let mut out: Vec<(PathBuf, u64)> = Vec::new();
    // SAFETY: the callback matches dl_iterate_phdr's signature and only
    // touches `out` through the pointer.
    unsafe { libc::dl_iterate_phdr(Some(each), (&mut out as *mut Vec<(PathBuf, u64)>).cast()) };
    out
}

/// The `/proc/self/maps` line that maps `addr`: file offset of `addr` and
/// the inode.
fn mapped_offset(addr: u64) -> (u64, u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let range = it.next().unwrap();
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).unwrap(),
            u64::from_str_radix(hi, 16).unwrap(),
        );
        if (lo..hi).contains(&addr) {
            let _perms = it.next();
            let off = u64::from_str_radix(it.next().unwrap(), 16).unwrap();
            let _dev = it.next();
            let inode: u64 = it.next().unwrap().parse().unwrap();
            return (off + (addr - lo), inode);
        }
    }
    panic!("{addr:#x} is not mapped");
}

#[test]
fn libc_qsort_resolves_through_the_linker_cache_to_the_loaded_file_and_offset() {
    let (libc_path, bias) = loaded_objects()
        .into_iter()
        .find(|(p, _)| p.file_name().is_some_and(|n| n == "libc.so.6"))
        .expect("the C library is loaded");
    // The system's search without LD_LIBRARY_PATH (cargo sets one for
    // tests): the cache comes before the default directories.
    let r = TargetResolver::with_search(LibrarySearch {
        directories: Vec::new(),
        ..LibrarySearch::system()
    });
    let at = r
        .resolve(&UprobeTarget::parse("libc.so.6:qsort").unwrap())
        .unwrap();
    if Path::new("/etc/ld.so.cache").exists() {
        assert_eq!(at.found_by, FoundBy::LdSoCache, "{at:?}");
    } else {
        // A minimal image without `ldconfig`'s cache: the default
        // directories find it, and the cache step goes unchecked here.
        println!("SKIP: no /etc/ld.so.cache on this machine: the cache lookup is not checked");
        assert!(
            matches!(at.found_by, FoundBy::DefaultDirectory(_)),
            "{at:?}"
        );
    }
    // The very file the loader mapped.
    assert_eq!(at.file, file_id(&libc_path), "{at:?} vs {libc_path:?}");

    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
    let qsort = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"qsort".as_ptr()) } as u64;
    assert_ne!(qsort, 0);
    // The loader's view: load bias + the file's virtual address ...
    assert_eq!(bias + at.vaddr, qsort);
    // ... and the kernel's: the mapping's file offset and inode.
    let (offset, inode) = mapped_offset(qsort);
    assert_eq!(offset, at.offset);
    assert_eq!(inode, at.file.inode);

    // Loaded objects (the runtime's list) give the same file, first.
    let loaded: Vec<PathBuf> = loaded_objects().into_iter().map(|o| o.0).collect();
    let via_loaded = TargetResolver::new()
        .with_loaded(loaded)
        .resolve(&UprobeTarget::parse("libc.so.6:qsort").unwrap())
        .unwrap();
    assert_eq!(via_loaded.found_by, FoundBy::Loaded);
    assert_eq!((via_loaded.file, via_loaded.offset), (at.file, at.offset));

    // Past its end, and an IFUNC of the C library.
    let size = at.function.unwrap().size.unwrap();
    assert!(matches!(
        r.resolve(&UprobeTarget::symbol("libc.so.6", "qsort").offset(size)),
        Err(ProbeError::OffsetPastEnd { .. })
    ));
    if cfg!(target_arch = "x86_64") {
        assert!(matches!(
            r.resolve(&UprobeTarget::symbol("libc.so.6", "memcpy")),
            Err(ProbeError::IfuncSymbol { .. })
        ));
    }
}

#[inline(never)]
fn a_marker_function_for_targets(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(5)
}

#[test]
fn rust_functions_of_the_executable_resolve_by_demangled_path() {
    let exe = std::env::current_exe().unwrap();
    let bias = loaded_objects().first().map_or(0, |o| o.1);
    let at = TargetResolver::new()
        .resolve(&UprobeTarget::symbol(
            exe.to_str().unwrap(),
            "uprobe_target::a_marker_function_for_targets",
        ))
        .unwrap();
    let addr = a_marker_function_for_targets as fn(u64) -> u64 as usize as u64;
    assert_eq!(bias + at.vaddr, addr);
    assert_eq!(mapped_offset(addr).0, at.offset);
    assert_eq!(a_marker_function_for_targets(2), 10);
}

#[test]
fn an_opened_file_resolves_many_places_as_resolve_does() {
    fn shared<T: Send + Sync>(_: &T) {}
    let f = fixture();
    let r = isolated().with_directories([f.dir.join("lib")]);
    shared(&r);
    let file = r.open_file("libutfix.so.1").unwrap();
    shared(&file);
    assert_eq!(file.path(), f.full);
    assert_eq!(file.found_by(), &FoundBy::Directory(f.dir.join("lib")));
    assert_eq!(file.file(), file_id(&f.full));
    assert_eq!(file.soname(), Some("libutfix.so.1"));
    for place in [
        "fixture_add",
        "fixture_add+3",
        "vfn@VER_1",
        "call_b",
        "0x1010",
    ] {
        let t = UprobeTarget::parse(&format!("libutfix.so.1:{place}")).unwrap();
        assert_eq!(file.resolve(t.place()), r.resolve(&t), "{place}");
        assert_eq!(file.resolve(t.place()).unwrap().target, t);
    }
    assert!(matches!(
        file.resolve(&TargetPlace::FileOffset(u64::MAX)),
        Err(ProbeError::NotInCode { .. })
    ));
}

/// `TargetFile::key_of` (what batch registration uses: no strings built)
/// finds exactly what `resolve` finds, errors included, for symbols,
/// symbols with an offset, file offsets and bad places of the C library.
#[test]
fn key_of_agrees_with_resolve() {
    let r = TargetResolver::new();
    let file = r.open_file("libc.so.6").unwrap();
    let qsort = r
        .resolve(&UprobeTarget::parse("libc.so.6:qsort").unwrap())
        .unwrap();
    let targets = [
        UprobeTarget::symbol("libc.so.6", "qsort"),
        UprobeTarget::symbol("libc.so.6", "qsort").offset(4),
        UprobeTarget::symbol("libc.so.6", "strlen"),
        UprobeTarget::file_offset("libc.so.6", qsort.offset + 4),
        UprobeTarget::symbol("libc.so.6", "no_such_symbol_here"),
        UprobeTarget::symbol("libc.so.6", "qsort").offset(1 << 40),
        UprobeTarget::file_offset("libc.so.6", 0),
    ];
    for t in &targets {
        let full = file
            .resolve(t.place())
            .map(|r| (r.key(), r.function.map(|f| f.offset)));
        assert_eq!(file.key_of(t.place()), full, "{t}");
    }
}
