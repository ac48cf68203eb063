"""Loop devices are found by the backing file's device and inode, not by the path sysfs shows.

A restarted driver container reads /sys/block/loopN/loop/backing_file as its dead predecessor named it. Here a
child in a private mount namespace attaches a file through a path that exists only there; this process must
still find (and release) that device, and must not take it for another file that has that path here.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpp_csi.linux import loop
from hpp_csi.storage import block_publish

from .conftest import LoopTracker, sparse_file


@contextlib.contextmanager
def attached_in_child(real: Path, hidden: Path, loops: LoopTracker) -> Iterator[loop.LoopDevice]:
    """A loop device a child attached to `hidden`/disk.img after binding `real` over `hidden` in its own mount
    namespace; the child (and its namespace) lives until the block ends."""
    code = (
        "import sys\n"
        "from hpp_csi.linux import loop, mounts\n"
        f"mounts.bind_mount({str(real)!r}, {str(hidden)!r})\n"
        f"print(loop.attach({str(hidden / 'disk.img')!r}, direct_io=False).path, flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(["unshare", "--mount", sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, "the child did not attach its loop device within 30 s"
        assert child.stdout is not None
        path = child.stdout.readline().strip()
        assert path, child.communicate(timeout=30)[1]
        loops.devices.append(path)
        device = loop.status(path)
        assert device is not None
        yield device
    finally:
        child.communicate(timeout=30)  # closes its stdin: it exits, its namespace goes


def foreign_device(real: Path, hidden: Path, loops: LoopTracker) -> loop.LoopDevice:
    """A device attached as above by a child that has exited since (a dead driver container's)."""
    with attached_in_child(real, hidden, loops) as device:
        pass
    now = loop.status(device.path)
    assert now is not None
    return now


@pytest.fixture
def real_and_hidden(tmp_path: Path) -> tuple[Path, Path]:
    """(folder with the image, folder of the same path the child attaches through: here it holds a decoy)."""
    real, hidden = tmp_path / "real", tmp_path / "hidden"
    real.mkdir()
    hidden.mkdir()
    sparse_file(real / "disk.img", 4 << 20)
    sparse_file(hidden / "disk.img", 4 << 20)  # same name, another file: what the dead container's path names here
    return real, hidden


def test_found_by_inode_when_its_path_names_another_file_here(real_and_hidden: tuple[Path, Path],
                                                             loops: LoopTracker) -> None:
    """While the child's namespace lives, sysfs shows its path, which names the decoy here."""
    real, hidden = real_and_hidden
    with attached_in_child(real, hidden, loops) as device:
        assert device.backing_file == str(hidden / "disk.img")
        assert [d.path for d in loop.devices_backing(real / "disk.img")] == [device.path]
        image = (real / "disk.img").stat()
        assert [d.path for d in loop.devices_backing_inode(image.st_dev, image.st_ino)] == [device.path]
        assert loop.devices_backing(hidden / "disk.img") == []  # the decoy is backed by nothing


def test_found_after_the_namespace_that_attached_it_is_gone(real_and_hidden: tuple[Path, Path],
                                                            loops: LoopTracker) -> None:
    """Once that namespace is gone, sysfs shows a path relative to the detached bind mount: not our file."""
    real, hidden = real_and_hidden
    device = foreign_device(real, hidden, loops)
    shown = device.backing_file
    assert not os.path.exists(shown) or not os.path.samefile(shown, real / "disk.img"), shown
    assert [d.path for d in loop.devices_backing(real / "disk.img")] == [device.path]


def test_unused_device_from_another_namespace_is_released(real_and_hidden: tuple[Path, Path],
                                                          loops: LoopTracker) -> None:
    """What unpublish and delete do for a block volume: no device may leak because its path is foreign."""
    real, hidden = real_and_hidden
    device = foreign_device(real, hidden, loops)
    block_publish.detach_unused(hidden / "disk.img")  # the decoy: not its device, left alone
    assert loop.status(device.path) is not None
    block_publish.detach_unused(real / "disk.img")
    assert loop.status(device.path) is None
    assert loop.devices_backing(real / "disk.img") == []


def test_start_up_sweep_finds_a_dead_containers_orphan_by_inode(real_and_hidden: tuple[Path, Path],
                                                                loops: LoopTracker) -> None:
    """detach_orphans (driver start) takes a device as ours by the inode it backs in a pool folder: the orphan
    a dead container attached is released, a device on the decoy outside the pool is not."""
    real, hidden = real_and_hidden
    device = foreign_device(real, hidden, loops)
    decoy = loop.attach(hidden / "disk.img", direct_io=False)
    loops.devices.append(decoy.path)
    assert block_publish.detach_orphans([hidden]) == [decoy.path]  # hidden is the pool here: its file's device
    assert loop.status(device.path) is not None  # the foreign one backs real/disk.img: not in that pool
    assert block_publish.detach_orphans([real]) == [device.path]
    assert loop.status(device.path) is None
