"""Client-side encoders and decoders for driving the server in memory."""

from __future__ import annotations

import struct

from blockcrypt.nbd._constants import IHAVEOPT, OPTION_REPLY_MAGIC, REQUEST_MAGIC

CLIENT_FLAGS = struct.pack(">I", 3)  # fixed newstyle + no zeroes


def option(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload


def go_payload(name: str = "", infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(f">H{len(infos)}H", len(infos), *infos)
    )


def request(
    kind: int, offset: int = 0, length: int = 0, cookie: int = 1, flags: int = 0,
    data: bytes = b"",
) -> bytes:  # fmt: skip
    return (
        struct.pack(">IHHQQI", REQUEST_MAGIC, flags, kind, cookie, offset, length)
        + data
    )


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, reply type, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, kind, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        pos += 20
        out.append((opt, kind, data[pos : pos + length]))
        pos += length
    return out


def parse_simple_reply(data: bytes) -> tuple[int, int, bytes]:
    """Return (error, cookie, payload) of one simple reply."""
    magic, error, cookie = struct.unpack_from(">IIQ", data)
    assert magic == 0x67446698
    return error, cookie, data[16:]
