# Sourced by scripts/test-all (and its self-test, scripts/tests/detect):
# each function answers "is the exact thing a build step needs on this
# machine?" by looking for that file or binary, never for a substring that
# a neighbouring package also matches.

# have_bin NAME: an executable NAME on PATH.
have_bin() { command -v "$1" >/dev/null 2>&1; }

# have_libclang [LDCONFIG_LISTING] [ROOT]: a shared libclang that bindgen
# (through clang-sys) can load: `libclang.so`, `libclang-N.so`,
# `libclang.so.N` or `libclang-N.so.N`, either in the dynamic linker's cache
# or in an LLVM library folder (/usr/lib/llvm-N/lib). `libclang-cpp.so.N`
# (the C++ API, which Debian images ship on their own) is NOT libclang:
# bindgen cannot use it, and a `grep libclang` would match it.
# LDCONFIG_LISTING defaults to the output of `ldconfig -p`; ROOT (default /)
# prefixes the LLVM folders. Both exist so the self-test can present a
# machine that has libclang-cpp and nothing else.
have_libclang() {
  local listing root f base
  if [ $# -ge 1 ]; then listing="$1"; else listing="$(ldconfig -p 2>/dev/null || true)"; fi
  root="${2:-}"
  # ldconfig -p lines look like: "\tlibclang-14.so.1 (libc6,x86-64) => /usr/lib/..."
  if printf '%s\n' "$listing" \
    | grep -Eq '^[[:space:]]*libclang(-[0-9][0-9.]*)?\.so(\.[0-9][0-9.]*)?[[:space:]]'; then
    return 0
  fi
  for f in "$root"/usr/lib/llvm-*/lib/libclang*.so* "$root"/usr/lib/x86_64-linux-gnu/libclang*.so*; do
    [ -e "$f" ] || continue
    base="${f##*/}"
    if printf '%s\n' "$base" | grep -Eq '^libclang(-[0-9][0-9.]*)?\.so(\.[0-9][0-9.]*)?$'; then
      return 0
    fi
  done
  return 1
}

# have_clang_headers [ROOT]: clang's own builtin headers (stddef.h and
# friends), which bindgen's libclang needs to parse unicorn's C headers;
# Debian ships them in libclang-common-N-dev (a dependency of libclang-dev).
have_clang_headers() {
  local root="${1:-}" f
  for f in "$root"/usr/lib/llvm-*/lib/clang/*/include/stddef.h; do
    [ -e "$f" ] && return 0
  done
  return 1
}

# have_c_headers [ROOT]: the C library's development headers (libc6-dev).
have_c_headers() { [ -e "${1:-}/usr/include/stdio.h" ]; }

# have_arm64_std RUSTC STD_DIR: an arm64 standard library in STD_DIR
# (libstd-*.rlib) built by the compiler RUSTC, whose whole `--version` line
# ("rustc 1.96.0 (ac68faa20 2026-05-25) (built from a source tarball)") is
# in the rlib's metadata. A std from another compiler fails every build with
# E0514, and matching the version number alone would take 1.96.0 for 1.96.01.
have_arm64_std() {
  local rustc="$1" dir="$2" std version
  [ -x "$rustc" ] || return 1
  std=$(find "$dir" -maxdepth 1 -name 'libstd-*.rlib' -print -quit 2>/dev/null)
  [ -n "$std" ] || return 1
  version=$("$rustc" --version 2>/dev/null) || return 1
  [ -n "$version" ] || return 1
  grep -aqF -- "$version" "$std"
}

# have_arm64_static_libc [ROOT]: the arm64 C library's static archive
# (libc6-dev-arm64-cross), which statically linked test binaries need.
have_arm64_static_libc() { [ -e "${1:-}/usr/aarch64-linux-gnu/lib/libc.a" ]; }

# have_arm64_dynamic_libc [ROOT]: the arm64 dynamic loader and C library
# of libc6:arm64, which `qemu-aarch64 -L /` runs a dynamic binary with.
have_arm64_dynamic_libc() {
  [ -e "${1:-}/lib/ld-linux-aarch64.so.1" ] && [ -e "${1:-}/lib/aarch64-linux-gnu/libc.so.6" ]
}

# have_foreign_arch ARCH [LISTING]: dpkg knows ARCH as a foreign
# architecture (one name per line, compared whole: "arm64" is not
# "arm64ilp32"). LISTING defaults to `dpkg --print-foreign-architectures`.
have_foreign_arch() {
  local listing
  if [ $# -ge 2 ]; then listing="$2"; else listing="$(dpkg --print-foreign-architectures 2>/dev/null || true)"; fi
  printf '%s\n' "$listing" | grep -qx -- "$1"
}
