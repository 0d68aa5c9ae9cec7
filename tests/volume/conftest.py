"""Fixtures for the volume tests: a data key, a KMS token and a volume factory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockcrypt.crypto.xts import XTSKey
from blockcrypt.volume.luks2 import KMSToken, LUKS2Header, format_volume

# Fixed test keys: the halves differ, and the two keys differ.
DEK_BYTES = bytes(range(64))
OTHER_DEK_BYTES = bytes(range(64, 128))
VOLUME_UUID = "0b0e6f0a-3c1d-4f5e-9a7b-1c2d3e4f5a6b"

MakeVolume = Callable[..., tuple[Path, LUKS2Header]]
OpenFd = Callable[..., int]


@pytest.fixture
def dek() -> XTSKey:
    return XTSKey(DEK_BYTES)


@pytest.fixture
def other_dek() -> XTSKey:
    return XTSKey(OTHER_DEK_BYTES)


@pytest.fixture
def token() -> KMSToken:
    return KMSToken(
        key_id="cmk-0001",
        mechanism="AES-256-GCM",
        iv=bytes(range(12)),
        wrapped_dek=bytes(range(100, 180)),
        context={"volume_uuid": VOLUME_UUID, "format_version": 1, "key_id": "cmk-0001"},
    )


@pytest.fixture
def make_volume(tmp_path: Path, dek: XTSKey, token: KMSToken) -> MakeVolume:
    """Return a factory that formats a fresh volume under tmp_path."""
    counter = iter(range(1_000_000))

    def make(
        *,
        sector_size: int = 4096,
        size: int = 1 << 20,
        label: str = "",
        volume_token: KMSToken | None = None,
    ) -> tuple[Path, LUKS2Header]:
        path = tmp_path / f"vol{next(counter)}.img"
        header = format_volume(
            path,
            size=size,
            sector_size=sector_size,
            volume_uuid=VOLUME_UUID,
            dek=dek,
            token=volume_token or token,
            label=label,
        )
        return path, header

    return make


@pytest.fixture
def open_fd() -> Iterator[OpenFd]:
    """Open files for one test and close them when it ends."""
    fds: list[int] = []

    def opener(path: Path, flags: int = os.O_RDWR) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC)
        fds.append(fd)
        return fd

    yield opener
    for fd in fds:
        os.close(fd)
