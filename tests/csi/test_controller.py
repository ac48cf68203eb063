"""Controller service, from the CSI spec v1.12.0 and csi-sanity's controller.go."""

from __future__ import annotations

import shutil
import stat
from collections.abc import Callable

import grpc
import pytest
from csikit import FAST_POOL_SIZE, TOPOLOGY_KEY
from drivertools import NODE_ID, SNW, AccessMode, Driver, MiB, block_cap, create_request, mount_cap, rpc_error, unique

from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc

pytestmark = pytest.mark.timeout(60)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
RPC = csi.ControllerServiceCapability.RPC


def here() -> csi.Topology:
    return csi.Topology(segments={TOPOLOGY_KEY: NODE_ID})


def elsewhere() -> csi.Topology:
    return csi.Topology(segments={TOPOLOGY_KEY: "node-b"})


# --- CreateVolume -------------------------------------------------------------------------------------------
class TestCreateVolume:
    def test_no_name(self, driver: Driver) -> None:
        with rpc_error(INVALID, "name"):
            driver.controller.CreateVolume(create_request(""))

    def test_no_capabilities(self, driver: Driver) -> None:
        with rpc_error(INVALID, "volume_capabilities"):
            driver.controller.CreateVolume(create_request(unique(), caps=[]))

    @pytest.mark.parametrize("name", [
        "/", "a/b", "..", ".", ".hidden", "tab\tin", "new\nline", "nul\x00", "del\x7f", "c1\x85",
        "x" * 129, "é" * 65, "csi", "lost+found",
    ])
    def test_bad_names(self, driver: Driver, name: str) -> None:
        before = set(p.name for p in driver.pool_path().iterdir())
        with rpc_error(INVALID):
            driver.controller.CreateVolume(create_request(name))
        assert set(p.name for p in driver.pool_path().iterdir()) == before

    @pytest.mark.parametrize("name", ["x" * 128, "é" * 64, "pvc-" + "0" * 124, "with space", "UPPER_and.dots"])
    def test_valid_names(self, driver: Driver, name: str) -> None:
        volume = driver.create(name, MiB)
        try:
            assert volume.volume_id == name
            assert driver.volume_path(name).is_dir()
        finally:
            driver.delete(name)

    def test_success_values(self, driver: Driver) -> None:
        name = unique()
        volume = driver.create(name, 10 * MiB)
        assert volume.volume_id == name
        assert volume.capacity_bytes == 10 * MiB
        assert volume.volume_context["storagePool"] == "legacy"
        assert [dict(t.segments) for t in volume.accessible_topology] == [{TOPOLOGY_KEY: NODE_ID}]
        assert not volume.HasField("content_source")
        path = driver.volume_path(name)
        assert path.is_dir() and not path.is_symlink()
        # group 107 (qemu) without fsGroup; nothing for other users (hpp_csi/storage/volumes.py DIR_MODE)
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2770, 0, 107)

    def test_no_capacity_range(self, driver: Driver) -> None:
        volume = driver.controller.CreateVolume(csi.CreateVolumeRequest(
            name=unique(), volume_capabilities=[mount_cap()]
        )).volume
        assert volume.capacity_bytes == 0  # unknown, as the spec allows

    def test_limit_only(self, driver: Driver) -> None:
        volume = driver.controller.CreateVolume(create_request(unique(), limit=3 * MiB)).volume
        assert volume.capacity_bytes == 3 * MiB

    def test_idempotent(self, driver: Driver) -> None:
        name = unique()
        first = driver.controller.CreateVolume(create_request(name, 5 * MiB, 5 * MiB, pool="fast"))
        (driver.volume_path(name, "fast") / "data").write_text("kept")
        for _ in range(3):
            again = driver.controller.CreateVolume(create_request(name, 5 * MiB, 5 * MiB, pool="fast"))
            assert again == first
        assert (driver.volume_path(name, "fast") / "data").read_text() == "kept"
        assert driver.listed_ids().count(name) == 1

    def test_idempotent_with_looser_range(self, driver: Driver) -> None:
        """An existing volume satisfies a retry whose range contains its capacity."""
        name = unique()
        first = driver.create(name, 4 * MiB)
        again = driver.controller.CreateVolume(create_request(name, 2 * MiB, 8 * MiB)).volume
        assert again.volume_id == first.volume_id and again.capacity_bytes == 4 * MiB

    def test_same_name_different_capacity(self, driver: Driver) -> None:
        name = unique()
        driver.controller.CreateVolume(create_request(name, MiB, MiB))
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS, "capacity"):
            driver.controller.CreateVolume(create_request(name, 2 * MiB, 2 * MiB))

    def test_same_name_different_parameters(self, driver: Driver) -> None:
        name = unique()
        driver.create(name, MiB)
        request = create_request(name, MiB)
        request.parameters["foo"] = "bar"
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS, "parameters"):
            driver.controller.CreateVolume(request)

    def test_same_name_other_pool(self, driver: Driver) -> None:
        name = unique()
        driver.create(name, MiB)
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            driver.create(name, MiB, pool="fast")
        assert not driver.volume_path(name, "fast").exists()

    def test_limit_below_required(self, driver: Driver) -> None:
        with rpc_error(INVALID, "limit_bytes"):
            driver.controller.CreateVolume(create_request(unique(), 2 * MiB, MiB))

    def test_negative_capacity(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            driver.controller.CreateVolume(create_request(unique(), -1))

    def test_larger_than_pool(self, driver: Driver) -> None:
        name = unique()
        with rpc_error(grpc.StatusCode.OUT_OF_RANGE, "fast"):
            driver.create(name, 2 * FAST_POOL_SIZE, pool="fast")
        assert not driver.volume_path(name, "fast").exists()
        assert name not in driver.listed_ids()

    def test_unknown_pool_names_the_known_ones(self, driver: Driver) -> None:
        with rpc_error(INVALID, r"nosuchpool.*fast.*legacy|nosuchpool.*legacy.*fast"):
            driver.create(unique(), MiB, pool="nosuchpool")

    def test_default_pool_is_legacy(self, driver: Driver) -> None:
        name = unique()
        volume = driver.create(name, MiB)
        assert volume.volume_context["storagePool"] == "legacy"
        assert driver.volume_path(name).is_dir()
        assert not driver.volume_path(name, "fast").exists()

    def test_named_pool(self, driver: Driver) -> None:
        name = unique()
        volume = driver.create(name, MiB, pool="fast")
        assert volume.volume_context["storagePool"] == "fast"
        assert driver.volume_path(name, "fast").is_dir()
        assert not driver.volume_path(name).exists()

    def test_parameters_in_context(self, driver: Driver) -> None:
        request = create_request(unique(), MiB, pool="fast")
        request.parameters["csi.storage.k8s.io/pvc/name"] = "disk"
        context = driver.controller.CreateVolume(request).volume.volume_context
        assert context["csi.storage.k8s.io/pvc/name"] == "disk" and context["storagePool"] == "fast"

    def test_requirements_for_other_node(self, driver: Driver) -> None:
        name = unique()
        request = create_request(name, MiB, accessibility_requirements=csi.TopologyRequirement(
            requisite=[elsewhere()], preferred=[elsewhere()]
        ))
        with rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "node-a"):
            driver.controller.CreateVolume(request)
        assert not driver.volume_path(name).exists()

    @pytest.mark.parametrize("where", ["requisite", "preferred", "both"])
    def test_requirements_for_this_node(self, driver: Driver, where: str) -> None:
        requirement = csi.TopologyRequirement()
        if where in ("requisite", "both"):
            requirement.requisite.extend([elsewhere(), here()])
        if where in ("preferred", "both"):
            requirement.preferred.extend([here()])
        volume = driver.controller.CreateVolume(
            create_request(unique(), MiB, accessibility_requirements=requirement)
        ).volume
        assert [dict(t.segments) for t in volume.accessible_topology] == [{TOPOLOGY_KEY: NODE_ID}]

    def test_content_source_unknown(self, driver: Driver) -> None:
        """Unknown sources are NOT_FOUND where the capability is advertised (csi-sanity), else unsupported."""
        caps = controller_capabilities(driver)
        for content, gate in (
            (csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id="no-such-snap")),
             RPC.CREATE_DELETE_SNAPSHOT),
            (csi.VolumeContentSource(volume=csi.VolumeContentSource.VolumeSource(volume_id="no-such-volume")),
             RPC.CLONE_VOLUME),
        ):
            name = unique()
            code = grpc.StatusCode.NOT_FOUND if gate in caps else INVALID
            with rpc_error(code):
                driver.controller.CreateVolume(create_request(name, MiB, volume_content_source=content))
            assert not driver.volume_path(name).exists()
            assert name not in driver.listed_ids()

    def test_block_and_mount_together(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            driver.controller.CreateVolume(create_request(unique(), MiB, caps=[mount_cap(), block_cap()]))

    @pytest.mark.parametrize("mode", [
        AccessMode.MULTI_NODE_READER_ONLY, AccessMode.MULTI_NODE_SINGLE_WRITER, AccessMode.MULTI_NODE_MULTI_WRITER,
    ])
    def test_multi_node_modes_rejected(self, driver: Driver, mode: int) -> None:
        with rpc_error(INVALID, AccessMode.Mode.Name(mode)):  # type: ignore[arg-type]
            driver.controller.CreateVolume(create_request(unique(), MiB, caps=[mount_cap(mode)]))

    @pytest.mark.parametrize("mode", [
        AccessMode.SINGLE_NODE_WRITER, AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    ])
    def test_single_node_modes(self, driver: Driver, mode: int) -> None:
        driver.controller.CreateVolume(create_request(unique(), MiB, caps=[mount_cap(mode)]))

    def test_capability_without_access_type_or_mode(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            driver.controller.CreateVolume(create_request(unique(), caps=[
                csi.VolumeCapability(access_mode=AccessMode(mode=SNW))
            ]))
        with rpc_error(INVALID):
            driver.controller.CreateVolume(create_request(unique(), caps=[
                csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume())
            ]))

    def test_unknown_mount_flag(self, driver: Driver) -> None:
        with rpc_error(INVALID, "nosuchflag"):
            driver.controller.CreateVolume(create_request(unique(), caps=[mount_cap(flags=["nosuchflag"])]))


# --- DeleteVolume -------------------------------------------------------------------------------------------
class TestDeleteVolume:
    def test_no_id(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            driver.controller.DeleteVolume(csi.DeleteVolumeRequest())

    def test_unknown_id(self, driver: Driver) -> None:
        driver.delete("fake-vol-id")

    def test_delete_twice(self, driver: Driver) -> None:
        name = unique()
        driver.create(name, MiB, pool="fast")
        (driver.volume_path(name, "fast") / "sub").mkdir()
        (driver.volume_path(name, "fast") / "sub" / "file").write_bytes(b"x" * 4096)
        driver.delete(name)
        assert not driver.volume_path(name, "fast").exists()
        assert name not in driver.listed_ids()
        driver.delete(name)
        with rpc_error(grpc.StatusCode.NOT_FOUND):
            driver.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=name))

    def test_published_volume_refused(self, driver: Driver, target: str) -> None:
        name = unique()
        driver.create(name, MiB)
        driver.publish(name, target)
        with rpc_error(grpc.StatusCode.FAILED_PRECONDITION, target):
            driver.delete(name)
        assert driver.volume_path(name).is_dir()
        driver.unpublish(name, target)
        driver.delete(name)
        assert not driver.volume_path(name).exists()

    def test_recreate_after_delete(self, driver: Driver) -> None:
        name = unique()
        driver.create(name, MiB)
        (driver.volume_path(name) / "old").write_text("old")
        driver.delete(name)
        volume = driver.create(name, 2 * MiB)
        assert volume.capacity_bytes == 2 * MiB
        assert list(driver.volume_path(name).iterdir()) == []


# --- ValidateVolumeCapabilities ----------------------------------------------------------------------------
class TestValidateVolumeCapabilities:
    def test_no_id(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            driver.controller.ValidateVolumeCapabilities(
                csi.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_cap()])
            )

    def test_no_capabilities(self, driver: Driver) -> None:
        name = unique()
        driver.create(name, MiB)
        with rpc_error(INVALID):
            driver.controller.ValidateVolumeCapabilities(csi.ValidateVolumeCapabilitiesRequest(volume_id=name))

    def test_unknown_volume(self, driver: Driver) -> None:
        with rpc_error(grpc.StatusCode.NOT_FOUND):
            driver.controller.ValidateVolumeCapabilities(csi.ValidateVolumeCapabilitiesRequest(
                volume_id="fake-vol-id-0123456789", volume_capabilities=[mount_cap()]
            ))

    def test_confirmed(self, driver: Driver) -> None:
        name = unique()
        driver.create(name, MiB)
        caps = [mount_cap(), mount_cap(AccessMode.SINGLE_NODE_READER_ONLY)]
        reply = driver.controller.ValidateVolumeCapabilities(
            csi.ValidateVolumeCapabilitiesRequest(volume_id=name, volume_capabilities=caps)
        )
        assert reply.HasField("confirmed")
        assert list(reply.confirmed.volume_capabilities) == caps

    @pytest.mark.parametrize("cap", [mount_cap(AccessMode.MULTI_NODE_MULTI_WRITER), block_cap()],
                             ids=["multi-node", "block"])
    def test_not_confirmed(self, driver: Driver, cap: csi.VolumeCapability) -> None:
        name = unique()
        driver.create(name, MiB)
        reply = driver.controller.ValidateVolumeCapabilities(
            csi.ValidateVolumeCapabilitiesRequest(volume_id=name, volume_capabilities=[mount_cap(), cap])
        )
        assert not reply.HasField("confirmed") and reply.message

    def test_other_parameters_not_confirmed(self, driver: Driver) -> None:
        name = unique()
        driver.create(name, MiB, pool="fast")
        reply = driver.controller.ValidateVolumeCapabilities(csi.ValidateVolumeCapabilitiesRequest(
            volume_id=name, volume_capabilities=[mount_cap()], parameters={"storagePool": "legacy"}
        ))
        assert not reply.HasField("confirmed")


# --- ListVolumes --------------------------------------------------------------------------------------------
def page(driver: Driver, max_entries: int, token: str = "") -> csi.ListVolumesResponse:
    reply: csi.ListVolumesResponse = driver.controller.ListVolumes(
        csi.ListVolumesRequest(max_entries=max_entries, starting_token=token)
    )
    return reply


def all_pages(driver: Driver, max_entries: int) -> list[str]:
    ids, token = [], ""
    while True:
        reply = page(driver, max_entries, token)
        assert 0 < len(reply.entries) <= max_entries
        ids.extend(e.volume.volume_id for e in reply.entries)
        token = reply.next_token
        if not token:
            return ids


class TestListVolumes:
    def test_one_page_without_max_entries(self, driver: Driver) -> None:
        names = [driver.create(unique("list"), MiB).volume_id for _ in range(3)]
        entries = driver.list_all()
        ids = [e.volume.volume_id for e in entries]
        assert set(names) <= set(ids) and len(ids) == len(set(ids))
        assert all(e.volume.volume_id for e in entries)
        by_id = {e.volume.volume_id: e for e in entries}
        assert by_id[names[0]].volume.capacity_bytes == MiB
        assert by_id[names[0]].volume.volume_context["storagePool"] == "legacy"

    def test_sanity_presence_and_absence(self, driver: Driver) -> None:
        count = len(driver.list_all())
        driver.controller.CreateVolume(csi.CreateVolumeRequest(name="sanity", volume_capabilities=[mount_cap()]))
        assert len(driver.list_all()) == count + 1
        driver.delete("sanity")
        assert len(driver.list_all()) == count

    @pytest.mark.parametrize("max_entries", [1, 2, 3, 7, 100])
    def test_pagination_every_volume_once_in_order(self, driver: Driver, max_entries: int) -> None:
        names = {driver.create(unique("page"), MiB).volume_id for _ in range(7)}
        ids = all_pages(driver, max_entries)
        assert ids == sorted(ids)
        assert len(ids) == len(set(ids))
        assert names <= set(ids)
        assert set(ids) == set(driver.listed_ids())

    def test_token_survives_deletion_and_sees_additions(self, driver: Driver) -> None:
        for _ in range(7):
            driver.create(unique("tok"), MiB)
        everything = driver.listed_ids()
        first = page(driver, 2)
        assert len(first.entries) == 2 and first.next_token
        seen = [e.volume.volume_id for e in first.entries]
        assert seen == everything[:2]
        driver.delete(seen[-1])  # the last volume of the page the token points after
        late = "zzzz-" + unique("late")  # sorts after every other volume
        driver.create(late, MiB)
        rest, token = [], first.next_token
        while token:
            reply = page(driver, 2, token)
            rest.extend(e.volume.volume_id for e in reply.entries)
            token = reply.next_token
        assert rest == [i for i in everything[2:]] + [late]
        driver.delete(late)

    def test_last_page_has_no_token(self, driver: Driver) -> None:
        total = len(driver.list_all())
        reply = page(driver, total)
        assert len(reply.entries) == total and reply.next_token == ""

    @pytest.mark.parametrize("token", ["invalid-token", "zz", "\u00e9", "ff"])
    def test_invalid_token(self, driver: Driver, token: str) -> None:
        with rpc_error(grpc.StatusCode.ABORTED):
            page(driver, 0, token)

    def test_negative_max_entries(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            page(driver, -1)

    def test_entries_carry_published_node_and_condition(self, driver: Driver, target: str) -> None:
        published, idle, broken = unique("pub"), unique("idle"), unique("broken")
        for name in (published, idle, broken):
            driver.create(name, MiB)
        driver.publish(published, target)
        shutil.rmtree(driver.volume_path(broken))
        by_id = {e.volume.volume_id: e for e in driver.list_all()}
        assert list(by_id[published].status.published_node_ids) == [NODE_ID]
        assert list(by_id[idle].status.published_node_ids) == []
        assert not by_id[published].status.volume_condition.abnormal
        assert not by_id[idle].status.volume_condition.abnormal
        assert by_id[broken].status.volume_condition.abnormal
        assert by_id[broken].status.volume_condition.message
        driver.unpublish(published, target)
        driver.delete(broken)


# --- ControllerGetVolume ------------------------------------------------------------------------------------
class TestControllerGetVolume:
    def get(self, driver: Driver, volume_id: str) -> csi.ControllerGetVolumeResponse:
        reply: csi.ControllerGetVolumeResponse = driver.controller.ControllerGetVolume(
            csi.ControllerGetVolumeRequest(volume_id=volume_id)
        )
        return reply

    def test_no_id(self, driver: Driver) -> None:
        with rpc_error(INVALID):
            self.get(driver, "")

    def test_unknown(self, driver: Driver) -> None:
        with rpc_error(grpc.StatusCode.NOT_FOUND):
            self.get(driver, "fake-vol-id-0123456789")

    def test_healthy_then_abnormal_when_data_removed(self, driver: Driver) -> None:
        name = unique()
        created = driver.create(name, 2 * MiB)
        reply = self.get(driver, name)
        assert reply.volume == created
        assert not reply.status.volume_condition.abnormal
        assert list(reply.status.published_node_ids) == []
        shutil.rmtree(driver.volume_path(name))
        condition = self.get(driver, name).status.volume_condition
        assert condition.abnormal and str(driver.volume_path(name)) in condition.message
        driver.delete(name)
        with rpc_error(grpc.StatusCode.NOT_FOUND):
            self.get(driver, name)

    def test_published_node_ids(self, driver: Driver, target: str) -> None:
        name = unique()
        driver.create(name, MiB, pool="fast")
        driver.publish(name, target)
        assert list(self.get(driver, name).status.published_node_ids) == [NODE_ID]
        driver.unpublish(name, target)
        assert list(self.get(driver, name).status.published_node_ids) == []


# --- GetCapacity --------------------------------------------------------------------------------------------
class TestGetCapacity:
    def capacity(self, driver: Driver, **kwargs: object) -> csi.GetCapacityResponse:
        reply: csi.GetCapacityResponse = driver.controller.GetCapacity(csi.GetCapacityRequest(**kwargs))
        return reply

    def test_empty_request(self, driver: Driver) -> None:
        reply = self.capacity(driver)
        assert reply.available_capacity > 0
        assert reply.HasField("maximum_volume_size") and reply.maximum_volume_size.value > 0

    def test_per_pool(self, driver: Driver) -> None:
        fast = self.capacity(driver, parameters={"storagePool": "fast"})
        legacy = self.capacity(driver, parameters={"storagePool": "legacy"})
        assert 0 < fast.available_capacity <= FAST_POOL_SIZE
        assert fast.maximum_volume_size.value == fast.available_capacity
        assert legacy.available_capacity > FAST_POOL_SIZE  # the disk, not the tmpfs
        assert self.capacity(driver).available_capacity == pytest.approx(legacy.available_capacity, rel=0.01)

    def test_available_shrinks_with_data(self, driver: Driver) -> None:
        before = self.capacity(driver, parameters={"storagePool": "fast"}).available_capacity
        name = unique()
        driver.create(name, MiB, pool="fast")
        (driver.volume_path(name, "fast") / "blob").write_bytes(b"\1" * 8 * MiB)
        after = self.capacity(driver, parameters={"storagePool": "fast"}).available_capacity
        assert before - after >= 8 * MiB
        driver.delete(name)

    def test_this_node_topology(self, driver: Driver) -> None:
        assert self.capacity(driver, accessible_topology=here(), parameters={"storagePool": "fast"}) \
            .available_capacity > 0

    def test_other_node_topology(self, driver: Driver) -> None:
        reply = self.capacity(driver, accessible_topology=elsewhere(), parameters={"storagePool": "fast"})
        assert reply.available_capacity == 0

    def test_unsupported_capability(self, driver: Driver) -> None:
        reply = self.capacity(driver, volume_capabilities=[mount_cap(AccessMode.MULTI_NODE_MULTI_WRITER)])
        assert reply.available_capacity == 0

    def test_unknown_pool(self, driver: Driver) -> None:
        with rpc_error(INVALID, "nosuchpool"):
            self.capacity(driver, parameters={"storagePool": "nosuchpool"})


# --- capabilities, unimplemented ---------------------------------------------------------------------------
def controller_capabilities(driver: Driver) -> set[int]:
    reply = driver.controller.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest())
    return {cap.rpc.type for cap in reply.capabilities}


# What csi-sanity v5.4.0's ControllerGetCapabilities test accepts (controller.go): it fails on anything else,
# GET_SNAPSHOT included (known from v5.5.0 on), so the driver advertises that one only when asked to.
SANITY_CONTROLLER_CAPS = {
    RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY,
    RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.PUBLISH_READONLY, RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME,
    RPC.MODIFY_VOLUME, RPC.LIST_VOLUMES_PUBLISHED_NODES, RPC.GET_VOLUME, RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
}


def test_controller_capabilities(driver: Driver) -> None:
    kinds = controller_capabilities(driver)
    assert {RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY, RPC.GET_VOLUME, RPC.VOLUME_CONDITION,
            RPC.LIST_VOLUMES_PUBLISHED_NODES} <= kinds
    assert kinds <= SANITY_CONTROLLER_CAPS
    # Volumes are node-local: there is nothing to attach, so no ControllerPublish (kubelet skips it).
    assert RPC.PUBLISH_UNPUBLISH_VOLUME not in kinds and RPC.PUBLISH_READONLY not in kinds
    assert RPC.GET_SNAPSHOT not in kinds
    # Expansion is the node's (kubelet calls it where the volume is); a controller on every node must not offer it.
    assert RPC.EXPAND_VOLUME not in kinds


def test_get_snapshot_capability_on_request(spawn: Callable[..., Driver]) -> None:
    proc = spawn()
    proc.extra = ["--advertise-get-snapshot"]
    kinds = controller_capabilities(proc.start())
    assert RPC.GET_SNAPSHOT in kinds and RPC.CREATE_DELETE_SNAPSHOT in kinds


# The RPCs the driver does not offer, with the capability it therefore must not advertise (snapshots and
# expansion are offered: their own tests live in test_snapshots.py and test_block.py).
OPTIONAL_RPCS = [
    ("ControllerPublishVolume", csi.ControllerPublishVolumeRequest, RPC.PUBLISH_UNPUBLISH_VOLUME),
    ("ControllerUnpublishVolume", csi.ControllerUnpublishVolumeRequest, RPC.PUBLISH_UNPUBLISH_VOLUME),
    ("ControllerModifyVolume", csi.ControllerModifyVolumeRequest, RPC.MODIFY_VOLUME),
]


@pytest.mark.parametrize("method, request_type, gate", OPTIONAL_RPCS, ids=[m for m, _, _ in OPTIONAL_RPCS])
def test_unadvertised_rpcs_unimplemented(driver: Driver, method: str, request_type: type, gate: int) -> None:
    assert gate not in controller_capabilities(driver)
    fields = request_type.DESCRIPTOR.fields_by_name
    request = request_type(volume_id="x") if "volume_id" in fields else request_type()
    with rpc_error(grpc.StatusCode.UNIMPLEMENTED):
        getattr(driver.controller, method)(request)


def test_group_controller_unimplemented(driver: Driver) -> None:
    stub = csi_grpc.GroupControllerStub(driver.channel)
    with rpc_error(grpc.StatusCode.UNIMPLEMENTED):
        stub.GroupControllerGetCapabilities(csi.GroupControllerGetCapabilitiesRequest(), timeout=10)
