"""Every cell of the route matrix over real HTTP, into a file and a loop block device, preallocated or not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from imageserver import ImageServer
from impkit import Images, LoopDevice, MiB, allocated, compare

from importer import cli

USABLE = 15 * MiB  # 16Mi * (1 - 0.055) = 15.12 MiB, rounded down to 1 MiB

# image name → the route it must take from a server with Range support
CELLS = {
    "raw": "stream",
    "raw.gzip": "stream",
    "raw.xz": "stream",
    "raw.zstd": "stream",
    "odd": "stream",
    "iso": "stream",
    "qcow2": "direct",
    "qcow2v2": "direct",
    "qcow2c": "direct",
    "vmdk": "direct",
    "vhdx": "direct",
    "vdi": "direct",
    "vpc": "direct",
    "qcow2.gzip": "stream",  # our streaming qcow2 reader: no scratch
    "qcow2.xz": "stream",
    "qcow2.zstd": "stream",
    "qcow2.gzip.xz": "stream",
}


def import_image(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(["import", "--no-progress", *argv], env={})
    out, err = capsys.readouterr()
    return rc, out, err


def route_of(summary: str) -> str:
    match = re.search(r"route (\w+)", summary)
    assert match, summary
    return match.group(1)


@pytest.mark.parametrize("prealloc", [False, True], ids=["sparse", "prealloc"])
@pytest.mark.parametrize("name", list(CELLS))
def test_file_target(name: str, prealloc: bool, images: Images, server: ImageServer, dest: Path,
                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = ["--endpoint", server.url(f"/img/{name}"), "--dest", str(dest), "--image-size", "16Mi",
            "--scratch", str(scratch), "--preallocation" if prealloc else "--no-preallocation"]
    rc, out, err = import_image(argv, capsys)
    assert rc == 0, err
    assert route_of(out) == CELLS[name]
    disk = dest / "disk.img"
    assert compare(images.references[name], disk).returncode == 0
    assert disk.stat().st_size == USABLE
    assert sorted(p.name for p in dest.iterdir()) == ["disk.img"]  # no temporary left behind
    assert list(scratch.iterdir()) == []
    if prealloc:
        assert allocated(disk) >= USABLE
    elif name not in ("odd", "iso"):
        assert allocated(disk) <= images.data_bytes + 512 * 1024  # holes stayed holes


@pytest.mark.parametrize("prealloc", [False, True], ids=["sparse", "prealloc"])
@pytest.mark.parametrize("name", list(CELLS))
def test_block_target(name: str, prealloc: bool, images: Images, server: ImageServer, loop_device: LoopDevice,
                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # Leave stale data all over the device: the import must not let any of it show through.
    with loop_device.device.open("r+b") as dev:
        dev.write(b"\xee" * loop_device.size)
    argv = ["--endpoint", server.url(f"/img/{name}"), "--dest", str(loop_device.device), "--scratch", str(scratch)]
    if prealloc:
        argv.append("--preallocation")
    rc, out, err = import_image(argv, capsys)
    assert rc == 0, err
    assert route_of(out) == CELLS[name]
    assert compare(images.references[name], loop_device.device).returncode == 0
    if not prealloc and name not in ("odd", "iso"):
        # Zero blocks were discarded, so the loop device's backing file got holes back.
        assert allocated(loop_device.backing) <= images.data_bytes + 1024 * 1024


@pytest.mark.parametrize("name", ["raw", "raw.xz", "qcow2", "qcow2.zstd", "vhdx"])
def test_server_without_range(name: str, images: Images, server: ImageServer, dest: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """Raw and qcow2 stream without Range; other convertible formats need scratch (qemu-img cannot seek over HTTP)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    url = server.url(f"/norange/{name}")
    rc, out, err = import_image(["--endpoint", url, "--dest", str(dest), "--image-size", "16Mi",
                                 "--scratch", str(scratch)], capsys)
    assert rc == 0, err
    assert route_of(out) == ("stream" if name.startswith(("raw", "qcow2")) else "scratch")
    assert list(scratch.iterdir()) == []
    assert compare(images.references[name], dest / "disk.img").returncode == 0


@pytest.mark.parametrize("name", ["raw.zstd", "qcow2", "qcow2.xz", "vhdx"])
def test_local_file_source(name: str, images: Images, dest: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rc, _, err = import_image(["--endpoint", f"file://{images.files[name]}", "--dest", str(dest),
                                 "--image-size", "16Mi", "--scratch", str(scratch)], capsys)
    assert rc == 0, err
    assert compare(images.references[name], dest / "disk.img").returncode == 0
