"""cffi builder for ``blockcrypt.crypto._xts_ext`` (API mode, out of line).

setup.py names ``ffibuilder`` in ``cffi_modules``; the extension is compiled
at install time against the system libcrypto (Debian: ``libssl-dev``). The C
code lives in ``_xts.c`` next to this file. Build it by hand with
``python blockcrypt/crypto/_xts_build.py`` from the repository root.
"""

from __future__ import annotations

from cffi import FFI  # type: ignore[import-untyped]

# Relative to the project root: setuptools runs cffi_modules from there and
# wants relative source paths, which also puts _xts.c into an sdist.
C_SOURCE = "blockcrypt/crypto/_xts.c"

DECLARATIONS = """
struct bc_xts;
struct bc_xts *bc_xts_new(const unsigned char *key);
struct bc_xts *bc_xts_dup(const struct bc_xts *src);
void bc_xts_free(struct bc_xts *h);
int bc_xts_run(struct bc_xts *h, int encrypt, const unsigned char *src,
               unsigned char *dst, size_t sectors, size_t sector_size,
               uint64_t tweak_lo, uint64_t tweak_hi, uint64_t step,
               int zero_is_hole);
"""

ffibuilder = FFI()
ffibuilder.cdef(DECLARATIONS)
ffibuilder.set_source(
    "blockcrypt.crypto._xts_ext",
    "#include <stddef.h>\n#include <stdint.h>\n" + DECLARATIONS,
    sources=[C_SOURCE],
    libraries=["crypto"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c99"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=".", verbose=True)
