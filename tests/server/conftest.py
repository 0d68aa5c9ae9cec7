from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from blockcrypt.kms import MemoryCMKStore, encryption_context
from blockcrypt.volume import luks2
from blockcrypt.volume.device import FORMAT_VERSION, Volume


def make_volume(
    store: MemoryCMKStore, path: Path, size: int, sector_size: int = 4096
) -> None:
    """Create a volume file wrapped by the store's first key (created on demand)."""
    keys = store.list_keys()
    key = keys[0] if keys else store.create_key("unit")
    volume_uuid = str(uuid.uuid4())
    ctx = encryption_context(volume_uuid, FORMAT_VERSION, key.key_id)
    dk = store.create_datakey(key.key_id, ctx)
    token = luks2.KMSToken(
        key_id=key.key_id, mechanism=dk.wrapped.mechanism, iv=dk.wrapped.iv,
        wrapped_dek=dk.wrapped.ciphertext,
        context={"volume_uuid": volume_uuid, "format_version": FORMAT_VERSION,
                 "key_id": key.key_id},
        backend="memory",
    )  # fmt: skip
    luks2.format_volume(path, size=size, sector_size=sector_size,
                        volume_uuid=volume_uuid, dek=dk.plaintext, token=token)  # fmt: skip
    dk.plaintext.wipe()


@pytest.fixture
def store() -> MemoryCMKStore:
    return MemoryCMKStore()


@pytest.fixture(params=[4096, 512], ids=["s4096", "s512"])
def attached(store: MemoryCMKStore, tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    path = tmp_path / "unit.img"
    make_volume(store, path, 8 << 20, request.param)
    vol = Volume.attach(str(path), store)
    yield vol
    vol.close()
