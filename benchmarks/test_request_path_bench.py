"""The request path without sockets: parser, volume I/O and one whole session.

Run: .venv/bin/pytest benchmarks/test_request_path_bench.py --benchmark-only
The volume lives in a temporary file (page cache), its key in the in-memory KMS.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from blockcrypt.kms import MemoryCMKStore
from blockcrypt.nbd import (
    NEED_DATA,
    Command,
    Export,
    NBDServerConnection,
    TransmissionFlag,
)
from blockcrypt.server.connection import ClientSession
from blockcrypt.server.daemon import export_for
from blockcrypt.volume.device import Volume
from tests.nbd.wire import request
from tests.server.conftest import make_volume

SIZE = 256 << 20


@pytest.fixture(scope="module", params=[4096, 512], ids=["s4096", "s512"])
def volume(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Volume]:
    store = MemoryCMKStore()
    path = tmp_path_factory.mktemp("bench") / "bench.img"
    make_volume(store, path, SIZE, request.param)
    vol = Volume.attach(str(path), store)
    vol.pwrite(0, os.urandom(SIZE // 4), fua=False)  # some real ciphertext
    yield vol
    vol.close()


def test_parse_4k_read_requests(benchmark) -> None:  # type: ignore[no-untyped-def]
    export = Export("", 1 << 30, TransmissionFlag.HAS_FLAGS)
    blob = b"".join(
        request(Command.READ, (i * 4096) % (1 << 29), 4096, cookie=i)
        for i in range(1000)
    )

    def parse() -> int:
        conn = NBDServerConnection([export], preinit=True)
        conn.receive_data(blob)
        n = 0
        while conn.next_event() is not NEED_DATA:
            n += 1
        return n

    assert benchmark(parse) == 1000
    benchmark.extra_info["requests"] = 1000


@pytest.mark.parametrize("length", [4096, 1 << 20], ids=["4KiB", "1MiB"])
def test_volume_read(benchmark, volume: Volume, length: int) -> None:  # type: ignore[no-untyped-def]
    offset = iter(range(0, SIZE // 4 - length, length))
    benchmark(lambda: volume.pread(next(offset, 0), length))
    benchmark.extra_info["bytes"] = length


@pytest.mark.parametrize("length", [4096, 1 << 20], ids=["4KiB", "1MiB"])
def test_volume_write(benchmark, volume: Volume, length: int) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(length)
    benchmark(lambda: volume.write_owned(SIZE // 2, bytearray(data), False))
    benchmark.extra_info["bytes"] = length


class _SinkTransport(asyncio.Transport):
    """Counts what the session writes; never blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self._closing = False

    def write(self, data) -> None:  # type: ignore[no-untyped-def]
        self.written += len(data)

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self._closing = True

    def get_extra_info(self, name, default=None):  # type: ignore[no-untyped-def]
        return default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


def test_session_inline_4k_reads(benchmark, volume: Volume) -> None:  # type: ignore[no-untyped-def]
    """32 pipelined 4 KiB READs through a whole session, as one input chunk."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    blob = b"".join(request(Command.READ, i * 8192, 4096, cookie=i) for i in range(32))

    async def make() -> tuple[ClientSession, _SinkTransport]:
        session = ClientSession(volume, export_for(volume, ""), None, preinit=True)  # type: ignore[arg-type]
        transport = _SinkTransport()
        session.connection_made(transport)
        return session, transport

    session, transport = loop.run_until_complete(make())
    benchmark(session.data_received, blob)
    assert transport.written >= 32 * (4096 + 16)
    benchmark.extra_info["requests"] = 32
    loop.close()


def test_session_inline_4k_writes(benchmark, volume: Volume) -> None:  # type: ignore[no-untyped-def]
    """32 pipelined 4 KiB WRITEs through a whole session, as one input chunk."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    payload = os.urandom(4096)
    blob = b"".join(
        request(Command.WRITE, i * 8192, 4096, cookie=i, data=payload)
        for i in range(32)
    )

    async def make() -> tuple[ClientSession, _SinkTransport]:
        session = ClientSession(volume, export_for(volume, ""), None, preinit=True)  # type: ignore[arg-type]
        transport = _SinkTransport()
        session.connection_made(transport)
        return session, transport

    session, transport = loop.run_until_complete(make())
    benchmark(session.data_received, blob)
    assert transport.written >= 32 * 16
    benchmark.extra_info["requests"] = 32
    loop.close()
