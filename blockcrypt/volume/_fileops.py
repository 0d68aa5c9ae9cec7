"""File operations Python's os module lacks: hole punching and locks."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range; it then reads as zeros. Raises OSError."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def try_ofd_lock(fd: int, exclusive: bool) -> bool:
    """Take an open-file-description lock on byte 0 without waiting.

    blockcrypt uses it to keep two servers off one volume. It is independent of
    the ``flock`` that cryptsetup uses, so it does not block cryptsetup.
    Returns False if another open file holds a conflicting lock.
    """
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (must be 0 for OFD)
    lock = struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True
