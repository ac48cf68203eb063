"""Scattered byte ranges of a source fetched over several connections at once and placed in the target.

The engine under our qcow2 reader: it gets segments (file bytes → disk offset), groups neighbours into Range
requests of at most PART_MAX bytes, runs them on a small thread pool and writes each byte once with pwrite.
Reading a gap is cheaper than a new request, so segments closer than MERGE_GAP share one.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast

from importer.errors import TransferError
from importer.pipeline import CHUNK, Reader
from importer.qcow2 import Segment
from importer.target import SparseWriter

T = TypeVar("T")
PART_MAX = 16 * 1024 * 1024
MERGE_GAP = 256 * 1024
DEFAULT_CONNECTIONS = 4


class RangeSource(Protocol):
    def open_range(self, start: int, end: int, /) -> Reader: ...


@dataclass
class Part:
    """One Range request: file bytes [start, end) and the segments inside, in file order."""

    start: int
    end: int
    segments: list[Segment] = field(default_factory=list)


def split(segments: list[Segment], limit: int) -> Iterator[Segment]:
    """Long plain segments cut into pieces of at most limit bytes, so one extent can use every connection."""
    for seg in segments:
        if seg.compressed or seg.length <= limit:
            yield seg
            continue
        for offset in range(0, seg.length, limit):
            length = min(limit, seg.length - offset)
            yield Segment(seg.host + offset, length, seg.guest + offset, length)


def plan(segments: list[Segment], part_max: int | None = None, merge_gap: int = MERGE_GAP) -> list[Part]:
    """Range requests covering every segment, in file order (parts of at most PART_MAX bytes by default)."""
    part_max = PART_MAX if part_max is None else part_max
    parts: list[Part] = []
    for seg in sorted(split(segments, part_max), key=lambda s: s.host):
        last = parts[-1] if parts else None
        if last is not None and seg.host <= last.end + merge_gap and seg.host_end - last.start <= part_max:
            last.segments.append(seg)
            last.end = max(last.end, seg.host_end)
        else:
            parts.append(Part(seg.host, seg.host_end, [seg]))
    return parts


def read_range(source: RangeSource, start: int, length: int, what: str) -> bytes:
    """A small range read whole (tables, headers); a short answer means the file ends too early."""
    reader = source.open_range(start, start + length)
    try:
        cursor = _Cursor(reader, start)
        return cursor.span(start, start + length)
    except TransferError as err:
        raise TransferError(f"cannot read {what} ({length} bytes at offset {start}): {err}") from err
    finally:
        reader.close()


class Fetcher:
    """Runs jobs (parts, table reads) on up to `connections` daemon threads; the first failure stops the rest.

    A failure or a signal returns at once without waiting for the other threads: one may sit in a stalled read
    for the whole stall timeout, and kubelet's grace period is shorter. Whoever owns the target hands its cleanup
    to close(then=...), which runs it only once no thread can write any more.
    """

    def __init__(self, source: RangeSource, writer: SparseWriter, decode: Callable[[bytes, Segment], bytes],
                 connections: int = DEFAULT_CONNECTIONS, on_bytes: Callable[[int], None] = lambda n: None) -> None:
        self._source, self._writer, self._decode = source, writer, decode
        self.on_bytes = on_bytes  # called with the bytes fetched so far
        self._connections = max(1, connections)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running = 0
        self._then: Callable[[], None] | None = None
        self.fetched = 0

    def map(self, fn: Callable[[int], bytes], items: list[int]) -> list[bytes]:
        """fn over items on the threads (table reads), results in order."""
        return self._run_jobs([functools.partial(fn, item) for item in items])

    def run(self, parts: list[Part]) -> None:
        self._run_jobs([functools.partial(self._fetch_part, part) for part in parts])

    def close(self, then: Callable[[], None] = lambda: None) -> None:
        """Stop; `then` runs now if no thread is left, else when the last one exits (after a failure)."""
        self._stop.set()
        with self._lock:
            if self._running:
                self._then = then
                return
        then()

    def _run_jobs(self, jobs: list[Callable[[], T]]) -> list[T]:
        results: list[T | None] = [None] * len(jobs)
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(len(jobs)):
            todo.put(index)
        left = len(jobs)
        errors: list[BaseException] = []
        done = threading.Event()

        def work() -> None:
            nonlocal left
            try:
                while not self._stop.is_set():
                    try:
                        index = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        results[index] = jobs[index]()
                    except BaseException as err:  # handed to the waiting thread
                        errors.append(err)
                        self._stop.set()
                        done.set()
                        return
                    with self._lock:
                        left -= 1
                        if left == 0:
                            done.set()
            finally:
                self._exited()

        if jobs:
            for _ in range(min(self._connections, len(jobs))):
                with self._lock:
                    self._running += 1
                threading.Thread(target=work, name="fetch", daemon=True).start()
            try:
                done.wait()
            except BaseException:  # a signal: the others stop at their next chunk, nobody waits for them
                self._stop.set()
                raise
        if errors:
            raise errors[0]
        if self._stop.is_set():
            raise TransferError("the fetch was stopped")
        return cast("list[T]", results)

    def _exited(self) -> None:
        with self._lock:
            self._running -= 1
            then, self._then = (self._then, None) if self._running == 0 else (None, self._then)
        if then is not None:
            then()

    def _fetch_part(self, part: Part) -> None:
        if self._stop.is_set():
            return
        reader = self._source.open_range(part.start, part.end)
        cursor = _Cursor(reader, part.start, self._count)
        try:
            for seg in part.segments:
                if self._stop.is_set():
                    return
                if seg.host < cursor.kept_from:  # overlaps an earlier segment beyond what is kept: ask again
                    self._fetch_part(Part(seg.host, seg.host_end, [seg]))
                elif seg.compressed:
                    data = cursor.span(seg.host, seg.host_end)
                    cursor.forget_before(seg.host)
                    if self._stop.is_set():
                        return
                    self._writer.write_at(seg.guest, self._decode(data, seg)[: seg.size])
                else:
                    guest = seg.guest
                    for chunk in cursor.stream(seg.host, seg.host_end):
                        if self._stop.is_set():
                            return
                        self._writer.write_at(guest, chunk)
                        guest += len(chunk)
        finally:
            reader.close()

    def _count(self, n: int) -> None:
        with self._lock:
            self.fetched += n
            total = self.fetched
        self.on_bytes(total)


class _Cursor:
    """A forward-only response that keeps the bytes of the segment it is on, for the next one that shares them."""

    def __init__(self, reader: Reader, start: int, on_bytes: Callable[[int], None] = lambda n: None) -> None:
        self._reader, self._on_bytes = reader, on_bytes
        self.pos = start  # the next byte the response gives
        self.kept_from = start  # _kept holds bytes [kept_from, pos)
        self._kept = bytearray()

    def _read(self, size: int) -> bytes:
        data = self._reader.read(size)
        if not data:
            raise TransferError(f"the source ended at byte {self.pos}, inside the range it was asked for")
        self.pos += len(data)
        self._on_bytes(len(data))
        return data

    def span(self, start: int, end: int) -> bytes:
        """Bytes [start, end) (start >= kept_from), kept until forget_before()."""
        while self.pos < end:
            self._kept += self._read(min(CHUNK, end - self.pos))
        return bytes(self._kept[start - self.kept_from : end - self.kept_from])

    def forget_before(self, offset: int) -> None:
        cut = min(offset, self.pos) - self.kept_from
        if cut > 0:
            del self._kept[:cut]
            self.kept_from += cut

    def stream(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) (start >= kept_from) in chunks, passed on without being kept."""
        if start < self.pos:
            stop = min(end, self.pos)
            yield bytes(self._kept[start - self.kept_from : stop - self.kept_from])
            start = stop
        if start >= end:
            self.forget_before(end)
            return
        self._kept.clear()
        while self.pos < start:  # a gap smaller than MERGE_GAP: read through it
            self._read(min(CHUNK, start - self.pos))
        while self.pos < end:
            yield self._read(min(CHUNK, end - self.pos))
        self.kept_from = self.pos
