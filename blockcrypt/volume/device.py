"""An attached volume: the plaintext view of a LUKS2 data segment.

Rules of this module:

* The DEK is unwrapped once, in ``Volume.attach``, and lives only in this
  object; ``close`` wipes it.
* Every method is thread-safe and blocking; the server calls them from worker
  threads. Writes hold the sectors they touch in a ``RangeLock``, so partial
  sector read-modify-write never loses a concurrent update.
* A sector whose ciphertext is all zeros reads as plaintext zeros. That is what
  a hole in the sparse backing file holds, so a fresh volume reads as zeros
  and TRIM can punch holes. The chance that real ciphertext is all zeros is
  2**-4096 per 512-byte sector.
* Two locks guard the backing file. A shared ``flock``, the lock cryptsetup
  uses, is held for the whole attachment: cryptsetup can read the header
  meanwhile, and its header writes wait until the volume is detached. An
  open-file-description lock (exclusive for read-write, shared for read-only)
  keeps a second server away.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from blockcrypt.crypto import XTSKey, make_cipher
from blockcrypt.errors import (
    StorageError,
    UnwrapFailed,
    VolumeBusy,
    VolumeFormatError,
    WrongKey,
)
from blockcrypt.kms import CMKStore, WrappedKey, encryption_context
from blockcrypt.volume import luks2
from blockcrypt.volume._fileops import punch_hole, try_ofd_lock
from blockcrypt.volume._rangelock import RangeLock

__all__ = ["FORMAT_VERSION", "Volume", "unwrap_key"]

log = logging.getLogger("blockcrypt.server")

#: Version of the blockcrypt token layout, bound into the wrap context.
FORMAT_VERSION = 1
_P = ParamSpec("_P")
_T = TypeVar("_T")
_ZERO_EXTENT = 3  # base:allocation HOLE | ZERO
#: Bytes of zeros written per step when zeroing must really write.
_ZERO_CHUNK = 1024 * 1024


class StorageIOError(StorageError):
    """An I/O error on the backing file, with the errno for the NBD client."""

    def __init__(self, message: str, nbd_errno: int) -> None:
        super().__init__(message)
        self.nbd_errno = nbd_errno


class Volume:
    """Plaintext block access to one blockcrypt volume. Use ``Volume.attach``."""

    def __init__(
        self,
        path: str,
        fd: int,
        lock_fd: int,
        header: luks2.LUKS2Header,
        key: XTSKey,
        read_only: bool,
    ) -> None:
        self.path = path
        self.header = header
        self.read_only = read_only
        self.sector_size = header.sector_size
        self._fd = fd
        self._lock_fd = lock_fd
        self._key = key
        self._cipher = make_cipher(key, header.sector_size, header.iv_tweak)
        self._base = header.data_offset
        self._locks = RangeLock()
        file_size = os.fstat(fd).st_size
        usable = max(file_size - self._base, 0)
        if header.data_size is not None:
            usable = min(usable, header.data_size)
        self.size = usable - usable % self.sector_size

    # -- attach and detach ---------------------------------------------------

    @classmethod
    def attach(cls, path: str, store: CMKStore, read_only: bool = False) -> Volume:
        """Open the volume, take its locks and unwrap its DEK through ``store``.

        Raises:
            VolumeBusy: another server has the volume.
            VolumeFormatError: not a blockcrypt volume, or an unusable header.
            UnwrapFailed, KeyNotFound, HSMUnavailable: from the KMS.
            WrongKey: the unwrapped key does not match the header's digest.
        """
        fd, lock_fd = _open_locked(path, read_only)
        try:
            header = luks2.read_header(fd)
            _check_size(path, fd, header)
            key = unwrap_key(path, header, store)
            try:
                return cls(path, fd, lock_fd, header, key, read_only)
            except BaseException:
                key.wipe()
                raise
        except BaseException:
            os.close(fd)
            os.close(lock_fd)
            raise

    def close(self) -> None:
        """Flush, wipe the key and release the locks."""
        if self._fd < 0:
            return
        try:
            if not self.read_only:
                os.fdatasync(self._fd)
        finally:
            close_cipher = getattr(self._cipher, "close", None)
            if close_cipher is not None:
                close_cipher()
            self._key.wipe()
            os.close(self._fd)
            os.close(self._lock_fd)
            self._fd = self._lock_fd = -1

    # -- block operations ----------------------------------------------------

    def pread(self, offset: int, length: int) -> bytearray | memoryview:
        """Return ``length`` plaintext bytes at ``offset`` (a fresh buffer)."""
        first, count = self._span(offset, length)
        plain = self._read_sectors(first, count)
        head = offset - first * self.sector_size
        if head == 0 and length == len(plain):
            return plain
        return memoryview(plain)[head : head + length]

    def pwrite(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool
    ) -> None:
        """Write plaintext ``data`` at ``offset``; durable on return if ``fua``."""
        first, count = self._span(offset, len(data))
        with self._locks.hold(first, first + count):
            self._write_locked(first, count, offset, data, owned=False)
        if fua:
            self.flush()

    def write_owned(self, offset: int, data: bytearray, fua: bool) -> None:
        """``pwrite`` that may encrypt ``data`` in place; the caller gives it up."""
        first, count = self._span(offset, len(data))
        with self._locks.hold(first, first + count):
            self._write_locked(first, count, offset, data, owned=True)
        if fua:
            self.flush()

    def flush(self) -> None:
        """Make every completed write durable (covers all connections)."""
        self._io(os.fdatasync, self._fd)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Discard whole sectors inside the range; partial sectors are left alone."""
        ss = self.sector_size
        start = -(-offset // ss)
        end = (offset + length) // ss
        if end <= start:
            return
        with self._locks.hold(start, end):
            try:
                punch_hole(self._fd, self._base + start * ss, (end - start) * ss)
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise _io_error("trim", exc) from exc
        if fua:
            self.flush()

    def write_zeroes(
        self, offset: int, length: int, no_hole: bool, fast: bool, fua: bool
    ) -> None:
        """Make the range read as zeros.

        Whole sectors become holes unless ``no_hole``; then encrypted zeros are
        written, one chunk at a time, so a 4 GiB request never needs 4 GiB of
        memory. With ``fast`` the request fails with ENOTSUP instead of
        writing data.
        """
        ss = self.sector_size
        start = -(-offset // ss)
        end = (offset + length) // ss
        if end <= start:  # the range lies inside one or two partial sectors
            self.pwrite(offset, bytes(length), fua)
            return
        if fast and no_hole:
            raise StorageIOError("zeroing without holes is not fast", errno.ENOTSUP)

        # Head and tail partial sectors, then the whole sectors in between.
        if offset < start * ss:
            self.pwrite(offset, bytes(start * ss - offset), False)
        if offset + length > end * ss:
            self.pwrite(end * ss, bytes(offset + length - end * ss), False)
        with self._locks.hold(start, end):
            self._zero_sectors(start, end, no_hole, fast)
        if fua:
            self.flush()

    def extents(
        self, offset: int, length: int, limit: int = 1024
    ) -> list[tuple[int, int]]:
        """Describe ``[offset, offset+length)`` as (length, flags) extents.

        Flags are ``HOLE | ZERO`` (3) for ranges that read as zeros because
        the backing file has a hole under every byte of their sectors, and 0
        (data) for everything else, so a range reported as zero always reads
        as zeros. At most ``limit`` extents; they may cover less than asked.
        """
        self._span(offset, length)
        ss, end = self.sector_size, offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(out) < limit:
            hole = self._seek(pos, os.SEEK_HOLE)
            if hole > pos:  # data up to the next hole
                step = min(hole, end)
                _append_extent(out, step - pos, 0)
                pos = step
                continue
            data = self._seek(pos, os.SEEK_DATA)
            step = min(data, end)
            # Only sectors wholly inside the hole read as zeros.
            first = (
                pos
                if self._seek(pos - pos % ss, os.SEEK_DATA) >= data
                else -(-pos // ss) * ss
            )
            last = min(data - data % ss, end)
            if first < last:
                if first > pos:
                    _append_extent(out, first - pos, 0)
                _append_extent(out, last - first, _ZERO_EXTENT)
                if step > last:
                    _append_extent(out, step - last, 0)
            else:
                _append_extent(out, step - pos, 0)
            pos = step
        return out

    def _seek(self, pos: int, whence: int) -> int:
        """lseek in plaintext coordinates; past the last data means the end."""
        try:
            return os.lseek(self._fd, self._base + pos, whence) - self._base
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return self.size
            raise _io_error("seek", exc) from exc

    # -- internals -----------------------------------------------------------

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageIOError(
                f"range {offset}+{length} is outside the {self.size}-byte volume",
                errno.EINVAL,
            )
        ss = self.sector_size
        first = offset // ss
        last = -(-(offset + length) // ss)
        return first, last - first

    def _read_sectors(self, first: int, count: int) -> bytearray:
        ss = self.sector_size
        buf = bytearray(count * ss)  # past the end of a short file: zeros
        position = self._base + first * ss
        view = memoryview(buf)
        while view:
            got = self._io(os.preadv, self._fd, [view], position)
            if got == 0:
                break
            view = view[got:]
            position += got
        # All-zero ciphertext is a hole: it stays zero instead of being decrypted.
        self._cipher.decrypt_into(first, buf, buf, zero_is_hole=True)
        return buf

    def _write_locked(
        self,
        first: int,
        count: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        owned: bool,
    ) -> None:
        ss = self.sector_size
        head = offset - first * ss
        if head == 0 and len(data) == count * ss:
            if owned and isinstance(data, bytearray):
                self._cipher.encrypt_into(first, data, data)
                self._pwrite_all(data, self._base + first * ss)
                return
            plain: bytes | bytearray | memoryview = data
        else:
            # Read-modify-write: only the partial first and last sectors are read.
            buf = bytearray(count * ss)
            if head:
                buf[:ss] = self._read_sectors(first, 1)
            tail_end = head + len(data)
            if tail_end % ss and (count > 1 or not head):
                buf[(count - 1) * ss :] = self._read_sectors(first + count - 1, 1)
            buf[head:tail_end] = data
            self._cipher.encrypt_into(first, buf, buf)
            self._pwrite_all(buf, self._base + first * ss)
            return
        out = bytearray(len(plain))
        self._cipher.encrypt_into(first, plain, out)
        self._pwrite_all(out, self._base + first * ss)

    def _zero_sectors(self, start: int, end: int, no_hole: bool, fast: bool) -> None:
        ss = self.sector_size
        if not no_hole:
            try:
                punch_hole(self._fd, self._base + start * ss, (end - start) * ss)
                return
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise _io_error("write zeroes", exc) from exc
                if fast:
                    raise StorageIOError(
                        "file system cannot punch holes", errno.ENOTSUP
                    ) from exc
        step = _ZERO_CHUNK // ss
        zeros = bytes(step * ss)
        out = bytearray(step * ss)
        for sector in range(start, end, step):
            n = min(step, end - sector) * ss
            chunk = memoryview(out)[:n]
            self._cipher.encrypt_into(sector, memoryview(zeros)[:n], chunk)
            self._pwrite_all(chunk, self._base + sector * ss)

    def _pwrite_all(self, data: bytes | bytearray | memoryview, position: int) -> None:
        view = memoryview(data)
        while view:
            written = self._io(os.pwrite, self._fd, view, position)
            view = view[written:]
            position += written

    @staticmethod
    def _io(func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return func(*args, **kwargs)
        except OSError as exc:
            raise _io_error(func.__name__, exc) from exc


def _append_extent(out: list[tuple[int, int]], length: int, flags: int) -> None:
    if out and out[-1][1] == flags:
        out[-1] = (out[-1][0] + length, flags)
    else:
        out.append((length, flags))


def _io_error(what: str, exc: OSError) -> StorageIOError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageIOError(
            f"{what} failed: the file system holding the volume is full "
            f"({exc.strerror}); free space or move the volume",
            errno.ENOSPC,
        )
    return StorageIOError(f"{what} failed on the backing file: {exc}", errno.EIO)


def _open_locked(path: str, read_only: bool) -> tuple[int, int]:
    # O_NONBLOCK: opening a FIFO must not hang; it is refused just below.
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise VolumeFormatError(
            f"{path}: no such file; create a volume with `blockcrypt create`"
        ) from None
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise VolumeFormatError(
            f"{path} is not a regular file or a block device, so it cannot be a volume"
        )
    try:
        lock_fd = os.open(path, flags)
    except OSError:
        os.close(fd)
        raise
    try:
        if not try_ofd_lock(lock_fd, exclusive=not read_only):
            raise VolumeBusy(
                f"{path} is already served by another blockcrypt process; "
                "stop that server first (or serve it --read-only from both)"
            )
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeBusy(
                f"{path} is locked for writing by another program "
                "(cryptsetup?); retry when it is done"
            ) from None
    except BaseException:
        os.close(fd)
        os.close(lock_fd)
        raise
    return fd, lock_fd


def _check_size(path: str, fd: int, header: luks2.LUKS2Header) -> None:
    size = os.fstat(fd).st_size - header.data_offset
    if header.data_size is not None:
        size = min(size, header.data_size)
    if size < header.sector_size:
        raise VolumeFormatError(
            f"{path} has no data area: the file is {os.fstat(fd).st_size} bytes and "
            f"data starts at {header.data_offset}; was it truncated? Restore it "
            "from a backup"
        )
    if size % header.sector_size:
        log.warning(
            "volume size is not a whole number of sectors; the tail is not served",
            extra={"path": path, "tail_bytes": size % header.sector_size},
        )
    if header.damaged_copies:
        log.warning(
            "damaged LUKS2 header copy; run `cryptsetup repair` on the stopped "
            "volume and keep a header backup",
            extra={"path": path, "damaged": ",".join(header.damaged_copies)},
        )


def unwrap_key(path: str, header: luks2.LUKS2Header, store: CMKStore) -> XTSKey:
    """Unwrap the DEK in ``header``'s token through ``store`` and check it
    against the header's digest.

    Raises:
        VolumeFormatError: no blockcrypt-kms token, or an unknown format version.
        UnwrapFailed: wrapped for another volume or key, or corrupt (the
            message says which UUID the key was wrapped for if it differs).
        WrongKey: the unwrapped key does not match the digest.
        KMSError: other refusals of the store (a disabled key, ...).
    """
    token = header.token
    if token is None:
        raise VolumeFormatError(
            f"{path} is a LUKS2 volume but has no '{luks2.TOKEN_TYPE}' token, so "
            "blockcrypt holds no wrapped key for it; open it with cryptsetup, or "
            "restore a header backup that has the token"
        )
    wrapped = WrappedKey(
        key_id=token.key_id,
        key_version=token.key_version,
        mechanism=token.mechanism,
        iv=token.iv,
        ciphertext=token.wrapped_dek,
    )
    version = token.context.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise VolumeFormatError(
            f"{path}: the {luks2.TOKEN_TYPE} token has format version {version!r}; "
            f"this blockcrypt reads version {FORMAT_VERSION}. Upgrade blockcrypt"
        )
    # The context comes from this header, not from the token, so a token
    # copied from another volume fails to unwrap.
    context = encryption_context(header.uuid, FORMAT_VERSION, token.key_id)
    try:
        key = store.decrypt_datakey(wrapped, context)
    except UnwrapFailed as exc:
        wrapped_for = token.context.get("volume_uuid")
        if wrapped_for is not None and str(wrapped_for).lower() != header.uuid.lower():
            raise UnwrapFailed(
                f"{path}: cannot unwrap the data key: the header's UUID is "
                f"{header.uuid}, but the key was wrapped for another volume, "
                f"{wrapped_for}. If the UUID was changed "
                "(cryptsetup luksUUID), change it back; if the token came from "
                "another volume, restore this volume's header backup"
            ) from exc
        raise
    if not luks2.verify_dek(header, key):
        key.wipe()
        raise WrongKey(
            f"{path}: the key unwrapped from the token does not match the volume's "
            "key digest; the header was altered. Restore a header backup"
        )
    return key
