"""Sans-IO NBD server protocol: bytes in, events out, replies back to bytes.

Nothing in this package performs I/O or imports asyncio.
"""

from blockcrypt.nbd._connection import NBDServerConnection, Phase
from blockcrypt.nbd._constants import (
    MAX_PAYLOAD,
    Command,
    CommandFlag,
    Errno,
    Option,
    OptionReply,
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
)
from blockcrypt.nbd.errors import (
    LocalProtocolError,
    NBDProtocolError,
    RemoteProtocolError,
)

__all__ = [
    "MAX_PAYLOAD",
    "NEED_DATA",
    "Command",
    "CommandFlag",
    "ConnectionClosed",
    "Disconnect",
    "Errno",
    "Event",
    "Export",
    "ExportChosen",
    "LocalProtocolError",
    "NBDProtocolError",
    "NBDServerConnection",
    "Option",
    "OptionRefused",
    "OptionReply",
    "Phase",
    "RemoteProtocolError",
    "Request",
    "RequestRejected",
    "TransmissionFlag",
]
