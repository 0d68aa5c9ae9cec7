"""LUKS2 header writer and reader for blockcrypt volumes.

Rules of this module:

* A volume is a regular file: two metadata copies (a 4 KiB binary header plus
  a JSON area each), the unused keyslots area, then the data segment at
  ``DEFAULT_DATA_OFFSET``. The wrapped data key lives in a ``blockcrypt-kms``
  token, and a PBKDF2 digest of the key lets whoever holds the key check it.
  There are no keyslots unless an administrator adds one with cryptsetup.
* We write what cryptsetup writes: compact JSON, 64-bit numbers as decimal
  strings, binary values as base64, and per copy a sha256 checksum over its
  binary header (checksum field zeroed) followed by its whole JSON area.
* An update raises the seqid by one and writes the primary copy, then the
  secondary, each in three steps: binary header with a zero checksum, JSON
  area, binary header with the checksum. A crash at any point leaves at least
  one valid copy, holding either the old or the new metadata.
* Reads take a shared ``flock`` on the file and writes an exclusive one: the
  locks cryptsetup takes, so the two never interleave. Nothing caches a
  header; an update re-reads the disk under the lock and refuses to go on if
  somebody changed the header since the caller read it.
* The reader refuses what it cannot serve correctly: LUKS1, mandatory
  requirements (an unfinished reencryption, for one), several segments, a
  cipher other than ``aes-xts-plain64``, misaligned offsets.
* Messages name the file and the values seen, never key bytes or wrapped keys.

Layout: the LUKS2 on-disk format specification, summarized in our
``reference/luks2.md``, section 4.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import struct
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from blockcrypt.crypto.xts import SECTOR_SIZES, XTSKey
from blockcrypt.errors import StorageError, VolumeFormatError

__all__ = [
    "DEFAULT_DATA_OFFSET",
    "DEFAULT_HDR_SIZE",
    "TOKEN_TYPE",
    "KMSToken",
    "LUKS2Header",
    "format_volume",
    "read_header",
    "verify_dek",
    "write_metadata",
]

TOKEN_TYPE = "blockcrypt-kms"
DEFAULT_HDR_SIZE = 16384
DEFAULT_DATA_OFFSET = 16 * 1024 * 1024

_CIPHER = "aes-xts-plain64"
_MAGIC_PRIMARY = b"LUKS\xba\xbe"
_MAGIC_SECONDARY = b"SKUL\xba\xbe"
_LUKS1_VERSION = b"\x00\x01"
_BIN_SIZE = 4096
# The allowed metadata sizes; a secondary copy starts at exactly one of them.
_HDR_SIZES = tuple(0x4000 << i for i in range(9))
# magic, version, hdr_size, seqid, label, checksum_alg, salt, uuid, subsystem,
# hdr_offset, padding, csum: the used first 512 bytes, big-endian.
_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM_OFFSET = 448
_CSUM_SIZE = 64
_CSUM_ALG = "sha256"
_SALT_SIZE = 64
_LABEL_MAX = 47
_MAX_OBJECTS = 32
_SECTIONS = ("keyslots", "tokens", "segments", "digests")
_DIGEST_SALT_SIZE = 32
_DIGEST_HASHES = ("sha1", "sha256", "sha512")
_MAX_ITERATIONS = 2**32 - 1
_MIN_FORMAT_ITERATIONS = 1000
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")

Fault = Callable[[str], None]


# ---------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True, slots=True)
class KMSToken:
    """The ``blockcrypt-kms`` token: the data key wrapped by a KMS master key.

    Nothing in it is secret. Anyone can edit a LUKS2 header, so the KMS must
    authenticate the wrapping and bind it to ``context``.
    """

    key_id: str
    mechanism: str
    iv: bytes
    wrapped_dek: bytes
    context: dict[str, str | int]
    key_version: int = 1
    backend: str = "pkcs11"

    def to_json(self) -> dict[str, Any]:
        """Return the token as the JSON object stored in the header."""
        return {
            "type": TOKEN_TYPE,
            "keyslots": [],
            "kms": self.backend,
            "key_id": self.key_id,
            "key_version": self.key_version,
            "mechanism": self.mechanism,
            "iv": base64.b64encode(self.iv).decode("ascii"),
            "context": dict(self.context),
            "wrapped_dek": base64.b64encode(self.wrapped_dek).decode("ascii"),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> KMSToken:
        """Build a token from its header JSON.

        Raises:
            VolumeFormatError: a field is missing or has the wrong type.
        """
        if not isinstance(obj, dict):
            raise _token_error(f"is {_kind(obj)}, not a JSON object")
        if obj.get("type") != TOKEN_TYPE:
            raise _token_error(f"has type {obj.get('type')!r}, not {TOKEN_TYPE!r}")
        if not isinstance(obj.get("keyslots"), list):
            raise _token_error(f"field 'keyslots' is {_kind(obj, 'keyslots')}")
        return cls(
            key_id=_token_str(obj, "key_id"),
            mechanism=_token_str(obj, "mechanism"),
            iv=_token_b64(obj, "iv", allow_empty=True),
            wrapped_dek=_token_b64(obj, "wrapped_dek", allow_empty=False),
            context=_token_context(obj),
            key_version=_token_int(obj, "key_version"),
            backend=_token_str(obj, "kms"),
        )


@dataclass(frozen=True, slots=True)
class LUKS2Header:
    """A validated LUKS2 header as read from disk.

    ``damaged_copies`` names the copies that failed validation or hold an
    older seqid than ``copy_used``; the next ``write_metadata`` rewrites them.
    """

    uuid: str
    label: str
    seqid: int
    hdr_size: int
    data_offset: int
    sector_size: int
    cipher: str
    iv_tweak: int
    metadata: dict[str, Any]
    token: KMSToken | None
    token_id: str | None
    copy_used: str
    damaged_copies: tuple[str, ...]
    #: Fixed length of the data segment in bytes; None means up to end of file.
    data_size: int | None = None


# ---------------------------------------------------------------------------
# Public functions


def format_volume(
    path: str | os.PathLike[str],
    *,
    size: int,
    sector_size: int = 4096,
    volume_uuid: str,
    dek: XTSKey,
    token: KMSToken,
    label: str = "",
    pbkdf2_iterations: int = 1000,
) -> LUKS2Header:
    """Create a new sparse volume file with a ``size``-byte data segment.

    The file is ``DEFAULT_DATA_OFFSET + size`` bytes long and must not exist
    yet; only the two header copies are written.

    Raises:
        StorageError: a bad argument (size, sector size, UUID, label,
            iterations), or an I/O error.
        VolumeFormatError: the file already exists.
    """
    name = os.fspath(path)
    volume_uuid = _check_format_args(
        name, size, sector_size, volume_uuid, label, pbkdf2_iterations
    )
    metadata = _initial_metadata(sector_size, dek, token, pbkdf2_iterations)
    _check_new_metadata(metadata, DEFAULT_HDR_SIZE, name)
    area = _encode_json(metadata, DEFAULT_HDR_SIZE, name)
    fields = _BinaryFields(
        uuid=volume_uuid.encode("ascii"),
        label=label.encode("utf-8"),
        subsystem=b"",
        salts=(os.urandom(_SALT_SIZE), os.urandom(_SALT_SIZE)),
    )

    with _io_errors(name, "create the volume"):
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with _io_errors(name, "format the volume"), _flock(fd, fcntl.LOCK_EX):
            os.ftruncate(fd, DEFAULT_DATA_OFFSET + size)
            _write_copies(fd, DEFAULT_HDR_SIZE, 1, fields, area, None)
            header = _build_header(*_read_best(fd, name), name)
            _fsync_dir(name)
    except BaseException:
        # O_EXCL made the file ours; do not leave a half-written volume behind.
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    finally:
        os.close(fd)
    return header


def read_header(fd: int) -> LUKS2Header:
    """Read and validate the header of the volume open on ``fd``.

    Takes and releases a shared flock on ``fd``; the caller must not hold a
    flock on the same open file (flock would convert and then drop it).

    Raises:
        VolumeFormatError: not LUKS2, both copies damaged, or a header
            blockcrypt cannot serve (see the module rules).
        StorageError: an I/O error.
    """
    path = _describe(fd)
    with _io_errors(path, "read the LUKS2 header"), _flock(fd, fcntl.LOCK_SH):
        return _build_header(*_read_best(fd, path), path)


def verify_dek(header: LUKS2Header, dek: XTSKey) -> bool:
    """Return whether ``dek`` matches the PBKDF2 digest linked to segment 0."""
    digest = _segment_digest(header.metadata, f"volume {header.uuid}")
    candidate = hashlib.pbkdf2_hmac(
        digest.hash, bytes(dek), digest.salt, digest.iterations, len(digest.value)
    )
    return hmac.compare_digest(candidate, digest.value)


def write_metadata(
    fd: int,
    header: LUKS2Header,
    metadata: dict[str, Any],
    *,
    _fault: Fault | None = None,
) -> LUKS2Header:
    """Replace the JSON metadata of both copies and return the new header.

    The seqid becomes ``header.seqid + 1``; the salts already on disk are
    kept. Takes an exclusive flock on ``fd`` (the caller must hold none).
    ``_fault`` is a test hook called with each write step's name before it.

    Raises:
        VolumeFormatError: the metadata is invalid or too large, or the
            header on disk changed since ``header`` was read.
        StorageError: an I/O error.
    """
    path = _describe(fd)
    _check_new_metadata(metadata, header.hdr_size, path)
    area = _encode_json(metadata, header.hdr_size, path)
    with _io_errors(path, "update the LUKS2 header"), _flock(fd, fcntl.LOCK_EX):
        current, _ = _read_best(fd, path)
        if (current.seqid, current.hdr_size) != (header.seqid, header.hdr_size):
            raise VolumeFormatError(
                f"{path}: LUKS2 header changed since it was read (seqid "
                f"{header.seqid} then, {current.seqid} now); re-read it and retry"
            )
        fields = _BinaryFields(
            uuid=current.uuid,
            label=current.label,
            subsystem=current.subsystem,
            salts=(
                _disk_salt(fd, 0, _MAGIC_PRIMARY),
                _disk_salt(fd, header.hdr_size, _MAGIC_SECONDARY),
            ),
        )
        _write_copies(fd, header.hdr_size, header.seqid + 1, fields, area, _fault)
        return _build_header(*_read_best(fd, path), path)


# ---------------------------------------------------------------------------
# Token fields


def _kind(obj: Any, name: str | None = None) -> str:
    """Describe a JSON value's type without quoting it (it may be a secret)."""
    if name is not None:
        if name not in obj:
            return "missing"
        obj = obj[name]
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    if isinstance(obj, int | float):
        return "a number"
    if isinstance(obj, str):
        return "a string" if obj else "an empty string"
    return "an array" if isinstance(obj, list) else "an object"


def _token_error(what: str) -> VolumeFormatError:
    return VolumeFormatError(f"{TOKEN_TYPE} token {what}")


def _token_str(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise _token_error(
            f"field {name!r} is {_kind(obj, name)}; expected a non-empty string"
        )
    return value


def _token_int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _token_error(
            f"field {name!r} is {_kind(obj, name)}; expected a positive integer"
        )
    return value


def _token_b64(obj: dict[str, Any], name: str, *, allow_empty: bool) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise _token_error(f"field {name!r} is {_kind(obj, name)}; expected base64")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise _token_error(f"field {name!r} is not valid base64") from exc


def _token_context(obj: dict[str, Any]) -> dict[str, str | int]:
    value = obj.get("context")
    if not isinstance(value, dict):
        raise _token_error(
            f"field 'context' is {_kind(obj, 'context')}; expected an object"
        )
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise _token_error(
                f"context field {key!r} is {_kind(item)}; expected a string or "
                "an integer"
            )
    return dict(value)


# ---------------------------------------------------------------------------
# Binary header copies


class _BadCopy(Exception):
    """A header copy failed validation; the message says why."""


@dataclass(frozen=True, slots=True)
class _BinaryFields:
    """Binary header fields an update carries over, as raw bytes."""

    uuid: bytes
    label: bytes
    subsystem: bytes
    salts: tuple[bytes, bytes]  # primary, secondary


@dataclass(frozen=True, slots=True)
class _Copy:
    name: str
    seqid: int
    hdr_size: int
    uuid: bytes
    label: bytes
    subsystem: bytes
    metadata: dict[str, Any]


def _pack_binary(
    magic: bytes, hdr_size: int, seqid: int, fields: _BinaryFields, copy: int
) -> bytes:
    """Return a copy's 4096-byte binary header with a zero checksum."""
    offset = 0 if copy == 0 else hdr_size
    packed = _BIN.pack(
        magic,
        2,
        hdr_size,
        seqid,
        fields.label,
        _CSUM_ALG.encode("ascii"),
        fields.salts[copy],
        fields.uuid,
        fields.subsystem,
        offset,
        b"",
        b"",
    )
    return packed.ljust(_BIN_SIZE, b"\0")


def _checksum(binary: bytes, area: bytes) -> bytes:
    zeroed = (
        binary[:_CSUM_OFFSET] + bytes(_CSUM_SIZE) + binary[_CSUM_OFFSET + _CSUM_SIZE :]
    )
    return hashlib.sha256(zeroed + area).digest()


def _write_copies(
    fd: int,
    hdr_size: int,
    seqid: int,
    fields: _BinaryFields,
    area: bytes,
    fault: Fault | None,
) -> None:
    """Write both copies the way cryptsetup does, syncing after each copy."""
    copies = (("primary", 0, _MAGIC_PRIMARY), ("secondary", hdr_size, _MAGIC_SECONDARY))
    for index, (name, offset, magic) in enumerate(copies):
        binary = _pack_binary(magic, hdr_size, seqid, fields, index)
        csum = _checksum(binary, area).ljust(_CSUM_SIZE, b"\0")
        final = binary[:_CSUM_OFFSET] + csum + binary[_CSUM_OFFSET + _CSUM_SIZE :]
        steps = (
            ("binary", offset, binary),
            ("json", offset + _BIN_SIZE, area),
            ("csum", offset, final),
        )
        for step, where, data in steps:
            if fault is not None:
                fault(f"{name}-{step}")
            _pwrite(fd, data, where)
        # Sync before touching the other copy: never two half-written copies.
        os.fsync(fd)


def _read_copy(fd: int, offset: int, name: str) -> _Copy:
    """Read and check one copy; raise _BadCopy saying what is wrong."""
    raw = _pread(fd, _BIN_SIZE, offset)
    if len(raw) < _BIN_SIZE:
        raise _BadCopy(f"file ends inside the binary header at offset {offset}")
    (magic, version, hdr_size, seqid, label, alg, _salt, uuid_raw, subsystem,
     hdr_offset, _pad, csum) = _BIN.unpack_from(raw)  # fmt: skip
    expected = _MAGIC_PRIMARY if offset == 0 else _MAGIC_SECONDARY
    if magic != expected:
        raise _BadCopy(f"no LUKS2 magic at offset {offset}")
    if version != 2:
        raise _BadCopy(f"version is {version}, expected 2")
    if hdr_size not in _HDR_SIZES or (offset and hdr_size != offset):
        raise _BadCopy(f"metadata size {hdr_size} is invalid at offset {offset}")
    if hdr_offset != offset:
        raise _BadCopy(f"records offset {hdr_offset} but sits at offset {offset}")
    if _cstr(alg) != _CSUM_ALG:
        raise _BadCopy(f"checksum algorithm {_cstr(alg)!r} is not {_CSUM_ALG!r}")

    area = _pread(fd, hdr_size - _BIN_SIZE, offset + _BIN_SIZE)
    if len(area) < hdr_size - _BIN_SIZE:
        raise _BadCopy("file ends inside the JSON area")
    if not hmac.compare_digest(_checksum(raw, area), csum[:32]) or any(csum[32:]):
        raise _BadCopy("checksum mismatch")
    metadata = _parse_json_area(area)
    _check_structure(metadata, hdr_size)
    return _Copy(name, seqid, hdr_size, uuid_raw, label, subsystem, metadata)


def _scan_secondary(fd: int) -> tuple[_Copy | None, str, bool]:
    """Look for a valid secondary copy at every allowed offset.

    Returns the copy (or None), why none was usable, and whether any
    secondary magic was seen at all.
    """
    reasons = []
    for offset in _HDR_SIZES:
        if _pread(fd, len(_MAGIC_SECONDARY), offset) != _MAGIC_SECONDARY:
            continue
        try:
            return _read_copy(fd, offset, "secondary"), "", True
        except _BadCopy as exc:
            reasons.append(f"at offset {offset}: {exc}")
    if not reasons:
        return None, "no secondary header at any standard offset", False
    return None, "; ".join(reasons), True


def _read_best(fd: int, path: str) -> tuple[_Copy, tuple[str, ...]]:
    """Return the valid copy with the highest seqid and the damaged copies."""
    head = _pread(fd, 8, 0)
    if head[:6] == _MAGIC_PRIMARY and head[6:8] == _LUKS1_VERSION:
        raise VolumeFormatError(
            f"{path} is a LUKS1 volume, not LUKS2; blockcrypt serves LUKS2 only "
            "(`cryptsetup convert --type luks2` can convert it)"
        )
    failures: dict[str, str] = {}
    primary = secondary = None
    try:
        primary = _read_copy(fd, 0, "primary")
    except _BadCopy as exc:
        failures["primary"] = str(exc)
    if primary is not None:
        try:
            secondary = _read_copy(fd, primary.hdr_size, "secondary")
        except _BadCopy as exc:
            failures["secondary"] = str(exc)
    else:
        secondary, reason, seen = _scan_secondary(fd)
        if secondary is None:
            if not seen and head[:6] != _MAGIC_PRIMARY:
                raise VolumeFormatError(
                    f"{path} is not a LUKS2 volume (no LUKS magic at offset 0 or "
                    "at any secondary header offset). If it was one, both header "
                    "copies are gone: restore a header backup (`blockcrypt "
                    "restore-header`); otherwise create a volume with "
                    "`blockcrypt create`"
                )
            failures["secondary"] = reason

    valid = [copy for copy in (primary, secondary) if copy is not None]
    if not valid:
        raise VolumeFormatError(
            f"{path}: both LUKS2 header copies are damaged (primary: "
            f"{failures['primary']}; secondary: {failures['secondary']}); restore "
            f"the header from a backup with `cryptsetup luksHeaderRestore {path} "
            "--header-backup-file BACKUP`"
        )
    best = max(valid, key=lambda copy: copy.seqid)  # the primary wins a tie
    stale = [copy.name for copy in valid if copy.seqid < best.seqid]
    damaged = tuple(n for n in ("primary", "secondary") if n in failures or n in stale)
    return best, damaged


def _disk_salt(fd: int, offset: int, magic: bytes) -> bytes:
    """Return the salt of the copy at ``offset``, or a fresh one if unreadable."""
    raw = _pread(fd, _BIN.size, offset)
    if len(raw) == _BIN.size and raw.startswith(magic):
        salt: bytes = _BIN.unpack(raw)[6]
        if any(salt):
            return salt
    return os.urandom(_SALT_SIZE)


# ---------------------------------------------------------------------------
# JSON area


def _parse_json_area(area: bytes) -> dict[str, Any]:
    end = area.find(b"\0")
    if end < 0:
        raise _BadCopy("JSON area has no terminating NUL")
    if area[end:].strip(b"\0"):
        raise _BadCopy("JSON area has non-zero bytes after the JSON text")
    try:
        metadata = json.loads(area[:end].decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _BadCopy(f"JSON area is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise _BadCopy(f"JSON area holds {_kind(metadata)}, not an object")
    return metadata


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_structure(metadata: dict[str, Any], hdr_size: int) -> None:
    """Check what every LUKS2 JSON area needs; raise _BadCopy if it fails."""
    for section in _SECTIONS:
        objects = metadata.get(section)
        if not isinstance(objects, dict):
            raise _BadCopy(f"JSON '{section}' is {_kind(metadata, section)}")
        if len(objects) > _MAX_OBJECTS:
            raise _BadCopy(f"JSON '{section}' has {len(objects)} entries, max 32")
        for key, entry in objects.items():
            if not _DECIMAL.fullmatch(key) or int(key) >= _MAX_OBJECTS:
                raise _BadCopy(f"JSON '{section}' has an invalid id {key!r}")
            if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
                raise _BadCopy(f"JSON {section} {key} has no string 'type'")
    config = metadata.get("config")
    if not isinstance(config, dict):
        raise _BadCopy(f"JSON 'config' is {_kind(metadata, 'config')}")
    if config.get("json_size") != str(hdr_size - _BIN_SIZE):
        raise _BadCopy(
            f"config json_size is {config.get('json_size')!r}, expected "
            f"'{hdr_size - _BIN_SIZE}' for a {hdr_size}-byte header"
        )
    if _decimal(config.get("keyslots_size")) is None:
        raise _BadCopy("config keyslots_size is not a decimal string")


def _encode_json(metadata: dict[str, Any], hdr_size: int, path: str) -> bytes:
    """Return the compact JSON padded with zeros to fill the JSON area."""
    try:
        text = json.dumps(
            metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise VolumeFormatError(f"{path}: metadata is not JSON ({exc})") from exc
    room = hdr_size - _BIN_SIZE
    if len(text) + 1 > room:
        raise VolumeFormatError(
            f"{path}: metadata JSON is {len(text)} bytes; the JSON area of a "
            f"{hdr_size}-byte header holds at most {room - 1} plus the "
            "terminating NUL (make the tokens smaller)"
        )
    return text.ljust(room, b"\0")


def _check_new_metadata(metadata: dict[str, Any], hdr_size: int, path: str) -> None:
    """Refuse to write metadata that read_header would refuse."""
    if not isinstance(metadata, dict):
        raise VolumeFormatError(f"{path}: metadata is {_kind(metadata)}, not a dict")
    try:
        _check_structure(metadata, hdr_size)
    except _BadCopy as exc:
        raise VolumeFormatError(f"{path}: refusing to write metadata: {exc}") from exc
    _check_volume(metadata, path)


# ---------------------------------------------------------------------------
# What blockcrypt needs from the metadata


@dataclass(frozen=True, slots=True)
class _Segment:
    offset: int
    sector_size: int
    iv_tweak: int
    size: int | None


@dataclass(frozen=True, slots=True)
class _Digest:
    hash: str
    iterations: int
    salt: bytes
    value: bytes


def _decimal(value: Any) -> int | None:
    """Parse a LUKS2 64-bit decimal string; None if it is not one."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value) and int(value) < 2**64:
        return int(value)
    return None


def _check_volume(
    metadata: dict[str, Any], path: str
) -> tuple[_Segment, str | None, KMSToken | None]:
    requirements = metadata["config"].get("requirements", {})
    mandatory = (
        requirements.get("mandatory", []) if isinstance(requirements, dict) else None
    )
    if mandatory != []:
        raise VolumeFormatError(
            f"{path}: LUKS2 header has mandatory requirements {mandatory!r}; "
            "blockcrypt supports none (finish or abort the operation that set "
            "them, such as a reencryption, with cryptsetup first)"
        )
    segment = _check_segment(metadata, path)
    _segment_digest(metadata, path)
    token_id, token = _find_token(metadata, path)
    return segment, token_id, token


def _check_segment(metadata: dict[str, Any], path: str) -> _Segment:
    segments = metadata["segments"]
    if list(segments) != ["0"]:
        raise VolumeFormatError(
            f"{path}: LUKS2 header has segments {sorted(segments)}; blockcrypt "
            "needs exactly segment '0' (is a reencryption in progress?)"
        )
    seg = segments["0"]
    where = f"{path}: LUKS2 segment 0"
    if seg["type"] != "crypt" or seg.get("encryption") != _CIPHER:
        raise VolumeFormatError(
            f"{where} is type {seg['type']!r} with encryption "
            f"{seg.get('encryption')!r}; blockcrypt serves only 'crypt' "
            f"segments with {_CIPHER!r}"
        )
    sector_size = seg.get("sector_size")
    if type(sector_size) is not int or sector_size not in SECTOR_SIZES:
        raise VolumeFormatError(
            f"{where} has sector_size {sector_size!r}; expected one of {SECTOR_SIZES}"
        )
    offset, iv_tweak = _decimal(seg.get("offset")), _decimal(seg.get("iv_tweak"))
    if offset is None or iv_tweak is None:
        raise VolumeFormatError(
            f"{where}: offset {seg.get('offset')!r} or iv_tweak "
            f"{seg.get('iv_tweak')!r} is not a decimal string"
        )
    size = seg.get("size")
    length = 0 if size == "dynamic" else _decimal(size)
    if offset % sector_size or length is None or length % sector_size:
        raise VolumeFormatError(
            f"{where}: offset {offset} and size {size!r} must be multiples of "
            f"the {sector_size}-byte sector size"
        )
    return _Segment(
        offset, sector_size, iv_tweak, None if size == "dynamic" else length
    )


def _segment_digest(metadata: dict[str, Any], path: str) -> _Digest:
    """Return the one PBKDF2 digest linked to segment 0, checked."""
    linked = [
        (key, digest)
        for key, digest in metadata["digests"].items()
        if isinstance(digest.get("segments"), list) and "0" in digest["segments"]
    ]
    if len(linked) != 1:
        raise VolumeFormatError(
            f"{path}: {len(linked)} LUKS2 digests are linked to segment 0; "
            "expected exactly one"
        )
    key, digest = linked[0]
    where = f"{path}: LUKS2 digest {key}"
    if digest["type"] != "pbkdf2" or digest.get("hash") not in _DIGEST_HASHES:
        raise VolumeFormatError(
            f"{where} is {digest['type']!r} with hash {digest.get('hash')!r}; "
            f"expected 'pbkdf2' with one of {_DIGEST_HASHES}"
        )
    iterations = digest.get("iterations")
    if (
        isinstance(iterations, bool)
        or not isinstance(iterations, int)
        or not 1 <= iterations <= _MAX_ITERATIONS
    ):
        raise VolumeFormatError(f"{where} has iterations {iterations!r}")
    salt = _b64_field(digest, "salt", where)
    value = _b64_field(digest, "digest", where)
    if len(salt) != _DIGEST_SALT_SIZE or not 20 <= len(value) <= 64:
        raise VolumeFormatError(
            f"{where} has a {len(salt)}-byte salt and a {len(value)}-byte digest; "
            "expected a 32-byte salt and a 20- to 64-byte digest"
        )
    return _Digest(digest["hash"], iterations, salt, value)


def _b64_field(obj: dict[str, Any], name: str, where: str) -> bytes:
    value = obj.get(name)
    try:
        if isinstance(value, str):
            return base64.b64decode(value, validate=True)
    except binascii.Error:
        pass
    raise VolumeFormatError(f"{where}: field {name!r} is not base64")


def _find_token(
    metadata: dict[str, Any], path: str
) -> tuple[str | None, KMSToken | None]:
    """Return the lowest-numbered blockcrypt-kms token, if there is one."""
    tokens = metadata["tokens"]
    for key in sorted(tokens, key=int):
        if tokens[key]["type"] == TOKEN_TYPE:
            try:
                return key, KMSToken.from_json(tokens[key])
            except VolumeFormatError as exc:
                raise VolumeFormatError(f"{path}: LUKS2 token {key}: {exc}") from exc
    return None, None


def _build_header(copy: _Copy, damaged: tuple[str, ...], path: str) -> LUKS2Header:
    segment, token_id, token = _check_volume(copy.metadata, path)
    return LUKS2Header(
        uuid=_cstr(copy.uuid),
        label=_cstr(copy.label),
        seqid=copy.seqid,
        hdr_size=copy.hdr_size,
        data_offset=segment.offset,
        sector_size=segment.sector_size,
        cipher=_CIPHER,
        iv_tweak=segment.iv_tweak,
        metadata=copy.metadata,
        token=token,
        token_id=token_id,
        copy_used=copy.name,
        damaged_copies=damaged,
        data_size=segment.size,
    )


# ---------------------------------------------------------------------------
# Formatting


def _check_format_args(
    path: str,
    size: int,
    sector_size: int,
    volume_uuid: str,
    label: str,
    iterations: int,
) -> str:
    """Check format_volume's arguments; return the canonical UUID."""
    if sector_size not in SECTOR_SIZES:
        raise StorageError(
            f"{path}: sector size is {sector_size}; it must be one of {SECTOR_SIZES}"
        )
    if not isinstance(size, int) or size <= 0 or size % sector_size:
        raise StorageError(
            f"{path}: volume size is {size} bytes; it must be a positive "
            f"multiple of the {sector_size}-byte sector size"
        )
    try:
        canonical = str(uuid.UUID(volume_uuid))
    except (ValueError, TypeError, AttributeError) as exc:
        raise StorageError(
            f"{path}: volume UUID {volume_uuid!r} is not a UUID"
        ) from exc
    encoded = label.encode("utf-8")
    if len(encoded) > _LABEL_MAX or b"\0" in encoded:
        raise StorageError(
            f"{path}: label is {len(encoded)} bytes in UTF-8; the LUKS2 header "
            f"holds at most {_LABEL_MAX}, without NUL characters"
        )
    if iterations < _MIN_FORMAT_ITERATIONS:
        raise StorageError(
            f"{path}: pbkdf2_iterations is {iterations}; use at least "
            f"{_MIN_FORMAT_ITERATIONS}"
        )
    return canonical


def _initial_metadata(
    sector_size: int, dek: XTSKey, token: KMSToken, iterations: int
) -> dict[str, Any]:
    salt = os.urandom(_DIGEST_SALT_SIZE)
    digest = hashlib.pbkdf2_hmac("sha256", bytes(dek), salt, iterations, 32)
    return {
        "keyslots": {},
        "tokens": {"0": token.to_json()},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": str(DEFAULT_DATA_OFFSET),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": _CIPHER,
                "sector_size": sector_size,
            }
        },
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": [],
                "segments": ["0"],
                "hash": "sha256",
                "iterations": iterations,
                "salt": base64.b64encode(salt).decode("ascii"),
                "digest": base64.b64encode(digest).decode("ascii"),
            }
        },
        "config": {
            "json_size": str(DEFAULT_HDR_SIZE - _BIN_SIZE),
            "keyslots_size": str(DEFAULT_DATA_OFFSET - 2 * DEFAULT_HDR_SIZE),
        },
    }


# ---------------------------------------------------------------------------
# Low-level I/O


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"file descriptor {fd}"


@contextmanager
def _flock(fd: int, operation: int) -> Iterator[None]:
    fcntl.flock(fd, operation)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def _io_errors(path: str, action: str) -> Iterator[None]:
    """Turn an OSError into a StorageError that names the file and the step."""
    try:
        yield
    except FileExistsError as exc:
        raise VolumeFormatError(
            f"{path} already exists; refusing to format over it (pick a new path)"
        ) from exc
    except OSError as exc:
        raise StorageError(f"{path}: cannot {action}: {exc.strerror or exc}") from exc


def _pread(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _fsync_dir(path: str) -> None:
    dirfd = os.open(
        os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY
    )
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
