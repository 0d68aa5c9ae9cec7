"""Attach a volume to the kernel's NBD driver through generic netlink.

Rules of this module:

* Message layout follows the kernel's ``include/uapi/linux/nbd-netlink.h``:
  family ``"nbd"`` version 1, no family header; commands CONNECT 1,
  DISCONNECT 2, RECONFIGURE 3, LINK_DEAD 4, STATUS 5; attributes numbered in
  the order of :class:`NBDMessage.nla_map`. ``NBD_ATTR_SOCKETS`` nests one
  ``NBD_SOCK_ITEM`` per socket, and *every* item has type 1 (the kernel
  rejects other types), each holding ``NBD_SOCK_FD`` (type 1, u32).
* The socket fds are looked up in the sending process's file table while the
  kernel handles CONNECT, so the process that sends it must hold them open;
  the kernel takes its own reference, after which we may close ours.
* The transmission flags we pass must equal what the export advertises
  (:func:`blockcrypt.server.daemon.export_for`), so the kernel behaves as an
  NBD client of that export would.
* A missing ``nbd`` module shows up as ENOENT when resolving the family; it
  becomes a :class:`KernelNBDError` that says to run ``modprobe nbd``.
* pyroute2's synchronous socket runs its own asyncio loop, so call these
  functions from a worker thread when an event loop is running.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from blockcrypt.errors import KernelNBDError

__all__ = [
    "NBD_CMD_CONNECT",
    "NBD_CMD_DISCONNECT",
    "NBD_CMD_STATUS",
    "NBDMessage",
    "NBDNetlink",
    "check_module",
    "connect_message",
    "device_index",
    "disconnect_message",
    "nbd_client_argv",
    "status_message",
    "AttachmentRegistry",
]

FAMILY = "nbd"
GENL_VERSION = 1
NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
NBD_CMD_LINK_DEAD = 4
NBD_CMD_STATUS = 5
#: NBD_CFLAG_DISCONNECT_ON_CLOSE is not set: the device outlives a crash of
#: the sending socket only as long as the server end is alive, which is ours.
DEFAULT_TIMEOUT = 30
DEFAULT_DEAD_CONN_TIMEOUT = 60

_MODPROBE_HINT = (
    "the kernel NBD driver is not loaded (generic netlink family 'nbd' not "
    "found); run `modprobe nbd` as root (package linux-image-* ships it; a "
    "container needs it loaded on the host), or serve the volume with "
    "`blockcrypt serve` and connect any NBD client to its socket"
)


class NBDMessage(genlmsg):  # type: ignore[misc]
    """A message of the ``nbd`` generic netlink family.

    The map order is the attribute numbering: index 0 is NBD_ATTR_UNSPEC.
    pyroute2 caches the compiled map per class, so this class is complete in
    itself rather than a variant of another.
    """

    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "*sock_item"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
        ("NBD_ATTR_DEVICE_LIST", "*device_item"),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sock_item(nla):  # type: ignore[misc]  # noqa: N801 (pyroute2 naming)
        # Every element of the list is an NBD_SOCK_ITEM (type 1); without this
        # pyroute2 numbers the elements 1, 2, 3, ... and the kernel refuses.
        header_type = 1
        nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))

    class device_item(nla):  # type: ignore[misc]  # noqa: N801
        header_type = 1
        nla_map = (
            ("NBD_DEVICE_UNSPEC", "none"),
            ("NBD_DEVICE_INDEX", "uint32"),
            ("NBD_DEVICE_CONNECTED", "uint8"),
        )


def _message(cmd: int, attrs: list[tuple[str, Any]]) -> NBDMessage:
    msg = NBDMessage()
    msg["cmd"] = cmd
    msg["version"] = GENL_VERSION
    msg["attrs"] = attrs
    return msg


def connect_message(
    fds: Sequence[int],
    size: int,
    block_size: int,
    server_flags: int,
    timeout: int = DEFAULT_TIMEOUT,
    dead_conn_timeout: int = DEFAULT_DEAD_CONN_TIMEOUT,
    index: int | None = None,
) -> NBDMessage:
    """Build NBD_CMD_CONNECT.

    Raises:
        ValueError: no socket, a size that is not a multiple of the block
            size, a block size the kernel refuses, or more than one socket
            without CAN_MULTI_CONN (bit 8).
    """
    if not fds:
        raise ValueError("CONNECT needs at least one socket")
    if block_size not in (512, 1024, 2048, 4096):
        raise ValueError(
            f"block size is {block_size}; the kernel takes a power of two from "
            "512 to the page size (4096)"
        )
    if size <= 0 or size % block_size:
        raise ValueError(
            f"size is {size} bytes; expected a positive multiple of {block_size}"
        )
    if len(fds) > 1 and not server_flags & (1 << 8):
        raise ValueError(
            f"{len(fds)} sockets need the CAN_MULTI_CONN server flag; the kernel "
            "refuses several sockets without it"
        )
    attrs: list[tuple[str, Any]] = [
        ("NBD_ATTR_SIZE_BYTES", size),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", block_size),
        ("NBD_ATTR_SERVER_FLAGS", server_flags),
        ("NBD_ATTR_TIMEOUT", timeout),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout),
        ("NBD_ATTR_SOCKETS", [{"attrs": [("NBD_SOCK_FD", fd)]} for fd in fds]),
    ]
    if index is not None:
        attrs.insert(0, ("NBD_ATTR_INDEX", index))
    return _message(NBD_CMD_CONNECT, attrs)


def disconnect_message(index: int) -> NBDMessage:
    """Build NBD_CMD_DISCONNECT for /dev/nbd<index>."""
    return _message(NBD_CMD_DISCONNECT, [("NBD_ATTR_INDEX", index)])


def status_message(index: int | None = None) -> NBDMessage:
    """Build NBD_CMD_STATUS for one device, or all with ``index`` None."""
    attrs = [] if index is None else [("NBD_ATTR_INDEX", index)]
    return _message(NBD_CMD_STATUS, attrs)


_DEVICE = re.compile(r"(?:/dev/)?nbd(\d+)")


def device_index(device: str) -> int:
    """Return N for ``/dev/nbdN`` (or ``nbdN``).

    Raises:
        KernelNBDError: not an NBD device name.
    """
    match = _DEVICE.fullmatch(device)
    if match is None:
        raise KernelNBDError(
            f"device {device!r} is not an NBD device; expected /dev/nbdN"
        )
    return int(match.group(1))


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    index: int
    connected: bool


class NBDNetlink:
    """A generic netlink socket bound to the ``nbd`` family.

    Raises (from the constructor):
        KernelNBDError: the module is not loaded, or netlink is unavailable.
    """

    def __init__(self) -> None:
        from pyroute2.netlink.generic import (  # type: ignore[import-untyped]
            GenericNetlinkSocket,
        )

        self._sock = GenericNetlinkSocket()
        try:
            self._sock.bind(FAMILY, NBDMessage)
        except NetlinkError as exc:
            self._sock.close()
            if exc.code == errno.ENOENT:
                raise KernelNBDError(_MODPROBE_HINT) from exc
            raise KernelNBDError(
                f"cannot talk to the kernel NBD driver over netlink: {exc}"
            ) from exc
        except OSError as exc:
            self._sock.close()
            raise KernelNBDError(
                f"cannot open a generic netlink socket: {exc.strerror}"
            ) from exc

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NBDNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, msg: NBDMessage, what: str) -> list[Any]:
        try:
            return list(
                self._sock.nlm_request(
                    msg, msg_type=self._sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK
                )
            )
        except NetlinkError as exc:
            hint = {
                errno.EBUSY: "the device is in use; pick another /dev/nbdN",
                errno.EPERM: "needs CAP_SYS_ADMIN (run as root)",
                errno.EINVAL: "the kernel refused the parameters",
            }.get(exc.code, "see the kernel log (dmesg)")
            raise KernelNBDError(
                f"kernel NBD driver refused {what}: {exc.code} "
                f"({errno.errorcode.get(exc.code, '?')}); {hint}"
            ) from exc

    def connect(self, msg: NBDMessage) -> int:
        """Send a CONNECT built by :func:`connect_message`; return the device index."""
        for reply in self._request(msg, "CONNECT"):
            index = reply.get_attr("NBD_ATTR_INDEX")
            if index is not None:
                return int(index)
        raise KernelNBDError("kernel NBD driver accepted CONNECT but named no device")

    def disconnect(self, index: int) -> None:
        self._request(disconnect_message(index), f"DISCONNECT of /dev/nbd{index}")

    def status(self, index: int | None = None) -> list[DeviceStatus]:
        found = []
        for reply in self._request(status_message(index), "STATUS"):
            for item in reply.get_attr("NBD_ATTR_DEVICE_LIST") or []:
                found.append(
                    DeviceStatus(
                        int(item.get_attr("NBD_DEVICE_INDEX")),
                        bool(item.get_attr("NBD_DEVICE_CONNECTED")),
                    )
                )
        return found


def check_module() -> None:
    """Raise :class:`KernelNBDError` with the ``modprobe nbd`` hint if it is missing."""
    NBDNetlink().close()


def nbd_client_argv(
    socket_path: str,
    device: str,
    block_size: int,
    connections: int = 1,
    timeout: int = DEFAULT_TIMEOUT,
    export_name: str = "",
) -> list[str]:
    """Return the nbd-client 3.24 command line equivalent to ``blockcrypt attach``.

    It connects to a running ``blockcrypt serve`` socket and hands the
    connections to the kernel through netlink, as attach does (nbd-client
    negotiates the export itself instead of skipping the handshake, and
    sends no dead-connection timeout).
    """
    return [
        "nbd-client",
        "-unix",
        socket_path,
        device,
        "-b",
        str(block_size),
        "-t",
        str(timeout),
        "-C",
        str(connections),
        *(["-N", export_name] if export_name else []),
    ]


class AttachmentRegistry:
    """The record of kernel attachments: ``STATE_DIR/attachments.json``.

    ``blockcrypt attach`` adds an entry once the kernel accepted CONNECT and
    removes it when it stops; ``list`` drops entries whose process is gone.
    Entries hold device, path, volume UUID, key id and version, pid and
    time; nothing secret. Changes are serialised with ``flock`` and written
    atomically (temporary file, fsync, rename).
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "attachments.json"

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        lock = os.open(
            self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._load()
            before = json.dumps(entries, sort_keys=True)
            yield entries
            if json.dumps(entries, sort_keys=True) != before:
                self._store(entries)
        finally:
            os.close(lock)

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise KernelNBDError(
                f"attachment registry {str(self.path)!r} is unreadable ({exc}); "
                "remove it: attachments are re-registered on the next attach"
            ) from exc
        return doc if isinstance(doc, dict) else {}

    def _store(self, entries: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, device: str, entry: dict[str, Any]) -> None:
        with self._locked() as entries:
            entries[device] = entry

    def remove(self, device: str, pid: int | None = None) -> None:
        with self._locked() as entries:
            if device in entries and pid in (None, entries[device].get("pid")):
                del entries[device]

    def get(self, device: str) -> dict[str, Any] | None:
        return self.list().get(device)

    def list(self) -> dict[str, dict[str, Any]]:
        """Return the live entries by device, dropping those of dead processes."""
        with self._locked() as entries:
            for device in [d for d, e in entries.items() if not same_process(e)]:
                del entries[device]
            return dict(entries)


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat``).

    Together with the pid it names one process: a pid alone may be reused.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def same_process(entry: dict[str, Any]) -> bool:
    """Whether the process that wrote ``entry`` is still running."""
    pid = entry.get("pid")
    if not _alive(pid):
        return False
    started = entry.get("pid_start")
    return started is None or process_start(pid) == started  # type: ignore[arg-type]


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
