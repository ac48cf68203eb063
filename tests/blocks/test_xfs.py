"""XFS helpers on real loop devices: refusing to format used devices, mounting, project IDs, growth."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest

from hpp_csi.linux import loop, mounts, xfs

from .conftest import LoopTracker, MountTracker, XfsPool, sparse_file

SECTOR = 512


def write_mbr(device: str) -> None:
    """An MBR with one Linux partition from sector 2048, as fdisk writes it."""
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 8192)
    with open(device, "r+b") as dev:
        dev.seek(446)
        dev.write(entry)
        dev.seek(510)
        dev.write(b"\x55\xaa")


def write_gpt(device: str, size: int) -> None:
    """Protective MBR, primary GPT header and entry array with one partition (CRCs valid, as libblkid checks)."""
    last_lba = size // SECTOR - 1
    entry = struct.pack("<16s16sQQQ72s", uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le,
                        uuid.uuid4().bytes_le, 2048, last_lba - 2048, 0, "data".encode("utf-16-le"))
    entries = entry + b"\0" * (128 * 128 - len(entry))
    fields = (b"EFI PART", 0x00010000, 92, 0, 0, 1, last_lba, 34, last_lba - 34, uuid.uuid4().bytes_le, 2, 128,
              128, zlib.crc32(entries))
    layout = "<8sIIIIQQQQ16sQIII"
    header = struct.pack(layout, *fields)
    header = struct.pack(layout, *fields[:3], zlib.crc32(header), *fields[4:])
    protective = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0xEE, b"\0\0\0", 1, min(last_lba, 0xFFFFFFFF))
    with open(device, "r+b") as dev:
        dev.seek(446)
        dev.write(protective)
        dev.seek(510)
        dev.write(b"\x55\xaa")
        dev.seek(SECTOR)
        dev.write(header)
        dev.seek(2 * SECTOR)
        dev.write(entries)


@pytest.fixture
def blank_device(tmp_path: Path, loops: LoopTracker) -> str:
    return loops.attach(sparse_file(tmp_path / "disk.img", 400 << 20)).path


def test_parse_wipefs() -> None:
    assert xfs.parse_wipefs("") == []
    out = '{"signatures": [{"type": "gpt", "offset": "0x200", "usage": "partition table"}]}'
    assert xfs.parse_wipefs(out) == [xfs.Signature("gpt", 0x200, "partition table")]


def test_mkfs_command() -> None:
    assert xfs.mkfs_command("/dev/loop9", label="pool", force=True) == [
        "mkfs.xfs", "-q", "-m", "crc=1,reflink=1", "-L", "pool", "-f", "/dev/loop9"]


def test_blank_device_is_formatted_with_reflink(blank_device: str, tmp_path: Path, mounted: MountTracker) -> None:
    assert xfs.signatures(blank_device) == []
    xfs.make_filesystem(blank_device, label="pool")
    assert [s.type for s in xfs.signatures(blank_device)] == ["xfs"]
    target = tmp_path / "mnt"
    target.mkdir()
    mounted.add(target)
    xfs.mount_xfs(blank_device, target, quota=False)
    assert xfs.supports_reflink(target)


def test_ext4_device_is_not_formatted(blank_device: str) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", blank_device], check=True)
    with pytest.raises(xfs.DeviceNotBlank, match=r"ext4 \(filesystem\)") as info:
        xfs.make_filesystem(blank_device)
    assert info.value.device == blank_device
    assert [s.type for s in xfs.signatures(blank_device)] == ["ext4"]  # untouched


@pytest.mark.parametrize("table", ["dos", "gpt"])
def test_partitioned_device_is_not_formatted(blank_device: str, table: str) -> None:
    if table == "dos":
        write_mbr(blank_device)
    else:
        write_gpt(blank_device, 400 << 20)
    with pytest.raises(xfs.DeviceNotBlank, match="partition-table"):
        xfs.make_filesystem(blank_device)
    assert table in {s.type for s in xfs.signatures(blank_device)}


def test_force_formats_a_used_device(blank_device: str) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", blank_device], check=True)
    xfs.make_filesystem(blank_device, force=True)
    assert [s.type for s in xfs.signatures(blank_device)] == ["xfs"]


def test_mount_reports_whether_quotas_are_enforced(xfs_pool: XfsPool) -> None:
    result = xfs_pool.result
    assert mounts.is_mount_point(xfs_pool.mount_point)
    assert xfs.quotas_enforced(xfs_pool.mount_point) is result.quotas_enforced
    if xfs.kernel_supports_xfs_quota():
        assert result.quotas_enforced and result.reason == ""
    else:  # this CI host: the kernel is built without CONFIG_XFS_QUOTA (the VM test covers quotas)
        assert not result.quotas_enforced
        assert result.reason == xfs.QUOTA_UNAVAILABLE == "quota support not available in this kernel"


@pytest.mark.skipif(xfs.kernel_supports_xfs_quota(), reason="the kernel has XFS quota support")
def test_require_quota_fails_clearly_and_leaves_nothing_mounted(blank_device: str, tmp_path: Path,
                                                                 mounted: MountTracker) -> None:
    xfs.make_filesystem(blank_device)
    target = tmp_path / "mnt"
    target.mkdir()
    mounted.add(target)
    with pytest.raises(xfs.QuotaUnavailable, match="quota support not available in this kernel"):
        xfs.mount_xfs(blank_device, target, require_quota=True)
    assert not mounts.is_mount_point(target)


@pytest.mark.skipif(xfs.kernel_supports_xfs_quota(), reason="the kernel has XFS quota support")
def test_quota_calls_without_kernel_support_say_why(xfs_pool: XfsPool) -> None:
    with pytest.raises(xfs.QuotaUnavailable, match="quota"):
        xfs.set_project_limit(xfs_pool.mount_point, 1000, 20 << 20)
    with pytest.raises(xfs.QuotaUnavailable):
        xfs.project_quota(xfs_pool.mount_point, 1000)


def test_reflink_is_not_supported_on_ext4(tmp_path: Path) -> None:
    assert not xfs.supports_reflink(tmp_path)


def test_set_project_covers_existing_content_and_new_files(xfs_pool: XfsPool) -> None:
    volume = xfs_pool.mount_point / "pvc-1"
    (volume / "sub").mkdir(parents=True)
    (volume / "sub" / "old.txt").write_text("before")
    (volume / "link").symlink_to("/etc/hostname")
    xfs.set_project(volume, 1234)
    (volume / "sub" / "new.txt").write_text("after")
    (volume / "newdir").mkdir()
    for path in ["", "sub", "sub/old.txt", "sub/new.txt", "newdir"]:
        assert xfs.project_id(volume / path) == 1234, path
    assert xfs.project_id("/etc/hostname") == 0 or os.stat("/etc/hostname").st_dev != os.stat(volume).st_dev
    with pytest.raises(ValueError):
        xfs.set_project(volume, 0)


def test_free_project_ids_come_from_the_directories(xfs_pool: XfsPool) -> None:
    pool = xfs_pool.mount_point
    assert xfs.free_project_id(pool) == xfs.FIRST_PROJECT_ID
    for name, project in [("a", 1000), ("b", 1001), ("c", 1003)]:
        (pool / name).mkdir()
        xfs.set_project(pool / name, project)
    (pool / "dangling").symlink_to("/nonexistent")
    assert xfs.used_project_ids(pool) == {1000, 1001, 1003}
    assert xfs.free_project_id(pool) == 1002  # the lowest gap: the same answer for the same contents
    (pool / "d").mkdir()
    xfs.set_project(pool / "d", 1002)
    assert xfs.free_project_id(pool) == 1004
    assert xfs.choose_project_id({5, 6}, first=5) == 7


def test_grow_after_the_backing_file_grew(xfs_pool: XfsPool) -> None:
    before = xfs.filesystem_size(xfs_pool.mount_point)
    os.truncate(xfs_pool.backing, 1 << 30)
    assert loop.refresh_capacity(xfs_pool.device) == 1 << 30
    after = xfs.grow_filesystem(xfs_pool.mount_point)
    assert after > before + (400 << 20)
    assert xfs.filesystem_size(xfs_pool.mount_point) == after


def test_grow_reports_a_failure_with_the_command(tmp_path: Path) -> None:
    with pytest.raises(xfs.CommandFailed, match="xfs_growfs"):
        xfs.grow_filesystem(tmp_path)


def test_project_id_of_a_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        xfs.project_id(tmp_path / "missing")
    assert info.value.errno == errno.ENOENT
