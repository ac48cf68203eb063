"""Group commit: calls that changed the disk at about the same moment share one flush.

A caller makes its change (without flushing), then calls `GroupCommit.wait_durable()`. It returns once a flush
that *started after the call* has completed, so the change is covered; concurrent callers ride on the same
flush instead of paying one each. A failed flush fails every caller waiting on it: none of them may answer
success, since their changes may not be on disk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class FlushFailed(OSError):
    """The flush that would have made a change durable failed; the change may or may not be on disk."""


class GroupCommit:
    """One flush at a time; everyone who arrived while it ran is covered by the next one."""

    def __init__(self, flush: Callable[[], None], what: str, timeout: float = 120.0) -> None:
        self._flush = flush
        self.what = what  # names the flushed thing in errors, e.g. "pool 'legacy' records"
        self.timeout = timeout
        self._cond = threading.Condition()
        self._started = 0  # flushes started so far (the number of the one running, when `_running`)
        self._finished = 0  # flushes completed, successfully or not
        self._running = False
        self._error: BaseException | None = None  # of the last completed flush
        self.flushes = 0  # completed flushes, for tests and the benchmark

    def wait_durable(self) -> None:
        """Return when everything this thread changed before the call is flushed; raise FlushFailed if not."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            needed = self._started + 1  # the first flush to start from now on
            while self._finished < needed:
                if not self._running:
                    self._running = True
                    self._started += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FlushFailed(f"flushing {self.what} took more than {self.timeout:.0f} s")
                self._cond.wait(left)
            else:
                self._raise_if_failed()  # a flush covering this call completed while it waited
                return
        self._lead()

    def _lead(self) -> None:
        """Run one flush for everyone waiting, then wake them with its outcome."""
        error: BaseException | None = None
        try:
            self._flush()
        except BaseException as exc:  # an interrupted flush must not leave the others waiting forever
            error = exc
        with self._cond:
            self._finished = self._started
            self._running = False
            self._error = error
            self.flushes += 1
            self._cond.notify_all()
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        error = self._error
        if error is None:
            return
        reason = (error.strerror or str(error)) if isinstance(error, OSError) else repr(error)
        raise FlushFailed(f"flushing {self.what} failed ({reason}): the change may not be on disk; retry the call"
                          ) from error
