"""Events the server-side NBD connection hands to its caller, and what it takes back."""

from __future__ import annotations

from dataclasses import dataclass

from blockcrypt.nbd._constants import Command, CommandFlag, Errno, TransmissionFlag


@dataclass(frozen=True, slots=True)
class Export:
    """What the server offers under one export name."""

    name: str
    size: int
    flags: TransmissionFlag
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024
    #: Offer the ``base:allocation`` context (BLOCK_STATUS) to clients that
    #: negotiate structured replies. Only if every range the server reports
    #: as zero really reads as zeros.
    block_status: bool = False


@dataclass(frozen=True, slots=True)
class ExportChosen:
    """The handshake ended; transmission starts on ``export``."""

    export: Export


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request in transmission phase.

    ``data`` is set for WRITE only: a buffer the receiver owns and may modify.
    """

    command: Command
    flags: CommandFlag
    cookie: int
    offset: int
    length: int
    data: bytearray | None = None


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request failed validation; its error reply is already queued."""

    command: int
    cookie: int
    offset: int
    length: int
    error: Errno
    reason: str


@dataclass(frozen=True, slots=True)
class OptionRefused:
    """An option got an error reply (queued already); negotiation goes on."""

    option: int
    reply: int
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client asked to end the session (NBD_CMD_DISC or NBD_OPT_ABORT).

    Answer every request received before it, then close. No reply is owed.
    """


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client hung up (end of stream)."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event`` when more bytes are needed.
NEED_DATA = _NeedData()

Event = (
    ExportChosen
    | Request
    | RequestRejected
    | OptionRefused
    | Disconnect
    | ConnectionClosed
)
