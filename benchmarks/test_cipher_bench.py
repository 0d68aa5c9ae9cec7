"""Sector-cipher throughput. Run: .venv/bin/pytest benchmarks --benchmark-only

Compare the results with `openssl speed -evp aes-256-xts` on the same machine.
"""

from __future__ import annotations

import os

import pytest

from blockcrypt.crypto import SectorCipher, XTSKey

REQUEST_SIZES = [4096, 65536, 1 << 20]


@pytest.mark.parametrize("sector_size", [512, 4096])
@pytest.mark.parametrize("request_size", REQUEST_SIZES, ids=lambda n: f"{n // 1024}KiB")
@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
def test_reference_cipher(benchmark, sector_size: int, request_size: int, direction: str) -> None:  # type: ignore[no-untyped-def]
    cipher = SectorCipher(XTSKey(os.urandom(64)), sector_size)
    data = os.urandom(request_size)
    func = getattr(cipher, direction)
    benchmark.extra_info["bytes"] = request_size
    benchmark(func, 12345, data)
