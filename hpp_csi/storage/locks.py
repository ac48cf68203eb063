"""Per-key locks: calls on one volume are serialised, calls on different volumes run in parallel."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class KeyedLocks:
    """A lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Hold the locks of all `keys`, taken in sorted order so two callers cannot deadlock."""
        ordered = sorted(set(keys))
        taken: list[str] = []
        try:
            for key in ordered:
                self._acquire(key)
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                self._release(key)

    def _acquire(self, key: str) -> None:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        lock.acquire()

    def _release(self, key: str) -> None:
        with self._guard:
            lock, users = self._locks[key]
            lock.release()
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
