"""Fixtures that make real loop devices and XFS mounts, and undo every one of them even when a test fails."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpp_csi.linux import loop, mounts, xfs


class LoopTracker:
    """Attaches loop devices for a test and detaches exactly those afterwards (never anyone else's)."""

    def __init__(self) -> None:
        self.devices: list[str] = []

    def attach(self, backing: Path, **kwargs: bool) -> loop.LoopDevice:
        device = loop.attach(backing, **kwargs)
        self.devices.append(device.path)
        return device

    def cleanup(self) -> None:
        for device in reversed(self.devices):
            with contextlib.suppress(OSError):
                loop.detach(device)


class MountTracker:
    """Unmounts, at teardown, whatever a test mounted through it."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    def add(self, target: Path | str) -> None:
        self.targets.append(os.fspath(target))

    def cleanup(self) -> None:
        for target in reversed(self.targets):
            while mounts.is_mount_point(target):
                try:
                    mounts.umount(target)
                except OSError:
                    mounts.umount(target, lazy=True)


@pytest.fixture
def loops() -> Iterator[LoopTracker]:
    tracker = LoopTracker()
    yield tracker
    tracker.cleanup()


@pytest.fixture
def mounted() -> Iterator[MountTracker]:
    tracker = MountTracker()
    yield tracker
    tracker.cleanup()


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@dataclass
class XfsPool:
    backing: Path
    device: str
    mount_point: Path
    result: xfs.MountResult


def make_xfs_pool(tmp_path: Path, loops: LoopTracker, mounted: MountTracker, size: int) -> XfsPool:
    backing = sparse_file(tmp_path / "pool.img", size)
    device = loops.attach(backing).path
    xfs.make_filesystem(device)
    mount_point = tmp_path / "pool"
    mount_point.mkdir()
    mounted.add(mount_point)
    result = xfs.mount_xfs(device, mount_point)
    return XfsPool(backing, device, mount_point, result)


@pytest.fixture
def xfs_pool(tmp_path: Path, loops: LoopTracker, mounted: MountTracker) -> XfsPool:
    """A 512 MiB XFS (reflink=1) on a loop device over a sparse file, mounted as a pool would be."""
    return make_xfs_pool(tmp_path, loops, mounted, 512 << 20)


@pytest.fixture
def tmpfs_dir(tmp_path: Path, mounted: MountTracker) -> Path:
    """A private tmpfs: no reflink there, so clones take the sparse-copy path."""
    target = tmp_path / "tmpfs"
    target.mkdir()
    mounted.add(target)
    mounts.mount("tmpfs", target, "tmpfs", 0, "size=512m")
    return target


# Where VM-based tests ran, shown at the end of the run even with -q.
VM_NOTES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for note in VM_NOTES:
        terminalreporter.write_line(note)
