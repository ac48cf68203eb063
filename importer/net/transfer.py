"""How long a transfer may stall, how slow it may be, how often it retries: shared by the HTTP and registry sources."""

from __future__ import annotations

from dataclasses import dataclass

from importer.deadline import DEFAULT_MIN_RATE, DEFAULT_MIN_RATE_WINDOW, DEFAULT_STALL_TIMEOUT, Deadlines


@dataclass
class TransferOptions:
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  # seconds without a byte, across reconnections, before failing
    min_rate: int = DEFAULT_MIN_RATE  # bytes/s the source must average over min_rate_window
    min_rate_window: float = DEFAULT_MIN_RATE_WINDOW
    retries: int = 5  # consecutive failures without progress before giving up
    retry_delay: float = 1.0  # first backoff; doubles on each consecutive failure
    max_redirects: int = 10

    @property
    def deadlines(self) -> Deadlines:
        return Deadlines(self.stall_timeout, self.min_rate, self.min_rate_window)

    @property
    def io_timeout(self) -> float:
        """One socket operation's timeout: half the stall timeout, so a dead connection is retried once in time."""
        return self.stall_timeout / 2 if self.stall_timeout > 0 else DEFAULT_STALL_TIMEOUT
