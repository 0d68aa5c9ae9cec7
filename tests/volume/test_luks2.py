"""Unit tests for the LUKS2 header writer and reader (no external tools).

The helpers below re-implement the copy checksum independently of the module,
so a test that says "both copies are valid" does not trust the code it tests.
"""

from __future__ import annotations

import base64
import copy
import fcntl
import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockcrypt.crypto.xts import XTSKey
from blockcrypt.errors import StorageError, VolumeFormatError
from blockcrypt.volume.luks2 import (
    DEFAULT_DATA_OFFSET,
    DEFAULT_HDR_SIZE,
    TOKEN_TYPE,
    KMSToken,
    LUKS2Header,
    format_volume,
    read_header,
    verify_dek,
    write_metadata,
)

MakeVolume = Callable[..., tuple[Path, LUKS2Header]]
OpenFd = Callable[..., int]
VOLUME = "1f0c39a8-51f6-4c9e-8a1e-8c2ec2f0b0aa"
HDR = DEFAULT_HDR_SIZE
JSON_AREA = HDR - 4096
STEPS = (
    "primary-binary",
    "primary-json",
    "primary-csum",
    "secondary-binary",
    "secondary-json",
    "secondary-csum",
)


# ---------------------------------------------------------------------------
# Independent helpers


def copy_is_valid(image: bytes, offset: int) -> bool:
    """Check one copy's magic, hdr_offset and sha256 checksum (spec 2.1)."""
    binary = image[offset : offset + 4096]
    magic = b"LUKS\xba\xbe" if offset == 0 else b"SKUL\xba\xbe"
    (hdr_size,) = struct.unpack_from(">Q", binary, 8)
    (hdr_offset,) = struct.unpack_from(">Q", binary, 256)
    area = image[offset + 4096 : offset + hdr_size]
    zeroed = binary[:448] + bytes(64) + binary[512:]
    digest = hashlib.sha256(zeroed + area).digest()
    return (
        binary.startswith(magic)
        and hdr_offset == offset
        and binary[448:480] == digest
        and not any(binary[480:512])
    )


def seqid_of(image: bytes, offset: int) -> int:
    return int(struct.unpack_from(">Q", image, offset + 16)[0])


def salt_of(image: bytes, offset: int) -> bytes:
    return image[offset + 104 : offset + 168]


def write_raw_area(
    path: Path, area_text: bytes, *, offsets: tuple[int, ...] = (0, HDR), **kw: int
) -> None:
    """Put arbitrary JSON bytes into copies and fix their checksums."""
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            binary = bytearray(f.read(4096))
            if "seqid" in kw:
                struct.pack_into(">Q", binary, 16, kw["seqid"])
            area = area_text.ljust(JSON_AREA, b"\0")
            binary[448:512] = bytes(64)
            binary[448:480] = hashlib.sha256(bytes(binary) + area).digest()
            f.seek(offset)
            f.write(bytes(binary) + area)


def write_raw_metadata(path: Path, metadata: dict[str, Any], **kw: Any) -> None:
    text = json.dumps(metadata, separators=(",", ":")).encode()
    write_raw_area(path, text, **kw)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0x01]))


def read_path(path: Path) -> LUKS2Header:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_header(fd)
    finally:
        os.close(fd)


def with_token(header: LUKS2Header, token: KMSToken) -> dict[str, Any]:
    metadata = copy.deepcopy(header.metadata)
    metadata["tokens"]["0"] = token.to_json()
    return metadata


# ---------------------------------------------------------------------------
# format_volume


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_format_volume_round_trip(
    make_volume: MakeVolume, token: KMSToken, sector_size: int
) -> None:
    path, header = make_volume(sector_size=sector_size, label="data-1")

    assert header == read_path(path)
    assert header.uuid == "0b0e6f0a-3c1d-4f5e-9a7b-1c2d3e4f5a6b"
    assert header.label == "data-1"
    assert (header.seqid, header.hdr_size) == (1, HDR)
    assert header.data_offset == DEFAULT_DATA_OFFSET
    assert header.sector_size == sector_size
    assert (header.cipher, header.iv_tweak) == ("aes-xts-plain64", 0)
    assert (header.token, header.token_id) == (token, "0")
    assert (header.copy_used, header.damaged_copies) == ("primary", ())

    metadata = header.metadata
    assert metadata["keyslots"] == {}
    assert metadata["tokens"] == {"0": token.to_json()}
    assert metadata["segments"]["0"] == {
        "type": "crypt",
        "offset": str(DEFAULT_DATA_OFFSET),
        "size": "dynamic",
        "iv_tweak": "0",
        "encryption": "aes-xts-plain64",
        "sector_size": sector_size,
    }
    digest = metadata["digests"]["0"]
    assert digest["keyslots"] == [] and digest["segments"] == ["0"]
    assert (digest["type"], digest["hash"], digest["iterations"]) == (
        "pbkdf2",
        "sha256",
        1000,
    )
    assert len(base64.b64decode(digest["salt"])) == 32
    assert len(base64.b64decode(digest["digest"])) == 32
    assert metadata["config"] == {
        "json_size": str(JSON_AREA),
        "keyslots_size": str(DEFAULT_DATA_OFFSET - 2 * HDR),
    }


def test_format_volume_writes_two_valid_copies(make_volume: MakeVolume) -> None:
    path, _ = make_volume()
    image = path.read_bytes()[: 2 * HDR]

    assert copy_is_valid(image, 0) and copy_is_valid(image, HDR)
    assert salt_of(image, 0) != salt_of(image, HDR)
    assert image[4096 : 4096 + JSON_AREA] == image[HDR + 4096 : 2 * HDR]
    text, _, tail = image[4096:HDR].partition(b"\0")
    assert not any(tail)
    assert b": " not in text and b", " not in text  # compact, like cryptsetup


def test_format_volume_file_is_sparse_with_exact_size(make_volume: MakeVolume) -> None:
    size = 64 << 20
    path, _ = make_volume(size=size)
    st_ = path.stat()

    assert st_.st_size == DEFAULT_DATA_OFFSET + size
    assert st_.st_blocks * 512 < 1 << 20
    assert st_.st_mode & 0o777 == 0o600


def test_format_volume_refuses_existing_file(
    tmp_path: Path, dek: XTSKey, token: KMSToken
) -> None:
    path = tmp_path / "exists.img"
    path.write_bytes(b"precious")

    with pytest.raises(VolumeFormatError, match="already exists"):
        format_volume(path, size=4096, volume_uuid=VOLUME, dek=dek, token=token)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize(
    ("size", "sector_size"),
    [(0, 4096), (-4096, 4096), (4096 + 512, 4096), (1000, 512)],
)
def test_format_volume_refuses_bad_size(
    tmp_path: Path, dek: XTSKey, token: KMSToken, size: int, sector_size: int
) -> None:
    path = tmp_path / "v.img"

    with pytest.raises(StorageError, match=f"{sector_size}") as info:
        format_volume(
            path, size=size, sector_size=sector_size, volume_uuid=VOLUME, dek=dek,
            token=token,
        )  # fmt: skip
    assert str(size) in str(info.value)
    assert not path.exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sector_size": 8192}, "sector size is 8192"),
        ({"volume_uuid": "not-a-uuid"}, "not a UUID"),
        ({"label": "x" * 48}, "48 bytes"),
        ({"label": "a\0b"}, "NUL"),
        ({"pbkdf2_iterations": 10}, "at least 1000"),
    ],
)
def test_format_volume_refuses_bad_arguments(
    tmp_path: Path, dek: XTSKey, token: KMSToken, kwargs: dict[str, Any], match: str
) -> None:
    path = tmp_path / "v.img"
    options: dict[str, Any] = {"volume_uuid": VOLUME, "dek": dek, "token": token}

    with pytest.raises(StorageError, match=match):
        format_volume(path, size=1 << 20, **{**options, **kwargs})
    assert not path.exists()


def test_format_volume_refuses_token_too_large(
    tmp_path: Path, dek: XTSKey, token: KMSToken
) -> None:
    path = tmp_path / "v.img"
    big = KMSToken(
        key_id="k", mechanism="m", iv=b"", wrapped_dek=bytes(9000), context={}
    )

    with pytest.raises(VolumeFormatError, match=r"metadata JSON is \d+ bytes"):
        format_volume(path, size=1 << 20, volume_uuid=VOLUME, dek=dek, token=big)
    assert not path.exists()


# ---------------------------------------------------------------------------
# read_header: damaged copies


def test_read_header_uses_secondary_when_primary_json_is_damaged(
    make_volume: MakeVolume,
) -> None:
    path, header = make_volume()
    flip_byte(path, 4096 + 20)

    got = read_path(path)

    assert (got.copy_used, got.damaged_copies) == ("secondary", ("primary",))
    assert got.metadata == header.metadata and got.token == header.token


def test_read_header_scans_for_secondary_when_primary_is_wiped(
    make_volume: MakeVolume,
) -> None:
    path, header = make_volume()
    with open(path, "r+b") as f:
        f.write(bytes(HDR))

    got = read_path(path)

    assert (got.copy_used, got.damaged_copies) == ("secondary", ("primary",))
    assert got.metadata == header.metadata


def test_read_header_reports_damaged_secondary(make_volume: MakeVolume) -> None:
    path, header = make_volume()
    flip_byte(path, HDR + 4096 + 20)

    got = read_path(path)

    assert (got.copy_used, got.damaged_copies) == ("primary", ("secondary",))


def test_read_header_prefers_higher_seqid(make_volume: MakeVolume) -> None:
    path, header = make_volume(label="x")
    newer = copy.deepcopy(header.metadata)
    newer["tokens"] = {}
    write_raw_metadata(path, newer, offsets=(HDR,), seqid=7)

    got = read_path(path)

    assert (got.copy_used, got.seqid, got.token) == ("secondary", 7, None)
    assert got.damaged_copies == ("primary",)


def test_read_header_refuses_two_damaged_copies(make_volume: MakeVolume) -> None:
    path, _ = make_volume()
    flip_byte(path, 4096 + 20)
    flip_byte(path, HDR + 4096 + 20)

    with pytest.raises(VolumeFormatError) as info:
        read_path(path)

    message = str(info.value)
    assert str(path) in message and "both LUKS2 header copies" in message
    assert "primary: checksum mismatch" in message
    assert "secondary: at offset 16384: checksum mismatch" in message
    assert "cryptsetup luksHeaderRestore" in message


@pytest.mark.parametrize(
    "content",
    [b"", b"\0" * 8192, os.urandom(64 * 1024), b"LUKS"],
    ids=["empty", "zeros", "random", "short"],
)
def test_read_header_refuses_non_luks_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "plain.img"
    path.write_bytes(content)

    with pytest.raises(VolumeFormatError) as info:
        read_path(path)

    message = str(info.value)
    assert message.startswith(f"{path} is not a LUKS2 volume (no LUKS magic")
    assert "`blockcrypt create`" in message


def test_read_header_refuses_luks1(tmp_path: Path) -> None:
    path = tmp_path / "luks1.img"
    path.write_bytes(b"LUKS\xba\xbe\x00\x01" + bytes(4096))

    with pytest.raises(VolumeFormatError, match="LUKS1 volume, not LUKS2"):
        read_path(path)


def test_read_header_refuses_bytes_after_json(make_volume: MakeVolume) -> None:
    path, header = make_volume()
    text = json.dumps(header.metadata, separators=(",", ":")).encode()
    write_raw_area(path, text + b"\0garbage")

    with pytest.raises(VolumeFormatError, match="non-zero bytes after the JSON"):
        read_path(path)


def _set(path: tuple[str, ...], value: Any) -> Any:
    def mutate(metadata: dict[str, Any]) -> None:
        target = metadata
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()
_SEG = ("segments", "0")
_DIG = ("digests", "0")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            _set(("config", "requirements"), {"mandatory": ["online-reencrypt-v2"]}),
            "mandatory requirements",
        ),
        (_set((*_SEG, "encryption"), "aes-cbc-essiv:sha256"), "aes-xts-plain64"),
        (_set((*_SEG, "type"), "linear"), "'linear'"),
        (_set(("segments", "1"), {"type": "crypt"}), "exactly segment '0'"),
        (_set((*_SEG, "offset"), str(DEFAULT_DATA_OFFSET + 512)), "multiples"),
        (_set((*_SEG, "size"), "1000"), "multiples"),
        (_set((*_SEG, "offset"), 16777216), "not a decimal string"),
        (_set((*_SEG, "sector_size"), 8192), "sector_size 8192"),
        (_set((*_SEG, "sector_size"), 4096.0), "sector_size 4096.0"),
        (_set((*_DIG, "segments"), []), "0 LUKS2 digests"),
        (_set((*_DIG, "salt"), base64.b64encode(bytes(16)).decode()), "16-byte"),
        (_set((*_DIG, "hash"), "md5"), "hash 'md5'"),
        (_set((*_DIG, "iterations"), 0), "iterations 0"),
        (_set(("config", "json_size"), "4096"), "json_size"),
        (_set(("keyslots",), []), "'keyslots'"),
        (_set(("config",), _DELETE), "'config'"),
        (_set(("tokens", "0", "wrapped_dek"), _DELETE), "'wrapped_dek' is missing"),
    ],
)
def test_read_header_refuses_unusable_metadata(
    make_volume: MakeVolume, mutate: Any, match: str
) -> None:
    path, header = make_volume()
    metadata = copy.deepcopy(header.metadata)
    mutate(metadata)
    write_raw_metadata(path, metadata)

    with pytest.raises(VolumeFormatError, match=match):
        read_path(path)


def test_read_header_error_never_shows_wrapped_key(make_volume: MakeVolume) -> None:
    path, header = make_volume()
    metadata = copy.deepcopy(header.metadata)
    wrapped = metadata["tokens"]["0"]["wrapped_dek"]
    metadata["tokens"]["0"]["wrapped_dek"] = wrapped + "!"
    write_raw_metadata(path, metadata)

    with pytest.raises(
        VolumeFormatError, match="'wrapped_dek' is not valid base64"
    ) as info:
        read_path(path)
    assert wrapped not in str(info.value)


def test_read_header_without_kms_token(make_volume: MakeVolume) -> None:
    path, header = make_volume()
    metadata = copy.deepcopy(header.metadata)
    metadata["tokens"] = {"0": {"type": "other-tool", "keyslots": []}}
    write_raw_metadata(path, metadata)

    got = read_path(path)

    assert (got.token, got.token_id) == (None, None)


def test_read_header_takes_lowest_numbered_kms_token(
    make_volume: MakeVolume, token: KMSToken
) -> None:
    path, header = make_volume()
    second = KMSToken(
        key_id="cmk-other", mechanism="m", iv=b"", wrapped_dek=b"w", context={}
    )
    metadata = copy.deepcopy(header.metadata)
    metadata["tokens"] = {
        "12": second.to_json(),
        "3": {"type": "other-tool", "keyslots": []},
        "5": token.to_json(),
    }
    write_raw_metadata(path, metadata)

    got = read_path(path)

    assert (got.token_id, got.token) == ("5", token)


# ---------------------------------------------------------------------------
# read_header: locking


def test_read_header_releases_its_lock(
    make_volume: MakeVolume, open_fd: OpenFd
) -> None:
    path, _ = make_volume()
    fd = open_fd(path, os.O_RDONLY)
    read_header(fd)

    other = open_fd(path, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise if still held


def test_read_header_waits_for_a_writer(
    make_volume: MakeVolume, open_fd: OpenFd
) -> None:
    path, _ = make_volume()
    writer = open_fd(path, os.O_RDONLY)
    fcntl.flock(writer, fcntl.LOCK_EX)
    reader = open_fd(path, os.O_RDONLY)
    results: list[LUKS2Header] = []
    thread = threading.Thread(target=lambda: results.append(read_header(reader)))

    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and not results
    fcntl.flock(writer, fcntl.LOCK_UN)
    thread.join(5)
    assert len(results) == 1


# ---------------------------------------------------------------------------
# verify_dek


def test_verify_dek(make_volume: MakeVolume, dek: XTSKey, other_dek: XTSKey) -> None:
    _, header = make_volume()

    assert verify_dek(header, dek) is True
    assert verify_dek(header, other_dek) is False


# ---------------------------------------------------------------------------
# write_metadata


def test_write_metadata_bumps_seqid_and_keeps_salts(
    make_volume: MakeVolume, open_fd: OpenFd, token: KMSToken, dek: XTSKey
) -> None:
    path, header = make_volume(label="keep-me")
    before = path.read_bytes()[: 2 * HDR]
    rotated = KMSToken(
        key_id=token.key_id,
        mechanism=token.mechanism,
        iv=b"\x01" * 12,
        wrapped_dek=b"\x02" * 80,
        context=token.context,
        key_version=2,
    )
    fd = open_fd(path)

    new = write_metadata(fd, header, with_token(header, rotated))

    image = path.read_bytes()[: 2 * HDR]
    assert copy_is_valid(image, 0) and copy_is_valid(image, HDR)
    assert seqid_of(image, 0) == seqid_of(image, HDR) == 2
    assert salt_of(image, 0) == salt_of(before, 0)
    assert salt_of(image, HDR) == salt_of(before, HDR)
    assert (new.seqid, new.token, new.label, new.uuid) == (
        2,
        rotated,
        "keep-me",
        header.uuid,
    )
    assert (new.copy_used, new.damaged_copies) == ("primary", ())
    assert read_header(fd) == new
    assert verify_dek(new, dek)


def test_write_metadata_repairs_a_damaged_copy(
    make_volume: MakeVolume, open_fd: OpenFd
) -> None:
    path, _ = make_volume()
    flip_byte(path, 4096 + 20)
    fd = open_fd(path)
    header = read_header(fd)
    assert header.damaged_copies == ("primary",)

    new = write_metadata(fd, header, header.metadata)

    image = path.read_bytes()[: 2 * HDR]
    assert copy_is_valid(image, 0) and copy_is_valid(image, HDR)
    assert new.damaged_copies == ()


def test_write_metadata_refuses_a_stale_header(
    make_volume: MakeVolume, open_fd: OpenFd
) -> None:
    path, header = make_volume()
    fd = open_fd(path)
    write_metadata(fd, header, header.metadata)
    before = path.read_bytes()

    with pytest.raises(VolumeFormatError, match="changed since it was read"):
        write_metadata(fd, header, header.metadata)
    assert path.read_bytes() == before


def test_write_metadata_refuses_json_too_large(
    make_volume: MakeVolume, open_fd: OpenFd, token: KMSToken
) -> None:
    path, header = make_volume()
    metadata = copy.deepcopy(header.metadata)
    metadata["tokens"]["0"]["padding"] = "x" * JSON_AREA
    before = path.read_bytes()

    with pytest.raises(VolumeFormatError, match=f"at most {JSON_AREA - 1}"):
        write_metadata(open_fd(path), header, metadata)
    assert path.read_bytes() == before


def test_write_metadata_accepts_json_filling_the_area(
    make_volume: MakeVolume, open_fd: OpenFd
) -> None:
    path, header = make_volume()
    metadata = copy.deepcopy(header.metadata)
    metadata["tokens"]["0"]["padding"] = ""
    used = len(json.dumps(metadata, separators=(",", ":")))
    metadata["tokens"]["0"]["padding"] = "x" * (JSON_AREA - 1 - used)

    new = write_metadata(open_fd(path), header, metadata)

    assert new.metadata == metadata
    image = path.read_bytes()
    assert image[HDR - 1] == 0 and image[HDR - 2] != 0


def test_write_metadata_refuses_invalid_metadata(
    make_volume: MakeVolume, open_fd: OpenFd
) -> None:
    path, header = make_volume()
    metadata = copy.deepcopy(header.metadata)
    metadata["segments"]["0"]["encryption"] = "aes-cbc-plain"
    before = path.read_bytes()

    with pytest.raises(VolumeFormatError, match="aes-xts-plain64"):
        write_metadata(open_fd(path), header, metadata)
    assert path.read_bytes() == before


def test_write_metadata_calls_fault_hook_in_write_order(
    make_volume: MakeVolume, open_fd: OpenFd
) -> None:
    path, header = make_volume()
    steps: list[str] = []

    write_metadata(open_fd(path), header, header.metadata, _fault=steps.append)

    assert tuple(steps) == STEPS


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", STEPS)
def test_write_metadata_crash_keeps_old_or_new_metadata(
    make_volume: MakeVolume, open_fd: OpenFd, token: KMSToken, step: str
) -> None:
    path, header = make_volume()
    changed = with_token(header, KMSToken("k2", "m", b"", b"w2", {}))

    def fault(name: str) -> None:
        if name == step:
            raise Crash(name)

    fd = open_fd(path)
    with pytest.raises(Crash):
        write_metadata(fd, header, changed, _fault=fault)

    # The primary copy completes before the secondary is touched.
    after = read_header(fd)
    expected = header.metadata if step.startswith("primary") else changed
    assert after.metadata == expected
    # Only a crash before the first write leaves both copies as they were.
    assert (after.damaged_copies == ()) == (step == "primary-binary")

    # The next update starts from what is on disk and repairs both copies.
    final = write_metadata(fd, after, changed)
    image = path.read_bytes()[: 2 * HDR]
    assert copy_is_valid(image, 0) and copy_is_valid(image, HDR)
    assert (final.metadata, final.damaged_copies) == (changed, ())


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, 2 * HDR - 1), st.integers(1, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_read_header_damage_gives_valid_metadata_or_format_error(
    make_volume: MakeVolume, flips: list[tuple[int, int]]
) -> None:
    # Invariant: damage never yields a third state or another exception type.
    path, header = make_volume()
    with open(path, "r+b") as f:
        for offset, mask in flips:
            f.seek(offset)
            value = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([value ^ mask]))

    try:
        got = read_path(path)
    except VolumeFormatError:
        return
    assert got.metadata == header.metadata
    assert got.token == header.token


# ---------------------------------------------------------------------------
# KMSToken


def test_kms_token_json_round_trip(token: KMSToken) -> None:
    obj = token.to_json()

    assert obj == {
        "type": TOKEN_TYPE,
        "keyslots": [],
        "kms": "pkcs11",
        "key_id": "cmk-0001",
        "key_version": 1,
        "mechanism": "AES-256-GCM",
        "iv": base64.b64encode(bytes(range(12))).decode(),
        "context": token.context,
        "wrapped_dek": base64.b64encode(bytes(range(100, 180))).decode(),
    }
    assert KMSToken.from_json(json.loads(json.dumps(obj))) == token


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("type", "luks2-keyring", "has type 'luks2-keyring'"),
        ("keyslots", None, "'keyslots' is null"),
        ("key_id", _DELETE, "'key_id' is missing"),
        ("key_id", "", "'key_id' is an empty string"),
        ("kms", 3, "'kms' is a number"),
        ("key_version", "1", "'key_version' is a string"),
        ("key_version", True, "'key_version' is a boolean"),
        ("key_version", 0, "positive integer"),
        ("iv", "***", "'iv' is not valid base64"),
        ("wrapped_dek", "", "'wrapped_dek' is an empty string"),
        ("context", [], "'context' is an array"),
        ("context", {"n": 1.5}, "context field 'n' is a number"),
        ("context", {"b": False}, "context field 'b' is a boolean"),
    ],
)
def test_kms_token_from_json_refuses_bad_fields(
    token: KMSToken, field: str, value: Any, match: str
) -> None:
    obj = token.to_json()
    if value is _DELETE:
        del obj[field]
    else:
        obj[field] = value

    with pytest.raises(VolumeFormatError, match=match):
        KMSToken.from_json(obj)


def test_kms_token_from_json_refuses_non_object() -> None:
    with pytest.raises(VolumeFormatError, match="not a JSON object"):
        KMSToken.from_json([])  # type: ignore[arg-type]
