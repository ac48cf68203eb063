"""Progress deadlines: an import whose source stops sending, or only trickles, ends with a message saying which.

Two limits, both on bytes received from the source: the stall timeout (no byte at all for that long, across
reconnections) and the minimum rate (fewer than min_rate * window bytes in the last window seconds). Every
route feeds the same ProgressWatch: our HTTP readers after each read, the nbdkit route from nbdkit's request log.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from importer.errors import ProgressStopped

DEFAULT_STALL_TIMEOUT = 60.0
DEFAULT_MIN_RATE = 1024  # bytes/s: far below any usable link, far above a server dripping bytes to keep us waiting
DEFAULT_MIN_RATE_WINDOW = 120.0
SAMPLES_PER_WINDOW = 32


def add_deadline_flags(parser: argparse.ArgumentParser, ends: str) -> None:
    """--stall-timeout, --min-rate, --min-rate-window, one definition for every command that receives an image;
    `ends` says what happens to whom, e.g. "fail when the source" or "drop a client that"."""
    parser.add_argument("--stall-timeout", help=f"{ends} sends nothing for this many seconds (across reconnections); "
                        f"0 disables [IMPORTER_STALL_TIMEOUT, {DEFAULT_STALL_TIMEOUT:g}]")
    parser.add_argument("--min-rate", help=f"{ends} averages fewer bytes/s than this over --min-rate-window (a "
                        f"quantity such as 1Ki); 0 disables [IMPORTER_MIN_RATE, {DEFAULT_MIN_RATE}]")
    parser.add_argument("--min-rate-window", help="seconds over which --min-rate is measured "
                        f"[IMPORTER_MIN_RATE_WINDOW, {DEFAULT_MIN_RATE_WINDOW:g}]")


@dataclass(frozen=True)
class Deadlines:
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  # seconds without a byte; 0 disables
    min_rate: int = DEFAULT_MIN_RATE  # bytes per second over min_rate_window; 0 disables
    min_rate_window: float = DEFAULT_MIN_RATE_WINDOW


def rate_shortfall(samples: list[tuple[float, int]], now: float, total: int, deadlines: Deadlines) -> str | None:
    """Why the rate is too low, or None (plain function: samples are (time, bytes so far), oldest first)."""
    if deadlines.min_rate <= 0:
        return None
    base = None
    for when, count in samples:
        if when > now - deadlines.min_rate_window:
            break
        base = (when, count)
    if base is None:
        return None  # younger than one window
    got, span = total - base[1], now - base[0]
    if got >= deadlines.min_rate * deadlines.min_rate_window:
        return None
    return (f"only {got} bytes received from the source in the last {span:.1f} s, below the minimum rate of "
            f"{deadlines.min_rate} bytes/s over {deadlines.min_rate_window:g} s "
            "(--min-rate/IMPORTER_MIN_RATE, --min-rate-window/IMPORTER_MIN_RATE_WINDOW)")


class ProgressWatch:
    """Bytes received so far, by whoever reads the source; check() raises ProgressStopped past a deadline."""

    def __init__(self, deadlines: Deadlines, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadlines = deadlines
        self._clock = clock
        self._lock = threading.Lock()
        start = clock()
        self._last_byte = start
        self.total = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(start, 0)])

    def received(self, count: int) -> None:
        now = self._clock()
        with self._lock:
            self.total += count
            if count:
                self._last_byte = now
            self._sample(now)

    def set_total(self, total: int) -> None:
        """For counters that report a running total (the nbdkit log)."""
        with self._lock:
            grown = total - self.total
        if grown > 0:
            self.received(grown)

    def stall_left(self) -> float:
        """Seconds until the stall timeout fires (infinite when disabled)."""
        if self.deadlines.stall_timeout <= 0:
            return float("inf")
        with self._lock:
            return self._last_byte + self.deadlines.stall_timeout - self._clock()

    def check(self) -> None:
        now = self._clock()
        with self._lock:
            self._sample(now)
            idle = now - self._last_byte
            stall = self.deadlines.stall_timeout
            if stall > 0 and idle >= stall:
                raise ProgressStopped(
                    f"no data from the source for {idle:.1f} s after {self.total} bytes: stall timeout of "
                    f"{stall:g} s (--stall-timeout/IMPORTER_STALL_TIMEOUT)"
                )
            why = rate_shortfall(list(self._samples), now, self.total, self.deadlines)
        if why is not None:
            raise ProgressStopped(why)

    def _sample(self, now: float) -> None:
        """Keep (time, total) often enough to measure a window, and nothing older than the one before it."""
        window = self.deadlines.min_rate_window
        if now - self._samples[-1][0] >= window / SAMPLES_PER_WINDOW:
            self._samples.append((now, self.total))
        while len(self._samples) > 1 and self._samples[1][0] <= now - window:
            self._samples.popleft()


# nbdkit's log filter: "connection=1 Read id=3 offset=0x0 count=0x200000 ..." then "connection=1 ...Read id=3
# return=0". Bytes count once the read has returned successfully.
_READ_START = re.compile(r"connection=(\d+) Read id=(\d+) offset=\S+ count=(0x[0-9a-fA-F]+|\d+)")
_READ_DONE = re.compile(r"connection=(\d+) \.\.\.Read id=(\d+) return=0\b")


class NbdkitLogCounter:
    """Bytes that nbdkit has served, read incrementally from its log filter's file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._pending: dict[tuple[str, str], int] = {}
        self._partial = b""
        self.total = 0

    def poll(self) -> int:
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.total
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode(errors="replace")
            if start := _READ_START.search(line):
                self._pending[(start.group(1), start.group(2))] = int(start.group(3), 0)
            elif done := _READ_DONE.search(line):
                self.total += self._pending.pop((done.group(1), done.group(2)), 0)
        return self.total


class ProcessWatchdog:
    """Kills a child process (qemu-img reading through nbdkit) once the watch's deadline passes.

    The child then fails in its own words; the caller calls raise_if_fired() first so the error says why.
    """

    INTERVAL = 0.2

    def __init__(self, proc: subprocess.Popen[bytes], watch: ProgressWatch | None,
                 served: Callable[[], int] | None) -> None:
        self._proc, self._watch, self._served = proc, watch, served
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self.error: ProgressStopped | None = None

    def __enter__(self) -> ProcessWatchdog:
        if self._watch is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def raise_if_fired(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        assert self._watch is not None
        while not self._stop.wait(self.INTERVAL):
            if self._served is not None:
                self._watch.set_total(self._served())
            try:
                self._watch.check()
            except ProgressStopped as err:
                self.error = err
                self._proc.kill()
                return
