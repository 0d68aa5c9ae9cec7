"""Sector-cipher throughput. Run: .venv/bin/pytest benchmarks --benchmark-only

Both backends, 512- and 4096-byte sectors, 4 KiB to 1 MiB requests. The
``*_into`` rows work in place on one buffer, as the server does; the others
return a new bytes object. To quote a ratio against OpenSSL itself, run
benchmarks/openssl_speed.py, which measures both the same way in one run.
"""

from __future__ import annotations

import os

import pytest

from blockcrypt.crypto import FAST_BACKEND_ERROR, SectorCipher, XTSKey

REQUEST_SIZES = [4096, 65536, 1 << 20]
BACKENDS = ["python-reference", "openssl-c"]


def make(backend: str, sector_size: int) -> object:
    key = XTSKey(os.urandom(64))
    if backend == "python-reference":
        return SectorCipher(key, sector_size)
    if FAST_BACKEND_ERROR is not None:
        pytest.skip(f"C backend not built: {FAST_BACKEND_ERROR}")
    from blockcrypt.crypto.fast import FastSectorCipher

    return FastSectorCipher(key, sector_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sector_size", [512, 4096])
@pytest.mark.parametrize("request_size", REQUEST_SIZES, ids=lambda n: f"{n // 1024}KiB")
@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
def test_cipher_returning_bytes(  # type: ignore[no-untyped-def]
    benchmark, backend: str, sector_size: int, request_size: int, direction: str
) -> None:
    func = getattr(make(backend, sector_size), direction)
    data = os.urandom(request_size)
    benchmark.extra_info["bytes"] = request_size
    benchmark(func, 12345, data)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sector_size", [512, 4096])
@pytest.mark.parametrize("request_size", REQUEST_SIZES, ids=lambda n: f"{n // 1024}KiB")
@pytest.mark.parametrize("direction", ["encrypt_into", "decrypt_into"])
def test_cipher_in_place(  # type: ignore[no-untyped-def]
    benchmark, backend: str, sector_size: int, request_size: int, direction: str
) -> None:
    func = getattr(make(backend, sector_size), direction)
    buf = bytearray(os.urandom(request_size))
    benchmark.extra_info["bytes"] = request_size
    benchmark(func, 12345, buf, buf)
