"""A lock over ranges of sectors, so overlapping writes take turns."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RangeLock:
    """Serialise holders of overlapping half-open ranges ``[start, end)``.

    Disjoint ranges proceed in parallel. A read-modify-write of a partial
    sector holds the whole sector, so two partial writes into one sector
    cannot lose each other's bytes.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int]] = []

    @contextmanager
    def hold(self, start: int, end: int) -> Iterator[None]:
        span = (start, end)
        with self._cond:
            while any(s < end and start < e for s, e in self._held):
                self._cond.wait()
            self._held.append(span)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(span)
                self._cond.notify_all()
