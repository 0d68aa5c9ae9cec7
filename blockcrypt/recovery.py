"""Recovery without the HSM: passphrase keyslots and header backups.

Rules of this module:

* A recovery passphrase is a standard LUKS2 keyslot that cryptsetup adds with
  ``luksAddKey --volume-key-file``; afterwards stock ``cryptsetup open`` opens
  the volume with the passphrase alone.
* The DEK and the passphrase reach cryptsetup through anonymous memory files
  (``memfd_create``) that the child inherits and opens as
  ``/proc/self/fd/N``. Neither ever lands in a named file, in argv or in the
  environment. The memory files are emptied as soon as cryptsetup exits.
* Header backups are cryptsetup's own format (``luksHeaderBackup``: the
  whole 16 MiB header area, keyslots included), created with mode 0600. A
  restore checks that the backup belongs to the volume (same UUID) unless
  forced, and refuses while the volume is attached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from blockcrypt.errors import (
    ConfigError,
    StorageError,
    UsageError,
    VolumeFormatError,
)
from blockcrypt.kms import CMKStore
from blockcrypt.volume import luks2
from blockcrypt.volume.rewrap import exclusive_volume, unwrap_volume_key

__all__ = [
    "PBKDFOptions",
    "RecoveryError",
    "add_passphrase",
    "add_passphrase_argv",
    "backup_header",
    "restore_header",
]

_TIMEOUT = 600


class RecoveryError(StorageError):
    """cryptsetup refused a recovery step; the message carries its exit status."""


@dataclass(frozen=True, slots=True)
class PBKDFOptions:
    """Forced keyslot PBKDF costs (tests); None fields leave cryptsetup's benchmark."""

    pbkdf: str | None = None
    iterations: int | None = None
    memory_kib: int | None = None

    def argv(self) -> list[str]:
        args = []
        if self.pbkdf:
            args += ["--pbkdf", self.pbkdf]
        if self.iterations is not None:
            args += ["--pbkdf-force-iterations", str(self.iterations)]
        if self.memory_kib is not None:
            args += ["--pbkdf-memory", str(self.memory_kib)]
        return args


def _cryptsetup() -> str:
    tool = shutil.which("cryptsetup")
    if tool is None:
        raise ConfigError(
            "cryptsetup is not installed (not found on PATH); recovery keyslots "
            "and header backups need it: `apt-get install cryptsetup-bin`"
        )
    return tool


@contextmanager
def _memfd(name: str, data: bytes) -> Iterator[int]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield fd
    finally:
        os.ftruncate(fd, 0)  # drop the pages before the fd goes
        os.close(fd)


def add_passphrase_argv(
    tool: str, path: str, key_fd: int, passphrase_fd: int, pbkdf: PBKDFOptions
) -> list[str]:
    """Return the cryptsetup command line; it names only descriptors, never secrets."""
    return [
        tool,
        "luksAddKey",
        "--batch-mode",
        "--volume-key-file",
        f"/proc/self/fd/{key_fd}",
        "--key-size",
        "512",
        *pbkdf.argv(),
        path,
        f"/proc/self/fd/{passphrase_fd}",
    ]


def add_passphrase(
    path: str, store: CMKStore, passphrase: bytes, pbkdf: PBKDFOptions | None = None
) -> tuple[str, str]:
    """Add a passphrase keyslot to the volume; return (volume UUID, keyslot id).

    Raises:
        ConfigError: empty passphrase, or cryptsetup missing.
        VolumeBusy: the volume is attached.
        KMSError: the DEK cannot be unwrapped.
        RecoveryError: cryptsetup failed.
    """
    if not passphrase:
        raise UsageError("the recovery passphrase is empty; choose a long one")
    tool = _cryptsetup()
    with exclusive_volume(path) as fd:
        header = luks2.read_header(fd)
        before = set(header.metadata.get("keyslots", {}))
        _, dek = unwrap_volume_key(path, header, store)
        try:
            with (
                _memfd("blockcrypt-volume-key", bytes(dek)) as key_fd,
                _memfd("blockcrypt-passphrase", passphrase) as pass_fd,
            ):
                argv = add_passphrase_argv(
                    tool, path, key_fd, pass_fd, pbkdf or PBKDFOptions()
                )
                _run(argv, "add the passphrase keyslot", pass_fds=(key_fd, pass_fd))
        finally:
            dek.wipe()
        after = set(luks2.read_header(fd).metadata.get("keyslots", {}))
    added = sorted(after - before, key=int)
    return header.uuid, added[0] if added else "?"


def backup_header(path: str, out: str) -> str:
    """Write cryptsetup's header backup of ``path`` to the new file ``out``.

    Returns the volume UUID.

    Raises:
        ConfigError: ``out`` exists.
        VolumeFormatError: ``path`` is not a LUKS2 volume.
        RecoveryError: cryptsetup failed.
    """
    tool = _cryptsetup()
    header = _read(path)
    if os.path.lexists(out):
        raise UsageError(f"{out} exists; refusing to overwrite a header backup")
    old_umask = os.umask(0o077)  # the backup holds the keyslots: owner only
    try:
        _run(
            [tool, "luksHeaderBackup", path, "--header-backup-file", out],
            "back up the header",
        )
    finally:
        os.umask(old_umask)
    os.chmod(out, 0o600)
    return header.uuid


def restore_header(path: str, backup: str, force: bool = False) -> tuple[str, str]:
    """Restore ``backup`` onto ``path``; return (volume UUID, backup UUID).

    Raises:
        ConfigError: the backup belongs to another volume and ``force`` is
            not set.
        VolumeBusy: the volume is attached.
        VolumeFormatError: either file is not LUKS2.
        RecoveryError: cryptsetup failed.
    """
    tool = _cryptsetup()
    saved = _read(backup)
    with exclusive_volume(path) as fd:
        try:
            current: luks2.LUKS2Header | None = luks2.read_header(fd)
        except VolumeFormatError:
            if not force:
                raise
            current = None
        current_uuid = current.uuid if current is not None else "(unreadable)"
        if current is not None and current.uuid != saved.uuid:
            # Even --force stops here: the volume's own header is intact, and
            # another volume's header would make all of its data unreadable.
            raise UsageError(
                f"header backup {backup} belongs to volume {saved.uuid}, but "
                f"{path} is volume {current.uuid} and its header is intact; pick "
                "this volume's backup (--force only helps when the header is "
                "unreadable)"
            )
        if current is not None and saved.seqid < current.seqid and not force:
            raise UsageError(
                f"header backup {backup} is older (epoch {saved.seqid}) than the "
                f"header of {path} (epoch {current.seqid}); restoring it would "
                "undo later changes such as recovery keyslots and rewraps. Take "
                "a fresh backup, or pass --force if you mean to go back"
            )
        _run(
            [tool, "luksHeaderRestore", "--batch-mode", path,
             "--header-backup-file", backup],
            "restore the header",
        )  # fmt: skip
    return current_uuid, saved.uuid


def _read(path: str) -> luks2.LUKS2Header:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VolumeFormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        return luks2.read_header(fd)
    finally:
        os.close(fd)


def _run(argv: list[str], action: str, pass_fds: tuple[int, ...] = ()) -> None:
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        pass_fds=pass_fds,
        timeout=_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split()) or "no message"
        raise RecoveryError(
            f"cryptsetup could not {action} (exit status {proc.returncode}: {detail})"
        )
