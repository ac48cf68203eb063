"""Identity service: plugin info, capabilities, readiness of the pools."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from importlib.metadata import version

import grpc
import pytest
from csikit import DRIVER_NAME
from drivertools import Driver, mount, umount, unique

from hpp_csi.spec import csi_pb2 as csi

pytestmark = pytest.mark.timeout(60)

# csi-sanity's check on the plugin name (identity.go).
SANITY_NAME = re.compile(r"^[a-zA-Z][A-Za-z0-9-\.\_]{0,61}[a-zA-Z]$")
Service = csi.PluginCapability.Service
Expansion = csi.PluginCapability.VolumeExpansion


def test_plugin_info(driver: Driver) -> None:
    info = driver.identity.GetPluginInfo(csi.GetPluginInfoRequest())
    assert info.name == DRIVER_NAME
    assert SANITY_NAME.match(info.name) and len(info.name) <= 63
    assert info.vendor_version == version("hpp-csi")


def test_plugin_info_from_flags(spawn: Callable[..., Driver]) -> None:
    proc = spawn(extra=["--drivername", "hostpath.csi.kubevirt.io", "--version", "v9.9.9"]).start()
    info = proc.identity.GetPluginInfo(csi.GetPluginInfoRequest())
    assert (info.name, info.vendor_version) == ("hostpath.csi.kubevirt.io", "v9.9.9")


def test_plugin_capabilities(driver: Driver) -> None:
    reply = driver.identity.GetPluginCapabilities(csi.GetPluginCapabilitiesRequest())
    kinds = [cap.WhichOneof("type") for cap in reply.capabilities]
    services = {cap.service.type for cap, kind in zip(reply.capabilities, kinds, strict=True) if kind == "service"}
    expansion = {cap.volume_expansion.type for cap, kind in zip(reply.capabilities, kinds, strict=True)
                 if kind == "volume_expansion"}
    assert len(services) + len(expansion) == len(reply.capabilities)  # csi-sanity fails on any other kind
    assert services == {Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    # Expansion happens on the node only: ONLINE with node EXPAND_VOLUME and no controller EXPAND_VOLUME is what
    # makes csi-resizer record the size without calling a driver, and kubelet call NodeExpandVolume where the
    # volume is (external-resizer's NewResizerFromClient picks its trivial resizer for it).
    assert expansion == {Expansion.ONLINE}
    controller = driver.controller.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest())
    assert csi.ControllerServiceCapability.RPC.EXPAND_VOLUME not in {c.rpc.type for c in controller.capabilities}
    node = driver.node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest())
    assert csi.NodeServiceCapability.RPC.EXPAND_VOLUME in {c.rpc.type for c in node.capabilities}


def test_probe_ready(driver: Driver) -> None:
    reply = driver.identity.Probe(csi.ProbeRequest())
    assert reply.HasField("ready") and reply.ready.value


def test_probe_not_ready_when_pool_folder_removed(fresh: Driver) -> None:
    shutil.rmtree(fresh.pool_path())
    reply = fresh.identity.Probe(csi.ProbeRequest())
    assert reply.HasField("ready") and not reply.ready.value
    assert "missing" in fresh.log()


def test_probe_not_ready_when_pool_read_only(fresh: Driver) -> None:
    pool = fresh.pool_path()
    mount(["--bind", str(pool), str(pool)])
    mount(["-o", "remount,bind,ro", str(pool)])
    try:
        assert not fresh.identity.Probe(csi.ProbeRequest()).ready.value
        assert "not writable" in fresh.log()
    finally:
        umount(pool)
    assert fresh.identity.Probe(csi.ProbeRequest()).ready.value


def test_probe_survives_calls_on_a_broken_pool(fresh: Driver) -> None:
    """A broken pool makes calls fail with a status, never kills the driver."""
    shutil.rmtree(fresh.pool_path())
    with pytest.raises(grpc.RpcError) as info:
        fresh.create(unique())
    assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.FAILED_PRECONDITION)
    assert fresh.proc is not None and fresh.proc.poll() is None
    assert not fresh.identity.Probe(csi.ProbeRequest()).ready.value
