"""Facts and helpers only the CSI conformance tests need; the driver process and the generic helpers are in
tests/drivertools.py."""

from __future__ import annotations

import socket
from pathlib import Path

from drivertools import MiB

from hpp_csi.spec import csi_pb2 as csi

REPO = Path(__file__).resolve().parents[2]
DRIVER_NAME = "kubevirt.io.hostpath-provisioner"
TOPOLOGY_KEY = "topology.hostpath.csi/node"
FAST_POOL_SIZE = 64 * MiB  # the tmpfs pool `fast` of the shared driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def usage_of(reply: csi.NodeGetVolumeStatsResponse, unit: int) -> csi.VolumeUsage:
    return next(u for u in reply.usage if u.unit == unit)
