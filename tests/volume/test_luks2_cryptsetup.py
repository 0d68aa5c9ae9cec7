"""Interop: volumes written by blockcrypt against the cryptsetup binary.

cryptsetup is the reference implementation of LUKS2; every check here is one
that our reference notes (reference/luks2.md, section 6) list as runnable on a
machine without device-mapper. Costs are forced low (pbkdf2, 1000 iterations).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from blockcrypt.crypto.xts import XTSKey
from blockcrypt.volume.luks2 import (
    DEFAULT_DATA_OFFSET,
    KMSToken,
    LUKS2Header,
    read_header,
    verify_dek,
    write_metadata,
)

CRYPTSETUP = shutil.which("cryptsetup")

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(CRYPTSETUP is None, reason="needs cryptsetup (not on PATH)"),
]

MakeVolume = Callable[..., tuple[Path, LUKS2Header]]
FAST_PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")


def cryptsetup(
    *args: str | Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    assert CRYPTSETUP is not None
    return subprocess.run(
        [CRYPTSETUP, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def secret_file(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def read_path(path: Path) -> LUKS2Header:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_header(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()[: 2 * DEFAULT_DATA_OFFSET]).hexdigest()


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_cryptsetup_luksdump_accepts_volume(
    make_volume: MakeVolume, sector_size: int
) -> None:
    path, header = make_volume(sector_size=sector_size, label="vol")
    before = sha256(path)

    dump = cryptsetup("--debug", "luksDump", path).stdout

    assert "Version:       \t2" in dump
    assert f"UUID:          \t{header.uuid}" in dump
    assert f"sector: {sector_size} [bytes]" in dump
    assert "cipher: aes-xts-plain64" in dump
    assert "0: blockcrypt-kms" in dump
    assert "checksum error" not in dump.lower()
    assert "requires recovery" not in dump.lower()
    assert sha256(path) == before  # cryptsetup found nothing to repair


def test_cryptsetup_isluks_type_luks2(make_volume: MakeVolume) -> None:
    path, _ = make_volume()

    assert cryptsetup("isLuks", "--type", "luks2", path, check=False).returncode == 0


def test_cryptsetup_json_and_token_export_match(
    make_volume: MakeVolume, token: KMSToken
) -> None:
    path, header = make_volume()

    dumped = json.loads(cryptsetup("luksDump", "--dump-json-metadata", path).stdout)
    exported = cryptsetup("token", "export", "--token-id", "0", path).stdout

    assert dumped == header.metadata
    assert json.loads(exported) == token.to_json()


def test_cryptsetup_repair_leaves_file_identical(make_volume: MakeVolume) -> None:
    path, _ = make_volume()
    before = path.read_bytes()[: 2 * DEFAULT_DATA_OFFSET]

    cryptsetup("repair", "--batch-mode", path)

    assert path.read_bytes()[: 2 * DEFAULT_DATA_OFFSET] == before


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_cryptsetup_checks_volume_key(
    make_volume: MakeVolume, tmp_path: Path, dek: XTSKey, sector_size: int
) -> None:
    path, _ = make_volume(sector_size=sector_size)
    right = secret_file(tmp_path / "right.key", bytes(dek))
    wrong = secret_file(tmp_path / "wrong.key", bytes(dek)[::-1])

    def test_key(key_file: Path) -> int:
        return cryptsetup(
            "open", "--test-passphrase", "--volume-key-file", key_file,
            "--key-size", "512", path, check=False,
        ).returncode  # fmt: skip

    assert test_key(right) == 0
    assert test_key(wrong) == 2


def test_cryptsetup_edits_keep_token_and_key(
    make_volume: MakeVolume, tmp_path: Path, dek: XTSKey, token: KMSToken
) -> None:
    path, _ = make_volume()
    vk = secret_file(tmp_path / "vk", bytes(dek))
    passphrase = secret_file(tmp_path / "pass", b"recovery passphrase")

    cryptsetup("config", "--label", "newlabel", path)
    relabelled = read_path(path)
    assert relabelled.label == "newlabel"
    assert relabelled.token == token
    assert verify_dek(relabelled, dek)
    assert relabelled.damaged_copies == ()

    cryptsetup(
        "luksAddKey", "--batch-mode", "--volume-key-file", vk, "--key-size", "512",
        *FAST_PBKDF, path, passphrase,
    )  # fmt: skip
    with_slot = read_path(path)
    assert list(with_slot.metadata["keyslots"]) == ["0"]
    assert with_slot.seqid > relabelled.seqid
    assert (with_slot.label, with_slot.token) == ("newlabel", token)
    assert verify_dek(with_slot, dek)
    assert with_slot.damaged_copies == ()

    # The recovery keyslot returns exactly our data key.
    out = tmp_path / "dumped.key"
    cryptsetup(
        "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", passphrase,
        "--volume-key-file", out, path,
    )  # fmt: skip
    assert out.read_bytes() == bytes(dek)


def test_cryptsetup_accepts_our_update_after_its_own(
    make_volume: MakeVolume, tmp_path: Path, dek: XTSKey
) -> None:
    path, _ = make_volume()
    vk = secret_file(tmp_path / "vk", bytes(dek))
    passphrase = secret_file(tmp_path / "pass", b"recovery passphrase")
    cryptsetup(
        "luksAddKey", "--batch-mode", "--volume-key-file", vk, "--key-size", "512",
        *FAST_PBKDF, path, passphrase,
    )  # fmt: skip
    header = read_path(path)
    rotated = KMSToken("cmk-0002", "AES-256-GCM", b"\x05" * 12, b"\x06" * 80, {})
    metadata = json.loads(json.dumps(header.metadata))
    metadata["tokens"]["0"] = rotated.to_json()

    fd = os.open(path, os.O_RDWR)
    try:
        write_metadata(fd, header, metadata)
    finally:
        os.close(fd)

    before = path.read_bytes()[: 2 * DEFAULT_DATA_OFFSET]
    cryptsetup("repair", "--batch-mode", path)
    assert path.read_bytes()[: 2 * DEFAULT_DATA_OFFSET] == before
    exported = cryptsetup("token", "export", "--token-id", "0", path).stdout
    assert json.loads(exported) == rotated.to_json()
    assert f"Epoch:         \t{header.seqid + 1}" in cryptsetup("luksDump", path).stdout
    unlock = cryptsetup(
        "open", "--test-passphrase", "--key-file", passphrase, path, check=False
    )
    assert unlock.returncode == 0


@pytest.mark.parametrize("metadata_size", ["16k", "64k"])
def test_read_header_reads_cryptsetup_volume(
    tmp_path: Path, dek: XTSKey, metadata_size: str
) -> None:
    path = tmp_path / "cs.img"
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    vk = secret_file(tmp_path / "vk", bytes(dek))
    passphrase = secret_file(tmp_path / "pass", b"passphrase")
    cryptsetup(
        "luksFormat", "--type", "luks2", "--batch-mode", "--volume-key-file", vk,
        "--key-size", "512", "--sector-size", "4096", "--luks2-metadata-size",
        metadata_size, *FAST_PBKDF, "--key-file", passphrase, path,
    )  # fmt: skip

    header = read_path(path)

    assert header.hdr_size == {"16k": 16384, "64k": 65536}[metadata_size]
    assert (header.sector_size, header.cipher) == (4096, "aes-xts-plain64")
    assert (header.token, header.token_id, header.damaged_copies) == (None, None, ())
    assert verify_dek(header, dek)
