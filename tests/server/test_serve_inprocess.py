"""The asyncio server with a preconnected socket (the kernel attach path)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

from blockcrypt.server.daemon import ListenSpec, serve
from blockcrypt.volume.device import Volume
from tests.nbd.wire import request


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk
        buf += chunk
    return buf


def test_preconnected_socket_skips_handshake(attached: Volume, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ours, kernel = socket.socketpair()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()

    async def main() -> None:
        await serve(attached, ListenSpec(unix_path=str(tmp_path / "s.sock")),
                    on_ready=lambda uri: ready.set(), preconnected=[ours], stop=stop)  # fmt: skip

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main())

    # Signal handlers need the main thread, so run the loop here and the client
    # in a thread instead.
    results: list[bytes] = []

    def client() -> None:
        ready.wait(10)
        kernel.sendall(request(1, 4096, 5, cookie=11, data=b"hello"))
        results.append(recv_exact(kernel, 16))
        kernel.sendall(request(0, 4096, 5, cookie=12))
        results.append(recv_exact(kernel, 16 + 5))
        loop.call_soon_threadsafe(stop.set)

    t = threading.Thread(target=client)
    t.start()
    run()
    t.join()
    loop.close()
    kernel.close()
    assert struct.unpack(">IIQ", results[0]) == (0x67446698, 0, 11)
    assert struct.unpack(">IIQ", results[1][:16]) == (0x67446698, 0, 12)
    assert results[1][16:] == b"hello"


def run_server(attached: Volume, tmp_path, client, **kw) -> None:  # type: ignore[no-untyped-def]
    """Serve ``attached`` on a Unix socket while ``client(path)`` runs in a thread."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    path = str(tmp_path / "t.sock")
    errors: list[BaseException] = []

    def body() -> None:
        ready.wait(10)
        try:
            client(path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            loop.call_soon_threadsafe(stop.set)

    t = threading.Thread(target=body)
    t.start()
    loop.run_until_complete(
        serve(
            attached,
            ListenSpec(unix_path=path),
            on_ready=lambda _: ready.set(),
            stop=stop,
            **kw,
        )  # fmt: skip
    )
    t.join()
    loop.close()
    if errors:
        raise errors[0]


def test_handshake_timeout_closes_silent_clients(
    attached: Volume, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from blockcrypt.server import connection

    monkeypatch.setattr(connection, "HANDSHAKE_TIMEOUT", 0.3)

    def client(path: str) -> None:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(path)
        assert recv_exact(s, 18)[:8] == b"NBDMAGIC"
        assert s.recv(1) == b""  # closed by the server, not by the timeout here
        s.close()

    run_server(attached, tmp_path, client)


def test_connection_limit_makes_extra_clients_wait(attached: Volume, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def client(path: str) -> None:
        first, second = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        for s in (first, second):
            s.settimeout(5)
            s.connect(path)
        assert recv_exact(first, 18)[:8] == b"NBDMAGIC"
        second.settimeout(0.5)
        try:
            second.recv(1)
            raise AssertionError("second client was served beyond the limit")
        except TimeoutError:
            pass
        first.close()
        second.settimeout(5)
        assert recv_exact(second, 18)[:8] == b"NBDMAGIC"
        second.close()

    run_server(attached, tmp_path, client, max_connections=1)
