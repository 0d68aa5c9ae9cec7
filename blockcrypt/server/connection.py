"""The asyncio shell around one sans-IO NBD connection."""

from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import Executor

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

_READ_CHUNK = 256 * 1024
#: Requests one connection may have in flight before we stop reading from it.
_MAX_IN_FLIGHT = 64
_ids = itertools.count(1)


class ClientSession:
    """Serve one client until it disconnects, breaks the framing or we shut down."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        volume: Volume,
        export: Export,
        executor: Executor,
        preinit: bool = False,
    ) -> None:
        self.id = next(_ids)
        self._reader = reader
        self._writer = writer
        self._volume = volume
        self._executor = executor
        self._proto = NBDServerConnection([export], preinit=preinit)
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(_MAX_IN_FLIGHT)
        self._shutting_down = False

    async def run(self) -> None:
        peer = self._writer.get_extra_info("peername") or "unix"
        log.info("client connected", extra={"conn": self.id, "peer": str(peer)})
        try:
            await self._flush()
            await self._loop()
        except RemoteProtocolError as exc:
            log.warning(
                "client broke the protocol; closing",
                extra={"conn": self.id, "reason": str(exc)},
            )
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("client connection lost", extra={"conn": self.id})
        finally:
            await self._finish()

    def stop(self) -> None:
        """Stop reading new requests; in-flight ones still get replies."""
        self._shutting_down = True
        self._reader.feed_eof()

    async def _loop(self) -> None:
        while True:
            event = self._proto.next_event()
            if event is NEED_DATA:
                await self._flush()
                data = await self._reader.read(_READ_CHUNK)
                self._proto.receive_data(data)
                continue
            if isinstance(event, Request):
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(event, RequestRejected):
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
                await self._flush()
            elif isinstance(event, OptionRefused):
                log.debug(
                    "option refused",
                    extra={"conn": self.id, "option": event.option, "reason": event.reason},
                )
            elif isinstance(event, ExportChosen):
                log.info(
                    "transmission started",
                    extra={"conn": self.id, "export": event.export.name},
                )
            elif isinstance(event, (Disconnect, ConnectionClosed)):
                await self._flush()
                return

    async def _flush(self) -> None:
        data = self._proto.data_to_send()
        if data:
            async with self._write_lock:
                self._writer.write(data)
                await self._writer.drain()

    async def _handle(self, req: Request) -> None:
        try:
            error, data = await self._execute(req)
            header = self._proto.reply_header(req.cookie, error)
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
            async with self._write_lock:
                # Header and payload leave together so replies never interleave.
                self._writer.write(header + data if data else header)
                await self._writer.drain()
        except (ConnectionError, RuntimeError):
            pass  # the client went away; nothing to answer
        finally:
            self._slots.release()

    async def _execute(self, req: Request) -> tuple[Errno, bytes]:
        if self._shutting_down:
            return Errno.ESHUTDOWN, b""
        loop = asyncio.get_running_loop()
        vol = self._volume
        fua = bool(req.flags & CommandFlag.FUA)
        try:
            if req.command is Command.READ:
                data = await loop.run_in_executor(
                    self._executor, vol.pread, req.offset, req.length
                )
                return Errno.OK, data
            if req.command is Command.WRITE:
                assert req.data is not None
                await loop.run_in_executor(
                    self._executor, vol.pwrite, req.offset, req.data, fua
                )
            elif req.command is Command.FLUSH:
                await loop.run_in_executor(self._executor, vol.flush)
            elif req.command is Command.TRIM:
                await loop.run_in_executor(
                    self._executor, vol.trim, req.offset, req.length, fua
                )
            elif req.command is Command.WRITE_ZEROES:
                no_hole = bool(req.flags & CommandFlag.NO_HOLE)
                fast = bool(req.flags & CommandFlag.FAST_ZERO)
                await loop.run_in_executor(
                    self._executor,
                    vol.write_zeroes,
                    req.offset,
                    req.length,
                    no_hole,
                    fast,
                    fua,
                )
            return Errno.OK, b""
        except BlockcryptError as exc:
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
            return code, b""
        except Exception:
            log.exception(
                "unexpected error in request",
                extra={"conn": self.id, "cmd": req.command.name},
            )
            return Errno.EIO, b""

    async def _finish(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._flush()
        except ConnectionError:
            pass
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        log.info("client disconnected", extra={"conn": self.id})


def _to_errno(code: int) -> Errno:
    try:
        return Errno(code)
    except ValueError:
        return Errno.EIO
