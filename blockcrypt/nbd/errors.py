"""Errors of the NBD protocol layer."""

from __future__ import annotations

from blockcrypt.errors import BlockcryptError

__all__ = ["NBDProtocolError", "LocalProtocolError", "RemoteProtocolError"]


class NBDProtocolError(BlockcryptError):
    """The NBD conversation cannot go on."""


class RemoteProtocolError(NBDProtocolError):
    """The client broke the protocol's framing; the connection must close."""


class LocalProtocolError(NBDProtocolError):
    """This program misused the protocol layer (a bug here, not in the client)."""
