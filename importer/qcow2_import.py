"""A qcow2 image converted to raw by us: tables first, then the data clusters in parallel Range requests.

Two passes over the L2 tables: the first reads and checks them all (every offset inside the file, every entry
well-formed) before a byte lands in the target, and sums the bytes to fetch for the progress; the second writes,
GROUP_ENTRIES table entries at a time. Raw tables are kept between the passes up to TABLE_BUDGET, beyond that
they are read again (about 1 MiB per 8 GiB of disk with 64 KiB clusters), so memory stays bounded whatever the
image size or its fragmentation.
"""

from __future__ import annotations

from collections.abc import Callable

from importer import qcow2
from importer.errors import InvalidImage
from importer.fetch import DEFAULT_CONNECTIONS, Fetcher, RangeSource, plan, read_range
from importer.qcow2 import Header, Segment
from importer.qcow2_stream import decompress
from importer.target import SparseWriter

TABLE_BUDGET = 8 * 1024 * 1024
GROUP_ENTRIES = 64 * 1024  # table entries mapped into segments at once: bounds the segment lists in memory


def inflate(data: bytes, seg: Segment, cluster_size: int) -> bytes:
    """One compressed cluster: raw deflate (qemu writes window bits 12; a 15-bit decoder reads any window)."""
    return decompress(data, qcow2.COMPRESSION_ZLIB, cluster_size, seg.host)[0]


def qcow2_fetcher(source: RangeSource, header: Header, writer: SparseWriter,
                  connections: int = DEFAULT_CONNECTIONS) -> Fetcher:
    """The Fetcher a Qcow2Import runs on; its owner closes it (see Fetcher.close) once the import is over."""
    return Fetcher(source, writer, lambda data, seg: inflate(data, seg, header.cluster_size), connections)


class Qcow2Import:
    """Reads one qcow2 through a RangeSource into the fetcher's SparseWriter, positioned at disk offset 0."""

    def __init__(self, source: RangeSource, header: Header, file_size: int, writer: SparseWriter, fetcher: Fetcher,
                 on_percent: Callable[[float], None] = lambda p: None) -> None:
        self._source, self._header, self._file_size, self._writer = source, header, file_size, writer
        self._on_percent = on_percent
        self._total = 0
        self._fetcher = fetcher
        fetcher.on_bytes = self._progress

    def run(self) -> None:
        l1_offset, l1_bytes = self._header.l1_offset, self._header.l1_needed * 8
        if l1_offset + l1_bytes > self._file_size:
            raise InvalidImage(f"qcow2 image is truncated: its L1 table ({l1_bytes} bytes at offset {l1_offset}) "
                               f"lies beyond the end of the file ({self._file_size} bytes)")
        l1 = read_range(self._source, l1_offset, l1_bytes, "the qcow2 L1 table")
        tables = qcow2.l2_tables(self._header, l1, self._file_size)
        allocated = [index for index, offset in enumerate(tables) if offset]
        keep = len(allocated) * self._header.cluster_size <= TABLE_BUDGET
        kept: dict[int, bytes] = {}
        for batch in self._batches(allocated):  # pass 1: check every entry, count what to fetch
            for index, table in zip(batch, self._read_tables(tables, batch), strict=True):
                segments = qcow2.map_table(self._header, index, table, self._file_size)
                self._total += sum(part.end - part.start for part in plan(segments))
                if keep:
                    kept[index] = table
        self._write(tables, allocated, kept if keep else None)

    def _write(self, tables: list[int], allocated: list[int], kept: dict[int, bytes] | None) -> None:
        """Pass 2: segments of up to GROUP_ENTRIES table entries at a time, then the holes they leave."""
        group: list[tuple[int, list[Segment]]] = []
        entries = 0
        for batch in self._batches(allocated):
            raw = [kept[i] for i in batch] if kept is not None else self._read_tables(tables, batch)
            for index, table in zip(batch, raw, strict=True):
                group.append((index, qcow2.map_table(self._header, index, table, self._file_size)))
                entries += self._header.l2_entries
                if entries >= GROUP_ENTRIES:
                    self._run_group(group)
                    group, entries = [], 0
        self._run_group(group)
        for index, offset in enumerate(tables):
            if not offset:
                self._zero_holes(index, [])

    def _run_group(self, group: list[tuple[int, list[Segment]]]) -> None:
        self._fetcher.run(plan([seg for _, segments in group for seg in segments]))
        for index, segments in group:
            self._zero_holes(index, segments)

    def _batches(self, indexes: list[int]) -> list[list[int]]:
        size = max(1, TABLE_BUDGET // self._header.cluster_size)
        return [indexes[i : i + size] for i in range(0, len(indexes), size)]

    def _read_tables(self, tables: list[int], batch: list[int]) -> list[bytes]:
        size = self._header.cluster_size
        return self._fetcher.map(lambda i: read_range(self._source, tables[i], size, f"qcow2 L2 table {i}"), batch)

    def _zero_holes(self, index: int, segments: list[Segment]) -> None:
        """Disk ranges of one L2 span no segment wrote: left alone on a new file, zeroed on a block device."""
        if not self._writer.zeroes_holes:
            return
        span = self._header.l2_span
        start, end = index * span, min((index + 1) * span, self._header.virtual_size)
        for seg in segments:  # map_table gives them in disk order
            if seg.guest > start:
                self._writer.zero(start, seg.guest - start)
            start = max(start, seg.guest + seg.size)
        if end > start:
            self._writer.zero(start, end - start)

    def _progress(self, fetched: int) -> None:
        if self._total:
            self._on_percent(min(100.0, 100.0 * fetched / self._total))
