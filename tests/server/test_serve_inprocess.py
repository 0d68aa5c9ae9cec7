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
