from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockcrypt.nbd import (
    MAX_PAYLOAD,
    NEED_DATA,
    Command,
    CommandFlag,
    ConnectionClosed,
    Disconnect,
    Errno,
    Export,
    ExportChosen,
    NBDServerConnection,
    Option,
    OptionRefused,
    OptionReply,
    Phase,
    RemoteProtocolError,
    Request,
    RequestRejected,
    TransmissionFlag,
)
from tests.nbd.wire import (
    CLIENT_FLAGS,
    go_payload,
    option,
    parse_option_replies,
    parse_simple_reply,
    request,
)

SIZE = 1 << 20
RW_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.CAN_MULTI_CONN
)
EXPORT = Export(name="vol", size=SIZE, flags=RW_FLAGS, description="test volume")
RO_EXPORT = Export(
    name="ro",
    size=SIZE,
    flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY,
)


def events(conn: NBDServerConnection) -> list[object]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, (ConnectionClosed, Disconnect)):
            break
    return out


def connected(export: Export = EXPORT) -> NBDServerConnection:
    """A connection already in transmission phase with its output drained."""
    conn = NBDServerConnection([export])
    conn.receive_data(CLIENT_FLAGS + option(Option.GO, go_payload(export.name)))
    assert isinstance(events(conn)[0], ExportChosen)
    conn.data_to_send()
    return conn


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = NBDServerConnection([EXPORT])
    greeting = conn.data_to_send()
    assert greeting == b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)
    assert conn.next_event() is NEED_DATA


def test_go_replies_info_export_then_ack_and_starts_transmission() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.GO, go_payload("vol", (3, 1, 2))))
    evs = events(conn)
    assert evs == [ExportChosen(EXPORT)]
    assert conn.phase is Phase.TRANSMISSION
    replies = parse_option_replies(conn.data_to_send())
    kinds = [(opt, kind) for opt, kind, _ in replies]
    assert kinds[-1] == (Option.GO, OptionReply.ACK)
    infos = {struct.unpack_from(">H", p)[0]: p for _, k, p in replies if k == 3}
    assert infos[0] == struct.pack(">HQH", 0, SIZE, RW_FLAGS)
    assert infos[3] == struct.pack(">HIII", 3, 1, 4096, 32 << 20)
    assert infos[1] == struct.pack(">H", 1) + b"vol"
    assert infos[2] == struct.pack(">H", 2) + b"test volume"


def test_go_without_info_requests_sends_only_export_info() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.GO, go_payload("")))
    assert events(conn) == [ExportChosen(EXPORT)]
    replies = parse_option_replies(conn.data_to_send())
    assert [k for _, k, _ in replies] == [OptionReply.INFO, OptionReply.ACK]


def test_info_stays_in_negotiation() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.INFO, go_payload("vol", (3,))))
    assert events(conn) == []
    assert conn.phase is Phase.OPTIONS
    kinds = [k for _, k, _ in parse_option_replies(conn.data_to_send())]
    assert kinds == [OptionReply.INFO, OptionReply.INFO, OptionReply.ACK]


def test_go_unknown_export_is_err_unknown_and_negotiation_continues() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    conn.receive_data(
        CLIENT_FLAGS
        + option(Option.GO, go_payload("nope"))
        + option(Option.GO, go_payload("vol"))
    )
    evs = events(conn)
    assert isinstance(evs[0], OptionRefused)
    assert evs[0].reply == OptionReply.ERR_UNKNOWN
    assert evs[1] == ExportChosen(EXPORT)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\x00\x00\x09ab\x00\x00", go_payload("vol") + b"\x00", b"\xff" * 6],
    ids=["empty", "name-overruns", "trailing-byte", "huge-name-length"],
)
def test_go_malformed_payload_is_err_invalid(payload: bytes) -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.GO, payload))
    (ev,) = events(conn)
    assert isinstance(ev, OptionRefused) and ev.reply == OptionReply.ERR_INVALID
    assert conn.phase is Phase.OPTIONS


@pytest.mark.parametrize(
    "opt",
    [Option.STARTTLS, Option.EXTENDED_HEADERS, Option.PEEK_EXPORT, 0x07654321],
)  # fmt: skip
def test_unsupported_option_is_err_unsup_then_parsing_goes_on(opt: int) -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    conn.receive_data(
        CLIENT_FLAGS + option(opt, b"xyz") + option(Option.GO, go_payload(""))
    )
    evs = events(conn)
    assert isinstance(evs[0], OptionRefused) and evs[0].reply == OptionReply.ERR_UNSUP
    assert evs[1] == ExportChosen(EXPORT)
    first = parse_option_replies(conn.data_to_send())[0]
    assert first[:2] == (opt, OptionReply.ERR_UNSUP)


def test_oversized_option_is_skipped_and_refused_too_big() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    big = 1 << 20
    conn.receive_data(CLIENT_FLAGS + struct.pack(">QII", 0x49484156454F5054, 99, big))
    evs: list[object] = []
    for _ in range(big // 4096):
        conn.receive_data(bytes(4096))
        evs += events(conn)
        assert len(conn._buf) <= 4096
    conn.receive_data(option(Option.GO, go_payload("")))
    evs += events(conn)
    assert any(
        isinstance(e, OptionRefused) and e.reply == OptionReply.ERR_TOO_BIG for e in evs
    )
    assert evs[-1] == ExportChosen(EXPORT)


def test_list_names_every_export_then_ack() -> None:
    conn = NBDServerConnection([EXPORT, RO_EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.LIST))
    assert events(conn) == []
    replies = parse_option_replies(conn.data_to_send())
    assert [(k, p) for _, k, p in replies] == [
        (OptionReply.SERVER, b"\x00\x00\x00\x03vol"),
        (OptionReply.SERVER, b"\x00\x00\x00\x02ro"),
        (OptionReply.ACK, b""),
    ]


def test_abort_acks_and_disconnects() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.ABORT))
    assert events(conn) == [Disconnect()]
    assert parse_option_replies(conn.data_to_send()) == [(2, OptionReply.ACK, b"")]
    assert conn.phase is Phase.CLOSED


@pytest.mark.parametrize("client_flags", [1, 3])
def test_export_name_pads_124_zeros_unless_no_zeroes(client_flags: int) -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    conn.receive_data(
        struct.pack(">I", client_flags) + option(Option.EXPORT_NAME, b"vol")
    )
    assert events(conn) == [ExportChosen(EXPORT)]
    out = conn.data_to_send()
    expected = struct.pack(">QH", SIZE, RW_FLAGS)
    assert out == expected + (bytes(124) if client_flags == 1 else b"")


def test_export_name_unknown_closes() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.receive_data(CLIENT_FLAGS + option(Option.EXPORT_NAME, b"other"))
    assert events(conn) == [Disconnect()]


def test_unknown_client_flags_break_the_framing() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.receive_data(struct.pack(">I", 0x80))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.phase is Phase.ERROR


def test_bad_option_magic_breaks_the_framing() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.receive_data(CLIENT_FLAGS + b"X" * 16)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_read_request_and_reply_encoding() -> None:
    conn = connected()
    conn.receive_data(request(Command.READ, 4096, 512, cookie=0xDEADBEEF00000001))
    (req,) = events(conn)
    assert req == Request(Command.READ, CommandFlag(0), 0xDEADBEEF00000001, 4096, 512)
    out = conn.read_reply_header(req.cookie, req.offset, 512) + b"x" * 512
    assert parse_simple_reply(out) == (0, 0xDEADBEEF00000001, b"x" * 512)


def test_write_carries_its_payload() -> None:
    conn = connected()
    conn.receive_data(request(Command.WRITE, 1, 3, flags=1, data=b"abc"))
    (req,) = events(conn)
    assert req.data == b"abc" and req.flags == CommandFlag.FUA


# (command, flags, offset, length, expected errno)
BAD_REQUESTS = [
    (Command.READ, 0, SIZE - 1, 2, Errno.EINVAL),
    (Command.READ, 0, 0, 0, Errno.EINVAL),
    (Command.READ, 0, 0, MAX_PAYLOAD + 1, Errno.EINVAL),
    (Command.READ, 0x80, 0, 1, Errno.EINVAL),
    (Command.READ, CommandFlag.DF, 0, 1, Errno.EINVAL),
    (Command.TRIM, 0, SIZE, 1, Errno.EINVAL),
    (Command.WRITE_ZEROES, 0, SIZE, 4096, Errno.ENOSPC),
    (Command.WRITE_ZEROES, CommandFlag.DF, 0, 4096, Errno.EINVAL),
    (Command.FLUSH, 0, 1, 0, Errno.EINVAL),
    (Command.CACHE, 0, 0, 1, Errno.EINVAL),
    (Command.BLOCK_STATUS, 0, 0, 1, Errno.EINVAL),
    (42, 0, 0, 1, Errno.EINVAL),
]


@pytest.mark.parametrize("kind,flags,offset,length,error", BAD_REQUESTS)
def test_bad_request_gets_error_reply_and_connection_lives(
    kind: int, flags: int, offset: int, length: int, error: Errno
) -> None:
    conn = connected()
    conn.receive_data(request(kind, offset, length, cookie=7, flags=flags))
    conn.receive_data(request(Command.READ, 0, 512, cookie=8))
    evs = events(conn)
    assert isinstance(evs[0], RequestRejected) and evs[0].error == error
    assert parse_simple_reply(conn.data_to_send()) == (error, 7, b"")
    assert isinstance(evs[1], Request) and evs[1].cookie == 8


def test_write_past_end_consumes_payload_then_enospc() -> None:
    conn = connected()
    conn.receive_data(request(Command.WRITE, SIZE - 2, 4, cookie=5, data=b"abcd"))
    conn.receive_data(request(Command.FLUSH, cookie=6))
    evs = events(conn)
    assert isinstance(evs[0], RequestRejected) and evs[0].error == Errno.ENOSPC
    assert isinstance(evs[1], Request) and evs[1].command is Command.FLUSH


def test_oversized_write_is_skipped_not_buffered() -> None:
    conn = connected()
    length = MAX_PAYLOAD + 4096
    conn.receive_data(request(Command.WRITE, 0, length, cookie=9))
    chunk = bytes(1 << 20)
    sent = 0
    while sent < length:
        piece = chunk[: min(len(chunk), length - sent)]
        conn.receive_data(piece)
        sent += len(piece)
        ev = conn.next_event()
        if sent < length:
            assert ev is NEED_DATA
            assert len(conn._buf) <= len(chunk)
    assert isinstance(ev, RequestRejected) and ev.error == Errno.EINVAL
    conn.receive_data(request(Command.READ, 0, 1, cookie=10))
    assert isinstance(conn.next_event(), Request)


@pytest.mark.parametrize("kind", [Command.WRITE, Command.TRIM, Command.WRITE_ZEROES])
def test_read_only_export_refuses_writes_with_eperm(kind: Command) -> None:
    conn = connected(RO_EXPORT)
    data = b"hi" if kind is Command.WRITE else b""
    conn.receive_data(request(kind, 0, 2, cookie=3, data=data))
    (ev,) = events(conn)
    assert isinstance(ev, RequestRejected) and ev.error == Errno.EPERM


def test_fast_zero_refused_when_not_advertised() -> None:
    flags = RW_FLAGS & ~TransmissionFlag.SEND_FAST_ZERO
    conn = connected(Export(name="v", size=SIZE, flags=flags))
    conn.receive_data(
        request(Command.WRITE_ZEROES, 0, 512, flags=CommandFlag.FAST_ZERO)
    )
    (ev,) = events(conn)
    assert isinstance(ev, RequestRejected) and ev.error == Errno.EINVAL


def test_trim_up_to_4gib_is_one_request_without_payload() -> None:
    big = Export(name="big", size=8 << 30, flags=RW_FLAGS)
    conn = connected(big)
    conn.receive_data(request(Command.TRIM, 0, 0xFFFFF000))
    (ev,) = events(conn)
    assert isinstance(ev, Request) and ev.length == 0xFFFFF000 and ev.data is None


def test_disc_ends_transmission() -> None:
    conn = connected()
    conn.receive_data(request(Command.DISC) + request(Command.READ, 0, 1))
    assert events(conn) == [Disconnect()]
    assert conn.phase is Phase.CLOSED
    assert conn.next_event() is NEED_DATA


def test_bad_request_magic_breaks_the_framing() -> None:
    conn = connected()
    conn.receive_data(b"\x00" * 28)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_eof_gives_connection_closed() -> None:
    conn = connected()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()


# -- invariants ----------------------------------------------------------------

SESSION = (
    CLIENT_FLAGS
    + option(Option.STRUCTURED_REPLY)
    + option(Option.LIST)
    + option(Option.INFO, go_payload("vol", (3,)))
    + option(77, b"junk")
    + option(Option.GO, go_payload("vol", (3, 1)))
    + request(Command.WRITE, 10, 5, cookie=1, data=b"hello")
    + request(Command.READ, 0, 100, cookie=2)
    + request(Command.READ, SIZE, 1, cookie=3)
    + request(99, 0, 1, cookie=4)
    + request(Command.WRITE, SIZE, 3, cookie=5, data=b"xyz")
    + request(Command.WRITE_ZEROES, 0, 8192, cookie=6, flags=CommandFlag.NO_HOLE)
    + request(Command.FLUSH, cookie=7)
    + request(Command.DISC)
)


def run_chunks(chunks: list[bytes]) -> tuple[list[object], bytes]:
    conn = NBDServerConnection([EXPORT])
    evs: list[object] = []
    out = conn.data_to_send()
    for chunk in chunks:
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not NEED_DATA:
            evs.append(ev)
        out += conn.data_to_send()
    return evs, out


def test_whole_session_events() -> None:
    evs, _ = run_chunks([SESSION])
    kinds = [type(e).__name__ for e in evs]
    assert kinds == [
        "OptionRefused", "ExportChosen", "Request", "Request",
        "RequestRejected", "RequestRejected", "RequestRejected", "Request", "Request",
        "Disconnect",
    ]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(SESSION)), max_size=40))
def test_any_chunking_gives_the_same_events_and_bytes(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [
        SESSION[a:b] for a, b in zip([0, *points], [*points, len(SESSION)], strict=True)
    ]
    assert run_chunks([c for c in chunks if c]) == run_chunks([SESSION])


def test_byte_by_byte_gives_the_same_events() -> None:
    one = [SESSION[i : i + 1] for i in range(len(SESSION))]
    assert run_chunks(one) == run_chunks([SESSION])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_give_events_or_remote_error(junk: bytes, after_go: bool) -> None:
    conn = NBDServerConnection([EXPORT])
    prefix = CLIENT_FLAGS + option(Option.GO, go_payload("")) if after_go else b""
    conn.receive_data(prefix + junk)
    try:
        for _ in range(1000):
            ev = conn.next_event()
            if ev is NEED_DATA or isinstance(ev, Disconnect):
                break
    except RemoteProtocolError:
        pass


def test_preinit_starts_in_transmission_without_greeting() -> None:
    conn = NBDServerConnection([EXPORT], preinit=True)
    assert conn.phase is Phase.TRANSMISSION and conn.export == EXPORT
    assert conn.data_to_send() == b""
    conn.receive_data(request(Command.READ, 0, 512, cookie=5))
    (req,) = events(conn)
    assert isinstance(req, Request) and req.cookie == 5


# -- structured replies and base:allocation -------------------------------------

STATUS_EXPORT = Export(name="vol", size=SIZE, flags=RW_FLAGS, block_status=True)


def meta_payload(name: str, *queries: str) -> bytes:
    out = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def structured(
    export: Export = STATUS_EXPORT, select: bool = True
) -> NBDServerConnection:
    conn = NBDServerConnection([export])
    stream = CLIENT_FLAGS + option(Option.STRUCTURED_REPLY)
    if select:
        stream += option(
            Option.SET_META_CONTEXT, meta_payload("vol", "base:allocation")
        )
    conn.receive_data(stream + option(Option.GO, go_payload("vol")))
    assert isinstance(events(conn)[-1], ExportChosen)
    conn.data_to_send()
    return conn


def test_structured_reply_is_acked_and_adds_df_flag() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.STRUCTURED_REPLY)
                      + option(Option.GO, go_payload("vol")))  # fmt: skip
    assert events(conn) == [ExportChosen(EXPORT)]
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0] == (Option.STRUCTURED_REPLY, OptionReply.ACK, b"")
    (_, _, flags) = struct.unpack(">HQH", replies[1][2])
    assert flags == RW_FLAGS | TransmissionFlag.SEND_DF


def test_meta_context_needs_structured_replies() -> None:
    conn = NBDServerConnection([STATUS_EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.SET_META_CONTEXT,
                                            meta_payload("vol", "base:allocation")))  # fmt: skip
    (ev,) = events(conn)
    assert isinstance(ev, OptionRefused) and ev.reply == OptionReply.ERR_INVALID


@pytest.mark.parametrize(
    "queries,expected",
    [((), [b"base:allocation"]), (("base:",), [b"base:allocation"]),
     (("qemu:dirty-bitmap:x",), []), (("base:allocation",), [b"base:allocation"])],
)  # fmt: skip
def test_list_meta_context(queries: tuple[str, ...], expected: list[bytes]) -> None:
    conn = NBDServerConnection([STATUS_EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.STRUCTURED_REPLY)
                      + option(Option.LIST_META_CONTEXT, meta_payload("vol", *queries)))  # fmt: skip
    assert events(conn) == []
    replies = parse_option_replies(conn.data_to_send())[1:]
    assert [p[4:] for _, k, p in replies if k == OptionReply.META_CONTEXT] == expected
    assert replies[-1][1] == OptionReply.ACK


def test_set_meta_context_on_export_without_status_selects_nothing() -> None:
    conn = NBDServerConnection([EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.STRUCTURED_REPLY)
                      + option(Option.SET_META_CONTEXT, meta_payload("vol", "base:allocation")))  # fmt: skip
    events(conn)
    kinds = [k for _, k, _ in parse_option_replies(conn.data_to_send())]
    assert kinds == [OptionReply.ACK, OptionReply.ACK]


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\x00\x00\x03vo", meta_payload("vol", "x") + b"!",
     b"\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x01a"],
)  # fmt: skip
def test_malformed_meta_context_is_err_invalid(payload: bytes) -> None:
    conn = NBDServerConnection([STATUS_EXPORT])
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + option(Option.STRUCTURED_REPLY)
                      + option(Option.SET_META_CONTEXT, payload))  # fmt: skip
    (ev,) = events(conn)
    assert isinstance(ev, OptionRefused) and ev.reply == OptionReply.ERR_INVALID


def test_structured_read_reply_and_error_chunks() -> None:
    conn = structured()
    assert conn.read_reply_header(7, 4096, 3) == struct.pack(
        ">IHHQIQ", 0x668E33EF, 1, 1, 7, 11, 4096
    )
    conn.receive_data(request(Command.READ, SIZE, 1, cookie=9))
    (ev,) = events(conn)
    assert isinstance(ev, RequestRejected)
    out = conn.data_to_send()
    magic, flags, kind, cookie, length, error, msg_len = struct.unpack_from(
        ">IHHQIIH", out
    )
    assert (magic, flags, kind, cookie, error) == (0x668E33EF, 1, 0x8001, 9, 22)
    assert len(out) == 20 + length and msg_len == length - 6
    # other commands still get simple replies
    conn.receive_data(request(Command.WRITE, SIZE, 1, cookie=10, data=b"x"))
    events(conn)
    assert parse_simple_reply(conn.data_to_send()) == (Errno.ENOSPC, 10, b"")


def test_df_accepted_only_with_structured_replies() -> None:
    conn = structured()
    conn.receive_data(request(Command.READ, 0, 512, flags=CommandFlag.DF))
    (ev,) = events(conn)
    assert isinstance(ev, Request) and ev.flags == CommandFlag.DF


def test_block_status_only_when_selected() -> None:
    conn = structured(select=False)
    conn.receive_data(request(Command.BLOCK_STATUS, 0, 4096, cookie=3))
    (ev,) = events(conn)
    assert isinstance(ev, RequestRejected) and ev.error == Errno.EINVAL

    conn = structured()
    conn.receive_data(request(Command.BLOCK_STATUS, 0, 0xFFFFF000 % SIZE or 4096,
                              cookie=4, flags=CommandFlag.REQ_ONE))  # fmt: skip
    (ev,) = events(conn)
    assert isinstance(ev, Request) and ev.command is Command.BLOCK_STATUS
    reply = conn.block_status_reply(4, [(4096, 3), (8192, 0)])
    assert reply == struct.pack(">IHHQI", 0x668E33EF, 1, 5, 4, 20) + struct.pack(
        ">IIIII", 1, 4096, 3, 8192, 0
    )
    conn.receive_data(request(Command.BLOCK_STATUS, SIZE - 1, 2, cookie=5))
    (ev,) = events(conn)
    assert isinstance(ev, RequestRejected) and ev.error == Errno.EINVAL


def test_meta_context_selected_for_another_export_is_not_active() -> None:
    other = Export(name="other", size=SIZE, flags=RW_FLAGS, block_status=True)
    conn = NBDServerConnection([STATUS_EXPORT, other])
    conn.receive_data(CLIENT_FLAGS + option(Option.STRUCTURED_REPLY)
                      + option(Option.SET_META_CONTEXT, meta_payload("other", "base:allocation"))
                      + option(Option.GO, go_payload("vol"))
                      + request(Command.BLOCK_STATUS, 0, 512))  # fmt: skip
    evs = events(conn)
    assert isinstance(evs[-1], RequestRejected)


@pytest.mark.parametrize("kind", [Command.FLUSH, Command.READ, Command.TRIM])
def test_fua_is_accepted_on_every_command(kind: Command) -> None:
    conn = connected()
    length = 0 if kind is Command.FLUSH else 512
    conn.receive_data(request(kind, 0, length, flags=CommandFlag.FUA))
    (ev,) = events(conn)
    assert isinstance(ev, Request) and ev.flags == CommandFlag.FUA
