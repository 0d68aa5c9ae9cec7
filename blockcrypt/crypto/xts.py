"""AES-256-XTS sector cipher with the LUKS2 ``aes-xts-plain64`` tweak rule.

Rules of this module:

* It does no I/O, reads no clock and draws no randomness; it is the only module
  that imports ``cryptography.hazmat``.
* Every check runs before any work and raises ``ValueError`` naming the sizes.
* The tweak of a sector is its byte offset inside the data segment divided by
  512, as a 128-bit little-endian integer (dm-crypt ``plain64``). LUKS2 never
  sets dm-crypt's ``iv_large_sectors``, so with 4096-byte sectors consecutive
  sectors get tweaks 0, 8, 16, ... Any other rule would make the data
  unreadable for cryptsetup and the kernel.

XTS gives confidentiality only. A sector can be replaced by an older copy of
itself, or by random bytes, without detection (IEEE 1619, section 5.1).
"""

from __future__ import annotations

import hashlib
import operator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["KEY_SIZE", "SECTOR_SIZES", "SectorCipher", "XTSKey"]

KEY_SIZE = 64
SECTOR_SIZES = (512, 1024, 2048, 4096)
_TWEAK_UNIT = 512

Buffer = bytes | bytearray | memoryview


class XTSKey:
    """A 64-byte AES-256-XTS key (key1 || key2) held in a wipeable buffer.

    Its ``repr`` shows only a short fingerprint, never the bytes.
    """

    __slots__ = ("_buf",)

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(
                f"AES-256-XTS key is {len(key)} bytes; it must be {KEY_SIZE}"
            )
        if bytes(key[:32]) == bytes(key[32:]):
            raise ValueError("AES-256-XTS key halves are identical; generate a new key")
        self._buf = bytearray(key)

    def __bytes__(self) -> bytes:
        if not any(self._buf):
            raise ValueError("XTS key was wiped")
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return f"XTSKey(fingerprint={self.fingerprint()})"

    def fingerprint(self) -> str:
        """Return 8 hex digits of a hash of the key: enough to tell keys apart."""
        return hashlib.sha256(b"blockcrypt-fp\0" + self._buf).hexdigest()[:8]

    def wipe(self) -> None:
        """Zero the buffer (best effort: copies made by libraries survive)."""
        for i in range(len(self._buf)):
            self._buf[i] = 0


class SectorCipher:
    """Encrypt and decrypt whole sectors of one LUKS2 data segment.

    Args:
        key: the volume key.
        sector_size: bytes per XTS data unit: 512, 1024, 2048 or 4096.
        iv_tweak: the segment's ``iv_tweak`` in 512-byte units (normally 0).
    """

    def __init__(self, key: XTSKey, sector_size: int, iv_tweak: int = 0) -> None:
        if sector_size not in SECTOR_SIZES:
            raise ValueError(
                f"sector size is {sector_size}; it must be one of {SECTOR_SIZES}"
            )
        if iv_tweak < 0:
            raise ValueError(f"iv_tweak is {iv_tweak}; it must not be negative")
        self.sector_size = sector_size
        self._algorithm = algorithms.AES(bytes(key))
        self._units_per_sector = sector_size // _TWEAK_UNIT
        self._iv_tweak = iv_tweak

    def tweak(self, sector: int) -> bytes:
        """Return the 16-byte tweak of ``sector`` (counted in sector_size units)."""
        value = sector * self._units_per_sector + self._iv_tweak
        return value.to_bytes(16, "little")

    def encrypt(self, first_sector: int, data: Buffer) -> bytes:
        """Encrypt ``data``, which starts at sector ``first_sector``."""
        return self._apply(first_sector, data, encrypt=True)

    def decrypt(self, first_sector: int, data: Buffer) -> bytes:
        """Decrypt ``data``, which starts at sector ``first_sector``."""
        return self._apply(first_sector, data, encrypt=False)

    def encrypt_into(self, first_sector: int, src: Buffer, dst: Buffer) -> None:
        """Encrypt ``src`` into ``dst``, which may be the same buffer.

        Raises:
            TypeError: src or dst is not a contiguous buffer, or dst is read-only.
            ValueError: the lengths differ or are not whole sectors, or the
                sector numbers fall outside the 128-bit tweak.
        """
        source, target = io_views(src, dst)
        target[:] = self._apply(first_sector, source, encrypt=True, name="src")

    def decrypt_into(
        self, first_sector: int, src: Buffer, dst: Buffer, *, zero_is_hole: bool = False
    ) -> None:
        """Decrypt ``src`` into ``dst``, which may be the same buffer.

        With ``zero_is_hole``, an all-zero source sector is taken for a sector
        never written (a hole in a sparse backing file) and comes out as zeros.
        Raises as ``encrypt_into`` does.
        """
        source, target = io_views(src, dst)
        plain = bytearray(self._apply(first_sector, source, encrypt=False, name="src"))
        if zero_is_hole:
            size = self.sector_size
            zero = bytes(size)
            for start in range(0, len(source), size):
                if source[start : start + size] == zero:
                    plain[start : start + size] = zero
        # The whole result is built before dst changes, so src and dst may
        # overlap in any way.
        target[:] = plain

    def _apply(
        self, first_sector: int, data: Buffer, encrypt: bool, name: str = "data"
    ) -> bytes:
        size = self.sector_size
        view = memoryview(data).cast("B")
        first_tweak = check_request(
            first_sector, len(view), size, self._iv_tweak, name=name
        )
        if first_tweak is None:
            return b""

        out = bytearray(len(view))
        step = self._units_per_sector
        for i in range(len(view) // size):
            tweak = (first_tweak + i * step).to_bytes(16, "little")
            cipher = Cipher(self._algorithm, modes.XTS(tweak))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            out[i * size : (i + 1) * size] = ctx.update(view[i * size : (i + 1) * size])
        return bytes(out)


def check_request(
    first_sector: int, nbytes: int, sector_size: int, iv_tweak: int, *, name: str
) -> int | None:
    """Check a request of ``nbytes`` starting at ``first_sector``.

    Both backends run these checks, so they refuse the same requests with the
    same messages. Returns the tweak of the first sector, or None for an empty
    request.
    """
    first_sector = operator.index(first_sector)
    if nbytes % sector_size:
        raise ValueError(
            f"{name} is {nbytes} bytes; it must be a multiple of the "
            f"{sector_size}-byte sector size"
        )
    if first_sector < 0:
        raise ValueError(f"sector number is {first_sector}; it must be >= 0")
    if not nbytes:
        # No sectors: without this, sector 0 would give last == -1 below.
        return None
    units = sector_size // _TWEAK_UNIT
    last = first_sector + nbytes // sector_size - 1
    if (last * units + iv_tweak) >> 128:
        raise ValueError(f"sector number {last} overflows the 128-bit tweak")
    return first_sector * units + iv_tweak


def io_views(src: Buffer, dst: Buffer) -> tuple[memoryview, memoryview]:
    """Return flat byte views of ``src`` and a writable ``dst`` of equal size."""
    source = _byte_view(src, "src")
    target = _byte_view(dst, "dst")
    if target.readonly:
        raise TypeError("dst is read-only; pass a writable buffer such as a bytearray")
    if len(source) != len(target):
        raise ValueError(
            f"src is {len(source)} bytes but dst is {len(target)}; "
            "they must be the same length"
        )
    return source, target


def _byte_view(buf: Buffer, name: str) -> memoryview:
    try:
        view = memoryview(buf)
    except TypeError:
        raise TypeError(
            f"{name} is a {type(buf).__name__}; it must support the buffer "
            "protocol (bytes, bytearray, memoryview)"
        ) from None
    if not view.c_contiguous:
        raise TypeError(f"{name} is not C-contiguous; pass a contiguous buffer")
    return view.cast("B")
