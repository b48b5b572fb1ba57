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
