"""Loop devices on real sparse files: attach, detach, capacity refresh, rediscovery from sysfs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpp_csi.linux import loop

from .conftest import LoopTracker, MountTracker, sparse_file


def test_attach_reports_the_backing_file_and_size(tmp_path: Path, loops: LoopTracker) -> None:
    backing = sparse_file(tmp_path / "disk.img", 64 << 20)
    device = loops.attach(backing)
    assert device.path.startswith("/dev/loop")
    assert device.backing_file == str(backing)
    assert device.size == 64 << 20 == loop.device_size(device.path)
    assert not device.autoclear and not device.read_only
    assert loop.status(device.path) == device


def test_detach_frees_the_device(tmp_path: Path, loops: LoopTracker) -> None:
    device = loops.attach(sparse_file(tmp_path / "disk.img", 16 << 20))
    assert loop.detach(device.path) is True
    assert loop.status(device.path) is None
    assert loop.detach(device.path) is True  # detaching a free device is not an error


def test_read_only_device_refuses_writes(tmp_path: Path, loops: LoopTracker) -> None:
    device = loops.attach(sparse_file(tmp_path / "disk.img", 16 << 20), read_only=True)
    assert device.read_only
    with pytest.raises(OSError), open(device.path, "r+b", buffering=0) as dev:
        dev.write(b"x" * 512)


def test_refresh_capacity_after_the_backing_file_grew(tmp_path: Path, loops: LoopTracker) -> None:
    backing = sparse_file(tmp_path / "disk.img", 32 << 20)
    device = loops.attach(backing)
    os.truncate(backing, 96 << 20)
    assert loop.device_size(device.path) == 32 << 20  # the kernel does not notice by itself
    assert loop.refresh_capacity(device.path) == 96 << 20
    assert loop.status(device.path).size == 96 << 20  # type: ignore[union-attr]


def test_devices_backing_is_rediscovered_from_the_system(tmp_path: Path, loops: LoopTracker) -> None:
    backing = sparse_file(tmp_path / "disk.img", 16 << 20)
    # Attach from another process: this one has no memory of it, as after a driver restart.
    script = "import sys; from hpp_csi.linux import loop; print(loop.attach(sys.argv[1]).path)"
    out = subprocess.run([sys.executable, "-c", script, str(backing)], capture_output=True, text=True, check=True)
    loops.devices.append(out.stdout.strip())
    alias = tmp_path / "alias.img"
    alias.symlink_to(backing)
    found = loop.devices_backing(alias)  # another path to the same inode matches too
    assert [d.path for d in found] == [out.stdout.strip()]
    assert loop.devices_backing(sparse_file(tmp_path / "other.img", 1 << 20)) == []
    loop.detach(found[0].path)
    assert loop.devices_backing(backing) == []


def test_autoclear_detaches_when_the_holder_lets_go(tmp_path: Path, loops: LoopTracker,
                                                     mounted: MountTracker) -> None:
    backing = sparse_file(tmp_path / "disk.img", 16 << 20)
    with pytest.raises(ValueError, match="while_open"):
        loop.attach(backing, autoclear=True)
    seen: list[loop.LoopDevice | None] = []
    device = loop.attach(backing, autoclear=True, while_open=lambda d: seen.append(loop.status(d.path)))
    assert seen[0] is not None and seen[0].autoclear
    assert loop.status(device.path) is None  # our fd was the last holder


def test_a_failing_while_open_detaches(tmp_path: Path) -> None:
    backing = sparse_file(tmp_path / "disk.img", 16 << 20)

    def fail(_device: loop.LoopDevice) -> None:
        raise RuntimeError("mount failed")

    with pytest.raises(RuntimeError):
        loop.attach(backing, while_open=fail)
    assert loop.devices_backing(backing) == []


def test_not_a_loop_device_is_rejected() -> None:
    with pytest.raises(ValueError, match="not a loop device"):
        loop.status("/dev/sda")


def test_kernels_without_loop_configure_use_set_fd_and_set_status(tmp_path: Path, loops: LoopTracker,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_ioctl = loop.fcntl.ioctl
    calls: list[int] = []

    def pre_5_8_ioctl(fd: int, request: int, arg: object = 0) -> object:
        calls.append(request)
        if request == loop.LOOP_CONFIGURE:
            raise OSError(errno.EINVAL, "Invalid argument")  # what a kernel older than 5.8 answers
        return real_ioctl(fd, request, arg)  # type: ignore[call-overload]

    monkeypatch.setattr(loop.fcntl, "ioctl", pre_5_8_ioctl)
    backing = sparse_file(tmp_path / "disk.img", 16 << 20)
    device = loops.attach(backing, direct_io=True)
    assert {loop.LOOP_SET_FD, loop.LOOP_SET_STATUS64, loop.LOOP_SET_DIRECT_IO} <= set(calls)
    assert device.backing_file == str(backing) and device.direct_io
