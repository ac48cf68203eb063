"""CSI Identity service: who we are, what we offer, whether every pool is usable."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import wrappers_pb2

from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc
from hpp_csi.storage.volumes import VolumeManager

log = logging.getLogger(__name__)

Service = csi.PluginCapability.Service
Expansion = csi.PluginCapability.VolumeExpansion
CAPABILITIES = (Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)


class IdentityService(csi_grpc.IdentityServicer):
    def __init__(self, driver_name: str, version: str, manager: VolumeManager) -> None:
        self.driver_name = driver_name
        self.version = version
        self.manager = manager

    def GetPluginInfo(
        self, request: csi.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi.GetPluginInfoResponse:
        return csi.GetPluginInfoResponse(name=self.driver_name, vendor_version=self.version)

    def GetPluginCapabilities(
        self, request: csi.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi.GetPluginCapabilitiesResponse:
        services = [csi.PluginCapability(service=Service(type=kind)) for kind in CAPABILITIES]
        expansion = csi.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE))
        return csi.GetPluginCapabilitiesResponse(capabilities=[*services, expansion])

    def Probe(self, request: csi.ProbeRequest, context: grpc.ServicerContext) -> csi.ProbeResponse:
        problems = [p for p in (pool.problem() for pool in self.manager.pools.values()) if p]
        for problem in problems:
            log.warning("probe: %s", problem)
        return csi.ProbeResponse(ready=wrappers_pb2.BoolValue(value=not problems))
