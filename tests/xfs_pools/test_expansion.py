"""Online expansion over a real driver: ControllerExpandVolume grows the volume (never shrinks it), and
NodeExpandVolume makes a published block device show the new size to a writer that already has it open."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from drivertools import MiB, rpc_error, unique

from hpp_csi.spec import csi_pb2 as csi

from .poolkit import PoolDriver, device_size

INVALID_ARGUMENT, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def expand(driver: PoolDriver, volume_id: str, size: int) -> csi.ControllerExpandVolumeResponse:
    reply: csi.ControllerExpandVolumeResponse = driver.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(volume_id=volume_id, capacity_range=csi.CapacityRange(required_bytes=size)))
    return reply


def node_expand(driver: PoolDriver, volume_id: str, path: Path | str, size: int = 0) -> csi.NodeExpandVolumeResponse:
    reply: csi.NodeExpandVolumeResponse = driver.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(
        volume_id=volume_id, volume_path=str(path), capacity_range=csi.CapacityRange(required_bytes=size)))
    return reply


@pytest.fixture
def published(driver: PoolDriver) -> Iterator[tuple[str, Path]]:
    """A 32 MiB block volume published at a target; unpublished afterwards."""
    volume = driver.create(unique("grow"), 32 * MiB, block=True).volume_id
    target = driver.new_target()
    driver.publish(volume, target)
    yield volume, target
    driver.unpublish(volume, target)


def test_online_expansion_is_advertised(driver: PoolDriver) -> None:
    plugin: csi.GetPluginCapabilitiesResponse = driver.identity.GetPluginCapabilities(
        csi.GetPluginCapabilitiesRequest())
    expansion = [c.volume_expansion.type for c in plugin.capabilities if c.HasField("volume_expansion")]
    assert expansion == [csi.PluginCapability.VolumeExpansion.ONLINE]
    controller: csi.ControllerGetCapabilitiesResponse = driver.controller.ControllerGetCapabilities(
        csi.ControllerGetCapabilitiesRequest())
    # Expansion happens on the node (kubelet's NodeExpandVolume); the controller advertises none, so one
    # cluster-wide csi-resizer only records the new size (docs/deployment.md).
    assert csi.ControllerServiceCapability.RPC.EXPAND_VOLUME not in {c.rpc.type for c in controller.capabilities}
    node: csi.NodeGetCapabilitiesResponse = driver.node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest())
    assert csi.NodeServiceCapability.RPC.EXPAND_VOLUME in {c.rpc.type for c in node.capabilities}


def test_controller_expand_validates_its_request(driver: PoolDriver) -> None:
    volume = driver.create(unique("v"), 16 * MiB).volume_id
    call = driver.controller.ControllerExpandVolume
    with rpc_error(INVALID_ARGUMENT, "volume_id"):
        call(csi.ControllerExpandVolumeRequest(capacity_range=csi.CapacityRange(required_bytes=MiB)))
    with rpc_error(INVALID_ARGUMENT, "capacity_range"):
        call(csi.ControllerExpandVolumeRequest(volume_id=volume))
    with rpc_error(INVALID_ARGUMENT, "capacity_range"):
        call(csi.ControllerExpandVolumeRequest(volume_id=volume, capacity_range=csi.CapacityRange()))
    with rpc_error(NOT_FOUND, "pvc-missing"):
        expand(driver, "pvc-missing", 32 * MiB)


def test_node_expand_validates_its_request(driver: PoolDriver, published: tuple[str, Path]) -> None:
    volume, target = published
    call = driver.node.NodeExpandVolume
    with rpc_error(INVALID_ARGUMENT, "volume_id"):
        call(csi.NodeExpandVolumeRequest(volume_path=str(target)))
    with rpc_error(INVALID_ARGUMENT, "volume_path"):
        call(csi.NodeExpandVolumeRequest(volume_id=volume))
    with rpc_error(NOT_FOUND, "pvc-missing"):
        node_expand(driver, "pvc-missing", target)


def test_a_published_block_volume_grows_under_an_open_writer(driver: PoolDriver,
                                                            published: tuple[str, Path]) -> None:
    volume, target = published
    image = driver.volume_path(volume)
    writer = os.open(target, os.O_RDWR)
    try:
        grown = expand(driver, volume, 64 * MiB)
        assert (grown.capacity_bytes, grown.node_expansion_required) == (64 * MiB, True)
        assert image.stat().st_size == 64 * MiB
        assert node_expand(driver, volume, target, 64 * MiB).capacity_bytes == 64 * MiB
        assert device_size(target) == 64 * MiB
        payload = os.urandom(MiB)
        assert os.pwrite(writer, payload, 48 * MiB) == MiB, "the open writer must reach past the old end"
        os.fsync(writer)
    finally:
        os.close(writer)
    with open(image, "rb") as f:
        f.seek(48 * MiB)
        assert f.read(MiB) == payload

    assert expand(driver, volume, 16 * MiB).capacity_bytes == 64 * MiB  # smaller: the current size, no shrink
    assert expand(driver, volume, 64 * MiB).capacity_bytes == 64 * MiB  # same: idempotent
    assert image.stat().st_size == 64 * MiB and device_size(target) == 64 * MiB


def test_a_filesystem_volume_grows_without_node_work(driver: PoolDriver) -> None:
    volume = driver.create(unique("fs"), 16 * MiB).volume_id
    grown = expand(driver, volume, 32 * MiB)
    assert (grown.capacity_bytes, grown.node_expansion_required) == (32 * MiB, False)
    got: csi.ControllerGetVolumeResponse = driver.controller.ControllerGetVolume(
        csi.ControllerGetVolumeRequest(volume_id=volume))
    assert got.volume.capacity_bytes == 32 * MiB
    target = driver.new_target("mnt")
    driver.publish(volume, target, block=False)
    try:
        assert node_expand(driver, volume, target).capacity_bytes == 32 * MiB
        assert os.path.ismount(target)
    finally:
        driver.unpublish(volume, target)
