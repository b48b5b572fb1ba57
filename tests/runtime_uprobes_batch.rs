//! Batched live uprobes (issue 12's attach at scale): `register_many` on
//! every function of a fixture library, before and after it is loaded,
//! counts each call exactly; bad items of a batch fail alone with nothing
//! changed for them; `unregister_many` restores every byte (and a batch
//! naming one unknown pair removes nothing); `unregister_nosync` takes the
//! breakpoint out at once and `commit` is the grace period.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod dl_support;

use dl_support::{adder as func, snapshot, Lib};
use rcu_registry::probes::runtime::LiveUprobes;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeKey, UprobeTarget};
use rcu_registry::probes::ProbeError;

/// Functions in the fixture.
const N: usize = 64;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn live() -> &'static LiveUprobes {
    LiveUprobes::global().expect("live uprobes in a dynamically linked test binary")
}

/// `lib<name>.so` with `int fI(int x)` returning `x + I` for I in 0..N.
fn fixture(name: &str) -> PathBuf {
    dl_support::build_so(
        "uprobes_batch",
        &format!("lib{name}.so"),
        &dl_support::adders_source(N),
        &[],
    )
}

fn targets(so: &std::path::Path) -> Vec<UprobeTarget> {
    (0..N)
        .map(|i| UprobeTarget::symbol(so.to_str().unwrap(), format!("f{i}")))
        .collect()
}

/// A consumer counting each hit in `counts[first argument]`.
fn per_arg(counts: &Arc<Vec<AtomicU64>>) -> Consumer {
    let c = Arc::clone(counts);
    Consumer::builder()
        .handler(move |_hit, regs| {
            if let Some(slot) = regs.arg(0).and_then(|a| c.get(a as usize)) {
                slot.fetch_add(1, Ordering::SeqCst);
            }
            ConsumerAction::Continue
        })
        .build()
}

fn counters() -> Arc<Vec<AtomicU64>> {
    Arc::new((0..N).map(|_| AtomicU64::new(0)).collect())
}

fn code_at(addr: u64, n: usize) -> Vec<u8> {
    // SAFETY: `addr` is mapped code of a library the caller holds open.
    unsafe { std::slice::from_raw_parts(addr as *const u8, n) }.to_vec()
}

/// Calls `fI(I)` `I % 5 + 1` times for each I; the expected counts.
fn call_each(lib: &Lib) -> Vec<u64> {
    dl_support::call_each(lib, N, 5)
}

#[test]
fn a_batch_on_a_loaded_library_counts_each_call_exactly_and_comes_out_byte_for_byte() {
    let _g = serial();
    let so = fixture("batchloaded");
    let lib = Lib::open(&so);
    let file = std::fs::read(&so).unwrap();
    let counts = counters();
    let c = per_arg(&counts);
    let before = live().registry().len();
    let resolved: Vec<_> = live()
        .register_many(&targets(&so), &c)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(live().registry().len(), before + N);
    for i in 0..N {
        assert_eq!(code_at(func(&lib, i) as usize as u64, 1), vec![0xcc]);
    }
    let want = call_each(&lib);
    assert_eq!(snapshot(&counts), want);
    // One batch out: every byte is the file's again, nothing counts.
    let pairs: Vec<(UprobeKey, &Consumer)> = resolved.iter().map(|k| (*k, &c)).collect();
    assert_eq!(live().unregister_many(&pairs), Ok(N));
    assert_eq!(live().registry().len(), before);
    for (i, k) in resolved.iter().enumerate() {
        let off = k.offset as usize;
        assert_eq!(
            code_at(func(&lib, i) as usize as u64, 8),
            file[off..off + 8].to_vec(),
            "f{i}"
        );
    }
    call_each(&lib);
    assert_eq!(snapshot(&counts), want);
    lib.close();
}

#[test]
fn a_batch_registered_before_dlopen_is_installed_at_the_load() {
    let _g = serial();
    let so = fixture("batchpending");
    let counts = counters();
    let c = per_arg(&counts);
    let errors = live().stats().install_errors;
    let resolved: Vec<_> = live()
        .register_many(&targets(&so), &c)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(!dl_support::is_mapped(&so));
    for _round in 0..3 {
        let lib = Lib::open(&so);
        let before = snapshot(&counts);
        let want = call_each(&lib);
        let got: Vec<u64> = snapshot(&counts)
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect();
        assert_eq!(got, want);
        lib.close();
    }
    assert_eq!(
        live().stats().install_errors,
        errors,
        "the last install error: {:?}",
        live().last_install_error()
    );
    let pairs: Vec<(UprobeKey, &Consumer)> = resolved.iter().map(|k| (*k, &c)).collect();
    assert_eq!(live().unregister_many(&pairs), Ok(N));
}

#[test]
fn bad_items_of_a_batch_fail_alone_and_change_nothing_for_themselves() {
    let _g = serial();
    let so = fixture("batchbad");
    let lib = Lib::open(&so);
    let path = so.to_str().unwrap();
    let counts = counters();
    let c = per_arg(&counts);
    let inside = func(&lib, 2) as usize as u64;
    // Its first instruction (f3, probed below, may follow right after).
    let bytes_f2 = code_at(inside, 3);
    let before = live().registry().len();
    let batch = [
        UprobeTarget::symbol(path, "f1"),
        UprobeTarget::symbol(path, "no_such_function"),
        UprobeTarget::symbol(path, "f1"),
        // Inside `f2`'s first instruction (3 or 4 bytes: `lea`, `endbr64`).
        UprobeTarget::symbol(path, "f2").offset(1),
        UprobeTarget::symbol("/no/such/library.so", "f"),
        UprobeTarget::symbol(path, "f3"),
    ];
    let r = live().register_many(&batch, &c);
    assert_eq!(r.len(), batch.len());
    assert!(r[0].is_ok());
    assert!(
        matches!(r[1], Err(ProbeError::SymbolNotInFile { .. })),
        "{:?}",
        r[1]
    );
    assert!(
        matches!(r[2], Err(ProbeError::AlreadyRegistered { .. })),
        "{:?}",
        r[2]
    );
    assert!(
        matches!(r[3], Err(ProbeError::NotOnInstructionBoundary { .. })),
        "{:?}",
        r[3]
    );
    assert!(
        matches!(r[4], Err(ProbeError::TargetFile { .. })),
        "{:?}",
        r[4]
    );
    assert!(r[5].is_ok());
    // Only the two good ones registered; `f2` is untouched.
    assert_eq!(live().registry().len(), before + 2);
    assert_eq!(code_at(inside, 3), bytes_f2);
    for i in [1, 2, 3] {
        func(&lib, i)(i as i32);
    }
    assert_eq!(counts[1].load(Ordering::SeqCst), 1);
    assert_eq!(counts[2].load(Ordering::SeqCst), 0);
    assert_eq!(counts[3].load(Ordering::SeqCst), 1);
    let keys: Vec<UprobeKey> = [&r[0], &r[5]]
        .iter()
        .map(|r| *r.as_ref().unwrap())
        .collect();

    // A removal batch naming one pair that is not registered (and one named
    // twice) removes nothing.
    let stranger = per_arg(&counts);
    let bad = [(keys[0], &c), (keys[1], &stranger)];
    assert!(matches!(
        live().unregister_many(&bad),
        Err(ProbeError::UnknownProbe { .. })
    ));
    let twice = [(keys[0], &c), (keys[0], &c)];
    assert!(matches!(
        live().unregister_many(&twice),
        Err(ProbeError::UnknownProbe { .. })
    ));
    assert_eq!(live().registry().len(), before + 2);
    func(&lib, 1)(1);
    assert_eq!(counts[1].load(Ordering::SeqCst), 2);
    assert_eq!(code_at(func(&lib, 1) as usize as u64, 1), vec![0xcc]);
    let good = [(keys[0], &c), (keys[1], &c)];
    assert_eq!(live().unregister_many(&good), Ok(2));
    assert_eq!(live().registry().len(), before);
    lib.close();
}

#[test]
fn unregister_nosync_takes_the_breakpoint_out_at_once_and_commit_ends_the_handlers() {
    let _g = serial();
    let so = fixture("batchnosync");
    let lib = Lib::open(&so);
    let file = std::fs::read(&so).unwrap();
    let counts = counters();
    let c = per_arg(&counts);
    let r = live()
        .register(&UprobeTarget::symbol(so.to_str().unwrap(), "f7"), &c)
        .unwrap();
    let f = func(&lib, 7);
    f(7);
    assert_eq!(counts[7].load(Ordering::SeqCst), 1);
    live().unregister_nosync(r.key(), &c).unwrap();
    let off = r.offset as usize;
    assert_eq!(code_at(f as usize as u64, 8), file[off..off + 8].to_vec());
    // Pending: not registered any more (a second removal is refused).
    assert!(matches!(
        live().unregister_nosync(r.key(), &c),
        Err(ProbeError::UnknownProbe { .. })
    ));
    live().commit();
    f(7);
    assert_eq!(counts[7].load(Ordering::SeqCst), 1);
    lib.close();
}

/// An install that fails inside the loader is counted and kept for
/// [`LiveUprobes::last_install_error`], typed, and changes nothing: the
/// library's file is rewritten in place (as an upgrade that writes over
/// the same file would) between a pending registration, which read the
/// instruction from the file, and the `dlopen`, so the loaded code is not
/// the instruction the uprobe was made for. No breakpoint is written, the
/// code runs as the file now has it, no handler runs, and the uprobe can be
/// unregistered as usual.
#[test]
fn an_install_that_fails_at_the_load_is_kept_as_the_last_install_error() {
    let _g = serial();
    // g(x) = x + 2: mov eax, edi (89 f8); add eax, 2; ret.
    let so = dl_support::build_asm_so(
        "uprobes_batch",
        "libbatchrewritten.so",
        ".text\n.globl g\n.type g,@function\ng:\n movl %edi, %eax\n addl $2, %eax\n ret\n\
         .size g, . - g\n",
    );
    let counts = counters();
    let c = per_arg(&counts);
    assert!(!dl_support::is_mapped(&so));
    let key = live()
        .register(&UprobeTarget::symbol(so.to_str().unwrap(), "g"), &c)
        .unwrap()
        .key();
    // The file's first instruction of g becomes xor eax, eax (31 c0): g(x) = 2.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&so).unwrap();
        f.seek(SeekFrom::Start(key.offset)).unwrap();
        f.write_all(&[0x31, 0xc0]).unwrap();
    }
    let errors = live().stats().install_errors;
    let lib = Lib::open(&so);
    assert_eq!(
        live().stats().install_errors,
        errors + 1,
        "the failed install is counted"
    );
    match live().last_install_error() {
        Some(ProbeError::AlreadyPatched {
            expected, found, ..
        }) => {
            assert_eq!(
                &expected.as_slice()[..2],
                &[0x89, 0xf8],
                "what the uprobe was made for"
            );
            assert_eq!(
                &found.as_slice()[..2],
                &[0x31, 0xc0],
                "what the loader mapped"
            );
        }
        other => panic!("the last install error: {other:?}"),
    }
    let g = lib.func(c"g");
    // SAFETY: code the address points at: the loaded g, unpatched.
    let text = unsafe { std::slice::from_raw_parts(g as usize as *const u8, 6) };
    assert_eq!(
        text,
        [0x31, 0xc0, 0x83, 0xc0, 0x02, 0xc3],
        "the file's bytes, no breakpoint"
    );
    assert_eq!(g(5), 2, "the code as the file now has it");
    assert_eq!(counts[5].load(Ordering::SeqCst), 0, "no handler ran");
    lib.close();
    live().unregister(key, &c).unwrap();
}
