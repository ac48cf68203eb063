"""The qcow2 layout read by us: header, L1/L2 tables, and which bytes of the file make which bytes of the disk.

Reading the tables ourselves lets the importer fetch a qcow2 over HTTP the way a download manager would (few
large Range requests, several at once) instead of through qemu-img's one-cluster-at-a-time reads. Field offsets,
flags and limits are those of qemu's docs/interop/qcow2.txt. Anything this module does not handle (extended L2
entries, zstd-compressed clusters, feature bits it does not know) is left to qemu-img: `unsupported()` says why.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from importer.errors import InvalidImage

MAGIC = b"QFI\xfb"
HEADER_V2_LENGTH = 72
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55 of an L1 entry or a standard L2 entry
L2_RESERVED = 0x3F000000000001FE  # bits 1-8 and 56-61 of a standard L2 entry: must be zero
COMPRESSED = 1 << 62
ZERO = 1  # bit 0 of a standard L2 entry (version 3): the cluster reads as zeros
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21  # qemu's limits: 512 B to 2 MiB clusters
MAX_L1_BYTES = 32 * 1024 * 1024  # qemu's QCOW_MAX_L1_SIZE
SECTOR = 512


@dataclass(frozen=True)
class Header:
    version: int
    backing_file_offset: int
    cluster_bits: int
    virtual_size: int
    crypt_method: int
    l1_size: int
    l1_offset: int
    incompatible: int
    compression_type: int
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """128-bit L2 entries: a standard descriptor and a bitmap of 32 subclusters."""
        return bool(self.incompatible & INCOMPAT_EXTENDED_L2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def l2_span(self) -> int:
        """Disk bytes one L2 table maps."""
        return self.l2_entries * self.cluster_size

    @property
    def l1_needed(self) -> int:
        return -(-self.virtual_size // self.l2_span)


def parse_header(data: bytes) -> Header:
    """The fixed header fields (big-endian); raises InvalidImage when they cannot describe a readable image."""
    if len(data) < HEADER_V2_LENGTH or data[:4] != MAGIC:
        raise InvalidImage("truncated or malformed qcow2 header")
    version, backing_offset, _backing_size, cluster_bits, virtual_size, crypt_method, l1_size, l1_offset = (
        struct.unpack_from(">IQIIQIIQ", data, 4)
    )
    refcount_table_offset, refcount_table_clusters = struct.unpack_from(">QI", data, 48)
    incompatible, compression_type = 0, 0
    if version >= 3 and len(data) >= 80:
        (incompatible,) = struct.unpack_from(">Q", data, 72)
        (header_length,) = struct.unpack_from(">I", data, 100) if len(data) >= 104 else (0,)
        if incompatible & INCOMPAT_COMPRESSION and header_length > 104 and len(data) > 104:
            compression_type = data[104]
    return Header(version, backing_offset, cluster_bits, virtual_size, crypt_method, l1_size, l1_offset,
                  incompatible, compression_type, refcount_table_offset, refcount_table_clusters)


def unsupported(header: Header) -> str | None:
    """Why our reader leaves this image to qemu-img (which also gives the better error), or None."""
    if header.version not in (2, 3):
        return f"qcow2 version {header.version}"
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        return f"cluster_bits {header.cluster_bits}"
    if header.incompatible & INCOMPAT_EXTENDED_L2:
        return "extended L2 entries (subclusters)"
    if header.incompatible & INCOMPAT_COMPRESSION and header.compression_type != 0:
        return f"compression type {header.compression_type} (zstd)"
    others = header.incompatible & ~(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION)
    if others:
        return f"incompatible feature bits {others:#x}"
    if header.backing_file_offset or header.crypt_method:
        return "a backing file or encryption"  # refused earlier by check_header; never read by us
    if header.l1_size < header.l1_needed or header.l1_size * 8 > MAX_L1_BYTES:
        return f"an L1 table of {header.l1_size} entries for {header.virtual_size} bytes"
    if header.l1_offset % header.cluster_size:
        return "an unaligned L1 table"
    return None


@dataclass(frozen=True)
class Segment:
    """Bytes [host, host + length) of the file that become disk bytes [guest, guest + size)."""

    host: int
    length: int
    guest: int
    size: int
    compressed: bool = False

    @property
    def host_end(self) -> int:
        return self.host + self.length


def l2_tables(header: Header, l1: bytes, file_size: int) -> list[int]:
    """The L2 table offset of each L1 entry the disk needs (0: that span is unallocated, reads as zeros)."""
    count = header.l1_needed
    if len(l1) < count * 8:
        raise InvalidImage("qcow2 image is truncated: its L1 table ends beyond the end of the file")
    tables = []
    for index, entry in enumerate(struct.unpack_from(f">{count}Q", l1)):
        offset = entry & OFFSET_MASK
        if offset and (offset % header.cluster_size or offset + header.cluster_size > file_size):
            where = "is not cluster-aligned" if offset % header.cluster_size else "lies beyond the end of the file"
            raise InvalidImage(f"corrupt qcow2 image: L2 table {index} at offset {offset} {where}")
        tables.append(offset)
    return tables


def map_table(header: Header, index: int, table: bytes, file_size: int) -> list[Segment]:
    """The segments one L2 table maps, in disk order, contiguous clusters merged; zero/unallocated are omitted."""
    cluster = header.cluster_size
    base = index * header.l2_span
    count = min(header.l2_entries, -(-(header.virtual_size - base) // cluster))
    offset_bits = 62 - (header.cluster_bits - 8)  # compressed entries: offset below, sector count above
    offset_mask = (1 << offset_bits) - 1
    segments: list[Segment] = []
    run_host = run_guest = run_len = 0
    for i, entry in enumerate(struct.unpack_from(f">{count}Q", table)):
        guest = base + i * cluster
        size = min(cluster, header.virtual_size - guest)
        if entry & COMPRESSED:
            host = entry & offset_mask
            sectors = ((entry >> offset_bits) & ((1 << (header.cluster_bits - 8)) - 1)) + 1
            length = sectors * SECTOR - host % SECTOR
            if host >= file_size:
                raise InvalidImage(f"qcow2 image is truncated: compressed cluster at offset {host} lies beyond "
                                   f"the end of the file ({file_size} bytes)")
            if run_len:
                segments.append(Segment(run_host, run_len, run_guest, run_len))
                run_len = 0
            # The sector count may round past the end of the file; the deflate stream itself ends before.
            segments.append(Segment(host, min(length, file_size - host), guest, size, compressed=True))
            continue
        host = entry & OFFSET_MASK
        if entry & L2_RESERVED or (host and host % cluster):
            raise InvalidImage(f"corrupt qcow2 image: L2 entry {entry:#018x} for disk offset {guest}")
        if (header.version >= 3 and entry & ZERO) or not host:
            continue  # reads as zeros: a hole in the target
        if host + size > file_size:
            raise InvalidImage(f"qcow2 image is truncated: data for disk offset {guest} lies beyond the end of "
                               f"the file ({file_size} bytes)")
        if run_len and host == run_host + run_len and guest == run_guest + run_len:
            run_len += size
            continue
        if run_len:
            segments.append(Segment(run_host, run_len, run_guest, run_len))
        run_host, run_guest, run_len = host, guest, size
    if run_len:
        segments.append(Segment(run_host, run_len, run_guest, run_len))
    return segments
