"""The threads that serve CSI calls: a few take every call, more start only when a call has waited.

Python runs one thread at a time. With one thread per call in flight, 8 concurrent CreateVolume calls keep 8
threads (and gRPC's poller) contending for the interpreter at every system call and lock, and that contention,
not the work, set the tail: 8 clients on 2 cores did about 1,200 creates/s with a p99 of 12 ms on 16 threads,
about 1,600/s with a p99 of 8 ms on 4 (docs/benchmarks.md, csi_ops). So `core` threads take calls, and queued
calls wait for one of them, which frees up within a call's time. A thread can also be held for long (a volume
copied in full, a slow mount); a call that has waited `patience` seconds for a thread starts another, up to
`maximum`, so a Probe is never stuck behind clones. Threads above `core` leave after `linger` idle seconds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from typing import Any

CORE = 4
PATIENCE = 0.05  # seconds a call may wait for a thread before another starts; CSI callers' timeouts are seconds
LINGER = 10.0


class CallPool(futures.Executor):
    """An executor for grpc.server(): FIFO, `core` threads always, up to `maximum` while calls wait."""

    def __init__(self, maximum: int, core: int = CORE, patience: float = PATIENCE, linger: float = LINGER,
                 name: str = "csi") -> None:
        if maximum < 1:
            raise ValueError(f"a call pool needs at least one thread, not {maximum}")
        self.maximum, self.core = maximum, max(1, min(core, maximum))
        self.patience, self.linger, self.name = patience, linger, name
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here for calls
        self._watch = threading.Condition(self._lock)  # the watcher waits here for a queue to watch
        self._queue: deque[tuple[float, futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]]
        self._queue = deque()
        self._threads = 0
        self._idle = 0  # workers waiting for a call
        self._started = 0  # threads started so far, for names and tests
        self._watcher: threading.Thread | None = None
        self._watcher_waiting = False  # waiting without a timeout: wake it when a call is queued
        self._shutdown = False

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot take calls after shutdown")
            self._queue.append((time.monotonic(), future, fn, args, kwargs))
            if len(self._queue) > self._idle and self._threads < self.core:
                self._start_worker()
            else:
                self._work.notify()
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch_queue, name=f"{self.name}-watch", daemon=True)
                self._watcher.start()
            elif self._watcher_waiting:
                self._watch.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[1].cancel()
            self._work.notify_all()
            self._watch.notify_all()
        if wait:
            while True:
                with self._lock:
                    if not self._threads and not self._queue:
                        return
                time.sleep(0.01)

    def _start_worker(self) -> None:
        """Start one thread (the lock is held)."""
        self._threads += 1
        self._started += 1
        threading.Thread(target=self._serve, name=f"{self.name}-{self._started}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            with self._lock:
                item = self._next_call()
                if item is None:
                    self._threads -= 1
                    return
            _, future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to whoever waits on the future, as ThreadPoolExecutor does
                future.set_exception(exc)
            else:
                future.set_result(result)
            del item, future, fn, args, kwargs

    def _next_call(self) -> tuple[float, futures.Future[Any], Callable[..., Any], tuple[Any, ...],
                                  dict[str, Any]] | None:
        """The oldest queued call, waiting for one; None when this thread should end (the lock is held)."""
        while not self._queue:
            if self._shutdown:
                return None
            extra = self._threads > self.core
            self._idle += 1
            try:
                woken = self._work.wait(self.linger if extra else None)
            finally:
                self._idle -= 1
            if not woken and not self._queue and self._threads > self.core:
                return None
        return self._queue.popleft()

    def _watch_queue(self) -> None:
        """Start a thread whenever the oldest queued call has waited `patience`: the others are held up."""
        with self._lock:
            while not self._shutdown:
                if not self._queue:
                    self._watcher_waiting = True
                    try:
                        self._watch.wait()
                    finally:
                        self._watcher_waiting = False
                    continue
                waited = time.monotonic() - self._queue[0][0]
                if waited < self.patience:
                    self._watch.wait(self.patience - waited)
                    continue
                if self._threads < self.maximum:
                    self._start_worker()
                self._watch.wait(self.patience)  # time for it to take the call before judging again
