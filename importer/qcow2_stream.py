"""A qcow2 read front to back, once, without seeking: the reader for qcow2 that arrives as a stream.

Uploads, registry layers, compressed qcow2 and servers without Range cannot be read at offsets, so instead of
storing the file in scratch for qemu-img, the clusters are placed as they pass: the header says where the L1
table is, the L1 table says where the L2 tables are, each L2 table says where its data clusters go. A data
cluster whose L2 entry has passed is written at its disk offset at once; one that passes before its L2 entry
waits in a ClusterBuffer (memory, then scratch) until the entry arrives or the last L2 table has passed.
`qemu-img convert` writes each L2 table before the data it maps, so its images need (almost) no buffer.

Field meanings are those of qemu's docs/interop/qcow2.txt; the header is checked by formats.check_header and
stream_problem() before a byte is written.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass, field

import zstandard
from zlib_ng import zlib_ng

from importer import qcow2
from importer.errors import InvalidImage
from importer.pipeline import ReadAhead, Reader, ZlibError
from importer.qcow2 import COMPRESSED, L2_RESERVED, OFFSET_MASK, SECTOR, ZERO, Header
from importer.qcow2_stream_buffer import ClusterBuffer
from importer.target import ZERO_BLOCK, SparseWriter, has_zero_block

SUBCLUSTERS = 32  # per cluster, with extended L2 entries
ALL = -1  # a standard entry's mask: every byte of the cluster is data
# A data cluster still ahead is one int in a heap: its host cluster above GUEST_BITS, its disk cluster below (about
# 40 bytes each, so an image whose tables all come first, preallocation=metadata, costs ~0.7 MiB per GiB of data).
GUEST_BITS = 40
GUEST_MASK = (1 << GUEST_BITS) - 1
RUN_LIMIT = 1024 * 1024  # one write at most: the sparse writer's whole-write zero test covers up to 1 MiB
READ_CHUNK = 4 * 1024 * 1024  # read ahead on another thread, at most 4 chunks: decoding overlaps writing
MAX_REFCOUNT_TABLE = 8 * 1024 * 1024  # qemu's QCOW_MAX_REFTABLE_SIZE: a larger one is not read, only passed


def disk_size(header: Header) -> int:
    """The disk's size as qemu reads it: whole 512-byte sectors (a size in between loses its tail)."""
    return header.virtual_size // SECTOR * SECTOR


def stream_problem(header: Header) -> str | None:
    """Why this header cannot describe an image we stream (checked before a byte is written), or None."""
    if not qcow2.MIN_CLUSTER_BITS <= header.cluster_bits <= qcow2.MAX_CLUSTER_BITS:
        return f"cluster_bits {header.cluster_bits} is outside {qcow2.MIN_CLUSTER_BITS}..{qcow2.MAX_CLUSTER_BITS}"
    if header.extended_l2 and header.cluster_size // SUBCLUSTERS < SECTOR:
        return f"extended L2 entries need clusters of at least {SUBCLUSTERS * SECTOR} bytes"
    if header.l1_size < header.l1_needed or header.l1_needed * 8 > qcow2.MAX_L1_BYTES:
        return f"an L1 table of {header.l1_size} entries cannot map {header.virtual_size} bytes"
    if header.l1_needed and (header.l1_offset % header.cluster_size or header.l1_offset < header.cluster_size):
        return f"the L1 table at offset {header.l1_offset} is unaligned or overlaps the header"
    return None


def decompress(data: bytes, compression_type: int, cluster_size: int, host: int) -> tuple[bytes, int | None]:
    """One compressed cluster (exactly cluster_size bytes out) and how many input bytes it used, when known."""
    if compression_type == qcow2.COMPRESSION_ZSTD:
        length = zstd_frame_length(data)
        if length is None:
            raise InvalidImage(f"corrupt qcow2 image: compressed cluster at offset {host} is no whole zstd frame")
        return _unzstd(data[:length], cluster_size, host), length
    decoder = zlib_ng.decompressobj(wbits=-15)  # raw deflate; a 15-bit window reads qemu's 12-bit one
    try:
        out = decoder.decompress(data, cluster_size)
    except ZlibError as err:
        raise InvalidImage(f"corrupt qcow2 image: compressed cluster at offset {host}: {err}") from err
    if len(out) < cluster_size:
        raise InvalidImage(f"corrupt qcow2 image: compressed cluster at offset {host} decompresses to {len(out)} "
                           f"bytes, not {cluster_size}")
    # As qemu: a stream still going once the cluster is full is cut there (its length is then unknown).
    return out, len(data) - len(decoder.unused_data) if decoder.eof else None


def _unzstd(data: bytes, cluster_size: int, host: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:  # data: exactly one frame
            while got <= cluster_size and (part := reader.read(cluster_size + 1 - got)):
                parts.append(part)
                got += len(part)
    except zstandard.ZstdError as err:
        raise InvalidImage(f"corrupt qcow2 image: zstd-compressed cluster at offset {host}: {err}") from err
    if got != cluster_size:
        what = "more than" if got > cluster_size else f"{got} bytes, not"
        raise InvalidImage(f"corrupt qcow2 image: zstd-compressed cluster at offset {host} decompresses to {what} "
                           f"{cluster_size} bytes")
    return b"".join(parts)


def zstd_frame_length(data: bytes) -> int | None:
    """The bytes one zstd frame occupies at the start of data (block headers walked), or None if unclear."""
    try:
        pos = zstandard.frame_header_size(data)
        checksum = zstandard.get_frame_parameters(data).has_checksum
    except zstandard.ZstdError:
        return None
    while pos + 3 <= len(data):
        block = int.from_bytes(data[pos : pos + 3], "little")
        kind, size = (block >> 1) & 3, block >> 3
        if kind == 3:
            return None
        pos += 3 + (1 if kind == 1 else size)  # an RLE block stores one byte
        if block & 1:
            pos += 4 if checksum else 0
            return pos if pos <= len(data) else None
    return None


@dataclass(slots=True)
class _Data:
    """An uncompressed cluster's destination; mask: the subclusters holding data (ALL for a standard entry)."""

    guest: int
    size: int
    mask: int


@dataclass(slots=True)
class _Compressed:
    """A compressed cluster: bytes [host, end) of the file (end rounded to a sector) inflate to one cluster."""

    host: int
    end: int
    guest: int
    size: int
    parts: list[bytes] = field(default_factory=list)
    used_end: int | None = None  # where its compressed bytes really end, once decompressed
    done: bool = False


@dataclass
class StreamStats:
    peak_memory: int = 0  # bytes of clusters that waited in memory for their L2 table
    peak_scratch: int = 0  # bytes that waited in scratch (0: the image streamed without it)
    buffered_clusters: int = 0


class Qcow2Stream:
    """Reads one qcow2 from `reader` (positioned at byte 0) into `writer` at disk offset 0."""

    def __init__(self, header: Header, reader: Reader, writer: SparseWriter, buffer: ClusterBuffer) -> None:
        self._h, self._reader, self._writer, self._buffer = header, reader, writer, buffer
        cs = self._cs = header.cluster_size
        self._size = disk_size(header)
        self._ahead: list[int] = []  # heap of data clusters still ahead: host cluster << GUEST_BITS | disk cluster
        self._masks: dict[int, int] = {}  # disk cluster → its subcluster mask, when not ALL
        self._compressed: dict[int, list[_Compressed]] = {}  # future cluster index → extents overlapping it
        self._tables: dict[int, list[int]] = {}  # future cluster index → the L1 indexes whose L2 table it is
        self._protected = {0}  # header, L1 and L2 clusters: no data may live there
        self._skip: set[int] = set()  # refcount table and blocks: never data, never kept
        l1_bytes = header.l1_needed * 8
        self._l1_range = range(header.l1_offset // cs, (header.l1_offset + l1_bytes - 1) // cs + 1) \
            if l1_bytes else range(0)
        self._l1 = bytearray()
        self._protected.update(self._l1_range)
        self._tables_left = None if l1_bytes else 0  # L2 tables still to pass (None: the L1 has not passed)
        rt_offset, rt_bytes = header.refcount_table_offset, header.refcount_table_clusters * cs
        self._rt_range = range(0)
        if rt_bytes and rt_bytes <= MAX_REFCOUNT_TABLE and rt_offset % cs == 0 and rt_offset >= cs:
            self._rt_range = range(rt_offset // cs, (rt_offset + rt_bytes) // cs)
        self._rt = bytearray()
        self._skip.update(i for i in self._rt_range if i not in self._protected)
        self._index = -1
        self._current = b""
        self._cleared = False
        self.stats = StreamStats()

    @property
    def _all_mapped(self) -> bool:
        return self._tables_left == 0

    def run(self) -> StreamStats:
        if self._writer.zeroes_holes:  # a device: what no cluster writes must read as zeros
            self._writer.zero(0, self._size)
        chunk = max(1, READ_CHUNK // self._cs) * self._cs
        index, end = 0, 0
        chunks = ReadAhead(self._reader, chunk)
        try:
            for data in chunks:
                end += len(data)
                if self._all_mapped and not self._ahead and not self._compressed:
                    index += -(-len(data) // self._cs)
                    continue  # the rest is unused clusters, refcounts or snapshots: read (checksum), not parsed
                self._place(index, data)
                index += -(-len(data) // self._cs)
                if self._all_mapped and not self._cleared:  # nothing kept can be data any more
                    self._buffer.clear()
                    self._cleared = True
        finally:
            chunks.close()
        self._end_of_file(end)
        self.stats.peak_memory, self.stats.peak_scratch = self._buffer.peak_memory, self._buffer.peak_scratch
        self._buffer.close()
        return self.stats

    # -- one cluster as it passes ---------------------------------------------------------------------

    def _place(self, first: int, data: bytes) -> None:
        """The clusters of one chunk; runs of plain data clusters that stay contiguous on the disk go in one write
        (the common case: no per-cluster copy, one pwrite per run)."""
        cs = self._cs
        # One look for a block of zeros in the whole chunk: without one, every run is written straight from the
        # chunk (a view: no copy, no zero test per run); with one, write_at finds the holes run by run.
        dense = memoryview(data) if not has_zero_block(data) else None
        run_guest, run_start, run_end = -1, 0, 0
        for k in range(-(-len(data) // cs)):
            index, start = first + k, k * cs
            if self._ahead and self._ahead[0] >> GUEST_BITS == index and start + cs <= len(data) \
                    and self._single_plain(index):
                guest = (heapq.heappop(self._ahead) & GUEST_MASK) * cs
                if run_end == start and guest == run_guest + run_end - run_start and run_end - run_start < RUN_LIMIT:
                    run_end += cs
                    continue
                if run_end > run_start:
                    self._write_run(run_guest, data, dense, run_start, run_end)
                run_guest, run_start, run_end = guest, start, start + cs
                continue
            if run_end > run_start:
                self._write_run(run_guest, data, dense, run_start, run_end)
                run_start = run_end = 0
            self._process(index, data[start : start + cs])
        if run_end > run_start:
            self._write_run(run_guest, data, dense, run_start, run_end)

    def _write_run(self, guest: int, data: bytes, dense: memoryview | None, start: int, end: int) -> None:
        if dense is not None and end - start >= ZERO_BLOCK:  # shorter runs may still be all zeros: write_at tests
            self._writer.write_dense(guest, dense[start:end])
        else:
            self._writer.write_at(guest, data[start:end])

    def _single_plain(self, index: int) -> bool:
        """Whether the cluster at the top of the heap is one whole data cluster and nothing else: one disk cluster
        maps it, all of it, and it holds no compressed bytes, no table, nothing to read."""
        ahead = self._ahead
        guest = ahead[0] & GUEST_MASK
        for child in (1, 2):  # a second use of the same cluster would be one of the top's children
            if len(ahead) > child and ahead[child] >> GUEST_BITS == index:
                return False
        return guest not in self._masks and (guest + 1) * self._cs <= self._size and index not in self._compressed \
            and index not in self._tables and index not in self._l1_range and index not in self._rt_range

    def _process(self, index: int, data: bytes) -> None:
        self._index, self._current = index, data
        covered: list[tuple[int, int]] = []
        for ext in self._compressed.pop(index, ()):
            self._feed(ext, index, data)
            covered.append(self._covered(ext, index))
        whole = False
        while self._ahead and self._ahead[0] >> GUEST_BITS == index:
            self._write(self._use(heapq.heappop(self._ahead) & GUEST_MASK), data, index * self._cs)
            whole = True
        if index in self._l1_range:
            self._absorb_l1(index, data)
        if index in self._rt_range:
            self._absorb_refcount_table(index, data)
        for l1_index in self._tables.pop(index, ()):
            self._read_table(l1_index, data)
        if not self._all_mapped and not whole and index not in self._protected and index not in self._skip \
                and not _only_zeros_outside(data, covered, index * self._cs):
            self._buffer.put(index, data)
            self.stats.buffered_clusters += 1

    def _covered(self, ext: _Compressed, index: int) -> tuple[int, int]:
        """The bytes of this cluster ext surely owns: to its real end once known, else to the cluster's end."""
        start = index * self._cs
        end = ext.used_end if ext.done and ext.used_end is not None else ext.end
        return max(ext.host, start) - start, min(end, start + self._cs) - start

    def _feed(self, ext: _Compressed, index: int, data: bytes) -> None:
        start = index * self._cs
        ext.parts.append(data[max(ext.host, start) - start : ext.end - start])
        if ext.end <= start + self._cs or len(data) < self._cs:
            self._finish(ext)

    def _finish(self, ext: _Compressed) -> None:
        if ext.done:
            return
        ext.done = True
        raw = b"".join(ext.parts)
        ext.parts = []
        out, used = decompress(raw, self._h.compression_type, self._cs, ext.host)
        ext.used_end = ext.host + used if used is not None else None
        self._writer.write_at(ext.guest, out[: ext.size])

    def _write(self, use: _Data, data: bytes, host: int) -> None:
        if use.mask == ALL:
            if len(data) < use.size:
                raise self._beyond_end(use.guest, host + len(data))
            self._writer.write_at(use.guest, data[: use.size])
            return
        sub = self._cs // SUBCLUSTERS
        i = 0
        while i < SUBCLUSTERS:  # each run of allocated subclusters in one write
            if not use.mask >> i & 1:
                i += 1
                continue
            j = i
            while j < SUBCLUSTERS and use.mask >> j & 1:
                j += 1
            start, stop = i * sub, min(j * sub, use.size)
            if start < stop:
                if len(data) < stop:
                    raise self._beyond_end(use.guest + start, host + len(data))
                self._writer.write_at(use.guest + start, data[start:stop])
            i = j

    # -- tables ---------------------------------------------------------------------------------------

    def _absorb_l1(self, index: int, data: bytes) -> None:
        start = index * self._cs
        first = max(self._h.l1_offset - start, 0)
        self._l1 += data[first : first + self._h.l1_needed * 8 - len(self._l1)]
        if index == self._l1_range[-1]:
            self._read_l1(bytes(self._l1))

    def _read_l1(self, l1: bytes) -> None:
        if len(l1) < self._h.l1_needed * 8:
            raise InvalidImage("qcow2 image is truncated: its L1 table ends beyond the end of the file")
        tables: list[tuple[int, int]] = []
        for l1_index, entry in enumerate(struct.unpack(f">{self._h.l1_needed}Q", l1)):
            offset = entry & OFFSET_MASK
            if not offset:
                continue
            if offset % self._cs:
                raise InvalidImage(f"corrupt qcow2 image: L2 table {l1_index} at offset {offset} is not "
                                   "cluster-aligned")
            cluster = offset // self._cs
            if cluster in self._protected and cluster not in self._tables:
                raise InvalidImage(f"corrupt qcow2 image: L2 table {l1_index} at offset {offset} overlaps the "
                                   "header or the L1 table")
            tables.append((l1_index, cluster))
            if cluster > self._index:
                self._tables.setdefault(cluster, []).append(l1_index)
        self._protected.update(cluster for _, cluster in tables)
        self._tables_left = len(tables)
        for l1_index, cluster in tables:  # tables that passed before the L1: read from the buffer
            if cluster <= self._index:
                data = self._past(cluster)
                if data is None:
                    raise InvalidImage(f"corrupt qcow2 image: L2 table {l1_index} at offset {cluster * self._cs} "
                                       "overlaps the image's refcount table")
                self._buffer.discard(cluster)
                self._read_table(l1_index, data)

    def _read_table(self, l1_index: int, table: bytes) -> None:
        """Register (or, for clusters that passed already, write) every cluster one L2 table maps."""
        h, cs = self._h, self._cs
        if len(table) < cs:
            raise InvalidImage(f"qcow2 image is truncated: L2 table {l1_index} ends beyond the end of the file")
        base = l1_index * h.l2_span
        count = min(h.l2_entries, -(-(self._size - base) // cs))
        words = struct.unpack_from(f">{count * (2 if h.extended_l2 else 1)}Q", table)
        offset_bits = 62 - (h.cluster_bits - 8)  # compressed entries: host offset below, sector count above
        for i in range(count):
            entry = words[2 * i] if h.extended_l2 else words[i]
            guest = base + i * cs
            size = min(cs, self._size - guest)
            if entry & COMPRESSED:
                host = entry & ((1 << offset_bits) - 1)
                sectors = ((entry >> offset_bits) & ((1 << (h.cluster_bits - 8)) - 1)) + 1
                self._add_compressed(_Compressed(host, (host // SECTOR + sectors) * SECTOR, guest, size))
                continue
            host = entry & OFFSET_MASK
            if entry & L2_RESERVED or host % cs:
                raise InvalidImage(f"corrupt qcow2 image: L2 entry {entry:#018x} for disk offset {guest}")
            if h.extended_l2:
                bitmap = words[2 * i + 1]
                allocated, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
                if allocated & zero or (allocated and not host):
                    raise InvalidImage(f"corrupt qcow2 image: subcluster bitmap {bitmap:#018x} for disk offset "
                                       f"{guest}")
                mask = allocated
            else:
                mask = 0 if h.version >= 3 and entry & ZERO else ALL
            if host and mask:
                self._add_data(host // cs, guest // cs, mask)
        self._tables_left = (self._tables_left or 0) - 1

    def _absorb_refcount_table(self, index: int, data: bytes) -> None:
        self._rt += data
        if index != self._rt_range[-1] or len(data) < self._cs:
            return  # not whole yet (or cut short by the end of the file: then it is not needed either)
        for entry in struct.unpack(f">{len(self._rt) // 8}Q", self._rt):
            block = entry & ~0x1FF
            if block and block % self._cs == 0 and block // self._cs not in self._protected:
                self._skip.add(block // self._cs)
                self._buffer.discard(block // self._cs)  # one that passed already is no data either
        self._rt = bytearray()

    # -- where a mapped cluster's bytes are ----------------------------------------------------------

    def _past(self, cluster: int) -> bytes | None:
        return self._current if cluster == self._index else self._buffer.get(cluster)

    def _use(self, guest_cluster: int) -> _Data:
        guest = guest_cluster * self._cs
        return _Data(guest, min(self._cs, self._size - guest), self._masks.pop(guest_cluster, ALL))

    def _add_data(self, cluster: int, guest_cluster: int, mask: int) -> None:
        if cluster in self._protected:
            raise InvalidImage(f"corrupt qcow2 image: the data of disk offset {guest_cluster * self._cs} at offset "
                               f"{cluster * self._cs} overlaps the image's header or tables")
        if cluster > self._index:
            heapq.heappush(self._ahead, cluster << GUEST_BITS | guest_cluster)
            if mask != ALL:
                self._masks[guest_cluster] = mask
            return
        if mask != ALL:
            self._masks[guest_cluster] = mask
        use = self._use(guest_cluster)
        data = self._past(cluster)
        if data is None:
            raise self._not_kept(use.guest, cluster * self._cs)
        self._write(use, data, cluster * self._cs)

    def _add_compressed(self, ext: _Compressed) -> None:
        cs = self._cs
        first, last = ext.host // cs, (ext.end - 1) // cs
        if first in self._protected:
            raise InvalidImage(f"corrupt qcow2 image: the compressed data of disk offset {ext.guest} at offset "
                               f"{ext.host} overlaps the image's header or tables")
        for cluster in range(first, min(last, self._index) + 1):  # the part that passed already
            data = self._past(cluster)
            if data is None:
                if cluster == first:
                    raise self._not_kept(ext.guest, ext.host)
                ext.end = cluster * cs  # the stream ended inside the sectors: what precedes must suffice
                break
            start = cluster * cs
            ext.parts.append(data[max(ext.host, start) - start : ext.end - start])
        if ext.end > (self._index + 1) * cs:
            for cluster in range(max(first, self._index + 1), last + 1):
                self._compressed.setdefault(cluster, []).append(ext)
        else:
            self._finish(ext)

    # -- the end ----------------------------------------------------------------------------------------

    def _end_of_file(self, size: int) -> None:
        if self._tables_left is None:
            raise InvalidImage(f"qcow2 image is truncated: its L1 table at offset {self._h.l1_offset} lies beyond "
                               f"the end of the file ({size} bytes)")
        for cluster, l1_indexes in sorted(self._tables.items()):
            raise InvalidImage(f"qcow2 image is truncated: L2 table {l1_indexes[0]} at offset {cluster * self._cs} "
                               f"lies beyond the end of the file ({size} bytes)")
        for cluster in sorted(self._compressed):
            for ext in self._compressed[cluster]:
                if ext.host >= size:
                    raise self._beyond_end(ext.guest, size)
                self._finish(ext)  # sectors rounded past the end of the file: the stream ends before
        if self._ahead:
            raise self._beyond_end((self._ahead[0] & GUEST_MASK) * self._cs, size)

    @staticmethod
    def _beyond_end(guest: int, size: int) -> InvalidImage:
        return InvalidImage(f"qcow2 image is truncated: data for disk offset {guest} lies beyond the end of the file "
                            f"({size} bytes)")

    @staticmethod
    def _not_kept(guest: int, host: int) -> InvalidImage:
        return InvalidImage(f"corrupt qcow2 image: the data of disk offset {guest} at offset {host} is also used as "
                            "other data or metadata")


def _only_zeros_outside(data: bytes, covered: list[tuple[int, int]], start: int) -> bool:
    """Whether every byte of the cluster outside the covered ranges (cluster-relative) is zero."""
    if not covered:
        return False  # nothing known about it: the buffer decides (all-zero clusters cost it nothing)
    pos = 0
    for lo, hi in sorted(covered):
        if lo > pos and data.count(0, pos, lo) != lo - pos:
            return False
        pos = max(pos, hi)
    return pos >= len(data) or data.count(0, pos) == len(data) - pos
