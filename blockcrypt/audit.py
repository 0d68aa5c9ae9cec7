"""Append-only audit log of key operations, attaches and detaches.

Rules of this module:

* One JSON object per line, in ``STATE_DIR/audit.log`` (mode 0600): ``time``
  (UTC, ISO 8601 with microseconds), ``operation``, ``key_id``,
  ``key_version``, ``volume_uuid``, ``outcome`` (``success`` or ``failure``),
  ``error`` (the exception class, or null) and an optional ``details`` object.
* Callers pass only identifiers and names. No record ever holds key bytes, a
  wrapped key, a PIN, a passphrase or an error message (messages can quote
  input); :func:`AuditLog.record` refuses unknown top-level fields.
* Each record is one ``write`` on a file opened with ``O_APPEND`` under an
  exclusive ``flock``, followed by ``fsync``: concurrent processes never
  interleave, and a record that was reported written survives a crash.
* Failing to write the log fails the operation (:class:`AuditLogError`).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blockcrypt.errors import AuditLogError, ConfigError, UsageError

__all__ = ["AUDIT_FILE", "AuditLog", "parse_time"]

AUDIT_FILE = "audit.log"


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 time or date; a value without zone is taken as UTC.

    Raises:
        ConfigError: the text is not a time.
    """
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"time {text!r} is not understood; use ISO 8601, e.g. "
            "2025-06-01 or 2025-06-01T12:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class AuditLog:
    """The audit log of one state directory.

    Args:
        path: the log file; created with mode 0600 on first write.
        clock: returns the current time (tests inject a fixed one).
    """

    def __init__(self, path: Path, clock: Callable[[], datetime] = _utc_now) -> None:
        self.path = path
        self._clock = clock

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> AuditLog:
        return cls(state_dir / AUDIT_FILE)

    def record(
        self,
        operation: str,
        *,
        outcome: str = "success",
        key_id: str | None = None,
        key_version: int | None = None,
        volume_uuid: str | None = None,
        error: BaseException | type[BaseException] | None = None,
        details: dict[str, str | int | None] | None = None,
    ) -> None:
        """Append one record and fsync it.

        Raises:
            AuditLogError: the record cannot be written.
        """
        if outcome not in ("success", "failure"):
            raise ValueError(f"outcome is {outcome!r}; expected success or failure")
        error_class = None
        if error is not None:
            error_class = (error if isinstance(error, type) else type(error)).__name__
        doc: dict[str, Any] = {
            "time": _format_time(self._clock()),
            "operation": operation,
            "key_id": key_id,
            "key_version": key_version,
            "volume_uuid": volume_uuid,
            "outcome": outcome,
            "error": error_class,
        }
        if details:
            doc["details"] = details
        line = (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8")
        try:
            self._append(line)
        except OSError as exc:
            raise AuditLogError(
                f"cannot append to the audit log {str(self.path)!r}: "
                f"{exc.strerror}; the {operation} was refused or its outcome is "
                "unrecorded. Free space or fix the permissions of the state "
                "directory"
            ) from exc

    def _append(self, line: bytes) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock

    def read(
        self,
        key_ids: set[str] | None = None,
        volume_uuid: str | None = None,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Return the records that match every given filter, oldest first.

        A line that is not a JSON object (a torn last line after a crash of
        an older writer, say) is skipped rather than failing the whole read.

        Raises:
            AuditLogError: the log exists but cannot be read.
        """
        wanted_volume = volume_uuid.lower() if volume_uuid else None
        matches = []
        for doc in self._records():
            if key_ids is not None and doc.get("key_id") not in key_ids:
                continue
            if wanted_volume and str(doc.get("volume_uuid")).lower() != wanted_volume:
                continue
            if since is not None and not _at_or_after(doc.get("time"), since):
                continue
            matches.append(doc)
        return matches

    def _records(self) -> Iterator[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AuditLogError(
                f"cannot read the audit log {str(self.path)!r}: {exc.strerror}"
            ) from exc
        for raw in data.splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict):
                yield doc


def _at_or_after(value: object, since: datetime) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return parse_time(value) >= since
    except ConfigError:
        return False
