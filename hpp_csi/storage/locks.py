"""Per-key locks: calls on one volume are serialised, calls on different volumes run in parallel."""

from __future__ import annotations

import threading


class KeyedLocks:
    """A lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def hold(self, *keys: str) -> _Held:
        """Hold the locks of all `keys` (a `with` block), taken in sorted order so two callers cannot deadlock."""
        return _Held(self, keys)

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


class _Held:
    """The `with` block of KeyedLocks.hold: a plain class, as every CSI call takes one (a generator-based
    context manager cost more than the locking itself)."""

    __slots__ = ("_keys", "_locks", "_taken")

    def __init__(self, locks: KeyedLocks, keys: tuple[str, ...]) -> None:
        self._locks = locks
        self._keys = keys
        self._taken: list[str] = []

    def __enter__(self) -> None:
        ordered = (self._keys[0],) if len(self._keys) == 1 else sorted(set(self._keys))
        try:
            for key in ordered:
                self._locks._acquire(key)
                self._taken.append(key)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        taken, self._taken = self._taken, []
        for key in reversed(taken):
            self._locks._release(key)
