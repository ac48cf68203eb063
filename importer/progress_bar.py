"""Transfer progress for a person watching: a bar redrawn in place on a terminal, plain periodic lines elsewhere."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import TextIO

from importer.units import human

RATE_WINDOW = 5.0  # seconds of history behind the rate and the ETA: recent enough to follow a changing link
TERMINAL_INTERVAL = 0.25  # redraws per second on a terminal: smooth, yet cheap on a slow ssh session
BAR_WIDTH = 30


def format_eta(seconds: float | None) -> str:
    """H:MM:SS or M:SS; `--:--` while the rate is unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta(sent: int, total: int, rate: float) -> float | None:
    if sent >= total:
        return 0.0
    return (total - sent) / rate if rate > 0 else None


def _percent(sent: int, total: int) -> float:
    return 100.0 * sent / total if total else 100.0


def bar_line(sent: int, total: int, rate: float, width: int = BAR_WIDTH) -> str:
    """`[#######.......]  45% 3.6 MiB / 8.0 MiB  12.3 MiB/s  ETA 0:04`: one terminal line, redrawn in place."""
    percent = _percent(sent, total)
    filled = min(width, int(width * percent / 100))
    return (f"[{'#' * filled}{'.' * (width - filled)}] {percent:3.0f}% {human(sent)} / {human(total)}  "
            f"{human(int(rate))}/s  ETA {format_eta(eta(sent, total, rate))}")


def plain_line(sent: int, total: int, rate: float) -> str:
    """One log line for a file or a pipe: no control characters, readable on its own."""
    return (f"sent {human(sent)} of {human(total)} ({_percent(sent, total):.0f}%), {human(int(rate))}/s, "
            f"ETA {format_eta(eta(sent, total, rate))}")


class TransferProgress:
    """Bytes sent of each attempt's total: a bar on a terminal, else one line every `interval` seconds."""

    def __init__(self, stream: TextIO | None, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = 0
        self._stream = stream
        self._tty = stream is not None and stream.isatty()
        self._interval = TERMINAL_INTERVAL if self._tty else interval
        self._clock = clock
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._sent = 0
        self._last_draw = 0.0
        self._drawn_width = 0
        self.restart(0)

    def restart(self, total: int, sent: int = 0) -> None:
        """A new attempt (after a 503, or later a resume from `sent`): the rate starts over, the clock too."""
        now = self._clock()
        self.total = total
        self._sent = sent
        self._samples.clear()
        self._samples.append((now, sent))
        self._last_draw = now

    def rate(self) -> float:
        """Bytes per second over the last RATE_WINDOW seconds."""
        first_time, first_sent = self._samples[0]
        last_time, last_sent = self._samples[-1]
        span = last_time - first_time
        return (last_sent - first_sent) / span if span > 0 else 0.0

    def update(self, sent: int) -> None:
        now = self._clock()
        self._sent = sent
        self._samples.append((now, sent))
        while len(self._samples) > 2 and self._samples[1][0] <= now - RATE_WINDOW:
            self._samples.popleft()
        if now - self._last_draw >= self._interval:
            self._last_draw = now
            self._draw()

    def finish(self) -> None:
        """The last state, always shown; on a terminal the line is then ended so later output starts clean."""
        self._draw()
        if self._tty and self._stream is not None:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn_width = 0

    def _draw(self) -> None:
        if self._stream is None:
            return
        if self._tty:
            line = bar_line(self._sent, self.total, self.rate())
            # Pad over the previous, possibly longer, line instead of an escape sequence: works on any terminal.
            self._stream.write("\r" + line.ljust(self._drawn_width))
            self._drawn_width = len(line)
        else:
            self._stream.write(plain_line(self._sent, self.total, self.rate()) + "\n")
        self._stream.flush()
