"""Listening sockets, signals and staged shutdown for one served volume."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

from blockcrypt.errors import ConfigError
from blockcrypt.nbd import Export, TransmissionFlag
from blockcrypt.server.connection import ClientSession
from blockcrypt.volume.device import Volume

__all__ = ["ListenSpec", "export_for", "serve"]

log = logging.getLogger("blockcrypt.server")

_WRITE_FLAGS = (
    TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)
#: Seconds in-flight requests get to finish once shutdown starts.
_DRAIN_TIMEOUT = 30.0
_SD_LISTEN_FDS_START = 3


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """Where to listen: a Unix socket path, a TCP host and port, or systemd's fd."""

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None
    activated_fd: int | None = None

    @classmethod
    def parse_tcp(cls, value: str) -> ListenSpec:
        """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (loopback)."""
        host, sep, port = value.rpartition(":")
        if not sep:
            host, port = "127.0.0.1", value
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"--listen {value!r}: expected HOST:PORT with a port 1-65535"
            )
        return cls(host=host, port=int(port))

    @classmethod
    def from_systemd(cls) -> ListenSpec | None:
        """Return the socket passed by systemd socket activation, if any."""
        if os.environ.get("LISTEN_PID") != str(os.getpid()):
            return None
        count = int(os.environ.get("LISTEN_FDS", "0") or 0)
        if count < 1:
            return None
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        return cls(activated_fd=_SD_LISTEN_FDS_START)


def export_for(volume: Volume, name: str) -> Export:
    """Describe ``volume`` as an NBD export."""
    flags = (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.CAN_MULTI_CONN  # one file and one cache for every client
    )
    if volume.read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= _WRITE_FLAGS
    return Export(
        name=name,
        size=volume.size,
        flags=flags,
        description=f"blockcrypt volume {volume.header.uuid}",
        min_block=1,
        preferred_block=volume.sector_size,
        max_block=32 * 1024 * 1024,
    )


async def serve(
    volume: Volume,
    listen: ListenSpec,
    export_name: str = "",
    on_ready: Callable[[str], None] | None = None,
    preconnected: Sequence[socket.socket] = (),
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``volume`` until SIGTERM or SIGINT, then shut down in stages.

    ``preconnected`` sockets (one end of a socketpair whose other end went to
    the kernel's NBD driver) are served in transmission phase, no handshake.
    Setting ``stop`` ends serving as a signal would.
    """
    export = export_for(volume, export_name)
    executor = ThreadPoolExecutor(max_workers=max(4, (os.cpu_count() or 1) * 2))
    sessions: set[ClientSession] = set()
    loop = asyncio.get_running_loop()

    def new_session(preinit: bool = False) -> ClientSession:
        session = ClientSession(volume, export, executor, preinit)
        sessions.add(session)
        session.done.add_done_callback(lambda _: sessions.discard(session))
        return session

    server = await _start_server(new_session, listen)
    for sock in preconnected:
        await loop.connect_accepted_socket(lambda: new_session(True), sock)
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "listening",
        extra={
            "address": _describe(listen),
            "export": export_name,
            "size": volume.size,
            "read_only": volume.read_only,
        },
    )
    if on_ready is not None:
        on_ready(_uri(listen, export_name))
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await _shutdown(server, sessions, listen)
        executor.shutdown(wait=True)


async def _shutdown(
    server: asyncio.base_events.Server,
    sessions: set[ClientSession],
    listen: ListenSpec,
) -> None:
    # 1. Stop accepting new clients and remove our socket file.
    log.info("shutdown: no longer accepting clients")
    server.close()
    if listen.unix_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen.unix_path)
    # 2. Ask every session to stop reading; requests in flight still get answers.
    for session in list(sessions):
        session.stop()
    # 3. Wait for their replies to go out, then drop whoever is left.
    waiting = [s.done for s in sessions if not s.done.done()]
    if waiting:
        log.info("shutdown: waiting for clients", extra={"clients": len(waiting)})
        await asyncio.wait(waiting, timeout=_DRAIN_TIMEOUT)
    for session in list(sessions):
        session.abort()
    log.info("shutdown: done")


async def _start_server(
    factory: Callable[[], ClientSession], listen: ListenSpec
) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    if listen.activated_fd is not None:
        sock = socket.socket(fileno=listen.activated_fd)
        if sock.family == socket.AF_UNIX:
            return await loop.create_unix_server(factory, sock=sock)
        return await loop.create_server(factory, sock=sock)
    if listen.unix_path is not None:
        _clear_stale_socket(listen.unix_path)
        old_umask = os.umask(0o177)  # the socket carries plaintext: owner only
        try:
            return await loop.create_unix_server(factory, path=listen.unix_path)
        finally:
            os.umask(old_umask)
    try:
        return await loop.create_server(factory, host=listen.host, port=listen.port)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {listen.host}:{listen.port}: {exc.strerror}"
        ) from exc


def _clear_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(
            f"--socket {path} exists and is not a socket; pick another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left behind by a server that died
        return
    finally:
        probe.close()
    raise ConfigError(f"--socket {path} is in use by a running server")


def _uri(listen: ListenSpec, export_name: str) -> str:
    name = quote(export_name)
    if listen.unix_path:
        return f"nbd+unix:///{name}?socket={listen.unix_path}"
    if listen.activated_fd is not None:
        return "(socket passed by systemd)"
    host = f"[{listen.host}]" if ":" in (listen.host or "") else listen.host
    return f"nbd://{host}:{listen.port}/{name}"


def _describe(listen: ListenSpec) -> str:
    if listen.unix_path:
        return f"unix:{listen.unix_path}"
    if listen.activated_fd is not None:
        return "systemd socket"
    return f"tcp:{listen.host}:{listen.port}"
