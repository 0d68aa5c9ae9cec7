"""Listening sockets, signals and staged shutdown for one served volume."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import itertools
import logging
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

from blockcrypt.crypto import FAST_BACKEND_ERROR
from blockcrypt.errors import UsageError, VolumeBusy
from blockcrypt.nbd import Export, TransmissionFlag
from blockcrypt.server.connection import ByteBudget, ClientSession
from blockcrypt.volume.device import Volume

__all__ = ["ListenSpec", "export_for", "serve"]

log = logging.getLogger("blockcrypt.server")

_WRITE_FLAGS = (
    TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)
#: Clients served at once; more wait in the listen backlog.
DEFAULT_MAX_CONNECTIONS = 256
#: Signals that start a clean shutdown (SIGHUP: the terminal went away).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Seconds in-flight requests get to finish once shutdown starts.
_DRAIN_TIMEOUT = 30.0
_SD_LISTEN_FDS_START = 3
# glibc mallopt() parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


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
            raise UsageError(
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
        block_status=True,  # Volume.extents reports zero only for real holes
    )


async def serve(
    volume: Volume,
    listen: ListenSpec | None,
    export_name: str = "",
    on_ready: Callable[[str], None] | None = None,
    preconnected: Sequence[socket.socket] = (),
    stop: asyncio.Event | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Serve ``volume`` until SIGTERM or SIGINT, then shut down in stages.

    ``preconnected`` sockets (one end of a socketpair whose other end went to
    the kernel's NBD driver) are served in transmission phase, no handshake.
    Setting ``stop`` ends serving as a signal would. With ``listen`` None,
    only the preconnected sockets are served.
    """
    export = export_for(volume, export_name)
    executor = ThreadPoolExecutor(max_workers=max(4, (os.cpu_count() or 1) * 2))
    loop = asyncio.get_running_loop()
    _warn_if_slow_cipher()
    _keep_freed_buffers()
    if listen is not None:
        _warn_if_tcp(listen)

    # Each worker thread runs its own event loop; connections are spread over
    # them so that several clients (multi-conn) use several cores.
    budget = ByteBudget()
    workers = [
        _Worker(volume, export, executor, budget, i) for i in range(_loop_count())
    ]
    listener = _listening_socket(listen) if listen is not None else None
    for i, sock in enumerate(preconnected):
        workers[i % len(workers)].adopt(sock, preinit=True)
    accepting = None
    if listener is not None:
        accepting = asyncio.create_task(
            _accept(loop, listener, workers, max_connections)
        )

    stop = stop or asyncio.Event()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "listening",
        extra={
            "address": _describe(listen) if listen is not None else "kernel only",
            "export": export_name,
            "size": volume.size,
            "read_only": volume.read_only,
            "event_loops": len(workers),
        },
    )
    if on_ready is not None:
        on_ready(_uri(listen, export_name) if listen is not None else "")
    try:
        await stop.wait()
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
        await _shutdown(accepting, listener, workers, listen)
        executor.shutdown(wait=True)


async def _shutdown(
    accepting: asyncio.Task[None] | None,
    listener: socket.socket | None,
    workers: list[_Worker],
    listen: ListenSpec | None,
) -> None:
    # 1. Stop accepting new clients and remove our socket file.
    log.info("shutdown: no longer accepting clients")
    if accepting is not None:
        accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accepting
    if listener is not None:
        listener.close()
    if listen is not None and listen.unix_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen.unix_path)
    # 2. Every worker asks its sessions to stop reading, waits for the replies
    #    of requests in flight, then drops whoever is left.
    await asyncio.gather(*(w.drain(_DRAIN_TIMEOUT) for w in workers))
    for worker in workers:
        worker.close()
    log.info("shutdown: done")


async def _accept(
    loop: asyncio.AbstractEventLoop,
    listener: socket.socket,
    workers: list[_Worker],
    max_connections: int,
) -> None:
    turn = itertools.cycle(workers)
    last_warning = -60.0
    active = 0
    slot_freed = asyncio.Event()

    def closed() -> None:  # runs on this loop when a session ends
        nonlocal active
        active -= 1
        slot_freed.set()

    while True:
        # At the limit, leave new clients waiting in the listen backlog.
        while active >= max_connections:
            if loop.time() - last_warning > 60:
                log.warning(
                    "connection limit reached", extra={"limit": max_connections}
                )
                last_warning = loop.time()
            slot_freed.clear()
            await slot_freed.wait()
        try:
            conn, _ = await loop.sock_accept(listener)
        except OSError as exc:
            # Out of file descriptors, most likely: say so once a minute, not
            # once per attempt, and give clients time to go away.
            if loop.time() - last_warning > 60:
                log.warning("cannot accept connections", extra={"reason": str(exc)})
                last_warning = loop.time()
            await asyncio.sleep(0.1)
            continue
        active += 1
        next(turn).adopt(conn, on_close=lambda: _call_soon(loop, closed))


def _call_soon(loop: asyncio.AbstractEventLoop, func: Callable[[], None]) -> None:
    loop.call_soon_threadsafe(func)


class _Worker:
    """An event loop in its own thread, serving the connections given to it."""

    def __init__(
        self,
        volume: Volume,
        export: Export,
        executor: Executor,
        budget: ByteBudget,
        n: int,
    ) -> None:
        self._budget = budget
        self._volume = volume
        self._export = export
        self._executor = executor
        self.sessions: set[ClientSession] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, name=f"nbd-loop-{n}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def adopt(
        self,
        sock: socket.socket,
        preinit: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """Serve ``sock`` on this worker (callable from any thread).

        ``on_close`` runs in this worker's thread when the connection ends.
        """
        coro = self._adopt(sock, preinit, on_close or (lambda: None))
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _adopt(
        self, sock: socket.socket, preinit: bool, on_close: Callable[[], None]
    ) -> None:
        def factory() -> ClientSession:
            session = ClientSession(
                self._volume, self._export, self._executor, preinit, self._budget
            )
            self.sessions.add(session)

            def ended(_: object) -> None:
                self.sessions.discard(session)
                on_close()

            session.done.add_done_callback(ended)
            return session

        try:
            await self.loop.connect_accepted_socket(factory, sock)
        except OSError as exc:
            log.warning("could not serve a connection", extra={"reason": str(exc)})
            sock.close()
            on_close()

    async def drain(self, timeout: float) -> None:
        """Stop this worker's sessions, waiting up to ``timeout`` for replies."""
        future = asyncio.run_coroutine_threadsafe(self._drain(timeout), self.loop)
        await asyncio.wrap_future(future)

    async def _drain(self, timeout: float) -> None:
        for session in list(self.sessions):
            session.stop()
        waiting = [s.done for s in self.sessions if not s.done.done()]
        if waiting:
            log.info("shutdown: waiting for clients", extra={"clients": len(waiting)})
            await asyncio.wait(waiting, timeout=timeout)
        for session in list(self.sessions):
            session.abort()
        await asyncio.sleep(0)  # let aborted transports run connection_lost

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _loop_count() -> int:
    value = os.environ.get("BLOCKCRYPT_EVENT_LOOPS")
    if value and value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, min(os.cpu_count() or 1, 8))


def _keep_freed_buffers() -> None:
    """Ask glibc to reuse freed request buffers instead of unmapping them.

    Every READ and WRITE takes a fresh buffer of up to 32 MiB. By default
    glibc serves such sizes with mmap and returns them on free, so each
    request pays page faults on memory it just had; that cost rivals the
    cipher. Keeping them in the heap makes large requests 20 to 70% faster
    here. The memory kept is bounded by what requests use at once.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 512 * 1024 * 1024)
    except (OSError, AttributeError):  # not glibc: keep its defaults
        pass


def _warn_if_slow_cipher() -> None:
    if FAST_BACKEND_ERROR is not None:
        message = (
            "the C sector cipher is not available, so every request runs "
            "through the pure-Python reference, about 10 to 40 times slower: "
            f"{FAST_BACKEND_ERROR}"
        )
        log.warning("slow cipher backend", extra={"reason": message})
        print(f"blockcrypt: WARNING: {message}", file=sys.stderr, flush=True)


def _warn_if_tcp(listen: ListenSpec) -> None:
    if listen.host is None:
        return
    loopback = listen.host in ("127.0.0.1", "::1", "localhost")
    where = (
        "every local user can connect"
        if loopback
        else "anyone who can reach this address can connect"
    )
    message = (
        f"serving plaintext over TCP on {listen.host}:{listen.port} without TLS or "
        f"authentication: {where} and read or write the volume; prefer --socket"
    )
    log.warning("plaintext over TCP", extra={"reason": message})
    print(f"blockcrypt: WARNING: {message}", file=sys.stderr, flush=True)


def _listening_socket(listen: ListenSpec) -> socket.socket:
    if listen.activated_fd is not None:
        sock = socket.socket(fileno=listen.activated_fd)
    elif listen.unix_path is not None:
        _clear_stale_socket(listen.unix_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket carries plaintext: owner only
        try:
            sock.bind(listen.unix_path)
        except (OSError, ValueError) as exc:
            sock.close()
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UsageError(
                f"cannot listen on --socket {listen.unix_path}: {reason}"
            ) from exc
        finally:
            os.umask(old_umask)
        sock.listen(128)
    else:
        try:
            sock = socket.create_server((listen.host or "127.0.0.1", listen.port or 0))
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {listen.host}:{listen.port}: {exc.strerror}"
            ) from exc
    sock.setblocking(False)
    return sock


def _clear_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(
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
    raise VolumeBusy(
        f"--socket {path} is in use by a running server; stop it or pick another path"
    )


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
