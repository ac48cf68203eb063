"""CSI Controller service: volumes in the node's pools. Requests are validated first, then the work is done."""

from __future__ import annotations

import binascii
import logging

import grpc
from google.protobuf import wrappers_pb2

from hpp_csi import errors, names
from hpp_csi.access import check_capabilities, requested_mode, unsupported_reason
from hpp_csi.publications import Publications
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc
from hpp_csi.topology import matches, node_topology, requirement_allows
from hpp_csi.volumes import (
    POOL_PARAMETER,
    SIZE_ENFORCED_KEY,
    CreateSpec,
    Volume,
    VolumeManager,
    resolve_capacity,
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
)


def encode_token(volume_id: str) -> str:
    return volume_id.encode().hex()


def decode_token(token: str) -> str:
    try:
        return binascii.unhexlify(token).decode()
    except (ValueError, UnicodeDecodeError):
        raise errors.aborted(
            f"starting_token {token!r} was not issued by this driver; list again from the start"
        ) from None


def condition(volume: Volume) -> csi.VolumeCondition:
    if not volume.exists_on_disk():
        return csi.VolumeCondition(abnormal=True, message=f"volume data {volume.path} is missing")
    return csi.VolumeCondition(abnormal=False, message="volume is healthy")


class ControllerService(csi_grpc.ControllerServicer):
    def __init__(self, manager: VolumeManager, node_id: str) -> None:
        self.manager = manager
        self.node_id = node_id

    def to_message(self, volume: Volume) -> csi.Volume:
        record = volume.record
        message = csi.Volume(
            volume_id=record.volume_id,
            capacity_bytes=record.capacity_bytes,
            volume_context=record.context,
            accessible_topology=[node_topology(self.node_id)],
        )
        source = record.content_source or {}
        if "snapshot" in source:
            message.content_source.snapshot.snapshot_id = source["snapshot"]
        elif "volume" in source:
            message.content_source.volume.volume_id = source["volume"]
        return message

    def _status(self, volume: Volume, publications: Publications) -> csi.ControllerGetVolumeResponse.VolumeStatus:
        published = [self.node_id] if publications.targets(volume.path) else []
        return csi.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=published, volume_condition=condition(volume)
        )

    def CreateVolume(self, request: csi.CreateVolumeRequest, context: grpc.ServicerContext) -> csi.CreateVolumeResponse:
        volume_id = names.volume_id(request.name, "name")
        check_capabilities(request.volume_capabilities, block_supported=False)
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
        if request.HasField("volume_content_source"):
            raise errors.invalid_argument("creating a volume from a snapshot or a volume is not supported yet")
        spec = CreateSpec(
            volume_id=volume_id,
            pool=pool,
            capacity_bytes=capacity,
            required_bytes=required,
            limit_bytes=limit,
            parameters=parameters,
            mode=requested_mode(request.volume_capabilities),
        )
        # HPP's context is the request's parameters; the pool and whether its size is enforced are added.
        volume_context = {**parameters, POOL_PARAMETER: pool.name, SIZE_ENFORCED_KEY: "false"}
        with self.manager.locks.hold(volume_id):
            volume, created = self.manager.create(spec, volume_context)
        log.info("%s volume %s in pool %s (%d bytes)", "created" if created else "found", volume_id, pool.name,
                 volume.record.capacity_bytes)
        return csi.CreateVolumeResponse(volume=self.to_message(volume))

    def DeleteVolume(self, request: csi.DeleteVolumeRequest, context: grpc.ServicerContext) -> csi.DeleteVolumeResponse:
        volume_id = names.volume_id(request.volume_id)
        with self.manager.locks.hold(volume_id):
            volume = self.manager.find(volume_id)
            if volume is None:
                return csi.DeleteVolumeResponse()
            targets = Publications().targets(volume.path)
            if targets:
                raise errors.failed_precondition(
                    f"volume {volume_id!r} is still published at {', '.join(targets)}; unpublish it first"
                )
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
        block_ok = volume.record.mode == "block"
        for capability in request.volume_capabilities:
            reason = unsupported_reason(capability, block_supported=block_ok)
            if reason is None and block_ok and capability.WhichOneof("access_type") == "mount":
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
                    volume_condition=condition(volume),
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
        usable = all(unsupported_reason(c, block_supported=False) is None for c in request.volume_capabilities)
        here = not request.HasField("accessible_topology") or matches(request.accessible_topology, self.node_id)
        if not (usable and here):
            return csi.GetCapacityResponse(available_capacity=0, maximum_volume_size=wrappers_pb2.Int64Value(value=0))
        available = [pool.capacity().available_bytes for pool in pools]
        return csi.GetCapacityResponse(
            available_capacity=sum(available),
            maximum_volume_size=wrappers_pb2.Int64Value(value=max(available)),
            minimum_volume_size=wrappers_pb2.Int64Value(value=0),
        )

    def ControllerGetCapabilities(
        self, request: csi.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi.ControllerGetCapabilitiesResponse:
        return csi.ControllerGetCapabilitiesResponse(
            capabilities=[csi.ControllerServiceCapability(rpc=RPC(type=kind)) for kind in CAPABILITIES]
        )
