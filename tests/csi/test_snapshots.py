"""Snapshots, clones and expansion, each run only when the driver advertises it (as csi-sanity gates them)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from csikit import usage_of
from drivertools import Driver, MiB, block_cap, create_request, rpc_error, snapshot_record, unique, volume_record

from hpp_csi.spec import csi_pb2 as csi

pytestmark = pytest.mark.timeout(60)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
RPC = csi.ControllerServiceCapability.RPC


def require(driver: Driver, capability: int) -> None:
    reply = driver.controller.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest())
    # The driver offers snapshots, clones and expansion: a missing capability is a regression, not a skip.
    assert capability in {c.rpc.type for c in reply.capabilities}, RPC.Type.Name(capability)  # type: ignore[arg-type]


def snap(driver: Driver, name: str, source: str) -> csi.Snapshot:
    reply: csi.CreateSnapshotResponse = driver.controller.CreateSnapshot(
        csi.CreateSnapshotRequest(name=name, source_volume_id=source)
    )
    return reply.snapshot


def list_snapshots(driver: Driver, **kwargs: object) -> csi.ListSnapshotsResponse:
    reply: csi.ListSnapshotsResponse = driver.controller.ListSnapshots(csi.ListSnapshotsRequest(**kwargs))
    return reply


def from_snapshot(snapshot_id: str) -> csi.VolumeContentSource:
    return csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def from_volume(volume_id: str) -> csi.VolumeContentSource:
    return csi.VolumeContentSource(volume=csi.VolumeContentSource.VolumeSource(volume_id=volume_id))


def fill(path: Path) -> None:
    """A small tree: nested folders, a sparse file, a symlink."""
    (path / "dir" / "deeper").mkdir(parents=True)
    (path / "dir" / "deeper" / "file").write_text("nested")
    with open(path / "sparse", "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"middle")
    os.symlink("dir/deeper/file", path / "link")


def check_filled(path: Path) -> None:
    assert (path / "dir" / "deeper" / "file").read_text() == "nested"
    data = (path / "sparse").read_bytes()
    assert len(data) == 4 * MiB and data[MiB:MiB + 6] == b"middle"
    assert os.readlink(path / "link") == "dir/deeper/file"


# --- CreateSnapshot / DeleteSnapshot / GetSnapshot ----------------------------------------------------------
class TestSnapshots:
    @pytest.fixture(autouse=True)
    def _gate(self, driver: Driver) -> None:
        require(driver, RPC.CREATE_DELETE_SNAPSHOT)

    def test_no_name(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            snap(driver, "", "testId")

    def test_no_source(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            snap(driver, unique("snap"), "")

    def test_unknown_source(self, driver: Driver) -> None:
        with rpc_error(NOT_FOUND):
            snap(driver, unique("snap"), "fake-vol-id-0123456789")

    @pytest.mark.parametrize("name", ["..", "a/b", "x" * 129, ".hidden"])
    def test_bad_names(self, driver: Driver, name: str) -> None:
        source = driver.create(unique(), MiB).volume_id
        with rpc_error(INVALID):
            snap(driver, name, source)

    def test_create_idempotent_and_values(self, driver: Driver) -> None:
        source = driver.create(unique(), 3 * MiB).volume_id
        name = unique("snap")
        first = snap(driver, name, source)
        assert first.snapshot_id == name and first.source_volume_id == source
        assert first.ready_to_use and first.creation_time.seconds > 0
        assert first.size_bytes == 3 * MiB
        assert snap(driver, name, source) == first

    def test_max_length_name(self, driver: Driver) -> None:
        source = driver.create(unique(), MiB).volume_id
        name = "s" * 128
        assert snap(driver, name, source) == snap(driver, name, source)
        driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=name))

    def test_same_name_other_source(self, driver: Driver) -> None:
        a, b = driver.create(unique(), MiB).volume_id, driver.create(unique(), MiB).volume_id
        name = unique("snap")
        snap(driver, name, a)
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            snap(driver, name, b)

    def test_snapshot_is_a_point_in_time_copy(self, driver: Driver) -> None:
        source = driver.create(unique(), 8 * MiB).volume_id
        fill(driver.volume_path(source))
        name = unique("snap")
        snap(driver, name, source)
        (driver.volume_path(source) / "dir" / "deeper" / "file").write_text("changed later")
        (driver.volume_path(source) / "added-later").write_text("x")
        restored = driver.controller.CreateVolume(
            create_request(unique(), volume_content_source=from_snapshot(name))
        ).volume
        check_filled(driver.volume_path(restored.volume_id))
        assert not (driver.volume_path(restored.volume_id) / "added-later").exists()
        assert restored.content_source.snapshot.snapshot_id == name  # csi-sanity >= 5.3 checks this
        assert restored.capacity_bytes == 8 * MiB

    def test_snapshot_hidden_from_volumes(self, driver: Driver, target: str) -> None:
        source = driver.create(unique(), MiB).volume_id
        name = unique("snap")
        snap(driver, name, source)
        assert name not in driver.listed_ids()
        driver.publish(source, target)
        assert os.listdir(target) == []  # snapshot data lives outside the volume

    def test_snapshot_survives_source_deletion(self, driver: Driver) -> None:
        source = driver.create(unique(), MiB).volume_id
        (driver.volume_path(source) / "data").write_text("kept")
        name = unique("snap")
        first = snap(driver, name, source)
        driver.delete(source)
        assert snap(driver, name, source) == first  # a retry still answers
        restored = driver.controller.CreateVolume(
            create_request(unique(), volume_content_source=from_snapshot(name))
        ).volume
        assert (driver.volume_path(restored.volume_id) / "data").read_text() == "kept"

    def test_delete(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest())
        driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id="reallyfakesnapshotid"))
        source = driver.create(unique(), MiB).volume_id
        name = unique("snap")
        snap(driver, name, source)
        for _ in range(2):
            driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=name))
        assert list_snapshots(driver, snapshot_id=name).entries == []
        with rpc_error(NOT_FOUND):
            driver.controller.CreateVolume(create_request(unique(), volume_content_source=from_snapshot(name)))

    def test_get_snapshot(self, driver: Driver) -> None:
        # Served whether or not GET_SNAPSHOT is advertised (see test_get_snapshot_capability_on_request).
        with rpc_error(INVALID):
            driver.controller.GetSnapshot(csi.GetSnapshotRequest())
        with rpc_error(NOT_FOUND):
            driver.controller.GetSnapshot(csi.GetSnapshotRequest(snapshot_id="fake-snap-id-0123456789"))
        source = driver.create(unique(), MiB).volume_id
        made = snap(driver, unique("snap"), source)
        got = driver.controller.GetSnapshot(csi.GetSnapshotRequest(snapshot_id=made.snapshot_id)).snapshot
        assert got == made

    def test_restore_into_other_pool(self, driver: Driver) -> None:
        source = driver.create(unique(), MiB).volume_id
        (driver.volume_path(source) / "data").write_text("moved")
        name = unique("snap")
        snap(driver, name, source)
        restored = driver.controller.CreateVolume(
            create_request(unique(), MiB, pool="fast", volume_content_source=from_snapshot(name))
        ).volume
        assert (driver.volume_path(restored.volume_id, "fast") / "data").read_text() == "moved"

    def test_restore_idempotent_and_conflicts(self, driver: Driver) -> None:
        source = driver.create(unique(), MiB).volume_id
        name = unique("snap")
        snap(driver, name, source)
        request = create_request(unique(), MiB, volume_content_source=from_snapshot(name))
        first = driver.controller.CreateVolume(request).volume
        assert driver.controller.CreateVolume(request).volume == first
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            driver.controller.CreateVolume(create_request(first.volume_id, MiB))  # same name, no source
        with rpc_error(grpc.StatusCode.OUT_OF_RANGE):
            driver.controller.CreateVolume(
                create_request(unique(), limit=MiB // 2, volume_content_source=from_snapshot(name))
            )


# --- ListSnapshots ------------------------------------------------------------------------------------------
class TestListSnapshots:
    @pytest.fixture(autouse=True)
    def _gate(self, driver: Driver) -> None:
        require(driver, RPC.LIST_SNAPSHOTS)

    def test_values_and_filters(self, driver: Driver) -> None:
        a, b = driver.create(unique(), MiB).volume_id, driver.create(unique(), MiB).volume_id
        names = [unique("ls") for _ in range(3)]
        snap(driver, names[0], a)
        snap(driver, names[1], a)
        snap(driver, names[2], b)
        everything = list_snapshots(driver).entries
        assert all(e.snapshot.snapshot_id and e.snapshot.source_volume_id and e.snapshot.creation_time.seconds
                   for e in everything)
        assert set(names) <= {e.snapshot.snapshot_id for e in everything}
        [one] = list_snapshots(driver, snapshot_id=names[1]).entries
        assert one.snapshot.snapshot_id == names[1] and one.snapshot.source_volume_id == a
        assert sorted(e.snapshot.snapshot_id for e in list_snapshots(driver, source_volume_id=a).entries) == \
            sorted(names[:2])
        assert list_snapshots(driver, snapshot_id="none-exist-id").entries == []
        assert list_snapshots(driver, source_volume_id="none-exist-volume").entries == []

    def test_presence_and_absence(self, driver: Driver) -> None:
        count = len(list_snapshots(driver).entries)
        source = driver.create(unique(), MiB).volume_id
        name = unique("ls")
        snap(driver, name, source)
        assert len(list_snapshots(driver).entries) == count + 1
        driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=name))
        assert len(list_snapshots(driver).entries) == count

    def test_pagination(self, driver: Driver) -> None:
        source = driver.create(unique(), MiB).volume_id
        for _ in range(5):
            snap(driver, unique("pg"), source)
        total = len(list_snapshots(driver).entries)
        first = list_snapshots(driver, max_entries=2)
        assert len(first.entries) == 2 and first.next_token
        rest = list_snapshots(driver, starting_token=first.next_token)
        assert len(rest.entries) == total - 2 and rest.next_token == ""
        ids = [e.snapshot.snapshot_id for e in (*first.entries, *rest.entries)]
        assert len(set(ids)) == total
        by_source = list_snapshots(driver, source_volume_id=source, max_entries=2)
        assert len(by_source.entries) == 2 and by_source.next_token

    def test_bad_requests(self, driver: Driver) -> None:
        with rpc_error(grpc.StatusCode.ABORTED):
            list_snapshots(driver, starting_token="invalid-token")
        with rpc_error(INVALID):
            list_snapshots(driver, max_entries=-1)


# --- clones -------------------------------------------------------------------------------------------------
class TestClones:
    @pytest.fixture(autouse=True)
    def _gate(self, driver: Driver) -> None:
        require(driver, RPC.CLONE_VOLUME)

    def test_clone(self, driver: Driver, target: str) -> None:
        source = driver.create(unique(), 6 * MiB).volume_id
        fill(driver.volume_path(source))
        driver.publish(source, target)  # cloning a volume in use is allowed
        clone = driver.controller.CreateVolume(
            create_request(unique(), volume_content_source=from_volume(source))
        ).volume
        assert clone.content_source.volume.volume_id == source and clone.capacity_bytes == 6 * MiB
        path = driver.volume_path(clone.volume_id)
        check_filled(path)
        st = path.stat()  # the volume mode policy (hpp_csi/storage/volumes.py DIR_MODE), not the source root's
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2770, 107)
        (path / "only-in-clone").write_text("x")
        assert not (driver.volume_path(source) / "only-in-clone").exists()

    def test_clone_larger(self, driver: Driver) -> None:
        source = driver.create(unique(), MiB).volume_id
        clone = driver.controller.CreateVolume(
            create_request(unique(), 4 * MiB, volume_content_source=from_volume(source))
        ).volume
        assert clone.capacity_bytes == 4 * MiB

    def test_clone_of_missing_data(self, driver: Driver) -> None:
        source = driver.create(unique(), MiB).volume_id
        driver.volume_path(source).rmdir()
        name = unique()
        with rpc_error(grpc.StatusCode.FAILED_PRECONDITION, f"volume '{source}'.* is missing"):
            driver.controller.CreateVolume(create_request(name, volume_content_source=from_volume(source)))
        assert name not in driver.listed_ids()

    def test_no_staging_leftovers(self, driver: Driver) -> None:
        source = driver.create(unique(), MiB).volume_id
        driver.controller.CreateVolume(create_request(unique(), volume_content_source=from_volume(source)))
        assert list((driver.pool_path() / ".hpp-csi" / "staging").iterdir()) == []


# --- expansion ----------------------------------------------------------------------------------------------
def expand(driver: Driver, volume_id: str, required: int, limit: int = 0) -> csi.ControllerExpandVolumeResponse:
    reply: csi.ControllerExpandVolumeResponse = driver.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi.CapacityRange(required_bytes=required, limit_bytes=limit)
        )
    )
    return reply


def node_expand(driver: Driver, volume_id: str, target: str, required: int = 0,
                limit: int = 0) -> csi.NodeExpandVolumeResponse:
    """As kubelet calls it after the resizer recorded the PV's new size: the size in capacity_range."""
    reply: csi.NodeExpandVolumeResponse = driver.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(
        volume_id=volume_id, volume_path=target,
        capacity_range=csi.CapacityRange(required_bytes=required, limit_bytes=limit)))
    return reply


def capacity(driver: Driver, volume_id: str) -> int:
    reply = driver.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=volume_id))
    return int(reply.volume.capacity_bytes)


class TestExpansion:
    @pytest.fixture(autouse=True)
    def _gate(self, driver: Driver) -> None:
        reply = driver.node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest())
        assert csi.NodeServiceCapability.RPC.EXPAND_VOLUME in {c.rpc.type for c in reply.capabilities}

    def test_validation(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            expand(driver, "", MiB)
        with rpc_error(INVALID):
            driver.controller.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(volume_id="x"))
        with rpc_error(NOT_FOUND):
            expand(driver, "fake-vol-id-0123456789", MiB)

    def test_expand(self, driver: Driver, target: str) -> None:
        name = driver.create(unique(), 2 * MiB).volume_id
        driver.publish(name, target)
        reply = expand(driver, name, 5 * MiB)
        assert reply.capacity_bytes == 5 * MiB  # csi-sanity: must equal the size asked for
        assert not reply.node_expansion_required  # a directory needs nothing from the node
        assert driver.controller.ControllerGetVolume(
            csi.ControllerGetVolumeRequest(volume_id=name)).volume.capacity_bytes == 5 * MiB
        assert usage_of(driver.stats(name, target), csi.VolumeUsage.Unit.BYTES).total == 5 * MiB
        assert expand(driver, name, 5 * MiB).capacity_bytes == 5 * MiB  # idempotent
        assert expand(driver, name, 3 * MiB).capacity_bytes == 5 * MiB  # never shrinks
        with rpc_error(grpc.StatusCode.OUT_OF_RANGE):
            expand(driver, name, MiB, limit=4 * MiB)

    def test_expand_beyond_pool(self, driver: Driver) -> None:
        name = driver.create(unique(), MiB, pool="fast").volume_id
        with rpc_error(grpc.StatusCode.OUT_OF_RANGE):  # as CreateVolume of that size would be
            expand(driver, name, 1 << 40)
        assert driver.controller.ControllerGetVolume(
            csi.ControllerGetVolumeRequest(volume_id=name)).volume.capacity_bytes == MiB

    def test_node_expand(self, driver: Driver, target: str) -> None:
        with rpc_error(INVALID):
            driver.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(volume_path="some/path"))
        name = driver.create(unique(), MiB).volume_id
        with rpc_error(INVALID):
            driver.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(volume_id=name))
        with rpc_error(NOT_FOUND):
            driver.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(volume_id="fake-vol-id-012345", volume_path="x"))
        expand(driver, name, 3 * MiB)
        driver.publish(name, target)
        reply = driver.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(volume_id=name, volume_path=target))
        assert reply.capacity_bytes == 3 * MiB

    def test_node_expand_grows_the_volume(self, driver: Driver, target: str) -> None:
        """The path kubelet takes: NodeExpandVolume with the new size does the whole expansion."""
        name = driver.create(unique(), 2 * MiB).volume_id
        driver.publish(name, target)
        assert node_expand(driver, name, target, 6 * MiB).capacity_bytes == 6 * MiB
        assert capacity(driver, name) == 6 * MiB
        assert usage_of(driver.stats(name, target), csi.VolumeUsage.Unit.BYTES).total == 6 * MiB
        assert node_expand(driver, name, target, 6 * MiB).capacity_bytes == 6 * MiB  # idempotent
        assert node_expand(driver, name, target, 4 * MiB).capacity_bytes == 6 * MiB  # never shrinks
        with rpc_error(grpc.StatusCode.OUT_OF_RANGE, "volumes do not shrink"):
            node_expand(driver, name, target, MiB, limit=5 * MiB)
        with rpc_error(INVALID, "limit_bytes"):
            node_expand(driver, name, target, 8 * MiB, limit=7 * MiB)
        assert capacity(driver, name) == 6 * MiB

    def test_node_expand_beyond_pool(self, driver: Driver, target: str) -> None:
        name = driver.create(unique(), MiB, pool="fast").volume_id
        driver.publish(name, target)
        with rpc_error(grpc.StatusCode.OUT_OF_RANGE, "cannot grow"):
            node_expand(driver, name, target, 1 << 40)
        assert capacity(driver, name) == MiB

    def test_node_expand_of_a_volume_elsewhere(self, driver: Driver, target: str) -> None:
        """Kubelet only calls the node holding the volume; any other node's driver does not know it."""
        Path(target).mkdir()
        with rpc_error(NOT_FOUND):
            node_expand(driver, "fake-vol-id-0123456789", target, 4 * MiB)


def test_snapshots_survive_restart(spawn: Callable[..., Driver]) -> None:
    proc = spawn().start()
    require(proc, RPC.CREATE_DELETE_SNAPSHOT)
    source = proc.create("src", MiB).volume_id
    (proc.volume_path(source) / "data").write_text("kept")
    made = snap(proc, "snap-a", source)
    proc.restart()
    assert [e.snapshot for e in list_snapshots(proc).entries] == [made]
    assert snap(proc, "snap-a", source) == made
    proc.controller.CreateVolume(create_request("restored", volume_content_source=from_snapshot("snap-a")))
    assert (proc.volume_path("restored") / "data").read_text() == "kept"


def test_corrupt_snapshot_records(spawn: Callable[..., Driver]) -> None:
    """Unreadable snapshot records never stop start-up; those snapshots are not listed, and left on disk."""
    proc = spawn().start()
    require(proc, RPC.CREATE_DELETE_SNAPSHOT)
    source = proc.create("src", MiB).volume_id
    snap(proc, "good", source)
    corrupt = {"garbage": b"{not json", "list": b"[]", "null": b"null", "partial": b'{"snapshot_id": "x"}',
               "other-id": b'{"snapshot_id": "good", "source_volume_id": "src", "pool": "legacy", '
                           b'"size_bytes": 0, "created_ns": 1}'}
    for kind in corrupt:
        snap(proc, f"bad-{kind}", source)
    proc.kill()
    folder = proc.pool_path() / ".hpp-csi" / "snapshots-v2"
    for kind, content in corrupt.items():
        (folder / f"bad-{kind}" / "record.json").write_bytes(content)
    proc.start()
    assert [e.snapshot.snapshot_id for e in list_snapshots(proc).entries] == ["good"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["good", *(f"bad-{kind}" for kind in corrupt)])
    for kind, content in corrupt.items():
        assert (folder / f"bad-{kind}" / "record.json").read_bytes() == content
        assert (folder / f"bad-{kind}" / "data").is_dir()


def test_reflink_on_an_xfs_pool(spawn: Callable[..., Driver]) -> None:
    """On a loop-backed XFS pool (`size:`), snapshots and clones share extents instead of copying."""
    proc = spawn()
    proc.pools = [{"name": "xfs", "path": str(proc.root / "xfs"), "size": "300Mi"}]
    proc.start()
    require(proc, RPC.CREATE_DELETE_SNAPSHOT)
    volumes = proc.pool_path("xfs") / "csi"
    source = proc.create("src", 8 * MiB, pool="xfs").volume_id
    fill(volumes / source)
    (volumes / source / "blob").write_bytes(os.urandom(2 * MiB))
    snap(proc, "snap", source)
    proc.controller.CreateVolume(create_request("restored", pool="xfs", volume_content_source=from_snapshot("snap")))
    proc.controller.CreateVolume(create_request("clone", pool="xfs", volume_content_source=from_volume(source)))
    for name in ("restored", "clone"):
        check_filled(volumes / name)
        assert (volumes / name / "blob").read_bytes() == (volumes / source / "blob").read_bytes()
    records = volumes / ".hpp-csi"
    assert snapshot_record(records.parent, "snap")["method"] == "reflink"
    for name in ("restored", "clone"):
        assert volume_record(records.parent, name)["extra"]["cloned_by"] == "reflink"
    block = proc.controller.CreateVolume(create_request("img", 4 * MiB, pool="xfs", caps=[block_cap()])).volume
    proc.controller.CreateVolume(create_request("img-clone", 4 * MiB, pool="xfs", caps=[block_cap()],
                                                volume_content_source=from_volume(block.volume_id)))
    assert (volumes / "img-clone").stat().st_size == 4 * MiB
