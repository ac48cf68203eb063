"""Block volumes over a real driver: a sparse image in the pool, published as a loop device bind-mounted on a
target file; nothing may leak (no loop device on an image once its last target is gone, restarts included)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import grpc
import pytest
from drivertools import MiB, loops_backing, mounts_at, rpc_error, unique

from hpp_csi.spec import csi_pb2 as csi

from .conftest import LoopTracker
from .poolkit import PoolDriver, device_size

SIZE = 64 * MiB
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def loop_at(target: Path) -> str:
    """The block device node at `target`, named from its device number through sysfs."""
    st = os.stat(target)
    assert stat.S_ISBLK(st.st_mode), f"{target} is not a block device"
    return "/dev/" + Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}").resolve().name


def read_at(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def volume(driver: PoolDriver) -> str:
    return driver.create(unique("blk"), SIZE, block=True).volume_id


def test_a_block_volume_is_a_sparse_file_of_its_capacity(driver: PoolDriver) -> None:
    created = driver.create(unique("blk"), SIZE, block=True)
    image = driver.volume_path(created.volume_id)
    assert created.capacity_bytes == SIZE and created.volume_context["sizeEnforced"] == "true"
    assert stat.S_ISREG(image.lstat().st_mode) and image.stat().st_size == SIZE
    assert image.stat().st_blocks == 0


def test_publish_binds_a_loop_device_that_reads_and_writes_the_image(driver: PoolDriver, volume: str) -> None:
    image, target = driver.volume_path(volume), driver.new_target()
    driver.publish(volume, target)
    device = loop_at(target)
    assert loops_backing(image) == [device] and len(mounts_at(target)) == 1
    assert device_size(target) == SIZE

    payload = os.urandom(MiB)
    write_at(target, 7 * MiB, payload)
    assert read_at(target, 7 * MiB, MiB) == payload
    assert read_at(image, 7 * MiB, MiB) == payload, "data written through the device must land in the image"

    driver.publish(volume, target)  # idempotent: no second mount, no second device
    assert len(mounts_at(target)) == 1 and loops_backing(image) == [device]
    with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
        driver.publish(volume, target, readonly=True)

    read_only = driver.new_target()
    driver.publish(volume, read_only, readonly=True)
    assert read_at(read_only, 7 * MiB, MiB) == payload
    with pytest.raises(OSError) as refused:
        write_at(read_only, 0, b"must not land")
    assert refused.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert read_at(image, 0, 13) == b"\0" * 13

    for path in (target, read_only):
        driver.unpublish(volume, path)
        assert not os.path.lexists(path) and mounts_at(path) == []
        driver.unpublish(volume, path)  # idempotent
    assert loops_backing(image) == [], "unpublish must detach the loop devices"


def test_access_type_must_match_the_volume(driver: PoolDriver, volume: str) -> None:
    filesystem = driver.create(unique("fs"), SIZE).volume_id
    target = driver.new_target()
    with rpc_error(INVALID_ARGUMENT, "mount volume and cannot be published as block"):
        driver.publish(filesystem, target, block=True)
    with rpc_error(INVALID_ARGUMENT, "block volume and cannot be published as mount"):
        driver.publish(volume, target, block=False)
    assert mounts_at(target) == [] and loops_backing(driver.volume_path(volume)) == []


def test_unpublish_after_a_restart_still_detaches(driver: PoolDriver, volume: str) -> None:
    image, target = driver.volume_path(volume), driver.new_target()
    driver.publish(volume, target)
    device = loop_at(target)
    write_at(target, 0, b"before the crash")
    driver.restart()
    driver.publish(volume, target)  # kubelet retries: still idempotent after the restart
    assert loops_backing(image) == [device] and len(mounts_at(target)) == 1
    stats: csi.NodeGetVolumeStatsResponse = driver.node.NodeGetVolumeStats(
        csi.NodeGetVolumeStatsRequest(volume_id=volume, volume_path=str(target)))
    assert not stats.volume_condition.abnormal and stats.usage[0].total == SIZE
    driver.unpublish(volume, target)
    assert not os.path.lexists(target) and loops_backing(image) == []
    assert read_at(image, 0, 16) == b"before the crash"


def test_a_published_block_volume_cannot_be_deleted(driver: PoolDriver, volume: str) -> None:
    image, target = driver.volume_path(volume), driver.new_target()
    driver.publish(volume, target)
    with rpc_error(grpc.StatusCode.FAILED_PRECONDITION, str(target)):
        driver.delete(volume)
    assert image.is_file() and device_size(target) == SIZE
    driver.unpublish(volume, target)
    driver.delete(volume)
    assert not os.path.lexists(image) and loops_backing(image) == []
    assert volume not in driver.listed_ids()


def test_a_loop_device_left_by_a_crash_is_detached_at_start(driver: PoolDriver, volume: str,
                                                            loops: LoopTracker) -> None:
    image, target = driver.volume_path(volume), driver.new_target()
    driver.publish(volume, target)
    used = loop_at(target)
    leftover = loops.attach(image)  # as if the driver died between attaching and bind-mounting
    assert loops_backing(image) == sorted([used, leftover])
    driver.restart()
    assert loops_backing(image) == [used], "only the device a target uses may stay"
    driver.unpublish(volume, target)
    assert loops_backing(image) == []
