"""Node service: bind mounts on real targets, from the CSI spec v1.12.0 and csi-sanity's node.go."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import grpc
import pytest
from csikit import TOPOLOGY_KEY, usage_of
from drivertools import (
    NODE_ID,
    AccessMode,
    Driver,
    MiB,
    block_cap,
    is_mounted,
    mount_cap,
    mount_table,
    mounts_at,
    rpc_error,
    umount,
    unique,
)

from hpp_csi.spec import csi_pb2 as csi

pytestmark = pytest.mark.timeout(60)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
NodeRPC = csi.NodeServiceCapability.RPC
Unit = csi.VolumeUsage.Unit


@pytest.fixture
def volume(driver: Driver) -> str:
    return driver.create(unique(), 16 * MiB).volume_id


def publish_request(volume_id: str = "", target: str = "", cap: csi.VolumeCapability | None = None,
                    readonly: bool = False) -> csi.NodePublishVolumeRequest:
    request = csi.NodePublishVolumeRequest(volume_id=volume_id, target_path=target, readonly=readonly)
    if cap is not None:
        request.volume_capability.CopyFrom(cap)
    return request


# --- NodePublishVolume --------------------------------------------------------------------------------------
class TestNodePublishValidation:
    """csi-sanity sends these with IDs that do not exist: fields are checked before the volume is looked up."""

    def test_no_volume_id(self, driver: Driver, target: str) -> None:
        with rpc_error(INVALID, "volume_id"):
            driver.node.NodePublishVolume(publish_request("", target, mount_cap()))

    def test_no_target(self, driver: Driver) -> None:
        with rpc_error(INVALID, "target_path"):
            driver.node.NodePublishVolume(publish_request("fake-vol-id-0123456789", "", mount_cap()))

    def test_no_capability(self, driver: Driver, target: str) -> None:
        with rpc_error(INVALID, "volume_capability"):
            driver.node.NodePublishVolume(publish_request("fake-vol-id-0123456789", target))
        assert not os.path.exists(target)

    def test_order_id_then_target_then_capability(self, driver: Driver) -> None:
        with rpc_error(INVALID, "volume_id"):
            driver.node.NodePublishVolume(publish_request())
        with rpc_error(INVALID, "target_path"):
            driver.node.NodePublishVolume(publish_request("fake-vol-id"))

    def test_unknown_volume(self, driver: Driver, target: str) -> None:
        with rpc_error(NOT_FOUND):
            driver.node.NodePublishVolume(publish_request("fake-vol-id-0123456789", target, mount_cap()))
        assert not is_mounted(target)

    @pytest.mark.parametrize("bad", ["relative/target", "./target", "{parent}/../escape/target",
                                     "{parent}/a/../target"])
    def test_bad_target(self, driver: Driver, volume: str, target: str, bad: str) -> None:
        path = bad.format(parent=os.path.dirname(target))
        with rpc_error(INVALID, "target_path"):
            driver.publish(volume, path)
        assert not any(m.root.endswith("/" + volume) for m in mount_table())

    def test_root_target(self, driver: Driver, volume: str) -> None:
        with rpc_error(INVALID):
            driver.publish(volume, "/")

    def test_block_capability(self, driver: Driver, volume: str, target: str) -> None:
        with rpc_error(INVALID, "block"):
            driver.publish(volume, target, cap=block_cap())

    def test_unknown_mount_flag(self, driver: Driver, volume: str, target: str) -> None:
        with rpc_error(INVALID, "nosuchflag"):
            driver.publish(volume, target, cap=mount_cap(flags=["nosuchflag"]))
        assert not is_mounted(target)

    def test_multi_node_mode(self, driver: Driver, volume: str, target: str) -> None:
        with rpc_error(INVALID):
            driver.publish(volume, target, cap=mount_cap(AccessMode.MULTI_NODE_MULTI_WRITER))


class TestNodePublish:
    def test_creates_target_and_mounts_volume(self, driver: Driver, volume: str, target: str) -> None:
        assert not os.path.exists(target)
        driver.publish(volume, target)
        assert os.path.isdir(target)
        [entry] = mounts_at(target)
        assert entry.root.endswith("/" + volume)
        Path(target, "written-through-target").write_text("hello")
        assert (driver.volume_path(volume) / "written-through-target").read_text() == "hello"
        (driver.volume_path(volume) / "written-in-volume").write_text("back")
        assert Path(target, "written-in-volume").read_text() == "back"

    def test_target_already_exists(self, driver: Driver, volume: str, target: str) -> None:
        os.mkdir(target)
        driver.publish(volume, target)
        assert is_mounted(target)

    def test_no_driver_files_in_target(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        assert os.listdir(target) == []

    def test_read_only(self, driver: Driver, volume: str, target: str) -> None:
        (driver.volume_path(volume) / "existing").write_text("data")
        driver.publish(volume, target, readonly=True)
        assert "ro" in mounts_at(target)[0].options
        assert Path(target, "existing").read_text() == "data"
        with pytest.raises(OSError) as info:
            Path(target, "new").write_text("x")
        assert info.value.errno == errno.EROFS
        (driver.volume_path(volume) / "still-writable").write_text("x")  # only the target is read-only

    def test_reader_only_mode_is_read_only(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target, cap=mount_cap(AccessMode.SINGLE_NODE_READER_ONLY))
        assert "ro" in mounts_at(target)[0].options

    def test_mount_flags(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target, cap=mount_cap(flags=["noexec", "nosuid,nodev"]))
        options = mounts_at(target)[0].options
        assert {"noexec", "nosuid", "nodev", "rw"} <= options
        script = driver.volume_path(volume) / "run.sh"
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
        with pytest.raises(PermissionError):
            subprocess.run([os.path.join(target, "run.sh")], check=True)

    def test_idempotent(self, driver: Driver, volume: str, target: str) -> None:
        for _ in range(10):
            driver.publish(volume, target, cap=mount_cap(flags=["noexec"]))
        assert len(mounts_at(target)) == 1

    def test_idempotent_read_only(self, driver: Driver, volume: str, target: str) -> None:
        for _ in range(3):
            driver.publish(volume, target, readonly=True)
        assert len(mounts_at(target)) == 1

    def test_same_target_other_readonly(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            driver.publish(volume, target, readonly=True)
        assert "rw" in mounts_at(target)[0].options and len(mounts_at(target)) == 1

    def test_same_target_other_flags(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            driver.publish(volume, target, cap=mount_cap(flags=["noexec"]))

    def test_same_target_other_volume(self, driver: Driver, volume: str, target: str) -> None:
        other = driver.create(unique(), MiB).volume_id
        driver.publish(volume, target)
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            driver.publish(other, target)
        assert mounts_at(target)[0].root.endswith("/" + volume)

    def test_single_writer_second_target(self, driver: Driver, volume: str, target: str) -> None:
        snsw = mount_cap(AccessMode.SINGLE_NODE_SINGLE_WRITER)
        driver.publish(volume, target, cap=snsw)
        driver.publish(volume, target, cap=snsw)  # the same target stays idempotent
        other = os.path.join(os.path.dirname(target), "other_target")
        with rpc_error(grpc.StatusCode.FAILED_PRECONDITION):
            driver.publish(volume, other, cap=snsw)
        assert not is_mounted(other)

    def test_multi_writer_second_target(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        other = os.path.join(os.path.dirname(target), "other_target")
        driver.publish(volume, other, cap=mount_cap(AccessMode.SINGLE_NODE_MULTI_WRITER))
        Path(target, "shared").write_text("both")
        assert Path(other, "shared").read_text() == "both"

    def test_symlinked_target_refused(self, driver: Driver, volume: str, target: str) -> None:
        elsewhere = Path(os.path.dirname(target)) / "elsewhere"
        elsewhere.mkdir()
        os.symlink(elsewhere, target)
        with rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "symlink"):
            driver.publish(volume, target)
        assert not is_mounted(elsewhere) and not is_mounted(target)

    def test_symlinked_volume_refused(self, driver: Driver, target: str) -> None:
        """A volume folder replaced by a symlink (say to /etc) must not be mounted into a pod."""
        name = unique()
        driver.create(name, MiB)
        outside = driver.root / unique("outside")
        outside.mkdir()
        path = driver.volume_path(name)
        path.rmdir()
        path.symlink_to(outside)
        with pytest.raises(grpc.RpcError):
            driver.publish(name, target)
        assert not is_mounted(target)

    def test_missing_volume_data(self, driver: Driver, volume: str, target: str) -> None:
        driver.volume_path(volume).rmdir()
        with rpc_error(NOT_FOUND):
            driver.publish(volume, target)
        assert not is_mounted(target)


# --- NodeUnpublishVolume ------------------------------------------------------------------------------------
class TestNodeUnpublish:
    def test_no_volume_id(self, driver: Driver, target: str) -> None:
        with rpc_error(INVALID):
            driver.unpublish("", target)

    def test_no_target(self, driver: Driver, volume: str) -> None:
        with rpc_error(INVALID):
            driver.unpublish(volume, "")

    def test_removes_target(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        Path(target, "data").write_text("persisted")
        driver.unpublish(volume, target)
        assert not os.path.lexists(target)
        assert not is_mounted(target)
        assert (driver.volume_path(volume) / "data").read_text() == "persisted"

    def test_idempotent(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        for _ in range(3):
            driver.unpublish(volume, target)
        assert not os.path.lexists(target)

    def test_never_published(self, driver: Driver, volume: str, target: str) -> None:
        driver.unpublish(volume, target)
        driver.unpublish("fake-vol-id-0123456789", target)

    def test_empty_unmounted_target_removed(self, driver: Driver, volume: str, target: str) -> None:
        os.mkdir(target)
        driver.unpublish(volume, target)
        assert not os.path.lexists(target)

    def test_keeps_files_of_unmounted_target(self, driver: Driver, volume: str, target: str) -> None:
        os.mkdir(target)
        Path(target, "precious").write_text("keep me")
        with pytest.raises(grpc.RpcError) as info:
            driver.unpublish(volume, target)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert Path(target, "precious").read_text() == "keep me"

    def test_unmounted_behind_drivers_back(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        umount(target)
        driver.unpublish(volume, target)
        assert not os.path.lexists(target)

    def test_stacked_mounts(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        subprocess.run(["mount", "--bind", str(driver.volume_path(volume)), target], check=True)
        assert len(mounts_at(target)) == 2
        driver.unpublish(volume, target)
        assert not is_mounted(target) and not os.path.lexists(target)

    def test_then_delete(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        driver.unpublish(volume, target)
        driver.delete(volume)
        assert not driver.volume_path(volume).exists()


# --- NodeGetVolumeStats -------------------------------------------------------------------------------------
class TestNodeGetVolumeStats:
    def test_no_volume_id(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            driver.stats("", "some/path")

    def test_no_path(self, driver: Driver, volume: str) -> None:
        with rpc_error(INVALID):
            driver.stats(volume, "")

    def test_unknown_volume(self, driver: Driver) -> None:
        with rpc_error(NOT_FOUND):
            driver.stats("fake-vol-id-0123456789", "some/path")

    def test_unknown_volume_real_path(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        with rpc_error(NOT_FOUND):
            driver.stats("fake-vol-id-0123456789", target)

    @pytest.mark.parametrize("path", ["some/path", "/nonexistent/some/path"])
    def test_volume_not_at_path(self, driver: Driver, volume: str, target: str, path: str) -> None:
        driver.publish(volume, target)
        with rpc_error(NOT_FOUND):
            driver.stats(volume, path)

    def test_usage_reflects_data(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        before = driver.stats(volume, target)
        assert not before.volume_condition.abnormal
        with open(os.path.join(target, "blob"), "wb") as f:
            f.write(os.urandom(4 * MiB))
            os.fsync(f.fileno())
        os.mkdir(os.path.join(target, "sub"))
        Path(target, "sub", "small").write_text("x")
        after = driver.stats(volume, target)
        bytes_before, bytes_after = usage_of(before, Unit.BYTES), usage_of(after, Unit.BYTES)
        assert bytes_after.used - bytes_before.used >= 4 * MiB
        assert bytes_after.total == 16 * MiB  # the capacity asked for
        assert bytes_after.available == pytest.approx(16 * MiB - bytes_after.used, abs=MiB)
        inodes_before, inodes_after = usage_of(before, Unit.INODES), usage_of(after, Unit.INODES)
        assert inodes_after.used - inodes_before.used == 3
        assert inodes_after.total > 0 and inodes_after.available > 0

    def test_no_capacity_reports_pool(self, driver: Driver, target: str) -> None:
        name = driver.create(unique(), pool="fast").volume_id
        driver.publish(name, target)
        usage = usage_of(driver.stats(name, target), Unit.BYTES)
        pool = os.statvfs(driver.pool_path("fast"))
        assert usage.total == pool.f_blocks * pool.f_frsize

    def test_abnormal_when_not_mounted(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        umount(target)
        reply = driver.stats(volume, target)
        assert reply.volume_condition.abnormal and reply.volume_condition.message

    def test_abnormal_when_data_missing(self, driver: Driver, target: str) -> None:
        name = driver.create(unique(), MiB).volume_id
        os.mkdir(target)
        driver.volume_path(name).rmdir()
        reply = driver.stats(name, target)
        assert reply.volume_condition.abnormal
        driver.delete(name)

    def test_stats_on_unpublished_target(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        driver.unpublish(volume, target)
        with rpc_error(NOT_FOUND):
            driver.stats(volume, target)


# --- capabilities and info ----------------------------------------------------------------------------------
def node_capabilities(driver: Driver) -> set[int]:
    reply = driver.node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest())
    return {cap.rpc.type for cap in reply.capabilities}


def test_node_capabilities(driver: Driver) -> None:
    kinds = node_capabilities(driver)
    assert {NodeRPC.GET_VOLUME_STATS, NodeRPC.VOLUME_CONDITION} <= kinds
    # What csi-sanity v5.4 accepts (node.go).
    assert kinds <= {NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS, NodeRPC.EXPAND_VOLUME,
                     NodeRPC.VOLUME_CONDITION, NodeRPC.SINGLE_NODE_MULTI_WRITER, NodeRPC.VOLUME_MOUNT_GROUP}
    assert NodeRPC.STAGE_UNSTAGE_VOLUME not in kinds  # so csi-sanity sends an empty staging path


def test_node_info(driver: Driver) -> None:
    reply = driver.node.NodeGetInfo(csi.NodeGetInfoRequest())
    assert reply.node_id == NODE_ID
    assert dict(reply.accessible_topology.segments) == {TOPOLOGY_KEY: NODE_ID}
    assert reply.max_volumes_per_node == 0


@pytest.mark.parametrize("method, request_type, gate", [
    ("NodeStageVolume", csi.NodeStageVolumeRequest, NodeRPC.STAGE_UNSTAGE_VOLUME),
    ("NodeUnstageVolume", csi.NodeUnstageVolumeRequest, NodeRPC.STAGE_UNSTAGE_VOLUME),
], ids=["NodeStageVolume", "NodeUnstageVolume"])
def test_unadvertised_node_rpcs_unimplemented(driver: Driver, method: str, request_type: type, gate: int) -> None:
    assert gate not in node_capabilities(driver)
    with rpc_error(grpc.StatusCode.UNIMPLEMENTED):
        getattr(driver.node, method)(request_type(volume_id="x"))


# --- ephemeral inline volumes -------------------------------------------------------------------------------
EPHEMERAL = {"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "pod"}


class TestEphemeral:
    def test_lifecycle(self, driver: Driver, target: str) -> None:
        name = "csi-" + unique("eph")
        driver.publish(name, target, context=EPHEMERAL)
        path = driver.volume_path(name)
        assert path.is_dir() and is_mounted(target)
        assert name in driver.listed_ids()
        Path(target, "scratch").write_text("x")
        driver.publish(name, target, context=EPHEMERAL)  # idempotent
        driver.unpublish(name, target)
        assert not path.exists() and not os.path.lexists(target)
        assert name not in driver.listed_ids()
        driver.unpublish(name, target)

    def test_in_named_pool(self, driver: Driver, target: str) -> None:
        name = "csi-" + unique("eph")
        driver.publish(name, target, context={**EPHEMERAL, "storagePool": "fast"})
        assert driver.volume_path(name, "fast").is_dir()
        driver.unpublish(name, target)
        assert not driver.volume_path(name, "fast").exists()

    def test_unknown_pool(self, driver: Driver, target: str) -> None:
        name = "csi-" + unique("eph")
        with rpc_error(INVALID):
            driver.publish(name, target, context={**EPHEMERAL, "storagePool": "nosuchpool"})
        assert name not in driver.listed_ids()

    def test_failed_publish_leaves_nothing(self, driver: Driver, volume: str, target: str) -> None:
        driver.publish(volume, target)
        name = "csi-" + unique("eph")
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            driver.publish(name, target, context=EPHEMERAL)
        assert name not in driver.listed_ids()
        assert not driver.volume_path(name).exists()

    def test_persistent_volume_not_taken_as_ephemeral(self, driver: Driver, volume: str, target: str) -> None:
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            driver.publish(volume, target, context=EPHEMERAL)
        assert driver.volume_path(volume).is_dir()
        driver.unpublish(volume, target)
        assert driver.volume_path(volume).is_dir()

    def test_deleted_only_after_last_target(self, driver: Driver, target: str) -> None:
        name = "csi-" + unique("eph")
        other = os.path.join(os.path.dirname(target), "second")
        driver.publish(name, target, context=EPHEMERAL)
        driver.publish(name, other, context=EPHEMERAL)
        driver.unpublish(name, target)
        assert driver.volume_path(name).is_dir()
        assert Path(other).is_dir() and is_mounted(other)
        driver.unpublish(name, other)
        assert not driver.volume_path(name).exists()


# --- paths as real nodes have them ----------------------------------------------------------------------------
class TestPathShapes:
    def test_target_behind_symlinked_folder(self, driver: Driver, target: str) -> None:
        """kubelet's root dir is often reached through a symlink (/var/lib/kubelet -> /data/kubelet)."""
        real = Path(os.path.dirname(target)) / "real-kubelet"
        (real / "pod").mkdir(parents=True)
        link = Path(os.path.dirname(target)) / "kubelet"
        link.symlink_to(real)
        linked_target = str(link / "pod" / "mount")
        name = driver.create(unique(), MiB).volume_id
        for _ in range(3):
            driver.publish(name, linked_target)
        assert len(mounts_at(real / "pod" / "mount")) == 1
        assert not driver.stats(name, linked_target).volume_condition.abnormal
        [entry] = [e for e in driver.list_all() if e.volume.volume_id == name]
        assert list(entry.status.published_node_ids) == [NODE_ID]
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            driver.publish(name, linked_target, readonly=True)
        driver.unpublish(name, linked_target)
        assert not os.path.lexists(real / "pod" / "mount")

    def test_names_with_space_and_backslash(self, driver: Driver, target: str) -> None:
        """mountinfo escapes these as octal; the driver must still recognise its own mounts."""
        name = driver.create("with space\\and backslash-" + unique(), MiB).volume_id
        spaced = os.path.join(os.path.dirname(target), "tar get\\dir")
        for _ in range(2):
            driver.publish(name, spaced)
        assert is_mounted(spaced)
        assert not driver.stats(name, spaced).volume_condition.abnormal
        [entry] = [e for e in driver.list_all() if e.volume.volume_id == name]
        assert list(entry.status.published_node_ids) == [NODE_ID]
        with rpc_error(grpc.StatusCode.FAILED_PRECONDITION):
            driver.delete(name)
        driver.unpublish(name, spaced)
        assert not os.path.lexists(spaced)
        driver.delete(name)


def test_file_target_for_filesystem_volume(driver: Driver, volume: str, target: str) -> None:
    Path(target).write_text("a file kubelet did not expect")
    with rpc_error(grpc.StatusCode.FAILED_PRECONDITION):
        driver.publish(volume, target)
    assert Path(target).read_text() == "a file kubelet did not expect" and not is_mounted(target)


def test_ephemeral_block_refused_without_leftovers(driver: Driver, target: str) -> None:
    name = "csi-" + unique("eph")
    with rpc_error(INVALID):
        driver.publish(name, target, cap=block_cap(), context=EPHEMERAL)
    assert name not in driver.listed_ids() and not driver.volume_path(name).exists()
