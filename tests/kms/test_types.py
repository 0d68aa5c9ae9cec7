"""Wire format pieces: encryption context, WrappedKey records, KeyInfo."""

from __future__ import annotations

import pytest

from blockcrypt.kms import KeyInfo, WrappedKey, encryption_context

VOLUME = "6f1c0a8e-5b9d-4c2a-9e3f-0a1b2c3d4e5f"
KEY_ID = "cmk-0123456789abcdef"


def test_encryption_context_known_bytes() -> None:
    assert encryption_context(VOLUME, 1, KEY_ID) == (
        b"blockcrypt-dek-v1\0"
        b'{"format_version":1,"key_id":"cmk-0123456789abcdef",'
        b'"volume_uuid":"6f1c0a8e-5b9d-4c2a-9e3f-0a1b2c3d4e5f"}'
    )


def test_encryption_context_normalises_uuid_spelling() -> None:
    assert encryption_context(VOLUME.upper(), 1, KEY_ID) == encryption_context(
        "{" + VOLUME.replace("-", "") + "}", 1, KEY_ID
    )


def test_encryption_context_differs_per_field() -> None:
    base = encryption_context(VOLUME, 1, KEY_ID)

    assert encryption_context(VOLUME, 2, KEY_ID) != base
    assert encryption_context(VOLUME, 1, "cmk-0123456789abcdee") != base
    assert encryption_context(VOLUME[:-1] + "0", 1, KEY_ID) != base


@pytest.mark.parametrize(
    ("volume", "version", "key_id", "message"),
    [
        ("vol-7", 1, KEY_ID, "is not a UUID"),
        (VOLUME, True, KEY_ID, "format version"),
        (VOLUME, -1, KEY_ID, "expected >= 0"),
        (VOLUME, 1, "", "key id"),
    ],
)
def test_encryption_context_rejects_bad_input(
    volume: str, version: int, key_id: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encryption_context(volume, version, key_id)


def test_wrapped_key_json_round_trip() -> None:
    wrapped = WrappedKey(KEY_ID, 1, "AES-256-GCM", b"\x01" * 12, b"\x02" * 80)

    assert WrappedKey.from_json(wrapped.to_json()) == wrapped


@pytest.mark.parametrize(
    "change",
    [{"iv": "not base64!"}, {"key_version": "1"}, {"key_id": 5}, {"ciphertext": None}],
)
def test_wrapped_key_from_json_rejects_bad_record(change: dict[str, object]) -> None:
    record = WrappedKey(KEY_ID, 1, "AES-256-GCM", b"\x01" * 12, b"\x02" * 80).to_json()
    record.update(change)

    with pytest.raises(ValueError, match="wrapped key record"):
        WrappedKey.from_json(record)


def test_wrapped_key_repr_hides_blob() -> None:
    wrapped = WrappedKey(KEY_ID, 1, "AES-256-GCM", b"\xaa" * 12, b"\xbb" * 80)

    assert "\\xaa" not in repr(wrapped) and "\\xbb" not in repr(wrapped)
    assert KEY_ID in repr(wrapped)


def test_key_info_to_json() -> None:
    info = KeyInfo(
        KEY_ID, "a", "2025-01-01T00:00:00Z", "AES_256", "Enabled", "memory", None
    )

    assert info.to_json() == {
        "key_id": KEY_ID,
        "alias": "a",
        "created": "2025-01-01T00:00:00Z",
        "key_spec": "AES_256",
        "state": "Enabled",
        "backend": "memory",
        "token_label": None,
        "aliases": [],
        "current_version": 1,
        "deletion_date": None,
    }
