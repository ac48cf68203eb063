"""How the import reports itself: a terminal bar, CDI's Prometheus counter, and the pod termination message."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

TERMINATION_LOG = Path("/dev/termination-log")
_TERMINATION_LIMIT = 4096  # kubelet truncates longer termination messages


class ImportMetrics:
    """`kubevirt_cdi_import_progress_total{ownerUID=...}`: percent done, as CDI's controller scrapes it."""

    def __init__(self, owner_uid: str, registry: CollectorRegistry | None = None) -> None:
        # Imported here: prometheus_client costs 0.1 s of start-up, wasted when no metrics are asked for.
        from prometheus_client import CollectorRegistry, Counter, disable_created_metrics

        disable_created_metrics()  # type: ignore[no-untyped-call]  # CDI exposes only the _total series
        self.registry = registry or CollectorRegistry()
        self._counter = Counter(
            "kubevirt_cdi_import_progress", "The import progress in percentage", ["ownerUID"], registry=self.registry
        ).labels(ownerUID=owner_uid)
        self._value = 0.0

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            from importer.errors import ConfigError

            raise ConfigError(f"invalid metrics address {address!r}: expected HOST:PORT")
        from prometheus_client import start_http_server

        start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry)

    def set(self, percent: float) -> None:
        # A counter only goes up; progress that seems to go back (a restarted phase) is simply not reported.
        if percent > self._value:
            self._counter.inc(percent - self._value)
            self._value = percent


class Progress:
    """Percent done, fanned out to the metric and to a bar redrawn at most four times a second."""

    def __init__(self, metrics: ImportMetrics | None = None, stream: TextIO | None = None) -> None:
        self._metrics = metrics
        self._stream = stream if stream is not None and stream.isatty() else None
        self._percent = 0.0
        self._shown = -1.0
        self._last = 0.0

    def set(self, percent: float) -> None:
        percent = max(0.0, min(100.0, percent))
        if percent <= self._percent:
            return
        self._percent = percent
        if self._metrics is not None:  # about a microsecond per MiB chunk: never throttled, never stale
            self._metrics.set(percent)
        now = time.monotonic()
        if percent < 100 and now - self._last < 0.25:
            return
        self._last = now
        if self._stream is not None and int(percent) != int(self._shown):
            filled = int(percent / 2.5)
            self._stream.write(f"\r[{'#' * filled}{'.' * (40 - filled)}] {percent:5.1f}%")
            self._stream.flush()
            self._shown = percent

    def range(self, start: float, end: float) -> RangeProgress:
        return RangeProgress(self, start, end)

    def done(self) -> None:
        self.set(100.0)
        if self._stream is not None:
            self._stream.write("\n")
            self._stream.flush()


class RangeProgress:
    """One phase's 0-100% mapped onto a slice of the overall progress (download 0-50%, convert 50-100%)."""

    def __init__(self, parent: Progress, start: float, end: float) -> None:
        self._parent, self._start, self._span = parent, start, end - start

    def set(self, percent: float) -> None:
        self._parent.set(self._start + self._span * min(percent, 100.0) / 100.0)


def default_stream() -> TextIO:
    return sys.stderr


def termination_message(
    message: str, *, scratch_space_required: bool | None = None, preallocation_applied: bool | None = None,
    deadline_passed: bool | None = None, digest: str | None = None,
) -> str:
    """CDI's TerminationMessage JSON, shortened to what kubelet keeps; `digest` (ours) names the image imported."""
    body: dict[str, object] = {}
    if scratch_space_required is not None:
        body["scratchSpaceRequired"] = scratch_space_required
    if preallocation_applied is not None:
        body["preallocationApplied"] = preallocation_applied
    if deadline_passed is not None:
        body["deadlinePassed"] = deadline_passed
    if digest is not None:  # not in CDI's struct, whose JSON decoding skips unknown fields
        body["digest"] = digest
    body["message"] = message
    text = json.dumps(body)
    while len(text.encode()) > _TERMINATION_LIMIT and len(message) > 16:
        message = message[: len(message) * 3 // 4] + "..."
        body["message"] = message
        text = json.dumps(body)
    return text


def write_termination_message(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as err:
        print(f"hpp-importer: cannot write the termination message to {path}: {err.strerror}", file=sys.stderr)
