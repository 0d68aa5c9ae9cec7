"""The asyncio shell around one sans-IO NBD connection.

Small reads and writes run inline on the event loop: one ``pread`` or
``pwrite`` and one C cipher call cost a few microseconds, less than handing
the request to a thread and back. Everything that can take long (requests
above ``_INLINE_MAX``, FLUSH, FUA, TRIM, WRITE_ZEROES) runs in the thread
pool, so requests on one connection proceed in parallel and their replies
go out in completion order. A reply's header and payload are written with
no other write in between, so replies never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import cast

from blockcrypt.errors import BlockcryptError
from blockcrypt.nbd import (
    NEED_DATA,
    Command,
    CommandFlag,
    ConnectionClosed,
    Disconnect,
    Errno,
    Export,
    ExportChosen,
    NBDServerConnection,
    OptionRefused,
    RemoteProtocolError,
    Request,
    RequestRejected,
)
from blockcrypt.volume.device import Volume

log = logging.getLogger("blockcrypt.server")
access = logging.getLogger("blockcrypt.access")

#: Largest READ or WRITE handled on the event loop itself.
_INLINE_MAX = 64 * 1024
_INLINE_READ_MAX = 256 * 1024  # reads: one C call, no lock; beats a pool handoff
#: Requests in the thread pool per connection before we stop reading from it.
_MAX_IN_FLIGHT = 32
#: READ/WRITE bytes in the thread pool per connection before we stop reading.
_MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
#: Reply bytes gathered in one batch before they are written out.
_MAX_BATCH_BYTES = 4 * 1024 * 1024
#: Seconds a client gets to finish the handshake.
HANDSHAKE_TIMEOUT = 30.0
#: Bytes all connections together may hold in the pool and in send buffers.
DEFAULT_BUDGET = 256 * 1024 * 1024
_SOCKET_BUFFER = 4 * 1024 * 1024
_ids = itertools.count(1)
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_PAYLOAD_COMMANDS = frozenset({Command.READ, Command.WRITE})


class ByteBudget:
    """Bytes held for clients by every connection together: payloads in the
    thread pool and replies still queued in transports. A connection stops
    taking requests while the total is over the limit, so a crowd of clients
    that never read their replies cannot exhaust memory."""

    def __init__(self, limit: int = DEFAULT_BUDGET) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = []

    @property
    def used(self) -> int:
        return self._used

    def over(self) -> bool:
        return self._used >= self.limit

    def change(self, delta: int) -> None:
        with self._lock:
            self._used += delta
            if delta >= 0 or self._used >= self.limit or not self._waiters:
                return
            waiters, self._waiters = self._waiters, []
        for loop, wake in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(wake)

    def wait(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        """Call ``wake`` on ``loop`` once the total is below the limit."""
        with self._lock:
            if self._used >= self.limit:
                self._waiters.append((loop, wake))
                return
        loop.call_soon_threadsafe(wake)


class ClientSession(asyncio.Protocol):
    """Serve one client until it disconnects, breaks the framing or we shut down."""

    def __init__(
        self,
        volume: Volume,
        export: Export,
        executor: Executor,
        preinit: bool = False,
        budget: ByteBudget | None = None,
    ) -> None:
        self.id = next(_ids)
        self._budget = budget or ByteBudget()
        self._charged_buffer = 0  # our share of the budget for queued replies
        self._volume = volume
        self._executor = executor
        self._proto = NBDServerConnection([export], preinit=preinit)
        self._transport: asyncio.Transport | None = None
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._jobs: set[asyncio.Future[object]] = set()
        self._batch_bytes = 0
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False  # no more requests will be read
        self._shutting_down = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._debug = access.isEnabledFor(logging.DEBUG)
        # Replies made while one batch of input is parsed leave in one write:
        # a send per 16-byte reply header would cost more than the request.
        self._batch: list[bytes | bytearray | memoryview] | None = None

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Room for a few large replies, so a 1 MiB READ rarely has to wait
            # in the transport's own buffer (one more copy).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        peer = transport.get_extra_info("peername") or "unix"
        log.info("client connected", extra={"conn": self.id, "peer": str(peer)})
        if self._proto.export is None:
            loop = asyncio.get_running_loop()
            self._handshake_timer = loop.call_later(
                HANDSHAKE_TIMEOUT, self._handshake_expired
            )
        self._flush_proto()

    def _handshake_expired(self) -> None:
        log.warning(
            "handshake not finished in time; closing",
            extra={"conn": self.id, "timeout": HANDSHAKE_TIMEOUT},
        )
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._proto.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        if not self._closing:
            self._proto.receive_data(b"")
            self._pump()
        return True  # keep the transport open until in-flight replies are out

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        for job in list(self._jobs):
            job.cancel()  # work not started yet is dropped; nobody is listening
        self._budget.change(-self._charged_buffer)
        self._charged_buffer = 0
        if not self.done.done():
            self.done.set_result(None)
        log.info("client disconnected", extra={"conn": self.id})

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._charge_buffer()
        self._pump()  # requests may be waiting in the parser's buffer

    def abort(self) -> None:
        """Drop the connection now, replies or not (end of shutdown)."""
        if self._transport is not None:
            self._transport.abort()

    def stop(self) -> None:
        """Stop taking requests: those already received are answered ESHUTDOWN,
        those in flight still get their real replies."""
        self._shutting_down = True
        self._pump()  # drain what the parser holds, answering ESHUTDOWN
        self._closing = True
        self._maybe_close()

    # -- event handling -------------------------------------------------------

    def _must_wait(self) -> bool:
        """Whether to stop taking requests until replies drain or work finishes."""
        return (
            self._writing_paused
            or self._in_flight >= _MAX_IN_FLIGHT
            or self._in_flight_bytes >= _MAX_IN_FLIGHT_BYTES
            or self._batch_bytes >= _MAX_BATCH_BYTES
            or self._budget.over()
        )

    def _pump(self) -> None:
        """Handle buffered requests until the parser needs data or we must wait."""
        more = True
        while more and not self._closing:
            more = self._pump_batch()
        self._flush_proto()
        self._update_reading()
        self._maybe_close()

    def _pump_batch(self) -> bool:
        """Handle requests, writing their replies in one go; True if cut short."""
        proto = self._proto
        self._batch = []
        self._batch_bytes = 0
        try:
            while not self._closing:
                if self._must_wait():
                    return self._batch_bytes >= _MAX_BATCH_BYTES and not (
                        self._writing_paused
                    )
                event = proto.next_event()
                if event is NEED_DATA:
                    return False
                if type(event) is Request:
                    self._dispatch(event)
                else:
                    self._other_event(event)
            return False
        except RemoteProtocolError as exc:
            log.warning(
                "client broke the protocol; closing",
                extra={"conn": self.id, "reason": str(exc)},
            )
            self._closing = True
            return False
        finally:
            batch, self._batch = self._batch, None
            self._batch_bytes = 0
            self._write_all(batch)

    def _write_all(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        transport = self._transport
        if not chunks or transport is None or transport.is_closing():
            return
        transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        self._charge_buffer()

    def _charge_buffer(self) -> None:
        """Bring our share of the budget in line with what the transport holds."""
        transport = self._transport
        queued = 0 if transport is None else transport.get_write_buffer_size()
        if queued != self._charged_buffer:
            self._budget.change(queued - self._charged_buffer)
            self._charged_buffer = queued

    def _other_event(self, event: object) -> None:
        if isinstance(event, RequestRejected):
            if self._debug:
                access.debug(
                    "request rejected",
                    extra={
                        "conn": self.id,
                        "cmd": event.command,
                        "offset": event.offset,
                        "length": event.length,
                        "nbd_errno": event.error.name,
                        "reason": event.reason,
                    },
                )
        elif isinstance(event, OptionRefused):
            log.debug(
                "option refused",
                extra={"conn": self.id, "option": event.option, "reason": event.reason},
            )
        elif isinstance(event, ExportChosen):
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
                self._handshake_timer = None
            log.info(
                "transmission started",
                extra={"conn": self.id, "export": event.export.name},
            )
        elif isinstance(event, (Disconnect, ConnectionClosed)):
            self._closing = True

    def _dispatch(self, req: Request) -> None:
        if self._shutting_down:
            self._reply(req, Errno.ESHUTDOWN, None)
            return
        command = req.command
        flags = int(req.flags)  # IntFlag's & runs in Python; an int's does not
        fua = flags & _FUA
        if command is Command.BLOCK_STATUS:
            one = bool(flags & _REQ_ONE)
            self._run_inline(req, self._volume.extents, req.offset, req.length,
                             1 if one else 1024)  # fmt: skip
        elif command is Command.READ and req.length <= _INLINE_READ_MAX:
            self._run_inline(req, self._volume.pread, req.offset, req.length)
        elif command is Command.WRITE and req.length <= _INLINE_MAX and not fua:
            self._run_inline(req, self._volume.write_owned, req.offset, req.data, False)
        else:
            self._run_in_pool(req, *self._job(req, flags))

    def _job(
        self, req: Request, flags: int
    ) -> tuple[Callable[..., object], tuple[object, ...]]:
        fua = bool(flags & _FUA)
        vol = self._volume
        command = req.command
        if command is Command.READ:
            return vol.pread, (req.offset, req.length)
        if command is Command.WRITE:
            return vol.write_owned, (req.offset, req.data, fua)
        if command is Command.FLUSH:
            return vol.flush, ()
        if command is Command.TRIM:
            return vol.trim, (req.offset, req.length, fua)
        no_hole = bool(flags & _NO_HOLE)
        fast = bool(flags & _FAST_ZERO)
        return vol.write_zeroes, (req.offset, req.length, no_hole, fast, fua)

    def _run_inline(
        self, req: Request, func: Callable[..., object], *args: object
    ) -> None:
        try:
            result = func(*args)
        except Exception as exc:  # noqa: BLE001 - turned into an NBD error
            self._reply(req, self._error_for(req, exc), None)
        else:
            self._reply(req, Errno.OK, result)

    def _run_in_pool(
        self, req: Request, func: Callable[..., object], args: tuple[object, ...]
    ) -> None:
        loop = asyncio.get_running_loop()
        weight = req.length if req.command in _PAYLOAD_COMMANDS else 0
        self._in_flight += 1
        self._in_flight_bytes += weight
        self._budget.change(weight)
        future = loop.run_in_executor(self._executor, func, *args)
        self._jobs.add(future)
        future.add_done_callback(lambda f: self._pool_done(req, weight, f))

    def _pool_done(
        self, req: Request, weight: int, future: Future[object] | asyncio.Future[object]
    ) -> None:
        self._jobs.discard(future)
        self._in_flight -= 1
        self._in_flight_bytes -= weight
        self._budget.change(-weight)
        if future.cancelled():
            pass
        elif (exc := future.exception()) is not None:
            self._reply(req, self._error_for(req, exc), None)
        else:
            self._reply(req, Errno.OK, future.result())
        if self._closing:
            self._maybe_close()
        else:
            self._pump()  # a slot is free: take buffered requests

    def _error_for(self, req: Request, exc: BaseException) -> Errno:
        if isinstance(exc, BlockcryptError):
            code = _to_errno(exc.nbd_errno)
            if code is not Errno.ENOTSUP:
                log.error(
                    "request failed",
                    extra={
                        "conn": self.id,
                        "cmd": req.command.name,
                        "offset": req.offset,
                        "length": req.length,
                        "nbd_errno": code.name,
                        "reason": str(exc),
                    },
                )
            return code
        log.error(
            "unexpected error in request",
            exc_info=exc,
            extra={"conn": self.id, "cmd": req.command.name},
        )
        return Errno.EIO

    # -- output ---------------------------------------------------------------

    def _reply(self, req: Request, error: Errno, data: object) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._debug:
            access.debug(
                "request",
                extra={
                    "conn": self.id,
                    "cmd": req.command.name,
                    "offset": req.offset,
                    "length": req.length,
                    "nbd_errno": error.name,
                },
            )
        proto = self._proto
        if error:
            header, data = proto.error_reply(req.cookie, req.command, error), None
        elif req.command is Command.READ:
            payload = cast("bytes | bytearray | memoryview", data)
            header = proto.read_reply_header(req.cookie, req.offset, len(payload))
        elif req.command is Command.BLOCK_STATUS:
            extents = cast("list[tuple[int, int]]", data)
            header, data = proto.block_status_reply(req.cookie, extents), None
        else:
            header, data = proto.reply_header(req.cookie), None
        batch = self._batch
        if batch is not None:
            batch.append(header)
            if data is not None:
                batch.append(data)  # type: ignore[arg-type]
                self._batch_bytes += len(data)  # type: ignore[arg-type]
            return
        # Nothing else runs between these two writes: the loop is single-threaded.
        transport.write(header)
        if data is not None:
            transport.write(data)  # type: ignore[arg-type]
        self._charge_buffer()

    def _flush_proto(self) -> None:
        data = self._proto.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        want_pause = self._must_wait()
        if want_pause and self._budget.over():
            self._budget.wait(asyncio.get_running_loop(), self._pump)
        if want_pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    def _maybe_close(self) -> None:
        if self._closing and self._in_flight == 0 and self._transport is not None:
            if not self._transport.is_closing():
                self._transport.close()


def _to_errno(code: int) -> Errno:
    try:
        return Errno(code)
    except ValueError:
        return Errno.EIO
