"""Block volumes: a sparse image per volume, published as a loop device node bound onto a target file."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from csikit import usage_of
from drivertools import (
    AccessMode,
    Driver,
    MiB,
    block_cap,
    create_request,
    is_mounted,
    mount_cap,
    rpc_error,
    unique,
)

from hpp_csi.linux import loop
from hpp_csi.spec import csi_pb2 as csi

pytestmark = pytest.mark.timeout(60)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def make_block(driver: Driver, size: int = 8 * MiB, pool: str | None = None) -> str:
    reply = driver.controller.CreateVolume(create_request(unique("blk"), size, pool=pool, caps=[block_cap()]))
    return str(reply.volume.volume_id)


def loops_of(driver: Driver, volume_id: str) -> list[str]:
    """Loop devices attached to the volume's image, by the inode they back (a restarted driver container's
    devices show a path of its dead namespace in sysfs)."""
    image = os.stat(driver.volume_path(volume_id))
    return [dev.path for dev in loop.devices_backing_inode(image.st_dev, image.st_ino)]


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class TestCreate:
    def test_image_of_the_asked_size(self, driver: Driver) -> None:
        name = make_block(driver, 8 * MiB)
        image = driver.volume_path(name)
        assert image.is_file() and image.stat().st_size == 8 * MiB
        assert image.stat().st_blocks * 512 < MiB  # sparse: nothing is written up front
        volume = driver.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=name)).volume
        assert volume.capacity_bytes == 8 * MiB and volume.volume_context["sizeEnforced"] == "true"

    def test_idempotent_and_conflicts(self, driver: Driver) -> None:
        request = create_request(unique("blk"), 4 * MiB, caps=[block_cap()])
        first = driver.controller.CreateVolume(request).volume
        assert driver.controller.CreateVolume(request).volume == first
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS, "access type"):
            driver.controller.CreateVolume(create_request(first.volume_id, 4 * MiB))

    def test_validate_capabilities(self, driver: Driver) -> None:
        name = make_block(driver)
        confirmed = driver.controller.ValidateVolumeCapabilities(
            csi.ValidateVolumeCapabilitiesRequest(volume_id=name, volume_capabilities=[block_cap()]))
        assert confirmed.HasField("confirmed")
        refused = driver.controller.ValidateVolumeCapabilities(
            csi.ValidateVolumeCapabilitiesRequest(volume_id=name, volume_capabilities=[mount_cap()]))
        assert not refused.HasField("confirmed") and refused.message

    def test_larger_than_pool(self, driver: Driver) -> None:
        with rpc_error(grpc.StatusCode.OUT_OF_RANGE):
            make_block(driver, 1 << 40, pool="fast")


class TestPublish:
    def test_publish_write_unpublish(self, driver: Driver, target: str) -> None:
        name = make_block(driver)
        driver.publish(name, target, cap=block_cap())
        assert stat.S_ISBLK(os.stat(target).st_mode) and is_mounted(target)
        assert device_size(target) == 8 * MiB
        fd = os.open(target, os.O_WRONLY)
        try:
            os.pwrite(fd, b"B" * 4096, MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(driver.volume_path(name), "rb") as image:
            image.seek(MiB)
            assert image.read(4096) == b"B" * 4096
        assert len(loops_of(driver, name)) == 1
        for _ in range(10):
            driver.publish(name, target, cap=block_cap())  # idempotent
        assert len(loops_of(driver, name)) == 1
        with rpc_error(grpc.StatusCode.FAILED_PRECONDITION):
            driver.delete(name)
        driver.unpublish(name, target)
        assert not os.path.lexists(target) and loops_of(driver, name) == []
        driver.unpublish(name, target)
        driver.delete(name)
        assert not driver.volume_path(name).exists()

    def test_read_only(self, driver: Driver, target: str) -> None:
        name = make_block(driver)
        driver.publish(name, target, readonly=True, cap=block_cap())
        fd = os.open(target, os.O_WRONLY)  # the kernel lets a read-only device be opened, not written
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"X" * 4096, 0)
        finally:
            os.close(fd)
        assert info.value.errno in (errno.EPERM, errno.EROFS)
        assert driver.volume_path(name).read_bytes()[:4096] == bytes(4096)
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            driver.publish(name, target, cap=block_cap())
        driver.unpublish(name, target)
        assert loops_of(driver, name) == []

    def test_wrong_access_type(self, driver: Driver, target: str) -> None:
        name = make_block(driver)
        with rpc_error(INVALID):
            driver.publish(name, target, cap=mount_cap())
        directory = driver.create(unique(), MiB).volume_id
        with rpc_error(INVALID):
            driver.publish(directory, target, cap=block_cap())
        assert not is_mounted(target)

    def test_second_target(self, driver: Driver, target: str) -> None:
        name = make_block(driver)
        snsw = block_cap(AccessMode.SINGLE_NODE_SINGLE_WRITER)
        driver.publish(name, target, cap=snsw)
        other = os.path.join(os.path.dirname(target), "other")
        with rpc_error(grpc.StatusCode.FAILED_PRECONDITION):
            driver.publish(name, other, cap=snsw)
        driver.publish(name, other, cap=block_cap(AccessMode.SINGLE_NODE_MULTI_WRITER))
        driver.unpublish(name, target)
        assert len(loops_of(driver, name)) == 1  # still used by the other target
        driver.unpublish(name, other)
        assert loops_of(driver, name) == []

    def test_stats(self, driver: Driver, target: str) -> None:
        name = make_block(driver)
        driver.publish(name, target, cap=block_cap())
        reply = driver.stats(name, target)
        assert not reply.volume_condition.abnormal
        assert usage_of(reply, csi.VolumeUsage.Unit.BYTES).total == 8 * MiB
        elsewhere = Path(target).parent / "not-published"
        elsewhere.touch()
        assert driver.stats(name, elsewhere).volume_condition.abnormal

    def test_listed_as_published(self, driver: Driver, target: str) -> None:
        name = make_block(driver)
        driver.publish(name, target, cap=block_cap())
        [entry] = [e for e in driver.list_all() if e.volume.volume_id == name]
        assert list(entry.status.published_node_ids) == [driver.node_id]

    def test_online_expansion_on_the_node(self, driver: Driver, target: str) -> None:
        """As kubelet does it: NodeExpandVolume with the PV's new size grows the file and the loop device."""
        name = make_block(driver, 4 * MiB)
        driver.publish(name, target, cap=block_cap())
        node = driver.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(
            volume_id=name, volume_path=target, capacity_range=csi.CapacityRange(required_bytes=10 * MiB)))
        assert node.capacity_bytes == 10 * MiB
        assert driver.volume_path(name).stat().st_size == 10 * MiB
        assert device_size(target) == 10 * MiB

    def test_online_expansion(self, driver: Driver, target: str) -> None:
        name = make_block(driver, 4 * MiB)
        driver.publish(name, target, cap=block_cap())
        reply = driver.controller.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(
            volume_id=name, capacity_range=csi.CapacityRange(required_bytes=12 * MiB)))
        assert reply.capacity_bytes == 12 * MiB and reply.node_expansion_required
        assert driver.volume_path(name).stat().st_size == 12 * MiB
        node = driver.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(volume_id=name, volume_path=target))
        assert node.capacity_bytes == 12 * MiB
        assert device_size(target) == 12 * MiB


def test_block_publication_survives_restart(spawn: Callable[..., Driver]) -> None:
    proc = spawn().start()
    name = make_block(proc)
    target = str(proc.new_target())
    proc.publish(name, target, cap=block_cap())
    proc.restart()
    assert len(loops_of(proc, name)) == 1
    proc.publish(name, target, cap=block_cap())  # still idempotent: found in the kernel, not in memory
    assert len(loops_of(proc, name)) == 1
    assert not proc.stats(name, target).volume_condition.abnormal
    with rpc_error(grpc.StatusCode.FAILED_PRECONDITION):
        proc.delete(name)
    proc.unpublish(name, target)
    assert loops_of(proc, name) == []
    proc.delete(name)
