"""The plain decisions, called directly: quantities, overhead, sniffing, routes, messages, parsers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import time
from pathlib import Path

import pytest

from importer import formats, qemu_img
from importer.cli import extra_headers_from_env, resolve_overhead
from importer.errors import ChecksumMismatch, ConfigError, ImageTooLarge, InvalidImage
from importer.net.headers import parse_header
from importer.pipeline import Checksum
from importer.processor import Route, choose_route, scratch_reason
from importer.progress import ImportMetrics, Progress, termination_message
from importer.sources.upload import UploadSource
from importer.target import (
    WRITEBACK_INTERVAL,
    BackgroundWriter,
    SparseWriter,
    WritebackPacer,
    ZeroPolicy,
    usable_size,
)
from importer.units import GiB, MiB, parse_quantity


@pytest.mark.parametrize("text,expected", [
    ("10Gi", 10 * GiB), ("64Mi", 64 * MiB), ("1G", 10**9), ("1.5Gi", 3 * GiB // 2), ("500M", 500 * 10**6),
    ("1e3", 1000), ("2k", 2000), ("100", 100), ("1500m", 2),
])
def test_parse_quantity(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "10GB", "-1Gi", "1.2.3"])
def test_parse_quantity_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_quantity(text)


def test_usable_size_formula() -> None:
    # min(requested, available) * (1 - overhead), rounded down to 1 MiB
    assert usable_size(100 * GiB, 10 * GiB, 0.055) == 9676 * MiB  # 10240 MiB * 0.945 = 9676.8 MiB
    assert usable_size(5 * GiB, 10 * GiB, 0.055) == (int(5 * GiB * 0.945) // MiB) * MiB
    assert usable_size(10 * GiB, None, 0.0) == 10 * GiB
    assert usable_size(64 * MiB, None, 0.055) == 60 * MiB
    with pytest.raises(ConfigError):
        usable_size(GiB, None, 1.0)


def test_overhead_per_storage_class() -> None:
    assert resolve_overhead(0.055, ["fast=0.04", "slow=0.1"], "fast") == 0.04
    assert resolve_overhead(0.055, ["fast=0.04"], "other") == 0.055
    assert resolve_overhead(0.07, [], None) == 0.07
    with pytest.raises(ConfigError):
        resolve_overhead(0.055, ["fast"], "fast")


def qcow2_header(version: int = 3, backing: int = 0, crypt: int = 0, incompatible: int = 0) -> bytes:
    header = bytearray(512)
    struct.pack_into(">4sIQIIQI", header, 0, b"QFI\xfb", version, backing, 0, 16, 1 << 30, crypt)
    struct.pack_into(">Q", header, 72, incompatible)
    return bytes(header)


@pytest.mark.parametrize("header,expected", [
    (b"\x1f\x8b\x08" + bytes(509), "gzip"),
    (b"\xfd7zXZ\x00" + bytes(506), "xz"),
    (b"\x28\xb5\x2f\xfd" + bytes(508), "zstd"),
    (qcow2_header(), "qcow2"),
    (b"KDMV" + bytes(508), "vmdk"),
    (bytes(64) + b"\x7f\x10\xda\xbe" + bytes(444), "vdi"),
    (b"conectix" + bytes(504), "vpc"),
    (b"vhdxfile" + bytes(504), "vhdx"),
    (bytes(257) + b"ustar\x0000" + bytes(248), "tar"),
    (bytes(512), "raw"),
    (b"CD001" + bytes(507), "raw"),
    (b"", "raw"),
])
def test_sniff(header: bytes, expected: str) -> None:
    assert formats.sniff(header) == expected


@pytest.mark.parametrize("header,problem", [
    (qcow2_header(backing=0x200), "backing file"),
    (qcow2_header(incompatible=0x4), "external data file"),
    (qcow2_header(crypt=2), "encrypted"),
    (qcow2_header(version=4), "version 4"),
    (b"QFI\xfb" + bytes(20), "truncated"),
])
def test_check_header_refuses(header: bytes, problem: str) -> None:
    with pytest.raises(InvalidImage, match=problem):
        formats.check_header("qcow2", header)


def test_check_header_accepts_plain_qcow2() -> None:
    formats.check_header("qcow2", qcow2_header(version=2))
    formats.check_header("qcow2", qcow2_header(version=3))


@pytest.mark.parametrize("fmt,compressed,random_access,hash_first,route", [
    ("raw", False, True, False, Route.STREAM),
    ("raw", True, False, True, Route.STREAM),
    ("qcow2", False, True, False, Route.DIRECT),
    ("vmdk", False, True, False, Route.DIRECT),
    ("qcow2", True, True, False, Route.SCRATCH),
    ("qcow2", False, False, False, Route.SCRATCH),
    ("qcow2", False, True, True, Route.SCRATCH),
])
def test_choose_route(fmt: str, compressed: bool, random_access: bool, hash_first: bool, route: Route) -> None:
    assert choose_route(fmt, compressed, random_access, hash_first) is route


def test_checksum() -> None:
    ok = Checksum("sha256:" + "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    ok.verify()  # sha256 of nothing
    bad = Checksum("MD5:" + "0" * 32)
    bad.update(b"x")
    with pytest.raises(ChecksumMismatch, match="expected md5:0000"):
        bad.verify()
    for spec in ("sha256:abc", "crc32:00000000", "sha1", "sha1:" + "g" * 40):
        with pytest.raises(ConfigError):
            Checksum(spec)


def test_extra_headers_order_and_parsing() -> None:
    env = {"IMPORTER_EXTRA_HEADER_10": "C: 3", "IMPORTER_EXTRA_HEADER_2": "B: 2", "IMPORTER_EXTRA_HEADER_0": "A: 1",
           "IMPORTER_EXTRA_HEADER_X": "ignored: 1"}
    assert extra_headers_from_env(env) == ["A: 1", "B: 2", "C: 3"]
    assert parse_header("Authorization: Bearer x:y") == ("Authorization", "Bearer x:y")
    for bad in ("no colon", ": empty", "Bad Name: v", "X: a\r\nInjected: 1"):
        with pytest.raises(ConfigError):
            parse_header(bad)


def test_termination_message_fields_and_limit() -> None:
    assert json.loads(termination_message("Import Complete", preallocation_applied=True)) == {
        "preallocationApplied": True, "message": "Import Complete"}
    assert json.loads(termination_message("x", scratch_space_required=True))["scratchSpaceRequired"] is True
    assert len(termination_message("e" * 10000).encode()) <= 4096


def test_qemu_img_parsers() -> None:
    info = qemu_img.parse_info(json.dumps({
        "format": "qcow2", "virtual-size": 1073741824, "actual-size": 200704, "backing-filename": "base.img",
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "data-file": "data.raw"}}}))
    assert (info.format, info.virtual_size, info.backing_file, info.data_file) == (
        "qcow2", 1073741824, "base.img", "data.raw")
    with pytest.raises(InvalidImage):
        qemu_img.parse_info("not json")
    assert qemu_img.parse_progress(b"    (0.00/100%)\r    (42.50/100%)\r") == 42.5
    assert qemu_img.parse_progress(b"nothing") is None
    assert qemu_img.check_problem(3, "{}", "") is None  # leaked clusters only
    assert "2 corruptions" in (qemu_img.check_problem(2, '{"corruptions": 2}', "") or "")
    cmd = qemu_img.convert_command("in", "qcow2", "out", preallocation="falloc", dest_is_block=False)
    assert cmd[cmd.index("-t") + 1] == "writeback" and "preallocation=falloc" in cmd


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_and_metric() -> None:
    metrics = ImportMetrics("uid-1")
    tty = FakeTTY()
    progress = Progress(metrics, tty)
    progress.set(10)
    progress.range(50, 100).set(50)  # 75% overall
    progress.set(60)  # going back is ignored
    progress.done()
    assert metrics.registry.get_sample_value("kubevirt_cdi_import_progress_total", {"ownerUID": "uid-1"}) == 100
    assert "100.0%" in tty.getvalue()


def test_writeback_pacer_waits_for_the_file_and_closes_it(tmp_path: Path) -> None:
    # qemu-img creates its own target: the pacer must tolerate a missing file, then open, pace and close it.
    target = tmp_path / "later.img"
    with WritebackPacer(target) as pacer:
        time.sleep(3 * WRITEBACK_INTERVAL)
        target.write_bytes(b"x" * 1024 * 1024)
        time.sleep(3 * WRITEBACK_INTERVAL)
        assert _open_fds_to(target), "the pacer should hold the file open while pacing"
    assert not pacer._thread.is_alive()
    assert not _open_fds_to(target)


def _open_fds_to(path: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(path):
                found.append(fd.name)
    return found


def test_background_writer_writes_in_order_and_reports_the_writers_error(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        chunks = [bytes([i]) * 4096 for i in range(1, 40)]
        with BackgroundWriter(SparseWriter(fd, ZeroPolicy.SKIP, 10**9), depth=2) as background:
            for chunk in chunks:
                background.write(chunk)
        assert path.read_bytes() == b"".join(chunks)
        # A limit the stream passes: the error reaches the producer, which never blocks on a full queue.
        background = BackgroundWriter(SparseWriter(fd, ZeroPolicy.SKIP, 3 * 4096), depth=1)
        with pytest.raises(ImageTooLarge):
            for chunk in chunks:
                background.write(chunk)
            background.close()
        with pytest.raises(ImageTooLarge):  # closing again neither hangs nor forgets the failure
            background.close()
    finally:
        os.close(fd)


def test_scratch_reason_names_why_the_bytes_come_in_order() -> None:
    """An upload that needs scratch must not blame a server's Range support."""
    upload = UploadSource(io.BytesIO(b""), None)
    assert scratch_reason("qcow2", [], False, upload.sequential_reason) == (
        "an upload arrives as one stream, so the qcow2 image must be stored first")
    assert "does not support Range requests" in scratch_reason("qcow2", [], False)
    assert scratch_reason("vmdk", ["gz"], False, upload.sequential_reason).startswith("a gz-compressed vmdk")
