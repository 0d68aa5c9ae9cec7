"""The CMKStore contract: every backend must pass every test here."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest

from blockcrypt.errors import KeyNotFound, KMSError, UnwrapFailed
from blockcrypt.kms import CMKStore, KeyInfo, encryption_context
from blockcrypt.kms._base import KeyMaterialStore

VOLUME = "6f1c0a8e-5b9d-4c2a-9e3f-0a1b2c3d4e5f"
OTHER_VOLUME = "0d9e8f7a-6b5c-4d3e-8f1a-2b3c4d5e6f70"


def context_for(info: KeyInfo, volume: str = VOLUME) -> bytes:
    return encryption_context(volume, 1, info.key_id)


def test_create_key_describes_itself(store: CMKStore, alias: str) -> None:
    info = store.create_key(alias)

    assert info.alias == alias
    assert info.key_id.startswith("cmk-") and len(info.key_id) == 20
    assert info.key_spec == "AES_256"
    assert info.state == "Enabled"
    assert info.created.endswith("Z")
    assert info.to_json()["key_id"] == info.key_id


def test_describe_key_by_id_and_by_alias(store: CMKStore, alias: str) -> None:
    info = store.create_key(alias)

    assert store.describe_key(info.key_id) == info
    assert store.describe_key(alias) == info


def test_list_keys_includes_new_keys(store: CMKStore, alias: str) -> None:
    first = store.create_key(alias)
    second = store.create_key(alias + "-2")

    listed = store.list_keys()

    assert first in listed and second in listed
    assert len({i.key_id for i in listed}) == len(listed)


def test_create_key_refuses_duplicate_alias(store: CMKStore, alias: str) -> None:
    store.create_key(alias)
    before = len(store.list_keys())

    with pytest.raises(KMSError, match=f"alias '{alias}' is already used"):
        store.create_key(alias)
    assert len(store.list_keys()) == before


@pytest.mark.parametrize(
    "bad", ["", "a" * 65, "has space", "semi;colon", "ünï", "cmk-0123456789abcdef"]
)
def test_create_key_refuses_bad_alias(store: CMKStore, bad: str) -> None:
    with pytest.raises(KMSError, match="alias"):
        store.create_key(bad)


def test_create_datakey_shape(store: CMKStore, alias: str) -> None:
    info = store.create_key(alias)

    data_key = store.create_datakey(alias, context_for(info))

    dek = bytes(data_key.plaintext)
    assert len(dek) == 64 and dek[:32] != dek[32:]
    assert data_key.wrapped.key_id == info.key_id
    assert data_key.wrapped.key_version == 1
    assert data_key.wrapped.mechanism == "AES-256-GCM"
    assert len(data_key.wrapped.iv) == 12
    assert len(data_key.wrapped.ciphertext) == 80
    assert dek not in repr(data_key).encode()


def test_create_datakey_gives_a_new_dek_each_time(store: CMKStore, alias: str) -> None:
    info = store.create_key(alias)

    keys = [store.create_datakey(info.key_id, context_for(info)) for _ in range(5)]

    assert len({bytes(k.plaintext) for k in keys}) == 5
    assert len({k.wrapped.iv for k in keys}) == 5


def test_decrypt_datakey_round_trip(store: CMKStore, alias: str) -> None:
    info = store.create_key(alias)
    data_key = store.create_datakey(alias, context_for(info))

    unwrapped = store.decrypt_datakey(data_key.wrapped, context_for(info))

    assert bytes(unwrapped) == bytes(data_key.plaintext)


def test_decrypt_datakey_refuses_other_volume(store: CMKStore, alias: str) -> None:
    info = store.create_key(alias)
    data_key = store.create_datakey(alias, context_for(info))

    with pytest.raises(UnwrapFailed, match=f"CMK {info.key_id}.*another volume"):
        store.decrypt_datakey(data_key.wrapped, context_for(info, OTHER_VOLUME))


@pytest.mark.parametrize("position", [0, 40, 79])
def test_decrypt_datakey_refuses_flipped_byte(
    store: CMKStore, alias: str, position: int
) -> None:
    info = store.create_key(alias)
    wrapped = store.create_datakey(alias, context_for(info)).wrapped
    blob = bytearray(wrapped.ciphertext)
    blob[position] ^= 0x01

    tampered = dataclasses.replace(wrapped, ciphertext=bytes(blob))

    with pytest.raises(UnwrapFailed):
        store.decrypt_datakey(tampered, context_for(info))


def test_decrypt_datakey_refuses_flipped_iv(store: CMKStore, alias: str) -> None:
    info = store.create_key(alias)
    wrapped = store.create_datakey(alias, context_for(info)).wrapped

    tampered = dataclasses.replace(
        wrapped, iv=bytes([wrapped.iv[0] ^ 1]) + wrapped.iv[1:]
    )

    with pytest.raises(UnwrapFailed):
        store.decrypt_datakey(tampered, context_for(info))


def test_decrypt_datakey_refuses_other_key(store: CMKStore, alias: str) -> None:
    key_a = store.create_key(alias + "-a")
    key_b = store.create_key(alias + "-b")
    wrapped = store.create_datakey(key_a.key_id, context_for(key_a)).wrapped

    # Same context, same blob, only the key named in the record changes.
    moved = dataclasses.replace(wrapped, key_id=key_b.key_id)

    with pytest.raises(UnwrapFailed, match=key_b.key_id):
        store.decrypt_datakey(moved, context_for(key_a))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ciphertext", b"\0" * 79, "ciphertext is 79 bytes"),
        ("iv", b"\0" * 16, "IV is 16 bytes"),
        ("mechanism", "AES-256-KW", "mechanism is 'AES-256-KW'"),
        ("key_version", 0, "key version is 0"),
    ],
)
def test_decrypt_datakey_refuses_malformed_record(
    store: CMKStore, alias: str, field: str, value: Any, message: str
) -> None:
    info = store.create_key(alias)
    wrapped = store.create_datakey(alias, context_for(info)).wrapped

    broken = dataclasses.replace(wrapped, **{field: value})

    with pytest.raises(UnwrapFailed, match=message):
        store.decrypt_datakey(broken, context_for(info))


def test_unknown_key_is_key_not_found(store: CMKStore) -> None:
    missing_alias = "no-such-key-" + uuid.uuid4().hex[:8]
    context = encryption_context(VOLUME, 1, "cmk-0000000000000000")

    with pytest.raises(KeyNotFound, match=f"no customer master key '{missing_alias}'"):
        store.describe_key(missing_alias)
    with pytest.raises(KeyNotFound, match="kms list-keys"):
        store.describe_key("cmk-0000000000000000")
    with pytest.raises(KeyNotFound):
        store.create_datakey(missing_alias, context)


def test_decrypt_datakey_with_unknown_key_is_key_not_found(
    store: CMKStore, alias: str
) -> None:
    info = store.create_key(alias)
    wrapped = store.create_datakey(alias, context_for(info)).wrapped

    orphan = dataclasses.replace(wrapped, key_id="cmk-00000000000000ff")

    with pytest.raises(KeyNotFound):
        store.decrypt_datakey(orphan, context_for(info))


def test_create_datakey_refuses_empty_context(store: CMKStore, alias: str) -> None:
    store.create_key(alias)

    with pytest.raises(ValueError, match="context is empty"):
        store.create_datakey(alias, b"")


def test_missing_key_version_is_key_not_found(store: CMKStore, alias: str) -> None:
    info = store.create_key(alias)
    wrapped = store.create_datakey(alias, context_for(info)).wrapped

    ahead = dataclasses.replace(wrapped, key_version=2)

    with pytest.raises(KeyNotFound, match=f"{info.key_id} has no version 2"):
        store.decrypt_datakey(ahead, context_for(info))


def test_new_version_wraps_and_old_version_still_unwraps(
    store: KeyMaterialStore, alias: str
) -> None:
    info = store.create_key(alias)
    old = store.create_datakey(alias, context_for(info))

    store.create_key_version(info.key_id, 2)
    store.create_key_version(info.key_id, 2)  # idempotent
    new = store.create_datakey(alias, context_for(info))

    assert store.key_versions(info.key_id) == [1, 2]
    assert (old.wrapped.key_version, new.wrapped.key_version) == (1, 2)
    for data_key in (old, new):
        key = store.decrypt_datakey(data_key.wrapped, context_for(info))
        assert bytes(key) == bytes(data_key.plaintext)
    pinned = store.create_datakey(alias, context_for(info), version=1)
    assert pinned.wrapped.key_version == 1


def test_encrypt_datakey_wraps_an_existing_dek(
    store: KeyMaterialStore, alias: str
) -> None:
    info = store.create_key(alias)
    other = store.create_key(alias + "-b")
    data_key = store.create_datakey(alias, context_for(info))

    rewrapped = store.encrypt_datakey(
        other.key_id, data_key.plaintext, context_for(other)
    )

    assert rewrapped.key_id == other.key_id
    key = store.decrypt_datakey(rewrapped, context_for(other))
    assert bytes(key) == bytes(data_key.plaintext)


def test_destroy_key_removes_every_version(store: KeyMaterialStore, alias: str) -> None:
    info = store.create_key(alias)
    store.create_key_version(info.key_id, 2)
    wrapped = store.create_datakey(alias, context_for(info), version=1).wrapped

    store.destroy_key(info.key_id)
    store.destroy_key(info.key_id)  # a missing key is fine

    with pytest.raises(KeyNotFound):
        store.describe_key(info.key_id)
    with pytest.raises(KeyNotFound):
        store.decrypt_datakey(wrapped, context_for(info))
    assert info.key_id not in {k.key_id for k in store.list_keys()}


def test_set_primary_alias_renames_and_empty_matches_nothing(
    store: KeyMaterialStore, alias: str
) -> None:
    info = store.create_key(alias)

    store.set_primary_alias(info.key_id, alias + "-new")
    assert store.describe_key(alias + "-new").key_id == info.key_id
    with pytest.raises(KeyNotFound):
        store.describe_key(alias)

    store.set_primary_alias(info.key_id, "")
    assert store.describe_key(info.key_id).alias == ""
    with pytest.raises(KeyNotFound):
        store.describe_key("")
