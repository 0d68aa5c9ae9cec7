"""CMK lifecycle: states, versions, aliases and scheduled deletion.

PKCS#11 has no key states, versions or deletion dates, so this module keeps
them in a small SQLite catalog in the state directory and wraps a backend
(:class:`~blockcrypt.kms._base.KeyMaterialStore`) that holds the material.

Rules of this module:

* The backend is the source of the key material; the catalog is the source of
  everything else. A key the catalog has never seen (made before the catalog
  existed, or by a process with another state directory) is adopted on first
  use: state Enabled, the versions the backend has, its stored alias.
* Every catalog change is one ``BEGIN IMMEDIATE`` transaction. A change that
  also touches the backend does the backend part first and is written so that
  a crash in between is harmless: a new version's material without a catalog
  row is unused and is adopted by the next rotate; a destroyed key still
  marked PendingDeletion is destroyed again (a no-op) by the next purge.
* States follow the cloud KMSs: Enabled, Disabled, PendingDeletion, and
  Destroyed (a tombstone row kept for the audit trail). Only Enabled keys
  wrap or unwrap; the others raise :class:`KeyDisabled` naming key and state.
  Cancelling a deletion leaves the key Disabled, as AWS KMS does.
* A deletion waits 7 to 1096 days (default 30). :meth:`ManagedCMKStore.purge`
  destroys the material of every key whose date has passed; the daemon runs it
  whenever it starts serving.
* Every public operation appends one audit record (:mod:`blockcrypt.audit`),
  success or failure.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from blockcrypt.audit import AuditLog
from blockcrypt.crypto.xts import XTSKey
from blockcrypt.errors import (
    ConfigError,
    KeyDisabled,
    KeyNotFound,
    KeyPendingDeletion,
    KMSError,
)
from blockcrypt.kms._base import (
    KEY_ID_PATTERN,
    DataKey,
    KeyInfo,
    KeyMaterialStore,
    WrappedKey,
    check_alias,
    context_volume,
    key_not_found_message,
)

if TYPE_CHECKING:
    from blockcrypt.config import Config

__all__ = [
    "CATALOG_FILE",
    "DEFAULT_PENDING_DAYS",
    "MAX_PENDING_DAYS",
    "MIN_PENDING_DAYS",
    "KeyCatalog",
    "KeyState",
    "ManagedCMKStore",
    "open_managed_store",
]

logger = logging.getLogger("blockcrypt.kms")

CATALOG_FILE = "keys.sqlite"
MIN_PENDING_DAYS = 7
MAX_PENDING_DAYS = 1096
DEFAULT_PENDING_DAYS = 30
_SCHEMA_VERSION = 1
_BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    state TEXT NOT NULL,
    current_version INTEGER NOT NULL,
    deletion_date TEXT,
    state_changed TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS key_versions (
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    version INTEGER NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    position INTEGER NOT NULL
);
"""

T = TypeVar("T")


class KeyState(StrEnum):
    """Lifecycle state of a customer master key."""

    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PENDING_DELETION = "PendingDeletion"
    DESTROYED = "Destroyed"


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class _Row:
    key_id: str
    created: str
    state: KeyState
    current_version: int
    deletion_date: str | None
    aliases: tuple[str, ...]


class KeyCatalog:
    """The SQLite catalog of key states, versions and aliases.

    Args:
        path: the database file; created (mode 0600) on first open.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._exclusive = threading.RLock()
        self._exclusive_depth = 0
        self._lock_fd = -1
        try:
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA synchronous = FULL")
            with self.transaction() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > _SCHEMA_VERSION:
                    raise ConfigError(
                        f"key catalog {str(path)!r} has schema version {version}; "
                        f"this blockcrypt knows up to {_SCHEMA_VERSION}: upgrade"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise ConfigError(
                f"cannot open the key catalog {str(path)!r}: {exc}; check the "
                "state directory, or restore the file from a backup"
            ) from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run a block as one write transaction; roll back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the catalog's mutation lock, across threads and processes.

        A state check, the HSM work it allows and the catalog update that
        records it must not interleave with another change to the same key
        (a cancelled deletion racing a purge would destroy a key the user was
        told survived), and SoftHSM2's object store is not safe for concurrent
        writers either. Reentrant within a thread.
        """
        with self._exclusive:
            if self._exclusive_depth == 0:
                lock_path = self.path.with_name(self.path.name + ".lock")
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._exclusive_depth += 1
            try:
                yield
            finally:
                self._exclusive_depth -= 1
                if self._exclusive_depth == 0:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = -1

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- queries (call inside a transaction) ---------------------------------

    @staticmethod
    def row(db: sqlite3.Connection, key_id: str) -> _Row | None:
        found = db.execute(
            "SELECT key_id, created, state, current_version, deletion_date "
            "FROM keys WHERE key_id = ?",
            (key_id,),
        ).fetchone()
        if found is None:
            return None
        aliases = tuple(
            a
            for (a,) in db.execute(
                "SELECT alias FROM aliases WHERE key_id = ? ORDER BY position, alias",
                (key_id,),
            )
        )
        return _Row(found[0], found[1], KeyState(found[2]), found[3], found[4], aliases)

    @staticmethod
    def alias_owner(db: sqlite3.Connection, alias: str) -> str | None:
        found = db.execute(
            "SELECT key_id FROM aliases WHERE alias = ?", (alias,)
        ).fetchone()
        return None if found is None else str(found[0])

    @staticmethod
    def all_ids(db: sqlite3.Connection) -> list[str]:
        return [k for (k,) in db.execute("SELECT key_id FROM keys ORDER BY created")]

    @staticmethod
    def versions(db: sqlite3.Connection, key_id: str) -> list[int]:
        return [
            v
            for (v,) in db.execute(
                "SELECT version FROM key_versions WHERE key_id = ? ORDER BY version",
                (key_id,),
            )
        ]

    def resolve_ids(self, key: str) -> set[str]:
        """Return the key ids ``key`` (an id or a current alias) names, for filters."""
        with self.transaction() as db:
            if KEY_ID_PATTERN.fullmatch(key):
                return {key}
            owner = self.alias_owner(db, key)
        return {owner} if owner else set()


class ManagedCMKStore:
    """A :class:`~blockcrypt.kms.CMKStore` with lifecycle, versions and audit.

    Args:
        backend: holds the key material (PKCS#11, or memory in tests).
        catalog: the state directory's key catalog.
        audit: the state directory's audit log.
        clock: returns the current time (tests move it forward).
    """

    def __init__(
        self,
        backend: KeyMaterialStore,
        catalog: KeyCatalog,
        audit: AuditLog,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.backend = backend
        self.catalog = catalog
        self.audit = audit
        self._clock = clock

    def __repr__(self) -> str:
        return f"ManagedCMKStore(backend={self.backend!r})"

    # -- CMKStore ------------------------------------------------------------

    def create_key(self, alias: str) -> KeyInfo:
        def body() -> KeyInfo:
            self._check_new_alias(alias)
            info = self.backend.create_key(alias)
            now = _stamp(self._clock())
            with self.catalog.transaction() as db:
                self._insert(db, info.key_id, info.created or now, [1], [alias])
                row = self.catalog.row(db, info.key_id)
            assert row is not None
            return self._merge(info, row)

        return self._audited(
            "CreateKey", self._serialised(body), lambda i: (i.key_id, 1)
        )

    def list_keys(self) -> list[KeyInfo]:
        def body() -> list[KeyInfo]:
            infos = {i.key_id: i for i in self.backend.list_keys()}
            result = []
            for info in infos.values():
                result.append(self._merge(info, self._row_or_adopt(info)))
            with self.catalog.transaction() as db:
                gone = [k for k in self.catalog.all_ids(db) if k not in infos]
                rows = [self.catalog.row(db, k) for k in gone]
            result += [self._tombstone(r) for r in rows if r is not None]
            return sorted(result, key=lambda i: (i.created, i.key_id))

        return self._audited("ListKeys", body)

    def describe_key(self, key: str) -> KeyInfo:
        return self._audited(
            "DescribeKey",
            lambda: self._lookup(key, allow_destroyed=True)[0],
            lambda i: (i.key_id, i.current_version),
            key,
        )

    def create_datakey(
        self, key: str, context: bytes, version: int | None = None
    ) -> DataKey:
        def body() -> DataKey:
            info, row = self._usable(key)
            return self.backend.create_datakey(
                row.key_id, context, version or row.current_version
            )

        return self._audited(
            "CreateDataKey",
            body,
            lambda d: (d.wrapped.key_id, d.wrapped.key_version),
            key,
            context,
        )

    def encrypt_datakey(
        self, key: str, plaintext: XTSKey, context: bytes, version: int | None = None
    ) -> WrappedKey:
        def body() -> WrappedKey:
            info, row = self._usable(key)
            return self.backend.encrypt_datakey(
                row.key_id, plaintext, context, version or row.current_version
            )

        return self._audited(
            "EncryptDataKey", body, lambda w: (w.key_id, w.key_version), key, context
        )

    def decrypt_datakey(self, wrapped: WrappedKey, context: bytes) -> XTSKey:
        def body() -> XTSKey:
            info, row = self._usable(wrapped.key_id)
            if wrapped.key_version > row.current_version:
                raise KeyNotFound(
                    f"customer master key {row.key_id} has versions 1 to "
                    f"{row.current_version}; the data key names version "
                    f"{wrapped.key_version}. The volume was wrapped on another "
                    "token or state directory; restore that key catalog"
                )
            return self.backend.decrypt_datakey(wrapped, context)

        return self._audited(
            "DecryptDataKey",
            body,
            lambda _: (wrapped.key_id, wrapped.key_version),
            wrapped.key_id,
            context,
            version=wrapped.key_version,
        )

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
            self.catalog.close()

    # -- lifecycle -----------------------------------------------------------

    def enable_key(self, key: str) -> KeyInfo:
        return self._transition("EnableKey", key, KeyState.ENABLED)

    def disable_key(self, key: str) -> KeyInfo:
        return self._transition("DisableKey", key, KeyState.DISABLED)

    def schedule_key_deletion(
        self, key: str, pending_days: int = DEFAULT_PENDING_DAYS
    ) -> KeyInfo:
        """Put the key in PendingDeletion; ``purge`` destroys it after the wait.

        Raises:
            KMSError: ``pending_days`` is outside 7 to 1096, or the key is
                already pending deletion or destroyed.
        """
        if not MIN_PENDING_DAYS <= pending_days <= MAX_PENDING_DAYS:
            error = KMSError(
                f"waiting period is {pending_days} days; it must be "
                f"{MIN_PENDING_DAYS} to {MAX_PENDING_DAYS} days"
            )
            self.audit.record(
                "ScheduleKeyDeletion", outcome="failure", error=error, details={}
            )
            raise error
        date = _stamp(self._clock() + timedelta(days=pending_days))
        return self._transition(
            "ScheduleKeyDeletion", key, KeyState.PENDING_DELETION, date
        )

    def cancel_key_deletion(self, key: str) -> KeyInfo:
        """Take the key out of PendingDeletion; it comes back Disabled."""
        return self._transition("CancelKeyDeletion", key, KeyState.DISABLED)

    def rotate_key(self, key: str) -> KeyInfo:
        """Generate a new key version inside the backend and make it current."""

        def body() -> KeyInfo:
            info, row = self._lookup(key)
            if row.state is not KeyState.ENABLED:
                raise self._state_error(row, "be rotated")
            new = row.current_version + 1
            self.backend.create_key_version(row.key_id, new)
            with self.catalog.transaction() as db:
                current = self.catalog.row(db, row.key_id)
                if current is None or current.current_version != row.current_version:
                    raise KMSError(
                        f"key {row.key_id} was changed by another process during "
                        "the rotation; run rotate-key again if still needed"
                    )
                db.execute(
                    "INSERT OR IGNORE INTO key_versions VALUES (?, ?, ?)",
                    (row.key_id, new, _stamp(self._clock())),
                )
                db.execute(
                    "UPDATE keys SET current_version = ? WHERE key_id = ?",
                    (new, row.key_id),
                )
                updated = self.catalog.row(db, row.key_id)
            assert updated is not None
            return self._merge(info, updated)

        return self._audited(
            "RotateKey",
            self._serialised(body),
            lambda i: (i.key_id, i.current_version),
            key,
        )

    def add_alias(self, key: str, alias: str) -> KeyInfo:
        def body() -> KeyInfo:
            self._check_new_alias(alias)
            info, row = self._lookup(key)
            with self.catalog.transaction() as db:
                if self.catalog.alias_owner(db, alias) is not None:
                    raise KMSError(_alias_taken(alias))
                db.execute(
                    "INSERT INTO aliases VALUES (?, ?, ?)",
                    (alias, row.key_id, len(row.aliases)),
                )
                updated = self.catalog.row(db, row.key_id)
            assert updated is not None
            return self._sync_primary(info, row, updated)

        return self._audited(
            "AddAlias",
            self._serialised(body),
            lambda i: (i.key_id, None),
            key,
            details={"alias": alias},
        )

    def remove_alias(self, alias: str) -> KeyInfo:
        def body() -> KeyInfo:
            info, row = self._lookup_alias(alias)
            with self.catalog.transaction() as db:
                db.execute("DELETE FROM aliases WHERE alias = ?", (alias,))
                updated = self.catalog.row(db, row.key_id)
            assert updated is not None
            return self._sync_primary(info, row, updated)

        return self._audited(
            "RemoveAlias",
            self._serialised(body),
            lambda i: (i.key_id, None),
            details={"alias": alias},
        )

    def rename_alias(self, old: str, new: str) -> KeyInfo:
        def body() -> KeyInfo:
            self._check_new_alias(new)
            info, row = self._lookup_alias(old)
            with self.catalog.transaction() as db:
                if self.catalog.alias_owner(db, new) is not None:
                    raise KMSError(_alias_taken(new))
                db.execute("UPDATE aliases SET alias = ? WHERE alias = ?", (new, old))
                updated = self.catalog.row(db, row.key_id)
            assert updated is not None
            return self._sync_primary(info, row, updated)

        return self._audited(
            "RenameAlias",
            self._serialised(body),
            lambda i: (i.key_id, None),
            details={"alias": old, "new_alias": new},
        )

    def purge(self) -> list[KeyInfo]:
        """Destroy every key whose waiting period is over; return them.

        Each destroyed key gets its own ``PurgeKey`` audit record.
        """
        now = _stamp(self._clock())
        purged = []
        with self.catalog.exclusive():
            with self.catalog.transaction() as db:
                due = [
                    k
                    for (k,) in db.execute(
                        "SELECT key_id FROM keys "
                        "WHERE state = ? AND deletion_date <= ?",
                        (KeyState.PENDING_DELETION.value, now),
                    )
                ]
            for key_id in due:
                purged.append(self._purge_one(key_id, now))
        return purged

    def _serialised(self, body: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            with self.catalog.exclusive():
                return body()

        return run

    # -- helpers ---------------------------------------------------------------

    def _purge_one(self, key_id: str, now: str) -> KeyInfo:
        def body() -> KeyInfo:
            with self.catalog.transaction() as db:
                row = self.catalog.row(db, key_id)
            if row is None or row.state is not KeyState.PENDING_DELETION:
                # Only possible if the catalog was edited behind our lock.
                raise KMSError(f"key {key_id} is no longer pending deletion")
            # Material first: a crash before the catalog update repeats a no-op.
            self.backend.destroy_key(key_id)
            with self.catalog.transaction() as db:
                db.execute(
                    "UPDATE keys SET state = ?, state_changed = ? WHERE key_id = ?",
                    (KeyState.DESTROYED.value, now, key_id),
                )
                db.execute("DELETE FROM aliases WHERE key_id = ?", (key_id,))
                updated = self.catalog.row(db, key_id)
            assert updated is not None
            logger.info("key material destroyed: key_id %s", key_id)
            return self._tombstone(updated)

        return self._audited(
            "PurgeKey", body, lambda i: (i.key_id, i.current_version), key_id
        )

    def _audited(
        self,
        operation: str,
        body: Callable[[], T],
        ids: Callable[[T], tuple[str | None, int | None]] | None = None,
        key: str | None = None,
        context: bytes | None = None,
        version: int | None = None,
        details: dict[str, str | int | None] | None = None,
    ) -> T:
        volume = context_volume(context) if context is not None else None
        try:
            result = body()
        except BaseException as exc:
            key_id = key if key and KEY_ID_PATTERN.fullmatch(key) else None
            extra = dict(details or {})
            if key and key_id is None:
                extra["key"] = key
            self.audit.record(
                operation,
                outcome="failure",
                key_id=key_id,
                key_version=version,
                volume_uuid=volume,
                error=exc,
                details=extra,
            )
            raise
        key_id, key_version = ids(result) if ids else (None, None)
        try:
            self.audit.record(
                operation,
                key_id=key_id,
                key_version=key_version,
                volume_uuid=volume,
                details=details,
            )
        except BaseException:
            if isinstance(result, XTSKey):
                result.wipe()
            elif isinstance(result, DataKey):
                result.plaintext.wipe()
            raise
        return result

    def _transition(
        self, operation: str, key: str, target: KeyState, date: str | None = None
    ) -> KeyInfo:
        def body() -> KeyInfo:
            info, row = self._lookup(key)
            allowed = _TRANSITIONS[(operation, row.state)]
            if allowed is None:
                raise self._state_error(row, _VERBS[operation])
            with self.catalog.transaction() as db:
                db.execute(
                    "UPDATE keys SET state = ?, deletion_date = ?, state_changed = ? "
                    "WHERE key_id = ?",
                    (target.value, date, _stamp(self._clock()), row.key_id),
                )
                updated = self.catalog.row(db, row.key_id)
            assert updated is not None
            if row.state is not target:
                logger.info(
                    "key state changed: key_id %s, %s -> %s",
                    row.key_id,
                    row.state,
                    target,
                )
            return self._merge(info, updated)

        details: dict[str, str | int | None] | None = None
        if date is not None:
            details = {"deletion_date": date}
        return self._audited(
            operation,
            self._serialised(body),
            lambda i: (i.key_id, None),
            key,
            details=details,
        )

    def _state_error(self, row: _Row, action: str) -> KMSError:
        name = _name(row)
        if row.state is KeyState.DESTROYED:
            return KeyNotFound(
                f"customer master key {name} was destroyed; it cannot {action}. "
                "Data keys it wrapped are lost unless a volume has a recovery "
                "passphrase keyslot"
            )
        if row.state is KeyState.PENDING_DELETION:
            return KeyPendingDeletion(
                f"customer master key {name} is in state PendingDeletion "
                f"(destroyed after {row.deletion_date}) and cannot {action}; "
                f"run `blockcrypt kms cancel-key-deletion {row.key_id}` and then "
                "`enable-key` to use it again"
            )
        if row.state is KeyState.DISABLED:
            return KeyDisabled(
                f"customer master key {name} is in state Disabled and cannot "
                f"{action}; run `blockcrypt kms enable-key {row.key_id}` to use it"
            )
        return KMSError(
            f"customer master key {name} is in state {row.state} and cannot {action}"
        )

    # States are enforced here, not by the token: CMKs are created with
    # CKA_MODIFIABLE false, so the token cannot mirror Disabled. A PIN holder
    # with another PKCS#11 tool can still use the key (docs/kms.md says so).
    def _usable(self, key: str) -> tuple[KeyInfo, _Row]:
        info, row = self._lookup(key, allow_destroyed=True)
        if row.state is not KeyState.ENABLED:
            raise self._state_error(row, "wrap or unwrap data keys")
        return info, row

    def _lookup(self, key: str, allow_destroyed: bool = False) -> tuple[KeyInfo, _Row]:
        """Resolve an id or alias through the catalog, adopting unknown keys."""
        with self.catalog.transaction() as db:
            if KEY_ID_PATTERN.fullmatch(key):
                row = self.catalog.row(db, key)
            else:
                owner = self.catalog.alias_owner(db, key)
                row = self.catalog.row(db, owner) if owner else None
        if row is not None and row.state is KeyState.DESTROYED:
            if not allow_destroyed:
                raise self._state_error(row, "be used")
            return self._tombstone(row), row
        if row is not None:
            return self._merge(self.backend.describe_key(row.key_id), row), row

        # Not in the catalog: the backend may know it (a key made before the
        # catalog existed). An alias that now names nothing here, though, was
        # removed or renamed: the backend's stored alias must not revive it.
        info = self.backend.describe_key(key)
        with self.catalog.transaction() as db:
            known = self.catalog.row(db, info.key_id)
        if known is not None:
            raise KeyNotFound(key_not_found_message(key, "in the key catalog"))
        row = self._row_or_adopt(info)
        return self._merge(info, row), row

    def _lookup_alias(self, alias: str) -> tuple[KeyInfo, _Row]:
        with self.catalog.transaction() as db:
            owner = self.catalog.alias_owner(db, alias)
        if owner is None:
            raise KeyNotFound(
                f"no alias {alias!r} in the key catalog; run `blockcrypt kms "
                "list-keys` to see the aliases"
            )
        return self._lookup(owner)

    def _row_or_adopt(self, info: KeyInfo) -> _Row:
        with self.catalog.transaction() as db:
            row = self.catalog.row(db, info.key_id)
        if row is not None:
            return row
        versions = self.backend.key_versions(info.key_id) or [1]
        with self.catalog.transaction() as db:
            if self.catalog.row(db, info.key_id) is None:
                alias_free = info.alias and not self.catalog.alias_owner(db, info.alias)
                aliases = [info.alias] if alias_free else []
                self._insert(db, info.key_id, info.created, versions, aliases)
            row = self.catalog.row(db, info.key_id)
        assert row is not None
        logger.info("key adopted into the catalog: key_id %s", info.key_id)
        return row

    def _insert(
        self,
        db: sqlite3.Connection,
        key_id: str,
        created: str,
        versions: list[int],
        aliases: list[str],
    ) -> None:
        now = _stamp(self._clock())
        db.execute(
            "INSERT INTO keys VALUES (?, ?, ?, ?, NULL, ?)",
            (key_id, created or now, KeyState.ENABLED.value, max(versions), now),
        )
        for version in versions:
            db.execute(
                "INSERT INTO key_versions VALUES (?, ?, ?)", (key_id, version, now)
            )
        for position, alias in enumerate(aliases):
            db.execute(
                "INSERT INTO aliases VALUES (?, ?, ?)", (alias, key_id, position)
            )

    def _check_new_alias(self, alias: str) -> None:
        try:
            check_alias(alias)
        except ValueError as exc:
            raise KMSError(str(exc)) from exc
        with self.catalog.transaction() as db:
            if self.catalog.alias_owner(db, alias) is not None:
                raise KMSError(_alias_taken(alias))

    def _sync_primary(self, info: KeyInfo, before: _Row, after: _Row) -> KeyInfo:
        # The backend stores one alias with the key (for adoption after the
        # catalog is lost); keep it equal to the first catalog alias.
        primary = after.aliases[0] if after.aliases else ""
        if primary != info.alias:
            self.backend.set_primary_alias(after.key_id, primary)
        return self._merge(replace(info, alias=primary), after)

    @staticmethod
    def _merge(info: KeyInfo, row: _Row) -> KeyInfo:
        return replace(
            info,
            alias=row.aliases[0] if row.aliases else "",
            aliases=row.aliases,
            state=row.state.value,
            current_version=row.current_version,
            deletion_date=row.deletion_date,
        )

    def _tombstone(self, row: _Row) -> KeyInfo:
        return KeyInfo(
            key_id=row.key_id,
            alias="",
            created=row.created,
            key_spec="AES_256",
            state=row.state.value,
            backend="",
            token_label=None,
            aliases=row.aliases,
            current_version=row.current_version,
            deletion_date=row.deletion_date,
        )


# (operation, current state) -> allowed?  None means refused.
_TRANSITIONS: dict[tuple[str, KeyState], bool | None] = {
    ("EnableKey", KeyState.ENABLED): True,
    ("EnableKey", KeyState.DISABLED): True,
    ("EnableKey", KeyState.PENDING_DELETION): None,
    ("EnableKey", KeyState.DESTROYED): None,
    ("DisableKey", KeyState.ENABLED): True,
    ("DisableKey", KeyState.DISABLED): True,
    ("DisableKey", KeyState.PENDING_DELETION): None,
    ("DisableKey", KeyState.DESTROYED): None,
    ("ScheduleKeyDeletion", KeyState.ENABLED): True,
    ("ScheduleKeyDeletion", KeyState.DISABLED): True,
    ("ScheduleKeyDeletion", KeyState.PENDING_DELETION): None,
    ("ScheduleKeyDeletion", KeyState.DESTROYED): None,
    ("CancelKeyDeletion", KeyState.ENABLED): None,
    ("CancelKeyDeletion", KeyState.DISABLED): None,
    ("CancelKeyDeletion", KeyState.PENDING_DELETION): True,
    ("CancelKeyDeletion", KeyState.DESTROYED): None,
}
_VERBS = {
    "EnableKey": "be enabled",
    "DisableKey": "be disabled",
    "ScheduleKeyDeletion": "be scheduled for deletion",
    "CancelKeyDeletion": "have a deletion cancelled (it is not pending deletion)",
}


def _alias_taken(alias: str) -> str:
    return (
        f"alias {alias!r} is already used by a customer master key; choose "
        "another alias, or remove it from that key first"
    )


def _name(row: _Row) -> str:
    return f"{row.key_id} ({row.aliases[0]!r})" if row.aliases else row.key_id


def open_managed_store(
    config: Config, clock: Callable[[], datetime] = _utc_now
) -> ManagedCMKStore:
    """Open the configured backend plus the state directory's catalog and audit log.

    Raises:
        ConfigError, HSMUnavailable, TokenLoginFailed: as ``open_store``.
    """
    from blockcrypt.config import open_store

    state_dir = config.state_dir
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the state directory {str(state_dir)!r}: {exc.strerror}"
        ) from exc
    catalog = KeyCatalog(state_dir / CATALOG_FILE)
    try:
        backend: Any = open_store(config)
    except BaseException:
        catalog.close()
        raise
    return ManagedCMKStore(backend, catalog, AuditLog.in_state_dir(state_dir), clock)
