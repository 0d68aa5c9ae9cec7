"""AES-256-XTS sector cipher that runs a whole request in one call into C.

Rules of this module:

* It gives the same bytes as ``xts.SectorCipher`` and refuses the same
  requests with the same messages: both run ``xts.check_request``. Every check
  happens here, before the C call; ``_xts.c`` trusts its arguments.
* The C code (``_xts.c``, built by ``_xts_build.py`` at install time) loops
  over the sectors with OpenSSL's EVP AES-256-XTS, setting only the IV per
  sector. cffi releases the GIL around every call into an API-mode module, so
  threads that share one cipher run in parallel. Each call borrows a private
  pair of EVP contexts from a pool: a context must not be used by two threads
  at once.
* The key reaches OpenSSL once, straight from the ``XTSKey`` buffer; no
  Python copy of it is made. ``close()`` frees the contexts, which wipes the
  key schedules they hold.

Importing this module raises ImportError when the extension is not built;
``blockcrypt.crypto.make_cipher`` then falls back to the reference.
"""

from __future__ import annotations

import operator
import threading
from typing import Any

from blockcrypt.crypto._xts_ext import ffi, lib
from blockcrypt.crypto.xts import (
    SECTOR_SIZES,
    Buffer,
    XTSKey,
    check_request,
    io_views,
)
from blockcrypt.errors import BlockcryptError

__all__ = ["FastSectorCipher"]

_TWEAK_UNIT = 512
_LOW_64 = (1 << 64) - 1
# encrypt() and decrypt() keep an output buffer up to this size per thread.
_SCRATCH_LIMIT = 4 << 20


class FastSectorCipher:
    """Encrypt and decrypt whole sectors of one LUKS2 data segment, in C.

    Args:
        key: the volume key.
        sector_size: bytes per XTS data unit: 512, 1024, 2048 or 4096.
        iv_tweak: the segment's ``iv_tweak`` in 512-byte units (normally 0).

    Raises:
        TypeError: key is not an XTSKey.
        ValueError: bad sector size, negative iv_tweak, or a wiped key.
        BlockcryptError: OpenSSL could not set up the cipher.
    """

    def __init__(self, key: XTSKey, sector_size: int, iv_tweak: int = 0) -> None:
        self._closed = True  # until the template handle exists
        if not isinstance(key, XTSKey):
            raise TypeError(f"key is a {type(key).__name__}; it must be an XTSKey")
        if sector_size not in SECTOR_SIZES:
            raise ValueError(
                f"sector size is {sector_size}; it must be one of {SECTOR_SIZES}"
            )
        iv_tweak = operator.index(iv_tweak)
        if iv_tweak < 0:
            raise ValueError(f"iv_tweak is {iv_tweak}; it must not be negative")
        # XTSKey keeps its bytes in a bytearray; reading it in place avoids an
        # immutable (unwipeable) copy. The slot is private to this package.
        raw = key._buf
        if not any(raw):
            raise ValueError("XTS key was wiped")

        self.sector_size = sector_size
        self._units_per_sector = sector_size // _TWEAK_UNIT
        self._iv_tweak = iv_tweak
        self._lock = threading.Lock()
        # The template is never used to encrypt, only copied for each thread,
        # so copying it never races with a call in progress.
        self._template = _new_handle(lib.bc_xts_new(ffi.from_buffer(raw)))
        self._spare: list[_Worker] = []
        self._closed = False

    def tweak(self, sector: int) -> bytes:
        """Return the 16-byte tweak of ``sector`` (counted in sector_size units)."""
        value = sector * self._units_per_sector + self._iv_tweak
        return value.to_bytes(16, "little")

    def encrypt(self, first_sector: int, data: Buffer) -> bytes:
        """Encrypt ``data``, which starts at sector ``first_sector``."""
        return self._to_bytes(first_sector, data, encrypt=True)

    def decrypt(self, first_sector: int, data: Buffer) -> bytes:
        """Decrypt ``data``, which starts at sector ``first_sector``."""
        return self._to_bytes(first_sector, data, encrypt=False)

    def encrypt_into(self, first_sector: int, src: Buffer, dst: Buffer) -> None:
        """Encrypt ``src`` into ``dst``, which may be the same buffer.

        Raises:
            TypeError: src or dst is not a contiguous buffer, or dst is read-only.
            ValueError: the lengths differ or are not whole sectors, the sector
                numbers fall outside the 128-bit tweak, or the cipher is closed.
        """
        self._into(first_sector, src, dst, encrypt=True, zero_is_hole=False)

    def decrypt_into(
        self, first_sector: int, src: Buffer, dst: Buffer, *, zero_is_hole: bool = False
    ) -> None:
        """Decrypt ``src`` into ``dst``, which may be the same buffer.

        With ``zero_is_hole``, an all-zero source sector is taken for a sector
        never written (a hole in a sparse backing file) and comes out as zeros.
        Raises as ``encrypt_into`` does.
        """
        self._into(first_sector, src, dst, encrypt=False, zero_is_hole=zero_is_hole)

    def close(self) -> None:
        """Free the OpenSSL contexts. Calls after this raise ValueError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = [self._template, *(w.handle for w in self._spare)]
            self._spare = []
        for handle in handles:
            ffi.release(handle)

    def __enter__(self) -> FastSectorCipher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # __init__ may have failed before the lock existed.
        if not getattr(self, "_closed", True):
            self.close()

    def _check(self, first_sector: int, source: memoryview, name: str) -> int | None:
        tweak = check_request(
            first_sector, len(source), self.sector_size, self._iv_tweak, name=name
        )
        if self._closed:
            raise ValueError("cipher is closed; make a new one")
        return tweak

    def _into(
        self,
        first_sector: int,
        src: Buffer,
        dst: Buffer,
        *,
        encrypt: bool,
        zero_is_hole: bool,
    ) -> None:
        if src is dst and type(dst) is bytearray:
            # In place on a bytearray, the server's case for every request:
            # it is flat and writable, so the generic view checks are moot.
            source = target = memoryview(dst)
        else:
            source, target = io_views(src, dst)
        tweak = self._check(first_sector, source, "src")
        if tweak is None:
            return

        worker = self._borrow()
        try:
            self._call(worker, encrypt, source, target, tweak, zero_is_hole)
        finally:
            self._give_back(worker)

    def _to_bytes(self, first_sector: int, data: Buffer, *, encrypt: bool) -> bytes:
        source = memoryview(data).cast("B")
        tweak = self._check(first_sector, source, "data")
        if tweak is None:
            return b""

        # Work in the worker's own buffer, then copy out once. A new output
        # buffer per call costs more than the cipher for 1 MiB requests:
        # glibc hands freed blocks of that size back to the kernel, so each
        # call pays page faults to get them again.
        worker = self._borrow()
        try:
            if len(worker.scratch) < len(source):
                worker.scratch = bytearray(len(source))
            out = memoryview(worker.scratch)[: len(source)]
            self._call(worker, encrypt, source, out, tweak, False)
            return bytes(out)
        finally:
            if len(worker.scratch) > _SCRATCH_LIMIT:
                worker.scratch = bytearray()
            self._give_back(worker)

    def _call(
        self,
        worker: _Worker,
        encrypt: bool,
        source: memoryview,
        target: memoryview,
        tweak: int,
        zero_is_hole: bool,
    ) -> None:
        dst_ptr = ffi.from_buffer("unsigned char[]", target, require_writable=True)
        if source.obj is target.obj and source.nbytes == len(source.obj):  # type: ignore[arg-type]
            src_ptr = dst_ptr  # in place on one whole buffer: the common case
        else:
            src_ptr = ffi.from_buffer("unsigned char[]", source)
        if src_ptr is not dst_ptr and _overlap_differs(src_ptr, dst_ptr, len(source)):
            # The C loop handles exact in-place work only; a shifted overlap
            # would read sectors it has already overwritten.
            src_ptr = ffi.from_buffer("unsigned char[]", bytes(source))

        status = lib.bc_xts_run(
            worker.handle,
            int(encrypt),
            src_ptr,
            dst_ptr,
            len(source) // self.sector_size,
            self.sector_size,
            tweak & _LOW_64,
            tweak >> 64,
            self._units_per_sector,
            int(bool(zero_is_hole)),
        )
        if status != 0:
            raise BlockcryptError(
                f"OpenSSL AES-256-XTS failed on a {len(source)}-byte request; "
                "the output buffer holds partial results"
            )

    def _borrow(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise ValueError("cipher is closed; make a new one")
            if self._spare:
                return self._spare.pop()
            # Copy under the lock so that close() cannot free the template
            # while it is being read.
            return _Worker(_new_handle(lib.bc_xts_dup(self._template)))

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._spare.append(worker)
                return
        ffi.release(worker.handle)


class _Worker:
    """One thread's EVP context pair, and a buffer it reuses for output."""

    __slots__ = ("handle", "scratch")

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.scratch = bytearray()


def _new_handle(handle: Any) -> Any:
    if handle == ffi.NULL:
        raise BlockcryptError(
            "OpenSSL could not create an AES-256-XTS context; check that "
            "libcrypto provides aes-256-xts and that memory is available"
        )
    return ffi.gc(handle, lib.bc_xts_free)


def _overlap_differs(a: Any, b: Any, length: int) -> bool:
    """Whether two buffers of ``length`` bytes overlap without being the same."""
    start_a = int(ffi.cast("uintptr_t", a))
    start_b = int(ffi.cast("uintptr_t", b))
    return start_a != start_b and abs(start_a - start_b) < length
