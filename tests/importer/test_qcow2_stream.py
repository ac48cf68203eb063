"""The streaming qcow2 reader (importer/qcow2_stream.py): every image qemu-img makes, read once in order through
the real import phases (an upload source: never seekable), must equal `qemu-img convert -O raw` byte for byte;
out-of-order images fall back to scratch or fail naming the bound; hostile images are refused or imported
exactly as qemu-img reads them, never outside the disk."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from imageserver import ImageServer
from impkit import Images, MiB, compare, run

from importer import cli, qcow2
from importer.errors import ImageTooLarge, InvalidImage, ScratchSpaceRequired
from importer.processor import ImportProcessor, ImportRequest, ImportResult, Route
from importer.qcow2_stream_buffer import ClusterBuffer
from importer.sources.upload import UploadSource
from importer.target import open_target

KiB = 1024
VIRTUAL = 6 * MiB
VOLUME = 8 * MiB


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 MiB: 1 MiB random, a 70 KiB unaligned random run, a 512 KiB pattern, holes elsewhere."""
    path = tmp_path_factory.mktemp("qcow2-stream") / "data.raw"
    rnd = (hashlib.sha256(str(i).encode()).digest() for i in range(64 * KiB))
    blob = b"".join(rnd)
    with path.open("wb") as f:
        f.truncate(VIRTUAL)
        f.write(blob[:MiB])
        f.seek(2 * MiB + 3 * 4096 + 100)
        f.write(blob[MiB : MiB + 70 * KiB])
        f.seek(5 * MiB)
        f.write(b"\x5a" * (512 * KiB))
    return path


def converted(data: Path, name: str, *opts: str) -> Path:
    out = data.with_name(f"{name}.qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, data, out)
    return out


def written(data: Path, name: str, create: list[str], *writes: str, size: int = VIRTUAL) -> Path:
    """An image a guest wrote to over time: qemu-img create, then qemu-io commands in order."""
    out = data.with_name(f"{name}.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", *create, out, str(size))
    for command in writes:
        if command.startswith("snapshot "):
            run("qemu-img", "snapshot", "-c", command.split()[1], out)
        else:
            run("qemu-io", "-f", "qcow2", "-c", command, out)
    return out


def reference(image: Path) -> Path:
    ref = image.with_suffix(".ref.raw")
    run("qemu-img", "convert", "-O", "raw", image, ref)
    return ref


def stream_import(image: Path, dest: Path, scratch: Path | None = None, memory: int | None = None) -> ImportResult:
    """The import of an upload: read once, in order, through the real phases."""
    extra = {} if memory is None else {"qcow2_stream_memory": memory}
    with image.open("rb") as body:
        request = ImportRequest(source=UploadSource(body, image.stat().st_size), target=open_target(dest),
                                image_size=VOLUME, filesystem_overhead=0.0, scratch_dir=scratch, **extra)
        return ImportProcessor(request).run()


def assert_exact(image: Path, disk: Path) -> None:
    """qemu-img compare and a sha256 of the disk's first virtual-size bytes against qemu-img's raw output."""
    ref = reference(image)
    assert compare(ref, disk).returncode == 0
    size = ref.stat().st_size
    with disk.open("rb") as f:
        assert hashlib.sha256(f.read(size)).hexdigest() == hashlib.sha256(ref.read_bytes()).hexdigest()
        assert f.read().count(0) == disk.stat().st_size - size  # nothing past the virtual size


def preallocated(data: Path, mode: str) -> Path:
    return written(data, f"pre-{mode}", ["-o", f"preallocation={mode}"], "write -P 0x11 1M 64k", "write -z 2M 128k",
                   "write -P 0x22 4100k 3k")


def qemu_made(data: Path) -> dict[str, Callable[[], Path]]:
    c = converted
    return {
        "clusters-512": lambda: c(data, "c512", "-o", "cluster_size=512"),
        "clusters-4k": lambda: c(data, "c4k", "-o", "cluster_size=4096"),
        "clusters-64k": lambda: c(data, "c64k"),
        "clusters-2M": lambda: c(data, "c2m", "-o", "cluster_size=2M"),
        "zlib": lambda: c(data, "zlib", "-c", "-o", "compression_type=zlib"),
        "zlib-512": lambda: c(data, "zlib512", "-c", "-o", "cluster_size=512"),
        "zlib-2M": lambda: c(data, "zlib2m", "-c", "-o", "cluster_size=2M"),
        "zstd": lambda: c(data, "zstd", "-c", "-o", "compression_type=zstd"),
        "zstd-4k": lambda: c(data, "zstd4k", "-c", "-o", "compression_type=zstd,cluster_size=4096"),
        "extended-l2": lambda: c(data, "ext", "-o", "extended_l2=on"),
        "extended-l2-zstd": lambda: c(data, "extz", "-c", "-o", "extended_l2=on,compression_type=zstd"),
        "compat-0.10": lambda: c(data, "v2", "-o", "compat=0.10"),
        "compat-0.10-zlib": lambda: c(data, "v2c", "-c", "-o", "compat=0.10"),
        "prealloc-metadata": lambda: preallocated(data, "metadata"),
        "prealloc-falloc": lambda: preallocated(data, "falloc"),
        "prealloc-full": lambda: preallocated(data, "full"),
        "subclusters": lambda: written(data, "sub", ["-o", "extended_l2=on"], "write -P 0x33 0 4k",
                                       "write -P 0x44 70k 2k", "write -z 1M 64k", "write -P 0x55 3M 100k",
                                       "write -z 3M 8k"),
        "zero-clusters-v3": lambda: written(data, "zeros", [], "write -P 0x66 0 2M", "write -z 512k 1M"),
        "snapshots": lambda: written(data, "snaps", ["-o", "cluster_size=4096"], "write -P 0x77 0 1M",
                                     "snapshot one", "write -P 0x78 2M 64k", "snapshot two", "write -P 0x79 4M 8k"),
    }


CASES = list(qemu_made(Path("/nonexistent")))


@pytest.mark.parametrize("case", CASES)
def test_every_image_qemu_img_makes_streams_exactly(case: str, data: Path, dest: Path) -> None:
    image = qemu_made(data)[case]()
    result = stream_import(image, dest)
    assert (result.route, result.fmt, result.reader) == (Route.STREAM, "qcow2", "qcow2-stream")
    assert not result.scratch_used and result.scratch_bytes == 0
    assert result.virtual_size == VIRTUAL
    assert_exact(image, dest / "disk.img")


def out_of_order(data: Path) -> Path:
    """Random writes, then a snapshot and writes that copy every L2 table to the end: all data comes first."""
    writes = [f"write -P {0x10 + i} {(i * 739) % 5000}k 12k" for i in range(40)]
    return written(data, "ooo", ["-o", "cluster_size=4096"], *writes, "snapshot s", "write -P 0xAB 100k 4k",
                   "write -P 0xAC 2100k 4k", "write -P 0xAD 4100k 4k")


def test_out_of_order_image_falls_back_to_scratch(data: Path, dest: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    image = out_of_order(data)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = stream_import(image, dest, scratch, memory=64 * KiB)
    assert result.scratch_used and result.scratch_bytes > 0
    assert "falling back to scratch" in caplog.text and "65536 bytes of memory" in caplog.text
    assert_exact(image, dest / "disk.img")
    assert list(scratch.iterdir()) == []  # the spill file had no name and is gone


def test_out_of_order_image_in_memory(data: Path, dest: Path) -> None:
    image = out_of_order(data)
    result = stream_import(image, dest)  # the default bound holds it
    assert not result.scratch_used
    assert_exact(image, dest / "disk.img")


def test_out_of_order_image_without_scratch_names_the_bound(data: Path, dest: Path) -> None:
    image = out_of_order(data)
    with pytest.raises(ScratchSpaceRequired, match="more than 65536 bytes \\(the in-memory bound\\)"):
        stream_import(image, dest, memory=64 * KiB)
    assert list(dest.iterdir()) == []


# -- hostile images: crafted from real ones -----------------------------------------------------------------

def tables(image: bytes) -> tuple[qcow2.Header, list[int]]:
    header = qcow2.parse_header(image)
    l1 = struct.unpack_from(f">{header.l1_needed}Q", image, header.l1_offset)
    return header, [entry & qcow2.OFFSET_MASK for entry in l1]


def patched(image: Path, out: Path, patch: Callable[[bytearray, qcow2.Header, list[int]], None]) -> Path:
    raw = bytearray(image.read_bytes())
    header, l2 = tables(bytes(raw))
    patch(raw, header, l2)
    out.write_bytes(raw)
    return out


def set_u64(raw: bytearray, offset: int, value: int) -> None:
    struct.pack_into(">Q", raw, offset, value)


HOSTILE: dict[str, tuple[Callable[[bytearray, qcow2.Header, list[int]], None], str]] = {
    "l2-entry-past-the-end": (lambda raw, h, l2: set_u64(raw, l2[0], (len(raw) + 5 * h.cluster_size)
                                                         | (1 << 63)), "lies beyond the end of the file"),
    "data-on-the-l1-table": (lambda raw, h, l2: set_u64(raw, l2[0], h.l1_offset | (1 << 63)),
                             "overlaps the image's header or tables"),
    "data-on-its-own-l2-table": (lambda raw, h, l2: set_u64(raw, l2[0] + 8, l2[0] | (1 << 63)),
                                 "overlaps the image's header or tables"),
    "l2-table-on-the-l1-table": (lambda raw, h, l2: set_u64(raw, h.l1_offset, h.l1_offset),
                               "overlaps the header or the L1 table"),
    "l1-table-on-the-header": (lambda raw, h, l2: set_u64(raw, 40, 0), "overlaps the header"),
    "l2-table-on-the-refcount-table": (lambda raw, h, l2: set_u64(raw, h.l1_offset, h.refcount_table_offset),
                                       "refcount table"),
    "unaligned-l2-table": (lambda raw, h, l2: set_u64(raw, h.l1_offset, l2[0] + 512), "not cluster-aligned"),
    "reserved-l2-bits": (lambda raw, h, l2: set_u64(raw, l2[0], struct.unpack_from(">Q", raw, l2[0])[0] | 2),
                         "corrupt qcow2 image: L2 entry"),
    "l2-table-past-the-end": (lambda raw, h, l2: set_u64(raw, h.l1_offset, len(raw) * 4),
                              "L2 table 0 at offset"),
    "unknown-feature": (lambda raw, h, l2: set_u64(raw, 72, 1 << 9), "unknown incompatible feature bits 0x200"),
    "huge-l1": (lambda raw, h, l2: set_u64(raw, 24, 1 << 60), "L1 table of"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_images_are_refused_and_leave_no_trace(case: str, data: Path, dest: Path) -> None:
    patch, message = HOSTILE[case]
    image = patched(converted(data, "hostile-base"), data.with_name(f"{case}.qcow2"), patch)
    with pytest.raises(InvalidImage, match=message) as caught:
        stream_import(image, dest)
    assert not isinstance(caught.value, ImageTooLarge) or case == "huge-l1"
    assert list(dest.iterdir()) == []


def test_l2_entries_past_the_virtual_size_are_ignored(data: Path, dest: Path, tmp_path: Path) -> None:
    """A table's entries beyond the disk's end map nothing: qemu-img ignores them, so do we (no write past it)."""
    image = written(data, "short", [], "write -P 0x12 0 64k", size=VIRTUAL + 4 * KiB)

    def patch(raw: bytearray, h: qcow2.Header, l2: list[int]) -> None:
        count = -(-h.virtual_size // h.cluster_size)
        for i in range(count, count + 20):  # point them at the data of entry 0
            raw[l2[0] + 8 * i : l2[0] + 8 * i + 8] = raw[l2[0] : l2[0] + 8]

    bad = patched(image, tmp_path / "past-size.qcow2", patch)
    result = stream_import(bad, dest)
    assert result.virtual_size == VIRTUAL + 4 * KiB
    assert_exact(bad, dest / "disk.img")


def compressed_image(data: Path, kind: str, payload: bytes) -> Path:
    """A -c image whose disk cluster 0 becomes a compressed cluster holding payload (appended to the file)."""
    image = converted(data, f"bomb-{kind}", "-c", "-o", f"compression_type={kind}")

    def patch(raw: bytearray, h: qcow2.Header, l2: list[int]) -> None:
        host = len(raw) + (-len(raw) % h.cluster_size)
        raw.extend(bytes(host - len(raw)) + payload)
        offset_bits = 62 - (h.cluster_bits - 8)
        sectors = -(-len(payload) // 512)
        set_u64(raw, l2[0], qcow2.COMPRESSED | (sectors - 1) << offset_bits | host)

    return patched(image, data.with_name(f"bomb-{kind}-patched.qcow2"), patch)


def test_zlib_cluster_inflating_past_its_size_is_cut_as_qemu_does(data: Path, dest: Path) -> None:
    deflate = zlib.compressobj(9, zlib.DEFLATED, -12)
    image = compressed_image(data, "zlib", deflate.compress(b"\x42" * 64 * KiB + b"\x43" * 4 * MiB) + deflate.flush())
    stream_import(image, dest)
    assert_exact(image, dest / "disk.img")  # qemu-img keeps the first cluster's worth: so do we


def test_zstd_cluster_inflating_past_its_size_is_refused(data: Path, dest: Path) -> None:
    image = compressed_image(data, "zstd", zstandard.ZstdCompressor().compress(b"\x42" * 4 * MiB))
    with pytest.raises(InvalidImage, match="decompresses to more than 65536 bytes"):
        stream_import(image, dest)
    assert list(dest.iterdir()) == []
    qemu = subprocess.run(["qemu-img", "convert", "-O", "raw", image, str(image.with_suffix(".raw"))],
                          capture_output=True, check=False)
    assert qemu.returncode != 0  # qemu-img refuses it too


def test_invalid_subcluster_bitmap_is_refused(data: Path, dest: Path, tmp_path: Path) -> None:
    image = written(data, "bitmap", ["-o", "extended_l2=on"], "write -P 0x21 0 4k")

    def patch(raw: bytearray, h: qcow2.Header, l2: list[int]) -> None:
        set_u64(raw, l2[0] + 8, 1 | (1 << 32))  # subcluster 0 both allocated and zero

    with pytest.raises(InvalidImage, match="subcluster bitmap"):
        stream_import(patched(image, tmp_path / "bitmap-bad.qcow2", patch), dest)
    assert list(dest.iterdir()) == []


def test_truncated_image_is_refused(data: Path, dest: Path, tmp_path: Path) -> None:
    image = converted(data, "whole")
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(InvalidImage, match="truncated"):
        stream_import(cut, dest)
    assert list(dest.iterdir()) == []


# -- every stream route, end to end ------------------------------------------------------------------------------

def cli_import(url: str, dest: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    rc = cli.main(["import", "--no-progress", "--endpoint", url, "--dest", str(dest), "--image-size", "16Mi",
                   *extra], env={})
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.mark.parametrize("name", ["qcow2.gzip", "qcow2.xz", "qcow2.zstd", "qcow2.gzip.xz"])
def test_compressed_qcow2_over_http_needs_no_scratch(name: str, images: Images, server: ImageServer, dest: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = cli_import(server.url(f"/img/{name}"), dest, capsys)
    assert "route stream" in out and "qcow2-stream reader" in out and "via scratch" not in out, out
    assert compare(images.references[name], dest / "disk.img").returncode == 0


def test_qcow2_from_a_server_without_range_needs_no_scratch(images: Images, server: ImageServer, dest: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = cli_import(server.url("/norange/qcow2c"), dest, capsys)
    assert "route stream" in out and "qcow2-stream reader" in out, out
    assert compare(images.references["qcow2c"], dest / "disk.img").returncode == 0


def test_out_of_order_upload_says_it_fell_back(data: Path, tmp_path: Path, dest: Path) -> None:
    """The termination message of a fallback names scratch; the log says why."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = stream_import(out_of_order(data), dest, scratch, memory=16 * KiB)
    summary = cli.summary(result, "upload")
    assert "via scratch" in summary and "qcow2-stream reader" in summary, summary
    assert os.listdir(scratch) == []


# -- the buffer on its own ------------------------------------------------------------------------------------

def test_buffer_keeps_zero_clusters_for_free_and_spills_past_its_bound(tmp_path: Path) -> None:
    spilled: list[bool] = []
    buffer = ClusterBuffer(4096, memory_limit=8192, scratch_dir=tmp_path, on_spill=lambda: spilled.append(True))
    try:
        for index in range(100):
            buffer.put(index, bytes(4096))  # all-zero: a run, no memory
        assert buffer.peak_memory == 0 and buffer.get(57) == bytes(4096)
        for index in range(100, 104):
            buffer.put(index, bytes([index]) * 4096)
        assert buffer.peak_memory == 8192 and buffer.peak_scratch == 2 * 4096 and spilled == [True]
        assert [buffer.get(i) for i in range(100, 104)] == [bytes([i]) * 4096 for i in range(100, 104)]
        assert buffer.get(104) is None and buffer.get(99) == bytes(4096)
        assert os.listdir(tmp_path) == []  # the spill file has no name
        buffer.clear()
        assert buffer.get(100) is None and buffer.get(0) is None
    finally:
        buffer.close()


def test_buffer_without_scratch_names_its_bound() -> None:
    buffer = ClusterBuffer(4096, memory_limit=4096)
    buffer.put(0, b"\x01" * 4096)
    with pytest.raises(ScratchSpaceRequired, match="more than 4096 bytes \\(the in-memory bound\\)"):
        buffer.put(1, b"\x02" * 4096)
