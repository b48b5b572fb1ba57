//! Compiles the liburcu-memb shim when Debian's liburcu-dev header is
//! installed, and sets `cfg(have_liburcu)`; otherwise builds the crate
//! without the peer (the benchmark then skips it).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(have_liburcu)");
    println!("cargo::rerun-if-changed=csrc/urcu_memb_shim.c");
    println!("cargo::rerun-if-env-changed=BENCH_PEERS_NO_LIBURCU");
    if std::env::var_os("BENCH_PEERS_NO_LIBURCU").is_some() {
        println!("cargo::warning=liburcu peer disabled by BENCH_PEERS_NO_LIBURCU");
        return;
    }
    // `try_compile` fails cleanly when <urcu/urcu-memb.h> is missing, which
    // is exactly the "not installed" case.
    let built = cc::Build::new()
        .file("csrc/urcu_memb_shim.c")
        .opt_level(2)
        .warnings(true)
        .cargo_warnings(false)
        .try_compile("bench_peers_urcu_shim");
    match built {
        Ok(()) => {
            println!("cargo::rustc-link-lib=dylib=urcu-memb");
            println!("cargo::rustc-cfg=have_liburcu");
        }
        Err(e) => {
            println!(
                "cargo::warning=liburcu-memb peer skipped (install liburcu-dev to enable it): {e}"
            );
        }
    }
}
