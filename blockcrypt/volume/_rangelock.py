"""A lock over ranges of sectors, so overlapping writes take turns."""

from __future__ import annotations

import threading


class RangeLock:
    """Serialise holders of overlapping half-open ranges ``[start, end)``.

    Disjoint ranges proceed in parallel. A read-modify-write of a partial
    sector holds the whole sector, so two partial writes into one sector
    cannot lose each other's bytes. ``hold`` is a context manager; it is a
    plain class rather than a generator because it sits on every write.
    """

    def __init__(self) -> None:
        # A plain Lock: the default RLock costs more and nothing here re-enters.
        self._cond = threading.Condition(threading.Lock())
        self._held: list[tuple[int, int]] = []

    def hold(self, start: int, end: int) -> _Held:
        return _Held(self, start, end)

    def _acquire(self, start: int, end: int) -> None:
        with self._cond:
            while any(s < end and start < e for s, e in self._held):
                self._cond.wait()
            self._held.append((start, end))

    def _release(self, start: int, end: int) -> None:
        with self._cond:
            self._held.remove((start, end))
            self._cond.notify_all()


class _Held:
    __slots__ = ("_lock", "_start", "_end")

    def __init__(self, lock: RangeLock, start: int, end: int) -> None:
        self._lock, self._start, self._end = lock, start, end

    def __enter__(self) -> None:
        self._lock._acquire(self._start, self._end)

    def __exit__(self, *exc_info: object) -> None:
        self._lock._release(self._start, self._end)
