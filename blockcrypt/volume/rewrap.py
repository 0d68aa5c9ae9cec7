"""Rewrap a volume's DEK under another CMK or key version, header only.

Rules of this module:

* Only the ``blockcrypt-kms`` token changes. The data area is never opened for
  reading or writing: the DEK stays the same, so the ciphertext stays valid.
* The new token goes to disk through :func:`luks2.write_metadata`: both header
  copies, seqid + 1, under cryptsetup's exclusive ``flock``. A crash at any
  step leaves one valid copy with either the old or the new token, and both
  unwrap to the same DEK.
* The volume must not be attached: a server holds a shared ``flock`` for its
  lifetime, which would make the header write wait forever. An
  open-file-description lock (the one servers take) keeps a server from
  starting while the header changes.
* The DEK is checked against the header's digest before the new wrap is
  written, and wiped afterwards.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from blockcrypt.crypto.xts import XTSKey
from blockcrypt.errors import StorageError, VolumeBusy, VolumeFormatError
from blockcrypt.kms import CMKStore, encryption_context
from blockcrypt.volume import luks2
from blockcrypt.volume._fileops import try_ofd_lock
from blockcrypt.volume.device import FORMAT_VERSION, unwrap_key

__all__ = ["RewrapResult", "exclusive_volume", "rewrap_volume", "unwrap_volume_key"]


@dataclass(frozen=True, slots=True)
class RewrapResult:
    """What a rewrap did; no key material."""

    volume_uuid: str
    old_key_id: str
    old_key_version: int
    new_key_id: str
    new_key_version: int
    changed: bool
    epoch: int


@contextmanager
def exclusive_volume(path: str) -> Iterator[int]:
    """Open ``path`` read-write and keep blockcrypt servers away while open.

    Raises:
        VolumeBusy: a server has the volume attached.
        VolumeFormatError, StorageError: the file cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VolumeFormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        lock_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if not try_ofd_lock(lock_fd, exclusive=True):
                raise VolumeBusy(
                    f"{path} is attached (a blockcrypt server holds it); detach "
                    "it first: stop `blockcrypt serve`, or `blockcrypt detach`"
                )
            yield fd
        finally:
            os.close(lock_fd)
    finally:
        os.close(fd)


def unwrap_volume_key(
    path: str, header: luks2.LUKS2Header, store: CMKStore
) -> tuple[luks2.KMSToken, XTSKey]:
    """Unwrap the DEK named by ``header``'s token and check it against the digest.

    Raises:
        VolumeFormatError: the header has no blockcrypt-kms token.
        WrongKey: the unwrapped key does not match the digest.
        KMSError: from the store (disabled key, unwrap failure, ...).
    """
    key = unwrap_key(path, header, store)
    assert header.token is not None  # unwrap_key refuses a header without one
    return header.token, key


def rewrap_volume(
    path: str,
    store: CMKStore,
    key: str | None = None,
    *,
    _fault: luks2.Fault | None = None,
) -> RewrapResult:
    """Wrap the volume's DEK under ``key`` (default: its own CMK's newest version).

    ``_fault`` is the test hook of :func:`luks2.write_metadata`.

    Raises:
        VolumeBusy: the volume is attached.
        KMSError: the old key cannot unwrap or the new one cannot wrap.
        VolumeFormatError, StorageError, WrongKey: header problems.
    """
    # Attached volumes are refused: a server holds cryptsetup's shared flock
    # for its lifetime, so the header cannot change under it, and our
    # exclusive flock would wait for ever (docs/operations.md says so).
    with exclusive_volume(path) as fd:
        header = luks2.read_header(fd)
        token, dek = unwrap_volume_key(path, header, store)
        try:
            target = store.describe_key(key or token.key_id)
            context = encryption_context(header.uuid, FORMAT_VERSION, target.key_id)
            if (target.key_id, target.current_version) == (
                token.key_id,
                token.key_version,
            ):
                return _result(header, token, token.key_id, token.key_version, False)
            wrapped = store.encrypt_datakey(target.key_id, dek, context)
        finally:
            dek.wipe()

        new_token = luks2.KMSToken(
            key_id=wrapped.key_id,
            mechanism=wrapped.mechanism,
            iv=wrapped.iv,
            wrapped_dek=wrapped.ciphertext,
            context={
                "volume_uuid": header.uuid,
                "format_version": FORMAT_VERSION,
                "key_id": wrapped.key_id,
            },
            key_version=wrapped.key_version,
            backend=target.backend or token.backend,
        )
        metadata = copy.deepcopy(header.metadata)
        metadata["tokens"][header.token_id] = new_token.to_json()
        written = luks2.write_metadata(fd, header, metadata, _fault=_fault)
        return _result(written, token, wrapped.key_id, wrapped.key_version, True)


def _result(
    header: luks2.LUKS2Header,
    old: luks2.KMSToken,
    key_id: str,
    version: int,
    changed: bool,
) -> RewrapResult:
    return RewrapResult(
        volume_uuid=header.uuid,
        old_key_id=old.key_id,
        old_key_version=old.key_version,
        new_key_id=key_id,
        new_key_version=version,
        changed=changed,
        epoch=header.seqid,
    )
