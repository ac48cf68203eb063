"""CSI Controller service: volumes in the node's pools. Requests are validated first, then the work is done."""

from __future__ import annotations

import binascii
import logging

import grpc
from google.protobuf import timestamp_pb2, wrappers_pb2

from hpp_csi import errors, names
from hpp_csi.csi.access import check_capabilities, requested_mode, unsupported_reason
from hpp_csi.csi.expansion import grow, requested_capacity
from hpp_csi.csi.topology import matches, node_topology, requirement_allows
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc
from hpp_csi.storage import block_publish
from hpp_csi.storage.publications import Publications
from hpp_csi.storage.snapshots import SnapshotManager, SnapshotRecord
from hpp_csi.storage.store import BadEntry
from hpp_csi.storage.volumes import (
    POOL_PARAMETER,
    CreateSpec,
    Source,
    Volume,
    VolumeManager,
    resolve_capacity,
    unusable,
)

log = logging.getLogger(__name__)

RPC = csi.ControllerServiceCapability.RPC
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.GET_CAPACITY,
    RPC.GET_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.LIST_VOLUMES_PUBLISHED_NODES,
    RPC.SINGLE_NODE_MULTI_WRITER,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.CLONE_VOLUME,
    # No EXPAND_VOLUME: a controller runs on every node but only the node holding a volume can grow it. Without
    # it, csi-resizer (one, leader-elected) only records the new size and kubelet calls NodeExpandVolume on the
    # volume's node (docs/deployment.md, "Expansion across nodes"). ControllerExpandVolume still serves direct
    # callers.
)
SNAPSHOT_LOCK = "snapshot:"
DEFAULT_BLOCK_BYTES = 1 << 30


def encode_token(volume_id: str) -> str:
    return volume_id.encode().hex()


def decode_token(token: str) -> str:
    try:
        return binascii.unhexlify(token).decode()
    except (ValueError, UnicodeDecodeError):
        raise errors.aborted(
            f"starting_token {token!r} was not issued by this driver; list again from the start"
        ) from None


def condition(volume: Volume, bad: list[BadEntry] | None = None) -> csi.VolumeCondition:
    """Abnormal when the volume's data is not what its record says, or an entry of it is bad (named in full)."""
    problems = [f"{entry.path} {entry.reason}" for entry in bad or []]
    problem = volume.data_problem()
    if problem:
        problems.insert(0, f"volume data {volume.path} {problem}")
    if problems:
        return csi.VolumeCondition(abnormal=True, message="; ".join(problems))
    return csi.VolumeCondition(abnormal=False, message="volume is healthy")


def snapshot_message(record: SnapshotRecord) -> csi.Snapshot:
    seconds, nanos = divmod(record.created_ns, 10**9)
    return csi.Snapshot(
        snapshot_id=record.snapshot_id,
        source_volume_id=record.source_volume_id,
        size_bytes=record.size_bytes,
        creation_time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
        ready_to_use=True,
    )


class ControllerService(csi_grpc.ControllerServicer):
    def __init__(self, manager: VolumeManager, snapshots: SnapshotManager, node_id: str,
                 advertise_get_snapshot: bool = False) -> None:
        self.manager = manager
        self.snapshots = snapshots
        self.node_id = node_id
        # GetSnapshot always works; advertising it is opt-in because csi-sanity v5.4.0 fails its capability
        # test on any capability it does not know, and GET_SNAPSHOT (CSI 1.12, alpha) came in v5.5.0.
        self.capabilities = (*CAPABILITIES, RPC.GET_SNAPSHOT) if advertise_get_snapshot else CAPABILITIES
        self._topology = node_topology(node_id)  # copied into each answer, never changed

    def to_message(self, volume: Volume) -> csi.Volume:
        record = volume.record
        message = csi.Volume(
            volume_id=record.volume_id,
            capacity_bytes=record.capacity_bytes,
            volume_context=record.context,
            accessible_topology=[self._topology],
        )
        source = record.content_source or {}
        if "snapshot" in source:
            message.content_source.snapshot.snapshot_id = source["snapshot"]
        elif "volume" in source:
            message.content_source.volume.volume_id = source["volume"]
        return message

    def _status(self, volume: Volume, publications: Publications) -> csi.ControllerGetVolumeResponse.VolumeStatus:
        published = [self.node_id] if publications.of_volume(volume.path, volume.record.mode) else []
        return csi.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=published, volume_condition=self.condition(volume)
        )

    def condition(self, volume: Volume) -> csi.VolumeCondition:
        return condition(volume, self.manager.bad_entries.of_volume(volume.volume_id))

    def CreateVolume(self, request: csi.CreateVolumeRequest, context: grpc.ServicerContext) -> csi.CreateVolumeResponse:
        volume_id = names.volume_id(request.name, "name")
        check_capabilities(request.volume_capabilities, block_supported=True)
        mode = requested_mode(request.volume_capabilities)
        if mode == "block" and any(c.WhichOneof("access_type") == "mount" for c in request.volume_capabilities):
            raise errors.invalid_argument("a volume is either a block volume or a filesystem, not both")
        required, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        capacity = resolve_capacity(required, limit)
        parameters = dict(request.parameters)
        pool = self.manager.pool_for(parameters)
        if request.HasField("accessibility_requirements") and not requirement_allows(
            request.accessibility_requirements, self.node_id
        ):
            raise errors.resource_exhausted(
                f"volumes of this driver live on node {self.node_id!r}, which the accessibility requirements exclude"
            )
        locks = [volume_id]
        content_source: dict[str, str] | None = None
        if request.HasField("volume_content_source"):
            content_source = self._content_source(request.volume_content_source)
            locks.append(content_source.get("volume") or SNAPSHOT_LOCK + content_source["snapshot"])
        with self.manager.locks.hold(*locks):
            source = self._source(content_source, mode) if content_source else None
            if source is not None:
                if limit and limit < source.capacity_bytes:
                    raise errors.out_of_range(
                        f"the source ({source.description}) holds {source.capacity_bytes} bytes, more than "
                        f"limit_bytes {limit}"
                    )
                capacity = max(capacity, source.capacity_bytes)
            if mode == "block" and not capacity:
                capacity = DEFAULT_BLOCK_BYTES  # an image needs a size; a filesystem volume may stay unsized
            spec = CreateSpec(
                volume_id=volume_id,
                pool=pool,
                capacity_bytes=capacity,
                required_bytes=required,
                limit_bytes=limit,
                parameters=parameters,
                mode=mode,
                content_source=content_source,
                source=source,
            )
            volume, created = self.manager.create(spec)
        log.info("%s volume %s in pool %s (%d bytes)", "created" if created else "found", volume_id, pool.name,
                 volume.record.capacity_bytes)
        return csi.CreateVolumeResponse(volume=self.to_message(volume))

    @staticmethod
    def _content_source(source: csi.VolumeContentSource) -> dict[str, str]:
        kind = source.WhichOneof("type")
        if kind == "snapshot":
            return {"snapshot": names.volume_id(source.snapshot.snapshot_id, "volume_content_source.snapshot")}
        if kind == "volume":
            return {"volume": names.volume_id(source.volume.volume_id, "volume_content_source.volume")}
        raise errors.invalid_argument("volume_content_source names neither a snapshot nor a volume")

    def _source(self, content_source: dict[str, str], mode: str) -> Source:
        if "snapshot" in content_source:
            snapshot = self.snapshots.get(content_source["snapshot"])
            found_mode, path, capacity = snapshot.mode, self.snapshots.path_of(snapshot), snapshot.size_bytes
            description = f"snapshot {snapshot.snapshot_id!r}"
        else:
            volume = self.manager.get(content_source["volume"])
            found_mode, path, capacity = volume.record.mode, volume.path, volume.record.capacity_bytes
            description = f"volume {volume.volume_id!r}"
            problem = volume.data_problem()
            if problem:
                raise unusable(f"source {description}", volume.path, problem)
        if found_mode != mode:
            raise errors.invalid_argument(f"{description} is a {found_mode} volume; it cannot fill a {mode} volume")
        return Source(path=path, mode=found_mode, capacity_bytes=capacity, description=description)

    def DeleteVolume(self, request: csi.DeleteVolumeRequest, context: grpc.ServicerContext) -> csi.DeleteVolumeResponse:
        volume_id = names.volume_id(request.volume_id)
        with self.manager.locks.hold(volume_id):
            volume = self.manager.find(volume_id)
            if volume is None:
                return csi.DeleteVolumeResponse()
            targets = Publications().of_volume(volume.path, volume.record.mode)
            if targets:
                raise errors.failed_precondition(
                    f"volume {volume_id!r} is still published at {', '.join(targets)}; unpublish it first"
                )
            if volume.record.mode == "block":
                block_publish.detach_unused(volume.path)
            self.manager.delete(volume_id)
        log.info("deleted volume %s", volume_id)
        return csi.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: csi.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi.ValidateVolumeCapabilitiesResponse:
        volume_id = names.volume_id(request.volume_id)
        if not request.volume_capabilities:
            raise errors.invalid_argument("volume_capabilities is required")
        volume = self.manager.get(volume_id)
        block = volume.record.mode == "block"
        for capability in request.volume_capabilities:
            reason = unsupported_reason(capability, block_supported=block)
            if reason is None and block and capability.WhichOneof("access_type") == "mount":
                reason = "volume is a block volume and cannot be mounted as a filesystem"
            if reason:
                return csi.ValidateVolumeCapabilitiesResponse(message=reason)
        for key, value in request.volume_context.items():
            if volume.record.context.get(key, value) != value:
                return csi.ValidateVolumeCapabilitiesResponse(message=f"volume_context {key}={value!r} does not match")
        if request.parameters and dict(request.parameters) != volume.record.parameters:
            return csi.ValidateVolumeCapabilitiesResponse(message="parameters do not match the volume's")
        return csi.ValidateVolumeCapabilitiesResponse(
            confirmed=csi.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
        )

    def ListVolumes(self, request: csi.ListVolumesRequest, context: grpc.ServicerContext) -> csi.ListVolumesResponse:
        if request.max_entries < 0:
            raise errors.invalid_argument("max_entries must not be negative")
        start_after = decode_token(request.starting_token) if request.starting_token else None
        volumes, last = self.manager.page(start_after, request.max_entries)
        publications = Publications()
        entries = [
            csi.ListVolumesResponse.Entry(
                volume=self.to_message(volume),
                status=csi.ListVolumesResponse.VolumeStatus(
                    published_node_ids=self._status(volume, publications).published_node_ids,
                    volume_condition=self.condition(volume),
                ),
            )
            for volume in volumes
        ]
        return csi.ListVolumesResponse(entries=entries, next_token=encode_token(last) if last else "")

    def ControllerGetVolume(
        self, request: csi.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi.ControllerGetVolumeResponse:
        volume = self.manager.get(names.volume_id(request.volume_id))
        return csi.ControllerGetVolumeResponse(
            volume=self.to_message(volume), status=self._status(volume, Publications())
        )

    def GetCapacity(self, request: csi.GetCapacityRequest, context: grpc.ServicerContext) -> csi.GetCapacityResponse:
        parameters = dict(request.parameters)
        if POOL_PARAMETER in parameters or "legacy" in self.manager.pools:
            pools = [self.manager.pool_for(parameters)]
        else:
            pools = list(self.manager.pools.values())
        usable = all(unsupported_reason(c, block_supported=True) is None for c in request.volume_capabilities)
        here = not request.HasField("accessible_topology") or matches(request.accessible_topology, self.node_id)
        if not (usable and here):
            return csi.GetCapacityResponse(available_capacity=0, maximum_volume_size=wrappers_pb2.Int64Value(value=0))
        available = [self.manager.available_for_new(pool) for pool in pools]
        return csi.GetCapacityResponse(
            available_capacity=sum(available),
            maximum_volume_size=wrappers_pb2.Int64Value(value=max(available)),
            minimum_volume_size=wrappers_pb2.Int64Value(value=0),
        )

    def ControllerGetCapabilities(
        self, request: csi.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi.ControllerGetCapabilitiesResponse:
        return csi.ControllerGetCapabilitiesResponse(
            capabilities=[csi.ControllerServiceCapability(rpc=RPC(type=kind)) for kind in self.capabilities]
        )

    # --- snapshots ----------------------------------------------------------------------------------------
    def CreateSnapshot(
        self, request: csi.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi.CreateSnapshotResponse:
        snapshot_id = names.volume_id(request.name, "name")
        source_id = names.volume_id(request.source_volume_id, "source_volume_id")
        with self.manager.locks.hold(SNAPSHOT_LOCK + snapshot_id, source_id):
            existing = self.snapshots.find(snapshot_id)
            if existing is None:
                record, _created = self.snapshots.create(snapshot_id, self.manager.get(source_id))
            elif existing.source_volume_id != source_id:
                raise errors.already_exists(
                    f"snapshot {snapshot_id!r} already exists for volume {existing.source_volume_id!r}, "
                    f"not {source_id!r}"
                )
            else:
                record = existing  # the source may be gone since: the snapshot still answers
        return csi.CreateSnapshotResponse(snapshot=snapshot_message(record))

    def DeleteSnapshot(
        self, request: csi.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi.DeleteSnapshotResponse:
        snapshot_id = names.volume_id(request.snapshot_id, "snapshot_id")
        with self.manager.locks.hold(SNAPSHOT_LOCK + snapshot_id):
            if self.snapshots.delete(snapshot_id):
                log.info("deleted snapshot %s", snapshot_id)
        return csi.DeleteSnapshotResponse()

    def ListSnapshots(
        self, request: csi.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi.ListSnapshotsResponse:
        if request.max_entries < 0:
            raise errors.invalid_argument("max_entries must not be negative")
        start_after = decode_token(request.starting_token) if request.starting_token else None
        records, last = self.snapshots.page(start_after, request.max_entries, request.snapshot_id,
                                            request.source_volume_id)
        return csi.ListSnapshotsResponse(
            entries=[csi.ListSnapshotsResponse.Entry(snapshot=snapshot_message(r)) for r in records],
            next_token=encode_token(last) if last else "",
        )

    def GetSnapshot(self, request: csi.GetSnapshotRequest, context: grpc.ServicerContext) -> csi.GetSnapshotResponse:
        snapshot_id = names.volume_id(request.snapshot_id, "snapshot_id")
        return csi.GetSnapshotResponse(snapshot=snapshot_message(self.snapshots.get(snapshot_id)))

    # --- expansion ----------------------------------------------------------------------------------------
    def ControllerExpandVolume(
        self, request: csi.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi.ControllerExpandVolumeResponse:
        volume_id = names.volume_id(request.volume_id)
        if not request.HasField("capacity_range"):
            raise errors.invalid_argument("capacity_range is required")
        requested_capacity(request.capacity_range)  # a bad range is refused before the volume is looked up
        with self.manager.locks.hold(volume_id):
            record = grow(self.manager, volume_id, request.capacity_range)
            published = bool(Publications().of_volume(self.manager.get(volume_id).path, record.mode))
        log.info("volume %s expanded to %d bytes", volume_id, record.capacity_bytes)
        return csi.ControllerExpandVolumeResponse(
            capacity_bytes=record.capacity_bytes,
            node_expansion_required=record.mode == "block" and published,
        )
