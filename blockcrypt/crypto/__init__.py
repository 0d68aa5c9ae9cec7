"""Sector encryption for blockcrypt volumes (AES-256-XTS, dm-crypt plain64)."""

from blockcrypt.crypto.xts import KEY_SIZE, SectorCipher, XTSKey

__all__ = ["KEY_SIZE", "SectorCipher", "XTSKey"]
