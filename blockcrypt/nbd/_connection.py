"""Server side of one NBD connection, as a sans-IO state machine.

Rules of this module:

* It never touches a socket, a clock, a thread or a logger. Bytes come in
  through ``receive_data``; ``next_event`` turns them into events; the bytes to
  write come out of ``data_to_send`` (handshake and error replies the machine
  produced itself) and the reply encoders (``reply_header``,
  ``read_reply_header``, ``error_reply``, ``block_status_reply``), which pick
  simple or structured replies as negotiated.
* The handshake is fixed newstyle (``proto.md``, "Fixed newstyle
  negotiation"). Options are answered here from the export table; the caller
  only learns which export was chosen.
* Every request is validated before the caller sees it. A bad request gets an
  error reply and the connection stays usable; only broken framing (a wrong
  magic, an impossible handshake flag) raises ``RemoteProtocolError``.
* Every buffer is capped: options at ``MAX_OPTION_LENGTH``, payloads at
  ``MAX_PAYLOAD``. Longer payloads are skipped as they arrive, never stored.
"""

from __future__ import annotations

import enum
import struct

from blockcrypt.nbd._constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from blockcrypt.nbd._events import (
    NEED_DATA,
    ConnectionClosed,
    Disconnect,
    Event,
    Export,
    ExportChosen,
    OptionRefused,
    Request,
    RequestRejected,
    _NeedData,
)
from blockcrypt.nbd.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["NBDServerConnection", "Phase"]

_OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_DATA_CHUNK = struct.Struct(">IHHQIQ")  # ... and the offset of OFFSET_DATA
_ERROR_CHUNK = struct.Struct(">IHHQIIH")  # ... and error, message length
_DONE = int(ReplyFlag.DONE)
_READ_ONLY = int(TransmissionFlag.READ_ONLY)
_SERVER_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


class Phase(enum.Enum):
    GREETING = "greeting"  # greeting sent, waiting for the client's flags
    OPTIONS = "options"  # option haggling
    TRANSMISSION = "transmission"
    CLOSED = "closed"  # soft or hard disconnect; nothing more is parsed
    ERROR = "error"  # the peer broke the framing


# Legal moves between phases. Anything else is a bug in this module.
_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.GREETING: frozenset({Phase.OPTIONS, Phase.CLOSED, Phase.ERROR}),
    Phase.OPTIONS: frozenset({Phase.TRANSMISSION, Phase.CLOSED, Phase.ERROR}),
    Phase.TRANSMISSION: frozenset({Phase.CLOSED, Phase.ERROR}),
    Phase.CLOSED: frozenset(),
    Phase.ERROR: frozenset(),
}

# Flags each command accepts (besides those the export must also advertise).
# FUA goes on everything: with SEND_FUA advertised, the protocol says a server
# must accept it on any command, whatever it means there.
_ALLOWED_FLAGS: dict[Command, CommandFlag] = {
    Command.READ: CommandFlag.FUA,
    Command.WRITE: CommandFlag.FUA,
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.FUA | CommandFlag.REQ_ONE,
}
# Commands whose replies must be structured once structured replies are on.
_STRUCTURED_ONLY = frozenset({int(Command.READ), int(Command.BLOCK_STATUS)})
_WRITING = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_COMMANDS = {int(c): c for c in Command}
# Flags values seen so far, as IntFlags: building one per request is slow.
_FLAGS: dict[int, CommandFlag] = {}
# What each command needs the export to advertise.
_NEEDS_FLAG: dict[Command, int] = {
    Command.FLUSH: int(TransmissionFlag.SEND_FLUSH),
    Command.TRIM: int(TransmissionFlag.SEND_TRIM),
    Command.WRITE_ZEROES: int(TransmissionFlag.SEND_WRITE_ZEROES),
}
# Error for a range past the end: writes say "no space", the rest "invalid".
_PAST_END_ERROR: dict[Command, Errno] = {
    Command.WRITE: Errno.ENOSPC,
    Command.WRITE_ZEROES: Errno.ENOSPC,
}


class NBDServerConnection:
    """One client connection, from greeting to disconnect.

    Args:
        exports: the exports on offer. The first one is the default export,
            chosen when a client asks for the empty name.
        preinit: skip the handshake and start in transmission phase on the
            default export. For a socket handed to the kernel's NBD driver,
            which expects the handshake to be over already.
    """

    def __init__(self, exports: list[Export], preinit: bool = False) -> None:
        if not exports:
            raise LocalProtocolError("a server needs at least one export")
        self._exports = {e.name: e for e in exports}
        self._default = exports[0]
        self._buf = bytearray()
        self._out = bytearray()
        self._phase = Phase.GREETING
        self._eof = False
        self._no_zeroes = False
        self._fixed = False
        self._skip = 0  # payload bytes still to discard
        self._after_skip: Event | None = None
        self.export: Export | None = None
        self._allowed: dict[Command, int] = {}
        self._export_flags = 0
        self._structured = False
        # SET_META_CONTEXT selection: (export it was made for, context names)
        self._meta: tuple[Export, tuple[str, ...]] | None = None
        self._status_on = False  # base:allocation selected for the export in use
        if preinit:
            self._phase = Phase.OPTIONS
            self._start_transmission(self._default)
        else:
            self._out += struct.pack(">QQH", NBDMAGIC, IHAVEOPT, _SERVER_FLAGS)

    # -- public surface -----------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the client; empty input means it hung up."""
        if not data:
            self._eof = True
        else:
            self._buf += data

    def next_event(self) -> Event | _NeedData:
        """Return the next event, or ``NEED_DATA`` when more bytes are needed.

        Raises:
            RemoteProtocolError: the client broke the framing; close the
                connection after writing ``data_to_send()``.
        """
        if self._phase is Phase.ERROR:
            raise RemoteProtocolError("connection already failed")
        try:
            event = self._parse()
        except RemoteProtocolError:
            self._move(Phase.ERROR)
            raise
        if event is NEED_DATA and self._eof and self._phase is not Phase.CLOSED:
            self._move(Phase.CLOSED)
            return ConnectionClosed()
        return event

    def data_to_send(self) -> bytes:
        """Return and forget the bytes the machine queued for the client."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def structured(self) -> bool:
        """Whether the client negotiated structured replies."""
        return self._structured

    @staticmethod
    def reply_header(cookie: int, error: Errno = Errno.OK) -> bytes:
        """Return a simple reply header: for any command but READ and BLOCK_STATUS
        (use ``read_reply_header`` and ``error_reply`` for those)."""
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    def read_reply_header(self, cookie: int, offset: int, length: int) -> bytes:
        """Return what precedes ``length`` bytes of READ data for this client."""
        if not self._structured:
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        return _DATA_CHUNK.pack(
            STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.OFFSET_DATA, cookie,
            8 + length, offset,
        )  # fmt: skip

    def error_reply(
        self, cookie: int, command: int, error: Errno, message: str = ""
    ) -> bytes:
        """Return a whole error reply, structured where the protocol requires."""
        if not (self._structured and command in _STRUCTURED_ONLY):
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        text = message.encode()[:MAX_STRING]
        return (
            _ERROR_CHUNK.pack(
                STRUCTURED_REPLY_MAGIC,
                _DONE,
                ReplyType.ERROR,
                cookie,
                6 + len(text),
                error,
                len(text),
            )  # fmt: skip
            + text
        )

    def block_status_reply(self, cookie: int, extents: list[tuple[int, int]]) -> bytes:
        """Return the BLOCK_STATUS reply: ``extents`` are (length, flags) pairs."""
        if not self._status_on or not extents:
            raise LocalProtocolError("no base:allocation extents to send")
        body = struct.pack(f">I{2 * len(extents)}I", BASE_ALLOCATION_ID,
                           *(v for extent in extents for v in extent))  # fmt: skip
        header = _CHUNK.pack(
            STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.BLOCK_STATUS, cookie, len(body)
        )
        return header + body

    # -- phase handling ------------------------------------------------------

    def _move(self, phase: Phase) -> None:
        if phase not in _TRANSITIONS[self._phase]:
            raise LocalProtocolError(f"illegal move {self._phase} -> {phase}")
        self._phase = phase

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def _parse(self) -> Event | _NeedData:
        if self._skip:
            return self._discard()
        if self._phase is Phase.GREETING:
            return self._parse_client_flags()
        if self._phase is Phase.OPTIONS:
            return self._parse_option()
        if self._phase is Phase.TRANSMISSION:
            return self._parse_request()
        return NEED_DATA

    def _discard(self) -> Event | _NeedData:
        n = min(self._skip, len(self._buf))
        del self._buf[:n]
        self._skip -= n
        if self._skip:
            return NEED_DATA
        event, self._after_skip = self._after_skip, None
        return event if event is not None else self._parse()

    def _parse_client_flags(self) -> Event | _NeedData:
        raw = self._take(4)
        if raw is None:
            return NEED_DATA
        (flags,) = struct.unpack(">I", raw)
        known = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        if flags & ~known:
            raise RemoteProtocolError(f"unknown client flags {flags:#x}")
        self._fixed = bool(flags & ClientFlag.C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self._move(Phase.OPTIONS)
        return self._parse()

    # -- options --------------------------------------------------------------

    def _parse_option(self) -> Event | _NeedData:
        if len(self._buf) < _OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = _OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            del self._buf[: _OPTION_HEADER.size]
            self._skip = length
            self._after_skip = self._refuse(
                option, OptionReply.ERR_TOO_BIG, f"option is {length} bytes long"
            )
            return self._discard()
        if len(self._buf) < _OPTION_HEADER.size + length:
            return NEED_DATA
        del self._buf[: _OPTION_HEADER.size]
        payload = self._take(length)
        assert payload is not None
        return self._handle_option(option, payload)

    def _handle_option(self, option: int, payload: bytes) -> Event | _NeedData:
        if option == Option.EXPORT_NAME:
            return self._opt_export_name(payload)
        if option == Option.ABORT:
            self._option_reply(option, OptionReply.ACK)
            self._move(Phase.CLOSED)
            return Disconnect()
        if not self._fixed:
            # A client without fixed newstyle cannot parse error replies.
            raise RemoteProtocolError(
                f"option {option} from a client without fixed newstyle"
            )
        if option == Option.LIST:
            return self._opt_list(payload)
        if option in (Option.INFO, Option.GO):
            return self._opt_info_go(option, payload)
        if option == Option.STRUCTURED_REPLY:
            return self._opt_structured_reply(payload)
        if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            return self._opt_meta_context(option, payload)
        return self._refuse(option, OptionReply.ERR_UNSUP, "option not supported")

    def _opt_structured_reply(self, payload: bytes) -> Event | _NeedData:
        if payload:
            return self._refuse(
                Option.STRUCTURED_REPLY, OptionReply.ERR_INVALID, "option has data"
            )
        self._structured = True
        self._option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK)
        return self._parse()

    def _opt_meta_context(self, option: int, payload: bytes) -> Event | _NeedData:
        if not self._structured:
            return self._refuse(
                option, OptionReply.ERR_INVALID, "negotiate structured replies first"
            )
        parsed = _parse_meta_request(payload)
        if isinstance(parsed, str):
            return self._refuse(option, OptionReply.ERR_INVALID, parsed)
        name, queries = parsed
        export = self._find_export(name)
        if export is None:
            return self._refuse(option, OptionReply.ERR_UNKNOWN, "no such export")

        offered = (BASE_ALLOCATION,) if export.block_status else ()
        if option == Option.LIST_META_CONTEXT:
            # No query means "everything"; "base:" asks for the whole namespace.
            wanted = [
                c for c in offered if not queries or c in queries or "base:" in queries
            ]
            for context in wanted:
                self._option_reply(option, OptionReply.META_CONTEXT,
                                   struct.pack(">I", 0) + context.encode())  # fmt: skip
        else:
            chosen = tuple(c for c in offered if c in queries)
            self._meta = (export, chosen)
            for context in chosen:
                reply = struct.pack(">I", BASE_ALLOCATION_ID) + context.encode()
                self._option_reply(option, OptionReply.META_CONTEXT, reply)
        self._option_reply(option, OptionReply.ACK)
        return self._parse()

    def _flags_for(self, export: Export) -> int:
        """Transmission flags as this client sees them."""
        flags = int(export.flags)
        if self._structured:
            flags |= TransmissionFlag.SEND_DF  # READ always answers in one chunk
        return flags

    def _option_reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload))
        self._out += payload

    def _refuse(self, option: int, reply: OptionReply, reason: str) -> OptionRefused:
        self._option_reply(option, reply, reason.encode())
        return OptionRefused(option=option, reply=reply, reason=reason)

    def _find_export(self, name: str) -> Export | None:
        if name == "":
            return self._default
        return self._exports.get(name)

    def _opt_export_name(self, payload: bytes) -> Event | _NeedData:
        try:
            name = payload.decode()
        except UnicodeDecodeError:
            name = None
        export = self._find_export(name) if name is not None else None
        if export is None:
            # EXPORT_NAME has no error reply: the only answer is to hang up.
            self._move(Phase.CLOSED)
            return Disconnect()
        self._out += struct.pack(">QH", export.size, self._flags_for(export))
        if not self._no_zeroes:
            self._out += bytes(124)
        return self._start_transmission(export)

    def _opt_list(self, payload: bytes) -> Event | _NeedData:
        if payload:
            return self._refuse(Option.LIST, OptionReply.ERR_INVALID, "LIST has data")
        for export in self._exports.values():
            name = export.name.encode()
            self._option_reply(
                Option.LIST, OptionReply.SERVER, struct.pack(">I", len(name)) + name
            )
        self._option_reply(Option.LIST, OptionReply.ACK)
        return self._parse()

    def _opt_info_go(self, option: int, payload: bytes) -> Event | _NeedData:
        parsed = _parse_info_request(payload)
        if isinstance(parsed, str):
            return self._refuse(option, OptionReply.ERR_INVALID, parsed)
        name, requests = parsed
        export = self._find_export(name)
        if export is None:
            return self._refuse(option, OptionReply.ERR_UNKNOWN, "no such export")

        info = struct.pack(">HQH", Info.EXPORT, export.size, self._flags_for(export))
        self._option_reply(option, OptionReply.INFO, info)
        if Info.NAME in requests:
            self._option_reply(
                option, OptionReply.INFO, struct.pack(">H", Info.NAME) + name.encode()
            )
        if Info.DESCRIPTION in requests and export.description:
            desc = struct.pack(">H", Info.DESCRIPTION) + export.description.encode()
            self._option_reply(option, OptionReply.INFO, desc)
        if Info.BLOCK_SIZE in requests:
            sizes = struct.pack(
                ">HIII",
                Info.BLOCK_SIZE,
                export.min_block,
                export.preferred_block,
                export.max_block,
            )
            self._option_reply(option, OptionReply.INFO, sizes)
        self._option_reply(option, OptionReply.ACK)
        if option == Option.GO:
            return self._start_transmission(export)
        return self._parse()

    def _start_transmission(self, export: Export) -> ExportChosen:
        self.export = export
        self._export_flags = int(export.flags)  # int & int beats IntFlag's &
        # Flags each command accepts on this export, as plain ints: the
        # complement of an IntFlag keeps only defined bits.
        self._allowed = {c: int(f) for c, f in _ALLOWED_FLAGS.items()}
        if not export.flags & TransmissionFlag.SEND_FAST_ZERO:
            self._allowed[Command.WRITE_ZEROES] &= ~int(CommandFlag.FAST_ZERO)
        if self._structured:
            self._allowed[Command.READ] |= int(CommandFlag.DF)
        self._status_on = (
            self._meta is not None
            and self._meta[0] is export
            and BASE_ALLOCATION in self._meta[1]
        )
        if not self._status_on:
            del self._allowed[Command.BLOCK_STATUS]
        self._move(Phase.TRANSMISSION)
        return ExportChosen(export)

    # -- transmission ---------------------------------------------------------

    def _parse_request(self) -> Event | _NeedData:
        buf = self._buf
        if len(buf) < _REQUEST.size:
            return NEED_DATA
        magic, flags, kind, cookie, offset, length = _REQUEST.unpack_from(buf)
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        has_payload = kind == Command.WRITE
        if has_payload and length > MAX_PAYLOAD:
            # Too big to buffer: skip the payload as it streams in, then refuse.
            del buf[: _REQUEST.size]
            self._skip = length
            self._after_skip = self._reject(
                kind, cookie, offset, length, Errno.EINVAL,
                f"payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte maximum",
            )  # fmt: skip
            return self._discard()
        end = _REQUEST.size + length if has_payload else _REQUEST.size
        if len(buf) < end:
            return NEED_DATA
        data = buf[_REQUEST.size : end] if has_payload else None
        del buf[:end]

        command = _COMMANDS.get(kind)
        if command is Command.DISC:
            self._move(Phase.CLOSED)
            return Disconnect()
        problem = self._validate(command, kind, flags, offset, length)
        if problem is not None:
            return self._reject(kind, cookie, offset, length, *problem)
        assert command is not None
        flag_set = _FLAGS.get(flags)
        if flag_set is None:
            flag_set = _FLAGS[flags] = CommandFlag(flags)
        return Request(command, flag_set, cookie, offset, length, data)

    def _validate(
        self, command: Command | None, kind: int, flags: int, offset: int, length: int
    ) -> tuple[Errno, str] | None:
        export = self.export
        assert export is not None
        if command is None:
            return Errno.EINVAL, f"unknown command type {kind}"
        if command in _WRITING and self._export_flags & _READ_ONLY:
            return Errno.EPERM, "export is read-only"
        allowed = self._allowed.get(command)
        if allowed is None:
            if command is Command.BLOCK_STATUS:
                return Errno.EINVAL, "BLOCK_STATUS needs base:allocation selected"
            return Errno.EINVAL, f"command {command.name} is not supported"
        if flags & ~allowed:
            return Errno.EINVAL, f"flags {flags:#x} not valid for {command.name}"
        needed = _NEEDS_FLAG.get(command)
        if needed is not None and not self._export_flags & needed:
            return Errno.EINVAL, f"{command.name} was not advertised"
        if command is Command.FLUSH:
            if offset or length:
                return Errno.EINVAL, "FLUSH must have offset and length 0"
            return None
        if length == 0:
            return Errno.EINVAL, f"{command.name} of length 0"
        if command is Command.READ and length > MAX_PAYLOAD:
            return Errno.EINVAL, f"READ of {length} bytes exceeds {MAX_PAYLOAD}"
        if offset + length > export.size:
            error = _PAST_END_ERROR.get(command, Errno.EINVAL)
            return error, f"range {offset}+{length} exceeds size {export.size}"
        return None

    def _reject(
        self, kind: int, cookie: int, offset: int, length: int, error: Errno, why: str
    ) -> RequestRejected:
        self._out += self.error_reply(cookie, kind, error, why)
        return RequestRejected(kind, cookie, offset, length, error, why)


def _parse_meta_request(payload: bytes) -> tuple[str, list[str]] | str:
    """Split a LIST/SET_META_CONTEXT payload into (export name, queries)."""
    try:
        (name_len,) = struct.unpack_from(">I", payload)
        if name_len > MAX_STRING:
            return f"export name length {name_len} exceeds {MAX_STRING}"
        name = payload[4 : 4 + name_len].decode()
        pos = 4 + name_len
        (count,) = struct.unpack_from(">I", payload, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (qlen,) = struct.unpack_from(">I", payload, pos)
            if qlen > MAX_STRING or pos + 4 + qlen > len(payload):
                return f"query length {qlen} does not fit the option"
            queries.append(payload[pos + 4 : pos + 4 + qlen].decode())
            pos += 4 + qlen
    except (struct.error, UnicodeDecodeError) as exc:
        return f"malformed meta context request ({exc})"
    if pos != len(payload) or len(name.encode()) != name_len:
        return "meta context request has trailing or missing bytes"
    return name, queries


def _parse_info_request(payload: bytes) -> tuple[str, set[int]] | str:
    """Split an INFO/GO payload into (name, info requests), or say what is wrong."""
    if len(payload) < 6:
        return f"INFO/GO payload is {len(payload)} bytes; needs at least 6"
    (name_len,) = struct.unpack_from(">I", payload)
    if name_len > MAX_STRING or 4 + name_len + 2 > len(payload):
        return f"export name length {name_len} does not fit the option"
    try:
        name = payload[4 : 4 + name_len].decode()
    except UnicodeDecodeError:
        return "export name is not UTF-8"
    (count,) = struct.unpack_from(">H", payload, 4 + name_len)
    rest = payload[6 + name_len :]
    if len(rest) != 2 * count:
        return f"{count} info requests announced, {len(rest)} bytes present"
    return name, set(struct.unpack(f">{count}H", rest))
