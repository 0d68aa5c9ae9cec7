"""Key lifecycle over the memory backend: states, versions, aliases, purge, audit."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from blockcrypt.audit import AuditLog, parse_time
from blockcrypt.errors import (
    ConfigError,
    KeyDisabled,
    KeyNotFound,
    KeyPendingDeletion,
    KMSError,
    UsageError,
)
from blockcrypt.kms import (
    KeyCatalog,
    ManagedCMKStore,
    MemoryCMKStore,
    encryption_context,
)

VOLUME = "6f1c0a8e-5b9d-4c2a-9e3f-0a1b2c3d4e5f"
START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def backend() -> MemoryCMKStore:
    return MemoryCMKStore()


@pytest.fixture
def managed(
    tmp_path: Path, backend: MemoryCMKStore, clock: Clock
) -> Iterator[ManagedCMKStore]:
    store = ManagedCMKStore(
        backend,
        KeyCatalog(tmp_path / "keys.sqlite"),
        AuditLog(tmp_path / "audit.log", clock),
        clock,
    )
    yield store
    store.close()


def ctx(key_id: str) -> bytes:
    return encryption_context(VOLUME, 1, key_id)


def audit_lines(store: ManagedCMKStore) -> list[dict[str, object]]:
    return [json.loads(line) for line in store.audit.path.read_text().splitlines()]


def test_create_key_is_enabled_with_version_one(managed: ManagedCMKStore) -> None:
    info = managed.create_key("disks")

    assert (info.state, info.current_version, info.aliases) == (
        "Enabled",
        1,
        ("disks",),
    )
    assert managed.describe_key("disks") == info


def test_disabled_key_refuses_datakeys_and_names_key_and_state(
    managed: ManagedCMKStore,
) -> None:
    info = managed.create_key("disks")
    wrapped = managed.create_datakey("disks", ctx(info.key_id)).wrapped

    assert managed.disable_key("disks").state == "Disabled"

    with pytest.raises(KeyDisabled, match=f"{info.key_id} .*state Disabled"):
        managed.create_datakey("disks", ctx(info.key_id))
    with pytest.raises(KeyDisabled, match="enable-key"):
        managed.decrypt_datakey(wrapped, ctx(info.key_id))
    managed.enable_key(info.key_id)
    assert managed.decrypt_datakey(wrapped, ctx(info.key_id))


def test_schedule_deletion_refuses_use_and_cancel_leaves_disabled(
    managed: ManagedCMKStore, clock: Clock
) -> None:
    info = managed.create_key("disks")
    wrapped = managed.create_datakey("disks", ctx(info.key_id)).wrapped

    pending = managed.schedule_key_deletion("disks", 7)

    assert pending.state == "PendingDeletion"
    assert pending.deletion_date == "2025-03-08T12:00:00Z"
    with pytest.raises(KeyPendingDeletion, match="PendingDeletion"):
        managed.decrypt_datakey(wrapped, ctx(info.key_id))
    assert isinstance(KeyPendingDeletion("x"), KeyDisabled)
    with pytest.raises(KMSError, match="cannot be enabled"):
        managed.enable_key("disks")

    cancelled = managed.cancel_key_deletion("disks")
    assert (cancelled.state, cancelled.deletion_date) == ("Disabled", None)


@pytest.mark.parametrize("days", [0, 6, 1097])
def test_schedule_deletion_refuses_window_outside_7_to_1096(
    managed: ManagedCMKStore, days: int
) -> None:
    managed.create_key("disks")
    with pytest.raises(KMSError, match="7 to 1096 days"):
        managed.schedule_key_deletion("disks", days)
    assert managed.describe_key("disks").state == "Enabled"


def test_schedule_deletion_default_is_30_days(managed: ManagedCMKStore) -> None:
    managed.create_key("disks")
    assert managed.schedule_key_deletion("disks").deletion_date == (
        "2025-03-31T12:00:00Z"
    )


def test_purge_destroys_only_after_the_waiting_period(
    managed: ManagedCMKStore, backend: MemoryCMKStore, clock: Clock
) -> None:
    doomed = managed.create_key("doomed")
    kept = managed.create_key("kept")
    managed.schedule_key_deletion("doomed", 7)

    clock.now = START + timedelta(days=6, hours=23)
    assert managed.purge() == []
    clock.now = START + timedelta(days=7)
    purged = managed.purge()

    assert [p.key_id for p in purged] == [doomed.key_id]
    with pytest.raises(KeyNotFound):
        backend.describe_key(doomed.key_id)
    assert managed.describe_key(doomed.key_id).state == "Destroyed"
    assert managed.describe_key("kept").key_id == kept.key_id
    with pytest.raises(KeyNotFound):
        managed.describe_key("doomed")  # the alias went with the key
    records = [r for r in audit_lines(managed) if r["operation"] == "PurgeKey"]
    assert records[0]["key_id"] == doomed.key_id
    assert records[0]["outcome"] == "success"
    assert managed.purge() == []


def test_purge_repeats_safely_after_a_crash_before_the_catalog_update(
    managed: ManagedCMKStore, backend: MemoryCMKStore, clock: Clock
) -> None:
    info = managed.create_key("doomed")
    managed.schedule_key_deletion("doomed", 7)
    backend.destroy_key(info.key_id)  # the crash: material gone, catalog not updated

    clock.now = START + timedelta(days=8)

    assert [p.key_id for p in managed.purge()] == [info.key_id]


def test_rotate_new_datakeys_use_newest_and_old_ones_still_unwrap(
    managed: ManagedCMKStore,
) -> None:
    info = managed.create_key("disks")
    old = managed.create_datakey("disks", ctx(info.key_id))

    rotated = managed.rotate_key("disks")
    new = managed.create_datakey("disks", ctx(info.key_id))

    assert rotated.current_version == 2
    assert (old.wrapped.key_version, new.wrapped.key_version) == (1, 2)
    for data_key in (old, new):
        key = managed.decrypt_datakey(data_key.wrapped, ctx(info.key_id))
        assert bytes(key) == bytes(data_key.plaintext)


def test_rotate_adopts_material_left_by_a_crash(
    managed: ManagedCMKStore, backend: MemoryCMKStore
) -> None:
    info = managed.create_key("disks")
    backend.create_key_version(info.key_id, 2)  # crash before the catalog row

    assert managed.rotate_key("disks").current_version == 2
    assert managed.rotate_key("disks").current_version == 3


def test_rotate_refuses_disabled_key(managed: ManagedCMKStore) -> None:
    managed.create_key("disks")
    managed.disable_key("disks")
    with pytest.raises(KeyDisabled, match="cannot be rotated"):
        managed.rotate_key("disks")


def test_aliases_add_rename_remove(
    managed: ManagedCMKStore, backend: MemoryCMKStore
) -> None:
    info = managed.create_key("a")
    managed.create_key("other")

    assert managed.add_alias("a", "b").aliases == ("a", "b")
    with pytest.raises(KMSError, match="already used"):
        managed.add_alias("a", "other")
    assert managed.rename_alias("a", "c").aliases == ("c", "b")
    assert managed.remove_alias("c").aliases == ("b",)

    assert managed.describe_key("b").key_id == info.key_id
    with pytest.raises(KeyNotFound):
        managed.describe_key("a")
    # The backend's stored alias follows the primary one, so a new key may
    # take the old name.
    assert backend.describe_key(info.key_id).alias == "b"
    assert managed.create_key("a").key_id != info.key_id


def test_removed_alias_does_not_come_back_through_the_backend(
    managed: ManagedCMKStore,
) -> None:
    managed.create_key("only")
    assert managed.remove_alias("only").aliases == ()
    with pytest.raises(KeyNotFound):
        managed.describe_key("only")


def test_keys_made_before_the_catalog_are_adopted(
    managed: ManagedCMKStore, backend: MemoryCMKStore
) -> None:
    info = backend.create_key("legacy")
    backend.create_key_version(info.key_id, 2)

    adopted = managed.describe_key("legacy")

    assert (adopted.state, adopted.current_version) == ("Enabled", 2)
    assert adopted.aliases == ("legacy",)
    assert info.key_id in {k.key_id for k in managed.list_keys()}


def test_state_survives_reopening_the_catalog(
    tmp_path: Path, backend: MemoryCMKStore, clock: Clock
) -> None:
    def open_store() -> ManagedCMKStore:
        return ManagedCMKStore(
            backend,
            KeyCatalog(tmp_path / "keys.sqlite"),
            AuditLog(tmp_path / "audit.log", clock),
            clock,
        )

    first = open_store()
    first.create_key("disks")
    first.disable_key("disks")
    first.catalog.close()

    assert open_store().describe_key("disks").state == "Disabled"


def test_catalog_from_a_newer_blockcrypt_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()

    with pytest.raises(ConfigError, match="schema version 99"):
        KeyCatalog(path)


def test_every_operation_is_audited_without_secrets(managed: ManagedCMKStore) -> None:
    info = managed.create_key("disks")
    data_key = managed.create_datakey("disks", ctx(info.key_id))
    managed.decrypt_datakey(data_key.wrapped, ctx(info.key_id))
    managed.disable_key("disks")
    with pytest.raises(KeyDisabled):
        managed.decrypt_datakey(data_key.wrapped, ctx(info.key_id))

    records = audit_lines(managed)

    assert [r["operation"] for r in records] == [
        "CreateKey",
        "CreateDataKey",
        "DecryptDataKey",
        "DisableKey",
        "DecryptDataKey",
    ]
    failed = records[-1]
    assert (failed["outcome"], failed["error"]) == ("failure", "KeyDisabled")
    assert failed["volume_uuid"] == VOLUME
    assert (failed["key_id"], failed["key_version"]) == (info.key_id, 1)
    assert set(records[0]) >= {
        "time",
        "operation",
        "key_id",
        "key_version",
        "volume_uuid",
        "outcome",
        "error",
    }
    text = managed.audit.path.read_text()
    for secret in (bytes(data_key.plaintext), data_key.wrapped.ciphertext):
        assert secret.hex() not in text
    assert managed.audit.path.stat().st_mode & 0o777 == 0o600


def test_audit_read_filters(tmp_path: Path, clock: Clock) -> None:
    log = AuditLog(tmp_path / "audit.log", clock)
    log.record("Attach", key_id="cmk-0000000000000001", volume_uuid=VOLUME)
    clock.now = START + timedelta(days=1)
    log.record("Detach", key_id="cmk-0000000000000002", volume_uuid=VOLUME.upper())
    with open(log.path, "a") as f:
        f.write('{"torn": \n')

    assert len(log.read()) == 2
    assert [r["operation"] for r in log.read(key_ids={"cmk-0000000000000002"})] == [
        "Detach"
    ]
    assert len(log.read(volume_uuid=VOLUME)) == 2
    assert [r["operation"] for r in log.read(since=parse_time("2025-03-02"))] == [
        "Detach"
    ]


def test_audit_write_failure_refuses_the_operation(
    managed: ManagedCMKStore, tmp_path: Path
) -> None:
    info = managed.create_key("disks")
    data_key = managed.create_datakey("disks", ctx(info.key_id))
    managed.audit.path = tmp_path / "missing-dir" / "audit.log"

    with pytest.raises(Exception, match="cannot append to the audit log"):
        managed.decrypt_datakey(data_key.wrapped, ctx(info.key_id))


def test_parse_time_refuses_garbage() -> None:
    with pytest.raises(UsageError, match="ISO 8601"):
        parse_time("yesterday")
