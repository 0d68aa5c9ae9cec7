"""A minimal NBD client over a real socket, for what no packaged client sends:
malformed requests, unknown commands, oversized payloads, split frames."""

from __future__ import annotations

import socket
import struct

from tests.nbd.wire import CLIENT_FLAGS, go_payload, option, request


class RawClient:
    def __init__(self, path: str, export: str = "") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        greeting = self.recv_exact(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        self.sock.sendall(CLIENT_FLAGS + option(7, go_payload(export)))
        # INFO(export) reply then ACK
        while True:
            magic, opt, kind, length = struct.unpack(">QIII", self.recv_exact(20))
            payload = self.recv_exact(length)
            if kind == 3 and struct.unpack_from(">H", payload)[0] == 0:
                self.size, self.flags = struct.unpack_from(">QH", payload, 2)
            if kind == 1:
                break
            assert kind == 3, hex(kind)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def send(self, kind: int, offset: int = 0, length: int = 0, cookie: int = 1,
             flags: int = 0, data: bytes = b"") -> None:  # fmt: skip
        self.sock.sendall(request(kind, offset, length, cookie, flags, data))

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == 0x67446698, hex(magic)
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return error, cookie, data

    def read(self, offset: int, length: int, cookie: int = 1) -> bytes:
        self.send(0, offset, length, cookie)
        error, got, data = self.reply(length)
        assert (error, got) == (0, cookie)
        return data

    def write(self, offset: int, data: bytes, cookie: int = 1, flags: int = 0) -> int:
        self.send(1, offset, len(data), cookie, flags, data)
        error, got, _ = self.reply()
        assert got == cookie
        return error

    def close(self) -> None:
        try:
            self.send(2)
        finally:
            self.sock.close()
