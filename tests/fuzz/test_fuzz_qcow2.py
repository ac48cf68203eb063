"""Our qcow2 reader (importer/qcow2.py, importer/formats.py check_header): the header and the L1/L2 tables of an
image from the network. Any bytes give a header or InvalidImage, any tables give segments inside the file or
InvalidImage; an image qemu-img builds reads back as exactly the disk it was made from."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzzkit import fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from importer import qcow2
from importer.errors import InvalidImage
from importer.formats import check_header
from importer.qcow2 import MAGIC, Header, Segment, l2_tables, map_table, parse_header, unsupported
from importer.qcow2_import import inflate

KiB, MiB = 1024, 1024 * 1024


def segments_of(image: bytes, header: Header) -> Iterator[tuple[int, Segment]]:
    """Every segment the tables map, read the way the importer reads them; raises InvalidImage."""
    l1 = image[header.l1_offset : header.l1_offset + header.l1_size * 8]
    for index, table in enumerate(l2_tables(header, l1, len(image))):
        if table:
            for segment in map_table(header, index, image[table : table + header.cluster_size], len(image)):
                yield index, segment


def check_segments(image: bytes, header: Header) -> list[Segment]:
    """The invariants any accepted table must keep: inside the file, inside the disk, in order, no overlap."""
    found = []
    last_end = 0
    for index, seg in segments_of(image, header):
        assert seg.host >= 0 and seg.host_end <= len(image), (seg, len(image))
        assert index * header.l2_span <= seg.guest < (index + 1) * header.l2_span, (index, seg)
        assert seg.guest >= last_end and seg.guest + seg.size <= header.virtual_size, (seg, last_end)
        assert seg.guest % header.cluster_size == 0 and seg.size > 0
        if not seg.compressed:
            assert seg.length == seg.size and seg.host % header.cluster_size == 0
        last_end = seg.guest + seg.size
        found.append(seg)
    return found


def read_disk(image: bytes) -> bytes:
    header = parse_header(image[:512])
    assert unsupported(header) is None, unsupported(header)
    disk = bytearray(header.virtual_size)
    for seg in check_segments(image, header):
        data = image[seg.host : seg.host_end]
        if seg.compressed:
            data = inflate(data, seg, header.cluster_size)
        disk[seg.guest : seg.guest + seg.size] = data[: seg.size]
    return bytes(disk)


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def build(folder: Path, disk: bytes, cluster: int, compressed: bool, version: str = "1.1") -> bytes:
    """A qcow2 of `disk` as qemu-img writes it (zero clusters stay unallocated)."""
    raw, image = folder / "disk.raw", folder / "disk.qcow2"
    raw.write_bytes(disk)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compressed else []),
             "-o", f"cluster_size={cluster},compat={version}", raw, image)
    data = image.read_bytes()
    raw.unlink()
    image.unlink()
    return data


@st.composite
def disks(draw: st.DrawFn) -> bytes:
    """A small disk: zeros with a few runs of data at cluster-ish and odd offsets."""
    size = draw(st.integers(1, 96)) * 16 * KiB - draw(st.sampled_from([0, 0, 512, 4096]))
    disk = bytearray(size)
    for _ in range(draw(st.integers(0, 5))):
        start = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(size - start, 80 * KiB)))
        pattern = draw(st.binary(min_size=1, max_size=64)).replace(b"\0", b"\1")
        disk[start : start + length] = (pattern * (length // len(pattern) + 1))[:length]
    return bytes(disk)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qcow2")


@pytest.fixture(scope="module")
def sample(folder: Path) -> bytes:
    """One real image with data and compressed clusters, for mutation."""
    disk = bytes((i * 7) % 253 for i in range(256 * KiB)) + bytes(256 * KiB) + b"\x01" * (64 * KiB)
    return build(folder, disk, 4096, compressed=False)


# --- any bytes ---------------------------------------------------------------------------------------------
@fuzz(500)
@given(st.one_of(st.binary(max_size=600), st.binary(min_size=68, max_size=600).map(lambda b: MAGIC + b)))
def test_any_header_bytes_parse_or_are_invalid_image(data: bytes) -> None:
    try:
        header = parse_header(data)
    except InvalidImage:
        return
    assert data[:4] == MAGIC and header.version == struct.unpack_from(">I", data, 4)[0]
    reason = unsupported(header)  # must not raise either
    assert reason is None or isinstance(reason, str)
    try:
        check_header("qcow2", data)
    except InvalidImage as err:
        assert str(err)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    """Headers our reader accepts (unsupported() is None), with small tables so the test stays quick."""
    cluster_bits = draw(st.integers(9, 16))
    cluster = 1 << cluster_bits
    virtual_size = draw(st.integers(1, 64 * (cluster // 8) * cluster))
    l2_span = (cluster // 8) * cluster
    l1_needed = -(-virtual_size // l2_span)
    return Header(draw(st.sampled_from([2, 3])), 0, cluster_bits, virtual_size, 0,
                  l1_needed + draw(st.integers(0, 3)), draw(st.integers(0, 4)) * cluster,
                  draw(st.sampled_from([0, qcow2.INCOMPAT_DIRTY])), 0)


@fuzz(300)
@given(headers(), st.binary(max_size=8 * 70), st.binary(max_size=4096), st.integers(0, 1 << 40))
def test_any_tables_map_inside_the_file_or_are_invalid_image(header: Header, l1: bytes, table: bytes,
                                                             file_size: int) -> None:
    assert unsupported(header) is None
    try:
        offsets = l2_tables(header, l1, file_size)
    except InvalidImage:
        offsets = []
    for offset in offsets:
        assert offset == 0 or (offset % header.cluster_size == 0 and offset + header.cluster_size <= file_size)
    table = table.ljust(header.cluster_size, b"\0")[: header.cluster_size]
    for index in range(min(header.l1_needed, 3)):
        try:
            segments = map_table(header, index, table, file_size)
        except InvalidImage:
            continue
        for seg in segments:
            assert seg.host < file_size and seg.host_end <= file_size, (seg, file_size)
            assert seg.guest >= 0 and seg.guest + seg.size <= header.virtual_size


# --- real images -------------------------------------------------------------------------------------------
@fuzz(25)
@given(disks(), st.sampled_from([512, 4096, 65536]), st.booleans(), st.sampled_from(["0.10", "1.1"]))
def test_images_qemu_img_builds_read_back_to_their_disk(folder: Path, disk: bytes, cluster: int, compressed: bool,
                                                        version: str) -> None:
    image = build(folder, disk, cluster, compressed, version)
    header = parse_header(image[:512])
    assert header.virtual_size == len(disk) and header.cluster_size == cluster
    assert header.version == (2 if version == "0.10" else 3)
    check_header("qcow2", image[:512])
    assert read_disk(image) == disk


@fuzz(300)
@given(st.lists(st.tuples(st.integers(0, 3 * 4096 + 511), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 2))
def test_mutated_images_read_inside_the_file_or_are_invalid_image(sample: bytes, flips: list[tuple[int, int]],
                                                                  truncate: int) -> None:
    """Bytes of the header, the L1 table, the refcounts and the first L2 table changed; the file maybe cut."""
    image = bytearray(sample)
    for offset, value in flips:
        image[offset] = value
    if truncate:
        del image[len(image) * (3 - truncate) // 3 :]
    data = bytes(image)
    try:
        header = parse_header(data[:512])
        check_header("qcow2", data[:512])
    except InvalidImage:
        event("header refused")
        return
    if unsupported(header) is not None:
        event("left to qemu-img")
        return
    try:
        check_segments(data, header)
        event("tables read")
    except InvalidImage as err:
        event("tables refused")
        assert str(err)


def test_the_sample_is_a_real_image(sample: bytes) -> None:
    """The mutation test starts from an image our reader reads, or it would only test the first refusal."""
    assert read_disk(sample)[:4] == bytes([0, 7, 14, 21])
