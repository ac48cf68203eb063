"""Our qcow2 reader: layouts qemu-img makes, hostile tables, fallbacks to qemu-img, resumed ranges, batching."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from imageserver import ImageServer, Route
from impkit import Images, LoopDevice, MiB, allocated, compare, run

from importer import cli, qcow2, qcow2_import
from importer.errors import InvalidImage, TransferError
from importer.fetch import Fetcher, Part, _Cursor, plan
from importer.qcow2 import Segment
from importer.target import SparseWriter, ZeroPolicy


def import_from(server: ImageServer, image: Path, dest: Path, capsys: pytest.CaptureFixture[str],
                *extra: str, route: Route | None = None) -> tuple[int, str, str]:
    url = server.add(f"/{image.name}", route or Route(image))
    rc = cli.main(["import", "--no-progress", "--retry-delay", "0.05", "--endpoint", url, "--dest", str(dest),
                   "--image-size", "64Mi", *extra], env={})
    out, err = capsys.readouterr()
    return rc, out, err


def reader_of(summary: str) -> str:
    match = re.search(r"(\S+) reader", summary)
    assert match, summary
    return match.group(1)


def make_image(path: Path, *io_commands: str, options: str = "compat=1.1", size: str = "24M") -> Path:
    """A qcow2 written through qemu-io, so its layout is qemu's own."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path, size)
    for command in io_commands:
        run("qemu-io", "-c", command, path)
    return path


def reference(image: Path, tmp_path: Path) -> Path:
    ref = tmp_path / f"{image.name}.ref.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, ref)
    return ref


def header(image: Path) -> qcow2.Header:
    return qcow2.parse_header(image.read_bytes()[:512])


def first_l2_offset(image: Path) -> int:
    h = header(image)
    with image.open("rb") as f:
        f.seek(h.l1_offset)
        (entry,) = struct.unpack(">Q", f.read(8))
    return int(entry) & qcow2.OFFSET_MASK


def patch(image: Path, offset: int, data: bytes) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(data)


# -- layouts qemu makes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", ["compat=1.1,cluster_size=512", "compat=1.1,cluster_size=2M",
                                     "compat=0.10,cluster_size=4096", "compat=1.1,lazy_refcounts=on",
                                     "compat=1.1,preallocation=metadata", "compat=0.10,preallocation=metadata",
                                     "compat=1.1,preallocation=falloc"])
def test_cluster_sizes_and_versions(options: str, fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "layout.qcow2", "write -P 0x11 0 1M", "write -P 0x22 5M 3M",
                       "write -P 0x33 23M 1M", options=options)
    rc, out, err = import_from(fresh_server, image, dest, capsys)
    assert rc == 0, err
    assert reader_of(out) == "native"
    assert compare(reference(image, tmp_path), dest / "disk.img").returncode == 0
    assert allocated(dest / "disk.img") <= 5 * MiB + 64 * 1024  # the unwritten ranges stayed holes


def test_zero_flag_clusters_are_zeros_on_a_block_device(fresh_server: ImageServer, loop_device: LoopDevice,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`write -z` sets the zero flag on clusters that keep their host offset: their old bytes must not show."""
    image = make_image(tmp_path / "zeroflag.qcow2", "write -P 0x55 0 4M", "write -z 1M 2M", size="8M")
    layout = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True,
                                       check=True, text=True).stdout)
    assert any(e["zero"] and "offset" in e for e in layout)  # zero flag on clusters that keep their data
    with loop_device.device.open("r+b") as dev:
        dev.write(b"\xee" * loop_device.size)
    rc, out, err = import_from(fresh_server, image, loop_device.device, capsys)
    assert rc == 0, err
    assert reader_of(out) == "native"
    assert compare(reference(image, tmp_path), loop_device.device).returncode == 0
    with loop_device.device.open("rb") as dev:
        dev.seek(1 * MiB)
        assert dev.read(2 * MiB) == bytes(2 * MiB)


def test_compressed_clusters_sharing_sectors(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """qemu-img convert -c packs clusters back to back, so neighbours share a 512-byte sector."""
    plain = make_image(tmp_path / "plain.qcow2", "write -P 0x61 0 2M", "write -P 0x62 3M 64k",
                       "write -P 0x63 7M 1M")
    packed = tmp_path / "packed.qcow2"
    run("qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", plain, packed)
    rc, out, err = import_from(fresh_server, packed, dest, capsys)
    assert rc == 0, err
    assert reader_of(out) == "native"
    assert compare(reference(plain, tmp_path), dest / "disk.img").returncode == 0


def test_many_l2_tables_beyond_the_table_budget(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """512-byte clusters: one L2 table per 32 KiB of disk, so a 24 MiB disk has 768 of them, read in batches."""
    image = make_image(tmp_path / "tiny-clusters.qcow2", "write -P 0x71 0 1M", "write -P 0x72 12M 100k",
                       options="compat=1.1,cluster_size=512")
    monkeypatch.setattr(qcow2_import, "TABLE_BUDGET", 16 * 1024)  # 32 tables per batch, and read twice
    monkeypatch.setattr(qcow2_import, "GROUP_ENTRIES", 256)  # written 4 tables at a time
    rc, _, err = import_from(fresh_server, image, dest, capsys)
    assert rc == 0, err
    assert compare(reference(image, tmp_path), dest / "disk.img").returncode == 0


def test_two_disk_clusters_on_one_file_cluster(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Legal in the format (refcount 2): the second use is fetched again rather than assumed unread."""
    image = make_image(tmp_path / "shared.qcow2", "write -P 0x81 0 64k", "write -P 0x82 64k 64k")
    l2 = first_l2_offset(image)
    with image.open("rb") as f:
        f.seek(l2)
        first = f.read(8)
    patch(image, l2 + 8, first)  # disk cluster 1 now reads file cluster of disk cluster 0
    rc, _, err = import_from(fresh_server, image, dest, capsys)
    assert rc == 0, err
    data = (dest / "disk.img").read_bytes()[: 128 * 1024]
    assert data == b"\x81" * 128 * 1024


def test_internal_snapshot_is_not_what_imports(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Only the active L1 table counts: clusters kept for an internal snapshot must not leak into the disk."""
    image = make_image(tmp_path / "snap.qcow2", "write -P 0x11 0 2M")
    run("qemu-img", "snapshot", "-c", "before", image)
    run("qemu-io", "-c", "write -P 0x22 0 1M", "-c", "write -z 1M 1M", image)
    rc, out, err = import_from(fresh_server, image, dest, capsys)
    assert rc == 0, err
    assert reader_of(out) == "native"
    data = (dest / "disk.img").read_bytes()[: 2 * MiB]
    assert data == b"\x22" * MiB + bytes(MiB)


# -- what our reader leaves to qemu-img ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", ["compat=1.1,compression_type=zstd", "compat=1.1,extended_l2=on"])
def test_features_we_leave_to_qemu_img(options: str, fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "feature.qcow2", "write -P 0x91 0 1M", "write -P 0x92 9M 64k", options=options)
    assert qcow2.unsupported(header(image)) is not None
    rc, out, err = import_from(fresh_server, image, dest, capsys)
    assert rc == 0, err
    assert reader_of(out) == "qemu-img"
    assert compare(reference(image, tmp_path), dest / "disk.img").returncode == 0


def test_qemu_img_reader_on_request(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "asked.qcow2", "write -P 0xa1 0 1M")
    rc, out, err = import_from(fresh_server, image, dest, capsys, "--qcow2-reader", "qemu-img")
    assert rc == 0, err
    assert reader_of(out) == "qemu-img"
    assert compare(reference(image, tmp_path), dest / "disk.img").returncode == 0


# -- hostile tables ----------------------------------------------------------------------------------------------


def test_l2_entry_beyond_the_file(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "far.qcow2", "write -P 0xb1 0 1M")
    patch(image, first_l2_offset(image), struct.pack(">Q", (1 << 63) | (1 << 40)))
    rc, _, err = import_from(fresh_server, image, dest, capsys)
    assert rc == 1 and "beyond the end of the file" in err, err
    assert list(dest.iterdir()) == []


def test_l1_entry_beyond_the_file(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "farl1.qcow2", "write -P 0xb2 0 1M")
    patch(image, header(image).l1_offset, struct.pack(">Q", (1 << 63) | (1 << 44)))
    rc, _, err = import_from(fresh_server, image, dest, capsys)
    assert rc == 1 and "L2 table 0" in err and "beyond the end of the file" in err, err
    assert list(dest.iterdir()) == []


def test_reserved_bits_in_an_l2_entry(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "reserved.qcow2", "write -P 0xb3 0 1M")
    l2 = first_l2_offset(image)
    (entry,) = struct.unpack(">Q", image.read_bytes()[l2 : l2 + 8])
    patch(image, l2, struct.pack(">Q", entry | 0x100))  # bit 8: reserved, and makes the offset unaligned
    rc, _, err = import_from(fresh_server, image, dest, capsys)
    assert rc == 1 and "corrupt qcow2 image" in err, err
    assert list(dest.iterdir()) == []


def test_garbage_compressed_cluster(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    plain = make_image(tmp_path / "c.qcow2", "write -P 0xb4 0 256k")
    packed = tmp_path / "garbage-c.qcow2"
    run("qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", plain, packed)
    l2 = first_l2_offset(packed)
    (entry,) = struct.unpack(">Q", packed.read_bytes()[l2 : l2 + 8])
    assert entry & qcow2.COMPRESSED
    h = header(packed)
    host = entry & ((1 << (62 - (h.cluster_bits - 8))) - 1)
    patch(packed, host, b"\xff" * 64)  # not a deflate stream any more
    rc, _, err = import_from(fresh_server, packed, dest, capsys)
    assert rc == 1 and "compressed cluster" in err, err
    assert list(dest.iterdir()) == []


def test_truncated_in_the_tables(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "cut.qcow2", "write -P 0xb5 0 1M")
    cut = tmp_path / "cut-early.qcow2"
    cut.write_bytes(image.read_bytes()[: header(image).l1_offset])
    rc, _, err = import_from(fresh_server, cut, dest, capsys)
    assert rc == 1 and "truncated" in err and "L1 table" in err, err
    assert list(dest.iterdir()) == []


# -- transport ---------------------------------------------------------------------------------------------------


def test_ranges_resume_after_dropped_connections(images: Images, fresh_server: ImageServer, dest: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = images.files["qcow2"]
    route = Route(image, drop_at=300 * 1024, drops=3)
    rc, out, err = import_from(fresh_server, image, dest, capsys, route=route)
    assert rc == 0, err
    assert reader_of(out) == "native"
    assert compare(images.references["qcow2"], dest / "disk.img").returncode == 0
    ranged = [r for r in fresh_server.requests if r[2] and r[2] != "bytes=0-511"]
    assert len(ranged) > 3  # tables, several parts, and the resumed ones


@pytest.mark.parametrize("connections", ["1", "8"])
def test_connection_counts(connections: str, images: Images, fresh_server: ImageServer, dest: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = import_from(fresh_server, images.files["qcow2"], dest, capsys, "--connections", connections)
    assert rc == 0, err
    assert compare(images.references["qcow2"], dest / "disk.img").returncode == 0


# -- the pieces --------------------------------------------------------------------------------------------------


def test_plan_merges_small_gaps_and_splits_long_extents() -> None:
    segments = [Segment(0, 100, 0, 100), Segment(150, 50, 1000, 50), Segment(10_000, 40, 2000, 40),
                Segment(20_000, 250, 5000, 250)]
    parts = plan(segments, part_max=100, merge_gap=60)
    assert [(p.start, p.end) for p in parts] == [(0, 100), (150, 200), (10_000, 10_040), (20_000, 20_100),
                                                 (20_100, 20_200), (20_200, 20_250)]
    assert [s.guest for s in parts[-1].segments] == [5200]
    merged = plan(segments[:2], part_max=1000, merge_gap=60)
    assert merged == [Part(0, 200, segments[:2])]


class _Bytes:
    def __init__(self, data: bytes, chunk: int) -> None:
        self._data, self._chunk = data, chunk

    def read(self, size: int, /) -> bytes:
        out, self._data = self._data[: min(size, self._chunk)], self._data[min(size, self._chunk) :]
        return out

    def close(self) -> None:
        pass


def test_cursor_keeps_shared_bytes_and_refuses_short_bodies() -> None:
    data = bytes(range(256)) * 4
    cursor = _Cursor(_Bytes(data, 7), 100)  # the response starts at file offset 100
    assert cursor.span(100, 120) == data[:20]
    cursor.forget_before(110)
    assert cursor.span(110, 130) == data[10:30]  # overlapping the previous span
    assert b"".join(cursor.stream(125, 300)) == data[25:200]
    assert b"".join(cursor.stream(400, 500)) == data[300:400]
    with pytest.raises(Exception, match="ended at byte"):
        b"".join(cursor.stream(1000, 1200))


def test_header_parsing_refuses_garbage() -> None:
    with pytest.raises(InvalidImage):
        qcow2.parse_header(b"QFI\xfb" + bytes(10))
    with pytest.raises(InvalidImage):
        qcow2.parse_header(b"NOPE" + bytes(200))


class _StuckSource:
    """Part 0 fails at once; every other part hangs until released, like a stalled connection."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self._stuck = threading.Event()

    def open_range(self, start: int, end: int, /) -> _StuckReader:
        if start == 0:
            self._stuck.wait(5)  # fail only once the other thread is inside its read
            raise TransferError("part 0 failed")
        self._stuck.set()
        return _StuckReader(self.release, end - start)


class _StuckReader:
    def __init__(self, release: threading.Event, length: int) -> None:
        self._release, self._left = release, length

    def read(self, size: int, /) -> bytes:
        self._release.wait()
        data = b"\x01" * min(size, self._left)
        self._left -= len(data)
        return data

    def close(self) -> None:
        pass


def test_fetcher_fails_at_once_and_cleans_up_after_the_last_thread(tmp_path: Path) -> None:
    source = _StuckSource()
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    fetcher = Fetcher(source, SparseWriter(fd, ZeroPolicy.SKIP, 10 * MiB), lambda data, seg: data, connections=2)
    cleaned = threading.Event()
    started = time.monotonic()
    with pytest.raises(TransferError, match="part 0 failed"):
        fetcher.run([Part(0, MiB, [Segment(0, MiB, 0, MiB)]), Part(MiB, 2 * MiB, [Segment(MiB, MiB, MiB, MiB)])])
    assert time.monotonic() - started < 2, "the failure waited for the stuck thread"
    fetcher.close(then=cleaned.set)
    assert not cleaned.wait(0.3), "cleanup ran while a thread could still write"
    source.release.set()
    assert cleaned.wait(5), "cleanup never ran after the last thread exited"
    assert os.fstat(fd).st_size == 0  # the stuck thread saw the stop and wrote nothing
    os.close(fd)
