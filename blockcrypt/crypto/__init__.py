"""Sector encryption for blockcrypt volumes (AES-256-XTS, dm-crypt plain64).

Two backends give identical bytes: ``FastSectorCipher`` (C over OpenSSL's
libcrypto, built at install time) and the pure-Python reference
``SectorCipher``. ``make_cipher`` picks the fast one when it is built.
"""

from __future__ import annotations

from typing import Protocol

from blockcrypt.crypto.xts import KEY_SIZE, SECTOR_SIZES, Buffer, SectorCipher, XTSKey

__all__ = [
    "FAST_BACKEND_ERROR",
    "KEY_SIZE",
    "SECTOR_SIZES",
    "SectorCipher",
    "SectorCipherProtocol",
    "XTSKey",
    "backend_name",
    "make_cipher",
]

#: Why the C backend is unavailable, or None when it imported.
FAST_BACKEND_ERROR: str | None

try:
    from blockcrypt.crypto.fast import FastSectorCipher
except ImportError as exc:
    FAST_BACKEND_ERROR = (
        f"blockcrypt.crypto._xts_ext did not import ({exc}); reinstall blockcrypt "
        "with a C compiler and libssl-dev present"
    )
else:
    FAST_BACKEND_ERROR = None
    __all__ += ["FastSectorCipher"]


class SectorCipherProtocol(Protocol):
    """What both backends offer; see ``SectorCipher`` for the meaning."""

    sector_size: int

    def tweak(self, sector: int) -> bytes: ...
    def encrypt(self, first_sector: int, data: Buffer) -> bytes: ...
    def decrypt(self, first_sector: int, data: Buffer) -> bytes: ...
    def encrypt_into(self, first_sector: int, src: Buffer, dst: Buffer) -> None: ...
    def decrypt_into(
        self, first_sector: int, src: Buffer, dst: Buffer, *, zero_is_hole: bool = ...
    ) -> None: ...


def make_cipher(
    key: XTSKey, sector_size: int, iv_tweak: int = 0
) -> SectorCipherProtocol:
    """Return a sector cipher: the C backend if it is built, else the reference."""
    if FAST_BACKEND_ERROR is None:
        return FastSectorCipher(key, sector_size, iv_tweak)
    return SectorCipher(key, sector_size, iv_tweak)


def backend_name() -> str:
    """Name the backend ``make_cipher`` uses: "openssl-c" or "python-reference"."""
    return "openssl-c" if FAST_BACKEND_ERROR is None else "python-reference"
