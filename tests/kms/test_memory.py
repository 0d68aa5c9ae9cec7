"""In-memory backend specifics: scripted randomness and the AES-GCM wire format."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from blockcrypt.errors import KMSError
from blockcrypt.kms import MemoryCMKStore, encryption_context

VOLUME = "6f1c0a8e-5b9d-4c2a-9e3f-0a1b2c3d4e5f"


def scripted(chunks: list[bytes]) -> Callable[[int], bytes]:
    """A random source that hands out ``chunks`` in order, checking sizes."""
    source: Iterator[bytes] = iter(chunks)

    def random_bytes(n: int) -> bytes:
        chunk = next(source)
        assert len(chunk) == n
        return chunk

    return random_bytes


CMK = bytes(range(32))
DEK = bytes(range(64))
IV = bytes(range(100, 112))


def test_wrap_is_plain_aes_gcm_with_context_as_aad() -> None:
    store = MemoryCMKStore(scripted([b"\x01" * 8, CMK, DEK, IV]))
    info = store.create_key("kat")
    context = encryption_context(VOLUME, 1, info.key_id)

    data_key = store.create_datakey("kat", context)

    assert info.key_id == "cmk-0101010101010101"
    assert data_key.wrapped.iv == IV
    assert data_key.wrapped.ciphertext == AESGCM(CMK).encrypt(IV, DEK, context)
    assert bytes(data_key.plaintext) == DEK


def test_equal_halves_are_drawn_again() -> None:
    store = MemoryCMKStore(scripted([b"\x01" * 8, CMK, b"\x07" * 64, DEK, IV]))
    info = store.create_key("redraw")

    data_key = store.create_datakey(
        "redraw", encryption_context(VOLUME, 1, info.key_id)
    )

    assert bytes(data_key.plaintext) == DEK


def test_broken_random_source_is_refused() -> None:
    store = MemoryCMKStore(scripted([b"\x01" * 8, CMK] + [b"\x07" * 64] * 3))
    info = store.create_key("broken")

    with pytest.raises(KMSError, match="equal halves three times"):
        store.create_datakey("broken", encryption_context(VOLUME, 1, info.key_id))


def test_closed_store_refuses_calls() -> None:
    store = MemoryCMKStore()
    store.create_key("gone")
    store.close()

    with pytest.raises(KMSError, match="closed"):
        store.describe_key("gone")
