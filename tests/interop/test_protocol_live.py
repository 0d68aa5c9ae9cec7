"""Bad and tricky requests over a real socket: the connection must live on."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.conftest import CLI, Server, start_server
from tests.interop.rawclient import RawClient

pytestmark = pytest.mark.interop

EINVAL, ENOSPC, EPERM, ENOTSUP = 22, 28, 1, 95
SIZE = 64 * 1024 * 1024


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize(
    "kind,offset,length,flags,error",
    [
        (0, SIZE, 1, 0, EINVAL),  # read past the end
        (0, 0, 0, 0, EINVAL),  # zero length
        (0, 0, 1, 0x40, EINVAL),  # unknown flag
        (77, 0, 1, 0, EINVAL),  # unknown command
        (5, 0, 1, 0, EINVAL),  # CACHE, not advertised
        (3, 5, 0, 0, EINVAL),  # FLUSH with an offset
        (6, SIZE - 1, 2, 0, ENOSPC),  # WRITE_ZEROES past the end
    ],
)
def test_bad_request_error_reply_then_connection_works(
    server: Server, kind: int, offset: int, length: int, flags: int, error: int
) -> None:
    c = RawClient(str(server.socket))
    try:
        c.send(kind, offset, length, cookie=0xABCDEF0123456789, flags=flags)
        assert c.reply() == (error, 0xABCDEF0123456789, b"")
        assert c.write(0, b"still alive", cookie=2) == 0
        assert c.read(0, 11, cookie=3) == b"still alive"
    finally:
        c.close()


def test_write_past_end_consumes_payload(server: Server) -> None:
    c = RawClient(str(server.socket))
    try:
        assert c.write(SIZE - 2, b"abcdef", cookie=4) == ENOSPC
        assert c.read(SIZE - 4, 4, cookie=5) == bytes(4)
    finally:
        c.close()


def test_oversized_write_is_refused_and_connection_lives(server: Server) -> None:
    c = RawClient(str(server.socket))
    try:
        length = 33 * 1024 * 1024
        c.send(1, 0, length, cookie=6)
        c.sock.sendall(bytes(length))
        assert c.reply() == (EINVAL, 6, b"")
        assert c.read(0, 4, cookie=7) == bytes(4)
    finally:
        c.close()


def test_pipelined_requests_all_answered_by_cookie(server: Server) -> None:
    c = RawClient(str(server.socket))
    try:
        blocks = {i: os.urandom(4096) for i in range(32)}
        for i, data in blocks.items():
            c.send(1, i * 4096, 4096, cookie=100 + i, data=data)
        cookies = {c.reply()[1] for _ in blocks}
        assert cookies == {100 + i for i in blocks}
        for i in blocks:
            c.send(0, i * 4096, 4096, cookie=200 + i)
        got = {}
        for _ in blocks:
            err, cookie, data = c.reply(4096)
            assert err == 0
            got[cookie - 200] = data
        assert got == blocks
    finally:
        c.close()


def test_concurrent_partial_writes_into_one_sector_lose_nothing(server: Server) -> None:
    # Eight connections each write their own bytes of sector 3, one byte at a time.
    def worker(n: int) -> None:
        c = RawClient(str(server.socket))
        try:
            for k in range(n, 4096, 8):
                c.send(1, 3 * 4096 + k, 1, cookie=k, data=bytes([k % 251 + 1]))
            for _ in range(n, 4096, 8):
                assert c.reply()[0] == 0
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = RawClient(str(server.socket))
    try:
        assert c.read(3 * 4096, 4096) == bytes(k % 251 + 1 for k in range(4096))
    finally:
        c.close()


def test_huge_trim_and_zero_do_not_allocate_their_length(
    cli: CLI, cmk: str, tmp_path: Path
) -> None:
    image = tmp_path / "big.img"
    cli.run("create", str(image), "--size", "8G", "--key", cmk)
    srv = start_server(cli, image, tmp_path / "big.sock", verbose="-v")
    try:
        c = RawClient(str(srv.socket))
        length = 0xFFFFF000  # just under 4 GiB
        assert c.write(length - 4096, b"x" * 8192, cookie=1) == 0
        c.send(4, 0, length, cookie=2)  # TRIM
        assert c.reply() == (0, 2, b"")
        c.send(6, 1, length, cookie=3)  # WRITE_ZEROES, unaligned start
        assert c.reply() == (0, 3, b"")
        c.send(6, 0, 64 << 20, cookie=4, flags=0x02 | 0x10)  # NO_HOLE + FAST_ZERO
        assert c.reply() == (ENOTSUP, 4, b"")
        c.send(6, 0, 256 << 20, cookie=5, flags=0x02)  # NO_HOLE: really written
        assert c.reply() == (0, 5, b"")
        assert c.read(length - 4096, 8192) == bytes(4097) + b"x" * 4095
        c.close()
        assert vm_hwm_kib(srv.proc.pid) < 400 * 1024
    finally:
        assert srv.stop() == 0
    assert image.stat().st_blocks * 512 < 512 << 20


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_replies_cannot_grow_server_memory(
    server: Server,
) -> None:
    import socket as socketmod
    import time

    c = RawClient(str(server.socket))
    c.sock.setsockopt(socketmod.SOL_SOCKET, socketmod.SO_RCVBUF, 4096)
    c.sock.settimeout(0.2)
    sent = 0
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline and sent < 2000:
            try:
                c.send(0, 0, 32 << 20, cookie=sent)
                sent += 1
            except TimeoutError:
                break  # the server stopped reading: backpressure works
        time.sleep(1.0)
        assert vm_rss_kib(server.proc.pid) < 600 * 1024
    finally:
        c.sock.close()
    # The server is still healthy for the next client.
    c = RawClient(str(server.socket))
    try:
        assert c.read(0, 4) == bytes(4)
    finally:
        c.close()


def test_many_clients_that_never_read_share_one_memory_budget(server: Server) -> None:
    import socket as socketmod
    import time

    clients = []
    for _ in range(16):
        c = RawClient(str(server.socket))
        c.sock.setsockopt(socketmod.SOL_SOCKET, socketmod.SO_RCVBUF, 4096)
        c.sock.settimeout(0.05)
        clients.append(c)
    deadline = time.monotonic() + 6
    try:
        while time.monotonic() < deadline:
            for c in clients:
                try:
                    c.send(0, 0, 32 << 20, cookie=1)
                except TimeoutError:
                    pass
        time.sleep(1.0)
        # 16 connections x (64 MiB in the pool + queued replies) would be over
        # a gigabyte without the shared budget (256 MiB).
        assert vm_rss_kib(server.proc.pid) < 700 * 1024
    finally:
        for c in clients:
            c.sock.close()
    c = RawClient(str(server.socket))
    try:
        assert c.read(0, 4) == bytes(4)
    finally:
        c.close()
