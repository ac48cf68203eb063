"""Per-mount flags of a publish must reach every mount namespace the target propagates to.

A driver in a container publishes into a shared mount; kubelet and the pod see the host's copy. These tests play
both sides on one host: a child in its own mount namespace (`unshare --propagation unchanged`, so it stays a
peer of our shared folder) publishes, and this process reads the result from the parent namespace.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpp_csi.linux import mounts

from .conftest import MountTracker

MS_SHARED = 1 << 20
FLAGS = mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC


@pytest.fixture
def shared(tmp_path: Path, mounted: MountTracker) -> Path:
    """A folder bind-mounted on itself and made shared: what the chart does with kubelet's pods folder."""
    folder = tmp_path / "shared"
    folder.mkdir()
    mounts.mount(folder, folder, None, mounts.MS_BIND)
    mounted.add(folder)
    mounts.mount("none", folder, None, MS_SHARED)
    return folder


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    folder = tmp_path / "volume"
    folder.mkdir()
    (folder / "existing").write_text("data")
    return folder


def in_child_namespace(call: str) -> str:
    """Run `call` (Python, with `mounts` imported) in a new mount namespace that keeps our propagation; its
    output is the child's own view of what it did."""
    code = f"from hpp_csi.linux import mounts\n{call}\n"
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "unchanged", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def child_view(target: Path) -> str:
    return f"print(','.join(sorted(mounts.mounts_at({str(target)!r})[-1].options)))"


@pytest.fixture
def target(shared: Path, mounted: MountTracker) -> Path:
    """The publish target, inside the shared folder; unmounted before the folder at teardown."""
    path = shared / "target"
    path.mkdir()
    mounted.add(path)
    return path


def test_flags_set_in_a_child_namespace_reach_the_parent(volume: Path, target: Path) -> None:
    seen_there = in_child_namespace(
        f"mounts.bind_mount({str(volume)!r}, {str(target)!r}, {FLAGS})\n{child_view(target)}"
    )
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(seen_there.strip().split(","))
    [entry] = mounts.mounts_at(target)  # this (the parent's) namespace's table
    assert {"ro", "nosuid", "nodev", "noexec"} <= entry.options
    assert (target / "existing").read_text() == "data"
    with pytest.raises(OSError) as info:
        (target / "new").write_text("x")
    assert info.value.errno == errno.EROFS
    (volume / "still-writable").write_text("x")  # only the publication is read-only


def test_a_remount_stays_in_its_namespace(volume: Path, target: Path) -> None:
    """Why bind_mount does not remount: the child sees ro, the parent (the host) a writable copy."""
    seen_there = in_child_namespace(
        f"mounts.bind_then_remount({str(volume)!r}, {str(target)!r}, {FLAGS})\n{child_view(target)}"
    )
    assert "ro" in seen_there.strip().split(",")
    [entry] = mounts.mounts_at(target)
    assert "rw" in entry.options and "noexec" not in entry.options


def test_rw_publish_with_flags_is_writable(volume: Path, target: Path) -> None:
    in_child_namespace(f"mounts.bind_mount({str(volume)!r}, {str(target)!r}, "
                       f"{mounts.bind_flags(['noexec', 'nosuid,nodev', 'noatime'])})")
    [entry] = mounts.mounts_at(target)
    assert {"rw", "noexec", "nosuid", "nodev", "noatime"} <= entry.options
    (target / "new").write_text("x")
    assert (volume / "new").read_text() == "x"


def test_proc_fd_links_as_node_publish_passes_them(volume: Path, tmp_path: Path, mounted: MountTracker) -> None:
    """Source and target as /proc/self/fd links of O_PATH descriptors are followed, as mount(2) follows them."""
    target = tmp_path / "target"
    target.mkdir()
    mounted.add(target)
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    source_fd, target_fd = os.open(volume, flags), os.open(target, flags)
    try:
        mounts.bind_mount(f"/proc/self/fd/{source_fd}", f"/proc/self/fd/{target_fd}", mounts.MS_RDONLY,
                          remount_at=target)
    finally:
        os.close(source_fd)
        os.close(target_fd)
    [entry] = mounts.mounts_at(target)
    assert entry.read_only and (target / "existing").read_text() == "data"


def test_a_file_on_a_file(tmp_path: Path, mounted: MountTracker) -> None:
    """Block publishes bind a device node onto a file: a file source onto a file target must work too."""
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_text("content")
    target.touch()
    mounted.add(target)
    mounts.bind_mount(source, target, mounts.MS_RDONLY)
    assert mounts.mounts_at(target)[0].read_only and target.read_text() == "content"
    with pytest.raises(OSError) as info:
        target.write_text("x")
    assert info.value.errno == errno.EROFS


@pytest.mark.parametrize("missing", ["source", "target"])
def test_missing_end_mounts_nothing(tmp_path: Path, volume: Path, mounted: MountTracker, missing: str) -> None:
    target = tmp_path / "target"
    target.mkdir()
    mounted.add(target)
    source = tmp_path / "gone" if missing == "source" else volume
    to = tmp_path / "gone" if missing == "target" else target
    with pytest.raises(FileNotFoundError) as info:
        mounts.bind_mount(source, to, mounts.MS_RDONLY)
    assert str(source) in str(info.value) and str(to) in str(info.value)
    assert not mounts.is_mount_point(target) and not (tmp_path / "gone").exists()


def test_syscall_numbers_by_machine() -> None:
    assert mounts.mount_api_syscalls("x86_64") == (428, 429, 442)
    assert mounts.mount_api_syscalls("aarch64") == (428, 429, 442)
    assert mounts.mount_api_syscalls("alpha") is None  # its numbers differ: it takes bind then remount


def test_mount_attr_from_flags() -> None:
    attr = mounts.mount_attr(mounts.MS_RDONLY | mounts.MS_NODEV | mounts.MS_NOATIME)
    assert attr.attr_set == mounts.MOUNT_ATTR_RDONLY | mounts.MOUNT_ATTR_NODEV | mounts.MOUNT_ATTR_NOATIME
    assert attr.attr_clr == mounts.MOUNT_ATTR__ATIME  # an atime mode replaces the source's
    assert mounts.mount_attr(mounts.MS_NOSUID).attr_clr == 0  # no atime asked: the source's is kept
    assert mounts.mount_attr(mounts.MS_NOATIME | mounts.MS_STRICTATIME).attr_set == mounts.MOUNT_ATTR_STRICTATIME
